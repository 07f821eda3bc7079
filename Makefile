# infrec — `make run` and `make test` create .venv when it is missing (once; a second call reuses it).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.infrec-installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DVC_NO_ANALYTICS ?= 1
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: venv run test test-fast bench lock clean-state help server

help:
	@echo "make run    - create .venv if missing, run the pipeline on the embedded default data"
	@echo "make test   - create .venv if missing, run the test suite"
	@echo "make test-fast - the unit tests of models/ and tasks/ (no servers, DVC or subprocesses)"
	@echo "make bench  - ML-1M benchmark of ∞-AE (needs ../shared/data)"
	@echo "make server - Prefect server + UI on 127.0.0.1:$${PORT:-4200} (foreground)"

# infrec-venv-path.pth: every Python of the venv puts the venv's bin/ first on PATH for the
# programs it starts, so `.venv/bin/mlflow models serve` finds uvicorn and `.venv/bin/dvc repro`
# finds `infrec` without activating the venv.
$(STAMP): requirements.lock pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c 'import site, pathlib; pathlib.Path(site.getsitepackages()[0], "infrec-venv-path.pth").write_text("import os, sys; b = os.path.dirname(sys.executable); p = os.environ.get(\"PATH\", \"\"); os.environ[\"PATH\"] = p if b in p.split(os.pathsep) else b + os.pathsep + p\n")'
	@touch $(STAMP)

venv: $(STAMP)

run: venv
	$(VENV)/bin/infrec run

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile

# the edit loop: models/ and tasks/ without the tests marked slow (servers, DVC, subprocesses)
test-fast: venv
	$(PY) -m pytest -q -n 2 -m "not slow and not realdata" tests/models tests/tasks

server: venv
	$(VENV)/bin/infrec server --port $(or $(PORT),4200)

bench: venv
	$(PY) -m bench.infinite_ae --data ../shared/data/ml-1m/interactions.parquet

lock: venv
	$(PY) -m pip freeze --exclude-editable | grep -v '^infrec' > requirements.lock

clean-state:
	rm -rf .infrec mlflow.db
