"""The two ways to fill a store on a diffusers pipeline, as the ComfyUI host fills
one: a denoising pass over an input image (VAE encode, the scheduler's noising to
each timestep, one cond-only UNet call with the timesteps stacked in the batch),
and a pipeline call that captures while it generates."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...attnseg import AttentionStore, AttnSegError
from .capture import capture_attention
from ...attnseg.plan import CapturePlan, working_size
from .text import Conditioning
from .unet import DiffusersUNetInfo, check_latent_grid, describe_unet


def parse_timesteps(timesteps, input_name: str = "timesteps") -> list[int]:
    values = list(timesteps)
    if not values or any(not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 999
                         for t in values):
        raise AttnSegError(f"{input_name}: {values} must list one or more timesteps between 0 and 999 (papers: 100).")
    return [int(t) for t in values]


def vae_factor(pipe) -> int:
    return getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def encode_image(pipe, pixels: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> the VAE's scaled latent at the working size (posterior
    mean), resized bilinearly as the ComfyUI host does."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise AttnSegError(f"images: expected (B, 3, H, W) pixels, got shape {tuple(pixels.shape)}.")
    if not isinstance(resolution, int) or resolution < 64:
        raise AttnSegError(f"resolution: {resolution} must be a whole number of pixels, at least 64.")
    size = working_size(*pixels.shape[-2:], resolution)
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(pixels, size=size, mode="bilinear")
    vae = pipe.vae
    # SDXL's autoencoder overflows in fp16: its pipeline runs it in fp32, and so does this.
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        with torch.no_grad():
            mean = vae.encode((pixels * 2 - 1).to(vae.device, dtype)).latent_dist.mean
    finally:
        if upcast:
            vae.to(torch.float16)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean.float() - shift) * vae.config.scaling_factor


def noised(scheduler, latent: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
    """The scheduler's forward process at ``timestep``: sqrt(a) x0 + sqrt(1 - a) eps with
    a its cumulative alpha (what ComfyUI's sigma noising gives after its input scaling)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise AttnSegError(f"pipe: its scheduler {type(scheduler).__name__} has no alphas_cumprod (a flow-matching "
                           f"schedule?); the UNet capture pass noises with a DDPM-family schedule.")
    alpha = alphas[timestep].to(latent.device, torch.float32)
    return alpha.sqrt() * latent.float() + (1 - alpha).sqrt() * noise.float()


def added_conditions(pipe, conditioning: Conditioning, rows: int, pixel_size: tuple[int, int]) -> dict | None:
    """SDXL's added conditioning (pooled text and size ids, original = target = the working
    size, no crop, as its pipeline sets them by default); None for SD1.x/2.x."""
    if conditioning.pooled is None:
        return None
    device, dtype = pipe.unet.device, pipe.unet.dtype
    time_ids = torch.tensor([[*pixel_size, 0, 0, *pixel_size]], device=device, dtype=dtype)
    return {"text_embeds": conditioning.pooled.to(device, dtype).expand(rows, -1),
            "time_ids": time_ids.expand(rows, -1)}


def check_conditioning(info: DiffusersUNetInfo, conditioning: Conditioning, input_name: str = "pipe") -> None:
    dim = conditioning.embeds.shape[-1]
    if dim != info.context_dim:
        raise AttnSegError(f"{input_name}: its text encoder gives {dim}-wide embeddings but the UNet expects "
                           f"{info.context_dim} ({info.model_id}); the pipeline's parts do not belong together.")


def capture_pass(pipe, latent: torch.Tensor, conditioning: Conditioning, timesteps: list[int], seed: int,
                 image_size: tuple[int, int], plan: CapturePlan | None = None, info: DiffusersUNetInfo | None = None,
                 per_pass: int | None = None, keep_timesteps: bool = False) -> AttentionStore:
    """Noise ``latent`` (B, C, h, w) to each timestep (one noise draw for all, as
    ComfyUI's prepare_noise draws it from ``seed``) and run cond-only UNet calls,
    ``per_pass`` timesteps stacked in a batch (None: all), capturing into a new store
    (maps averaged over the timesteps; with ``keep_timesteps`` and several, also one
    store per timestep in ``store.per_timestep``)."""
    info = info or describe_unet(pipe.unet)
    plan = plan or CapturePlan()
    timesteps = parse_timesteps(timesteps)
    check_conditioning(info, conditioning)
    latent_size = tuple(latent.shape[-2:])
    check_latent_grid(latent_size, info, vae_factor(pipe), "images")
    batch = latent.shape[0]
    new_store = lambda: AttentionStore(info.model_id, batch, latent_size, image_size,  # noqa: E731
                                       conditioning.prompt)
    store = new_store()
    if keep_timesteps and len(timesteps) > 1:
        store.per_timestep = [new_store() for _ in timesteps]
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    noise = torch.randn(latent.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    latent, noise = latent.float().to(device), noise.to(device)
    per_pass = per_pass or len(timesteps)
    pixel_size = (latent_size[0] * vae_factor(pipe), latent_size[1] * vae_factor(pipe))
    with capture_attention(unet, store, plan, info, key_scale=conditioning.key_scale), torch.no_grad():
        for start in range(0, len(timesteps), per_pass):
            group = timesteps[start:start + per_pass]
            rows = len(group) * batch
            sample = torch.cat([noised(pipe.scheduler, latent, noise, t) for t in group]).to(dtype)
            steps = torch.tensor(group, device=device).repeat_interleave(batch)
            store.stacked_timesteps, store.first_timestep = len(group), start
            try:
                unet(sample, steps, encoder_hidden_states=conditioning.embeds.to(device, dtype).expand(rows, -1, -1),
                     added_cond_kwargs=added_conditions(pipe, conditioning, rows, pixel_size), return_dict=False)
            finally:
                store.stacked_timesteps = 1
    return store


def pipeline_steps(scheduler):
    """(step, total) of a UNet call inside a pipeline call: the index of its timestep in
    the schedule the pipeline set (a second-order scheduler's repeated timestep counts
    to its first occurrence)."""
    def step_of(timestep) -> tuple[int, int]:
        schedule = scheduler.timesteps
        current = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        matches = (schedule.float() - current).abs() < 1e-3
        step = int(matches.nonzero()[0, 0]) if bool(matches.any()) else 0
        return step, max(1, len(schedule))
    return step_of


def guided_rows(pipe, images: int):
    """The branches of a pipeline call's UNet batch: [uncond, cond] halves when the call
    runs classifier-free guidance (diffusers' order), else all cond."""
    def rows(batch: int) -> list:
        if batch == 2 * images:
            return [("uncond", slice(0, images)), ("cond", slice(images, batch))]
        return [("cond", slice(0, batch))]
    return rows


def capture_sample(pipe, store: AttentionStore, plan: CapturePlan, images: int, info: DiffusersUNetInfo | None = None,
                   **pipeline_kwargs):
    """Run ``pipe(**pipeline_kwargs)`` with ``images`` images per UNet batch half,
    filling ``store`` during the steps ``plan`` names. Returns the pipeline's output."""
    info = info or describe_unet(pipe.unet)
    with capture_attention(pipe.unet, store, plan, info, step_of=pipeline_steps(pipe.scheduler),
                           branch_rows=guided_rows(pipe, images)):
        return pipe(**pipeline_kwargs)
