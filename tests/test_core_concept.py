"""ConceptAttention's math on constructed tensors: the softmax over concepts,
the class whose output an image token aligns with winning, the running mean
over blocks and steps, and the maps laid out row-major on a non-square grid."""

import pytest
import torch

from attnseg.concept import ConceptMaps, concept_scores
from attnseg.errors import AttnSegError


def test_scores_are_a_softmax_over_concepts_of_output_dot_products():
    g = torch.Generator().manual_seed(0)
    image, concepts = torch.randn(2, 6, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    scores = concept_scores(image, concepts)
    assert scores.shape == (2, 6, 3) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(-1), torch.ones(2, 6))
    expected = torch.einsum("bnd,bcd->bnc", image.double(), concepts.double()).softmax(-1)
    torch.testing.assert_close(scores.double(), expected, atol=1e-6, rtol=0)


def test_the_concept_an_image_token_aligns_with_wins():
    concepts = torch.eye(3, 16)[None] * 4  # three orthogonal concept outputs
    labels = torch.tensor([2, 0, 1, 1, 0, 2])
    image = concepts[0, labels][None] + 0.1 * torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1))
    scores = concept_scores(image.half(), concepts.half())  # the model's dtype in, fp32 out
    assert scores.dtype == torch.float32
    assert torch.equal(scores[0].argmax(-1), labels)


def test_maps_average_every_block_and_step_alike():
    maps = ConceptMaps(["cat", "dog"])
    parts = [torch.rand(1, 6, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for (block, step), part in zip([(15, 0), (16, 0), (15, 1)], parts):
        maps.add(part, (2, 3), block, step)
    torch.testing.assert_close(maps.mean(), sum(parts) / 3)
    assert maps.blocks == {15, 16} and maps.steps == {0, 1}
    assert torch.equal(parts[0], torch.rand(1, 6, 2, generator=torch.Generator().manual_seed(0)))  # not summed into


def test_score_maps_lay_tokens_out_row_major_at_the_grid():
    # A 2 x 3 token grid: class "b" wins the right column (tokens 2 and 5), "a" the rest.
    scores = torch.tensor([[0.9, 0.1]] * 6)
    scores[[2, 5]] = torch.tensor([0.2, 0.8])
    maps = ConceptMaps(["a", "b"])
    maps.add(scores[None], (2, 3), 15, 0)
    result = maps.score_maps((40, 60), image_key=("key",))
    assert result.maps.shape == (1, 2, 2, 3)
    assert result.class_names == ["a", "b"] and result.image_size == (40, 60) and result.image_key == ("key",)
    assert torch.equal(result.maps[0].argmax(0), torch.tensor([[0, 0, 1], [0, 0, 1]]))
    assert 0 <= float(result.maps.min()) and float(result.maps.max()) <= 1
    torch.testing.assert_close(result.maps.sum(1), torch.ones(1, 2, 3))
    assert "double blocks 15" in result.method


def test_no_maps_and_mismatched_maps_are_refused():
    maps = ConceptMaps(["a"])
    with pytest.raises(AttnSegError, match="no maps were captured"):
        maps.score_maps((8, 8))
    maps.add(torch.ones(1, 6, 1), (2, 3), 0, 0)
    with pytest.raises(AttnSegError, match="install it anew"):
        maps.add(torch.ones(1, 8, 1), (2, 4), 0, 1)
