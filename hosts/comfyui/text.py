"""Segmentation prompts: encode with the user's CLIP and locate the class tokens."""

from __future__ import annotations

import torch

from ...attnseg.tokens import SegPrompt, locate_classes, parse_class_list, template_prompt

# The conditioning dict key that carries the class metadata to later nodes.
PROMPT_KEY = "attnseg_prompt"


def _stream(tokens: dict) -> str:
    """The tokenizer stream whose positions the UNet sees (CLIP-L where present;
    SDXL's two streams share positions)."""
    return "l" if "l" in tokens else next(iter(tokens))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


def _readable(clip, stream: str, token) -> str:
    """A token as text; "" for BOS, EOS and padding."""
    if isinstance(token, torch.Tensor):
        return "<embedding>"
    tokenizer = getattr(clip.tokenizer, f"clip_{stream}", None)
    if token in {getattr(tokenizer, name, None) for name in ("start_token", "end_token", "pad_token")}:
        return ""
    vocab = getattr(tokenizer, "inv_vocab", None)
    word = vocab.get(token, str(token)) if vocab else str(token)
    return word.replace("</w>", "")


def segmentation_prompt(clip, prompt: str, classes: str) -> tuple[str, SegPrompt, dict]:
    """(text, class metadata, tokens to encode) for a prompt and class list."""
    names = parse_class_list(classes)
    text = prompt.strip() or template_prompt(names)
    tokens = clip.tokenize(text)
    stream = _stream(tokens)
    flat = [entry[0] for chunk in tokens[stream] for entry in chunk]
    # Class words are tokenized without weight parsing, so "(red cat:1.2)" in the
    # prompt and escaped brackets like "pokemon \(creature\)" still match.
    class_tokens = {}
    for name in names:
        own = clip.tokenize(name, return_word_ids=True, disable_weights=True)[stream]
        class_tokens[name] = [entry[0] for chunk in own for entry in chunk if entry[2] != 0]
    words = [_readable(clip, stream, t) for t in flat]
    return text, locate_classes(flat, class_tokens, words, text, same=_same), tokens


def encode_segmentation_prompt(clip, prompt: str, classes: str):
    """CONDITIONING for ``prompt`` whose entries carry the class metadata."""
    _, meta, tokens = segmentation_prompt(clip, prompt, classes)
    conditioning = clip.encode_from_tokens_scheduled(tokens)
    return [[c, {**extras, PROMPT_KEY: meta}] for c, extras in conditioning], meta


def prompt_of(conditioning) -> SegPrompt | None:
    for _, extras in conditioning or []:
        if PROMPT_KEY in extras:
            return extras[PROMPT_KEY]
    return None
