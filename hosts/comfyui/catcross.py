"""iSeg's Cat-Cross in "keys" form: the class tokens' keys are multiplied by
gamma in every cross-attention layer, for the cond branch only, so the
attention is softmax(Q (W . K)^T / sqrt(d)) with V and the uncond branch untouched."""

from __future__ import annotations

import torch
from comfy.ldm.modules.attention import optimized_attention

from ...attnseg.prompt_weights import KeyScale
from .unet import UNetInfo

COND = 0  # ComfyUI's cond_or_uncond code of the positive branch


def install_key_scale(model, info: UNetInfo, scale: KeyScale) -> None:
    """Patch every cross-attention layer of ``model`` (a clone the caller owns),
    around whatever replace patch is there (a capture patch then records the
    re-weighted attention)."""
    replaces = model.model_options.setdefault("transformer_options", {}).get("patches_replace", {})
    cache: dict[tuple, torch.Tensor] = {}

    def make_patch(previous):
        def patch(q, k, v, extra):
            chunks = tuple(extra.get("cond_or_uncond") or [COND])
            if COND in chunks:
                # (batch, tokens, 1) weights, built once per batch layout: this runs in every layer and step.
                key = (chunks, k.shape[0], k.shape[1], k.device, k.dtype)
                if key not in cache:
                    cond = scale.weights(k.shape[1], k.device, k.dtype)
                    rows = [cond if code == COND else torch.ones_like(cond) for code in chunks]
                    cache[key] = torch.stack(rows).repeat_interleave(k.shape[0] // len(chunks), dim=0)[:, :, None]
                k = k * cache[key]
            if previous is not None:
                return previous(q, k, v, extra)
            return optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                       transformer_options=extra)

        return patch

    for layer in info.layers:
        previous = replaces.get("attn2", {}).get(layer.patch_key)
        model.set_model_attn2_replace(make_patch(previous), *layer.patch_key)
