"""Benchmark (`make bench`): the fused SAE top-k encode beside the plain matmul floor and the torch reference
a user would write, at the issue's sizes. Timing never fails a test; assertions only check values agree."""
import pytest
import torch

import kernels

N, D, L, K = 26_107, 768, 12_288, 64  # THINGS-size image count, ViT-B width, 16x latents, k = 64
GROUP = f"topk_encode n={N} d={D} n_latents={L} k={K} float32"


@pytest.fixture(scope="module")
def sae_data():
    assert kernels._ext()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    W = torch.randn(D, L, generator=g) / D ** 0.5
    b = torch.randn(L, generator=g) * 0.1
    b_pre = torch.randn(D, generator=g) * 0.1
    return x, W, b, b_pre


def torch_reference(x, W, b, k, b_pre):
    """What a user would write: relu(x @ W + b).topk(k), materialising the (n, n_latents) matrix."""
    return torch.relu((x - b_pre) @ W + b).topk(k, dim=1)


@pytest.mark.benchmark(group=GROUP)
def test_bench_topk_encode_fused(benchmark, sae_data):
    x, W, b, bp = sae_data
    v, i = benchmark.pedantic(torch.ops.metalign_ops.topk_encode, args=(x, W, b, K, bp), rounds=3, warmup_rounds=0)
    benchmark.extra_info["memory"] = f"O(n k + tile): outputs {N * K * 12 / 2**20:.0f} MiB + 1 MiB tile per thread"
    rv, ri = torch_reference(x[:500], W, b, K, bp)
    torch.testing.assert_close(v[:500], rv, rtol=1e-4, atol=1e-4)


@pytest.mark.benchmark(group=GROUP)
def test_bench_topk_encode_matmul_floor(benchmark, sae_data):
    x, W, b, bp = sae_data
    out = benchmark.pedantic(torch.mm, args=(x, W), rounds=3, warmup_rounds=0)
    benchmark.extra_info["memory"] = f"O(n n_latents): {N * L * 4 / 2**20:.0f} MiB"
    assert out.shape == (N, L)


@pytest.mark.benchmark(group=GROUP)
def test_bench_topk_encode_torch_reference(benchmark, sae_data):
    x, W, b, bp = sae_data
    v, i = benchmark.pedantic(torch_reference, args=(x, W, b, K, bp), rounds=3, warmup_rounds=0)
    benchmark.extra_info["memory"] = f"O(n n_latents): {2 * N * L * 4 / 2**20:.0f} MiB"
    assert v.shape == (N, K)
