"""Segmentation prompts: encode with the user's CLIP and locate the class tokens."""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch

from ...attnseg.errors import AttnSegError
from ...attnseg.tokens import (SegPrompt, find_subsequence, fuse_ing_words, iseg_template_prompt, joined,
                               locate_classes, locate_pieces, parse_class_list, template_prompt)
from ...attnseg.prompt_weights import KeyScale, check_cat_cross, check_class_weight, reweight_class_tokens

# The conditioning dict keys that carry the class metadata and Cat-Cross's
# key weighting to later nodes.
PROMPT_KEY = "attnseg_prompt"
KEY_SCALE_KEY = "attnseg_key_scale"


def _stream(tokens: dict) -> str:
    """The tokenizer stream whose positions the UNet sees (CLIP-L where present;
    SDXL's two streams share positions)."""
    return "l" if "l" in tokens else next(iter(tokens))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


def _decoded(stream_tokenizer, pieces: str) -> str:
    """Byte-level BPE pieces (CLIP's vocabulary writes each byte as a character:
    'café' is 'cafÃ©') as the text they spell; unchanged where the tokenizer
    cannot say."""
    inner = getattr(stream_tokenizer, "tokenizer", None)
    try:
        return inner.convert_tokens_to_string([pieces]).replace("</w>", "").strip() or pieces
    except Exception:  # a tokenizer without byte-level pieces, or a byte run cut mid-character
        return pieces


def _readable(clip, stream: str, token) -> str:
    """A token as text; "" for BOS, EOS and padding."""
    if isinstance(token, torch.Tensor):
        return "<embedding>"
    tokenizer = getattr(clip.tokenizer, f"clip_{stream}", None)
    if token in {getattr(tokenizer, name, None) for name in ("start_token", "end_token", "pad_token")}:
        return ""
    vocab = getattr(tokenizer, "inv_vocab", None)
    word = vocab.get(token, str(token)) if vocab else str(token)
    return _decoded(tokenizer, word.replace("</w>", ""))


def tokenized(clip, text: str) -> tuple[dict, list, list[str]]:
    """(tokens to encode, the flattened token sequence the UNet sees, readable words)."""
    tokens = clip.tokenize(text)
    stream = _stream(tokens)
    flat = [entry[0] for chunk in tokens[stream] for entry in chunk]
    return tokens, flat, [_readable(clip, stream, t) for t in flat]


def locate_words(clip, text: str, names: list[str], input_name: str = "classes") -> tuple[SegPrompt, dict]:
    """(class metadata of ``names`` in ``text``, tokens to encode); a name not in the text is an error."""
    tokens, flat, words = tokenized(clip, text)
    stream = _stream(tokens)
    # Class words are tokenized without weight parsing, so "(red cat:1.2)" in the
    # prompt and escaped brackets like "pokemon \(creature\)" still match.
    class_tokens = {}
    for name in names:
        own = clip.tokenize(name, return_word_ids=True, disable_weights=True)[stream]
        class_tokens[name] = [entry[0] for chunk in own for entry in chunk if entry[2] != 0]
    return locate_classes(flat, class_tokens, words, text, same=_same, input_name=input_name), tokens


def segmentation_prompt(clip, prompt: str, classes: str, template=template_prompt,
                        part: str = "both") -> tuple[str, SegPrompt, dict]:
    """(text, class metadata, tokens to encode) for a prompt and class list;
    ``template(names)`` builds the prompt when ``prompt`` is empty. A DiT's text
    encoder (a T5 tokenizer: Flux, SD3) gets positions in the sequence the DiT
    attends over, ``part`` choosing SD3's CLIP or T5 tokens (see ``locate_dit_words``)."""
    if is_dit_text_encoder(clip):
        return dit_segmentation_prompt(clip, prompt, classes, part, template)
    names = parse_class_list(classes)
    text = prompt.strip() or template(names)
    meta, tokens = locate_words(clip, text, names)
    return text, meta, tokens


def is_dit_text_encoder(clip) -> bool:
    return hasattr(clip.tokenizer, "t5xxl")


# The token lists a DiT's text sequence can be made of, for ``part`` to choose from.
DIT_TEXT_PARTS = ("both", "clip", "t5")


