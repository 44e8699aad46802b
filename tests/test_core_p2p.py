"""Prompt-to-Prompt's token alignment, attention control and local blend on plain tensors."""

import pytest
import torch

from attnseg import AttnSegError
from attnseg.p2p import align_tokens, blend_mask, check_fraction, controlled_cross_attention, local_blend

BOS, EOS, A, CAT, ON, SOFA, DOG, FLUFFY, HEDGE, HOG = 49406, 49407, 320, 2368, 525, 15723, 1929, 11313, 9, 10


def padded(*ids, length=12):
    return [BOS, *ids] + [EOS] * (length - 1 - len(ids))


def test_word_swap_maps_position_by_position():
    src, edit = padded(A, CAT, ON, A, SOFA), padded(A, DOG, ON, A, SOFA)
    replace = align_tokens(src, edit, "replace")
    torch.testing.assert_close(replace.mapper, torch.eye(12))
    assert bool(replace.copied.all())
    refine = align_tokens(src, edit, "refine")
    assert refine.copied.tolist() == [True, True, False] + [True] * 9  # the swapped word keeps its own maps


def test_inserted_word_shifts_the_rest_and_keeps_its_own_attention():
    src, edit = padded(A, CAT, ON, A, SOFA), padded(A, FLUFFY, CAT, ON, A, SOFA)
    alignment = align_tokens(src, edit, "refine")
    assert not bool(alignment.copied[2])  # "fluffy"
    for i, j in ((0, 0), (1, 1), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)):
        assert float(alignment.mapper[i, j]) == 1.0
    assert float(alignment.mapper[:, 2].sum()) == 0.0


def test_one_word_replaced_by_two_tokens_splits_its_attention():
    src, edit = padded(A, CAT, ON, A, SOFA), padded(A, HEDGE, HOG, ON, A, SOFA)
    alignment = align_tokens(src, edit, "replace")
    assert alignment.mapper[2, 2:4].tolist() == [0.5, 0.5] and bool(alignment.copied[2:4].all())
    probs = torch.rand(2, 5, 12).softmax(-1)
    edited = controlled_cross_attention(probs, torch.rand(2, 5, 12).softmax(-1), alignment, replace=True)
    # the source's mass is kept (one padding EOS less in the edit takes nothing away but its own column)
    torch.testing.assert_close(edited[..., 2] + edited[..., 3], probs[..., 2])


def test_control_copies_then_reweights():
    src, edit = padded(A, CAT), padded(A, DOG)
    alignment = align_tokens(src, edit, "replace")
    source, own = torch.rand(1, 4, 12).softmax(-1), torch.rand(1, 4, 12).softmax(-1)
    torch.testing.assert_close(controlled_cross_attention(source, own, alignment, replace=True), source)
    torch.testing.assert_close(controlled_cross_attention(source, own, alignment, replace=False), own)
    weights = torch.ones(12)
    weights[2] = 2.0
    reweighted = controlled_cross_attention(source, own, alignment, replace=True, reweight=weights)
    torch.testing.assert_close(reweighted[..., 2], 2 * source[..., 2])
    torch.testing.assert_close(reweighted[..., 3:], source[..., 3:])


def test_mode_and_fractions_are_checked():
    with pytest.raises(AttnSegError, match="mode: 'swap'"):
        align_tokens([1], [1], "swap")
    with pytest.raises(AttnSegError, match="cross_replace: 1.5 is outside"):
        check_fraction(1.5, "cross_replace")


def test_blend_mask_is_the_union_grown_and_softened():
    masks = torch.zeros(2, 8, 8)
    masks[0, 1, 1] = 1
    masks[1, 6, 6] = 1
    union = blend_mask(masks, (8, 8))
    assert union.shape == (1, 1, 8, 8) and float(union.sum()) == 2.0
    grown = blend_mask(masks, (8, 8), dilate=1)
    assert float(grown.sum()) == 18.0  # two 3x3 squares
    soft = blend_mask(masks, (8, 8), dilate=1, feather=1)
    assert 0 < float(soft[0, 0, 3, 3]) < 1 and float(soft[0, 0, 1, 1]) > 0.5


def test_local_blend_keeps_the_reference_outside_the_mask():
    edited, reference = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    out = local_blend(edited, reference, mask)
    assert torch.equal(out[..., 0, 0], reference[..., 0, 0])
    torch.testing.assert_close(out[..., 3, 3], edited[..., 3, 3])
    assert torch.equal(local_blend(edited, reference, torch.zeros(1, 1, 8, 8)), reference)
