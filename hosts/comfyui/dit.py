"""Attention capture on DiT models (Flux, SD3/SD3.5) through ComfyUI's attention override.

Every Flux and MMDiT attention call goes through ``wrap_attn``, which hands it to
``transformer_options["optimized_attention_override"]`` when one is set
(ComfyUI >= 0.3.60). The capture installs such an override on a clone, chained
to the override that was there before (never replacing it, never patching a
block class), and a model-function wrapper that tells it, per model call, the
step, the text length and the image grid.

Which block is calling: Flux's ``forward_orig`` (0.3.75) writes ``block_type``
("double"/"single") and ``block_index`` into the call's transformer_options
before each block, and the blocks pass that dict down to the attention. SD3's
MMDiT sets neither, so each captured joint block gets a ``patches_replace["dit"]``
block wrapper (chained to one already there) that puts them in a copy of the
block's options: no call counting, which a skipped or replaced block would throw off.

The joint sequence is [txt, img] on both families (Flux: then any reference
latents; SD3: txt is the register tokens and the context); the text length is
the conditioning's (``c_crossattn``, after the host's repeat to a common
length), the image grid the latent's over the patch size (padded up). The output
always comes from the previous override or the fast kernel; a captured block adds
the probabilities of its image queries from q . k and each row's log-sum-exp
(attnseg core), reduced over heads inside the hook. Where the host's kernel is
SDPA (ComfyUI's default on CUDA) and nothing is chained before us, a captured
block's output comes from the fused kernel SDPA dispatches to, asked for its
log-sum-exp too, so the capture forms only the scores of the key blocks it keeps;
elsewhere it computes the log-sum-exp over all keys itself."""

from __future__ import annotations

import itertools
import math
import threading
import comfy.ldm.chroma.model
import comfy.ldm.chroma_radiance.model
import comfy.ldm.flux.model
import comfy.ldm.modules.attention
import comfy.ldm.modules.diffusionmodules.mmdit
import comfy.model_management
import torch

from ...attnseg import AttentionStore, AttnSegError, LayerKey
from ...attnseg.layers import DiTInfo
from ...attnseg.attention import (GridPool, attention_with_lse, chosen_heads_mean, fold_repeated_tokens,
                                  joint_maps_per_reducer)
from .capture import CapturePlan, grid_pool, head_counter, step_index, wanted_rows
from .catcross import COND
from .unet import AttentionLayer

OVERRIDE = "optimized_attention_override"
SUPPORTED = "Flux (Flux.1 dev/schnell, Chroma and models of that layout) and SD3/SD3.5 (MMDiT)"
# Each install's transformer_options key: captures stacked on one model each read their own call info.
_INSTALLS = itertools.count()


def _flux_layout(net) -> bool:
    """Flux and the models built on its blocks that name them the same way (Chroma;
    not Chroma Radiance, which works on pixels, not latents)."""
    if isinstance(net, comfy.ldm.flux.model.Flux):
        return True
    return isinstance(net, comfy.ldm.chroma.model.Chroma) and not isinstance(
        net, comfy.ldm.chroma_radiance.model.ChromaRadiance)


def dit_family(model) -> str | None:
    """"flux", "sd3", or None for a model that is not a supported DiT."""
    net = model.get_model_object("diffusion_model")
    if _flux_layout(net):
        return "flux"
    if isinstance(net, comfy.ldm.modules.diffusionmodules.mmdit.MMDiT):
        return "sd3"
    return None


