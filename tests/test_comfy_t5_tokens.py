"""Class positions in a DiT's text sequence, with the tokenizers ComfyUI ships
(Flux: T5-XXL; SD3: CLIP-L+G, then T5-XXL), built without encoder weights."""

import os
from types import SimpleNamespace

import pytest

from comfy_env import import_pack

import_pack()
import comfy.sd  # noqa: E402
from comfy.sd1_clip import SD1Tokenizer  # noqa: E402
from comfy.text_encoders.flux import FluxTokenizer  # noqa: E402
from comfy.text_encoders.sd3_clip import SD3Tokenizer  # noqa: E402

from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.hosts.comfyui.text import dit_segmentation_prompt, locate_dit_words, locate_words  # noqa: E402

RED_BLUE = "a red circle and a blue square"


def tokenizer_clip(tokenizer, encoder=None):
    """A ComfyUI CLIP with only a tokenizer: all the class lookup reads, plus
    which encoder parts were loaded where a test says."""
    clip = comfy.sd.CLIP(no_init=True)
    clip.tokenizer, clip.tokenizer_options = tokenizer, {}
    if encoder is not None:
        clip.cond_stage_model = encoder
    return clip


@pytest.fixture(scope="module")
def flux():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the tokenizer files ship with ComfyUI
    return tokenizer_clip(FluxTokenizer())


@pytest.fixture(scope="module")
def sd3_tokenizer():
    return SD3Tokenizer()


def t5_ids(clip, text):
    return [entry[0] for chunk in clip.tokenize(text)["t5xxl"] for entry in chunk]


def spelled(clip, ids, positions):
    """The text the tokens at ``positions`` decode to, by the tokenizer itself."""
    return clip.tokenizer.t5xxl.tokenizer.decode([ids[p] for p in positions])


def pieces(clip, ids, positions):
    return clip.tokenizer.t5xxl.tokenizer.convert_ids_to_tokens([ids[p] for p in positions])


def test_flux_positions_are_exactly_the_class_pieces_in_the_t5_list(flux):
    meta, tokens = locate_dit_words(flux, RED_BLUE, ["red circle", "blue square"])
    ids = t5_ids(flux, RED_BLUE)
    assert [entry[0] for chunk in tokens["t5xxl"] for entry in chunk] == ids
    assert meta.token_count == len(ids) == 256  # no BOS; EOS, then padding to Flux's 256
    red, blue = (c.positions for c in meta.classes)
    assert spelled(flux, ids, red) == "red circle" and spelled(flux, ids, blue) == "blue square"
    assert pieces(flux, ids, red) == ["▁red", "▁circle"] and pieces(flux, ids, blue) == ["▁blue", "▁square"]
    # No other token of the sequence is one of those pieces: the positions are the only ones.
    class_ids = {ids[p] for p in red + blue}
    assert [i for i, t in enumerate(ids) if t in class_ids] == sorted(red + blue)
    assert meta.readable == RED_BLUE


def test_a_word_split_into_several_pieces_is_found_at_all_of_them(flux):
    text = "a photorealistic hummingbird"
    meta, _ = locate_dit_words(flux, text, ["photorealistic", "hummingbird"])
    ids = t5_ids(flux, text)
    photo, bird = (c.positions for c in meta.classes)
    assert pieces(flux, ids, photo) == ["▁photo", "real", "istic"] and spelled(flux, ids, photo) == "photorealistic"
    assert pieces(flux, ids, bird) == ["h", "umming", "bird"] and spelled(flux, ids, bird) == "hummingbird"
    assert photo == (2, 3, 4) and bird == (6, 7, 8)
    # The bare word-start piece before 'h' spells no letter of the class: it is left out.
    assert pieces(flux, ids, [5]) == ["▁"]


def test_a_class_split_differently_in_the_prompt_than_alone_is_found_by_its_text(flux):
    t5 = flux.tokenizer.t5xxl.tokenizer
    alone = t5.convert_ids_to_tokens(t5_ids(flux, "cat")[:1])
    meta, _ = locate_dit_words(flux, "a dog,cat and a Red fox", ["cat", "red fox"])
    ids = t5_ids(flux, "a dog,cat and a Red fox")
    cat, fox = (c.positions for c in meta.classes)
    assert alone == ["▁cat"] and pieces(flux, ids, cat) == ["cat"]
    assert pieces(flux, ids, fox) == ["▁Red", "fox"]  # the prompt's case, as the tokenizer gives it
    # A character T5 has no piece for reads '<unk>' in the prompt and in the class alike.
    meta, _ = locate_dit_words(flux, "a naïve sofa", ["naïve"])
    assert pieces(flux, t5_ids(flux, "a naïve sofa"), meta.classes[0].positions) == ["n", "a", "<unk>", "ve"]


