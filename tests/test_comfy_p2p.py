"""Prompt-to-Prompt editing through ComfyUI's real sampler, on the demo model
(whose attention means something) and on a tiny SDXL-layout UNet."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comfy_env import REPO, import_pack
from tiny_models import SDXL_LAYOUT, tiny_clip, tiny_unet

pack = import_pack()
from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402
from attnseg_pack.hosts.comfyui.p2p import EditSettings, pair_prompts  # noqa: E402

from demo.scenes import colour_mask  # noqa: E402

NODE = pack.NODE_CLASS_MAPPINGS["AttnSegPromptToPrompt"]
SOURCE, EDIT = "a red circle and a blue square", "a green circle and a blue square"


@pytest.fixture(scope="module")
def demo():
    return demo_model.load()


def edit(model, clip, latent, source=SOURCE, target=EDIT, steps=20, **overrides):
    # Blend on the object's whole name, which the demo model localises better than either word
    # (seed 5 redraws the circle green: 11 of seeds 0-15 do).
    inputs = dict(seed=5, steps=steps, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0, mode="replace",
                  cross_replace=0.8, self_replace=0.4, blend_words="red circle, green circle", blend_start=0.2, mask_threshold=0.7,
                  dilate=1, feather=0, reweight_words="", reweight_factor=1.0, keep_outside="source sample",
                  segmenter_weights="0.7,0.3")
    inputs.update(overrides)
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    with torch.inference_mode():
        return NODE().edit(model, clip, source, target, negative, latent, **inputs)


def empty(h=16, w=16):
    return {"samples": torch.zeros(1, 4, h, w)}


def outside(pixel_mask: torch.Tensor) -> torch.Tensor:
    """Latent cells the blend mask leaves wholly untouched."""
    return F.max_pool2d(pixel_mask[:, None], 8)[:, 0] == 0


def test_the_aligner_reads_the_real_tokenizer():
    clip = tiny_clip()
    pair = pair_prompts(clip, "a cat on a sofa", "a dog on a sofa", EditSettings())
    assert pair.source_words[:7] == ["", "a", "cat", "on", "a", "sofa", ""]
    torch.testing.assert_close(pair.alignment.mapper, torch.eye(77))  # position by position
    inserted = pair_prompts(clip, "a cat on a sofa", "a fluffy white cat on a sofa", EditSettings(mode="refine"))
    assert inserted.alignment.copied[:5].tolist() == [True, True, False, False, True]
    assert float(inserted.alignment.mapper[2, 4]) == 1.0  # "cat" moved two places right
    assert "white: its own" in "\n".join(inserted.alignment.describe(inserted.source_words, inserted.edit_words))


def test_outside_the_mask_the_edit_is_the_source(demo):
    model, clip, vae = demo
    edited, source, mask, report = edit(model, clip, empty())
    keep = outside(mask)[:, None].expand_as(source["samples"])
    assert 0.02 < float(mask.mean()) < 0.6  # the circle, not the whole image
    torch.testing.assert_close(edited["samples"][keep], source["samples"][keep], atol=1e-4, rtol=0)
    inside = ~keep
    assert float((edited["samples"] - source["samples"])[inside].abs().mean()) > 0.05
    assert "green: red" in report  # the swapped word took the source word's attention
    with torch.inference_mode():
        images = (vae.decode(torch.cat([source["samples"], edited["samples"]])).clamp(0, 1).numpy() * 255)
    images = images.astype(np.uint8)
    # the red circle turned green, and the mask held it
    red = colour_mask(images[0], "red")
    assert red.mean() > 0.05 and colour_mask(images[1], "green").mean() > 0.05
    assert colour_mask(images[1], "red").mean() < red.mean() / 4
    assert (red & (mask[0].numpy() > 0)).sum() / red.sum() > 0.95


def test_reweighting_a_word_changes_the_edit_only_while_attention_is_replaced(demo):
    model, clip, _ = demo
    plain, _, _, _ = edit(model, clip, empty(), blend_words="")
    stronger, _, _, _ = edit(model, clip, empty(), blend_words="", reweight_words="green", reweight_factor=3.0)
    assert float((stronger["samples"] - plain["samples"]).abs().mean()) > 0.01
    unused, _, _, _ = edit(model, clip, empty(), blend_words="", reweight_words="green", reweight_factor=3.0,
                           cross_replace=0.0)
    no_control, _, _, _ = edit(model, clip, empty(), blend_words="", cross_replace=0.0)
    torch.testing.assert_close(unused["samples"], no_control["samples"])


def test_an_empty_mask_returns_the_source(demo):
    model, clip, _ = demo
    edited, source, mask, _ = edit(model, clip, empty(), mask=torch.zeros(1, 128, 128), blend_words="")
    torch.testing.assert_close(edited["samples"], source["samples"], atol=1e-4, rtol=0)
    assert float(mask.max()) == 0.0


def test_editing_an_input_image_keeps_it_outside_the_mask(demo):
    model, clip, vae = demo
    from PIL import Image
    image = torch.from_numpy(np.array(Image.open(REPO / "demo" / "attnseg-demo.png").convert("RGB"))) / 255.0
    with torch.inference_mode():
        latent = {"samples": vae.encode(image[None])}
    edited, _, mask, _ = edit(model, clip, latent, target="a yellow circle and a blue square", denoise=0.8,
                              keep_outside="input latent", blend_words="red circle, yellow circle")
    keep = outside(mask)[:, None].expand_as(latent["samples"])
    assert float(keep.float().mean()) > 0.4
    torch.testing.assert_close(edited["samples"][keep], latent["samples"][keep], atol=1e-4, rtol=0)


def test_sdxl_layout_edits_with_the_users_mask_and_leaves_the_model_alone():
    model, clip = tiny_unet(SDXL_LAYOUT, seed=2), tiny_clip(seed=3)
    mask = torch.zeros(1, 64, 96)
    mask[:, 16:48, 32:64] = 1
    edited, source, used, _ = edit(model, clip, empty(8, 12), "a cat on a sofa", "a dog on a sofa", steps=3,
                                   blend_words="", mask=mask, dilate=0, feather=0)
    keep = outside(used)[:, None].expand_as(source["samples"])
    torch.testing.assert_close(edited["samples"][keep], source["samples"][keep], atol=1e-4, rtol=0)
    assert not torch.allclose(edited["samples"], source["samples"])
    assert not model.model_options.get("transformer_options", {}).get("patches_replace")


@pytest.mark.parametrize("overrides, message", [
    (dict(blend_words="triangle"), "blend_words: triangle is in neither prompt"),
    (dict(cross_replace=1.5), "cross_replace: 1.5 is outside"),
    (dict(blend_start=-0.1), "blend_start: -0.1 is outside"),
    (dict(mask=torch.ones(1, 64, 128)), "mask: 128x64 does not have the latent's aspect ratio"),
    (dict(reweight_words="dog", reweight_factor=2.0), "reweight_words: 'dog' is not in the prompt; reweight_words "
                                                       "must be words of the prompt"),
    (dict(segmenter_weights="0.5,0.3,0.2"), "segmenter_weights: 3 weights for this model's 2 attention resolutions"),
    (dict(keep_outside="input latent"), "keep_outside: 'input latent' .* latent_image is empty"),
    (dict(target="a red circle and a blue square " + "and a green star " * 20), "77-token chunks"),
])
def test_bad_input(demo, overrides, message):
    model, clip, _ = demo
    target = overrides.pop("target", EDIT)
    with pytest.raises(AttnSegError, match=message):
        edit(model, clip, empty(), target=target, steps=2, **overrides)


def test_blend_words_of_only_commas_mean_no_blend_like_an_empty_value(demo):
    model, clip, _ = demo
    commas, _, mask, _ = edit(model, clip, empty(), steps=2, blend_words=" , ,")
    none, _, empty_mask, _ = edit(model, clip, empty(), steps=2, blend_words="")
    assert torch.equal(commas["samples"], none["samples"]) and torch.equal(mask, empty_mask)


def test_one_image_per_edit(demo):
    model, clip, _ = demo
    with pytest.raises(AttnSegError, match="latent_image: 2 latents"):
        edit(model, clip, {"samples": torch.zeros(2, 4, 16, 16)}, steps=2)


def test_editing_from_an_inversion_reconstructs_the_image_and_recolours_the_object(demo):
    """The source row is the inversion's reconstruction; the edit row turns the circle
    yellow; outside the blend mask the edit is the input latent."""
    from PIL import Image

    from attnseg_pack.hosts.comfyui.inversion import invert, sample_from_inversion

    model, clip, vae = demo
    image = torch.from_numpy(np.array(Image.open(REPO / "demo" / "attnseg-demo.png").convert("RGB"))) / 255.0
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    with torch.inference_mode():
        latent = {"samples": vae.encode(image[None])}
        inversion = invert(model, clip, SOURCE, negative, latent, 12, 5.0, "normal", "negative-prompt")
        alone = sample_from_inversion(model.clone(), inversion, clip.encode_from_tokens_scheduled(
            clip.tokenize(SOURCE)), negative, inversion.noise, 5.0)
    target = "a yellow circle and a blue square"
    edited, source, mask, _ = edit(model, clip, latent, target=target, steps=12, keep_outside="input latent",
                                   blend_words="red circle, yellow circle", inversion=inversion)
    # a row of a batch of two rounds apart from a batch of one (measured up to 2e-4 over 12 steps)
    torch.testing.assert_close(source["samples"], alone, atol=1e-3, rtol=0)
    keep = outside(mask)[:, None].expand_as(latent["samples"])
    assert float(keep.float().mean()) > 0.4
    torch.testing.assert_close(edited["samples"][keep], latent["samples"][keep], atol=1e-4, rtol=0)
    with torch.inference_mode():
        pixels = (vae.decode(edited["samples"]).clamp(0, 1)[0].numpy() * 255).astype(np.uint8)
    red = colour_mask((image.numpy() * 255).astype(np.uint8), "red")
    assert colour_mask(pixels, "yellow")[red].mean() > 0.3 and colour_mask(pixels, "red")[red].mean() < 0.25


def tiny_sdxl_with_pooled_vector():
    """A tiny UNet with SDXL's ADM input (pooled text vector + six size embeddings)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    from tiny_models import CONTEXT_DIM, init_weights

    config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_head_channels=16,
                  context_dim=CONTEXT_DIM, use_spatial_transformer=True, legacy=False,
                  num_classes="sequential", adm_in_channels=CONTEXT_DIM + 6 * 256, use_temporal_attention=False,
                  use_temporal_resblock=False,
                  disable_self_attentions=None, **SDXL_LAYOUT)
    model_config = comfy.supported_models.SDXL(config)
    model_config.unet_config = config
    model = model_config.get_model({})
    init_weights(model.diffusion_model, 4)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def test_on_sdxl_the_edit_row_gets_its_own_pooled_vector():
    """Without attention control or blend the edit row is the edit prompt sampled
    alone from the same noise: its ADM vector is the edit prompt's, not the source's."""
    import comfy.sample

    model, clip = tiny_sdxl_with_pooled_vector(), tiny_clip(seed=3)
    source, target = "a cat on a sofa", "a dog on a sofa"
    edited, _, _, _ = edit(model, clip, empty(8, 12), source, target, steps=3, blend_words="", cross_replace=0.0,
                           self_replace=0.0)
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(target))
        assert positive[0][1]["pooled_output"] is not None
        latent = torch.zeros(1, 4, 8, 12)
        alone = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 5), 3, 5.0, "euler", "normal",
                                    positive, negative, latent, seed=5)
    torch.testing.assert_close(edited["samples"], alone, atol=1e-4, rtol=1e-4)
