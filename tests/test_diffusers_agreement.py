"""Cross-host agreement: the shipped demo model in ComfyUI (hosts/comfyui/demo_model.py)
and the same weights converted to a diffusers pipeline with diffusers' own
conversion code (tests/diffusers_demo.py) give the same attention store on the
same image, timesteps and noise seed, layer by layer (keys, grids, counts,
head counts, maps to fp tolerance, GoCA's stored queries), and the same masks.
This is the proof that both hosts read the model the same way."""

import pytest
import torch

from comfy_env import import_pack

pack = import_pack()
import diffusers_demo  # noqa: E402
from host_agreement import (MAP_TOLERANCE, SCORE_TOLERANCE, assert_same_labels, assert_same_masks,  # noqa: E402
                            assert_same_store, scene_classes, scene_image)
from attnseg_pack.attnseg.goca import goca  # noqa: E402
from attnseg_pack.attnseg.iseg import iseg  # noqa: E402
from attnseg_pack.attnseg.masks import make_masks  # noqa: E402
from attnseg_pack.attnseg.presets import PRESETS  # noqa: E402
from attnseg_pack.attnseg.tokens import goca_template_prompt  # noqa: E402
from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402
from attnseg_pack.hosts.comfyui import passes as comfy_passes  # noqa: E402
from attnseg_pack.hosts.comfyui import presets as comfy_presets  # noqa: E402
from attnseg_pack.hosts.comfyui import text as comfy_text  # noqa: E402
from attnseg_pack.hosts.comfyui.models import checked_model  # noqa: E402
from attnseg_pack.hosts.diffusers import api  # noqa: E402
from attnseg_pack.hosts.diffusers import passes as diffusers_passes  # noqa: E402
from attnseg_pack.hosts.diffusers import text as diffusers_text  # noqa: E402
from attnseg_pack.attnseg.plan import CapturePlan  # noqa: E402
from attnseg_pack.hosts.diffusers.unet import describe_unet  # noqa: E402
from demo import evaluate  # noqa: E402

RESOLUTION = 256  # twice the scene's size, as the demo's tuned preset


@pytest.fixture(scope="module")
def comfy():
    return demo_model.load(dtype=torch.float32)


@pytest.fixture(scope="module")
def pipe():
    return diffusers_demo.demo_pipeline()


@pytest.fixture(scope="module")
def item():
    return evaluate.scene(1)  # 128 x 192: not square, two objects


def comfy_stores(comfy, conditionings, plan, timesteps, seed, image, keep_timesteps=False):
    model, _, vae = comfy
    info = checked_model(model, conditionings[0], "clip")
    latent = comfy_passes.encode_image(vae, image, RESOLUTION)
    return [comfy_passes.capture_pass(model, latent, c, list(timesteps), seed, tuple(image.shape[1:3]), plan, info,
                                      keep_timesteps=keep_timesteps) for c in conditionings]


def diffusers_stores(pipe, conditionings, plan, timesteps, seed, image, keep_timesteps=False):
    latent = diffusers_passes.encode_image(pipe, image.movedim(-1, 1), RESOLUTION)
    return [diffusers_passes.capture_pass(pipe, latent, c, list(timesteps), seed, tuple(image.shape[1:3]), plan,
                                          describe_unet(pipe.unet), keep_timesteps=keep_timesteps)
            for c in conditionings]


@pytest.mark.parametrize("preset", ["DiffSegmenter (demo model, tuned)", "DiffSegmenter (paper, 4 timesteps)"])
def test_a_preset_pass_gives_the_same_store_and_masks_on_both_hosts(comfy, pipe, item, preset):
    """The whole preset path: the prompt template, class weighting and -ing fusion (the
    paper preset: one pass per class, four timesteps stacked in one batch, per-timestep stores)."""
    chosen = PRESETS[preset]
    setup, image, names = chosen.capture, scene_image(item), scene_classes(item)
    ours = diffusers_stores(pipe, diffusers_text.encode_for_preset(pipe, chosen.text, "", names),
                            CapturePlan.from_setup(setup, chosen.name), setup.timesteps, setup.seed, image,
                            setup.keep_timesteps)
    theirs = comfy_stores(comfy, comfy_presets.encode(comfy[1], chosen.text, "", names),
                          CapturePlan.from_setup(setup, chosen.name), setup.timesteps, setup.seed, image,
                          setup.keep_timesteps)
    assert len(ours) == len(theirs) == (len(names) if chosen.text.per_class else 1)
    for mine, other in zip(ours, theirs):
        assert_same_store(mine, other)
    assert_same_masks(api.run_method(ours[0], chosen), comfy_presets.run_method(theirs[0], chosen), chosen.threshold)


