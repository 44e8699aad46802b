"""The DiT demo model (hosts/comfyui/demo_dit.py, demo/train_dit.py): the demo loader
returns a Flux-layout MODEL, CLIP, VAE that every DiT capture node takes and the
stock KSampler samples with Flux's flow-matching sampling; the training objective
is the one that sampling inverts, and the in-place residuals of ComfyUI's Flux
blocks get the gradients of an out-of-place forward.

Loader, nodes and sampler run on a checkpoint written by demo_dit.save from seeded
random weights (fast, and independent of the training run); one test reads the
shipped checkpoint."""

import contextlib
import json

import pytest
import torch

from comfy_env import import_pack
from tiny_models import init_weights

pack = import_pack()
import comfy.latent_formats  # noqa: E402
import comfy.model_base  # noqa: E402
import comfy.model_sampling  # noqa: E402
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's own nodes)

from attnseg_pack.attnseg import AttnSegError, LayerKey  # noqa: E402
from attnseg_pack.hosts.comfyui import demo_dit, demo_model  # noqa: E402
from attnseg_pack.hosts.comfyui.dit import describe_dit, dit_family  # noqa: E402
from attnseg_pack.hosts.comfyui.text import prompt_of  # noqa: E402
from attnseg_pack.nodes import demo as demo_node  # noqa: E402
from demo import train_dit  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS
PROMPT = "a red circle and a blue square"
CLASSES = "red circle, blue square"


def random_parts(seed: int = 0):
    """A DiT demo model as demo/train_dit.py builds it, the diffusion model's weights random
    (not its zero-initialised modulations: every block would be the identity)."""
    config = demo_dit.CONFIG
    torch.manual_seed(seed)
    clip = demo_dit.build_clip(config, dtype=torch.float32)
    train_dit.init_text(train_dit.nan_filled(clip.cond_stage_model))
    model = demo_dit.build_dit(config)
    init_weights(model.model.diffusion_model, seed + 1)
    vae = demo_model.load(dtype=torch.float32)[2]
    return config, model, clip, vae


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config, model, clip, vae = random_parts()
    path = tmp_path_factory.mktemp("dit") / "attnseg-shapes-dit.safetensors"
    demo_dit.save(path, model.model.diffusion_model, clip.cond_stage_model, vae.first_stage_model, config,
                  {"training": {"random": True}})
    return path


@pytest.fixture(scope="module")
def demo(checkpoint):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(demo_node.SHIPPED_FILES, demo_node.SHIPPED_DIT, checkpoint)
        return NODES["AttnSegDemoModelLoader"]().load(demo_node.SHIPPED_DIT)


def image(h=128, w=192, seed=0):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_the_loader_returns_a_flux_with_flux_sampling_and_the_demo_latent(demo, checkpoint):
    model, clip, vae = demo
    assert isinstance(model.model, comfy.model_base.Flux) and dit_family(model) == "flux"
    sampling = model.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingFlux)
    assert isinstance(sampling, comfy.model_sampling.CONST) and sampling.shift == 1.15
    assert isinstance(model.model.latent_format, comfy.latent_formats.SD15)
    info = describe_dit(model)
    assert [layer.block for layer in info.layers] == ["double"] * 2 + ["single"] * 4
    assert (info.heads, info.patch_size, info.context_dim, info.latent_channels) == (2, 2, 64, 4)
    assert not model.model.diffusion_model.params.guidance_embed
    tokens = clip.tokenize(PROMPT)
    assert len(tokens["t5xxl"][0]) == demo_dit.T5_MIN_LENGTH and len(tokens["l"][0]) == 77
    context, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert context.shape == (1, 32, 64) and pooled.shape == (1, 32)
    assert vae.encode(image(128, 128)[..., :3]).shape == (1, 4, 16, 16)
    # The UNet demo's checkpoint still loads as the UNet, and a DiT file is refused by the UNet loader's caller.
    assert not demo_dit.is_dit_checkpoint(demo_model.CHECKPOINT) and demo_dit.is_dit_checkpoint(checkpoint)
    with pytest.raises(AttnSegError, match="not written by demo/train_dit.py"):
        demo_dit.load(demo_model.CHECKPOINT)


