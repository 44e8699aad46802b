"""The shipped demo model: its attention localises what its captions name (a
slice of the quality benchmark, floor from the full run) and it generates the
scenes its captions describe."""

import json

import numpy as np
import pytest
import torch

from comfy_env import REPO, import_pack

pack = import_pack()
from attnseg_pack.attnseg.fusion import diffsegmenter  # noqa: E402
from attnseg_pack.attnseg.masks import make_masks  # noqa: E402
from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402
from attnseg_pack.hosts.comfyui.capture import CapturePlan  # noqa: E402
from attnseg_pack.hosts.comfyui.passes import capture_sample  # noqa: E402
from attnseg_pack.hosts.comfyui.text import encode_segmentation_prompt  # noqa: E402
from demo import evaluate  # noqa: E402
from demo.scenes import colour_mask  # noqa: E402

RESULTS = json.loads((REPO / "benchmarks" / "results" / "segmentation_quality.json").read_text())
SLICE_MARGIN = 0.03  # CPU float differences move the slice by far less; a capture bug by far more


@pytest.fixture(scope="module")
def demo():
    return demo_model.load()


def test_the_shipped_checkpoint_is_small_and_documented():
    assert demo_model.CHECKPOINT.stat().st_size < 15 * 2**20
    summary = json.loads(demo_model.CHECKPOINT.with_suffix(".json").read_text())["training"]
    assert summary["seconds"] < 75 * 60 and summary["unet_steps"] > 1000 and summary["final_loss"] < 0.05


def test_a_slice_of_the_quality_benchmark_stays_above_its_floor(demo):
    expected = RESULTS["ci_slice"]
    method = next(m for m in evaluate.METHODS if m.name == expected["method"])
    scenes = [evaluate.scene(s) for s in evaluate.TEST_SEEDS[:expected["scenes"]]]
    result = evaluate.score(*demo, scenes, methods=(method,), thresholds=lambda m, p: (expected["threshold"],))
    miou = result.miou(method.name, "colour + shape", expected["threshold"])
    assert miou >= expected["miou"] - SLICE_MARGIN, f"mIoU {miou:.3f}, full run {expected['miou']:.3f}"


GENERATED = [("a red circle and a blue square", 11), ("a yellow star and a green triangle", 12),
             ("a purple square", 13), ("a orange triangle and a blue circle", 14)]


@pytest.mark.parametrize("caption, seed", GENERATED)
def test_generated_scenes_paint_the_named_colours_where_the_model_puts_the_objects(demo, caption, seed):
    """Sample with capture on, decode, segment the sample with its own attention:
    each named colour must cover a real area, mostly inside its object's mask."""
    model, clip, vae = demo
    names = [part.removeprefix("a ").strip() for part in caption.split(" and ")]
    positive, _ = encode_segmentation_prompt(clip, caption, ", ".join(names))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    out, store = capture_sample(model, seed, 20, 5.0, "euler", "normal", positive, negative, latent, 1.0,
                                CapturePlan())
    image = (vae.decode(out["samples"])[0].clamp(0, 1).numpy() * 255).astype(np.uint8)
    _, masks, _ = make_masks(diffsegmenter(store), 0.5)
    for index, name in enumerate(names):
        paint = colour_mask(image, name.split()[0])
        inside = masks[index].numpy() > 0
        assert paint.mean() > 0.02, f"{name}: almost no {name.split()[0]} pixels"
        assert (paint & inside).sum() / paint.sum() > 0.5, f"{name}: its colour is not where its mask is"
