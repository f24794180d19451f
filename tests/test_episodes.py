"""The fused episode op: torch.ops.metalign_ops.episodes (and its CUDA-grid emulation) against
kernels.episodes_ref (same RNG contract, so outputs match exactly), invariants, distributions, bad input; each op
test on every device of the `device` fixture."""
import numpy as np
import pytest
import torch

import kernels
from models import functions_from_codes, functions_from_neurons

OPS = torch.ops.metalign_ops
E = torch.empty(0, dtype=torch.int64)


@pytest.fixture(scope="module", autouse=True)
def ext():
    assert kernels._ext(), "extension failed to build (run with KERNELS_REQUIRE=1 to see why)"


def _functions(n, F, density, seed=0, explicit_neg=False, val_dtype=torch.float32):
    """Random CSR functions: each row positive with prob `density`; explicit negatives get signed values."""
    g = torch.Generator().manual_seed(seed)
    ptr, idx, val, nptr, nidx, nval = [0], [], [], [0], [], []
    for _ in range(F):
        m = torch.rand(n, generator=g) < density
        p, q = m.nonzero()[:, 0], (~m).nonzero()[:, 0]
        idx.append(p)
        val.append(torch.rand(len(p), generator=g) + 0.1)
        ptr.append(ptr[-1] + len(p))
        nidx.append(q)
        nval.append(-torch.rand(len(q), generator=g))
        nptr.append(nptr[-1] + len(q))
    scale = torch.rand(F, generator=g) + 0.5
    pos = (torch.tensor(ptr), torch.cat(idx), torch.cat(val).to(val_dtype))
    neg = ((torch.tensor(nptr), torch.cat(nidx), torch.cat(nval).to(val_dtype)) if explicit_neg
           else (E, E, torch.empty(0, dtype=val_dtype)))
    return (*pos, *neg, scale.to(val_dtype))


def _on(device, fns):
    return tuple(t.to(device) for t in fns)


def _assert_same(a, b):
    for name, u, v in zip(["x", "y", "mag", "fn", "rows"], a, b):
        assert u.shape == v.shape and u.dtype == v.dtype and u.device == v.device, (name, u.shape, v.shape, u.dtype,
                                                                                   v.dtype, u.device, v.device)
        assert torch.equal(u, v), f"{name}: max diff {(u.double() - v.double()).abs().max().item()}"


