"""Trains the DiT demo model (hosts/comfyui/demo_dit.py) on procedural shape scenes, on the CPU.

    python demo/train_dit.py [--minutes 46] [--out demo/attnseg-shapes-dit.safetensors]

A tiny Flux (ComfyUI's own classes: 2 double + 4 single blocks, 128 wide) learns
to generate the scenes of demo/scenes.py (training seeds from 1,000,000; the
benchmark's are below 100,000) in the latent of the UNet demo's autoencoder,
which it reuses as it is, against the text encoder as initialised (FluxClipModel:
a tiny T5 and CLIP-L on the real tokenizers, frozen, as demo/train.py keeps the
UNet demo's CLIP frozen).

The objective is the one ComfyUI's Flux sampling inverts (comfy/model_sampling.py,
ModelSamplingFlux with CONST): x_t = (1 - sigma) x_0 + sigma eps is
``noise_scaling(sigma, eps, x_0)``, the model's output v gives ``denoised = x_t -
sigma v`` (calculate_denoised), so v is trained towards eps - x_0; the model is
called through ``BaseModel.apply_model`` as the samplers call it (timestep =
sigma, the latent scaled by SD1.5's latent factor as process_latent_in scales it).
sigma is drawn half uniformly on (0, 1), half logit-normal(0, 1) (SD3's choice,
the middle of the schedule where the caption decides the layout).

- Captions: demo/train.py's variants (full, shapes only, colours only), 10% empty
  (the unconditional branch of CFG). The CLIP-L pooled vector, which tells every
  image token the whole caption through the modulation, is swapped for the empty
  caption's in half of the captioned samples, so where each word's object is has to
  be read from the T5 tokens through the joint attention, which is what the
  segmenters read.
- Sizes: a DiT's RoPE positions and object scales do not extrapolate as a UNet's
  convolutions do, so it trains on buckets of several sizes (128 px square, the
  benchmark's non-square 128 x 192 in both orientations, and twice those sizes,
  which the segmentation pass at twice the scene's size sees), each step one
  bucket at a batch that keeps the step's token count about even.
- Weights: AdamW, warm-up then cosine to a tenth; a moving average of the weights
  (demo/train.py's WeightAverage) is validated and saved.
- Validation: every ``--validate-every`` minutes of training, I2T localisation
  on demo/evaluate.py's tuning scenes (never the test scenes) through the pack's
  own DiT capture at twice the scene's size and evaluate.DIT_TIMESTEPS: the class tokens' cross
  maps of all blocks, of the double blocks, of the single blocks and of each block,
  mIoU at the best threshold; the weights of the best score are kept.

ComfyUI's Flux blocks add their residuals in place (``img += ...``), which autograd
refuses for tensors a norm saved for the backward pass: training clones exactly
those saved tensors (a saved-tensor hook that knows each block's residual inputs),
so ComfyUI's forward runs unchanged. Validation and sampling run as ComfyUI runs them.
"""

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
import comfy.ldm.flux.layers  # noqa: E402
import comfy.text_encoders.t5  # noqa: E402
from attnseg_pack.hosts.comfyui import demo_dit, demo_model  # noqa: E402
from demo import evaluate  # noqa: E402
from demo.scenes import make_scene  # noqa: E402
from demo.train import (SD_LATENT_FACTOR, TRAIN_SEED0, WeightAverage, caption_variant, encode_all,  # noqa: E402
                        init_fresh, optimizer_step, warmup_cosine)

# (height, width, batch, probability of a step): the batches keep a step near 2,200
# image tokens. The 2x buckets are what a segmentation pass at twice the scene's size sees.
BUCKETS = ((128, 128, 32, 0.40), (128, 192, 24, 0.10), (192, 128, 24, 0.10),
           (256, 256, 8, 0.25), (256, 384, 6, 0.075), (384, 256, 6, 0.075))
VALIDATION_SCALE = 2  # evaluate.SEGMENT_SCALE


def scene_counts(total: int) -> list[int]:
    """Scenes per bucket, in proportion to the samples each bucket's steps draw."""
    draws = [batch * p for _, _, batch, p in BUCKETS]
    return [max(8, round(total * d / sum(draws))) for d in draws]


