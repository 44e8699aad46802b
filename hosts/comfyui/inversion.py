"""Inverting an image through ComfyUI's own sampling: the model's sigmas for the
chosen scheduler, ComfyUI's conditioning and CFG (a CFGGuider), the inversion
as the sampler function of a KSAMPLER. Everything runs on a clone.

Null-text inversion optimises the unconditional embedding through the UNet, so
it needs gradients: ComfyUI loads checkpoints inside ``torch.inference_mode``,
and weights made there cannot be saved for backward. On such a model the clone
gets identity weight wrappers, which make ComfyUI's layers cast (copy) their
weights at each call, outside inference mode while the optimisation runs.

Rectified-flow models (Flux, SD3) get RF inversion, the same Euler step up the
schedule. Their noise scaling mixes the start, ``sigma * noise + (1 - sigma) *
latent``, which keeps nothing of the latent at sigma 1: there a run that must
start at a given latent gets it as both the noise and the latent image."""

from __future__ import annotations

import functools

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ...attnseg import AttnSegError
from ...attnseg.inversion import (Inversion, check_epsilon, check_iterations, check_method, euler_step,
                                  inversion_step, null_text_lr, null_text_tolerance, variance_preserving_mse)
from ...attnseg.inversion import RF_INVERSION
from ...attnseg.progress import tick
from .capture import step_index
from .dit import check_dit_conditioning, describe_dit, dit_family
from .unet import check_conditioning, describe_unet

INVERSION_SAMPLERS = ("euler", "ddim")  # ComfyUI's "ddim" is the Euler step (DDIM in the sigma parameterisation)


def model_identity(model, input_name: str = "model") -> str:
    """The model's family and shape, the loaded checkpoint and its weight patches
    (a LoRA makes another model): what an inversion is valid for."""
    info = describe_dit(model, input_name) if dit_family(model) is not None else describe_unet(model, input_name)
    return f"{info.model_id}, checkpoint #{id(model.model):x}, weight patches {str(model.patches_uuid)[:8]}"


class _SplitGuider(comfy.samplers.CFGGuider):
    """ComfyUI's CFG guider with the cond and the uncond prediction to hand on
    their own (null-text's optimisation only needs the unconditional one again)."""

    def prediction(self, x, sigma, model_options, which: str) -> torch.Tensor:
        # calc_cond_batch marks list slot 0 as cond and slot 1 as uncond (the
        # cond_or_uncond the model wrappers see).
        slot = 0 if which == "positive" else 1
        conds = [None, None]
        conds[slot] = self.conds.get(which)
        return comfy.samplers.calc_cond_batch(self.inner_model, conds, x, sigma, model_options)[slot]

    def guided(self, cond_pred, uncond_pred, x, sigma, model_options) -> torch.Tensor:
        return comfy.samplers.cfg_function(self.inner_model, cond_pred, uncond_pred, self.cfg, x, sigma,
                                           model_options=model_options, cond=self.conds.get("positive"),
                                           uncond=self.conds.get("negative"))


def rectified_flow(model) -> bool:
    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def start_at(model, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, latent image) that make ComfyUI's sampler start at ``latent``
    itself (LATENT scale), whatever sigmas[0] is: zero noise where the noise
    scaling adds to the latent (eps, v); on a rectified flow the latent as both,
    the noise in the model's scale (the sampler scales only the latent image in)."""
    if rectified_flow(model):
        return model.model.process_latent_in(latent), latent
    return torch.zeros_like(latent), latent


