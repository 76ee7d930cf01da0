# Fresh-machine entry points: each target creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# A pinned torch first, so that no dependency pulls a multi-GB CUDA build where a CPU wheel is wanted.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup train test test-slow lint docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,sweep,bench]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(BIN)/python train.py $(ARGS)

# One torch thread per test process unless the caller sets it: on a loaded 2-core machine two OpenMP threads spin
# against each other (and against the DDP tests' second process), 5-20x slower per test.
test test-slow: export OMP_NUM_THREADS ?= 1

# Exit code 5 means no test was collected.
test: setup
	$(BIN)/python -m pytest $(ARGS) || [ $$? -eq 5 ]

lint: setup
	$(BIN)/ruff check lit_deltasam tests benchmarks train.py eval.py predict.py landscape.py
	$(BIN)/mypy

# The docs site (mkdocs.yml): strict, so a broken link, anchor or API reference fails; offline.
$(VENV)/.docs-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test-slow: setup
	$(BIN)/python -m pytest -m slow $(ARGS) || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache site
