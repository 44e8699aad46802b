"""Trains the embedded demo model on procedural shape scenes, on the CPU.

    python demo/train.py [--minutes 47] [--out demo/attnseg-shapes.safetensors]

Stage 1 trains the small AutoencoderKL (reconstruction + a light KL term);
its latent is then rescaled so SD1.5's latent factor (0.18215) gives unit
variance, which lets every stock SD1.5 node handle the model. Stage 2 trains
the UNet on the frozen latents against the CLIP text model as initialised (kept
frozen, see unet_stage) with SD1.5's noise schedule (eps prediction), dropping
10% of captions for CFG; it validates and saves a moving average of the UNet's
weights (WeightAverage), keeping the one that localises best on the tuning
scenes (see Validation). The attention hooks are not involved: training uses
ComfyUI's fast attention."""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from contextlib import contextmanager
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


def warmup_cosine(step: int, warmup: int, progress: float) -> float:
    """The learning-rate factor: linear warm-up over ``warmup`` steps, then a cosine from 1
    to a tenth over the training time (``progress`` its elapsed fraction)."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer_step(optim, params, average, loss: torch.Tensor, lr: float) -> None:
    """One step at ``lr``: backward, gradients clipped to norm 1, the weight average updated."""
    for group in optim.param_groups:
        group["lr"] = lr
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()
    average.update()


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


class WeightAverage:
    """An exponential moving average of the UNet's weights, the weights diffusion
    models are usually sampled from: it smooths out the last steps' noise, which a
    few thousand steps at a high learning rate leave plenty of. The decay ramps up
    as n / (n + 10) after n updates, capped at ``decay``, so early averages follow
    the fast-moving weights."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.params = list(module.parameters())
        self.average = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, self.updates / (self.updates + 10))
        for a, p in zip(self.average, self.params):
            a.lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def load(self) -> None:
        """Give the module the averaged weights."""
        for p, a in zip(self.params, self.average):
            p.copy_(a)

    @contextmanager
    @torch.no_grad()
    def applied(self):
        """The module holds the averaged weights inside the block, its own after."""
        own = [p.detach().clone() for p in self.params]
        self.load()
        try:
            yield
        finally:
            for p, o in zip(self.params, own):
                p.copy_(o)


class Validation:
    """Scores the model on the tuning scenes (never the benchmark's test scenes) every
    ``minutes`` of training and keeps the weights of the best score: localisation in
    such a small model can peak and then fade while the loss still falls. The score
    is the best DiffSegmenter mIoU over the single cross-attention levels, with the
    class's colour + shape tokens, at the best threshold, segmenting at the scene's size."""

    def __init__(self, model, clip, vae, minutes: float, scenes: int, log):
        from attnseg_pack.attnseg.fusion import diffsegmenter, mean_by_resolution
        from demo import evaluate

        if not 0 < scenes <= len(evaluate.TUNE_SEEDS):
            raise SystemExit(f"--validate-scenes: give 1 to {len(evaluate.TUNE_SEEDS)} (the tuning scenes)")
        self.evaluate, self.model, self.clip, self.vae, self.log = evaluate, model, clip, vae, log
        self.minutes, self.scenes = minutes, [evaluate.scene(s) for s in evaluate.TUNE_SEEDS[:scenes]]
        self.best, self.best_step, self.best_state, self.history = -math.inf, None, None, []
        # At the scene's own size, as the shipped model was validated: a quarter of the
        # latent of the benchmark's 2x pass, and ranking checkpoints is all it is for.
        probe = evaluate.capture(model, clip, vae, self.scenes[0], "plain, scene size")
        levels = len(mean_by_resolution(probe.require("cross")))
        self.methods = [evaluate.Method(f"level {i}", lambda store, w=tuple(float(j == i) for j in range(levels)):
                                        diffsegmenter(store, w), ("colour + shape", "colour", "shape"),
                                        "plain, scene size")
                        for i in range(levels)]

    def __call__(self, step: int, seconds: float) -> None:
        evaluate, methods = self.evaluate, self.methods
        self.model.model.diffusion_model.eval()
        scores = evaluate.score(self.model, self.clip, self.vae, self.scenes, methods)
        by_level = {m.name: {part: round(max(scores.miou(m.name, part, t) for t in evaluate.THRESHOLDS), 3)
                             for part in m.token_parts} for m in methods}
        best = max(level["colour + shape"] for level in by_level.values())
        self.history.append({"step": step, "seconds": round(seconds), "miou": by_level})
        self.log(f"validation at step {step}: " + "; ".join(
            f"{name} " + "/".join(str(v) for v in level.values()) for name, level in by_level.items())
            + " (colour+shape/colour/shape)")
        if best > self.best or self.best_state is None:
            self.best, self.best_step = best, step
            self.best_state = {k: v.detach().clone() for k, v in self.model.model.diffusion_model.state_dict().items()}
        self.model.model.diffusion_model.train()

    def restore_best(self) -> int:
        self.model.model.diffusion_model.load_state_dict(self.best_state)
        return self.best_step


