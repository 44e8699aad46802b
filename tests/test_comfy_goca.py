"""GoCA through the real ComfyUI: output-weighted heads inside the capture
patches, every layer's self-attention and the reference queries, the node and
its bad input, on SD1.5 and SDXL layouts."""

import pytest
import torch

from comfy_env import import_pack
from tiny_models import SD15_LAYOUT, SDXL_LAYOUT, tiny_unet

pack = import_pack()
from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.attnseg.goca import content_positions  # noqa: E402
from attnseg_pack.hosts.comfyui.capture import CapturePlan, projection_weight  # noqa: E402
from attnseg_pack.hosts.comfyui.passes import segment_image  # noqa: E402
from attnseg_pack.hosts.comfyui.text import encode_segmentation_prompt  # noqa: E402
from attnseg_pack.hosts.comfyui.unet import attention_module, describe_unet, reference_layer  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS
GOCA_CAPTURE = CapturePlan(cross_heads="auto", self_every_layer=True, reference_factor=2)


def image(h=64, w=96):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(0))


def test_rescaling_sums_exactly_the_content_words_of_a_real_sd_prompt(clip):
    _, meta = encode_segmentation_prompt(clip, "a photo of a cat, and the dog.", "cat, dog")
    words = meta.words
    assert words[:12] == ("", "a", "photo", "of", "a", "cat", ",", "and", "the", "dog", ".", "")
    assert content_positions(meta) == [2, 3, 5, 9]  # BOS, EOS, padding, a/and/the and punctuation left out


def record_cross_qkv(model):
    """Record q, k, v of every cross-attention call through ComfyUI's attention override."""
    calls = {}

    def override(func, q, k, v, heads, *args, transformer_options=None, **kwargs):
        opts = transformer_options or {}
        if k.shape[1] != q.shape[1]:
            calls[(opts["block"][0], opts["block"][1], opts.get("block_index", 0))] = (q, k, v, heads)
        return func(q, k, v, heads, *args, transformer_options=transformer_options, **kwargs)

    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return calls


@pytest.mark.parametrize("layout", [SD15_LAYOUT, SDXL_LAYOUT], ids=["sd15", "sdxl"])
def test_auto_heads_weigh_each_head_by_its_share_of_the_layers_output(layout, clip, vae):
    model = tiny_unet(layout, seed=1)
    positive = encode_segmentation_prompt(clip, "a cat on a mat", "cat")[0]
    probe = model.clone()
    calls = record_cross_qkv(probe)
    segment_image(probe, vae, image(), positive, [100], 0, 96, CapturePlan(cross_steps=None, self_steps=None))
    store = segment_image(model, vae, image(), positive, [100], 0, 96, GOCA_CAPTURE)
    assert store.head_reduction == "auto"
    info = describe_unet(model)
    checked = 0
    for key, stored in store.layers("cross"):
        q, k, v, heads = calls[(key.block, key.block_id, key.depth)]
        layer = next(l for l in info.layers if l.patch_key == (key.block, key.block_id, key.depth))
        weight = attention_module(model, layer, "attn2").to_out[0].weight.float()
        b, n, inner = q.shape
        d = inner // heads
        split = lambda x: x.view(b, -1, heads, d).transpose(1, 2).float()  # noqa: E731
        probs = (split(q) @ split(k).transpose(-1, -2) * d ** -0.5).softmax(-1)
        head_out = probs @ split(v)
        per_head = torch.stack([head_out[:, i] @ weight[:, i * d:(i + 1) * d].T for i in range(heads)], 2)
        total = per_head.sum(2, keepdim=True)
        shares = (per_head * total).sum(-1) / (total ** 2).sum(-1)
        expected = torch.einsum("bhnt,bnh->bnt", probs, shares)
        torch.testing.assert_close(stored.mean(), expected[..., :stored.total.shape[-1]], atol=2e-3, rtol=1e-2)
        assert not torch.allclose(stored.mean(), probs.mean(1), atol=1e-4)  # not the head mean
        checked += 1
    assert checked == len(info.layers)


def test_auto_heads_read_the_output_projection_as_its_forward_does():
    """In low-VRAM mode ComfyUI keeps LoRA patches as weight functions run inside
    the layer's forward, on a weight cast to the input's dtype: the head weights
    must see that weight, not the stored one."""
    import comfy.ops

    linear = comfy.ops.disable_weight_init.Linear(6, 4)
    torch.nn.init.normal_(linear.weight, generator=torch.Generator().manual_seed(0))
    torch.nn.init.zeros_(linear.bias)
    linear.weight_function = [lambda w: w * 2 + 0.5]  # stands for a LoRA delta
    x = torch.randn(3, 6, dtype=torch.float64)
    seen = projection_weight(linear, x)
    assert seen.dtype == torch.float64
    torch.testing.assert_close(x @ seen.T, linear(x))
    assert not torch.allclose(seen, linear.weight.double())


