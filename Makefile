# One obvious way to run things. Every target sets up .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: help install test test-fast demo bench lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[all,dev]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)  ## create .venv with torch, the package and all extras

test: install  ## run the whole test suite (slow tests included)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install  ## run the tests that take a few seconds each
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install  ## a short real ACPO run on CPU (tiny models until the embedded demo lands)
	$(VENV)/bin/acpo fit --config configs/acpo.yaml --config configs/tiny.yaml --trainer.max_steps 20

bench: install  ## step-cost benchmark (writes outputs/bench/)
	$(PY) benchmarks/step_cost.py

lint: install  ## ruff
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:  ## remove outputs and caches (keeps .venv)
	rm -rf outputs lightning_logs .pytest_cache .ruff_cache
