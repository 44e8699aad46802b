"""S-CFG on the shipped DiT demo model (Flux layout, T5 without BOS): the words
foreground rule, read from the single blocks, holds the objects the model draws.
Its foreground is where the caption's words outweigh the other tokens; a capture
that splits text and image at the wrong offset or reads the wrong T5 pieces puts it
anywhere, and it then holds the objects' pixels at about its own share of the latent
(as the released rule run by position does, measured in the README)."""

import pytest
import torch

from comfy_env import import_pack

pack = import_pack()
from attnseg_pack.hosts.comfyui import demo_dit  # noqa: E402
from attnseg_pack.hosts.comfyui import scfg as scfg_host  # noqa: E402
from demo import evaluate  # noqa: E402

CAPTIONS = 8
CFG = 4.0
# On these captions the foreground holds 0.71 of the drawn objects' pixels in 0.52 of the latent.
MARGIN = 0.12


@pytest.fixture(scope="module")
def demo():
    return demo_dit.load()


def test_the_words_rule_foreground_holds_the_drawn_objects(demo, monkeypatch):
    model, clip, vae = demo
    masks = []
    rule = scfg_host.foreground_mask
    monkeypatch.setattr(scfg_host, "foreground_mask", lambda *a, **k: masks.append(rule(*a, **k)) or masks[-1])
    patched, = pack.NODE_CLASS_MAPPINGS["AttnSegSCFG"]().patch(
        model, 0.8, 3.0, 3, 0.0, 1.0, "custom", scfg_host.WORDS_CHOICE, dit_blocks="single *")
    inside, shares = [], []
    for index, seed in enumerate(evaluate.TEST_SEEDS[:CAPTIONS]):
        caption = evaluate.scene(seed).caption
        masks.clear()
        image, _ = evaluate.generate(patched, clip, vae, caption, index, cfg=CFG, dit=True)
        assert len(masks) == 20  # every step found a foreground pair
        foreground = torch.stack(masks).float().mean(0)[0]
        held = evaluate.share_inside(image, caption, foreground)
        if held is not None:
            inside.append(held)
            shares.append(float(foreground.mean()))
    assert len(inside) >= CAPTIONS // 2
    assert 0.1 < sum(shares) / len(shares) < 0.9  # neither everything nor nothing
    assert sum(inside) / len(inside) > sum(shares) / len(shares) + MARGIN
