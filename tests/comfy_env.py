"""Puts a real ComfyUI on the import path (CPU only) and loads this pack the way
ComfyUI does: as a package from its folder, so its relative imports resolve."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def comfyui_path() -> Path:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        path = subprocess.run(["bash", str(REPO / "scripts" / "host.sh"), "comfy"], check=True,
                              capture_output=True, text=True).stdout.strip()
    return Path(path)


def import_comfy():
    root = str(comfyui_path())
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu on import)


def import_pack(name: str = "attnseg_pack"):
    if name in sys.modules:
        return sys.modules[name]
    import_comfy()
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def recorded_progress(then=None):
    """Every (value, total) ComfyUI's progress bars are set to inside the block;
    ``then(value)`` runs after each (e.g. to interrupt at a chosen point)."""
    import comfy.utils
    import pytest

    updates = []
    original = comfy.utils.ProgressBar.update_absolute

    def record(self, value, total=None, preview=None):
        updates.append((value, total))
        original(self, value, total, preview)
        if then is not None:
            then(value)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comfy.utils.ProgressBar, "update_absolute", record)
        yield updates
