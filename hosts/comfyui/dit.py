"""Attention capture on Flux (DiT) models through ComfyUI's attention override.

Every Flux attention call goes through ``wrap_attn``, which hands it to
``transformer_options["optimized_attention_override"]`` when one is set
(ComfyUI >= 0.3.60). The capture installs such an override on a clone, chained
to the override that was there before (never replacing it, never patching a
block class), and a model-function wrapper that tells it, per model call, the
step, the text length and the image grid.

Which block is calling: Flux's ``forward_orig`` (0.3.75) writes
``block_type`` ("double"/"single") and ``block_index`` into the call's
transformer_options before each block, and the blocks pass that dict down to
the attention, so the override reads the block from it: no call counting, which
a skipped or replaced block would throw off.

The joint sequence is [txt, img(, reference latents)] in both block types; the
text length is the conditioning's (``c_crossattn``, after the host's repeat to a
common length), the image grid is the latent's over the patch size (padded up).
The output always comes from the previous override or the fast kernel; a
captured block adds the probabilities of its image queries from q . k and each
row's log-sum-exp (attnseg core), reduced over heads inside the hook."""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass

import comfy.ldm.flux.model
import comfy.model_management

from ...attnseg import AttentionStore, AttnSegError, LayerKey
from ...attnseg.attention import GridPool, fold_repeated_tokens, head_mean, joint_attention_maps
from .capture import StepRange, grid_pool, step_index, wanted_rows

OVERRIDE = "optimized_attention_override"
BLOCK_TYPES = ("double", "single")
# Each install's transformer_options key: captures stacked on one model each read their own call info.
_INSTALLS = itertools.count()


@dataclass(frozen=True)
class FluxInfo:
    """The layout the capture needs: block counts, heads and patch size."""

    double: int
    single: int
    heads: int
    patch_size: int

    def blocks(self) -> list[tuple[str, int]]:
        return [("double", i) for i in range(self.double)] + [("single", i) for i in range(self.single)]


def describe_flux(model) -> FluxInfo:
    """The Flux layout of a ModelPatcher; other models are refused."""
    net = model.model.diffusion_model
    if not isinstance(net, comfy.ldm.flux.model.Flux):
        raise AttnSegError(f"DiT capture: the model is a {type(net).__name__}, not a Flux model; "
                           f"only Flux is supported so far.")
    return FluxInfo(len(net.double_blocks), len(net.single_blocks), net.num_heads, net.patch_size)


@dataclass(frozen=True)
class DiTCapturePlan:
    """Which joint attention to record.

    ``cross_blocks``: the (block type, index) pairs whose image x text
    probabilities (I2T) are stored, None = every block; ``self_blocks``: those
    whose image x image probabilities (I2I) are stored, pooled to at most
    ``self_max_tokens`` cells. Steps as on the UNet capture."""

    cross_blocks: tuple[tuple[str, int], ...] | None = None
    self_blocks: tuple[tuple[str, int], ...] = ()
    cross_steps: StepRange | None = StepRange()
    self_steps: StepRange | None = StepRange()
    branches: frozenset[str] = frozenset({"cond"})
    self_max_tokens: int = 64 * 64

    def selected(self, info: FluxInfo) -> dict[str, frozenset[tuple[str, int]]]:
        """{kind: blocks}, each block checked against the model."""
        every = info.blocks()
        chosen = {"cross": every if self.cross_blocks is None else self.cross_blocks, "self": self.self_blocks}
        for kind, blocks in chosen.items():
            for block in blocks:
                if block not in every:
                    raise AttnSegError(
                        f"DiT capture: {kind} block {block} does not exist; the model has double blocks "
                        f"0-{info.double - 1} and single blocks 0-{info.single - 1}.")
        return {kind: frozenset(blocks) for kind, blocks in chosen.items()}


