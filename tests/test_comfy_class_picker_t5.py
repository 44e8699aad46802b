"""The class picker's reading of a DiT prompt (``prompt_words`` with Flux's and
SD3's tokenizers, which ComfyUI ships): the words of the sequence the DiT attends
over, at the positions ``locate_dit_words`` gives the encoder, and the classes the
encoder would refuse; then the /attnseg/tokenize route after a DiT text node ran."""

import uuid
from types import SimpleNamespace

import pytest

from test_comfy_t5_tokens import RED_BLUE, flux, pieces, sd3_tokenizer, t5_ids, tokenizer_clip  # noqa: F401
from test_comfy_dit_files import server  # noqa: F401  (the server with the test node's tiny DiT text encoders)

from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.hosts.comfyui.text import locate_dit_words, prompt_words  # noqa: E402

SD3_CLIP_LENGTH = 77  # CLIP-L/G's one 77-token chunk, before T5's tokens in SD3's context
# The route's bounds (routes.py: MAX_PROMPT_CHARS, MAX_CLASSES) and its time bound, TOKENIZE_SECONDS.
MAX_PROMPT_CHARS, MAX_CLASSES = 20_000, 64


def words_of(found):
    return [(w["text"], w["positions"]) for w in found["words"]]


def located(clip, text, name, part="both"):
    """The positions the encoder gives the class ``name``, or None where it refuses it."""
    try:
        meta, _ = locate_dit_words(clip, text, [name], part)
    except AttnSegError:
        return None
    return list(meta.classes[0].positions)


def assert_every_word_locates_at_its_positions(clip, text, found, offset=0, part="both"):
    """A click on a word (its first occurrence) names a class the encoder finds at that word's positions."""
    seen = set()
    for word in found["words"]:
        if word["text"].lower() in seen or not any(c.isalnum() for c in word["text"]):
            continue
        seen.add(word["text"].lower())
        positions = [p - offset for p in word["positions"]]
        assert located(clip, text, word["text"], part) == positions, word


@pytest.mark.parametrize("text", [RED_BLUE, "a photorealistic hummingbird", "a dog,cat and a Red fox",
                                  "photo-realistic (red cat:1.2) sits on a sofa", "a naïve sofa with a 🐱"])
def test_flux_words_are_the_t5_tokens_at_the_encoders_positions(flux, text):
    found = prompt_words(flux.tokenizer, text, [])
    ids = t5_ids(flux, text)
    assert found["token_count"] == len(ids) == 256 and found["missing"] == []
    assert_every_word_locates_at_its_positions(flux, text, found)
    # Every word position is a token of the prompt; no EOS or padding is in a word.
    eos = ids.index(flux.tokenizer.t5xxl.end_token)
    assert all(p < eos for w in found["words"] for p in w["positions"])


def test_flux_class_positions_are_the_positions_of_its_words(flux):
    found = prompt_words(flux.tokenizer, RED_BLUE, ["red circle", "blue square"])
    assert words_of(found) == [("a", [1]), ("red", [2]), ("circle", [3]), ("and", [4]), ("a", [6]),
                               ("blue", [7]), ("square", [8])]
    meta, _ = locate_dit_words(flux, RED_BLUE, ["red circle", "blue square"])
    by_text = dict(words_of(found))
    for c in meta.classes:
        assert list(c.positions) == [p for word in c.name.split() for p in by_text[word]]


def test_a_word_t5_splits_into_several_pieces_is_one_word_with_all_of_them(flux):
    text = "a photorealistic hummingbird"
    found = prompt_words(flux.tokenizer, text, ["photorealistic", "hummingbird"])
    assert words_of(found) == [("a", [1]), ("photorealistic", [2, 3, 4]), ("hummingbird", [6, 7, 8])]
    ids = t5_ids(flux, text)
    assert pieces(flux, ids, [2, 3, 4]) == ["▁photo", "real", "istic"]
    # The bare word-start piece before 'h' spells nothing: in no word, as in no class.
    assert pieces(flux, ids, [0, 5]) == ["▁", "▁"] and pieces(flux, ids, [6, 7, 8]) == ["h", "umming", "bird"]
    meta, _ = locate_dit_words(flux, text, ["photorealistic", "hummingbird"])
    assert [list(c.positions) for c in meta.classes] == [[2, 3, 4], [6, 7, 8]]
    assert found["missing"] == []


