# Two entry points, each creating .venv and installing what it needs:
#   make train  the training script's embedded default: GRPO with the erf gate on a tiny local model, offline, CPU
#   make test   the test suite (Triton kernels run in Triton's interpreter when there is no GPU)
# and: make head-demo (the loss alone at Qwen2.5-0.5B's lm_head shape), make lint, make bench,
#      make gpu-wheels / check-gpu-image / aot-report (the GPU check's preparation, below)
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
	$(PY) -m fused_gates.integrations.app.train

head-demo: $(VENV)/.installed
	$(PY) -m fused_gates.cli demo

test: $(VENV)/.installed
	$(PY) -m pytest tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks --benchmark-only

# -- The GPU check's preparation (benchmarks/gpu_check.sh) -----------------------------------------------------------
# gpu-wheels: the pure-Python peers of benchmarks/gpu_peers.txt as wheels in .whl/ (git-ignored; about 3 MB), for the
# GPU machine's Python (GPU_PYTHON_VERSION) and for this one (the dry run). Needs PyPI.
GPU_PYTHON_VERSION ?= 3.12
WHEEL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
.PHONY: gpu-wheels
gpu-wheels:
	rm -rf .whl && mkdir .whl
	for version in $(GPU_PYTHON_VERSION) $$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); do \
		$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $$version \
			--implementation cp $(WHEEL_PLATFORMS) -d .whl -r benchmarks/gpu_peers.txt || exit 1; \
	done
	@du -sh .whl && ls .whl

# A virtual environment shaped like the GPU image: torch, Triton 3.6, transformers 5.17, accelerate, peft,
# pytest-benchmark and the libraries the image has that datasets needs; no trl, liger-kernel or datasets. NumPy
# below 2.4: Triton 3.6's interpreter converts 1-element arrays with int(), which NumPy 2.4 refuses (the GPU itself
# never interprets).
GPU_IMAGE_VENV ?= .venv-gpu-image
GPU_IMAGE_PACKAGES := triton==3.6.0 transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0 peft pytest \
	pytest-benchmark hypothesis "numpy<2.4" pandas pyarrow xxhash aiohttp fsspec requests httpx tqdm pyyaml filelock \
	jinja2 psutil rich packaging safetensors tokenizers "setuptools>=68" wheel
$(GPU_IMAGE_VENV)/.installed:
	$(PYTHON) -m venv $(GPU_IMAGE_VENV)
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(GPU_IMAGE_PACKAGES)
	touch $@

# check-gpu-image: in that environment, the GPU check's dry run (the wheels alone must complete TRL's import chain),
# then the Triton 3.6 interpreter tests and the ahead-of-time compile of the launched kernels under Triton 3.6.
TRITON36_SITE := build/triton36-site
.PHONY: check-gpu-image
check-gpu-image: gpu-wheels $(GPU_IMAGE_VENV)/.installed
	PYTHON=$(GPU_IMAGE_VENV)/bin/python bash benchmarks/gpu_check.sh --dry-run build/gpu-check-dry-run
	rm -rf $(TRITON36_SITE)
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q --no-index --no-deps --no-build-isolation --target $(TRITON36_SITE) .
	PYTHONPATH=$(TRITON36_SITE) $(GPU_IMAGE_VENV)/bin/python -P -m pytest -p no:cacheprovider -q tests/test_triton_backend.py
	env -u TRITON_INTERPRET PYTHONPATH=$(TRITON36_SITE) $(GPU_IMAGE_VENV)/bin/python tests/aot/compile_kernels.py \
		--arch 80 90 --scope default

# aot-report: every launched variant (all gates and options too) for sm_80 and sm_90 under the installed Triton,
# registers and spills per variant, in build/aot-report.json (a few minutes).
.PHONY: aot-report
aot-report: $(VENV)/.installed
	env -u TRITON_INTERPRET $(PY) tests/aot/compile_kernels.py --arch 80 90 --scope all --json build/aot-report.json
