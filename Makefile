# Two entry points, each creating .venv and installing what it needs:
#   make train  the training script's embedded default: GRPO with the erf gate on a tiny local model, offline, CPU
#   make test   the test suite (Triton kernels run in Triton's interpreter when there is no GPU)
# and: make head-demo (the loss alone at Qwen2.5-0.5B's lm_head shape), make lint, make bench
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch on machines without a GPU; set TORCH_SPEC=torch to take your platform's default build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,trl,bench,dev,deepspeed]"
	touch $@

.PHONY: train head-demo test lint bench
train: $(VENV)/.installed
	$(PY) -m fused_gates.integrations.train_grpo

head-demo: $(VENV)/.installed
	$(PY) -m fused_gates.cli demo

test: $(VENV)/.installed
	$(PY) -m pytest tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks --benchmark-only

# Pure-Python wheels of the peers for a GPU machine without them (benchmarks/gpu_check.sh installs .whl/*.whl)
.PHONY: gpu-wheels
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: -d .whl "trl==1.16.0" "liger-kernel==0.8.5"
