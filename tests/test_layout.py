"""The layout rule, checked on the source: every evaluate.py --task lives in the eval_*.py named for its family,
every train.py --stage in train.py; the import graph (walked with ast, lazy imports inside functions included)
has no cycle, no module imports a script, and no module uses another module's private name."""
import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"extract", "train", "evaluate", "fetch_data"}  # run as programs; nothing imports them
ALLOWED_PRIVATE = {("kernels", "_ext")}  # STYLE.md: tests ask kernels._ext() whether the compiled ops are loaded


def project_modules():
    return {p.stem: p for p in sorted(ROOT.glob("*.py"))}


def imports(path, modules):
    """(imported project modules, [(module, private name)] used from them) of one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found, private, alias = set(), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    found.add(a.name)
                    alias[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            found.add(node.module)
            private += [(node.module, a.name) for a in node.names if a.name.startswith("_")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in alias:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                private.append((alias[node.value.id], node.attr))
    return found, private


def graph():
    mods = project_modules()
    return {m: imports(p, mods) for m, p in mods.items()}


def find_cycle(edges):
    """A cycle of the directed graph {node: set(successors)} as a list of nodes, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_imports_sees_lazy_imports_and_private_names(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import kernels as k\ndef f():\n    from choice import _x, y\n    return k._tile(1), k.cka\n")
    found, private = imports(f, {"kernels", "choice"})
    assert found == {"kernels", "choice"} and sorted(private) == [("choice", "_x"), ("kernels", "_tile")]


def test_no_import_cycle():
    g = graph()
    assert find_cycle({m: found for m, (found, _) in g.items()}) is None


def test_no_module_imports_a_script():
    bad = [(m, s) for m, (found, _) in graph().items() for s in found & SCRIPTS if s != m]
    assert not bad, f"(importer, script): {bad}"


def test_no_experiment_imports_a_script():
    """experiments/*.py run beside the modules; what they need from evaluate.py & co. must live in a module."""
    mods = project_modules()
    found = {p.name: imports(p, mods)[0] for p in sorted((ROOT / "experiments").glob("*.py"))}
    assert found, "no experiments/*.py found"
    bad = [(name, s) for name, f in found.items() for s in f & SCRIPTS]
    assert not bad, f"(experiment, script): {bad}"


def test_no_private_name_crosses_a_module():
    bad = [(m, used) for m, (_, private) in graph().items() for used in private if used[0] != m]
    mods = project_modules()
    for p in sorted((ROOT / "tests").glob("*.py")):
        bad += [(f"tests/{p.name}", used) for used in imports(p, mods)[1] if used not in ALLOWED_PRIVATE]
    assert not bad, f"(user, (module, private name)): {bad}"


def test_every_task_lives_in_the_file_named_for_its_family():
    import evaluate
    family = collections.defaultdict(list)
    for task, fn in evaluate.TASKS.items():
        assert fn.__module__.startswith("eval_"), (task, fn.__module__)
        assert (ROOT / f"{fn.__module__}.py").exists()
        family[fn.__module__].append(task)
    assert sorted(family) == ["eval_behaviour", "eval_fmri", "eval_geometry", "eval_paper", "eval_warp"]
    assert family["eval_paper"] == ["paper-table"]
    assert {"things-ooo", "levels-ooo", "category-learning", "reward-learning", "icl"} == set(family["eval_behaviour"])
    assert {"cka", "rsa", "class-separation", "tsne", "similarity", "probe"} == set(family["eval_geometry"])
    assert {"fmri", "encsearch"} == set(family["eval_fmri"]) and family["eval_warp"] == ["dwarp"]
    assert not {"all", "report"} & set(evaluate.TASKS)  # dispatched by evaluate.main: all there, report below
    import eval_report
    assert eval_report.task_report.__module__ == "eval_report" and not hasattr(evaluate, "task_report")


@pytest.mark.parametrize("stage", ["sae", "meta", "warp"])
def test_every_stage_lives_in_train_py(stage):
    import train
    assert train.STAGES[stage].__module__ == "train"
