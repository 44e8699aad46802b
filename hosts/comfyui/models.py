"""The model families the capture supports, behind one entry point: a UNet
(SD1.x, SD2.x, SDXL) gets attention replace patches, a DiT (Flux, SD3) the
attention override. Callers get the layout and install a capture without
knowing which."""

from __future__ import annotations

from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ...attnseg import AttentionStore
from ...attnseg.prompt_weights import KeyScale
from .capture import CapturePlan, head_counter, install_capture
from .catcross import install_key_scale
from .dit import DiTInfo, check_dit_conditioning, describe_dit, dit_family, install_dit_capture, unsupported
from .unet import UNetInfo, check_conditioning, describe_unet

ModelInfo = UNetInfo | DiTInfo


def describe_model(model, input_name: str = "model") -> ModelInfo:
    if dit_family(model) is not None:
        return describe_dit(model, input_name)
    if isinstance(model.get_model_object("diffusion_model"), UNetModel):
        return describe_unet(model, input_name)
    raise unsupported(model, input_name)


def checked_model(model, positive, input_name: str) -> ModelInfo:
    """The model's layout, after refusing an unsupported model or foreign conditioning."""
    info = describe_model(model)
    if isinstance(info, DiTInfo):
        check_dit_conditioning(info, positive, input_name)
    else:
        check_conditioning(info, positive, input_name)
    return info


def install_model_capture(model, info: ModelInfo, store: AttentionStore, plan: CapturePlan | None,
                          key_scale: KeyScale | None = None) -> None:
    """Patch ``model`` (a clone the caller owns): capture with ``plan`` (None: none) and
    Cat-Cross "keys" with ``key_scale``, the capture recording the weighted attention.
    A plan naming layers, heads or a preset the model lacks is refused first."""
    if plan is not None:
        plan.check(info, head_counter(info, model))
    if isinstance(info, DiTInfo):
        if plan is None:  # Cat-Cross alone: the override scales keys and records nothing
            plan, store = CapturePlan(cross_steps=None, self_steps=None), AttentionStore(info.model_id, 0, (0, 0),
                                                                                         (0, 0))
        install_dit_capture(model, info, store, plan, key_scale)
        return
    if plan is not None:
        install_capture(model, info, store, plan)
    if key_scale is not None:
        install_key_scale(model, info, key_scale)
