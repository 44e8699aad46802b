"""The diffusers host's Python API on the demo pipeline: segment() with PIL images
and tensors of any size, one class list or one per image; load_pipeline() from a
folder or a single file with no hub access; every bad input a one-line
AttnSegError naming the argument."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_env import import_pack

pack = import_pack()
import diffusers_demo  # noqa: E402
from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.hosts.diffusers import api  # noqa: E402
from demo import evaluate  # noqa: E402

PRESET = "DiffSegmenter (demo model, tuned)"


@pytest.fixture(scope="module")
def pipe():
    return diffusers_demo.demo_pipeline()


@pytest.fixture(scope="module")
def scenes():
    return [evaluate.scene(0), evaluate.scene(1)]


def names(item):
    return [o.name for o in item.objects]


def test_pil_images_and_tensors_give_the_same_result(pipe, scenes):
    item = scenes[1]
    pixels = torch.from_numpy(item.image).permute(2, 0, 1)
    from_pil, from_uint8, from_float = (
        api.segment(pipe, image, names(item), PRESET, resolution=256)[0]
        for image in (Image.fromarray(item.image), pixels, pixels.float() / 255))
    for other in (from_uint8, from_float):
        assert torch.equal(from_pil.labels, other.labels)
    assert from_pil.labels.shape == item.image.shape[:2] and from_pil.labels.dtype == torch.int64
    assert from_pil.masks.dtype == torch.bool and from_pil.scores.shape == (2, *item.image.shape[:2])
    assert torch.equal(from_pil.masks, torch.stack([from_pil.labels == k + 1 for k in range(2)]))
    # the masks say where the objects are: the demo model localises its shapes
    truth = torch.from_numpy(item.label_map())
    for index in range(2):
        overlap = (from_pil.masks[index] & (truth == index + 1)).sum() / (truth == index + 1).sum()
        assert overlap > 0.5, (from_pil.class_names[index], float(overlap))


def test_one_class_list_per_image(pipe, scenes):
    images = [Image.fromarray(item.image) for item in scenes]
    results = api.segment(pipe, images, [names(item) for item in scenes], PRESET, resolution=256)
    assert [r.class_names for r in results] == [names(item) for item in scenes]
    assert [r.image_size for r in results] == [item.image.shape[:2] for item in scenes]
    alone = api.segment(pipe, images[0], ", ".join(names(scenes[0])), PRESET, resolution=256)[0]
    assert torch.equal(alone.labels, results[0].labels)


def test_any_image_size_is_resized_as_the_comfyui_host_does_and_labelled_at_its_own_size(pipe, scenes):
    odd = Image.fromarray(scenes[1].image).resize((101, 67))
    [result] = api.segment(pipe, odd, names(scenes[1]), PRESET)  # the preset's 256 px: 256 x 192 latent grid
    assert result.labels.shape == (67, 101) and result.image_size == (67, 101)


def test_a_tensor_batch_is_several_images(pipe, scenes):
    batch = torch.from_numpy(np.stack([scenes[0].image, scenes[0].image])).permute(0, 3, 1, 2)
    first, second = api.segment(pipe, batch, names(scenes[0]), PRESET, resolution=256)
    assert torch.equal(first.labels, second.labels)


@pytest.mark.parametrize("classes, message", [
    ("", "classes: the class list is empty"),
    ("circle, Circle", "classes: 'Circle' is listed twice"),
    ([["red circle"], ["blue square"], ["x"]], "classes: 3 class lists for 1 images"),
    (42, "classes: give 'cat, dog'"),
])
def test_bad_classes_are_refused(pipe, scenes, classes, message):
    with pytest.raises(AttnSegError, match=message):
        api.segment(pipe, Image.fromarray(scenes[0].image), classes, PRESET)


@pytest.mark.parametrize("preset, message", [
    ("no such preset", "preset: 'no such preset' is not one of"),
    ("custom", "preset: 'custom' has no settings of its own here"),
    ("GoCA Flux (released code)", "preset: 'GoCA Flux \\(released code\\)' is made for Flux"),
    ("iSeg VOC (released code)", "preset: 'iSeg VOC \\(released code\\)' reads"),  # SD2.1's levels and heads
])
def test_presets_the_pipeline_cannot_run_are_refused(pipe, scenes, preset, message):
    with pytest.raises(AttnSegError, match=message):
        api.segment(pipe, Image.fromarray(scenes[0].image), names(scenes[0]), preset)


@pytest.mark.parametrize("image, message", [
    (torch.rand(4, 32, 32), "images: image 0 has shape \\(4, 32, 32\\)"),
    (torch.rand(3, 32, 32) * 2, "images: image 0 has pixels outside \\[0, 1\\]"),
    (torch.zeros(3, 32, 32, dtype=torch.int32), "images: image 0 is torch.int32"),
    ("picture.png", "images: image 0 is a str"),
    ([], "images: no image given"),
])
def test_bad_images_are_refused(pipe, image, message):
    with pytest.raises(AttnSegError, match=message):
        api.segment(pipe, image, "red circle", PRESET)


def test_a_prompt_that_misses_a_class_or_is_too_long_is_refused(pipe, scenes):
    image = Image.fromarray(scenes[0].image)
    with pytest.raises(AttnSegError, match="classes: the class 'green star' is not in the prompt"):
        api.segment(pipe, image, "green star", PRESET, prompt="a red circle")
    with pytest.raises(AttnSegError, match="prompt: .* this pipeline's text encoder reads 77"):
        api.segment(pipe, image, "circle", PRESET, prompt="a circle " * 60)
    with pytest.raises(AttnSegError, match="resolution: 32 must be"):
        api.segment(pipe, image, names(scenes[0]), PRESET, resolution=32)


def test_nan_attention_is_a_clear_error(pipe, scenes):
    broken = copy.deepcopy(pipe)
    broken.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.data[0, 0] = float("nan")
    with pytest.raises(AttnSegError, match="pipe: the captured attention of .* layers holds NaN"):
        api.segment(broken, Image.fromarray(scenes[0].image), names(scenes[0]), PRESET, resolution=256)


def test_load_pipeline_from_a_folder_and_a_single_file_offline(pipe, scenes, tmp_path):
    folder = tmp_path / "demo-pipeline"
    pipe.save_pretrained(folder)
    loaded = api.load_pipeline(folder, device="cpu", dtype=torch.float32)
    image = Image.fromarray(scenes[0].image)
    expected = api.segment(pipe, image, names(scenes[0]), PRESET, resolution=256)[0]
    assert torch.equal(api.segment(loaded, image, names(scenes[0]), PRESET, resolution=256)[0].labels,
                       expected.labels)
    # The original checkpoint with LDM key prefixes, loaded by diffusers' from_single_file and the folder's configs.
    single = tmp_path / "demo-ldm.safetensors"
    diffusers_demo.save_ldm_checkpoint(single)
    from_file = api.load_pipeline(single, device="cpu", dtype=torch.float32, config=folder)
    assert torch.equal(api.segment(from_file, image, names(scenes[0]), PRESET, resolution=256)[0].labels,
                       expected.labels)


def test_load_pipeline_refuses_what_is_not_a_pipeline(tmp_path):
    with pytest.raises(AttnSegError, match="path_or_file: '.*' is not a diffusers pipeline folder"):
        api.load_pipeline(tmp_path)
    with pytest.raises(AttnSegError, match="path_or_file: 'org/model' does not exist \\(hub ids are only"):
        api.load_pipeline("org/model")
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(AttnSegError, match="path_or_file: 'notes.txt' is neither a pipeline folder nor"):
        api.load_pipeline(text)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(AttnSegError, match="path_or_file: '.*broken.safetensors' did not load"):
        api.load_pipeline(broken)
    with pytest.raises(AttnSegError, match="dtype: "):
        api.load_pipeline(tmp_path, dtype=torch.int8)
