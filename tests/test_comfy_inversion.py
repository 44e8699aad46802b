"""Inversion through ComfyUI's real sampler on the shipped demo model, loaded
inside inference mode as ComfyUI's loaders run (so null-text's gradients meet
inference-tensor weights): reconstruction of the input image, determinism,
progress and interrupt, clean clones, and the editor's refusals."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_env import REPO, import_pack, recorded_progress

pack = import_pack()
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402

from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402
from attnseg_pack.hosts.comfyui.inversion import install_inversion, invert, sample_from_inversion  # noqa: E402

INVERT = pack.NODE_CLASS_MAPPINGS["AttnSegInvert"]
EDIT_NODE = pack.NODE_CLASS_MAPPINGS["AttnSegPromptToPrompt"]
PROMPT = "a red circle and a blue square"
# Floors from measurements (demo image, 192x128): the VAE round trip 22.0 dB; DDIM at
# cfg 1, 20 steps 19.8 dB, 8 steps 16.3 dB; at 8 steps and cfg 5 DDIM 12.5 dB and
# null-text (10 iterations, none stopped early) 18.6 dB (2 iterations a step do not beat DDIM).
DDIM_BELOW_ROUND_TRIP_DB = 3.0
NULL_TEXT_OVER_DDIM_DB = 3.0


@pytest.fixture(scope="module")
def demo():
    with torch.inference_mode():
        model, clip, vae = demo_model.load()
        image = torch.from_numpy(np.array(Image.open(REPO / "demo" / "attnseg-demo.png").convert("RGB")))
        image = image.float()[None] / 255.0
        latent = {"samples": vae.encode(image)}
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        round_trip = vae.decode(latent["samples"]).clamp(0, 1)
    return model, clip, vae, image, latent, negative, round_trip


def psnr(a, b) -> float:
    return 10 * math.log10(1.0 / float(((a - b) ** 2).mean()))


def reconstruct(demo, method, cfg, steps, iterations=10):
    model, clip, vae, image, latent, negative, _ = demo
    with torch.inference_mode():
        inversion = invert(model, clip, PROMPT, negative, latent, steps, cfg, "normal", method, iterations)
        patched = model.clone()
        install_inversion(patched, inversion)
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        out = sample_from_inversion(patched, inversion, positive, negative, inversion.noise, cfg)
        return inversion, out, vae.decode(out).clamp(0, 1)


def test_ddim_at_cfg_1_reconstructs_the_image_near_the_vae_round_trip(demo):
    image, round_trip = demo[3], demo[6]
    inversion, _, decoded = reconstruct(demo, "DDIM", 1.0, 20)
    assert psnr(decoded, image) > psnr(round_trip, image) - DDIM_BELOW_ROUND_TRIP_DB
    assert inversion.noise.shape == (1, 4, 16, 24) and inversion.null_embeddings is None
    # the inverted latent is noise-like at sigma_max: std near sigma_max, in the LATENT scale
    sigma_max = float(inversion.sigmas[0])
    scale = float(demo[0].model.latent_format.scale_factor)
    assert 0.5 < float(inversion.noise.std()) * scale / sigma_max < 1.5


def test_null_text_at_the_workflow_cfg_beats_ddim_at_that_cfg(demo):
    image = demo[3]
    _, _, ddim = reconstruct(demo, "DDIM", 5.0, 8)
    inversion, _, null_text = reconstruct(demo, "null-text", 5.0, 8, iterations=10)
    assert psnr(null_text, image) > psnr(ddim, image) + NULL_TEXT_OVER_DDIM_DB
    assert inversion.null_embeddings.shape == (8, 77, 64)
    assert len(inversion.iterations_run) == 8 and all(1 <= n <= 10 for n in inversion.iterations_run)
    # each step's embedding moved away from the empty prompt's
    empty = demo[5][0][0][0]
    assert float((inversion.null_embeddings - empty).abs().amax(dim=(1, 2)).min()) > 1e-3


def test_negative_prompt_inversion_samples_the_cfg_1_trajectory_at_any_cfg(demo):
    _, cfg_1, _ = reconstruct(demo, "DDIM", 1.0, 6)
    _, negative_prompt, _ = reconstruct(demo, "negative-prompt", 7.0, 6)
    torch.testing.assert_close(negative_prompt, cfg_1, atol=1e-4, rtol=0)


def run_node(demo, method="null-text", steps=3, iterations=2, **overrides):
    model, clip, _, _, latent, negative, _ = demo
    inputs = dict(source_prompt=PROMPT, steps=steps, cfg=5.0, scheduler="normal", method=method,
                  null_text_iterations=iterations, early_stop_epsilon=1e-5)
    inputs.update(overrides)
    with torch.inference_mode():
        return INVERT().invert(model, clip, negative=negative, latent_image=overrides.pop("latent", latent),
                               **{k: v for k, v in inputs.items() if k != "latent"})


def test_the_node_is_deterministic_and_leaves_the_model_as_it_was(demo):
    model = demo[0]
    options_before = repr(model.model_options)
    ddim_before = run_node(demo, "DDIM")[0]
    first, noise, report = run_node(demo)
    second = run_node(demo)[0]
    assert torch.equal(first.noise, second.noise) and torch.equal(first.null_embeddings, second.null_embeddings)
    assert torch.equal(noise["samples"], first.noise)
    assert "null-text inversion of a 4x16x24 latent, 3 steps (normal), cfg 5" in report
    assert repr(model.model_options) == options_before and not model.weight_wrapper_patches
    # the weights the null-text clone copied at call time are the model's own again
    torch.testing.assert_close(run_node(demo, "DDIM")[0].noise, ddim_before.noise, atol=0, rtol=0)


def test_the_noise_output_redraws_the_image_in_comfyuis_own_custom_sampler(demo):
    """SamplerCustom's path with add_noise off: zero noise, the LATENT as the start."""
    model, clip, vae, image, _, negative, _ = demo
    inversion, noise, _ = run_node(demo, "DDIM", steps=8, cfg=1.0)
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        out = comfy.sample.sample_custom(model, torch.zeros_like(noise["samples"]), 1.0,
                                         comfy.samplers.sampler_object("euler"), inversion.sigmas, positive,
                                         negative, noise["samples"])
        assert psnr(vae.decode(out).clamp(0, 1), image) > 15.0  # measured 16.3 dB at 8 steps


