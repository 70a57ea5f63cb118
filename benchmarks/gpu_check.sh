#!/usr/bin/env bash
# The GPU check in one command, within 8 minutes, on a CUDA machine that has torch, triton and transformers but no
# network: installs this checkout and the pure-Python peers, runs the bfloat16 tests at real sizes, then the
# benchmarks (the same driver as `pytest benchmarks/ --benchmark-only`), and prints one line per performance goal.
#
#   make gpu-wheels                                 # once, on a machine with PyPI: the peers' wheels into .whl/
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine (carry .whl/ there with the checkout)
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR  # anywhere: every step that needs no CUDA (CI runs it)
#
# Steps, each bounded so that the later ones keep their share of the time (FUSED_GATES_CHECK_SECONDS, default 470):
#  1. versions -> OUT/versions.txt
#  2. install -> OUT/install.log: a regular (not editable) install of this checkout into a private folder, with the
#     wheels of benchmarks/gpu_peers.txt that this Python lacks (from .whl/, no index, no dependencies), then the
#     requirement and import check of benchmarks/peer_wheels.py (trl.trainer.utils, which imports datasets,
#     included). Everything afterwards runs with this folder on PYTHONPATH and with `python -P` (or as a script in
#     benchmarks/), so the checkout's own fused_gates/ (which has no fused_gates.kernels) never shadows the install.
#  3. tests -> OUT/tests.log: `pytest -m gpu tests/test_gpu.py` (bfloat16 at the 7B / 0.5B heads against float64).
#  4. benchmarks -> OUT/bench.log, and every row the moment it is measured -> OUT/rows.jsonl + OUT/rows.md, in order
#     of importance (benchmarks/plan.py lists them): the goal rows (7B head, N = 8192: training step against the
#     floor, TRL and Liger, the memory-budget curve, the no-grad pass with each kernel), the end-to-end GRPO step
#     (1.5B model, fused_gates' trainer against TRL's), the other implementations at the goal shape, the 0.5B head,
#     the gate sweep.
#     With two GPUs or more, the vocabulary-parallel head against gathering the whole head, per rank ->
#     OUT/tensor_parallel.jsonl (fused_gates.integrations.tensor_parallel).
#  5. goals -> OUT/goals.txt, one line per goal (MET / NOT MET / NOT MEASURED with the numbers).
# The dry run installs and imports the same way (into a scratch folder), lists the planned rows, collects the GPU
# tests, runs the goal rows and the end-to-end step at a tiny scale on the CPU (ours by the torch backend) and evaluates
# the goals on those rows; it exits 0 when all of that works. Exit status: 0 when every step passed (an unmet goal
# is a result, not a failure), 1 when a step failed or was cut at the deadline, 2 for a usage error or no CUDA.
set -uo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
fi
out="${1:?usage: gpu_check.sh [--dry-run] OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
python="${PYTHON:-python3}"
deadline=$((SECONDS + ${FUSED_GATES_CHECK_SECONDS:-470}))
status=0

fail() {
    echo "FAILED: $*"
    status=1
}

# seconds for a step: its cap, or what is left before the deadline (0 when too little is left to start it)
budget() {
    local cap=$1 left=$((deadline - SECONDS))
    ((left < cap)) && cap=$left
    ((cap < 15)) && cap=0
    echo "$cap"
}

# run "$@" for at most $1 seconds (SIGINT first, so that pytest writes its summary), appending to log $2
bounded() {
    local seconds=$1 log=$2 rc
    shift 2
    if ((seconds == 0)); then
        echo "not started: the deadline has passed ($*)" | tee -a "$log"
        return 124
    fi
    timeout --signal=INT --kill-after=15 "$seconds" "$@" >>"$log" 2>&1
    rc=$?
    ((rc == 124)) && echo "stopped after ${seconds} s: $*" | tee -a "$log"
    return $rc
}

# -- 1. versions -----------------------------------------------------------------------------------------------
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    echo "checkout $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$([[ -n "$(git -C "$repo" status \
        --porcelain 2>/dev/null)" ]] && echo ' (with local changes)')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
    "$python" - <<'EOF'
