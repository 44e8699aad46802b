"""Segmentation prompts on a diffusers pipeline: encode with its text encoder(s)
and locate the class tokens, as the ComfyUI host does with a CLIP (same
templates, class weighting, Cat-Cross, "-ing" fusion)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ...attnseg import AttnSegError, SegPrompt
from ...attnseg.presets import TextSetup, preset_prompts
from ...attnseg.tokens import (fuse_ing_words, iseg_template_prompt, joined, locate_classes, locate_pieces,
                               template_prompt)
from ...attnseg.prompt_weights import KeyScale, check_cat_cross, check_class_weight, reweight_class_tokens
from .dit import FAMILIES


@dataclass
class Conditioning:
    """One encoded prompt: ``embeds`` (1, T, C) as the UNet's encoder_hidden_states,
    ``pooled`` (1, C') for SDXL's added conditioning (None elsewhere), the class
    metadata, and Cat-Cross's key weighting when it acts on the keys."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    prompt: SegPrompt
    key_scale: KeyScale | None = None


def _word(tokenizer, piece: str) -> str:
    """A BPE piece as text ('cafÃ©</w>' -> 'café'); unchanged where the tokenizer cannot say."""
    try:
        return tokenizer.convert_tokens_to_string([piece]).replace("</w>", "").strip() or piece
    except Exception:  # a piece cut mid-character
        return piece.replace("</w>", "")


def padded_ids(tokenizer, text: str, length: int, input_name: str = "prompt") -> list[int]:
    """Token ids of ``text`` padded to ``length``. A prompt longer than the encoder reads
    is refused: the pipeline would cut it, and classes past the cut would have no attention."""
    ids = tokenizer(text, padding="max_length", max_length=length, truncation=False)["input_ids"]
    if len(ids) > length:
        raise AttnSegError(f"{input_name}: '{text[:60]}...' is {len(ids)} tokens; this pipeline's text encoder reads "
                           f"{length}. Shorten the prompt or the class list.")
    return ids


def prompt_tokens(tokenizer, text: str, input_name: str = "prompt") -> tuple[list[int], list[str]]:
    """(token ids of ``text`` padded to the encoder's length, readable words: "" for BOS,
    EOS and padding)."""
    ids = padded_ids(tokenizer, text, tokenizer.model_max_length, input_name)
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    end = ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ids else len(ids)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    words = ["" if i >= end or token in specials else _word(tokenizer, piece)
             for i, (token, piece) in enumerate(zip(ids, pieces))]
    return ids, words


def locate_words(tokenizer, text: str, names: list[str], input_name: str = "classes") -> SegPrompt:
    """Class metadata of ``names`` in ``text``; a name not in the text is an error."""
    ids, words = prompt_tokens(tokenizer, text)
    class_tokens = {name: tokenizer(name, add_special_tokens=False)["input_ids"] for name in names}
    return locate_classes(ids, class_tokens, words, text, input_name=input_name)


# The T5 length Flux's and SD3's pipelines pad to by default (their max_sequence_length).
T5_LENGTH = {"flux": 512, "sd3": 256}


def dit_family(pipe) -> str | None:
    """"flux" / "sd3" for a pipeline whose denoiser is Flux's / SD3's transformer, else None."""
    return FAMILIES.get(type(getattr(pipe, "transformer", None)).__name__)


def t5_tokenizer(pipe):
    """The T5 tokenizer of a Flux (tokenizer_2) or SD3 (tokenizer_3) pipeline; None where SD3 runs without T5."""
    if dit_family(pipe) == "flux":
        return pipe.tokenizer_2
    return pipe.tokenizer_3 if getattr(pipe, "text_encoder_3", None) is not None else None


def t5_length(pipe, requested: int | None = None) -> int:
    """The T5 length a pipeline call pads to: its ``max_sequence_length`` when given,
    else the pipeline's default, or the tokenizer's own where shorter (a small model's)."""
    if requested is not None:
        return int(requested)
    tokenizer = t5_tokenizer(pipe)
    default = T5_LENGTH[dit_family(pipe)]
    return default if tokenizer is None else min(default, tokenizer.model_max_length)


def t5_prompt(tokenizer, text: str, names: list[str], length: int, input_name: str = "classes") -> SegPrompt:
    """Class metadata in T5's tokens of ``text`` padded to ``length`` (SentencePiece pieces)."""
    ids = padded_ids(tokenizer, text, length)
    specials = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    pieces = [None if token in specials else piece for token, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids))]
    class_pieces = {name: tokenizer.convert_ids_to_tokens(tokenizer(name, add_special_tokens=False)["input_ids"])
                    for name in names}
    return locate_pieces(pieces, class_pieces, text, input_name)


