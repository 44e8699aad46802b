"""Capture through the real ComfyUI sampler on tiny models built from ComfyUI's classes."""

import pytest
import torch

from comfy_env import import_pack
from reference_capture import install_naive_capture
from tiny_models import SD15_LAYOUT, SDXL_LAYOUT, tiny_unet


pack = import_pack()
from attnseg_pack.hosts.comfyui.capture import CapturePlan, StepRange  # noqa: E402
from attnseg_pack.hosts.comfyui.passes import capture_pass, capture_sample, segment_image  # noqa: E402
from attnseg_pack.hosts.comfyui.text import encode_segmentation_prompt  # noqa: E402
from attnseg_pack.hosts.comfyui.unet import describe_unet  # noqa: E402

NODES = pack.NODE_CLASS_MAPPINGS
GOCA_LIKE = CapturePlan(cross_heads="auto", self_every_layer=True, reference_factor=2)


@pytest.fixture(scope="module")
def sd15():
    return tiny_unet(SD15_LAYOUT, seed=1)


def encode(clip, prompt, classes="cat"):
    return encode_segmentation_prompt(clip, prompt, classes)[0]


def plain(clip, prompt):
    """A stock CLIPTextEncode conditioning (negatives need no classes)."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))


def latent(batch=1, h=8, w=12, seed=0):
    return {"samples": torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))}


def run(model, positive, negative, cfg=5.0, steps=2, plan=CapturePlan(), lat=None):
    return capture_sample(model, 7, steps, cfg, "euler", "normal", positive, negative, lat or latent(), 1.0, plan)


def test_describe_unet_reads_resolution_and_depth_from_the_modules():
    sd15_info = describe_unet(tiny_unet(SD15_LAYOUT))
    assert sd15_info.finest_factor == 1
    assert {(l.block, l.block_id, l.factor) for l in sd15_info.layers if l.factor == 1} == {
        ("input", 1, 1), ("output", 6, 1), ("output", 7, 1)}
    sdxl_info = describe_unet(tiny_unet(SDXL_LAYOUT))
    assert sdxl_info.finest_factor == 2
    assert ("input", 5, 1) in {l.patch_key for l in sdxl_info.layers}  # depth-2 transformer
    assert ("middle", 0, 1) in {l.patch_key for l in sdxl_info.layers}


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_stored_maps_equal_naively_computed_attention(sd15, clip, cfg):
    pos, neg = encode(clip, "a photo of a cat"), plain(clip, "blurry")
    _, store = run(sd15, pos, neg, cfg=cfg, plan=CapturePlan(branches=frozenset({"cond", "uncond"})))
    reference = sd15.clone()
    record = install_naive_capture(reference)
    run(reference, pos, neg, cfg=cfg, plan=None)
    assert store.steps == {0, 1}
    for kind in ("cross", "self"):
        for branch in ("cond", "uncond") if cfg > 1 else ("cond",):
            layers = store.layers(kind, branch)
            assert layers, (kind, branch)
            for key, stored in layers:
                expected = torch.stack(record[(kind, key.block, key.block_id, key.depth, branch)]).mean(0)
                torch.testing.assert_close(stored.mean(), expected, atol=2e-3, rtol=1e-2)
    assert not store.layers("cross", "uncond") or cfg > 1
    assert {k.factor for k, _ in store.layers("self")} == {1}


def test_cond_maps_do_not_depend_on_batching_or_uncond_length(clip, monkeypatch):
    sd15 = tiny_unet(SD15_LAYOUT, seed=1)
    pos = encode(clip, "a photo of a cat")
    # One step: a different negative would change the next step's input.
    _, batched = run(sd15, pos, plain(clip, "blurry"), steps=1)
    # A negative over 75 tokens makes ComfyUI repeat the positive to 154 tokens.
    long_negative = plain(clip, ", ".join(["blurry ugly"] * 40))
    assert long_negative[0][0].shape[1] == 154
    _, repeated = run(sd15, pos, long_negative, steps=1)
    # A model that claims to need all the memory makes ComfyUI run cond and uncond as separate passes.
    monkeypatch.setattr(sd15.model, "memory_required", lambda *a, **k: float("inf"))
    _, separate = run(sd15, pos, plain(clip, "blurry"), steps=1)
    for other in (repeated, separate):
        for (key, a), (key2, b) in zip(batched.layers("cross"), other.layers("cross")):
            assert key == key2 and a.total.shape == b.total.shape == (1, a.grid[0] * a.grid[1], 77)
            torch.testing.assert_close(a.mean(), b.mean(), atol=2e-3, rtol=1e-2)


def test_capture_off_is_the_stock_ksampler_and_capture_on_matches_it(sd15, clip):
    import nodes as comfy_nodes  # ComfyUI's own top-level module

    pos, neg = encode(clip, "a photo of a cat"), plain(clip, "blurry")
    stock, = comfy_nodes.KSampler().sample(sd15, 7, 3, 5.0, "euler", "normal", pos, neg, latent())
    sampler = NODES["AttnSegCaptureSampler"]()
    off, store = sampler.sample(sd15, 7, 3, 5.0, "euler", "normal", pos, neg, latent(), 1.0, False, 0, -1, "last step")
    on, store_on = sampler.sample(sd15, 7, 3, 5.0, "euler", "normal", pos, neg, latent(), 1.0, True, 0, -1, "last step")
    assert store is None and torch.equal(off["samples"], stock["samples"])
    torch.testing.assert_close(on["samples"], stock["samples"], atol=1e-4, rtol=1e-4)
    assert store_on.steps == {0, 1, 2}
    (_, self_maps), *_ = store_on.layers("self")
    assert self_maps.count == 1  # "last step" only
    assert all(v.count == 3 for _, v in store_on.layers("cross"))


def test_the_users_model_is_left_unpatched(sd15, clip):
    before = repr(sd15.model_options)
    pos = encode(clip, "a photo of a cat")
    run(sd15, pos, pos)
    assert repr(sd15.model_options) == before
    assert "model_function_wrapper" not in sd15.model_options


def test_patches_survive_a_clone(sd15, clip):
    from attnseg_pack.attnseg import AttentionStore
    from attnseg_pack.hosts.comfyui.capture import install_capture

    info = describe_unet(sd15)
    pos = encode(clip, "a photo of a cat")
    store = AttentionStore(info.model_id, 1, (8, 12), (64, 96))
    patched = sd15.clone()
    install_capture(patched, info, store, CapturePlan())
    run(patched.clone().clone(), pos, pos, plan=None)  # 0.3.x clone() deep-copies model_options
    assert store.layers("cross") and store.layers("self")


def test_existing_attention_replace_patch_is_chained(sd15, clip):
    pos = encode(clip, "a photo of a cat")
    calls = []

    def other_pack(q, k, v, extra):
        calls.append(extra["block"])
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, extra["n_heads"]) * 0.5

    model = sd15.clone()
    model.set_model_attn2_replace(other_pack, "output", 7, 0)
    plain, _ = run(model, pos, pos, plan=None)
    captured, store = run(model, pos, pos)
    assert calls and ("cross", "output", 7) in {(k.kind, k.block, k.block_id) for k, _ in store.layers("cross")}
    torch.testing.assert_close(captured["samples"], plain["samples"], atol=1e-4, rtol=1e-4)


def test_batch_and_non_square_latents(sd15, clip):
    pos = encode(clip, "a photo of a cat")
    _, store = run(sd15, pos, pos, lat=latent(batch=3, h=8, w=14))
    (key, stored), *_ = store.layers("self")
    assert store.batch_size == 3 and store.image_size == (64, 112)
    assert stored.grid == (8, 14) and stored.total.shape == (3, 8 * 14, 8 * 14)
    assert not torch.allclose(stored.total[0], stored.total[1])


def test_large_self_attention_is_pooled(sd15, clip):
    pos = encode(clip, "a photo of a cat")
    _, store = run(sd15, pos, pos, plan=CapturePlan(self_max_tokens=24), lat=latent(h=8, w=12))
    (_, stored), *_ = store.layers("self")
    assert stored.grid == (4, 6)
    torch.testing.assert_close(stored.mean().sum(-1), torch.ones(1, 24), atol=2e-3, rtol=0)


def test_sdxl_layout_captures_depth_two_and_its_finest_self_attention(clip):
    model = tiny_unet(SDXL_LAYOUT, seed=4)
    pos = encode(clip, "a photo of a cat")
    _, store = run(model, pos, pos, lat=latent(h=16, w=8))
    assert {k.factor for k, _ in store.layers("self")} == {2}
    assert {(k.block_id, k.depth) for k, _ in store.layers("cross") if k.block == "input"} >= {(5, 0), (5, 1)}
    assert store.layers("self")[0][1].grid == (8, 4)


def test_segment_image_averages_timesteps_and_keeps_aspect(sd15, clip, vae):
    cond = encode(clip, "a photo of a cat and a dog", "cat, dog")
    image = torch.rand(2, 60, 100, 3)
    store = segment_image(sd15, vae, image, cond, [50, 100, 150], seed=1, resolution=128)
    assert store.image_size == (60, 100) and store.latent_size == (8, 16) and store.batch_size == 2
    assert all(v.count == 3 for _, v in store.layers("cross"))
    assert store.prompt.class_names == ["cat", "dog"]


def test_stacked_timesteps_equal_one_pass_per_timestep(sd15, clip, vae):
    """DiffSegmenter's timestep averaging batched (2 images x 3 timesteps in one pass)
    gives the maps of three separate passes, and each equals the mean of the
    single-timestep stores."""
    cond = encode(clip, "a photo of a cat and a dog", "cat, dog")
    latent = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(4))
    timesteps = [50, 100, 150]
    stacked = capture_pass(sd15, latent, cond, timesteps, 1, (64, 128), GOCA_LIKE, per_pass=3)
    separate = capture_pass(sd15, latent, cond, timesteps, 1, (64, 128), GOCA_LIKE, per_pass=1)
    singles = [capture_pass(sd15, latent, cond, [t], 1, (64, 128), GOCA_LIKE) for t in timesteps]
    assert stacked.entries.keys() == separate.entries.keys() and {k.kind for k, _ in stacked.entries} == {
        "cross", "self", "query"}
    for entry, maps in stacked.entries.items():
        assert maps.count == 3 and maps.total.shape[0] == 2
        torch.testing.assert_close(maps.mean(), separate.entries[entry].mean(), atol=2e-3, rtol=1e-2)
        mean_of_singles = torch.stack([single.entries[entry].mean() for single in singles]).mean(0)
        torch.testing.assert_close(maps.mean(), mean_of_singles, atol=2e-3, rtol=1e-2)
    assert not torch.allclose(singles[0].entries[entry].mean(), singles[2].entries[entry].mean(), atol=1e-3)


def test_the_steps_selected_are_the_ones_captured(sd15, clip):
    pos = encode(clip, "a photo of a cat")
    plan = CapturePlan(cross_steps=StepRange(1, 2), self_steps=None)
    _, store = run(sd15, pos, pos, steps=4, plan=plan)
    assert store.steps == {1, 2} and not store.layers("self")
    assert all(v.count == 2 for _, v in store.layers("cross"))


@pytest.mark.parametrize("sampler, denoise, message", [
    ("euler", 0.0, "denoise: 0 runs no sampling step"), ("dpm_adaptive", 1.0, "sampler_name: dpm_adaptive chooses"),
])
def test_capture_settings_that_select_no_step_are_named(sd15, clip, sampler, denoise, message):
    from attnseg_pack.attnseg import AttnSegError

    with pytest.raises(AttnSegError, match=message):
        capture_sample(sd15, 7, 2, 5.0, sampler, "normal", encode(clip, "a cat"), plain(clip, ""), latent(),
                       denoise, CapturePlan())
