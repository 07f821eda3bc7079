"""Defaults live once, in the params schema (``tasks/params.py``): no function in models/, tasks/
or flows/ gives the selection metric or a λ grid a default of its own. A caller that forgets
the argument gets a TypeError, not silently another metric (``hr@100`` in code while the shipped
default is ``ndcg@10`` was the trap)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "tasks" / "params.py"


def _tunable(name: str) -> bool:
    return "metric" in name or name in ("lambdas", "summary_lambdas", "ease_lambdas", "grid")


def _code_files() -> list[Path]:
    return [p for package in ("models", "tasks", "flows")
            for p in sorted((REPO / package).rglob("*.py")) if p != SCHEMA]


def _defaults_of_tunables(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            positional = a.posonlyargs + a.args
            pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults))
            pairs += [(k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, default in pairs:
                none = isinstance(default, ast.Constant) and default.value is None
                if _tunable(arg.arg) and not none:
                    found.append(f"{path.name}:{node.lineno} {node.name}("
                                 f"{arg.arg}={ast.unparse(default)})")
    return found


def test_no_function_gives_the_metric_or_a_lambda_grid_a_default():
    files = _code_files()
    assert len(files) > 30 and SCHEMA not in files
    assert _defaults_of_tunables(files) == []


def test_the_check_sees_a_default(tmp_path):
    """The scan is not vacuous: literal and named defaults of a metric or a grid are found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f(x, select_metric='hr@100', lambdas=GRID, k=None, metric=None):\n"
                     "    pass\n")
    assert _defaults_of_tunables([probe]) == [
        "probe.py:1 f(select_metric='hr@100')", "probe.py:1 f(lambdas=GRID)"]
