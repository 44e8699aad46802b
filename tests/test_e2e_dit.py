"""End to end on DiTs: the Flux and SD3 workflows in workflows/api POSTed to the
real ComfyUI server as shipped, on tiny random models instead of the user's
files, and their masks read back.

What each run changes, and nothing else:
- the loaders' file names: the tiny Flux (tests/dit_files.py: 1 double + 1 single
  block at full width) for UNETLoader, the 16-channel VAE for VAELoader, and for
  CheckpointLoaderSimple a tiny SD3 checkpoint laid out as sd3_medium.safetensors
  (the 4-joint-block MMDiT and that VAE, no text encoders), written here;
- DualCLIPLoader / TripleCLIPLoader, whose full-size T5-XXL cannot run here,
  become the test node AttnSegTestTinyTextEncoder (same node id, so every link
  still holds) with the family;
- the presets that name blocks the tiny models lack become custom with blocks
  they have (see TINY); the workflow's own widget values are the preset's, so
  only the blocks and the sizes change;
- sizes for a CPU: 128 px captures, a 64 px latent, 2 steps.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from comfy_env import REPO
from comfy_server import ComfyServer, WorkflowError
from dit_files import dit_vae_file, flux_model_file, sd3_model_file
from test_e2e_server import api_workflow, read

FAMILIES = {"flux-segment-image": "flux", "flux-concept-attention": "flux", "flux-generate-and-segment": "flux",
            "sd3-segment-image": "sd3", "sd3-generate-and-segment": "sd3"}
TEXT_ENCODER_LOADERS = {"DualCLIPLoader", "TripleCLIPLoader"}
FILE_LOADERS = {"UNETLoader": "unet_name", "VAELoader": "vae_name", "CheckpointLoaderSimple": "ckpt_name"}
SD3_CHECKPOINT = "attnseg-tiny-sd3-checkpoint.safetensors"
CAPTURE_RESOLUTION, LATENT_SIZE, STEPS = 128, 64, 2
# Per node type, what replaces a preset or a block pick the tiny models lack. The tiny
# Flux has blocks 'double 0' and 'single 0' (the presets: double 12-18, single 8, double
# 15-18 for ConceptAttention); the tiny SD3 'joint 0'-'joint 3' (Seg4Diff: joint 9).
# Presets that name no block stay: AttnSeg Text Encode's and DiffSegmenter's Seg4Diff
# (no re-weighting; one weight, no completion) run on any SD3.
TINY = {
    "flux": {
        "AttnSegSegmentImage": {"preset": "custom", "resolution": CAPTURE_RESOLUTION},  # every block, t 150
        "AttnSegGoCA": {"preset": "custom", "propagation_layers": "double 0"},
        "AttnSegConceptAttention": {"preset": "custom", "blocks": "0", "resolution": CAPTURE_RESOLUTION},
        "AttnSegCaptureSampler": {"self_layer_picks": "double 0; single 0", "steps": STEPS},
    },
    "sd3": {
        "AttnSegSegmentImage": {"preset": "custom", "resolution": CAPTURE_RESOLUTION},  # every block, t 513
        "AttnSegCaptureSampler": {"self_layer_picks": "joint 2", "steps": STEPS},
    },
}


def write_sd3_checkpoint(path: Path) -> Path:
    """sd3_medium.safetensors' layout (what ComfyUI's SD3 example loads with Load
    Checkpoint): the MMDiT under model.diffusion_model., the VAE under
    first_stage_model., no text encoder."""
    state = {f"model.diffusion_model.{k}": v for k, v in load_file(str(sd3_model_file())).items()}
    state.update({f"first_stage_model.{k}": v for k, v in load_file(str(dit_vae_file())).items()})
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = write_sd3_checkpoint(tmp_path_factory.mktemp("sd3-checkpoint") / SD3_CHECKPOINT)
    models = {"diffusion_models": [flux_model_file()], "vae": [dit_vae_file()]}
    with ComfyServer(tmp_path_factory.mktemp("comfy-dit-e2e"), [checkpoint], test_nodes=True,
                     models=models) as running:
        yield running


def on_tiny_models(name: str) -> dict:
    """The shipped workflow with the substitutions the module docstring lists."""
    family, workflow = FAMILIES[name], api_workflow(name)
    files = {"UNETLoader": flux_model_file().name, "VAELoader": dit_vae_file().name,
             "CheckpointLoaderSimple": SD3_CHECKPOINT}
    for node_id, node in workflow.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind in files:
            assert FILE_LOADERS[kind] in inputs, f"{name}: node {node_id} loads no file"
            inputs[FILE_LOADERS[kind]] = files[kind]
        elif kind in TEXT_ENCODER_LOADERS:
            workflow[node_id] = {"class_type": "AttnSegTestTinyTextEncoder", "inputs": {"family": family}}
        elif kind == "EmptySD3LatentImage":
            inputs.update(width=LATENT_SIZE, height=LATENT_SIZE)
        inputs.update(TINY[family].get(kind, {}))
    return workflow


def node_of(workflow: dict, class_type: str) -> str:
    found, = (key for key, node in workflow.items() if node["class_type"] == class_type)
    return found


def saved(outputs: dict, workflow: dict, source: list) -> list[np.ndarray]:
    """The images the SaveImage node fed by ``source`` ([node, slot]) saved."""
    node, = (key for key, n in workflow.items() if n["class_type"] == "SaveImage" and n["inputs"]["images"] == source)
    return [read(path) for path in outputs[node]]


def test_the_workflows_name_the_users_files_and_the_dit_presets():
    """What a user opens: the stock loaders with the usual file names, the DiT presets;
    and every workflow that loads the user's files is one this module runs."""
    loaders = set(FILE_LOADERS) | TEXT_ENCODER_LOADERS
    with_user_files = {path.stem for path in (REPO / "workflows" / "api").glob("*.json")
                       if any(n["class_type"] in loaders for n in json.loads(path.read_text()).values())}
    assert with_user_files == set(FAMILIES)
    loaded = {}
    for name in FAMILIES:
        for node in api_workflow(name).values():
            loaded.setdefault(node["class_type"], set()).update(
                v for k, v in node["inputs"].items() if k == FILE_LOADERS.get(node["class_type"]) or
                (node["class_type"] in TEXT_ENCODER_LOADERS and k.startswith("clip_name")))
    assert loaded["UNETLoader"] == {"flux1-dev.safetensors"} and loaded["VAELoader"] == {"ae.safetensors"}
    assert loaded["DualCLIPLoader"] == {"clip_l.safetensors", "t5xxl_fp16.safetensors"}
    assert loaded["TripleCLIPLoader"] == {"clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"}
    assert loaded["CheckpointLoaderSimple"] == {"sd3_medium.safetensors"}
    presets = {node["inputs"].get("preset") for name in FAMILIES for node in api_workflow(name).values()}
    assert {"GoCA Flux (released code)", "ConceptAttention Flux (released code)", "Seg4Diff SD3 (paper)"} <= presets


