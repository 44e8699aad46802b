"""The pack's nodes on tiny Flux and SD3 models built from ComfyUI's classes, with
tiny T5/CLIP encoders on the real tokenizers and the stock 16-channel VAE: every
capture node and segmenter takes a DiT, and the refusals name what fits."""

import pytest
import torch

from comfy_env import import_pack
from dit_files import dit_vae_file
from tiny_dit import CLIP_L_WIDTH, FLUX_CONFIG, SD3_CONFIG, T5_WIDTH, flux_clip, sd3_clip, tiny_flux, tiny_sd3

pack = import_pack()
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's own nodes: KSampler)

from attnseg_pack.attnseg import AttnSegError, LayerKey  # noqa: E402
from attnseg_pack.hosts.comfyui.text import prompt_of  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS
CLASSES = "red circle, blue square"
PROMPT = "a red circle and a blue square"
# Full-width blocks of the benchmark are not needed here: 2 double + 2 single blocks,
# text widths of the tiny encoders.
FLUX = dict(FLUX_CONFIG, context_in_dim=T5_WIDTH, vec_in_dim=CLIP_L_WIDTH)


@pytest.fixture(scope="module")
def vae():
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(dit_vae_file())))


@pytest.fixture(scope="module")
def flux():
    return tiny_flux(seed=2, config=FLUX), flux_clip(seed=3)


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3(seed=4, config=SD3_CONFIG), sd3_clip(seed=5)


def image(h=64, w=96, seed=0):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def encode(clip, part="both", classes=CLASSES):
    return NODES["AttnSegTextEncode"]().encode(clip, PROMPT, classes, 1.0, False, "custom", part)[0]


def capture(model, vae, cond, picture, **changes):
    args = dict(timesteps="150", seed=0, resolution=128, preset="custom") | changes
    return NODES["AttnSegSegmentImage"]().segment(model, vae, picture, cond, **args)[0]


def masks(scores, picture, threshold=0.3):
    return NODES["AttnSegMasks"]().make(scores, threshold, "threshold", picture)["result"]


def test_flux_text_positions_are_t5_pieces_and_the_model_takes_the_conditioning(flux):
    _, clip = flux
    cond = encode(clip)
    meta = prompt_of(cond)
    assert cond[0][0].shape[1] == meta.token_count >= 256 and cond[0][0].shape[-1] == T5_WIDTH
    tokenizer = clip.tokenizer.t5xxl.tokenizer
    ids = [entry[0] for chunk in clip.tokenize(PROMPT)["t5xxl"] for entry in chunk]
    for name, cls in zip(["red circle", "blue square"], meta.classes):
        assert tokenizer.decode([ids[p] for p in cls.positions]).strip() == name


def test_every_segmenter_runs_on_a_flux_capture(flux, vae):
    model, clip = flux
    picture = image()
    store = capture(model, vae, encode(clip), picture, self_layers="all (GoCA)")
    assert store.family == "flux" and store.architecture == "dit"
    kinds = {(key.kind, key.block) for key, _ in store.entries}
    assert kinds == {(kind, block) for kind in ("cross", "self", "query") for block in ("double", "single")} - {
        ("query", "double")}  # the reference: GoCA's default block on a model without block 27, a single one
    grid = (4, 8)  # a 64 x 96 picture seen at 64 x 128 px (sides in 64s), latent 8 x 16, patches of 2
    assert all(stored.grid == grid for (key, _), stored in store.entries.items() if key.kind == "cross")
    results = {
        "diffsegmenter": NODES["AttnSegDiffSegmenter"]().segment(store, "1", True, preset="custom")[0],
        "iseg": NODES["AttnSegEntSelf"]().refine(
            NODES["AttnSegISegCrossAttention"]().segment(store, "2", "1", preset="custom")[0], store, 0.015, 3,
            "code", preset="custom")[0],
        "goca": NODES["AttnSegGoCA"]().segment(store, "auto", True, 5, 2, "", "double 1", 1, preset="custom")[0],
    }
    for name, scores in results.items():
        assert scores.maps.shape[:2] == (1, 2), name
        assert torch.isfinite(scores.maps).all() and scores.maps.amax() > scores.maps.amin(), name
        mask, labels = masks(scores, picture)[:2]
        assert mask.shape == (2, 64, 96) and labels.shape == (1, 64, 96), name
    # DiffSeg and iSeg's unsupervised mode on the I2I of every block, named by the T5 class pieces
    unsupervised = NODES["AttnSegUnsupervised"]()
    for refinement in ("off", "code"):
        named, labels, segments, _, _, names = unsupervised.segment(store, 4, 0.01, 3, refinement, 0.015, 3,
                                                                    image=picture, preset="custom")["result"]
        count = int(segments.max())
        assert segments.shape == (1, 64, 96) and set(segments.unique().tolist()) == set(range(1, count + 1))
        assert count > 1 and named.shape == (2, 64, 96) and names.startswith(f"image 1: {count} segments: 1 ")
    # The Flux preset fits the store's family; its 16 anchors per side need a larger capture than this one.
    with pytest.raises(AttnSegError, match="anchors: 16 per side is more than the 8x4 self-attention grid"):
        unsupervised.segment(store, 4, 0.01, 3, "off", 0.015, 3, preset="DiffSeg Flux (COCO-Stuff settings)")
    with pytest.raises(AttnSegError, match="'DiffSeg COCO-Stuff \\(released code\\)' is made for UNet models.*"
                                           "'DiffSeg Flux \\(COCO-Stuff settings\\)'"):
        unsupervised.segment(store, 4, 0.01, 3, "off", 0.015, 3, preset="DiffSeg COCO-Stuff (released code)")


