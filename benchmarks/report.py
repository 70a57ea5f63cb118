"""Markdown table from a pytest-benchmark JSON: ``python benchmarks/report.py RESULT.json [--out TABLE.md]``.

Medians, the ratio to the three-GEMM floor and to the naive / TRL / Liger baselines measured in the same run,
and the peak memory beyond inputs and gradient buffers (``extra_info.peak_extra_bytes``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASELINES = ("floor_3_gemms", "naive_torch", "trl_chunked_logprob", "liger_fused_linear_grpo")


def render(data: dict) -> str:
    rows = {}
    for bench in data["benchmarks"]:
        name = bench["params"]["name"] if bench.get("params") else bench["name"]
        rows[name] = (bench["stats"]["median"], bench.get("extra_info", {}))
    machine = data.get("machine_info", {})
    info = next(iter(rows.values()))[1] if rows else {}
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
        f"{info.get('threads', '?')} threads; torch {info.get('torch', '?')}; {data.get('datetime', '')[:10]}. "
        f"Shape: {info.get('tokens', '?')} tokens, H={info.get('hidden', '?')}, V={info.get('vocab', '?'):,}, "
        f"{info.get('dtype', '?')}, gate {info.get('gate', '?')}; forward + backward, median of the rounds.",
        "",
        "| implementation | time (s) | x floor | x naive | x TRL | x Liger | extra memory (MiB) | x naive memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    naive_mem = rows.get("naive_torch", (None, {}))[1].get("peak_extra_bytes")
    for name, (median, extra) in rows.items():
        ratios = []
        for base in BASELINES:
            ratios.append(f"{median / rows[base][0]:.2f}" if base in rows else "—")
        mem = extra.get("peak_extra_bytes")
        mem_text = f"{mem / 2**20:,.0f}" if mem is not None else "—"
        mem_ratio = f"{mem / naive_mem:.3f}" if mem is not None and naive_mem else "—"
        lines.append(f"| {name} | {median:.2f} | {' | '.join(ratios)} | {mem_text} | {mem_ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("result", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    table = render(json.loads(args.result.read_text()))
    if args.out:
        args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
