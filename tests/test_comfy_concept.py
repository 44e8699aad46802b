"""ConceptAttention on a tiny real Flux, sampled with ComfyUI's own sampler:
the sample bit-identical with and without the concept stream, the maps against
the block's layers run by hand on the same hidden states, chained with a block
wrapper and an attention override already on the model, the cond rows only,
the step range, the image path (T5 states, noise level, guidance), and errors."""

import math

import pytest
import torch

from comfy_env import import_pack
from tiny_dit import (CLIP_L_WIDTH, FLUX_CONFIG, LATENT_CHANNELS, T5_WIDTH, conditioning, flux_clip, latent,
                      sample, sd3_clip, tiny_flux)
from tiny_models import SD15_LAYOUT, TINY_VAE, init_weights, tiny_unet

import_pack()
import comfy.sample  # noqa: E402
import node_helpers  # noqa: E402
import comfy.sd  # noqa: E402
from comfy.ldm.flux.math import apply_rope  # noqa: E402
from comfy.ldm.models.autoencoder import AutoencoderKL  # noqa: E402

from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.hosts.comfyui.capture import StepRange  # noqa: E402
from attnseg_pack.hosts.comfyui.concept import (encode_concepts, install_concept_attention,  # noqa: E402
                                                segment_concepts)
from attnseg_pack.hosts.comfyui.passes import encode_image  # noqa: E402

NAMES = ["cat", "dog", "sky"]
DOUBLE, SINGLE = 3, 2  # three double blocks: a chosen block 1 leaves block 2 unwrapped


@pytest.fixture(scope="module")
def flux():
    return tiny_flux(seed=3, config=dict(FLUX_CONFIG, depth=DOUBLE))


def concept_states(seed=0, width=FLUX_CONFIG["context_in_dim"]):
    return torch.randn(len(NAMES), width, generator=torch.Generator().manual_seed(seed))


def recording_wrapper_and_override(model):
    """A clone with a double-block wrapper on every block and an attention override
    (as other packs install): they record each block's inputs and count the calls."""
    model = model.clone()
    records, calls = [], []
    for index in range(DOUBLE):
        def wrapper(args, extra, index=index):
            # Cloned: the block adds its residuals to img and txt in place.
            records.append({"block": index, **{k: args[k].clone() for k in ("img", "txt", "vec", "pe")}})
            return extra["original_block"](args)
        model.set_model_patch_replace(wrapper, "dit", "double_block", index)

    def override(func, *args, **kwargs):
        calls.append(kwargs["transformer_options"]["block_type"])
        return func(*args, **kwargs)

    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return model, records, calls


def stream(norm, attn, mod, x, heads):
    """A Flux stream's q, k, v (B, heads, L, d) by hand, before RoPE."""
    qkv = attn.qkv((1 + mod.scale) * norm(x) + mod.shift)
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    return attn.norm.query_norm(q), attn.norm.key_norm(k), v


def attend(q, k, v):
    """Naive softmax attention in float64 -> (B, L, heads*d) fp32."""
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (probs @ v.double()).transpose(1, 2).flatten(2).float()


def naive_maps(net, call_records, concepts, chosen, n_image):
    """The concepts through each double block's text-stream layers, by hand, next to
    the recorded hidden states: {block: (B, N, C) softmax over concepts}."""
    heads = net.num_heads
    state = net.txt_in(concepts)[None].expand(call_records[0]["img"].shape[0], -1, -1)
    maps = {}
    for record in call_records[:max(chosen) + 1]:
        block = net.double_blocks[record["block"]]
        image_mod, _ = block.img_mod(record["vec"])
        text_mod1, text_mod2 = block.txt_mod(record["vec"])
        iq, ik, iv = stream(block.img_norm1, block.img_attn, image_mod, record["img"], heads)
        tq, tk, tv = stream(block.txt_norm1, block.txt_attn, text_mod1, record["txt"], heads)
        cq, ck, cv = stream(block.txt_norm1, block.txt_attn, text_mod1, state, heads)
        q, k = apply_rope(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), record["pe"])
        v = torch.cat([tv, iv], 2)
        image = slice(tq.shape[2], tq.shape[2] + n_image)
        image_out = attend(q[:, :, image], k, v)
        # Concepts at Flux's text ids (zeros), attending to themselves and the image.
        cq, ck = apply_rope(cq, ck, net.pe_embedder(torch.zeros(state.shape[0], state.shape[1], 3)))
        concept_out = attend(cq, torch.cat([ck, k[:, :, image]], 2), torch.cat([cv, v[:, :, image]], 2))
        if record["block"] in chosen:
            maps[record["block"]] = torch.softmax(image_out.double() @ concept_out.double().transpose(1, 2), -1)
        state = state + text_mod1.gate * block.txt_attn.proj(concept_out)
        state = state + text_mod2.gate * block.txt_mlp((1 + text_mod2.scale) * block.txt_norm2(state)
                                                       + text_mod2.shift)
    return maps


