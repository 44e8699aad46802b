"""Which attention a diffusers capture records: the same rules as the ComfyUI
host's CapturePlan (hosts/comfyui/capture.py), on the diffusers UNet's layout, so
a preset selects the same layers and heads on both hosts."""

from __future__ import annotations

from dataclasses import dataclass

from ...attnseg import AttnSegError
from ...attnseg.layers import LayerPick, check_heads, resolve
from ...attnseg.presets import CAPTURE_METHODS, CaptureSetup, check_family
from .unet import DiffusersLayer, DiffusersUNetInfo

HEAD_REDUCTIONS = ("mean", "auto")
# GoCA's reference layer sits at half the latent resolution (SD1.5 at 512 px: 32 x 32).
GOCA_REFERENCE_FACTOR = 2


@dataclass(frozen=True)
class StepRange:
    """Steps start..end inclusive of a pipeline call; a negative end counts back from the last step."""

    start: int = 0
    end: int = -1

    def contains(self, step: int, total: int) -> bool:
        end = self.end if self.end >= 0 else total + self.end
        return self.start <= step <= end


@dataclass(frozen=True)
class CapturePlan:
    """What to record; the fields mean what the ComfyUI host's CapturePlan's do.

    ``cross_factors`` / ``self_factors``: latent factors of the layers to record
    (cross None: every layer; self None: the finest level, or every layer with
    ``self_every_layer``); ``self_layers`` / ``cross_layers``: layer picks that
    replace those rules; ``self_heads`` / ``cross_head_lists``: heads whose mean
    is kept (chosen inside the processor); ``cross_heads`` "auto": GoCA's
    output-weighted heads; ``reference``: the layer whose queries are stored
    (GoCA); ``cross_steps`` / ``self_steps``: the steps of a pipeline call that
    record (None: never); ``branches``: "cond" and/or "uncond" during a call
    with classifier-free guidance."""

    cross_steps: StepRange | None = StepRange()
    self_steps: StepRange | None = StepRange()
    cross_factors: frozenset[int] | None = None
    self_factors: frozenset[int] | None = None
    branches: frozenset[str] = frozenset({"cond"})
    self_max_tokens: int = 64 * 64
    self_every_layer: bool = False
    cross_heads: str = "mean"
    reference_factor: int | None = None
    self_layers: tuple[LayerPick, ...] | None = None
    self_heads: tuple[int, ...] | None = None
    cross_layers: tuple[LayerPick, ...] | None = None
    cross_head_lists: tuple[tuple[LayerPick, tuple[int, ...]], ...] = ()
    reference: LayerPick | None = None
    source: str = "custom"

    @classmethod
    def from_setup(cls, setup: CaptureSetup, source: str) -> "CapturePlan":
        """What a preset's pass records."""
        return cls(cross_heads=setup.heads, self_every_layer=setup.self_every_layer, self_layers=setup.self_layers,
                   self_heads=setup.self_heads, cross_layers=setup.cross_layers,
                   cross_head_lists=setup.cross_head_lists, reference=setup.reference, source=source)

    def reference_layer(self, info: DiffusersUNetInfo) -> DiffusersLayer | None:
        if self.reference is not None:
            return resolve(info.layers, (self.reference,), self.source)[0]
        return info.reference_at(self.reference_factor) if self.reference_factor else None

    def layers(self, info: DiffusersUNetInfo, kind: str) -> list[DiffusersLayer]:
        """The layers whose ``kind`` ("cross" or "self") attention this plan records."""
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

    def heads(self, info: DiffusersUNetInfo) -> dict[tuple[DiffusersLayer, str], tuple[int, ...]]:
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
            check_heads(heads, info.attention(layer, kind).heads, f"the {kind}-attention of {layer.path} "
                        f"({layer.block} block {layer.block_id}, depth {layer.depth})", self.source)
        return chosen

    def check(self, info: DiffusersUNetInfo) -> None:
        """Refuse a preset of another family, layers or heads the model lacks (before any work)."""
        if self.cross_heads not in HEAD_REDUCTIONS:
            raise AttnSegError(f"heads: '{self.cross_heads}' is not one of {', '.join(HEAD_REDUCTIONS)}.")
        check_family(self.source, info.family, info.model_id, CAPTURE_METHODS)
        self.layers(info, "cross")
        self.layers(info, "self")
        self.reference_layer(info)
        self.heads(info)
