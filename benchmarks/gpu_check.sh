#!/usr/bin/env bash
# GPU check in one command (under 8 minutes): versions, install, `pytest -m gpu`, then the timing script.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Writes OUT_DIR/versions.txt, OUT_DIR/pytest-gpu.xml (JUnit), OUT_DIR/pytest-gpu.log, OUT_DIR/gpu_bench.{json,md}
# and OUT_DIR/gpu_bench.log. Pure-Python wheels of the peers (trl, liger-kernel) placed in .whl/ (`make gpu-wheels`)
# or benchmarks/wheels/ are installed without dependencies into a private folder, with the package itself; the
# machine's torch, triton and transformers are used as they are. Time limits: 220 s of tests, 200 s of timings.
set -uo pipefail

out="${1:?usage: gpu_check.sh OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
status=0

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi unavailable"
    python - <<'EOF'
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
EOF
} 2>&1 | tee "$out/versions.txt"

shopt -s nullglob
site="$(mktemp -d)"
wheels=(.whl/*.whl benchmarks/wheels/*.whl)
if ((${#wheels[@]})); then
    python -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "${wheels[@]}" 2>&1 | tail -n 5
else
    echo "no wheels in .whl/ or benchmarks/wheels/: TRL and Liger rows will be skipped unless already installed"
fi
# a regular (not editable) install of this checkout: kernels/ becomes fused_gates.kernels
python -m pip install --quiet --no-deps --no-build-isolation --target "$site" . 2>&1 | tail -n 5
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
python -c "import fused_gates.kernels, sys; print('fused_gates from', fused_gates.kernels.__file__)" || status=1

# the large GPU tests: bounded so that the benchmark keeps its share of the time; run from a folder where the
# checkout's own fused_gates/ does not shadow the installed package
timeout 220 python -P -m pytest -p no:cacheprovider -m gpu tests/test_gpu.py -q -rs -x --junitxml="$out/pytest-gpu.xml" 2>&1 \
    | tee "$out/pytest-gpu.log" | tail -n 40
rc=${PIPESTATUS[0]}
echo "pytest -m gpu exit code: $rc"
((rc != 0)) && status=1

timeout 200 python benchmarks/gpu_bench.py "$out" 2>&1 | tee "$out/gpu_bench.log" | tail -n 40
rc=${PIPESTATUS[0]}
echo "gpu_bench exit code: $rc"
((rc != 0)) && status=1

exit $status