def _t5_pieces(t5_tokenizer, chunks) -> list[str | None]:
    """A T5 stream's tokens as SentencePiece pieces ('▁red'); None for EOS and padding."""
    specials = {t5_tokenizer.end_token, t5_tokenizer.pad_token}
    pieces = []
    for entry in (entry for chunk in chunks for entry in chunk):
        token = entry[0]
        if isinstance(token, torch.Tensor):
            pieces.append("<embedding>")
        else:
            pieces.append(None if token in specials else t5_tokenizer.tokenizer.convert_ids_to_tokens(int(token)))
    return pieces


def t5_class_prompt(clip, tokens: dict, text: str, names: list[str], input_name: str = "classes") -> SegPrompt:
    """Class metadata in the T5-XXL stream of ``tokens`` (``clip.tokenize(text)``):
    positions index that stream's token list (no BOS; EOS, then padding)."""
    t5 = clip.tokenizer.t5xxl
    class_pieces = {name: [p for p in _t5_pieces(t5, t5.tokenize_with_weights(name, disable_weights=True)) if p]
                    for name in names}
    return locate_pieces(_t5_pieces(t5, tokens["t5xxl"]), class_pieces, text, input_name)


def dit_text_parts(clip) -> tuple[str, ...]:
    """The token lists, in order, that the DiT's text sequence is made of.

    Flux's tokenizer (``FluxTokenizer``: CLIP-L and T5-XXL) feeds T5's tokens alone:
    CLIP-L gives only the pooled vector. SD3's (``SD3Tokenizer``) context is CLIP-L
    and -G side by side (one position per CLIP token), then T5's tokens, less what
    the loaded encoder lacks (SD3 runs without T5, or with T5 alone)."""
    tokenizer = clip.tokenizer
    if not hasattr(tokenizer, "t5xxl"):
        raise AttnSegError(f"clip: {type(tokenizer).__name__} has no T5-XXL tokenizer; a DiT segmentation "
                           f"prompt needs Flux's or SD3's text encoder. Connect the CLIP loaded with the DiT.")
    if not hasattr(tokenizer, "clip_g"):
        return ("t5",)
    # Tokenizers are built for all three parts whatever was loaded; the encoder says which ran.
    encoder = getattr(clip, "cond_stage_model", None)
    has_clip = getattr(encoder, "clip_l", True) is not None or getattr(encoder, "clip_g", True) is not None
    has_t5 = getattr(encoder, "t5xxl", True) is not None
    return ("clip",) * has_clip + ("t5",) * has_t5


def locate_dit_words(clip, text: str, names: list[str], part: str = "both",
                     input_name: str = "classes") -> tuple[SegPrompt, dict]:
    """(class metadata, tokens to encode) for a DiT, positions in the text sequence it attends over.

    Flux: positions index the t5xxl token list (256 tokens at least). SD3: they index
    the whole context, CLIP's tokens (77 per chunk) first, so T5 positions are moved
    by the CLIP length; ``part`` "clip" takes each class's CLIP positions, "t5" its T5
    positions, "both" the two. A part the sequence lacks is refused."""
    if part not in DIT_TEXT_PARTS:
        raise AttnSegError(f"part: '{part}' is not one of {', '.join(DIT_TEXT_PARTS)}.")
    parts = dit_text_parts(clip)
    if part != "both" and part not in parts:
        raise AttnSegError(f"part: this text encoder's sequence has no '{part}' tokens (it is made of "
                           f"{' then '.join(parts)}). Choose {' or '.join(parts + ('both',))}.")
    if "clip" in parts:
        clip_meta, tokens = locate_words(clip, text, names, input_name)
    else:
        tokens = clip.tokenize(text)
    if "t5" not in parts:
        return clip_meta, tokens
    t5_meta = t5_class_prompt(clip, tokens, text, names, input_name)
    if "clip" not in parts:
        return t5_meta, tokens
    return joined(clip_meta, t5_meta, from_first=part != "t5", from_second=part != "clip"), tokens


def dit_segmentation_prompt(clip, prompt: str, classes: str, part: str = "both",
                            template=template_prompt) -> tuple[str, SegPrompt, dict]:
    """The DiT branch of ``segmentation_prompt`` (Flux, SD3): see ``locate_dit_words``."""
    names = parse_class_list(classes)
    text = prompt.strip() or template(names)
    meta, tokens = locate_dit_words(clip, text, names, part)
    return text, meta, tokens


