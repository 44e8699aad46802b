import pytest

from attnseg import AttnSegError
from attnseg.tokens import (ClassTokens, SegPrompt, find_subsequence, fuse_ing_words, locate_classes,
                            parse_class_list, template_prompt)


def test_parse_class_list_strips_and_splits():
    assert parse_class_list(" cat, blue sofa ,\nlamp") == ["cat", "blue sofa", "lamp"]


@pytest.mark.parametrize("text", ["", " , ,", "\n"])
def test_empty_class_list_is_refused(text):
    with pytest.raises(AttnSegError, match="classes: the class list is empty"):
        parse_class_list(text)


def test_duplicate_class_is_refused():
    with pytest.raises(AttnSegError, match="'Cat' is listed twice"):
        parse_class_list("cat, Cat")


def test_template_prompt():
    assert template_prompt(["cat", "dog"]) == "a photograph of cat and dog"


def test_subsequence():
    assert find_subsequence([1, 2, 3, 2, 3], [2, 3]) == 1
    assert find_subsequence([1, 2], [2, 3]) == -1


def test_locate_classes_positions_and_missing_class_message():
    tokens = [100, 5, 6, 7, 8, 101, 101]
    words = ["", "a", "blue", "sofa", "cat", "", ""]
    meta = locate_classes(tokens, {"blue sofa": [6, 7], "cat": [8]}, words, "a blue sofa cat")
    assert [c.positions for c in meta.classes] == [(2, 3), (4,)]
    assert meta.token_count == 7 and meta.readable == "a blue sofa cat"
    with pytest.raises(AttnSegError, match="'dog' is not in the prompt.*sees is: a blue sofa cat"):
        locate_classes(tokens, {"dog": [9]}, words, "a blue sofa cat")


def test_a_class_straddling_a_chunk_boundary_is_found_across_the_special_tokens():
    # "... red | EOS, BOS | circle ...": the chunking puts EOS and the next BOS between the words.
    tokens = [100, 5, 9, 101, 100, 10, 6, 101]
    words = ["", "a", "red", "", "", "circle", "cat", ""]
    meta = locate_classes(tokens, {"red circle": [9, 10], "cat": [6]}, words, "a red circle cat")
    assert [c.positions for c in meta.classes] == [(2, 5), (6,)]


def test_a_following_ing_word_joins_its_class():
    words = ("", "a", "dog", "running", "and", "a", "cat", "sat", "")
    meta = SegPrompt("a dog running and a cat sat", (ClassTokens("dog", (2,)), ClassTokens("cat", (6,))), 9, words)
    fused = fuse_ing_words(meta)
    assert [c.positions for c in fused.classes] == [(2, 3), (6,)]
