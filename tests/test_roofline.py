"""The traffic model of benchmarks/roofline.py: its chunk plan and buffers are those the driver makes and allocates,
and its bookkeeping has the properties the design rests on (a fourth product costs, fewer chunks cost less)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import fused_gates.chunk_driver as chunk_driver
from fused_gates import gated_policy_loss
from fused_gates.products import float32_output_products
from fused_gates.torch_backend import TorchChunks

_SPEC = importlib.util.spec_from_file_location(
    "fused_gates_benchmarks_roofline", Path(__file__).resolve().parents[1] / "benchmarks" / "roofline.py")
roofline = sys.modules.setdefault(_SPEC.name, importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(roofline)

B, T, H, V = 3, 11, 16, 301  # odd sizes; V above the torch backend's 2048-column block is not needed here


def _run_loss(dtype: torch.dtype, budget_mb: float) -> tuple[list[int], list[slice], list[int]]:
    """Runs the torch backend and returns the rows ``plan_chunk_rows`` gave, the chunks accumulated and the bytes
    of each tensor ``TorchChunks.allocate`` created."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=generator).to(dtype).requires_grad_(True)
    weight = (0.1 * torch.randn(V, H, generator=generator)).to(dtype).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=generator)
    advantages = torch.tensor([1.0, -0.5, 0.25])
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 8:] = False  # 30 valid tokens
    planned, chunks, allocated = [], [], []
    plan, add, allocate = chunk_driver.plan_chunk_rows, chunk_driver.GradientAccumulator.add, TorchChunks.allocate

    def recording_plan(*args, **kwargs):
        planned.append(plan(*args, **kwargs))
        return planned[-1]

    def recording_add(self, rows, *args, **kwargs):
        chunks.append(rows)
        return add(self, rows, *args, **kwargs)

    def recording_allocate(self, rows):
        allocate(self, rows)
        tensors = (self.logits, self.block_a, self.block_b, self.dz_copy)
        allocated.extend(t.numel() * t.element_size() for t in tensors if t is not None)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunk_driver, "plan_chunk_rows", recording_plan)
        patch.setattr(chunk_driver.GradientAccumulator, "add", recording_add)
        patch.setattr(TorchChunks, "allocate", recording_allocate)
        out = gated_policy_loss(hidden, weight, ids, advantages, mask, backend="torch", memory_budget_mb=budget_mb)
        out.loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    return planned, chunks, allocated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_and_buffers_are_the_drivers(dtype):
    valid = B * T - 3
    direct = dtype == torch.float32 or float32_output_products(torch.device("cpu"), dtype)
    per_row = roofline.chunk_plan("torch", valid, H, V, dtype, 1.0, float32_output_products=direct).bytes_per_row
    budget_mb = 7.5 * per_row / 2**20  # 7 rows fit: 5 chunks of 6 rows over the 30 valid tokens
    model = roofline.chunk_plan("torch", valid, H, V, dtype, budget_mb, float32_output_products=direct)
    planned, chunks, allocated = _run_loss(dtype, budget_mb)
    # (1) the plan: the driver planned once, took the model's rows, accumulated the model's chunks
    assert planned == [model.rows]
    assert model.chunks == len(chunks) > 2
    assert [c.stop - c.start for c in chunks] == list(model.chunk_sizes)
    assert sum(model.chunk_sizes) == valid
    # (2) the buffers: what allocate created, buffer by buffer, is what the model counts, and fills the budget rows
    assert sorted(allocated) == sorted(model.buffers.values())
    assert sum(allocated) == model.rows * model.bytes_per_row
    assert ("dz" in model.buffers) == (dtype != torch.float32 and direct)


def test_ours_pays_three_products_and_trl_four():
    ours = roofline.predict("NVIDIA H100 80GB HBM3", "qwen2.5-7b")
    trl = roofline.predict("H100", "qwen2.5-7b", implementation="trl")
    assert ours["predicted_ms"] <= trl["predicted_ms"]
    shape = roofline.SHAPES["qwen2.5-7b"]
    assert ours["flops"] == 3 * 2 * shape.valid_tokens * shape.hidden * shape.vocab
    assert trl["flops"] == 4 * 2 * shape.tokens * shape.hidden * shape.vocab
    assert ours["gemm_ms"] == pytest.approx(ours["floor_ms"])


def test_dw_traffic_follows_the_chunk_count():
    shape = roofline.SHAPES["qwen2.5-7b"]
    big = roofline.predict("H100", shape, 16384.0)
    small = roofline.predict("H100", shape, 512.0)
    assert big["chunks"] < small["chunks"]
    assert big["ratio_to_floor"] < small["ratio_to_floor"]
    vh = shape.vocab * shape.hidden
    for p in (big, small):
        (dw_gb, _), = [v for k, v in p["lines_gb"].items() if k.startswith("dW accumulator")]
        assert dw_gb * 1e9 == pytest.approx((4 + 8 * (p["chunks"] - 1)) * vh)
        (w_gb, _), = [v for k, v in p["lines_gb"].items() if k.startswith("W reads")]
        assert w_gb * 1e9 == pytest.approx(2 * 2 * vh * p["chunks"])
    # per-logit traffic does not depend on the chunking
    for key in ("logits product: float32 write (4 n V)", "row kernel: two float32 reads of each logit (8 n V)"):
        assert big["lines_gb"][key][0] == pytest.approx(small["lines_gb"][key][0])


def test_default_plan_and_memory_at_the_goal_shape():
    """The Triton plan at the default budget (4 chunks of 1,792 rows over 7,168 valid tokens) and what it holds:
    the buffers the budget counts plus the float32 accumulators it does not."""
    p = roofline.predict("H200", "qwen2.5-7b")
    assert (p["chunks"], p["rows"]) == (4, 1792)
    shape = roofline.SHAPES["qwen2.5-7b"]
    buffers = sum(v for k, v in p["memory_gib"].items() if k.startswith("buffer"))
    assert buffers * roofline.GIB == 1792 * shape.vocab * 6  # float32 logits + bfloat16 dz
    assert p["memory_gib"]["float32 dW accumulator (4 V H)"] * roofline.GIB == 4 * shape.vocab * shape.hidden
    assert p["extra_gib"] * roofline.GIB > p["budget_mb"] * 2**20
