"""Inverting a diffusion model's deterministic sampler: the noise latent (and,
for null-text inversion, the per-step unconditional embeddings) from which the
sampler draws a given image again.

Everything is in the sigma parameterisation ComfyUI samples in, ``x = x0 +
sigma * eps``, where DDIM's deterministic update is the Euler step of the
probability-flow ODE. Inversion runs that step backwards, from the image at
sigma 0 up the schedule; the noise prediction of a step up to ``sigma_next`` is
taken at ``sigma_next`` from the current latent (the inversion's usual
approximation: the latent at ``sigma_next`` is what is being computed).

Methods:

- DDIM: the inversion run at the cfg the editor samples at. Exact in the limit
  of small steps without guidance; with guidance it drifts.
- negative-prompt (Miyake et al. 2023): the cfg-1 inversion, sampled with the
  source prompt as the negative, so the source row's guidance cancels and it
  follows the cfg-1 trajectory back to the image.
- null-text (Mokady et al., CVPR 2023): the cfg-1 inversion is the pivot; at
  each step the unconditional embedding is optimised (Adam) so that the guided
  step lands on the pivot's next latent, and the optimised embedding is kept
  for that step.

On rectified-flow models (Flux, SD3: ComfyUI's CONST sampling, ``x = (1 - sigma)
x0 + sigma eps``) ``(x - denoised) / sigma`` is the flow's velocity ``v``, so the
same step up the schedule is the flow ODE run backwards with Euler,
``x_next = x + (sigma_next - sigma) * v(x, sigma_next)``: RF inversion (the
first-order inversion RF-Solver and RF-Inversion start from), at the cfg the
editor samples at."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import AttnSegError

RF_INVERSION = "RF inversion (Euler ODE backwards)"
UNET_METHODS = ("null-text", "negative-prompt", "DDIM")
DIT_METHODS = (RF_INVERSION,)
INVERSION_METHODS = UNET_METHODS + DIT_METHODS
# The null-text paper's settings (their notebook's defaults, tuned for 50 DDIM steps):
# Adam at lr 1e-2 decayed by i / 100 over step i, 10 iterations per step, and early
# stop once the step's loss is below 1e-5 + i * 2e-5 (the tolerance grows along the
# schedule, where the latent is less noisy and the step's own error larger).
NULL_TEXT_STEPS = 50
NULL_TEXT_LR = 1e-2
NULL_TEXT_ITERATIONS = 10
NULL_TEXT_EPSILON = 1e-5
NULL_TEXT_TOLERANCE_SLOPE = 2e-5


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One DDIM (Euler) step of the sampler from ``sigma`` to ``sigma_next``,
    ``denoised`` being the model's prediction at ``(x, sigma)``."""
    return x + (sigma_next - sigma) * ((x - denoised) / sigma)


def inversion_step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One step up the schedule, ``sigma`` -> ``sigma_next`` > ``sigma``, with
    ``denoised`` the model's prediction for ``x`` at ``sigma_next``."""
    return x + (sigma_next - sigma) * ((x - denoised) / sigma_next)


def variance_preserving_mse(a: torch.Tensor, b: torch.Tensor, sigma) -> torch.Tensor:
    """MSE of two latents at ``sigma`` on the variance-preserving scale DDIM's
    latents have (``x / sqrt(1 + sigma^2)``), where the paper's tolerances hold."""
    return ((a - b) ** 2).mean() / (1.0 + float(sigma) ** 2)


def paper_step(step: int, steps: int) -> float:
    """Step ``step`` of ``steps`` as a step of the paper's 50-step schedule."""
    return step * NULL_TEXT_STEPS / steps


def null_text_lr(step: int, steps: int) -> float:
    return NULL_TEXT_LR * (1.0 - paper_step(step, steps) / 100.0)


def null_text_tolerance(step: int, steps: int, epsilon: float = NULL_TEXT_EPSILON) -> float:
    """The loss below which step ``step``'s optimisation stops early."""
    return epsilon + paper_step(step, steps) * NULL_TEXT_TOLERANCE_SLOPE


