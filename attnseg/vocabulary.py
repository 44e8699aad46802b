"""Choosing which candidate classes to segment from a caption and from
image-text scores (DiffSegmenter's open-vocabulary category filtering)."""

from __future__ import annotations

import re
from typing import Sequence

import torch

from .errors import AttnSegError


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def singular(word: str) -> str:
    """A plain-English singular, enough to match 'cats', 'boxes', 'ponies' to a class."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def classes_in_caption(caption: str, candidates: Sequence[str]) -> list[str]:
    """The candidates whose words occur, consecutively, in ``caption`` (plurals
    match singulars), in candidate order."""
    said = [singular(w) for w in _words(caption)]
    found = []
    for name in candidates:
        wanted = [singular(w) for w in _words(name)]
        if wanted and any(said[i:i + len(wanted)] == wanted for i in range(len(said) - len(wanted) + 1)):
            found.append(name)
    return found


def confident_classes(probabilities: torch.Tensor, candidates: Sequence[str], threshold: float) -> list[str]:
    """The candidates whose image-text probability (softmax over the candidates)
    exceeds ``threshold`` (DiffSegmenter: 0.97)."""
    if not 0.0 <= threshold <= 1.0:
        raise AttnSegError(f"clip_threshold: {threshold} is outside [0, 1].")
    return [name for name, p in zip(candidates, probabilities.tolist()) if p > threshold]


def union_in_order(candidates: Sequence[str], *found: Sequence[str]) -> list[str]:
    chosen = {name for group in found for name in group}
    return [name for name in candidates if name in chosen]