def test_punctuation_is_a_word_apart_and_unknown_characters_read_as_written(flux):
    assert words_of(prompt_words(flux.tokenizer, "a dog,cat", [])) == [("a", [1]), ("dog", [2]), (",", [3]),
                                                                      ("cat", [4])]
    # T5 has no piece for 'ï' or the emoji ('<unk>'): the words read as the prompt writes them,
    # so a click names a class the encoder finds, at all the word's pieces, '<unk>' included.
    # Weighted and escaped (literal brackets) text reads as ComfyUI's tokenizer reads it.
    for text, read in [("a naïve sofa with a 🐱", ["a", "naïve", "sofa", "with", "🐱"]),
                       ("a (naïve:1.2) sofa with a \\(🐱\\)", ["a", "naïve", "sofa", "with", "(", "🐱", ")"])]:
        found = prompt_words(flux.tokenizer, text, ["naïve", "🐱"])
        words = dict(words_of(found))
        assert list(words) == read and found["missing"] == []
        assert pieces(flux, t5_ids(flux, text), words["naïve"]) == ["n", "a", "<unk>", "ve"]
        assert located(flux, text, "naïve") == words["naïve"] and located(flux, text, "🐱") == words["🐱"]


def test_flux_missing_classes_are_those_the_encoder_refuses(flux):
    text = "a photograph of cats and a red circle"
    names = ["red circle", "star", "cat", "cats", "Red Circle", "circle red"]
    found = prompt_words(flux.tokenizer, text, names)
    assert found["missing"] == ["star", "cat", "circle red"]  # whole words, case aside, in order
    assert found["missing"] == [name for name in names if located(flux, text, name) is None]


def test_sd3_shows_the_clip_words_then_the_t5_words_moved_by_the_clip_length(sd3_tokenizer, flux):
    sd3 = tokenizer_clip(sd3_tokenizer)
    names = ["red circle", "blue square"]
    found = prompt_words(sd3_tokenizer, RED_BLUE, names)
    assert found["token_count"] == SD3_CLIP_LENGTH + 77 and found["missing"] == []
    words = found["words"]
    clip_words = [w for w in words if w["positions"][0] < SD3_CLIP_LENGTH]
    t5_words = words[len(clip_words):]
    assert [w["text"] for w in clip_words] == [w["text"] for w in t5_words] == RED_BLUE.split()
    # The CLIP part as the CLIP picker reads it (BOS at 0); the T5 part as Flux's, moved past the CLIP tokens.
    assert [w["positions"] for w in clip_words] == [[1], [2], [3], [4], [5], [6], [7]]
    flux_words = prompt_words(flux.tokenizer, RED_BLUE, [])["words"]
    assert [[SD3_CLIP_LENGTH + p for p in w["positions"]] for w in flux_words] == [w["positions"] for w in t5_words]
    assert_every_word_locates_at_its_positions(sd3, RED_BLUE, {"words": clip_words}, part="clip")
    assert_every_word_locates_at_its_positions(sd3, RED_BLUE, {"words": t5_words}, part="t5")
    # A class's positions in the encoder's context are its words' in both parts.
    meta, _ = locate_dit_words(sd3, RED_BLUE, names)
    for c in meta.classes:
        assert list(c.positions) == [p for w in clip_words + t5_words if w["text"] in c.name.split()
                                     for p in w["positions"]]


def sd3_encoders(sd3_tokenizer):
    """SD3's tokenizer on an encoder without T5, and on one with T5 alone."""
    no_t5 = tokenizer_clip(sd3_tokenizer, SimpleNamespace(clip_l=object(), clip_g=object(), t5xxl=None))
    t5_alone = tokenizer_clip(sd3_tokenizer, SimpleNamespace(clip_l=None, clip_g=None, t5xxl=object()))
    return no_t5, t5_alone


