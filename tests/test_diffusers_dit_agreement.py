"""Cross-host agreement on a DiT: the shipped DiT demo model in ComfyUI
(hosts/comfyui/demo_dit.py, ComfyUI's own Flux classes) and the same weights as a
diffusers FluxPipeline converted with diffusers' Flux conversion code
(tests/diffusers_dit_demo.py) give the same attention store on the same image,
timestep and noise seed, block by block (double and single blocks, I2T and I2I,
GoCA's stored attention output, Cat-Cross on the keys), the same masks from the
presets' methods, and the same generation and capture from a sampling run.

The model is trained, so the agreement is about maps that mean something: a block
index off by one, the text and image split at the wrong offset or the image grid
read in the wrong order gives other maps here (test_the_tolerance_tells_...)."""

import dataclasses

import pytest
import torch

from comfy_env import import_pack

pack = import_pack()
import diffusers_dit_demo  # noqa: E402
from host_agreement import (MAP_TOLERANCE, assert_same_masks, assert_same_store, scene_classes,  # noqa: E402
                            scene_image)
from attnseg_pack.attnseg import AttentionStore  # noqa: E402
from attnseg_pack.attnseg.layers import LayerPick  # noqa: E402
from attnseg_pack.attnseg.plan import CapturePlan, StepRange  # noqa: E402
from attnseg_pack.attnseg.presets import (PRESETS, CaptureSetup, DiffSegmenterSettings, ISegSettings, Preset,  # noqa: E402
                                          Source, TextSetup)
from attnseg_pack.hosts.comfyui import demo_dit  # noqa: E402
from attnseg_pack.hosts.comfyui import passes as comfy_passes  # noqa: E402
from attnseg_pack.hosts.comfyui import presets as comfy_presets  # noqa: E402
from attnseg_pack.hosts.comfyui.models import checked_model  # noqa: E402
from attnseg_pack.hosts.comfyui.text import encode_segmentation_prompt  # noqa: E402
from attnseg_pack.hosts.diffusers import api  # noqa: E402
from attnseg_pack.hosts.diffusers import passes as diffusers_passes  # noqa: E402
from attnseg_pack.hosts.diffusers import text as diffusers_text  # noqa: E402
from attnseg_pack.hosts.diffusers.dit import describe_transformer  # noqa: E402
from demo import evaluate  # noqa: E402

RESOLUTION = 384  # the flux-demo workflows' working size (twice the scene's)
THRESHOLD = 0.5  # the flux-demo-segment-image workflow's
# The flux-demo-segment-image workflow's settings as a preset: I2T of every block and I2I
# self-completion over every block at t = 100.
DEMO = Preset("DiffSegmenter (DiT demo, the workflow's settings)", "diffsegmenter",
              Source("this repository", "workflows/flux-demo-segment-image.json", "none"),
              DiffSegmenterSettings(weights=(1.0,), self_completion=True), TextSetup("diffsegmenter", fuse_ing=False),
              CaptureSetup(timesteps=(100,), resolution=RESOLUTION, self_every_layer=True), threshold=THRESHOLD,
              family="flux")


@pytest.fixture(scope="module")
def comfy():
    return demo_dit.load(dtype=torch.float32)


@pytest.fixture(scope="module")
def pipe():
    return diffusers_dit_demo.flux_pipeline()


@pytest.fixture(scope="module")
def item():
    return evaluate.scene(1)  # 128 x 192: not square, two objects


def both_stores(comfy, pipe, item, chosen: Preset, seed: int = 0):
    """(diffusers' stores, ComfyUI's stores) of the preset's pass over the scene."""
    setup, image, names = chosen.capture, scene_image(item), scene_classes(item)
    plan = CapturePlan.from_setup(setup, chosen.name)
    model, clip, vae = comfy
    conditionings = comfy_presets.encode(clip, chosen.text, "", names)
    info = checked_model(model, conditionings[0], "clip")
    latent = comfy_passes.encode_image(vae, image, setup.resolution)
    theirs = [comfy_passes.capture_pass(model, latent, c, list(setup.timesteps), seed, tuple(image.shape[1:3]), plan,
                                        info) for c in conditionings]
    latent = diffusers_passes.encode_image(pipe, image.movedim(-1, 1), setup.resolution)
    ours = [diffusers_passes.capture_pass(pipe, latent, c, list(setup.timesteps), seed, tuple(image.shape[1:3]), plan,
                                          describe_transformer(pipe.transformer))
            for c in diffusers_text.encode_for_preset(pipe, chosen.text, "", names)]
    return ours, theirs