@pytest.mark.parametrize("name", list(FAMILIES))
def test_dit_workflow_runs_on_the_tiny_models_and_saves_its_masks(server, name):
    workflow = on_tiny_models(name)
    entry = server.run(workflow)
    outputs = server.output_files(entry)
    masks_node = node_of(workflow, "AttnSegMasks")
    masks_inputs = workflow[masks_node]["inputs"]
    # The segmented picture: the demo image, or the generated one (saved by the workflow).
    image_source = workflow[masks_inputs["image"][0]]
    if image_source["class_type"] == "AttnSegDemoImage":
        height, width = image_source["inputs"]["height"], image_source["inputs"]["width"]
    else:
        generated, = saved(outputs, workflow, masks_inputs["image"])
        assert generated.shape == (LATENT_SIZE, LATENT_SIZE, 3)
        height, width = generated.shape[:2]
    segmenter = workflow[masks_inputs["scores"][0]]["inputs"]
    classes = [c.strip() for c in (segmenter.get("classes") or workflow[node_of(workflow, "AttnSegTextEncode")]
                                   ["inputs"]["classes"]).split(",")]
    backgrounds = [c.strip() for c in segmenter.get("background_classes", "").split(",") if c.strip()]
    objects = [c for c in classes if c not in backgrounds]  # GoCA's background class gets no mask of its own
    mask_to_image = node_of(workflow, "MaskToImage")
    masks = saved(outputs, workflow, [mask_to_image, 0])
    assert len(masks) == len(objects) >= 2, (name, len(masks), objects)
    for mask in masks:
        assert mask.shape == (height, width, 3) and set(np.unique(mask)) <= {0, 255}
    labelled = sum((mask[..., 0] > 0).astype(int) for mask in masks)
    assert labelled.max() <= 1, "a pixel in two classes' masks"
    if masks_inputs["threshold"] == 0.0 and not backgrounds:  # ConceptAttention's argmax: every pixel has a class
        assert (labelled == 1).all()
    preview, = saved(outputs, workflow, [masks_node, 2])
    assert preview.shape == (height + 14 * (len(objects) + 1), width, 3)
    shown = entry["outputs"][masks_node]["images"]
    assert len(shown) == 2 and all(picture["type"] == "temp" for picture in shown)  # labels and heat map


def test_the_one_node_seg4diff_preset_refuses_the_tiny_sd3_by_its_block(server):
    """Why sd3-segment-image uses the granular nodes: AttnSeg Segment has no custom
    settings, and Seg4Diff's joint block 9 is not among the tiny SD3's four."""
    workflow = on_tiny_models("sd3-segment-image")
    loader, encoder, image = (node_of(workflow, k) for k in ("CheckpointLoaderSimple", "AttnSegTestTinyTextEncoder",
                                                              "AttnSegDemoImage"))
    one_node = {loader: workflow[loader], encoder: workflow[encoder], image: workflow[image],
                "20": {"class_type": "AttnSegSegment", "inputs": {
                    "model": [loader, 0], "clip": [encoder, 0], "vae": [loader, 2], "image": [image, 0],
                    "classes": "red circle, blue square", "preset": "Seg4Diff SD3 (paper)", "prompt": "",
                    "resolution": CAPTURE_RESOLUTION}}}
    with pytest.raises(WorkflowError) as error:
        server.run(one_node)
    message = json.loads(str(error.value)).get("exception_message", str(error.value))
    assert "Seg4Diff SD3 (paper)" in message and "joint block 9" in message, message
