"""Inversion on the demo models, from held-out scene *images*:

- reconstruction: PSNR of invert-then-resample with the source prompt (the
  scene's caption) against the image; UNet demo: DDIM at cfg 1 and at the
  workflow's cfg, negative-prompt and null-text inversion; DiT demo: RF inversion
  at cfg 1 and at its workflow's cfg; the VAE round trip is the ceiling;
- editing (recolour the first object): Prompt-to-Prompt from the re-noised
  image (denoise 0.8) and from each inversion at the workflow's cfg, with and
  without the local blend: PSNR outside the old and the new colour (grown by
  8 px) against the input, the share of edits recoloured, seconds per edit
  (the inversion's own seconds are reported in the first table).

Each scene's rows go to benchmarks/results/inversion_quality.json as it
finishes; a rerun skips the scenes already there (``--fresh`` starts over).

    python benchmarks/inversion_quality.py [--scenes 40] [--families unet,dit] [--no-readme]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from comfy_env import import_pack  # noqa: E402

PACK = import_pack()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attnseg_pack.attnseg.inversion import RF_INVERSION  # noqa: E402
from attnseg_pack.hosts.comfyui import demo_dit, demo_model  # noqa: E402
from attnseg_pack.hosts.comfyui.inversion import install_inversion, invert, sample_from_inversion  # noqa: E402
from demo import evaluate  # noqa: E402
from demo.scenes import colour_mask  # noqa: E402
from editing_quality import grown, psnr, recoloured  # noqa: E402
from segmentation_quality import markdown_table, write_readme  # noqa: E402

START, END = "<!-- inversion-quality:start -->", "<!-- inversion-quality:end -->"
RESULTS = REPO / "benchmarks" / "results" / "inversion_quality.json"
VAE_ROW = "VAE round trip (ceiling)"


@dataclass(frozen=True)
class Family:
    """One demo model's benchmark settings: its workflow's steps, cfg, scheduler and edit inputs."""

    name: str
    load: Callable
    steps: int
    cfg: float
    scheduler: str
    inversions: tuple  # (row label, method, cfg)
    edit_inputs: dict


UNET = Family("UNet demo", demo_model.load, 20, 5.0, "normal",
              (("DDIM, cfg 1", "DDIM", 1.0), ("DDIM, cfg 5", "DDIM", 5.0),
               ("negative-prompt, cfg 5", "negative-prompt", 5.0), ("null-text, cfg 5", "null-text", 5.0)),
              dict(feather=1, segmenter_weights=",".join(map(str, evaluate.DEMO_WEIGHTS))))
# flux-demo-edit-image's settings (RF inversion and the MM-DiT control of the preset's blocks).
DIT = Family("DiT demo", demo_dit.load, 30, 3.0, "simple",
             (("RF inversion, cfg 1", RF_INVERSION, 1.0), ("RF inversion, cfg 3", RF_INVERSION, 3.0)),
             dict(feather=0, segmenter_weights="1", qk_replace=0.2))
FAMILIES = {"unet": UNET, "dit": DIT}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def scene_rows(family: Family, loaded, node, index: int, item, iterations: int) -> dict:
    """One scene's reconstruction PSNR and seconds per inversion, and its edit rows
    (PSNR outside, recoloured, seconds) per start and blend."""
    model, clip, vae, negative = loaded
    image = torch.from_numpy(item.image).float()[None] / 255.0
    with torch.inference_mode():
        latent = {"samples": vae.encode(image)}
        reconstruction = {VAE_ROW: [psnr(to_uint8(vae.decode(latent["samples"]))[0], item.image), None]}
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(item.caption))
    target, old, new = recoloured(item.caption, index)
    name = evaluate.object_names(item.caption)[0]
    blend_words = f"{name}, {name.replace(old, new, 1)}"
    starts = [("re-noise (denoise 0.8)", None)]
    for label, method, cfg in family.inversions:
        began = time.perf_counter()
        with torch.inference_mode():
            inversion = invert(model, clip, item.caption, negative, latent, family.steps, cfg, family.scheduler,
                               method, iterations)
            patched = model.clone()
            install_inversion(patched, inversion)
            out = sample_from_inversion(patched, inversion, positive, negative, inversion.noise, cfg)
            decoded = to_uint8(vae.decode(out))[0]
        reconstruction[label] = [psnr(decoded, item.image), time.perf_counter() - began]
        if cfg == family.cfg:
            starts.append((label, inversion))
    edits = {}
    for label, inversion in starts:
        for blend in (False, True):
            inputs = dict(seed=index, steps=family.steps, cfg=family.cfg, sampler_name="euler",
                          scheduler=family.scheduler, denoise=0.8 if inversion is None else 1.0, mode="replace",
                          cross_replace=0.8, self_replace=0.4, blend_words=blend_words if blend else "",
                          blend_start=0.2, mask_threshold=0.7, dilate=1, reweight_words="", reweight_factor=1.0,
                          keep_outside="input latent", **family.edit_inputs)
            began = time.perf_counter()
            with torch.inference_mode():
                edited, _, _, _ = node.edit(model, clip, item.caption, target, negative, latent, **inputs,
                                            inversion=inversion)
                out = to_uint8(vae.decode(edited["samples"]))[0]
            seconds = time.perf_counter() - began
            was_old = colour_mask(item.image, old)
            outside = ~grown(was_old | colour_mask(out, new))
            changed = bool(was_old.sum() > 0 and colour_mask(out, new)[was_old].mean() > 0.3
                           and colour_mask(out, old)[was_old].mean() < 0.25)
            edits[f"{label}{', local blend' if blend else ', no blend'}"] = [
                psnr(out[outside], item.image[outside]), changed, seconds]
    return {"reconstruction": reconstruction, "edits": edits}


def tables(family: Family, done: list[dict], iterations: int) -> str:
    reconstruction = {name: [scene["reconstruction"][name] for scene in done] for name in done[0]["reconstruction"]}
    rows = [[name, f"{np.median([v for v, _ in values]):.2f}",
             f"{np.mean([s for _, s in values]):.1f}" if values[0][1] is not None else "-"]
            for name, values in reconstruction.items()]
    extra = f", null-text {iterations} iterations a step at most" if any(
        m == "null-text" for _, m, _ in family.inversions) else ""
    text = markdown_table(
        f"{family.name} model, {len(done)} held-out scene images, the caption as the source prompt, {family.steps} "
        f"steps ({family.scheduler}){extra}, CPU, one thread. PSNR (dB, median) of invert-then-resample against "
        f"the image; s: the inversion and the resample.",
        ["inversion", "reconstruction PSNR", "s / image"], rows)
    edit_rows = {name: [scene["edits"][name] for scene in done] for name in done[0]["edits"]}
    edits = [[name, f"{np.median([r[0] for r in results]):.1f}", f"{np.mean([r[1] for r in results]):.2f}",
              f"{np.mean([r[2] for r in results]):.2f}"] for name, results in edit_rows.items()]
    return text + "\n\n" + markdown_table(
        f"{family.name}: editing the same {len(done)} scene images (the first object recoloured), keep_outside "
        f"'input latent', cfg {family.cfg:g}, {family.steps} euler steps. PSNR (dB, median) of the decoded edit "
        f"against the input outside the old and the new colour (grown by 8 px); recoloured: the share of edits "
        f"that turned the object the new colour; s / edit excludes the inversion.",
        ["start", "PSNR outside", "recoloured", "s / edit"], edits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--families", default="unet,dit", help="comma-separated: unet, dit")
    parser.add_argument("--iterations", type=int, default=10, help="null-text iterations per step")
    parser.add_argument("--fresh", action="store_true", help="ignore the scenes already in the results file")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    node = PACK.NODE_CLASS_MAPPINGS["AttnSegPromptToPrompt"]()
    saved = {} if args.fresh or not RESULTS.exists() else json.loads(RESULTS.read_text())
    if saved.get("iterations") != args.iterations:
        saved = {}
    saved["iterations"] = args.iterations
    texts = []
    for key in args.families.split(","):
        family = FAMILIES[key.strip()]
        done = saved.setdefault(key, {})
        with torch.inference_mode():  # as ComfyUI loads it: null-text meets inference-tensor weights
            model, clip, vae = family.load()
            loaded = (model, clip, vae, clip.encode_from_tokens_scheduled(clip.tokenize("")))
        for index, seed in enumerate(evaluate.TEST_SEEDS[:args.scenes]):
            if str(seed) in done:
                continue
            done[str(seed)] = scene_rows(family, loaded, node, index, evaluate.scene(seed), args.iterations)
            RESULTS.write_text(json.dumps(saved, indent=1))  # a stopped run resumes from the next scene
            print(f"{family.name} scene {index + 1}/{args.scenes}: " + ", ".join(
                f"{k} {v[0]:.2f} dB" for k, v in done[str(seed)]["reconstruction"].items()), flush=True)
        texts.append(tables(family, [done[str(seed)] for seed in evaluate.TEST_SEEDS[:args.scenes]],
                            args.iterations))
    text = "\n\n".join(texts)
    print(text)
    if not args.no_readme:
        write_readme(text, START, END)


if __name__ == "__main__":
    main()
