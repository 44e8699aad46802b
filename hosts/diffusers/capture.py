"""Attention capture on a diffusers UNet: processors that fill an
:class:`~attnseg.AttentionStore` as the ComfyUI host's patches do.

Only the layers a plan selects get a capture processor (and, for Cat-Cross on
the keys, every cross-attention layer gets a key-scaling one); all others keep
the processor they had. A captured layer computes softmax(Q K^T / sqrt(d))
itself in query chunks (attnseg core), reduced over heads inside the processor.
Where the layer's processor was diffusers' stock one, the same probabilities
make the layer's output (no second attention pass); any other processor (an
IP-Adapter's, a user's) is chained: it still computes the output, the capture
only reads the maps. :func:`capture_attention` restores every processor on exit.

A forward pre-hook on the UNet reads each call's latent size, timestep and
batch layout once per call, so the processors never sync."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ...attnseg import AttentionStore, AttnSegError, LayerKey
from ...attnseg.attention import GridPool, attention_with_maps, chosen_heads_mean, head_mean
from ...attnseg.goca import output_weighted_heads
from ...attnseg.prompt_weights import KeyScale
from ...attnseg.plan import CapturePlan
from .unet import DiffusersLayer, DiffusersUNetInfo, describe_unet, grid_at


@dataclass
class CallState:
    """What the pre-hook learnt about the running UNet call."""

    latent_size: tuple[int, int] = (0, 0)
    flags: dict = field(default_factory=lambda: {"cross": False, "self": False})
    rows: list = field(default_factory=list)  # [(branch, slice)] of the captured branches
    cond_rows: slice = field(default_factory=lambda: slice(None))  # the cond branch's rows (for key scaling)


def _stock_processors() -> tuple[type, ...]:
    """diffusers' default processors, whose output a capture processor computes itself."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    return AttnProcessor, AttnProcessor2_0


def _check_plain(attn, layer: DiffusersLayer, kind: str) -> None:
    """The capture computes plain scaled dot-product attention: refuse a layer that adds
    norms or rescaling on the way (no SD UNet does), rather than record other maps."""
    head_dim = attn.to_q.out_features // attn.heads
    extras = [name for name in ("spatial_norm", "group_norm", "norm_q", "norm_k") if getattr(attn, name, None)]
    if attn.residual_connection or attn.rescale_output_factor != 1.0 or abs(attn.scale - head_dim ** -0.5) > 1e-9:
        extras.append("residual / rescaled / custom-scaled attention")
    if extras:
        raise AttnSegError(f"pipe: the {kind}-attention of {layer.path} has {', '.join(extras)}, which the capture "
                           f"does not reproduce; this UNet is not one of SD1.x, SD2.x, SDXL.")


def forwarding_signature(cls: type, previous) -> type:
    """A subclass of ``cls`` whose ``__call__`` announces ``previous``'s parameters:
    diffusers' Attention drops the cross_attention_kwargs a processor's signature
    does not name, so a chained processor must still receive its own (an
    IP-Adapter's ``scale``, ``ip_adapter_masks``)."""
    params = list(inspect.signature(previous.__call__).parameters.values())

    def __call__(self, *args, **kwargs):
        return cls.__call__(self, *args, **kwargs)

    __call__.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
                                               + params)
    return type(cls.__name__, (cls,), {"__call__": __call__})