def test_a_missing_class_is_named_with_the_fix(flux):
    with pytest.raises(AttnSegError, match=r"classes: the class 'star' is not in the prompt\. Add it .*sees is: a red"):
        locate_dit_words(flux, RED_BLUE, ["red circle", "star"])
    # Whole words only: 'cat' is not found inside 'cats' (one piece, '▁cats').
    with pytest.raises(AttnSegError, match="the class 'cat' is not in the prompt"):
        locate_dit_words(flux, "a photograph of cats", ["cat"])
    with pytest.raises(AttnSegError, match="part: this text encoder's sequence has no 'clip' tokens"):
        locate_dit_words(flux, RED_BLUE, ["red circle"], part="clip")
    with pytest.raises(AttnSegError, match="clip: SD1Tokenizer has no T5-XXL tokenizer"):
        locate_dit_words(tokenizer_clip(SD1Tokenizer()), RED_BLUE, ["red circle"])


def test_sd3_positions_index_the_context_clip_first_then_t5(sd3_tokenizer, flux):
    sd3 = tokenizer_clip(sd3_tokenizer)
    names = ["red circle", "blue square"]
    clip_only, _ = locate_dit_words(sd3, RED_BLUE, names, part="clip")
    t5_only, tokens = locate_dit_words(sd3, RED_BLUE, names, part="t5")
    both, _ = locate_dit_words(sd3, RED_BLUE, names)
    clip_count = len(tokens["l"][0])
    assert clip_count == 77 and clip_only.token_count == t5_only.token_count == both.token_count == 77 + 77
    # The CLIP part is SD1's lookup on CLIP-L (BOS at 0).
    assert [c.positions for c in clip_only.classes] == [(2, 3), (6, 7)]
    sd1_lookup, _ = locate_words(sd3, RED_BLUE, names)
    assert [c.positions for c in clip_only.classes] == [c.positions for c in sd1_lookup.classes]
    # The T5 part is the T5 list's positions moved past the 77 CLIP tokens.
    flux_meta, _ = locate_dit_words(flux, RED_BLUE, names)
    ids = t5_ids(sd3, RED_BLUE)
    for t5_class, flux_class, clip_class, both_class in zip(t5_only.classes, flux_meta.classes, clip_only.classes,
                                                            both.classes):
        assert t5_class.positions == tuple(clip_count + p for p in flux_class.positions)
        assert spelled(sd3, ids, [p - clip_count for p in t5_class.positions]) == t5_class.name
        assert both_class.positions == clip_class.positions + t5_class.positions
    assert both.words[clip_count + 2] == "red" and both.words[2] == "red"


def test_sd3_without_t5_or_with_t5_alone(sd3_tokenizer):
    names = ["red circle"]
    no_t5 = tokenizer_clip(sd3_tokenizer, SimpleNamespace(clip_l=object(), clip_g=object(), t5xxl=None))
    meta, _ = locate_dit_words(no_t5, RED_BLUE, names)
    assert meta.token_count == 77 and meta.classes[0].positions == (2, 3)
    with pytest.raises(AttnSegError, match=r"no 't5' tokens \(it is made of clip\)\. Choose clip or both"):
        locate_dit_words(no_t5, RED_BLUE, names, part="t5")
    t5_alone = tokenizer_clip(sd3_tokenizer, SimpleNamespace(clip_l=None, clip_g=None, t5xxl=object()))
    meta, _ = locate_dit_words(t5_alone, RED_BLUE, names)
    assert meta.token_count == 77 and meta.classes[0].positions == (2, 3)  # '▁', 'a', then '▁red' '▁circle'
    assert meta.words[2:4] == ("red", "circle")


def test_an_empty_prompt_becomes_the_template(flux):
    text, meta, _ = dit_segmentation_prompt(flux, " ", "cat, sofa")
    assert text == "a photograph of cat and sofa"
    assert [[meta.words[p] for p in c.positions] for c in meta.classes] == [["cat"], ["sofa"]]
    with pytest.raises(AttnSegError, match="part: 'image' is not one of both, clip, t5"):
        dit_segmentation_prompt(flux, RED_BLUE, "red circle", part="image")


def test_sd1_lookup_is_unchanged():
    sd1 = tokenizer_clip(SD1Tokenizer())
    meta, _ = locate_words(sd1, "a photorealistic hummingbird", ["hummingbird"])
    assert meta.token_count == 77 and meta.words[:5] == ("", "a", "photo", "realistic", "hummingbird")
    assert meta.classes[0].positions == (4,)  # BOS at 0, CLIP's own pieces
