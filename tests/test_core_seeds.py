"""Seeds in image pixels -> cells on the self-attention grid -> propagated maps."""

import pytest
import torch

from attnseg import AttnSegError
from attnseg.seeds import parse_seeds, seeded_maps


def test_points_lines_and_boxes_land_on_the_right_cells():
    # A 64 x 128 image (h, w) on a 4 x 8 grid: 16-pixel cells.
    seeds = parse_seeds('[{"point": [20, 40]}, {"line": [[0, 8], [40, 8]], "label": "edge"},'
                        ' {"box": [100, 20, 127, 63]}]', (64, 128), (4, 8))
    assert [s.label for s in seeds] == ["point 1", "edge", "box 3"]
    assert seeds[0].cells == (2 * 8 + 1,)
    assert seeds[1].cells == (0, 1, 2)
    assert set(seeds[2].cells) == {r * 8 + c for r in (1, 2, 3) for c in (6, 7)}


@pytest.mark.parametrize("text, message", [
    ("", "not valid JSON"), ("[]", "at least one seed"), ('[{"point": [1]}]', r"\[x, y\]"),
    ('[{"point": [1, 2], "box": [0, 0, 1, 1]}]', "exactly one"), ('[{"line": [[1, 2]]}]', "two or more"),
    ('[{"box": [0, 0, 300, 10]}]', "outside the 128x64 image"),
])
def test_bad_seeds_are_named(text, message):
    with pytest.raises(AttnSegError, match=message):
        parse_seeds(text, (64, 128), (4, 8))


def test_a_seed_spreads_over_its_region_of_a_block_self_attention():
    """Two regions on a 4 x 4 grid (left / right halves) that attend only within themselves."""
    left = torch.tensor([c % 4 < 2 for c in range(16)])
    same = (left[:, None] == left[None, :]).float()
    self_attention = (same / same.sum(-1, keepdim=True))[None]
    seeds = parse_seeds('[{"point": [5, 5]}, {"line": [[40, 10], [40, 60]]}]', (64, 64), (4, 4))
    maps = seeded_maps(self_attention, (4, 4), seeds, (64, 64), iterations=3)
    assert maps.maps.shape == (1, 2, 4, 4)
    assert torch.allclose(maps.maps[0, 0].flatten()[left], torch.ones(8))
    assert torch.allclose(maps.maps[0, 0].flatten()[~left], torch.zeros(8))
    assert torch.allclose(maps.maps[0, 1].flatten()[~left], torch.ones(8))
