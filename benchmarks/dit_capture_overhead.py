"""Capture overhead on reduced-depth, full-width random DiTs (Flux, SD3-medium), on this machine's CPU.

Models, ComfyUI's own classes with seeded random weights (tests/tiny_dit.py's
builders, tiny_models.init_weights: norm gains 1), fp32:

* Flux (supported_models.Flux): Flux-dev width, hidden 3072, 24 heads of 128
  (RoPE axes 16 + 56 + 56), context 4096, vec 768, 16 latent channels; ``--double``
  double + ``--single`` single blocks (default 1 + 2, Flux-dev's 1 : 2); ``--flux-text`` T5
  tokens (Flux-dev: 512); cfg 1.
* SD3 (supported_models.SD3, MMDiT): SD3-medium width, hidden 1536 = 64 x 24, 24
  heads of 64, context 4096, pooled 2048, position table 192 x 192; ``--joint``
  joint blocks (default 2); ``--sd3-text`` context tokens (diffusers' SD3 default: CLIP-L/G's 77
  joined on channels + T5's 256 = 333); cfg ``--sd3-cfg`` (cond + uncond in one batch).

Per model, interleaved in one process (capture_overhead's ``timed``: ``--repeats``
rounds, medians of the wall-clock seconds; the process CPU seconds of the same runs
beside them, which other jobs on a shared machine inflate less):

1. sampling, euler / simple, ``--steps`` steps: the stock KSampler path
   (passes.capture_sample without a plan), the capture sampler recording I2T of
   every block at every step, and the same plus I2I of the default block (the
   middle block on these reduced models) at every step;
2. the segment pass (passes.capture_pass on a latent at t = 100: one cond
   forward, I2T of every block + the default I2I block) against the same one
   forward without the patch (sample_custom with passes.OneForwardPass, the
   call capture_pass makes);
3. memory: the peak process RSS during each timed run (``peak_rss``, sampled
   every 5 ms; glibc's freed pages trimmed before each run, so no variant runs on
   pages an earlier one left resident), medians; after a one-step stock warm-up;
4. per block, on random q, k, v of the model's shapes: ComfyUI's attention kernel, the
   fused kernel with its log-sum-exp (attention_with_lse), the capture's
   ``joint_attention_maps`` (I2T) from that log-sum-exp and without it (its own
   pass over all keys), and the naive capture (the full softmax(q k^T / sqrt(d))
   of every row, head mean), timed and with its peak RSS extra; the naive one
   extrapolated to every block of every step.

``--attention`` picks ComfyUI's attention kernel for the DiT blocks: ``sdpa``
(attention_pytorch, ComfyUI's default on CUDA and what --use-pytorch-cross-attention
selects; the capture then takes each row's log-sum-exp from the fused kernel) or
``default`` (what ComfyUI picked on this machine at import: sub-quadratic on a CPU;
the capture computes the log-sum-exp itself); ``sdpa,default`` runs both.

    python benchmarks/dit_capture_overhead.py [--models flux,sd3 --attention sdpa,default --size 512 --steps 2 --repeats 2]
    python benchmarks/capture_overhead.py --dit [same options]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from capture_overhead import peak_rss, timed  # noqa: E402  (loads ComfyUI and the pack)
import tiny_dit  # noqa: E402
import comfy.ldm.flux.math  # noqa: E402
import comfy.ldm.modules.attention  # noqa: E402
import comfy.ldm.modules.diffusionmodules.mmdit  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402

from attnseg_pack.attnseg.attention import attention_with_lse, joint_attention_maps  # noqa: E402
from attnseg_pack.hosts.comfyui.dit import describe_dit  # noqa: E402
from attnseg_pack.hosts.comfyui.passes import OneForwardPass, capture_pass, capture_sample, timestep_sigma  # noqa: E402
from attnseg_pack.nodes.capture import step_plan  # noqa: E402

PASS_TIMESTEP = 100
SAMPLER_TARGET, PASS_TARGET, MEMORY_TARGET = 1.10, 1.20, 0.05


def flux_config(double: int, single: int) -> dict:
    return dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=double, depth_single_blocks=single,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def sd3_config(blocks: int) -> dict:
    """SD3-medium's MMDiT (depth 24 sets the width 64 x 24 and 24 heads), ``blocks`` joint blocks."""
    return dict(in_channels=16, out_channels=16, patch_size=2, depth=24, num_blocks=blocks, input_size=None,
                adm_in_channels=2048, num_patches=192 * 192, pos_embed_max_size=192,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": 1536}},
                pos_embed_scaling_factor=None, x_block_self_attn_layers=[])


