"""Markdown tables and a plot from a pytest-benchmark JSON of ``benchmarks/test_head.py`` (and
``test_grpo_step.py``), or from the rows file that ``FUSED_GATES_BENCH_ROWS`` writes as the benchmarks run.

    python benchmarks/report.py RESULT.json          # writes RESULT.md and RESULT.png beside it, prints the tables
    python benchmarks/report.py DIR/rows.jsonl       # writes DIR/rows.md (conftest.py does so after every row)

Per mode (forward + backward, forward only) and shape: the median time, TFLOP/s of the floor's flops, the ratio to
the floor (three GEMMs / one GEMM) and to the naive / TRL / Liger / torch ``linear_cross_entropy`` baselines of
the same run, the peak memory beyond inputs and gradient buffers and its ratio to naive's; then the gate sweep.
The training step's memory-budget curve (time and memory against ``memory_budget_mb``) and the end-to-end GRPO
step (fused_gates' trainer against TRL's) get tables of their own; rows that were skipped or failed are listed
with their reasons. The plot shows time and peak memory against N, one line per implementation (and head). The
header names the device, the versions and the date of the run.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ORDER = ("fused_gates", "fused_gates_dot", "fused_gates_cublas", "fused_gates_torch", "naive_torch",
         "trl_chunked_logprob", "liger_fused_linear_grpo", "torch_linear_cross_entropy", "floor")
BASELINES = {"floor": "x floor", "naive_torch": "x naive", "trl_chunked_logprob": "x TRL",
             "liger_fused_linear_grpo": "x Liger", "torch_linear_cross_entropy": "x torch LCE"}
MODE_TITLES = {"fwd_bwd": "Forward + backward (training step)", "forward": "Forward only (no-grad log-probs)"}
E2E_MODE = "grpo_step"
FLOOR_TEXT = {"fwd_bwd": "three GEMMs, 3 x 2 N H V flops", "forward": "one GEMM, 2 N H V flops"}


def load(data: dict) -> list[dict]:
    rows = []
    for bench in data["benchmarks"]:
        extra = dict(bench.get("extra_info", {}))
        name = extra.get("implementation") or (bench.get("params") or {}).get("name") or bench["name"]
        extra["implementation"] = name
        extra.setdefault("mode", "fwd_bwd")
        extra.setdefault("gate", "sigmoid")
        extra.setdefault("model", f"H={extra.get('hidden', '?')}")
        extra["median"] = bench["stats"]["median"]
        extra["rounds"] = bench["stats"]["rounds"]
        rows.append(extra)
    return rows


def _time(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.0f}" if abs(value) >= 2**20 else f"{value / 2**20:.2f}"


def _sort_key(name: str) -> tuple[int, int, str]:
    # the budget curve's rows right after the default-budget row, by budget
    budget = name.removeprefix("fused_gates_budget")
    if budget != name and budget.isdigit():
        return (ORDER.index("fused_gates"), int(budget), name)
    return (ORDER.index(name) if name in ORDER else len(ORDER), 0, name)


def _header(data: dict, rows: list[dict]) -> list[str]:
    # the LM-head rows name the device and threads; an end-to-end row only when there is nothing else
    first = next((r for r in rows if r["mode"] != E2E_MODE), rows[0]) if rows else {}
    versions = first.get("versions") or {"torch": first.get("torch")}
    machine = data.get("machine_info", {})
    device = first.get("device_name") or machine.get("cpu", {}).get("brand_raw") or machine.get("processor", "?")
    rounds = sorted({r["rounds"] for r in rows})
    return [
        f"# LM-head benchmark: {device}",
        "",
        f"Date {data.get('datetime', '?')[:10]}; " + ", ".join(f"{k} {v or 'not installed'}" for k, v in
                                                              versions.items()) + "; "
        f"{first.get('dtype', '?')} on {first.get('device', 'cpu')}, {first.get('threads', '?')} threads; "
        f"median of {'/'.join(map(str, rounds))} round(s).",
        "",
        "Ratios divide by the row of the same mode and shape (below 1: faster or smaller). Memory: peak beyond the "
        "inputs and the gradient buffers of hidden and weight (CUDA: max_memory_allocated; CPU: resident high-water "
        "mark in a fresh process). " + _checks(rows),
        "",
    ]


def _checks(rows: list[dict]) -> str:
    failed = [r for r in rows if isinstance(r.get("check"), str)]
    if failed:
        return "**Mismatches with the float32 reference:** " + "; ".join(r["check"] for r in failed) + "."
    if any(isinstance(r.get("check"), dict) for r in rows):
        return "Every loss / log-prob matched the float32 reference within the dtype's tolerance (the floor: n/a)."
    return ""


def render(data: dict) -> str:
    rows = load(data)
    lines = _header(data, rows)
    main = [r for r in rows if not r.get("sweep") and r["mode"] != E2E_MODE]
    for mode in ("fwd_bwd", "forward"):
        groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
        for r in main:
            if r["mode"] == mode:
                groups[(r["model"], r.get("tokens", 0))][r["implementation"]] = r
        if not groups:
            continue
        lines += [f"## {MODE_TITLES[mode]}", ""]
        for (model, tokens), impls in sorted(groups.items()):
            any_row = next(iter(impls.values()))
            lines += [
                f"### {model}, N = {tokens:,} (H = {any_row.get('hidden', '?')}, V = {any_row.get('vocab', 0):,}, "
                f"{any_row.get('dtype', '?')}); floor = {FLOOR_TEXT[mode]}",
                "",
                "| implementation | time | TFLOP/s | " + " | ".join(BASELINES.values())
                + " | extra memory (MiB) | x naive memory |",
                "|---|" + "---|" * (len(BASELINES) + 4),
            ]
            naive_mem = impls.get("naive_torch", {}).get("peak_extra_bytes")
            for name in sorted(impls, key=_sort_key):
                r = impls[name]
                ratios = [f"{r['median'] / impls[b]['median']:.2f}" if b in impls else "—" for b in BASELINES]
                mem = r.get("peak_extra_bytes")
                mem_ratio = f"{mem / naive_mem:.3f}" if mem is not None and naive_mem else "—"
                tflops = r.get("tflops_per_s")
                lines.append(f"| {name} | {_time(r['median'])} | {'—' if tflops is None else f'{tflops:.2f}'} | "
                             f"{' | '.join(ratios)} | {_mib(mem)} | {mem_ratio} |")
            lines.append("")
    lines += _budget_curve(main)
    lines += _end_to_end([r for r in rows if r["mode"] == E2E_MODE])
    sweep = [r for r in rows if r.get("sweep")]
    if sweep:
        model, tokens = sweep[0]["model"], sweep[0].get("tokens", 0)
        floor = next((r for r in main if r["implementation"] == "floor" and r["mode"] == "fwd_bwd"
                      and r["model"] == model and r.get("tokens") == tokens), None)
        sigmoid = next((r for r in sweep if r["gate"] == "sigmoid"), None)
        lines += [f"## Gate sweep: fused_gates, forward + backward, {model}, N = {tokens:,}", "",
                  "| gate | time | TFLOP/s | x sigmoid | x floor |", "|---|---|---|---|---|"]
        for r in sweep:
            vs_sigmoid = f"{r['median'] / sigmoid['median']:.2f}" if sigmoid else "—"
            vs_floor = f"{r['median'] / floor['median']:.2f}" if floor else "—"
            lines.append(f"| {r['gate']} | {_time(r['median'])} | {r.get('tflops_per_s', 0):.2f} | {vs_sigmoid} | "
                         f"{vs_floor} |")
        lines.append("")
    return "\n".join(lines)


def _budget_curve(rows: list[dict]) -> list[str]:
    """Training step against the memory budget, beside the default budget and the floor of the same shape."""
    curve = [r for r in rows if r.get("budget_mb") is not None and r["mode"] == "fwd_bwd"]
    if not curve:
        return []
    model, tokens = curve[0]["model"], curve[0].get("tokens")
    same = [r for r in rows if r["mode"] == "fwd_bwd" and r["model"] == model and r.get("tokens") == tokens]
    floor = next((r for r in same if r["implementation"] == "floor"), None)
    default = next((r for r in same if r["implementation"] == "fused_gates"), None)
    lines = [f"## Training step against the working-memory budget: {model}, N = {tokens:,}", "",
             "| memory_budget_mb | time | x floor | extra memory (MiB) |", "|---|---|---|---|"]
    points = sorted(curve, key=lambda r: r["budget_mb"]) + ([dict(default, budget_mb="default")] if default else [])
    for r in points:
        vs_floor = f"{r['median'] / floor['median']:.2f}" if floor else "—"
        lines.append(f"| {r['budget_mb']} | {_time(r['median'])} | {vs_floor} | {_mib(r.get('peak_extra_bytes'))} |")
    return [*lines, ""]


def _end_to_end(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    first = rows[0]
    lines = [f"## End-to-end GRPO step: {first.get('model', '?')} ({first.get('dtype', '?')}), fixed batch of "
             f"{first.get('batch', '?')} x {first.get('length', '?')} completions, generation excluded", "",
             "| trainer | time per step | x TRL | peak GPU memory (MiB) | x TRL memory |", "|---|---|---|---|---|"]
    trl = next((r for r in rows if r["implementation"] == "trl_grpo_trainer"), None)
    for r in rows:
        ratio = f"{r['median'] / trl['median']:.2f}" if trl else "—"
        peak, trl_peak = r.get("peak_bytes"), (trl or {}).get("peak_bytes")
        mem_ratio = f"{peak / trl_peak:.2f}" if peak is not None and trl_peak else "—"
        lines.append(f"| {r['implementation']} | {_time(r['median'])} | {ratio} | {_mib(peak)} | {mem_ratio} |")
    return [*lines, ""]


def rows_to_data(rows: list[dict]) -> dict:
    """The measured rows of a rows file, in the shape of a pytest-benchmark JSON."""
    measured = [r for r in rows if r.get("median") is not None]
    date = next((r["date"] for r in measured if r.get("date")), "?")
    return {"datetime": date, "benchmarks": [{"extra_info": r, "stats": {"median": r["median"], "rounds": r["rounds"]}}
                                             for r in measured]}


def render_rows(rows: list[dict]) -> str:
    data = rows_to_data(rows)
    text = render(data) if data["benchmarks"] else "# LM-head benchmark: no row measured yet\n"
    unmeasured = [r for r in rows if r.get("median") is None]
    if unmeasured:
        text += "\n## Not measured\n\n" + "\n".join(
            f"- {r['test'].split('::')[-1]}: {r['outcome']}: {r.get('reason', '')}" for r in unmeasured) + "\n"
    return text


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows_markdown(rows_file: Path, markdown: Path) -> None:
    markdown.write_text(render_rows(read_rows(rows_file)))


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in load(data) if not r.get("sweep") and r.get("budget_mb") is None and r["mode"] != E2E_MODE]
    modes = [m for m in ("fwd_bwd", "forward") if any(r["mode"] == m for r in rows)]
    if not modes:  # e.g. a run of the end-to-end step alone: nothing to plot against N
        return
    fig, axes = plt.subplots(len(modes), 2, figsize=(12, 4.2 * len(modes)), squeeze=False)
    names = sorted({r["implementation"] for r in rows}, key=_sort_key)
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    models = sorted({r["model"] for r in rows})
    styles = {model: ("-", "--", ":", "-.")[i % 4] for i, model in enumerate(models)}
    for row_axes, mode in zip(axes, modes, strict=True):
        for name in names:
            for model in models:
                points = sorted((r["tokens"], r["median"], r.get("peak_extra_bytes")) for r in rows
                                if r["mode"] == mode and r["implementation"] == name and r["model"] == model)
                if not points:
                    continue
                label = name if len(models) == 1 else f"{name} ({model})"
                style = dict(color=colors[name], linestyle=styles[model], marker="o", label=label)
                row_axes[0].plot([p[0] for p in points], [p[1] for p in points], **style)
                # a log axis cannot show a peak of zero or below (a forward that allocates nothing measurable)
                mem = [(p[0], p[2] / 2**20) for p in points if p[2] is not None and p[2] > 0]
                if mem:
                    row_axes[1].plot([m[0] for m in mem], [m[1] for m in mem], **style)
        for ax, ylabel in zip(row_axes, ("median time (s)", "peak extra memory (MiB)"), strict=True):
            ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel=ylabel, title=MODE_TITLES[mode])
            ax.grid(True, which="both", alpha=0.3)
        row_axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    header = _header(data, rows)
    # the device, then the date and versions line of the markdown header
    fig.suptitle(f"{header[0].removeprefix('# ')}\n{header[2].split('; median')[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("result", type=Path, help="pytest-benchmark JSON (--benchmark-json), or a rows.jsonl")
    args = parser.parse_args()
    if args.result.suffix == ".jsonl":
        write_rows_markdown(args.result, args.result.with_suffix(".md"))
        print(args.result.with_suffix(".md").read_text())
        return
    data = json.loads(args.result.read_text())
    table = render(data)
    args.result.with_suffix(".md").write_text(table)
    png = args.result.with_suffix(".png")
    png.unlink(missing_ok=True)
    plot(data, png)
    print(table)
    print(f"wrote {args.result.with_suffix('.md')}" + (f" and {png}" if png.exists() else " (no row to plot)"))


if __name__ == "__main__":
    main()
