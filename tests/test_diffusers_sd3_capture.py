"""The diffusers host on SD3's transformer: a tiny random SD3 (MMDiT) of ComfyUI's own
classes (tests/tiny_dit.py) converted to an SD3Transformer2DModel with diffusers' SD3
conversion code gives, on the same latent, timesteps, noise seed and text states,
the same attention store as the ComfyUI host's capture: every joint block's I2T and
I2I maps (SD3's joint sequence is [image, text] in diffusers, [text, image] in
ComfyUI), Cat-Cross on the keys, and a chained (non-stock) processor still making
the block's output."""

from types import SimpleNamespace

import pytest
import torch

from comfy_env import import_pack
from host_agreement import assert_same_store
from tiny_dit import SD3_CONFIG, latent, sd3_conditioning, tiny_sd3

import_pack()
from attnseg_pack.attnseg import SegPrompt  # noqa: E402
from attnseg_pack.attnseg.plan import CapturePlan  # noqa: E402
from attnseg_pack.attnseg.prompt_weights import KeyScale  # noqa: E402
from attnseg_pack.attnseg.tokens import ClassTokens  # noqa: E402
from attnseg_pack.hosts.comfyui import passes as comfy_passes  # noqa: E402
from attnseg_pack.hosts.comfyui.models import checked_model  # noqa: E402
from attnseg_pack.hosts.comfyui.text import KEY_SCALE_KEY, PROMPT_KEY  # noqa: E402
from attnseg_pack.hosts.diffusers import passes as diffusers_passes  # noqa: E402
from attnseg_pack.hosts.diffusers.dit import describe_transformer  # noqa: E402
from attnseg_pack.hosts.diffusers.text import Conditioning  # noqa: E402

TOKENS = 5
TIMESTEPS = [300, 700]
PROMPT = SegPrompt("a b c", (ClassTokens("b", (2,)),), TOKENS, ("", "a", "b", "c", ""))


@pytest.fixture(scope="module")
def comfy_model():
    return tiny_sd3(seed=3)


@pytest.fixture(scope="module")
def transformer(comfy_model):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    net = comfy_model.get_model_object("diffusion_model")
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(net.state_dict()))
    width = 64 * SD3_CONFIG["depth"]
    model = SD3Transformer2DModel(
        sample_size=SD3_CONFIG["pos_embed_max_size"] * SD3_CONFIG["patch_size"], patch_size=SD3_CONFIG["patch_size"],
        in_channels=SD3_CONFIG["in_channels"], out_channels=SD3_CONFIG["out_channels"],
        num_layers=SD3_CONFIG["depth"], attention_head_dim=64, num_attention_heads=SD3_CONFIG["depth"],
        joint_attention_dim=SD3_CONFIG["context_embedder_config"]["params"]["in_features"],
        caption_projection_dim=width, pooled_projection_dim=SD3_CONFIG["adm_in_channels"],
        pos_embed_max_size=SD3_CONFIG["pos_embed_max_size"])
    model.load_state_dict(converted, strict=True)
    return model.eval()


def both_stores(comfy_model, transformer, plan, key_scale=None, seed=0):
    raw = latent(1, 8, 12, seed=1)  # the VAE's latent, as ComfyUI's VAE Encode gives it
    condition = sd3_conditioning(TOKENS, seed=2)
    extras = {PROMPT_KEY: PROMPT, **({KEY_SCALE_KEY: key_scale} if key_scale else {})}
    condition = [[condition[0][0], {**condition[0][1], **extras}]]
    info = checked_model(comfy_model, condition, "clip")
    theirs = comfy_passes.capture_pass(comfy_model, raw, condition, TIMESTEPS, seed, (64, 96), plan, info)
    pipe = SimpleNamespace(transformer=transformer, vae_scale_factor=8)
    scaled = comfy_model.model.latent_format.process_in(raw)  # SD3's shift and scale, as diffusers' pipeline does
    conditioning = Conditioning(condition[0][0], condition[0][1]["pooled_output"], PROMPT, key_scale)
    ours = diffusers_passes.capture_pass(pipe, scaled, conditioning, TIMESTEPS, seed, (64, 96), plan,
                                         describe_transformer(transformer))
    return ours, theirs


