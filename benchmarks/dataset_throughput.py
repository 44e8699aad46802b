"""Dataset throughput of the command line's engines on the demo model: the local
engine, then the Ray Data engine with 1 and with 2 model actors, side by side in
one process on the same tiny VOC-layout dataset (WSSS protocol, the demo
model's tuned DiffSegmenter preset, score maps saved as for a sweep).

    python benchmarks/dataset_throughput.py [--images 16] [--batch-size 1] [--cpus 2]

Each row: the run's wall time from the engine call to its return (model
loading and, for Ray, starting the actors included), when the first PNG was
written, and the steady rate between the first and the last PNG written (by
their mtimes). The local Ray cluster's own
start (``ray.init``) is timed once, outside the rows. Every run's label PNGs
are checked to be byte-identical to the local engine's. Results go to
benchmarks/results/dataset_throughput.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from comfy_env import import_pack  # noqa: E402

import_pack()

import torch  # noqa: E402
from cli_demo import PRESET, save_demo_pipeline, write_demo_dataset  # noqa: E402

from attnseg_pack.hosts.diffusers import cli, engines  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "dataset_throughput.json"


def timed_run(engine: str, jobs, settings, out: Path, batch_size: int, workers: int | None) -> dict:
    outputs = engines.Outputs(str(out), scores=True)
    began = time.time()
    if engine == "local":
        summary = engines.run_local(jobs, settings.build, outputs, batch_size)
    else:
        summary = engines.run_ray(jobs, settings.build, outputs, batch_size, workers)
    wall = time.time() - began
    assert summary.written == len(jobs) and not summary.failed, summary
    # When each PNG was written (its mtime), not when the driver heard of it: Ray
    # hands rows to the driver in bursts.
    written_at = sorted(outputs.label_png(job.id).stat().st_mtime for job in jobs)
    steady = (len(written_at) - 1) / (written_at[-1] - written_at[0]) if written_at[-1] > written_at[0] else None
    return {"engine": engine, "workers": workers, "batch_size": batch_size, "images": len(jobs),
            "wall_s": round(wall, 2), "images_per_s": round(len(jobs) / wall, 3),
            "first_image_s": round(written_at[0] - began, 2),
            "steady_images_per_s": round(steady, 3) if steady else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="attnseg-throughput-"))
    model = save_demo_pipeline(work / "attnseg-shapes")
    voc = write_demo_dataset(work / "voc", options.images, 0)
    args = cli.build_parser().parse_args(["pseudo-labels", "--voc", str(voc), "--class-names",
                                          str(voc / "class_names.txt"), "--model", str(model), "--preset", PRESET,
                                          "--device", "cpu", "--out", str(work / "unused")])
    jobs = cli.dataset_jobs(args, cli.load_dataset(args))
    settings = cli.model_settings(args)

    rows = [timed_run("local", jobs, settings, work / "local", options.batch_size, None)]
    began = time.perf_counter()
    engines.start_ray(num_cpus=options.cpus)
    ray_start = time.perf_counter() - began
    try:
        for workers in (1, 2):
            rows.append(timed_run("ray", jobs, settings, work / f"ray{workers}", options.batch_size, workers))
    finally:
        import ray

        ray.shutdown()
    reference = {p.name: p.read_bytes() for p in (work / "local" / "labels").glob("*.png")}
    for workers in (1, 2):
        assert {p.name: p.read_bytes() for p in (work / f"ray{workers}" / "labels").glob("*.png")} == reference

    result = {"preset": PRESET, "images": options.images, "sizes": "128x128, 128x192, 192x128 scenes (WSSS: "
              "each image's 1-3 classes)", "torch_threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "ray_cluster_cpus": options.cpus,
              "ray_init_s": round(ray_start, 2), "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "identical_label_pngs": True, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"ray.init (local cluster, {options.cpus} CPUs): {ray_start:.1f} s")
    print("| engine | model actors | images | wall s | images/s (wall) | first image s | images/s (steady) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['engine']} | {row['workers'] or '-'} | {row['images']} | {row['wall_s']} | "
              f"{row['images_per_s']} | {row['first_image_s']} | {row['steady_images_per_s']} |")


if __name__ == "__main__":
    main()
