"""ConceptAttention on ComfyUI's Flux: a concept stream next to the model's own.

The class words (concepts) run through each Flux double block with that
block's text-stream weights, as the authors' ``ModifiedDoubleStreamBlock``
does: txt_mod from the block's ``vec``, txt_norm1, txt_attn.qkv, q/k norm, RoPE
at text position 0 (Flux's txt_ids are zeros), attention over the concepts'
and the image's keys (never the prompt's), then txt_attn.proj, the gated
residual and txt_norm2/txt_mlp. The image and text streams never see the
concepts, so the sample is bit-identical with and without them.

How the image tokens' k, v and attention output are read without recomputing
them: every double block up to the last chosen one gets a
``patches_replace["dit"][("double_block", i)]`` wrapper on a clone (chained to
one already there). For a captured call it runs the concepts' pre-attention
part, then the block, with a copy of transformer_options whose
``optimized_attention_override`` is a per-call closure chained to the override
that was there. Flux applies RoPE before that override, so the closure gets the
block's q, k, v (B, heads, L, d) as the attention sees them; it returns the
output from the previous override (or the fast kernel) untouched, and from the
image rows' k, v and output computes the concepts' attention (heads x C x
(C + N): small) and the block's maps. Nothing outlives the block but the
concepts' (B, C, D) state and the (B, N, C) maps; no host reads, no copies off
the device. A model-function wrapper tells the blocks, per model call, whether
the step is captured, which batch rows are the cond branch, and the token grid."""

from __future__ import annotations

import itertools
import math
import threading

import comfy.ldm.flux.model
import comfy.model_management
import comfy.sample
import torch
import torch.nn.functional as F
from comfy.ldm.flux.math import apply_rope

from ...attnseg import AttnSegError
from ...attnseg.concept import ConceptMaps, concept_scores
from ...attnseg.scores import ScoreMaps
from ...attnseg.tokens import parse_class_list
from .capture import StepRange, step_index, wanted_rows
from .dit import OVERRIDE, check_dit_conditioning, describe_dit
from .passes import OneForwardPass, check_memory, encode_image, image_key, timestep_sigma

# The authors' blocks: Flux.1's double blocks 15-18 of 19 (pipeline.py, encode_image's layer_indices).
AUTHORS_BLOCKS = (15, 16, 17, 18)
# The authors' noise level for an image: their 4-step schedule at index 2, unshifted
# (Flux-schnell, the pipeline's default model): x = 0.5 noise + 0.5 image.
AUTHORS_TIMESTEP = 500.0
# Each install's transformer_options key: installs stacked on one model each read their own call.
_INSTALLS = itertools.count()


def flux_model(model, input_name: str = "model"):
    """The Flux.1 network of a ModelPatcher; other models are refused."""
    net = model.get_model_object("diffusion_model")
    if not isinstance(net, comfy.ldm.flux.model.Flux) or net.params.global_modulation:
        raise AttnSegError(f"{input_name}: ConceptAttention runs on Flux.1 models (dev, schnell and models of "
                           f"their layout: double blocks with their own modulation); this model is a "
                           f"{type(net).__name__}. Connect a Flux.1 checkpoint.")
    return net


def check_blocks(net, blocks, input_name: str = "blocks") -> tuple[int, ...]:
    """The chosen double blocks, sorted, each checked against the model."""
    count = len(net.double_blocks)
    chosen = tuple(sorted(set(blocks)))
    if not chosen:
        raise AttnSegError(f"{input_name}: no double block chosen. Give one or more of 0-{count - 1} "
                           f"(the authors: 15-18 of Flux.1's 19).")
    for index in chosen:
        if not 0 <= index < count:
            raise AttnSegError(f"{input_name}: double block {index} does not exist; this model has double "
                               f"blocks 0-{count - 1} (the authors use 15-18 of Flux.1's 19).")
    return chosen


