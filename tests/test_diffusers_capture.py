"""The diffusers host's capture processors on the demo pipeline: only captured
layers leave their processor, the layer outputs are unchanged, the pipeline's own
processors are chained (their outputs and keyword arguments kept), everything is
restored on exit, and a pipeline call captures while it generates."""

import pytest
import torch

from comfy_env import import_pack

pack = import_pack()
import diffusers_demo  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from attnseg_pack.attnseg import AttentionStore, AttnSegError  # noqa: E402
from attnseg_pack.hosts.diffusers import api  # noqa: E402
from attnseg_pack.hosts.diffusers.capture import capture_attention  # noqa: E402
from attnseg_pack.hosts.diffusers.passes import capture_sample  # noqa: E402
from attnseg_pack.attnseg.plan import CapturePlan, StepRange  # noqa: E402
from attnseg_pack.hosts.diffusers.unet import describe_unet  # noqa: E402


class ScaledOutput(AttnProcessor2_0):
    """A pipeline's own processor (as an IP-Adapter's is): its own keyword argument, its own output."""

    def __init__(self):
        super().__init__()
        self.boosts = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, boost=1.0):
        self.boosts.append(boost)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * boost


@pytest.fixture(scope="module")
def pipe():
    return diffusers_demo.demo_pipeline()


@pytest.fixture
def inputs(pipe):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 24, generator=generator)
    context = pipe.encode_prompt("a red circle and a blue square", "cpu", 1, False)[0]
    return sample, torch.tensor([100]), context


def run(unet, inputs, **kwargs):
    sample, timestep, context = inputs
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=context, return_dict=False, **kwargs)[0]


def new_store(pipe, latent_size=(16, 24)):
    info = describe_unet(pipe.unet)
    return AttentionStore(info.model_id, 1, latent_size, (latent_size[0] * 8, latent_size[1] * 8))


def test_only_captured_layers_change_processor_and_all_come_back(pipe, inputs):
    unet = pipe.unet
    before = dict(unet.attn_processors)
    reference = run(unet, inputs)
    store = new_store(pipe)
    plan = CapturePlan(cross_factors=frozenset({2}))  # cross at 1/2, self at the finest level (1/1)
    with capture_attention(unet, store, plan) as info:
        during = dict(unet.attn_processors)
        captured = run(unet, inputs)
    changed = {name for name in before if during[name] is not before[name]}
    expected = {f"{la.path}.attn2.processor" for la in info.layers if la.factor == 2} | {
        f"{la.path}.attn1.processor" for la in info.layers if la.factor == 1}
    assert changed == expected
    assert all(unet.attn_processors[name] is before[name] for name in before)
    assert torch.allclose(captured, reference, atol=1e-5)  # the capture computes the layers' own outputs
    assert {(key.kind, key.factor) for key, _ in store.entries} == {("cross", 2), ("self", 1)}
    text = store.entries[next(k for k in store.entries if k[0].kind == "cross")].total
    assert torch.allclose(text.float().sum(-1), torch.ones(()), atol=1e-2)  # rows are probabilities over 77 tokens


def test_the_pipelines_own_processors_are_chained_with_their_arguments(pipe, inputs):
    unet = pipe.unet
    stock = dict(unet.attn_processors)
    own = ScaledOutput()
    unet.set_attn_processor(own)
    try:
        boosted = run(unet, inputs, cross_attention_kwargs={"boost": 1.5})
        calls_per_run = len(own.boosts)
        with capture_attention(unet, new_store(pipe), CapturePlan()):
            assert any(not isinstance(p, ScaledOutput) for p in unet.attn_processors.values())
            own.boosts.clear()
            assert torch.allclose(run(unet, inputs, cross_attention_kwargs={"boost": 1.5}), boosted, atol=1e-5)
            assert own.boosts == [1.5] * calls_per_run  # every layer, captured ones too, ran it with its argument
        chained_store = new_store(pipe)
        with capture_attention(unet, chained_store, CapturePlan()):
            run(unet, inputs)  # boost 1: this processor is the stock attention, so the maps must be the stock ones
        assert all(p is own for p in unet.attn_processors.values())
    finally:
        unet.set_attn_processor(stock)
    plain_store = new_store(pipe)
    with capture_attention(unet, plain_store, CapturePlan()):
        run(unet, inputs)
    assert set(chained_store.entries) == set(plain_store.entries) and plain_store.entries
    for key, slot in plain_store.entries.items():
        assert torch.allclose(chained_store.entries[key].mean(), slot.mean(), atol=1e-4), key


def test_processors_come_back_when_the_block_raises(pipe, inputs):
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(RuntimeError, match="stop"):
        with capture_attention(pipe.unet, new_store(pipe), CapturePlan(self_every_layer=True)):
            raise RuntimeError("stop")
    assert all(pipe.unet.attn_processors[name] is before[name] for name in before)
    assert not pipe.unet._forward_pre_hooks


def test_a_pipeline_call_captures_the_chosen_steps_and_branches_without_changing_the_image(pipe):
    call = dict(prompt="a red circle and a blue square", num_inference_steps=4, guidance_scale=5.0, height=128,
                width=128, output_type="pt")
    plain = pipe(**call, generator=torch.Generator().manual_seed(3)).images
    store = new_store(pipe, (16, 16))
    plan = CapturePlan(cross_steps=StepRange(1, 2), self_steps=StepRange(1, 2), branches=frozenset({"cond", "uncond"}))
    output = capture_sample(pipe, store, plan, 1, **call, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(output.images, plain, atol=1e-4)
    assert store.steps == {1, 2}
    assert {branch for _, branch in store.entries} == {"cond", "uncond"}
    assert all(slot.count == 2 for slot in store.entries.values())
    cross = [key for key, branch in store.entries if key.kind == "cross" and branch == "cond"][0]
    assert not torch.allclose(store.entries[(cross, "cond")].mean(), store.entries[(cross, "uncond")].mean(), atol=1e-3)


def test_generate_and_segment_labels_the_generated_image(pipe):
    output, [result] = api.generate_and_segment(pipe, "a red circle and a blue square", ["red circle", "blue square"],
                                                "DiffSegmenter (demo model, tuned)", num_inference_steps=4,
                                                height=128, width=192, output_type="pt",
                                                generator=torch.Generator().manual_seed(0))
    assert output.images.shape == (1, 3, 128, 192)
    assert result.labels.shape == (128, 192) and result.masks.shape == (2, 128, 192)
    assert result.class_names == ["red circle", "blue square"] and len(result.labels.unique()) >= 2
    with pytest.raises(AttnSegError, match="classes: the class 'green star' is not in the prompt"):
        api.generate_and_segment(pipe, "a red circle", ["green star"], num_inference_steps=1)


def test_a_denoiser_that_is_not_a_unet_is_refused(pipe):
    with pytest.raises(AttnSegError, match="pipe: its denoiser is a AutoencoderKL"):
        describe_unet(pipe.vae)
