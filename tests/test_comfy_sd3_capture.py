"""Capture on a tiny real SD3 (MMDiT) through ComfyUI's attention override, sampled
with ComfyUI's own sampler: stored maps against a naive joint softmax of the same
q and k (register tokens in the text part but not in the I2T maps), the blocks
named by the dit block wrappers (chained to one already there), cond/uncond rows,
the sample left as it was, and MMDiT-X's second, image-only attention."""

import pytest
import torch

from comfy_env import import_pack
from reference_capture import naive_joint_maps as naive_maps, pooled_cells as cells
from tiny_dit import SD3_CONFIG, latent, sample, sd3_conditioning, tiny_sd3

import_pack()
from attnseg_pack.attnseg import AttentionStore, LayerKey, attention  # noqa: E402
from attnseg_pack.attnseg.layers import LayerPick  # noqa: E402
from attnseg_pack.hosts.comfyui.capture import CapturePlan, StepRange  # noqa: E402
from attnseg_pack.hosts.comfyui.dit import describe_dit, install_dit_capture  # noqa: E402

TOKENS = 5
BLOCKS = 4  # SD3_CONFIG's joint blocks
HEADS = 4  # 64 * depth wide, heads of 64
OVERRIDE = "optimized_attention_override"


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3(seed=3)


@pytest.fixture(scope="module")
def sd3_registers():
    """SD3 with 2 register tokens before the context (MMDiT's register_length)."""
    return tiny_sd3(seed=4, config=dict(SD3_CONFIG, register_length=2))


def joint_blocks(indices):
    return tuple(LayerPick.dit("joint", i) for i in indices)


def plan(cross=None, self_blocks=(), **changes):
    """A capture plan naming joint blocks (cross None: every block)."""
    return CapturePlan(cross_layers=None if cross is None else joint_blocks(cross),
                       self_layers=joint_blocks(self_blocks), **changes)


def captured(model, store, capture_plan, key_scale=None):
    clone = model.clone()
    install_dit_capture(clone, describe_dit(clone), store, capture_plan, key_scale)
    return clone


def split_heads(args, kwargs):
    """(q, k) of an attention call as (B, heads, L, d), whatever layout the call used."""
    q, k = args[:2]
    heads = args[3] if len(args) > 3 else kwargs["heads"]  # MMDiT passes heads by keyword
    if not kwargs.get("skip_reshape"):
        q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))
    return q, k


def recording_override(model, scale=1.0):
    """A clone with an override of its own (as another pack would install): it
    records every call's q, k, sequence length and branches, in call order, and
    scales the output."""
    model = model.clone()
    calls = []

    def override(func, *args, **kwargs):
        options = kwargs["transformer_options"]
        q, k = split_heads(args, kwargs)
        calls.append({"q": q.clone(), "k": k.clone(), "length": q.shape[2],
                      "branches": list(options["cond_or_uncond"]), "named": options.get("block_index")})
        return func(*args, **kwargs) * scale

    model.model_options.setdefault("transformer_options", {})[OVERRIDE] = override
    return model, calls


def new_store(lat):
    return AttentionStore("sd3", lat.shape[0], tuple(lat.shape[-2:]), tuple(8 * s for s in lat.shape[-2:]),
                          dtype=torch.float32)


def stored(store, kind, index, branch="cond"):
    return store.entries[(LayerKey.dit(kind, "joint", index, 2), branch)]


def model_calls(calls, per_call=BLOCKS):
    """The recorded calls grouped by model call (every block calls attention once, in order)."""
    assert len(calls) % per_call == 0
    return [calls[i:i + per_call] for i in range(0, len(calls), per_call)]


# The second case: 2 register tokens, batch 2, and query chunks of 2 rows
# (2 rows x 4 heads x 27 keys = 216 scores per query row).
@pytest.mark.parametrize("registers, batch, h, w, grid, chunk",
                         [(False, 1, 8, 12, (4, 6), None), (True, 2, 7, 10, (4, 5), 500)])