# The modules whose blocks call optimized_attention (bound at their import).
DIT_ATTENTION_MODULES = (comfy.ldm.flux.math, comfy.ldm.modules.diffusionmodules.mmdit)
HOST_DEFAULT = comfy.ldm.flux.math.optimized_attention


def use_attention(name: str):
    """Bind the DiT blocks' attention kernel: ``sdpa`` or ``default``; returns it."""
    kernel = comfy.ldm.modules.attention.attention_pytorch if name == "sdpa" else HOST_DEFAULT
    for module in DIT_ATTENTION_MODULES:
        module.optimized_attention = kernel
    return kernel


def trim() -> None:
    """Hand freed heap pages back (glibc), so RSS before a run is the live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def watched(variants: dict, peaks: dict, cpu: dict) -> dict:
    """``variants`` that each record (RSS before, peak RSS) of every run in ``peaks`` (freed
    heap pages trimmed first: every timed run is also a memory run, no extra runs) and the
    process CPU seconds of every run in ``cpu`` (what other jobs' load inflates least)."""
    def wrap(name, run):
        def measured():
            trim()
            start = time.process_time()
            peaks.setdefault(name, []).append(peak_rss(run))
            cpu.setdefault(name, []).append(time.process_time() - start)
        return measured
    return {name: wrap(name, run) for name, run in variants.items()}


def build(family: str, args):
    """(label, model, positive, negative, cfg, text tokens) of one benchmark model."""
    g = torch.Generator().manual_seed(1)
    if family == "flux":
        model = tiny_dit.tiny_flux(0, flux_config(args.double, args.single))
        text = args.flux_text
        positive = [[torch.randn(1, text, 4096, generator=g),
                     {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
        return (f"Flux, hidden 3072, 24 heads x 128, {args.double} double + {args.single} single blocks",
                model, positive, positive, 1.0, text)
    model = tiny_dit.tiny_sd3(0, sd3_config(args.joint))
    text = args.sd3_text
    positive, negative = ([[torch.randn(1, text, 4096, generator=g),
                            {"pooled_output": torch.randn(1, 2048, generator=g)}]] for _ in range(2))
    return (f"SD3-medium width, hidden 1536, 24 heads x 64, {args.joint} joint blocks", model, positive, negative,
            args.sd3_cfg, text)


def per_block(heads: int, dim: int, text: int, image: int, repeats: int, kernel) -> dict:
    """Seconds and peak RSS extra (MiB) per block call of each attention piece, on random q, k, v
    of one batch row (the captured branch) and the model's joint sequence [text, image]."""
    length = text + image
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, heads, length, dim, generator=g) for _ in range(3))
    rows, keys = slice(text, length), slice(0, text)
    k_t = k.transpose(-1, -2)
    fused = attention_with_lse(q, k, v)
    lse = fused[1] if fused is not None else None
    pieces = {
        "kernel": lambda: kernel(q, k, v, heads, skip_reshape=True),
        "fused kernel": lambda: attention_with_lse(q, k, v),
        "capture from lse": lambda: joint_attention_maps(q, k, rows, {"cross": (keys, None)}, lse=lse),
        "capture": lambda: joint_attention_maps(q, k, rows, {"cross": (keys, None)}),
        "naive": lambda: torch.softmax(torch.matmul(q, k_t).mul_(dim ** -0.5), dim=-1).mean(1),
    }
    memory = {}
    for name in ("kernel", "capture", "naive"):
        trim()
        before, peak = peak_rss(pieces[name])
        memory[name] = peak - before
    seconds = timed(pieces, repeats)
    return {"seconds": seconds, "memory": memory, "probs_mib": heads * length * length * 4 / 2**20,
            "shape": (heads, dim), "kernel_name": getattr(kernel, "__name__", str(kernel))}


def run_model(family: str, attention: str, args) -> dict:
    kernel = use_attention(attention)
    label, model, positive, negative, cfg, text = build(family, args)
    info = describe_dit(model)
    side = args.size // 8
    image_tokens = (side // 2) ** 2
    blocks = len(info.layers)
    self_block = info.default_self_layers()[0]
    self_name = f"{self_block.block} {self_block.block_id}"
    empty = {"samples": torch.zeros(1, 16, side, side)}
    clean = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(3))

    def sample(plan):
        def run():
            with torch.no_grad():
                capture_sample(model, 0, args.steps, cfg, "euler", "simple", positive, negative, empty, 1.0, plan)
        return run

    samplers = {
        "stock": sample(None),
        "capture I2T": sample(step_plan(args.steps, 0, -1, "off")),
        "capture I2T + I2I": sample(step_plan(args.steps, 0, -1, "captured steps")),
    }

    def plain_forward():  # capture_pass's call on the unpatched model
        sigma = timestep_sigma(model.get_model_object("model_sampling"), PASS_TIMESTEP).reshape(1)
        noise = comfy.sample.prepare_noise(clean, 0)
        comfy.sample.sample_custom(model, noise, 1.0, OneForwardPass(sigma), torch.stack([sigma[0], sigma[0] * 0]),
                                   positive, positive, clean, disable_pbar=True, seed=0)

    passes = {
        "plain forward": plain_forward,
        "segment pass": lambda: capture_pass(model, clean, positive, [PASS_TIMESTEP], 0, (args.size, args.size)),
    }

    started = time.perf_counter()
    with torch.no_grad():
        tiny_dit.sample(model, positive, empty["samples"], steps=1, cfg=cfg, negative=negative)  # warm-up
    peaks: dict[str, list] = {}
    cpu: dict[str, list] = {}
    seconds = timed(watched(samplers, peaks, cpu), args.repeats, warm_up=False)
    seconds.update(timed(watched(passes, peaks, cpu), args.pass_repeats, warm_up=False))
    memory = {name: tuple(statistics.median(run[i] for run in runs) for i in (0, 1)) for name, runs in peaks.items()}
    cpu = {name: statistics.median(values) for name, values in cpu.items()}
    head_dim = model.get_model_object("diffusion_model").hidden_size // info.heads
    blocks_info = per_block(info.heads, head_dim, text, image_tokens, args.repeats, kernel)
    elapsed = time.perf_counter() - started
    return dict(family=family, attention=attention, label=label, cfg=cfg, text=text, image_tokens=image_tokens, blocks=blocks,
                self_name=self_name, seconds=seconds, cpu=cpu, memory=memory, per_block=blocks_info, elapsed=elapsed)


def verdict(value: float, target: float) -> str:
    return f"{'met' if value <= target else 'MISSED'} (<= {target:g})"


def report(r: dict, args) -> list[str]:
    s, cpu, mem, pb = r["seconds"], r["cpu"], r["memory"], r["per_block"]
    calls = r["blocks"] * args.steps  # captured block calls of one sampling run (cond row only)
    peak = {name: p for name, (_, p) in mem.items()}
    work = {name: p - b for name, (b, p) in mem.items()}
    batch = "cond + uncond batch" if r["cfg"] != 1 else "cond only"
    out = [f"### {r['label']}, attention {r['attention']}",
           f"{args.size}x{args.size} ({r['image_tokens']} image + {r['text']} text tokens), {args.steps} steps "
           f"euler / simple, cfg {r['cfg']:g} ({batch}), fp32, {torch.get_num_threads()} threads, medians of "
           f"{args.repeats} (passes {args.pass_repeats}); ComfyUI's attention here: {pb['kernel_name']}; "
           f"{r['elapsed'] / 60:.1f} min", "",
           "| variant | seconds | / baseline | CPU seconds | / baseline | peak RSS (MiB) | peak RSS extra | "
           "working memory (MiB) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def row(name, label, base, target=None):
        ratio, cpu_ratio, extra = s[name] / s[base], cpu[name] / cpu[base], peak[name] / peak[base] - 1
        marks = [f" {verdict(value, limit)}" if target else ""
                 for value, limit in ((ratio, target), (cpu_ratio, target), (extra, MEMORY_TARGET))]
        out.append(f"| {label} | {s[name]:.2f} | {ratio:.3f}{marks[0]} | {cpu[name]:.2f} | {cpu_ratio:.3f}{marks[1]} | "
                   f"{peak[name]:.0f} | {extra * 100:+.1f} %{marks[2]} | {work[name]:.0f} |")

    row("stock", "stock sampling", "stock")
    row("capture I2T", "capture sampler: I2T, every block, every step", "stock", SAMPLER_TARGET)
    row("capture I2T + I2I", f"capture sampler: I2T every block + I2I {r['self_name']}, every step", "stock",
        SAMPLER_TARGET)
    row("plain forward", f"plain forward (one cond pass, t = {PASS_TIMESTEP})", "plain forward")
    row("segment pass", f"segment pass: capture_pass, I2T every block + I2I {r['self_name']}", "plain forward",
        PASS_TARGET)
    naive = s["stock"] + pb["seconds"]["naive"] * calls
    out.append(f"| naive capture sampler (est.: stock + {calls} block calls x "
               f"{pb['seconds']['naive'] * 1000:.0f} ms) | {naive:.2f} | {naive / s['stock']:.3f} | - | - | - | "
               f"+{pb['memory']['naive']:.0f} MiB per block call ({pb['probs_mib']:.0f} MiB of probabilities) | - |")
    sec = {k: v * 1000 for k, v in pb["seconds"].items()}
    used = "capture from lse" if r["attention"] == "sdpa" else "capture"
    estimate = pb["seconds"][used] * calls
    out += ["", f"Per block call, on (1, {pb['shape'][0]}, {r['text'] + r['image_tokens']}, {pb['shape'][1]}) q, k, v "
            f"(ms; peak RSS extra): ComfyUI's attention {sec['kernel']:.0f} ({pb['memory']['kernel']:.0f} MiB); "
            f"the fused kernel with its log-sum-exp {sec['fused kernel']:.0f}; capture I2T from that log-sum-exp "
            f"{sec['capture from lse']:.0f}, with its own pass over all keys {sec['capture']:.0f} "
            f"({pb['memory']['capture']:.0f} MiB); naive {sec['naive']:.0f} ({pb['memory']['naive']:.0f} MiB). "
            f"Capture I2T estimated from it ({used}): {estimate:.2f} s per sampling run, measured "
            f"{s['capture I2T'] - s['stock']:+.2f} s."]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="flux,sd3", help="comma-separated: flux, sd3")
    parser.add_argument("--attention", default="sdpa,default",
                        help="comma-separated ComfyUI attention kernels for the blocks: sdpa, default")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved sampling rounds")
    parser.add_argument("--pass-repeats", type=int, default=3, help="interleaved segment-pass rounds")
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--flux-text", type=int, default=512, help="Flux text tokens (Flux-dev's T5: 512)")
    parser.add_argument("--joint", type=int, default=2, help="SD3 joint blocks")
    parser.add_argument("--sd3-text", type=int, default=333, help="SD3 context tokens (77 CLIP + 256 T5)")
    parser.add_argument("--sd3-cfg", type=float, default=5.0)
    args = parser.parse_args(argv)
    comfy.utils.PROGRESS_BAR_ENABLED = False  # no bars in the printed tables
    started = time.perf_counter()
    lines = []
    for family in args.models.split(","):
        for attention in args.attention.split(","):
            lines += report(run_model(family.strip(), attention.strip(), args), args) + [""]
            comfy.model_management.unload_all_models()  # the next run starts without this one's weights
            trim()
    print("\n".join(lines))
    print(f"total {(time.perf_counter() - started) / 60:.1f} min; targets: capture sampler / stock <= "
          f"{SAMPLER_TARGET:g}, segment pass / plain forward <= {PASS_TARGET:g}, peak RSS extra <= "
          f"{MEMORY_TARGET * 100:g} %")


if __name__ == "__main__":
    main()
