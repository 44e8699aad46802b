"""The two ways to fill a store: one denoising pass over an input image, and a
sampler run that captures while it generates."""

from __future__ import annotations

import math
import threading

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ...attnseg import AttentionStore, AttnSegError
from ...attnseg.plan import working_size
from .capture import CapturePlan, head_counter
from .dit import OVERRIDE, DiTInfo
from .models import ModelInfo, checked_model, install_model_capture
from .text import key_scale_of, prompt_of

LATENT_TO_PIXELS = 8  # the VAEs of SD1.x / SD2.x / SDXL, Flux and SD3
ADAPTIVE_SAMPLERS = frozenset({"dpm_adaptive"})


def parse_timesteps(text: str) -> list[int]:
    try:
        numbers = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise AttnSegError(f"timesteps: '{text}' is not a list of numbers. Give e.g. '100' or '1,50,100,150'.")
    if not numbers or any(not math.isfinite(t) or not 0 <= t <= 999 for t in numbers):
        raise AttnSegError(f"timesteps: '{text}' must list one or more timesteps between 0 and 999 (papers: 100).")
    return [int(t) for t in numbers]


def check_memory(model, image: torch.Tensor, resolution: int, input_name: str = "resolution") -> None:
    """Refuse a pass the device cannot hold, before any work: the UNet forward's own
    estimate for the latent at the working size, plus the model when it is not loaded."""
    height, width = working_size(*image.shape[1:3], resolution)
    channels = model.model.latent_format.latent_channels
    shape = [image.shape[0], channels, height // LATENT_TO_PIXELS, width // LATENT_TO_PIXELS]
    needed = model.model.memory_required(shape) + model.model_size()
    free = comfy.model_management.get_free_memory(model.load_device)
    if needed > free:
        gib = 1024 ** 3
        raise AttnSegError(f"{input_name}: a {width}x{height} pass needs about {needed / gib:.1f} GiB on "
                           f"{model.load_device} but {free / gib:.1f} GiB is free. Lower {input_name}.")


def encode_image(vae, image: torch.Tensor, resolution: int) -> torch.Tensor:
    """IMAGE (B, H, W, C in [0, 1]) -> VAE latent at the working size (posterior mean)."""
    if image.ndim != 4 or image.shape[-1] < 3:
        raise AttnSegError(f"image: expected an IMAGE batch (B, H, W, 3), got shape {tuple(image.shape)}.")
    height, width = image.shape[1:3]
    size = working_size(height, width, resolution)
    pixels = image[..., :3]
    if (height, width) != size:
        pixels = comfy.utils.common_upscale(pixels.movedim(-1, 1), size[1], size[0], "bilinear", "disabled").movedim(1, -1)
    return vae.encode(pixels)


def timestep_sigma(sampling, timestep: float) -> torch.Tensor:
    """The model's sigma at ``timestep`` of 1000. Flow-matching models (Flux, SD3:
    ``x_t = (1 - sigma) x_0 + sigma eps``) read it as sigma = t / 1000, the noise level
    diffusers' flow schedulers name t (GoCA's Flux t = 150 is sigma 0.15); other models
    through their own schedule."""
    if isinstance(sampling, comfy.model_sampling.CONST):
        return torch.tensor(timestep / 1000.0)
    return sampling.sigma(torch.tensor(float(timestep)))


class OneForwardPass(comfy.samplers.Sampler):
    """A "sampler" that noises each batch row to its own sigma and runs the
    model once: several timesteps in one batched pass."""

    def __init__(self, row_sigmas: torch.Tensor):
        self.row_sigmas = row_sigmas

    @torch.no_grad()  # as ComfyUI's own samplers: no autograd graph through the UNet
    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        row_sigmas = self.row_sigmas.to(noise.device)
        noisy = model_wrap.inner_model.model_sampling.noise_scaling(row_sigmas, noise, latent_image)
        return model_wrap(noisy, row_sigmas, **extra_args)


def timesteps_per_pass(model, latent: torch.Tensor, count: int) -> int:
    """All timesteps in one batch when the device has the memory for it, else one at a time."""
    if count == 1:
        return 1
    needed = model.model.memory_required([latent.shape[0] * count, *latent.shape[1:]])
    free = comfy.model_management.get_free_memory(model.load_device)
    return count if needed + model.model_size() < free else 1


class LayerProgress:
    """The capture pass's progress bar, in captured layer calls: ``passes x layers``,
    known before the first pass; one step per call of a captured layer, and each
    pass ends at its share (one step per pass when a plan captures nothing). A
    Python counter and ComfyUI's bar update per call, no device sync."""

    def __init__(self, model, info: ModelInfo, plan: CapturePlan, passes: int):
        """Wrap the capture patches of ``model`` (a clone with the capture installed
        with ``plan``) so each call of a captured layer advances the bar."""
        self.layers = 0
        if isinstance(info, DiTInfo):
            self._count_dit_blocks(model, info, plan)
        else:
            replaces = model.model_options["transformer_options"].get("patches_replace", {})
            for kind, slot in (("cross", "attn2"), ("self", "attn1")):
                for key in dict.fromkeys(layer.patch_key for layer in plan.layers(info, kind)):
                    model.set_model_patch_replace(self._counted(replaces[slot][key]), slot, *key)
                    self.layers += 1
        self.per_pass = max(1, self.layers)
        self.total = max(1, passes * self.per_pass)
        self.done = self.end = 0
        self.bar = comfy.utils.ProgressBar(self.total)
        self.lock = threading.Lock()  # branches the host runs on two threads still report in order

    def _count_dit_blocks(self, model, info: DiTInfo, plan: CapturePlan) -> None:
        """A DiT's captured blocks are counted at the attention override, by the block
        its options name."""
        blocks = {(la.block, la.block_id) for kind in ("cross", "self") for la in plan.layers(info, kind)}
        options = model.model_options["transformer_options"]
        override = options[OVERRIDE]

        def counted(func, *args, **kwargs):
            block_options = kwargs.get("transformer_options") or {}
            if (block_options.get("block_type"), block_options.get("block_index")) in blocks:
                self.layer_called()
            return override(func, *args, **kwargs)

        options[OVERRIDE] = counted
        self.layers = len(blocks)

    def _counted(self, patch):
        def counted(q, k, v, extra):
            self.layer_called()
            return patch(q, k, v, extra)
        return counted

    def start_pass(self, index: int) -> None:
        self.end = min(self.total, (index + 1) * self.per_pass)

    def layer_called(self) -> None:
        with self.lock:
            if self.done < self.end:  # a pass the host splits into several UNet calls counts once
                self.done += 1
                self.bar.update_absolute(self.done, self.total)

    def end_pass(self) -> None:
        if self.done < self.end:  # a captured layer the pass did not call
            self.done = self.end
            self.bar.update_absolute(self.done, self.total)


def capture_pass(model, latent: torch.Tensor, positive, timesteps: list[int], seed: int,
                 image_size: tuple[int, int], plan: CapturePlan | None = None,
                 info: ModelInfo | None = None, per_pass: int | None = None,
                 keep_timesteps: bool = False) -> AttentionStore:
    """Noise ``latent`` to each timestep (one noise draw for all) and run
    cond-only UNet passes, ``per_pass`` timesteps stacked in a batch (None: as
    many as memory allows), capturing into a new store (maps averaged over the
    timesteps; with ``keep_timesteps`` and several timesteps, also one store per
    timestep in ``store.per_timestep``)."""
    info = info or checked_model(model, positive, "conditioning")
    new_store = lambda: AttentionStore(info.model_id, latent.shape[0], tuple(latent.shape[-2:]),  # noqa: E731
                                       image_size, prompt_of(positive))
    store = new_store()
    if keep_timesteps and len(timesteps) > 1:
        store.per_timestep = [new_store() for _ in timesteps]
    plan = plan or CapturePlan()
    patched = model.clone()
    install_model_capture(patched, info, store, plan, key_scale_of(positive))
    sampling = patched.get_model_object("model_sampling")
    # Timestep ranges and ControlNets are checked against one sigma per call:
    # such conditioning gets one pass per timestep.
    per_timestep = any(k in extras for _, extras in positive for k in ("timestep_start", "timestep_end", "control"))
    per_pass = per_pass or (1 if per_timestep else timesteps_per_pass(patched, latent, len(timesteps)))
    noise = comfy.sample.prepare_noise(latent, seed)
    starts = range(0, len(timesteps), per_pass)
    progress = LayerProgress(patched, info, plan, len(starts))
    for index, start in enumerate(starts):
        comfy.model_management.throw_exception_if_processing_interrupted()
        progress.start_pass(index)
        group = timesteps[start:start + per_pass]
        row_sigmas = torch.cat([timestep_sigma(sampling, t).reshape(1).expand(latent.shape[0]) for t in group])
        sigmas = torch.stack([row_sigmas.max(), torch.zeros(())])
        store.stacked_timesteps, store.first_timestep = len(group), start
        try:
            # cfg 1: the cond branch alone, as iSeg and GoCA run it; DiffSegmenter's
            # [uncond, cond] batch gives the same cond maps.
            comfy.sample.sample_custom(patched, noise.repeat(len(group), 1, 1, 1), 1.0, OneForwardPass(row_sigmas),
                                       sigmas, positive, positive, latent.repeat(len(group), 1, 1, 1),
                                       disable_pbar=True, seed=seed)
        finally:
            store.stacked_timesteps = 1
        progress.end_pass()
    return store


def segment_image(model, vae, image: torch.Tensor, positive, timesteps: list[int], seed: int,
                  resolution: int, plan: CapturePlan | None = None, keep_timesteps: bool = False) -> AttentionStore:
    """The segmentation front end: encode ``image``, then :func:`capture_pass`."""
    info = checked_model(model, positive, "conditioning")  # refuse bad input before spending a VAE encode
    plan = plan or CapturePlan()
    plan.check(info, head_counter(info, model))  # a preset's layers and heads are refused before the encode too
    check_memory(model, image, resolution)
    latent = encode_image(vae, image, resolution)
    store = capture_pass(model, latent, positive, timesteps, seed, tuple(image.shape[1:3]), plan, info,
                         keep_timesteps=keep_timesteps)
    store.image_key = image_key(image)
    return store


def image_key(image: torch.Tensor) -> tuple:
    """The input image's fingerprint: its shape and pixel sum (one host read per pass)."""
    return tuple(image.shape), round(float(image.double().sum()), 6)


def capture_sample(model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive,
                   negative, latent: dict, denoise: float, plan: CapturePlan | None):
    """The stock KSampler's run; with a plan, also the attention store it filled."""
    if plan is not None and denoise <= 0:
        raise AttnSegError("denoise: 0 runs no sampling step, so there is nothing to capture. Use a denoise above 0, "
                           "or AttnSeg Capture Image Attention to record an image's attention.")
    if plan is not None and sampler_name in ADAPTIVE_SAMPLERS:
        raise AttnSegError(f"sampler_name: {sampler_name} chooses its own steps, so the capture's step range has "
                           f"nothing to select. Use a fixed-step sampler (euler, dpmpp_2m, ...).")
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    store = None
    sampling_model = model
    if plan is not None or key_scale_of(positive) is not None:
        info = checked_model(model, positive, "positive")
        sampling_model = model.clone()
        if plan is not None:
            height, width = latent_image.shape[-2:]
            store = AttentionStore(info.model_id, latent_image.shape[0], (height, width),
                                   (height * LATENT_TO_PIXELS, width * LATENT_TO_PIXELS), prompt_of(positive))
        install_model_capture(sampling_model, info, store, plan, key_scale_of(positive))
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(sampling_model, steps)
    samples = comfy.sample.sample(sampling_model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                  latent_image, denoise=denoise, noise_mask=latent.get("noise_mask"),
                                  callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out, store
