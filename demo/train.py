"""Trains the embedded demo model on procedural shape scenes, on the CPU.

    python demo/train.py [--minutes 45] [--out demo/attnseg-shapes.safetensors]

Stage 1 trains the small AutoencoderKL (reconstruction + a light KL term);
its latent is then rescaled so SD1.5's latent factor (0.18215) gives unit
variance, which lets every stock SD1.5 node handle the model. Stage 2 trains
the UNet and the CLIP text model together on the frozen latents with SD1.5's
noise schedule (eps prediction), dropping 10% of captions for CFG. The
attention hooks are not involved: training uses ComfyUI's fast attention."""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from comfy_env import import_pack  # noqa: E402

import_pack()
from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402
from demo.scenes import make_scene  # noqa: E402

TRAIN_SEED0 = 1_000_000  # training scenes; the benchmark uses seeds below 100_000
SIZE = 128
SD_LATENT_FACTOR = 0.18215


def caption_variant(scene, rng: random.Random) -> str:
    """Full captions mostly; some name only shapes or only colours, so that both
    kinds of word have to carry where things are."""
    roll = rng.random()
    if roll < 0.1:
        return ""
    if roll < 0.65:
        return scene.caption
    if roll < 0.85:
        return " and ".join(f"a {o.shape}" for o in scene.objects)
    return " and ".join(f"a {o.colour} shape" for o in scene.objects)


def init_fresh(module: torch.nn.Module) -> None:
    """ComfyUI's ops skip weight init (models are normally loaded): give a fresh
    model torch's default init so training starts from sane weights."""
    for m in module.modules():
        for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
                break


def random_crops(images: torch.Tensor, crop: int) -> torch.Tensor:
    """uint8 B x H x W x 3 -> float B x 3 x crop x crop in [-1, 1]. The autoencoder is
    convolutional, so crops teach it the same thing at a quarter of the cost."""
    top = random.randrange(images.shape[1] - crop + 1)
    left = random.randrange(images.shape[2] - crop + 1)
    x = images[:, top:top + crop, left:left + crop]
    return x.float().div(127.5).sub(1).permute(0, 3, 1, 2)


def vae_stage(vae, images: torch.Tensor, steps: int, batch: int, log, crop: int = 64) -> None:
    auto = vae.first_stage_model.float().train()
    optim = torch.optim.AdamW(auto.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(steps):
        x = random_crops(images[torch.randint(len(images), (batch,))], crop)
        moments = auto.quant_conv(auto.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        recon = auto.decoder(auto.post_quant_conv(z))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + 1e-5 * kl
        for group in optim.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f}")
    auto.eval()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    auto = vae.first_stage_model
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].float().div(127.5).sub(1).permute(0, 3, 1, 2)
        out.append(auto.quant_conv(auto.encoder(x)).chunk(2, dim=1)[0])
    return torch.cat(out)


@torch.no_grad()
def fold_latent_scale(vae, scale: float) -> None:
    """Make the encoder's mean ``scale`` times larger and the decoder read it back,
    so the latents have the spread SD1.5's latent factor expects."""
    auto = vae.first_stage_model
    channels = auto.embed_dim
    auto.quant_conv.weight[:channels] *= scale
    auto.quant_conv.bias[:channels] *= scale
    auto.quant_conv.bias[channels:] += 2 * math.log(scale)  # log-variance of a scaled variable
    auto.post_quant_conv.weight /= scale