@pytest.mark.parametrize("n,d,F,L,B", [(40, 1, 1, 1, 1), (301, 7, 5, 13, 37), (1000, 129, 3, 120, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("explicit_neg", [False, True])
def test_episodes_matches_ref(n, d, F, L, B, dtype, explicit_neg, device):
    X = torch.randn(n, d, dtype=dtype, device=device)
    fns = _on(device, _functions(n, F, 0.35, seed=n + F, explicit_neg=explicit_neg))
    got = OPS.episodes(X, *fns, B, L, 12345)
    _assert_same(got, kernels.episodes_ref(X, *fns, B, L, 12345))
    _assert_same(kernels.episodes(X, *fns, B, L, 12345), got)


def test_episodes_noncontiguous_half_and_negative_seed(device):
    X = torch.randn(64, 200, device=device)[:, ::3]  # (64, 67), column stride 3
    fns = _on(device, _functions(64, 4, 0.5, seed=1))
    _assert_same(OPS.episodes(X, *fns, 11, 17, -7), kernels.episodes_ref(X, *fns, 11, 17, -7))
    Xh = X.T.contiguous().T.half()  # column-major, float16 features and outputs
    _assert_same(OPS.episodes(Xh, *fns, 11, 17, 3), kernels.episodes_ref(Xh, *fns, 11, 17, 3))
    fns64 = _on(device, _functions(64, 4, 0.5, seed=1, explicit_neg=True, val_dtype=torch.float64))
    _assert_same(OPS.episodes(X, *fns64, 5, 9, 0), kernels.episodes_ref(X, *fns64, 5, 9, 0))


@pytest.mark.parametrize("threads", [1, 32, 256])
def test_episodes_grid(threads):
    """The CUDA launch grid run on the CPU with the same __host__ __device__ functions."""
    X = torch.randn(257, 33)
    for explicit in (False, True):
        fns = _functions(257, 6, 0.4, seed=threads, explicit_neg=explicit)
        _assert_same(OPS.episodes_grid(X, *fns, 19, 31, 99, threads), kernels.episodes_ref(X, *fns, 19, 31, 99))


def test_episodes_first_slices_the_seed_stream():
    """first = k: episode b of the output is episode k + b of the seed's stream, so DDP ranks that each build
    their own slice (first = rank * B / N) together build exactly the global batch one process builds."""
    X = torch.randn(301, 9)
    for explicit in (False, True):
        fns = _functions(301, 5, 0.4, seed=3, explicit_neg=explicit)
        whole = OPS.episodes(X, *fns, 24, 17, 77)
        parts = [OPS.episodes(X, *fns, 8, 17, 77, first=k) for k in (0, 8, 16)]
        _assert_same(whole, [torch.cat([p[i] for p in parts]) for i in range(5)])
        _assert_same(OPS.episodes(X, *fns, 5, 17, 77, first=13), kernels.episodes_ref(X, *fns, 5, 17, 77, first=13))
        _assert_same(OPS.episodes_grid(X, *fns, 5, 17, 77, 32, first=13), [t[13:18] for t in whole])
    with pytest.raises(RuntimeError, match="first .index of the first episode. must be >= 0, got -1"):
        OPS.episodes(X, *fns, 5, 17, 77, first=-1)
    with pytest.raises(ValueError, match="first .index of the first episode. must be >= 0, got -1"):
        kernels.episodes_ref(X, *fns, 5, 17, 77, first=-1)


def test_episodes_invariants_and_determinism(device):
    n, d, F, L, B = 500, 10, 7, 40, 300
    X = torch.randn(n, d)
    pp, pi, pv, _, _, _, sc = fns = _functions(n, F, 0.3, seed=5)
    x, y, mag, fn, rows = (t.cpu() for t in OPS.episodes(X.to(device), *_on(device, fns), B, L, 7))
    torch.testing.assert_close(x[..., 1:], X[rows], rtol=0, atol=0)  # exact gathers
    assert (x[:, 0, 0] == 0).all() and torch.equal(x[:, 1:, 0], mag[:, :-1])  # previous item's magnitude
    for b in range(B):
        f = int(fn[b])
        P = pi[pp[f]:pp[f + 1]]
        assert len(set(rows[b].tolist())) == L  # without replacement
        member = torch.isin(rows[b], P)
        assert torch.equal(member.float(), y[b])
        vals = {int(r): float(v) for r, v in zip(P, pv[pp[f]:pp[f + 1]])}
        want = torch.tensor([vals.get(int(r), 0.0) * float(sc[f]) for r in rows[b]])
        torch.testing.assert_close(mag[b], want)
    # same seed -> same batch whatever the thread count; another seed -> another batch
    nt = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.episodes(X, *fns, B, L, 7)
    finally:
        torch.set_num_threads(nt)
    _assert_same(one, (x, y, mag, fn, rows))
    assert not torch.equal(OPS.episodes(X, *fns, B, L, 8)[4], rows)


def test_episodes_distributions(device):
    """n_pos ~ round(N(L/2, L/20)), functions uniform, positives and negatives uniform within a function."""
    n, F, L, B = 400, 5, 60, 20000
    X = torch.zeros(n, 1, device=device)
    fns = _on(device, _functions(n, F, 0.4, seed=2))
    _, y, _, fn, rows = (t.cpu() for t in OPS.episodes(X, *fns, B, L, 2024))
    npos = y.sum(1).double()
    assert abs(npos.mean().item() - L / 2) < 0.05
    assert abs(npos.std().item() - L / 20) < 0.1  # 3.0, +- rounding (var + 1/12)
    counts = torch.bincount(fn, minlength=F).double()
    assert (counts - B / F).abs().max() < 5 * (B / F) ** 0.5
    f0 = fn == 0  # row frequencies within function 0: each positive drawn ~ equally often, same for negatives
    r, yy = rows[f0], y[f0]
    for label in (1.0, 0.0):
        c = torch.bincount(r[yy == label], minlength=n).double()
        c = c[c > 0]
        assert c.std() / c.mean() < 0.2, label
    # position of positives is uniform over t (the shuffle)
    pos_rate = y.mean(0)
    assert (pos_rate - 0.5).abs().max() < 0.03


def test_episodes_from_world_codes(world, device):
    """Functions from the world's h codes (top-3 as SAE codes): every positive really has its dim active."""
    import h5py
    with h5py.File(world["truth"]) as f:
        codes = f["coco/codes"][...]
    idx = np.argsort(-codes, 1)[:, :3]
    val = np.take_along_axis(codes, idx, 1).astype(np.float16)
    fns = functions_from_codes(idx, val, min_nonzero=120)
    assert len(fns["latents"]) >= 8
    X = torch.randn(codes.shape[0], 5)
    keys = ["pos_ptr", "pos_idx", "pos_val", "neg_ptr", "neg_idx", "neg_val", "mag_scale"]
    x, y, mag, fn, rows = (t.cpu() for t in OPS.episodes(X.to(device), *[fns[k].to(device) for k in keys], 64, 50, 0))
    lat = fns["latents"][fn]  # (B,) h dim of each episode
    r = rows.numpy()
    in_topk = torch.from_numpy(((idx[r] == lat.numpy()[:, None, None]) & (val[r] > 0)).any(-1))  # (B, L)
    assert torch.equal(in_topk.float(), y)
    neur = functions_from_neurons(X.numpy())
    assert len(neur["latents"]) == 5 and neur["neg_ptr"].numel() == 6
    x2, y2, mag2, _, _ = OPS.episodes(X.to(device), *[neur[k].to(device) for k in keys], 32, 50, 0)
    assert ((mag2 > 0) == (y2 > 0)).all()  # signed distance from the median: positive exactly for positives


def test_episodes_bad_input(device):
    """Bad CSR contents are caught on every device (on CUDA by the validation kernel), with the CPU messages."""
    X = torch.randn(50, 3, device=device)
    pp, pi, pv, np_, ni, nv, sc = _on(device, _functions(50, 2, 0.3, seed=0))
    with pytest.raises(RuntimeError, match="function 0 has [0-9]+ positives, fewer than the episode length L = 40"):
        OPS.episodes(X, pp, pi, pv, np_, ni, nv, sc, 4, 40, 0)
    with pytest.raises(RuntimeError, match="function 0 has [0-9]+ negatives \\(rows not positive\\)"):
        OPS.episodes(X, *_on(device, _functions(50, 2, 0.95, seed=0)), 4, 10, 0)
    with pytest.raises(RuntimeError, match="pos_idx of function 0 must be strictly increasing row indices in \\[0, 50"):
        OPS.episodes(X, pp, pi.flip(0), pv, np_, ni, nv, sc, 4, 5, 0)
    bad = pi.clone()
    bad[-1] = 50  # one row past the end, in the last function
    with pytest.raises(RuntimeError, match="pos_idx of function 1 must be strictly increasing row indices"):
        OPS.episodes(X, pp, bad, pv, np_, ni, nv, sc, 4, 5, 0)
    with pytest.raises(RuntimeError, match="mag_scale must be 1-D of length 2"):
        OPS.episodes(X, pp, pi, pv, np_, ni, nv, sc[:1], 4, 5, 0)
    with pytest.raises(RuntimeError, match="pos_ptr must start at 0 and end at [0-9]+ \\(the length of pos_idx\\), "
                                           "got 1 .. "):
        OPS.episodes(X, pp + 1, pi, pv, np_, ni, nv, sc, 4, 5, 0)
    dec = pp.clone()
    dec[1] = dec[2] + 1
    with pytest.raises(RuntimeError, match="pos_ptr must be non-decreasing \\(function 1\\)"):
        OPS.episodes(X, dec, pi, pv, np_, ni, nv, sc, 4, 5, 0)
    with pytest.raises(RuntimeError, match="features must be 2-D"):
        OPS.episodes(X[0], pp, pi, pv, np_, ni, nv, sc, 4, 5, 0)
    epp, epi, epv, enp, eni, env, esc = _on(device, _functions(50, 2, 0.3, seed=0, explicit_neg=True))
    eni = eni.clone()
    eni[0] = -1
    with pytest.raises(RuntimeError, match="neg_idx of function 0 must be strictly increasing row indices"):
        OPS.episodes(X, epp, epi, epv, enp, eni, env, esc, 4, 5, 0)
    with pytest.raises(ValueError, match="no latent is active on >= 120"):
        functions_from_codes(np.zeros((10, 2), np.int64), np.ones((10, 2), np.float32))
