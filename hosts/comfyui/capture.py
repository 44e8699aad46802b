"""Attention capture on a ComfyUI ModelPatcher clone.

Only the layers a plan selects get an attention replace patch; in captured
steps such a layer computes attention with its probabilities (attnseg core),
in every other step it calls ComfyUI's optimized attention (or the replace
patch that was there before). A model-function wrapper tells the patches which
sampling step is running, once per UNet call, so the patches never sync.

Calls may run at once (cond and uncond on two devices, each in its own thread):
a call's capture flags travel in that call's own transformer_options, and adds
to the store are serialised."""

from __future__ import annotations

import itertools
import threading

import comfy.model_management
import comfy.ops
import torch
from comfy.ldm.modules.attention import optimized_attention

from ...attnseg import AttentionStore, AttnSegError, LayerKey
from ...attnseg.attention import GridPool, attention_with_maps, chosen_heads_mean, fold_repeated_tokens, head_mean
from ...attnseg.goca import output_weighted_heads
# CapturePlan, StepRange and GoCA's reference factor are the core's; imported from here by the host's modules
from ...attnseg.plan import GOCA_REFERENCE_FACTOR, HEAD_REDUCTIONS, CapturePlan, StepRange  # noqa: F401
from .unet import AttentionLayer, UNetInfo, attention_module

BRANCH_NAMES = {0: "cond", 1: "uncond"}
# Each install's transformer_options key: captures stacked on one model each read their own flags.
_INSTALLS = itertools.count()


def projection_weight(projection: torch.nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The output projection's weight as its own forward would see it: on ``like``'s
    device, with the weight functions ComfyUI adds in low-VRAM mode (LoRA patches
    applied on the fly) run. Outside low-VRAM mode this is the resident weight."""
    if isinstance(projection, comfy.ops.CastWeightBiasOp):
        return comfy.ops.cast_bias_weight(projection, like)[0]
    return projection.weight.to(like.device)


def head_counter(info, model):
    """How many heads a layer's attention has on this ComfyUI model (a plan's
    ``head_count``): a DiT's blocks all have the model's count."""
    def count(layer, kind: str) -> int:
        if hasattr(info, "head_count"):
            return info.head_count(layer)
        return attention_module(model, layer, "attn2" if kind == "cross" else "attn1").heads
    return count


def fallback_attention(previous):
    """The attention a patch runs when it has nothing to do: the replace patch that
    was there before it, else ComfyUI's optimized attention."""
    def fast(q, k, v, extra):
        if previous is not None:
            return previous(q, k, v, extra)
        return optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                   transformer_options=extra)
    return fast


def cond_rows(cond_or_uncond, batch: int) -> slice | None:
    """The cond branch's rows of a model call's batch (its first chunk), None when
    the call has no cond rows."""
    chunks = list(cond_or_uncond or [0])
    if 0 not in chunks:
        return None
    per_chunk = batch // len(chunks)
    start = chunks.index(0) * per_chunk
    return slice(start, start + per_chunk)


def wanted_rows(transformer_options: dict, batch: int, branches) -> list[tuple[str, slice]]:
    """The batch rows of each captured branch in this call (its first chunk)."""
    chunks = transformer_options.get("cond_or_uncond") or [0]
    per_chunk = batch // len(chunks)
    rows = {}
    for i, code in enumerate(chunks):
        branch = BRANCH_NAMES.get(code)
        if branch in branches and branch not in rows:
            rows[branch] = slice(i * per_chunk, (i + 1) * per_chunk)
    return list(rows.items())


def grid_pool(pools: dict, h: int, w: int, max_tokens: int, device) -> GridPool:
    """The install's pool for an h x w grid on ``device``, made on first use."""
    key = (h, w, device)
    if key not in pools:
        pools[key] = GridPool(h, w, max_tokens, device)
    return pools[key]


def step_index(sample_sigmas: torch.Tensor | None, sigma: torch.Tensor) -> tuple[int, int]:
    """(step, total steps) of the running UNet call: the last schedule sigma at
    or above the current one (so a second-order sampler's midpoint counts to
    the step it belongs to)."""
    if sample_sigmas is None:
        return 0, 1
    current = float(sigma.max())
    at_or_above = int((sample_sigmas >= current * (1 - 1e-4)).sum())
    return max(0, at_or_above - 1), max(1, len(sample_sigmas) - 1)


