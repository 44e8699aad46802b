"""Seeds in image pixels -> cells on the self-attention grid -> propagated maps."""

import pytest
import torch

from attnseg import AttnSegError
from attnseg.seeds import parse_seeds, seeded_maps


def test_points_lines_and_boxes_land_on_the_right_cells():
    # A 64 x 128 image (h, w) on a 4 x 8 grid: 16-pixel cells.
    seeds = parse_seeds('[{"point": [20, 40]}, {"line": [[0, 8], [40, 8]], "label": "edge"},'
                        ' {"box": [100, 20, 128, 64]}]', (64, 128), (4, 8))
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


def block_self_attention(h: int, w: int, block, sigma: float = 2.0, across: float = 0.02) -> tuple:
    """A self-attention on an h x w grid: a Gaussian neighbourhood, damped across
    the border of one rectangular object (rows r0..r1, cols c0..c1, end exclusive)."""
    r0, r1, c0, c1 = block
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    inside = ((rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)).flatten()
    position = torch.stack([rows.flatten(), cols.flatten()], 1).float()
    kernel = torch.exp(-torch.cdist(position, position) ** 2 / (2 * sigma ** 2))
    same = (inside[:, None] == inside[None, :]).float()
    kernel = kernel * (same + across * (1 - same))
    return (kernel / kernel.sum(-1, keepdim=True))[None], inside


def old_default_operator(s: torch.Tensor, lam: float = 0.01) -> torch.Tensor:
    """The pack's former default: the paper's step on the raw S (rows the clamp
    empties keep their attention), written out."""
    refined = (s + lam * (1 + torch.log(s.clamp_min(1e-8)))).clamp_min(0)
    refined = torch.where(refined.sum(-1, keepdim=True) > 0, refined, s)
    return refined / refined.sum(-1, keepdim=True)


def test_a_clicked_point_fills_its_object_with_the_interactive_defaults_on_a_64x64_grid():
    from attnseg.iseg import iterate

    s, inside = block_self_attention(64, 64, (16, 40, 20, 48))
    seeds = parse_seeds('[{"point": [260, 200]}]', (512, 512), (64, 64))  # inside the object
    mask = seeded_maps(s, (64, 64), seeds, (512, 512)).maps[0, 0].flatten() > 0.5
    assert float((mask & inside).sum() / (mask | inside).sum()) >= 0.9
    # The former default (paper step on the raw S, lambda 0.01, N 10) keeps the click's neighbourhood only.
    seed = torch.zeros(1, 64 * 64, 1)
    seed[0, seeds[0].cells[0]] = 1
    old = iterate(seed, old_default_operator(s), 10)[0, :, 0]
    old_mask = old / old.max() > 0.5
    assert float((old_mask & inside).sum() / (old_mask | inside).sum()) < 0.2


def test_a_box_ends_before_its_far_corner_as_in_image_coordinates():
    # A 64 x 64 image on an 8 x 8 grid: 8-pixel cells; [8, 8, 24, 16) covers cells x 1..2, y 1.
    seeds = parse_seeds('[{"box": [8, 8, 24, 16]}]', (64, 64), (8, 8))
    assert set(seeds[0].cells) == {1 * 8 + 1, 1 * 8 + 2}
    tiny = parse_seeds('[{"box": [9, 9, 10, 10]}]', (64, 64), (8, 8))
    assert tiny[0].cells == (1 * 8 + 1,)  # a box inside one cell keeps that cell
