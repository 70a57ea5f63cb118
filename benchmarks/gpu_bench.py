"""Timing of the fused gated policy loss at the Qwen2.5-7B head size, against its floor and peers, in one process.

    python benchmarks/gpu_bench.py OUT_DIR            # CUDA, N = 8192, H = 3584, V = 152,064, bfloat16
    python benchmarks/gpu_bench.py OUT_DIR --smoke    # tiny sizes, runs on CPU (Triton in its interpreter)

The implementations are those of ``head_impls.py`` (the pytest benchmarks use the same ones), here with this
package's two backends at the default memory budget and a large one. Timed with CUDA events (warm-up, median of
repeats), each after checking its loss (forward + backward) or log-probs (no-grad forward) against the float32
reference of ``head_impls.reference_logprobs``.

FLOP counts: one product ``h W^T`` is ``2 N H V``; forward + backward needs three (TFLOP/s below use ``6 N H V``),
a forward alone one. Peak memory is ``torch.cuda.max_memory_allocated`` minus what was allocated before the call,
minus the gradient buffers of hidden and weight for forward + backward.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import head_impls as impls


@dataclass
class Row:
    name: str
    mode: str
    ms: float | None
    peak_extra_gib: float | None
    note: str = ""
    flops: float = 0.0


def measure(call: Callable[[], torch.Tensor], case: impls.Case, mode: str, device: torch.device, warmup: int,
            repeats: int) -> tuple[float, float | None, torch.Tensor]:
    """(median ms, peak extra GiB, result of the first call)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    case.reset()
    result = call()
    peak = None
    if cuda:
        torch.cuda.synchronize()
        grads = case.gradient_bytes() if mode == "fwd_bwd" else 0
        peak = (torch.cuda.max_memory_allocated() - base - grads) / 2**30
    for _ in range(warmup):
        case.reset()
        call()
    times = []
    for _ in range(repeats):
        case.reset()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    case.reset()
    return statistics.median(times), peak, result


def check(mode: str, result: torch.Tensor, case: impls.Case, reference: torch.Tensor, bf16: bool) -> str:
    # bfloat16 logits move a log-prob by up to ~0.02 and the loss by ~1e-3 relative; a wrong result by O(1)
    if mode == "fwd_bwd":
        expected, value = impls.policy_loss(reference, case).item(), result.item()
        tolerance = (1e-2 if bf16 else 1e-4) * max(1.0, abs(expected))
        if not abs(value - expected) <= tolerance:
            return f"LOSS MISMATCH: {value:.6g} vs float32 reference {expected:.6g}"
        return ""
    error = (result.float() - reference).abs()[case.mask.bool()].max().item()
    if not error <= (1e-1 if bf16 else 1e-3):
        return f"LOG-PROB MISMATCH: largest |difference| from the float32 reference {error:.3g}"
    return ""


