"""Every command that takes --params validates the whole file before anything runs: a typo in
any section, an unknown section, a NaN or infinite λ or an empty λ list is one line naming the
key, a non-zero exit, and nothing written."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.helpers import BIN, REPO, clean_env

SECTIONS = ("generate", "ingest", "selection", "fit", "distill", "evaluate", "gates",
            "registry", "tracking", "schedule", "versioning", "serving")


def _bad_files() -> list[tuple[str, str, str]]:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    cases = []
    for section in SECTIONS:  # a typo in every section
        raw = {**base, section: {**(base[section] or {}), "tpyo": 1}}
        cases.append((f"typo-{section}", yaml.safe_dump(raw), f"{section}.tpyo"))
    cases += [
        ("unknown-section", yaml.safe_dump({**base, "gatse": {"pop_margin": 1}}), "gatse"),
        ("nan-lambda", (REPO / "params.yaml").read_text().replace(
            "lambdas: [0, 1, 5, 20, 50, 100]", "lambdas: [0, .nan, 5]"), "fit.lambdas.1"),
        ("inf-lambda", (REPO / "params.yaml").read_text().replace(
            "summary_lambdas: [0.00001,", "summary_lambdas: [.inf,"), "fit.summary_lambdas.0"),
        ("empty-lambdas", yaml.safe_dump({**base, "fit": {**base["fit"], "lambdas": []}}),
         "fit.lambdas"),
        ("bad-yaml", "fit: [unclosed\n", "invalid YAML"),
    ]
    return cases


@pytest.mark.parametrize("name, text, key", _bad_files(), ids=[c[0] for c in _bad_files()])
def test_bad_params_are_refused_before_anything_runs(tmp_path, monkeypatch, restore_environ,
                                                     name, text, key):
    from typer.testing import CliRunner

    from infrec.cli import app

    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(text)
    res = CliRunner().invoke(app, ["run", "--params", str(params)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {params}: "), res.stderr
    assert key in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


@pytest.mark.parametrize("command", [["run"], ["fit"], ["rollback", "v1"], ["serve"],
                                     ["promote", "1"], ["recommend", "--history", "1"]])
def test_every_command_refuses_them_as_a_user_sees_it(tmp_path, command):
    params = tmp_path / "params.yaml"
    params.write_text(_bad_files()[3][1])  # a typo in the fit section
    proc = subprocess.run([str(BIN / "infrec"), *command, "--params", str(params)],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {params}: fit.tpyo: unknown key in section 'fit'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