def test_the_sample_is_bit_identical_with_and_without_concepts(flux):
    lat, cond = latent(1, 8, 12, seed=4), conditioning(5)
    stock = sample(flux, cond, lat)
    patched, maps = install_concept_attention(flux, concept_states(), NAMES, blocks=(1, 2))
    assert torch.equal(sample(patched, cond, lat), stock)
    assert maps.count == 2 * 2 and maps.steps == {0, 1} and maps.blocks == {1, 2}
    assert "patches_replace" not in flux.model_options.get("transformer_options", {})  # the input is untouched
    assert "model_function_wrapper" not in flux.model_options


# Batch 2 on a 7 x 10 latent: Flux pads it to 8 x 10, a 4 x 5 token grid.
@pytest.mark.parametrize("batch, h, w, blocks", [(1, 8, 12, (1,)), (2, 7, 10, (0, 2))])
def test_maps_equal_the_blocks_run_by_hand_and_chained_patches_still_run(flux, batch, h, w, blocks):
    lat, cond = latent(batch, h, w, seed=1), conditioning(5, batch=batch)
    chained, records, calls = recording_wrapper_and_override(flux)
    stock = sample(chained, cond, lat)
    records.clear(), calls.clear()
    patched, maps = install_concept_attention(chained, concept_states(), NAMES, blocks=blocks)
    assert torch.equal(sample(patched, cond, lat), stock)

    assert len(records) == 2 * DOUBLE and calls == (["double"] * DOUBLE + ["single"] * SINGLE) * 2
    grid = (math.ceil(h / 2), math.ceil(w / 2))
    assert maps.grid == grid and maps.total.shape == (batch, grid[0] * grid[1], len(NAMES))
    net = flux.model.diffusion_model
    with torch.no_grad():
        expected = [m for step in (records[:DOUBLE], records[DOUBLE:])
                    for m in naive_maps(net, step, concept_states(), blocks, grid[0] * grid[1]).values()]
    assert maps.count == len(expected) == 2 * len(blocks)
    torch.testing.assert_close(maps.mean().double(), sum(expected) / len(expected), atol=1e-5, rtol=0)
    assert float(maps.mean().std(dim=1).min()) > 0.02  # the maps vary over the image: the check has teeth
    scores = maps.score_maps((8 * h, 8 * w))
    assert scores.maps.shape == (batch, len(NAMES), *grid) and scores.class_names == NAMES
    torch.testing.assert_close(scores.maps.sum(1), torch.ones(batch, *grid))


def test_cfg_keeps_the_cond_rows_and_the_step_range_holds(flux):
    lat, cond = latent(1, 6, 8, seed=2), conditioning(5, seed=1)
    alone, alone_maps = install_concept_attention(flux, concept_states(), NAMES, blocks=(1,))
    sample(alone, cond, lat, steps=1)
    with_cfg, cfg_maps = install_concept_attention(flux, concept_states(), NAMES, blocks=(1,))
    seen, concept_wrapper = with_cfg.clone(), with_cfg.model_options["model_function_wrapper"]
    branches = []

    def record(apply_model, args):  # around the concept wrapper (one slot: chained)
        branches.append(list(args["cond_or_uncond"]))
        return concept_wrapper(apply_model, args)

    seen.set_model_unet_function_wrapper(record)
    # A negative as long as the prompt, so both branches share one batch.
    sample(seen, cond, lat, steps=1, cfg=2.0, negative=conditioning(5, seed=2))
    assert sorted(branches[0]) == [0, 1]
    assert cfg_maps.total.shape[0] == 1
    torch.testing.assert_close(cfg_maps.mean(), alone_maps.mean(), atol=1e-5, rtol=0)

    late, late_maps = install_concept_attention(flux, concept_states(), NAMES, blocks=(0, 1), steps=StepRange(1, 1))
    sample(late, cond, lat, steps=3)
    assert late_maps.steps == {1} and late_maps.count == 2


