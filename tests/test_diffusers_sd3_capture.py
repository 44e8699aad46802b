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
