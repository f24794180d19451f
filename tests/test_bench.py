"""Benchmarks (`make bench`): each op beside the baseline a user would otherwise run, in one session, so
`pytest --benchmark-only --benchmark-group-by=group` prints the ratio. Timing never fails a test; the
assertions here only check that op and baseline agree on the value they time."""
import pytest
import torch

import kernels

N, D1, D2 = 10_000, 768, 1_024  # the README's sizes: THINGS-scale images, ViT-B (768) vs ViT-L (1,024) widths


def cka_gram_thingsvision(X, Y):
    """Linear CKA the way thingsvision computes it: n x n linear kernels centred by row/column means."""
    K, L = X @ X.T, Y @ Y.T
    K = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
    L = L - L.mean(0, keepdim=True) - L.mean(1, keepdim=True) + L.mean()
    return (K * L).sum() / (K.norm() * L.norm())


@pytest.fixture(scope="module")
def cka_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D1, generator=g)
    Y = X[:, :64].repeat(1, D2 // 64) + torch.randn(N, D2, generator=g)
    assert kernels._ext()
    exact = kernels.cka_ref(X, Y).item()  # float64 Gram matrices: the value both timed paths should give
    return X, Y, exact


@pytest.mark.benchmark(group="cka n=10000 d=768x1024 float32")
def test_bench_cka_streaming(benchmark, cka_data):
    X, Y, exact = cka_data
    value = benchmark.pedantic(kernels.cka, args=(X, Y), rounds=5, warmup_rounds=1)
    benchmark.extra_info["memory"] = f"O(d^2): {(D1 + D2) ** 2 * 8 / 2**20:.0f} MiB of float64 moments"
    benchmark.extra_info["abs_error_vs_float64_gram"] = abs(value.item() - exact)
    assert abs(value.item() - exact) < 1e-5


@pytest.mark.benchmark(group="cka n=10000 d=768x1024 float32")
def test_bench_cka_gram_baseline(benchmark, cka_data):
    X, Y, exact = cka_data
    value = benchmark.pedantic(cka_gram_thingsvision, args=(X, Y), rounds=2, warmup_rounds=0)
    benchmark.extra_info["memory"] = f"O(n^2): {4 * N * N * 4 / 2**20:.0f} MiB of float32 Gram matrices"
    # float32 sums over n^2 = 1e8 kernel products drift (~1e-2 absolute here): recorded, loosely checked
    benchmark.extra_info["abs_error_vs_float64_gram"] = abs(value.item() - exact)
    assert abs(value.item() - exact) < 0.05
