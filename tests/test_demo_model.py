"""The shipped demo model: its attention localises what its captions name (a
slice of the quality benchmark, floor from the full run) and it generates the
scenes its captions describe."""

import json

import pytest
import torch

from comfy_env import REPO, import_pack

pack = import_pack()
import comfy.model_management  # noqa: E402
import comfy.utils  # noqa: E402
from comfy.cli_args import args  # noqa: E402
from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402
from demo import evaluate  # noqa: E402

RESULTS = json.loads((REPO / "benchmarks" / "results" / "segmentation_quality.json").read_text())
SLICE_MARGIN = 0.03  # CPU float differences move the slice by far less; a capture bug by far more


@pytest.fixture(scope="module")
def demo():
    return demo_model.load()


def test_the_shipped_checkpoint_is_small_and_documented():
    assert demo_model.CHECKPOINT.stat().st_size < 15 * 2**20
    summary = json.loads(demo_model.CHECKPOINT.with_suffix(".json").read_text())["training"]
    assert summary["seconds"] < 90 * 60 and summary["unet_steps"] > 1000 and summary["final_loss"] < 0.05


def test_the_loader_takes_comfyuis_dtype_choices_as_load_checkpoint_does(monkeypatch):
    """--bf16-unet and --fp32-text-enc reach the demo model through model
    management, as they reach any checkpoint: bf16 UNet weights, computed in the
    dtype unet_manual_cast picks for the device (the CPU has no bf16 compute)."""
    monkeypatch.setattr(args, "bf16_unet", True)
    monkeypatch.setattr(args, "fp32_text_enc", True)
    model, clip, vae = demo_model.load()
    device = comfy.model_management.get_torch_device()
    assert model.model.get_dtype() == torch.bfloat16
    assert model.model.manual_cast_dtype == comfy.model_management.unet_manual_cast(torch.bfloat16, device)
    assert model.model.manual_cast_dtype is not None
    assert clip.cond_stage_model.dtypes == {torch.float32}
    assert model.load_device == device and model.offload_device == comfy.model_management.unet_offload_device()
    store = evaluate.capture(model, clip, vae, evaluate.scene(0))
    assert store.entries and all(bool(torch.isfinite(m.total).all()) for m in store.entries.values())


@pytest.mark.parametrize("prefix, part", [("unet.", "UNet"), ("clip.", "text encoder"), ("vae.", "autoencoder")])
def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused(tmp_path, prefix, part):
    state, metadata = comfy.utils.load_torch_file(str(demo_model.CHECKPOINT), return_metadata=True)
    dropped = next(k for k in state if k.startswith(prefix) and k.endswith(".weight"))
    path = tmp_path / "incomplete.safetensors"
    comfy.utils.save_torch_file({k: v for k, v in state.items() if k != dropped}, str(path), metadata=metadata)
    with pytest.raises(AttnSegError, match=f"the {part} weights of incomplete.safetensors do not fit"):
        demo_model.load(path)


def test_a_slice_of_the_quality_benchmark_stays_above_its_floor(demo):
    expected = RESULTS["ci_slice"]
    method = next(m for m in evaluate.METHODS if m.name == expected["method"])
    scenes = [evaluate.scene(s) for s in evaluate.TEST_SEEDS[:expected["scenes"]]]
    result = evaluate.score(*demo, scenes, methods=(method,), thresholds=lambda m, p: (expected["threshold"],))
    miou = result.miou(method.name, "colour + shape", expected["threshold"])
    assert miou >= expected["miou"] - SLICE_MARGIN, f"mIoU {miou:.3f}, full run {expected['miou']:.3f}"


CAPTIONS = ["a red circle and a blue square", "a yellow star and a green triangle", "a purple square",
            "a orange triangle and a blue circle", "a green circle", "a red star and a yellow square"]


def test_generated_scenes_paint_the_named_colours_where_the_model_puts_the_objects(demo):
    """Sample each caption with two seeds and segment each sample with its own
    attention (see evaluate.drawn for what counts as drawn). A tiny model sometimes
    drops one object of a pair: the bar is 80% of the objects."""
    results = [(caption, seed, *r) for caption in CAPTIONS for seed in (11, 12)
               for r in evaluate.drawn(*evaluate.generate(*demo, caption, seed), caption)]
    failures = [f"{caption} (seed {seed}): {name} {why}" for caption, seed, name, ok, why in results if not ok]
    assert 1 - len(failures) / len(results) >= 0.8, "\n".join(failures)


def test_the_mious_the_table_gives_for_scale():
    scenes = [evaluate.scene(s) for s in evaluate.TEST_SEEDS[:40]]
    perfect = evaluate.Confusion()
    for item in scenes:
        perfect.add(evaluate.truth_labels(item), evaluate.truth_labels(item))
    assert perfect.miou() == 1.0
    references = evaluate.reference_mious(scenes)
    shape_only = references["same-shape objects not told apart"]
    assert 0 < references["all background"] < references["objects not told apart"] < shape_only < 1
    single = [item for item in scenes if len(item.objects) == 1]
    assert single and evaluate.reference_mious(single)["objects not told apart"] == 1.0
    distinct = [item for item in scenes if len({o.shape for o in item.objects}) == len(item.objects)]
    assert len(distinct) < len(scenes)
    assert evaluate.reference_mious(distinct)["same-shape objects not told apart"] == 1.0
