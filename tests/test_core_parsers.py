"""Fuzzing the pure input parsers: any string either parses to valid values or
raises the pack's error naming the input, never another exception."""

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from attnseg import AttnSegError
from attnseg.layers import BLOCKS, parse_heads, parse_picks
from attnseg.seeds import parse_seeds
from attnseg.tokens import parse_class_list

# Text biased towards what the parsers split on, mixed with anything else.
PIECES = st.sampled_from([",", ";", " ", "\n", "*", "-", ".", "1", "0", "12", "1e400", "nan", "inf", "output",
                          "input", "middle", "(", ")", ":", "[", "]", "{", "}", '"point"', '"box"', '"line"'])
TEXT = st.one_of(st.text(max_size=60), st.lists(PIECES, max_size=25).map("".join))
NUMBER = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True))


def named(error: AttnSegError, name: str) -> bool:
    return str(error).startswith(f"{name}:")


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_class_lists(text):
    try:
        names = parse_class_list(text)
    except AttnSegError as error:
        assert named(error, "classes")
        return
    assert names and all(n and n == n.strip() for n in names)
    assert len({n.lower() for n in names}) == len(names)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_layer_picks_and_heads(text):
    try:
        picks = parse_picks(text, "self_layer_picks")
    except AttnSegError as error:
        assert named(error, "self_layer_picks")
    else:
        assert picks is None or all(p.block in BLOCKS and p.level >= 0 and (p.index is None or p.index >= 0)
                                    for p in picks)
    try:
        heads = parse_heads(text, "self_heads")
    except AttnSegError as error:
        assert named(error, "self_heads")
    else:
        assert heads is None or (all(h >= 0 for h in heads) and len(set(heads)) == len(heads))


SEED = st.one_of(
    st.fixed_dictionaries({"point": st.lists(NUMBER, max_size=3)}),
    st.fixed_dictionaries({"box": st.lists(NUMBER, max_size=5)}),
    st.fixed_dictionaries({"line": st.lists(st.lists(NUMBER, max_size=3), max_size=4)}),
    st.dictionaries(st.sampled_from(["point", "box", "line", "label", "x"]), NUMBER, max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(TEXT, st.lists(SEED, max_size=4).map(json.dumps), SEED.map(json.dumps)))
def test_seeds(text):
    try:
        seeds = parse_seeds(text, (64, 96), (8, 12))
    except AttnSegError as error:
        assert named(error, "seeds")
        return
    assert seeds and all(s.cells and all(0 <= c < 96 for c in s.cells) for s in seeds)


def test_the_strategies_reach_both_outcomes():
    """The fuzzed parsers are not only ever refusing: valid inputs parse."""
    assert parse_picks("output 0 1", "p") and parse_heads("1,2", "h") == (1, 2)
    assert parse_seeds('[{"point": [1, 2]}]', (64, 96), (8, 12))[0].cells == (0,)
    assert not math.isnan(parse_seeds('[{"box": [0, 0, 96, 64]}]', (64, 96), (8, 12))[0].cells[-1])
