"""AttnSeg core: pure-torch building blocks for training-free segmentation
from a diffusion model's attention. Nothing here imports ComfyUI or diffusers;
hosts fill an :class:`AttentionStore` and the rest works on plain tensors."""

from .errors import AttnSegError
from .store import AttentionStore, LayerKey
from .tokens import ClassTokens, SegPrompt

__all__ = ["AttnSegError", "AttentionStore", "LayerKey", "ClassTokens", "SegPrompt"]