def install_capture(model, info: UNetInfo, store: AttentionStore, plan: CapturePlan) -> None:
    """Patch ``model`` (a clone the caller owns) so its runs fill ``store``."""
    if plan.cross_heads not in HEAD_REDUCTIONS:
        raise AttnSegError(f"heads: '{plan.cross_heads}' is not one of {', '.join(HEAD_REDUCTIONS)}.")
    store.head_reduction = plan.cross_heads
    reference = plan.reference_layer(info)
    # This call's {"cross": bool, "self": bool}, set by the wrapper in a copy of the call's
    # transformer_options; the attention patches get it in their extra options.
    flags_key = f"attnseg_capture_{next(_INSTALLS)}"
    # The adds of calls running at once: StoredMaps are created on a layer's first add
    # (check, then insert) and summed in place. One lock around the add is the cheapest
    # correct choice: it only queues kernels (no device sync), so it is held for
    # microseconds, where per-thread stores would need a merge after every pass.
    adding = threading.Lock()
    replaces = model.model_options.setdefault("transformer_options", {}).get("patches_replace", {})
    # The host repeats a shorter context to a common length: fold the copies of
    # the cond prompt back onto its own tokens (the uncond length is unknown).
    fold_lengths = {"cond": store.prompt.token_count if store.prompt else None, "uncond": None}
    pools: dict[tuple, GridPool] = {}

    def make_patch(layer: AttentionLayer, kind: str, previous):
        key = LayerKey(kind, layer.block, layer.block_id, layer.depth, layer.factor)
        some_heads = picked_heads.get((layer, kind))
        head_reducer = head_mean if some_heads is None else chosen_heads_mean(some_heads)
        stored_heads = len(some_heads) if some_heads else None  # None: every head of the call
        output_weighted = kind == "cross" and plan.cross_heads == "auto" and some_heads is None
        # The projection's weight is read at call time: it may be cast, moved or
        # LoRA-patched between runs, or (low VRAM) only patched inside its forward.
        projection = attention_module(model, layer, "attn2").to_out[0] if output_weighted else None
        stores_queries = kind == "cross" and layer == reference
        query_key = LayerKey("query", layer.block, layer.block_id, layer.depth, layer.factor)

        fast = fallback_attention(previous)

        def patch(q, k, v, extra):
            # A large pass can take seconds per layer: an interrupt stops it at the next
            # patched layer (a flag read, no device sync).
            comfy.model_management.throw_exception_if_processing_interrupted()
            flags = extra.get(flags_key)
            rows = wanted_rows(extra, q.shape[0], plan.branches) if flags and flags[kind] else None
            if not rows:
                return fast(q, k, v, extra)
            h, w = extra["activations_shape"][-2:]
            pool = grid_pool(pools, h, w, plan.self_max_tokens, q.device) if kind == "self" else None
            # One captured branch: only its rows get maps. Several: all rows, split after.
            keep = rows[0][1] if len(rows) == 1 else slice(None)
            reducer = head_reducer
            if projection is not None:
                reducer = output_weighted_heads(projection_weight(projection, q))
            values = v if previous is None or projection is not None else None
            out, maps = attention_with_maps(q, k, values, extra["n_heads"], reducer, pool, keep)
            grid = pool.grid if pool is not None else (h, w)
            for branch, part in rows:
                branch_maps = maps if len(rows) == 1 else maps[part]
                if kind == "cross":
                    branch_maps = fold_repeated_tokens(branch_maps, fold_lengths[branch])
                with adding:
                    store.add(key, branch, grid, branch_maps, stored_heads or extra["n_heads"])
                    if stores_queries and flags["self"]:  # the same steps as the self-attention
                        store.add(query_key, branch, (h, w), q[part])
            return out if previous is None else fast(q, k, v, extra)

        return patch

    picked_heads = plan.heads(info, head_counter(info, model))
    selected = {kind: plan.layers(info, kind) for kind in ("cross", "self")}
    for layer in info.layers:
        for kind, slot in (("cross", "attn2"), ("self", "attn1")):
            if layer in selected[kind]:
                previous = replaces.get(slot, {}).get(layer.patch_key)
                setter = model.set_model_attn2_replace if slot == "attn2" else model.set_model_attn1_replace
                setter(make_patch(layer, kind, previous), *layer.patch_key)

    previous_wrapper = model.model_options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        options = args["c"].get("transformer_options", {})
        step, total = step_index(options.get("sample_sigmas"), args["timestep"])
        flags = {"cross": plan.cross_steps is not None and plan.cross_steps.contains(step, total),
                 "self": plan.self_steps is not None and plan.self_steps.contains(step, total)}
        if flags["cross"] or flags["self"]:
            store.steps.add(step)  # one set.add: atomic under the GIL
        # Copies, not the caller's dicts: a call running at once on another thread
        # keeps its own flags, and the sampler's options stay as they were.
        args = {**args, "c": {**args["c"], "transformer_options": {**options, flags_key: flags}}}
        if previous_wrapper is not None:
            return previous_wrapper(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
