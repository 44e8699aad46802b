"""Inversion on the demo model, from held-out scene *images*:

- reconstruction: PSNR of invert-then-resample with the source prompt (the
  scene's caption) against the image, for DDIM at cfg 1 and at the workflow's
  cfg, negative-prompt and null-text inversion; the VAE round trip is the ceiling;
- editing (recolour the first object): Prompt-to-Prompt from the re-noised
  image (denoise 0.8, today's path) and from each inversion, with and without
  the local blend: PSNR outside the old and the new colour (grown by 8 px)
  against the input, the share of edits recoloured, seconds per edit
  (the inversion's own seconds are reported in the first table).

    python benchmarks/inversion_quality.py [--scenes 4] [--no-readme]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from comfy_env import import_pack  # noqa: E402

PACK = import_pack()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402
from attnseg_pack.hosts.comfyui.inversion import install_inversion, invert, sample_from_inversion  # noqa: E402
from demo import evaluate  # noqa: E402
from demo.scenes import colour_mask  # noqa: E402
from editing_quality import grown, psnr, recoloured  # noqa: E402
from segmentation_quality import markdown_table, write_readme  # noqa: E402

START, END = "<!-- inversion-quality:start -->", "<!-- inversion-quality:end -->"
STEPS, CFG = 20, 5.0
INVERSIONS = (("DDIM, cfg 1", "DDIM", 1.0), (f"DDIM, cfg {CFG:g}", "DDIM", CFG),
              (f"negative-prompt, cfg {CFG:g}", "negative-prompt", CFG), (f"null-text, cfg {CFG:g}", "null-text", CFG))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=10, help="null-text iterations per step")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with torch.inference_mode():  # as ComfyUI loads it: null-text meets inference-tensor weights
        model, clip, vae = demo_model.load()
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    node = PACK.NODE_CLASS_MAPPINGS["AttnSegPromptToPrompt"]()
    scenes = [evaluate.scene(seed) for seed in evaluate.TEST_SEEDS[:args.scenes]]
    reconstruction = {name: ([], []) for name in ["VAE round trip (ceiling)"] + [n for n, _, _ in INVERSIONS]}
    edit_rows: dict[str, list] = {}
    for index, item in enumerate(scenes):
        image = torch.from_numpy(item.image).float()[None] / 255.0
        with torch.inference_mode():
            latent = {"samples": vae.encode(image)}
            reconstruction["VAE round trip (ceiling)"][0].append(psnr(to_uint8(vae.decode(latent["samples"]))[0],
                                                                      item.image))
            positive = clip.encode_from_tokens_scheduled(clip.tokenize(item.caption))
        target, old, new = recoloured(item.caption, index)
        name = evaluate.object_names(item.caption)[0]
        blend_words = f"{name}, {name.replace(old, new, 1)}"
        starts = [("re-noise (denoise 0.8)", None)]
        for label, method, cfg in INVERSIONS:
            began = time.perf_counter()
            with torch.inference_mode():
                inversion = invert(model, clip, item.caption, negative, latent, STEPS, cfg, "normal", method,
                                   args.iterations)
                patched = model.clone()
                install_inversion(patched, inversion)
                out = sample_from_inversion(patched, inversion, positive, negative, inversion.noise, cfg)
                decoded = to_uint8(vae.decode(out))[0]
            reconstruction[label][0].append(psnr(decoded, item.image))
            reconstruction[label][1].append(time.perf_counter() - began)
            if cfg == CFG:
                starts.append((label, inversion))
        for label, inversion in starts:
            for blend in (False, True):
                inputs = dict(seed=index, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal",
                              denoise=0.8 if inversion is None else 1.0, mode="replace", cross_replace=0.8,
                              self_replace=0.4, blend_words=blend_words if blend else "", blend_start=0.2,
                              mask_threshold=0.7, dilate=1, feather=1, reweight_words="", reweight_factor=1.0,
                              keep_outside="input latent", segmenter_weights=",".join(map(str, evaluate.DEMO_WEIGHTS)))
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
                row = edit_rows.setdefault(f"{label}{', local blend' if blend else ', no blend'}", [])
                row.append((psnr(out[outside], item.image[outside]), changed, seconds))
        print(f"scene {index + 1}/{len(scenes)}: " + ", ".join(f"{k} {v[0][-1]:.2f} dB" for k, v in
                                                            reconstruction.items()), flush=True)
    rows = [[name, f"{np.median(values):.2f}", f"{np.mean(seconds):.1f}" if seconds else "-"]
            for name, (values, seconds) in reconstruction.items()]
    text = markdown_table(
        f"Demo model, {len(scenes)} held-out scene images, the caption as the source prompt, {STEPS} steps "
        f"(normal), null-text {args.iterations} iterations a step at most, CPU, one thread. PSNR (dB, median) of "
        f"invert-then-resample against the image; s: the inversion and the resample.",
        ["inversion", "reconstruction PSNR", "s / image"], rows)
    edits = [[name, f"{np.median([r[0] for r in results]):.1f}", f"{np.mean([r[1] for r in results]):.2f}",
              f"{np.mean([r[2] for r in results]):.2f}"] for name, results in edit_rows.items()]
    text += "\n\n" + markdown_table(
        f"Editing the same {len(scenes)} scene images (the first object recoloured), keep_outside 'input latent', "
        f"cfg {CFG:g}, {STEPS} euler steps. PSNR (dB, median) of the decoded edit against the input outside the "
        f"old and the new colour (grown by 8 px); s / edit excludes the inversion.",
        ["start", "PSNR outside", "recoloured", "s / edit"], edits)
    print(text)
    if not args.no_readme:
        write_readme(text, START, END)


if __name__ == "__main__":
    main()
