"""Prompt-to-Prompt on MM-DiT models through ComfyUI's real sampler: editing an
input image on the DiT demo model (from its RF inversion), the edit row's own
conditioning, and on tiny random Flux and SD3 models the image query / key
injection against a hook-free run, block by block."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfy_env import REPO, import_pack

pack = import_pack()
import comfy.sample  # noqa: E402

from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.attnseg.inversion import RF_INVERSION  # noqa: E402
from attnseg_pack.hosts.comfyui import demo_dit  # noqa: E402
from attnseg_pack.hosts.comfyui.dit import OVERRIDE, install_block_identity, describe_dit  # noqa: E402
from attnseg_pack.hosts.comfyui.dit_edit import ControlSteps, install_mmdit_control, resolve_blocks  # noqa: E402
from attnseg_pack.hosts.comfyui.inversion import invert, sample_from_inversion  # noqa: E402
from demo.scenes import colour_mask  # noqa: E402
from tiny_dit import conditioning, sd3_conditioning, tiny_flux, tiny_sd3  # noqa: E402

NODE = pack.NODE_CLASS_MAPPINGS["AttnSegPromptToPrompt"]
SOURCE, TARGET = "a red circle and a blue square", "a yellow circle and a blue square"
# Measured (30 steps, cfg 3, demo image; threshold 0.7, dilate 1, no feather): the blend
# mask covers 25% of the image and all of the circle; outside it the decoded edit is
# 22.54 dB from the input (the VAE round trip there: 22.02 dB); 97% of the circle's
# pixels turn yellow, none stay red. At threshold 0.5 the mask covers 43%.
STEPS, CFG = 30, 3.0


@pytest.fixture(scope="module")
def demo():
    with torch.inference_mode():
        model, clip, vae = demo_dit.load()
        image = torch.from_numpy(np.array(Image.open(REPO / "demo" / "attnseg-demo.png").convert("RGB")))
        image = image.float()[None] / 255.0
        latent = {"samples": vae.encode(image)}
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        inversion = invert(model, clip, SOURCE, negative, latent, STEPS, CFG, "simple", RF_INVERSION)
    return model, clip, vae, image, latent, negative, inversion


def edit(demo, target=TARGET, inversion=None, **overrides):
    model, clip, _, _, latent, negative, own = demo
    inputs = dict(seed=0, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="simple", denoise=1.0,
                  mode="replace", cross_replace=0.8, self_replace=0.4, blend_words="red circle, yellow circle",
                  blend_start=0.2, mask_threshold=0.5, dilate=1, feather=1, reweight_words="", reweight_factor=1.0,
                  keep_outside="input latent", segmenter_weights="1", inversion=inversion or own)
    inputs.update(overrides)
    with torch.inference_mode():
        return NODE().edit(overrides.pop("model", model), clip, SOURCE, target, negative,
                           overrides.pop("latent", latent), **{k: v for k, v in inputs.items()
                                                               if k not in ("model", "latent")})


def test_editing_from_an_rf_inversion_keeps_the_input_outside_the_mask_and_recolours_the_circle(demo):
    model, clip, vae, image, latent, negative, inversion = demo
    edited, source, mask, report = edit(demo, mask_threshold=0.7, feather=0)
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(SOURCE))
        alone = sample_from_inversion(model.clone(), inversion, positive, negative, inversion.noise, CFG)
    # the source row is the inversion's reconstruction: the control and the blend leave it alone
    torch.testing.assert_close(source["samples"], alone, atol=1e-4, rtol=0)
    keep = F.max_pool2d(mask[:, None], 8)[:, 0] == 0
    assert 0.3 < float(keep.float().mean()) < 0.9, float(keep.float().mean())
    torch.testing.assert_close(edited["samples"][keep[:, None].expand_as(latent["samples"])],
                               latent["samples"][keep[:, None].expand_as(latent["samples"])], atol=1e-4, rtol=0)
    with torch.inference_mode():
        pixels = vae.decode(edited["samples"]).clamp(0, 1)
    red = colour_mask((image[0].numpy() * 255).astype(np.uint8), "red")
    drawn = (pixels[0].numpy() * 255).astype(np.uint8)
    assert colour_mask(drawn, "yellow")[red].mean() > 0.6 and colour_mask(drawn, "red")[red].mean() < 0.1
    assert ((mask[0].numpy() > 0) & red).sum() / red.sum() > 0.95
    assert "blocks 0, 1 of DemoFluxConfig" in report and "blend maps: image-to-text attention of blocks 0, 1, 2" \
        in report


def test_without_control_or_blend_the_edit_row_is_the_edit_prompt_sampled_alone(demo):
    """Its own T5 context and its own pooled CLIP vector: the rows are separate."""
    model, clip, _, _, _, negative, inversion = demo
    edited, source, _, _ = edit(demo, qk_replace=0.0, blend_words="", keep_outside="source sample")
    with torch.inference_mode():
        own = clip.encode_from_tokens_scheduled(clip.tokenize(TARGET))
        assert not torch.equal(own[0][1]["pooled_output"], clip.encode_from_tokens_scheduled(
            clip.tokenize(SOURCE))[0][1]["pooled_output"])
        alone = sample_from_inversion(model.clone(), inversion, own, negative, inversion.noise, CFG)
    # a batch of two and a batch of one round differently; over 30 steps that grew to 8.6e-4 at most
    torch.testing.assert_close(edited["samples"], alone, atol=3e-3, rtol=0)
    assert float((edited["samples"] - source["samples"]).abs().mean()) > 0.05
    # with the control on, the edit row differs from the edit prompt alone
    controlled = edit(demo, qk_replace=0.5, blend_words="", keep_outside="source sample")[0]
    assert float((controlled["samples"] - alone).abs().mean()) > 1e-3


def probe(records: list, previous=None):
    """An attention override recording each call's block, q, k, v and output."""

    def override(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
        records.append(((options.get("block_type"), options.get("block_index")),
                        *(t.detach().clone() for t in args[:3]), out.detach().clone(), kwargs.get("skip_reshape")))
        return out

    return override


def traced_run(model, positive, latent, chosen=None, text=5):
    """One Euler step at cfg 1 of a batch [source, edit] with different noise per row;
    (the calls as the kernel got them, as they arrived before the control)."""
    patched = model.clone()
    info = describe_dit(patched)
    if info.family == "sd3":
        install_block_identity(patched, info, info.blocks())
    options = patched.model_options.setdefault("transformer_options", {})
    inner, outer = [], []
    options[OVERRIDE] = probe(inner)
    if chosen is not None:
        install_mmdit_control(patched, info, chosen, 1.0, positive[0][0], positive[0][1]["pooled_output"],
                              ControlSteps())
    options[OVERRIDE] = probe(outer, options[OVERRIDE])
    noise = comfy.sample.prepare_noise(latent, 7)
    with torch.inference_mode():
        comfy.sample.sample(patched, noise, 1, 1.0, "euler", "simple", positive, positive, latent, seed=7)
    return inner, outer


def split(tensor, skip_reshape, txt):
    """(text, image) along the sequence."""
    dim = 2 if skip_reshape else 1
    return tensor.narrow(dim, 0, txt), tensor.narrow(dim, txt, tensor.shape[dim] - txt)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_control_replaces_exactly_the_chosen_blocks_image_queries_and_keys(family):
    model = tiny_flux(seed=1) if family == "flux" else tiny_sd3(seed=1)
    positive = conditioning(tokens=5) if family == "flux" else sd3_conditioning(tokens=5)
    latent = torch.zeros(2, 16, 8, 12)
    info = describe_dit(model)
    chosen = resolve_blocks(info, "custom", "1, 2")
    free_inner, free_outer = traced_run(model, positive, latent)
    inner, outer = traced_run(model, positive, latent, chosen)
    assert [call[0] for call in inner] == [call[0] for call in free_inner] == info.blocks()
    first_chosen = info.blocks().index(chosen[0])
    for index, ((block, q, k, v, out, skip), (_, q0, k0, v0, out0, _), (_, fq, fk, fv, fout, _)) in enumerate(
            zip(inner, outer, free_inner)):
        if index <= first_chosen:  # up to the first chosen block, the same input as without the hook
            for got, free in ((q0, fq), (k0, fk), (v0, fv)):
                torch.testing.assert_close(got, free, atol=1e-6, rtol=0)
        if index < first_chosen:  # and the same output
            torch.testing.assert_close(out, fout, atol=1e-6, rtol=0)
        torch.testing.assert_close(v, v0, atol=0, rtol=0)  # values are never touched
        if block not in chosen:
            torch.testing.assert_close(q, q0, atol=0, rtol=0)
            torch.testing.assert_close(k, k0, atol=0, rtol=0)
            continue
        for got, before in ((q, q0), (k, k0)):
            text, image = split(got, skip, 5)
            text_before, image_before = split(before, skip, 5)
            torch.testing.assert_close(text, text_before, atol=0, rtol=0)  # each row's own text q / k
            torch.testing.assert_close(image[1], image_before[0], atol=0, rtol=0)  # edit's image = source's
            torch.testing.assert_close(image[0], image_before[0], atol=0, rtol=0)
            assert float((image_before[1] - image_before[0]).abs().max()) > 1e-3  # the rows did differ
    # the output of the first chosen block is what changed (the edit row only)
    out, fout = inner[first_chosen][4], free_inner[first_chosen][4]
    assert float((out - fout).abs().max()) > 1e-4
    torch.testing.assert_close(out[0], fout[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("overrides, message", [
    (dict(blocks="custom", custom_blocks="0, 9"), "custom_blocks: block 9 is not in DemoFluxConfig"),
    (dict(blocks="custom", custom_blocks="two"), "custom_blocks: 'two' is not a block number"),
    (dict(blocks="custom", custom_blocks=""), "custom_blocks: no block numbers"),
    (dict(blocks="Flux top 5 (18, 17, 12, 14, 11)"), "blocks: block 18, 17, 12, 14, 11 is not in"),
    (dict(blocks="SD3-medium top 5 (7, 8, 5, 4, 9)"), "blocks: 'SD3-medium top 5 .*' is made for SD3"),
    (dict(blocks="every block"), "blocks: 'every block' is not one of"),
    (dict(reweight_words="yellow", reweight_factor=2.0), "reweight_words: attention re-weighting"),
    (dict(segmenter_weights="0.7,0.3"), "segmenter_weights: 2 weights"),
    (dict(target=TARGET + " and a green star" * 6), "edit_prompt: encodes to"),
    (dict(qk_replace=1.5), "qk_replace: 1.5 is outside"),
])
def test_bad_input_is_named(demo, overrides, message):
    with pytest.raises(AttnSegError, match=message):
        edit(demo, **overrides)
