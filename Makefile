# The two commands of the README: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench-loss gpu-check clean-venv

# `pip install ARGS`, tried up to 3 times, 30 s apart: a dropped registry connection in the middle of a wheel
# fails the whole step, a fresh pip run starts that download over, and installing is idempotent, so a retry
# loses nothing. The first call runs the venv's own pip, which may predate --resume-retries.
define pip_install
for attempt in 1 2 3; do \
  $(PY) -m pip install --quiet $(1) && break; \
  if [ $$attempt = 3 ]; then echo "pip install $(1) failed 3 times; see pip's messages above" >&2; exit 1; fi; \
  echo "pip install $(1) failed (attempt $$attempt of 3); retrying in 30 s" >&2; sleep 30; \
done
endef

# The venv takes about 7 GB (torch's CUDA build alone 5.5 GB). Without that much free space pip fails
# part-way, and not always with "No space left on device": with the disk full here, one install failed as
# "Connection interrupted while downloading" instead. So before a new venv is built the space is checked
# and a shortage named (an existing venv being updated is not held to it).
export CHECK_DISK
define CHECK_DISK
import shutil, sys
free = shutil.disk_usage(".").free / 2**30
if free < $(NEEDED_GB):
    sys.exit(f"make setup needs about $(NEEDED_GB) GB free for .venv/ and the wheels it unpacks, and only {free:.1f} GB "
             f"is free here: free some space (or set NEEDED_GB=N to override) and run it again.")
endef
NEEDED_GB ?= 8

# Idempotent: rebuilt only when a requirements file changes.
setup: $(STAMP)
$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt
	@test -x $(PY) || $(PYTHON) -c "$$CHECK_DISK"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call pip_install,--upgrade pip)
	$(call pip_install,--resume-retries 10 -r requirements-dev.txt)
	$(call pip_install,--resume-retries 10 --no-deps -r requirements-nodeps.txt)
	touch $(STAMP)

# A test is rerun once, and only when a rank it started died of a native crash (faulthandler's line): the
# rare gloo crash of docs/training.md ("Known fault"). tests/conftest.py prints every such crash at the end.
NATIVE_CRASH = Fatal Python error: (Segmentation fault|Aborted|Bus error|Floating point exception|Illegal instruction)
test: setup
	$(PY) -m pytest -q -raR tests --reruns 1 --only-rerun '$(NATIVE_CRASH)'

# Builds the embedded data, trains a small model with SoftCLIP on 2 ranks through the deepspeed launcher
# (CPU ranks with gloo when there is no GPU), evaluates, exports to transformers, classifies an image
# through the transformers pipeline, prints a results table and writes runs/demo/demo.png.
demo: setup
	$(PY) -m pretrain.demo --out runs/demo

bench-loss: setup
	$(PY) bench/loss.py

# One NVIDIA GPU within --budget (480 s): train/resume with ZeRO-3 bf16 over NCCL, then MFU, step ratios,
# the loss at N = 32,768, FusedAdam, export; writes results/gpu_check.md after every stage. Says so and
# exits 0 without a GPU. Arguments go through GPU_CHECK_ARGS:
#   make gpu-check GPU_CHECK_ARGS=--dry-run                  # the plan, limits and commands (any machine)
#   make gpu-check GPU_CHECK_ARGS="--budget 300 --dry-run"   # what a shorter budget keeps
GPU_CHECK_ARGS ?=
gpu-check: setup
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