def init_dit(net: torch.nn.Module) -> None:
    """torch's default init (ComfyUI's ops skip it), q/k RMSNorm gains 1, and the
    modulations and the output layer zero (DiT's adaLN-Zero): every block starts as
    the identity and the model's output at 0."""
    init_fresh(net)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, comfy.ldm.flux.layers.RMSNorm):
                module.scale.fill_(1.0)
            if isinstance(module, comfy.ldm.flux.layers.Modulation):
                module.lin.weight.zero_()
                module.lin.bias.zero_()
        last = net.final_layer
        for layer in (last.adaLN_modulation[-1], last.linear):
            layer.weight.zero_()
            layer.bias.zero_()


def init_text(text: torch.nn.Module) -> None:
    """torch's default init with T5's RMS norm gains 1, rounded to fp16 (the saved
    dtype), so training sees the encoder the checkpoint holds."""
    init_fresh(text)
    with torch.no_grad():
        for module in text.modules():
            if isinstance(module, comfy.text_encoders.t5.T5LayerNorm):
                module.weight.fill_(1.0)
        for p in text.parameters():
            p.copy_(p.half().float())


def check_initialised(module: torch.nn.Module, what: str) -> None:
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise SystemExit(f"{what}: parameters left uninitialised: {bad[:4]}")


def nan_filled(module: torch.nn.Module) -> torch.nn.Module:
    """Parameters set to NaN, so check_initialised finds any an init missed (not
    SDClipModel's logit_scale, which ComfyUI sets itself and encoding never reads)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.endswith("logit_scale"):
                p.fill_(float("nan"))
    return module


class TextCache:
    """The frozen text encoder's (T5 states, CLIP-L pooled) per caption, encoded in
    batches through the two encoders' own forward (what encode_token_weights runs)."""

    def __init__(self, clip):
        self.clip, self.text = clip, clip.cond_stage_model.eval().requires_grad_(False)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        new = list(dict.fromkeys(c for c in captions if c not in self.cache))
        if new:
            tokens = [self.clip.tokenize(c) for c in new]
            t5 = [[t for t, _ in tok["t5xxl"][0]] for tok in tokens]
            lengths = {len(t) for t in t5}
            if len(lengths) > 1:  # captions longer than the padding: one at a time
                states = [self.text.t5xxl([t])[0][0] for t in t5]
            else:
                states = list(self.text.t5xxl(t5)[0])
            pooled = self.text.clip_l([[t for t, _ in tok["l"][0]] for tok in tokens])[1]
            for caption, s, p in zip(new, states, pooled):
                self.cache[caption] = (s.float(), p.float())
        entries = [self.cache[c] for c in captions]
        return torch.stack([e[0] for e in entries]), torch.stack([e[1] for e in entries])


