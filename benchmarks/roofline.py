"""A traffic model of the training step and of the no-grad pass, from the chunk plan the code makes.

    python benchmarks/roofline.py                       # every device and goal shape: a markdown table
    python benchmarks/roofline.py --device "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)"

The model (derived, not measured):

    predicted = flops / (GEMM_EFFICIENCY * peak) + bytes / (BANDWIDTH_EFFICIENCY * bandwidth)

``flops`` counts the lm_head products only (``2 n H V`` each; everything else is treated as free arithmetic), at
:data:`GEMM_EFFICIENCY` (0.8) of the device's dense bf16 peak. ``bytes`` is the streaming traffic charged as if it
could not overlap the products, at :data:`BANDWIDTH_EFFICIENCY` (0.85) of the DRAM bandwidth. Each line of that
traffic is itemised and tagged: ``kernel`` lines are separate memory-bound kernels (the row kernel, the zero-fill,
the final upstream scale and cast), which really do not overlap; ``gemm i/o`` lines are the products' own operand
reads and result writes (the float32 logits write, the dz reads, the reads of W, the float32 dW accumulator's
read-modify-write), which a compute-bound product partly hides. ``predicted`` charges both (an upper bound),
``low`` charges the ``kernel`` lines only (a lower bound). The floor is three products over the valid tokens at the
same GEMM efficiency, no traffic.

W is 2 V H bytes (1.09 GB at Qwen2.5-7B's head), far beyond any of these devices' L2 (40-50 MB): every product that
takes W as an operand reads it from DRAM at least once per chunk (the model charges exactly once: cuBLAS's tile
rasterisation is assumed to reuse each W panel across the chunk's row tiles).

Ours is the Triton backend's token-level path (``TritonChunks.fused_token_chunk``): per chunk of ``n`` valid tokens a
cuBLAS product into the float32 ``[n, V]`` buffer, one row kernel (two float32 reads of each logit, dz written in the
weight's dtype), then the driver's ``dh`` and ``dW`` products (``GradientAccumulator.add``: the first chunk writes
dW, later chunks read and write it), and after the pass the upstream scale and the cast of dW and dh to the inputs'
dtype. Chunk rows come from ``fused_gates.chunk_driver.planned_chunk_rows`` with the Triton backend on a ``meta``
head (nothing allocated). The peers (TRL 1.16's fused head, Liger 0.8.5's chunked torch path) are approximations
from their published designs (``ASSUMPTIONS``): their code is not read here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

GEMM_EFFICIENCY = 0.8
"""Share of the dense bf16 peak a large cuBLAS product sustains (the products here are ~1,800 x 3,584 x 152k)."""
BANDWIDTH_EFFICIENCY = 0.85
"""Share of the DRAM bandwidth a streaming kernel sustains."""
TILE_GEMM_EFFICIENCY = 0.6
"""Share of peak assumed for the no-grad pass's ``tl.dot`` tile kernel (the online softmax in its epilogue;
``kernels/triton_backend.py`` expects 55-65%)."""
GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float  # dense bf16
    bandwidth_tbs: float  # DRAM, TB/s
    l2_mb: float


DEVICES = {
    "A100": Device("A100 80GB SXM", 312.0, 2.0, 40.0),
    "H100": Device("H100 SXM", 989.0, 3.35, 50.0),
    "H200": Device("H200", 989.0, 4.8, 50.0),
}
"""The only device table: dense bf16 peak, DRAM bandwidth, L2 (looked up by :func:`device_named`)."""


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int  # N, padding included
    valid_fraction: float
    hidden: int
    vocab: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def valid_tokens(self) -> int:
        return round(self.tokens * self.valid_fraction)


SHAPES = {
    "qwen2.5-7b": Shape("qwen2.5-7b", 8192, 7 / 8, 3584, 152_064),
    "qwen2.5-1.5b": Shape("qwen2.5-1.5b", 8192, 7 / 8, 1536, 151_936),
}
"""Goal shapes (1/8 padding). Qwen2.5-0.5B at N = 2048 in float32 runs on CPU: not modelled (no device entry)."""

ASSUMPTIONS = {
    "fused_gates": (
        "Triton backend, token-level fused row kernel, no bias, temperature 1, whole head; products over the valid "
        "tokens only; dz in the weight's dtype (float32-output bf16 products available, as on the CUDA builds); "
        "upstream scale and cast as one pass per gradient ('fused') or a separate in-place scale then a cast "
        "('separate'); per-token vectors ~12 float32 per token; not counted: the O(N H) gather of the valid "
        "tokens' hidden states and scatter of dh (< 0.2 GB)"),
    "trl": (
        "TRL 1.16 fused head: 4 products over all N tokens (padding included); cuBLAS tiles of 4096 tokens x 32768 "
        "vocab, each tile's logits written in float32 and read once by the statistics kernel; backward recomputes "
        "each tile, writes dz over it in float32 (read + write), rounds it to the weight's dtype for the GEMMs "
        "(read 4 + write 2 bytes per logit), two GEMMs reading that dz; dh and dW accumulated in float32 "
        "(read-modify-write per tile, dW zero-filled first), a final cast of each; W read once per product per "
        "token tile"),
    "liger": (
        "Liger 0.8.5 chunked torch path: 4 products over all N tokens (online LSE pass, then the gradient pass "
        "recomputes each tile); 2048-token x 4096-vocab tiles; unfused torch elementwise ops on float32 tiles: "
        "~24 bytes per logit for the statistics pass (write, sub max, exp, sum) and ~40 for the gradient pass "
        "(write, log_softmax, exp, the gradient's two ops), plus the dz rounding (4 + 2) and its two GEMM reads; "
        "dW and dh accumulated in float32 (read-modify-write per token chunk)"),
}


def device_named(name: str) -> Device:
    """``A100`` / ``H100`` / ``H200`` anywhere in ``name`` (an ``nvidia-smi`` name works), else a KeyError."""
    for key, device in DEVICES.items():
        if key.lower() in name.lower():
            return device
    raise KeyError(f"no device entry for {name!r}; known: {', '.join(DEVICES)}")


# -- the plan, from the code -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    backend: str
    rows: int
    chunk_sizes: tuple[int, ...]
    bytes_per_row: int
    low_precision: bool
    buffers: dict  # name -> bytes, what the backend's allocate(rows) creates

    @property
    def chunks(self) -> int:
        return len(self.chunk_sizes)


@contextlib.contextmanager
def _meta_products(dtype: torch.dtype, float32_output_products: bool) -> Iterator[None]:
    """The products' probe cannot run on ``meta`` tensors; answer it for the meta device the way a CUDA torch with
    ``mm(..., out_dtype=float32)`` does (or does not), for the time of the plan."""
    from fused_gates import products

    key = ("meta", None, dtype)
    had, old = key in products._FLOAT32_OUTPUT, products._FLOAT32_OUTPUT.get(key)
    products._FLOAT32_OUTPUT[key] = float32_output_products
    try:
        yield
    finally:
        if had:
            products._FLOAT32_OUTPUT[key] = old
        else:
            del products._FLOAT32_OUTPUT[key]


def backend_buffers(backend: str, rows: int, vocab: int, dtype: torch.dtype, low_precision: bool) -> dict:
    """Bytes of each buffer ``allocate(rows)`` creates (``TorchChunks`` / ``TritonChunks``)."""
    acc = 8 if dtype == torch.float64 else 4
    low = dtype.itemsize if low_precision else 0
    if backend == "torch":
        block = min(2048, vocab)  # torch_backend.VOCAB_BLOCK
        out = {"logits": rows * vocab * acc, "block_a": rows * block * 4, "block_b": rows * block * 4}
    elif backend == "triton":
        out = {"logits": rows * vocab * 4}
    else:
        raise ValueError(backend)
    if low:
        out["dz"] = rows * vocab * low
    return out


def chunk_plan(backend: str, num_tokens: int, hidden: int, vocab: int, dtype: torch.dtype, budget_mb: float, *,
               needs_gradient: bool = True, float32_output_products: bool = True) -> Plan:
    """The chunks the driver takes for ``num_tokens`` (valid) tokens, by ``planned_chunk_rows`` itself."""
    from fused_gates.backends import backend_named
    from fused_gates.chunk_driver import planned_chunk_rows, token_chunks
    from fused_gates.contract import NO_GRADIENT, GradientNeeds
    from fused_gates.head import Head

    head = Head(torch.empty(vocab, hidden, dtype=dtype, device="meta"), None, 1.0, budget_mb)
    needs = GradientNeeds(True, True, False) if needs_gradient else NO_GRADIENT
    implementation = backend_named(backend)
    with _meta_products(dtype, float32_output_products):
        chunks = implementation.chunks(head, needs)
        rows = planned_chunk_rows(implementation, head, needs, num_tokens)
        per_row = chunks.bytes_per_row()
        low = chunks.low_precision
    sizes = tuple(c.stop - c.start for c in token_chunks(num_tokens, rows))
    return Plan(backend, rows, sizes, per_row, low, backend_buffers(backend, rows, vocab, dtype, low))


# -- traffic ---------------------------------------------------------------------------------------------------------


@dataclass
class Traffic:
    flops: float = 0.0
    gemm_efficiency: float = GEMM_EFFICIENCY
    lines: dict = field(default_factory=dict)  # label -> [bytes, kind]
    memory: dict = field(default_factory=dict)  # label -> bytes

    def add(self, label: str, nbytes: float, kind: str = "gemm i/o") -> None:
        entry = self.lines.setdefault(label, [0.0, kind])
        entry[0] += nbytes

    def bytes(self, kind: str | None = None) -> float:
        return sum(b for b, k in self.lines.values() if kind is None or k == kind)


def ours_training(shape: Shape, budget_mb: float, *, upstream_scale: str = "fused",
                  float32_output_products: bool = True) -> tuple[Traffic, Plan]:
    n_valid, h, v, s = shape.valid_tokens, shape.hidden, shape.vocab, shape.dtype.itemsize
    plan = chunk_plan("triton", n_valid, h, v, shape.dtype, budget_mb, float32_output_products=float32_output_products)
    dz = s if plan.low_precision else 4
    t = Traffic()
    w = s * v * h
    t.add("dh accumulator zero-fill (4 N H)", 4 * n_valid * h, "kernel")
    for i, n in enumerate(plan.chunk_sizes):
        t.flops += 3 * 2 * n * h * v
        t.add("logits product: float32 write (4 n V)", 4 * n * v)
        t.add("row kernel: two float32 reads of each logit (8 n V)", 8 * n * v, "kernel")
        t.add(f"row kernel: dz write ({dz} n V)", dz * n * v, "kernel")
        t.add(f"dh, dW products: dz reads ({2 * dz} n V)", 2 * dz * n * v)
        t.add(f"W reads, logits + dh products ({2 * s} V H per chunk; W is not L2-resident)", 2 * w)
        t.add("dh product: float32 write (4 n H)", 4 * n * h)
        t.add("dW accumulator: chunk 1 writes (4 V H), chunks 2..k read+write (8 V H)", (4 if i == 0 else 8) * v * h)
    if upstream_scale == "fused":
        t.add(f"upstream scale + cast of dW (read 4 V H, write {s} V H)", (4 + s) * v * h, "kernel")
        t.add(f"upstream scale + cast of dh (read 4 N H, write {s} N H)", (4 + s) * n_valid * h, "kernel")
    else:
        t.add(f"upstream scale in place + cast of dW (8 + 4 + {s} V H)", (12 + s) * v * h, "kernel")
        t.add(f"upstream scale in place + cast of dh (8 + 4 + {s} N H)", (12 + s) * n_valid * h, "kernel")
    t.memory.update({f"buffer {k}": b for k, b in plan.buffers.items()})
    t.memory["float32 dW accumulator (4 V H)"] = 4 * v * h
    t.memory["float32 dh accumulator (4 N H)"] = 4 * n_valid * h
    t.memory["per-token vectors (~12 float32)"] = 12 * 4 * n_valid
    return t, plan


def ours_no_grad(shape: Shape, budget_mb: float, method: str) -> tuple[Traffic, Plan | None]:
    """One product's pass for log-probs and entropy (old / reference policies): ``cublas`` chunks + the statistics
    row kernel (one float32 read per logit), or the ``tl.dot`` tile kernel (no logits written; W assumed read once
    from DRAM, the concurrent token blocks sharing its tiles through L2)."""
    n_valid, h, v, s = shape.valid_tokens, shape.hidden, shape.vocab, shape.dtype.itemsize
    t = Traffic()
    t.flops = 2 * n_valid * h * v
    if method == "dot":
        t.gemm_efficiency = TILE_GEMM_EFFICIENCY
        t.add("W read once (s V H)", s * v * h)
        return t, None
    plan = chunk_plan("triton", n_valid, h, v, shape.dtype, budget_mb, needs_gradient=False)
    t.add("logits product: float32 write (4 n V)", 4 * n_valid * v)
    t.add("statistics kernel: float32 read (4 n V)", 4 * n_valid * v, "kernel")
    t.add("W read per chunk (s V H)", s * v * h * plan.chunks)
    t.memory.update({f"buffer {k}": b for k, b in plan.buffers.items()})
    return t, plan


def _tiles(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def trl_training(shape: Shape) -> Traffic:
    n, h, v, s = shape.tokens, shape.hidden, shape.vocab, shape.dtype.itemsize
    t = Traffic()
    t.flops = 4 * 2 * n * h * v
    t.add("dW zero-fill (4 V H)", 4 * v * h, "kernel")
    t.add("dh zero-fill (4 N H)", 4 * n * h, "kernel")
    for tn in _tiles(n, 4096):
        t.add("W reads: 2 forward/recompute + 1 dh product per token tile", 3 * s * v * h)
        t.add("dW float32 read-modify-write per token tile (8 V H)", 8 * v * h)
        for tv in _tiles(v, 32768):
            logits = tn * tv
            t.add("forward tile: float32 write + statistics read (8 per logit)", 8 * logits)
            t.add("backward recompute: float32 write (4 per logit)", 4 * logits)
            t.add("dz in place, float32 read + write (8 per logit)", 8 * logits, "kernel")
            t.add(f"dz rounded to the weight dtype (4 + {s} per logit)", (4 + s) * logits, "kernel")
            t.add(f"dh, dW products: dz reads ({2 * s} per logit)", 2 * s * logits)
            t.add("dh float32 read-modify-write per vocab tile (8 t H)", 8 * tn * h)
    t.add(f"final cast of dW and dh (4 + {s} per element)", (4 + s) * (v * h + n * h), "kernel")
    t.memory["float32 tile (4096 x 32768)"] = 4 * min(n, 4096) * min(v, 32768)
    t.memory["dz tile in the weight's dtype"] = s * min(n, 4096) * min(v, 32768)
    t.memory["float32 dW accumulator (4 V H)"] = 4 * v * h
    t.memory["float32 dh accumulator (4 N H)"] = 4 * n * h
    return t


def liger_training(shape: Shape) -> Traffic:
    n, h, v, s = shape.tokens, shape.hidden, shape.vocab, shape.dtype.itemsize
    t = Traffic()
    t.flops = 4 * 2 * n * h * v
    for tn in _tiles(n, 2048):
        t.add("W reads: 2 logits passes + 1 dh product per token chunk", 3 * s * v * h)
        t.add("dW float32 read-modify-write per token chunk (8 V H)", 8 * v * h)
        logits = tn * v
        t.add("statistics pass: float32 tile ops (~24 per logit)", 24 * logits, "kernel")
        t.add("gradient pass: float32 tile ops (~40 per logit)", 40 * logits, "kernel")
        t.add(f"dz rounded to the weight dtype (4 + {s} per logit)", (4 + s) * logits, "kernel")
        t.add(f"dh, dW products: dz reads ({2 * s} per logit)", 2 * s * logits)
        t.add("dh float32 read-modify-write (8 t H) per vocab tile", 8 * tn * h * math.ceil(v / 4096))
    t.add(f"final cast of dW and dh (4 + {s} per element)", (4 + s) * (v * h + n * h), "kernel")
    t.memory["float32 tile temporaries (~5 x 2048 x 4096)"] = 5 * 4 * 2048 * 4096
    t.memory["float32 dW accumulator (4 V H)"] = 4 * v * h
    t.memory["float32 dh accumulator (4 N H)"] = 4 * n * h
    return t


# -- predictions -----------------------------------------------------------------------------------------------------


def _times(t: Traffic, device: Device) -> dict:
    gemm = t.flops / (t.gemm_efficiency * device.peak_tflops * 1e12)
    bandwidth = BANDWIDTH_EFFICIENCY * device.bandwidth_tbs * 1e12
    stream, kernels = t.bytes(), t.bytes("kernel")
    return {
        "gemm_ms": gemm * 1e3, "stream_gb": stream / 1e9, "stream_ms": stream / bandwidth * 1e3,
        "kernel_gb": kernels / 1e9, "predicted_ms": (gemm + stream / bandwidth) * 1e3,
        "low_ms": (gemm + kernels / bandwidth) * 1e3, "extra_gib": sum(t.memory.values()) / GIB,
        "lines_gb": {k: (b / 1e9, kind) for k, (b, kind) in t.lines.items()},
        "memory_gib": {k: b / GIB for k, b in t.memory.items()},
    }


def floor_ms(shape: Shape, device: Device, products: int = 3) -> float:
    return products * 2 * shape.valid_tokens * shape.hidden * shape.vocab / (
        GEMM_EFFICIENCY * device.peak_tflops * 1e12) * 1e3


def predict(device: str | Device, shape: str | Shape, budget_mb: float | None = None, *,
            implementation: str = "fused_gates", upstream_scale: str = "fused",
            float32_output_products: bool = True) -> dict:
    """The modelled step for ``implementation`` (``fused_gates``, ``trl``, ``liger``; ``fused_gates_cublas`` /
    ``fused_gates_dot``: our no-grad pass, floor one product) on ``device`` at ``shape``; ``budget_mb`` defaults to
    ``GPU_MEMORY_BUDGET_MB``. Times in ms, traffic in GB (1e9), memory in GiB."""
    from fused_gates.chunk_driver import GPU_MEMORY_BUDGET_MB

    device = device_named(device) if isinstance(device, str) else device
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    budget_mb = GPU_MEMORY_BUDGET_MB if budget_mb is None else budget_mb
    plan = None
    floor_products = 3
    if implementation == "fused_gates":
        traffic, plan = ours_training(shape, budget_mb, upstream_scale=upstream_scale,
                                      float32_output_products=float32_output_products)
        assumptions = ASSUMPTIONS["fused_gates"]
    elif implementation in ("fused_gates_cublas", "fused_gates_dot"):
        traffic, plan = ours_no_grad(shape, budget_mb, implementation.rsplit("_", 1)[1])
        floor_products = 1
        assumptions = "no-grad pass over the valid tokens, one product"
    elif implementation == "trl":
        traffic, assumptions = trl_training(shape), ASSUMPTIONS["trl"]
    elif implementation == "liger":
        traffic, assumptions = liger_training(shape), ASSUMPTIONS["liger"]
    else:
        raise ValueError(f"unknown implementation {implementation!r}")
    out = {"device": device.name, "shape": shape.name, "implementation": implementation, "budget_mb": budget_mb,
           "flops": traffic.flops, **_times(traffic, device)}
    out["floor_ms"] = floor_ms(shape, device, floor_products)
    out["ratio_to_floor"] = out["predicted_ms"] / out["floor_ms"]
    out["low_ratio_to_floor"] = out["low_ms"] / out["floor_ms"]
    if plan is not None:
        out["chunks"], out["rows"], out["bytes_per_row"] = plan.chunks, plan.rows, plan.bytes_per_row
        out["budgeted_bytes"] = plan.rows * plan.bytes_per_row
    out["assumptions"] = assumptions
    return out


# -- the report ------------------------------------------------------------------------------------------------------


def _row(p: dict) -> str:
    plan = f"{p['chunks']} x {p['rows']}" if "chunks" in p else "-"
    budget = f"{p['budget_mb']:.0f}" if p["implementation"].startswith("fused_gates") else "-"
    return (f"| {p['device']} | {p['shape']} | {budget} | {p['implementation']} | {plan} | {p['gemm_ms']:.1f} | "
            f"{p['stream_gb']:.1f} | {p['stream_ms']:.1f} | {p['predicted_ms']:.1f} | {p['low_ms']:.1f} | "
            f"{p['ratio_to_floor']:.2f} ({p['low_ratio_to_floor']:.2f}) | {p['extra_gib']:.2f} |")


def report(devices: list[Device], budgets: tuple[float, ...]) -> str:
    from fused_gates.chunk_driver import GPU_MEMORY_BUDGET_MB

    lines = [
        f"Model: GEMMs at {GEMM_EFFICIENCY:.0%} of dense bf16 peak + streaming traffic at "
        f"{BANDWIDTH_EFFICIENCY:.0%} of DRAM bandwidth; pred. charges all itemised traffic (upper bound), low "
        "only the separate kernels; floor = 3 products over the valid tokens (1 for the no-grad pass). Default budget "
        f"GPU_MEMORY_BUDGET_MB = {GPU_MEMORY_BUDGET_MB:.0f} MiB.",
        "",
        "| device | shape | budget MiB | impl | chunks x rows | GEMM ms | stream GB | stream ms | pred. ms | low ms "
        "| x floor (low) | extra GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for device in devices:
        for shape in SHAPES.values():
            for budget in budgets:
                lines.append(_row(predict(device, shape, budget)))
            for impl in ("trl", "liger"):
                lines.append(_row(predict(device, shape, implementation=impl)))
            for impl in ("fused_gates_cublas", "fused_gates_dot"):
                lines.append(_row(predict(device, shape, budgets[0], implementation=impl)))
    for shape in SHAPES.values():
        for budget in budgets:
            p = predict(devices[0], shape, budget)
            lines += ["", f"Our traffic, {shape.name}, budget {budget:.0f} MiB ({p['chunks']} chunks of {p['rows']} "
                      f"rows; budgeted {p['budgeted_bytes'] / GIB:.2f} GiB of buffers):", "",
                      "| line | kind | GB |", "|---|---|---|"]
            lines += [f"| {k} | {kind} | {gb:.2f} |" for k, (gb, kind) in p["lines_gb"].items()]
            lines.append(f"| total | | {p['stream_gb']:.2f} |")
            lines += ["", "| memory held | GiB |", "|---|---|"]
            lines += [f"| {k} | {gib:.2f} |" for k, gib in p["memory_gib"].items()]
            lines.append(f"| total | {p['extra_gib']:.2f} |")
    lines += ["", "Assumptions:"] + [f"- {k}: {v}" for k, v in ASSUMPTIONS.items()]
    return "\n".join(lines)


def main() -> int:
    from fused_gates.chunk_driver import GPU_MEMORY_BUDGET_MB

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="a name containing A100, H100 or H200 (default: all)")
    parser.add_argument("--budget", type=float, action="append", help="MiB (default: the default budget and 512)")
    parser.add_argument("--json", action="store_true", help="one predict() dict per line instead of the table")
    args = parser.parse_args()
    devices = [device_named(args.device)] if args.device else list(DEVICES.values())
    budgets = tuple(args.budget) if args.budget else (GPU_MEMORY_BUDGET_MB, 512.0)
    if args.json:
        for device in devices:
            for shape in SHAPES:
                for budget in budgets:
                    print(json.dumps(predict(device, shape, budget)))
                for impl in ("trl", "liger", "fused_gates_cublas", "fused_gates_dot"):
                    print(json.dumps(predict(device, shape, budgets[0], implementation=impl)))
        return 0
    print(report(devices, budgets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
