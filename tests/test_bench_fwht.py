"""Benchmark (`make bench`): the fwht op beside the pure-torch transform a user would otherwise write (fwht_ref:
log2(D) reshape passes) and the copy floor (one clone of the same bytes; the op reads and writes every element
twice, so ~2x the copy is its memory floor). D = 2^20 and 2^24 (the Fastfood size of a ~10M-parameter model),
batch 1 and a small batch. Timing never fails a test; the assertions check the values agree."""
import pytest
import torch

import kernels

CASES = [(1 << 20, 1), (1 << 20, 8), (1 << 24, 1), (1 << 24, 4)]


@pytest.fixture(scope="module", params=CASES, ids=[f"D=2^{D.bit_length() - 1},batch={B}" for D, B in CASES])
def case(request):
    assert kernels._ext()
    D, B = request.param
    return D, B, torch.randn(B, D, generator=torch.Generator().manual_seed(0))


def _group(D, B):
    return f"fwht D=2^{D.bit_length() - 1} batch={B} float32"


def test_bench_fwht_op(benchmark, case):
    D, B, x = case
    benchmark.group = _group(D, B)
    y = benchmark.pedantic(torch.ops.metalign_ops.fwht, args=(x,), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(D=D, batch=B, MiB=x.numel() * 4 / 2**20)
    # H H = D I: transforming the output again and dividing by D gives the input back
    torch.testing.assert_close(torch.ops.metalign_ops.fwht(y[:1].double()) / D, x[:1].double(), rtol=1e-4, atol=1e-4)


def test_bench_fwht_torch_reference(benchmark, case):
    D, B, x = case
    benchmark.group = _group(D, B)
    y = benchmark.pedantic(kernels.fwht_ref, args=(x,), rounds=2 if D > (1 << 22) else 5, warmup_rounds=0)
    torch.testing.assert_close(y, torch.ops.metalign_ops.fwht(x), rtol=1e-4, atol=1e-2)


def test_bench_fwht_copy_floor(benchmark, case):
    D, B, x = case
    benchmark.group = _group(D, B)
    y = benchmark.pedantic(torch.clone, args=(x,), rounds=5, warmup_rounds=1)
    assert torch.equal(y, x)
