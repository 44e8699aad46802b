"""Attention capture on a diffusers DiT: ``FluxTransformer2DModel`` (Flux.1 and models
of its layout) and ``SD3Transformer2DModel`` (SD3/SD3.5), filling the same store as
the ComfyUI host's DiT capture (hosts/comfyui/dit.py) with the same keys.

Blocks are named as the ComfyUI host names them: Flux's ``double`` blocks (diffusers'
``transformer_blocks``) and ``single`` blocks (``single_transformer_blocks``), SD3's
``joint`` blocks; the factor is the patch size in latent pixels (Flux's pipeline packs
2x2 latent patches before the transformer, whose own patch size is then 1).

A captured block's processor forms q and k as the stock processor does (projections,
RMS norms, Flux's RoPE) and hands them to the core, which returns the probabilities of
the image queries over the text keys (I2T, "cross") and over the image keys (I2I,
"self"), normalised over the whole joint sequence. Where the block's processor is
diffusers' stock one, the same q, k, v make the block's output through torch's fused
kernel, asked for each row's log-sum-exp, so the core forms only the key blocks it
keeps; any other processor is chained and still makes the output. Flux's joint
sequence is [text, image], SD3's [image, text]. :func:`capture_dit_attention`
restores every processor on exit."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from ...attnseg import AttentionStore, AttnSegError, LayerKey
from ...attnseg.attention import GridPool, attention_with_lse, chosen_heads_mean, joint_maps_per_reducer
from ...attnseg.layers import DiTInfo
from ...attnseg.plan import CapturePlan
from ...attnseg.prompt_weights import KeyScale
from .capture import (BranchRows, CallState, StepOf, forwarding_signature, all_cond, begin_call, pre_hook,
                      restored)
from .unet import DiffusersLayer

FLUX_PACK = 2  # Flux's pipeline packs 2x2 latent patches into one token
# A joint attention processor's inputs, in the order Flux's attention passes them.
CALL_INPUTS = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")


@dataclass(frozen=True)
class DiffusersDiTInfo(DiTInfo):
    """A DiT's layout with each block's joint attention module."""

    modules: dict = field(default_factory=dict, compare=False, hash=False)

    def attention(self, layer: DiffusersLayer):
        return self.modules[layer]


# The DiT classes the host captures, and the family each is.
FAMILIES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}


def is_dit(transformer) -> bool:
    return type(transformer).__name__ in FAMILIES


def describe_transformer(transformer, input_name: str = "pipe") -> DiffusersDiTInfo:
    """The layout of a FluxTransformer2DModel or SD3Transformer2DModel."""
    name = type(transformer).__name__
    config = transformer.config
    layers, modules = [], {}

    def add(block: str, index: int, module, path: str, factor: int) -> None:
        layer = DiffusersLayer(block, index, 0, factor, path)
        layers.append(layer)
        modules[layer] = module.attn

    if name == "FluxTransformer2DModel":
        for i, block in enumerate(transformer.transformer_blocks):
            add("double", i, block, f"transformer_blocks.{i}", FLUX_PACK)
        for i, block in enumerate(transformer.single_transformer_blocks):
            add("single", i, block, f"single_transformer_blocks.{i}", FLUX_PACK)
        double, single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
        return DiffusersDiTInfo("flux", f"{name} (Flux, {double} double + {single} single blocks)",
                                config.joint_attention_dim, tuple(layers), config.num_attention_heads, FLUX_PACK,
                                config.in_channels // FLUX_PACK ** 2, modules=modules)
    if name == "SD3Transformer2DModel":
        for i, block in enumerate(transformer.transformer_blocks):
            add("joint", i, block, f"transformer_blocks.{i}", config.patch_size)
        return DiffusersDiTInfo("sd3", f"{name} (MMDiT, {len(layers)} joint blocks)", config.joint_attention_dim,
                                tuple(layers), config.num_attention_heads, config.patch_size, config.in_channels,
                                modules=modules)
    raise AttnSegError(f"{input_name}: its transformer is a {name}; the diffusers host captures "
                       f"FluxTransformer2DModel and SD3Transformer2DModel.")


def _native_backend() -> bool:
    """Whether diffusers' global attention backend is torch's own SDPA (the default; a
    user may pick flash or sage with ``attention_backend`` / DIFFUSERS_ATTN_BACKEND)."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        backend = _AttentionBackendRegistry._active_backend  # an AttentionBackendName, or the name set
        return str(getattr(backend, "value", backend)) == "native"
    except ImportError:  # a diffusers without the dispatcher: its processors call SDPA
        return True