def test_maps_equal_a_naive_joint_softmax_of_the_same_q_and_k(sd3, sd3_registers, monkeypatch, registers, batch,
                                                              h, w, grid, chunk):
    model, prefix = (sd3_registers, 2) if registers else (sd3, 0)
    assert describe_dit(model).text_prefix == prefix
    if chunk:
        monkeypatch.setattr(attention, "CHUNK_ELEMENTS", chunk)
    lat = latent(batch, h, w, seed=1)
    chained, calls = recording_override(model)
    store = new_store(lat)
    self_blocks = (1, 2)
    sample(captured(chained, store, plan(self_blocks=self_blocks, self_max_tokens=6)), sd3_conditioning(TOKENS),
           lat, steps=2)

    txt = prefix + TOKENS
    steps = model_calls(calls)
    assert len(steps) == 2  # the earlier override ran on every attention call of both steps
    assert all(c["length"] == txt + grid[0] * grid[1] for c in calls)
    assert store.steps == {0, 1}
    assert set(store.entries) == ({(LayerKey.dit("cross", "joint", i, 2), "cond") for i in range(BLOCKS)}
                                  | {(LayerKey.dit("self", "joint", i, 2), "cond") for i in self_blocks})
    for index in range(BLOCKS):
        expected = [naive_maps(step[index]["q"], step[index]["k"], txt, prefix, grid, cells(grid, 2))
                    for step in steps]
        cross = stored(store, "cross", index)
        assert cross.grid == grid and cross.count == 2 and cross.heads == HEADS
        # The context tokens only: the registers take part in the softmax but get no map.
        assert cross.total.shape == (batch, grid[0] * grid[1], TOKENS)
        torch.testing.assert_close(cross.mean().double(), sum(e[0] for e in expected) / 2, atol=1e-5, rtol=0)
        if index in self_blocks:
            self_maps = stored(store, "self", index)
            assert self_maps.grid == (2, 3)  # 4 x 6 or 4 x 5 tokens pooled 2 x 2 to fit 6 cells
            torch.testing.assert_close(self_maps.mean().double(), sum(e[1] for e in expected) / 2,
                                       atol=1e-5, rtol=0)
    if registers:  # the registers do draw probability: leaving them out of the softmax would be wrong
        q, k = steps[0][0]["q"], steps[0][0]["k"]
        probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)
        assert float(probs[:, txt:, :prefix].sum(-1).min()) > 1e-3


def test_the_chosen_blocks_are_stored_and_a_previous_block_wrapper_still_runs(sd3):
    lat, cond = latent(1, 8, 12, seed=2), sd3_conditioning(TOKENS, seed=3)
    wrapped = sd3.clone()
    seen = []

    def previous_wrapper(args, extra):
        """Another pack's wrapper on joint block 1: it sees the block's streams and halves its image output."""
        seen.append({"img": args["img"].shape, "txt": args["txt"].shape,
                     "named": args["transformer_options"].get("block_index")})
        out = extra["original_block"](args)
        return {"txt": out["txt"], "img": out["img"] * 0.5}

    def untouched_wrapper(args, extra):  # on block 2, which the capture does not name
        seen.append({"block 2": True})
        return extra["original_block"](args)

    wrapped.set_model_patch_replace(previous_wrapper, "dit", "double_block", 1)
    wrapped.set_model_patch_replace(untouched_wrapper, "dit", "double_block", 2)
    reference = sample(wrapped, cond, lat, steps=2)
    assert len(seen) == 4
    seen.clear()

    chained, calls = recording_override(wrapped)
    store = new_store(lat)
    model = captured(chained, store, plan(cross=(1, 3), self_blocks=(3,)))
    dit = model.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(dit) == {("double_block", i) for i in (1, 2, 3)}
    assert dit[("double_block", 2)] is untouched_wrapper
    out = sample(model, cond, lat, steps=2)

    # Our wrapper ran outside the previous one: that one ran once per model call on the block's streams.
    assert [s for s in seen if "block 2" in s] == [{"block 2": True}] * 2
    blocks_1 = [s for s in seen if "img" in s]
    assert blocks_1 == [{"img": torch.Size([1, 24, 256]), "txt": torch.Size([1, TOKENS, 256]), "named": 1}] * 2
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)  # and its output change was kept
    assert set(store.entries) == {(LayerKey.dit("cross", "joint", 1, 2), "cond"),
                                  (LayerKey.dit("cross", "joint", 3, 2), "cond"),
                                  (LayerKey.dit("self", "joint", 3, 2), "cond")}
    # Each attention call is named by its own block's wrapper (none on blocks 0 and 2).
    assert [c["named"] for c in calls] == [None, 1, None, 3] * 2
    for index in (1, 3):
        expected = sum(naive_maps(step[index]["q"], step[index]["k"], TOKENS, 0, (4, 6), cells((4, 6), 1))[0]
                       for step in model_calls(calls)) / 2
        torch.testing.assert_close(stored(store, "cross", index).mean().double(), expected, atol=1e-5, rtol=0)
    # The blocks' maps differ, so a block stored under another's name would fail above.
    first = model_calls(calls)[0]
    maps = [naive_maps(c["q"], c["k"], TOKENS, 0, (4, 6), cells((4, 6), 1))[0] for c in first]
    assert all(float((maps[i] - maps[j]).abs().max()) > 1e-3 for i in range(BLOCKS) for j in range(i))


