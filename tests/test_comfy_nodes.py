"""The pack's nodes in-process on tiny models: prompt handling and every bad input."""

from pathlib import Path

import pytest
import torch

from comfy_env import import_pack
from tiny_models import CONTEXT_DIM, SD15_LAYOUT, tiny_clip, tiny_unet, tiny_vae

pack = import_pack()
from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.hosts.comfyui.text import encode_segmentation_prompt, prompt_of  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def models():
    return tiny_unet(SD15_LAYOUT, seed=5), tiny_clip(seed=6), tiny_vae(seed=7)


def encode(clip, prompt, classes):
    return NODES["AttnSegTextEncode"]().encode(clip, prompt, classes)


def segment(models, image, cond, **kw):
    model, _, vae = models
    args = dict(timesteps="100", seed=0, resolution=128) | kw
    return NODES["AttnSegSegmentImage"]().segment(model, vae, image, cond, **args)[0]


def scores_of(store):
    return NODES["AttnSegDiffSegmenter"]().segment(store, "0.3,0.5,0.1,0.1", True)[0]


def test_weights_and_escapes_in_the_prompt_still_match_the_class(models):
    _, clip, _ = models
    cond, report = encode(clip, "a (red cat:1.2) next to pokemon \\(creature\\)", "red cat, pokemon (creature)")
    meta = prompt_of(cond)
    assert [c.positions for c in meta.classes] == [(2, 3), (6, 7, 8, 9)]
    assert "red cat: tokens [2, 3]" in report
    assert torch.is_tensor(cond[0][0]) and cond[0][0].shape == (1, 77, CONTEXT_DIM)


def test_a_class_in_the_second_chunk_of_a_long_prompt(models):
    _, clip, _ = models
    prompt = "a photo, " + "very detailed, " * 30 + "a cat"
    cond, _ = encode(clip, prompt, "cat")
    (cat,) = prompt_of(cond).classes
    assert cond[0][0].shape[1] == 154 and cat.positions[0] > 77
    store = segment(models, torch.rand(1, 64, 64, 3), cond)
    assert scores_of(store).maps.shape == (1, 1, 16, 16)


def test_empty_prompt_uses_the_papers_template(models):
    _, clip, _ = models
    cond, report = encode(clip, "  ", "cat, dog")
    assert prompt_of(cond).text == "a photograph of cat and dog" and report.startswith("a photograph of cat and dog")


@pytest.mark.parametrize("classes, message", [
    ("", "classes: the class list is empty"),
    ("cat, cat", "classes: 'cat' is listed twice"),
    ("cat, zebra", "classes: the class 'zebra' is not in the prompt"),
])
def test_bad_class_lists(models, classes, message):
    _, clip, _ = models
    with pytest.raises(AttnSegError, match=message):
        encode(clip, "a cat on a sofa", classes)


def test_conditioning_from_another_model_is_refused(models):
    wide = [[torch.zeros(1, 77, 2048), {}]]
    with pytest.raises(AttnSegError, match="conditioning: this conditioning has 2048-wide text embeddings"):
        segment(models, torch.rand(1, 64, 64, 3), wide)


def test_unsupported_model_family_is_refused(models):
    import comfy.model_patcher

    _, clip, vae = models
    dit = tiny_unet(SD15_LAYOUT)
    dit.model.diffusion_model = torch.nn.Identity()  # stands in for a family AttnSeg does not know
    cond, _ = encode(clip, "a cat", "cat")
    with pytest.raises(AttnSegError, match="model: SD15 \\(Identity\\) is not a model AttnSeg can capture. "
                                           "Supported: UNet models .* Flux .* SD3"):
        NODES["AttnSegSegmentImage"]().segment(dit, vae, torch.rand(1, 64, 64, 3), cond, "100", 0, 128)
    assert isinstance(dit, comfy.model_patcher.ModelPatcher)