def _run(model, positive, negative, cfg: float, latent: torch.Tensor, sigmas: torch.Tensor, sampler_function,
         seed: int):
    """Run ``sampler_function(guider, model_k, x, sigmas, extra_args)`` through
    ComfyUI's sampling from ``latent`` (no noise added); returns its result in
    the LATENT scale."""
    guider = _SplitGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)

    def sample(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        return sampler_function(guider, model_k, x, sigmas, extra_args)

    sampler = comfy.samplers.KSAMPLER(sample)
    noise, latent_image = start_at(model, latent)
    return guider.sample(noise, latent_image, sampler, sigmas, disable_pbar=True, seed=seed)


def _ddim_inversion(trajectory: list, guider, model_k, x, sigmas, extra_args):
    """x at sigma 0 -> the latent at sigmas[0]; every latent on the way is
    appended to ``trajectory`` (sigma 0 first)."""
    steps = len(sigmas) - 1
    s_in = x.new_ones([x.shape[0]])
    trajectory.append(x)
    for done, i in enumerate(range(steps - 1, -1, -1), 1):
        denoised = model_k(x, sigmas[i] * s_in, **extra_args)
        x = inversion_step(x, denoised, sigmas[i + 1], sigmas[i])
        trajectory.append(x)
        tick("inversion", done, steps)
    return x


class _NullText:
    """The unconditional embedding the UNet's uncond rows get, set per step."""

    def __init__(self):
        self.embedding: torch.Tensor | None = None


def install_null_text(model, embedding_for) -> None:
    """Patch ``model`` (a clone) so the uncond rows of a UNet call use
    ``embedding_for(args)`` (1, T, D) as their text context (None: unchanged)."""
    previous = model.model_options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        embedding = embedding_for(args)
        kinds = args.get("cond_or_uncond") or []
        if embedding is not None and 1 in kinds:
            c = args["c"]
            context = c["c_crossattn"]
            per_chunk = context.shape[0] // len(kinds)
            tokens = embedding.shape[1]
            if context.shape[1] % tokens:
                raise AttnSegError(f"negative: the text context of this call has {context.shape[1]} tokens, not a "
                                   f"multiple of the inversion's {tokens}-token unconditional embedding. Use the "
                                   f"negative the image was inverted with.")
            own = embedding.to(context).repeat(1, context.shape[1] // tokens, 1).expand(per_chunk, -1, -1)
            parts = [own if kind == 1 else context[k * per_chunk:(k + 1) * per_chunk] for k, kind in enumerate(kinds)]
            args = {**args, "c": {**c, "c_crossattn": torch.cat(parts)}}
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)


def _identity(tensor):
    return tensor


def _allow_gradients(model) -> None:
    """Give ``model`` (a clone) copied weights at call time when its own are
    inference tensors (see the module docstring)."""
    if not any(p.is_inference() for p in model.model.diffusion_model.parameters()):
        return
    for name, module in model.model.named_modules():
        if not name.startswith("diffusion_model") or not hasattr(module, "weight_function"):
            continue
        for kind in ("weight", "bias"):
            if getattr(module, kind, None) is not None:
                model.add_weight_wrapper(f"{name}.{kind}", _identity)


def _null_text_optimisation(pivot: list, iterations: int, epsilon: float, state: _NullText, embeddings: list,
                            ran: list, guider, model_k, x, sigmas, extra_args):
    """Sample down from the pivot's noise; at each step optimise the
    unconditional embedding so the guided step lands on the pivot's latent."""
    steps = len(sigmas) - 1
    options = extra_args["model_options"]
    s_in = x.new_ones([x.shape[0]])
    embedding = state.embedding
    with torch.inference_mode(False), torch.enable_grad():
        x, sigmas = x.clone(), sigmas.clone()  # normal tensors: autograd may save them
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            sigma_in = sigma * s_in
            target = pivot[steps - i - 1].clone()
            with torch.no_grad():
                cond_pred = guider.prediction(x, sigma_in, options, "positive")
            embedding = embedding.detach().clone().requires_grad_(True)
            state.embedding = embedding
            optimiser = torch.optim.Adam([embedding], lr=null_text_lr(i, steps))
            tolerance = null_text_tolerance(i, steps, epsilon)
            for j in range(iterations):
                uncond_pred = guider.prediction(x, sigma_in, options, "negative")
                denoised = guider.guided(cond_pred, uncond_pred, x, sigma_in, options)
                loss = variance_preserving_mse(euler_step(x, denoised, sigma, sigma_next), target, sigma_next)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                tick("null-text optimisation", i * iterations + j + 1, steps * iterations)
                # One read per iteration: the paper's early stop needs the loss's value.
                if loss.item() < tolerance:
                    break
            ran.append(j + 1)
            embedding = embedding.detach()
            state.embedding = embedding
            embeddings.append(embedding[0])
            with torch.no_grad():
                uncond_pred = guider.prediction(x, sigma_in, options, "negative")
                x = euler_step(x, guider.guided(cond_pred, uncond_pred, x, sigma_in, options), sigma, sigma_next)
            tick("null-text optimisation", (i + 1) * iterations, steps * iterations)
    return pivot[-1]


def schedule(model, scheduler: str, steps: int) -> torch.Tensor:
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise AttnSegError(f"scheduler: '{scheduler}' is not one of {', '.join(comfy.samplers.SCHEDULER_NAMES)}.")
    if steps < 1:
        raise AttnSegError(f"steps: {steps}; invert with at least one step.")
    sampling = model.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(sampling, scheduler, steps).cpu()


def check_prediction(model, method: str, input_name: str = "model") -> None:
    """Refuse a method of the other family (naming ``method``), and a UNet that
    samples a rectified flow (RF inversion here hooks Flux's and SD3's layouts)."""
    flow = rectified_flow(model)
    if dit_family(model) is None and flow:
        raise AttnSegError(f"{input_name}: this UNet samples a rectified flow; inversion here covers eps- and "
                           f"v-prediction UNets (SD1.x, SD2.x, SDXL) and the rectified-flow DiTs Flux and SD3.")
    check_method(method, flow)


def invert(model, clip, prompt: str, negative, latent: dict, steps: int, cfg: float, scheduler: str, method: str,
           iterations: int = 10, epsilon: float = 1e-5) -> Inversion:
    """Invert one latent image (a VAE-encoded IMAGE) with the source prompt."""
    check_method(method)
    check_iterations(iterations, method)
    check_epsilon(epsilon)
    if not prompt.strip():
        raise AttnSegError("source_prompt: the prompt of the image is needed (the inversion follows its "
                           "trajectory).")
    samples = latent["samples"]
    if samples.shape[0] != 1:
        raise AttnSegError(f"latent_image: {samples.shape[0]} latents; invert one image per run.")
    if not bool(samples.any()):
        raise AttnSegError("latent_image: the latent is empty (an Empty Latent Image); VAE-encode the image to "
                           "invert.")
    check_prediction(model, method)
    identity = model_identity(model)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    if dit_family(model) is not None:
        info = describe_dit(model)
        check_dit_conditioning(info, positive, "clip")
        check_dit_conditioning(info, negative, "negative")
    else:
        info = describe_unet(model)
        check_conditioning(info, positive, "clip")
        check_conditioning(info, negative, "negative")
    if method == "null-text" and len(negative) != 1:
        raise AttnSegError(f"negative: {len(negative)} conditioning entries; null-text inversion optimises one "
                           f"unconditional embedding. Give one text encoding (e.g. of an empty prompt).")
    sigmas = schedule(model, scheduler, steps)
    latent_image = comfy.sample.fix_empty_latent_channels(model, samples)
    seed = 0  # nothing is drawn: the inversion is deterministic

    pivot: list = []
    # DDIM and RF inversion invert at the cfg they will be sampled at; the other two follow the cfg-1 trajectory.
    inversion_cfg = cfg if method in ("DDIM", RF_INVERSION) else 1.0
    patched = model.clone()
    noise = _run(patched, positive, negative, inversion_cfg, latent_image, sigmas,
                 functools.partial(_ddim_inversion, pivot), seed)
    embeddings, ran = [], []
    if method == "null-text":
        state = _NullText()
        state.embedding = negative[0][0][:1]
        optimised = model.clone()
        install_null_text(optimised, lambda args: state.embedding)
        _allow_gradients(optimised)
        _run(optimised, positive, negative, cfg, noise, sigmas,
             functools.partial(_null_text_optimisation, pivot, iterations, epsilon, state, embeddings, ran), seed)
    store = comfy.model_management.intermediate_device()
    return Inversion(method=method, model_id=identity, latent_shape=tuple(latent_image.shape[1:]), prompt=prompt,
                     sigmas=sigmas, scheduler=scheduler, steps=steps, cfg=float(cfg),
                     noise=noise.to(store),
                     null_embeddings=torch.stack(embeddings).to(store) if embeddings else None,
                     iterations_run=tuple(ran))


def install_inversion(model, inversion: Inversion) -> None:
    """Patch ``model`` (a clone) for sampling from ``inversion``: null-text's
    embedding of each step in the uncond rows of that step's calls."""
    if inversion.null_embeddings is None:
        return
    on_device = {}

    def embedding_for(args):
        options = args["c"].get("transformer_options", {})
        step, _ = step_index(options.get("sample_sigmas"), args["timestep"])
        device = args["input"].device
        if device not in on_device:
            on_device[device] = inversion.null_embeddings.to(device)
        return on_device[device][step:step + 1]

    install_null_text(model, embedding_for)


def sample_from_inversion(model, inversion: Inversion, positive, negative, latent: torch.Tensor, cfg: float,
                          callback=None, seed: int = 0) -> torch.Tensor:
    """Euler (DDIM) sampling of ``latent`` (rows of the inversion's noise) on
    the inversion's sigmas, no noise added. ``model`` is a clone with the
    inversion installed."""
    if inversion.method == "negative-prompt":
        negative = positive  # Miyake et al.: the source prompt stands in for the null text
    sampler = comfy.samplers.sampler_object("euler")
    noise, latent_image = start_at(model, latent)
    return comfy.sample.sample_custom(model, noise, cfg, sampler, inversion.sigmas, positive, negative, latent_image,
                                      callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
