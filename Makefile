# ream-exp: one command to set up and run, one to set up and test.
#   make demo    set up .venv and run the default job (toy MoE, REAM, ratio 0.25, toy benchmarks)
#   make test    set up .venv and run the test suite (CPU, offline; it builds the docs site strictly, as make docs);
#                with CI=true (as .ci/run has it) or LEGACY_CHECK=true it also builds the transformers 4.57
#                environment (once) and runs the checkpoint load check in it (tests/test_checkpoint.py), which
#                is skipped otherwise
#   make quant-env  build the quantization environment (llm-compressor, outputs/.cache/quant-venv) that quant=...
#                runs need (docs/quantization.md); make test with CI=true builds it too and runs its tests
#   make mutate  plant each deliberate bug of tests/mutate.py and check its tests catch it (a few minutes)
#   make bench   run one benchmark (ream_exp/bench/): BENCH=observe by default, BENCH_ARGS="..." for its flags;
#                `python -m ream_exp.bench --help` lists them
#   make docs    build the documentation site (mkdocs.yml, docs/) in strict mode into $(SITE_DIR) (git-ignored);
#                make docs-serve serves it at http://127.0.0.1:8000 while you edit
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a GPU machine use e.g. `make setup TORCH=torch==2.13.0 TORCH_INDEX=` with CUDA wheels,
# on a CPU machine without a local wheel: TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
# The transformers 4.57 environment of the checkpoint load check (ream_exp/bench/legacy.py), built once
TF457_VENV ?= $(or $(REAM_EXP_CACHE),outputs/.cache)/tf457-venv
LEGACY_CHECK ?= $(CI)
ifeq ($(LEGACY_CHECK),true)
TEST_NEEDS := tf457
TEST_ENV := REAM_EXP_TF457_PYTHON=$(abspath $(TF457_VENV))/bin/python
endif
# The quantization environment (llm-compressor and its own transformers; ream_exp/quant/env.py), built once
QUANT_VENV ?= $(or $(REAM_EXP_CACHE),outputs/.cache)/quant-venv
QUANT_CHECK ?= $(CI)
ifeq ($(QUANT_CHECK),true)
TEST_NEEDS += quant-env
TEST_ENV += REAM_EXP_QUANT_PYTHON=$(abspath $(QUANT_VENV))/bin/python
endif
BENCH ?= observe
BENCH_ARGS ?=
SITE_DIR ?= outputs/site
# mkdocs-material 9.7+ prints a banner about MkDocs 2.0 on every build
DOCS_ENV := NO_MKDOCS_2_WARNING=1

.PHONY: setup demo test tf457 quant-env mutate bench bench-legacy docs docs-serve clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/ream-exp

test: setup $(TEST_NEEDS)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(TEST_ENV) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# builds $(TF457_VENV) unless it already holds transformers 4.57 (pip: torch==2.13.0, transformers==4.57.*)
tf457: setup
	$(BIN)/python -m ream_exp.bench legacy --build-only --venv $(TF457_VENV)

# builds $(QUANT_VENV) unless it already holds llm-compressor: torch first ($(TORCH), from $(TORCH_INDEX)), then
# llmcompressor==0.14.0.1 with the transformers it accepts
quant-env: setup
	REAM_EXP_QUANT_TORCH="$(TORCH)" REAM_EXP_QUANT_TORCH_INDEX="$(TORCH_INDEX)" \
		$(BIN)/python -m ream_exp.quant.env --venv $(QUANT_VENV)

# MUTANTS="name ..." runs only those mutants
mutate: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m tests.mutate $(MUTANTS)

bench: setup
	$(BIN)/python -m ream_exp.bench $(BENCH) $(BENCH_ARGS)

# Checkpoints load in transformers 4.57: builds that environment once (outputs/.cache/tf457-venv), then checks
bench-legacy: setup
	$(BIN)/python -m ream_exp.bench legacy --venv $(TF457_VENV)

# the docs extra (mkdocs, mkdocs-material) comes with the test extra that setup installs
docs: setup
	$(DOCS_ENV) $(BIN)/python -m mkdocs build --strict --site-dir $(SITE_DIR)

docs-serve: setup
	$(DOCS_ENV) $(BIN)/python -m mkdocs serve

clean-venv:
	rm -rf $(VENV)
