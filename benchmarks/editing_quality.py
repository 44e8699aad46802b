"""Prompt-to-Prompt editing on the demo model: recolour the first object of a
held-out caption ("a red circle and a blue square" -> "a green circle and a
blue square") and measure

- kept: PSNR of the edit against the source outside the edited object (its
  colour in the source and the new colour in the edit, grown by 8 px), on the
  decoded edit and on the edit composited into the source with the blend mask;
- recoloured: the share of edits where the source object's pixels mostly
  (> 30%) took the new colour and the old colour mostly (> 75%) left.

Compared: the edit prompt sampled alone from the same seed; P2P attention
control without a blend; P2P with the local blend on DiffSegmenter masks.
Writes the table into README.md between the editing-quality markers.

    python benchmarks/editing_quality.py [--captions 40] [--no-readme]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from comfy_env import import_pack  # noqa: E402

PACK = import_pack()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402
from demo import evaluate  # noqa: E402
from demo.scenes import COLOURS, colour_mask  # noqa: E402
from segmentation_quality import markdown_table, write_readme  # noqa: E402

START, END = "<!-- editing-quality:start -->", "<!-- editing-quality:end -->"
STEPS = 20
# (name, node overrides); the blend reads the recoloured object's whole name ("red circle").
VARIANTS = (
    ("edit prompt alone, same seed", dict(cross_replace=0.0, self_replace=0.0, blend_words="")),
    ("P2P attention control, no blend", dict(blend_words="")),
    ("P2P + local blend (DiffSegmenter mask)", dict()),
)


def recoloured(caption: str, seed: int) -> tuple[str, str, str]:
    """(edit caption, old colour, new colour): the first object takes another colour."""
    old = evaluate.object_names(caption)[0].split()[0]
    new = sorted(c for c in COLOURS if c not in caption)[seed % 3]
    return caption.replace(old, new, 1), old, new


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def grown(mask: np.ndarray, pixels: int = 8) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(t, 2 * pixels + 1, stride=1, padding=pixels)[0, 0].numpy() > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=40)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    model, clip, vae = demo_model.load()
    node = PACK.NODE_CLASS_MAPPINGS["AttnSegPromptToPrompt"]()
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    captions = [evaluate.scene(seed).caption for seed in evaluate.TEST_SEEDS[:args.captions]]
    rows = []
    for name, overrides in VARIANTS:
        kept, composited, changed, seconds = [], [], 0, 0.0
        for seed, caption in enumerate(captions):
            target, old, new = recoloured(caption, seed)
            recoloured_name = evaluate.object_names(caption)[0]
            inputs = dict(seed=seed, steps=STEPS, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                          mode="replace", cross_replace=0.8, self_replace=0.4,
                          blend_words=f"{recoloured_name}, {recoloured_name.replace(old, new, 1)}",
                          blend_start=0.2, mask_threshold=0.7, dilate=1, feather=1, reweight_words="",
                          reweight_factor=1.0, keep_outside="source sample",
                          segmenter_weights=",".join(map(str, evaluate.DEMO_WEIGHTS)))
            inputs.update(overrides)
            began = time.perf_counter()
            with torch.inference_mode():
                edited, source, mask, _ = node.edit(model, clip, caption, target, negative,
                                                    {"samples": torch.zeros(1, 4, 16, 16)}, **inputs)
                images = vae.decode(torch.cat([source["samples"], edited["samples"]])).clamp(0, 1)
            seconds += time.perf_counter() - began
            src, out = (images.numpy() * 255).round().astype(np.uint8)
            alpha = mask[0].numpy()[..., None]
            blended = (out * alpha + src * (1 - alpha)).round().astype(np.uint8)
            was_old = colour_mask(src, old)
            outside = ~grown(was_old | colour_mask(out, new))
            kept.append(psnr(out[outside], src[outside]))
            composited.append(psnr(blended[outside], src[outside]))
            if was_old.sum() > 0:
                changed += (colour_mask(out, new)[was_old].mean() > 0.3
                            and colour_mask(out, old)[was_old].mean() < 0.25)
        row = [name, f"{np.median(kept):.1f}", f"{np.median(composited):.1f}",
               f"{changed / len(captions):.3f}", f"{seconds / len(captions):.2f}"]
        rows.append(row)
        print(" | ".join(row), flush=True)
    text = markdown_table(
        f"Demo model, {len(captions)} held-out captions, the first object recoloured, one seed each, {STEPS} euler "
        f"steps, cfg 5, CPU. PSNR (dB, median) of the edit against the source outside the old and the new colour "
        f"(grown by 8 px); composited: the edit pasted into the source with the blend mask.",
        ["variant", "PSNR outside, decoded edit", "PSNR outside, composited", "recoloured", "s / edit"], rows)
    print(text)
    if not args.no_readme:
        write_readme(text, START, END)


if __name__ == "__main__":
    main()
