"""The demo model under ComfyUI's memory modes, on the CPU.

ComfyUI 0.3.75 refuses --lowvram, --novram and --highvram next to --cpu (one
argparse group), and without --cpu it needs a GPU to start. So the modes are
reached in process, where they differ: the budget model management hands a
model's load. --novram always gives 0.1 bytes and --lowvram gives the free VRAM
(less than a model that does not fit): ComfyUI then keeps weights off the device
and casts each layer's weight in its forward (comfy_cast_weights), LoRA patches
applied there. --highvram and normal VRAM load a model that fits completely, as
the CPU always does. A LoRA-like patch on every cross-attention output projection
makes GoCA's output-weighted heads read a weight that exists only inside the
forward in the partial loads (capture.projection_weight)."""

import pytest
import torch

from comfy_env import import_pack

pack = import_pack()
import comfy.model_management  # noqa: E402
from attnseg_pack.attnseg.fusion import diffsegmenter  # noqa: E402
from attnseg_pack.attnseg.masks import make_masks  # noqa: E402
from attnseg_pack.hosts.comfyui import demo_model  # noqa: E402
from attnseg_pack.hosts.comfyui.capture import CapturePlan  # noqa: E402
from attnseg_pack.hosts.comfyui.passes import segment_image  # noqa: E402
from attnseg_pack.hosts.comfyui.text import encode_segmentation_prompt  # noqa: E402
from attnseg_pack.hosts.comfyui.unet import attention_module, describe_unet  # noqa: E402
from demo import evaluate  # noqa: E402

GOCA_CAPTURE = CapturePlan(cross_heads="auto", self_every_layer=True, reference_factor=2)
SCENE_SEED = 6  # two objects, 128 x 192
# The budget each mode's load gets, from the model's size (bytes); None: a full load.
BUDGETS = {"novram": lambda size: 0.1, "lowvram": lambda size: size // 2, "full": None}


@pytest.fixture(scope="module")
def demo():
    model, clip, vae = demo_model.load()
    return with_projection_patches(model), clip, vae


def with_projection_patches(model):
    """A clone whose cross-attention output projections carry a weight diff that
    quadruples head 0's share (as a LoRA would change it)."""
    patched = model.clone()
    patches = {}
    for layer in describe_unet(model).layers:
        projection = attention_module(model, layer, "attn2")
        heads, weight = projection.heads, projection.to_out[0].weight
        diff = torch.zeros_like(weight)
        diff[:, :weight.shape[1] // heads] = 3 * weight[:, :weight.shape[1] // heads]
        key = next(name for name, p in model.model.named_parameters() if p is weight)
        patches[key] = (diff,)
    assert len(patched.add_patches(patches, 1.0)) == len(patches)
    return patched


def run_in_mode(monkeypatch, mode, model, clip, vae):
    """Encode the scene's prompt and segment it (GoCA's capture, DiffSegmenter's
    fusion) with every model load given ``mode``'s budget; also what was loaded how."""
    budget = BUDGETS[mode]
    loads = {}
    original = comfy.model_management.LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        if budget is not None:
            lowvram_model_memory = budget(self.model.model_size())
        real = original(self, lowvram_model_memory, force_patch_weights)
        loads[type(real).__name__] = (real.model_lowvram, real.lowvram_patch_counter)
        return real

    comfy.model_management.unload_all_models()  # every model loads afresh with this mode's budget
    try:
        with monkeypatch.context() as patch:
            patch.setattr(comfy.model_management.LoadedModel, "model_load", model_load)
            item = evaluate.scene(SCENE_SEED)
            positive = encode_segmentation_prompt(clip, item.caption, ", ".join(o.name for o in item.objects))[0]
            image = torch.from_numpy(item.image).float().div(255)[None]
            store = segment_image(model, vae, image, positive, [100], 0, 2 * max(item.image.shape[:2]),
                                  GOCA_CAPTURE)
        return positive[0][0], store, loads
    finally:
        comfy.model_management.unload_all_models()  # no partially loaded model left to later tests

def test_partial_loads_segment_as_a_full_load_with_patched_projections(demo, monkeypatch):
    runs = {mode: run_in_mode(monkeypatch, mode, *demo) for mode in BUDGETS}
    _, _, full_loads = runs["full"]
    assert full_loads["BaseModel"] == (False, 0)  # patches merged into the resident weights
    for mode in ("novram", "lowvram"):
        _, _, loads = runs[mode]
        lowvram, on_the_fly = loads["BaseModel"]
        # Partial: the projection patches are applied inside the forwards, not in the weights.
        assert lowvram and on_the_fly > 0, (mode, loads)
        assert {"SD1ClipModel", "AutoencoderKL"} <= set(loads)  # text encoder and VAE in the mode too
    assert runs["novram"][2]["BaseModel"][1] == len(describe_unet(demo[0]).layers)  # no projection resident
    full_context, full_store, _ = runs["full"]
    full_labels = make_masks(diffsegmenter(full_store), 0.4)[0]
    for mode in ("novram", "lowvram"):
        context, store, _ = runs[mode]
        torch.testing.assert_close(context, full_context)
        assert store.entries.keys() == full_store.entries.keys()
        for entry, maps in store.entries.items():
            torch.testing.assert_close(maps.total, full_store.entries[entry].total, atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{mode} {entry}: {m}")
        labels = make_masks(diffsegmenter(store), 0.4)[0]
        assert torch.equal(labels, full_labels), mode
    assert full_labels.unique().numel() > 2  # both objects and background found

