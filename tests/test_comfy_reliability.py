"""Long work stops on ComfyUI's interrupt and reports progress; passes the device
cannot hold are refused before they start."""

import time

import pytest
import torch

from comfy_env import import_pack, recorded_progress
from tiny_models import SD15_LAYOUT, tiny_unet

pack = import_pack()
import comfy.model_management  # noqa: E402

from attnseg_pack.attnseg import AttnSegError  # noqa: E402
from attnseg_pack.attnseg.iseg import ent_self, iterate  # noqa: E402
from attnseg_pack.hosts.comfyui.capture import CapturePlan  # noqa: E402
from attnseg_pack.hosts.comfyui.passes import capture_pass, segment_image  # noqa: E402
from attnseg_pack.hosts.comfyui.progress import comfy_progress  # noqa: E402
from attnseg_pack.hosts.comfyui.text import encode_segmentation_prompt  # noqa: E402
from attnseg_pack.hosts.comfyui.unet import describe_unet  # noqa: E402


@pytest.fixture(scope="module")
def sd15():
    return tiny_unet(SD15_LAYOUT, seed=1)


@pytest.fixture(autouse=True)
def no_pending_interrupt():
    comfy.model_management.interrupt_current_processing(False)
    yield
    comfy.model_management.interrupt_current_processing(False)


def test_an_interrupt_during_a_long_segment_pass_stops_it_mid_pass(sd15, clip, vae):
    """The interrupt lands halfway through the pass's captured layers (read off the
    progress bar, so no timer races the machine's load): the pass stops at the
    next layer instead of running the rest."""
    cond, _ = encode_segmentation_prompt(clip, "a cat", "cat")
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    fire_at, fired = None, {}

    def interrupt_at(value):
        if value == fire_at:
            fired["at"] = time.perf_counter()
            comfy.model_management.interrupt_current_processing(True)

    with recorded_progress(interrupt_at) as updates:
        began = time.perf_counter()
        segment_image(sd15, vae, image, cond, [100, 200, 300, 400], 0, 512)
        full = time.perf_counter() - began
    total = updates[-1][1]
    assert total >= 4 and updates[-1][0] == total
    fire_at = total // 2
    with recorded_progress(interrupt_at) as updates:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            segment_image(sd15, vae, image, cond, [100, 200, 300, 400], 0, 512)
    assert max(value for value, _ in updates) == fire_at  # no captured layer ran after it
    # The rest of the pass (half of it) did not run (a bound relative to this
    # machine's speed, so a loaded 2-core runner holds it too).
    assert time.perf_counter() - fired["at"] < 0.25 * full


def test_a_pass_the_device_cannot_hold_is_refused_with_the_size_it_needs(sd15, clip, vae, monkeypatch):
    cond, _ = encode_segmentation_prompt(clip, "a cat", "cat")
    image = torch.rand(1, 64, 64, 3)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *args, **kwargs: 1024 ** 2)
    with pytest.raises(AttnSegError, match=r"resolution: a 4096x4096 pass needs about .* GiB on .* but 0.0 GiB is "
                                           r"free. Lower resolution"):
        segment_image(sd15, vae, image, cond, [100], 0, 4096)


def test_core_iterations_report_progress_and_stop_on_the_interrupt():
    s = torch.softmax(torch.randn(1, 64, 64), -1)
    maps = torch.rand(1, 64, 2)
    with recorded_progress() as updates, comfy_progress():
        iterate(maps, ent_self(s, 0.015), 5)
    assert updates == [(i, 5) for i in range(1, 6)]
    comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException), comfy_progress():
        iterate(maps, ent_self(s, 0.015), 5)
    iterate(maps, ent_self(s, 0.015), 5)  # outside a node (no reporter) the core never checks


def captured_layers(model, plan) -> int:
    info = describe_unet(model)
    return len(plan.layers(info, "cross")) + len(plan.layers(info, "self"))