def encode_segmentation_prompt(clip, prompt: str, classes: str, class_weight: float = 1.0, fuse_ing: bool = False,
                               part: str = "both"):
    """CONDITIONING for ``prompt`` whose entries carry the class metadata.

    ``class_weight`` != 1 re-weights the class tokens as DiffSegmenter's "class++"
    does (Compel-style): ``z_empty + w (z - z_empty)`` at their positions, with
    ``z_empty`` the encoding of the empty prompt. ``fuse_ing`` adds a following
    "-ing" word's token to its class."""
    check_class_weight(class_weight)
    _, meta, tokens = segmentation_prompt(clip, prompt, classes, part=part)
    if fuse_ing:
        meta = fuse_ing_words(meta)
    conditioning = clip.encode_from_tokens_scheduled(tokens)
    if class_weight != 1.0:
        empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))[0][0]
        conditioning = [[reweight_class_tokens(cond, empty, meta.class_positions, class_weight), extras]
                        for cond, extras in conditioning]
    return [[c, {**extras, PROMPT_KEY: meta}] for c, extras in conditioning], meta


def encode_cat_cross(clip, prompt: str, classes: str, gamma: float, mode: str, background_words: str = "",
                     part: str = "both"):
    """iSeg's Cat-Cross: the class tokens weighted by ``gamma``, either on the
    keys inside the attention ("keys", the paper; applied by AttnSeg's capture
    nodes) or on the text embedding, which scales keys and values ("embedding",
    the released code). An empty prompt becomes iSeg's template."""
    check_cat_cross(gamma, mode)
    extra_words = [w.strip() for w in background_words.split(",") if w.strip()]
    _, meta, tokens = segmentation_prompt(clip, prompt, classes,
                                          template=lambda names: iseg_template_prompt(names, extra_words), part=part)
    positions = meta.class_positions
    conditioning = []
    for cond, extras in clip.encode_from_tokens_scheduled(tokens):
        extras = {**extras, PROMPT_KEY: meta}
        if mode == "embedding":
            cond = cond.clone()
            cond[:, list(positions)] *= gamma
        else:
            extras[KEY_SCALE_KEY] = KeyScale(positions, float(gamma), meta.token_count)
        conditioning.append([cond, extras])
    return conditioning, meta


def _extra_of(conditioning, key: str):
    """The first value of ``key`` among a CONDITIONING's entries, or None."""
    return next((extras[key] for _, extras in conditioning or [] if key in extras), None)


def key_scale_of(conditioning) -> KeyScale | None:
    return _extra_of(conditioning, KEY_SCALE_KEY)


def prompt_of(conditioning) -> SegPrompt | None:
    return _extra_of(conditioning, PROMPT_KEY)


# Tokenizers of the CLIPs the text encoder nodes ran with, by (client id, node
# id), so the UI's class picker can show a prompt exactly as the connected model
# reads it. Node ids restart at 1 in every workflow: the client id keeps two
# users of one server apart. The oldest entries go first past the bound.
SEEN_TOKENIZERS: OrderedDict[tuple[str | None, str], object] = OrderedDict()
SEEN_TOKENIZERS_KEPT = 256
_SD1_TOKENIZER = []


def running_client_id() -> str | None:
    """The client id of the prompt ComfyUI's server is executing; None when no
    server is running (ComfyUI used as a library, as in-process tests do)."""
    server = sys.modules.get("server")  # imported by ComfyUI's main, never by us
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    return getattr(instance, "client_id", None)


def remember_tokenizer(node_id, clip) -> None:
    if node_id is None or clip is None:
        return
    key = (running_client_id(), str(node_id))
    SEEN_TOKENIZERS[key] = clip.tokenizer
    SEEN_TOKENIZERS.move_to_end(key)
    while len(SEEN_TOKENIZERS) > SEEN_TOKENIZERS_KEPT:
        SEEN_TOKENIZERS.popitem(last=False)


def seen_tokenizer(client_id, node_id):
    """The tokenizer that node last ran with for that client, or None."""
    return SEEN_TOKENIZERS.get((None if client_id is None else str(client_id), str(node_id)))


