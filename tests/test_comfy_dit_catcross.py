"""Cat-Cross "keys" on the DiTs (tiny real Flux and SD3 with register tokens),
sampled with ComfyUI's own sampler: the cond rows' keys at the class tokens are
multiplied by gamma in every joint attention (the uncond rows, the values and
MMDiT-X's image-only attention untouched), the captured maps are those of the
weighted softmax, and the sample is that of a model whose keys were scaled by hand."""

import pytest
import torch

from comfy_env import import_pack
from tiny_dit import SD3_CONFIG, conditioning, latent, sample, sd3_conditioning, tiny_flux, tiny_sd3

import_pack()
from attnseg_pack.attnseg import AttentionStore, LayerKey  # noqa: E402
from attnseg_pack.attnseg.layers import LayerPick  # noqa: E402
from attnseg_pack.hosts.comfyui.capture import CapturePlan  # noqa: E402
from attnseg_pack.attnseg.prompt_weights import KeyScale  # noqa: E402
from attnseg_pack.hosts.comfyui.dit import describe_dit, install_dit_capture  # noqa: E402
from attnseg_pack.hosts.comfyui.models import install_model_capture  # noqa: E402

TOKENS = 5
POSITIONS = (1, 3)
OVERRIDE = "optimized_attention_override"
REGISTERS = 2  # the SD3's register tokens, before the context
# Per family: the block captured, its place in each model call's attention calls, the text prefix.
FAMILIES = {"flux": (("double", 1), 1, 0), "sd3": (("joint", 2), 2, REGISTERS)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def dit(request):
    """(family, model, conditioning maker)."""
    if request.param == "flux":
        return "flux", tiny_flux(seed=3), conditioning
    return "sd3", tiny_sd3(seed=4, config=dict(SD3_CONFIG, register_length=REGISTERS)), sd3_conditioning


def key_scale(gamma):
    return KeyScale(positions=POSITIONS, gamma=gamma, token_count=TOKENS)


def seq_dim(kwargs):
    """The sequence axis of a call's keys: Flux passes (B, heads, L, d), MMDiT (B, L, heads * d)."""
    return 2 if kwargs.get("skip_reshape") else 1


def split_heads(args, kwargs):
    q, k = args[:2]
    heads = args[3] if len(args) > 3 else kwargs["heads"]
    if not kwargs.get("skip_reshape"):
        q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))
    return q, k


def scaled_by_hand(k, dim, branches, prefix, gamma, texts):
    """``k`` with the cond rows' keys at the class positions (after ``prefix``) times gamma,
    for every tiling of the prompt over the ``texts`` context tokens."""
    k = k.clone()
    per = k.shape[0] // len(branches)
    where = [prefix + start + p for start in range(0, texts, TOKENS) for p in POSITIONS if start + p < texts]
    for chunk, code in enumerate(branches):
        if code == 0:
            rows = k[chunk * per:(chunk + 1) * per]
            index = (slice(None),) * dim + (where,)
            rows[index] = rows[index] * gamma
    return k


def hand_scaled(model, prefix, gamma, tokens_and_image, uncond_too=False):
    """A clone whose own override scales the keys by hand in the joint calls (those of
    length text + image; MMDiT-X's image-only call is left as it is), in the cond rows
    (``uncond_too``: in every row)."""
    model = model.clone()
    joint = {texts + image: texts for texts, image in tokens_and_image}

    def override(func, *args, **kwargs):
        k = args[1]
        texts = joint.get(k.shape[seq_dim(kwargs)] - prefix)
        if texts is not None:
            branches = kwargs["transformer_options"]["cond_or_uncond"]
            branches = [0] * len(branches) if uncond_too else branches
            k = scaled_by_hand(k, seq_dim(kwargs), branches, prefix, gamma, texts)
        return func(args[0], k, *args[2:], **kwargs)

    model.model_options.setdefault("transformer_options", {})[OVERRIDE] = override
    return model


def recorder(calls):
    """An override recording each call's q and k (as (B, heads, L, d)) and branches, then
    handing the call on (to ``then``, or the kernel)."""
    def make(then=None):
        def override(func, *args, **kwargs):
            q, k = split_heads(args, kwargs)
            calls.append({"q": q.clone(), "k": k.clone(), "branches": list(kwargs["transformer_options"]
                                                                          ["cond_or_uncond"])})
            return then(func, *args, **kwargs) if then is not None else func(*args, **kwargs)
        return override
    return make


def naive_i2t(q, k, txt, prefix, n):
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)
    return probs[:, txt:txt + n, prefix:txt]


def new_store(lat, family):
    return AttentionStore(family, lat.shape[0], tuple(lat.shape[-2:]), tuple(8 * s for s in lat.shape[-2:]),
                          dtype=torch.float32)


