"""The training step of each gate relative to the sigmoid gate's, on a shared machine: interleaved rounds, minimum
over rounds of wall time and of process CPU time (other jobs inflate both, never shrink them).

    python benchmarks/gate_ratio.py --shape 8 64 --rounds 4 [--gates sigmoid,dppo,dppo_kl,...,sigmoid+estr] [--out F.md]

Forward + backward of ``gated_policy_loss`` (``backend="auto"``) at Qwen2.5-0.5B's head (H = 896, V = 151,936), the
inputs of ``head_impls.make_case`` (B x T tokens, the last 1/8 of each row masked); each gate's loss is checked
against the float32 reference of ``head_impls`` (materialised log-probs) before its times count. ``<gate>+estr`` is the
gate with the entropy-scaled trust region (``estr_threshold=0.5``, a given behaviour entropy); ``<dppo gate>+topk``
DPPO's Top-K divergence over a behaviour policy's top 20. The gate sweep of
``test_head.py`` measures the same rows with pytest-benchmark; this script is for a CPU that other work shares, where
one round each is mostly noise.
"""

from __future__ import annotations

import argparse
import time

import torch
from head_impls import make_case, ours, policy_loss, reference_logprobs

DEFAULT_GATES = ("sigmoid", "dppo", "dppo_kl", "dppo+topk", "dppo_kl+topk", "m2po", "bapo", "aspo", "gmpo", "clip+estr",
                 "sigmoid+estr")
HEAD = (896, 151_936)  # Qwen2.5-0.5B


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(8, 64), metavar=("B", "T"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--gates", default=",".join(DEFAULT_GATES))
    parser.add_argument("--out", default=None, help="write the table (markdown) here too")
    args = parser.parse_args()
    gates = args.gates.split(",")
    if "sigmoid" not in gates:
        parser.error("--gates must include sigmoid (the baseline)")
    case = make_case(*args.shape, *HEAD)
    reference = reference_logprobs(case)
    for gate in gates:  # correctness first (and the first call's one-time costs)
        case.reset()
        value, expected = ours(case, gate).item(), policy_loss(reference, case, gate).item()
        if not abs(value - expected) <= 1e-4 * max(1.0, abs(expected)):
            raise SystemExit(f"{gate}: loss {value:.8f}, float32 reference {expected:.8f}")
    wall: dict[str, list[float]] = {g: [] for g in gates}
    cpu: dict[str, list[float]] = {g: [] for g in gates}
    for _ in range(args.rounds):
        for gate in gates:
            case.reset()
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            ours(case, gate)
            cpu[gate].append(time.process_time() - start_cpu)
            wall[gate].append(time.perf_counter() - start_wall)
    base_wall, base_cpu = min(wall["sigmoid"]), min(cpu["sigmoid"])
    valid = int(case.mask.sum())
    lines = [f"Training step at Qwen2.5-0.5B's head, N = {args.shape[0] * args.shape[1]} ({valid} valid), "
             f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds (minimum of each)", "",
             "| gate | wall | x sigmoid | CPU time | x sigmoid |", "|---|---|---|---|---|"]
    for gate in gates:
        lines.append(f"| {gate} | {min(wall[gate]):.2f} s | {min(wall[gate]) / base_wall:.3f} | "
                     f"{min(cpu[gate]):.2f} s | {min(cpu[gate]) / base_cpu:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
