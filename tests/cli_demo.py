"""What the command-line and Ray tests run on: the shipped demo model saved as a
diffusers pipeline folder (converted by tests/diffusers_demo.py, the cross-host
test's conversion) and the tiny VOC-layout dataset of demo scenes."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

PRESET = "DiffSegmenter (demo model, tuned)"


def save_demo_pipeline(folder: Path) -> Path:
    import diffusers_demo

    diffusers_demo.demo_pipeline().save_pretrained(str(folder))
    return folder


def write_demo_dataset(folder: Path, train: int, val: int) -> Path:
    from attnseg_pack.demo import voc_dataset

    voc_dataset.write(folder, train, val)
    return folder


def dataset_arguments(root: Path, split: str = "train") -> list[str]:
    return ["--voc", str(root), "--split", split, "--class-names", str(root / "class_names.txt")]


def model_arguments(model: Path) -> list[str]:
    return ["--model", str(model), "--preset", PRESET, "--device", "cpu", "--no-progress"]


def run_cli(*argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the command line run in this process."""
    from attnseg_pack.hosts.diffusers import cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()
