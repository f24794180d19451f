"""One-shot GPU check, sized for a short loan of one GPU (at most --budget seconds, 8 minutes by default, the
extension build included): build csrc/ with CUDA, run the CUDA tests, time every op on the GPU against a GPU
baseline measured in the same run, run `make demo` on cuda, and write a few small files under --out.

    make gpu-wheels                  # where pip reaches PyPI: the pure-Python packages a bare GPU machine lacks,
                                     # as wheels in wheels/ (python gpu_check.py --wheels)
    make gpu-check PY=python3        # on the GPU machine (torch with CUDA, nvcc; no venv, no network): installs
                                     # wheels/ into .cache/gpu-site with pip --no-index, then the steps below
    python gpu_check.py --dry-run    # anywhere: prints the plan, checks its files, and runs the benchmark code
                                     # on the CPU at tiny sizes (no build, no tests, no demo) -> runs/gpu-dry-run

Steps, each with a time limit, in this order (later ones get what is left of the budget):
    build  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=<this GPU> python setup.py build_ext --inplace; kernels.py report
    tests  KERNELS_REQUIRE=1 python -m pytest tests -k cuda (every op test's cuda case) -> tests.log
    bench  each op against its GPU baseline, CUDA events, medians (a subprocess) -> bench.json
    demo   make demo DEVICE=cuda, only if `python train.py --help` offers --device -> demo.log, demo_report.md
Writes to --out (runs/gpu): report.md, bench.json, build.log, tests.log, demo.log, demo_report.md. Without a GPU
it stops at once (exit 3) and says so.
"""
import importlib.metadata
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# ----------------------------------------------------------------------------------------------- defaults
defaults = dict(
    out="runs/gpu",          # folder of the (at most 8) result files
    budget=480,              # seconds for everything, the build included
    dry_run=False,           # print and check the plan, run the benchmark code on the CPU at tiny sizes
    wheels=False,            # download the wheels the GPU machine lacks into --wheel-dir, then stop
    wheel_dir="wheels",      # where make gpu-wheels puts them and make gpu-check installs them from
    bench_only=False,        # (internal) run the benchmarks in this process and write --out/bench.json
    device="cuda",           # (internal) the benchmarks' device: cuda, or cpu for --dry-run
)
# Packages that tests and make demo import and the GPU image lacks (torch, numpy, scipy, h5py, pandas, sklearn,
# timm, pytest, pytest-benchmark are there), with what they need in turn that it lacks too. Versions: this venv's.
WHEELS = ["himalaya", "schedulefree", "tables", "numexpr", "blosc2", "ndindex", "pydantic", "pydantic-core",
          "annotated-types", "typing-inspection", "groupBMC", "rsatoolbox", "open_clip_torch", "ftfy", "wcwidth"]
GPU_PYTHON = "3.12"  # the GPU image's python3
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]
SITE = ROOT / ".cache" / "gpu-site"
BUDGET_SHARE = {"build": 0.40, "tests": 0.25, "bench": 0.20}  # of the budget; the demo gets what is left
# the most time ours may take per unit of the baseline's (the GPU targets; CKA: never slower); fwht has none
TARGETS = {"episodes": 1.5, "topk_encode": 1.15, "ridge_cv": 1 / 5, "cka_linear": 1.0, "cka_rbf": 1.0}


def log(msg):
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- wheels
def download_wheels(wheel_dir):
    """pip download, no dependencies, binary wheels for the GPU image's Python and x86-64 Linux, one version each
    (this environment's, so both machines run the same code)."""
    Path(wheel_dir).mkdir(parents=True, exist_ok=True)
    for name in WHEELS:
        try:
            spec = f"{name}=={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            spec = name
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               GPU_PYTHON, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
               "-d", str(wheel_dir), spec]
        log(" ".join(cmd[3:]))
        subprocess.run(cmd, check=True)
    log(f"{len(list(Path(wheel_dir).glob('*.whl')))} wheels in {wheel_dir}")


def install_wheels(wheel_dir):
    """The wheels of packages this Python lacks, into SITE (pip --no-index --no-deps --target): nothing is fetched
    and nothing installed beside the image's own packages. Returns the installed file names."""
    missing = []
    for whl in sorted(Path(wheel_dir).glob("*.whl")):
        dist = whl.name.split("-")[0]
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(whl)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(SITE), *map(str, missing)], check=True)
    return [w.name for w in missing]


