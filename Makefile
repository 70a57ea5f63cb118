# Two entry points, each creating .venv and installing what it needs:
#   make demo   the loss on Qwen2.5-0.5B's lm_head shape (H=896, V=151,936) on CPU
#   make test   the test suite (Triton kernels run in Triton's interpreter when there is no GPU)
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

.PHONY: demo test lint bench
demo: $(VENV)/.installed
	$(PY) -m fused_gates.cli demo

test: $(VENV)/.installed
	$(PY) -m pytest tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks --benchmark-only
