"""What the capture needs to know about a diffusers ``UNet2DConditionModel``,
read from its modules.

Layers are named as the ComfyUI host names them (LDM numbering: ``input`` /
``middle`` / ``output`` block ids as in the original checkpoints, ``depth`` the
transformer inside the block, ``factor`` the latent downscale), so a store from
either host has the same keys and every preset picks the same layers."""

from __future__ import annotations

import math
from dataclasses import dataclass


from ...attnseg import AttnSegError


@dataclass(frozen=True)
class DiffusersLayer:
    """One BasicTransformerBlock, with its place in LDM numbering and its two attentions."""

    block: str
    block_id: int
    depth: int
    factor: int
    path: str  # the module path of the transformer block, for messages


@dataclass(frozen=True)
class DiffusersUNetInfo:
    model_id: str
    context_dim: int
    layers: tuple[DiffusersLayer, ...]
    modules: dict  # DiffusersLayer -> the BasicTransformerBlock module
    latent_multiple: int  # the UNet downsamples this much: latent sides must be multiples of it
    family: str = "unet"

    @property
    def finest_factor(self) -> int:
        return min(layer.factor for layer in self.layers)

    def default_self_layers(self) -> list[DiffusersLayer]:
        """The self-attention a plan records unless it names layers: the finest level's."""
        return [layer for layer in self.layers if layer.factor == self.finest_factor]

    def reference_at(self, factor: int) -> DiffusersLayer:
        """GoCA's reference layer by resolution: the middle decoder transformer at
        ``factor`` or the nearest factor the model has (as the ComfyUI host)."""
        decoder = [layer for layer in self.layers if layer.block == "output"] or list(self.layers)
        nearest = min({layer.factor for layer in decoder}, key=lambda f: (abs(math.log2(f / factor)), f))
        at_factor = [layer for layer in decoder if layer.factor == nearest]
        return at_factor[(len(at_factor) - 1) // 2]

    def attention(self, layer: DiffusersLayer, kind: str):
        """The ``attn2`` (cross) or ``attn1`` (self) Attention module of a layer."""
        return getattr(self.modules[layer], "attn2" if kind == "cross" else "attn1")


def _transformer_blocks(attentions, path: str):
    """(index of the Transformer2DModel in the block, depth, module, path) in execution order."""
    for index, transformer in enumerate(attentions or []):
        for depth, block in enumerate(getattr(transformer, "transformer_blocks", [])):
            yield index, depth, block, f"{path}.attentions.{index}.transformer_blocks.{depth}"


def describe_unet(unet, input_name: str = "pipe") -> DiffusersUNetInfo:
    """Walk the UNet's blocks in execution order, tracking the resolution and LDM's block ids.

    LDM's ``input_blocks`` are conv_in, then per level one block per resnet and one
    for the downsampler; its ``output_blocks`` one per resnet of each up block."""
    if type(unet).__name__ != "UNet2DConditionModel":
        raise AttnSegError(f"{input_name}: its denoiser is a {type(unet).__name__}; the diffusers host segments "
                           f"with a UNet2DConditionModel (SD1.x, SD2.x, SDXL), FluxTransformer2DModel (Flux) or "
                           f"SD3Transformer2DModel (SD3/SD3.5).")
    layers, modules = [], {}

    def add(block: str, block_id: int, depth: int, factor: int, module, path: str) -> None:
        layer = DiffusersLayer(block, block_id, depth, factor, path)
        layers.append(layer)
        modules[layer] = module

    factor, next_id = 1, 1
    for i, down in enumerate(unet.down_blocks):
        for index, depth, module, path in _transformer_blocks(getattr(down, "attentions", None), f"down_blocks.{i}"):
            add("input", next_id + index, depth, factor, module, path)
        next_id += len(down.resnets) + (1 if down.downsamplers else 0)
        if down.downsamplers:
            factor *= 2
    latent_multiple = factor
    for _, depth, module, path in _transformer_blocks(getattr(unet.mid_block, "attentions", None), "mid_block"):
        add("middle", 0, depth, factor, module, path)
    next_id = 0
    for i, up in enumerate(unet.up_blocks):
        for index, depth, module, path in _transformer_blocks(getattr(up, "attentions", None), f"up_blocks.{i}"):
            add("output", next_id + index, depth, factor, module, path)
        next_id += len(up.resnets)
        if up.upsamplers:
            factor //= 2
    if not layers:
        raise AttnSegError(f"{input_name}: its UNet has no attention layers to capture.")
    attn2 = modules[layers[0]].attn2
    if attn2 is None or attn2.is_cross_attention is False:
        raise AttnSegError(f"{input_name}: its UNet has no text cross-attention to segment with.")
    context_dim = attn2.to_k.weight.shape[1]
    return DiffusersUNetInfo(f"UNet2DConditionModel (context {context_dim}, {len(layers)} attention layers)",
                             context_dim, tuple(layers), modules, latent_multiple)


def grid_at(latent_size: tuple[int, int], factor: int) -> tuple[int, int]:
    """The token grid of a layer at ``factor``: each stride-2 downsampler (padding 1)
    takes an h-pixel side to ceil(h / 2)."""
    h, w = latent_size
    for _ in range(int(math.log2(factor))):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def check_latent_grid(latent_size: tuple[int, int], info: DiffusersUNetInfo, vae_factor: int,
                      input_name: str) -> None:
    """The UNet's skip connections need every level's side even: refuse a latent it cannot take."""
    h, w = latent_size
    if h % info.latent_multiple or w % info.latent_multiple:
        raise AttnSegError(f"{input_name}: a {w * vae_factor}x{h * vae_factor} image gives a {w}x{h} latent, which this UNet "
                           f"cannot halve {int(math.log2(info.latent_multiple))} times; use a width and height "
                           f"that are multiples of {info.latent_multiple * vae_factor} pixels.")