def unet_stage(model, clip, latents: torch.Tensor, scenes: list, minutes: float, batch: int, log,
               peak_lr: float = 1e-3, warmup: int = 200, validation: Validation | None = None,
               ema_decay: float = 0.999):
    """Trains the UNet against the text encoder as initialised. SD1.5 trains its UNet
    against a frozen text encoder; trained jointly from scratch, a tiny text encoder
    is free to move what a word means into other token positions, which hurt the
    per-word localisation the segmenters read (an earlier demo model: 0.650 mIoU).
    Validation scores, and the model ends with, the weight average (WeightAverage)."""
    diffusion = model.model.diffusion_model.train()
    text = clip.cond_stage_model.eval().requires_grad_(False)
    params = list(diffusion.parameters())
    optim = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01)
    average = WeightAverage(diffusion, ema_decay)

    def validate() -> None:
        with average.applied():
            validation(step, trained)
    sampling = model.get_model_object("model_sampling")
    sigmas = sampling.sigmas.float()
    rng = random.Random(0)
    token_cache: dict[str, list] = {}

    def tokens(caption: str):
        if caption not in token_cache:
            token_cache[caption] = [t for t, _ in clip.tokenize(caption)["l"][0]]
        return token_cache[caption]

    # The clock counts training only, not validation.
    step, losses, history, trained = 0, [], [], 0.0
    next_validation = validation.minutes * 60 if validation else math.inf
    while trained < minutes * 60:
        began = time.time()
        index = torch.randint(len(latents), (batch,))
        z0 = latents[index] * SD_LATENT_FACTOR
        chosen = [caption_variant(scenes[i], rng) for i in index.tolist()]
        context, _ = text.clip_l([tokens(c) for c in chosen])
        t = torch.randint(0, len(sigmas), (batch,))
        sigma = sigmas[t]
        noise = torch.randn_like(z0)
        x = z0 + noise * sigma[:, None, None, None]
        denoised = model.model.apply_model(x, sigma, c_crossattn=context)
        eps = (x - denoised) / sigma[:, None, None, None]
        loss = (eps - noise).pow(2).mean()
        optimizer_step(optim, params, average, loss, peak_lr * warmup_cosine(step, warmup, trained / (minutes * 60)))
        losses.append(loss.item())
        trained += time.time() - began
        if step % 100 == 0:
            recent = sum(losses[-100:]) / len(losses[-100:])
            history.append((step, round(recent, 4)))
            log(f"unet step {step} loss {recent:.4f} ({trained:.0f} s)")
        step += 1
        if trained >= next_validation:
            validate()
            next_validation += validation.minutes * 60
    if validation and (not validation.history or validation.history[-1]["step"] != step):
        validate()
    average.load()
    diffusion.eval()
    return step, sum(losses[-200:]) / len(losses[-200:]), history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=demo_model.CHECKPOINT)
    parser.add_argument("--scenes", type=int, default=6000)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--minutes", type=float, default=47.0, help="UNet training time (validation not counted)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema-decay", type=float, default=0.999, help="decay of the UNet weight average")
    parser.add_argument("--validate-every", type=float, default=8.0,
                        help="minutes between validations on the tuning scenes (0: none, keep the last weights)")
    parser.add_argument("--validate-scenes", type=int, default=50)
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", type=Path, help="continue training this checkpoint (skips the VAE stage)")
    start.add_argument("--vae-from", type=Path, help="a fresh UNet, reusing this checkpoint's autoencoder "
                                                     "(skips the VAE stage)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    began = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - began:7.0f} s] {message}", flush=True)

    scenes = [make_scene(TRAIN_SEED0 + i, SIZE, SIZE) for i in range(args.scenes)]
    images = torch.from_numpy(np.stack([s.image for s in scenes]))
    log(f"{len(scenes)} scenes of {SIZE}x{SIZE}")
    latents = None
    settings = {"batch": args.batch, "scenes": args.scenes, "seed": args.seed, "threads": torch.get_num_threads(),
                "text_encoder": "frozen", "ema_decay": args.ema_decay}
    if args.resume:
        # Continue a saved model: same data, a lower learning rate, no VAE stage.
        model, clip, vae = demo_model.load(args.resume, dtype=torch.float32)
        config = demo_model.training_config(args.resume)
        earlier = demo_model.training_info(args.resume)["training"]
        peak_lr, warmup = 3e-4, 50
    else:
        config = demo_model.CONFIG
        if args.vae_from:
            vae = demo_model.load(args.vae_from, dtype=torch.float32)[2]
            config = {**config, "vae": demo_model.training_config(args.vae_from)["vae"]}
            earlier = demo_model.training_info(args.vae_from)["training"]
            vae_info = {"vae_from": args.vae_from.name, "vae_steps": earlier["vae_steps"]}
        else:
            vae = demo_model.build_vae(config["vae"])
            init_fresh(vae.first_stage_model)
            vae_stage(vae, images, args.vae_steps, 12, log)
            latents = encode_all(vae, images)
            scale = 1.0 / (SD_LATENT_FACTOR * latents.std().item())
            fold_latent_scale(vae, scale)
            latents = latents * scale  # what the folded encoder gives, without encoding again
            vae_info = {"vae_steps": args.vae_steps, "vae_seconds": round(time.time() - began)}
        model = demo_model.build_unet(config["unet"])
        clip = demo_model.build_clip(config["clip"], dtype=torch.float32)
        init_fresh(model.model.diffusion_model)
        init_fresh(clip.cond_stage_model)
        peak_lr, warmup = 1e-3, 200
    if latents is None:
        latents = encode_all(vae, images)
    log(f"latent {tuple(latents.shape[1:])}, std x factor {latents.std().item() * SD_LATENT_FACTOR:.3f}")
    validation = (Validation(model, clip, vae, args.validate_every, args.validate_scenes, log)
                  if args.validate_every > 0 else None)
    if validation and args.resume:
        validation(0, 0.0)  # the weights resumed from: kept (step 0) unless training beats them
    steps, final_loss, history = unet_stage(model, clip, latents, scenes, args.minutes, args.batch, log, peak_lr,
                                            warmup, validation, args.ema_decay)
    # unet_steps: the steps in the saved weights; steps_run: the steps trained, some of
    # them discarded when validation kept earlier weights (final_loss is the last steps').
    run = {"seconds": round(time.time() - began), "unet_steps": steps, "steps_run": steps,
           "final_loss": round(final_loss, 4), "peak_lr": peak_lr, **settings}
    if validation:
        run["unet_steps"] = validation.restore_best()
        run["validation"] = validation.history
        log(f"kept the weights of step {run['unet_steps']} (tuning-scene mIoU {validation.best:.3f})")
    if args.resume:
        info = {"training": {"seconds": earlier["seconds"] + run["seconds"],
                             "unet_steps": earlier["unet_steps"] + run["unet_steps"],
                             "final_loss": run["final_loss"], **settings,
                             **{k: earlier[k] for k in ("vae_steps", "vae_from") if k in earlier},
                             "stages": earlier.get("stages", [earlier]) + [run]}}
    else:
        info = {"training": {**run, **vae_info}}
    demo_model.save(args.out, model.model.diffusion_model, clip.cond_stage_model, vae.first_stage_model, config, info)
    log(f"saved {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")
    summary = args.out.with_suffix(".json")
    summary.write_text(json.dumps({**info, "loss_every_100_steps": history}, indent=1) + "\n")
    log(f"wrote {summary}")


if __name__ == "__main__":
    main()
