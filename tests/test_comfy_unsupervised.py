"""AttnSeg Unsupervised Segments through the real ComfyUI: a capture of every
layer's self-attention on a tiny SD1.5-layout UNet, the node's outputs, its
presets, naming and bad input."""

import pytest
import torch

from comfy_env import import_pack
from tiny_models import SD15_LAYOUT, tiny_unet

pack = import_pack()
from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.attnseg.diffseg import aggregate, diffseg  # noqa: E402
from attnseg_pack.attnseg.presets import PRESETS  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def captured(clip, vae):
    model = tiny_unet(SD15_LAYOUT, seed=1)
    image = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(0))
    conditioning, _ = NODES["AttnSegTextEncode"]().encode(clip, "a cat on a mat", "cat, mat", 1.0, True, "custom")
    (store,) = NODES["AttnSegSegmentImage"]().segment(model, vae, image, conditioning, "300", 0, 128,
                                                      self_layers="all (GoCA)")
    plain = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    (unnamed,) = NODES["AttnSegSegmentImage"]().segment(model, vae, image, plain, "300", 0, 128,
                                                        self_layers="all (GoCA)")
    return image, store, unnamed


def run(store, image=None, **inputs):
    values = dict(anchors=8, tau=1.1, passes=3, refinement="off", lam=0.015, iterations=10, preset="custom")
    values.update(inputs)
    return NODES["AttnSegUnsupervised"]().segment(store, image=image, **values)


def test_every_resolution_is_aggregated_and_the_node_names_the_segments(captured):
    image, store, _ = captured
    grids = {stored.grid for _, stored in store.layers("self")}
    assert grids == {(16, 16), (8, 8), (4, 4), (2, 2)}  # the latent and three coarser levels
    assert len(aggregate(store)[0].levels) == 4
    out = run(store, image, tau=0.01)  # the random model's attention is nearly flat: a small tau splits it
    masks, labels, segments, preview, scores, names = out["result"]
    count = int(segments.max())
    assert count > 10
    assert segments.shape == labels.shape == (1, 96, 96)
    assert set(segments.unique().tolist()) == set(range(1, count + 1))  # one segment per pixel, none empty
    assert masks.shape == (2, 96, 96)  # named: one mask per class (cat, mat)
    assert torch.equal(masks.sum(0) > 0, labels[0] > 0)
    assert preview.shape[1] > 96 and preview.shape[2] == 96 and preview.shape[3] == 3
    assert scores.maps.shape[1] == count and scores.class_names[0] == "segment 1"
    assert names.startswith(f"image 1: {count} segments: 1 ") and ("cat" in names or "mat" in names)
    assert len(out["ui"]["images"]) == 2  # the named labels and the raw segments
    # A threshold above every score leaves every segment unknown.
    _, unknown, _, _, _, described = run(store, image, tau=0.01, name_threshold=1.0)["result"]
    assert unknown.max() == 0 and described.count("unknown") == count


def test_a_preset_fixes_the_knobs_and_equals_its_values_given_by_hand(captured):
    image, store, _ = captured
    chosen = PRESETS["iSeg unsupervised COCO-Stuff (paper)"]
    assert chosen.capture.timesteps == (300,) and chosen.capture.self_every_layer
    s = chosen.settings
    # The grid is 16x16: the preset's 16 anchors fit; the node's own (wrong) inputs are ignored.
    by_preset = run(store, image, anchors=1, tau=9.0, preset=chosen.name)["result"]
    by_hand = run(store, image, anchors=s.anchors, tau=s.tau, passes=s.passes, refinement=s.refinement,
                  lam=s.lam, iterations=s.iterations)["result"]
    assert torch.equal(by_preset[2], by_hand[2])
    assert by_preset[5] == by_hand[5]


def test_without_classes_the_segments_come_unnamed(captured):
    image, _, unnamed = captured
    masks, labels, segments, _, _, names = run(unnamed, image)["result"]
    count = int(segments.max())
    assert torch.equal(labels, segments) and masks.shape == (count, 96, 96)
    assert names == f"image 1: {count} segments"
    with pytest.raises(AttnSegError, match="naming: 'on' needs classes"):
        run(unnamed, naming="on")
    off = run(captured[1], image, naming="off")["result"]
    assert torch.equal(off[1], off[2])  # naming off: the label map is the segments


def test_bad_input_is_refused_with_the_input_named(captured):
    image, store, _ = captured
    with pytest.raises(AttnSegError, match="weights: 2 weights for 4 self-attention resolutions"):
        run(store, weights="1, 2")
    with pytest.raises(AttnSegError, match="anchors: 32 per side is more than the 16x16"):
        run(store, anchors=32)
    with pytest.raises(AttnSegError, match="image: 2 images but 1 were segmented"):
        run(store, image.repeat(2, 1, 1, 1))
    with pytest.raises(AttnSegError, match="does not have the aspect ratio"):
        run(store, torch.rand(1, 96, 48, 3))


def test_the_preview_follows_a_larger_copy_of_the_image(captured):
    image, store, _ = captured
    big = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(192, 192)).movedim(1, -1)
    small = run(store, image)["result"][2]
    large = run(store, big)["result"][2]
    assert large.shape == (1, 192, 192)
    assert torch.equal(large[:, ::2, ::2], small)
    assert torch.equal(diffseg(store, 8).labels.float(), small)

