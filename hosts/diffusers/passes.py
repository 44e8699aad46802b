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
from .dit import DiffusersDiTInfo, capture_dit_attention, describe_transformer, is_dit
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
        raise AttnSegError(f"{input_name}: its text encoder gives {dim}-wide embeddings but the denoiser expects "
                           f"{info.context_dim} ({info.model_id}); the pipeline's parts do not belong together.")


def denoiser(pipe):
    """The pipeline's UNet or DiT transformer."""
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None:
        raise AttnSegError(f"pipe: {type(pipe).__name__} has neither a unet nor a transformer to capture.")
    return model


def describe_model(pipe, input_name: str = "pipe") -> DiffusersUNetInfo | DiffusersDiTInfo:
    model = denoiser(pipe)
    return describe_transformer(model, input_name) if is_dit(model) else describe_unet(model, input_name)


def dit_grid(latent_size: tuple[int, int], info: DiffusersDiTInfo, vae_factor: int, input_name: str) -> tuple[int, int]:
    """The image token grid of a latent; Flux's packing and SD3's patches need even sides."""
    h, w = latent_size
    if h % info.patch_size or w % info.patch_size:
        raise AttnSegError(f"{input_name}: a {w * vae_factor}x{h * vae_factor} image gives a {w}x{h} latent, which "
                           f"{info.model_id} cannot cut into {info.patch_size}x{info.patch_size} patches; use sides "
                           f"that are multiples of {info.patch_size * vae_factor} pixels.")
    return h // info.patch_size, w // info.patch_size