def test_progress_reaches_every_step_and_the_interrupt_stops_it(demo):
    with recorded_progress() as updates:
        run_node(demo, "null-text", steps=3, iterations=2)
    inversion_ticks = [value for value, total in updates if total == 3]
    optimisation = [value for value, total in updates if total == 6]
    assert inversion_ticks == [1, 2, 3] and optimisation[-1] == 6 and optimisation == sorted(optimisation)

    def interrupt_at_the_second_step(value):
        if value == 2:
            comfy.model_management.interrupt_current_processing(True)

    with recorded_progress(interrupt_at_the_second_step) as stopped:
        try:
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                run_node(demo, "DDIM", steps=5)
        finally:
            comfy.model_management.interrupt_current_processing(False)
    assert [value for value, _ in stopped] == [1, 2]


@pytest.mark.parametrize("overrides, message", [
    (dict(iterations=0), "null_text_iterations: 0"),
    (dict(method="EDICT"), "method: 'EDICT' is not one of"),
    (dict(latent={"samples": torch.zeros(1, 4, 16, 16)}), "latent_image: the latent is empty"),
    (dict(latent={"samples": torch.ones(2, 4, 16, 16)}), "latent_image: 2 latents"),
    (dict(source_prompt=" "), "source_prompt: the prompt of the image is needed"),
    (dict(early_stop_epsilon=-1.0), "early_stop_epsilon"),
])
def test_bad_inversion_input_is_named(demo, overrides, message):
    with pytest.raises(AttnSegError, match=message):
        run_node(demo, **overrides)


def edit(demo, inversion, model=None, latent=None, **overrides):
    base_model, clip, _, _, image_latent, negative, _ = demo
    inputs = dict(source_prompt=PROMPT, edit_prompt="a yellow circle and a blue square", seed=0, steps=3, cfg=5.0,
                  sampler_name="euler", scheduler="normal", denoise=1.0, mode="replace", cross_replace=0.8,
                  self_replace=0.4, blend_words="", blend_start=0.2, mask_threshold=0.7, dilate=1, feather=1,
                  reweight_words="", reweight_factor=1.0, keep_outside="input latent", segmenter_weights="0.7,0.3")
    inputs.update(overrides)
    with torch.inference_mode():
        return EDIT_NODE().edit(model or base_model, clip, negative=negative, latent_image=latent or image_latent,
                                inversion=inversion, **inputs)


@pytest.fixture(scope="module")
def small_inversion(demo):
    return run_node(demo, "negative-prompt", steps=3)[0]


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=4), "steps: 4, but the inversion has 3 steps"),
    (dict(cfg=7.5), "cfg: 7.5, but the inversion was made for cfg 5"),
    (dict(scheduler="karras"), "scheduler: 'karras'"),
    (dict(sampler_name="dpmpp_2m"), "sampler_name: 'dpmpp_2m'; an inversion reverses the Euler"),
    (dict(denoise=0.8), "denoise: 0.8; with an inversion"),
    (dict(source_prompt="a red circle"), "source_prompt: the inversion was made with the prompt"),
    (dict(edit_prompt=PROMPT + " and a green star" * 20), "77-token chunks"),
])
def test_an_edit_the_inversion_cannot_reconstruct_is_refused_by_input(demo, small_inversion, overrides, message):
    with pytest.raises(AttnSegError, match=message):
        edit(demo, small_inversion, **overrides)


def test_an_inversion_of_another_model_or_image_size_is_refused(demo, small_inversion):
    with torch.inference_mode():
        other_model = demo_model.load()[0]
    with pytest.raises(AttnSegError, match="inversion: made with another model"):
        edit(demo, small_inversion, model=other_model)
    with pytest.raises(AttnSegError, match="inversion: made from a 4x16x24 latent, but latent_image is 4x16x16"):
        edit(demo, small_inversion, latent={"samples": torch.ones(1, 4, 16, 16)})
