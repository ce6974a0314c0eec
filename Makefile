# Two commands on a fresh machine: `make test` and `make demo`. Each builds .venv first when it is missing
# or older than pyproject.toml / this Makefile.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The local CPU build; a GPU user installs a CUDA torch into .venv first (it is kept), or sets TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Two worker processes (one thread each, see tests/conftest.py): the 2-core machine stays busy without
# oversubscription. PYTEST_ARGS="-n 0" runs in one process.
PYTEST_ARGS ?= -n 2

.PHONY: venv test test-fast demo lint format bench clean mutate

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	# nnunet-test: nnunetv2 for tests/test_external_nnunet.py; torch pinned to the one installed above, or
	# torchvision (pulled by nnunetv2) would replace a CPU torch with the newest CUDA build
	$(BIN)/pip install --quiet -e ".[dev,nnunet-test]" "torch==$$($(BIN)/python -c 'import torch; print(torch.__version__)')"
	# PyPI's torchvision (pulled in through timm) is built for the CUDA torch: beside a CPU torch its operators
	# fail to load and break every `import lightning`. robustseg never needs it, so a broken one is removed.
	$(BIN)/python -c "import torchvision" 2>/dev/null || $(BIN)/pip uninstall --quiet -y torchvision
	# the real LiTS-117 CT; --no-deps because the package pins an ancient torch
	$(BIN)/pip install --quiet --no-deps "liver-ct-segmentation-package==1.6.0"
	touch $(STAMP)

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/attacks.py
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/mamba.py

# Mutation testing of the attack library (mutmut; config in pyproject.toml [tool.mutmut]) on a copy in runs/mutate,
# niced (MUTATE_NICE), MUTATE_JOBS workers; prints the score and rewrites docs/mutation_survivors.md (each survivor,
# its change and why it survives; fails when one is unclassified or the score is under 90 %).
MUTATE_DIR ?= runs/mutate
MUTATE_JOBS ?= 2
MUTATE_NICE ?= 10
mutate: $(STAMP)
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/pip install --quiet -e ".[mutation]"
	rm -rf $(MUTATE_DIR) && mkdir -p $(MUTATE_DIR)
	cp -r robustseg tests conf pyproject.toml $(MUTATE_DIR)/
	cd $(MUTATE_DIR) && OMP_NUM_THREADS=1 WANDB_MODE=disabled nice -n $(MUTATE_NICE) $(CURDIR)/$(BIN)/mutmut run \
		--max-children $(MUTATE_JOBS) > mutmut.log 2>&1 || { tail -c 3000 mutmut.log; exit 1; }
	$(BIN)/python scripts/mutation_report.py --dir $(MUTATE_DIR)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