@pytest.mark.parametrize("timesteps", ["", "abc", "1000", "-5"])
def test_bad_timesteps(models, timesteps):
    _, clip, _ = models
    cond, _ = encode(clip, "a cat", "cat")
    with pytest.raises(AttnSegError, match="timesteps:"):
        segment(models, torch.rand(1, 64, 64, 3), cond, timesteps=timesteps)


def test_masks_check_the_image_batch_and_aspect(models):
    _, clip, _ = models
    cond, _ = encode(clip, "a cat and a dog", "cat, dog")
    scores = scores_of(segment(models, torch.rand(2, 48, 80, 3), cond))
    masks, labels, preview, soft = NODES["AttnSegMasks"]().make(scores, 0.5, image=torch.rand(2, 48, 80, 3))["result"]
    assert masks.shape == (4, 48, 80) and labels.shape == (2, 48, 80) and soft.shape == (4, 48, 80)
    assert preview.shape == (2, 48 + 14 * 3, 80, 3)
    assert set(labels.unique().tolist()) <= {0.0, 1.0, 2.0}
    shown = NODES["AttnSegMasks"]().make(scores, 0.5, image=torch.rand(2, 48, 80, 3))["ui"]["images"]
    assert len(shown) == 4  # labels over each image, then each heat map, all with the legend
    import folder_paths
    from PIL import Image
    for entry in shown:
        assert entry["type"] == "temp"
        with Image.open(Path(folder_paths.get_temp_directory()) / entry["filename"]) as picture:
            assert picture.size == (80, 48 + 14 * 3)
    # Same aspect at another size: the masks follow the image.
    assert NODES["AttnSegMasks"]().make(scores, 0.5, image=torch.rand(2, 96, 160, 3))["result"][0].shape == (4, 96, 160)
    with pytest.raises(AttnSegError, match="image: 1 images but the scores are of 2"):
        NODES["AttnSegMasks"]().make(scores, 0.5, image=torch.rand(1, 48, 80, 3))
    with pytest.raises(AttnSegError, match="image: 80x80 does not have the aspect ratio"):
        NODES["AttnSegMasks"]().make(scores, 0.5, image=torch.rand(2, 80, 80, 3))


def test_class_mask_by_name(models):
    _, clip, _ = models
    cond, _ = encode(clip, "a cat and a dog", "cat, dog")
    scores = scores_of(segment(models, torch.rand(1, 64, 64, 3), cond))
    masks = NODES["AttnSegMasks"]().make(scores, 0.3)["result"][0]
    dog, = NODES["AttnSegClassMask"]().pick(scores, "Dog", 0.3)
    assert torch.equal(dog, masks[1:2])
    with pytest.raises(AttnSegError, match="class_name: 'zebra' is not one of the segmented classes \\(cat, dog\\)"):
        NODES["AttnSegClassMask"]().pick(scores, "zebra", 0.3)


def test_sampler_step_range_and_store_errors(models):
    from attnseg_pack.nodes.capture import step_plan

    with pytest.raises(AttnSegError, match="capture_start_step / capture_end_step: steps 5..-1"):
        step_plan(4, 5, -1, "last step")
    with pytest.raises(AttnSegError, match="attention: no attention was captured"):
        NODES["AttnSegDiffSegmenter"]().segment(None, "0.3,0.5,0.1,0.1", True)
    with pytest.raises(AttnSegError, match="weights:"):
        NODES["AttnSegDiffSegmenter"]().segment(object(), "0.3,x", True)


def test_store_captured_without_a_segmentation_prompt_is_refused(models):
    model, clip, _ = models
    plain = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    _, store = NODES["AttnSegCaptureSampler"]().sample(model, 0, 1, 1.0, "euler", "normal", plain, plain, latent,
                                                       1.0, True, 0, -1, "last step")
    with pytest.raises(AttnSegError, match="attention: the store has no class list"):
        scores_of(store)


