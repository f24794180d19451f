"""Lint as part of make test: ruff with zero findings on every Python file of the project (pyflakes and
pycodestyle rules, lines <= 120; pyproject.toml), and no code or comment that points at an issue number instead
of saying what and why."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ISSUE_REF = re.compile(r"\bissues? ?#?\d+", re.IGNORECASE)


def test_ruff_has_no_findings():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_ruff_checks_every_project_python_file():
    """Nothing of the project's own Python is excluded: ruff lists every top-level and tests/ file it checks."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--show-files", str(ROOT)], cwd=ROOT,
                       capture_output=True, text=True)
    seen = {Path(line.strip()).resolve() for line in r.stdout.splitlines() if line.strip().endswith(".py")}
    ours = set(ROOT.glob("*.py")) | set((ROOT / "tests").glob("*.py"))
    assert ours and {p.resolve() for p in ours} <= seen, sorted(str(p) for p in ours if p.resolve() not in seen)


def test_no_issue_number_references_in_code():
    files = [*ROOT.glob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "csrc").iterdir(), ROOT / "Makefile",
             *(ROOT / "slurm").iterdir(), *(ROOT / "configs").iterdir(), ROOT / "pyproject.toml"]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files if p.is_file()
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if ISSUE_REF.search(line) and p.name != "test_lint.py"]
    assert not hits, "\n".join(hits)


def test_the_issue_pattern_finds_what_it_should():
    assert ISSUE_REF.search("# streaming ridge (issue 6): X'X") and ISSUE_REF.search("see Issue #12")
    assert not ISSUE_REF.search("reissue 3 copies") and not ISSUE_REF.search("the issue is")