def encode_concepts(clip, names: list[str], input_name: str = "clip") -> torch.Tensor:
    """(C, D): each class word encoded alone by the CLIP's T5-XXL, a class being the
    state of its first T5 piece, as the authors take ``t5(concept)[0, 0]``."""
    tokenizer = getattr(clip, "tokenizer", None)
    if not hasattr(tokenizer, "t5xxl"):
        raise AttnSegError(f"{input_name}: {type(tokenizer).__name__} has no T5-XXL tokenizer; ConceptAttention "
                           f"encodes each class with Flux's T5. Connect the CLIP loaded for the Flux model "
                           f"(DualCLIPLoader with type flux, or the checkpoint's CLIP).")
    states = []
    for name in names:
        tokens = clip.tokenize(name)
        cond = clip.encode_from_tokens(tokens)
        t5_tokens = sum(len(chunk) for chunk in tokens["t5xxl"])
        if cond.shape[1] != t5_tokens:  # SD3's encoder puts CLIP-L/G's tokens before T5's
            raise AttnSegError(f"{input_name}: this text encoder's sequence is not T5-XXL's alone ({cond.shape[1]} "
                               f"tokens for {t5_tokens} T5 tokens). Connect the CLIP loaded for the Flux model "
                               f"(DualCLIPLoader with type flux).")
        states.append(cond[0, 0])
    return torch.stack(states)