def flow_noised(latent: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
    """A rectified flow's forward process: (1 - sigma) x0 + sigma eps with sigma = t / 1000
    (as ComfyUI noises Flux and SD3, and diffusers' flow schedulers name t)."""
    sigma = timestep / 1000.0
    return (1 - sigma) * latent.float() + sigma * noise.float()


def pack_flux(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): Flux's 2x2 patches as tokens, rows first."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def flux_image_ids(grid: tuple[int, int], device, dtype) -> torch.Tensor:
    """(rows * columns, 3) RoPE positions of Flux's image tokens: (0, row, column)."""
    ids = torch.zeros(*grid, 3)
    ids[..., 1] = torch.arange(grid[0])[:, None]
    ids[..., 2] = torch.arange(grid[1])[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


# Flux-dev's default guidance, as ComfyUI's Flux conditioning and diffusers' FluxPipeline set it.
FLUX_GUIDANCE = 3.5


def _dit_call(pipe, info: DiffusersDiTInfo, sample: torch.Tensor, timesteps: torch.Tensor,
              conditioning: Conditioning, grid: tuple[int, int]) -> None:
    """One transformer call on noised latents (B, C, h, w) at ``timesteps`` (B,) of 1000."""
    transformer = pipe.transformer
    device, dtype = transformer.device, transformer.dtype
    rows = sample.shape[0]
    embeds = conditioning.embeds.to(device, dtype).expand(rows, -1, -1)
    pooled = conditioning.pooled.to(device, dtype).expand(rows, -1)
    if info.family == "sd3":
        transformer(sample.to(dtype), encoder_hidden_states=embeds, pooled_projections=pooled,
                    timestep=timesteps.float(), return_dict=False)  # fp32, as its pipeline passes it
        return
    guidance = (torch.full((rows,), FLUX_GUIDANCE, device=device, dtype=torch.float32)
                if transformer.config.guidance_embeds else None)
    transformer(pack_flux(sample).to(dtype), encoder_hidden_states=embeds, pooled_projections=pooled,
                timestep=(timesteps / 1000).to(dtype), img_ids=flux_image_ids(grid, device, dtype),
                txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype), guidance=guidance,
                return_dict=False)


def capture_pass(pipe, latent: torch.Tensor, conditioning: Conditioning, timesteps: list[int], seed: int,
                 image_size: tuple[int, int], plan: CapturePlan | None = None,
                 info: DiffusersUNetInfo | DiffusersDiTInfo | None = None, per_pass: int | None = None,
                 keep_timesteps: bool = False) -> AttentionStore:
    """Noise ``latent`` (B, C, h, w) to each timestep (one noise draw for all, as
    ComfyUI's prepare_noise draws it from ``seed``; a UNet by its scheduler's schedule,
    a DiT by the flow's) and run cond-only denoiser calls, ``per_pass`` timesteps
    stacked in a batch (None: all), capturing into a new store (maps averaged over the
    timesteps; with ``keep_timesteps`` and several, also one store per timestep in
    ``store.per_timestep``)."""
    info = info or describe_model(pipe)
    dit = isinstance(info, DiffusersDiTInfo)
    plan = plan or CapturePlan()
    timesteps = parse_timesteps(timesteps)
    check_conditioning(info, conditioning)
    latent_size = tuple(latent.shape[-2:])
    if dit:
        grid = dit_grid(latent_size, info, vae_factor(pipe), "images")
        if latent.shape[1] != info.latent_channels:
            raise AttnSegError(f"pipe: {info.model_id} takes {info.latent_channels}-channel latents (its extra "
                               f"input channels: a Fill / Depth / Canny variant?) but the VAE gives "
                               f"{latent.shape[1]}; the capture pass runs text-to-image DiTs.")
    else:
        check_latent_grid(latent_size, info, vae_factor(pipe), "images")
    batch = latent.shape[0]
    new_store = lambda: AttentionStore(info.model_id, batch, latent_size, image_size,  # noqa: E731
                                       conditioning.prompt)
    store = new_store()
    if keep_timesteps and len(timesteps) > 1:
        store.per_timestep = [new_store() for _ in timesteps]
    model = denoiser(pipe)
    device, dtype = model.device, model.dtype
    noise = torch.randn(latent.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    latent, noise = latent.float().to(device), noise.to(device)
    per_pass = per_pass or len(timesteps)
    pixel_size = (latent_size[0] * vae_factor(pipe), latent_size[1] * vae_factor(pipe))
    capture = (capture_dit_attention(model, store, plan, grid, info, key_scale=conditioning.key_scale) if dit else
               capture_attention(model, store, plan, info, key_scale=conditioning.key_scale))
    with capture, torch.no_grad():
        for start in range(0, len(timesteps), per_pass):
            group = timesteps[start:start + per_pass]
            rows = len(group) * batch
            steps = torch.tensor(group, device=device).repeat_interleave(batch)
            store.stacked_timesteps, store.first_timestep = len(group), start
            try:
                if dit:
                    sample = torch.cat([flow_noised(latent, noise, t) for t in group])
                    _dit_call(pipe, info, sample, steps.float(), conditioning, grid)
                    continue
                sample = torch.cat([noised(pipe.scheduler, latent, noise, t) for t in group]).to(dtype)
                model(sample, steps, encoder_hidden_states=conditioning.embeds.to(device, dtype).expand(rows, -1, -1),
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
        if batch != images:
            raise AttnSegError(f"pipe: a denoiser call of {batch} rows for {images} images is neither [cond] nor "
                               f"[uncond, cond] (a perturbed-attention pipeline?); capture during a plain SD, "
                               f"SDXL, SD3 or Flux pipeline call.")
        return [("cond", slice(0, batch))]
    return rows


def flux_step_of(pipe, steps):
    """(step, total) of a Flux transformer call. FluxPipeline hands the transformer
    t / 1000 in the model's dtype, which in fp16 / bf16 no longer tells neighbouring
    timesteps apart; the fp32 t it sets as ``_current_timestep`` before the call does."""
    def step_of(timestep) -> tuple[int, int]:
        current = getattr(pipe, "_current_timestep", None)
        return steps(current if current is not None else timestep.float() * 1000)
    return step_of


def flux_true_cfg_rows(true_cfg: bool):
    """The branches of FluxPipeline's transformer calls: with true CFG each step calls the
    prompt's batch, then the negative prompt's; without it every call is the prompt's."""
    calls = {"count": 0}

    def rows(batch: int) -> list:
        calls["count"] += 1
        if true_cfg and calls["count"] % 2 == 0:
            return [("uncond", slice(0, batch))]
        return [("cond", slice(0, batch))]
    return rows


def capture_sample(pipe, store: AttentionStore, plan: CapturePlan, images: int,
                   info: DiffusersUNetInfo | DiffusersDiTInfo | None = None, **pipeline_kwargs):
    """Run ``pipe(**pipeline_kwargs)`` with ``images`` images per denoiser batch half,
    filling ``store`` during the steps ``plan`` names. Returns the pipeline's output."""
    info = info or describe_model(pipe)
    if not isinstance(info, DiffusersDiTInfo):
        with capture_attention(pipe.unet, store, plan, info, step_of=pipeline_steps(pipe.scheduler),
                               branch_rows=guided_rows(pipe, images)):
            return pipe(**pipeline_kwargs)
    grid = dit_grid(store.latent_size, info, vae_factor(pipe), "height / width")
    steps = pipeline_steps(pipe.scheduler)
    if info.family == "flux":
        step_of = flux_step_of(pipe, steps)
        # FluxPipeline's own test: true CFG runs when the scale is above 1 and a negative is given ("" counts)
        negative = any(pipeline_kwargs.get(k) is not None for k in ("negative_prompt", "negative_prompt_embeds"))
        branch_rows = flux_true_cfg_rows(pipeline_kwargs.get("true_cfg_scale", 1.0) > 1 and negative)
    else:
        step_of, branch_rows = steps, guided_rows(pipe, images)
    with capture_dit_attention(pipe.transformer, store, plan, grid, info, step_of=step_of, branch_rows=branch_rows):
        return pipe(**pipeline_kwargs)
