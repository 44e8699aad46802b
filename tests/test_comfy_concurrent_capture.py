"""Capture with UNet calls running at once: ComfyUI can run cond and uncond on
two devices, each call in its own thread. A call's capture flags travel in its
own transformer_options and adds to the store are serialised, so calls run
concurrently fill the store as the same calls one after another."""

import threading
import time

import pytest
import torch

from comfy_env import import_pack
from tiny_models import CONTEXT_DIM, SD15_LAYOUT, tiny_unet

pack = import_pack()
from attnseg_pack.attnseg import AttentionStore  # noqa: E402
from attnseg_pack.hosts.comfyui.capture import CapturePlan, StepRange, install_capture  # noqa: E402
from attnseg_pack.hosts.comfyui.unet import describe_unet  # noqa: E402

REPEATS = 4  # calls per thread: more chances for the calls to interleave
# Cross-attention in step 0 only: a call of step 1 must not capture it, nor stop step 0's.
PLAN = CapturePlan(cross_steps=StepRange(0, 0), branches=frozenset({"cond", "uncond"}))
# (branch code as ComfyUI numbers it, step) of each thread's calls.
SPLITS = {"cond and uncond": ((0, 0), (1, 1)), "one branch, two steps": ((0, 0), (0, 1))}


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(SD15_LAYOUT, seed=1)


def patched_call(unet, store):
    """A clone with the capture installed, and one UNet call on it as ComfyUI's
    sampler makes it (through the model-function wrapper)."""
    patched = unet.clone()
    install_capture(patched, describe_unet(unet), store, PLAN)
    schedule = patched.get_model_object("model_sampling").sigmas
    sigmas = torch.cat([schedule[[999, 499]], schedule.new_zeros(1)])  # two steps
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, CONTEXT_DIM, generator=generator)

    def call(branch: int, step: int):
        sigma = sigmas[step:step + 1]
        options = {**patched.model_options["transformer_options"], "cond_or_uncond": [branch], "sigmas": sigma,
                   "sample_sigmas": sigmas}
        c = {"c_crossattn": context, "transformer_options": options}
        wrapper = patched.model_options["model_function_wrapper"]
        wrapper(patched.model.apply_model, {"input": x * sigma, "timestep": sigma, "c": c, "cond_or_uncond": [branch]})
        assert options.keys() == {*patched.model_options["transformer_options"], "cond_or_uncond", "sigmas",
                                  "sample_sigmas"}  # the caller's options are not written to

    return call


class SlowLookups(dict):
    """Store entries whose lookups yield to the other thread: an add that finds no
    entry for its layer yet then inserts one, the window where two unserialised
    adds of one layer would both insert (a device's queueing delay stands here)."""

    def get(self, key, default=None):
        found = super().get(key, default)
        time.sleep(0.001)
        return found


def new_store():
    return AttentionStore("tiny", 1, (16, 16), (128, 128))


@pytest.mark.parametrize("split", SPLITS)
def test_concurrent_calls_fill_the_store_as_sequential_ones(unet, split):
    sequential, concurrent = new_store(), new_store()
    concurrent.entries = SlowLookups()
    call = patched_call(unet, sequential)
    for branch, step in SPLITS[split]:
        for _ in range(REPEATS):
            call(branch, step)
    call = patched_call(unet, concurrent)
    start = threading.Barrier(2)
    errors = []

    def worker(branch, step):
        try:
            start.wait()
            for _ in range(REPEATS):
                call(branch, step)
        except Exception as error:  # noqa: BLE001 (reported by the main thread)
            errors.append(error)

    threads = [threading.Thread(target=worker, args=work) for work in SPLITS[split]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert concurrent.steps == sequential.steps == {0, 1}
    assert concurrent.entries.keys() == sequential.entries.keys()
    assert {(k.kind, branch) for k, branch in sequential.entries} == (
        {("cross", "cond"), ("self", "cond"), ("self", "uncond")} if split == "cond and uncond"
        else {("cross", "cond"), ("self", "cond")})
    for entry, maps in sequential.entries.items():
        got = concurrent.entries[entry]
        assert got.count == maps.count, entry
        # fp16 sums: one branch's adds of two steps may come in another order.
        torch.testing.assert_close(got.total, maps.total, atol=2e-3, rtol=2e-3, msg=lambda m: f"{entry}: {m}")
