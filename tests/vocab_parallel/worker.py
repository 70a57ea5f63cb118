"""One rank of the vocabulary-parallel check (launched by tests/test_vocab_parallel.py with torch.distributed.run):
the loss with this rank's slice of the head against the whole head in the same process, for many cases.

Usage: worker.py SLICES CHECKS   (SLICES: comma-separated rows per rank, e.g. 10,15,12; CHECKS: a comma-separated
subset of float64, float32, triton, dtensor, logprobs). Exits non-zero with the first mismatch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import TOLERANCES, Run, Tolerance, assert_within, make_inputs, max_abs, output_errors

from fused_gates import gated_policy_loss, token_logprobs

BASE = dict(tau_pos=2.0, tau_neg=3.0, epsilon_low=0.2, epsilon_high=0.28, temperature=0.8)
CASES = {
    "sigmoid-grpo-token": dict(gate="sigmoid"),
    "erf-bnpo-sequence-kl": dict(gate="erf", loss_type="bnpo", importance_sampling_level="sequence", beta=0.05,
                                 use_bias_correction_kl=True),
    "arctan-dapo-entropy": dict(gate="arctan", loss_type="dapo", entropy_coef=0.05),
    "softsign-dr_grpo-kl": dict(gate="softsign", loss_type="dr_grpo", max_completion_length=9, beta=0.1),
    "clip-luspo-delta-sequence": dict(gate="clip", loss_type="luspo", delta=1.1, importance_sampling_level="sequence"),
    "cispo-dapo-entropy": dict(gate="cispo", loss_type="dapo", epsilon_high=1.2, entropy_coef=0.02),
    "vespo-dapo": dict(gate="vespo", loss_type="dapo"),
    "erf-softcap-entropy": dict(gate="erf", logit_softcap=2.0, entropy_coef=0.05),
    "sigmoid-off-policy-mask": dict(gate="sigmoid", off_policy_mask_threshold=0.05),
    "dppo-grpo-kl": dict(gate="dppo", beta=0.05, dppo_delta=0.01),
    "dppo_kl-dapo": dict(gate="dppo_kl", loss_type="dapo", dppo_delta=0.02),
    "clip-estr-current-entropy": dict(gate="clip", estr_threshold=0.05),  # the entropy of the whole vocabulary
    "m2po-bnpo-entropy": dict(gate="m2po", loss_type="bnpo", entropy_coef=0.05, m2po_threshold=0.02),
    "bapo-dapo": dict(gate="bapo", loss_type="dapo"),
    "aspo-grpo-kl": dict(gate="aspo", beta=0.05, use_bias_correction_kl=True),
    "gmpo-luspo": dict(gate="gmpo", loss_type="luspo"),
}
# float32 and the Triton interpreter: a subset
SUBSET = ("sigmoid-grpo-token", "erf-bnpo-sequence-kl", "arctan-dapo-entropy", "erf-softcap-entropy",
          "m2po-bnpo-entropy", "gmpo-luspo", "dppo_kl-dapo", "aspo-grpo-kl")
BUDGETS = (0.004, 64.0)  # several chunks (two reductions each), and one
FLOAT64, FLOAT32 = TOLERANCES[torch.float64], TOLERANCES[torch.float32]


def check(name: str, got, expected, atol: float) -> None:
    error = max_abs(got, expected)
    if not error <= atol:
        raise AssertionError(f"rank {dist.get_rank()}: {name}: max |difference| {error:.3g} > {atol:g}")


def run_case(inputs, rows: slice, options: dict, dtype, backend: str, budget: float, group, dtensor_mesh=None):
    """(sharded, whole) outputs and gradients; the whole head's gradient restricted to this rank's rows."""
    results = []
    for sharded in (True, False):
        h, w, b = inputs.leaves(dtype)
        h, w, b = (t.detach().requires_grad_() for t in (h, w, b))
        weight, bias = w, b
        kwargs = {}
        if sharded and dtensor_mesh is not None:
            from torch.distributed.tensor import Shard, distribute_tensor

            weight = distribute_tensor(w.detach(), dtensor_mesh, [Shard(0)]).requires_grad_()
            bias = distribute_tensor(b.detach(), dtensor_mesh, [Shard(0)]).requires_grad_()
        elif sharded:
            weight = w.detach()[rows].clone().requires_grad_()
            bias = b.detach()[rows].clone().requires_grad_()
            kwargs["process_group"] = group
        out = gated_policy_loss(h, weight, inputs.ids, inputs.advantages.to(dtype), inputs.mask,
                                inputs.old.to(dtype), inputs.ref.to(dtype), bias=bias, backend=backend,
                                memory_budget_mb=budget, **{**BASE, **options}, **kwargs)
        out.loss.backward()
        results.append((out, h.grad, weight, bias))
    return results


def compare(results, rows: slice, tolerance: Tolerance, label: str) -> None:
    """Every field of the sliced head's call as the whole head's: the weight / bias gradients on this rank's rows."""
    (out, h_grad, weight, bias), (whole, whole_h_grad, whole_w, whole_b) = results
    w_grad, b_grad = weight.grad, bias.grad
    if hasattr(w_grad, "to_local"):  # a DTensor gradient, sharded like its weight
        from torch.distributed.tensor import Shard

        assert w_grad.placements == (Shard(0),), w_grad.placements
        w_grad, b_grad = w_grad.to_local(), b_grad.to_local()
    errors = output_errors(Run(out, (h_grad, w_grad, b_grad)),
                           Run(whole, (whole_h_grad, whole_w.grad[rows], whole_b.grad[rows])))
    try:
        assert_within(errors, tolerance, against=f"the whole head, {label}")
    except AssertionError as error:
        raise AssertionError(f"rank {dist.get_rank()}: {error}") from None


