"""iSeg's Ent-Self operator and iteration on hand-built matrices."""

import math

import pytest
import torch

from attnseg import AttentionStore, AttnSegError, LayerKey
from attnseg.iseg import ent_self, iseg, iseg_cross_maps, iterate, normalise_l1
from attnseg.tokens import ClassTokens, SegPrompt


def test_paper_variant_is_the_gradient_step_on_the_column_max_normalised_map():
    s = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.5, 0.5, 0.0]]])
    lam = 0.05
    column_max = [0.7, 0.5, 0.8]
    by_hand = []
    for row in s[0].tolist():
        hat = [v / m for v, m in zip(row, column_max)]
        refined = [max(0.0, h + lam * (1 + math.log(h))) if h > 0 else 0.0 for h in hat]
        by_hand.append([v / sum(refined) for v in refined])
    assert torch.allclose(ent_self(s, lam, "paper")[0], torch.tensor(by_hand), atol=1e-6)
    # The same step as the code's log10 form with lambda scaled by ln 10.
    assert torch.allclose(ent_self(s, lam, "paper"), ent_self(s, lam * math.log(10), "code"), atol=1e-6)


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


def test_clamp_max_caps_the_refined_entries_before_the_rows_are_renormalised():
    """The authors' interactive mode clamps the refined S^ to [0, 1]: a column's
    maximum (S^ = 1) would otherwise grow to 1 + lambda log10(e)."""
    s = torch.tensor([[[0.9, 0.1], [0.3, 0.7]]])
    lam = 0.5
    hat = [[1.0, 0.1 / 0.7], [0.3 / 0.9, 1.0]]
    refined = [[min(1.0, max(0.0, h + lam * math.log10(math.e * h))) for h in row] for row in hat]
    by_hand = [[v / sum(row) for v in row] for row in refined]
    assert torch.allclose(ent_self(s, lam, "code", clamp_max=1.0)[0], torch.tensor(by_hand), atol=1e-6)
    assert not torch.allclose(ent_self(s, lam, "code")[0], torch.tensor(by_hand), atol=1e-3)


def test_the_raw_paper_step_would_empty_rows_that_the_column_max_form_keeps():
    """Why the formula is applied to S^: on a flat 64 x 64 row (every entry ~1/4096)
    S + 0.01 (1 + ln S) is negative everywhere, so the clamp leaves nothing; on S^
    the largest entry of each column is 1 and survives."""
    torch.manual_seed(0)
    s = torch.softmax(torch.randn(1, 4096, 4096) * 0.5, dim=-1)
    raw = (s + 0.01 * (1 + torch.log(s))).clamp_min(0)
    assert float((raw.sum(-1) == 0).float().mean()) > 0.9
    hat = s / s.amax(dim=-2, keepdim=True)
    refined = torch.where(hat > 0, hat + 0.015 * torch.log10(math.e * hat), hat).clamp_min(0)
    assert bool((refined.sum(-1) > 0).all())
    assert torch.allclose(ent_self(s, 0.015, "code"), refined / refined.sum(-1, keepdim=True), atol=1e-6)


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


def test_ent_self_leaks_less_than_the_naive_iteration_at_every_step():
    """The paper's Fig. 1 trend on a synthetic self-attention (three objects on a
    line, attention leaking across borders): iterating the raw S spreads the
    first object's map further with every step; Ent-Self spreads it less, the
    more so the larger lambda."""
    labels = [0] * 10 + [1] * 10 + [2] * 20
    s, inside = chain(labels), torch.tensor(labels) == 0
    seed = inside.float()[None, :, None]

    def leaks(operator):
        return [leak(iterate(seed, operator, n), inside) for n in (1, 5, 10, 20)]

    naive = leaks(ent_self(s, 0.0, "naive"))
    assert naive == sorted(naive) and naive[-1] > 0.2
    for variant, lam in (("paper", 0.01), ("code", 0.015), ("code", 0.1)):
        refined = leaks(ent_self(s, lam, variant))
        assert all(r < n for r, n in zip(refined, naive)), (variant, lam)
    assert all(strong < weak for strong, weak in zip(leaks(ent_self(s, 0.1, "code")),
                                                       leaks(ent_self(s, 0.015, "code"))))


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


def test_rows_the_clamp_would_empty_keep_their_attention():
    # Four peaked rows own every column's maximum; a flat fifth row then has S^ ~ 0.26
    # everywhere, which lambda 5 pushes below 0: that row keeps its attention.
    peaked = 0.96 * torch.eye(4) + 0.01
    s = torch.cat([peaked, torch.full((1, 4), 0.25)])[None]
    refined = ent_self(s, 5.0, "code")
    assert torch.allclose(refined[0, 4], torch.full((4,), 0.25))
    assert torch.allclose(refined[0, :4], torch.eye(4))


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
