"""Peak memory of one forward + backward in a fresh process, beyond the inputs and the gradient buffers.

CPU: the process's resident high-water mark (``VmHWM``, reset by exec, unlike ``ru_maxrss`` which a child inherits
from its parent) minus the resident size once the inputs exist, minus the bytes of the gradients of hidden and
weight (which every implementation must return). Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import torch
from head_impls import IMPLEMENTATIONS, make_case


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("implementation")
    parser.add_argument("--shape", type=int, nargs=4, required=True, metavar=("B", "T", "H", "V"))
    args = parser.parse_args()
    case = make_case(*args.shape)
    # forget the high-water mark of building the inputs (Linux: writing 5 to clear_refs resets VmHWM)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    IMPLEMENTATIONS[args.implementation][0](case)
    peak = _status_bytes("VmHWM")
    grads = (case.hidden.numel() + case.weight.numel()) * case.hidden.element_size()
    if args.implementation == "floor_3_gemms":
        grads = 0  # the floor returns no gradient buffers; its products are its working memory
    print(json.dumps({"peak_extra_bytes": peak - before - grads, "baseline_bytes": before}))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
