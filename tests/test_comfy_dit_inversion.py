"""RF inversion through ComfyUI's real sampler on the shipped DiT demo model
(Flux layout, real CFG), loaded inside inference mode as ComfyUI's loaders run:
reconstruction of the input image, determinism and clean clones, progress and
interrupt, and what is refused by name."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_env import REPO, import_pack, recorded_progress

pack = import_pack()
import comfy.model_management  # noqa: E402

from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.attnseg.inversion import RF_INVERSION  # noqa: E402
from attnseg_pack.hosts.comfyui import demo_dit, demo_model  # noqa: E402
from attnseg_pack.hosts.comfyui.inversion import invert, sample_from_inversion  # noqa: E402

INVERT = pack.NODE_CLASS_MAPPINGS["AttnSegInvert"]
PROMPT = "a red circle and a blue square"
# Measured on the demo image (192x128), cfg 1, simple schedule: the VAE round trip
# 22.04 dB; RF inversion then resampling 16.8 dB at 8 steps, 21.1 dB at 20, 24.1 dB
# at 50, 23.2 dB at 100 (the Euler step's error, which shrinks with the step).
RF_50_BELOW_ROUND_TRIP_DB = 1.5
RF_50_OVER_20_DB = 2.0


@pytest.fixture(scope="module")
def demo():
    with torch.inference_mode():
        model, clip, vae = demo_dit.load()
        image = torch.from_numpy(np.array(Image.open(REPO / "demo" / "attnseg-demo.png").convert("RGB")))
        image = image.float()[None] / 255.0
        latent = {"samples": vae.encode(image)}
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        round_trip = vae.decode(latent["samples"]).clamp(0, 1)
    return model, clip, vae, image, latent, negative, round_trip


def psnr(a, b) -> float:
    return 10 * math.log10(1.0 / float(((a - b) ** 2).mean()))


def reconstruct(demo, steps, cfg=1.0):
    model, clip, vae, _, latent, negative, _ = demo
    with torch.inference_mode():
        inversion = invert(model, clip, PROMPT, negative, latent, steps, cfg, "simple", RF_INVERSION)
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        out = sample_from_inversion(model.clone(), inversion, positive, negative, inversion.noise, cfg)
        return inversion, vae.decode(out).clamp(0, 1)


def test_rf_inversion_then_resampling_reconstructs_the_image_near_the_vae_round_trip(demo):
    image, round_trip = demo[3], demo[6]
    inversion, fifty = reconstruct(demo, 50)
    _, twenty = reconstruct(demo, 20)
    assert psnr(fifty, image) > psnr(round_trip, image) - RF_50_BELOW_ROUND_TRIP_DB
    assert psnr(fifty, image) > psnr(twenty, image) + RF_50_OVER_20_DB  # the ODE's step error, not a bias
    assert inversion.method == RF_INVERSION and inversion.null_embeddings is None
    assert inversion.noise.shape == (1, 4, 16, 24) and float(inversion.sigmas[0]) == 1.0
    # the inverted latent is not the image: at sigma 1 the flow has moved it to its noise
    assert float((inversion.noise - demo[4]["samples"]).abs().mean()) > 1.0


def run_node(demo, steps=4, **overrides):
    model, clip, _, _, latent, negative, _ = demo
    inputs = dict(source_prompt=PROMPT, steps=steps, cfg=3.0, scheduler="simple", method=RF_INVERSION,
                  null_text_iterations=10, early_stop_epsilon=1e-5)
    inputs.update(overrides)
    with torch.inference_mode():
        return INVERT().invert(overrides.pop("model", model), clip, negative=negative, latent_image=latent,
                               **{k: v for k, v in inputs.items() if k != "model"})


def test_the_node_is_deterministic_and_leaves_the_model_as_it_was(demo):
    model = demo[0]
    options_before = repr(model.model_options)
    first, noise, report = run_node(demo)
    second = run_node(demo)[0]
    assert torch.equal(first.noise, second.noise) and torch.equal(noise["samples"], first.noise)
    assert f"{RF_INVERSION} inversion of a 4x16x24 latent, 4 steps (simple), cfg 3" in report
    assert repr(model.model_options) == options_before and not model.weight_wrapper_patches


def test_progress_reaches_every_step_and_the_interrupt_stops_it(demo):
    with recorded_progress() as updates:
        run_node(demo, steps=3)
    assert [value for value, total in updates if total == 3] == [1, 2, 3]

    def interrupt_at_the_second_step(value):
        if value == 2:
            comfy.model_management.interrupt_current_processing(True)

    with recorded_progress(interrupt_at_the_second_step) as stopped:
        try:
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                run_node(demo, steps=5)
        finally:
            comfy.model_management.interrupt_current_processing(False)
    assert [value for value, _ in stopped] == [1, 2]


@pytest.mark.parametrize("method", ["null-text", "negative-prompt", "DDIM"])
def test_unet_methods_are_refused_on_a_dit_by_the_method_input(demo, method):
    with pytest.raises(AttnSegError, match=f"method: '{method}' inverts UNet models.*Choose 'RF inversion"):
        run_node(demo, method=method)


def test_rf_inversion_is_refused_on_a_unet_by_the_method_input(demo):
    with torch.inference_mode():
        unet, unet_clip, _ = demo_model.load()
        negative = unet_clip.encode_from_tokens_scheduled(unet_clip.tokenize(""))
        with pytest.raises(AttnSegError, match="method: 'RF inversion .*' is for rectified-flow models"):
            INVERT().invert(unet, unet_clip, PROMPT, negative, {"samples": torch.ones(1, 4, 16, 24)}, 3, 5.0,
                            "normal", RF_INVERSION, 10, 1e-5)


def test_the_editor_refuses_an_inversion_of_another_model_or_size(demo):
    model, clip, _, _, latent, negative, _ = demo
    inversion = run_node(demo, steps=3)[0]
    edit = pack.NODE_CLASS_MAPPINGS["AttnSegPromptToPrompt"]
    inputs = dict(seed=0, steps=3, cfg=3.0, sampler_name="euler", scheduler="simple", denoise=1.0, mode="replace",
                  cross_replace=0.8, self_replace=0.4, blend_words="", blend_start=0.2, mask_threshold=0.5, dilate=1,
                  feather=1, reweight_words="", reweight_factor=1.0, keep_outside="input latent",
                  segmenter_weights="1", inversion=inversion)
    target = "a yellow circle and a blue square"
    with torch.inference_mode():
        other = demo_dit.load()[0]
        with pytest.raises(AttnSegError, match="inversion: made with another model"):
            edit().edit(other, clip, PROMPT, target, negative, latent, **inputs)
        with pytest.raises(AttnSegError, match="inversion: made from a 4x16x24 latent, but latent_image is 4x16x16"):
            edit().edit(model, clip, PROMPT, target, negative, {"samples": torch.ones(1, 4, 16, 16)}, **inputs)
