import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# Tiny SD1 text encoder and autoencoder from ComfyUI's classes, shared by the
# modules that segment images on a tiny UNet. Imported late: the test module has
# put ComfyUI on the path (comfy_env) by the time a fixture runs.
@pytest.fixture(scope="module")
def clip():
    from tiny_models import tiny_clip
    return tiny_clip(seed=2)


@pytest.fixture(scope="module")
def vae():
    from tiny_models import tiny_vae
    return tiny_vae(seed=3)