def sd1_tokenizer():
    """ComfyUI's SD1 tokenizer (its vocabulary ships with ComfyUI), built once."""
    if not _SD1_TOKENIZER:
        from comfy.sd1_clip import SD1Tokenizer

        _SD1_TOKENIZER.append(SD1Tokenizer())
    return _SD1_TOKENIZER[0]


def prompt_words(tokenizer, text: str, classes: list[str]) -> dict:
    """The prompt's words as the tokenizer reads them, each with its token
    positions, and the classes that are not in it.

    A DiT's tokenizer (one with a T5-XXL part: Flux, SD3) gets the words of the
    sequence the DiT attends over, at their positions in it, as ``locate_dit_words``
    places classes: see ``_dit_prompt_words``."""
    tokens = tokenizer.tokenize_with_weights(text, return_word_ids=True)
    if hasattr(tokenizer, "t5xxl"):
        return _dit_prompt_words(tokenizer, tokens, text, classes)
    words, missing, token_count = _clip_prompt_words(tokenizer, tokens, classes)
    return {"words": words, "missing": missing, "token_count": token_count}


def _clip_prompt_words(tokenizer, tokens: dict, classes: list[str]) -> tuple[list[dict], list[str], int]:
    """(words, missing classes, token count) of a CLIP stream of ``tokens`` (CLIP-L where present)."""
    stream = _stream(tokens)
    stream_tokenizer = getattr(tokenizer, f"clip_{stream}", None)
    vocab = getattr(stream_tokenizer, "inv_vocab", None) or {}
    flat = [(entry[0], entry[2]) for chunk in tokens[stream] for entry in chunk]
    # CLIP's BPE marks the last piece of each word with "</w>"; BOS, EOS and
    # padding carry word id 0.
    words, open_word = [], False
    for position, (token, word_id) in enumerate(flat):
        if word_id == 0:
            open_word = False
            continue
        piece = "<embedding></w>" if isinstance(token, torch.Tensor) else vocab.get(token, f"{token}</w>")
        if open_word:
            words[-1]["text"] += piece.replace("</w>", "")
            words[-1]["positions"].append(position)
        else:
            words.append({"text": piece.replace("</w>", ""), "positions": [position]})
        open_word = not piece.endswith("</w>")
    for word in words:  # a word's pieces together, so a character split over two pieces reads whole
        word["text"] = _decoded(stream_tokenizer, word["text"])
    # Word tokens only: a class straddling a 75-token chunk boundary is still found.
    ids = [token for token, word_id in flat if word_id != 0]
    missing = []
    for name in classes:
        own = tokenizer.tokenize_with_weights(name, return_word_ids=True, disable_weights=True)[stream]
        part = [entry[0] for chunk in own for entry in chunk if entry[2] != 0]
        if not part or find_subsequence(ids, part, _same) < 0:
            missing.append(name)
    return words, missing, len(flat)


class _TokenizerOnly:
    """A CLIP as ``dit_text_parts`` reads one, holding a tokenizer and no encoder:
    its sequence is then every part the tokenizer has."""

    cond_stage_model = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def _dit_prompt_words(tokenizer, tokens: dict, text: str, classes: list[str]) -> dict:
    """``prompt_words`` for a DiT: the parts of its text sequence in order, each
    word at its position in the whole sequence (Flux: T5's tokens; SD3: CLIP-L's
    77-token chunks, then T5's, moved by the CLIP length as ``joined`` does).

    The picker gets the tokenizer alone, not which encoders were loaded, so SD3
    shows every part its tokenizer has, the sequence of an SD3 with CLIP-L/G and
    T5 (an SD3 run without T5 attends over the CLIP words alone; one with T5
    alone over the T5 words at their unmoved positions). A class is missing where
    the encode would refuse it: not found in one of the parts."""
    parts = dit_text_parts(_TokenizerOnly(tokenizer))
    words, missing, offset = [], set(), 0
    if "clip" in parts:
        words, clip_missing, offset = _clip_prompt_words(tokenizer, tokens, classes)
        missing.update(clip_missing)
    t5 = tokenizer.t5xxl
    pieces = _t5_pieces(t5, tokens["t5xxl"])
    for word in _t5_words(t5, text, tokens["t5xxl"], pieces):
        words.append({"text": word["text"], "positions": [offset + p for p in word["positions"]]})
    for name in classes:  # one by one, with t5_class_prompt's matching: each missing class is named
        own = [p for p in _t5_pieces(t5, t5.tokenize_with_weights(name, disable_weights=True)) if p]
        try:
            locate_pieces(pieces, {name: own}, text)
        except AttnSegError:
            missing.add(name)
    return {"words": words, "missing": [name for name in classes if name in missing],
            "token_count": offset + len(pieces)}


