# infrec — `make run` and `make test` create .venv when it is missing (once; a second call reuses it).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.infrec-installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DVC_NO_ANALYTICS ?= 1
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: venv run test bench lock clean-state help server

help:
	@echo "make run    - create .venv if missing, run the pipeline on the embedded default data"
	@echo "make test   - create .venv if missing, run the test suite"
	@echo "make bench  - ML-1M benchmark of ∞-AE (needs ../shared/data)"
	@echo "make server - Prefect server on 127.0.0.1:$${PORT:-4200} (foreground; then: infrec serve)"

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP)

run: venv
	$(VENV)/bin/infrec run

test: venv
	$(PY) -m pytest -q

server: venv
	$(VENV)/bin/infrec server --port $(or $(PORT),4200)

bench: venv
	$(PY) -m bench.infinite_ae --data ../shared/data/ml-1m/interactions.parquet

lock: venv
	$(PY) -m pip freeze --exclude-editable | grep -v '^infrec' > requirements.lock

clean-state:
	rm -rf .infrec
