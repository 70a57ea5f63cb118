"""One line per performance goal, read off the rows that the benchmarks wrote (``FUSED_GATES_BENCH_ROWS``).

    python benchmarks/goals.py OUT/rows.jsonl

The goals, at the Qwen2.5-7B head with N = 8192 tokens (1/8 padding), H = 3584, V = 152,064, bfloat16, on a GPU:
the training step within 1.15x of the three bare products over the valid tokens, at least 1.3x faster than TRL
1.16's fused LM head with SAPO and faster than Liger's fused linear GRPO loss; the no-grad log-prob pass within
1.1x of one bare product; at most 2 GiB of extra memory at the default budget, and a low-memory budget (<= 512 MiB)
within 1.35x of the floor; the end-to-end GRPO step faster than TRL's with a lower peak. Each line says MET, NOT MET
or NOT MEASURED (naming the missing row and why it is missing), with the numbers it compared. Rows of a tiny-scale
or CPU run are evaluated the same way and say so: they exercise the arithmetic, not the goal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from report import read_rows

GOAL_SHAPE = "qwen2.5-7b-B16xT512"
GIB = 2**30


def _find(rows: list[dict], mode: str, implementation: str, shape: str | None = GOAL_SHAPE) -> dict | None:
    found = [r for r in rows if r.get("mode") == mode and r.get("implementation") == implementation
             and (shape is None or r.get("shape") == shape) and not r.get("sweep")]
    return found[-1] if found else None


def _measured(row: dict | None) -> bool:
    return row is not None and row.get("median") is not None and not isinstance(row.get("check"), str)


def _why_missing(row: dict | None, what: str) -> str:
    if row is None:
        return f"no {what} row at {GOAL_SHAPE}" if what in ("fused_gates", "peer") else f"no {what} row"
    if isinstance(row.get("check"), str):
        return f"{what} did not match the reference: {row['check']}"
    return f"{what} {row.get('outcome', 'not measured')}: {row.get('reason', '')}".strip()


def _ms(row: dict) -> str:
    return f"{row['median'] * 1e3:.2f} ms"


def _ratio_goal(label: str, ours: dict | None, base: dict | None, limit: float, *, faster_by: bool = False) -> str:
    """``ours / base <= limit`` (or ``base / ours >= limit`` with ``faster_by``)."""
    for row, what in ((ours, "fused_gates"), (base, "peer")):
        if not _measured(row):
            return f"{label}: NOT MEASURED ({_why_missing(row, what)})"
    if faster_by:
        speedup = base["median"] / ours["median"]
        met = speedup >= limit
        detail = f"{base['implementation']} {_ms(base)} / {ours['implementation']} {_ms(ours)} = {speedup:.2f}x"
    else:
        ratio = ours["median"] / base["median"]
        met = ratio <= limit
        detail = f"{ours['implementation']} {_ms(ours)} / {base['implementation']} {_ms(base)} = {ratio:.2f}x"
    return f"{label}: {'MET' if met else 'NOT MET'} ({detail})"


def goal_lines(rows: list[dict]) -> list[str]:
    ours = _find(rows, "fwd_bwd", "fused_gates")
    floor = _find(rows, "fwd_bwd", "floor")
    lines = [
        _ratio_goal("training step <= 1.15x the 3-product floor", ours, floor, 1.15),
        _ratio_goal("training step >= 1.3x faster than TRL 1.16 fused LM head + SAPO", ours,
                    _find(rows, "fwd_bwd", "trl_chunked_logprob"), 1.3, faster_by=True),
        _ratio_goal("training step faster than Liger fused linear GRPO", ours,
                    _find(rows, "fwd_bwd", "liger_fused_linear_grpo"), 1.0, faster_by=True),
    ]
    forward_floor = _find(rows, "forward", "floor")
    forward = [_find(rows, "forward", name) for name in ("fused_gates", "fused_gates_dot", "fused_gates_cublas")]
    line = _ratio_goal("no-grad log-prob pass <= 1.1x one product", forward[0], forward_floor, 1.1)
    variants = [f"{r['implementation']} {r['median'] / forward_floor['median']:.2f}x" for r in forward[1:]
                if _measured(r) and _measured(forward_floor)]
    lines.append(line + (f"; variants: {', '.join(variants)}" if variants else ""))

    if not _measured(ours) or ours.get("peak_extra_bytes") is None:
        why = _why_missing(ours, "fused_gates") if not _measured(ours) else \
            "the fused_gates row has no peak memory: CUDA measures it, CPU only with the memory probe"
        lines.append(f"extra memory <= 2 GiB at the default budget: NOT MEASURED ({why})")
    else:
        extra = ours["peak_extra_bytes"]
        lines.append(f"extra memory <= 2 GiB at the default budget: {'MET' if extra <= 2 * GIB else 'NOT MET'} "
                     f"({extra / GIB:.2f} GiB beyond inputs and gradients)")
    low = [r for r in rows if r.get("mode") == "fwd_bwd" and r.get("shape") == GOAL_SHAPE
           and (r.get("budget_mb") or 1e9) <= 512 and _measured(r)]
    if not low or not _measured(floor):
        lines.append("low-memory budget (<= 512 MiB) within 1.35x of the floor: NOT MEASURED (no measured budget row "
                     "<= 512 MiB" + ("" if _measured(floor) else " or no floor row") + ")")
    else:
        best = min(low, key=lambda r: r["median"])
        ratio = best["median"] / floor["median"]
        memory = best.get("peak_extra_bytes")
        memory_text = "" if memory is None else f", {memory / 2**20:.0f} MiB extra"
        verdict = "MET" if ratio <= 1.35 else "NOT MET"
        lines.append(f"low-memory budget (<= 512 MiB) within 1.35x of the floor: {verdict}"
                     f" (budget {best['budget_mb']} MiB: {_ms(best)} / floor {_ms(floor)} = {ratio:.2f}x"
                     f"{memory_text})")

    fused = _find(rows, "grpo_step", "fused_gates_grpo_trainer", shape=None)
    trl = _find(rows, "grpo_step", "trl_grpo_trainer", shape=None)
    if not (_measured(fused) and _measured(trl)):
        missing = _why_missing(fused, "fused_gates trainer") if not _measured(fused) else _why_missing(trl, "TRL")
        lines.append(f"end-to-end GRPO step faster than TRL with a lower peak: NOT MEASURED ({missing})")
    else:
        faster = fused["median"] < trl["median"]
        peaks = fused.get("peak_bytes"), trl.get("peak_bytes")
        lower = None if None in peaks else peaks[0] < peaks[1]
        verdict = "MET" if faster and lower else "NOT MEASURED (no peak memory)" if lower is None and faster else \
            "NOT MET"
        memory = "" if None in peaks else f"; peak {peaks[0] / GIB:.2f} vs {peaks[1] / GIB:.2f} GiB"
        lines.append(f"end-to-end GRPO step ({fused.get('model')}) faster than TRL with a lower peak: {verdict} "
                     f"({_ms(fused)} vs {_ms(trl)} per step = {fused['median'] / trl['median']:.2f}x{memory})")
    return lines


def context(rows: list[dict]) -> str:
    measured = [r for r in rows if r.get("median") is not None]
    if not measured:
        return "no measured row"
    first = measured[0]
    scale = first.get("scale", "full")
    caveat = "" if scale == "full" and first.get("device") == "cuda" else \
        " - not the goal's conditions: these lines check the arithmetic only"
    versions = first.get("versions") or {}
    return (f"{first.get('device_name', '?')} ({first.get('device', '?')}), scale {scale}, "
            + ", ".join(f"{k} {v}" for k, v in versions.items()) + caveat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=Path)
    args = parser.parse_args()
    rows = read_rows(args.rows) if args.rows.exists() else []
    print(f"goals ({context(rows)}):")
    for line in goal_lines(rows):
        print(f"  GOAL {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