class SavedResidualClones:
    """Dit block wrappers plus a saved-tensor hook: tensors that alias a block's
    residual inputs (which the block then changes in place) are cloned when saved."""

    def __init__(self, net):
        self.watched: set[int] = set()
        wrappers = {}
        for kind, blocks in (("double_block", net.double_blocks), ("single_block", net.single_blocks)):
            for index in range(len(blocks)):
                wrappers[(kind, index)] = self.wrapper
        self.options = {"patches_replace": {"dit": wrappers}}

    def wrapper(self, args, extra):
        self.watched = {args[k].data_ptr() for k in ("img", "txt") if k in args}
        try:
            return extra["original_block"](args)
        finally:
            self.watched = set()

    def pack(self, t: torch.Tensor):
        return t.clone() if t.data_ptr() in self.watched else t

    @contextmanager
    def active(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield


def sample_sigmas(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Half uniform, half logit-normal(0, 1), kept inside [0.001, 1]."""
    uniform = torch.rand(batch, generator=generator)
    logit_normal = torch.sigmoid(torch.randn(batch, generator=generator))
    pick = torch.rand(batch, generator=generator) < 0.5
    return torch.where(pick, uniform, logit_normal).clamp(1e-3, 1.0)


def flow_loss(model, z0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, sigma: torch.Tensor,
              noise: torch.Tensor, clones: SavedResidualClones | None = None) -> torch.Tensor:
    """MSE of the model's v against eps - x_0 at x_t = noise_scaling(sigma, eps, x_0),
    v read back from ComfyUI's denoised (x_t - sigma v)."""
    sampling = model.get_model_object("model_sampling")
    x = sampling.noise_scaling(sigma, noise, z0)
    options = clones.options if clones is not None else {}
    with clones.active() if clones is not None else torch.enable_grad():
        denoised = model.model.apply_model(x, sigma, c_crossattn=context, y=pooled, transformer_options=options)
    v = (x - denoised) / sigma[:, None, None, None]
    return (v - (noise - z0)).pow(2).mean()


class Validation:
    """I2T localisation of the tuning scenes (demo/evaluate.py's TUNE_SEEDS) through
    the pack's DiT capture (capture_pass, as AttnSeg Capture Image Attention runs it)
    at twice the scene's size and the DiT benchmark's timesteps; the autoencoder's latents and the prompts are
    made once. Scores: the class tokens' cross maps (colour + shape tokens) of all
    blocks, the double ones, the single ones and each block alone, min-max per
    class, mIoU at the best of evaluate.THRESHOLDS; the best of them ranks the weights."""

    def __init__(self, model, clip, vae, minutes: float, scenes: int, log):
        from attnseg_pack.hosts.comfyui.passes import encode_image
        from attnseg_pack.hosts.comfyui.text import encode_segmentation_prompt

        if not 0 < scenes <= len(evaluate.TUNE_SEEDS):
            raise SystemExit(f"--validate-scenes: give 1 to {len(evaluate.TUNE_SEEDS)} (the tuning scenes)")
        self.model, self.log, self.minutes = model, log, minutes
        self.items = []
        for seed in evaluate.TUNE_SEEDS[:scenes]:
            item = evaluate.scene(seed)
            image = torch.from_numpy(item.image).float().div(255)[None]
            with torch.no_grad():
                latent = encode_image(vae, image, VALIDATION_SCALE * max(item.image.shape[:2]))
            positive, _ = encode_segmentation_prompt(clip, item.caption, ", ".join(o.name for o in item.objects))
            self.items.append((item, latent, positive))
        from attnseg_pack.hosts.comfyui.dit import describe_dit

        self.groups = evaluate.dit_block_groups(describe_dit(model).blocks())  # the benchmark's I2T rows
        self.best, self.best_step, self.best_state, self.history = -math.inf, None, None, []

    def scores(self) -> dict[str, float]:
        from attnseg_pack.attnseg.masks import label_map
        from attnseg_pack.hosts.comfyui.capture import CapturePlan
        from attnseg_pack.hosts.comfyui.passes import capture_pass

        plan = CapturePlan(self_steps=None)
        confusion = {(g, t): evaluate.Confusion() for g in self.groups for t in evaluate.THRESHOLDS}
        for item, latent, positive in self.items:
            with torch.inference_mode():
                store = capture_pass(self.model, latent, positive, evaluate.DIT_TIMESTEPS, 0,
                                     tuple(item.image.shape[:2]), plan)
            truth = evaluate.truth_labels(item)
            lookup = torch.tensor([0] + [evaluate.LABELS.index(o.name) for o in item.objects])
            for group, blocks in self.groups.items():
                scores = evaluate.dit_i2t(store, blocks).at_image_size()[0:1].clamp(0, 1)
                for threshold in evaluate.THRESHOLDS:
                    confusion[(group, threshold)].add(truth, lookup[label_map(scores, threshold)[0]])
        return {g: round(max(confusion[(g, t)].miou() for t in evaluate.THRESHOLDS), 3) for g in self.groups}

    def __call__(self, step: int, seconds: float) -> None:
        net = self.model.model.diffusion_model.eval()
        began = time.time()
        scores = self.scores()
        best = max(scores.values())
        self.history.append({"step": step, "seconds": round(seconds), "miou": scores})
        self.log(f"validation at step {step} ({time.time() - began:.0f} s): "
                 + ", ".join(f"{g} {v}" for g, v in scores.items()))
        if best > self.best or self.best_state is None:
            self.best, self.best_step = best, step
            self.best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.train()

    def restore_best(self) -> int:
        self.model.model.diffusion_model.load_state_dict(self.best_state)
        return self.best_step


def dit_stage(model, text: TextCache, buckets: list, minutes: float, log, peak_lr: float = 1e-3,
              warmup: int = 100, validation: Validation | None = None, ema_decay: float = 0.998,
              pooled_dropout: float = 0.5, seed: int = 0):
    """Trains the diffusion model on the buckets' latents; ends with the weight average."""
    net = model.model.diffusion_model.train()
    params = list(net.parameters())
    optim = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01)
    average = WeightAverage(net, ema_decay)
    clones = SavedResidualClones(net)
    rng = random.Random(seed)
    empty_pooled = text([""])[1][0]
    weights = [p for *_, p in BUCKETS]

    def validate() -> None:
        with average.applied():
            validation(step, trained)

    step, losses, history, trained = 0, [], [], 0.0
    next_validation = validation.minutes * 60 if validation else math.inf
    while trained < minutes * 60:
        began = time.time()
        latents, scenes, batch = buckets[rng.choices(range(len(BUCKETS)), weights)[0]]
        index = torch.randint(len(latents), (batch,))
        z0 = latents[index] * SD_LATENT_FACTOR
        captions = [caption_variant(scenes[i], rng) for i in index.tolist()]
        context, pooled = text(captions)
        swap = torch.tensor([c != "" and rng.random() < pooled_dropout for c in captions])
        pooled = torch.where(swap[:, None], empty_pooled[None], pooled)
        loss = flow_loss(model, z0, context, pooled, sample_sigmas(batch), torch.randn_like(z0), clones)
        optimizer_step(optim, params, average, loss, peak_lr * warmup_cosine(step, warmup, trained / (minutes * 60)))
        losses.append(loss.item())
        trained += time.time() - began
        if step % 50 == 0:
            recent = sum(losses[-50:]) / len(losses[-50:])
            history.append((step, round(recent, 4)))
            log(f"dit step {step} loss {recent:.4f} ({trained:.0f} s, {trained / (step + 1):.2f} s/step)")
        step += 1
        if trained >= next_validation:
            validate()
            next_validation += validation.minutes * 60
    if validation and (not validation.history or validation.history[-1]["step"] != step):
        validate()
    average.load()
    net.eval()
    return step, sum(losses[-100:]) / len(losses[-100:]), history, trained


def make_buckets(total: int, vae, log) -> list:
    """(latents, scenes, batch) per bucket: scenes from TRAIN_SEED0 on, each bucket its own seeds."""
    out, seed = [], TRAIN_SEED0
    for (height, width, batch, _), count in zip(BUCKETS, scene_counts(total)):
        scenes = [make_scene(seed + i, width, height) for i in range(count)]
        seed += count
        images = torch.from_numpy(np.stack([s.image for s in scenes]))
        latents = encode_all(vae, images, batch=16)
        out.append((latents, scenes, batch))
        log(f"bucket {height}x{width}: {count} scenes, latent {tuple(latents.shape[1:])}, "
            f"std x factor {latents.std().item() * SD_LATENT_FACTOR:.3f}")
    return out


def continue_from(path: Path, model, clip) -> dict:
    """Load ``path``'s diffusion weights into ``model``; returns its training record.
    Its text encoder has to be the frozen one this run encodes captions with."""
    shipped_model, shipped_clip, _ = demo_dit.load(path, dtype=torch.float32)
    ours, theirs = clip.cond_stage_model.state_dict(), shipped_clip.cond_stage_model.state_dict()
    if ours.keys() != theirs.keys() or any(not torch.allclose(ours[k], theirs[k].float(), rtol=1e-3, atol=1e-3)
                                           for k in ours):  # the file holds fp16
        raise SystemExit(f"--init: {path}'s text encoder is not the one --seed initialises; use its seed")
    model.model.diffusion_model.load_state_dict(shipped_model.model.diffusion_model.state_dict())
    return demo_dit.training_info(path)["training"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=demo_dit.CHECKPOINT)
    parser.add_argument("--scenes", type=int, default=2000, help="training scenes over all size buckets")
    parser.add_argument("--minutes", type=float, default=46.0, help="training time (validation not counted)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema-decay", type=float, default=0.998, help="decay of the weight average")
    parser.add_argument("--pooled-dropout", type=float, default=0.5,
                        help="share of captioned samples given the empty caption's pooled vector")
    parser.add_argument("--validate-every", type=float, default=7.0,
                        help="minutes between validations on the tuning scenes (0: none, keep the last weights)")
    parser.add_argument("--validate-scenes", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's intra-op threads (0: as OMP_NUM_THREADS sets them). On the shared 2-core "
                             "machine this was trained on, a step took ~1 s on 1 thread and 5-10 s on 2, the two "
                             "threads waiting on each other while other jobs held a core")
    parser.add_argument("--init", type=Path,
                        help="continue from this DiT demo checkpoint's diffusion weights (its text encoder must be "
                             "the one this seed initialises) instead of a fresh initialisation")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    began = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - began:7.0f} s] {message}", flush=True)

    config = demo_dit.CONFIG
    vae = demo_model.load(dtype=torch.float32)[2]  # the UNet demo's autoencoder, as shipped
    torch.manual_seed(args.seed)
    clip = demo_dit.build_clip(config, dtype=torch.float32)
    init_text(nan_filled(clip.cond_stage_model))
    check_initialised(clip.cond_stage_model, "text encoder")
    model = demo_dit.build_dit(config)
    torch.manual_seed(args.seed + 1)
    init_dit(nan_filled(model.model.diffusion_model))
    check_initialised(model.model.diffusion_model, "diffusion model")
    earlier = None
    if args.init is not None:
        earlier = continue_from(args.init, model, clip)
        log(f"continuing from {args.init} ({earlier['dit_steps']} steps)")
    log(f"diffusion model {sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6:.2f}M parameters, "
        f"text encoder {sum(p.numel() for p in clip.cond_stage_model.parameters()) / 1e6:.2f}M (frozen)")

    text = TextCache(clip)
    # The batched encode is the encoder ComfyUI runs for a prompt (CLIPTextEncode's path).
    probe = "a red circle and a blue square"
    stock = clip.encode_from_tokens(clip.tokenize(probe), return_pooled=True)
    ours = text([probe])
    if not (torch.allclose(stock[0][0], ours[0][0], atol=1e-5) and torch.allclose(stock[1][0], ours[1][0], atol=1e-5)):
        raise SystemExit("the batched text encode differs from ComfyUI's encode_from_tokens")

    buckets = make_buckets(args.scenes, vae, log)
    validation = (Validation(model, clip, vae, args.validate_every, args.validate_scenes, log)
                  if args.validate_every > 0 else None)
    log("training")
    steps, final_loss, history, trained = dit_stage(model, text, buckets, args.minutes, log, args.lr,
                                                    validation=validation, ema_decay=args.ema_decay,
                                                    pooled_dropout=args.pooled_dropout, seed=args.seed)
    run = {"seconds": round(time.time() - began), "training_seconds": round(trained), "dit_steps": steps,
           "steps_run": steps, "final_loss": round(final_loss, 4), "peak_lr": args.lr,
           "buckets": [dict(height=h, width=w, batch=b, probability=p, scenes=n)
                       for (h, w, b, p), n in zip(BUCKETS, scene_counts(args.scenes))],
           "scenes": args.scenes, "seed": args.seed, "threads": torch.get_num_threads(), "text_encoder": "frozen",
           "ema_decay": args.ema_decay, "pooled_dropout": args.pooled_dropout, "caption_dropout": 0.1,
           "sigma_sampling": "half uniform, half logit-normal(0, 1)", "vae": "the UNet demo's (attnseg-shapes)",
           "validation_timesteps": evaluate.DIT_TIMESTEPS, "validation_scale": VALIDATION_SCALE}
    if earlier is not None:
        parent = {"continued_from": earlier["continued_from"]} if "continued_from" in earlier else {}
        run["continued_from"] = {"file": args.init.name, "dit_steps": earlier["dit_steps"],
                                 "training_seconds": earlier["training_seconds"], **parent}
    if validation:
        run["dit_steps"] = validation.restore_best()
        run["validation"] = validation.history
        log(f"kept the weights of step {run['dit_steps']} (tuning-scene mIoU {validation.best:.3f})")
    info = {"training": run}
    demo_dit.save(args.out, model.model.diffusion_model, clip.cond_stage_model, vae.first_stage_model, config, info)
    log(f"saved {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")
    summary = args.out.with_suffix(".json")
    summary.write_text(json.dumps({**info, "loss_every_50_steps": history}, indent=1) + "\n")
    log(f"wrote {summary}")


if __name__ == "__main__":
    main()
