"""The demo model's training script, on a budget of seconds: it must run end to
end, write a checkpoint the loader rebuilds, and that model must sample with
ComfyUI's stock nodes. (Quality is the trained checkpoint's job, not this test's.)"""

import json
import subprocess
import sys

import torch

from comfy_env import REPO, import_pack

pack = import_pack()
import comfy.utils  # noqa: E402
from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402


def test_training_script_writes_a_checkpoint_the_stock_nodes_can_sample(tmp_path):
    import nodes as comfy_nodes

    out = tmp_path / "shapes.safetensors"
    subprocess.run([sys.executable, str(REPO / "demo" / "train.py"), "--scenes", "32", "--vae-steps", "2",
                    "--minutes", "0.05", "--batch", "4", "--validate-every", "0.002", "--validate-scenes", "2",
                    "--out", str(out)], check=True, capture_output=True)
    summary = json.loads(out.with_suffix(".json").read_text())
    training = summary["training"]
    assert training["unet_steps"] >= 1 and training["final_loss"] > 0
    # Validated more than once (periodically and at the end), every cross-attention level scored
    # with each token part; the kept weights are those of a validated step.
    assert len(training["validation"]) >= 2
    assert set(training["validation"][-1]["miou"]) == {"level 0", "level 1"}
    assert all(0 <= v <= 1 for check in training["validation"] for level in check["miou"].values()
               for v in level.values())
    kept = next(check for check in training["validation"] if check["step"] == training["unet_steps"])
    best = max(level["colour + shape"] for check in training["validation"] for level in check["miou"].values())
    assert max(level["colour + shape"] for level in kept["miou"].values()) == best
    assert training["steps_run"] >= training["unet_steps"]
    assert out.stat().st_size < 15 * 2**20
    model, clip, vae = demo_model.load(out)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    latent, = comfy_nodes.KSampler().sample(model, 0, 2, 5.0, "euler", "normal", positive, positive,
                                            {"samples": torch.zeros(1, 4, 16, 20)})
    image = vae.decode(latent["samples"])
    assert image.shape == (1, 128, 160, 3) and bool(torch.isfinite(image).all())


def test_training_resumes_from_a_checkpoint_or_reuses_its_autoencoder(tmp_path):
    first, second, third = (tmp_path / f"{name}.safetensors" for name in ("first", "second", "third"))
    common = [sys.executable, str(REPO / "demo" / "train.py"), "--scenes", "16", "--batch", "4",
              "--validate-every", "0"]
    subprocess.run(common + ["--vae-steps", "2", "--minutes", "0.03", "--out", str(first)], check=True,
                   capture_output=True)
    subprocess.run(common + ["--resume", str(first), "--minutes", "0.03", "--out", str(second)], check=True,
                   capture_output=True)
    before = json.loads(first.with_suffix(".json").read_text())["training"]
    after = json.loads(second.with_suffix(".json").read_text())["training"]
    assert after["unet_steps"] > before["unet_steps"] and after["stages"][0] == before
    assert demo_model.training_info(second)["training"] == after
    subprocess.run(common + ["--vae-from", str(first), "--minutes", "0.03", "--out", str(third)], check=True,
                   capture_output=True)
    reused = comfy.utils.load_torch_file(str(third))
    autoencoder = {k: v for k, v in comfy.utils.load_torch_file(str(first)).items() if k.startswith("vae.")}
    assert autoencoder and all(torch.equal(reused[k], v) for k, v in autoencoder.items())
    assert demo_model.training_info(third)["training"]["vae_from"] == first.name
    # A validated resume scores the weights it starts from (step 0) and may keep them.
    fourth = tmp_path / "fourth.safetensors"
    subprocess.run(common + ["--resume", str(first), "--minutes", "0.03", "--validate-every", "0.01",
                             "--validate-scenes", "2", "--out", str(fourth)], check=True, capture_output=True)
    resumed = json.loads(fourth.with_suffix(".json").read_text())["training"]
    stage = resumed["stages"][-1]
    assert stage["validation"][0]["step"] == 0 and stage["unet_steps"] <= stage["steps_run"]
    assert resumed["unet_steps"] == before["unet_steps"] + stage["unet_steps"]


def test_the_unet_trains_against_a_frozen_text_encoder():
    from demo import train

    model = demo_model.build_unet(demo_model.CONFIG["unet"])
    clip = demo_model.build_clip(demo_model.CONFIG["clip"], dtype=torch.float32)
    train.init_fresh(model.model.diffusion_model)
    train.init_fresh(clip.cond_stage_model)
    text_before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    unet_before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    scenes = [train.make_scene(train.TRAIN_SEED0 + i, 64, 64) for i in range(4)]
    steps, loss, _ = train.unet_stage(model, clip, torch.randn(4, 4, 16, 16), scenes, 0.002, 2, lambda message: None)
    assert steps >= 1 and loss > 0
    text_after, unet_after = clip.cond_stage_model.state_dict(), model.model.diffusion_model.state_dict()
    assert all(torch.equal(v, text_after[k]) for k, v in text_before.items())
    assert not all(torch.equal(v, unet_after[k]) for k, v in unet_before.items())


def test_the_weight_average_follows_early_weights_then_smooths_and_lends_them_for_a_block():
    from demo import train

    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    average = train.WeightAverage(layer, decay=0.9)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average.update()  # first update: decay 1/11, so the average moves most of the way
    assert torch.allclose(average.average[0], torch.full((1, 2), 10 / 11))
    for _ in range(200):
        average.update()
    assert torch.allclose(average.average[0], torch.ones(1, 2), atol=1e-6)
    with torch.no_grad():
        layer.weight.fill_(5.0)
    average.update()  # capped at the configured decay: 10% of the way to 5
    assert torch.allclose(average.average[0], torch.full((1, 2), 1.4))
    with average.applied():
        assert torch.allclose(layer.weight, torch.full((1, 2), 1.4))
    assert torch.equal(layer.weight, torch.full((1, 2), 5.0))
    average.load()
    assert torch.allclose(layer.weight, torch.full((1, 2), 1.4))
