"""Capture on a tiny real Flux through ComfyUI's attention override, sampled
with ComfyUI's own sampler: stored maps against a naive joint softmax of the
same q and k, the sample left as it was, and a previous override chained."""

import pytest
import torch

from comfy_env import import_pack
from tiny_dit import conditioning, latent, sample, tiny_flux
from reference_capture import naive_joint_maps, pooled_cells as cells
from tiny_models import SD15_LAYOUT, tiny_unet

import_pack()
from attnseg_pack.attnseg import AttentionStore, AttnSegError, LayerKey, attention  # noqa: E402
from attnseg_pack.attnseg.layers import LayerPick  # noqa: E402
from attnseg_pack.hosts.comfyui.capture import CapturePlan, StepRange  # noqa: E402
from attnseg_pack.hosts.comfyui.dit import describe_dit, install_dit_capture  # noqa: E402
from attnseg_pack.hosts.comfyui.models import describe_model  # noqa: E402

TOKENS = 5
BLOCKS = [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
SELF_BLOCKS = (("double", 1), ("single", 0))


@pytest.fixture(scope="module")
def flux():
    return tiny_flux(seed=3)


def picks(blocks):
    return tuple(LayerPick.dit(kind, index) for kind, index in blocks)


def plan(cross=None, self_blocks=(), **changes):
    """A capture plan naming DiT blocks (cross None: every block)."""
    return CapturePlan(cross_layers=None if cross is None else picks(cross), self_layers=picks(self_blocks),
                       **changes)


def captured(model, store, capture_plan, key_scale=None):
    """A clone of ``model`` with the DiT capture installed."""
    clone = model.clone()
    install_dit_capture(clone, describe_dit(clone), store, capture_plan, key_scale)
    return clone


def recording_override(model, scale=1.0):
    """A clone with an override of its own (as another pack would install): it
    records every call's q, k, block and branches, and scales the output."""
    model = model.clone()
    calls = []

    def override(func, *args, **kwargs):
        options = kwargs["transformer_options"]
        calls.append({"block": (options["block_type"], options["block_index"]), "q": args[0].clone(),
                      "k": args[1].clone(), "branches": list(options["cond_or_uncond"])})
        return func(*args, **kwargs) * scale

    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return model, calls


def naive_maps(q, k, grid, cell_of):
    """Full joint softmax over [txt, img]: I2T and the pooled I2I of the head mean."""
    return naive_joint_maps(q, k, TOKENS, 0, grid, cell_of)


def new_store(lat):
    return AttentionStore("flux", lat.shape[0], tuple(lat.shape[-2:]), tuple(8 * s for s in lat.shape[-2:]),
                          dtype=torch.float32)


# The second case runs in query chunks of 3 rows (2 rows x 2 heads x 25 keys per row).
@pytest.mark.parametrize("batch, h, w, grid, chunk", [(1, 8, 12, (4, 6), None), (2, 7, 10, (4, 5), 300)])
def test_maps_equal_a_naive_joint_softmax_of_the_same_q_and_k(flux, monkeypatch, batch, h, w, grid, chunk):
    if chunk:
        monkeypatch.setattr(attention, "CHUNK_ELEMENTS", chunk)
    lat = latent(batch, h, w, seed=1)
    chained, calls = recording_override(flux)
    store = new_store(lat)
    sample(captured(chained, store, plan(self_blocks=SELF_BLOCKS, self_max_tokens=6)), conditioning(TOKENS), lat,
           steps=2)

    assert len(calls) == 2 * len(BLOCKS)  # the earlier override ran on every attention call
    assert store.steps == {0, 1}
    assert {(key.kind, key.block, key.block_id) for key, _ in store.entries} == (
        {("cross",) + b for b in BLOCKS} | {("self",) + b for b in SELF_BLOCKS})
    for block in BLOCKS:
        recorded = [c for c in calls if c["block"] == block]
        expected = [naive_maps(c["q"], c["k"], grid, cells(grid, 2)) for c in recorded]
        cross = store.entries[(LayerKey.dit("cross", *block, 2), "cond")]
        assert cross.grid == grid and cross.count == 2 and cross.heads == 2
        assert cross.total.shape == (batch, grid[0] * grid[1], TOKENS)
        torch.testing.assert_close(cross.mean().double(), sum(e[0] for e in expected) / 2, atol=1e-5, rtol=0)
        if block in SELF_BLOCKS:
            self_maps = store.entries[(LayerKey.dit("self", *block, 2), "cond")]
            assert self_maps.grid == (2, 3)  # 4 x 6 or 4 x 5 tokens pooled 2 x 2 to fit 6 cells
            torch.testing.assert_close(self_maps.mean().double(), sum(e[1] for e in expected) / 2,
                                       atol=1e-5, rtol=0)


def test_cfg_records_each_branch_from_its_own_rows(flux):
    lat = latent(1, 6, 8, seed=2)
    chained, calls = recording_override(flux)
    store = new_store(lat)
    both = plan(cross=(("single", 1),), branches=frozenset({"cond", "uncond"}))
    sample(captured(chained, store, both), conditioning(TOKENS, seed=1), lat, steps=1, cfg=2.0,
           negative=conditioning(TOKENS, seed=2))
    (call,) = [c for c in calls if c["block"] == ("single", 1)]
    i2t, _ = naive_maps(call["q"], call["k"], (3, 4), cells((3, 4), 1))
    for row, code in enumerate(call["branches"]):
        stored = store.entries[(LayerKey.dit("cross", "single", 1, 2), {0: "cond", 1: "uncond"}[code])]
        torch.testing.assert_close(stored.mean().double(), i2t[row:row + 1], atol=1e-5, rtol=0)


def test_the_sample_is_the_previous_overrides(flux):
    lat, cond = latent(1, 8, 12, seed=4), conditioning(TOKENS)
    stock = sample(flux, cond, lat)
    idle = plan(cross_steps=StepRange(5, 5), self_steps=None)
    assert torch.equal(sample(captured(flux, new_store(lat), idle), cond, lat), stock)
    capturing = plan(self_blocks=SELF_BLOCKS)
    torch.testing.assert_close(sample(captured(flux, new_store(lat), capturing), cond, lat), stock,
                               atol=1e-6, rtol=0)
    # An override that changes the attention output keeps doing so under the capture.
    scaled, _ = recording_override(flux, scale=0.5)
    expected = sample(scaled, cond, lat)
    assert not torch.equal(expected, stock)
    torch.testing.assert_close(sample(captured(scaled, new_store(lat), capturing), cond, lat),
                               expected, atol=1e-6, rtol=0)
    assert "optimized_attention_override" not in flux.model_options.get("transformer_options", {})


def test_refuses_missing_blocks_and_unet_layers(flux):
    assert describe_dit(flux).blocks() == BLOCKS
    with pytest.raises(AttnSegError, match="has 2 single blocks"):
        captured(flux, new_store(latent()), plan(cross=(("single", 2),)))
    with pytest.raises(AttnSegError, match="reads UNet layers"):
        captured(flux, new_store(latent()), CapturePlan(self_layers=(LayerPick("output", 0, 1),)))
    with pytest.raises(AttnSegError, match="head mean"):
        captured(flux, new_store(latent()), plan(cross_heads="auto"))
    assert describe_model(tiny_unet(SD15_LAYOUT)).model_id.startswith("SD15")


def test_a_masked_key_gets_no_probability_and_the_rest_renormalise():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 9, 4, generator=g), torch.randn(2, 3, 9, 4, generator=g)
    mask = torch.ones(9, 9, dtype=torch.bool)
    mask[:, 1] = False  # the second text token is masked out for every query
    maps = attention.joint_attention_maps(q, k, slice(3, 9), {"cross": (slice(0, 3), None)}, mask=mask)
    scores = (q @ k.transpose(-1, -2) / 2).masked_fill(~mask, float("-inf"))
    expected = scores.softmax(-1).mean(1)[:, 3:, :3]
    assert torch.all(maps["cross"][..., 1] == 0)
    torch.testing.assert_close(maps["cross"], expected, atol=1e-6, rtol=0)


def test_the_tiny_models_attention_is_not_uniform(flux):
    """Zero q/k norm gains would make every map uniform and every comparison above trivial."""
    chained, calls = recording_override(flux)
    sample(chained, conditioning(TOKENS), latent(1, 8, 12, seed=1), steps=1)
    i2t, _ = naive_maps(calls[0]["q"], calls[0]["k"], (4, 6), cells((4, 6), 2))
    assert float(i2t.std()) > 1e-3


def test_a_reference_block_outside_the_captured_ones_still_records_its_output(flux):
    chained, calls = recording_override(flux)
    lat = latent(1, 8, 12, seed=5)
    store = new_store(lat)
    sample(captured(chained, store, plan(cross=(("double", 0),), reference=LayerPick.dit("single", 1))),
           conditioning(TOKENS), lat, steps=1)
    assert {(key.kind, key.block, key.block_id) for key, _ in store.entries} == {
        ("cross", "double", 0), ("query", "single", 1)}
    assert store.entries[(LayerKey.dit("query", "single", 1, 2), "cond")].total.shape == (1, 24, 64)
