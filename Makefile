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

.PHONY: setup demo test test-slow data clean-demo gpu-check gpu-wheels

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	$(BIN)/python -m wpcrack.models.weights_cache $(wildcard $(SHARED)/weights/*.pth)
	dvc config --local core.analytics false 2>/dev/null || true
	touch $@

# The end-to-end demo: synthetic data through prepare, train and evaluate of the full model, the
# classical baseline and benchmark, the tables from what was evaluated (the ablation's other rows stay
# empty: `dvc repro compare@synthetic` trains them too), then what users do most: `wpcrack predict` on
# a generated survey photo, without --scale.
SURVEY_PHOTO := data/survey/road_survey.jpg
demo: setup
	dvc repro evaluate@synthetic classical@synthetic benchmark@synthetic
	dvc repro -s compare@synthetic
	wpcrack survey-photo $(SURVEY_PHOTO)
	wpcrack predict $(SURVEY_PHOTO) --model models/synthetic/full --dataset synthetic --mm-per-pixel 1 --out reports/synthetic/predict
	$(BIN)/python -m wpcrack.evaluate.demo_summary

# The tests CI runs (slow and GPU tests are excluded by pyproject's addopts).
test: setup
	$(BIN)/pytest -q --durations=15

test-slow: setup
	$(BIN)/pytest -q -m slow

# Download (or copy from $$WPCRACK_MIRROR) and prepare the three real datasets.
data: setup
	dvc repro prepare@deepcrack prepare@cfd prepare@crack500

# The GPU check (README, "Checking a GPU machine"): the gpu tests, a short paper-profile training,
# benchmark and evaluation, stopping by itself within 7.5 minutes, into $(OUT)/gpu_check.{json,md,log}.
# `make gpu-check ARGS=--dry-run` is the tiny CPU rehearsal that CI runs (tests/test_gpu_check.py).
# It uses .venv where `make setup` made it, else $(GPU_PYTHON) (a GPU image's python3 with torch),
# which installs what it lacks from .whl/ (`make gpu-wheels`, run where PyPI is reachable).
OUT ?= reports/gpu_check
ARGS ?=
GPU_PYTHON ?= $(if $(wildcard $(VENV)/.installed),$(abspath $(BIN)/python),python3)

gpu-check:
	$(GPU_PYTHON) -m wpcrack.diagnostics.gpu_check --out $(OUT) $(ARGS)

# Wheels (CPython $(GPU_PY), x86-64, versions from constraints.txt) of what a GPU image with torch,
# numpy, pandas, opencv, scipy and pytest lacks; pydensecrf2 is built here with a Python $(GPU_PY) when
# there is one (else its source is fetched, which needs Cython 0.29 where it is built). .whl/ is
# git-ignored: copy it along with the repository to the GPU machine.
GPU_PY ?= 3.12
GPU_WHEELS := pandera pydantic pydantic-core annotated-types typing-inspection typeguard typing-extensions \
	typing-inspect mypy-extensions packaging
gpu-wheels: setup
	$(BIN)/pip download --quiet -c constraints.txt --no-deps --only-binary=:all: --python-version $(GPU_PY) \
	  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform manylinux_2_28_x86_64 -d .whl $(GPU_WHEELS)
	@py=""; for p in python$(GPU_PY) $$HOME/.pyenv/versions/$(GPU_PY)*/bin/python$(GPU_PY); do \
	  if $$p -c "" 2>/dev/null; then py=$$p; break; fi; done; \
	if [ -n "$$py" ]; then echo "pydensecrf2: building a wheel with $$py"; \
	  $$py -m pip wheel --quiet --no-deps -c constraints.txt -w .whl pydensecrf2; \
	else echo "pydensecrf2: no Python $(GPU_PY) here, fetching the source"; \
	  $(BIN)/pip download --quiet -c constraints.txt --no-deps --no-binary=:all: -d .whl pydensecrf2; fi
	@ls .whl
