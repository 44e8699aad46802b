"""ConceptAttention (Helbling et al., ICML 2025): class scores from a DiT's
attention outputs.

Each class word becomes one extra token (a "concept") that runs through the
model's text-stream layers; the concepts attend to the image tokens and to each
other, and the image never attends to them, so the model's output is unchanged.
A block's map gives each image token the softmax over concepts of the dot
product between its attention output and each concept's (heads concatenated,
before the output projection); the final map averages the blocks and steps
captured. Hosts compute the outputs; this module does the math on tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import AttnSegError
from .scores import ScoreMaps


def concept_scores(image_out: torch.Tensor, concept_out: torch.Tensor) -> torch.Tensor:
    """(B, N, D) image-token and (B, C, D) concept attention outputs -> (B, N, C)
    fp32: per image token, the softmax over concepts of their dot products.

    fp32 because the logits are dot products over thousands of channels: rounded
    to bf16 they would lose the differences the softmax turns into a ranking."""
    logits = torch.bmm(image_out.float(), concept_out.float().transpose(1, 2))
    return logits.softmax(dim=-1)


@dataclass
class ConceptMaps:
    """The running sum of :func:`concept_scores` maps over blocks and steps.

    ``grid`` (h, w) is the image-token grid, tokens row-major; every added map
    must share it and the batch. Filled from hooks: :meth:`add` queues device
    work only, no host read."""

    class_names: list[str]
    total: torch.Tensor | None = None
    count: int = 0
    grid: tuple[int, int] | None = None
    blocks: set[int] = field(default_factory=set)
    steps: set[int] = field(default_factory=set)

    def add(self, scores: torch.Tensor, grid: tuple[int, int], block: int, step: int) -> None:
        """Add one block's (B, N, C) maps at one step."""
        if self.total is None:
            self.total, self.grid = scores.float().clone(), grid
        elif grid != self.grid or scores.shape != self.total.shape:
            raise AttnSegError(f"ConceptAttention: maps of a {grid[0]}x{grid[1]} grid and batch {scores.shape[0]} "
                               f"were added to maps of a {self.grid[0]}x{self.grid[1]} grid and batch "
                               f"{self.total.shape[0]}; install it anew for each latent size.")
        else:
            self.total.add_(scores)
        self.count += 1
        self.blocks.add(block)
        self.steps.add(step)

    def mean(self) -> torch.Tensor:
        """(B, N, C): the maps averaged over every block and step added (the authors
        weigh each (block, step) map alike)."""
        if self.total is None:
            raise AttnSegError("ConceptAttention: no maps were captured. The run had no step inside the step "
                               "range, or no cond pass (the maps read the cond branch).")
        return self.total / self.count

    def score_maps(self, image_size: tuple[int, int], image_key: tuple | None = None) -> ScoreMaps:
        """(B, C, h, w) per-class maps: softmax probabilities averaged, so in [0, 1]
        and summing to 1 over the classes at every token (no min-max: the classes stay
        comparable, and the authors label multi-class images by the argmax)."""
        maps = self.mean().transpose(1, 2).unflatten(-1, self.grid)
        method = (f"concept-attention (double blocks {', '.join(map(str, sorted(self.blocks)))}; "
                  f"steps {', '.join(map(str, sorted(self.steps)))})")
        return ScoreMaps(maps, list(self.class_names), tuple(image_size), method, image_key=image_key)
