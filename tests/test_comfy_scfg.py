"""S-CFG as a model patch under the real ComfyUI samplers."""

import pytest
import torch

from comfy_env import import_pack
from tiny_models import SD15_LAYOUT, SDXL_LAYOUT, tiny_clip, tiny_unet

pack = import_pack()
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's own module)

from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.hosts.comfyui.scfg import scfg_factors  # noqa: E402
from attnseg_pack.hosts.comfyui.unet import describe_unet  # noqa: E402

SCFG = pack.NODE_CLASS_MAPPINGS["AttnSegSCFG"]()
RELEASED, CUSTOM = "S-CFG (released code)", "custom"


@pytest.fixture(scope="module")
def setup():
    clip = tiny_clip(seed=2)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red cat on a blue sofa"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return tiny_unet(SD15_LAYOUT, seed=1), positive, negative


def sample(model, positive, negative, cfg=6.0, batch=1, h=8, w=12, seed=3):
    latent = {"samples": torch.zeros(batch, 4, h, w)}
    out, = comfy_nodes.common_ksampler(model, seed, 3, cfg, "euler", "normal", positive, negative, latent)
    return out["samples"]


def test_scfg_changes_the_sample_deterministically_and_leaves_the_model_alone(setup):
    model, positive, negative = setup
    patched, = SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0)
    plain = sample(model, positive, negative)
    first, second = sample(patched, positive, negative), sample(patched, positive, negative)
    assert torch.equal(first, second)
    assert not torch.allclose(first, plain, atol=1e-4)
    assert "sampler_cfg_function" not in model.model_options
    assert torch.equal(sample(model, positive, negative), plain)


def test_a_rate_pinned_to_one_is_plain_cfg(setup):
    model, positive, negative = setup
    pinned, = SCFG.patch(model, 1.0, 1.0, 0, 0.0, 1.0, CUSTOM)
    for batch, h, w in ((1, 8, 12), (2, 16, 8)):
        assert torch.allclose(sample(pinned, positive, negative, batch=batch, h=h, w=w),
                              sample(model, positive, negative, batch=batch, h=h, w=w), atol=1e-4)


def test_the_released_preset_ignores_the_custom_inputs(setup):
    model, positive, negative = setup
    released, = SCFG.patch(model, 1.0, 1.0, 0, 0.0, 1.0)  # the preset's default: the released values win
    same, = SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0, CUSTOM, "released code (BOS vs the sum of the other tokens)")
    pinned, = SCFG.patch(model, 1.0, 1.0, 0, 0.0, 1.0, CUSTOM)
    assert torch.equal(sample(released, positive, negative), sample(same, positive, negative))
    assert not torch.allclose(sample(released, positive, negative), sample(pinned, positive, negative), atol=1e-4)


def test_every_input_has_a_tooltip_and_old_workflows_still_validate():
    types = SCFG.INPUT_TYPES()
    assert list(types["required"]) == ["model", "rate_min", "rate_max", "blur", "start_percent", "end_percent"]
    assert list(types["optional"]) == ["preset", "foreground", "rescale_multiplier", "map_source",
                                       "dit_blocks"]  # old ones first
    for section in types.values():
        for name, (_, options) in section.items():
            assert options.get("tooltip"), name
    assert types["optional"]["preset"][0] == [RELEASED, CUSTOM]
    assert types["optional"]["preset"][1]["default"] == RELEASED
    assert types["optional"]["foreground"][0] == ["released code (BOS vs the sum of the other tokens)",
                                                  "words vs the other tokens (cond half; ours, for T5 without BOS)"]
    assert types["optional"]["map_source"][0] == [RELEASED, "GoCA"]
    assert types["optional"]["map_source"][1]["default"] == RELEASED


def test_outside_its_step_range_and_at_cfg_one_it_is_a_no_op(setup):
    model, positive, negative = setup
    late, = SCFG.patch(model, 0.8, 3.0, 3, 0.99, 1.0)  # no step of a 3-step run starts this late
    assert torch.allclose(sample(late, positive, negative), sample(model, positive, negative), rtol=1e-4, atol=1e-3)
    patched, = SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0)
    assert torch.allclose(sample(patched, positive, negative, cfg=1.0), sample(model, positive, negative, cfg=1.0),
                          atol=1e-5)


def test_scfg_uses_the_two_coarsest_resolutions():
    assert scfg_factors(describe_unet(tiny_unet(SD15_LAYOUT))) == {4, 8}
    assert scfg_factors(describe_unet(tiny_unet(SDXL_LAYOUT))) == {2, 4}