import importlib.metadata, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for dist in ("triton", "transformers", "accelerate", "peft", "numpy", "pytest", "pytest-benchmark", "trl",
             "liger-kernel", "datasets"):
    try:
        print(dist, importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        print(dist, "not installed")
EOF
} 2>&1 | tee "$out/versions.txt"
cuda=$("$python" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if ((dry_run == 0 && cuda == 0)); then
    echo "no CUDA device visible to $python: run with --dry-run on a machine without a GPU"
    exit 2
fi

# -- 2. install ---------------------------------------------------------------------------------------------------
site="$(mktemp -d "${TMPDIR:-/tmp}/fused-gates-site.XXXXXX")"
trap 'rm -rf "$site"' EXIT
{
    shopt -s nullglob
    wheels=("$repo"/.whl/*.whl)
    pins=()
    if ((${#wheels[@]})); then
        mapfile -t pins < <("$python" benchmarks/peer_wheels.py missing benchmarks/gpu_peers.txt)
        echo "peers to install from .whl/: ${pins[*]:-none}"
    else
        echo "no wheels in .whl/ (make gpu-wheels on a machine with PyPI): the rows of missing peers will be skipped"
    fi
    # one pip call for the checkout and the peers: one target folder, built without an index (setuptools >= 68 of
    # this Python); the build's chatter goes to the log only when it fails
    if "$python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-build-isolation \
        --no-compile --find-links "$repo/.whl" --target "$site" "$repo" "${pins[@]}" >"$site.pip.log" 2>&1; then
        echo "installed into $site: $(cd "$site" && ls -d -- *.dist-info | sed 's/.dist-info//' | tr '\n' ' ')"
    else
        cat "$site.pip.log"
        fail "pip install of this checkout and the peers (make gpu-wheels again? setuptools >= 68?)"
    fi
    rm -f "$site.pip.log"
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$python" benchmarks/peer_wheels.py check "$site" \
        || fail "an import of the package or a peer (see above)"
    echo "[$SECONDS s] installed"
} 2>&1 | tee "$out/install.log"
grep -q "^FAILED" "$out/install.log" && status=1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -P -c "import fused_gates.kernels" 2>/dev/null; then
    echo "fused_gates.kernels does not import from $site: nothing to check"
    exit 1
fi

pytest=("$python" -P -m pytest -p no:cacheprovider -q -rs)
bench=("${pytest[@]}" --benchmark-only --benchmark-columns=min,median,max,rounds)
export FUSED_GATES_BENCH_ROWS="$out"
: >"$out/tests.log"
rm -f "$out/rows.jsonl" "$out/rows.md"  # rows of this run only
: >"$out/bench.log"

if ((dry_run)); then
    # -- 3-5 without CUDA: the plan, the GPU tests' collection, a tiny run of the rows and the goals ---------------
    "$python" benchmarks/plan.py || fail "listing the planned rows"
    bounded "$(budget 120)" "$out/tests.log" "${pytest[@]}" -m gpu --collect-only tests/test_gpu.py \
        || fail "collecting the GPU tests (tests.log)"
    echo "[$SECONDS s] GPU tests: $(grep -c '::' "$out/tests.log") collected"
    # the CUDA rows at a tiny scale on the CPU (ours through the torch backend; the Triton-only rows skip, naming why)
    smoke=(env -u TRITON_INTERPRET FUSED_GATES_BENCH_PROFILE=cuda FUSED_GATES_BENCH_SCALE=tiny
        FUSED_GATES_BENCH_DEVICE=cpu FUSED_GATES_BENCH_MEMORY=0 FUSED_GATES_BENCH_ROUNDS=1)
    bounded "$(budget 400)" "$out/bench.log" "${smoke[@]}" FUSED_GATES_BENCH_SET=goal "${bench[@]}" \
        benchmarks/test_head.py || fail "the goal rows at tiny scale (bench.log)"
    echo "[$SECONDS s] goal rows at tiny scale done"
    bounded "$(budget 200)" "$out/bench.log" "${smoke[@]}" "${bench[@]}" benchmarks/test_grpo_step.py \
        || fail "the end-to-end step at tiny scale (bench.log)"
else
    # -- 3. the bfloat16 tests at real sizes ------------------------------------------------------------------------
    bounded "$(budget 130)" "$out/tests.log" "${pytest[@]}" -m gpu tests/test_gpu.py || fail "pytest -m gpu (tests.log)"
    tail -n 15 "$out/tests.log"
    echo "[$SECONDS s] tests done"
    # -- 4. the benchmarks, in order of importance (benchmarks/plan.py lists the rows) -------------------------------
    for step in goal:200 e2e:110 goal-extra:60 small-head:45 sweep:30; do
        row_set=${step%%:*}
        if [[ $row_set == e2e ]]; then
            bounded "$(budget "${step#*:}")" "$out/bench.log" "${bench[@]}" benchmarks/test_grpo_step.py \
                || fail "the end-to-end GRPO step (bench.log)"
        else
            bounded "$(budget "${step#*:}")" "$out/bench.log" env FUSED_GATES_BENCH_SET="$row_set" "${bench[@]}" \
                benchmarks/test_head.py || fail "benchmark rows of set $row_set (bench.log)"
        fi
        echo "[$SECONDS s] benchmarks: $row_set done"
    done
    # -- 4b. with two GPUs or more: the vocabulary-parallel head against gathering the whole head on every rank -------
    gpus=$("$python" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if ((gpus >= 2)); then
        for mode in sharded gathered; do  # one launch per mode, so that each peak is its own; run outside the checkout
            (cd "$out" && bounded "$(budget 60)" "$out/bench.log" "$python" -m torch.distributed.run \
                --nproc-per-node "$gpus" -m fused_gates.integrations.tensor_parallel --hidden-size 3584 \
                --vocab 152064 --batch 8 --length 1024 --benchmark "$mode" --out "$out/tensor_parallel.jsonl") \
                || fail "the tensor-parallel $mode rows (bench.log)"
        done
        echo "[$SECONDS s] tensor-parallel rows done ($gpus GPUs)"
    else
        echo "tensor-parallel rows: not measured ($gpus GPU visible; they need two or more)"
    fi
fi
grep -E "(passed|failed|error|skipped|deselected).* in [0-9.]+s" "$out/bench.log" | sed 's/^/benchmarks: /'

# -- the traffic model's predictions for this device (all modelled devices in the dry run), beside the rows ----------
device_name=$("$python" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" \
    2>/dev/null || true)
"$python" benchmarks/roofline.py ${device_name:+--device "$device_name"} >"$out/predictions.md" \
    || fail "the traffic model (benchmarks/roofline.py)"
echo "predictions (benchmarks/roofline.py, a model, not a measurement): $out/predictions.md"
grep -E "^\| .*\| fused_gates \|" "$out/predictions.md" | head -n 4

# -- 5. one line per goal -------------------------------------------------------------------------------------------
"$python" benchmarks/goals.py "$out/rows.jsonl" | tee "$out/goals.txt" || fail "evaluating the goals"
echo "rows: $out/rows.md ($(grep -c . "$out/rows.jsonl" 2>/dev/null || echo 0) rows); $((SECONDS)) s in all;" \
    "exit status $status"
exit $status
