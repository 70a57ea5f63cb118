"""LM-head benchmarks on CPU and CUDA: implementation x shape x gate x mode (and the training step's memory-budget
curve), each result checked against a float32 reference before it counts.

    pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/RUN.json
    python benchmarks/report.py benchmarks/results/RUN.json      # RUN.md (tables) and RUN.png (plots) beside it

With ``FUSED_GATES_BENCH_ROWS=DIR`` each row is also appended to ``DIR/rows.jsonl`` the moment it is measured (or
skipped, or fails) and ``DIR/rows.md`` is rebuilt (``conftest.py``): a run cut short keeps every finished row.
``benchmarks/gpu_check.sh`` runs this file that way.

Modes: ``fwd_bwd`` (a training step: loss, backward into hidden and weight) and ``forward`` (the no-grad old /
reference log-prob pass). Implementations are in ``head_impls.py``; one that is not installed, whose API this
version lacks, or that has no forward-only entry point (Liger) is skipped with a reason naming it.

Shapes by device (``FUSED_GATES_BENCH_DEVICE=cpu|cuda``, default CUDA when available):

* CUDA, bfloat16: the heads of Qwen2.5-0.5B (H=896, V=151,936) and Qwen2.5-7B (H=3584, V=152,064) at
  N = 2048, 8192 and 32768 tokens (B x 256 / 512 / 1024, the last 1/8 of each row padding), both modes; at the
  goal shape (7B head, N = 8192) also the training step at memory budgets of 256 MiB ... 4 GiB
  (``fused_gates_budget<M>``) and the no-grad pass with each Triton statistics kernel (``fused_gates_dot``,
  ``fused_gates_cublas``); a naive case whose estimated N x V buffers would not fit the free GPU memory is skipped.
  Gate sweep at the goal shape. 5 timed rounds after two untimed calls (compilation, autotuning; the second one
  measures memory).
* CPU, float32: the 0.5B head; forward + backward at N = 512 and 2048 (B=8 x T=64 / 256; N = 2048 is the headline
  comparison; there also the training step at 128 and 256 MiB, below the default 512), forward at N = 2048, and the
  gate sweep (clip, sigmoid, erf, arctan, softsign; ours only) at
  N = 512. One timed round each: a step takes 1 to 35 s here, and the spread between rounds is far below the
  differences between implementations. PyTorch's linear_cross_entropy (30-80 s a step) is measured at N = 512 only,
  which keeps the run under 10 minutes on this project's 2-core machine.

Row sets (``FUSED_GATES_BENCH_SET``, CUDA shapes): ``full`` (default, everything above), ``goal`` (the rows the
goals compare at the goal shape: ours, the floor, TRL and Liger, the budget curve, both no-grad kernels),
``goal-extra`` (the other implementations at the goal shape: naive, the torch backend, PyTorch's
linear_cross_entropy), ``small-head`` (the 0.5B head at N = 8192), ``sweep`` (the gate sweep). The GPU check runs
``goal``, the end-to-end step (``test_grpo_step.py``), then ``goal-extra``, ``small-head`` and ``sweep``.

Each benchmark checks what its implementation computed on the benchmark's inputs (the loss for ``fwd_bwd``, the
log-probs of the unpadded tokens for ``forward``) against the float32 reference of ``head_impls.reference_logprobs``
(computed once per shape) and fails with both numbers beyond the dtype's tolerance; the floor computes neither and
is not checked. ``extra_info`` holds the shape, versions, ``tflops_per_s`` (the floor's flops over the median:
3 x 2 n H V for forward + backward, 2 n H V for the forward, n the valid tokens) and ``peak_extra_bytes``: on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated before the step, minus the gradient buffers of
hidden and weight; on CPU the fresh-process ``VmHWM`` probe of ``memory_probe.py`` (skipped for the gate sweep,
whose buffers are those of the sigmoid row).

Environment overrides: ``FUSED_GATES_BENCH_SCALE=tiny`` (N / 8 and a vocabulary of about 1,000: every
parametrisation in seconds, to check the suite), ``FUSED_GATES_BENCH_PROFILE=cuda`` (the CUDA shapes, sets and
bfloat16 on whatever device runs them), ``FUSED_GATES_BENCH_ROUNDS=R``, ``FUSED_GATES_BENCH_MEMORY=0`` (no CPU
probes).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from head_impls import (
    BUDGETS_MB,
    CPU_BUDGETS_MB,
    GATES,
    STATISTICS_METHODS,
    Case,
    installed_version,
    make_case,
    naive_bytes,
    policy_loss,
    reference_logprobs,
    step,
    unavailable,
    warm_up,
)

HERE = Path(__file__).parent
DEVICE = os.environ.get("FUSED_GATES_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
PROFILE = os.environ.get("FUSED_GATES_BENCH_PROFILE", DEVICE)
SCALE = os.environ.get("FUSED_GATES_BENCH_SCALE", "full")
ROW_SET = os.environ.get("FUSED_GATES_BENCH_SET", "full")
CUDA = DEVICE == "cuda"
DTYPE = torch.bfloat16 if PROFILE == "cuda" else torch.float32
ROUNDS = int(os.environ.get("FUSED_GATES_BENCH_ROUNDS", "5" if CUDA else "1"))
CPU_MEMORY_PROBE = os.environ.get("FUSED_GATES_BENCH_MEMORY", "1") != "0"
ROW_SETS = ("full", "goal", "goal-extra", "small-head", "sweep")
if PROFILE not in ("cpu", "cuda") or SCALE not in ("full", "tiny") or ROW_SET not in ROW_SETS:
    raise ValueError(f"FUSED_GATES_BENCH_PROFILE={PROFILE!r} / _SCALE={SCALE!r} / _SET={ROW_SET!r}: expected "
                     f"cpu|cuda, full|tiny and one of {', '.join(ROW_SETS)}")

# (hidden size, vocabulary) of the lm_heads; tiny keeps V > H so that the same code paths run
MODELS = {"qwen2.5-0.5b": (896, 151_936), "qwen2.5-7b": (3584, 152_064)}
TINY_MODELS = {"qwen2.5-0.5b": (32, 1000), "qwen2.5-7b": (48, 1003)}
# float32 differs from the reference by summation order only; bfloat16 logits carry 2^-9 relative rounding, i.e.
# up to about 0.02 on a log-prob here, and averaging over tokens shrinks it in the loss; a wrong result is off by O(1)
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}  # relative to max(1, |reference loss|)
LOGPROB_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-1}  # largest absolute difference over the tokens


@dataclass(frozen=True)
class Shape:
    model: str
    batch: int
    length: int

    @property
    def length_at_scale(self) -> int:
        return self.length if SCALE == "full" else max(8, self.length // 8)

    @property
    def tokens(self) -> int:
        return self.batch * self.length_at_scale

    @property
    def head(self) -> tuple[int, int]:
        return (MODELS if SCALE == "full" else TINY_MODELS)[self.model]

    @property
    def id(self) -> str:
        return f"{self.model}-N{self.tokens}"

    @property
    def logical(self) -> str:
        """The shape's name at full scale (what the goals refer to), whatever the scale."""
        return f"{self.model}-B{self.batch}xT{self.length}"