def unet_stage(model, clip, latents: torch.Tensor, captions: list[list[str]], minutes: float, batch: int, log,
               peak_lr: float = 1e-3, warmup: int = 200):
    diffusion = model.model.diffusion_model.train()
    text = clip.cond_stage_model.train()
    params = list(diffusion.parameters()) + list(text.parameters())
    optim = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01)
    sampling = model.get_model_object("model_sampling")
    sigmas = sampling.sigmas.float()
    rng = random.Random(0)
    token_cache: dict[str, list] = {}

    def tokens(caption: str):
        if caption not in token_cache:
            token_cache[caption] = [t for t, _ in clip.tokenize(caption)["l"][0]]
        return token_cache[caption]

    start, step, losses, history = time.time(), 0, [], []
    deadline = start + minutes * 60
    while time.time() < deadline:
        index = torch.randint(len(latents), (batch,))
        z0 = latents[index] * SD_LATENT_FACTOR
        chosen = [caption_variant(captions[i], rng) for i in index.tolist()]
        context, _ = text.clip_l([tokens(c) for c in chosen])
        t = torch.randint(0, len(sigmas), (batch,))
        sigma = sigmas[t]
        noise = torch.randn_like(z0)
        x = z0 + noise * sigma[:, None, None, None]
        denoised = model.model.apply_model(x, sigma, c_crossattn=context)
        eps = (x - denoised) / sigma[:, None, None, None]
        loss = (eps - noise).pow(2).mean()
        progress = (time.time() - start) / (minutes * 60)
        for group in optim.param_groups:
            group["lr"] = peak_lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, progress))))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        losses.append(loss.item())
        if step % 100 == 0:
            recent = sum(losses[-100:]) / len(losses[-100:])
            history.append((step, round(recent, 4)))
            log(f"unet step {step} loss {recent:.4f} ({time.time() - start:.0f} s)")
        step += 1
    diffusion.eval()
    text.eval()
    return step, sum(losses[-200:]) / len(losses[-200:]), history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=demo_model.CHECKPOINT)
    parser.add_argument("--scenes", type=int, default=6000)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--minutes", type=float, default=45.0, help="UNet + text encoder training time")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", type=Path, help="continue training this checkpoint (skips the VAE stage)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    began = time.time()
    lines = []

    def log(message: str) -> None:
        line = f"[{time.time() - began:7.0f} s] {message}"
        lines.append(line)
        print(line, flush=True)

    scenes = [make_scene(TRAIN_SEED0 + i, SIZE, SIZE) for i in range(args.scenes)]
    images = torch.from_numpy(np.stack([s.image for s in scenes]))
    log(f"{len(scenes)} scenes of {SIZE}x{SIZE}")
    if args.resume:
        # Continue a saved model: same data, a lower learning rate, no VAE stage.
        model, clip, vae = demo_model.load(args.resume, clip_dtype=torch.float32)
        config = demo_model.CONFIG
        earlier = demo_model.training_info(args.resume)["training"]
        latents = encode_all(vae, images)
        log(f"resumed from {args.resume}: {earlier['unet_steps']} steps, latent std x factor "
            f"{latents.std().item() * SD_LATENT_FACTOR:.3f}")
        steps, final_loss, history = unet_stage(model, clip, latents, scenes, args.minutes, args.batch, log,
                                                peak_lr=3e-4, warmup=50)
        info = {"training": {"seconds": earlier["seconds"] + round(time.time() - began),
                             "unet_steps": earlier["unet_steps"] + steps, "batch": args.batch,
                             "final_loss": round(final_loss, 4), "scenes": args.scenes,
                             "vae_steps": earlier["vae_steps"], "seed": args.seed, "threads": torch.get_num_threads(),
                             "stages": [earlier, {"resumed_unet_steps": steps, "peak_lr": 3e-4,
                                                  "seconds": round(time.time() - began)}]}}
    else:
        config = demo_model.CONFIG
        vae = demo_model.build_vae(config["vae"])
        init_fresh(vae.first_stage_model)
        vae_stage(vae, images, args.vae_steps, 12, log)
        latents = encode_all(vae, images)
        scale = 1.0 / (SD_LATENT_FACTOR * latents.std().item())
        fold_latent_scale(vae, scale)
        latents = encode_all(vae, images)
        log(f"latent {tuple(latents.shape[1:])}, std x factor {latents.std().item() * SD_LATENT_FACTOR:.3f}")

        model = demo_model.build_unet(config["unet"])
        clip = demo_model.build_clip(config["clip"], dtype=torch.float32)
        init_fresh(model.model.diffusion_model)
        init_fresh(clip.cond_stage_model)
        steps, final_loss, history = unet_stage(model, clip, latents, scenes, args.minutes, args.batch, log)
        info = {"training": {"seconds": round(time.time() - began), "unet_steps": steps, "batch": args.batch,
                             "final_loss": round(final_loss, 4), "scenes": args.scenes, "vae_steps": args.vae_steps,
                             "seed": args.seed, "threads": torch.get_num_threads()}}
    demo_model.save(args.out, model.model.diffusion_model, clip.cond_stage_model, vae.first_stage_model, config, info)
    log(f"saved {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")
    summary = args.out.with_suffix(".json")
    summary.write_text(json.dumps({**info, "loss_every_100_steps": history}, indent=1) + "\n")
    log(f"wrote {summary}")


if __name__ == "__main__":
    main()
