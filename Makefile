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

.PHONY: venv test test-fast demo lint format bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
