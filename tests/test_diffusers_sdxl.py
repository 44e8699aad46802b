"""The diffusers host on an SDXL pipeline (a tiny one with random weights, SDXL's
layout: no attention at the finest level, two transformer depths, two text
encoders, pooled text and size ids as added conditioning): LDM's SDXL layer
names, the SDXL preset's capture and method, and generate + segment."""

import pytest
import torch

from comfy_env import import_pack

pack = import_pack()
import diffusers_demo  # noqa: E402
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402
from attnseg_pack.hosts.diffusers import api  # noqa: E402
from attnseg_pack.hosts.diffusers.unet import describe_unet  # noqa: E402

TEXT = dict(bos_token_id=0, eos_token_id=49407, pad_token_id=1, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, projection_dim=32)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    # pooled text (32) + six size ids x 8 = the added embedding's 80 inputs
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, down_block_types=("DownBlock2D",
        "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64)
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
    tokenizer = CLIPTokenizer.from_pretrained(str(diffusers_demo.comfy_sd1_folder() / "sd1_tokenizer"),
                                              model_max_length=77)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TEXT)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_layers_get_ldm_sdxl_names(pipe):
    layers = [(la.block, la.block_id, la.depth, la.factor) for la in describe_unet(pipe.unet).layers]
    # LDM's SDXL: input blocks 1-2 are the finest level's resnets, 3 its downsampler, 4-5 the next level
    assert layers[:4] == [("input", 4, 0, 2), ("input", 4, 1, 2), ("input", 5, 0, 2), ("input", 5, 1, 2)]
    assert ("middle", 0, 1, 2) in layers and layers[-1] == ("output", 2, 1, 2)


def test_the_sdxl_preset_segments_and_a_generation_is_segmented(pipe):
    [result] = api.segment(pipe, torch.rand(3, 96, 128), "cat, dog", "GoCA SDXL (released code)", resolution=128)
    assert result.labels.shape == (96, 128) and bool(torch.isfinite(result.scores).all())
    output, [generated] = api.generate_and_segment(pipe, "a cat and a dog", "cat, dog", "GoCA SDXL (released code)",
                                                   num_inference_steps=2, height=64, width=64, output_type="pt")
    assert output.images.shape == (1, 3, 64, 64) and generated.labels.shape == (64, 64)
