"""Prompt-to-Prompt on MM-DiT models (Flux, SD3): the edit row attends with the
source row's image queries and keys.

MM-DiT has no cross-attention to copy: text and image tokens attend jointly.
Shin et al. (exploring-mmdit, ICCV 2025) keep the source's layout by giving the
edit row the source row's image queries and keys (q_i, k_i) for the first
fraction of the steps (their tau, 0.2 by default): the image-to-image attention
is then the source's, and the edit's own text still reaches the image through
its text keys and values. Their local blend reads the blend words' image-to-text
maps averaged over five analysed blocks per model (Flux-dev 18, 17, 12, 14, 11;
SD3-medium 7, 8, 5, 4, 9; SD3.5-large 18, 21, 20, 24, 16), numbered as their
attention processors are listed: Flux's 19 double blocks 0-18, then the 38
single blocks 19-56 (all five are double blocks); SD3's joint blocks.

Here the control is an attention override on a clone, chained to any override
already there, on the blocks ComfyUI names through transformer_options (Flux)
or a block wrapper names (SD3, dit.py's); a model-function wrapper gives the
edit rows their own text context and pooled vector and tells the override the
step, the text length and the image grid. Queries and keys arrive after RoPE,
which is the same for both rows, so replacing them there is replacing them
before it. Only the cond rows are controlled, as on the UNet."""

from __future__ import annotations

import itertools
import math

import torch

from ...attnseg import AttnSegError
from ...attnseg.layers import LayerPick
from .capture import CapturePlan, cond_rows, step_index
from .dit import OVERRIDE, DiTInfo, install_block_identity

AUTO = "auto (the model's preset)"
FLUX_TOP5 = "Flux top 5 (18, 17, 12, 14, 11)"
SD3_TOP5 = "SD3-medium top 5 (7, 8, 5, 4, 9)"
SD35_LARGE_TOP5 = "SD3.5-large top 5 (18, 21, 20, 24, 16)"
DEMO_DOUBLE = "demo DiT (double blocks 0, 1)"
ALL_BLOCKS = "all blocks"
CUSTOM = "custom"
BLOCK_CHOICES = (AUTO, FLUX_TOP5, SD3_TOP5, SD35_LARGE_TOP5, DEMO_DOUBLE, ALL_BLOCKS, CUSTOM)
# (family, blocks of each kind the preset is made for, block numbers in the paper's order).
# The demo DiT (2 double + 4 single blocks) gets the analogue of Flux's five: its double
# blocks, the end of the double stack where Flux's five sit (11-18 of 0-18).
PRESETS = {
    FLUX_TOP5: ("flux", (19, 38), (18, 17, 12, 14, 11)),
    SD3_TOP5: ("sd3", (24,), (7, 8, 5, 4, 9)),
    SD35_LARGE_TOP5: ("sd3", (38,), (18, 21, 20, 24, 16)),
    DEMO_DOUBLE: ("flux", (2, 4), (0, 1)),
}
QK_REPLACE = 0.2  # exploring-mmdit's tau: the fraction of steps with the source's q_i, k_i
_INSTALLS = itertools.count()


def block_counts(info: DiTInfo) -> tuple[int, ...]:
    counts = {}
    for layer in info.layers:
        counts[layer.block] = counts.get(layer.block, 0) + 1
    return tuple(counts.values())


def _preset_for(info: DiTInfo) -> str | None:
    return next((name for name, (family, counts, _) in PRESETS.items()
                 if family == info.family and counts == block_counts(info)), None)


def _parse_numbers(text: str) -> list[int]:
    numbers = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise AttnSegError(f"custom_blocks: '{part}' is not a block number or a range like 2-4. Give block "
                               f"numbers separated by commas (Flux: double blocks first, then single).") from None
        numbers.extend(range(first, last + 1))
    return numbers


def resolve_blocks(info: DiTInfo, choice: str, custom: str = "") -> list[tuple[str, int]]:
    """The (block type, index) pairs ``choice`` names on this model."""
    if choice not in BLOCK_CHOICES:
        raise AttnSegError(f"blocks: '{choice}' is not one of {', '.join(BLOCK_CHOICES)}.")
    blocks = info.blocks()  # in the paper's numbering (Flux: double, then single)
    if choice == AUTO:
        choice = _preset_for(info) or ALL_BLOCKS
    if choice == ALL_BLOCKS:
        return blocks
    if choice == CUSTOM:
        numbers, input_name = _parse_numbers(custom), "custom_blocks"
        if not numbers:
            raise AttnSegError("custom_blocks: no block numbers; with blocks 'custom' give the numbers of the "
                               "blocks to control, e.g. '0, 1'.")
    else:
        family, counts, numbers = PRESETS[choice]
        input_name = "blocks"
        if family != info.family:
            fitting = [name for name, (f, _, _) in PRESETS.items() if f == info.family]
            raise AttnSegError(f"blocks: '{choice}' is made for {'Flux' if family == 'flux' else 'SD3'}, but the "
                               f"model is {info.model_id}. Choose {', '.join(map(repr, fitting + [AUTO, CUSTOM]))}.")
    missing = [n for n in numbers if not 0 <= n < len(blocks)]
    if missing:
        raise AttnSegError(f"{input_name}: block {', '.join(map(str, missing))} is not in {info.model_id}, whose "
                           f"{len(blocks)} blocks are numbered 0-{len(blocks) - 1} ({info.describe_blocks()}, in "
                           f"that order). Choose blocks it has.")
    return [blocks[n] for n in sorted(set(numbers))]