def _stock(family: str, processor) -> bool:
    """Whether ``processor`` is diffusers' default one on the default attention backend,
    unsharded, whose output the capture then makes itself (else it is chained)."""
    if family == "flux":
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
        return (type(processor) is FluxAttnProcessor and getattr(processor, "_attention_backend", None) is None
                and getattr(processor, "_parallel_config", None) is None and _native_backend())
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    return type(processor) is JointAttnProcessor2_0


def _heads(attn, x: torch.Tensor, projection, norm=None) -> torch.Tensor:
    """(B, L, inner) -> (B, L, heads, d), normed per head where the block norms."""
    t = projection(x).unflatten(-1, (attn.heads, -1))
    return norm(t) if norm is not None else t


def flux_qkv(attn, hidden: torch.Tensor, encoder: torch.Tensor | None, rotary):
    """q, k, v (B, heads, L, d) of a Flux block over [text, image] (a single block gets
    the joint sequence as ``hidden``, a double block the two streams apart)."""
    q, k, v = _heads(attn, hidden, attn.to_q, attn.norm_q), _heads(attn, hidden, attn.to_k, attn.norm_k), \
        _heads(attn, hidden, attn.to_v)
    if encoder is not None:
        q = torch.cat([_heads(attn, encoder, attn.add_q_proj, attn.norm_added_q), q], dim=1)
        k = torch.cat([_heads(attn, encoder, attn.add_k_proj, attn.norm_added_k), k], dim=1)
        v = torch.cat([_heads(attn, encoder, attn.add_v_proj), v], dim=1)
    if rotary is not None:
        from diffusers.models.embeddings import apply_rotary_emb
        q, k = (apply_rotary_emb(t, rotary, sequence_dim=1) for t in (q, k))
    return (t.transpose(1, 2) for t in (q, k, v))


def flux_output(attn, out: torch.Tensor, encoder: torch.Tensor | None):
    """The stock processor's return value from the attention output (B, L, inner)."""
    if encoder is None:
        return out
    text, image = out[:, :encoder.shape[1]], out[:, encoder.shape[1]:]
    return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())


def sd3_qkv(attn, hidden: torch.Tensor, encoder: torch.Tensor | None, rotary=None):
    """q, k, v (B, heads, L, d) of an SD3 joint block over [image, text]."""
    q, k, v = _heads(attn, hidden, attn.to_q, attn.norm_q), _heads(attn, hidden, attn.to_k, attn.norm_k), \
        _heads(attn, hidden, attn.to_v)
    if encoder is not None:
        q = torch.cat([q, _heads(attn, encoder, attn.add_q_proj, attn.norm_added_q)], dim=1)
        k = torch.cat([k, _heads(attn, encoder, attn.add_k_proj, attn.norm_added_k)], dim=1)
        v = torch.cat([v, _heads(attn, encoder, attn.add_v_proj)], dim=1)
    return (t.transpose(1, 2) for t in (q, k, v))


def sd3_output(attn, out: torch.Tensor, encoder: torch.Tensor | None, image_tokens: int):
    image, text = out[:, :image_tokens], out[:, image_tokens:]
    image = attn.to_out[1](attn.to_out[0](image))
    if encoder is None:
        return image
    return image, (text if attn.context_pre_only else attn.to_add_out(text))