def test_install_refuses_other_models_missing_blocks_and_bad_concepts(flux):
    with pytest.raises(AttnSegError, match="model: ConceptAttention runs on Flux.1"):
        install_concept_attention(tiny_unet(SD15_LAYOUT), concept_states(), NAMES, blocks=(0,))
    with pytest.raises(AttnSegError, match="blocks: double block 3 does not exist; this model has double blocks 0-2"):
        install_concept_attention(flux, concept_states(), NAMES, blocks=(1, 3))
    with pytest.raises(AttnSegError, match="blocks: no double block"):
        install_concept_attention(flux, concept_states(), NAMES, blocks=())
    with pytest.raises(AttnSegError, match="classes: the class list is empty"):
        install_concept_attention(flux, torch.zeros(0, 16), [], blocks=(0,))
    with pytest.raises(AttnSegError, match="clip: the class words were encoded to 8-wide"):
        install_concept_attention(flux, concept_states(width=8), NAMES, blocks=(0,))


# The image path: a Flux as wide as tiny_dit's Flux text encoders, and a 16-channel VAE.
@pytest.fixture(scope="module")
def image_models():
    model = tiny_flux(seed=5, config=dict(FLUX_CONFIG, depth=DOUBLE, context_in_dim=T5_WIDTH,
                                                        vec_in_dim=CLIP_L_WIDTH))
    params = {**TINY_VAE, "embed_dim": LATENT_CHANNELS,
              "ddconfig": {**TINY_VAE["ddconfig"], "z_channels": LATENT_CHANNELS}}
    autoencoder = AutoencoderKL(**params)
    init_weights(autoencoder, 6)
    return model, flux_clip(seed=7), comfy.sd.VAE(sd=autoencoder.state_dict(), config={"params": params})


def test_concepts_are_the_first_t5_state_of_each_word_alone(image_models):
    _, clip, _ = image_models
    states = encode_concepts(clip, ["red circle", "sky"])
    assert states.shape == (2, T5_WIDTH)
    for name, state in zip(["red circle", "sky"], states):
        t5_states, _ = clip.cond_stage_model.t5xxl.encode_token_weights(clip.tokenize(name)["t5xxl"])
        torch.testing.assert_close(state, t5_states[0, 0].to(state))


def test_segmenting_an_image_noises_it_to_the_timestep_and_passes_guidance(image_models):
    model, clip, vae = image_models
    image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))  # 64 x 96 -> 64 x 128 at 128
    positive = node_helpers.conditioning_set_values(
        clip.encode_from_tokens_scheduled(clip.tokenize("a photo")), {"guidance": 2.5})
    seen = model.clone()
    inputs = []

    def record(apply_model, args):
        inputs.append((args["input"].clone(), args["timestep"].clone(), args["c"]["guidance"].clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    seen.set_model_unet_function_wrapper(record)
    scores = segment_concepts(seen, clip, vae, image, positive, "cat, dog", blocks=(1, 2), timestep=500,
                              seed=3, resolution=128)
    assert scores.maps.shape == (1, 2, 4, 8) and scores.class_names == ["cat", "dog"]
    assert scores.image_size == (64, 96) and scores.image_key is not None
    torch.testing.assert_close(scores.maps.sum(1), torch.ones(1, 4, 8))

    (noisy, sigma, guidance), = inputs  # one forward, cond only
    lat = encode_image(vae, image, 128)
    noise = comfy.sample.prepare_noise(lat, 3)
    torch.testing.assert_close(sigma, torch.tensor([0.5]))  # a flow model: sigma = 500 / 1000
    torch.testing.assert_close(noisy, 0.5 * noise + 0.5 * model.model.process_latent_in(lat), atol=1e-6, rtol=0)
    torch.testing.assert_close(guidance, torch.tensor([2.5]))


def test_segmenting_refuses_bad_classes_clips_blocks_and_timesteps(image_models, clip):
    model, flux_text, vae = image_models
    image = torch.rand(1, 64, 64, 3)
    positive = flux_text.encode_from_tokens_scheduled(flux_text.tokenize(""))
    with pytest.raises(AttnSegError, match="classes: the class list is empty"):
        segment_concepts(model, flux_text, vae, image, positive, " , ", blocks=(1,), resolution=64)
    with pytest.raises(AttnSegError, match="clip: SD1Tokenizer has no T5-XXL tokenizer"):
        segment_concepts(model, clip, vae, image, positive, "cat", blocks=(1,), resolution=64)
    with pytest.raises(AttnSegError, match="clip: this text encoder's sequence is not T5-XXL's alone"):
        segment_concepts(model, sd3_clip(seed=1), vae, image, positive, "cat", blocks=(1,), resolution=64)
    with pytest.raises(AttnSegError, match="blocks: double block 15 does not exist"):
        segment_concepts(model, flux_text, vae, image, positive, "cat", resolution=64)
    with pytest.raises(AttnSegError, match="timestep: 0 is outside"):
        segment_concepts(model, flux_text, vae, image, positive, "cat", blocks=(1,), timestep=0, resolution=64)
