"""iSeg through the real ComfyUI: Cat-Cross on the patched attention layers,
the refiner and seed nodes on captured stores, and their bad input."""

import pytest
import torch

from comfy_env import import_pack
from tiny_models import SD15_LAYOUT, tiny_clip, tiny_unet, tiny_vae

pack = import_pack()
from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.attnseg.prompt_weights import KeyScale  # noqa: E402
from attnseg_pack.hosts.comfyui.catcross import install_key_scale  # noqa: E402
from attnseg_pack.hosts.comfyui.passes import segment_image  # noqa: E402
from attnseg_pack.hosts.comfyui.text import KEY_SCALE_KEY, encode_cat_cross  # noqa: E402
from attnseg_pack.hosts.comfyui.unet import describe_unet  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def models():
    return tiny_unet(SD15_LAYOUT, seed=1), tiny_clip(seed=2), tiny_vae(seed=3)


def image(h=64, w=96):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(0))


def reference(q, k, v, heads):
    """softmax(Q K^T / sqrt(d)) V per head, written out."""
    b, n, inner = q.shape
    d = inner // heads
    split = lambda x: x.view(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / d ** 0.5, dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(b, n, inner)


def test_cat_cross_keys_weights_only_the_cond_branchs_class_keys(models):
    unet = models[0].clone()
    info = describe_unet(unet)
    install_key_scale(unet, info, KeyScale(positions=(2, 3), gamma=1.6, token_count=4))
    patches = unet.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert set(patches) == {layer.patch_key for layer in info.layers}  # every cross-attention layer
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(4, 6, 32, generator=generator)
    # Keys and values of a context the host tiled to twice the prompt's 4 tokens.
    k, v = (torch.randn(4, 8, 32, generator=generator) for _ in range(2))
    out = patches[info.layers[0].patch_key](q, k, v, {"n_heads": 2, "cond_or_uncond": [1, 0]})
    w = torch.ones(8)
    w[[2, 3, 6, 7]] = 1.6
    expected_cond = reference(q[2:], k[2:] * w[None, :, None], v[2:], 2)  # Q (W.K)^T, V untouched
    assert torch.allclose(out[2:], expected_cond, atol=1e-5)
    assert torch.allclose(out[:2], reference(q[:2], k[:2], v[:2], 2), atol=1e-5)  # uncond untouched
    assert not torch.allclose(out[2:], reference(q[2:], k[2:], v[2:], 2), atol=1e-3)


def test_cat_cross_keys_reaches_the_store_and_leaves_the_users_model_alone(models):
    model, clip, vae = models
    plain_store = segment_image(model, vae, image(), encode_cat_cross(clip, "", "cat", 1.0, "keys")[0], [100], 0, 96)
    weighted, meta = encode_cat_cross(clip, "", "cat", 4.0, "keys")
    store = segment_image(model, vae, image(), weighted, [100], 0, 96)
    cat = list(meta.classes[0].positions)
    key = next(k for k, _ in store.layers("cross"))

    def share(s):
        return float(s.entries[(key, "cond")].mean()[..., cat].sum(-1).mean())

    assert share(store) > share(plain_store) * 1.2  # the class tokens draw more attention
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    assert meta.text == "a photograph of cat and other object and background"


def test_cat_cross_embedding_scales_the_class_positions_of_the_text_embedding(models):
    clip = models[1]
    plain, meta = encode_cat_cross(clip, "a cat on a mat", "cat", 1.0, "embedding")
    scaled, _ = encode_cat_cross(clip, "a cat on a mat", "cat", 1.6, "embedding")
    cat = list(meta.classes[0].positions)
    others = [i for i in range(plain[0][0].shape[1]) if i not in cat]
    assert torch.allclose(scaled[0][0][:, cat], plain[0][0][:, cat] * 1.6)
    assert torch.equal(scaled[0][0][:, others], plain[0][0][:, others])
    assert KEY_SCALE_KEY not in scaled[0][1]


def test_iseg_nodes_chain_to_masks_at_the_image_size(models):
    model, clip, vae = models
    conditioning, _ = NODES["AttnSegCatCrossEncode"]().encode(clip, "", "cat, dog", 1.6, "keys", "grass, sky")
    store, = NODES["AttnSegSegmentImage"]().segment(model, vae, image(), conditioning, "100", 0, 96)
    cross, = NODES["AttnSegISegCrossAttention"]().segment(store, "4,2", "0.7,0.3")
    refined, = NODES["AttnSegEntSelf"]().refine(cross, store, 0.01, 10, "paper")
    assert refined.class_names == ["cat", "dog"] and refined.maps.shape[:2] == (1, 2)
    masks, labels, preview, soft = NODES["AttnSegMasks"]().make(refined, 0.5, "(1 - max)^2", image())["result"]
    assert masks.shape == (2, 64, 96) and labels.shape == (1, 64, 96)


def test_seeds_node_gives_one_map_per_seed(models):
    model, clip, vae = models
    conditioning, _ = NODES["AttnSegTextEncode"]().encode(clip, "a photo", "photo")
    store, = NODES["AttnSegSegmentImage"]().segment(model, vae, image(), conditioning, "100", 0, 96)
    seeds = '[{"point": [10, 10]}, {"line": [[0, 60], [95, 60]], "label": "floor"}, {"box": [40, 0, 96, 30]}]'
    scores, = NODES["AttnSegSeeds"]().segment(store, seeds, 0.01, 10, "paper")
    assert scores.class_names == ["point 1", "floor", "box 3"] and scores.maps.shape[:2] == (1, 3)
    assert float(scores.maps.amax()) == pytest.approx(1.0)


@pytest.mark.parametrize("call, message", [
    (lambda n, clip, store: n["AttnSegCatCrossEncode"]().encode(clip, "", "cat", 0.0, "keys", ""), "gamma"),
    (lambda n, clip, store: n["AttnSegCatCrossEncode"]().encode(clip, "", "cat, cat", 1.6, "keys", ""), "classes"),
    (lambda n, clip, store: n["AttnSegEntSelf"]().refine(
        n["AttnSegISegCrossAttention"]().segment(store, "4,2", "0.7,0.3")[0], store, -1.0, 10, "paper"), "lambda"),
    (lambda n, clip, store: n["AttnSegEntSelf"]().refine(
        n["AttnSegISegCrossAttention"]().segment(store, "4,2", "0.7,0.3")[0], store, 0.01, -1, "paper"), "iterations"),
    (lambda n, clip, store: n["AttnSegISegCrossAttention"]().segment(store, "4,2", "1"), "weights"),
    (lambda n, clip, store: n["AttnSegSeeds"]().segment(store, "[]", 0.01, 10, "paper"), "at least one seed"),
    (lambda n, clip, store: n["AttnSegSeeds"]().segment(store, '[{"point": [500, 10]}]', 0.01, 10, "paper"),
     "outside the 96x64 image"),
    (lambda n, clip, store: n["AttnSegSeeds"]().segment(store, '[{"dot": [5, 5]}]', 0.01, 10, "paper"),
     "exactly one of point, line, box"),
    (lambda n, clip, store: n["AttnSegSeeds"]().segment(store, "[{point", 0.01, 10, "paper"), "not valid JSON"),
])
def test_bad_iseg_input_is_named(models, call, message):
    model, clip, vae = models
    conditioning, _ = encode_cat_cross(clip, "", "cat", 1.6, "keys")
    store = segment_image(model, vae, image(), conditioning, [100], 0, 96)
    with pytest.raises(AttnSegError, match=message):
        call(NODES, clip, store)
