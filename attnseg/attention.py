"""Attention that also returns its probabilities, reduced over heads as it goes.

Fast kernels (SDPA, xformers, sub-quadratic) never expose the softmax, so a
captured layer computes softmax(Q K^T / sqrt(d)) itself, in query chunks, and
uses the same probabilities for its output: no second attention pass, and no
(heads x N x N) tensor ever exists."""

from __future__ import annotations

import math
from typing import Callable

import torch

# (probs (B, heads, n, T), head outputs probs @ V (B, heads, n, d) or None) -> (B, n, T)
HeadReducer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

# Largest score block held at once, in fp32 elements (128 MiB).
CHUNK_ELEMENTS = 1 << 25


def head_mean(probs: torch.Tensor, head_out: torch.Tensor | None = None) -> torch.Tensor:
    return probs.mean(dim=1)


def chosen_heads_mean(heads: tuple[int, ...]) -> HeadReducer:
    """The mean of some heads only (iSeg's hand-picked heads), selected inside the
    hook so the other heads' maps are never kept. The index tensor is made once
    per device, not on every call."""
    indices: dict[torch.device, torch.Tensor] = {}

    def reduce(probs: torch.Tensor, head_out: torch.Tensor | None = None) -> torch.Tensor:
        index = indices.get(probs.device)
        if index is None:
            index = indices[probs.device] = torch.tensor(heads, device=probs.device)
        return probs.index_select(1, index).mean(dim=1)

    return reduce


class GridPool:
    """Average-pools an (h, w) token grid to at most ``max_tokens`` cells.

    Each token belongs to one cell (floor mapping, so any h, w works). Pooling
    the key axis sums the cells (rows stay stochastic); pooling the query axis
    averages them."""

    def __init__(self, h: int, w: int, max_tokens: int, device: torch.device):
        factor = max(1, math.ceil(math.sqrt(h * w / max_tokens)))
        while math.ceil(h / factor) * math.ceil(w / factor) > max_tokens:
            factor += 1
        self.grid = (math.ceil(h / factor), math.ceil(w / factor))
        rows = torch.arange(h, device=device) // factor
        cols = torch.arange(w, device=device) // factor
        self.cells = (rows[:, None] * self.grid[1] + cols[None, :]).reshape(-1)
        self.size = self.grid[0] * self.grid[1]
        self.counts = torch.bincount(self.cells, minlength=self.size)
        self.identity = factor == 1

    def pool_keys(self, maps: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return maps
        out = maps.new_zeros(*maps.shape[:-1], self.size)
        return out.index_add_(-1, self.cells, maps)


def attention_with_maps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, heads: int,
                        reducer: HeadReducer = head_mean, pool: GridPool | None = None,
                        keep: slice = slice(None)):
    """Multi-head attention on (B, L, heads*d) tensors.

    Returns (out, maps): ``out`` as the host's attention would return it
    ((B, Nq, heads*d), None when ``v`` is None), ``maps`` the head-reduced
    probabilities (B', Nq, Tk) in fp32 of the batch rows ``keep`` selects (the
    branch being captured); with ``pool`` both the query and key axes are
    pooled to ``pool.grid``. The reducer sees each chunk's per-head outputs
    (before the output projection) when ``v`` is given."""
    batch, n_q, inner = q.shape
    dim = inner // heads
    n_k = k.shape[1]
    scale = dim ** -0.5
    qh = q.view(batch, n_q, heads, dim).transpose(1, 2)
    kh = k.view(batch, n_k, heads, dim).transpose(1, 2).float()
    vh = v.view(batch, n_k, heads, dim).transpose(1, 2) if v is not None else None

    out = torch.empty_like(qh) if vh is not None else None
    pooled = pool is not None and not pool.identity
    n_cols = pool.size if pooled else n_k
    kept = len(range(batch)[keep])
    maps = q.new_zeros((kept, pool.size if pooled else n_q, n_cols), dtype=torch.float32)
    step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * n_k))
    for start in range(0, n_q, step):
        stop = min(n_q, start + step)
        probs = torch.matmul(qh[:, :, start:stop].float(), kh.transpose(-1, -2)).mul_(scale).softmax(dim=-1)
        head_out = None
        if out is not None:
            out[:, :, start:stop] = torch.matmul(probs.to(vh.dtype), vh)
            head_out = out[keep, :, start:stop]
        reduced = reducer(probs[keep], head_out)
        if pooled:
            maps.index_add_(1, pool.cells[start:stop], pool.pool_keys(reduced))
        else:
            maps[:, start:stop] = reduced
    if pooled:
        maps /= pool.counts.to(maps.dtype)[None, :, None]
    if out is not None:
        out = out.transpose(1, 2).reshape(batch, n_q, inner)
    return out, maps


