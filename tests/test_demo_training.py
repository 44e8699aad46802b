"""The demo model's training script, on a budget of seconds: it must run end to
end, write a checkpoint the loader rebuilds, and that model must sample with
ComfyUI's stock nodes. (Quality is the trained checkpoint's job, not this test's.)"""

import json
import subprocess
import sys

import torch

from comfy_env import REPO, import_pack

pack = import_pack()
from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402


def test_training_script_writes_a_checkpoint_the_stock_nodes_can_sample(tmp_path):
    import nodes as comfy_nodes

    out = tmp_path / "shapes.safetensors"
    subprocess.run([sys.executable, str(REPO / "demo" / "train.py"), "--scenes", "32", "--vae-steps", "2",
                    "--minutes", "0.05", "--batch", "4", "--out", str(out)], check=True, capture_output=True)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["training"]["unet_steps"] >= 1 and summary["training"]["final_loss"] > 0
    assert out.stat().st_size < 15 * 2**20
    model, clip, vae = demo_model.load(out)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    latent, = comfy_nodes.KSampler().sample(model, 0, 2, 5.0, "euler", "normal", positive, positive,
                                            {"samples": torch.zeros(1, 4, 16, 20)})
    image = vae.decode(latent["samples"])
    assert image.shape == (1, 128, 160, 3) and bool(torch.isfinite(image).all())


def test_training_resumes_from_a_checkpoint(tmp_path):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    common = [sys.executable, str(REPO / "demo" / "train.py"), "--scenes", "16", "--batch", "4"]
    subprocess.run(common + ["--vae-steps", "2", "--minutes", "0.03", "--out", str(first)], check=True,
                   capture_output=True)
    subprocess.run(common + ["--resume", str(first), "--minutes", "0.03", "--out", str(second)], check=True,
                   capture_output=True)
    before = json.loads(first.with_suffix(".json").read_text())["training"]
    after = json.loads(second.with_suffix(".json").read_text())["training"]
    assert after["unet_steps"] > before["unet_steps"] and after["stages"][0] == before
    assert demo_model.training_info(second)["training"] == after