def test_conflicting_cfg_function_and_bad_ranges_are_refused(setup):
    model = setup[0].clone()
    model.set_model_sampler_cfg_function(lambda args: args["cond"])
    with pytest.raises(AttnSegError, match="already replaced this model's CFG formula .* only one can run"):
        SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0)
    twice, = SCFG.patch(setup[0], 0.8, 3.0, 3, 0.0, 1.0)
    with pytest.raises(AttnSegError, match="S-CFG is already applied to this model"):
        SCFG.patch(twice, 0.8, 3.0, 3, 0.0, 1.0)
    with pytest.raises(AttnSegError, match="rescale_multiplier"):
        SCFG.patch(setup[0], 0.8, 3.0, 3, 0.0, 1.0, rescale_multiplier=1.5)
    with pytest.raises(AttnSegError, match="start_percent"):
        SCFG.patch(setup[0], 0.8, 3.0, 3, 0.8, 0.2)
    with pytest.raises(AttnSegError, match="rate_min, rate_max"):
        SCFG.patch(setup[0], 3.0, 0.8, 3, 0.0, 1.0, CUSTOM)
    with pytest.raises(AttnSegError, match="blur: 4 must be odd"):
        SCFG.patch(setup[0], 0.8, 3.0, 4, 0.0, 1.0, CUSTOM)
    with pytest.raises(AttnSegError, match="foreground"):
        SCFG.patch(setup[0], 0.8, 3.0, 3, 0.0, 1.0, CUSTOM, "argmax (BOS not the argmax)")
    with pytest.raises(AttnSegError, match="preset"):
        SCFG.patch(setup[0], 0.8, 3.0, 3, 0.0, 1.0, "paper")
    with pytest.raises(AttnSegError, match="dit_blocks: .* is a UNet"):
        SCFG.patch(setup[0], 0.8, 3.0, 3, 0.0, 1.0, dit_blocks="single 0")
    with pytest.raises(AttnSegError, match="dit_blocks: 'single' is not 'TYPE INDEX'"):
        SCFG.patch(setup[0], 0.8, 3.0, 3, 0.0, 1.0, dit_blocks="single")
    SCFG.patch(setup[0], 3.0, 0.8, 4, 0.0, 1.0)  # the released preset ignores the bad custom values


def test_separate_cond_and_uncond_passes_give_the_same_sample(setup, monkeypatch):
    model, positive, negative = setup
    patched, = SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0)
    batched = sample(patched, positive, negative)
    # A model that claims to need all the memory makes ComfyUI run cond and uncond as separate passes.
    monkeypatch.setattr(patched.model, "memory_required", lambda *a, **k: float("inf"))
    separate = sample(patched, positive, negative)
    assert torch.allclose(separate, batched, rtol=1e-3, atol=1e-2)
    assert not torch.allclose(separate, sample(model, positive, negative), rtol=1e-3, atol=1e-2)


def test_a_run_interrupted_inside_a_unet_call_does_not_change_the_next_run(setup):
    """Interrupt S-CFG mid-forward, after the step's layers stored their maps: the
    next run on the same patched model starts from an empty store and gives the
    fresh run's sample."""
    import comfy.model_management
    import comfy.patcher_extension

    model, positive, negative = setup
    patched, = SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0)
    expected = sample(patched, positive, negative)
    function = patched.model_options["sampler_cfg_function"]
    store, = [c.cell_contents for c in function.__closure__ if type(c.cell_contents).__name__ == "AttentionStore"]
    calls = {"n": 0}

    def interrupt_midway(n, extra):
        calls["n"] += 1
        if calls["n"] == 19:  # late in the second step's forward (10 transformer blocks each)
            raise comfy.model_management.InterruptProcessingException()
        return n

    interrupted = patched.clone()  # shares the patches and their store with ``patched``
    interrupted.set_model_attn2_output_patch(interrupt_midway)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(interrupted, positive, negative)
    assert store.entries  # what the interrupted call left behind
    seen = []

    def record(executor, *args, **kwargs):  # runs inside S-CFG's own run wrapper
        seen.append(len(store.entries))
        return executor(*args, **kwargs)

    rerun = patched.clone()
    rerun.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "test", record)
    assert torch.equal(sample(rerun, positive, negative), expected) and seen == [0]



def rescale_cfg_node():
    from comfy_extras.nodes_model_advanced import RescaleCFG

    return RescaleCFG()