def test_seeds_run_on_a_flux_capture(flux, vae):
    model, clip = flux
    store = capture(model, vae, encode(clip), image(), self_layer_picks="double 1")
    seeds = '[{"point": [10, 10]}, {"box": [60, 30, 95, 63]}]'
    scores = NODES["AttnSegSeeds"]().segment(store, seeds, 0.1, 3, "code", 1.0, preset="custom")[0]
    assert scores.maps.shape == (1, 2, 4, 8) and scores.class_names == ["point 1", "box 2"]
    torch.testing.assert_close(scores.maps.amax((2, 3)), torch.ones(1, 2))  # each map divided by its maximum
    with pytest.raises(AttnSegError, match="'iSeg interactive \\(released UI\\)' is made for UNet models"):
        NODES["AttnSegSeeds"]().segment(store, seeds, 0.1, 3, "code", 1.0, preset="iSeg interactive (released UI)")


def test_unet_presets_are_refused_on_a_dit_by_name(flux, vae):
    model, clip = flux
    cond, picture = encode(clip), image()
    with pytest.raises(AttnSegError, match="preset: 'DiffSegmenter \\(released code\\)' is made for UNet models.*"
                                           "the model is Flux.*Choose 'GoCA Flux \\(released code\\)'"):
        capture(model, vae, cond, picture, preset="DiffSegmenter (released code)")
    with pytest.raises(AttnSegError, match="'GoCA Flux \\(released code\\)' reads single block 8, but this model has "
                                           "2 single blocks"):
        capture(model, vae, cond, picture, preset="GoCA Flux (released code)")
    store = capture(model, vae, cond, picture)
    with pytest.raises(AttnSegError, match="'GoCA SD1.5 \\(released code\\)' is made for UNet models.*whose attention "
                                           "this store holds.*'GoCA Flux \\(released code\\)'"):
        NODES["AttnSegGoCA"]().segment(store, "auto", True, 5, 2, "", preset="GoCA SD1.5 (released code)")
    with pytest.raises(AttnSegError, match="heads: 'auto'.*is for UNet models"):
        capture(model, vae, cond, picture, heads="auto (GoCA)")
    with pytest.raises(AttnSegError, match="self_layer_picks: 'double' is not 'TYPE INDEX'"):
        capture(model, vae, cond, picture, self_layer_picks="double")


def test_the_capture_sampler_on_flux_is_the_stock_sampler_and_records_its_steps(flux):
    model, clip = flux
    cond = encode(clip)
    latent = {"samples": torch.zeros(1, 16, 8, 12)}
    sampler = NODES["AttnSegCaptureSampler"]()
    args = (model, 1, 2, 1.0, "euler", "simple", cond, cond, latent, 1.0)
    stock = comfy_nodes.KSampler().sample(model, 1, 2, 1.0, "euler", "simple", cond, cond, latent)[0]["samples"]
    off, none = sampler.sample(*args, False, 0, -1, "last step", preset="custom")
    on, store = sampler.sample(*args, True, 0, -1, "captured steps", preset="custom")
    assert torch.equal(off["samples"], stock)
    assert none is None and store.steps == {0, 1}
    torch.testing.assert_close(on["samples"], off["samples"], atol=1e-4, rtol=0)
    cross = store.entries[(LayerKey.dit("cross", "double", 0, 2), "cond")]
    assert cross.count == 2 and cross.grid == (4, 6) and cross.total.shape[-1] == prompt_of(cond).token_count
    scores = NODES["AttnSegDiffSegmenter"]().segment(store, "1", True, preset="custom")[0]
    assert scores.maps.shape == (1, 2, 4, 6)


