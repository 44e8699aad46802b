"""The command line on a Flux pipeline: a Flux-layout transformer with Flux.1's block
counts (19 double, 38 single; random weights at a tiny width) between the DiT demo's
text encoders and autoencoder, saved as a diffusers folder, runs the authors' GoCA
Flux configuration by name; a UNet preset on it is a one-line error."""

import numpy as np
import pytest
import torch
from PIL import Image

from cli_demo import run_cli
from comfy_env import import_pack

pack = import_pack()
import diffusers_dit_demo  # noqa: E402
from attnseg_pack.demo import voc_dataset  # noqa: E402
from attnseg_pack.hosts.diffusers import datasets  # noqa: E402

PRESET = "GoCA Flux low memory (released code)"  # blocks 12, 18 and 27-29 of Flux's 57


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    demo_pipe = diffusers_dit_demo.flux_pipeline()
    demo = demo_pipe.transformer.config
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=demo.in_channels, num_layers=19, num_single_layers=38, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=demo.joint_attention_dim,
        pooled_projection_dim=demo.pooled_projection_dim, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    pipe = FluxPipeline(**{**demo_pipe.components, "transformer": transformer})
    folder = tmp_path_factory.mktemp("flux") / "flux-layout"
    pipe.save_pretrained(str(folder))
    return folder


def test_segment_runs_goca_flux_by_name_on_a_flux_pipeline(flux_folder, tmp_path):
    scenes = {f"scene{seed}": voc_dataset.scene(seed) for seed in (0, 1)}
    for name, item in scenes.items():
        Image.fromarray(item.image).save(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("segment", tmp_path / "scene0.png", tmp_path / "scene1.png", "--classes",
                                   "red circle, blue square", "--model", flux_folder, "--preset", PRESET,
                                   "--resolution", "128", "--device", "cpu", "--no-progress", "--out", out)
    assert code == 0, stderr
    assert "wrote 2" in stdout
    for name, item in scenes.items():
        labels = datasets.read_label_png(out / "labels" / f"{name}.png")
        assert labels.shape == item.image.shape[:2] and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_a_unet_preset_on_a_flux_pipeline_is_one_line_naming_it(flux_folder, tmp_path):
    Image.fromarray(voc_dataset.scene(0).image).save(tmp_path / "scene.png")
    code, stdout, stderr = run_cli("segment", tmp_path / "scene.png", "--classes", "red circle", "--model",
                                   flux_folder, "--preset", "iSeg VOC (released code)", "--device", "cpu",
                                   "--no-progress", "--out", tmp_path / "out")
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "preset" in stderr and "GoCA Flux" in stderr, stderr
