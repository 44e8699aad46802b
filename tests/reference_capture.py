"""A deliberately naive capture: every attention call of every layer
materialises its full per-head probabilities. It is the reference the tests
compare the real capture with, and the baseline the benchmark measures."""

from __future__ import annotations

from collections import defaultdict

import torch


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


def naive_joint_maps(q, k, txt, prefix, grid, cell_of):
    """A DiT's full joint softmax (B, heads, L, L) over [prefix tokens, text, image]
    keys, head mean: the image queries' I2T over the text after ``prefix`` (SD3's
    register tokens), and their I2I pooled to the cells ``cell_of`` names."""
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)
    n = grid[0] * grid[1]
    image = probs[:, txt:txt + n]
    i2t, i2i = image[:, :, prefix:txt], image[:, :, txt:txt + n]
    member = torch.nn.functional.one_hot(cell_of, int(cell_of.max()) + 1).double()  # (N, cells)
    return i2t, member.T @ i2i @ member / member.sum(0)[:, None]


def pooled_cells(grid, factor):
    """Each token's cell when an (h, w) grid is pooled ``factor`` x ``factor`` (floor mapping)."""
    rows, cols = torch.arange(grid[0]) // factor, torch.arange(grid[1]) // factor
    return (rows[:, None] * -(-grid[1] // factor) + cols[None, :]).reshape(-1)
