"""User seeds (points, lines, boxes in image pixels) as initial maps for the
Ent-Self iteration: segmenting "the thing I clicked", with no text.

Seeds are JSON: a list of objects, each one of
``{"point": [x, y]}``, ``{"line": [[x, y], [x, y], ...]}`` or
``{"box": [x0, y0, x1, y1]}``, with an optional ``"label"``. One mask per seed."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .errors import AttnSegError
from .iseg import ent_self, iterate
from .scores import ScoreMaps

SEED_KINDS = ("point", "line", "box")


@dataclass(frozen=True)
class Seed:
    kind: str
    label: str
    cells: tuple[int, ...]  # flat indices on the grid


def _number_pair(value, what: str) -> tuple[float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
        raise AttnSegError(f"seeds: {what} must be [x, y] in image pixels, got {json.dumps(value)}.")
    return float(value[0]), float(value[1])


def _cell(x: float, y: float, image_size: tuple[int, int], grid: tuple[int, int], what: str) -> int:
    height, width = image_size
    if not (0 <= x <= width and 0 <= y <= height):
        raise AttnSegError(f"seeds: {what} ({x:g}, {y:g}) is outside the {width}x{height} image "
                           f"(x from 0 to {width}, y from 0 to {height}).")
    row = min(int(y / height * grid[0]), grid[0] - 1)
    col = min(int(x / width * grid[1]), grid[1] - 1)
    return row * grid[1] + col


def _line_cells(points, image_size, grid, what: str) -> tuple[int, ...]:
    """Cells the polyline passes through, sampled at a quarter of a cell."""
    step = min(image_size[0] / grid[0], image_size[1] / grid[1]) / 4
    cells: list[int] = []
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        count = max(1, int(max(abs(x1 - x0), abs(y1 - y0)) / step))
        for i in range(count + 1):
            cell = _cell(x0 + (x1 - x0) * i / count, y0 + (y1 - y0) * i / count, image_size, grid, what)
            if cell not in cells:
                cells.append(cell)
    return tuple(cells)


def parse_seeds(text: str, image_size: tuple[int, int], grid: tuple[int, int]) -> list[Seed]:
    """JSON seeds in image pixels -> cells on ``grid`` ((h, w), same aspect as the image)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise AttnSegError(f"seeds: not valid JSON ({error.msg} at character {error.pos}). Example: "
                           f'[{{"point": [120, 80]}}, {{"box": [10, 10, 60, 50]}}].')
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not items:
        raise AttnSegError('seeds: give at least one seed, e.g. [{"point": [120, 80]}].')
    seeds = []
    for index, item in enumerate(items):
        kinds = [k for k in SEED_KINDS if isinstance(item, dict) and k in item]
        if len(kinds) != 1:
            raise AttnSegError(f"seeds: entry {index + 1} must have exactly one of {', '.join(SEED_KINDS)}; "
                               f"got {json.dumps(item)}.")
        kind = kinds[0]
        label = str(item.get("label", f"{kind} {index + 1}"))
        what = f"{kind} {index + 1}"
        value = item[kind]
        if kind == "point":
            cells = (_cell(*_number_pair(value, what), image_size, grid, what),)
        elif kind == "line":
            if not isinstance(value, list) or len(value) < 2:
                raise AttnSegError(f"seeds: {what} needs two or more [x, y] points.")
            cells = _line_cells([_number_pair(p, what) for p in value], image_size, grid, what)
        else:
            if not (isinstance(value, list) and len(value) == 4):
                raise AttnSegError(f"seeds: {what} must be [x0, y0, x1, y1] in image pixels.")
            x0, y0 = _number_pair(value[:2], what)
            x1, y1 = _number_pair(value[2:], what)
            first = _cell(min(x0, x1), min(y0, y1), image_size, grid, what)
            _cell(max(x0, x1), max(y0, y1), image_size, grid, what)  # inside the image
            # The far edge is exclusive, as in image coordinates (and the authors' UI):
            # the cells from the first corner's up to, not including, the far corner's.
            row_end = int(max(y0, y1) / image_size[0] * grid[0])
            col_end = int(max(x0, x1) / image_size[1] * grid[1])
            rows = range(first // grid[1], max(row_end, first // grid[1] + 1))
            cols = range(first % grid[1], max(col_end, first % grid[1] + 1))
            cells = tuple(r * grid[1] + c for r in rows for c in cols)
        seeds.append(Seed(kind, label, cells))
    return seeds


# The authors' interactive mode (ui/run.py): the code variant with lambda 0.1,
# 50 iterations, the refined operator clamped to [0, 1].
SEED_LAMBDA = 0.1
SEED_ITERATIONS = 50
SEED_VARIANT = "code"
SEED_CLAMP_MAX = 1.0


def seeded_maps(self_attention: torch.Tensor, grid: tuple[int, int], seeds: list[Seed], image_size,
                lam: float = SEED_LAMBDA, iterations: int = SEED_ITERATIONS, variant: str = SEED_VARIANT,
                clamp_max: float | None = SEED_CLAMP_MAX) -> ScoreMaps:
    """Each seed propagated by the Ent-Self iteration: a point or a box is one
    initial map; a line's cells are propagated one by one, each max-normalised,
    then averaged (so a long line is not dominated by where its cells cluster);
    each seed's map is then divided by its maximum, as the authors' UI does."""
    batch, n = self_attention.shape[:2]
    columns, owner = [], []
    for index, seed in enumerate(seeds):
        groups = [seed.cells] if seed.kind != "line" else [(c,) for c in seed.cells]
        for cells in groups:
            column = torch.zeros(n, device=self_attention.device)
            column[list(cells)] = 1.0
            columns.append(column)
            owner.append(index)
    initial = torch.stack(columns, dim=-1).expand(batch, n, len(columns))
    propagated = iterate(initial, ent_self(self_attention, lam, variant, clamp_max), iterations)
    propagated = propagated / propagated.amax(dim=1, keepdim=True).clamp_min(1e-12)
    owner_index = torch.tensor(owner, device=propagated.device)
    maps = torch.stack([propagated[..., owner_index == i].mean(-1) for i in range(len(seeds))], dim=1)
    maps = maps / maps.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return ScoreMaps(maps.unflatten(-1, grid), [s.label for s in seeds], image_size, "iseg-seeds")
