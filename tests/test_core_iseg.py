"""iSeg's Ent-Self operator and iteration on hand-built matrices."""

import math

import pytest
import torch

from attnseg import AttentionStore, AttnSegError, LayerKey
from attnseg.iseg import ent_self, iseg, iseg_cross_maps, iterate, normalise_l1
from attnseg.tokens import ClassTokens, SegPrompt


def test_paper_variant_matches_the_formula_by_hand():
    s = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.5, 0.5, 0.0]]])
    lam = 0.05
    by_hand = []
    for row in s[0].tolist():
        refined = [max(0.0, v + lam * (1 + math.log(max(v, 1e-8)))) for v in row]
        by_hand.append([v / sum(refined) for v in refined])
    assert torch.allclose(ent_self(s, lam, "paper")[0], torch.tensor(by_hand), atol=1e-6)


def test_code_variant_normalises_columns_then_adds_the_log10_term():
    s = torch.tensor([[[0.6, 0.4], [0.2, 0.8]]])
    lam = 0.1
    column_max = [0.6, 0.8]
    by_hand = []
    for row in s[0].tolist():
        hat = [v / m for v, m in zip(row, column_max)]
        refined = [max(0.0, h + lam * math.log10(math.e * h)) for h in hat]
        by_hand.append([v / sum(refined) for v in refined])
    assert torch.allclose(ent_self(s, lam, "code")[0], torch.tensor(by_hand), atol=1e-6)


@pytest.mark.parametrize("variant", ["paper", "code", "naive"])
def test_the_refined_operators_are_row_stochastic(variant):
    torch.manual_seed(0)
    s = torch.softmax(torch.randn(2, 30, 30) * 2, dim=-1)
    refined = ent_self(s.half(), 0.01, variant)
    assert refined.dtype == torch.float32 and bool((refined >= 0).all())
    assert torch.allclose(refined.sum(-1), torch.ones(2, 30), atol=1e-5)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_ent_self_lowers_row_entropy(variant):
    torch.manual_seed(0)
    s = torch.softmax(torch.randn(2, 30, 30) * 2, dim=-1)

    def entropy(p):
        return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()

    assert entropy(ent_self(s, 0.05, variant)) < entropy(s)


def chain(labels: list[int], sigma: float = 5.0, across: float = 0.3) -> torch.Tensor:
    """A self-attention over pixels on a line: a Gaussian neighbourhood, damped
    by ``across`` between different objects; rows sum to 1."""
    position = torch.arange(len(labels)).float()
    label = torch.tensor(labels)
    same = (label[:, None] == label[None, :]).float()
    kernel = torch.exp(-(position[:, None] - position[None, :]) ** 2 / (2 * sigma ** 2)) * (same + across * (1 - same))
    return (kernel / kernel.sum(-1, keepdim=True))[None]


def leak(maps: torch.Tensor, inside: torch.Tensor) -> float:
    """Mean min-max normalised score outside the object."""
    m = maps[0, :, 0]
    m = (m - m.min()) / (m.max() - m.min())
    return float(m[~inside].mean())


def test_ent_self_keeps_a_map_on_its_object_where_the_naive_iteration_drifts():
    """The paper's Fig. 1 trend on a synthetic self-attention (three objects on a
    line, attention leaking across borders): iterating the raw S spreads the
    first object's map further with every step; Ent-Self holds it."""
    labels = [0] * 10 + [1] * 10 + [2] * 20
    s, inside = chain(labels), torch.tensor(labels) == 0
    seed = inside.float()[None, :, None]
    naive = [leak(iterate(seed, ent_self(s, 0.0, "naive"), n), inside) for n in (1, 5, 10, 20)]
    paper = [leak(iterate(seed, ent_self(s, 0.01, "paper"), n), inside) for n in (1, 5, 10, 20)]
    code = [leak(iterate(seed, ent_self(s, 0.05, "code"), n), inside) for n in (1, 5, 10, 20)]
    assert naive == sorted(naive) and naive[-1] > 0.2
    assert max(paper) < 0.05
    assert all(c < n for c, n in zip(code[1:], naive[1:]))


def test_a_block_diagonal_self_attention_holds_a_seed_on_its_block():
    """The paper's ground-truth analysis: with no leakage the iteration fills the
    seed's object and never leaves it."""
    s = chain([0] * 12 + [1] * 12, across=0.0)
    seed = torch.zeros(1, 24, 1)
    seed[0, 2, 0] = 1.0
    for variant in ("paper", "code", "naive"):
        for n in (1, 10, 50):
            maps = iterate(seed, ent_self(s, 0.01, variant), n)
            assert float(maps[0, 12:, 0].abs().max()) < 1e-6
        assert float(maps[0, :12, 0].min()) > 0


def test_rows_the_paper_step_would_empty_keep_their_attention():
    flat = torch.full((1, 100, 100), 0.01)  # 0.01 + 0.1 (1 + ln 0.01) < 0: every entry clamped
    peaked = torch.tensor([[[0.97, 0.01, 0.01, 0.01]] * 4])
    assert torch.allclose(ent_self(flat, 0.1, "paper"), flat)
    assert torch.allclose(ent_self(peaked, 0.1, "paper")[0, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_iterate_normalises_and_refuses_negative_counts():
    maps = torch.tensor([[[1.0, 5.0], [3.0, 5.0], [2.0, 6.0]]])
    assert torch.allclose(normalise_l1(maps)[0, :, 0], torch.tensor([0.0, 2 / 3, 1 / 3]))
    assert torch.equal(iterate(maps, torch.eye(3)[None], 0), normalise_l1(maps))
    with pytest.raises(AttnSegError, match="iterations"):
        iterate(maps, torch.eye(3)[None], -1)
    with pytest.raises(AttnSegError, match="lambda"):
        ent_self(torch.eye(3)[None], -0.1)


PROMPT = SegPrompt("a cat", (ClassTokens("cat", (2,)),), 4, ("", "a", "cat", ""))


def iseg_store() -> AttentionStore:
    """Latent 8x8: self-attention on 8x8, cross-attention on 4x4 (2x) and 2x2 (4x);
    the cat token attends the left half at both resolutions."""
    store = AttentionStore("test", 1, (8, 8), (64, 64), PROMPT)
    for factor, side in ((2, 4), (4, 2)):
        maps = torch.full((1, side * side, 4), 0.1)
        left = torch.zeros(side, side, dtype=torch.bool)
        left[:, : side // 2] = True
        maps[0, left.flatten(), 2] = 1.0
        store.add(LayerKey("cross", "output", factor, 0, factor), "cond", (side, side), maps)
    store.add(LayerKey("self", "output", 9, 0, 1), "cond", (8, 8), torch.eye(64)[None])
    return store


def test_iseg_fuses_the_chosen_resolutions_and_refines_on_the_self_attention_grid():
    store = iseg_store()
    initial = iseg_cross_maps(store, target_grid=(8, 8))
    assert initial.shape == (1, 1, 8, 8)
    # Each level is L1-normalised per token, so both count: the left half wins.
    assert float(initial[0, 0, :, :3].min()) > float(initial[0, 0, :, 5:].max())
    result = iseg(store, iterations=3)
    assert result.maps.shape == (1, 1, 8, 8) and result.class_names == ["cat"]
    assert float(result.maps[0, 0, :, :2].min()) > 0.9 and float(result.maps[0, 0, :, 6:].max()) < 0.1


def test_iseg_names_a_missing_resolution():
    store = iseg_store()
    with pytest.raises(AttnSegError, match="no cross-attention 8x below"):
        iseg_cross_maps(store, factors=(8,), weights=(1.0,))