def test_maps_are_the_weighted_softmax_of_the_cond_rows_only(dit):
    family, model, make_cond = dit
    block, place, prefix = FAMILIES[family]
    lat = latent(2, 8, 12, seed=1)
    txt, n, gamma = prefix + TOKENS, 24, 2.5
    inner, outer = [], []
    chained = model.clone()  # an override installed before ours sees the keys ours scaled
    chained.model_options.setdefault("transformer_options", {})[OVERRIDE] = recorder(inner)()
    store = new_store(lat, family)
    both = CapturePlan(cross_layers=(LayerPick.dit(*block),), self_layers=(), branches=frozenset({"cond", "uncond"}))
    install_model_capture(chained, describe_dit(chained), store, both, key_scale(gamma))
    options = chained.model_options["transformer_options"]
    options[OVERRIDE] = recorder(outer)(options[OVERRIDE])  # and one wrapped around ours the keys as they were
    sample(chained, make_cond(TOKENS, seed=1), lat, steps=1, cfg=2.0, negative=make_cond(TOKENS, seed=2))

    assert len(inner) == len(outer) == 4  # one model call: cond and uncond in one batch, 4 blocks
    for before, after in zip(outer, inner):
        assert torch.equal(after["q"], before["q"])
        expected = scaled_by_hand(before["k"], 2, before["branches"], prefix, gamma, TOKENS)
        assert not torch.equal(expected, before["k"])
        torch.testing.assert_close(after["k"], expected, atol=0, rtol=0)
    call = outer[place]
    scaled = scaled_by_hand(call["k"], 2, call["branches"], prefix, gamma, TOKENS)
    weighted, plain = naive_i2t(call["q"], scaled, txt, prefix, n), naive_i2t(call["q"], call["k"], txt, prefix, n)
    for chunk, code in enumerate(call["branches"]):
        rows = slice(2 * chunk, 2 * chunk + 2)
        maps = store.entries[(LayerKey.dit("cross", *block, 2), {0: "cond", 1: "uncond"}[code])].mean().double()
        torch.testing.assert_close(maps, weighted[rows], atol=1e-5, rtol=0)
        if code == 0:  # the weighting shows: gamma > 1 raises the scaled tokens' share
            assert float((weighted[rows] - plain[rows]).abs().max()) > 1e-3
        else:
            torch.testing.assert_close(maps, plain[rows], atol=1e-5, rtol=0)


# Negative prompts of the cond's length run in one batch with it; of another length, in a call of their own.
@pytest.mark.parametrize("negative_tokens", [TOKENS, TOKENS + 2])
def test_the_sample_is_that_of_keys_scaled_by_hand(dit, negative_tokens):
    family, model, make_cond = dit
    prefix = FAMILIES[family][2]
    lat, cond, negative = latent(1, 8, 12, seed=4), make_cond(TOKENS, seed=1), make_cond(negative_tokens, seed=2)
    run = dict(steps=1, cfg=2.0, negative=negative)
    before = (set(model.model_options), set(model.model_options.get("transformer_options", {})))
    stock = sample(model, cond, lat, **run)
    layout = [(TOKENS, 24), (negative_tokens, 24)]
    by_hand = sample(hand_scaled(model, prefix, 2.5, layout), cond, lat, **run)
    assert not torch.equal(by_hand, stock)

    alone = model.clone()  # Cat-Cross without a capture: the override scales keys and records nothing
    install_model_capture(alone, describe_dit(alone), new_store(lat, family), None, key_scale(2.5))
    torch.testing.assert_close(sample(alone, cond, lat, **run), by_hand, atol=1e-6, rtol=0)

    capturing = model.clone()
    store = new_store(lat, family)
    install_dit_capture(capturing, describe_dit(capturing), store, CapturePlan(self_layers=()), key_scale(2.5))
    torch.testing.assert_close(sample(capturing, cond, lat, **run), by_hand, atol=1e-5, rtol=0)
    assert store.entries

    if negative_tokens == TOKENS:  # scaling the uncond rows as well would show: the comparisons tell it apart
        uncond_too = hand_scaled(model, prefix, 2.5, layout, uncond_too=True)
        assert not torch.allclose(sample(uncond_too, cond, lat, **run), by_hand, atol=1e-4)
    assert (set(model.model_options), set(model.model_options.get("transformer_options", {}))) == before


def test_gamma_one_is_the_stock_sample_bit_for_bit(dit):
    family, model, make_cond = dit
    lat, cond = latent(1, 8, 12, seed=5), make_cond(TOKENS, seed=1)
    run = dict(steps=2, cfg=2.0, negative=make_cond(TOKENS, seed=2))
    stock = sample(model, cond, lat, **run)
    clone = model.clone()
    install_model_capture(clone, describe_dit(clone), new_store(lat, family), None, key_scale(1.0))
    assert torch.equal(sample(clone, cond, lat, **run), stock)


def test_mmdit_x_image_only_attention_keeps_its_keys():
    """SD3.5-medium's layout: block 0's second attention is over the image tokens only;
    the text positions mean nothing there."""
    model = tiny_sd3(seed=6, config=dict(SD3_CONFIG, x_block_self_attn_layers=[0]))
    lat, cond = latent(1, 8, 12, seed=6), sd3_conditioning(TOKENS, seed=1)
    inner = []
    chained = model.clone()
    chained.model_options.setdefault("transformer_options", {})[OVERRIDE] = recorder(inner)()
    install_model_capture(chained, describe_dit(chained), new_store(lat, "sd3"),
                          CapturePlan(cross_layers=(LayerPick.dit("joint", 0),), self_layers=()), key_scale(2.5))
    out = sample(chained, cond, lat, steps=1)
    by_hand = sample(hand_scaled(model, 0, 2.5, [(TOKENS, 24)]), cond, lat, steps=1)
    torch.testing.assert_close(out, by_hand, atol=1e-5, rtol=0)

    plain = []
    unscaled = model.clone()
    unscaled.model_options.setdefault("transformer_options", {})[OVERRIDE] = recorder(plain)()
    sample(unscaled, cond, lat, steps=1)
    assert [c["k"].shape[2] for c in inner] == [TOKENS + 24, 24, TOKENS + 24, TOKENS + 24, TOKENS + 24]
    assert torch.equal(inner[1]["k"], plain[1]["k"])  # the image-only call: keys untouched
    assert not torch.equal(inner[0]["k"], plain[0]["k"])
