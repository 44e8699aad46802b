"""The shipped DiT demo model (demo/attnseg-shapes-dit.safetensors) as a diffusers
FluxPipeline, converted at test time with diffusers' own Flux conversion code (no
second copy of the weights is committed).

The checkpoint's metadata holds the configs its ComfyUI loader
(hosts/comfyui/demo_dit.py) builds the model from; here they become diffusers' and
transformers' configs: ComfyUI's Flux as a FluxTransformer2DModel (diffusers packs
2x2 latent patches in the pipeline, so the transformer sees 4 x 4 = 16 channels and
patches of 1), ComfyUI's T5-XXL and CLIP-L JSON configs with the checkpoint's
narrowing as a T5EncoderModel and a CLIPTextModel on the tokenizers ComfyUI ships
(T5 padded to the checkpoint's 32 tokens), the UNet demo's autoencoder as an
AutoencoderKL (no shift), and ComfyUI's Flux sampling (shift 1.15 at every size) as
a FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_demo import comfy_sd1_folder, vae_config

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "demo" / "attnseg-shapes-dit.safetensors"
FLUX_SHIFT = 1.15  # ComfyUI's ModelSamplingFlux default


def checkpoint_config() -> dict:
    with safe_open(str(CHECKPOINT), "pt") as handle:
        return json.loads(handle.metadata()["attnseg_config"])


def transformer_config(dit: dict) -> dict:
    """diffusers' FluxTransformer2DModel config of a ComfyUI Flux config."""
    packed = dit["in_channels"] * dit["patch_size"] ** 2
    return dict(patch_size=1, in_channels=packed, out_channels=dit["out_channels"] * dit["patch_size"] ** 2,
                num_layers=dit["depth"], num_single_layers=dit["depth_single_blocks"],
                attention_head_dim=dit["hidden_size"] // dit["num_heads"], num_attention_heads=dit["num_heads"],
                joint_attention_dim=dit["context_in_dim"], pooled_projection_dim=dit["vec_in_dim"],
                guidance_embeds=dit["guidance_embed"], axes_dims_rope=tuple(dit["axes_dim"]))


def converted_transformer(state: dict, dit: dict) -> dict:
    """diffusers' state dict of the Flux weights, by diffusers' converter.

    The converter cuts each single block's fused linear1 (q, k, v, MLP) at Flux's own
    width (3072, written into it), so those are cut here at this model's width and the
    converter gets placeholders of Flux's shape for them."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    hidden, mlp = dit["hidden_size"], int(dit["hidden_size"] * dit["mlp_ratio"])
    flux_width = 3072
    checkpoint, own_cut = dict(state), {}
    for i in range(dit["depth_single_blocks"]):
        for part in ("weight", "bias"):
            fused = checkpoint.pop(f"single_blocks.{i}.linear1.{part}")
            q, k, v, m = torch.split(fused, (hidden, hidden, hidden, mlp), dim=0)
            prefix = f"single_transformer_blocks.{i}"
            own_cut.update({f"{prefix}.attn.to_q.{part}": q, f"{prefix}.attn.to_k.{part}": k,
                            f"{prefix}.attn.to_v.{part}": v, f"{prefix}.proj_mlp.{part}": m})
            shape = (3 * flux_width + 4 * flux_width,) + tuple(fused.shape[1:])
            checkpoint[f"single_blocks.{i}.linear1.{part}"] = torch.zeros(shape)
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    converted.update(own_cut)
    return converted


def flux_pipeline():
    """The DiT demo as a diffusers FluxPipeline on the CPU in float32."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
    from comfy import sd1_clip
    import comfy.text_encoders.t5

    config = checkpoint_config()
    state = {k: v.float() for k, v in load_file(str(CHECKPOINT)).items()}
    part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731

    transformer = FluxTransformer2DModel(**transformer_config(config["dit"]))
    transformer.load_state_dict(converted_transformer(part("dit."), config["dit"]), strict=True)

    vae = AutoencoderKL(**{**vae_config(config["vae"]), "shift_factor": 0.0})
    ldm_vae = {f"first_stage_model.{k}": v for k, v in part("vae.").items()}
    vae.load_state_dict(convert_ldm_vae_checkpoint(ldm_vae, vae.config), strict=True)

    t5_folder = Path(comfy.text_encoders.t5.__file__).parent
    t5_json = json.loads((t5_folder / "t5_config_xxl.json").read_text())
    t5_json.pop("dense_act_fn"), t5_json.pop("is_gated_act")  # transformers derives both from feed_forward_proj
    t5_config = T5Config(**{**t5_json, **config["text"]["t5xxl_model_config"]}, feed_forward_proj="gated-gelu_pytorch_tanh")
    t5 = T5EncoderModel(t5_config)
    missing, unexpected = t5.load_state_dict(part("text.t5xxl.transformer."), strict=False)
    assert set(missing) <= {"encoder.embed_tokens.weight"} and not unexpected, (missing, unexpected)  # tied to shared
    t5_tokenizer = T5TokenizerFast.from_pretrained(str(t5_folder / "t5_tokenizer"),
                                                   model_max_length=config["t5_min_length"])

    clip_folder = Path(sd1_clip.__file__).parent
    clip_json = {**json.loads((clip_folder / "sd1_clip_config.json").read_text()),
                 **config["text"]["clip_l_model_config"]}
    clip = CLIPTextModel(CLIPTextConfig(**clip_json))
    clip_state = part("text.clip_l.transformer.")
    if not any(k.startswith("text_model.") for k in clip.state_dict()):  # transformers 5 drops the prefix
        clip_state = {k.removeprefix("text_model."): v for k, v in clip_state.items()}
    missing, unexpected = clip.load_state_dict(clip_state, strict=False)
    # ComfyUI's CLIP-L carries a projection Flux never reads (its pooled vector is unprojected).
    assert not missing and set(unexpected) <= {"text_projection.weight"}, (missing, unexpected)
    clip_tokenizer = CLIPTokenizer.from_pretrained(str(comfy_sd1_folder() / "sd1_tokenizer"), model_max_length=77)

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=FLUX_SHIFT,
                                                max_shift=FLUX_SHIFT)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5,
                        tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    for module in (transformer, vae, clip, t5):  # built, not from_pretrained: still in training mode (T5's dropout)
        module.eval()
    return pipe
