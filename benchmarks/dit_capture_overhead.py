"""Capture overhead on a reduced-depth, full-width random Flux, on this machine's CPU.

The model is ComfyUI's own Flux (supported_models.Flux -> model_base.Flux) at
Flux-dev width: hidden 3072, 24 heads of 128 (RoPE axes 16 + 56 + 56),
context_in_dim 4096, vec_in_dim 768, 16 latent channels, but only ``--double``
double and ``--single`` single blocks, random seeded weights, fp32.

Timing: stock sampling (comfy.sample.sample, euler, cfg 1), sampling with the
DiT capture of I2T on every block, and the same plus pooled I2I of one block,
interleaved ``--repeats`` rounds after a warm-up, medians. Memory: the peak of
tracemalloc (Python-level allocations only: torch's CPU tensors are not
seen by it) and of the process RSS sampled by a thread every 5 ms, during one
run of each variant after a stock warm-up, each minus the level before it. The naive capture contrast: the full probabilities
softmax(q k^T / sqrt(d)) of one block's q, k (1 x 24 x L x 128), head mean,
timed per block and multiplied by the block count.

    python benchmarks/dit_capture_overhead.py [--size 256 --steps 2 --repeats 3 --text 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from comfy_env import import_pack  # noqa: E402

import_pack()

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.supported_models  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from attnseg_pack.attnseg import AttentionStore  # noqa: E402
from attnseg_pack.hosts.comfyui.dit import DiTCapturePlan, describe_flux, install_dit_capture  # noqa: E402


def flux_config(double: int, single: int) -> dict:
    return dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=double, depth_single_blocks=single,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def build(double: int, single: int, seed: int = 0):
    config = flux_config(double, single)
    model_config = comfy.supported_models.Flux(config)
    model_config.unet_config = dict(config)
    model = model_config.get_model({})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("bias")):
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 1.0 / p[0].numel() ** 0.5 if p.ndim > 1 else 1.0 / p.numel() ** 0.5,
                          generator=generator)
    model.diffusion_model.float()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


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
    model = build(args.double, args.single)
    info = describe_flux(model)
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, args.text, 4096, generator=g),
                 {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
    side = args.size // 8
    lat = torch.randn(1, 16, side, side, generator=g)
    image_tokens = (side // 2) ** 2

    def sample(patcher):
        noise = comfy.sample.prepare_noise(lat, 0)
        with torch.no_grad():
            comfy.sample.sample(patcher, noise, args.steps, 1.0, "euler", "simple", positive, positive, lat,
                                denoise=1.0, disable_pbar=True, seed=0)

    def store():
        return AttentionStore("flux", 1, (side, side), (args.size, args.size), dtype=torch.float32)

    last = ("single", info.single - 1)
    variants = {
        "stock": lambda: sample(model),
        "capture I2T": lambda: sample(install_dit_capture(model, store(), DiTCapturePlan())),
        "capture I2T + I2I": lambda: sample(install_dit_capture(model, store(), DiTCapturePlan(self_blocks=(last,)))),
    }

    times = {name: [] for name in variants}
    memory = {}
    variants["stock"]()  # warm-up: first-call allocations out of the memory figures
    for name, run in variants.items():  # each variant's memory once (also its warm-up)
        memory[name] = peak_memory(run)
    for _ in range(args.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in times.items()}

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
    blocks = info.double + info.single
    naive_total = naive_block * blocks * args.steps

    print(f"Flux (random weights, fp32) hidden 3072, 24 heads x 128, {info.double} double + {info.single} single "
          f"blocks, {args.size}x{args.size} ({image_tokens} image + {args.text} text tokens), {args.steps} steps "
          f"euler cfg 1, {torch.get_num_threads()} threads, medians of {args.repeats}")
    print("| variant | seconds | / stock | peak tracemalloc extra (MiB) | peak RSS extra (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for name in variants:
        tm, rss = memory[name]
        print(f"| {name} | {med[name]:.2f} | {med[name] / med['stock']:.3f} | {tm:.1f} | {rss:.0f} |")
    print(f"| naive probabilities, all {blocks} blocks x {args.steps} steps (est.) | {naive_total:.2f} | "
          f"{(med['stock'] + naive_total) / med['stock']:.3f} (stock + naive) | - | "
          f"{24 * length * length * 4 / 2**20:.0f} per block (probs) |")
    print(f"\nper block on (1, 24, {length}, 128): naive softmax(q k^T) + head mean {naive_block * 1000:.1f} ms, "
          f"SDPA {kernel_block * 1000:.1f} ms")


def peak_memory(run) -> tuple[float, float]:
    """(peak tracemalloc - before, peak RSS - before) during ``run``, MiB."""
    import tracemalloc

    process = psutil.Process()
    before = process.memory_info().rss
    peak, done = [before], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    tracemalloc.start()
    watcher.start()
    try:
        run()
    finally:
        done.set()
        watcher.join()
        _, tm_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return tm_peak / 2**20, (peak[0] - before) / 2**20


if __name__ == "__main__":
    main()