def fold_repeated_tokens(maps: torch.Tensor, token_count: int | None) -> torch.Tensor:
    """Undo the host's repetition of a short context to a common length.

    A context repeated r times splits each token's probability into r equal
    copies; summing the copies restores the map of the original sequence."""
    total = maps.shape[-1]
    if not token_count or total == token_count or total % token_count:
        return maps
    return maps.unflatten(-1, (total // token_count, token_count)).sum(dim=-2)


def joint_attention_maps(q: torch.Tensor, k: torch.Tensor, query_rows: slice,
                         key_blocks: dict[str, tuple[slice, GridPool | None]],
                         reducer: HeadReducer = head_mean, keep: slice = slice(None),
                         mask: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Blocks of a joint attention softmax without the attention itself.

    ``q``, ``k``: (B, heads, L, d), positional encoding already applied. For the
    queries ``query_rows`` (contiguous) and each named key block (its key slice, and a pool
    for both axes or None), returns the head-reduced probabilities (B', n, n_k)
    in fp32 of the batch rows ``keep``, normalised over *all* keys: each block
    is exp(q . k_block - lse), with lse each row's log-sum-exp over every key.
    ``lse`` (B, heads, L), when the kernel that made the block's output returned
    it, saves the pass over all keys: only the key blocks' scores are formed.
    Without it the row sums come from the scores over every key, in query
    chunks. The host's kernel still makes the output, so no value product and no
    (heads x L x L) tensor is ever formed here. ``mask`` is the host's attention
    mask (boolean: True = attend; else added to the scores), broadcastable to
    (B, heads, L, L); it is only read on the path without ``lse``."""
    batch, heads, _, dim = q.shape
    n_k = k.shape[2]
    rows = range(q.shape[2])[query_rows]
    kf = k[keep].float().transpose(-1, -2)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        mask = mask[keep] if mask.shape[0] == batch else mask
    kept = kf.shape[0]
    maps = {}
    for name, (keys, pool) in key_blocks.items():
        n_cols = len(range(n_k)[keys])
        if pool is not None and not pool.identity:
            maps[name] = q.new_zeros((kept, pool.size, pool.size), dtype=torch.float32)
        else:
            maps[name] = q.new_zeros((kept, len(rows), n_cols), dtype=torch.float32)
    widest = max(len(range(n_k)[keys]) for keys, _ in key_blocks.values()) if lse is not None else n_k
    step = max(1, CHUNK_ELEMENTS // max(1, kept * heads * widest))
    for start in range(0, len(rows), step):
        stop = min(len(rows), start + step)
        chunk = slice(rows.start + start, rows.start + stop)
        q_chunk = q[keep, :, chunk].float()
        if lse is not None:
            row_lse = lse[keep, :, chunk, None]
            blocks = {name: torch.matmul(q_chunk, kf[..., keys]).mul_(dim ** -0.5).sub_(row_lse).exp_()
                      for name, (keys, _) in key_blocks.items()}
        else:
            scores = torch.matmul(q_chunk, kf).mul_(dim ** -0.5)
            if mask is not None:
                part = mask[:, :, chunk] if mask.shape[2] > 1 else mask
                scores = scores.masked_fill(~part, float("-inf")) if part.dtype == torch.bool else scores + part
            # softmax in place: the row sums divide only the key blocks that are kept
            scores = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
            totals = scores.sum(dim=-1, keepdim=True)
            blocks = {name: scores[..., keys] / totals for name, (keys, _) in key_blocks.items()}
        for name, (_, pool) in key_blocks.items():
            reduced = reducer(blocks[name], None)
            if pool is not None and not pool.identity:
                maps[name].index_add_(1, pool.cells[start:stop], pool.pool_keys(reduced))
            else:
                maps[name][:, start:stop] = reduced
    for name, (_, pool) in key_blocks.items():
        if pool is not None and not pool.identity:
            maps[name] /= pool.counts.to(torch.float32)[None, :, None]
    return maps


# (device type, dtype, head dim) -> whether the fused kernel's log-sum-exp was checked and agreed
_FUSED_LSE: dict[tuple, bool] = {}


def joint_maps_per_reducer(q: torch.Tensor, k: torch.Tensor, query_rows: slice,
                           key_blocks: dict[str, tuple[slice, GridPool | None]], reducers: dict[str, HeadReducer],
                           keep: slice = slice(None), mask: torch.Tensor | None = None,
                           lse: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``joint_attention_maps`` with each key block reduced over heads by its own reducer
    (``reducers[name]``, the head mean where absent): one pass over the keys per distinct
    reducer, usually one."""
    groups: dict[HeadReducer, list[str]] = {}
    for name in key_blocks:
        groups.setdefault(reducers.get(name, head_mean), []).append(name)
    maps = {}
    for reducer, names in groups.items():
        maps.update(joint_attention_maps(q, k, query_rows, {name: key_blocks[name] for name in names}, reducer,
                                         keep, mask, lse))
    return maps


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's fused attention kernels that return the softmax's log-sum-exp beside the
    output: the ones scaled_dot_product_attention dispatches to without a mask."""
    ops = torch.ops.aten
    if q.device.type == "cpu":
        out, lse = ops._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
        return out, lse
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16):
            try:
                out, lse = ops._scaled_dot_product_flash_attention(q, k, v)[:2]
                return out, lse
            except RuntimeError:  # head size or GPU the flash kernel does not take
                pass
        out, lse = ops._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out, lse[..., :q.shape[2]]  # some torch versions pad the rows to a multiple of 32
    raise NotImplementedError(q.device.type)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(out, lse) of softmax attention on (B, heads, L, d) tensors from a fused kernel, or
    None where this device, dtype or shape has none (the caller then uses its own kernel).

    The first use per device type, dtype and head size compares the kernel's
    log-sum-exp with one computed directly on a few rows (one device sync, once per
    process): a kernel whose log-sum-exp means something else is never used."""
    key = (q.device.type, q.dtype, q.shape[-1])
    if _FUSED_LSE.get(key) is False:
        return None
    try:
        out, lse = _fused_attention(q, k, v)
    except (RuntimeError, NotImplementedError):
        _FUSED_LSE[key] = False
        return None
    if lse.shape != q.shape[:3]:
        _FUSED_LSE[key] = False
        return None
    if key not in _FUSED_LSE:
        rows = q[:1, :, :8].float() @ k[:1].float().transpose(-1, -2) * q.shape[-1] ** -0.5
        tolerance = 1e-4 if q.dtype in (torch.float32, torch.float64) else 2e-2
        _FUSED_LSE[key] = bool(torch.allclose(rows.logsumexp(-1), lse[:1, :, :8].float(), atol=tolerance,
                                              rtol=tolerance))
        if not _FUSED_LSE[key]:
            return None
    return out, lse
