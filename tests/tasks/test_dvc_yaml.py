"""dvc.yaml tells the truth: each stage's code deps are exactly the project files its module
imports, and its params exactly the keys its ``run(params)`` reads (recorded while it runs)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from tasks.params import Params, parse_params

REPO = Path(__file__).resolve().parents[2]
STAGES = ("ingest", "distill", "fit", "evaluate")
PACKAGES = ("models", "tasks", "flows", "infrec")


def _dvc_stages() -> dict[str, Any]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    for candidate in (REPO / (name.replace(".", "/") + ".py"),
                      REPO / name.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in out if n.split(".")[0] in PACKAGES}


def import_closure(module: str) -> set[str]:
    """Project files a module imports, transitively (imports inside functions included)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(_imports(path))
    return {str(p.relative_to(REPO)) for p in seen if p.name != "__init__.py"}


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_what_the_stage_imports(stage):
    listed = {d for d in _dvc_stages()[stage]["deps"] if d.split("/")[0] in PACKAGES}
    assert listed == import_closure(f"tasks.{stage}")


def test_every_stage_runs_its_own_module_with_the_params_file():
    for stage, spec in _dvc_stages().items():
        assert spec["cmd"].startswith(f"infrec {stage} --params params.yaml"), stage


class Recorder:
    """A stand-in for :class:`Params` that records every key read through it."""

    def __init__(self, obj: Any, prefix: str, seen: set[str]):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_seen", seen)

    def __getattr__(self, name: str) -> Any:
        obj = object.__getattribute__(self, "_obj")
        seen = object.__getattribute__(self, "_seen")
        prefix = object.__getattribute__(self, "_prefix")
        attr = getattr(type(obj), name, None)
        if callable(attr) and not isinstance(attr, type):  # a method: run it on the recorder
            return functools.partial(attr, self)
        value = getattr(obj, name)
        if isinstance(value, BaseModel):
            return Recorder(value, f"{prefix}{name}.", seen)
        seen.add(f"{prefix}{name}")
        return value


def _listed_keys(stage: str) -> set[str]:
    keys = set()
    for entry in _dvc_stages()[stage].get("params", []):
        field = Params.model_fields.get(entry)
        sub = field.annotation if field is not None else None
        if isinstance(sub, type) and issubclass(sub, BaseModel):  # a whole section
            keys.update(f"{entry}.{k}" for k in sub.model_fields)
        else:
            keys.add(entry)
    return keys


def test_params_are_exactly_the_keys_each_stage_reads(tmp_path):
    from tasks import distill, evaluate, fit, ingest

    params = parse_params({
        "state_dir": str(tmp_path / "state"), "reports_dir": str(tmp_path / "reports"),
        "generate": {"users": 150, "items": 120, "seed": 1},
        "distill": {"budget": 20, "steps": 2, "samples": 4, "eval_every": 1},
        "evaluate": {"ease_lambdas": [10.0]}, "fit": {"summary_lambdas": [1.0, 5.0],
                                                       "lambdas": [1.0, 5.0]},
    })
    quiet = lambda _m: None  # noqa: E731
    for stage, module in zip(STAGES, (ingest, distill, fit, evaluate)):
        seen: set[str] = set()
        module.run(Recorder(params, "", seen), log=quiet)
        assert seen == _listed_keys(stage), stage


def test_committed_lock_describes_exactly_the_committed_dvc_yaml():
    """dvc.lock as committed: the stages of dvc.yaml and nothing else (a stale stage's outputs
    are copied into every data version, and a rollback then looks for objects nobody has), each
    with dvc.yaml's command, deps, params and outputs (paths as params.yaml resolves them)."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    stages = _dvc_stages()
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())

    def resolve(path: str) -> str:
        for key in ("state_dir", "reports_dir"):
            path = path.replace("${%s}" % key, shipped[key])
        return path

    def names(entries: list) -> set[str]:
        return {resolve(next(iter(e)) if isinstance(e, dict) else e) for e in entries}

    assert set(lock) == set(stages), f"dvc.lock stages without a dvc.yaml stage: " \
                                     f"{sorted(set(lock) - set(stages))}"
    for name, stage in stages.items():
        locked = lock[name]
        assert locked["cmd"] == stage["cmd"], name
        assert {d["path"] for d in locked.get("deps", [])} == names(stage.get("deps", [])), name
        assert set(locked.get("params", {}).get("params.yaml", {})) == set(stage["params"]), name
        outs = [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]
        assert {o["path"] for o in locked.get("outs", [])} == names(outs), name