def probe_out_dtype(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (cpu)"
    a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
    try:
        out = torch.empty(16, 16, device=device, dtype=torch.float32)
        torch.mm(a, a, out_dtype=torch.float32, out=out)
        return "yes"
    except (TypeError, RuntimeError) as e:
        return f"no ({type(e).__name__}: falls back to float32 copies)"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (Triton interpreted)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        shape = dict(batch=16, length=512, hidden_size=3584, vocab=152064)  # N = 8192, Qwen2.5-7B head
        dtype, warmup, repeats = torch.bfloat16, args.warmup, args.repeats
    else:
        shape = dict(batch=2, length=16, hidden_size=40, vocab=1003)
        dtype, warmup, repeats = torch.float32, 0, 1
    case = impls.make_case(**shape, dtype=dtype, device=device)
    reference = impls.reference_logprobs(case)
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    print(f"device {device_name}, shape {shape}, {dtype}")

    big = 4096.0 if cuda else 0.05  # MiB: the large budget (tiny on the smoke shapes, to force several chunks)
    fwd_bwd = {
        "fused_gates triton (default budget)": impls.ours_triton,
        f"fused_gates triton ({big:g} MiB)": functools.partial(impls.ours_triton, memory_budget_mb=big),
        "fused_gates torch (default budget)": impls.ours_torch,
        f"fused_gates torch ({big:g} MiB)": functools.partial(impls.ours_torch, memory_budget_mb=big),
        **{name: impls.TRAINING[name] for name in impls.IMPLEMENTATIONS if not name.startswith("fused_gates")},
    }
    forward = {
        "fused_gates triton": impls.ours_triton_logprobs,
        "fused_gates torch": impls.ours_torch_logprobs,
        **{name: fn for name, fn in impls.FORWARD.items() if not name.startswith("fused_gates")},
    }
    rows: list[Row] = []
    failures = []
    for mode, candidates in (("fwd_bwd", fwd_bwd), ("forward", forward)):
        for name, fn in candidates.items():
            reason = impls.unavailable(name, mode, device.type) if name in impls.IMPLEMENTATIONS else None
            if reason:
                print(f"skip {mode} {name}: {reason}")
                rows.append(Row(name, mode, None, None, note=f"skipped: {reason}"))
                continue

            def call(fn=fn, mode=mode) -> torch.Tensor:
                return fn(case) if mode == "forward" else fn(case, "sigmoid")

            try:
                ms, peak, result = measure(call, case, mode, device, warmup, repeats)
            except Exception as e:  # a peer whose API changed or that ran out of memory: report, keep going
                if name.startswith("fused_gates"):
                    raise
                case.reset()
                if cuda:
                    torch.cuda.empty_cache()
                print(f"skip {mode} {name}: {type(e).__name__}: {e}")
                rows.append(Row(name, mode, None, None, note=f"failed: {type(e).__name__}: {str(e)[:200]}"))
                continue
            note = "" if name == "floor" else check(mode, result, case, reference, dtype == torch.bfloat16)
            if note:
                failures.append(f"{mode} {name}: {note}")
                print(f"!!! {mode} {name}: {note}")
            rows.append(Row(name, mode, ms, peak, note, flops=case.floor_flops(mode)))
            peak_text = f"+{peak:.2f} GiB" if peak is not None else "n/a"
            print(f"{mode:8s} {name:40s} {ms:10.2f} ms   peak {peak_text}")

    def find(mode: str, name: str) -> float | None:
        return next((r.ms for r in rows if r.mode == mode and r.name == name and r.ms), None)

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name if cuda else "cpu (smoke)",
        "python": sys.version.split()[0],
        **{dist: _version(dist) for dist in ("torch", "triton", "trl", "liger-kernel")},
        "mm_out_dtype_float32": probe_out_dtype(device),
        "shape": shape,
        "dtype": str(dtype),
        "warmup": warmup,
        "repeats": repeats,
        "failures": failures,
    }
    table = [
        "| mode | implementation | median ms | TFLOP/s | x floor | x naive | x TRL | x Liger | peak extra GiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def ratio(base: str, r: Row = r) -> str:
            x = find(r.mode, base)
            return f"{r.ms / x:.2f}" if (r.ms and x) else "-"

        tflops = f"{r.flops / (r.ms * 1e-3) / 1e12:.0f}" if r.ms and r.flops else "-"
        peak = f"{r.peak_extra_gib:.2f}" if r.peak_extra_gib is not None else "-"
        ms = f"{r.ms:.2f}" if r.ms else "-"
        table.append(f"| {r.mode} | {r.name} | {ms} | {tflops} | {ratio('floor')} | {ratio('naive_torch')} | "
                     f"{ratio('trl_chunked_logprob')} | {ratio('liger_fused_linear_grpo')} | {peak} | {r.note} |")
    header = [
        f"# Fused gated policy loss: {info['device']}",
        "",
        f"{info['date']}; torch {info['torch']}, triton {info['triton']}, trl {info['trl']}, "
        f"liger-kernel {info['liger-kernel']}; shape {shape} ({dtype}); median of {repeats} after {warmup} warm-up; "
        f"mm(out_dtype=float32): {info['mm_out_dtype_float32']}.",
        "TFLOP/s count 3 products (6 N H V) for forward + backward, one (2 N H V) for the no-grad forward; "
        "'x floor' is against three GEMMs (one for the forward rows), in the input dtype.",
        "",
    ]
    (args.out_dir / "gpu_bench.md").write_text("\n".join(header + table) + "\n")
    (args.out_dir / "gpu_bench.json").write_text(json.dumps({"info": info, "rows": [r.__dict__ for r in rows]},
                                                            indent=2))
    print("\n".join(table))
    if failures:
        print("MISMATCHES:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