@pytest.mark.parametrize("layout", [SD15_LAYOUT, SDXL_LAYOUT], ids=["sd15", "sdxl"])
def test_goca_capture_stores_every_self_layer_and_the_reference_queries(layout, clip, vae):
    model = tiny_unet(layout, seed=1)
    info = describe_unet(model)
    positive = encode_segmentation_prompt(clip, "a cat on a mat", "cat")[0]
    store = segment_image(model, vae, image(), positive, [100], 0, 96, GOCA_CAPTURE)
    assert {(k.block, k.block_id, k.depth) for k, _ in store.layers("self")} == {l.patch_key for l in info.layers}
    (query_key, queries), = store.layers("query")
    reference = reference_layer(info, 2)
    assert (query_key.block, query_key.factor) == ("output", 2)
    assert (query_key.block_id, query_key.depth) == (reference.block_id, reference.depth)
    inner = attention_module(model, reference, "attn2").to_q.weight.shape[0]
    assert store.latent_size == (8, 16)  # 64 x 96 px at resolution 96: sides rounded to multiples of 64
    assert queries.grid == (4, 8) and queries.total.shape == (1, 32, inner)


def test_reference_layer_is_the_middle_decoder_layer_at_the_factor():
    sd15 = describe_unet(tiny_unet(SD15_LAYOUT))
    decoder_half = [l for l in sd15.layers if l.block == "output" and l.factor == 2]
    assert reference_layer(sd15, 2) == decoder_half[(len(decoder_half) - 1) // 2]
    # no decoder layer at 1/16: the nearest factor the model has
    assert reference_layer(sd15, 16).factor == max(l.factor for l in sd15.layers if l.block == "output")


def test_capturing_with_auto_heads_leaves_the_sample_unchanged(clip):
    model = tiny_unet(SD15_LAYOUT, seed=1)
    positive = encode_segmentation_prompt(clip, "a cat on a mat", "cat")[0]
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    stock = NODES["AttnSegCaptureSampler"]().sample(model, 3, 2, 5.0, "euler", "normal", positive, negative, latent,
                                                     1.0, False, 0, -1, "last step")[0]["samples"]
    captured, store = NODES["AttnSegCaptureSampler"]().sample(
        model, 3, 2, 5.0, "euler", "normal", positive, negative, latent, 1.0, True, 0, -1, "last step",
        heads="auto (GoCA)", self_layers="all (GoCA)")
    torch.testing.assert_close(captured["samples"], stock, atol=1e-4, rtol=1e-4)
    assert store.head_reduction == "auto" and store.layers("query")
    assert not model.model_options.get("transformer_options", {}).get("patches_replace")  # the user's model


@pytest.mark.parametrize("layout", [SD15_LAYOUT, SDXL_LAYOUT], ids=["sd15", "sdxl"])
def test_goca_node_from_capture_to_masks(layout, clip, vae):
    model = tiny_unet(layout, seed=1)
    conditioning, _ = NODES["AttnSegTextEncode"]().encode(clip, "a cat on a mat", "cat, mat", 1.0, True)
    store, = NODES["AttnSegSegmentImage"]().segment(model, vae, image(), conditioning, "100", 0, 96,
                                                      heads="auto (GoCA)", self_layers="all (GoCA)")
    goca_node = NODES["AttnSegGoCA"]()
    auto, = goca_node.segment(store, "auto", True, 5, 2, "mat")
    uniform, = goca_node.segment(store, "uniform", True, 5, 2, "mat")
    assert auto.class_names == ["cat"] and auto.background.shape[1] == 1
    finest = min(l.factor for l in describe_unet(model).layers)
    assert auto.maps.shape[-2:] == (8 // finest, 16 // finest)  # the finest self-attention grid
    assert not torch.allclose(auto.maps, uniform.maps)
    masks, labels, preview, soft = NODES["AttnSegMasks"]().make(auto, 0.5, "threshold", image())["result"]
    assert masks.shape == (1, 64, 96) and preview.shape == (1, 64 + 28, 96, 3)


def test_goca_node_bad_input(clip, vae):
    model = tiny_unet(SD15_LAYOUT, seed=1)
    conditioning, _ = NODES["AttnSegTextEncode"]().encode(clip, "a cat on a mat", "cat", 1.0, True)
    store, = NODES["AttnSegSegmentImage"]().segment(model, vae, image(), conditioning, "100", 0, 96)
    goca_node = NODES["AttnSegGoCA"]()
    with pytest.raises(AttnSegError, match="set preset to 'GoCA SD1.5 \\(released code\\)'"):
        goca_node.segment(store, "auto", True, 5, 2, "")
    with pytest.raises(AttnSegError, match="background_classes: mat is not among"):
        goca_node.segment(store, "uniform", True, 5, 2, "mat")
    with pytest.raises(AttnSegError, match="blur: 4 must be odd"):
        goca_node.segment(store, "uniform", True, 4, 2, "")
    with pytest.raises(AttnSegError, match="heads / self_layers"):
        NODES["AttnSegSegmentImage"]().segment(model, vae, image(), conditioning, "100", 0, 96, heads="max")
