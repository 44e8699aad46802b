"""The diffusers host's DiT capture cost: reduced-depth, full-width random diffusers
transformers (diffusers' own classes and initialisation), fp32 on this machine's CPU.

* Flux: ``FluxTransformer2DModel`` at Flux-dev's width (24 heads of 128, context 4096,
  pooled 768, RoPE axes 16 + 56 + 56, guidance embedding), ``--double`` double +
  ``--single`` single blocks (default 1 + 2), ``--flux-text`` T5 tokens (FluxPipeline's 512);
* SD3: ``SD3Transformer2DModel`` at SD3-medium's width (24 heads of 64, context 4096,
  pooled 2048), ``--joint`` joint blocks (default 2), ``--sd3-text`` context tokens
  (77 CLIP + 256 T5).

One transformer call at ``--size`` pixels (a 1024-token image at 512 px), timed
interleaved (``capture_overhead.timed``: ``--repeats`` rounds, medians, the process CPU
seconds beside the wall clock): the stock processors; the capture of I2T of every block
(the fused kernel's output and log-sum-exp, only the text key block's scores formed);
the same plus I2I of the middle block pooled to 64 x 64; and, for scale, the naive
capture's extra work alone (every block's full softmax(q k^T / sqrt(d)), head mean, on the
q and k the capture saw), which a naive capture adds to the stock call.

    python benchmarks/diffusers_dit_overhead.py [--models flux,sd3 --size 512 --repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from comfy_env import import_pack  # noqa: E402

PACK = import_pack()

import torch  # noqa: E402

from attnseg_pack.attnseg import AttentionStore  # noqa: E402
from attnseg_pack.attnseg.layers import LayerPick  # noqa: E402
from attnseg_pack.attnseg.plan import CapturePlan  # noqa: E402
from attnseg_pack.hosts.diffusers.dit import capture_dit_attention, describe_transformer  # noqa: E402
from attnseg_pack.hosts.diffusers.passes import flux_image_ids, pack_flux  # noqa: E402
from capture_overhead import timed  # noqa: E402


def build(family: str, args):
    """(transformer, inputs of one call, grid) for ``family`` at ``args.size`` pixels."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    side = args.size // 8
    g = torch.Generator().manual_seed(1)
    if family == "flux":
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=args.double,
                                       num_single_layers=args.single, attention_head_dim=128, num_attention_heads=24,
                                       joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                                       axes_dims_rope=(16, 56, 56)).eval()
        grid = (side // 2, side // 2)
        inputs = dict(hidden_states=pack_flux(torch.randn(1, 16, side, side, generator=g)),
                      encoder_hidden_states=torch.randn(1, args.flux_text, 4096, generator=g),
                      pooled_projections=torch.randn(1, 768, generator=g), timestep=torch.tensor([0.5]),
                      img_ids=flux_image_ids(grid, "cpu", torch.float32), txt_ids=torch.zeros(args.flux_text, 3),
                      guidance=torch.tensor([3.5]), return_dict=False)
        return model, inputs, grid
    model = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=args.joint,
                                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                  caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                  pos_embed_max_size=192).eval()
    inputs = dict(hidden_states=torch.randn(1, 16, side, side, generator=g),
                  encoder_hidden_states=torch.randn(1, args.sd3_text, 4096, generator=g),
                  pooled_projections=torch.randn(1, 2048, generator=g), timestep=torch.tensor([500.0]),
                  return_dict=False)
    return model, inputs, (side // 2, side // 2)


def run_model(family: str, args) -> dict:
    model, inputs, grid = build(family, args)
    info = describe_transformer(model)
    middle = info.layers[len(info.layers) // 2]
    plans = {"I2T of every block": CapturePlan(self_steps=None),
             "+ I2I of the middle block": CapturePlan(self_layers=(LayerPick.dit(middle.block, middle.block_id),))}
    naive_qk = {}

    def stock():
        with torch.no_grad():
            model(**inputs)

    def captured(plan):
        def run():
            store = AttentionStore("", 1, (grid[0] * info.patch_size, grid[1] * info.patch_size), (1, 1), None)
            with torch.no_grad(), capture_dit_attention(model, store, plan, grid, info):
                model(**inputs)
        return run

    def naive():  # every block's full probabilities on the q and k one capture call saw
        for q, k in naive_qk.values():
            with torch.no_grad():
                (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).mean(1)

    # q, k of every block as the capture forms them (one recording call)
    from attnseg_pack.hosts.diffusers import dit as dit_host
    recorded = dit_host.joint_maps_per_reducer

    def recording(q, k, *rest, **kw):
        naive_qk[len(naive_qk)] = (q.detach(), k.detach())
        return recorded(q, k, *rest, **kw)
    dit_host.joint_maps_per_reducer = recording
    try:
        captured(plans["I2T of every block"])()
    finally:
        dit_host.joint_maps_per_reducer = recorded

    cpu: dict = {}
    variants = {"stock": stock, **{name: captured(plan) for name, plan in plans.items()},
                "naive capture's extra work (full softmax of every block)": naive}
    wall = timed({name: _cpu_timed(name, run, cpu) for name, run in variants.items()}, args.repeats)
    return {"family": family, "model": info.model_id, "tokens": (inputs["encoder_hidden_states"].shape[1],
                                                                  grid[0] * grid[1]),
            "wall": wall, "cpu": {name: sorted(v)[len(v) // 2] for name, v in cpu.items()}}


def _cpu_timed(name, run, cpu):
    def measured():
        began = time.process_time()
        run()
        cpu.setdefault(name, []).append(time.process_time() - began)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="flux,sd3")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--flux-text", type=int, default=512)
    parser.add_argument("--joint", type=int, default=2)
    parser.add_argument("--sd3-text", type=int, default=333)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size} px")
    for family in args.models.split(","):
        r = run_model(family.strip(), args)
        text, image = r["tokens"]
        print(f"\n{r['model']}, {text} text + {image} image tokens, one call, medians of {args.repeats}:")
        print("| variant | wall s | CPU s | CPU / stock |\n| --- | --- | --- | --- |")
        for name, seconds in r["wall"].items():
            print(f"| {name} | {seconds:.2f} | {r['cpu'][name]:.2f} | {r['cpu'][name] / r['cpu']['stock']:.3f} |")


if __name__ == "__main__":
    main()