def test_cfg_records_each_branch_from_its_own_rows(sd3_registers):
    lat = latent(2, 6, 8, seed=2)
    chained, calls = recording_override(sd3_registers)
    store = new_store(lat)
    both = plan(cross=(2,), self_blocks=(2,), branches=frozenset({"cond", "uncond"}))
    sample(captured(chained, store, both), sd3_conditioning(TOKENS, seed=1), lat, steps=1, cfg=2.0,
           negative=sd3_conditioning(TOKENS, seed=2))
    (step,) = model_calls(calls)
    call = step[2]
    assert sorted(call["branches"]) == [0, 1] and call["q"].shape[0] == 4  # both branches, 2 rows each
    i2t, i2i = naive_maps(call["q"], call["k"], 2 + TOKENS, 2, (3, 4), cells((3, 4), 1))
    for chunk, code in enumerate(call["branches"]):
        rows = slice(2 * chunk, 2 * chunk + 2)
        branch = {0: "cond", 1: "uncond"}[code]
        torch.testing.assert_close(stored(store, "cross", 2, branch).mean().double(), i2t[rows], atol=1e-5, rtol=0)
        torch.testing.assert_close(stored(store, "self", 2, branch).mean().double(), i2i[rows], atol=1e-5, rtol=0)
    # The branches' maps differ (their own prompts), so swapped rows would fail above.
    assert float((i2t[:2] - i2t[2:]).abs().max()) > 1e-3


def options_snapshot(model):
    options = model.model_options.get("transformer_options", {})
    return (set(model.model_options), set(options), options.get(OVERRIDE),
            dict(options.get("patches_replace", {}).get("dit", {})))


def test_the_sample_is_the_stock_one_and_the_input_model_is_untouched(sd3_registers):
    lat, cond = latent(1, 7, 12, seed=4), sd3_conditioning(TOKENS)
    stock = sample(sd3_registers, cond, lat)
    before = options_snapshot(sd3_registers)
    idle = plan(cross_steps=StepRange(5, 5), self_steps=None)
    assert torch.equal(sample(captured(sd3_registers, new_store(lat), idle), cond, lat), stock)
    capturing = plan(cross=(0, 3), self_blocks=(1, 3))
    store = new_store(lat)
    torch.testing.assert_close(sample(captured(sd3_registers, store, capturing), cond, lat), stock,
                               atol=1e-5, rtol=0)
    assert store.steps == {0, 1} and len(store.entries) == 4
    assert options_snapshot(sd3_registers) == before
    assert OVERRIDE not in before[1] and not before[3] and "model_function_wrapper" not in before[0]

    # An input model with an override and a block wrapper of its own keeps both, as they were.
    scaled, _ = recording_override(sd3_registers, scale=0.5)
    scaled.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "double_block", 3)
    expected = sample(scaled, cond, lat)
    assert not torch.equal(expected, stock)
    before = options_snapshot(scaled)
    torch.testing.assert_close(sample(captured(scaled, new_store(lat), capturing), cond, lat), expected,
                               atol=1e-5, rtol=0)
    assert options_snapshot(scaled) == before


def test_mmdit_x_records_the_joint_attention_not_the_image_only_one():
    """SD3.5-medium's layout: block 0 has a second, image-only self-attention (attn2)."""
    model = tiny_sd3(seed=5, config=dict(SD3_CONFIG, x_block_self_attn_layers=[0]))
    assert model.get_model_object("diffusion_model").joint_blocks[0].x_block.x_block_self_attn
    lat = latent(1, 8, 12, seed=6)
    chained, calls = recording_override(model)
    store = new_store(lat)
    sample(captured(chained, store, plan(cross=(0, 1), self_blocks=(0,))), sd3_conditioning(TOKENS), lat, steps=2)

    steps = model_calls(calls, BLOCKS + 1)
    assert [c["length"] for c in steps[0]] == [TOKENS + 24, 24, TOKENS + 24, TOKENS + 24, TOKENS + 24]
    assert [c["named"] for c in steps[0]] == [0, 0, 1, None, None]
    for kind, index, call in (("cross", 0, 0), ("self", 0, 0), ("cross", 1, 2)):
        maps = stored(store, kind, index)
        assert maps.count == 2  # one add per step: the image-only call added nothing
        expected = sum(naive_maps(step[call]["q"], step[call]["k"], TOKENS, 0, (4, 6), cells((4, 6), 1))
                       [kind == "self"] for step in steps) / 2
        torch.testing.assert_close(maps.mean().double(), expected, atol=1e-5, rtol=0)