def test_the_layout_names_the_blocks_as_the_comfyui_host(comfy, pipe):
    from attnseg_pack.hosts.comfyui.dit import describe_dit
    ours, theirs = describe_transformer(pipe.transformer), describe_dit(comfy[0])
    assert [(la.block, la.block_id, la.factor) for la in ours.layers] == \
        [(la.block, la.block_id, la.factor) for la in theirs.layers] == \
        [("double", 0, 2), ("double", 1, 2)] + [("single", i, 2) for i in range(4)]
    assert (ours.family, ours.heads, ours.patch_size, ours.context_dim, ours.latent_channels) == \
        (theirs.family, theirs.heads, theirs.patch_size, theirs.context_dim, theirs.latent_channels)


def test_the_class_tokens_are_found_at_the_same_t5_positions(comfy, pipe, item):
    text = item.caption
    names = scene_classes(item)
    _, meta = encode_segmentation_prompt(comfy[1], text, ", ".join(names))
    ours = diffusers_text.encode_segmentation_prompt(pipe, text, names)
    assert ours.prompt.classes == meta.classes and ours.prompt.token_count == meta.token_count == 32
    theirs = encode_segmentation_prompt(comfy[1], text, ", ".join(names))[0][0]
    assert torch.allclose(ours.embeds, theirs[0], atol=1e-5)
    assert torch.allclose(ours.pooled, theirs[1]["pooled_output"], atol=1e-5)


def test_every_blocks_i2t_and_i2i_agree_and_give_the_same_masks(comfy, pipe, item):
    (ours,), (theirs,) = both_stores(comfy, pipe, item, DEMO)
    kinds = {(key.kind, key.block) for key, _ in ours.entries}
    assert kinds == {("cross", "double"), ("cross", "single"), ("self", "double"), ("self", "single")}
    assert_same_store(ours, theirs)
    assert_same_masks(api.run_method(ours, DEMO), comfy_presets.run_method(theirs, DEMO), THRESHOLD)


def test_goca_with_its_reference_output_agrees(comfy, pipe, item):
    """GoCA's Flux configuration moved onto the demo's blocks: the reference block's
    attention output (stored as queries), propagation blocks, the background class."""
    flux = PRESETS["GoCA Flux (released code)"]
    chosen = dataclasses.replace(
        flux, settings=dataclasses.replace(flux.settings, propagation_layers=(LayerPick.dit("double", 1),)),
        capture=dataclasses.replace(flux.capture, resolution=RESOLUTION, reference=LayerPick.dit("single", 1)))
    (ours,), (theirs,) = both_stores(comfy, pipe, item, chosen)
    assert any(key.kind == "query" for key, _ in ours.entries)
    assert_same_store(ours, theirs)
    assert_same_masks(api.run_method(ours, chosen), comfy_presets.run_method(theirs, chosen), chosen.threshold)


def test_iseg_with_cat_cross_on_the_keys_agrees(comfy, pipe, item):
    """Cat-Cross on the keys scales the class tokens' keys inside every joint attention
    (so the later blocks see it too), on both hosts."""
    chosen = Preset("iSeg on the DiT demo", "iseg", Source("this test", "", ""),
                    ISegSettings(factors=(2,), weights=(1.0,), lam=0.015, iterations=1),
                    TextSetup("iseg", cat_cross_gamma=1.6, cat_cross_mode="keys"),
                    CaptureSetup(timesteps=(100,), resolution=RESOLUTION, self_every_layer=True), threshold=0.45,
                    family="flux")
    (ours,), (theirs,) = both_stores(comfy, pipe, item, chosen)
    assert_same_store(ours, theirs)
    (plain,), _ = both_stores(comfy, pipe, item, dataclasses.replace(
        chosen, text=dataclasses.replace(chosen.text, cat_cross_gamma=1.0)))
    key = next(k for k in ours.entries if k[0].kind == "cross" and k[0].block == "single")
    assert (ours.entries[key].mean() - plain.entries[key].mean()).abs().max() > 10 * MAP_TOLERANCE  # it did scale
    assert_same_masks(api.run_method(ours, chosen), comfy_presets.run_method(theirs, chosen), chosen.threshold)