def test_class_plus_plus_reweights_only_the_class_tokens(models):
    _, clip, _ = models
    plain, meta = encode_segmentation_prompt(clip, "a photo of a cat", "cat")
    weighted, _ = encode_segmentation_prompt(clip, "a photo of a cat", "cat", class_weight=1.21)
    empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))[0][0]
    cat = list(meta.classes[0].positions)
    others = [i for i in range(plain[0][0].shape[1]) if i not in cat]
    expected = empty[:, cat] + 1.21 * (plain[0][0][:, cat] - empty[:, cat])
    assert torch.allclose(weighted[0][0][:, cat], expected, atol=1e-5)
    assert torch.equal(weighted[0][0][:, others], plain[0][0][:, others])
    with pytest.raises(AttnSegError, match="class_weight"):
        encode_segmentation_prompt(clip, "a cat", "cat", class_weight=0.0)


def test_prompt_words_for_the_class_picker(models):
    from attnseg_pack.hosts.comfyui.text import prompt_words, sd1_tokenizer
    _, clip, _ = models
    for tokenizer in (clip.tokenizer, sd1_tokenizer()):
        found = prompt_words(tokenizer, "a red circle, a hedgehog", ["red circle", "hedgehog", "star"])
        assert [w["text"] for w in found["words"]] == ["a", "red", "circle", ",", "a", "hedgehog"]
        assert found["words"][1]["positions"] == [2] and len(found["words"][5]["positions"]) >= 1
        assert found["missing"] == ["star"] and found["token_count"] == 77
    assert prompt_words(sd1_tokenizer(), " ", [])["words"] == []


def test_numeric_inputs_that_are_not_finite_or_whole_are_named(models):
    from attnseg_pack.hosts.comfyui.passes import parse_timesteps
    from attnseg_pack.nodes.segmenters import parse_weights

    for bad in ("nan", "inf", "1,-1", "0,0"):
        with pytest.raises(AttnSegError, match="weights: "):
            parse_weights(bad)
    for bad in ("inf", "nan", "1e400", "-5"):
        with pytest.raises(AttnSegError, match="timesteps: "):
            parse_timesteps(bad)
    _, clip, _ = models
    store = segment(models, torch.rand(1, 64, 64, 3), encode(clip, "a cat", "cat")[0])
    with pytest.raises(AttnSegError, match="factors: '2.5' must be whole numbers"):
        NODES["AttnSegISegCrossAttention"]().segment(store, "2.5", "1")


def test_a_class_copied_with_its_weight_is_told_to_drop_the_syntax(models):
    _, clip, _ = models
    with pytest.raises(AttnSegError, match=r"'\(red cat:1.3\)' carries prompt weight syntax.*e.g. 'red cat'"):
        encode(clip, "a (red cat:1.3) on a mat", "(red cat:1.3)")


def test_ent_self_refuses_scores_of_another_image(models):
    _, clip, _ = models
    cond = encode(clip, "a cat", "cat")[0]
    wide_image = torch.rand(1, 64, 96, 3)
    wide = segment(models, wide_image, cond)
    square = segment(models, torch.rand(1, 64, 64, 3), cond)
    scores = scores_of(wide)
    with pytest.raises(AttnSegError, match="scores: they describe a 96x64 image but the attention store a 64x64"):
        NODES["AttnSegEntSelf"]().refine(scores, square, 0.015, 1, "code")
    other = segment(models, torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(9)), cond)
    with pytest.raises(AttnSegError, match="scores: they were read from another image than this attention store"):
        NODES["AttnSegEntSelf"]().refine(scores, other, 0.015, 1, "code")
    again = segment(models, wide_image, cond, seed=3)  # the same image captured again: fine
    NODES["AttnSegEntSelf"]().refine(scores, again, 0.015, 1, "code")


