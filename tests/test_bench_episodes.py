"""Benchmark of the fused episode op (`make bench`): B = 1,024 episodes of L = 120 over d = 768 features,
beside the per-episode Python loop a user would otherwise write (vectorised gathers per episode), the
per-item loop of a map-style episode sampler (learn2learn / DataLoader style), and beside a plain copy of the same
output
bytes (the bandwidth floor), in one session, at two pool sizes: 20,000 images (the full world's COCO pool) and
1,281,167 (ImageNet-1k train, a pool the real runs use). The op's sampling is O(L log P) per episode whatever the
pool; the per-episode loop draws its negatives from the complement of the positives, O(pool) per episode.
Timing never fails a test; the assertions check values only."""
import numpy as np
import pytest
import torch

import kernels

D, F, B, L = 768, 1_000, 1_024, 120  # 1,000 SAE-like functions
POOLS = {"coco20k": (20_000, 150, 2_000), "imagenet1k": (1_281_167, 150, 5_000)}  # pool, positives per function


@pytest.fixture(scope="module", params=list(POOLS))
def ep_data(request):
    N, lo, hi = POOLS[request.param]
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g)
    rng = np.random.default_rng(0)
    counts = rng.integers(lo, hi, F)  # positives per function, SAE-like sparsity
    idx = [torch.from_numpy(np.sort(rng.choice(N, c, replace=False))) for c in counts]
    ptr = torch.from_numpy(np.r_[0, np.cumsum(counts)])
    pos_idx = torch.cat(idx)
    pos_val = torch.rand(len(pos_idx), generator=g) + 0.1
    e = torch.empty(0, dtype=torch.int64)
    fns = (ptr, pos_idx, pos_val, e, e, torch.empty(0), torch.rand(F, generator=g) + 0.5)
    assert kernels._ext()
    return request.param, X, fns


def episodes_python_loop(X, fns, n_episodes, length, seed):
    """The per-episode loop: pick a function, draw n_pos, sample positives and negatives (the complement
    of the positives), shuffle, gather, prepend the previous magnitude, stack."""
    ptr, pos_idx, pos_val, _, _, _, scale = fns
    g = torch.Generator().manual_seed(seed)
    n, F = X.shape[0], len(ptr) - 1
    xs, ys, ms = [], [], []
    for _ in range(n_episodes):
        f = int(torch.randint(F, (1,), generator=g))
        P, V = pos_idx[ptr[f]:ptr[f + 1]], pos_val[ptr[f]:ptr[f + 1]] * scale[f]
        n_pos = int(min(max(round(length / 2 + length / 20 * float(torch.randn(1, generator=g))), 0), length))
        pick = torch.randperm(len(P), generator=g)[:n_pos]
        mask = torch.ones(n, dtype=torch.bool)
        mask[P] = False
        neg = mask.nonzero()[:, 0]
        neg = neg[torch.randperm(len(neg), generator=g)[:length - n_pos]]
        rows = torch.cat([P[pick], neg])
        mag = torch.cat([V[pick], torch.zeros(length - n_pos)])
        y = torch.cat([torch.ones(n_pos), torch.zeros(length - n_pos)])
        perm = torch.randperm(length, generator=g)
        rows, mag, y = rows[perm], mag[perm], y[perm]
        prev = torch.cat([torch.zeros(1), mag[:-1]])
        xs.append(torch.cat([prev[:, None], X[rows]], 1))
        ys.append(y)
        ms.append(mag)
    return torch.stack(xs), torch.stack(ys), torch.stack(ms)