def test_every_dit_capture_node_takes_it(demo):
    model, clip, vae = demo
    picture = image()
    cond = NODES["AttnSegTextEncode"]().encode(clip, PROMPT, CLASSES, 1.0, False, "custom", "both")[0]
    meta = prompt_of(cond)
    tokenizer = clip.tokenizer.t5xxl.tokenizer
    ids = [entry[0] for chunk in clip.tokenize(PROMPT)["t5xxl"] for entry in chunk]
    for name, cls in zip(CLASSES.split(", "), meta.classes):
        assert tokenizer.decode([ids[p] for p in cls.positions]).strip() == name
    store = NODES["AttnSegSegmentImage"]().segment(model, vae, picture, cond, timesteps="100", seed=0, resolution=384,
                                                   preset="custom", self_layers="all (GoCA)")[0]
    assert store.family == "flux" and store.architecture == "dit"
    assert {(k.kind, k.block, k.block_id) for k, _ in store.entries if k.kind == "cross"} == (
        {("cross", "double", i) for i in range(2)} | {("cross", "single", i) for i in range(4)})
    grid = (16, 24)  # 128 x 192 seen at twice its size: latent 32 x 48, patches of 2
    assert all(stored.grid == grid for (key, _), stored in store.entries.items() if key.kind == "cross")
    for scores in (NODES["AttnSegDiffSegmenter"]().segment(store, "1", True, preset="custom")[0],
                   NODES["AttnSegGoCA"]().segment(store, "auto", True, 5, 2, "", "double 1", 1, preset="custom")[0]):
        assert scores.maps.shape == (1, 2, *grid) and torch.isfinite(scores.maps).all()
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    out, sampled = NODES["AttnSegCaptureSampler"]().sample(model, 1, 2, 4.0, "euler", "simple", cond, cond, latent,
                                                          1.0, True, 0, -1, "captured steps", preset="custom")
    cross = sampled.entries[(LayerKey.dit("cross", "single", 3, 2), "cond")]
    assert sampled.steps == {0, 1} and cross.grid == (8, 8) and cross.total.shape[-1] == meta.token_count
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    concept = NODES["AttnSegConceptAttention"]().segment(model, clip, vae, picture, positive, "circle, square",
                                                         "0, 1", 500.0, 0, 384, preset="custom")[0]
    torch.testing.assert_close(concept.maps.sum(1), torch.ones(1, *grid), atol=1e-5, rtol=0)


def test_the_stock_sampler_samples_it_with_cfg(demo):
    model, clip, vae = demo
    positive = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = comfy_nodes.EmptyLatentImage().generate(128, 128, 1)[0]
    assert latent["samples"].shape == (1, 4, 16, 16)
    sample = comfy_nodes.KSampler().sample(model, 3, 4, 4.0, "euler", "simple", positive, negative, latent)[0]
    picture = comfy_nodes.VAEDecode().decode(vae, sample)[0]
    assert picture.shape == (1, 128, 128, 3) and torch.isfinite(picture).all()
    unguided = comfy_nodes.KSampler().sample(model, 3, 4, 1.0, "euler", "simple", positive, negative, latent)[0]
    assert not torch.allclose(unguided["samples"], sample["samples"])  # real CFG: the negative takes part


def test_the_training_objective_is_what_comfyuis_flux_sampling_inverts(demo, monkeypatch):
    """x_t = (1 - sigma) x_0 + sigma eps and denoised = x_t - sigma v (CONST): a model
    whose v is eps - x_0 has zero loss and denoises to x_0."""
    model = demo[0]
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    sigma = torch.tensor([0.1, 0.8])
    sampling = model.get_model_object("model_sampling")
    x = sampling.noise_scaling(sigma, noise, z0)
    s = sigma[:, None, None, None]
    torch.testing.assert_close(x, (1 - s) * z0 + s * noise)
    torch.testing.assert_close(sampling.calculate_denoised(sigma, noise - z0, x), z0)
    seen = {}

    def exact(x, timestep, context, y=None, **kwargs):
        seen.update(timestep=timestep, y=y)
        return noise - z0

    monkeypatch.setattr(model.model.diffusion_model, "forward", exact)
    context, pooled = torch.zeros(2, 32, 64), torch.ones(2, 32)
    loss = train_dit.flow_loss(model, z0, context, pooled, sigma, noise)
    assert float(loss) < 1e-10
    torch.testing.assert_close(seen["timestep"], sigma)  # Flux's timestep is sigma
    assert torch.equal(seen["y"], pooled)


def test_the_residual_clones_give_the_gradients_of_an_out_of_place_forward():
    """ComfyUI's Flux blocks add residuals in place; cloning the saved tensors that alias
    a block's residual inputs gives the gradients of cloning every saved tensor."""
    _, model, _, _ = random_parts(seed=3)
    net = model.model.diffusion_model
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 4, 8, 12, generator=g)
    context, pooled = torch.randn(2, 32, 64, generator=g), torch.randn(2, 32, generator=g)
    sigma = torch.tensor([0.2, 0.7])
    clones = train_dit.SavedResidualClones(net)

    def grads(hook):
        net.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t) if hook else contextlib.nullcontext():
            sampling = model.get_model_object("model_sampling")
            x = sampling.noise_scaling(sigma, noise, z0)
            denoised = model.model.apply_model(x, sigma, c_crossattn=context, y=pooled,
                                               transformer_options=clones.options)
            ((x - denoised) / sigma[:, None, None, None] - (noise - z0)).pow(2).mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    reference = grads(lambda t: t.clone())
    ours = grads(clones.pack)
    for a, b in zip(reference, ours):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grads(None)


def test_the_shipped_dit_checkpoint_is_small_documented_and_loads():
    assert demo_dit.CHECKPOINT.stat().st_size < 15 * 2**20
    summary = json.loads(demo_dit.CHECKPOINT.with_suffix(".json").read_text())["training"]
    assert summary["dit_steps"] > 0 and summary["validation"]
    model, clip, vae = NODES["AttnSegDemoModelLoader"]().load(demo_node.SHIPPED_DIT)
    assert dit_family(model) == "flux" and model.model.latent_format.latent_channels == 4
    assert demo_dit.training_info()["training"]["dit_steps"] == summary["dit_steps"]