def test_fuzzed_weights_and_timesteps_parse_or_name_their_input():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from attnseg_pack.hosts.comfyui.passes import parse_timesteps
    from attnseg_pack.nodes.segmenters import parse_weights

    pieces = st.sampled_from([",", ";", " ", "1", "0", "0.5", "-1", "1e400", "nan", "inf", "999", "1000", "x"])
    text = st.one_of(st.text(max_size=40), st.lists(pieces, max_size=12).map("".join))

    @settings(max_examples=300, deadline=None)
    @given(text)
    def check(value):
        try:
            weights = parse_weights(value)
            assert all(w >= 0 and w == w and w != float("inf") for w in weights) and sum(weights) > 0
        except AttnSegError as error:
            assert str(error).startswith("weights:")
        try:
            steps = parse_timesteps(value)
            assert steps and all(0 <= t <= 999 for t in steps)
        except AttnSegError as error:
            assert str(error).startswith("timesteps:")

    check()


def test_a_class_across_the_75_token_boundary_is_found(models):
    _, clip, _ = models
    filler = " ".join(["shape"] * 74)  # 74 word tokens: 'red' ends the first chunk, 'circle' opens the second
    cond, report = encode(clip, f"{filler} red circle on a table", "red circle")
    (found,) = prompt_of(cond).classes
    assert found.positions == (75, 78)  # EOS at 76 and the next chunk's BOS at 77 lie between
    assert prompt_of(cond).words[75] == "red" and prompt_of(cond).words[78] == "circle"


def test_accented_cjk_and_emoji_words_read_as_written(models):
    from attnseg_pack.hosts.comfyui.text import prompt_words, sd1_tokenizer

    found = prompt_words(sd1_tokenizer(), "a café with a 🐱 in 東京", ["café", "🐱", "東京", "crêpe"])
    assert [w["text"] for w in found["words"]] == ["a", "café", "with", "a", "🐱", "in", "東京"]
    assert found["missing"] == ["crêpe"]
    _, clip, _ = models
    _, report = encode(clip, "a café with a 🐱", "café, 🐱")
    assert "café" in report and "a café with a" in report
    with pytest.raises(AttnSegError, match="the class 'crêpe' is not in the prompt.*sees is: a café"):
        encode(clip, "a café with a 🐱", "crêpe")


def nan_in_one_key_projection(seed):
    """A tiny SD1.5 whose output block's last cross-attention key weight holds one NaN."""
    model = tiny_unet(SD15_LAYOUT, seed=seed)
    to_k = model.model.diffusion_model.output_blocks[-1][1].transformer_blocks[0].attn2.to_k
    with torch.no_grad():
        to_k.weight[0, 0] = float("nan")
    return model


def test_nan_attention_is_refused_by_the_segmenter_and_the_one_node_not_turned_into_masks(models):
    _, clip, vae = models
    broken = nan_in_one_key_projection(seed=5)
    cond, _ = encode(clip, "a cat on a sofa", "cat, sofa")
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    store = segment((broken, clip, vae), image, cond)
    with pytest.raises(AttnSegError, match=r"attention: the captured attention of \d+ of \d+ layers holds NaN"):
        scores_of(store)
    with pytest.raises(AttnSegError, match=r"model: the captured attention .* NaN .*--bf16-unet or --fp32-unet"):
        NODES["AttnSegSegment"]().segment(broken, clip, vae, image, "cat, sofa", "DiffSegmenter (released code)",
                                          resolution=128)
    scores = scores_of(segment(models, image, cond))  # the same graph on sound weights works
    scores.maps[0, 0, 0, 0] = float("nan")
    with pytest.raises(AttnSegError, match="scores: the .* score maps hold NaN"):
        NODES["AttnSegMasks"]().make(scores, 0.5)


def test_every_node_has_a_help_page():
    """ComfyUI's node help shows web/docs/<node>.md: every node of the pack ships one."""
    docs = Path(__file__).resolve().parents[1] / "web" / "docs"
    for name in NODES:
        page = docs / f"{name}.md"
        assert page.is_file(), name
        text = page.read_text()
        assert text.startswith("# AttnSeg ") and len(text) > 300, name