def test_every_joint_blocks_maps_agree(comfy_model, transformer):
    ours, theirs = both_stores(comfy_model, transformer, CapturePlan(self_every_layer=True))
    assert {(key.kind, key.block_id) for key, _ in ours.entries} == \
        {(kind, i) for kind in ("cross", "self") for i in range(SD3_CONFIG["depth"])}
    assert_same_store(ours, theirs)


def test_cat_cross_on_the_keys_agrees_and_changes_the_maps(comfy_model, transformer):
    scale = KeyScale((2,), 2.0, TOKENS)
    ours, theirs = both_stores(comfy_model, transformer, CapturePlan(), scale)
    assert_same_store(ours, theirs)
    plain, _ = both_stores(comfy_model, transformer, CapturePlan())
    key = next(iter(ours.entries))
    assert (ours.entries[key].mean()[..., 2] - plain.entries[key].mean()[..., 2]).abs().max() > 1e-2


def test_a_chained_processor_still_makes_the_output(comfy_model, transformer):
    """A processor that is not diffusers' stock one (a user's, an adapter's) is chained:
    the capture reads the maps, the block's output is the chained processor's."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class Doubling(JointAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            image, text = super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
            return image * 2, text

    block = transformer.transformer_blocks[1].attn
    stock = block.processor
    block.set_processor(Doubling())
    try:
        ours, theirs = both_stores(comfy_model, transformer, CapturePlan(
            cross_layers=None, self_every_layer=False))
        assert type(block.processor) is Doubling  # put back on exit
    finally:
        block.set_processor(stock)
    # Blocks 0 and 1 see the same inputs on both hosts; block 1's output is doubled on
    # ours only, so the blocks after it differ: the chained processor did make the output.
    first = {key: entry for key, entry in ours.entries.items() if key[0].block_id <= 1}
    for key, entry in first.items():
        assert torch.allclose(entry.mean(), theirs.entries[key].mean(), atol=2e-3)
    later = next(key for key in ours.entries if key[0].block_id == 2)
    assert (ours.entries[later].mean() - theirs.entries[later].mean()).abs().max() > 1e-2


@pytest.fixture(scope="module")
def sd3_pipe(transformer):
    """A StableDiffusion3Pipeline of tiny random parts around the converted transformer:
    CLIP-L and CLIP-G with projections, a T5 as wide as the transformer's context, a
    16-channel autoencoder, on the tokenizers ComfyUI ships."""
    import json
    from pathlib import Path

    import comfy.text_encoders.t5
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
    from transformers import T5TokenizerFast
    from diffusers_demo import comfy_sd1_folder
    from tiny_dit import CLIP_G_WIDTH, CLIP_L_WIDTH, T5_WIDTH

    torch.manual_seed(0)
    clip_json = json.loads((comfy_sd1_folder() / "sd1_clip_config.json").read_text())
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**{
        **clip_json, "hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
        "num_hidden_layers": 3, "projection_dim": width})).eval() for width in (CLIP_L_WIDTH, CLIP_G_WIDTH)]
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=T5_WIDTH, d_kv=32, num_heads=2, d_ff=256, num_layers=2,
                                 feed_forward_proj="gated-gelu")).eval()
    t5_folder = Path(comfy.text_encoders.t5.__file__).parent / "t5_tokenizer"
    tokenizers = [CLIPTokenizer.from_pretrained(str(comfy_sd1_folder() / "sd1_tokenizer"), model_max_length=77)
                  for _ in range(2)]
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0],
                                    text_encoder_2=encoders[1], tokenizer_2=tokenizers[1], text_encoder_3=t5,
                                    tokenizer_3=T5TokenizerFast.from_pretrained(str(t5_folder)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd3_class_positions_are_the_clip_then_the_t5_ones_the_comfyui_host_finds(sd3_pipe):
    """SD3's context is CLIP-L+G's 77 tokens, then T5's (256 in diffusers' pipeline, 77 in
    ComfyUI's): each class takes its CLIP positions and its T5 positions moved past 77."""
    from tiny_dit import sd3_clip
    from attnseg_pack.hosts.comfyui.text import locate_dit_words
    from attnseg_pack.hosts.diffusers import text as diffusers_text

    text, names = "a hummingbird and a red car, background", ["hummingbird", "red car"]
    ours = diffusers_text.encode_segmentation_prompt(sd3_pipe, text, names)
    theirs, _ = locate_dit_words(sd3_clip(), text, names)
    assert ours.prompt.classes == theirs.classes
    assert ours.prompt.token_count == 77 + 256 == ours.embeds.shape[1]
    clip_positions, t5_positions = (sorted(p for p in ours.prompt.classes[1].positions if (p >= 77) == t5)
                                    for t5 in (False, True))
    assert len(clip_positions) == 2 and len(t5_positions) == 2  # 'red', 'car' in each part
    assert ours.pooled.shape == (1, 96)  # CLIP-L's and CLIP-G's projected pooled vectors


