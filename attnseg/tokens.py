"""Class words -> token positions in the prompt as the text encoder sees it.

Positions index the flattened token sequence of all 77-token chunks (each with
its own BOS), which is exactly the key axis of the UNet's cross-attention; for a
T5 (SentencePiece) stream, the T5 token list (no BOS, EOS, then padding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import AttnSegError


@dataclass(frozen=True)
class ClassTokens:
    name: str
    positions: tuple[int, ...]


@dataclass(frozen=True)
class SegPrompt:
    """The class metadata carried by a segmentation CONDITIONING."""

    text: str
    classes: tuple[ClassTokens, ...]
    token_count: int  # length of the encoded sequence (77 x chunks)
    words: tuple[str, ...]  # readable token strings, for messages and UIs

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def class_positions(self) -> tuple[int, ...]:
        """Every class token position, sorted."""
        return tuple(sorted({p for c in self.classes for p in c.positions}))

    @property
    def readable(self) -> str:
        """The prompt as the model's tokens, special tokens left out."""
        return readable(self.words)


def readable(words: Sequence[str]) -> str:
    return " ".join(w for w in words if w)


def parse_class_list(text: str, input_name: str = "classes") -> list[str]:
    """Comma-separated class list -> names, refusing empty and duplicate entries."""
    names = [part.strip() for part in text.replace("\n", ",").split(",")]
    names = [n for n in names if n]
    if not names:
        raise AttnSegError(f"{input_name}: the class list is empty. Give one or more class words "
                           f"separated by commas, e.g. 'cat, sofa'.")
    seen = set()
    for n in names:
        if n.lower() in seen:
            raise AttnSegError(f"{input_name}: '{n}' is listed twice. List each class once.")
        seen.add(n.lower())
    return names


def template_prompt(names: Sequence[str]) -> str:
    """The prompt the papers use when none is given: 'a photograph of a and b'."""
    return "a photograph of " + " and ".join(names)


def iseg_template_prompt(names: Sequence[str], background_words: Sequence[str] = ()) -> str:
    """iSeg's prompt (its released code): the classes, then 'other object and
    background', then background words that give the stuff in the image a token
    to go to."""
    text = "a photograph of " + " and ".join(names) + " and other object and background"
    return text + (", " + ", ".join(background_words) if background_words else "")


GOCA_BACKGROUND = "background"


def goca_template_prompt(names: Sequence[str]) -> str:
    """GoCA's VOC prompt: the classes, then ', background', whose map is the background's."""
    return template_prompt(names) + ", " + GOCA_BACKGROUND


def find_subsequence(sequence: Sequence, part: Sequence, same=lambda a, b: a == b) -> int:
    """First index where ``part`` occurs in ``sequence`` as a contiguous run, or -1."""
    n = len(part)
    for i in range(len(sequence) - n + 1):
        if all(same(sequence[i + j], part[j]) for j in range(n)):
            return i
    return -1


def locate_classes(prompt_tokens: Sequence, class_tokens: dict[str, Sequence], words: Sequence[str],
                   text: str, same=lambda a, b: a == b, input_name: str = "classes") -> SegPrompt:
    """Find every class's token run in the prompt's flattened token sequence.

    ``prompt_tokens`` is the whole sequence (BOS/EOS/padding included, their
    ``words`` empty); ``class_tokens`` maps each class name to its own tokens
    (no BOS/EOS)."""
    # Words are searched among the prompt's word tokens only, so a class whose words
    # straddle a 75-token chunk boundary (EOS, padding and the next BOS between them)
    # is found; its positions then skip those special tokens.
    content = [i for i, word in enumerate(words) if word]
    content_tokens = [prompt_tokens[i] for i in content]
    found = []
    for name, part in class_tokens.items():
        if len(part) == 0:
            raise AttnSegError(f"{input_name}: '{name}' has no tokens the text encoder can read.")
        start = find_subsequence(content_tokens, part, same)
        if start < 0:
            raise _not_in_prompt(name, words, input_name)
        found.append(ClassTokens(name, tuple(content[start:start + len(part)])))
    return SegPrompt(text=text, classes=tuple(found), token_count=len(prompt_tokens), words=tuple(words))


