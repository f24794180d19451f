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


def cka_rbf_gram(X, Y):
    """RBF CKA with whole n x n Gram matrices (median heuristic, as Kornblith et al.'s reference code)."""
    def gram(A):
        D = torch.cdist(A, A) ** 2
        K = torch.exp(-D / (2 * torch.quantile(D.ravel()[:: -(-D.numel() // 2**24)], 0.5)))
        return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
    K, L = gram(X), gram(Y)
    return (K * L).sum() / (K.norm() * L.norm())


@pytest.fixture(scope="module")
def rbf_data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N_RBF, D1, generator=g)
    Y = torch.tanh(X[:, :64]).repeat(1, D2 // 64) + torch.randn(N_RBF, D2, generator=g)
    return X, Y


N_RBF = 5_000  # the Gram baseline's exact median needs a sort of n^2 values: 5,000 keeps it to seconds


@pytest.mark.benchmark(group="rbf cka n=5000 d=768x1024 float32")
def test_bench_cka_rbf_tiles(benchmark, rbf_data):
    X, Y = rbf_data
    value = benchmark.pedantic(kernels.cka, args=(X, Y), kwargs=dict(kernel="rbf"), rounds=3, warmup_rounds=1)
    assert 0 < value.item() < 1


@pytest.mark.benchmark(group="rbf cka n=5000 d=768x1024 float32")
def test_bench_cka_rbf_gram_baseline(benchmark, rbf_data):
    X, Y = rbf_data
    value = benchmark.pedantic(cka_rbf_gram, args=(X, Y), rounds=2, warmup_rounds=0)
    # the baseline takes the median of a strided subsample of the distances: close to, not exactly, ours
    assert abs(value.item() - kernels.cka(X, Y, kernel="rbf").item()) < 0.02


def test_bench_cka_rbf_peak_memory_n40000(benchmark):
    """Peak resident memory of RBF CKA at n = 40,000 (d = 128): O(n + tile^2), where whole Gram matrices
    would need 2 x 40,000^2 x 4 B = 12.8 GB. Measured in a fresh process as VmHWM (/proc/self/status), which
    exec resets, unlike ru_maxrss, which a child inherits from this (large) pytest process."""
    import subprocess, sys  # noqa: E401
    code = ("import torch, kernels\n"
            "hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
            "g = torch.Generator().manual_seed(0)\n"
            "X = torch.randn(40000, 128, generator=g)\n"
            "Y = X[:, :64].repeat(1, 2) + torch.randn(40000, 128, generator=g)\n"
            "kernels._ext(); base = hwm()\n"
            "v = kernels.cka(X, Y, kernel='rbf').item()\n"
            "print(v, base, hwm())\n")
    out = benchmark.pedantic(lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                    check=True).stdout.split(), rounds=1, warmup_rounds=0)
    value, before, peak = float(out[0]), int(out[1]), int(out[2])
    benchmark.extra_info["peak_rss_MiB"] = peak / 1024
    benchmark.extra_info["rss_before_cka_MiB"] = before / 1024
    assert 0 < value < 1 and peak / 1024 < 2048  # far below the 12.8 GB of whole Gram matrices


M_SIM, N_SIM, D_SIM = 16, 10_000, 256  # README sizes for the model-similarity matrix


@pytest.fixture(scope="module")
def zoo():
    g = torch.Generator().manual_seed(2)
    shared = torch.randn(N_SIM, 32, generator=g)
    return [(shared @ torch.randn(32, D_SIM, generator=g) * (m + 1) / M_SIM
             + torch.randn(N_SIM, D_SIM, generator=g)).numpy() for m in range(M_SIM)]


@pytest.mark.benchmark(group="similarity matrix M=16 n=10000 d=256 linear CKA")
def test_bench_similarity_matrix_tiled(benchmark, zoo):
    import geometry
    S = benchmark.pedantic(geometry.similarity_matrices, args=(zoo, ("cka_linear",)), rounds=1, warmup_rounds=0)
    assert S["cka_linear"].shape == (M_SIM, M_SIM)
    assert abs(S["cka_linear"][0, 5] - kernels.cka(torch.from_numpy(zoo[0]), torch.from_numpy(zoo[5])).item()) < 1e-6


@pytest.mark.benchmark(group="similarity matrix M=16 n=10000 d=256 linear CKA")
def test_bench_similarity_matrix_pairwise_gram(benchmark, zoo):
    """The baseline: a loop over model pairs, each computing thingsvision-style Gram-matrix CKA."""
    def pairwise():
        X = [torch.from_numpy(z) for z in zoo]
        S = torch.eye(M_SIM, dtype=torch.float64)
        for a in range(M_SIM):
            for b in range(a + 1, M_SIM):
                S[a, b] = S[b, a] = cka_gram_thingsvision(X[a], X[b])
        return S
    S = benchmark.pedantic(pairwise, rounds=1, warmup_rounds=0)
    assert abs(S[0, 5].item() - kernels.cka(torch.from_numpy(zoo[0]), torch.from_numpy(zoo[5])).item()) < 1e-2
