"""The command line, from a clone's root: ``python -m hosts.diffusers <command> ...``.

The repository is a ComfyUI node pack whose root ``__init__.py`` registers the
nodes (and so needs ComfyUI). The command line needs none of that: this file
loads the repository as the package ``attnseg_pack`` without running that
``__init__.py`` (relative imports inside the pack then resolve as they do in
ComfyUI) and calls ``attnseg_pack.hosts.diffusers.cli.main``.

Only the standard library is used here: a Ray worker runs :func:`load_pack`
before it unpickles anything of the pack (see engines.start_ray)."""

import importlib
import importlib.util
import sys
from pathlib import Path

PACK = "attnseg_pack"
ROOT = str(Path(__file__).resolve().parents[2])


def load_pack(root: str = ROOT, name: str = PACK):
    """The repository at ``root`` as the package ``name`` (its ``__init__.py`` not
    run); an already imported one (tests import it with ComfyUI) is kept."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(root) / "__init__.py",
                                                      submodule_search_locations=[root])
        sys.modules[name] = importlib.util.module_from_spec(spec)
    return sys.modules[name]


if __name__ == "__main__":
    load_pack()
    sys.exit(importlib.import_module(f"{PACK}.hosts.diffusers.cli").main())
