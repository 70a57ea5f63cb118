"""Rows sharded by sequence on CPU (gloo, 2 and 3 processes, and a 2 x 2 sequence x vocabulary mesh, launched here):
each rank's positions of every row give the unsharded call's loss, metrics and EUR, its part of the per-token outputs
and of the hidden gradient, and a share of the weight / bias gradient whose sum over the ranks is the whole one --
float64 to 1e-10 over every gate and TRL objective x loss type x importance-sampling level and every option (KL,
bias correction, entropy bonus and mask, sampler ratio, off-policy mask, vespo's shape, groups, dapo's normaliser,
per-token advantages, fractional masks, soft-cap, non-finite tokens dropped, on-policy, packed rows, a user's Gate),
on uneven slicings with an empty slice and on ring attention's load-balanced chunks, with a rank without a valid
token, a row entirely on one rank and a fully masked row; float32 and the Triton kernels (interpreter) on a subset;
TRL's entropy mask over the ranks; and ranks that disagree, or whose own arguments fail, all stop with an error that
names the argument."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_inputs, run_distributed

from fused_gates import gated_policy_loss, high_entropy_mask, token_logprobs

WORKER = Path(__file__).parent / "sequence_parallel" / "worker.py"

LAUNCHES = {  # (processes, checks, vocabulary ranks)
    "2-sequence-ranks": (2, "float64,float32,triton,logprobs,entropy_mask,errors", 1),
    "3-sequence-ranks": (3, "float64,logprobs,entropy_mask", 1),
    "2x2-sequence-by-vocabulary": (4, "float64,logprobs", 2),
}


def _launch(processes: int, checks: str, vocab_ranks: int):
    return run_distributed(processes, [str(WORKER), checks, str(vocab_ranks)], env={"TRITON_INTERPRET": "1"})


@pytest.fixture(scope="module")
def launched() -> dict:
    return {}


@pytest.mark.parametrize("launch", LAUNCHES, ids=LAUNCHES.keys())
def test_sharded_rows_match_the_unsharded_call(launch, launched):
    processes, checks, vocab_ranks = LAUNCHES[launch]
    result = _launch(processes, checks, vocab_ranks)
    launched[launch] = result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count(": ok (") == processes, result.stdout


ERRORS = {  # the worker's case -> the error every rank raises (the refusing rank: its own)
    "rows": "ValueError: hidden: the ranks of sequence_group disagree on B (rows): [4, 3] by rank",
    "option": "ValueError: tau_pos: the ranks of sequence_group disagree on its value: [2.0, 2.5] by rank",
    "advantages": "ValueError: advantages: the ranks of sequence_group disagree on its values",
    "value": "ValueError: hidden: 1 token(s) where the mask is set have non-finite hidden states",
    "logprobs-option": "ValueError: temperature: the ranks of sequence_group disagree on its value: [0.7, 0.8]",
    "batch-statistic": "ValueError: sequence_group: this gate reads a statistic of the whole batch (m2po, bapo)",
}


def test_ranks_that_disagree_all_get_an_error_naming_the_argument(launched):
    result = launched.get("2-sequence-ranks") or _launch(*LAUNCHES["2-sequence-ranks"])
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout  # the ranks print concurrently: their lines may interleave, so count the messages
    for case, message in ERRORS.items():
        assert out.count(f": {case}: {message}") == 2, (case, out)
    refused = "ValueError: completion_ids: expected shape [4, 7] (B, T of hidden), got [4, 6]"
    assert out.count(f"rank 1: argument: {refused}") == 1, out
    assert out.count("rank 0: argument: ValueError: sequence_group: rank 1 of the group refused its arguments "
                     f"({refused})") == 1, out


@pytest.mark.parametrize("function", ["gated_policy_loss", "token_logprobs"])
def test_a_sequence_group_without_torch_distributed_is_refused(function):
    inputs = make_inputs(batch=2, length=3, hidden_size=5, vocab=7)
    with pytest.raises(ValueError, match=r"sequence_group: torch\.distributed is not initialised"):
        if function == "gated_policy_loss":
            gated_policy_loss(inputs.hidden, inputs.weight, inputs.ids, inputs.advantages, sequence_group=object())
        else:
            token_logprobs(inputs.hidden, inputs.weight, inputs.ids, sequence_group=object())
    assert not torch.distributed.is_initialized()


def test_context_parallel_example_runs_agrees_and_counts_only_per_row_traffic(tmp_path):
    """The torchrun example at a tiny size: every rank agrees with the unsharded call, and the sequence axis carries
    the fingerprint and six all-reduces at sequence level (checks, row totals, two whole-row sums, the loss and
    metrics' sum and maximum) whose bytes do not grow with T."""
    rows = []
    for length in (16, 48):
        out = tmp_path / f"cp{length}.jsonl"
        result = run_distributed(2, ["-m", "fused_gates.integrations.app.context_parallel", "--batch", "3",
                                     "--length", str(length), "--hidden-size", "8", "--vocab", "37", "--level",
                                     "sequence", "--out", str(out)])
        assert result.returncode == 0, result.stderr[-4000:]
        rows.append([json.loads(line) for line in out.read_text().splitlines()])
    for row in rows[0] + rows[1]:
        assert max(row["errors"].values()) < 1e-5, row
        assert row["collectives"] == {"all_gather_object (sequence)": 1, "all_reduce (sequence)": 6}, row
    assert [r["bytes"] for r in rows[0]] == [r["bytes"] for r in rows[1]]  # T does not change the traffic


def _trl_high_entropy_mask(entropies, mask, threshold):
    """TRL 1.16's ``GRPOTrainer.get_high_entropy_mask`` on one process."""
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    return (entropies * mask.float() >= torch.quantile(local, threshold)) & mask.bool()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_high_entropy_mask_on_one_process_is_trls(dtype):
    """The radix selection's order statistics and torch.quantile's interpolation, on ties, a negative rounding, masks
    without a valid token and the extreme quantiles (the sharded form: the workers above)."""
    g = torch.Generator().manual_seed(4)
    for trial in range(300):
        shape = tuple(torch.randint(1, 7, (2,), generator=g).tolist())
        entropies = (torch.rand(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
        if trial % 3 == 0:
            entropies = (entropies * 2).round() / 2
        entropies.view(-1)[0] = -1e-7
        mask = (torch.rand(shape, generator=g) > (0.3 if trial % 10 else 1.0)).long()
        threshold = (0.0, 1.0, 0.5)[trial % 3] if trial < 30 else float(torch.rand(1, generator=g))
        assert torch.equal(high_entropy_mask(entropies, mask, threshold),
                           _trl_high_entropy_mask(entropies, mask, threshold)), (trial, threshold)
    with pytest.raises(ValueError, match=r"threshold: must be in \[0, 1\]"):
        high_entropy_mask(entropies, mask, 1.5)


def test_token_logprobs_without_a_mask_computes_every_token():
    """The token plan without a mask (every token computed; the sharded calls above pass none too)."""
    inputs = make_inputs(batch=2, length=3, hidden_size=5, vocab=7)
    logp, entropy = token_logprobs(inputs.hidden, inputs.weight, inputs.ids)
    expected = torch.log_softmax(inputs.hidden @ inputs.weight.T, -1)
    assert torch.allclose(logp, expected.gather(-1, inputs.ids.unsqueeze(-1)).squeeze(-1), atol=1e-12)
    assert torch.allclose(entropy, -(expected.exp() * expected).sum(-1), atol=1e-12)
