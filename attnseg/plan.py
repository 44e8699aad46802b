"""What a capture records, for every host: the layers, heads, steps and branches
a plan selects on a model's layer list. A host describes its model (its layers,
their latent factors, the default self-attention layers, GoCA's reference layer)
and tells the plan how many heads a layer has; the plan picks, so a preset
selects the same layers and heads on ComfyUI and on diffusers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import AttnSegError
from .layers import LayerPick, check_heads, resolve
from .presets import CAPTURE_METHODS, CaptureSetup, check_family

HEAD_REDUCTIONS = ("mean", "auto")
# GoCA's reference layer sits at half the latent resolution (SD1.5 at 512 px: 32 x 32).
GOCA_REFERENCE_FACTOR = 2
# how many heads a layer's attention of a kind ("cross" or "self") has, as the host knows it
HeadCount = Callable[[object, str], int]


def working_size(height: int, width: int, resolution: int, multiple: int = 64) -> tuple[int, int]:
    """A capture pass's image size: the longer side ``resolution``, the aspect ratio
    kept, each side a multiple of 64 (an SD UNet halves the latent three times)."""
    scale = resolution / max(height, width)
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


@dataclass(frozen=True)
class StepRange:
    """Steps start..end inclusive; a negative end counts back from the last step."""

    start: int = 0
    end: int = -1

    def contains(self, step: int, total: int) -> bool:
        end = self.end if self.end >= 0 else total + self.end
        return self.start <= step <= end


@dataclass(frozen=True)
class CapturePlan:
    """Which attention to record.

    ``cross_factors`` / ``self_factors``: latent downscale factors of the layers
    to capture (1 = full latent resolution); ``None`` for self means the finest
    attention resolution of the model, ``self_every_layer`` overrides it with
    every layer. Self-attention grids larger than ``self_max_tokens`` are
    average-pooled (64 x 64 by default). ``cross_heads``: "mean", or "auto" for
    GoCA's output-weighted heads. ``reference_factor``: also store the queries of
    GoCA's reference layer at that latent factor (None: no queries).

    A preset can name layers and heads instead: ``self_layers`` (layer picks
    that replace the factor rules), ``self_heads`` (the heads whose mean is kept
    for those layers), ``cross_layers`` (picks that replace ``cross_factors``)
    and ``cross_head_lists`` ((pick, heads) pairs: those layers keep the mean of
    those heads only). Heads are chosen inside the hook. ``cross_steps`` /
    ``self_steps``: the sampling steps that record (None: never); ``branches``:
    "cond" and/or "uncond" of a CFG batch. ``source`` names the preset in error
    messages."""

    cross_steps: StepRange | None = StepRange()
    self_steps: StepRange | None = StepRange()
    cross_factors: frozenset[int] | None = None  # None: every resolution
    self_factors: frozenset[int] | None = None  # None: the finest one
    branches: frozenset[str] = frozenset({"cond"})
    self_max_tokens: int = 64 * 64
    self_every_layer: bool = False
    cross_heads: str = "mean"
    reference_factor: int | None = None
    self_layers: tuple[LayerPick, ...] | None = None
    self_heads: tuple[int, ...] | None = None
    cross_layers: tuple[LayerPick, ...] | None = None
    cross_head_lists: tuple[tuple[LayerPick, tuple[int, ...]], ...] = ()
    reference: LayerPick | None = None  # GoCA's reference layer by place (wins over reference_factor)
    source: str = "custom"

    @classmethod
    def from_setup(cls, setup: CaptureSetup, source: str) -> "CapturePlan":
        """What a preset's pass records."""
        return cls(cross_heads=setup.heads, self_every_layer=setup.self_every_layer, self_layers=setup.self_layers,
                   self_heads=setup.self_heads, cross_layers=setup.cross_layers,
                   cross_head_lists=setup.cross_head_lists, reference=setup.reference, source=source)

    def reference_layer(self, info):
        """``info``: a host's model description (its layers and defaults)."""
        if self.reference is not None:
            return resolve(info.layers, (self.reference,), self.source)[0]
        return info.reference_at(self.reference_factor) if self.reference_factor else None

    def layers(self, info, kind: str) -> list:
        """The layers whose ``kind`` attention this plan records."""
        if kind == "cross":
            if self.cross_steps is None:
                return []
            if self.cross_layers is not None:
                return resolve(info.layers, self.cross_layers, self.source)
            return [la for la in info.layers if self.cross_factors is None or la.factor in self.cross_factors]
        if self.self_steps is None:
            return []
        if self.self_layers is not None:
            return resolve(info.layers, self.self_layers, self.source)
        if self.self_every_layer:
            return list(info.layers)
        if self.self_factors is None:
            return info.default_self_layers()
        return [la for la in info.layers if la.factor in self.self_factors]

    def check(self, info, head_count: HeadCount) -> None:
        """Refuse a preset of another model family, layers or heads the model lacks
        (before any work is spent)."""
        if self.cross_heads not in HEAD_REDUCTIONS:
            raise AttnSegError(f"heads: '{self.cross_heads}' is not one of {', '.join(HEAD_REDUCTIONS)}.")
        check_family(self.source, getattr(info, "family", "unet"), info.model_id, CAPTURE_METHODS)
        self.layers(info, "cross")
        self.layers(info, "self")
        self.reference_layer(info)
        self.heads(info, head_count)

    def check_dit_heads(self, info) -> None:
        """A DiT capture averages the heads (GoCA's DiT configurations): refuse the
        output-weighted heads, which read a UNet layer's output projection."""
        if self.cross_heads != "mean":
            raise AttnSegError(f"heads: '{self.cross_heads}' (GoCA's output-weighted heads) is for UNet models; on "
                               f"{info.model_id} GoCA uses the head mean, as its Flux configuration does. Set heads "
                               f"to mean.")

    def heads(self, info, head_count: HeadCount) -> dict[tuple[object, str], tuple[int, ...]]:
        """{(layer, kind): heads} for the layers that keep some heads only, checked
        against each layer's head count."""
        chosen = {}
        if self.self_heads is not None:
            for layer in self.layers(info, "self"):
                chosen[(layer, "self")] = self.self_heads
        for pick, heads in self.cross_head_lists:
            for layer in resolve(info.layers, (pick,), self.source):
                chosen[(layer, "cross")] = heads
        for (layer, kind), heads in chosen.items():
            check_heads(heads, head_count(layer, kind), f"the {kind}-attention of {layer.block} block "
                        f"{layer.block_id} (depth {layer.depth})", self.source)
        return chosen
