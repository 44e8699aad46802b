"""What the capture needs to know about a ComfyUI UNet, read from its modules."""

from __future__ import annotations

import math
from dataclasses import dataclass

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample

from ...attnseg import AttnSegError


@dataclass(frozen=True)
class AttentionLayer:
    """One BasicTransformerBlock: its patch key and its latent downscale factor."""

    block: str
    block_id: int
    depth: int
    factor: int

    @property
    def patch_key(self) -> tuple[str, int, int]:
        return (self.block, self.block_id, self.depth)


@dataclass(frozen=True)
class UNetInfo:
    model_id: str
    context_dim: int
    layers: tuple[AttentionLayer, ...]

    @property
    def finest_factor(self) -> int:
        return min(layer.factor for layer in self.layers)

    def default_self_layers(self) -> list["AttentionLayer"]:
        """The self-attention a plan records unless it names layers: the finest level's."""
        return [layer for layer in self.layers if layer.factor == self.finest_factor]

    def reference_at(self, factor: int) -> "AttentionLayer":
        return reference_layer(self, factor)


def _transformers(block):
    return [m for m in block if isinstance(m, SpatialTransformer)]


def describe_unet(model, input_name: str = "model") -> UNetInfo:
    """Walk the UNet's blocks in execution order, tracking the resolution.

    Raises a user-facing error for model families the capture cannot hook yet."""
    diffusion_model = model.get_model_object("diffusion_model")
    family = type(getattr(model.model, "model_config", model.model)).__name__
    if not isinstance(diffusion_model, UNetModel):
        raise AttnSegError(
            f"{input_name}: {family} ({type(diffusion_model).__name__}) is not a UNet model (SD1.x, SD2.x, "
            f"SDXL), which this takes.")
    layers = []
    factor = 1
    for block_id, block in enumerate(diffusion_model.input_blocks):
        for st in _transformers(block):
            layers += [AttentionLayer("input", block_id, d, factor) for d in range(len(st.transformer_blocks))]
        if any(isinstance(m, Downsample) for m in block):
            factor *= 2
    for st in _transformers(diffusion_model.middle_block):
        layers += [AttentionLayer("middle", 0, d, factor) for d in range(len(st.transformer_blocks))]
    for block_id, block in enumerate(diffusion_model.output_blocks):
        for st in _transformers(block):
            layers += [AttentionLayer("output", block_id, d, factor) for d in range(len(st.transformer_blocks))]
        if any(isinstance(m, Upsample) for m in block):
            factor //= 2
    if not layers:
        raise AttnSegError(f"{input_name}: {family} has no attention layers to capture.")
    first = next(m for b in diffusion_model.input_blocks for m in b if isinstance(m, SpatialTransformer))
    attn2 = first.transformer_blocks[0].attn2
    if attn2 is None:
        raise AttnSegError(f"{input_name}: {family} has no text cross-attention to segment with.")
    context_dim = attn2.to_k.weight.shape[1]
    return UNetInfo(f"{family} (context {context_dim}, {len(layers)} attention layers)", context_dim, tuple(layers))


def reference_layer(info: UNetInfo, factor: int = 2) -> AttentionLayer:
    """GoCA's reference layer, chosen by resolution: the middle decoder
    transformer at latent ``factor`` (SD1.5: output block 7, the authors' choice),
    or at the nearest factor the model has."""
    decoder = [layer for layer in info.layers if layer.block == "output"] or list(info.layers)
    nearest = min({layer.factor for layer in decoder}, key=lambda f: (abs(math.log2(f / factor)), f))
    at_factor = [layer for layer in decoder if layer.factor == nearest]
    return at_factor[(len(at_factor) - 1) // 2]


def attention_module(model, layer: AttentionLayer, slot: str):
    """The ``attn1`` / ``attn2`` CrossAttention module of a layer."""
    diffusion_model = model.get_model_object("diffusion_model")
    if layer.block == "middle":
        block = diffusion_model.middle_block
    else:
        block = (diffusion_model.input_blocks if layer.block == "input" else diffusion_model.output_blocks)[layer.block_id]
    transformer = _transformers(block)[0].transformer_blocks[layer.depth]
    return getattr(transformer, slot)


def check_conditioning(info: UNetInfo, conditioning, input_name: str) -> None:
    """Refuse conditioning from another model family before torch does, cryptically."""
    if not conditioning:
        raise AttnSegError(f"{input_name}: the conditioning is empty. Connect a text encoder's output.")
    dim = conditioning[0][0].shape[-1]
    if dim != info.context_dim:
        raise AttnSegError(
            f"{input_name}: this conditioning has {dim}-wide text embeddings but the model expects "
            f"{info.context_dim} ({info.model_id}). Encode the prompt with the CLIP loaded with this model.")
