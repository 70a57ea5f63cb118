"""One rank of the vocabulary-parallel check of the sampler's support (launched by
tests/test_sampler_support_vocab_parallel.py): kept sets and replayed thresholds spanning the slices, against the
whole head in the same process.

Usage: support_worker.py SLICES   (comma-separated rows per rank). Exits non-zero with the first mismatch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the loss worker's cases

from helpers import TOLERANCES, make_inputs
from worker import check, compare, run_case

from fused_gates import support, token_logprobs

CASES = {
    "top_k": dict(gate="sigmoid", top_k=4),
    "top_p-entropy": dict(gate="erf", top_p=0.8, entropy_coef=0.05),
    "min_p-sequence": dict(gate="arctan", min_p=0.1, importance_sampling_level="sequence"),
    "all_three-softcap-kl": dict(gate="softsign", top_k=9, top_p=0.7, min_p=0.02, logit_softcap=2.0, beta=0.05),
    "per_row": dict(gate="clip", top_k=torch.tensor([0, 3, 50, 6]),
                    top_p=torch.tensor([0.6, 1.0, 0.9, 0.75], dtype=torch.float64)),
}


def main() -> None:
    slices = [int(x) for x in sys.argv[1].split(",")]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    start = sum(slices[:rank])
    rows = slice(start, start + slices[rank])
    vocab = sum(slices)
    inputs = make_inputs(batch=4, length=7, hidden_size=11, vocab=vocab, seed=7, log_ratio_scale=0.3)
    for r in range(world):  # a target token on every rank's slice
        inputs.ids[0, r] = sum(slices[:r]) + slices[r] // 2
        inputs.mask[0, r] = 1
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(3)
    kept = torch.rand(4, 7, vocab, generator=g) < 0.3  # every set spans the slices
    kept.scatter_(2, inputs.ids.unsqueeze(2), True)
    kept_ids = torch.full((4, 7, vocab), -1, dtype=torch.int64)
    for b in range(4):
        for t in range(7):
            ids = kept[b, t].nonzero().squeeze(1)
            kept_ids[b, t, : ids.numel()] = ids.flip(0)
    cases = dict(CASES, kept_sets=dict(gate="sigmoid", kept_token_ids=kept_ids, entropy_coef=0.02))

    def compare_with_mass(results, label, tolerance):
        compare(results, rows, tolerance, label)
        (out, *_), (whole, *_) = results
        check(f"{label} kept_mass", out.kept_mass, whole.kept_mass, tolerance.per_token)

    # the support as columns (default) and as a mask; 2 candidates: every top-p row past them (histograms all-reduced)
    for candidates, sparse in ((support.REPLAY_CANDIDATES, support.SPARSE_SUPPORT_MAX), (support.REPLAY_CANDIDATES, 0),
                               (2, support.SPARSE_SUPPORT_MAX)):
        support.REPLAY_CANDIDATES, support.SPARSE_SUPPORT_MAX = candidates, sparse
        for name, options in cases.items():
            for budget in (0.004, 64.0):
                compare_with_mass(run_case(inputs, rows, options, torch.float64, "torch", budget, group),
                                  f"float64 {name} candidates={candidates} sparse={sparse} budget={budget}",
                                  TOLERANCES[torch.float64])
    compare_with_mass(run_case(inputs, rows, CASES["all_three-softcap-kl"], torch.float32, "triton", 0.004, group),
                      "triton float32 all_three", TOLERANCES[torch.float32])
    h, w, b = inputs.leaves(torch.float64)
    for candidates in (1024, 2):
        support.REPLAY_CANDIDATES = candidates
        ours = token_logprobs(h, w[rows], inputs.ids, inputs.mask, bias=b[rows], temperature=0.8, top_p=0.85,
                              top_k=12, return_kept_mass=True, return_kept_ids=13, process_group=group)
        whole = token_logprobs(h, w, inputs.ids, inputs.mask, bias=b, temperature=0.8, top_p=0.85, top_k=12,
                               return_kept_mass=True, return_kept_ids=13)
        for name, got, want in zip(("logp", "entropy", "kept_mass"), ours, whole, strict=False):
            check(f"token_logprobs {name} candidates={candidates}", got, want, 1e-12)
        if not torch.equal(ours[3], whole[3]):
            raise AssertionError(f"rank {rank}: the returned kept sets differ from the whole head's")
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: ok")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
