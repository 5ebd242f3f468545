# ream-exp: one command to set up and run, one to set up and test.
#   make demo    set up .venv and run the default job (toy MoE, REAM, ratio 0.25, toy benchmarks)
#   make test    set up .venv and run the test suite (CPU, offline)
#   make mutate  plant each deliberate bug of tests/mutate.py and check its tests catch it (a few minutes)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a GPU machine use e.g. `make setup TORCH=torch==2.13.0 TORCH_INDEX=` with CUDA wheels,
# on a CPU machine without a local wheel: TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: setup demo test mutate bench bench-legacy clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/ream-exp

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# MUTANTS="name ..." runs only those mutants
mutate: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m tests.mutate $(MUTANTS)

bench: setup
	$(BIN)/python -m ream_exp.bench observe

# Checkpoints load in transformers 4.57: builds that environment once (outputs/.cache/tf457-venv), then checks
bench-legacy: setup
	$(BIN)/python -m ream_exp.bench_legacy

clean-venv:
	rm -rf $(VENV)