def test_segment_gives_the_comfyui_segmenters_masks(comfy, pipe, item):
    [result] = api.segment(pipe, scene_image(item).movedim(-1, 1), scene_classes(item), preset=DEMO)
    model, clip, vae = comfy
    scores = comfy_presets.segment_with_preset(model, clip, vae, scene_image(item), ", ".join(scene_classes(item)), DEMO)
    from attnseg_pack.attnseg.masks import make_masks
    labels, _, maps = make_masks(scores, THRESHOLD, DEMO.background)
    assert (result.scores - maps[0]).abs().max() < 1e-3
    assert (result.labels != labels[0]).float().mean() <= 1e-3
    assert len(result.labels.unique()) >= 2


def test_the_tolerance_tells_a_different_noise_apart(comfy, pipe, item):
    (ours,), _ = both_stores(comfy, pipe, item, DEMO, seed=0)
    _, (theirs,) = both_stores(comfy, pipe, item, DEMO, seed=1)
    with pytest.raises(AssertionError, match="maps differ"):
        assert_same_store(ours, theirs)


def test_generate_and_segment_matches_a_comfyui_sampling_run(comfy, pipe, item):
    """FluxPipeline with true CFG against KSampler (euler, simple) on ComfyUI: the same
    noise, sigmas and guidance give the same image, and the capture of the cond branch
    over the same steps the same store."""
    steps, cfg, seed, (height, width) = 8, 3.0, 0, (128, 192)
    plan = CapturePlan(self_every_layer=True, cross_steps=StepRange(2, 5), self_steps=StepRange(2, 5))
    chosen = dataclasses.replace(DEMO, capture=dataclasses.replace(DEMO.capture, resolution=max(height, width)))
    output, [result] = api.generate_and_segment(
        pipe, item.caption, scene_classes(item), preset=chosen, steps=StepRange(2, 5), height=height, width=width,
        num_inference_steps=steps, guidance_scale=1.0, true_cfg_scale=cfg, negative_prompt="",
        generator=torch.Generator().manual_seed(seed), max_sequence_length=32, output_type="latent")
    model, clip, vae = comfy
    positive, _ = encode_segmentation_prompt(clip, item.caption, ", ".join(scene_classes(item)))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    empty = {"samples": torch.zeros(1, 4, height // 8, width // 8)}
    sampled, theirs = comfy_passes.capture_sample(model, seed, steps, cfg, "euler", "simple", positive, negative,
                                                  empty, 1.0, plan)
    ours_latent = pipe._unpack_latents(output.images, height, width, pipe.vae_scale_factor) / 0.18215
    assert torch.allclose(ours_latent, sampled["samples"], atol=2e-3, rtol=1e-3)
    store = AttentionStore("", 1, (height // 8, width // 8), (height, width), theirs.prompt)
    with torch.no_grad():
        diffusers_passes.capture_sample(pipe, store, plan, 1, prompt=item.caption, height=height, width=width,
                                        num_inference_steps=steps, guidance_scale=1.0, true_cfg_scale=cfg,
                                        negative_prompt="", generator=torch.Generator().manual_seed(seed),
                                        max_sequence_length=32, output_type="latent")
    assert store.steps == theirs.steps == {2, 3, 4, 5}
    assert_same_store(store, theirs)
    assert len(result.labels.unique()) >= 2


def test_a_bf16_flux_pipeline_captures_the_steps_asked_for():
    """FluxPipeline hands the transformer t / 1000 in the model's dtype, which in bf16 no
    longer tells the schedule's timesteps apart: the step comes from the pipeline's own
    fp32 timestep, so a step window still captures exactly its steps."""
    pipe = diffusers_dit_demo.flux_pipeline().to(torch.bfloat16)
    plan = CapturePlan(cross_steps=StepRange(2, 4), self_steps=None)
    store = AttentionStore("", 1, (16, 24), (128, 192), None)
    with torch.no_grad():
        diffusers_passes.capture_sample(pipe, store, plan, 1, prompt="a red circle", height=128, width=192,
                                        num_inference_steps=6, guidance_scale=1.0, max_sequence_length=32,
                                        output_type="latent")
    assert store.steps == {2, 3, 4}
    assert all(entry.count == 3 for entry in store.entries.values())


def test_generate_locates_the_classes_at_the_calls_t5_length_and_refuses_a_second_prompt(pipe, item):
    output, [result] = api.generate_and_segment(
        pipe, item.caption, scene_classes(item), preset=DEMO, height=64, width=96, num_inference_steps=2,
        guidance_scale=1.0, max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert result.labels.shape == (64, 96)
    with pytest.raises(Exception, match="prompt_2: the classes are found in `prompt`"):
        api.generate_and_segment(pipe, item.caption, scene_classes(item), preset=DEMO, prompt_2="a cat",
                                 num_inference_steps=1, max_sequence_length=32)
