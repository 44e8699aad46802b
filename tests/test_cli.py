"""The command line on the demo model (as a diffusers pipeline) and the tiny VOC
dataset: pseudo-labels (WSSS, open vocabulary), evaluate (and its sweep),
segment (labels, masks, overlays), resuming, a corrupt image mid-run, and the
one-line errors of bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cli_demo import dataset_arguments, model_arguments, run_cli, save_demo_pipeline, write_demo_dataset
from comfy_env import REPO, import_pack

pack = import_pack()
from attnseg_pack.demo import voc_dataset  # noqa: E402
from attnseg_pack.hosts.diffusers import cli, datasets  # noqa: E402

PYTHON = sys.executable


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_demo_pipeline(tmp_path_factory.mktemp("model") / "attnseg-shapes")


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("voc"), train=4, val=2)


@pytest.fixture(scope="module")
def wsss(model, voc, tmp_path_factory):
    """One WSSS pseudo-label run of the train split, with its progress bar and score maps."""
    out = tmp_path_factory.mktemp("wsss")
    argv = ["pseudo-labels", *dataset_arguments(voc), *model_arguments(model)[:-1], "--scores", "--out", out]
    return out, argv, run_cli(*argv)


def test_wsss_pseudo_labels_write_voc_palette_pngs_with_a_manifest(wsss, voc):
    out, _, (code, stdout, stderr) = wsss
    assert code == 0, stderr
    assert "wrote 4, 0 already done, 0 skipped" in stdout
    assert "img/s" in stderr  # the progress bar's rate
    names = datasets.read_class_names(voc / "class_names.txt")
    dataset = datasets.voc(voc, "train", names)
    for sample in dataset.samples:
        with Image.open(out / "labels" / f"{sample.id}.png") as picture:
            assert picture.mode == "P"
            assert picture.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
            labels = np.array(picture)
        assert labels.shape == dataset.truth(sample).shape
        present = set(np.unique(labels).tolist())
        assert present - {0} <= set(dataset.truth_classes(sample))  # WSSS: only the image's own classes
        assert len(present) > 1
        with np.load(out / "scores" / f"{sample.id}.npz") as saved:
            assert saved["label_ids"].tolist() == list(dataset.truth_classes(sample))
            assert saved["scores"].shape == (len(dataset.truth_classes(sample)), *labels.shape)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["preset"] == "DiffSegmenter (demo model, tuned)"
    assert manifest["settings"]["protocol"] == "wsss"
    assert manifest["settings"]["class_names"] == list(voc_dataset.CLASS_NAMES)
    assert manifest["runs"][0]["written"] == 4 and manifest["runs"][0]["engine"] == "local"


def test_evaluate_scores_the_run_and_the_sweep_agrees_at_the_preset_threshold(wsss, voc, tmp_path):
    out, _, _ = wsss
    code, stdout, stderr = run_cli("evaluate", "--predictions", out, *dataset_arguments(voc),
                                   "--json", tmp_path / "scores.json")
    assert code == 0, stderr
    report = json.loads((tmp_path / "scores.json").read_text())
    assert "mIoU" in stdout and "yellow star" in stdout
    # The demo model on its own held-out scenes with their true classes (measured 0.958); a
    # prediction of background everywhere would score under 0.2 here.
    assert report["miou"] > 0.8
    # One class's IoU counted directly from the PNGs, borders (255) left out.
    dataset = datasets.voc(voc, "train", datasets.read_class_names(voc / "class_names.txt"))
    hits = union = 0
    for sample in dataset.samples:
        truth = dataset.truth(sample)
        prediction = datasets.read_label_png(out / "labels" / f"{sample.id}.png")
        kept = truth != 255
        hits += ((truth == 0) & (prediction == 0) & kept).sum()
        union += (((truth == 0) | (prediction == 0)) & kept).sum()
    assert report["per_class_iou"]["background"] == pytest.approx(hits / union)
    assert report["per_class_iou"]["red circle"] is None  # absent from these scenes: not in the mean

    code, stdout, stderr = run_cli("evaluate", "--predictions", out, *dataset_arguments(voc), "--sweep",
                                   "0.5:0.7:0.1", "--json", tmp_path / "sweep.json")
    assert code == 0, stderr
    sweep = json.loads((tmp_path / "sweep.json").read_text())["sweep"]
    assert sweep["thresholds"] == [0.5, 0.6, 0.7]
    assert "<- best" in stdout
    # The preset's threshold (0.6) on the saved float16 scores: the PNGs' mIoU up to the rounding.
    assert sweep["miou"][1] == pytest.approx(report["miou"], abs=0.01)


def test_a_run_resumes_writing_only_the_missing_images_and_refuses_other_settings(wsss, tmp_path):
    done, argv, _ = wsss
    out = tmp_path / "resumed"
    shutil.copytree(done, out)
    labels = sorted((out / "labels").glob("*.png"))
    for path in labels[:2]:
        path.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in labels[2:]}
    code, stdout, stderr = run_cli(*argv[:-1], out)
    assert code == 0, stderr
    assert "wrote 2, 2 already done" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in labels[2:]} == kept   # not rewritten
    for path in labels[:2]:  # rewritten with the same bytes: the run is deterministic
        assert path.read_bytes() == (done / "labels" / path.name).read_bytes()
    assert len(json.loads((out / "manifest.json").read_text())["runs"]) == 2

    code, stdout, stderr = run_cli(*argv[:-1], out, "--threshold", "0.3")
    assert code == 2 and stderr.count("\n") == 1
    assert stderr.startswith("error: --out: ") and "threshold: None there, 0.3 now" in stderr


def test_a_corrupt_image_mid_run_is_reported_and_skipped(model, voc, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(voc, root)
    (root / "JPEGImages" / "scene_000001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("pseudo-labels", *dataset_arguments(root), *model_arguments(model), "--out", out)
    assert code == 1
    assert "skipped scene_000001: image: " in stderr and "does not decode" in stderr
    assert "wrote 3, 0 already done, 1 skipped" in stdout
    assert sorted(p.stem for p in (out / "labels").iterdir()) == ["scene_000000", "scene_000002", "scene_000003"]
    assert json.loads((out / "manifest.json").read_text())["runs"][0]["failed"][0]["image"] == "scene_000001"


def test_open_vocabulary_pseudo_labels_take_each_images_candidates(model, voc, tmp_path):
    names = datasets.read_class_names(voc / "class_names.txt")
    dataset = datasets.voc(voc, "val", names)
    candidates = {s.id: [names[i] for i in dataset.truth_classes(s)] + ["green star"] for s in dataset.samples}
    (tmp_path / "candidates.json").write_text(json.dumps(candidates))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("pseudo-labels", *dataset_arguments(voc, "val"), *model_arguments(model),
                                   "--protocol", "open-vocabulary", "--labels", tmp_path / "candidates.json",
                                   "--out", out)
    assert code == 0, stderr
    for sample in dataset.samples:
        labels = datasets.read_label_png(out / "labels" / f"{sample.id}.png")
        allowed = {0} | {names.index(c) for c in candidates[sample.id]}
        assert set(np.unique(labels).tolist()) <= allowed


def test_segment_writes_labels_masks_and_overlays(model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    scenes = {f"scene{seed}": voc_dataset.scene(seed) for seed in (0, 1, 2)}
    for name, item in scenes.items():
        Image.fromarray(item.image).save(folder / f"{name}.png")
    with (tmp_path / "labels.csv").open("w") as file:
        file.write("image,classes\n" + "".join(f"{n}.png,{';'.join(s.class_names)}\n" for n, s in scenes.items()))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("segment", folder, "--labels", tmp_path / "labels.csv", *model_arguments(model),
                                   "--out", out)
    assert code == 0, stderr
    class_names = (out / "class_names.txt").read_text().split("\n")[:-1]
    assert class_names[0] == "background"
    assert class_names[1:] == list(dict.fromkeys(c for s in scenes.values() for c in s.class_names))
    for name, item in scenes.items():
        labels = datasets.read_label_png(out / "labels" / f"{name}.png")
        assert labels.shape == item.image.shape[:2]
        for cls in item.class_names:
            mask = np.array(Image.open(out / "masks" / name / f"{cls}.png"))
            assert mask.tolist() == np.where(labels == class_names.index(cls), 255, 0).tolist()
        overlay = np.array(Image.open(out / "overlays" / f"{name}.png"))
        assert (overlay[labels == 0] == item.image[labels == 0]).all()
        assert (overlay[labels > 0] != item.image[labels > 0]).any()

    code, stdout, stderr = run_cli("segment", str(folder / "scene[01].png"), "--classes", "red circle, blue square",
                                   *model_arguments(model), "--no-masks", "--no-overlays", "--out", tmp_path / "glob")
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "glob").iterdir()) == ["class_names.txt", "labels", "manifest.json"]
    assert sorted(p.stem for p in (tmp_path / "glob" / "labels").iterdir()) == ["scene0", "scene1"]


def _bad_inputs(tmp_path, voc):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "unloadable").mkdir()
    (tmp_path / "unloadable" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (tmp_path / "kitty.json").write_text(json.dumps({"scene_000000": ["kitty"]}))
    data, model = dataset_arguments(voc), ["--model", tmp_path / "empty"]
    return {
        "missing dataset": (["pseudo-labels", "--voc", tmp_path / "VOC2012", *model], "--voc: "),
        "undecodable image": (["segment", tmp_path / "broken.jpg", "--classes", "cat", *model], "images: "),
        "class not in the dataset": (["pseudo-labels", *data, "--labels", tmp_path / "kitty.json", "--limit", "1",
                                      *model], "--labels: image scene_000000 lists 'kitty'"),
        "not a pipeline": (["pseudo-labels", *data, "--model", tmp_path / "empty"], "--model: "),
        "a pipeline that does not load": (["pseudo-labels", *data, "--model", tmp_path / "unloadable"],
                                          "--model: "),
        "unknown preset": (["pseudo-labels", *data, *model, "--preset", "iSeg VOC"], "--preset: "),
        "no predictions": (["evaluate", "--predictions", tmp_path / "empty", *data], "--predictions: "),
    }


@pytest.mark.parametrize("case", ["missing dataset", "undecodable image", "class not in the dataset",
                                  "not a pipeline", "a pipeline that does not load", "unknown preset",
                                  "no predictions"])
def test_bad_input_is_one_line_naming_the_argument(case, voc, tmp_path):
    argv, start = _bad_inputs(tmp_path, voc)[case]
    code, stdout, stderr = run_cli(*argv, *(["--out", tmp_path / "out"] if argv[0] != "evaluate" else []))
    assert code == 2
    assert stderr.startswith(f"error: {start}") and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "out" / "labels").exists()


def test_python_m_runs_from_a_clone_without_comfyui(tmp_path):
    """The real entry point, in a fresh interpreter without ComfyUI on its path."""
    result = subprocess.run([PYTHON, "-m", "hosts.diffusers", "demo-dataset", tmp_path / "demo", "--train", "1",
                             "--val", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo" / "ImageSets" / "Segmentation" / "val.txt").read_text() == "scene_000001\n"
    result = subprocess.run([PYTHON, "-m", "hosts.diffusers", "pseudo-labels", "--voc", tmp_path / "missing",
                             "--model", tmp_path, "--out", tmp_path / "out"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --voc: ") and result.stderr.count("\n") == 1, result.stderr


def test_argument_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["evaluate", "--voc", "VOC2012"])
    assert exit_code.value.code == 2
    error = capsys.readouterr().err
    assert "required: --predictions" in error and error.count("\n") == 1
