"""The shipped DiT demo model's attention localises what its captions name: a 20-scene
slice of the DiT segmentation-quality benchmark (benchmarks/dit_segmentation_quality.py),
its best method at its tuned threshold, stays within SLICE_MARGIN of what the full run
measured on the same scenes. A DiT capture that reads the wrong thing (a class at the
wrong T5 piece, the grid unpatchified in the wrong order, text and image split at the
wrong offset, a block off by one) passes every equality-with-naive test and fails this."""

import json

import pytest

from comfy_env import REPO, import_pack

import_pack()
from attnseg_pack.hosts.comfyui import demo_dit  # noqa: E402
from attnseg_pack.hosts.comfyui.dit import describe_dit  # noqa: E402
from demo import evaluate  # noqa: E402

RESULTS_PATH = REPO / "benchmarks" / "results" / "dit_segmentation_quality.json"
SLICE_MARGIN = 0.03  # CPU float differences move the slice by far less; a capture bug by far more
# What tells the checkpoint the full run measured from another one (its training log's numbers).
RUN_KEYS = ("seconds", "training_seconds", "dit_steps", "steps_run", "final_loss")


@pytest.fixture(scope="module")
def results():
    assert RESULTS_PATH.exists(), "no DiT quality results: run python benchmarks/dit_segmentation_quality.py"
    found = json.loads(RESULTS_PATH.read_text())
    shipped = demo_dit.training_info().get("training", {})
    measured = found["checkpoint"]
    assert {k: shipped.get(k) for k in RUN_KEYS} == {k: measured.get(k) for k in RUN_KEYS}, (
        "the DiT quality results were measured on another checkpoint than the shipped one: rerun "
        "python benchmarks/dit_segmentation_quality.py")
    return found


@pytest.fixture(scope="module")
def demo():
    return demo_dit.load()


def test_a_slice_of_the_dit_quality_benchmark_stays_above_its_floor(demo, results):
    expected = results["ci_slice"]
    methods = evaluate.dit_methods(describe_dit(demo[0]).blocks())
    method = next(m for m in methods if m.name == expected["method"])
    scenes = [evaluate.scene(s) for s in evaluate.TEST_SEEDS[:expected["scenes"]]]
    result = evaluate.score(*demo, scenes, methods=(method,), thresholds=lambda m, p: (expected["threshold"],),
                            timesteps=results["timesteps"])
    miou = result.miou(method.name, "colour + shape", expected["threshold"])
    assert miou >= expected["miou"] - SLICE_MARGIN, f"mIoU {miou:.3f}, full run {expected['miou']:.3f}"


def test_the_slice_is_the_full_runs_best_method(results):
    """The floor guards the method the table ranks first, not one that was once the best."""
    best = max(results["methods"], key=lambda r: r["parts"]["colour + shape"]["miou"])
    assert results["ci_slice"]["method"] == best["method"] == results["best_method"]["method"]


def test_the_segmentation_timesteps_are_the_ones_the_sweep_chose(results):
    """The workflows and the training validation read evaluate.DIT_TIMESTEPS: the full run
    measured at them, and on the tuning scenes no other candidate beat them."""
    assert results["timesteps"] == evaluate.DIT_TIMESTEPS
    best = max(results["timestep_sweep"], key=lambda r: r["best"]["tune_miou"])
    assert best["timesteps"] == evaluate.DIT_TIMESTEPS, best
