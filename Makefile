# One entry point for set-up, the demo and the tests (see README).
PYTHON ?= python3
VENV ?= .venv
SHARED ?= ../shared
BIN := $(VENV)/bin

# Offline defaults: the shared mirror of the public datasets and no telemetry.
export WPCRACK_MIRROR ?= $(if $(wildcard $(SHARED)/datasets),$(abspath $(SHARED)/datasets),)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test test-slow data clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	$(BIN)/python -m wpcrack.models.weights_cache $(wildcard $(SHARED)/weights/*.pth)
	dvc config --local core.analytics false 2>/dev/null || true
	touch $@

# The end-to-end demo: synthetic data through prepare, train, evaluate, compare and benchmark.
demo: setup
	dvc repro compare@synthetic benchmark@synthetic
	$(BIN)/python -m wpcrack.demo_summary

# The tests CI runs (slow and GPU tests are excluded by pyproject's addopts).
test: setup
	$(BIN)/pytest -q

test-slow: setup
	$(BIN)/pytest -q -m slow

# Download (or copy from $$WPCRACK_MIRROR) and prepare the three real datasets.
data: setup
	dvc repro prepare@deepcrack prepare@cfd prepare@crack500
