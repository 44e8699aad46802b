"""End to end on the DiT demo model: the flux-demo-edit-image workflow POSTed to
the real ComfyUI server as shipped (RF inversion of the demo picture, then
Prompt-to-Prompt with MM-DiT control and the local blend from the DiT's own
image-to-text maps)."""

import numpy as np
import pytest

from comfy_env import REPO
from comfy_server import ComfyServer
from demo.scenes import colour_mask
from test_e2e_server import api_workflow, read


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ComfyServer(tmp_path_factory.mktemp("comfy-dit-edit")) as running:
        yield running


def test_dit_demo_edit_workflow_recolours_the_circle_and_keeps_the_image_outside_the_mask(server):
    """Outside the mask the decoded edit is the input within the VAE's round-trip
    error (the blend keeps the input latent there); the circle turns yellow."""
    workflow = api_workflow("flux-demo-edit-image")
    assert workflow["12"]["inputs"]["method"] == "RF inversion (Euler ODE backwards)"
    assert workflow["5"]["inputs"]["inversion"] == ["12", 0]
    workflow["13"] = {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}}
    workflow["14"] = {"class_type": "SaveImage", "inputs": {"images": ["13", 0],
                                                           "filename_prefix": "attnseg/flux-demo-edit-round-trip"}}
    outputs = server.output_files(server.run(workflow))
    composite, mask, edited, round_trip = (read(outputs[node][0]) for node in ("11", "9", "7", "14"))
    original = read(REPO / "demo" / "attnseg-demo.png")
    assert composite.shape == edited.shape == original.shape
    outside = mask[..., 0] == 0
    red = colour_mask(original, "red")
    assert outside.mean() > 0.4 and not (red & outside).any()
    round_trip_error = np.abs(round_trip[outside].astype(int) - original[outside]).mean()
    # the VAE decodes the kept latent next to the edited object, so a little of it leaks
    assert np.abs(edited[outside].astype(int) - original[outside]).mean() < round_trip_error * 1.25
    assert np.abs(composite[outside].astype(int) - original[outside]).max() <= 1
    assert colour_mask(edited, "yellow")[red].mean() > 0.6
    assert colour_mask(edited, "red")[red].mean() < 0.1