def describe_dit(model, input_name: str = "model") -> DiTInfo:
    """The layout of a supported DiT ModelPatcher."""
    net = model.get_model_object("diffusion_model")
    family = dit_family(model)
    name = type(getattr(model.model, "model_config", model.model)).__name__
    channels = model.model.latent_format.latent_channels
    if family == "flux":
        layers = [AttentionLayer("double", i, 0, net.patch_size) for i in range(len(net.double_blocks))]
        layers += [AttentionLayer("single", i, 0, net.patch_size) for i in range(len(net.single_blocks))]
        return DiTInfo("flux", f"{name} (Flux, {len(net.double_blocks)} double + {len(net.single_blocks)} single "
                       f"blocks)", net.txt_in.in_features, tuple(layers), net.num_heads, net.patch_size, channels)
    if family == "sd3":
        layers = tuple(AttentionLayer("joint", i, 0, net.patch_size) for i in range(len(net.joint_blocks)))
        heads = net.joint_blocks[0].x_block.attn.num_heads
        context_dim = net.context_embedder.in_features if net.context_embedder is not None else 0
        return DiTInfo("sd3", f"{name} (MMDiT, {len(layers)} joint blocks)", context_dim, layers, heads,
                       net.patch_size, channels, net.register_length)
    raise unsupported(model, input_name)


def unsupported(model, input_name: str) -> AttnSegError:
    """The error for a model family the capture cannot hook: it names the model and what is supported."""
    net = model.get_model_object("diffusion_model")
    name = type(getattr(model.model, "model_config", model.model)).__name__
    return AttnSegError(f"{input_name}: {name} ({type(net).__name__}) is not a model AttnSeg can capture. "
                        f"Supported: UNet models (SD1.x, SD2.x, SDXL) and the DiTs {SUPPORTED}.")


def _qkv_heads(args: tuple, kwargs: dict):
    """(q, k, heads) of an optimized_attention call, q and k as (B, heads, L, d)."""
    q, k = args[:2]
    heads = args[3] if len(args) > 3 else kwargs["heads"]  # MMDiT passes heads by keyword
    if not kwargs.get("skip_reshape"):
        q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))
    return q, k, heads


# ComfyUI's SDPA attention as the override receives it (wrap_attn passes the unwrapped function)
_SDPA = getattr(comfy.ldm.modules.attention.attention_pytorch, "__wrapped__", None)


def _fused_call(func, args: tuple, kwargs: dict):
    """The block's attention from torch's fused kernel with each row's log-sum-exp, when
    the host's own kernel is SDPA (the default on CUDA), nothing is chained before us and
    there is no mask: (out as the host returns it, lse (B, heads, L)). Else None, and the
    host's kernel runs as usual."""
    if func is not _SDPA or kwargs.get("mask") is not None:
        return None
    q, k, v = args[:3]
    heads = args[3] if len(args) > 3 else kwargs["heads"]
    if q.shape[0] > comfy.ldm.modules.attention.SDP_BATCH_LIMIT:
        return None
    if not kwargs.get("skip_reshape"):  # as attention_pytorch reads them (MMDiT's v comes as (B, L, heads, d))
        dim = q.shape[-1] // heads
        q, k, v = (t.reshape(t.shape[0], -1, heads, dim).transpose(1, 2) for t in (q, k, v))
    result = attention_with_lse(q, k, v)
    if result is None:
        return None
    out, lse = result
    if not kwargs.get("skip_output_reshape"):
        out = out.transpose(1, 2).flatten(2)
    return out, lse


def _scaled_keys(args: tuple, kwargs: dict, weights: torch.Tensor) -> tuple:
    """The call's arguments with the keys multiplied by (B, L) ``weights`` along the sequence."""
    k = args[1]
    w = weights.to(k)
    k = k * (w[:, None, :, None] if kwargs.get("skip_reshape") else w[:, :, None])
    return (args[0], k, *args[2:])


def install_block_identity(model, info: DiTInfo, blocks) -> None:
    """SD3: a dit block wrapper per captured block that names the block in a copy of
    its transformer_options (MMDiT sets no block_type / block_index itself)."""
    replaces = model.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})

    def make_wrapper(index: int, previous):
        def wrapper(args, extra):
            options = {**args["transformer_options"], "block_type": "joint", "block_index": index}
            args = {**args, "transformer_options": options}
            return previous(args, extra) if previous is not None else extra["original_block"](args)
        return wrapper

    for block_type, index in blocks:
        model.set_model_patch_replace(make_wrapper(index, replaces.get(("double_block", index))), "dit",
                                      "double_block", index)


