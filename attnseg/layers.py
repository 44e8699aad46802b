"""Layers named by their place in a UNet, so one preset reads the same layers
on every model of a family: SD1.5 and SD2.1 share a layout, the demo model is a
smaller copy of it, SDXL drops the finest level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from .errors import AttnSegError

BLOCKS = ("input", "middle", "output")
# A DiT's blocks: Flux's double- and single-stream blocks, SD3's joint blocks. A DiT
# has one resolution, so its picks are level 0 and ``index`` is the block's index.
DIT_BLOCKS = ("double", "single", "joint")


class Located(Protocol):
    block: str
    block_id: int
    depth: int
    factor: int


@dataclass(frozen=True)
class LayerPick:
    """Transformer layers of one level of one part of the UNet.

    ``block``: "input" (encoder), "middle" or "output" (decoder). ``level``: 0 is
    the finest resolution that has attention, 1 the next coarser one, and so on.
    ``index``: the layer's position among that part's layers at that level, in
    execution order (``None``: all of them). SD2.1's ``up_blocks[3]
    .attentions[1]`` is ``LayerPick("output", 0, 1)``."""

    block: str
    level: int
    index: int | None = None

    def __str__(self) -> str:
        if self.block in DIT_BLOCKS:
            return f"every {self.block} block" if self.index is None else f"{self.block} block {self.index}"
        which = "every layer" if self.index is None else f"layer {self.index + 1}"
        return f"{self.block} level {self.level} (0 = finest), {which}"

    @classmethod
    def dit(cls, block: str, index: int | None = None) -> "LayerPick":
        return cls(block, 0, index)


def levels_of(layers: Sequence[Located]) -> list[int]:
    """The model's attention factors, finest first."""
    return sorted({layer.factor for layer in layers})


def resolve(layers: Sequence[Located], picks: Sequence[LayerPick], preset: str, input_name: str = "preset"):
    """The layers ``picks`` name, in execution order; a pick the model lacks is an
    error that names the preset and the missing level or layer."""
    factors = levels_of(layers)
    chosen = []
    for pick in picks:
        if pick.block not in BLOCKS + DIT_BLOCKS:
            raise AttnSegError(f"{input_name}: '{preset}' names a '{pick.block}' block; blocks are "
                               f"{', '.join(BLOCKS + DIT_BLOCKS)}.")
        present = {layer.block for layer in layers}
        if (pick.block in DIT_BLOCKS) != bool(present & set(DIT_BLOCKS)):
            kinds = "DiT" if pick.block in DIT_BLOCKS else "UNet"
            raise AttnSegError(
                f"{input_name}: '{preset}' reads {kinds} layers ({pick}) but this model's layers are "
                f"{', '.join(sorted(present))} blocks. Choose a preset made for this model, or 'custom'.")
        if pick.level >= len(factors):
            raise AttnSegError(
                f"{input_name}: '{preset}' reads attention level {pick.level} (0 = finest) but this model has "
                f"{len(factors)} attention levels. Choose a preset made for this model, or 'custom'.")
        at_level = [layer for layer in layers if layer.block == pick.block and layer.factor == factors[pick.level]]
        if pick.index is None:
            found = at_level
        elif pick.block in DIT_BLOCKS:  # a DiT block is named by its index, also among a store's few blocks
            found = [layer for layer in at_level if layer.block_id == pick.index]
        elif pick.index < len(at_level):
            found = [at_level[pick.index]]
        else:
            found = []
        if not found and pick.block in DIT_BLOCKS:
            ids = sorted(layer.block_id for layer in at_level)
            if not ids:
                kinds = sorted({layer.block for layer in layers})
                have = f"there are no {pick.block} blocks, only {' and '.join(kinds)} blocks"
            elif ids == list(range(len(ids))):
                have = f"this model has {len(ids)} {pick.block} blocks (0 to {len(ids) - 1})"
            else:
                have = f"the {input_name} holds {pick.block} blocks {', '.join(map(str, ids))}"
            raise AttnSegError(f"{input_name}: '{preset}' reads {pick}, but {have}. Choose a preset made for this "
                               f"model, or 'custom'.")
        if not found:
            have = f"{len(at_level)} {pick.block} layers there" if at_level else f"no {pick.block} layer there"
            raise AttnSegError(
                f"{input_name}: '{preset}' reads the {pick} at 1/{factors[pick.level]} of the latent size, but this "
                f"model has {have}. Choose a preset made for this model (SDXL has no attention at the full "
                f"latent size), or 'custom'.")
        chosen += [layer for layer in found if layer not in chosen]
    return sorted(chosen, key=list(layers).index)


def check_heads(heads: Sequence[int], count: int, layer_name: str, preset: str, input_name: str = "preset") -> None:
    bad = [h for h in heads if not 0 <= h < count]
    if bad:
        raise AttnSegError(
            f"{input_name}: '{preset}' reads heads {', '.join(map(str, bad))} of {layer_name}, which has {count} "
            f"heads (0 to {count - 1}). Choose a preset made for this model, or 'custom'.")