def episodes_item_loop(X, fns, n_episodes, length, seed):
    """The loop of a map-style episode sampler (learn2learn's TaskDataset, a torch DataLoader over a task
    sampler): per episode, Python sampling of the item indices, then one dataset __getitem__ per item and a
    collate (torch.stack) of the L items."""
    import random
    ptr, pos_idx, pos_val, _, _, _, scale = fns
    rnd = random.Random(seed)
    n, F = X.shape[0], len(ptr) - 1
    P_all, V_all = pos_idx.tolist(), pos_val.tolist()
    xs, ys, ms = [], [], []
    for _ in range(n_episodes):
        f = rnd.randrange(F)
        P, V = P_all[ptr[f]:ptr[f + 1]], V_all[ptr[f]:ptr[f + 1]]
        n_pos = int(min(max(round(rnd.gauss(length / 2, length / 20)), 0), length))
        pick = rnd.sample(range(len(P)), n_pos)
        pset = set(P)
        neg = []
        while len(neg) < length - n_pos:  # rejection sampling of negatives: rows outside the positives
            r = rnd.randrange(n)
            if r not in pset and r not in neg:
                neg.append(r)
        items = [(P[i], V[i] * float(scale[f]), 1.0) for i in pick] + [(r, 0.0, 0.0) for r in neg]
        rnd.shuffle(items)
        prev, rows_x = 0.0, []
        for r, m, _ in items:  # __getitem__: one feature row, the previous item's magnitude in front
            rows_x.append(torch.cat([torch.tensor([prev]), X[r]]))
            prev = m
        xs.append(torch.stack(rows_x))
        ys.append(torch.tensor([it[2] for it in items]))
        ms.append(torch.tensor([it[1] for it in items]))
    return torch.stack(xs), torch.stack(ys), torch.stack(ms)


def _check(X, fns, x, y, mag):
    assert x.shape == (B, L, D + 1) and y.shape == (B, L)
    assert abs(y.mean().item() - 0.5) < 0.01
    assert torch.equal(x[:, 1:, 0], mag[:, :-1]) and (x[:, 0, 0] == 0).all()
    r = torch.randint(B, (20,))  # rows of x really are rows of X
    assert torch.isin(x[r, :, 1], X[:, 0]).all()


def _group(benchmark, pool):
    benchmark.group = f"episodes B=1024 L=120 d=768 float32, pool {pool}"


@pytest.mark.benchmark(group="episodes")
def test_bench_episodes_op(benchmark, ep_data):
    pool, X, fns = ep_data
    _group(benchmark, pool)
    x, y, mag, fn, rows = benchmark.pedantic(torch.ops.metalign_ops.episodes, args=(X, *fns, B, L, 0),
                                             rounds=10, warmup_rounds=1)
    _check(X, fns, x, y, mag)
    torch.testing.assert_close(x[..., 1:], X[rows], rtol=0, atol=0)
    benchmark.extra_info["output_MiB"] = x.numel() * 4 / 2**20


@pytest.mark.benchmark(group="episodes")
def test_bench_episodes_python_loop(benchmark, ep_data):
    pool, X, fns = ep_data
    _group(benchmark, pool)
    x, y, mag = benchmark.pedantic(episodes_python_loop, args=(X, fns, B, L, 0), rounds=2 if len(X) < 10**6 else 1,
                                   warmup_rounds=0)
    _check(X, fns, x, y, mag)


@pytest.mark.benchmark(group="episodes")
def test_bench_episodes_item_loop(benchmark, ep_data):
    pool, X, fns = ep_data
    _group(benchmark, pool)
    x, y, mag = benchmark.pedantic(episodes_item_loop, args=(X, fns, B, L, 0), rounds=1, warmup_rounds=0)
    _check(X, fns, x, y, mag)


@pytest.mark.benchmark(group="episodes")
def test_bench_episodes_copy_floor(benchmark, ep_data):
    """A plain copy of the same output bytes (B, L, 1 + d) float32 into a fresh tensor: the bandwidth floor.
    make bench sets THP_MEM_ALLOC_ENABLE=1, so this copy, the loops and the op all get huge pages."""
    pool, _, _ = ep_data
    _group(benchmark, pool)
    src = torch.randn(B, L, D + 1)
    out = benchmark.pedantic(lambda: torch.empty_like(src).copy_(src), rounds=10, warmup_rounds=1)
    assert torch.equal(out, src)