def install_dit_capture(model, info: DiTInfo, store: AttentionStore, plan: CapturePlan, key_scale=None) -> None:
    """Patch ``model`` (a clone the caller owns) so its runs fill ``store``. ``key_scale``
    (Cat-Cross "keys") multiplies the cond rows' class-token keys inside every joint
    attention, captured or not, so the sample and the maps see the weighted attention."""
    plan.check_dit_heads(info)
    store.head_reduction = plan.cross_heads
    store.architecture, store.family = "dit", info.family
    selected = {kind: {(la.block, la.block_id) for la in plan.layers(info, kind)} for kind in ("cross", "self")}
    chosen_heads = plan.heads(info, head_counter(info, model))
    picked = {(layer.block, layer.block_id, kind): heads for (layer, kind), heads in chosen_heads.items()}
    reducers = {key: chosen_heads_mean(heads) for key, heads in picked.items()}
    reference = plan.reference_layer(info)
    reference = (reference.block, reference.block_id) if reference is not None else None
    options = model.model_options.setdefault("transformer_options", {})
    previous = options.get(OVERRIDE)
    call_key = f"attnseg_dit_capture_{next(_INSTALLS)}"
    # Calls may run at once on two threads (cond/uncond on two devices): adds are serialised
    # (the lock is held while kernels are queued, no device sync), as on the UNet capture.
    adding = threading.Lock()
    pools: dict[tuple, GridPool] = {}
    fold = {"cond": store.prompt.token_count if store.prompt else None, "uncond": None}
    weight_cache: dict[tuple, torch.Tensor] = {}

    def key_weights(transformer_options: dict, batch: int, length: int, txt: int, device) -> torch.Tensor | None:
        """(B, L) key weights: the cond rows' class tokens scaled, 1 elsewhere (built once per layout)."""
        chunks = tuple(transformer_options.get("cond_or_uncond") or [COND])
        if COND not in chunks:
            return None
        cache_key = (chunks, batch, length, txt, device)
        if cache_key not in weight_cache:
            cond = torch.ones(length, device=device)
            # The prompt's tokens follow SD3's register tokens; a tiled context repeats the prompt.
            cond[info.text_prefix:txt] = key_scale.weights(txt - info.text_prefix, device, cond.dtype)
            rows = [cond if code == COND else torch.ones_like(cond) for code in chunks]
            weight_cache[cache_key] = torch.stack(rows).repeat_interleave(batch // len(chunks), dim=0)
        return weight_cache[cache_key]

    def record(call: dict, block: tuple[str, int], kinds: list[str], args: tuple, kwargs: dict,
               transformer_options: dict, out: torch.Tensor | None, lse: torch.Tensor | None) -> None:
        q, k, heads = _qkv_heads(args, kwargs)
        rows = wanted_rows(transformer_options, q.shape[0], plan.branches)
        if not rows:
            return
        txt, (gh, gw) = call["txt"], call["grid"]
        image = slice(txt, txt + gh * gw)
        key_blocks = {}
        if "cross" in kinds:
            key_blocks["cross"] = (slice(info.text_prefix, txt), None)
        if "self" in kinds:
            key_blocks["self"] = (image, grid_pool(pools, gh, gw, plan.self_max_tokens, q.device))
        keep = rows[0][1] if len(rows) == 1 else slice(None)
        block_reducers = {kind: reducers[block + (kind,)] for kind in key_blocks if block + (kind,) in reducers}
        maps = joint_maps_per_reducer(q, k, image, key_blocks, block_reducers, keep, kwargs.get("mask"), lse)
        for kind, block_maps in maps.items():
            key = LayerKey.dit(kind, block[0], block[1], info.patch_size)
            grid = key_blocks[kind][1].grid if kind == "self" else (gh, gw)
            stored_heads = len(picked.get(block + (kind,), ())) or heads
            for branch, part in rows:
                branch_maps = block_maps if len(rows) == 1 else block_maps[part]
                if kind == "cross":
                    branch_maps = fold_repeated_tokens(branch_maps, fold[branch])
                with adding:
                    store.add(key, branch, grid, branch_maps, stored_heads)
        if out is not None:  # GoCA's reference: the image tokens' attention output, in the self steps
            key = LayerKey.dit("query", block[0], block[1], info.patch_size)
            for branch, part in rows:
                with adding:
                    store.add(key, branch, (gh, gw), out[part, image])

    def override(func, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options") or {}
        call = transformer_options.get(call_key)
        kinds, wants_output = [], False
        if call is not None:
            block = (transformer_options.get("block_type"), transformer_options.get("block_index"))
            kinds = [kind for kind in ("cross", "self") if call[kind] and block in selected[kind]]
            # GoCA's reference: the image tokens' attention output, in the self steps
            wants_output = block == reference and call["self"] and not kwargs.get("skip_output_reshape")
            length = args[1].shape[2 if kwargs.get("skip_reshape") else 1]
            txt, (gh, gw) = call["txt"], call["grid"]
            # MMDiT-X's second attention is over the image tokens only: no text keys to scale or record.
            image_only = info.family == "sd3" and length == gh * gw
            if key_scale is not None and length >= txt and not image_only:
                weights = key_weights(transformer_options, args[1].shape[0], length, txt, args[1].device)
                if weights is not None:
                    args = _scaled_keys(args, kwargs, weights)
            if (kinds or wants_output) and length < txt + gh * gw:
                if image_only:
                    kinds, wants_output = [], False  # the joint call of the block was recorded
                else:
                    raise AttnSegError(
                        f"DiT capture: {block[0]} block {block[1]} attends over {length} tokens, fewer than the "
                        f"{txt} text + {gh}x{gw} image tokens the conditioning and latent imply (a patch "
                        f"changed the sequence).")
        if kinds or wants_output:
            comfy.model_management.throw_exception_if_processing_interrupted()
        fused = _fused_call(func, args, kwargs) if kinds and previous is None else None
        if fused is not None:
            out, lse = fused
        else:
            out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
            lse = None
        if kinds or wants_output:
            record(call, block, kinds, args, kwargs, transformer_options, out if wants_output else None, lse)
        return out

    options[OVERRIDE] = override
    if info.family == "sd3":
        install_block_identity(model, info, sorted(selected["cross"] | selected["self"] | {reference} - {None}))
    previous_wrapper = model.model_options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        c = args["c"]
        call_options = c.get("transformer_options", {})
        step, total = step_index(call_options.get("sample_sigmas"), args["timestep"])
        h, w = args["input"].shape[-2:]
        call = {"cross": plan.cross_steps is not None and plan.cross_steps.contains(step, total),
                "self": plan.self_steps is not None and plan.self_steps.contains(step, total),
                "txt": info.text_prefix + c["c_crossattn"].shape[1],
                "grid": (math.ceil(h / info.patch_size), math.ceil(w / info.patch_size))}
        if call["cross"] or call["self"]:
            store.steps.add(step)
        # Copies, not the caller's dicts: a call on another thread keeps its own info.
        args = {**args, "c": {**c, "transformer_options": {**call_options, call_key: call}}}
        if previous_wrapper is not None:
            return previous_wrapper(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)


def check_dit_conditioning(info: DiTInfo, conditioning, input_name: str) -> None:
    """Refuse conditioning from another text encoder before torch does, cryptically."""
    if not conditioning:
        raise AttnSegError(f"{input_name}: the conditioning is empty. Connect a text encoder's output.")
    dim = conditioning[0][0].shape[-1]
    if info.context_dim and dim != info.context_dim:
        raise AttnSegError(f"{input_name}: this conditioning has {dim}-wide text embeddings but {info.model_id} "
                           f"expects {info.context_dim}. Encode the prompt with the text encoder loaded for "
                           f"this model (Flux: DualCLIPLoader type flux; SD3: TripleCLIPLoader).")

