"""The shape-presence score (demo/evaluate.py shapes_present): the guidance
benchmark's colour-independent prompt-adherence measure, checked on rendered
scenes whose shapes are known."""

import numpy as np

from comfy_env import import_pack

import_pack()

from demo import evaluate  # noqa: E402
from demo.scenes import COLOURS, SHAPES, make_scene  # noqa: E402


def _unoccluded(scene) -> bool:
    return all((scene.label_map() == index + 1).sum() >= 0.95 * obj.mask.sum()
               for index, obj in enumerate(scene.objects))


def test_every_visible_shape_is_found_on_rendered_scenes():
    scenes = [evaluate.scene(seed) for seed in range(40)]
    present = [evaluate.shapes_present(s.image, s.caption) for s in scenes]
    share = sum(map(sum, present)) / sum(map(len, present))
    assert share >= 0.9, share  # misses are objects mostly hidden by another
    whole = [p for s, p in zip(scenes, present) if _unoccluded(s)]
    assert len(whole) >= 10 and all(all(p) for p in whole)


def test_the_score_ignores_colour_and_counts_each_drawn_shape_once():
    scene = next(s for s in map(evaluate.scene, range(100)) if len(s.objects) == 1 and _unoccluded(s))
    shape = scene.objects[0].shape
    other_colour = next(c for c in COLOURS if c != scene.objects[0].colour)
    assert evaluate.shapes_present(scene.image, f"a {other_colour} {shape}") == [True]
    assert evaluate.shapes_present(scene.image, f"a {other_colour} {shape} and a red {shape}") == [True, False]
    wrong = next(s for s in SHAPES if s != shape)
    assert evaluate.shapes_present(scene.image, f"a red {wrong}") == [False]


def test_a_blank_or_smeared_image_has_no_shapes():
    blank = np.full((128, 128, 3), 128, np.uint8)
    assert evaluate.shapes_present(blank, "a red circle and a blue star") == [False, False]
    bar = blank.copy()
    bar[50:70, 10:118] = COLOURS["red"]  # a large red area that is no demo shape
    assert evaluate.shapes_drawn(bar) == []
    scene = make_scene(3, 128, 128)
    assert evaluate.shape_of(scene.objects[0].mask)[0] == scene.objects[0].shape
