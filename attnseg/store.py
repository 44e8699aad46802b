"""The attention store: head-reduced attention maps of chosen layers, summed
over the captured steps, one entry per (layer, branch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import AttnSegError
from .tokens import SegPrompt

@dataclass(frozen=True, order=True)
class LayerKey:
    """One attention layer: ``kind`` is "cross" or "self"; ``factor`` is the
    latent-to-grid downscale (1 = full latent size).

    A UNet layer: ``block`` is "input", "middle" or "output", ``depth`` indexes
    the transformer inside the block. A DiT block (see ``dit``): ``block`` is
    the block type ("double" or "single" on Flux), ``block_id`` its index,
    depth 0, factor the patch size. On a DiT "cross" means the image-query x
    text-key part of the joint softmax, "self" its image x image part."""

    kind: str
    block: str
    block_id: int
    depth: int
    factor: int

    @classmethod
    def dit(cls, kind: str, block_type: str, index: int, patch_size: int) -> "LayerKey":
        return cls(kind, block_type, index, 0, patch_size)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.block}.{self.block_id}.{self.depth}"


@dataclass
class StoredMaps:
    """A running sum of (B, N, T) maps on an (h, w) grid with N = h * w.
    ``heads``: how many heads each map averages (layers of one resolution are
    averaged weighted by it, so a mean over hand-picked heads of several layers
    weighs every picked head alike, as the authors' code does)."""

    grid: tuple[int, int]
    total: torch.Tensor
    count: int = 1
    heads: int = 1

    def mean(self) -> torch.Tensor:
        return self.total.float() / self.count


@dataclass
class AttentionStore:
    """Head-reduced attention maps captured from one model.

    ``model_id`` names the model family and layout so later nodes can refuse a
    store from another model. ``latent_size`` and ``image_size`` are (h, w);
    ``image_size`` is the pixel size the maps describe (the input image for a
    segmentation pass, latent x 8 for sampling). ``prompt`` is the class-token
    metadata of the cond branch, when the prompt was encoded for segmentation.
    ``head_reduction`` says how the capture reduced cross-attention heads
    ("mean", or "auto": GoCA's output-weighted heads). Besides "cross" and
    "self" maps, entries of kind "query" hold a reference layer's queries
    (B, N, C) for GoCA's layer weights.
    """

    model_id: str
    batch_size: int
    latent_size: tuple[int, int]
    image_size: tuple[int, int]
    prompt: SegPrompt | None = None
    dtype: torch.dtype = torch.float16
    head_reduction: str = "mean"
    # "unet", or "dit": every layer is a block of one resolution (the patch grid).
    architecture: str = "unet"
    family: str = "unet"  # the presets' model family: "unet", "flux" or "sd3"
    # Batch rows per image batch in the running pass: a pass that stacks k
    # timesteps (timestep-major) sets k, and add() sums the k copies in place.
    stacked_timesteps: int = 1
    entries: dict[tuple[LayerKey, str], StoredMaps] = field(default_factory=dict)
    steps: set[int] = field(default_factory=set)
    # One store per timestep besides the running sum, for methods that average
    # their final maps over timesteps (DiffSegmenter) rather than the attention.
    # A pass fills ``per_timestep[first:first + stacked_timesteps]``.
    per_timestep: list["AttentionStore"] = field(default_factory=list)
    first_timestep: int = 0
    # A fingerprint of the input image (shape and pixel sum) for a pass over an image,
    # so one image's maps are not refined with another's attention; None for sampling.
    image_key: tuple | None = None

    def add(self, key: LayerKey, branch: str, grid: tuple[int, int], maps: torch.Tensor, heads: int = 1) -> None:
        """Accumulate (B, N, T) maps for one layer and branch (called from hooks:
        no host sync, stays on the maps' device)."""
        copies = self.stacked_timesteps
        if self.per_timestep:
            for index, part in enumerate(maps.unflatten(0, (copies, -1))):
                self.per_timestep[self.first_timestep + index]._accumulate(key, branch, grid, part, 1, heads)
        if copies > 1:
            maps = maps.unflatten(0, (copies, -1)).sum(0)
        self._accumulate(key, branch, grid, maps, copies, heads)

    def _accumulate(self, key: LayerKey, branch: str, grid: tuple[int, int], maps: torch.Tensor, count: int,
                    heads: int) -> None:
        slot = self.entries.get((key, branch))
        if slot is None:
            self.entries[(key, branch)] = StoredMaps(grid, maps.to(self.dtype, copy=True), count, heads)
        else:
            slot.total.add_(maps.to(slot.total.dtype))
            slot.count += count

    def check_finite(self, input_name: str = "attention") -> None:
        """Refuse maps holding NaN or infinity: every method would turn them into empty
        or arbitrary masks without a word. One device sync for the whole store."""
        if not self.entries:
            return
        device = next(iter(self.entries.values())).total.device
        finite = torch.stack([torch.isfinite(s.total).all().to(device) for s in self.entries.values()]).tolist()
        bad = [key.name + (f" ({branch})" if branch != "cond" else "")
               for ((key, branch), ok) in zip(self.entries, finite) if not ok]
        if bad:
            shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            raise AttnSegError(
                f"{input_name}: the captured attention of {len(bad)} of {len(finite)} layers holds NaN or infinite "
                f"values ({shown}): the model computed them, so masks from them would be empty or arbitrary. "
                f"Usual causes: fp16 attention overflowing (load the model in bf16 or fp32, e.g. ComfyUI's "
                f"--bf16-unet or --fp32-unet), or a model file with NaN weights.")

    def layers(self, kind: str, branch: str = "cond") -> list[tuple[LayerKey, StoredMaps]]:
        return sorted((k, v) for (k, b), v in self.entries.items() if k.kind == kind and b == branch)

    def require(self, kind: str, branch: str = "cond", what: str = "store") -> list[tuple[LayerKey, StoredMaps]]:
        found = self.layers(kind, branch)
        if not found:
            raise AttnSegError(
                f"{what}: the attention store holds no {kind}-attention maps of the {branch} branch. "
                f"Capture them (AttnSeg Capture Image Attention always does; on the capture sampler keep capture on, "
                f"with self-attention enabled, and a step range inside the run).")
        return found
