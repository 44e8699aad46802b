"""A deliberately naive capture: every attention call of every layer
materialises its full per-head probabilities. It is the reference the tests
compare the real capture with, and the baseline the benchmark measures."""

from __future__ import annotations

from collections import defaultdict



def install_naive_capture(model, keep_maps: bool = True):
    """Wrap every attention call of ``model`` (a clone) through ComfyUI's
    attention override; returns {(kind, block, id, depth, branch): [maps per call]}."""
    record = defaultdict(list)

    def override(func, q, k, v, heads, *args, transformer_options=None, **kwargs):
        out = func(q, k, v, heads, *args, transformer_options=transformer_options, **kwargs)
        b, n, inner = q.shape
        d = inner // heads
        qh = q.view(b, n, heads, d).transpose(1, 2).float()
        kh = k.view(b, k.shape[1], heads, d).transpose(1, 2).float()
        probs = (qh @ kh.transpose(-1, -2) * d ** -0.5).softmax(-1)  # (B, heads, N, T): the naive part
        if keep_maps:
            opts = transformer_options or {}
            kind = "self" if k.shape[1] == n else "cross"
            chunks = opts.get("cond_or_uncond", [0])
            per = b // len(chunks)
            block = opts.get("block", ("?", 0))
            for i, code in enumerate(chunks):
                key = (kind, block[0], block[1], opts.get("block_index", 0), "cond" if code == 0 else "uncond")
                record[key].append(probs[i * per:(i + 1) * per].mean(1))
        return out

    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return record
