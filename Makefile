# The two commands of the README: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench-loss clean-venv

# Idempotent: rebuilt only when a requirements file changes.
setup: $(STAMP)
$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

# Builds the embedded data, trains a small model with SoftCLIP on 2 ranks through the deepspeed launcher
# (CPU ranks with gloo when there is no GPU), evaluates, exports to transformers, classifies an image
# through the transformers pipeline, prints a results table and writes runs/demo/demo.png.
demo: setup
	$(PY) -m pretrain.demo --out runs/demo

bench-loss: setup
	$(PY) bench/loss.py

clean-venv:
	rm -rf $(VENV)
