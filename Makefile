# The project's two commands: `make run` (the demo) and `make test` (lint, types, tests).
# Both work on a fresh clone: they create .venv and install from the pinned constraints.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
ARGS   ?=

.PHONY: run test lint typecheck unit bench bench-micro bench-oauth bench-policy lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"

$(VENV)/.installed-run: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/portcullis demo $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests scripts

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

unit: $(VENV)/.installed-test
	$(BIN)/pytest $(ARGS)

test: lint typecheck unit

# Benchmarks: wrk against nginx and Portcullis in one run (docs/benchmarks.md).
bench: $(VENV)/.installed-test bench-micro
	bash scripts/bench/run.sh

# Microbenchmarks of the hot functions (pytest-benchmark).
bench-micro: $(VENV)/.installed-test
	$(BIN)/pytest tests/bench --benchmark-only --benchmark-columns=min,median,mean,ops --benchmark-sort=name -p no:cacheprovider

# The authorization server against panva's oidc-provider, one run (docs/benchmarks.md).
bench-oauth: $(VENV)/.installed-test
	bash scripts/bench/oauth_bench.sh $(ARGS)

# Policy decisions in-process and through the forward-auth endpoint against Cerbos (docs/benchmarks.md).
bench-policy: $(VENV)/.installed-test
	bash scripts/bench/policy_bench.sh $(ARGS)

# Re-pin every dependency (run when pyproject.toml changes; needs the registry).
lock:
	rm -rf /tmp/portcullis-lock && $(PYTHON) -m venv /tmp/portcullis-lock
	/tmp/portcullis-lock/bin/python -m pip install --quiet --upgrade "pip>=24"
	/tmp/portcullis-lock/bin/python -m pip install --quiet -e '.[test]'
	/tmp/portcullis-lock/bin/python -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
