"""Capture overhead on the full-size random-weight SD1.5, on this machine's device.

Timing: the stock KSampler, the capture sampler and a naive capture (every
attention map of every layer materialised per head, through ComfyUI's attention
override) run interleaved in one process, ``--repeats`` rounds, medians.
Memory: each variant samples once in a fresh process; a thread samples the RSS.

    python benchmarks/capture_overhead.py [--steps 4 --size 512 --repeats 3] [--variants stock,scfg]
    python benchmarks/capture_overhead.py --dit [dit_capture_overhead.py's options]

``--dit``: the DiT rows instead (Flux and SD3 at full width, reduced depth):
benchmarks/dit_capture_overhead.py's ``main``, which reuses ``timed`` and
``peak_rss`` from here; the other options are then its own.

Variants: stock KSampler, capture sampler, naive capture, S-CFG (the AttnSeg
S-CFG patch on the stock KSampler), scfg_goca (the same patch with map_source
GoCA: GoCA's aggregation of the same layers, output-weighted heads and the
reference queries captured each step), goca (the capture sampler recording what
GoCA needs: output-weighted heads, every layer's self-attention at the last
step, the reference queries; with it the segment pass is also timed with
GoCA's heads alone and with GoCA's whole capture).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from comfy_env import import_pack  # noqa: E402

PACK = import_pack()

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's own module)
import psutil  # noqa: E402
import torch  # noqa: E402
from random_sd15 import ensure  # noqa: E402
from reference_capture import install_naive_capture  # noqa: E402

from attnseg_pack.hosts.comfyui.capture import CapturePlan  # noqa: E402
from attnseg_pack.hosts.comfyui.passes import capture_pass, capture_sample  # noqa: E402
from attnseg_pack.hosts.comfyui.text import encode_segmentation_prompt  # noqa: E402
from attnseg_pack.nodes.capture import step_plan, with_goca  # noqa: E402

PROMPT, CLASSES = "a photograph of a cat sitting on a sofa", "cat, sofa"


def load():
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ensure()), output_vae=True, output_clip=True)
    positive, _ = encode_segmentation_prompt(clip, PROMPT, CLASSES)
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    return model, positive, negative


def sampler_variants(model, positive, negative, steps: int, size: int):
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}

    def stock():
        comfy_nodes.common_ksampler(model, 0, steps, 7.5, "euler", "normal", positive, negative, latent)

    def capture():
        plan = step_plan(steps, 0, -1, "last step")  # all cross layers every step, finest self at the last
        capture_sample(model, 0, steps, 7.5, "euler", "normal", positive, negative, latent, 1.0, plan)

    def naive():
        clone = model.clone()
        install_naive_capture(clone)
        comfy_nodes.common_ksampler(clone, 0, steps, 7.5, "euler", "normal", positive, negative, latent)

    def scfg():
        patched, = PACK.NODE_CLASS_MAPPINGS["AttnSegSCFG"]().patch(model, 0.8, 3.0, 3, 0.0, 1.0)
        comfy_nodes.common_ksampler(patched, 0, steps, 7.5, "euler", "normal", positive, negative, latent)

    def scfg_goca():
        patched, = PACK.NODE_CLASS_MAPPINGS["AttnSegSCFG"]().patch(model, 0.8, 3.0, 3, 0.0, 1.0, map_source="GoCA")
        comfy_nodes.common_ksampler(patched, 0, steps, 7.5, "euler", "normal", positive, negative, latent)

    def goca():
        plan = with_goca(step_plan(steps, 0, -1, "last step"), "auto (GoCA)", "all (GoCA)")
        capture_sample(model, 0, steps, 7.5, "euler", "normal", positive, negative, latent, 1.0, plan)

    return {"stock": stock, "capture": capture, "naive": naive, "scfg": scfg, "scfg_goca": scfg_goca, "goca": goca}


def pass_variants(model, positive, size: int, goca: bool):
    latent = torch.zeros(1, 4, size // 8, size // 8)
    euler = comfy.samplers.sampler_object("euler")

    def plain_forward():
        sigma = model.get_model_object("model_sampling").sigma(torch.tensor(100.0))
        noise = comfy.sample.prepare_noise(latent, 0)
        comfy.sample.sample_custom(model, noise, 1.0, euler, torch.stack([sigma, sigma * 0]), positive, positive,
                                   latent, disable_pbar=True, seed=0)

    def segment_pass():
        capture_pass(model, latent, positive, [100], 0, (size, size))

    def naive_pass():
        clone = model.clone()
        install_naive_capture(clone)
        sigma = clone.get_model_object("model_sampling").sigma(torch.tensor(100.0))
        noise = comfy.sample.prepare_noise(latent, 0)
        comfy.sample.sample_custom(clone, noise, 1.0, euler, torch.stack([sigma, sigma * 0]), positive, positive,
                                   latent, disable_pbar=True, seed=0)

    def goca_heads_pass():
        capture_pass(model, latent, positive, [100], 0, (size, size), CapturePlan(cross_heads="auto"))

    def goca_pass():
        capture_pass(model, latent, positive, [100], 0, (size, size), with_goca(CapturePlan(), "auto (GoCA)",
                                                                                 "all (GoCA)"))

    variants = {"plain forward": plain_forward, "segment pass": segment_pass, "naive pass": naive_pass}
    if goca:
        variants.update({"GoCA-heads pass": goca_heads_pass, "GoCA pass": goca_pass})
    return variants


def timed(variants: dict, repeats: int, warm_up: bool = True) -> dict[str, float]:
    """Median seconds of each variant over ``repeats`` interleaved rounds."""
    if warm_up:
        for run in variants.values():  # loads weights, fills caches
            run()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def with_cpu_seconds(variants: dict, cpu: dict) -> dict:
    """``variants`` that also record each run's process CPU seconds in ``cpu`` (what
    other jobs on a shared machine inflate least; wall time waits for them)."""
    def wrap(name, run):
        def measured():
            start = time.process_time()
            run()
            cpu.setdefault(name, []).append(time.process_time() - start)
        return measured
    return {name: wrap(name, run) for name, run in variants.items()}


def peak_rss(run) -> tuple[float, float]:
    """(RSS before, peak RSS during) ``run``, in MiB."""
    process = psutil.Process()
    before = process.memory_info().rss
    peak, done = [before], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run()
    finally:
        done.set()
        watcher.join()
    return before / 2**20, peak[0] / 2**20


def memory_child(variant: str, steps: int, size: int) -> None:
    model, positive, negative = load()
    comfy_nodes.common_ksampler(model, 0, 1, 7.5, "euler", "normal", positive, negative,
                                {"samples": torch.zeros(1, 4, 8, 8)})  # load the weights first
    before, peak = peak_rss(sampler_variants(model, positive, negative, steps, size)[variant])
    print(json.dumps({"before": before, "peak": peak}))


def memory(steps: int, size: int, variants) -> dict[str, dict]:
    out = {}
    for variant in variants:
        result = subprocess.run([sys.executable, __file__, "--memory-child", variant, "--steps", str(steps),
                                 "--size", str(size)], capture_output=True, text=True, check=True)
        out[variant] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    if "--dit" in sys.argv[1:]:  # the DiT rows: their own models and options
        from dit_capture_overhead import main as dit_main
        return dit_main([arg for arg in sys.argv[1:] if arg != "--dit"])
    parser = argparse.ArgumentParser()
    parser.add_argument("--dit", action="store_true",
                        help="run the DiT rows (benchmarks/dit_capture_overhead.py; its options follow)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="stock,capture,naive,scfg",
                        help="comma-separated sampler variants; stock is the baseline and always needed")
    parser.add_argument("--memory-child")
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.steps, args.size)

    model, positive, negative = load()
    chosen = args.variants.split(",")
    cpu_runs: dict[str, list] = {}
    sampling = timed(with_cpu_seconds({k: v for k, v in sampler_variants(model, positive, negative, args.steps,
                                                                         args.size).items() if k in chosen},
                                      cpu_runs), args.repeats)
    # the warm-up round's CPU seconds are dropped: the medians are of the timed rounds
    cpu = {name: statistics.median(values[-args.repeats:]) for name, values in cpu_runs.items()}
    passes = {}
    if "capture" in chosen or "goca" in chosen:
        passes = timed(pass_variants(model, positive, args.size, "goca" in chosen), args.repeats)
    mem = memory(args.steps, args.size, chosen)
    work = {k: v["peak"] - v["before"] for k, v in mem.items()}
    rows = []
    for variant, label, time_target, memory_target in (
            ("capture", "capture sampler", 1.15, 1.10), ("naive", "naive capture", None, None),
            ("scfg", "S-CFG sampler", 1.15, None), ("scfg_goca", "S-CFG (GoCA maps) sampler", 1.15, 1.05),
            ("goca", "GoCA capture sampler", None, None)):
        if variant in chosen:
            rows.append((f"{label} / stock KSampler, time", sampling[variant] / sampling["stock"], time_target))
            rows.append((f"{label} / stock KSampler, CPU time", cpu[variant] / cpu["stock"], time_target))
            rows.append((f"{label} / stock, peak RSS", mem[variant]["peak"] / mem["stock"]["peak"], memory_target))
    if "scfg_goca" in chosen and "scfg" in chosen:
        rows.append(("S-CFG (GoCA maps) / S-CFG (its own maps), time", sampling["scfg_goca"] / sampling["scfg"], None))
    if "goca" in chosen and "capture" in chosen:
        rows.append(("GoCA capture sampler / capture sampler, time", sampling["goca"] / sampling["capture"], None))
        rows.append(("GoCA capture sampler / capture sampler, working memory", work["goca"] / work["capture"], None))
    if passes:
        rows.append(("segment pass / plain UNet forward, time", passes["segment pass"] / passes["plain forward"], 1.3))
        rows.append(("naive pass / plain UNet forward, time", passes["naive pass"] / passes["plain forward"], None))
    if "GoCA pass" in passes:
        rows.append(("GoCA-heads pass / head-mean segment pass, time",
                     passes["GoCA-heads pass"] / passes["segment pass"], None))
        rows.append(("GoCA pass (heads + every self layer + queries) / segment pass, time",
                     passes["GoCA pass"] / passes["segment pass"], None))
    print(f"SD1.5 (random weights), {args.size}x{args.size}, {args.steps} steps euler cfg 7.5, "
          f"{torch.get_num_threads()} threads, medians of {args.repeats}")
    print("| measure | ratio | target |\n| --- | --- | --- |")
    for name, ratio, target in rows:
        print(f"| {name} | {ratio:.3f} | {'<= %.2f' % target if target else '-'} |")
    print("\nseconds: " + ", ".join(f"{k} {v:.2f}" for k, v in {**sampling, **passes}.items()))
    print("sampler CPU seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    print("sampling working memory (peak - before, MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in work.items()))


if __name__ == "__main__":
    main()
