# Everything from a bare machine: `make serve` or `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup model serve lint test clean

# torch is pinned to the local CPU build first, so nothing pulls CUDA wheels.
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

setup: $(BIN)/.installed

model: setup
	$(BIN)/pdcluster fetch-model --config configs/local.yaml

serve: model
	$(BIN)/pdcluster up configs/local.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# `make test PYTEST_ARGS="-m unit"` runs a subset (markers: unit, integration, e2e, chaos).
test: lint model
	$(BIN)/python -m pytest tests --durations=40 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
