"""Benchmark plumbing: the benchmark modules import each other as plain modules; ``FUSED_GATES_BENCH_SET`` keeps only
its rows (the others are deselected, as ``-k`` would); and with ``FUSED_GATES_BENCH_ROWS=DIR`` every benchmark's
row goes to ``DIR/rows.jsonl`` as soon as it has run (measured, skipped with its reason, or failed with its
message), after which ``DIR/rows.md`` is rebuilt from all rows so far."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROWS_DIR = os.environ.get("FUSED_GATES_BENCH_ROWS")


def _row_sets(item) -> frozenset[str] | None:
    """The row sets an item belongs to: its ``row`` parameter's, or its module's ``ITEM_SETS`` entry (None: all)."""
    row = item.callspec.params.get("row") if hasattr(item, "callspec") else None
    if row is not None:
        return row.sets
    return getattr(item.module, "ITEM_SETS", {}).get(item.originalname)


def pytest_collection_modifyitems(config, items):
    row_set = os.environ.get("FUSED_GATES_BENCH_SET", "full")
    keep, drop = [], []
    for item in items:
        sets = _row_sets(item)
        (keep if sets is None or row_set in sets else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _row(item, report) -> dict:
    benchmark = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
    row = {"test": item.nodeid, "outcome": report.outcome}
    if report.skipped and isinstance(report.longrepr, tuple):
        row["reason"] = str(report.longrepr[2]).removeprefix("Skipped: ")
    elif report.failed:
        row["reason"] = report.longreprtext.strip().splitlines()[-1][:2000] if report.longreprtext else "failed"
    if benchmark is not None:
        row.update(benchmark.extra_info)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and getattr(stats, "rounds", 0):
            row.update({"median": stats.median, "min": stats.min, "max": stats.max, "rounds": stats.rounds})
    return row


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not ROWS_DIR or "benchmark" not in getattr(item, "fixturenames", ()):
        return
    # one row per benchmark: its call phase, or the phase that skipped or failed it before the call
    if report.when == "call" or (report.when == "setup" and not report.passed):
        from report import write_rows_markdown

        folder = Path(ROWS_DIR)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "rows.jsonl", "a") as f:
            f.write(json.dumps(_row(item, report), default=str) + "\n")
        write_rows_markdown(folder / "rows.jsonl", folder / "rows.md")
