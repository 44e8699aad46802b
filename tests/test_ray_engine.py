"""The Ray Data engine on a local two-CPU cluster: the same label maps as the local
engine, byte for byte; a run stopped part way and restarted writes only the
missing images; an actor's bad-input error is the command line's one line."""

import json

import numpy as np
import pytest

from cli_demo import dataset_arguments, model_arguments, run_cli, save_demo_pipeline, write_demo_dataset
from comfy_env import import_pack

pack = import_pack()
ray = pytest.importorskip("ray")
from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.hosts.diffusers import cli, engines  # noqa: E402

IMAGES = 6


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (it takes ~20 s to start on a busy 2-core machine)."""
    assert engines.start_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_demo_pipeline(tmp_path_factory.mktemp("model") / "attnseg-shapes")


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("voc"), train=IMAGES, val=0)


@pytest.fixture(scope="module")
def local_run(model, voc, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    code, _, stderr = run_cli("pseudo-labels", *dataset_arguments(voc), *model_arguments(model), "--protocol",
                              "open-vocabulary", "--labels", voc / "image_labels.json", "--scores", "--out", out)
    assert code == 0, stderr
    return out


def _ray_arguments(model, voc, out, *more):
    return ("pseudo-labels", *dataset_arguments(voc), *model_arguments(model), "--protocol", "open-vocabulary",
            "--labels", voc / "image_labels.json", "--scores", "--engine", "ray", "--out", out, *more)


def _label_bytes(out):
    return {p.name: p.read_bytes() for p in sorted((out / "labels").glob("*.png"))}


def test_ray_and_local_engines_write_the_same_label_maps(cluster, model, voc, local_run, tmp_path):
    out = tmp_path / "ray"
    code, stdout, stderr = run_cli(*_ray_arguments(model, voc, out, "--num-workers", "2", "--batch-size", "2"))
    assert code == 0, stderr
    assert f"wrote {IMAGES}, 0 already done" in stdout
    expected = _label_bytes(local_run)
    assert len(expected) == IMAGES and _label_bytes(out) == expected
    for name in expected:
        stem = name.removesuffix(".png")
        with np.load(out / "scores" / f"{stem}.npz") as ray_scores, np.load(local_run / "scores" /
                                                                             f"{stem}.npz") as local_scores:
            # Ray's workers run torch with one thread (it sets OMP_NUM_THREADS to the actor's CPUs),
            # so the scores' float sums may round apart; the labels above are byte-identical
            np.testing.assert_allclose(ray_scores["scores"].astype(np.float32),
                                       local_scores["scores"].astype(np.float32), atol=2e-3, rtol=0)
            assert ray_scores["label_ids"].tolist() == local_scores["label_ids"].tolist()
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert runs[0]["engine"] == "ray" and runs[0]["num_workers"] == 2


def test_a_stopped_ray_run_restarts_with_only_the_missing_images(cluster, model, voc, local_run, tmp_path):
    out = tmp_path / "ray"
    args = cli.build_parser().parse_args([str(a) for a in _ray_arguments(model, voc, out)])
    jobs = cli.dataset_jobs(args, cli.load_dataset(args))
    outputs = engines.Outputs(str(out), scores=True)

    def stop(count):  # Ctrl-C once the first image is reported written
        if count:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engines.run_ray(jobs, cli.model_settings(args).build, outputs, advance=stop)
    first = {p.name: p.stat().st_mtime_ns for p in (out / "labels").glob("*.png")}
    assert 1 <= len(first) < IMAGES

    code, stdout, stderr = run_cli(*_ray_arguments(model, voc, out))
    assert code == 0, stderr
    assert f"wrote {IMAGES - len(first)}, {len(first)} already done" in stdout
    assert {name: (out / "labels" / name).stat().st_mtime_ns for name in first} == first  # not rewritten
    assert _label_bytes(out) == _label_bytes(local_run)


def test_an_actors_bad_input_error_is_the_command_lines_one_line(cluster, model, voc, tmp_path):
    code, _, stderr = run_cli(*_ray_arguments(model, voc, tmp_path / "out", "--limit", "1", "--prompt", "a photo"))
    assert code == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: --classes: ") and "is not in the prompt" in errors[0]
    assert stderr.endswith(errors[0] + "\n") and "Traceback" not in stderr
    with pytest.raises(AttnSegError, match="--num-workers: 3 workers with 1 GPU each need 3 GPUs"):
        engines.run_ray([engines.Job("a", "a.png", ("x",), (1,))], None, engines.Outputs(str(tmp_path / "g")),
                        num_workers=3, gpus_per_worker=1.0)