def check_method(method: str, rectified_flow: bool | None = None) -> str:
    """``rectified_flow``: whether the model samples a rectified flow (Flux, SD3;
    None: not known yet); each family has its own methods."""
    if method not in INVERSION_METHODS:
        raise AttnSegError(f"method: '{method}' is not one of {', '.join(INVERSION_METHODS)}.")
    if rectified_flow is True and method not in DIT_METHODS:
        raise AttnSegError(f"method: '{method}' inverts UNet models (eps- or v-prediction); this model samples a "
                           f"rectified flow (Flux, SD3). Choose '{RF_INVERSION}'.")
    if rectified_flow is False and method not in UNET_METHODS:
        raise AttnSegError(f"method: '{method}' is for rectified-flow models (Flux, SD3); this is a UNet model. "
                           f"Choose one of {', '.join(UNET_METHODS)}.")
    return method


def check_iterations(iterations: int, method: str) -> int:
    if method == "null-text" and iterations < 1:
        raise AttnSegError(f"null_text_iterations: {iterations}; null-text inversion optimises the unconditional "
                           f"embedding for at least one iteration per step (the paper: {NULL_TEXT_ITERATIONS}). Use "
                           f"1 or more, or the negative-prompt method, which needs no optimisation.")
    return iterations


def check_epsilon(epsilon: float) -> float:
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise AttnSegError(f"early_stop_epsilon: {epsilon} must be a finite number >= 0 (the paper: 1e-5; 0 runs "
                           f"every iteration).")
    return epsilon


@dataclass(frozen=True)
class Inversion:
    """What an editor needs to resample the inverted image.

    ``noise``: the inverted latent at ``sigmas[0]`` (1, C, h, w), in the LATENT
    socket's scale; ``null_embeddings``: null-text's optimised unconditional
    embedding of each step (steps, T, D), else None. ``model_id`` and
    ``latent_shape`` name what it was made with, so another model or image is refused."""

    method: str
    model_id: str
    latent_shape: tuple[int, ...]
    prompt: str
    sigmas: torch.Tensor  # (steps + 1,), descending to 0
    scheduler: str
    steps: int
    cfg: float
    noise: torch.Tensor
    null_embeddings: torch.Tensor | None = None
    iterations_run: tuple[int, ...] = ()  # null-text: the optimiser iterations each step ran

    @property
    def nbytes(self) -> int:
        embeddings = 0 if self.null_embeddings is None else self.null_embeddings.nbytes
        return self.noise.nbytes + self.sigmas.nbytes + embeddings

    def describe(self) -> str:
        lines = [f"{self.method} inversion of a {'x'.join(map(str, self.latent_shape))} latent, {self.steps} steps "
                 f"({self.scheduler}), cfg {self.cfg:g}, {self.model_id}; prompt: {self.prompt!r}"]
        if self.iterations_run:
            lines.append(f"optimiser iterations per step: {', '.join(map(str, self.iterations_run))}")
        lines.append(f"holds {self.nbytes / 2 ** 20:.2f} MiB")
        return "\n".join(lines)

    def check_edit(self, model_id: str, latent_shape: tuple[int, ...], prompt: str, steps: int, cfg: float,
                   scheduler: str) -> None:
        """Refuse an edit the inversion cannot reconstruct, naming the input to change."""
        if model_id != self.model_id:
            raise AttnSegError(f"inversion: made with another model ({self.model_id}); this model is {model_id}. "
                               f"Invert the image with the model that edits it.")
        if tuple(latent_shape) != tuple(self.latent_shape):
            raise AttnSegError(f"inversion: made from a {'x'.join(map(str, self.latent_shape))} latent, but "
                               f"latent_image is {'x'.join(map(str, latent_shape))}. Invert the image being edited.")
        if prompt.strip() != self.prompt.strip():
            raise AttnSegError(f"source_prompt: the inversion was made with the prompt {self.prompt!r}; the source "
                               f"row reconstructs the image only with that prompt. Use it as the source prompt.")
        if steps != self.steps:
            raise AttnSegError(f"steps: {steps}, but the inversion has {self.steps} steps; sample with the "
                               f"inversion's steps.")
        if scheduler != self.scheduler:
            raise AttnSegError(f"scheduler: '{scheduler}', but the inversion ran on the '{self.scheduler}' "
                               f"schedule; sample with the inversion's scheduler.")
        if not math.isclose(cfg, self.cfg, rel_tol=1e-6, abs_tol=1e-6):
            raise AttnSegError(f"cfg: {cfg:g}, but the inversion was made for cfg {self.cfg:g}; sample at the cfg "
                               f"the inversion was made for.")
