"""The DiT capture when ComfyUI's attention is SDPA (its default on CUDA): a
captured block's output comes from the fused kernel SDPA dispatches to, asked
for each row's log-sum-exp too, and the maps from the key blocks' scores only.
The maps against a naive joint softmax of the same q and k, the sample
bit-identical to stock SDPA sampling, and the fallback when an override is chained."""

import pytest
import torch

from comfy_env import import_pack
from reference_capture import naive_joint_maps, pooled_cells as cells
from tiny_dit import SD3_CONFIG, conditioning, latent, sample, sd3_conditioning, tiny_flux, tiny_sd3

import_pack()
import comfy.ldm.flux.math  # noqa: E402
import comfy.ldm.modules.attention  # noqa: E402
import comfy.ldm.modules.diffusionmodules.mmdit  # noqa: E402
from attnseg_pack.attnseg import AttentionStore, LayerKey, attention  # noqa: E402
from attnseg_pack.attnseg.layers import LayerPick  # noqa: E402
from attnseg_pack.hosts.comfyui import dit  # noqa: E402
from attnseg_pack.hosts.comfyui.capture import CapturePlan  # noqa: E402

TOKENS = 5


@pytest.fixture
def sdpa_host(monkeypatch):
    """ComfyUI's SDPA attention as the host kernel of Flux and MMDiT (their modules bind
    optimized_attention at import), and a record of every call that took the fused path:
    its q and k as (B, heads, L, d) and its branches."""
    for module in (comfy.ldm.flux.math, comfy.ldm.modules.diffusionmodules.mmdit):
        monkeypatch.setattr(module, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    fused = []
    fused_call = dit._fused_call

    def recording(func, args, kwargs):
        result = fused_call(func, args, kwargs)
        if result is not None:
            q, k, heads = dit._qkv_heads(args, kwargs)
            fused.append({"q": q.clone(), "k": k.clone(),
                          "branches": list(kwargs["transformer_options"]["cond_or_uncond"])})
        return result

    monkeypatch.setattr(dit, "_fused_call", recording)
    return fused


def new_store(family, lat):
    return AttentionStore(family, lat.shape[0], tuple(lat.shape[-2:]), tuple(8 * s for s in lat.shape[-2:]),
                          dtype=torch.float32)


def captured(model, store, capture_plan):
    clone = model.clone()
    dit.install_dit_capture(clone, dit.describe_dit(clone), store, capture_plan)
    return clone


def test_flux_maps_from_the_kernels_log_sum_exp_equal_a_naive_joint_softmax(sdpa_host, monkeypatch):
    flux = tiny_flux(seed=3)
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 2 * 2 * 5 * 3)  # query chunks of 3 rows
    lat, cond = latent(2, 7, 10, seed=1), conditioning(TOKENS)
    blocks = [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
    store = new_store("flux", lat)
    capture_plan = CapturePlan(cross_layers=None, self_layers=(LayerPick.dit("single", 0),), self_max_tokens=6)
    out = sample(captured(flux, store, capture_plan), cond, lat, steps=2)

    assert torch.equal(out, sample(flux, cond, lat, steps=2))  # SDPA's own kernel: the same bits
    assert len(sdpa_host) == 2 * len(blocks)  # every captured block's call took the fused path
    for i, block in enumerate(blocks):
        expected = [naive_joint_maps(c["q"], c["k"], TOKENS, 0, (4, 5), cells((4, 5), 2))
                    for c in sdpa_host[i::len(blocks)]]
        cross = store.entries[(LayerKey.dit("cross", *block, 2), "cond")]
        torch.testing.assert_close(cross.mean().double(), sum(e[0] for e in expected) / 2, atol=1e-5, rtol=0)
    self_maps = store.entries[(LayerKey.dit("self", "single", 0, 2), "cond")]
    expected = sum(naive_joint_maps(c["q"], c["k"], TOKENS, 0, (4, 5), cells((4, 5), 2))[1]
                   for c in sdpa_host[2::len(blocks)]) / 2
    torch.testing.assert_close(self_maps.mean().double(), expected, atol=1e-5, rtol=0)


def test_sd3_registers_and_both_branches_from_the_kernels_log_sum_exp(sdpa_host):
    sd3 = tiny_sd3(seed=4, config=dict(SD3_CONFIG, register_length=2))
    lat = latent(1, 6, 8, seed=2)
    store = new_store("sd3", lat)
    capture_plan = CapturePlan(cross_layers=(LayerPick.dit("joint", 2),), self_layers=(LayerPick.dit("joint", 2),),
                               branches=frozenset({"cond", "uncond"}))
    positive, negative = sd3_conditioning(TOKENS, seed=1), sd3_conditioning(TOKENS, seed=2)
    out = sample(captured(sd3, store, capture_plan), positive, lat, steps=1, cfg=2.0, negative=negative)

    assert torch.equal(out, sample(sd3, positive, lat, steps=1, cfg=2.0, negative=negative))
    (call,) = sdpa_host
    i2t, i2i = naive_joint_maps(call["q"], call["k"], 2 + TOKENS, 2, (3, 4), cells((3, 4), 1))
    assert sorted(call["branches"]) == [0, 1]  # one batch, a latent row per branch
    for row, code in enumerate(call["branches"]):
        branch = {0: "cond", 1: "uncond"}[code]
        torch.testing.assert_close(store.entries[(LayerKey.dit("cross", "joint", 2, 2), branch)].mean().double(),
                                   i2t[row:row + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(store.entries[(LayerKey.dit("self", "joint", 2, 2), branch)].mean().double(),
                                   i2i[row:row + 1], atol=1e-5, rtol=0)


def test_a_chained_override_keeps_making_the_output(sdpa_host):
    """With another override before ours the fused kernel is not used: that override's output stands."""
    flux = tiny_flux(seed=3).clone()
    flux.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = (
        lambda func, *args, **kwargs: func(*args, **kwargs) * 0.5)
    lat, cond = latent(1, 6, 8, seed=2), conditioning(TOKENS)
    expected = sample(flux, cond, lat, steps=1)
    store = new_store("flux", lat)
    out = sample(captured(flux, store, CapturePlan(cross_layers=None)), cond, lat, steps=1)
    assert sdpa_host == []
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert {key.block_id for key, _ in store.entries if key.kind == "cross"} == {0, 1}
    assert len([key for key, _ in store.entries if key.kind == "cross"]) == 4
