"""Presets: every one names its source, and layer picks resolve or fail by name."""

import pytest

from attnseg import AttnSegError
from attnseg.layers import LayerPick, check_heads, resolve
from attnseg.presets import CUSTOM, ISEG_VOC_HEADS_16, ISEG_VOC_HEADS_32, PRESETS, find_preset, names
from attnseg.store import LayerKey


def sd_layers(finest_factor: int = 1, depth: int = 1):
    """The transformer layers of SD1.5/2.1 (finest_factor 1) or SDXL (2, depth 2), as keys."""
    layers = []
    factors = [1, 2, 4] if finest_factor == 1 else [2, 4]
    ids = {1: (1, 2), 2: (4, 5), 4: (7, 8)} if finest_factor == 1 else {2: (4, 5), 4: (7, 8)}
    for f in factors:
        layers += [LayerKey("self", "input", i, d, f) for i in ids[f] for d in range(depth)]
    out = {4: (3, 4, 5), 2: (6, 7, 8), 1: (9, 10, 11)} if finest_factor == 1 else {4: (0, 1, 2), 2: (3, 4, 5)}
    for f in reversed(factors):
        layers += [LayerKey("self", "output", i, d, f) for i in out[f] for d in range(depth)]
    return layers


def test_picks_name_the_authors_layers_on_the_sd_layout():
    layers = sd_layers()
    (iseg_self,) = resolve(layers, PRESETS["iSeg VOC (released code)"].capture.self_layers, "iSeg")
    assert (iseg_self.block, iseg_self.block_id) == ("output", 10)  # up_blocks[3].attentions[1]
    goca = resolve(layers, PRESETS["GoCA SD1.5 (released code)"].settings.propagation_layers, "GoCA")
    assert [(k.block, k.block_id) for k in goca] == [("input", 2), ("output", 9), ("output", 10)]
    heads = [resolve(layers, (pick,), "iSeg")[0] for pick, _ in ISEG_VOC_HEADS_16 + ISEG_VOC_HEADS_32]
    assert [(k.block, k.block_id) for k in heads] == [("input", 7), ("input", 8), ("output", 3), ("output", 4),
                                                     ("output", 5), ("input", 5), ("output", 6), ("output", 7)]
    assert sum(len(h) for _, h in ISEG_VOC_HEADS_16) == 41 and sum(len(h) for _, h in ISEG_VOC_HEADS_32) == 9


def test_sdxl_picks_follow_its_depth_two_layout():
    layers = sd_layers(finest_factor=2, depth=2)
    reference, = resolve(layers, (PRESETS["GoCA SDXL (released code)"].capture.reference,), "GoCA SDXL")
    assert (reference.block, reference.block_id, reference.depth) == ("output", 3, 0)
    picked = resolve(layers, PRESETS["GoCA SDXL (released code)"].settings.propagation_layers, "GoCA SDXL")
    assert [(k.block, k.block_id, k.depth) for k in picked] == [
        ("input", 4, 0), ("input", 4, 1), ("output", 3, 0), ("output", 3, 1), ("output", 4, 0), ("output", 4, 1),
        ("output", 5, 0)]


def test_dit_picks_name_blocks_by_index_also_among_a_stores_few_blocks():
    """GoCA Flux low memory stores the self-attention of blocks 12, 18 (double) and 27-29
    (single 8-10) only: its propagation picks, double blocks 12 and 18, are found among
    those by their index, not by their position among the stored blocks."""
    flux = [LayerKey("self", "double", i, 0, 2) for i in range(19)] + \
        [LayerKey("self", "single", i, 0, 2) for i in range(38)]
    preset = PRESETS["GoCA Flux low memory (released code)"]
    stored = resolve(flux, preset.capture.self_layers, preset.name)
    assert [(k.block, k.block_id) for k in stored] == [("double", 12), ("double", 18), ("single", 8),
                                                         ("single", 9), ("single", 10)]
    picked = resolve(stored, preset.settings.propagation_layers, preset.name, "store")
    assert [(k.block, k.block_id) for k in picked] == [("double", 12), ("double", 18)]
    with pytest.raises(AttnSegError, match="the store holds double blocks 12, 18"):
        resolve(stored, (LayerPick.dit("double", 5),), preset.name, "store")
    with pytest.raises(AttnSegError, match=r"this model has 19 double blocks \(0 to 18\)"):
        resolve(flux, (LayerPick.dit("double", 19),), preset.name)
    with pytest.raises(AttnSegError, match="there are no single blocks, only double blocks"):
        resolve(stored[:2], (LayerPick.dit("single", 8),), preset.name, "store")


def test_a_preset_the_model_cannot_run_names_the_preset_and_what_is_missing():
    sdxl = sd_layers(finest_factor=2, depth=2)
    with pytest.raises(AttnSegError, match=r"'iSeg VOC \(released code\)' reads attention level 2 .* 2 attention levels"):
        resolve(sdxl, PRESETS["iSeg VOC (released code)"].capture.cross_layers, "iSeg VOC (released code)")
    with pytest.raises(AttnSegError, match=r"reads heads 19 of the cross-attention of layer X, which has 8 heads"):
        check_heads((1, 19), 8, "the cross-attention of layer X", "iSeg VOC (released code)")
    with pytest.raises(AttnSegError, match="output level 0 .* layer 4"):
        resolve(sd_layers(), (LayerPick("output", 0, 3),), "p")


def test_every_preset_names_its_source_and_custom_is_no_preset():
    for name, preset in PRESETS.items():
        assert preset.source.repository and preset.source.script and preset.source.reported, name
        assert find_preset(name) is preset
    assert find_preset(CUSTOM) is None
    assert names("goca") == ["GoCA SD1.5 (released code)", "GoCA SDXL (released code)", "GoCA Flux (released code)",
                             "GoCA Flux low memory (released code)", CUSTOM]
    with pytest.raises(AttnSegError, match="preset: 'GoCA SD1.5 \\(released code\\)' is not one of"):
        find_preset("GoCA SD1.5 (released code)", "iseg")


def test_the_readme_preset_table_lists_every_preset():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Presets"):readme.index("## Workflows")]
    for name, preset in PRESETS.items():
        assert f"| `{name}` |" in table, name
        assert preset.source.repository.split("/")[-1] in table or preset.source.repository == "this repository"


def test_layer_picks_and_heads_parse_from_text_or_name_the_input():
    from attnseg.layers import parse_heads, parse_picks

    assert parse_picks("output 0 1; input 0 *", "self_layer_picks") == (LayerPick("output", 0, 1),
                                                                         LayerPick("input", 0, None))
    assert parse_picks("  ", "self_layer_picks") is None
    assert parse_heads("1, 2", "self_heads") == (1, 2) and parse_heads("", "self_heads") is None
    for text, message in (("decoder 0 1", "is not 'BLOCK LEVEL INDEX'"), ("output zero 1", "whole numbers"),
                          ("output -1 0", "negative")):
        with pytest.raises(AttnSegError, match="self_layer_picks: .*" + message):
            parse_picks(text, "self_layer_picks")
    for text in ("1, x", "1, 1", "-1"):
        with pytest.raises(AttnSegError, match="self_heads: "):
            parse_heads(text, "self_heads")
