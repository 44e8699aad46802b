"""The capture math against plain reference attention (pure torch, no ComfyUI)."""

import torch

from attnseg import attention
from attnseg.attention import GridPool, attention_with_maps, fold_repeated_tokens


def reference(q, k, v, heads):
    b, n, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.view(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    probs = (qh @ kh.transpose(-1, -2) / d ** 0.5).softmax(-1)
    return (probs @ vh).transpose(1, 2).reshape(b, n, inner), probs


def test_output_and_head_mean_match_reference(monkeypatch):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 48, 32), torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    # Force several query chunks so the chunk bookkeeping is exercised.
    monkeypatch.setattr("attnseg.attention.CHUNK_ELEMENTS", 2 * 4 * 77 * 5)
    out, maps = attention_with_maps(q, k, v, heads=4)
    ref_out, ref_probs = reference(q, k, v, 4)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps, ref_probs.mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(
        *(t.view(2, t.shape[1], 4, 8).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(2, 48, 32),
        atol=1e-5, rtol=1e-5)


def test_maps_only_when_no_values():
    q, k = torch.randn(1, 16, 16), torch.randn(1, 16, 16)
    out, maps = attention_with_maps(q, k, None, heads=2)
    assert out is None
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 16))


def test_custom_reducer_is_used():
    q, k, v = torch.randn(1, 8, 16), torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    _, maps = attention_with_maps(q, k, v, heads=2, reducer=lambda p, out: p[:, 0])
    torch.testing.assert_close(maps, reference(q, k, v, 2)[1][:, 0])


def test_grid_pool_keeps_rows_stochastic_and_averages_cells():
    torch.manual_seed(1)
    h, w = 8, 12
    q, k = torch.randn(1, h * w, 16), torch.randn(1, h * w, 16)
    pool = GridPool(h, w, max_tokens=24, device=torch.device("cpu"))
    assert pool.grid == (4, 6)
    _, pooled = attention_with_maps(q, k, None, heads=2, pool=pool)
    _, full = attention_with_maps(q, k, None, heads=2)
    torch.testing.assert_close(pooled.sum(-1), torch.ones(1, 24))
    grid = full.view(1, h, w, h, w)
    # query cells average, key cells sum: 2x2 blocks on both axes
    expected = grid.view(1, 4, 2, 6, 2, 4, 2, 6, 2).sum((6, 8)).mean((2, 4)).reshape(1, 24, 24)
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=1e-5)


def test_grid_pool_handles_sizes_that_do_not_divide():
    pool = GridPool(13, 7, max_tokens=30, device=torch.device("cpu"))
    assert pool.size <= 30 and int(pool.counts.sum()) == 13 * 7 and bool((pool.counts > 0).all())


def test_fold_repeated_tokens_restores_the_original_map():
    torch.manual_seed(2)
    q, k = torch.randn(1, 10, 16), torch.randn(1, 77, 16)
    _, single = attention_with_maps(q, k, None, heads=2)
    _, repeated = attention_with_maps(q, k.repeat(1, 3, 1), None, heads=2)
    torch.testing.assert_close(fold_repeated_tokens(repeated, 77), single, atol=1e-6, rtol=1e-5)
    assert fold_repeated_tokens(repeated, None) is repeated
    assert fold_repeated_tokens(single, 77) is single


def test_keep_selects_the_captured_rows_only():
    torch.manual_seed(3)
    q, k, v = torch.randn(4, 12, 16), torch.randn(4, 7, 16), torch.randn(4, 7, 16)
    out_all, maps_all = attention_with_maps(q, k, v, heads=2)
    out_cond, maps_cond = attention_with_maps(q, k, v, heads=2, keep=slice(2, 4))
    torch.testing.assert_close(out_cond, out_all)  # the output still covers the whole batch
    torch.testing.assert_close(maps_cond, maps_all[2:4])


def joint_reference(q, k, rows, keys):
    """Head mean of the full joint softmax, the image rows' block of keys."""
    probs = (q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1).mean(1)
    return probs[:, rows, keys]


def test_fused_kernel_gives_sdpas_output_and_the_rows_log_sum_exp():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
    out, lse = attention.attention_with_lse(q, k, v)
    # the kernel SDPA itself dispatches to without a mask on the CPU: the same bits
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(lse, (q @ k.transpose(-1, -2) / 4).logsumexp(-1), atol=1e-5, rtol=1e-5)


def test_joint_maps_from_the_kernels_log_sum_exp_equal_the_full_softmax(monkeypatch):
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 4, 30, 8) for _ in range(3))
    _, lse = attention.attention_with_lse(q, k, v)
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 1 * 4 * 6 * 4)  # query chunks of 4 rows
    blocks = {"cross": (slice(0, 6), None), "self": (slice(6, 30), None)}
    for lse_given in (lse, None):
        maps = attention.joint_attention_maps(q, k, slice(6, 30), blocks, keep=slice(1, 2), lse=lse_given)
        for name, (keys, _) in blocks.items():
            torch.testing.assert_close(maps[name].double(), joint_reference(q, k, slice(6, 30), keys)[1:2],
                                       atol=1e-6, rtol=0)


def test_a_kernel_whose_log_sum_exp_disagrees_is_never_used(monkeypatch):
    monkeypatch.setattr(attention, "_FUSED_LSE", {})
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    calls = []

    def base_two(q, k, v):  # a kernel returning log2 of the row sums
        calls.append(1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out, (q @ k.transpose(-1, -2) / 8 ** 0.5).logsumexp(-1) / torch.log(torch.tensor(2.0))

    monkeypatch.setattr(attention, "_fused_attention", base_two)
    assert attention.attention_with_lse(q, k, v) is None
    assert attention.attention_with_lse(q, k, v) is None
    assert len(calls) == 1  # refused once, then not asked again


def test_no_fused_kernel_means_none(monkeypatch):
    monkeypatch.setattr(attention, "_FUSED_LSE", {})

    def missing(q, k, v):
        raise NotImplementedError("meta")

    monkeypatch.setattr(attention, "_fused_attention", missing)
    assert attention.attention_with_lse(*(torch.randn(1, 2, 4, 8) for _ in range(3))) is None
