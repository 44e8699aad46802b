"""The tiny Flux and SD3 files through ComfyUI's stock loading code (UNETLoader's
comfy.sd.load_diffusion_model, VAELoader's comfy.sd.VAE), sampled with the tiny
text encoders on the real tokenizers; and a workflow of stock nodes per family
(the test node standing in for the text encoder loader) through the real server."""

import pytest
import torch

from comfy_server import ComfyServer
from dit_files import dit_vae_file, flux_model_file, load_text_encoder, saved_recipe, sd3_model_file
from test_e2e_server import read
from tiny_dit import (CLIP_G_WIDTH, CLIP_L_WIDTH, LATENT_CHANNELS, SD3_POOLED_DIM, T5_WIDTH, flux_clip, latent,
                      sample, sd3_clip, sd3_conditioning, tiny_sd3)

import comfy.sd  # (after tiny_dit, which puts ComfyUI on the path)
import comfy.supported_models
import comfy.utils
from comfy.ldm.flux.model import Flux
from comfy.ldm.models.autoencoder import AutoencodingEngine
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

PROMPT = "a red circle and a blue square"
# family: (its file, the network detection must build, the model config it must pick, KSampler's cfg)
FAMILIES = {"flux": (flux_model_file, Flux, comfy.supported_models.Flux, 1.0),
            "sd3": (sd3_model_file, MMDiT, comfy.supported_models.SD3, 4.0)}
# family: (context tokens, pooled width): Flux's T5 list pads to 256; SD3's context is
# CLIP-L+G's 77 tokens, then T5's, padded to 77.
ENCODED = {"flux": (256, CLIP_L_WIDTH), "sd3": (77 + 77, SD3_POOLED_DIM)}


@pytest.fixture(scope="module")
def encoders():
    return {"flux": flux_clip(seed=0), "sd3": sd3_clip(seed=0)}


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def test_tiny_sd3_samples_with_its_uncond_at_cfg_above_one():
    model, lat = tiny_sd3(seed=1), latent(1, 8, 12)
    out = sample(model, sd3_conditioning(seed=0), lat, cfg=4.0, negative=sd3_conditioning(seed=1))
    assert out.shape == lat.shape and torch.isfinite(out).all()
    # The negative is used: the positive as its own negative samples something else.
    assert not torch.equal(out, sample(model, sd3_conditioning(seed=0), lat, cfg=4.0))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_text_encoders_read_the_real_tokenizers_and_match_their_saved_weights(encoders, family):
    clip = encoders[family]
    tokens = clip.tokenize(PROMPT)
    assert set(tokens) == ({"l", "t5xxl"} if family == "flux" else {"g", "l", "t5xxl"})
    (context, extra), = encode(clip, PROMPT)
    count, pooled_width = ENCODED[family]
    assert context.shape == (1, count, T5_WIDTH) and extra["pooled_output"].shape == (1, pooled_width)
    assert torch.isfinite(context).all() and context.std() > 0.1
    if family == "sd3":  # CLIP-L then CLIP-G states, zero-padded to T5's width
        assert torch.count_nonzero(context[:, :77, CLIP_L_WIDTH + CLIP_G_WIDTH:]) == 0
    (rebuilt, rebuilt_extra), = encode(load_text_encoder(family), PROMPT)  # what the test node returns
    assert torch.equal(rebuilt, context) and torch.equal(rebuilt_extra["pooled_output"], extra["pooled_output"])


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_stock_loader_detects_the_model_file_and_samples_it(encoders, family):
    make_file, network, model_config, cfg = FAMILIES[family]
    path = make_file()
    model = comfy.sd.load_diffusion_model(str(path))
    assert isinstance(model.model.diffusion_model, network) and type(model.model.model_config) is model_config
    config = dict(model.model.model_config.unet_config)
    assert config.pop("dtype") == torch.float32  # the loader adds the dtype it chose (bf16 file, CPU)
    assert config == saved_recipe(path)["config"]
    lat = latent(1, 8, 8)
    out = sample(model, encode(encoders[family], PROMPT), lat, cfg=cfg, negative=encode(encoders[family], ""))
    assert out.shape == lat.shape and torch.isfinite(out).all()


def test_the_stock_vae_loader_detects_a_16_channel_vae():
    sd, metadata = comfy.utils.load_torch_file(str(dit_vae_file()), return_metadata=True)
    vae = comfy.sd.VAE(sd=sd, metadata=metadata)  # as VAELoader does
    assert isinstance(vae.first_stage_model, AutoencodingEngine) and vae.latent_channels == LATENT_CHANNELS
    z = vae.encode(torch.rand(1, 32, 48, 3))
    assert z.shape == (1, LATENT_CHANNELS, 4, 6)
    image = vae.decode(z)
    assert image.shape == (1, 32, 48, 3) and torch.isfinite(image).all()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = {"diffusion_models": [flux_model_file(), sd3_model_file()], "vae": [dit_vae_file()]}
    with ComfyServer(tmp_path_factory.mktemp("comfy-dit"), test_nodes=True, models=models) as running:
        yield running


def test_the_test_node_is_registered_under_its_display_name(server):
    info = server.get("/object_info/AttnSegTestTinyTextEncoder")["AttnSegTestTinyTextEncoder"]
    assert info["display_name"] == "AttnSeg Test Tiny DiT Text Encoder" and info["output"] == ["CLIP"]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_stock_workflow_generates_an_image_from_the_files(server, family):
    make_file, _, _, cfg = FAMILIES[family]
    workflow = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": make_file().name, "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": dit_vae_file().name}},
        "3": {"class_type": "AttnSegTestTinyTextEncoder", "inputs": {"family": family}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": PROMPT}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": ""}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "seed": 0,
            "steps": 2, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["2", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": f"attnseg-test/{family}"}},
    }
    saved, = server.output_files(server.run(workflow))["9"]
    assert read(saved).shape == (64, 64, 3)
