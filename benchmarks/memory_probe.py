"""Peak CPU memory of one step of an implementation in a fresh process, beyond the inputs and the gradient buffers.

    python benchmarks/memory_probe.py NAME --mode fwd_bwd|forward --shape B T H V [--gate G] [--dtype float32]

The process's resident high-water mark (``VmHWM``, reset by exec, unlike ``ru_maxrss`` which a child inherits from
its parent) minus the resident size once the inputs exist; for forward + backward also minus the bytes of the
gradients of hidden and weight, which every implementation must return (the floor's ``dh`` and ``dW`` stand in for
them). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
from head_impls import GATES, IMPLEMENTATIONS, MODES, make_case, step, warm_up


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("implementation", choices=IMPLEMENTATIONS)
    parser.add_argument("--mode", choices=MODES, default="fwd_bwd")
    parser.add_argument("--shape", type=int, nargs=4, required=True, metavar=("B", "T", "H", "V"))
    parser.add_argument("--gate", choices=GATES, default="sigmoid")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    case = make_case(*args.shape, dtype=getattr(torch, args.dtype))
    fn = step(args.implementation, args.mode)
    # imports and lazy initialisation (library code, thread pools) are not working memory of the step
    warm_up(args.implementation, args.mode, case, args.gate)
    # forget the high-water mark of building the inputs (Linux: writing 5 to clear_refs resets VmHWM)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    if args.mode == "fwd_bwd":
        fn(case, args.gate)
    else:
        fn(case)
    peak = _status_bytes("VmHWM")
    grads = case.gradient_bytes() if args.mode == "fwd_bwd" else 0
    print(json.dumps({"peak_extra_bytes": peak - before - grads, "baseline_bytes": before}))


if __name__ == "__main__":
    main()