# ----------------------------------------------------------------------------------------------- benchmarks
def _timer(device, tiny=False):
    import torch

    def run(fn, reps=5, warmup=1):
        """Median milliseconds of fn() over reps calls after warmup (CUDA events on a GPU); one call when tiny
        (the dry run checks the code, not the speed)."""
        reps, warmup = (1, 0) if tiny else (reps, warmup)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
        return sorted(times)[len(times) // 2]
    return run


def table_row(op, sizes, ours_ms, baseline, base_ms, check, note=""):
    ratio = ours_ms / base_ms if base_ms > 0 else float("nan")
    target = TARGETS.get(op.split(" ")[0])
    return dict(op=op, sizes=sizes, ours_ms=round(ours_ms, 4), baseline=baseline, baseline_ms=round(base_ms, 4),
                ratio=round(ratio, 4), target=target, meets_target=None if target is None else bool(ratio <= target),
                value_check=bool(check), note=note)


def bench_episodes(dev, timeit, tiny):
    """Fused episodes vs a device-to-device copy of the same output bytes; values equal to the CPU op's."""
    import torch
    import kernels
    N, D, F, B, L = (500, 16, 20, 32, 12) if tiny else (1_281_167, 768, 1_000, 1_024, 120)
    g = torch.Generator().manual_seed(0)
    hi = 6 * L if tiny else 5_000
    # sorted distinct positives per function (randint + unique: a few hundred draws short of the count at most)
    idx = [torch.randint(N, (int(c),), generator=g).unique() for c in torch.randint(2 * L, hi, (F,), generator=g)]
    ptr = torch.tensor([0] + [len(i) for i in idx]).cumsum(0)
    e = torch.empty(0, dtype=torch.int64)
    fns = (ptr, torch.cat(idx), torch.rand(int(ptr[-1]), generator=g) + 0.1, e, e, torch.empty(0),
           torch.rand(F, generator=g) + 0.5)
    X = torch.randn(N, D, device=dev)  # made on the device: a billion host draws would take seconds
    fd = tuple(t.to(dev) for t in fns)
    out = kernels.episodes(X, *fd, B, L, 0)
    ref = kernels.episodes_ref(X, *fns, 8, L, 0)  # the oracle on the first 8 episodes (each independent of B)
    check = all(torch.equal(a[:8], b) for a, b in zip(out, ref))
    src = torch.empty_like(out[0]).normal_()
    dst = torch.empty_like(src)
    ours = timeit(lambda: kernels.episodes(X, *fd, B, L, 0))
    base = timeit(lambda: dst.copy_(src))
    return table_row("episodes", f"B={B} L={L} d={D} pool={N} F={F}", ours, "device-to-device copy of the output", base,
                check)


def bench_topk(dev, timeit, tiny):
    """Fused top-k encode vs the plain matmul x @ W (cuBLAS on a GPU; TF32 off, as torch's default)."""
    import torch
    import kernels
    n, d, L, k = (300, 32, 512, 8) if tiny else (26_107, 768, 12_288, 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(dev)
    W = (torch.randn(d, L, generator=g) / d ** 0.5).to(dev)
    b = (torch.randn(L, generator=g) * 0.1).to(dev)
    v, i = kernels.topk_encode(x, W, b, k)
    rv, _ = torch.relu(x[:200] @ W + b).topk(k, dim=1)
    check = bool(torch.allclose(v[:200], rv, rtol=1e-4, atol=1e-4))
    ours = timeit(lambda: kernels.topk_encode(x, W, b, k), reps=3)
    base = timeit(lambda: x @ W, reps=3)
    ref = timeit(lambda: torch.relu(x @ W + b).topk(k, dim=1), reps=3)
    return table_row("topk_encode", f"n={n} d={d} n_latents={L} k={k}", ours, "x @ W (the matmul floor)", base, check,
                note=f"relu(x @ W + b).topk(k): {ref:.3f} ms")


def cka_gram(X, Y):
    """Linear CKA with whole n x n Gram matrices centred by row/column means (thingsvision), on X's device."""
    K, L = X @ X.T, Y @ Y.T
    K = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
    L = L - L.mean(0, keepdim=True) - L.mean(1, keepdim=True) + L.mean()
    return (K * L).sum() / (K.norm() * L.norm())


def cka_rbf_gram(X, Y):
    """RBF CKA with whole Gram matrices, the median heuristic by torch.quantile on a strided sample of at most
    2^24 squared distances, on X's device."""
    import torch

    def gram(A):
        D = torch.cdist(A, A) ** 2
        K = torch.exp(-D / (2 * torch.quantile(D.ravel()[:: -(-D.numel() // 2 ** 24)], 0.5)))
        return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
    K, L = gram(X), gram(Y)
    return (K * L).sum() / (K.norm() * L.norm())


def bench_cka(dev, timeit, tiny):
    import torch
    import kernels
    rows = []
    for kernel, n in (("linear", 300 if tiny else 10_000), ("rbf", 200 if tiny else 5_000)):
        d1, d2 = (16, 24) if tiny else (768, 1_024)
        g = torch.Generator().manual_seed(1)
        X = torch.randn(n, d1, generator=g).to(dev)
        Y = (torch.tanh(X[:, :8]).repeat(1, d2 // 8) + torch.randn(n, d2, generator=g).to(dev))
        base_fn = cka_gram if kernel == "linear" else cka_rbf_gram
        ours_v = kernels.cka(X, Y, kernel=kernel).item()
        exact = kernels.cka_ref(X[:300].cpu(), Y[:300].cpu(), kernel=kernel).item()
        sub = kernels.cka(X[:300], Y[:300], kernel=kernel).item()
        check = abs(sub - exact) < 1e-6 and abs(ours_v - base_fn(X, Y).item()) < (1e-3 if kernel == "linear" else 2e-2)
        ours = timeit(lambda: kernels.cka(X, Y, kernel=kernel), reps=3)
        base = timeit(lambda: base_fn(X, Y), reps=3)
        rows.append(table_row(f"cka_{kernel}", f"n={n} d={d1}x{d2} float32", ours, "whole Gram matrices in torch", base,
                         check))
    return rows


def bench_ridge(dev, timeit, tiny):
    """kernels.ridge_cv (k-fold) vs himalaya's RidgeCV with its torch backend on the same device."""
    import numpy as np
    import torch
    import kernels
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV
    n, p, t = (200, 16, 30) if tiny else (8_000, 768, 1_000)
    alphas = np.logspace(-2, 5, 15)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(n, p, generator=g)
    Y = X @ torch.randn(p, t, generator=g) / p ** 0.5 + torch.randn(n, t, generator=g)
    params = inspect.signature(kernels.ridge_cv).parameters
    if dev != "cpu" and "device" not in params:
        return [dict(op="ridge_cv", skipped="kernels.ridge_cv has no device= argument yet: not timed on the GPU")]
    kw = dict(device=dev, scoring="mse") if "device" in params else {}  # himalaya's default rule: mean MSE
    Xd, Yd = (X.to(dev), Y.to(dev)) if kw else (X, Y)
    res = kernels.ridge_cv(Xd, Yd, alphas, cv=5, **kw)
    backend = set_backend("torch_cuda" if dev == "cuda" else "torch", on_error="raise")
    try:
        Xh, Yh = backend.asarray(X.numpy()), backend.asarray(Y.numpy())
        model = RidgeCV(alphas=alphas, cv=5, fit_intercept=True).fit(Xh, Yh)
        same = float(np.isclose(torch.as_tensor(res.best_alphas).cpu().numpy(), backend.to_numpy(model.best_alphas_),
                                rtol=1e-5).mean())
        ours = timeit(lambda: kernels.ridge_cv(Xd, Yd, alphas, cv=5, **kw), reps=3)
        base = timeit(lambda: RidgeCV(alphas=alphas, cv=5, fit_intercept=True).fit(Xh, Yh), reps=3)
    finally:
        set_backend("numpy")
    return [table_row("ridge_cv k-fold", f"{n}x{p}, {t} targets, 15 alphas, cv=5", ours,
                 f"himalaya RidgeCV ({'torch_cuda' if dev == 'cuda' else 'torch'} backend)", base, same >= 0.99,
                 note=f"same alphas on {100 * same:.1f}% of targets")]


def bench_fwht(dev, timeit, tiny):
    import torch
    import kernels
    D, B = (1 << 10, 2) if tiny else (1 << 24, 4)
    x = torch.randn(B, D, device=dev)
    y = kernels.fwht(x)
    check = bool(torch.allclose(kernels.fwht(y[:1].double()) / D, x[:1].double(), rtol=1e-4, atol=1e-4))
    return table_row("fwht", f"D=2^{D.bit_length() - 1} batch={B} float32", timeit(lambda: kernels.fwht(x)),
                "one clone of the same bytes (two passes are ~2x)", timeit(lambda: x.clone()), check)


def run_benchmarks(device, out, tiny):
    import torch
    import kernels
    torch.manual_seed(0)
    timeit = _timer(device, tiny)
    rows = []
    for bench in (bench_episodes, bench_topk, bench_cka, bench_ridge, bench_fwht):
        t0 = time.time()
        try:
            r = bench(device, timeit, tiny)
            rows += r if isinstance(r, list) else [r]
        except Exception as e:  # one failing benchmark must not hide the others' numbers
            rows.append(dict(op=bench.__name__[len("bench_"):], error=f"{type(e).__name__}: {e}"))
        log(f"bench {bench.__name__}: {time.time() - t0:.1f} s")
    info = dict(device=device, gpu=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
                torch=torch.__version__, cuda=torch.version.cuda, extension=str(kernels.extension()), tiny=tiny,
                created=time.strftime("%Y-%m-%d %H:%M:%S"))
    Path(out).mkdir(parents=True, exist_ok=True)
    tmp = Path(out) / "bench.json.tmp"
    tmp.write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    tmp.replace(Path(out) / "bench.json")
    return rows


# ----------------------------------------------------------------------------------------------- the steps
def plan(py, out, arch):
    """(name, command, environment additions, log file) of each step after the wheels."""
    env = dict(KERNELS_REQUIRE="1", PYTHONPATH=os.pathsep.join([str(SITE), os.environ.get("PYTHONPATH", "")]))
    jobs = str(os.cpu_count() or 4)
    return [
        ("build", [py, "setup.py", "-q", "build_ext", "--inplace"],
         dict(env, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=jobs), "build.log"),
        ("report", [py, "kernels.py"], env, "build.log"),
        ("tests", [py, "-m", "pytest", "-q", "tests", "-k", "cuda", "--benchmark-skip", "-p", "no:cacheprovider",
                   "-o", "addopts="], env, "tests.log"),
        ("bench", [py, "gpu_check.py", "--bench-only", "--out", str(out)], env, "bench.log"),
        ("demo", ["make", "demo", f"PY={py}", "DEVICE=cuda", f"RUN={SITE.parent}/gpu-demo",
                  f"WORLD={SITE.parent}/gpu-world"], env, "demo.log"),
    ]


def run_step(name, cmd, env, logfile, timeout):
    t0 = time.time()
    log(f"{name}: {' '.join(cmd)} (limit {timeout:.0f} s)")
    with open(logfile, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **env), stdout=f, stderr=subprocess.STDOUT,
                               timeout=max(timeout, 1))
            status = "ok" if r.returncode == 0 else f"failed (exit {r.returncode})"
        except subprocess.TimeoutExpired:
            status = f"stopped at its limit ({timeout:.0f} s)"
    dt = time.time() - t0
    log(f"{name}: {status} in {dt:.0f} s")
    return dict(step=name, status=status, seconds=round(dt, 1), log=Path(logfile).name)


def tail_file(path, chars=200_000):
    """Keep a log small: its last `chars` characters."""
    p = Path(path)
    if p.exists() and p.stat().st_size > chars:
        text = p.read_text(errors="replace")[-chars:]
        p.write_text("[... earlier output cut ...]\n" + text)


def _last_line(path, needle):
    lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if needle in ln] if Path(path).exists() \
        else []
    return lines[-1].strip() if lines else ""


def write_report(out, steps, info):
    bench = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else {"rows": []}
    lines = ["# GPU check", "", f"- created {time.strftime('%Y-%m-%d %H:%M:%S')}, {info}", "",
             "| step | status | seconds | log |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['log']} |" for s in steps]
    summary = _last_line(out / "tests.log", " passed") or _last_line(out / "tests.log", " failed")
    lines += ["", f"Tests: {summary or 'no summary line'}", "", "| op | sizes | ours (ms) | baseline | baseline (ms) | "
              "ratio | target | meets | values | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in bench["rows"]:
        if "ours_ms" in r:
            lines.append(f"| {r['op']} | {r['sizes']} | {r['ours_ms']} | {r['baseline']} | {r['baseline_ms']} | "
                         f"{r['ratio']} | {r['target']} | {r['meets_target']} | {r['value_check']} | {r['note']} |")
        else:
            lines.append(f"| {r['op']} | | | | | | | | | {r.get('skipped') or r.get('error')} |")
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "report.md")


def main(args):
    if args.dry_run and args.out == defaults["out"]:
        args.out = "runs/gpu-dry-run"  # tiny CPU numbers never sit where a GPU run's report goes
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    if args.wheels:
        return download_wheels(ROOT / args.wheel_dir)
    if args.bench_only:
        run_benchmarks(args.device, out, tiny=args.device == "cpu")
        return
    import torch
    py = sys.executable
    if args.dry_run:
        steps = plan(py, out, "8.0;9.0")
        for name, cmd, env, logfile in steps:
            extra = " ".join(f"{k}={v}" for k, v in env.items() if k not in ("PYTHONPATH",))
            print(f"{name:7s} {extra} {' '.join(cmd)}  > {out / logfile}")
        missing = [str(ROOT / p) for p in ("setup.py", "kernels.py", "tests", "Makefile", "train.py")
                   if not (ROOT / p).exists()]
        if missing:
            sys.exit(f"gpu-check --dry-run: missing {missing}")
        if "\ndemo:" not in (ROOT / "Makefile").read_text():
            sys.exit("gpu-check --dry-run: the Makefile has no demo target")
        wheels = sorted(p.name for p in (ROOT / args.wheel_dir).glob("*.whl"))
        print(f"wheels  {len(wheels)} in {args.wheel_dir}/ (make gpu-wheels fetches {len(WHEELS)} packages)")
        rows = run_benchmarks("cpu", out, tiny=True)
        for r in rows:
            print("bench  ", json.dumps(r))
        bad = [r for r in rows if "error" in r or r.get("value_check") is False]
        if bad:
            sys.exit(f"gpu-check --dry-run: benchmark code failed on the CPU: {bad}")
        print(f"dry run ok: {len(steps)} steps, {len(rows)} benchmark rows (CPU, tiny sizes) in {out / 'bench.json'}")
        return
    if not torch.cuda.is_available():
        sys.stderr.write(f"gpu-check: no CUDA GPU is visible to torch {torch.__version__} (CUDA build "
                         f"{torch.version.cuda}): this check needs one. On a machine without a GPU run "
                         "`python gpu_check.py --dry-run` to check the plan.\n")
        sys.exit(3)
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    for f in ("build.log", "tests.log", "bench.log", "demo.log"):
        (out / f).unlink(missing_ok=True)
    cap = torch.cuda.get_device_capability()
    arch = f"{cap[0]}.{cap[1]}"
    info = (f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}, python {platform.python_version()}, {os.cpu_count()} CPUs")
    log(info)
    steps = []
    if (ROOT / args.wheel_dir).is_dir():
        t0 = time.time()
        got = install_wheels(ROOT / args.wheel_dir)
        steps.append(dict(step="wheels", status=f"ok: {len(got)} installed into {SITE.relative_to(ROOT)}",
                          seconds=round(time.time() - t0, 1), log="-"))
    sys.path.insert(0, str(SITE))
    for name, cmd, env, logfile in plan(py, out, arch):
        left = args.budget - (time.time() - start)
        if name == "demo":
            helptext = subprocess.run([py, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                                      env=dict(os.environ, **env)).stdout
            if "--device" not in helptext:
                steps.append(dict(step="demo", status="skipped: train.py has no --device yet", seconds=0, log="-"))
                continue
            if "DEVICE" not in (ROOT / "Makefile").read_text():
                log("warning: the Makefile never reads DEVICE: make demo may run on the CPU")
        share = BUDGET_SHARE.get(name, 1.0) * args.budget if name not in ("report", "demo") else left
        if left < 5:
            steps.append(dict(step=name, status="skipped: budget spent", seconds=0, log="-"))
            continue
        steps.append(run_step(name, cmd, env, out / logfile, min(share, left)))
        if name == "build" and steps[-1]["status"] != "ok":
            break  # nothing after it can run without the extension
    if (out / "demo.log").exists() and (SITE.parent / "gpu-demo" / "report.md").exists():
        shutil.copy(SITE.parent / "gpu-demo" / "report.md", out / "demo_report.md")
    for f in ("build.log", "tests.log", "bench.log", "demo.log"):
        tail_file(out / f)
    write_report(out, steps, info)
    log(f"done in {time.time() - start:.0f} s: {out / 'report.md'}")
    print((out / "report.md").read_text())
    if any(s["status"] not in ("ok",) and not s["status"].startswith(("ok", "skipped")) for s in steps):
        sys.exit(1)


if __name__ == "__main__":
    from data import flag_parser
    main(flag_parser(__doc__, defaults).parse_args())