def test_sd3_capture_reads_the_part_of_the_context_it_is_told(sd3, vae):
    model, clip = sd3
    picture = image(64, 64)
    for part in ("both", "clip", "t5"):
        cond = encode(clip, part)
        meta = prompt_of(cond)
        positions = [p for c in meta.classes for p in c.positions]
        # CLIP-L and -G side by side: 77 positions, then T5's
        assert (min(positions) < 77) == (part != "t5") and (max(positions) >= 77) == (part != "clip")
        store = capture(model, vae, cond, picture, self_layer_picks="joint 1")
        assert store.family == "sd3"
        assert {(key.kind, key.block_id) for key, _ in store.entries} == (
            {("cross", i) for i in range(4)} | {("self", 1)})
        scores = NODES["AttnSegDiffSegmenter"]().segment(store, "1", True, preset="custom")[0]
        assert torch.isfinite(scores.maps).all() and scores.maps.shape == (1, 2, 8, 8)  # 128 px, patches of 2


def test_the_seg4diff_preset_names_the_block_a_small_sd3_lacks(sd3, vae):
    model, clip = sd3
    with pytest.raises(AttnSegError, match="'Seg4Diff SD3 \\(paper\\)' reads joint block 9, but this model has 4 "
                                           "joint blocks"):
        NODES["AttnSegSegment"]().segment(model, clip, vae, image(), CLASSES, "Seg4Diff SD3 (paper)")


def test_scfg_guides_sd3(sd3):
    model, clip = sd3
    cond, negative = encode(clip), clip.encode_from_tokens_scheduled(clip.tokenize("a blurry photograph"))
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    patched = NODES["AttnSegSCFG"]().patch(model, 0.8, 3.0, 3, 0.0, 1.0)[0]
    guided = comfy_nodes.KSampler().sample(patched, 3, 2, 5.0, "euler", "simple", cond, negative, latent)[0]["samples"]
    plain = comfy_nodes.KSampler().sample(model, 3, 2, 5.0, "euler", "simple", cond, negative, latent)[0]["samples"]
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain)


WORDS = "words vs the other tokens (cond half; ours, for T5 without BOS)"


def test_scfg_on_flux_takes_the_words_rule_and_refuses_what_needs_a_bos(flux):
    model, clip = flux
    node = NODES["AttnSegSCFG"]()
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = {"samples": torch.zeros(1, 16, 8, 8)}

    def run(patched, positive):
        return comfy_nodes.KSampler().sample(patched, 3, 2, 5.0, "euler", "simple", positive, negative,
                                             latent)[0]["samples"]

    with pytest.raises(AttnSegError, match="foreground: S-CFG's released rule .* no BOS. Set preset to 'custom'"):
        node.patch(model, 0.8, 3.0, 3, 0.0, 1.0)
    with pytest.raises(AttnSegError, match="map_source: GoCA's S-CFG integration .* no BOS"):
        node.patch(model, 0.8, 3.0, 3, 0.0, 1.0, "custom", WORDS, map_source="GoCA")
    with pytest.raises(AttnSegError, match="dit_blocks: .* has no single block 9; its blocks are double blocks 0-1 "
                                           "and single blocks 0-1"):
        node.patch(model, 0.8, 3.0, 3, 0.0, 1.0, "custom", WORDS, dit_blocks="single 9")
    patched = node.patch(model, 0.8, 3.0, 3, 0.0, 1.0, "custom", WORDS, dit_blocks="single *")[0]
    store = patched.model_options["sampler_cfg_function"].attnseg_store
    keys = []
    record = store.add  # the maps each step captures, before the CFG function drops them
    store.add = lambda key, branch, *args: (keys.append((key, branch)), record(key, branch, *args))[1]
    guided = run(patched, encode(clip))
    plain = run(model, encode(clip))
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain)
    assert {(k.kind, branch) for k, branch in keys} == {("cross", "cond"), ("self", "cond")}  # no uncond half
    assert {(k.block, k.block_id) for k, _ in keys} == {("single", 0), ("single", 1)}
    with pytest.raises(AttnSegError, match="foreground: 'words vs the other tokens.*AttnSeg Text Encode"):
        run(patched, clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT)))  # a stock encoder's positive


def test_concept_attention_node_on_flux(flux, vae):
    model, clip = flux
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    node = NODES["AttnSegConceptAttention"]()
    scores = node.segment(model, clip, vae, image(), positive, "circle, square, background", "0, 1", 500.0, 0,
                          128, preset="custom")[0]
    assert scores.maps.shape == (1, 3, 4, 8)
    torch.testing.assert_close(scores.maps.sum(1), torch.ones(1, 4, 8), atol=1e-5, rtol=0)
    with pytest.raises(AttnSegError, match="blocks:"):
        node.segment(model, clip, vae, image(), positive, "circle", "one", 500.0, 0, 128, preset="custom")
    with pytest.raises(AttnSegError, match="15"):
        node.segment(model, clip, vae, image(), positive, "circle", "", 500.0, 0, 128,
                     preset="ConceptAttention Flux (released code)")