def test_the_batched_segment_pass_reports_each_captured_layer(sd15, clip, vae):
    """Four timesteps in one batched UNet pass: the bar moves once per captured layer
    call (not one 4/4 jump at the end), rising to passes x layers, counted up front."""
    cond, _ = encode_segmentation_prompt(clip, "a cat", "cat")
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with recorded_progress() as updates:
        segment_image(sd15, vae, image, cond, [100, 200, 300, 400], 0, 128)
    layers = captured_layers(sd15, CapturePlan())
    assert layers > 4
    assert updates == [(done, layers) for done in range(1, layers + 1)]  # one pass: every call, total up front


def test_one_pass_per_timestep_reports_each_pass_and_its_layers(sd15, clip):
    """Three passes (one timestep each): total 3 x layers from the start, monotonic,
    each pass ending at its share, the last at the total; finer than one step per pass."""
    cond, _ = encode_segmentation_prompt(clip, "a cat", "cat")
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plan = CapturePlan(cross_heads="auto", self_every_layer=True)  # GoCA's: every layer, both kinds
    with recorded_progress() as updates:
        capture_pass(sd15, latent, cond, [100, 300, 500], 0, (64, 64), plan, per_pass=1)
    layers = captured_layers(sd15, plan)
    values = [value for value, _ in updates]
    assert {total for _, total in updates} == {3 * layers}
    assert values == sorted(set(values)) and values[-1] == 3 * layers  # strictly rising, ending at the total
    assert len(values) > 3 and {layers, 2 * layers} <= set(values)


def test_a_pass_that_captures_nothing_still_ends_its_bar(sd15, clip):
    cond, _ = encode_segmentation_prompt(clip, "a cat", "cat")
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with recorded_progress() as updates:
        capture_pass(sd15, latent, cond, [100, 300], 0, (64, 64), CapturePlan(cross_steps=None, self_steps=None),
                     per_pass=1)
    assert updates == [(1, 2), (2, 2)]  # one step per pass


def interrupting(model, after_calls: int):
    """A clone of ``model`` whose transformer blocks raise ComfyUI's interrupt at the
    ``after_calls``-th cross-attention output (mid-forward, patches already run)."""
    calls = {"n": 0}

    def interrupt(n, extra):
        calls["n"] += 1
        if calls["n"] == after_calls:
            raise comfy.model_management.InterruptProcessingException()
        return n

    clone = model.clone()
    clone.set_model_attn2_output_patch(interrupt)
    return clone


def test_the_capture_sampler_after_an_interrupt_equals_a_fresh_run(sd15, clip):
    from attnseg_pack.hosts.comfyui.passes import capture_sample

    positive, _ = encode_segmentation_prompt(clip, "a cat", "cat")
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))

    def run(model):
        latent = {"samples": torch.zeros(1, 4, 8, 12)}
        return capture_sample(model, 7, 3, 5.0, "euler", "normal", positive, negative, latent, 1.0, CapturePlan())

    fresh_latent, fresh_store = run(sd15)
    stopped = interrupting(sd15, 15)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(stopped)
    latent, store = run(stopped)  # the same patched model again, the interrupt spent
    assert torch.equal(latent["samples"], fresh_latent["samples"])
    for (key, branch), stored in store.entries.items():
        assert torch.equal(stored.total, fresh_store.entries[(key, branch)].total) and stored.count == \
            fresh_store.entries[(key, branch)].count


def test_prompt_to_prompt_after_an_interrupt_equals_a_fresh_run(sd15, clip):
    node = pack.NODE_CLASS_MAPPINGS["AttnSegPromptToPrompt"]()
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))

    def run(model):
        latent = {"samples": torch.zeros(1, 4, 8, 12)}
        with torch.inference_mode():
            return node.edit(model, clip, "a cat on a sofa", "a dog on a sofa", negative, latent, 5, 3, 5.0, "euler",
                             "normal", 1.0, "replace", 0.8, 0.4, "cat, dog", 0.2, 0.5, 1, 0, "", 1.0,
                             "source sample", "0.3,0.5,0.1,0.1")

    fresh = run(sd15)
    stopped = interrupting(sd15, 25)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(stopped)
    again = run(stopped)
    for first, second in zip(fresh[:3], again[:3]):
        first = first["samples"] if isinstance(first, dict) else first
        second = second["samples"] if isinstance(second, dict) else second
        assert torch.equal(first, second)
