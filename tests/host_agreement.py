"""What "the same" means between the ComfyUI host and the diffusers host: the same
attention store entry by entry to fp tolerance, the same score maps and labels
(tests/test_diffusers_agreement.py, tests/test_diffusers_dit_agreement.py)."""

from comfy_env import import_pack

import_pack()
import torch  # noqa: E402

from attnseg_pack.attnseg.masks import make_masks  # noqa: E402
from attnseg_pack.attnseg.scores import resize  # noqa: E402

# Both hosts store maps in fp16 (the store's dtype); fp32 compute differs in the last bits
# (ComfyUI passes the timestep back from its sigma, the text and VAE kernels differ), so maps
# agree to about one fp16 step of each layer's largest value (measured: at most 5.5e-4 of it;
# one fp16 step is 4.9e-4 to 9.8e-4 of a value, so two steps are allowed).
# A capture that read another layer, head, timestep or noise is off by far more: see
# the tests named test_the_tolerance_tells_a_different_noise_apart.
MAP_TOLERANCE = 2e-3  # of the layer's largest map value
# The methods' score maps (min-max normalised, in [0, 1]) then differ by at most 4.5e-5 (measured).
SCORE_TOLERANCE = 1e-3

def assert_same_store(ours, theirs):
    """Layer by layer: the same entries, grids, counts, head counts and maps; the same
    steps, class metadata and per-timestep stores."""
    assert set(ours.entries) == set(theirs.entries)
    assert ours.latent_size == theirs.latent_size and ours.image_size == theirs.image_size
    assert ours.steps == theirs.steps and ours.head_reduction == theirs.head_reduction
    assert ours.prompt.classes == theirs.prompt.classes and ours.prompt.token_count == theirs.prompt.token_count
    for key, mine in ours.entries.items():
        other = theirs.entries[key]
        name = f"{key[0].name} ({key[1]})"
        assert (mine.grid, mine.count, mine.heads) == (other.grid, other.count, other.heads), \
            f"{name}: {(mine.grid, mine.count, mine.heads)} against {(other.grid, other.count, other.heads)}"
        assert mine.total.shape == other.total.shape, name
        scale = other.mean().abs().max().item()
        difference = (mine.mean() - other.mean()).abs().max().item()
        assert scale > 0, f"{name}: an empty map agrees with anything"
        assert difference <= MAP_TOLERANCE * scale, f"{name}: maps differ by {difference / scale:.2g} of their scale"
    assert len(ours.per_timestep) == len(theirs.per_timestep)
    for mine, other in zip(ours.per_timestep, theirs.per_timestep):
        assert_same_store(mine, other)


def decision_margin(scores: torch.Tensor, threshold: float, background: str,
                    background_map: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W): how far each pixel's winning score (a class, or the background's, which
    ``background_map`` adds to the threshold as label_map does) is above the runner-up."""
    best = scores.max(dim=1, keepdim=True).values
    floor = torch.full_like(best, threshold) if background == "threshold" else (1 - best) ** 2
    if background == "threshold" and background_map is not None:
        floor = floor + background_map
    return torch.cat([floor, scores], dim=1).topk(2, dim=1).values.diff(dim=1).abs()[:, 0]


def assert_same_labels(labels, other_labels, other_scores, threshold, background="threshold",
                       tie_window: float = SCORE_TOLERANCE, other_background=None):
    """The same labels, except at pixels where the reference's decision is closer than
    ``tie_window`` (a near-tie that fp noise may break either way): at most one pixel in
    a thousand."""
    differ = labels != other_labels
    tie = decision_margin(other_scores, threshold, background, other_background) < tie_window
    assert not (differ & ~tie).any(), f"{int((differ & ~tie).sum())} pixels with a clear decision got another label"
    assert differ.float().mean() <= 1e-3, f"{int(differ.sum())} of {differ.numel()} pixels differ"
    assert len(other_labels.unique()) >= 2  # not one label everywhere: the labels say something


def assert_same_masks(ours, theirs, threshold, background="threshold"):
    """Score maps to tolerance, and the same labels and masks from them (see assert_same_labels)."""
    labels, _, scores = make_masks(ours, threshold, background)
    other_labels, _, other_scores = make_masks(theirs, threshold, background)
    difference = (scores - other_scores).abs().max().item()
    other_background = None
    if theirs.background is not None:  # a segmenter's background map competes with the classes (GoCA)
        other_background = resize(theirs.background, theirs.image_size).clamp(0, 1)
        difference = max(difference, (resize(ours.background, ours.image_size).clamp(0, 1)
                                      - other_background).abs().max().item())
    assert difference < SCORE_TOLERANCE
    # the winner may drop and the runner-up rise by the difference: twice it is a near-tie
    assert_same_labels(labels, other_labels, other_scores, threshold, background, 2 * difference, other_background)


def scene_image(item) -> torch.Tensor:
    """A demo scene as ComfyUI's IMAGE (B, H, W, 3) in [0, 1]."""
    return torch.from_numpy(item.image).float().div(255)[None]


def scene_classes(item) -> list[str]:
    return [o.name for o in item.objects]