def test_a_rescale_cfg_after_scfg_stops_the_run_naming_it(setup):
    """ComfyUI has one CFG-function slot: RescaleCFG after S-CFG would replace it
    without a word; the run says so instead."""
    model, positive, negative = setup
    patched, = SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0)
    replaced, = rescale_cfg_node().patch(patched, 0.7)
    with pytest.raises(AttnSegError, match="RescaleCFG replaced S-CFG's CFG formula .* rescale_multiplier"):
        sample(replaced, positive, negative)
    with pytest.raises(AttnSegError, match="RescaleCFG already replaced .* set S-CFG's rescale_multiplier"):
        SCFG.patch(rescale_cfg_node().patch(model, 0.7)[0], 0.8, 3.0, 3, 0.0, 1.0)


def test_the_rescale_option_chains_rescale_cfg_after_scfg(setup):
    """rescale_multiplier applies RescaleCFG's formula to S-CFG's result: with the
    rate pinned to 1 (plain CFG) it equals ComfyUI's RescaleCFG node; at 0 it is
    S-CFG alone."""
    model, positive, negative = setup
    pinned, = SCFG.patch(model, 1.0, 1.0, 0, 0.0, 1.0, CUSTOM, rescale_multiplier=0.7)
    rescale, = rescale_cfg_node().patch(model, 0.7)
    assert torch.allclose(sample(pinned, positive, negative), sample(rescale, positive, negative), atol=1e-5)
    plain_scfg, = SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0)
    off, = SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0, rescale_multiplier=0.0)
    chained, = SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0, rescale_multiplier=0.7)
    assert torch.equal(sample(off, positive, negative), sample(plain_scfg, positive, negative))
    assert not torch.allclose(sample(chained, positive, negative), sample(plain_scfg, positive, negative), atol=1e-4)



# ----- the GoCA map source -----

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402

from attnseg_pack.hosts.comfyui import scfg as scfg_host  # noqa: E402
from attnseg_pack.hosts.comfyui.text import encode_segmentation_prompt  # noqa: E402

PROMPT = "a red cat on a blue sofa"


@pytest.fixture(scope="module")
def goca_setup():
    """The tiny SD1.5 with a positive prompt from the pack's encoder (its token layout recorded)."""
    clip = tiny_clip(seed=2)
    positive, _ = encode_segmentation_prompt(clip, PROMPT, "red cat, blue sofa")
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return tiny_unet(SD15_LAYOUT, seed=1), positive, negative, clip


def goca_patch(model, rate=(0.8, 3.0), preset=RELEASED):
    return SCFG.patch(model, *rate, 3, 0.0, 1.0, preset, map_source="GoCA")[0]


def sample_custom(model, positive, negative, cfg=6.0, steps=3, h=8, w=12, seed=3):
    """SamplerCustom's path: a sampler object and sigmas into comfy.sample.sample_custom."""
    latent = torch.zeros(1, 4, h, w)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, positive,
                                      negative, latent, disable_pbar=True, seed=seed)


def test_goca_maps_guide_under_ksampler_and_sampler_custom(goca_setup):
    model, positive, negative, _ = goca_setup
    goca = goca_patch(model)
    scfg, = SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0)
    first, second = sample(goca, positive, negative), sample(goca, positive, negative)
    assert torch.equal(first, second) and torch.isfinite(first).all()
    assert not torch.allclose(first, sample(model, positive, negative), atol=1e-4)  # it guides
    assert not torch.allclose(first, sample(scfg, positive, negative), atol=1e-4)  # with other maps than S-CFG's
    # SamplerCustom (sample_custom) runs the same guidance as KSampler (sample) with the same sigmas and noise
    assert torch.allclose(sample_custom(goca, positive, negative), first, atol=1e-5)
    assert "sampler_cfg_function" not in model.model_options


def test_goca_maps_with_the_rate_pinned_to_one_are_plain_cfg(goca_setup):
    """The capture (output-weighted heads, reference queries) leaves the model's output as it was."""
    model, positive, negative, _ = goca_setup
    pinned = goca_patch(model, (1.0, 1.0), CUSTOM)
    assert torch.allclose(sample(pinned, positive, negative), sample(model, positive, negative), atol=1e-4)