def test_sd3_missing_classes_are_those_either_part_lacks(sd3_tokenizer):
    sd3 = tokenizer_clip(sd3_tokenizer)
    no_t5, t5_alone = sd3_encoders(sd3_tokenizer)
    text = "a dog,cat and a photorealistic fox"
    # ',' is a CLIP word but no whole T5 word: the full encoder refuses it, so it is missing.
    assert located(no_t5, text, ",") == [3] and located(t5_alone, text, ",") is None
    names = ["cat", ",", "photo", "star", "fox"]
    found = prompt_words(sd3_tokenizer, text, names)
    assert found["missing"] == [",", "photo", "star"]
    assert found["missing"] == [name for name in names if located(sd3, text, name) is None]


def test_sd3_without_t5_or_with_t5_alone_shows_every_part_its_tokenizer_has(sd3_tokenizer):
    """The picker gets the tokenizer alone, not the encoders loaded with it: an SD3
    shows the CLIP words, then the T5 words, whatever ran. The CLIP words' positions
    are those of an SD3 without T5 (CLIP first in both sequences); with T5 alone, its
    words sit the CLIP length earlier than shown."""
    no_t5, t5_alone = sd3_encoders(sd3_tokenizer)
    found = prompt_words(no_t5.tokenizer, RED_BLUE, ["red circle"])
    assert found == prompt_words(t5_alone.tokenizer, RED_BLUE, ["red circle"])
    assert found["token_count"] == SD3_CLIP_LENGTH + 77
    clip_words = [w for w in found["words"] if w["positions"][0] < SD3_CLIP_LENGTH]
    t5_words = found["words"][len(clip_words):]
    assert_every_word_locates_at_its_positions(no_t5, RED_BLUE, {"words": clip_words})
    assert_every_word_locates_at_its_positions(t5_alone, RED_BLUE, {"words": t5_words}, offset=SD3_CLIP_LENGTH)


def test_an_empty_prompt_has_no_words(flux, sd3_tokenizer):
    for tokenizer in (flux.tokenizer, sd3_tokenizer):
        found = prompt_words(tokenizer, " ", ["cat"])
        assert found["words"] == [] and found["missing"] == ["cat"] and found["token_count"] >= 77


def picker_workflow(family: str, prompt: str, classes: str) -> dict:
    """The test node's tiny text encoder -> AttnSeg Text Encode (node 2), whose report is shown."""
    return {
        "1": {"class_type": "AttnSegTestTinyTextEncoder", "inputs": {"family": family}},
        "2": {"class_type": "AttnSegTextEncode", "inputs": {
            "clip": ["1", 0], "prompt": prompt, "classes": classes, "class_weight": 1.0, "fuse_ing_word": False,
            "preset": "custom", "dit_text": "both"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_route_reads_a_dit_prompt_with_the_connected_encoders_tokenizer(server, family):  # noqa: F811
    """After AttnSeg Text Encode ran on a Flux / SD3 text encoder, the tokenize route
    answers that node with its tokenizer: each class's words sit at the positions the
    node reported, and a class it would refuse is missing."""
    prompt, classes = "a photorealistic hummingbird and a red circle", "hummingbird, red circle"
    client = uuid.uuid4().hex
    entry = server.run(picker_workflow(family, prompt, classes), client_id=client)
    report = entry["outputs"]["3"]["text"][0]
    reported = {line.split(": tokens ")[0]: line.split(": tokens ")[1] for line in report.splitlines()[1:]}
    body = {"prompt": prompt, "classes": classes + ", star", "node_id": "2", "client_id": client}
    found = server.post("/attnseg/tokenize", body)
    assert found["tokenizer"] == "connected" and found["missing"] == ["star"]
    assert found["token_count"] == (256 if family == "flux" else SD3_CLIP_LENGTH + 77)
    for name in ("hummingbird", "red circle"):
        positions = [p for w in found["words"] if w["text"] in name.split() for p in w["positions"]]
        assert str(positions) == reported[name], (name, report)
    # The route's largest request reads within its time bound (a 503 would raise).
    long = {"prompt": ("a photorealistic hummingbird, naïve 🐱 " * 600)[:MAX_PROMPT_CHARS], "node_id": "2",
            "client_id": client, "classes": ", ".join(f"class {i}" for i in range(MAX_CLASSES))}
    found = server.post("/attnseg/tokenize", long)
    assert found["tokenizer"] == "connected" and len(found["missing"]) == MAX_CLASSES
