"""Peak memory of one forward + backward in a fresh process, beyond the inputs and the gradient buffers.

CPU: peak resident set size (``ru_maxrss``) minus the resident size once the inputs exist, minus the bytes of the
gradients of hidden and weight (which every implementation must return). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource

import torch
from head_impls import IMPLEMENTATIONS, make_case


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("implementation")
    parser.add_argument("--shape", type=int, nargs=4, required=True, metavar=("B", "T", "H", "V"))
    args = parser.parse_args()
    case = make_case(*args.shape)
    before = _rss_bytes()
    IMPLEMENTATIONS[args.implementation][0](case)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = (case.hidden.numel() + case.weight.numel()) * case.hidden.element_size()
    if args.implementation == "floor_3_gemms":
        grads = 0  # the floor returns no gradient buffers; its products are its working memory
    print(json.dumps({"peak_extra_bytes": peak - before - grads, "baseline_bytes": before}))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