class CaptureProcessor:
    """The processor of one captured attention (or, with ``kind`` None, a layer that only
    scales its keys for Cat-Cross)."""

    def __init__(self, previous, layer: DiffusersLayer, kind: str | None, state: CallState, store: AttentionStore,
                 plan: CapturePlan, heads: tuple[int, ...] | None, stores_queries: bool,
                 key_scale: KeyScale | None, pools: dict):
        self.previous = previous
        self.stock = type(previous) in _stock_processors()  # a subclass may change the output: chain it
        self.layer, self.kind, self.state, self.store, self.plan = layer, kind, state, store, plan
        self.key = LayerKey(kind, layer.block, layer.block_id, layer.depth, layer.factor) if kind else None
        self.query_key = LayerKey("query", layer.block, layer.block_id, layer.depth, layer.factor)
        self.reducer = head_mean if heads is None else chosen_heads_mean(heads)
        self.stored_heads = len(heads) if heads else None
        self.output_weighted = kind == "cross" and plan.cross_heads == "auto" and heads is None
        self.stores_queries = stores_queries
        self.key_scale = key_scale
        self.pools = pools
        self.key_weights: dict[tuple, torch.Tensor] = {}

    def __call__(self, attn, hidden_states, *args, **kwargs):
        state = self.state
        capturing = self.kind is not None and state.flags[self.kind] and state.rows
        if not capturing and self.key_scale is None:
            return self.previous(attn, hidden_states, *args, **kwargs)
        encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (args[0] if args else None)
        mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)
        if mask is not None or hidden_states.ndim != 3:
            raise AttnSegError(f"pipe: {self.layer.path} was called with an attention mask or image-shaped input, "
                               f"which the capture does not reproduce; run it without an encoder attention mask.")
        # An IP-Adapter passes (text, image embeddings): the text part has its own softmax.
        text = encoder[0] if isinstance(encoder, tuple) else encoder
        context = hidden_states if text is None else text
        if text is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        if self.key_scale is not None and text is not None:
            k = k * self._weights(k)
        v = attn.to_v(context) if self.stock or self.output_weighted else None
        if not capturing:
            return attn.to_out[1](attn.to_out[0](_attention(q, k, v, attn.heads)))
        grid = grid_at(state.latent_size, self.layer.factor)
        if grid[0] * grid[1] != q.shape[1]:
            raise AttnSegError(f"pipe: {self.layer.path} sees {q.shape[1]} tokens, not the {grid[0]}x{grid[1]} grid "
                               f"of a {state.latent_size[1]}x{state.latent_size[0]} latent at 1/{self.layer.factor}.")
        pool = self._pool(grid, q.device) if self.kind == "self" else None
        rows = state.rows
        keep = rows[0][1] if len(rows) == 1 else slice(None)
        reducer = output_weighted_heads(attn.to_out[0].weight) if self.output_weighted else self.reducer
        out, maps = attention_with_maps(q, k, v, attn.heads, reducer, pool, keep)
        stored_grid = pool.grid if pool is not None else grid
        for branch, part in rows:
            branch_maps = maps if len(rows) == 1 else maps[part]
            self.store.add(self.key, branch, stored_grid, branch_maps, self.stored_heads or attn.heads)
            if self.stores_queries and state.flags["self"]:  # the same steps as the self-attention
                self.store.add(self.query_key, branch, grid, q[part])
        if self.stock:
            return attn.to_out[1](attn.to_out[0](out))
        return self.previous(attn, hidden_states, *args, **kwargs)

    def _weights(self, k: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, 1) key weights: gamma at the class positions of the cond rows."""
        rows = self.state.cond_rows
        cache_key = (k.shape[0], k.shape[1], rows.start, rows.stop, k.device, k.dtype)
        if cache_key not in self.key_weights:
            weights = torch.ones(k.shape[0], k.shape[1], 1, device=k.device, dtype=k.dtype)
            positions = [p for p in self.key_scale.positions if p < k.shape[1]]
            weights[rows, positions] = self.key_scale.gamma
            self.key_weights[cache_key] = weights
        return self.key_weights[cache_key]

    def _pool(self, grid: tuple[int, int], device) -> GridPool:
        key = (grid, device)
        if key not in self.pools:
            self.pools[key] = GridPool(*grid, self.plan.self_max_tokens, device)
        return self.pools[key]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The stock processor's attention on (B, L, heads * d) tensors, for a layer that only scales keys."""
    batch, length, inner = q.shape
    split = lambda t: t.view(batch, -1, heads, inner // heads).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(batch, length, inner)


# (step, total steps) of a UNet call from its timestep; None: every call is step 0 of 1.
StepOf = Callable[[torch.Tensor], tuple[int, int]]
# The batch rows of each branch for a batch of this many rows: [(branch, slice)].
BranchRows = Callable[[int], list]


def all_cond(batch: int) -> list:
    return [("cond", slice(0, batch))]


def head_counter(info: DiffusersUNetInfo):
    """How many heads a layer's attention has (a plan's ``head_count``)."""
    return lambda layer, kind: info.attention(layer, kind).heads


def begin_call(state: CallState, plan: CapturePlan, store: AttentionStore, timestep, batch: int,
               step_of: StepOf | None, branch_rows: BranchRows) -> None:
    """What one denoiser call records, set by the pre-hook before its first attention:
    the kinds its step captures, the rows of each captured branch, the cond rows."""
    step, total = step_of(timestep) if step_of is not None else (0, 1)
    state.flags = {"cross": plan.cross_steps is not None and plan.cross_steps.contains(step, total),
                   "self": plan.self_steps is not None and plan.self_steps.contains(step, total)}
    layout = branch_rows(batch)
    state.rows = [(branch, rows) for branch, rows in layout if branch in plan.branches]
    state.cond_rows = dict(layout).get("cond", slice(0, 0))
    if state.flags["cross"] or state.flags["self"]:
        store.steps.add(step)


@contextlib.contextmanager
def restored(installed: list) -> Iterator[None]:
    """On exit, an exception included, every (attention, processor) in ``installed`` gets that processor back."""
    try:
        yield
    finally:
        for attn, previous in reversed(installed):
            attn.set_processor(previous)


@contextlib.contextmanager
def pre_hook(module, before_call) -> Iterator[None]:
    hook = module.register_forward_pre_hook(before_call, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


@contextlib.contextmanager
def capture_attention(unet, store: AttentionStore, plan: CapturePlan, info: DiffusersUNetInfo | None = None,
                      step_of: StepOf | None = None, branch_rows: BranchRows = all_cond,
                      key_scale: KeyScale | None = None) -> Iterator[DiffusersUNetInfo]:
    """Inside the block, calls of ``unet`` fill ``store`` as ``plan`` says; on exit every
    attention has its processor back (the same objects) and the hook is removed.

    ``branch_rows(batch)`` names the rows of each branch in a call (diffusers' guided
    batch is [uncond, cond]); ``step_of`` places a call in the pipeline's steps."""
    info = info or describe_unet(unet)
    plan.check(info, head_counter(info))
    store.head_reduction = plan.cross_heads
    state = CallState()
    picked = plan.heads(info, head_counter(info))
    reference = plan.reference_layer(info)
    selected = {kind: plan.layers(info, kind) for kind in ("cross", "self")}
    pools: dict = {}
    installed = []
    with restored(installed):
        for layer in info.layers:
            for kind in ("cross", "self"):
                scaled = key_scale is not None and kind == "cross"
                if layer not in selected[kind] and not scaled:
                    continue
                attn = info.attention(layer, kind)
                _check_plain(attn, layer, kind)
                previous = attn.processor
                if scaled and type(previous) not in _stock_processors():
                    raise AttnSegError(f"preset: Cat-Cross on the keys re-weights {layer.path}'s attention, whose "
                                       f"processor is {type(previous).__name__}; use a preset with Cat-Cross on "
                                       f"the embedding, or the pipeline without that processor.")
                processor_class = forwarding_signature(CaptureProcessor, previous)
                processor = processor_class(previous, layer, kind if layer in selected[kind] else None, state, store,
                                            plan, picked.get((layer, kind)), kind == "cross" and layer == reference,
                                            key_scale if scaled else None, pools)
                installed.append((attn, previous))
                attn.set_processor(processor)

        def before_call(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            state.latent_size = tuple(sample.shape[-2:])
            begin_call(state, plan, store, timestep, sample.shape[0], step_of, branch_rows)

        with pre_hook(unet, before_call):
            yield info
