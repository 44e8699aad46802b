"""Presets through the real ComfyUI: heads chosen inside the hook, the one-node
segmenter, and presets a model cannot run."""

import pytest
import torch

from comfy_env import import_pack
from tiny_models import SD15_LAYOUT, SDXL_LAYOUT, tiny_unet

pack = import_pack()
from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.attnseg.layers import LayerPick  # noqa: E402
from attnseg_pack.hosts.comfyui.capture import CapturePlan  # noqa: E402
from attnseg_pack.hosts.comfyui.passes import segment_image  # noqa: E402
from attnseg_pack.hosts.comfyui.text import encode_segmentation_prompt  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def sd15():
    return tiny_unet(SD15_LAYOUT, seed=1)


def image(h=64, w=96):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(0))


def test_chosen_heads_are_the_mean_of_those_heads_only(sd15, clip, vae):
    """A layer with picked heads stores the mean of those heads' probabilities,
    computed naively here from the same call's q and k."""
    pick = LayerPick("output", 2, 0)  # the coarsest decoder level: 8 heads in this layout
    seen = {}

    def override(func, q, k, v, heads, *args, transformer_options=None, **kwargs):
        opts = transformer_options or {}
        if k.shape[1] != q.shape[1] and opts.get("block") == ("output", 2):
            b, n, inner = q.shape
            d = inner // heads
            qh, kh = (x.view(b, -1, heads, d).transpose(1, 2).float() for x in (q, k))
            seen["probs"] = (qh @ kh.transpose(-1, -2) * d ** -0.5).softmax(-1)
        return func(q, k, v, heads, *args, transformer_options=transformer_options, **kwargs)

    cond, _ = encode_segmentation_prompt(clip, "a cat", "cat")
    plan = CapturePlan(cross_layers=(pick,), cross_head_lists=((pick, (1, 6)),), self_steps=None)
    model = sd15.clone()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    store = segment_image(model, vae, image(), cond, [100], 0, 96, plan)
    (key, stored), = store.layers("cross")
    assert (key.block, key.block_id) == ("output", 2) and stored.heads == 2
    # The override sees the unpatched layers only, so run the same pass without the pick to read that layer's q, k.
    segment_image(model, vae, image(), cond, [100], 0, 96, CapturePlan(cross_layers=(LayerPick("output", 0, 0),),
                                                                        self_steps=None))
    expected = seen["probs"][:, [1, 6]].mean(1)
    assert torch.allclose(stored.mean(), expected, atol=2e-3)
    assert not torch.allclose(stored.mean(), seen["probs"].mean(1), atol=2e-3)


def test_the_one_node_segmenter_runs_one_pass_per_class_as_the_released_code(sd15, clip, vae):
    """DiffSegmenter (released code): 'a photograph of {c}' per class with class++,
    each class's map from its own pass; equal to the granular nodes run per class."""
    out = NODES["AttnSegSegment"]().segment(sd15, clip, vae, image(), "cat, dog", "DiffSegmenter (released code)",
                                            resolution=96)
    masks, labels, preview, soft, scores = out["result"]
    assert masks.shape == (2, 64, 96) and labels.shape == (1, 64, 96) and scores.class_names == ["cat", "dog"]
    assert preview.shape[1:3] == (64 + 14 * 3, 96)
    for index, name in enumerate(["cat", "dog"]):
        cond, _ = NODES["AttnSegTextEncode"]().encode(clip, f"a photograph of {name}", name, preset=
                                                     "DiffSegmenter (released code)")
        store, = NODES["AttnSegSegmentImage"]().segment(sd15, vae, image(), cond, "100", 0, 96)
        alone, = NODES["AttnSegDiffSegmenter"]().segment(store, "0.3,0.5,0.1,0.1", True)
        assert torch.allclose(scores.maps[:, index], alone.maps[:, 0], atol=1e-5)


def test_presets_a_model_cannot_run_are_refused_before_any_pass(sd15, clip, vae):
    segment = NODES["AttnSegSegment"]().segment
    with pytest.raises(AttnSegError, match=r"'iSeg VOC \(released code\)' reads the input level 1 .* layer 2 at "
                                           r"1/2 of the latent size, but this model has 1 input layers there"):
        segment(sd15, clip, vae, image(), "cat", "iSeg VOC (released code)", resolution=96)
    cond, _ = encode_segmentation_prompt(clip, "a cat", "cat")
    heads = CapturePlan(self_layers=(LayerPick("output", 0, 1),), self_heads=(1, 2), source="iSeg VOC (released code)")
    with pytest.raises(AttnSegError, match=r"reads heads 2 of the self-attention of output block 7 \(depth 0\), "
                                           r"which has 2 heads \(0 to 1\)"):
        segment_image(sd15, vae, image(), cond, [100], 0, 96, heads)
    with pytest.raises(AttnSegError, match=r"'GoCA SD1.5 \(released code\)' reads the input level 0 .* layer 2"):
        segment(sd15, clip, vae, image(), "cat", "GoCA SD1.5 (released code)", resolution=96)
    sdxl = tiny_unet(SDXL_LAYOUT, seed=2)
    with pytest.raises(AttnSegError, match=r"'iSeg \(paper text\)' reads attention level 2 \(0 = finest\) but this "
                                           r"model has 2 attention levels"):
        segment(sdxl, clip, vae, image(), "cat", "iSeg (paper text)", resolution=96)


def test_a_goca_preset_refuses_a_head_mean_store_naming_the_capture_preset(sd15, clip, vae):
    cond, _ = NODES["AttnSegTextEncode"]().encode(clip, "a cat on a mat", "cat, mat")
    store, = NODES["AttnSegSegmentImage"]().segment(sd15, vae, image(), cond, "100", 0, 96)
    with pytest.raises(AttnSegError, match=r"On the capture node set preset to 'GoCA SD1.5 \(released code\)'"):
        NODES["AttnSegGoCA"]().segment(store, "auto", True, 5, 2, "mat", preset="GoCA SD1.5 (released code)")
