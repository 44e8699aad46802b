import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # normally done by tests/conftest.py; kept for standalone runs
    sys.path.insert(0, ROOT)

import itertools

import numpy as np
import pytest

from demo.scenes import (COLOURS, SHAPES, Scene, SceneObject, colour_mask,
                         make_dataset, make_scene)

SEEDS = range(60)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return make_dataset(SEEDS)


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion. Outside the image counts as unset, so an object
    touching the border loses its (partially covered) border pixels too."""
    padded = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    out = np.ones_like(mask)
    for dy, dx in itertools.product(range(3), range(3)):
        out &= padded[dy:dy + h, dx:dx + w]
    return out


def _dist(pixels: np.ndarray, rgb) -> np.ndarray:
    return np.linalg.norm(pixels.astype(np.float64) - np.array(rgb, dtype=np.float64), axis=-1)


def test_vocabulary_colours_far_apart():
    assert len(COLOURS) == 6 and len(SHAPES) == 4
    for a, b in itertools.combinations(COLOURS.values(), 2):
        assert np.linalg.norm(np.subtract(a, b)) >= 120


def test_determinism():
    a, b = make_scene(123), make_scene(123)
    assert np.array_equal(a.image, b.image)
    assert a.caption == b.caption and a.seed == b.seed == 123
    assert a.objects == b.objects  # shape/colour (masks compare=False)
    for oa, ob in zip(a.objects, b.objects):
        assert np.array_equal(oa.mask, ob.mask)
    assert np.array_equal(a.label_map(), b.label_map())
    # Different seeds give different scenes.
    images = [make_scene(s).image for s in range(10)]
    for x, y in itertools.combinations(images, 2):
        assert not np.array_equal(x, y)


def test_types_and_caption(scenes):
    counts = set()
    for s in scenes:
        assert s.image.dtype == np.uint8 and s.image.shape == (64, 64, 3)
        assert 1 <= len(s.objects) <= 3
        counts.add(len(s.objects))
        colours = [o.colour for o in s.objects]
        assert len(set(colours)) == len(colours)  # a colour word names one object
        for o in s.objects:
            assert isinstance(o, SceneObject)
            assert o.shape in SHAPES and o.colour in COLOURS
            assert o.mask.dtype == bool and o.mask.shape == (64, 64)
        assert s.caption == " and ".join(f"a {o.colour} {o.shape}" for o in s.objects)
        assert s.class_names == [f"{o.colour} {o.shape}" for o in s.objects]
        words = s.caption.split(" and ")
        assert [w.split()[1:] for w in words] == [n.split() for n in s.class_names]
    assert counts == {1, 2, 3}


def test_label_map_consistency(scenes):
    for s in scenes:
        labels = s.label_map()
        assert labels.dtype == np.int64 and labels.shape == (64, 64)
        assert labels.min() >= 0 and labels.max() <= len(s.objects)
        for i, o in enumerate(s.objects):
            visible = labels == i + 1
            assert visible.any()
            assert visible.sum() >= 0.4 * o.mask.sum()
            assert not (visible & ~o.mask).any()
            # Deep inside the visible region the pixel is the flat object colour.
            core = _erode(visible)
            assert (_dist(s.image[core], COLOURS[o.colour]) <= 30).all(), (s.seed, o)
        # Background never looks like an object. Only pixels at least one pixel
        # away from every object are checked: a label-0 pixel where two objects
        # each cover < 50% can legitimately blend into a third colour (e.g. a
        # red/yellow edge looks orange). With a single object every label-0
        # pixel, antialiased edges included, must pass.
        bg = s.image[(labels == 0) if len(s.objects) == 1 else _erode(labels == 0)]
        for rgb in COLOURS.values():
            assert (_dist(bg, rgb) > 60).all(), s.seed


def test_topmost_object_wins():
    # Find a scene with an overlap and check the later object owns it.
    for seed in range(200):
        s = make_scene(seed)
        labels = s.label_map()
        for (i, a), (j, b) in itertools.combinations(enumerate(s.objects), 2):
            overlap = a.mask & b.mask
            if overlap.any():
                assert (labels[overlap] >= j + 1).all()
                return
    pytest.fail("no overlapping objects in 200 scenes")


def test_colour_mask_recovers_objects(scenes):
    ious = []
    for s in scenes:
        labels = s.label_map()
        for i, o in enumerate(s.objects):
            visible = labels == i + 1
            found = colour_mask(s.image, o.colour)
            iou = (visible & found).sum() / (visible | found).sum()
            ious.append(iou)
            assert iou >= 0.8, (s.seed, o, iou)
    assert np.mean(ious) >= 0.9


def test_colour_mask_unknown_colour():
    with pytest.raises(ValueError):
        colour_mask(np.zeros((4, 4, 3), np.uint8), "magenta")


@pytest.mark.parametrize("width,height", [(96, 64), (64, 96), (40, 24)])
def test_non_square(width, height):
    for seed in range(20):
        s = make_scene(seed, width=width, height=height)
        assert s.image.shape == (height, width, 3)
        assert s.label_map().shape == (height, width)
        for o in s.objects:
            assert o.mask.shape == (height, width)
            assert o.mask.any()


def test_max_objects():
    assert all(len(s.objects) == 1 for s in make_dataset(range(10), max_objects=1))
    many = make_dataset(range(50), max_objects=6)
    assert max(len(s.objects) for s in many) >= 5
    with pytest.raises(ValueError):
        make_scene(0, max_objects=0)


def test_objects_inside_image(scenes):
    # Every object's mask has a margin-free bounding box inside the image and a
    # size within the 25%..50% range (allowing for rasterisation).
    for s in scenes:
        for o in s.objects:
            ys, xs = np.nonzero(o.mask)
            extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            assert 0.2 * 64 <= extent <= 0.5 * 64 + 2, (s.seed, o, extent)


def test_many_scenes_run():
    scenes = make_dataset(range(200))
    assert len(scenes) == 200
    assert len({s.caption for s in scenes}) > 50


def test_the_demo_image_of_a_random_scene_is_that_scene_with_its_caption_and_classes():
    from demo.images import SHIPPED, demo_image
    scene = make_scene(7, width=160, height=96)
    pixels, caption, classes = demo_image("random scene", 7, 160, 96)
    assert np.array_equal(pixels, scene.image) and caption == scene.caption and classes == scene.class_names
    shipped, caption, classes = demo_image(SHIPPED, 0, 64, 64)
    assert shipped.shape == (128, 192, 3) and classes == ["red circle", "blue square"]
    assert caption == "a red circle and a blue square"