@dataclass(frozen=True)
class Row:
    mode: str
    name: str
    shape: Shape
    sets: frozenset[str]

    @property
    def id(self) -> str:
        return f"{self.shape.id}-{self.name}"


TRAINING_NAMES = ("fused_gates", "floor", "trl_chunked_logprob", "liger_fused_linear_grpo", "naive_torch",
                  "fused_gates_torch", "torch_linear_cross_entropy")
FORWARD_NAMES = ("fused_gates", *STATISTICS_METHODS, "floor", "trl_chunked_logprob", "naive_torch", "fused_gates_torch",
                 "torch_linear_cross_entropy")
BUDGET_NAMES = tuple(f"fused_gates_budget{mb}" for mb in BUDGETS_MB)
CPU_BUDGET_NAMES = tuple(f"fused_gates_budget{mb}" for mb in CPU_BUDGETS_MB)

# the rows the goals compare (training step: ours, floor, TRL, Liger and the budget curve; no-grad pass: ours with
# each kernel, floor, TRL); the other implementations at the goal shape form the set goal-extra
GOAL_NAMES = frozenset({"fused_gates", "floor", "trl_chunked_logprob", "liger_fused_linear_grpo", *BUDGET_NAMES,
                        *STATISTICS_METHODS})

if PROFILE == "cuda":
    GOAL_SHAPE = Shape("qwen2.5-7b", 16, 512)  # N = 8192: the shape of the performance goals
    SMALL_HEAD_SHAPE = Shape("qwen2.5-0.5b", 16, 512)
    SWEEP_SHAPE = GOAL_SHAPE

    def _sets(shape: Shape, name: str) -> frozenset[str]:
        if shape == GOAL_SHAPE:
            return frozenset({"full", "goal" if name in GOAL_NAMES else "goal-extra"})
        return frozenset({"full", "small-head"} if shape == SMALL_HEAD_SHAPE else {"full"})

    _shapes = [GOAL_SHAPE, SMALL_HEAD_SHAPE] + [Shape(m, b, t) for m in MODELS for b, t in ((8, 256), (32, 1024))]
    ROWS = [Row("fwd_bwd", name, s, _sets(s, name)) for s in _shapes
            for name in (TRAINING_NAMES[:4] + (BUDGET_NAMES if s == GOAL_SHAPE else ()) + TRAINING_NAMES[4:])]
    ROWS += [Row("forward", name, s, _sets(s, name)) for s in _shapes for name in FORWARD_NAMES]
