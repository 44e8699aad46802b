"""Chroma (Flux's blocks without the pooled vector, ComfyUI's own class) is
captured by the Flux code: maps equal a naive joint softmax of the same q, k."""

import torch

from comfy_env import import_pack
from test_comfy_dit_capture import TOKENS, cells, naive_maps, new_store, plan, recording_override
from tiny_dit import CONTEXT_DIM, LATENT_CHANNELS, latent, sample
from tiny_models import init_weights

import_pack()
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402

from attnseg_pack.attnseg import LayerKey  # noqa: E402
from attnseg_pack.hosts.comfyui.dit import describe_dit, install_dit_capture  # noqa: E402
from attnseg_pack.hosts.comfyui.models import describe_model  # noqa: E402

# Chroma's layout in miniature: its guidance "approximator" feeds every block's modulation.
CHROMA = dict(image_model="chroma", in_channels=4 * LATENT_CHANNELS, out_channels=4 * LATENT_CHANNELS,  # per 2x2 patch
              context_in_dim=CONTEXT_DIM, hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=2,
              depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, in_dim=64,
              out_dim=64, hidden_dim=64, n_layers=2)


def tiny_chroma(seed: int = 0):
    model_config = comfy.supported_models.Chroma(CHROMA)
    model_config.unet_config = dict(CHROMA)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def test_chroma_is_captured_as_a_flux_layout():
    chroma = tiny_chroma(seed=1)
    info = describe_model(chroma)
    assert info.family == "flux" and info.blocks() == [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
    chained, calls = recording_override(chroma)
    lat = latent(1, 8, 12, seed=2)
    store = new_store(lat)
    patched = chained.clone()
    install_dit_capture(patched, describe_dit(patched), store, plan())
    # ComfyUI's Chroma reads a pooled vector from the conditioning (Flux's encode_adm) and ignores it.
    cond = [[torch.randn(1, TOKENS, CONTEXT_DIM, generator=torch.Generator().manual_seed(3)),
             {"pooled_output": torch.zeros(1, 8)}]]
    sample(patched, cond, lat, steps=1)
    for block in info.blocks():
        (call,) = [c for c in calls if c["block"] == block]
        i2t, _ = naive_maps(call["q"], call["k"], (4, 6), cells((4, 6), 1))
        assert float(i2t.std()) > 1e-3
        stored = store.entries[(LayerKey.dit("cross", *block, 2), "cond")]
        torch.testing.assert_close(stored.mean().double(), i2t, atol=1e-5, rtol=0)