def _not_in_prompt(name: str, words: Sequence[str], input_name: str) -> AttnSegError:
    if "(" in name and ":" in name:
        return AttnSegError(
            f"{input_name}: '{name}' carries prompt weight syntax. List the class's words without it "
            f"(the prompt may keep '{name}'), e.g. '{name.strip('()').rsplit(':', 1)[0].strip()}'.")
    if input_name != "classes":
        return AttnSegError(
            f"{input_name}: '{name}' is not in the prompt; {input_name} must be words of the prompt, as "
            f"written there. The prompt the model sees is: {readable(words)}")
    return AttnSegError(
        f"{input_name}: the class '{name}' is not in the prompt. Add it to the prompt exactly as "
        f"written, or leave the prompt empty to use 'a photograph of ...'. The prompt the model "
        f"sees is: {readable(words)}")


# SentencePiece (T5) writes a space as this mark, at the start of the piece that follows it.
WORD_START = "\u2581"


def _spelled(pieces: Sequence[str | None]) -> tuple[str, list[int]]:
    """(the lower-cased text ``pieces`` spell, the position of the piece each character
    came from); None pieces (EOS, padding) spell nothing."""
    chars, owners = [], []
    for position, piece in enumerate(pieces):
        for char in (piece or "").replace(WORD_START, " "):
            # Per character, so a character that lower-cases to two keeps its owner.
            lowered = char.lower()
            chars.append(lowered)
            owners.extend([position] * len(lowered))
    return "".join(chars), owners


def _whole_word_at(text: str, needle: str) -> int:
    """First index of ``needle`` in ``text`` not inside a longer word, or -1."""
    start = text.find(needle)
    while start >= 0:
        end = start + len(needle)
        if (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum()):
            return start
        start = text.find(needle, start + 1)
    return -1


def locate_pieces(prompt_pieces: Sequence[str | None], class_pieces: dict[str, Sequence[str]], text: str,
                  input_name: str = "classes") -> SegPrompt:
    """``locate_classes`` for SentencePiece tokenizers (T5): positions index ``prompt_pieces``.

    Matched on the text the pieces spell, not on token ids, because SentencePiece
    splits a word by what surrounds it: 'cat' alone is '▁cat', in 'dog,cat' it is
    'cat'. A class is found as whole words, case aside, and takes every piece that
    spells one of its letters; a piece that is only the word-start mark (T5 reads
    'hummingbird' as '▁' 'h' 'umming' 'bird') spells none and is left out: that
    one token id stands before many words, so its attention is not the class's.
    ``prompt_pieces`` holds None for EOS and padding; ``class_pieces`` maps each
    class name to its pieces as the tokenizer reads it alone, so both sides pass
    the tokenizer's normalisation (a character it does not know is '<unk>' in both)."""
    spelled, owners = _spelled(prompt_pieces)
    words = [(piece or "").replace(WORD_START, "") for piece in prompt_pieces]
    found = []
    for name, part in class_pieces.items():
        needle = _spelled(part)[0].strip()
        if not needle:
            raise AttnSegError(f"{input_name}: '{name}' has no tokens the text encoder can read.")
        start = _whole_word_at(spelled, needle)
        if start < 0:
            raise _not_in_prompt(name, words, input_name)
        span = range(start, start + len(needle))
        found.append(ClassTokens(name, tuple(sorted({owners[i] for i in span if not spelled[i].isspace()}))))
    return SegPrompt(text=text, classes=tuple(found), token_count=len(prompt_pieces), words=tuple(words))


def joined(first: SegPrompt, second: SegPrompt, from_first: bool = True, from_second: bool = True) -> SegPrompt:
    """The two prompts' token sequences one after the other (SD3's context: CLIP,
    then T5), same text and classes; each class takes its positions in the parts
    asked for, the second's moved past the first's ``token_count``."""
    offset = first.token_count
    classes = tuple(
        ClassTokens(a.name, (a.positions if from_first else ()) + (tuple(p + offset for p in b.positions)
                                                                  if from_second else ()))
        for a, b in zip(first.classes, second.classes, strict=True))
    return SegPrompt(first.text, classes, offset + second.token_count, first.words + second.words)


def fuse_ing_words(prompt: SegPrompt) -> SegPrompt:
    """DiffSegmenter's rule: a class word directly followed by a word ending in
    "-ing" ("dog running") also takes that token."""
    classes = []
    for c in prompt.classes:
        following = c.positions[-1] + 1
        if following < len(prompt.words) and prompt.words[following].lower().endswith("ing"):
            c = ClassTokens(c.name, c.positions + (following,))
        classes.append(c)
    return SegPrompt(prompt.text, tuple(classes), prompt.token_count, prompt.words)