def _qkv_heads(args: tuple, kwargs: dict):
    """(q, k, heads) of an optimized_attention call, q and k as (B, heads, L, d)."""
    q, k, _, heads = args[:4]
    if not kwargs.get("skip_reshape"):
        q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))
    return q, k, heads


def install_dit_capture(model, store: AttentionStore, plan: DiTCapturePlan):
    """A clone of the Flux ``model`` whose runs fill ``store``; ``model`` is untouched."""
    info = describe_flux(model)
    selected = plan.selected(info)
    model = model.clone()
    options = model.model_options.setdefault("transformer_options", {})
    previous = options.get(OVERRIDE)
    call_key = f"attnseg_dit_capture_{next(_INSTALLS)}"
    # Calls may run at once on two threads (cond/uncond on two devices): adds are serialised
    # (the lock is held while kernels are queued, no device sync), as on the UNet capture.
    adding = threading.Lock()
    pools: dict[tuple, GridPool] = {}
    fold_cond = store.prompt.token_count if store.prompt else None

    def record(call: dict, block: tuple[str, int], kinds: list[str], args: tuple, kwargs: dict,
               transformer_options: dict) -> None:
        q, k, heads = _qkv_heads(args, kwargs)
        rows = wanted_rows(transformer_options, q.shape[0], plan.branches)
        if not rows:
            return
        comfy.model_management.throw_exception_if_processing_interrupted()
        txt, (gh, gw) = call["txt"], call["grid"]
        image = slice(txt, txt + gh * gw)
        if image.stop > q.shape[2]:
            raise AttnSegError(f"DiT capture: {block[0]} block {block[1]} attends over {q.shape[2]} tokens, "
                               f"fewer than the {txt} text + {gh}x{gw} image tokens the conditioning and "
                               f"latent imply (a patch changed the sequence).")
        key_blocks = {}
        if "cross" in kinds:
            key_blocks["cross"] = (slice(0, txt), None)
        if "self" in kinds:
            key_blocks["self"] = (image, grid_pool(pools, gh, gw, plan.self_max_tokens, q.device))
        keep = rows[0][1] if len(rows) == 1 else slice(None)
        maps = joint_attention_maps(q, k, image, key_blocks, head_mean, keep, kwargs.get("mask"))
        for kind, block_maps in maps.items():
            key = LayerKey.dit(kind, block[0], block[1], info.patch_size)
            grid = key_blocks[kind][1].grid if kind == "self" else (gh, gw)
            for branch, part in rows:
                branch_maps = block_maps if len(rows) == 1 else block_maps[part]
                if kind == "cross":
                    branch_maps = fold_repeated_tokens(branch_maps, fold_cond if branch == "cond" else None)
                with adding:
                    store.add(key, branch, grid, branch_maps, heads)

    def override(func, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options") or {}
        call = transformer_options.get(call_key)
        if call is not None:
            block = (transformer_options.get("block_type"), transformer_options.get("block_index"))
            kinds = [kind for kind in ("cross", "self") if call[kind] and block in selected[kind]]
            if kinds:
                record(call, block, kinds, args, kwargs, transformer_options)
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    options[OVERRIDE] = override
    previous_wrapper = model.model_options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        c = args["c"]
        call_options = c.get("transformer_options", {})
        step, total = step_index(call_options.get("sample_sigmas"), args["timestep"])
        h, w = args["input"].shape[-2:]
        call = {"cross": plan.cross_steps is not None and plan.cross_steps.contains(step, total),
                "self": plan.self_steps is not None and plan.self_steps.contains(step, total),
                "txt": c["c_crossattn"].shape[1],
                "grid": (math.ceil(h / info.patch_size), math.ceil(w / info.patch_size))}
        if call["cross"] or call["self"]:
            store.steps.add(step)
        # Copies, not the caller's dicts: a call on another thread keeps its own info.
        args = {**args, "c": {**c, "transformer_options": {**call_options, call_key: call}}}
        if previous_wrapper is not None:
            return previous_wrapper(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
    return model