def test_goca_captures_only_what_it_needs_and_holds_nothing_between_steps(goca_setup, monkeypatch):
    """Per step: S-CFG's two coarsest levels (cross and self, both halves), output-weighted heads,
    one reference layer's queries, each entry that step's only; nothing held after the step,
    and the same state at step 1 and step 20."""
    model, positive, negative, _ = goca_setup
    goca = goca_patch(model)
    store = goca.model_options["sampler_cfg_function"].attnseg_store
    seen, after = [], []
    compute = scfg_host.goca_rate_inputs

    def recording(store_, *args, **kwargs):
        seen.append(sorted((key.kind, key.factor, branch, maps.count, maps.total.nelement() * maps.total.element_size())
                           for (key, branch), maps in store_.entries.items()))
        assert store_.head_reduction == "auto"
        return compute(store_, *args, **kwargs)

    monkeypatch.setattr(scfg_host, "goca_rate_inputs", recording)
    latent = {"samples": torch.zeros(1, 4, 8, 12)}
    callback = lambda step, *a: after.append((len(store.entries), len(store.steps)))  # noqa: E731
    noise = comfy.sample.prepare_noise(latent["samples"], 3)
    comfy.sample.sample(goca, noise, 20, 6.0, "euler", "normal", positive, negative, latent["samples"],
                        callback=callback, disable_pbar=True, seed=3)
    assert len(seen) == 20 and all(state == seen[0] for state in seen)  # step 1 holds what step 20 holds
    kinds = {(kind, factor, branch) for kind, factor, branch, _, _ in seen[0]}
    assert {factor for _, factor, _ in kinds} == {4, 8}  # S-CFG's layers only
    assert {(kind, branch) for kind, _, branch in kinds} == {(k, b) for k in ("cross", "self", "query")
                                                             for b in ("cond", "uncond")}
    assert [factor for kind, factor, branch, _, _ in seen[0] if kind == "query" and branch == "cond"] == [4]
    assert all(count == 1 for _, _, _, count, _ in seen[0])  # only the running step's maps
    assert after == [(0, 0)] * 20  # dropped once each step's guidance is computed


def test_goca_maps_run_on_the_sdxl_layout(goca_setup):
    _, positive, negative, _ = goca_setup
    model = tiny_unet(SDXL_LAYOUT, seed=4)
    guided = sample(goca_patch(model), positive, negative, h=16, w=16)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, sample(model, positive, negative, h=16, w=16),
                                                               atol=1e-4)


def test_goca_maps_refuse_a_prompt_without_its_token_layout_and_bad_sources(goca_setup):
    model, positive, negative, clip = goca_setup
    stock = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    goca = goca_patch(model)
    calls = []
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(scfg_host, "goca_rate_inputs", lambda *a, **k: calls.append(1))
    try:
        with pytest.raises(AttnSegError, match="map_source: 'GoCA' needs to know which of the positive prompt's "
                                               "tokens are words.*AttnSeg Text Encode"):
            sample(goca, stock, negative)
    finally:
        monkeypatch.undo()
    assert not calls  # refused before the first step
    with pytest.raises(AttnSegError, match="map_source: 'paper' is not one of 'S-CFG \\(released code\\)', 'GoCA'"):
        SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0, map_source="paper")
    assert torch.isfinite(sample(SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0)[0], stock, negative)).all()  # S-CFG's own


def test_goca_maps_guide_sd3():
    """On SD3 the GoCA source reads S-CFG's block (head mean, one block: no layer weights)."""
    from tiny_dit import SD3_CONFIG, sd3_clip, tiny_sd3

    model, clip = tiny_sd3(seed=4, config=SD3_CONFIG), sd3_clip(seed=5)
    cond = pack.NODE_CLASS_MAPPINGS["AttnSegTextEncode"]().encode(
        clip, "a red circle and a blue square", "red circle, blue square", 1.0, False, "custom", "both")[0]
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("a blurry photograph"))
    latent = {"samples": torch.zeros(1, 16, 8, 8)}

    def run(patched):
        out, = comfy_nodes.KSampler().sample(patched, 3, 2, 5.0, "euler", "simple", cond, negative, latent)
        return out["samples"]

    goca = run(goca_patch(model))
    assert torch.isfinite(goca).all()
    assert not torch.allclose(goca, run(model), atol=1e-4)
    assert not torch.allclose(goca, run(SCFG.patch(model, 0.8, 3.0, 3, 0.0, 1.0)[0]), atol=1e-4)


def test_goca_maps_from_separate_cond_and_uncond_passes_give_the_same_sample(goca_setup, monkeypatch):
    model, positive, negative, _ = goca_setup
    goca = goca_patch(model)
    batched = sample(goca, positive, negative)
    monkeypatch.setattr(goca.model, "memory_required", lambda *a, **k: float("inf"))  # one pass per half
    separate = sample(goca, positive, negative)
    assert (separate - batched).abs().max() <= 1e-4 * batched.abs().max()  # float rounding of the passes only