_T5_UNKNOWN = "<unk>"


def _t5_words(t5_tokenizer, text: str, chunks, pieces: list[str | None]) -> list[dict]:
    """The words of a T5 stream (``pieces`` = ``_t5_pieces`` of its ``chunks``), each
    with its positions in that stream's token list.

    A piece starting with the word-start mark '▁' starts a word; the pieces after
    it, up to the next mark, are that word's ('▁photo' 'real' 'istic'). A piece of
    punctuation alone (',' in 'dog,cat') is a word by itself, as ``locate_pieces``
    takes a class only as whole words. The bare mark (T5 reads 'hummingbird' as
    '▁' 'h' 'umming' 'bird') spells nothing and ``locate_pieces`` leaves it out of
    a class: it is in no word. EOS and padding are not words. A word spelled with
    '<unk>' (a character T5 has no piece for: 'ï', an emoji) reads as the prompt
    writes it, where the tokenizer can say, so a click on it names a class the
    encode finds."""
    from ...attnseg.tokens import WORD_START

    words, open_word = [], False
    for position, piece in enumerate(pieces):
        if piece is None:
            open_word = False
            continue
        starts = piece.startswith(WORD_START)
        body = piece[len(WORD_START):] if starts else piece
        if not body:
            open_word = False
            continue
        alone = piece == "<embedding>" or not any(char.isalnum() for char in body)
        if open_word and not starts and not alone:
            words[-1]["text"] += body
            words[-1]["positions"].append(position)
        else:
            words.append({"text": body, "positions": [position]})
        open_word = not alone
    unknown = [word for word in words if _T5_UNKNOWN in word["text"]]
    written = _t5_written(t5_tokenizer, text, chunks, pieces) if unknown else None
    for word in unknown if written else ():
        spans = [written[p] for p in word["positions"]]
        if all(chunk is spans[0][0] for chunk, _, _ in spans):
            as_written = spans[0][0][spans[0][1]:spans[-1][2]]
        else:
            as_written = "".join(chunk[start:end] for chunk, start, end in spans)
        word["text"] = as_written.strip() or word["text"]
    return words


def _t5_written(t5_tokenizer, text: str, chunks, pieces: list[str | None]) -> list | None:
    """Per position of a T5 stream, (text, start, end): the text its piece was read
    from (None for EOS and padding); None where the tokenizer cannot say.

    ComfyUI's tokenizer reads each weighted segment of the prompt ('(red cat:1.2)'
    is the segment 'red cat') with one call of the SentencePiece tokenizer: the
    same calls, asked for character offsets, give each piece's characters. The
    tokens must come out the same as the stream's (no embedding, a tokenizer that
    gives offsets), else None."""
    try:
        from comfy.sd1_clip import escape_important, token_weights, unescape_important

        start = t5_tokenizer.tokens_start
        end = -1 if t5_tokenizer.tokenizer_adds_end_token else None
        ids, spans = [], []
        for segment, _ in token_weights(escape_important(text), 1.0):
            segment = unescape_important(segment)
            if not segment:
                continue
            encoded = t5_tokenizer.tokenizer(segment, return_offsets_mapping=True)
            ids += encoded["input_ids"][start:end]
            spans += [(segment, a, b) for a, b in encoded["offset_mapping"][start:end]]
    except Exception:  # a tokenizer without offsets, or ComfyUI's prompt parsing changed
        return None
    read = [entry[0] for chunk in chunks for entry in chunk]
    read = [token for token, piece in zip(read, pieces) if piece is not None]
    if len(read) != len(ids) or not all(_same(a, b) for a, b in zip(read, ids)):
        return None
    spans = iter(spans)
    return [None if piece is None else next(spans) for piece in pieces]
