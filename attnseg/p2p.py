"""Prompt-to-Prompt editing: the source and the edited prompt sample together
from the same noise; early on, the edit takes the source's attention (so the
layout is kept), and a mask keeps everything outside the edited object equal
to the source.

Token alignment, attention control and the local blend on plain tensors."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import AttnSegError
from .scores import gaussian_blur

EDIT_MODES = ("replace", "refine")


@dataclass(frozen=True)
class TokenAlignment:
    """How the edit prompt's tokens take the source's cross-attention.

    ``mapper`` (T_src, T_edit): the edit's maps copied from the source are
    ``src_maps @ mapper`` (a source token's mass is split evenly over the edit
    tokens that replace it). ``copied`` (T_edit,) bool: the edit tokens whose
    maps come from the source; the others keep their own."""

    mapper: torch.Tensor
    copied: torch.Tensor

    def describe(self, src_words: Sequence[str], edit_words: Sequence[str]) -> list[str]:
        """One line per edit token that has a word: where its attention comes from."""
        lines = []
        for j, word in enumerate(edit_words):
            if not word:
                continue
            sources = [src_words[i] or "<special>" for i in self.mapper[:, j].nonzero().flatten().tolist()]
            origin = " + ".join(sources) if bool(self.copied[j]) else "its own"
            lines.append(f"{word}: {origin}")
        return lines


def align_tokens(src: Sequence, edit: Sequence, mode: str = "replace") -> TokenAlignment:
    """Align two token sequences (ids from the real tokenizer).

    Matching runs copy position by position. A run of source tokens replaced by
    a run of edit tokens ("cat" -> "dog", or "cat" -> two tokens) is copied in
    ``replace`` mode (P2P's word swap) and left to the edit in ``refine`` mode;
    inserted tokens always keep their own attention."""
    if mode not in EDIT_MODES:
        raise AttnSegError(f"mode: '{mode}' is not one of {', '.join(EDIT_MODES)}.")
    mapper = torch.zeros(len(src), len(edit))
    copied = torch.zeros(len(edit), dtype=torch.bool)
    for tag, i0, i1, j0, j1 in difflib.SequenceMatcher(None, list(src), list(edit), autojunk=False).get_opcodes():
        if tag == "equal":
            mapper[torch.arange(i0, i1), torch.arange(j0, j1)] = 1.0
            copied[j0:j1] = True
        elif tag == "replace" and mode == "replace":
            mapper[i0:i1, j0:j1] = 1.0 / (j1 - j0)
            copied[j0:j1] = True
    return TokenAlignment(mapper, copied)


def controlled_cross_attention(src_probs: torch.Tensor, edit_probs: torch.Tensor, alignment: TokenAlignment,
                               replace: bool, reweight: torch.Tensor | None = None) -> torch.Tensor:
    """The edit's cross-attention probabilities (..., n, T_edit): copied from the
    source through the alignment while ``replace`` holds, then scaled per
    token by ``reweight`` (T_edit,) (P2P's equalizer, no renormalisation)."""
    probs = edit_probs
    if replace:
        from_src = torch.matmul(src_probs, alignment.mapper.to(src_probs))
        probs = torch.where(alignment.copied.to(probs.device), from_src, edit_probs)
    if reweight is not None:
        probs = probs * reweight.to(probs)
    return probs


def blend_mask(masks: torch.Tensor, size: tuple[int, int], dilate: int = 0, feather: int = 0) -> torch.Tensor:
    """(K, h, w) masks in [0, 1] -> their union at ``size`` (1, 1, H, W), grown by
    ``dilate`` cells (max-pool) and softened by a ``feather``-wide blur."""
    if masks.numel() == 0:
        raise AttnSegError("blend_words: no mask to blend with.")
    union = masks.float().amax(0, keepdim=True)[None]
    union = F.interpolate(union, size=size, mode="bilinear", align_corners=False)
    if dilate > 0:
        union = F.max_pool2d(union, 2 * dilate + 1, stride=1, padding=dilate)
    if feather > 0:
        union = gaussian_blur(union, 2 * feather + 1)
    return union.clamp(0, 1)


def local_blend(edited: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``reference + M (edited - reference)``: the edit only where the mask is."""
    return reference + mask.to(edited) * (edited - reference)


def check_fraction(value: float, input_name: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise AttnSegError(f"{input_name}: {value} is outside [0, 1]; it is a fraction of the sampling steps.")
    return value