def main() -> None:
    slices = [int(x) for x in sys.argv[1].split(",")]
    checks = set(sys.argv[2].split(","))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == len(slices), (world, slices)
    start = sum(slices[:rank])
    rows = slice(start, start + slices[rank])
    vocab = sum(slices)
    inputs = make_inputs(batch=4, length=7, hidden_size=11, vocab=vocab, seed=7, log_ratio_scale=0.3)
    # a target token on every rank's slice, in valid positions
    for r in range(world):
        inputs.ids[0, r] = sum(slices[:r]) + slices[r] // 2
        inputs.mask[0, r] = 1
    # DPPO's Top-K divergence: the behaviour's top-4 from noisy whole-head logits, ids on every rank's slice
    noisy = inputs.hidden @ inputs.weight.T + inputs.bias + torch.randn(4, 7, vocab, dtype=torch.float64,
                                                                         generator=torch.Generator().manual_seed(2))
    top = torch.log_softmax(noisy, -1).topk(4, dim=-1)
    CASES["dppo_kl-topk-bnpo"] = dict(gate="dppo_kl", loss_type="bnpo", old_topk_ids=top.indices,
                                      old_topk_logprobs=top.values, dppo_delta=0.02)
    group = dist.group.WORLD
    if "float64" in checks:
        for name, options in CASES.items():
            for budget in BUDGETS:
                compare(run_case(inputs, rows, options, torch.float64, "torch", budget, group), rows, FLOAT64,
                        f"float64 {name} budget={budget}")
    if "float32" in checks:
        for name in SUBSET:
            compare(run_case(inputs, rows, CASES[name], torch.float32, "torch", 0.004, group), rows, FLOAT32,
                    f"float32 {name}")
    if "triton" in checks:
        for name in SUBSET:
            compare(run_case(inputs, rows, CASES[name], torch.float32, "triton", 0.004, group), rows, FLOAT32,
                    f"triton {name}")
    if "dtensor" in checks:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        for name in ("sigmoid-grpo-token", "erf-softcap-entropy"):
            compare(run_case(inputs, rows, CASES[name], torch.float64, "torch", 0.004, group, mesh), rows, FLOAT64,
                    f"dtensor {name}")
    if "logprobs" in checks:
        for backend, dtype, atol in (("torch", torch.float64, 1e-12), ("triton", torch.float32, 2e-5)):
            h, w, b = inputs.leaves(dtype)
            ours = token_logprobs(h, w[rows], inputs.ids, inputs.mask, bias=b[rows], temperature=0.8,
                                  logit_softcap=3.0, backend=backend, process_group=group)
            whole = token_logprobs(h, w, inputs.ids, inputs.mask, bias=b, temperature=0.8, logit_softcap=3.0,
                                   backend=backend)
            check(f"{backend} token_logprobs logp", ours[0], whole[0], atol)
            check(f"{backend} token_logprobs entropy", ours[1], whole[1], atol)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: ok")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