else:
    _cpu_sets = frozenset({"full"})
    SWEEP_SHAPE = Shape("qwen2.5-0.5b", 8, 64)
    _headline = Shape("qwen2.5-0.5b", 8, 256)
    ROWS = [Row("fwd_bwd", name, s, _cpu_sets) for s in (Shape("qwen2.5-0.5b", 8, 64), _headline)
            for name in TRAINING_NAMES[:1] + (CPU_BUDGET_NAMES if s == _headline else ()) + TRAINING_NAMES[1:]]
    ROWS += [Row("forward", name, Shape("qwen2.5-0.5b", 8, 256), _cpu_sets) for name in FORWARD_NAMES]
SWEEP_SETS = frozenset({"full", "sweep"})


def _params(mode: str) -> list:
    # in table order, shape-major, so that consecutive benchmarks share the cached inputs and reference; conftest.py
    # deselects the rows outside FUSED_GATES_BENCH_SET
    return [pytest.param(row, id=row.id) for row in ROWS if row.mode == mode]


def _device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


VERSIONS = {dist: installed_version(dist) for dist in ("torch", "triton", "trl", "liger-kernel", "fused-gates")}


@functools.lru_cache(maxsize=2)  # the shapes of one mode come in order; two keep the CPU sweep's N = 512 inputs
def _case(shape: Shape) -> Case:
    return make_case(shape.batch, shape.length_at_scale, *shape.head, dtype=DTYPE, device=DEVICE)


@functools.cache  # N floats per shape: the slow materialised computation runs once per shape
def _reference(shape: Shape) -> torch.Tensor:
    return reference_logprobs(_case(shape))


@functools.cache
def _warm_up(name: str, mode: str, gate: str, shape: Shape) -> None:
    warm_up(name, mode, _case(shape), gate)


