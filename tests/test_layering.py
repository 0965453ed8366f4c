"""The project's modules import only downwards and never in a cycle: models <- rollout <- critic <-
ppo <- train, with geneval, toy and rewards beside them (README, "The files"). Every import of a
project module is read with `ast`, at module level and inside functions alike (a function-level
import is an import all the same; it only runs later).
Run: python -m pytest -q tests/test_layering.py
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom to top: a module may import only the modules before it. Beside the chain models <- rollout
# <- critic <- ppo <- train sit geneval (GenEval's rules: nothing of the project but cli), toy (the
# built-in world: its pipeline from models, its evaluation from rollout) and rewards (geneval's
# verdict, toy's checker); the entry points come last.
ORDER = ("cli", "grid", "geneval", "models", "rollout", "toy", "rewards", "critic", "steer", "ppo", "checkpoint",
         "eval", "pretrain", "train")


def project_modules():
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def imports(path, modules):
    """The project modules a file imports anywhere in it: {module: [line numbers]}."""
    found = {}
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names = [str(node.args[0].value).split(".")[0]]
        else:
            continue
        for name in names:
            if name in modules:
                found.setdefault(name, []).append(node.lineno)
    return found


def graph(root=ROOT):
    modules = project_modules() if root == ROOT else sorted(f[:-3] for f in os.listdir(root) if f.endswith(".py"))
    return {m: imports(os.path.join(root, m + ".py"), set(modules) - {m}) for m in modules}


def cycle(edges):
    """One import cycle as a list of modules [a, b, ..., a], or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n, path + [n])
                if found:
                    return found
        state[m] = "done"
        return None
    for m in sorted(edges):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def upward(edges, order=ORDER):
    """Every import of a module placed above the importer: ['a.py:12 imports b', ...]."""
    rank = {m: i for i, m in enumerate(order)}
    return [f"{m}.py:{line} imports {n}" for m, targets in sorted(edges.items()) for n, lines in sorted(targets.items())
            if rank[n] > rank[m] for line in lines]


def test_every_module_has_a_place_in_the_order():
    assert set(project_modules()) == set(ORDER), "a new module: give it its place in ORDER"


def test_no_import_cycle():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()))


def test_no_upward_import():
    assert upward(graph()) == []


def test_the_checks_catch_what_they_guard(tmp_path):
    """The checks themselves: a cycle through a function-level import, and an upward import, are found."""
    (tmp_path / "models.py").write_text("import cli\n\ndef f():\n    import rollout\n")
    (tmp_path / "rollout.py").write_text("from models import load_backbone\n")
    (tmp_path / "cli.py").write_text("x = __import__('models')\n")
    edges = graph(str(tmp_path))
    assert edges["models"] == {"cli": [1], "rollout": [4]}
    assert cycle(edges) in (["models", "rollout", "models"], ["rollout", "models", "rollout"],
                            ["cli", "models", "cli"], ["models", "cli", "models"])
    assert upward(edges) == ["cli.py:1 imports models", "models.py:4 imports rollout"]
    assert cycle({"a": {"b": [1]}, "b": {}}) is None


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