def locate_pipeline_words(pipe, text: str, names: list[str], input_name: str = "classes",
                          t5_tokens: int | None = None) -> SegPrompt:
    """Class positions in the sequence the denoiser attends over: the UNet's CLIP tokens;
    Flux's T5 tokens; SD3's CLIP tokens (77, CLIP-L's and -G's side by side) then T5's
    (both parts, as the ComfyUI host's dit_text 'both'). ``t5_tokens``: the call's
    max_sequence_length (None: the pipeline's default)."""
    family = dit_family(pipe)
    if family is None:
        return locate_words(pipe.tokenizer, text, names, input_name)
    length = t5_length(pipe, t5_tokens)
    if family == "flux":
        return t5_prompt(pipe.tokenizer_2, text, names, length, input_name)
    clip = locate_words(pipe.tokenizer, text, names, input_name)
    if t5_tokenizer(pipe) is None:  # the pipeline pads the T5 part with zeros: no class there
        zeros = dataclasses.replace(clip, token_count=length, words=("",) * length)
        return joined(clip, zeros, from_second=False)
    return joined(clip, t5_prompt(pipe.tokenizer_3, text, names, length, input_name))


def encode_text(pipe, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings (1, T, C), pooled embeddings or None) from the pipeline's own
    ``encode_prompt`` (SDXL's two encoders concatenated, as its call does; Flux's T5
    sequence and CLIP-L pooled vector; SD3's CLIP pair then T5, and both pooled vectors)."""
    family = dit_family(pipe)
    model = pipe.transformer if family else pipe.unet
    device = getattr(pipe, "_execution_device", None) or model.device  # where an offloading pipeline encodes
    with torch.no_grad():
        if family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, device=device,
                                                   num_images_per_prompt=1, max_sequence_length=t5_length(pipe))
            return embeds, pooled
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, prompt_3=None, device=device,
                                                      num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                      max_sequence_length=t5_length(pipe))
            return embeds, pooled
        encoded = pipe.encode_prompt(prompt=text, device=device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)
    embeds = encoded[0]
    pooled = encoded[2] if len(encoded) == 4 else None  # SDXL: (embeds, negative, pooled, negative pooled)
    return embeds, pooled


def encode_segmentation_prompt(pipe, prompt: str, names: list[str], class_weight: float = 1.0,
                               fuse_ing: bool = False) -> Conditioning:
    """The prompt (the template when empty) encoded with its class metadata. ``class_weight``
    != 1 re-weights the class tokens as DiffSegmenter's "class++" does: ``z_empty + w
    (z - z_empty)`` at their positions, ``z_empty`` the empty prompt's encoding."""
    check_class_weight(class_weight)
    text = prompt.strip() or template_prompt(names)
    meta = locate_pipeline_words(pipe, text, names)
    if fuse_ing:
        meta = fuse_ing_words(meta)
    embeds, pooled = encode_text(pipe, text)
    if class_weight != 1.0:
        embeds = reweight_class_tokens(embeds, encode_text(pipe, "")[0], meta.class_positions, class_weight)
    return Conditioning(embeds, pooled, meta)


def encode_cat_cross(pipe, prompt: str, names: list[str], gamma: float, mode: str,
                     background_words: tuple[str, ...] = ()) -> Conditioning:
    """iSeg's Cat-Cross: the class tokens weighted by ``gamma`` on the keys inside the
    attention ("keys", the paper) or on the text embedding ("embedding", the released
    code). An empty prompt becomes iSeg's template."""
    check_cat_cross(gamma, mode)
    text = prompt.strip() or iseg_template_prompt(names, background_words)
    meta = locate_pipeline_words(pipe, text, names)
    embeds, pooled = encode_text(pipe, text)
    positions = meta.class_positions
    if mode == "embedding":
        embeds = embeds.clone()
        embeds[:, list(positions)] *= gamma
        return Conditioning(embeds, pooled, meta)
    return Conditioning(embeds, pooled, meta, KeyScale(positions, float(gamma), meta.token_count))


def encode_for_preset(pipe, text: TextSetup, prompt: str, names: list[str]) -> list[Conditioning]:
    """The preset's conditionings for ``names`` (see ``preset_prompts``)."""
    return [encode_cat_cross(pipe, words, classes, text.cat_cross_gamma, text.cat_cross_mode, text.background_words)
            if kind == "cat_cross" else
            encode_segmentation_prompt(pipe, words, classes, text.class_weight, text.fuse_ing)
            for kind, words, classes in preset_prompts(text, prompt, names)]