def install_concept_attention(model, concepts: torch.Tensor, class_names: list[str],
                              blocks=AUTHORS_BLOCKS, steps: StepRange = StepRange()):
    """(clone, maps): a clone of the Flux ``model`` whose runs add the concept maps of
    the double blocks ``blocks`` at the steps ``steps`` (cond branch) to ``maps``.
    ``concepts``: (C, D) text-encoder states, one per class of ``class_names``."""
    net = flux_model(model)
    chosen = check_blocks(net, blocks)
    if not class_names:
        raise AttnSegError("classes: the class list is empty. Give one or more class words separated by commas.")
    if concepts.ndim != 2 or concepts.shape[0] != len(class_names):
        raise AttnSegError(f"classes: {len(class_names)} class names for concept states of shape "
                           f"{tuple(concepts.shape)}; give one (D,) state per class.")
    if concepts.shape[1] != net.txt_in.in_features:
        raise AttnSegError(f"clip: the class words were encoded to {concepts.shape[1]}-wide states but this Flux "
                           f"takes {net.txt_in.in_features}-wide text. Encode them with the CLIP loaded for "
                           f"this model (DualCLIPLoader with type flux).")
    model = model.clone()
    maps = ConceptMaps(list(class_names))
    call_key = f"attnseg_concept_{next(_INSTALLS)}"
    adding = threading.Lock()  # calls on two devices add at once, as on the captures
    placed: dict[tuple, torch.Tensor] = {}  # the states on each (device, dtype), copied once

    def on(like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in placed:
            placed[key] = concepts.to(device=like.device, dtype=like.dtype)[None]
        return placed[key]

    def wrap_block(index: int, previous):
        block = net.double_blocks[index]
        last = index == chosen[-1]

        def run_block(args, extra):
            return previous(args, extra) if previous is not None else extra["original_block"](args)

        def wrapper(args, extra):
            call = args["transformer_options"].get(call_key)
            if call is None:
                return run_block(args, extra)
            comfy.model_management.throw_exception_if_processing_interrupted()
            rows, image = call["rows"], call["image"]
            state = net.txt_in(on(args["img"])) if index == 0 else call["state"]
            # The block's text stream, on the concepts (DoubleStreamBlock.forward, txt half).
            mod1, mod2 = block.txt_mod(args["vec"][rows])
            qkv = block.txt_attn.qkv(torch.addcmul(mod1.shift, block.txt_norm1(state), 1 + mod1.scale))
            q, k, v = qkv.view(*qkv.shape[:2], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = block.txt_attn.norm(q, k, v)
            q, k = apply_rope(q, k, args["pe"][rows, :, :1])  # text position 0, where Flux puts every text token
            txt = args["txt"].shape[1]
            image_rows = slice(txt + image.start, txt + image.stop)
            found = {}
            inner = args["transformer_options"].get(OVERRIDE)

            def override(func, *a, **kw):
                out = inner(func, *a, **kw) if inner is not None else func(*a, **kw)
                # Flux calls with skip_reshape=True: q, k, v (B, heads, L, d), RoPE applied; out (B, L, heads*d).
                keys = torch.cat([k, a[1][rows, :, image_rows]], dim=2)
                values = torch.cat([v, a[2][rows, :, image_rows]], dim=2)
                found["out"] = F.scaled_dot_product_attention(q, keys, values).transpose(1, 2).flatten(2)
                if index in chosen:
                    found["scores"] = concept_scores(out[rows, image_rows], found["out"])
                return out

            options = {**args["transformer_options"], OVERRIDE: override}
            result = run_block({**args, "transformer_options": options}, extra)
            if "out" not in found:
                raise AttnSegError(f"ConceptAttention: Flux double block {index} ran without its attention "
                                   f"(another patch replaced the block), so its concepts have no output.")
            if index in chosen:
                with adding:
                    maps.add(found["scores"], call["grid"], index, call["step"])
            if not last:  # the last chosen block's residual feeds nothing
                state = state + block.txt_attn.proj(found["out"]) * mod1.gate
                state = state + block.txt_mlp(torch.addcmul(mod2.shift, block.txt_norm2(state),
                                                            1 + mod2.scale)) * mod2.gate
                if state.dtype == torch.float16:  # as Flux clamps its text stream
                    state = torch.nan_to_num(state, nan=0.0, posinf=65504, neginf=-65504)
                call["state"] = state
            return result

        return wrapper

    replaces = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for index in range(chosen[-1] + 1):
        previous = replaces.get(("double_block", index))
        model.set_model_patch_replace(wrap_block(index, previous), "dit", "double_block", index)

    previous_wrapper = model.model_options.get("model_function_wrapper")

    def model_wrapper(apply_model, args):
        c = args["c"]
        options = c.get("transformer_options", {})
        step, total = step_index(options.get("sample_sigmas"), args["timestep"])
        x = args["input"]
        rows = wanted_rows(options, x.shape[0], {"cond"})
        if rows and steps.contains(step, total):
            grid = (math.ceil(x.shape[-2] / net.patch_size), math.ceil(x.shape[-1] / net.patch_size))
            # The image's tokens come first in Flux's img sequence (reference latents follow), row-major.
            call = {"rows": rows[0][1], "grid": grid, "image": slice(0, grid[0] * grid[1]), "step": step}
            # A copy, not the caller's dict: a call on another thread keeps its own state.
            args = {**args, "c": {**c, "transformer_options": {**options, call_key: call}}}
        if previous_wrapper is not None:
            return previous_wrapper(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(model_wrapper)
    return model, maps


def segment_concepts(model, clip, vae, image: torch.Tensor, positive, classes: str, blocks=AUTHORS_BLOCKS,
                     timestep: float = AUTHORS_TIMESTEP, seed: int = 0, resolution: int = 1024) -> ScoreMaps:
    """ConceptAttention over an input image: encode each class word alone with
    ``clip``'s T5, VAE-encode ``image`` at ``resolution`` (longer side, aspect kept),
    noise it to ``timestep`` (of 1000; flow models: sigma = t / 1000) with one draw
    from ``seed``, and run one cond-only forward with ``positive`` (its Flux guidance
    as given), the concept stream alongside."""
    names = parse_class_list(classes)
    net = flux_model(model)
    check_blocks(net, blocks)
    check_dit_conditioning(describe_dit(model), positive, "positive")
    if not 0 < timestep <= 1000:
        raise AttnSegError(f"timestep: {timestep} is outside (0, 1000]; the authors noise to 500 "
                           f"(half noise, half image).")
    check_memory(model, image, resolution)
    concepts = encode_concepts(clip, names)
    latent = encode_image(vae, image, resolution)
    patched, maps = install_concept_attention(model, concepts, names, blocks)
    sigma = timestep_sigma(patched.get_model_object("model_sampling"), timestep)
    noise = comfy.sample.prepare_noise(latent, seed)
    comfy.sample.sample_custom(patched, noise, 1.0, OneForwardPass(sigma.reshape(1).expand(latent.shape[0])),
                               torch.stack([sigma, torch.zeros(())]), positive, positive, latent,
                               disable_pbar=True, seed=seed)
    return maps.score_maps(tuple(image.shape[1:3]), image_key(image))