def test_segment_gives_the_comfyui_segmenters_masks(comfy, pipe, item):
    """The public API end to end against the ComfyUI host's one-node segmenter."""
    chosen = PRESETS["DiffSegmenter (demo model, tuned)"]
    image = scene_image(item)
    [result] = api.segment(pipe, image[0].movedim(-1, 0), scene_classes(item), chosen.name, resolution=RESOLUTION)
    scores = comfy_presets.segment_with_preset(*comfy, image, ", ".join(scene_classes(item)), chosen,
                                               resolution=RESOLUTION)
    labels, masks, maps = make_masks(scores, chosen.threshold, chosen.background)
    assert result.class_names == scene_classes(item) and result.image_size == tuple(image.shape[1:3])
    assert (result.scores - maps[0]).abs().max() < SCORE_TOLERANCE
    assert_same_labels(result.labels[None], labels, maps, chosen.threshold, chosen.background)
    assert torch.equal(result.masks, torch.stack([result.labels == k + 1 for k in range(len(result.class_names))]))


def test_goca_capture_output_weighted_heads_and_queries_agree(comfy, pipe, item):
    """GoCA's capture: heads weighted by their share of the output inside the processor,
    every layer's self-attention, the reference layer's queries; then GoCA's masks."""
    settings = dict(cross_heads="auto", self_every_layer=True, reference_factor=2)
    image, names = scene_image(item), scene_classes(item)
    prompt = goca_template_prompt(names)
    [ours] = diffusers_stores(pipe, [diffusers_text.encode_segmentation_prompt(pipe, prompt, names + ["background"])],
                              CapturePlan(**settings), [100], 0, image)
    [theirs] = comfy_stores(comfy, [comfy_text.encode_segmentation_prompt(comfy[1], prompt,
                                                                          ", ".join(names + ["background"]))[0]],
                            CapturePlan(**settings), [100], 0, image)
    assert any(key.kind == "query" for key, _ in ours.entries)
    assert_same_store(ours, theirs)
    run = lambda store: goca(store, "auto", True, 5, 2, ["background"], "attention", None, 1, "custom", "auto")  # noqa: E731
    assert_same_masks(run(ours), run(theirs), 0.0)


def test_iseg_with_cat_cross_on_the_keys_and_chosen_heads_agrees(comfy, pipe, item):
    """iSeg's paper form: Cat-Cross scaling the class keys inside every cross-attention
    (not only the captured ones), one head kept of a self-attention layer; then iSeg."""
    settings = dict(self_heads=(1,), cross_factors=frozenset({2}))
    image, names = scene_image(item), scene_classes(item)
    [ours] = diffusers_stores(pipe, [diffusers_text.encode_cat_cross(pipe, "", names, 1.6, "keys")],
                              CapturePlan(**settings), [100], 1101, image)
    [theirs] = comfy_stores(comfy, [comfy_text.encode_cat_cross(comfy[1], "", ", ".join(names), 1.6, "keys")[0]],
                            CapturePlan(**settings), [100], 1101, image)
    assert {key.factor for key, _ in ours.entries if key.kind == "cross"} == {2}
    assert all(slot.heads == 1 for (key, _), slot in ours.entries.items() if key.kind == "self")
    assert_same_store(ours, theirs)
    run = lambda store: iseg(store, 0.01, 10, "paper", (2,), (1.0,), "attention")  # noqa: E731
    assert_same_masks(run(ours), run(theirs), 0.0, "(1 - max)^2")


def test_the_tolerance_tells_a_different_noise_apart(comfy, pipe, item):
    """The comparison can fail: the same pass with another seed is off by far more."""
    image, names = scene_image(item), scene_classes(item)
    plan_kwargs = dict(self_steps=None)
    [ours] = diffusers_stores(pipe, [diffusers_text.encode_segmentation_prompt(pipe, "", names)],
                              CapturePlan(**plan_kwargs), [100], 1, image)
    [theirs] = comfy_stores(comfy, [comfy_text.encode_segmentation_prompt(comfy[1], "", ", ".join(names))[0]],
                            CapturePlan(**plan_kwargs), [100], 0, image)
    differences = [((ours.entries[k].mean() - theirs.entries[k].mean()).abs().max()
                    / theirs.entries[k].mean().abs().max()).item() for k in ours.entries]
    assert max(differences) > 10 * MAP_TOLERANCE
    with pytest.raises(AssertionError, match="maps differ"):
        assert_same_store(ours, theirs)