def test_sd3_segment_and_generate_run_on_the_pipeline(sd3_pipe):
    """The public API on an SD3 pipeline: Seg4Diff's single-block I2T (moved to this
    model's block 2) over an image, and generate + segment, whose capture keeps the cond
    half of the [uncond, cond] batch on the steps asked for."""
    import dataclasses

    from attnseg_pack.attnseg import AttentionStore
    from attnseg_pack.attnseg.layers import LayerPick
    from attnseg_pack.attnseg.plan import StepRange
    from attnseg_pack.attnseg.presets import PRESETS
    from attnseg_pack.hosts.diffusers import api

    seg4diff = PRESETS["Seg4Diff SD3 (paper)"]
    chosen = dataclasses.replace(seg4diff, capture=dataclasses.replace(
        seg4diff.capture, resolution=128, cross_layers=(LayerPick.dit("joint", 2),)))
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))
    [result] = api.segment(sd3_pipe, image, ["cat", "dog"], preset=chosen)
    assert result.labels.shape == (96, 128) and result.scores.shape == (2, 96, 128)
    assert bool(torch.isfinite(result.scores).all()) and 0.5 < float(result.scores.amax()) <= 1
    assert (result.scores[0] - result.scores[1]).abs().max() > 1e-2  # each class its own map
    with pytest.raises(Exception, match="preset"):  # the paper's block 9 is not on a 4-block model
        api.segment(sd3_pipe, image, ["cat"], preset="Seg4Diff SD3 (paper)")

    output, [generated] = api.generate_and_segment(
        sd3_pipe, "a cat and a dog", ["cat", "dog"], preset=chosen, steps=StepRange(1, 2), height=64, width=96,
        num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert generated.labels.shape == (64, 96)
    store = AttentionStore("", 1, (8, 12), (64, 96), None)
    plan = CapturePlan(cross_layers=(LayerPick.dit("joint", 2),), cross_steps=StepRange(1, 2), self_steps=None)
    from attnseg_pack.hosts.diffusers.passes import capture_sample
    capture_sample(sd3_pipe, store, plan, 1, prompt="a cat", height=64, width=96, num_inference_steps=3,
                   guidance_scale=4.0, output_type="latent")
    [(key, branch)] = store.entries
    assert branch == "cond" and store.steps == {1, 2} and store.entries[(key, branch)].count == 2
    assert store.entries[(key, branch)].total.shape == (1, 4 * 6, 77 + 256)


def test_processors_and_the_hook_are_restored_after_an_exception(transformer):
    from attnseg_pack.attnseg import AttentionStore
    from attnseg_pack.hosts.diffusers.dit import capture_dit_attention

    before = [block.attn.processor for block in transformer.transformer_blocks]
    store = AttentionStore("", 1, (8, 12), (64, 96), None)
    with pytest.raises(RuntimeError, match="stopped"):
        with capture_dit_attention(transformer, store, CapturePlan(self_every_layer=True), (4, 6)):
            assert all(block.attn.processor is not old for block, old in zip(transformer.transformer_blocks, before))
            raise RuntimeError("stopped")
    assert [block.attn.processor for block in transformer.transformer_blocks] == before
    assert not transformer._forward_pre_hooks


def test_a_chained_processor_keeps_its_own_keyword_arguments(transformer):
    """diffusers' Attention drops the joint_attention_kwargs a processor's signature does
    not name: the capture processor announces the chained one's, so they still arrive."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from attnseg_pack.attnseg import AttentionStore
    from attnseg_pack.hosts.diffusers.dit import capture_dit_attention
    from tiny_dit import SD3_POOLED_DIM, T5_WIDTH

    class Scaling(JointAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, factor=1.0):
            image, text = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)
            return image * factor, text

    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 8, 12, generator=g),
                  encoder_hidden_states=torch.randn(1, TOKENS, T5_WIDTH, generator=g),
                  pooled_projections=torch.randn(1, SD3_POOLED_DIM, generator=g), timestep=torch.tensor([500.0]),
                  return_dict=False)
    block = transformer.transformer_blocks[1].attn
    stock = block.processor
    block.set_processor(Scaling())
    try:
        with torch.no_grad():
            plain = transformer(**inputs)[0]
            doubled = transformer(**inputs, joint_attention_kwargs={"factor": 2.0})[0]
            store = AttentionStore("", 1, (8, 12), (64, 96), None)
            with capture_dit_attention(transformer, store, CapturePlan(self_every_layer=True), (4, 6)):
                captured = transformer(**inputs, joint_attention_kwargs={"factor": 2.0})[0]
    finally:
        block.set_processor(stock)
    assert (doubled - plain).abs().max() > 1e-3
    torch.testing.assert_close(captured, doubled, atol=1e-5, rtol=1e-5)
    assert len(store.entries) == 2 * SD3_CONFIG["depth"]


def test_sd3_without_t5_locates_the_classes_in_clip_and_counts_the_zero_t5_part(sd3_pipe):
    """SD3 run without its T5 pads the context with zeros of the T5 length: the class
    positions are CLIP's only, the token count the whole context's (so Cat-Cross scales
    no key inside the zeros)."""
    from diffusers import StableDiffusion3Pipeline
    from attnseg_pack.hosts.diffusers import text as diffusers_text

    no_t5 = StableDiffusion3Pipeline(**{**sd3_pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    ours = diffusers_text.encode_segmentation_prompt(no_t5, "a red car", ["red car"])
    assert ours.prompt.token_count == ours.embeds.shape[1] == 77 + 256
    assert all(p < 77 for p in ours.prompt.classes[0].positions)
    scale = diffusers_text.encode_cat_cross(no_t5, "a red car and a dog", ["red car"], 2.0, "keys").key_scale
    weights = scale.weights(ours.embeds.shape[1], "cpu", torch.float32)
    assert (weights[77:] == 1).all() and (weights[:77] == 2).sum() == 2


def test_sd3_skip_layer_guidance_calls_and_odd_batches(sd3_pipe):
    """SD3's skip-layer guidance adds a perturbed call each step: not recorded as cond.
    A batch that is neither [cond] nor [uncond, cond] (a perturbed-attention pipeline's
    three parts) is refused by name."""
    from attnseg_pack.attnseg import AttentionStore, AttnSegError
    from attnseg_pack.attnseg.layers import LayerPick
    from attnseg_pack.attnseg.plan import StepRange
    from attnseg_pack.hosts.diffusers.passes import capture_sample, guided_rows

    store = AttentionStore("", 1, (8, 12), (64, 96), None)
    plan = CapturePlan(cross_layers=(LayerPick.dit("joint", 2),), cross_steps=StepRange(0, -1), self_steps=None)
    capture_sample(sd3_pipe, store, plan, 1, prompt="a cat", height=64, width=96, num_inference_steps=3,
                   guidance_scale=4.0, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                   skip_layer_guidance_stop=1.0, output_type="latent")
    [entry] = store.entries.values()
    assert entry.count == 3  # one cond per step, the skip-layer calls of steps 1 and 2 left out
    with pytest.raises(AttnSegError, match="3 rows for 1 images is neither"):
        guided_rows(sd3_pipe, 1)(3)


def test_a_flux_layout_with_extra_input_channels_is_refused_by_name():
    from diffusers import FluxTransformer2DModel
    from attnseg_pack.attnseg import AttnSegError

    fill = FluxTransformer2DModel(patch_size=1, in_channels=32, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=8, axes_dims_rope=(4, 6, 6))
    pipe = SimpleNamespace(transformer=fill, vae_scale_factor=8)
    conditioning = Conditioning(torch.zeros(1, 4, 32), torch.zeros(1, 8), None)
    with pytest.raises(AttnSegError, match="pipe: .* takes 8-channel latents"):
        diffusers_passes.capture_pass(pipe, torch.zeros(1, 4, 8, 12), conditioning, [100], 0, (64, 96))