def parse_picks(text: str, input_name: str) -> tuple[LayerPick, ...] | None:
    """'output 0 1; input 0 *' -> layer picks (block, level from the finest, index
    among that block's layers there or * for all); a DiT's blocks as 'double 12;
    single *' (type and index); empty -> None."""
    picks = []
    for part in text.replace(",", ";").split(";"):
        words = part.split()
        if not words:
            continue
        if words[0] in DIT_BLOCKS:
            if len(words) != 2 or not (words[1] == "*" or words[1].isdigit()):
                raise AttnSegError(f"{input_name}: '{part.strip()}' is not 'TYPE INDEX' (TYPE one of "
                                   f"{', '.join(DIT_BLOCKS)}, INDEX from 0 or *), e.g. 'double 12'.")
            picks.append(LayerPick.dit(words[0], None if words[1] == "*" else int(words[1])))
            continue
        if len(words) != 3 or words[0] not in BLOCKS:
            raise AttnSegError(f"{input_name}: '{part.strip()}' is not 'BLOCK LEVEL INDEX' (BLOCK one of "
                               f"{', '.join(BLOCKS)}, LEVEL 0 for the finest, INDEX from 0 or *), e.g. 'output 0 1'; "
                               f"on a DiT 'TYPE INDEX' (TYPE one of {', '.join(DIT_BLOCKS)}), e.g. 'double 12'.")
        try:
            level = int(words[1])
            index = None if words[2] == "*" else int(words[2])
        except ValueError:
            raise AttnSegError(f"{input_name}: '{part.strip()}' needs whole numbers for LEVEL and INDEX (or * for "
                               f"every layer), e.g. 'output 0 1'.")
        if level < 0 or (index is not None and index < 0):
            raise AttnSegError(f"{input_name}: '{part.strip()}' has a negative level or index; count from 0.")
        picks.append(LayerPick(words[0], level, index))
    return tuple(picks) or None


def parse_heads(text: str, input_name: str) -> tuple[int, ...] | None:
    """'1, 2' -> head indices (from 0); empty -> None (every head)."""
    if not text.strip():
        return None
    try:
        heads = tuple(int(h) for h in text.replace(";", ",").split(",") if h.strip())
    except ValueError:
        raise AttnSegError(f"{input_name}: '{text}' is not a comma-separated list of head indices, e.g. '1, 2'.")
    if any(h < 0 for h in heads) or len(set(heads)) != len(heads):
        raise AttnSegError(f"{input_name}: '{text}' must list distinct head indices from 0.")
    return heads or None


# GoCA's Flux choices, as (type, index): propagation self-attention of blocks 12 and 18 of
# 57, and block 27's attention output as the layer-weight reference (single block 8).
FLUX_SELF_BLOCKS = (("double", 12), ("double", 18))
FLUX_REFERENCE = ("single", 8)
# Seg4Diff's SD3 block: its I2T maps segment best (SD3-medium, 24 joint blocks).
SD3_BLOCK = ("joint", 9)


@dataclass(frozen=True)
class DiTInfo:
    """What a capture needs to know about a DiT, whichever host read it: its blocks as
    layers (block type, index, depth 0, factor = the patch size, one resolution for
    all), heads, the text width its context has and what comes before the context in
    the text part of the sequence (SD3's register tokens)."""

    family: str  # "flux" or "sd3"
    model_id: str
    context_dim: int
    layers: tuple  # of Located layers, in the host's own layer type
    heads: int
    patch_size: int
    latent_channels: int
    text_prefix: int = 0

    @property
    def finest_factor(self) -> int:
        return self.patch_size

    def blocks(self) -> list[tuple[str, int]]:
        return [(layer.block, layer.block_id) for layer in self.layers]

    def layer(self, block: tuple[str, int]) -> Located | None:
        return next((la for la in self.layers if (la.block, la.block_id) == block), None)

    def _middle(self) -> Located:
        return self.layers[len(self.layers) // 2]

    def default_self_layers(self) -> list[Located]:
        """Self-attention recorded unless a plan names blocks: GoCA's propagation blocks
        on Flux, Seg4Diff's block on SD3; the middle block where the model lacks them."""
        wanted = FLUX_SELF_BLOCKS if self.family == "flux" else (SD3_BLOCK,)
        found = [la for la in map(self.layer, wanted) if la is not None]
        return found or [self._middle()]

    def reference_at(self, factor: int) -> Located:
        """GoCA's reference block (Flux: block 27 of 57); the factor means nothing on a DiT."""
        return (self.layer(FLUX_REFERENCE) if self.family == "flux" else None) or self._middle()

    def head_count(self, layer: Located) -> int:
        return self.heads

    def describe_blocks(self) -> str:
        counts = {}
        for layer in self.layers:
            counts[layer.block] = counts.get(layer.block, 0) + 1
        return " and ".join(f"{kind} blocks 0-{n - 1}" for kind, n in counts.items())