def blend_plan(info: DiTInfo) -> CapturePlan:
    """The image-to-text maps the local blend reads: the five blocks of the model's
    preset (exploring-mmdit's aggregation), every block on other layouts."""
    preset = _preset_for(info)
    blocks = resolve_blocks(info, preset) if preset in (FLUX_TOP5, SD3_TOP5, SD35_LARGE_TOP5) else info.blocks()
    return CapturePlan(self_steps=None, cross_layers=tuple(LayerPick.dit(kind, index) for kind, index in blocks))


def describe_numbers(info: DiTInfo, blocks: list[tuple[str, int]]) -> str:
    numbering = info.blocks()
    return ", ".join(str(numbering.index(block)) for block in blocks)


def _source_image_qk(args: tuple, kwargs: dict, rows: slice, image: slice) -> tuple:
    """The call's arguments with the edit rows' image queries and keys the source rows'."""
    sequence = 2 if kwargs.get("skip_reshape") else 1  # (B, heads, L, d) or (B, L, ...)
    half = (rows.stop - rows.start) // 2
    source = [slice(None)] * args[0].ndim
    source[0], source[sequence] = slice(rows.start, rows.start + half), image
    edit = list(source)
    edit[0] = slice(rows.start + half, rows.stop)

    def replaced(x):
        x = x.clone()
        x[tuple(edit)] = x[tuple(source)]
        return x

    return (replaced(args[0]), replaced(args[1]), *args[2:])


class ControlSteps:
    """Which step the running model call belongs to, set once per call."""

    def __init__(self):
        self.step, self.total = 0, 1

    def before(self, fraction: float) -> bool:
        return self.step < round(fraction * self.total)


def install_mmdit_control(model, info: DiTInfo, blocks: list[tuple[str, int]], fraction: float,
                          edit_context: torch.Tensor, edit_pooled: torch.Tensor | None, steps: ControlSteps) -> None:
    """Patch ``model`` (a clone) for a latent batch [source rows, edit rows]: the
    edit rows' cond calls get ``edit_context`` (1, T, D) and ``edit_pooled`` as
    their text, and in ``blocks`` for the first ``fraction`` of the steps the
    source rows' image queries and keys."""
    options = model.model_options.setdefault("transformer_options", {})
    previous = options.get(OVERRIDE)
    call_key = f"attnseg_mmdit_control_{next(_INSTALLS)}"
    chosen = set(blocks)

    def override(func, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options") or {}
        call = transformer_options.get(call_key)
        if call is not None and call["control"] and \
                (transformer_options.get("block_type"), transformer_options.get("block_index")) in chosen:
            length = args[1].shape[2 if kwargs.get("skip_reshape") else 1]
            txt, (gh, gw) = call["txt"], call["grid"]
            rows = cond_rows(transformer_options.get("cond_or_uncond"), args[0].shape[0])
            # MMDiT-X's second attention is over the image tokens alone: not a joint call.
            if rows is not None and length >= txt + gh * gw:
                args = _source_image_qk(args, kwargs, rows, slice(txt, txt + gh * gw))
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

    options[OVERRIDE] = override
    if info.family == "sd3":
        install_block_identity(model, info, sorted(chosen))
    on_device = {}
    previous_wrapper = model.model_options.get("model_function_wrapper")

    def own_text(like: torch.Tensor, value: torch.Tensor, input_name: str) -> torch.Tensor:
        key = (input_name, like.device, like.dtype, like.shape[1:])
        if key not in on_device:
            own = value.to(device=like.device, dtype=like.dtype)
            if input_name == "edit_prompt" and own.shape[1] != like.shape[1]:
                if like.shape[1] % own.shape[1]:
                    raise AttnSegError(f"edit_prompt: this call's text has {like.shape[1]} tokens, the edit "
                                       f"prompt's {own.shape[1]}; keep both prompts the same token length.")
                own = own.repeat(1, like.shape[1] // own.shape[1], 1)
            on_device[key] = own
        return on_device[key]

    def wrapper(apply_model, args):
        c = args["c"]
        call_options = c.get("transformer_options", {})
        steps.step, steps.total = step_index(call_options.get("sample_sigmas"), args["timestep"])
        rows = cond_rows(args.get("cond_or_uncond"), args["input"].shape[0])
        if rows is not None:
            edit = slice(rows.start + (rows.stop - rows.start) // 2, rows.stop)
            context = c["c_crossattn"].clone()
            context[edit] = own_text(context, edit_context, "edit_prompt")
            c = {**c, "c_crossattn": context}
            if edit_pooled is not None and c.get("y") is not None:
                y = c["y"].clone()
                y[edit] = own_text(y, edit_pooled, "pooled")
                c = {**c, "y": y}
        h, w = args["input"].shape[-2:]
        call = {"control": steps.before(fraction), "txt": info.text_prefix + c["c_crossattn"].shape[1],
                "grid": (math.ceil(h / info.patch_size), math.ceil(w / info.patch_size))}
        args = {**args, "c": {**c, "transformer_options": {**call_options, call_key: call}}}
        if previous_wrapper is not None:
            return previous_wrapper(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