def _probe_cpu_memory(name: str, mode: str, shape: Shape, gate: str) -> int:
    command = [sys.executable, str(HERE / "memory_probe.py"), name, "--mode", mode, "--gate", gate,
               "--dtype", str(DTYPE).removeprefix("torch."),
               "--shape", str(shape.batch), str(shape.length_at_scale), *map(str, shape.head)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
    if result.returncode != 0:
        pytest.fail(f"memory probe of {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def _cuda_peak(call, case: Case, mode: str) -> int:
    case.reset()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    grads = case.gradient_bytes() if mode == "fwd_bwd" else 0
    return torch.cuda.max_memory_allocated() - before - grads


def _check(name: str, mode: str, gate: str, shape: Shape, result: torch.Tensor, case: Case) -> str | dict:
    """The comparison with the reference, or the message of a mismatch."""
    reference = _reference(shape)
    if mode == "fwd_bwd":
        expected = policy_loss(reference, case, gate).item()
        value = result.item()
        tolerance = LOSS_TOLERANCE[DTYPE] * max(1.0, abs(expected))
        error = abs(value - expected)
        if not error <= tolerance:  # also catches NaN
            return (f"{name} ({gate}, {shape.id}) computes loss {value:.8f}; the float32 reference "
                    f"{expected:.8f} (|difference| {error:.3g} > tolerance {tolerance:.3g})")
    else:
        valid = case.mask.bool()
        difference = (result.float() - reference).abs()[valid]
        worst = int(difference.argmax()) if difference.numel() else 0
        error = float(difference.max()) if difference.numel() else 0.0
        value, expected = float(result.float()[valid][worst]), float(reference[valid][worst])
        tolerance = LOGPROB_TOLERANCE[DTYPE]
        if not error <= tolerance:
            return (f"{name} ({shape.id}) log-prob of valid token {worst}: {value:.6f}; the float32 reference "
                    f"{expected:.6f} (largest |difference| {error:.3g} > tolerance {tolerance:.3g})")
    return {"value": value, "reference": expected, "error": error, "tolerance": tolerance}


# PyTorch's chunked linear_cross_entropy takes 30-80 s a step here at N = 2048 (65 s at N = 512, memory 2-14 MiB in
# the full run of 2026-11-28): measured on CPU at the smallest training shape only, without the memory probe, so
# that the whole CPU run stays under 10 minutes.
SLOW_ON_CPU = "torch_linear_cross_entropy"


def _cpu_time_budget_skip(name: str, mode: str, shape: Shape) -> str | None:
    smallest = min(row.shape.tokens for row in ROWS if row.mode == "fwd_bwd")
    if CUDA or SCALE != "full" or name != SLOW_ON_CPU or (mode == "fwd_bwd" and shape.tokens == smallest):
        return None
    return (f"{name} is measured on CPU at N = {smallest} (training step) only: 30-80 s a step at N = 2048 would "
            "push the CPU run past 10 minutes")


def _budget_mb(name: str) -> int | None:
    return int(name.removeprefix("fused_gates_budget")) if name.startswith("fused_gates_budget") else None


def _run(benchmark, mode: str, name: str, shape: Shape, gate: str = "sigmoid", sweep: bool = False) -> None:
    h, v = shape.head
    # what a skipped or failed row still reports (conftest.py writes it to the rows file)
    benchmark.extra_info.update({
        "implementation": name, "mode": mode, "gate": gate, "sweep": sweep, "model": shape.model,
        "shape": shape.logical, "tokens": shape.tokens, "batch": shape.batch, "length": shape.length_at_scale,
        "hidden": h, "vocab": v, "dtype": str(DTYPE).removeprefix("torch."), "device": DEVICE,
        "budget_mb": _budget_mb(name), "scale": SCALE,
    })
    reason = unavailable(name, mode, DEVICE) or _cpu_time_budget_skip(name, mode, shape)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"gate sweep {shape.id}" if sweep else f"{mode} {shape.id}"
    case = _case(shape)
    fn = step(name, mode)

    def call() -> torch.Tensor:
        out = fn(case, gate) if mode == "fwd_bwd" else fn(case)
        if CUDA:
            torch.cuda.synchronize()  # pytest-benchmark reads the host clock
        return out

    if CUDA and name == "naive_torch":
        torch.cuda.empty_cache()  # blocks cached by earlier benchmarks count as used in mem_get_info
        need, (free, _) = naive_bytes(case, mode), torch.cuda.mem_get_info()
        if need > 0.9 * free:
            pytest.skip(f"naive_torch at {shape.id}: its N x V buffers need about {need / 2**30:.0f} GiB, "
                        f"{free / 2**30:.0f} GiB free on {_device_name()}")
    _warm_up(name, mode, gate, shape)
    setup = case.reset if mode == "fwd_bwd" else None
    peak = None
    try:
        if CUDA:
            case.reset()
            call()  # compilation, autotuning, caches
            peak = _cuda_peak(call, case, mode)
        result = benchmark.pedantic(call, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    except torch.OutOfMemoryError as e:
        case.reset()
        torch.cuda.empty_cache()
        pytest.skip(f"{name} at {shape.id} ran out of GPU memory: {str(e).splitlines()[0]}")
    finally:
        case.reset()
    check = None if name == "floor" else _check(name, mode, gate, shape, result, case)
    if not CUDA and CPU_MEMORY_PROBE and not sweep and name != SLOW_ON_CPU and not isinstance(check, str):
        peak = _probe_cpu_memory(name, mode, shape, gate)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "device_name": _device_name(), "threads": torch.get_num_threads(), "versions": VERSIONS,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "valid_tokens": case.valid_tokens, "floor_flops": case.floor_flops(mode),
        "tflops_per_s": case.floor_flops(mode) / median / 1e12, "peak_extra_bytes": peak, "check": check,
    })
    if isinstance(check, str):
        # after extra_info, so that a saved JSON marks the row (pytest-benchmark may keep a failed benchmark's stats)
        pytest.fail(check)


@pytest.mark.parametrize("row", _params("fwd_bwd"))
def test_fwd_bwd(benchmark, row: Row) -> None:
    _run(benchmark, "fwd_bwd", row.name, row.shape)


@pytest.mark.parametrize("row", _params("forward"))
def test_forward(benchmark, row: Row) -> None:
    _run(benchmark, "forward", row.name, row.shape)


ITEM_SETS = {"test_gate_sweep": SWEEP_SETS}  # conftest.py deselects what the chosen set does not hold


@pytest.mark.parametrize("gate", GATES)
def test_gate_sweep(benchmark, gate: str) -> None:
    _run(benchmark, "fwd_bwd", "fused_gates", SWEEP_SHAPE, gate, sweep=True)
