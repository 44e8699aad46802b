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
from dataclasses import dataclass

import comfy.model_management
import comfy.ops
import torch
from comfy.ldm.modules.attention import optimized_attention

from ...attnseg import AttentionStore, AttnSegError, LayerKey
from ...attnseg.attention import GridPool, attention_with_maps, chosen_heads_mean, fold_repeated_tokens, head_mean
from ...attnseg.goca import output_weighted_heads
from ...attnseg.layers import LayerPick, check_heads, resolve
from ...attnseg.presets import CAPTURE_METHODS, check_family
from .unet import AttentionLayer, UNetInfo, attention_module

BRANCH_NAMES = {0: "cond", 1: "uncond"}
HEAD_REDUCTIONS = ("mean", "auto")
# GoCA's reference layer sits at half the latent resolution (SD1.5 at 512 px: 32 x 32).
GOCA_REFERENCE_FACTOR = 2
# Each install's transformer_options key: captures stacked on one model each read their own flags.
_INSTALLS = itertools.count()


def projection_weight(projection: torch.nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The output projection's weight as its own forward would see it: on ``like``'s
    device, with the weight functions ComfyUI adds in low-VRAM mode (LoRA patches
    applied on the fly) run. Outside low-VRAM mode this is the resident weight."""
    if isinstance(projection, comfy.ops.CastWeightBiasOp):
        return comfy.ops.cast_bias_weight(projection, like)[0]
    return projection.weight.to(like.device)


@dataclass(frozen=True)
class StepRange:
    """Steps start..end inclusive; a negative end counts back from the last step."""

    start: int = 0
    end: int = -1

    def contains(self, step: int, total: int) -> bool:
        end = self.end if self.end >= 0 else total + self.end
        return self.start <= step <= end


@dataclass(frozen=True)
class CapturePlan:
    """Which attention to record.

    ``cross_factors`` / ``self_factors``: latent downscale factors of the layers
    to capture (1 = full latent resolution); ``None`` for self means the finest
    attention resolution of the model, ``self_every_layer`` overrides it with
    every layer. Self-attention grids larger than ``self_max_tokens`` are
    average-pooled (64 x 64 by default). ``cross_heads``: "mean", or "auto" for
    GoCA's output-weighted heads. ``reference_factor``: also store the queries of
    GoCA's reference layer at that latent factor (None: no queries).

    A preset can name layers and heads instead: ``self_layers`` (layer picks
    that replace the factor rules), ``self_heads`` (the heads whose mean is kept
    for those layers), ``cross_layers`` (picks that replace ``cross_factors``)
    and ``cross_head_lists`` ((pick, heads) pairs: those layers keep the mean of
    those heads only). Heads are chosen inside the hook. ``source`` names the
    preset in error messages."""

    cross_steps: StepRange | None = StepRange()
    self_steps: StepRange | None = StepRange()
    cross_factors: frozenset[int] | None = None  # None: every resolution
    self_factors: frozenset[int] | None = None  # None: the finest one
    branches: frozenset[str] = frozenset({"cond"})
    self_max_tokens: int = 64 * 64
    self_every_layer: bool = False
    cross_heads: str = "mean"
    reference_factor: int | None = None
    self_layers: tuple[LayerPick, ...] | None = None
    self_heads: tuple[int, ...] | None = None
    cross_layers: tuple[LayerPick, ...] | None = None
    cross_head_lists: tuple[tuple[LayerPick, tuple[int, ...]], ...] = ()
    reference: LayerPick | None = None  # GoCA's reference layer by place (wins over reference_factor)
    source: str = "custom"

    def reference_layer(self, info) -> AttentionLayer | None:
        """``info``: a UNetInfo or a DiTInfo (both list their layers and defaults)."""
        if self.reference is not None:
            return resolve(info.layers, (self.reference,), self.source)[0]
        return info.reference_at(self.reference_factor) if self.reference_factor else None

    def layers(self, info, kind: str) -> list[AttentionLayer]:
        """The layers whose ``kind`` attention this plan records."""
        if kind == "cross":
            if self.cross_steps is None:
                return []
            if self.cross_layers is not None:
                return resolve(info.layers, self.cross_layers, self.source)
            return [la for la in info.layers if self.cross_factors is None or la.factor in self.cross_factors]
        if self.self_steps is None:
            return []
        if self.self_layers is not None:
            return resolve(info.layers, self.self_layers, self.source)
        if self.self_every_layer:
            return list(info.layers)
        if self.self_factors is None:
            return info.default_self_layers()
        return [la for la in info.layers if la.factor in self.self_factors]

    def check(self, info, model) -> None:
        """Refuse a preset of another model family, layers or heads the model lacks
        (before any work is spent)."""
        check_family(self.source, getattr(info, "family", "unet"), info.model_id, CAPTURE_METHODS)
        self.layers(info, "cross")
        self.layers(info, "self")
        self.reference_layer(info)
        self.heads(info, model)

    def heads(self, info, model) -> dict[tuple[AttentionLayer, str], tuple[int, ...]]:
        """{(layer, kind): heads} for the layers that keep some heads only, checked
        against each layer's head count."""
        chosen = {}
        if self.self_heads is not None:
            for layer in self.layers(info, "self"):
                chosen[(layer, "self")] = self.self_heads
        for pick, heads in self.cross_head_lists:
            for layer in resolve(info.layers, (pick,), self.source):
                chosen[(layer, "cross")] = heads
        for (layer, kind), heads in chosen.items():
            if hasattr(info, "head_count"):  # a DiT: every block has the model's head count
                count = info.head_count(layer)
            else:
                count = attention_module(model, layer, "attn2" if kind == "cross" else "attn1").heads
            check_heads(heads, count, f"the {kind}-attention of {layer.block} block {layer.block_id} "
                        f"(depth {layer.depth})", self.source)
        return chosen


def fallback_attention(previous):
    """The attention a patch runs when it has nothing to do: the replace patch that
    was there before it, else ComfyUI's optimized attention."""
    def fast(q, k, v, extra):
        if previous is not None:
            return previous(q, k, v, extra)
        return optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                   transformer_options=extra)
    return fast


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

    picked_heads = plan.heads(info, model)
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
