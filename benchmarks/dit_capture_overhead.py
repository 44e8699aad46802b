"""Capture overhead on a reduced-depth, full-width random Flux, on this machine's CPU.

The model is ComfyUI's own Flux (supported_models.Flux -> model_base.Flux) at
Flux-dev width: hidden 3072, 24 heads of 128 (RoPE axes 16 + 56 + 56),
context_in_dim 4096, vec_in_dim 768, 16 latent channels, but only ``--double``
double and ``--single`` single blocks, random seeded weights (tests/tiny_dit.py's builder), fp32.

Timing: stock sampling (comfy.sample.sample, euler, cfg 1), sampling with the
DiT capture of I2T on every block, and the same plus pooled I2I of one block,
interleaved ``--repeats`` rounds after a warm-up, medians (capture_overhead's
``timed``). Memory: the peak process RSS during one run of each variant after a
stock warm-up, minus the RSS before it (capture_overhead's ``peak_rss``). The naive capture contrast: the full probabilities
softmax(q k^T / sqrt(d)) of one block's q, k (1 x 24 x L x 128), head mean,
timed per block and multiplied by the block count.

    python benchmarks/dit_capture_overhead.py [--size 256 --steps 2 --repeats 3 --text 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from capture_overhead import peak_rss, timed  # noqa: E402  (loads ComfyUI and the pack)
import tiny_dit  # noqa: E402
import torch  # noqa: E402

from attnseg_pack.attnseg import AttentionStore  # noqa: E402
from attnseg_pack.attnseg.layers import LayerPick  # noqa: E402
from attnseg_pack.hosts.comfyui.capture import CapturePlan  # noqa: E402
from attnseg_pack.hosts.comfyui.dit import describe_dit, install_dit_capture  # noqa: E402


def flux_config(double: int, single: int) -> dict:
    return dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=double, depth_single_blocks=single,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text", type=int, default=256, help="text tokens")
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = tiny_dit.tiny_flux(0, flux_config(args.double, args.single))
    info = describe_dit(model)
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, args.text, 4096, generator=g),
                 {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    side = args.size // 8
    lat = torch.randn(1, 16, side, side, generator=g)
    image_tokens = (side // 2) ** 2

    def sample(patcher):
        with torch.no_grad():
            tiny_dit.sample(patcher, positive, lat, steps=args.steps)

    def store():
        return AttentionStore("flux", 1, (side, side), (args.size, args.size), dtype=torch.float32)

    def captured(plan):
        clone = model.clone()
        install_dit_capture(clone, info, store(), plan)
        return clone

    last = (LayerPick.dit("single", args.single - 1),)
    variants = {
        "stock": lambda: sample(model),
        "capture I2T": lambda: sample(captured(CapturePlan(self_steps=None))),
        "capture I2T + I2I": lambda: sample(captured(CapturePlan(self_layers=last))),
    }

    variants["stock"]()  # warm-up: first-call allocations out of the memory figures
    memory = {}
    for name, run in variants.items():  # each variant's peak RSS once (also its warm-up)
        before, peak = peak_rss(run)
        memory[name] = peak - before
    med = timed(variants, args.repeats, warm_up=False)

    # Naive contrast on the same q, k shapes: full probabilities per block, head mean.
    length = args.text + image_tokens
    q = torch.randn(1, 24, length, 128, generator=g)
    k = torch.randn(1, 24, length, 128, generator=g)
    naive_times, kernel_times = [], []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        probs = torch.softmax(q @ k.transpose(-1, -2) / 128 ** 0.5, dim=-1).mean(1)
        naive_times.append(time.perf_counter() - start)
        del probs
        start = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, k, k)
        kernel_times.append(time.perf_counter() - start)
    naive_block = statistics.median(naive_times[1:])
    kernel_block = statistics.median(kernel_times[1:])
    blocks = args.double + args.single
    naive_total = naive_block * blocks * args.steps

    print(f"Flux (random weights, fp32) hidden 3072, 24 heads x 128, {args.double} double + {args.single} single "
          f"blocks, {args.size}x{args.size} ({image_tokens} image + {args.text} text tokens), {args.steps} steps "
          f"euler cfg 1, {torch.get_num_threads()} threads, medians of {args.repeats}")
    print("| variant | seconds | / stock | peak RSS extra (MiB) |")
    print("| --- | --- | --- | --- |")
    for name in variants:
        print(f"| {name} | {med[name]:.2f} | {med[name] / med['stock']:.3f} | {memory[name]:.0f} |")
    print(f"| naive probabilities, all {blocks} blocks x {args.steps} steps (est.) | {naive_total:.2f} | "
          f"{(med['stock'] + naive_total) / med['stock']:.3f} (stock + naive) | "
          f"{24 * length * length * 4 / 2**20:.0f} per block (probs) |")
    print(f"\nper block on (1, 24, {length}, 128): naive softmax(q k^T) + head mean {naive_block * 1000:.1f} ms, "
          f"SDPA {kernel_block * 1000:.1f} ms")


if __name__ == "__main__":
    main()