@dataclass
class DiTCallState(CallState):
    """What the pre-hook learnt about the running transformer call."""

    text: int = 0  # text tokens in the joint sequence


class DiTCaptureProcessor:
    """The processor of one joint block: records the kinds ``plan`` selects for it, the
    attention output where it is GoCA's reference, and scales the cond rows' class keys
    for Cat-Cross on the keys."""

    def __init__(self, previous, info: DiffusersDiTInfo, layer: DiffusersLayer, kinds: set, reference: bool,
                 state: DiTCallState, store: AttentionStore, plan: CapturePlan, picked: dict,
                 key_scale: KeyScale | None, grid: tuple[int, int], pools: dict):
        self.previous, self.info, self.layer, self.kinds, self.reference = previous, info, layer, kinds, reference
        self.state, self.store, self.plan, self.picked, self.key_scale = state, store, plan, picked, key_scale
        self.grid, self.pools = grid, pools
        self.stock = _stock(info.family, previous)
        self.reducers = {kind: chosen_heads_mean(heads) for kind, heads in picked.items()}
        self.key_weights: dict[tuple, torch.Tensor] = {}

    def __call__(self, attn, *args, **kwargs):
        state = self.state
        kinds = [kind for kind in ("cross", "self") if kind in self.kinds and state.flags[kind]] if state.rows else []
        wants_output = self.reference and state.flags["self"] and bool(state.rows)
        if not kinds and not wants_output and self.key_scale is None:
            return self.previous(attn, *args, **kwargs)
        # Flux's attention passes these positionally, SD3's by name; a chained processor gets them as they came.
        given = {**dict(zip(CALL_INPUTS, args)), **{k: v for k, v in kwargs.items() if k in CALL_INPUTS}}
        hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb = (given.get(n) for n in CALL_INPUTS)
        if attention_mask is not None:
            raise AttnSegError(f"pipe: {self.layer.path} was called with an attention mask, which the capture does "
                               f"not reproduce; run the pipeline without one.")
        gh, gw = self.grid
        image_tokens = gh * gw
        flux = self.info.family == "flux"
        q, k, v = (flux_qkv if flux else sd3_qkv)(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        length = q.shape[2]
        if length != state.text + image_tokens:
            raise AttnSegError(f"pipe: {self.layer.path} attends over {length} tokens, not the {state.text} text + "
                               f"{gh}x{gw} image tokens of this call (a latent of another size?).")
        text = slice(0, state.text) if flux else slice(image_tokens, length)
        image = slice(state.text, length) if flux else slice(0, image_tokens)
        if self.key_scale is not None:
            k = k * self._weights(k, text)
        out = lse = None
        if self.stock or wants_output:
            fused = attention_with_lse(q, k, v) if kinds else None
            out, lse = fused if fused is not None else (F.scaled_dot_product_attention(q, k, v), None)
            out = out.transpose(1, 2).flatten(2).to(q.dtype)
        if kinds:
            self._record(kinds, q, k, text, image, lse)
        if wants_output:
            key = LayerKey.dit("query", self.layer.block, self.layer.block_id, self.info.patch_size)
            for branch, part in state.rows:
                self.store.add(key, branch, self.grid, out[part, image])
        if not self.stock:
            return self.previous(attn, *args, **kwargs)
        return flux_output(attn, out, encoder_hidden_states) if flux else sd3_output(attn, out,
                                                                                       encoder_hidden_states,
                                                                                       image_tokens)

    def _record(self, kinds: list, q, k, text: slice, image: slice, lse) -> None:
        rows = self.state.rows
        blocks = {}
        if "cross" in kinds:
            blocks["cross"] = (text, None)
        if "self" in kinds:
            blocks["self"] = (image, self._pool(q.device))
        keep = rows[0][1] if len(rows) == 1 else slice(None)
        maps = joint_maps_per_reducer(q, k, image, blocks, self.reducers, keep, None, lse)
        for kind, block_maps in maps.items():
            key = LayerKey.dit(kind, self.layer.block, self.layer.block_id, self.info.patch_size)
            grid = blocks[kind][1].grid if kind == "self" else self.grid
            heads = len(self.picked.get(kind, ())) or self.info.heads
            for branch, part in rows:
                self.store.add(key, branch, grid, block_maps if len(rows) == 1 else block_maps[part], heads)

    def _weights(self, k: torch.Tensor, text: slice) -> torch.Tensor:
        """(B, 1, L, 1) key weights: the class tokens of the cond rows scaled, 1 elsewhere."""
        rows = self.state.cond_rows
        cache_key = (k.shape[0], k.shape[2], text.start, rows.start, rows.stop, k.device, k.dtype)
        if cache_key not in self.key_weights:
            weights = torch.ones(k.shape[0], 1, k.shape[2], 1, device=k.device, dtype=k.dtype)
            count = text.stop - text.start
            weights[rows, 0, text, 0] = self.key_scale.weights(count, k.device, k.dtype)
            self.key_weights[cache_key] = weights
        return self.key_weights[cache_key]

    def _pool(self, device) -> GridPool:
        key = (self.grid, device)
        if key not in self.pools:
            self.pools[key] = GridPool(*self.grid, self.plan.self_max_tokens, device)
        return self.pools[key]


def dit_head_counter(info: DiTInfo):
    return lambda layer, kind: info.heads


@contextlib.contextmanager
def capture_dit_attention(transformer, store: AttentionStore, plan: CapturePlan, grid: tuple[int, int],
                          info: DiffusersDiTInfo | None = None, step_of: StepOf | None = None,
                          branch_rows: BranchRows = all_cond,
                          key_scale: KeyScale | None = None) -> Iterator[DiffusersDiTInfo]:
    """Inside the block, calls of ``transformer`` on a ``grid`` (rows, columns) of image
    tokens fill ``store`` as ``plan`` says; on exit every block has its processor back.
    ``step_of(timestep)`` places a call in the steps (the timestep as the transformer
    receives it), ``branch_rows(batch)`` names each branch's rows."""
    info = info or describe_transformer(transformer)
    plan.check_dit_heads(info)
    plan.check(info, dit_head_counter(info))
    store.head_reduction = plan.cross_heads
    store.architecture, store.family = "dit", info.family
    selected = {kind: set(plan.layers(info, kind)) for kind in ("cross", "self")}
    chosen = plan.heads(info, dit_head_counter(info))
    reference = plan.reference_layer(info)
    state = DiTCallState()
    pools: dict = {}
    installed = []
    with restored(installed):
        for layer in info.layers:
            kinds = {kind for kind in ("cross", "self") if layer in selected[kind]}
            if not kinds and layer != reference and key_scale is None:
                continue
            attn = info.attention(layer)
            previous = attn.processor
            if key_scale is not None and not _stock(info.family, previous):
                raise AttnSegError(f"preset: Cat-Cross on the keys re-weights {layer.path}'s attention, whose "
                                   f"processor is {type(previous).__name__}; use Cat-Cross on the embedding, or the "
                                   f"pipeline without that processor.")
            picked = {kind: chosen[(layer, kind)] for kind in kinds if chosen.get((layer, kind))}
            processor_class = forwarding_signature(DiTCaptureProcessor, previous)
            processor = processor_class(previous, info, layer, kinds, layer == reference, state, store, plan,
                                        picked, key_scale, grid, pools)
            installed.append((attn, previous))
            attn.set_processor(processor)

        def before_call(module, args, kwargs):
            sample = args[0] if args else kwargs["hidden_states"]
            encoder = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
            timestep = kwargs.get("timestep", args[3] if len(args) > 3 else None)
            state.text = encoder.shape[1]
            begin_call(state, plan, store, timestep, sample.shape[0], step_of, branch_rows)
            if kwargs.get("skip_layers"):  # SD3's skip-layer guidance: a perturbed extra call, not a branch
                state.rows = []

        with pre_hook(transformer, before_call):
            yield info
