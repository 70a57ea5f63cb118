"""One rank of the sequence-parallel check (launched by tests/test_sequence_parallel.py with torch.distributed.run):
the loss with this rank's slice of every row's positions against the unsharded call in the same process, for many
cases and several slicings per launch.

Usage: worker.py CHECKS [VOCAB_RANKS]   (CHECKS: a comma-separated subset of float64, float32, triton, logprobs,
entropy_mask, errors; VOCAB_RANKS: with 2, a 2-D mesh: the world is split into sequence groups of world / 2 ranks,
each rank's head sliced by vocabulary over the 2 ranks holding the same positions). Exits non-zero with the first
mismatch.

The inputs (B = 4, T = 11) hold a fully masked row (1), a row with A = 0 (2), a row whose valid tokens all lie in
the first three positions, so on the first rank for every slicing (3), and positions 5-7 masked in every row, so
that a rank whose slice is within them has no valid token; slicings are uneven and include an empty slice and
PyTorch context_parallel's load-balanced layout (two chunks per rank, not contiguous). A few
cases pack two sequences into each row (``sequence_ids``), split across the ranks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import PER_TOKEN, TOLERANCES, Run, Tolerance, assert_within, make_inputs, max_abs, output_errors

from fused_gates import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    PAPER_GATES,
    POLICY_OBJECTIVES,
    Gate,
    gated_policy_loss,
    token_logprobs,
)
from fused_gates.sequence_parallel import high_entropy_mask

LENGTH = 11
SLICINGS = {  # positions per rank; each launch runs every slicing of its sequence-group size
    2: ([4, 7], [8, 3], "load-balanced"),
    3: ([4, 1, 6], [5, 0, 6], [3, 3, 5], "load-balanced"),
}
"""``load-balanced``: PyTorch's context_parallel layout for causal attention, the positions cut into 2 P chunks and
rank r holding chunks r and 2 P - 1 - r (not one contiguous slice)."""
CUSTOM_GATE = Gate("cauchy_squared", lambda r, tau: 1 + torch.atan(tau * (r - 1)) / tau,
                   lambda r, tau: 1 / (1 + (tau * (r - 1)) ** 2))  # a user's Gate object (arctan's maths)
BASE = dict(tau_pos=2.0, tau_neg=3.0, epsilon_low=0.2, epsilon_high=0.28, temperature=0.8, max_completion_length=13)


def option_cases(inputs) -> dict[str, dict]:
    """Every option the loss has, each at least once, several together (tensors on the full [B, T] layout)."""
    g = torch.Generator().manual_seed(3)
    shape = inputs.mask.shape
    sampling_ratio = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    entropy_mask = (torch.rand(shape, generator=g) > 0.4).double()
    sampling = inputs.old + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)
    noisy = inputs.hidden @ inputs.weight.T + inputs.bias
    top = torch.log_softmax(noisy + torch.randn(noisy.shape, generator=g, dtype=torch.float64), -1).topk(3, dim=-1)
    return {
        "clip-delta-kl-bias-correction": dict(gate="clip", delta=1.1, beta=0.05, use_bias_correction_kl=True),
        "sigmoid-entropy-bonus": dict(gate="sigmoid", entropy_coef=0.05),
        "erf-entropy-mask-bonus-sequence": dict(gate="erf", entropy_mask=entropy_mask, entropy_coef=0.03,
                                                importance_sampling_level="sequence"),
        "arctan-sampling-ratio": dict(gate="arctan", sampling_ratio=sampling_ratio),
        "softsign-off-policy-mask": dict(gate="softsign", off_policy_mask_threshold=0.05),
        "sigmoid-off-policy-sampling-logprobs-sequence": dict(gate="sigmoid", off_policy_mask_threshold=0.02,
                                                              sampling_logprobs=sampling,
                                                              importance_sampling_level="sequence"),
        "vespo-sampling-ratio-pairs": dict(gate="vespo", loss_type="dapo", sampling_ratio=sampling_ratio,
                                           vespo_k=(1.5, 2.5), vespo_lambda=(2.5, 1.5)),
        "cispo-entropy-mask": dict(gate="cispo", loss_type="dapo", epsilon_high=1.2, entropy_mask=entropy_mask),
        "erf-group-size": dict(gate="erf", group_size=2),
        "arctan-group-ids-sequence": dict(gate="arctan", group_ids=torch.tensor([7, 3, 7, 3]),
                                          importance_sampling_level="sequence"),
        "clip-dapo-num-items": dict(gate="clip", loss_type="dapo", num_items_in_batch=17),
        "sigmoid-dapo-num-items-tensor": dict(gate="sigmoid", loss_type="dapo",
                                              num_items_in_batch=torch.tensor(19.0)),
        "softsign-softcap": dict(gate="softsign", logit_softcap=2.0),
        "sigmoid-kl": dict(gate="sigmoid", beta=0.1),
        "sigmoid-on-policy": dict(gate="sigmoid", on_policy=True),
        "clip-on-policy-sequence-kl": dict(gate="clip", on_policy=True, importance_sampling_level="sequence",
                                           beta=0.02),
        "erf-token-advantages": dict(gate="erf", token_advantages=True),
        "clip-token-advantages-sequence": dict(gate="clip", token_advantages=True,
                                               importance_sampling_level="sequence"),
        "sigmoid-fractional-mask": dict(gate="sigmoid", fractional_mask=True, loss_type="bnpo"),
        "arctan-nonfinite-zero": dict(gate="arctan", on_nonfinite="zero", nonfinite=True),
        "sigmoid-no-bias": dict(gate="sigmoid", no_bias=True, loss_type="dr_grpo"),
        "custom-gate-object-sequence": dict(gate=CUSTOM_GATE, importance_sampling_level="sequence", group_size=2),
        "packed-erf-grpo-group-size": dict(packed=True, gate="erf", group_size=4),
        "packed-clip-luspo-sequence": dict(packed=True, gate="clip", loss_type="luspo",
                                           importance_sampling_level="sequence"),
        "packed-sigmoid-off-policy-entropy-mask": dict(packed=True, gate="sigmoid", off_policy_mask_threshold=0.04,
                                                       entropy_mask=entropy_mask, entropy_coef=0.03),
        "packed-vespo-sampling-ratio": dict(packed=True, gate="vespo", loss_type="dapo",
                                            sampling_ratio=sampling_ratio),
        # the gates that read more than r and need no batch statistic (m2po and bapo are refused: check_errors)
        "dppo-dapo": dict(gate="dppo", loss_type="dapo", dppo_delta=0.05),
        "dppo_kl-bnpo": dict(gate="dppo_kl", loss_type="bnpo", dppo_delta=0.02),
        "dppo-topk": dict(gate="dppo", old_topk_ids=top.indices, old_topk_logprobs=top.values, dppo_delta=0.05),
        "sigmoid-estr": dict(gate="sigmoid", estr_threshold=0.05),
        "aspo-entropy-bonus": dict(gate="aspo", entropy_coef=0.02),
        "gmpo-grpo": dict(gate="gmpo", gmpo_epsilon=0.3),
        "gmpo-bnpo-group-size": dict(gate="gmpo", loss_type="bnpo", group_size=2),
        "packed-gmpo": dict(packed=True, gate="gmpo"),
    }


def grid_cases() -> dict[str, dict]:
    """Every gate and TRL objective x every loss type x both importance-sampling levels."""
    return {f"{gate}-{loss_type}-{level}": dict(gate=gate, loss_type=loss_type, importance_sampling_level=level)
            for gate in (*PAPER_GATES, *POLICY_OBJECTIVES) for loss_type in LOSS_TYPES
            for level in IMPORTANCE_SAMPLING_LEVELS}


def make_case_inputs():
    inputs = make_inputs(batch=4, length=LENGTH, hidden_size=11, vocab=23, seed=5, log_ratio_scale=0.3)
    inputs.mask[:, 5:8] = 0
    inputs.mask[3, 3:] = 0
    inputs.mask[3, :3] = 1
    return inputs


class Shards:
    """This rank's place: its sequence group, its slice of the positions and (2-D mesh) its vocabulary slice."""

    def __init__(self, vocab_ranks: int, vocab: int):
        rank, world = dist.get_rank(), dist.get_world_size()
        self.sequence_ranks = world // vocab_ranks
        self.sequence_rank, self.vocab_rank = rank // vocab_ranks, rank % vocab_ranks
        self.sequence_group = self.vocab_group = None
        for v in range(vocab_ranks):  # every rank creates every group, in the same order
            group = dist.new_group([s * vocab_ranks + v for s in range(self.sequence_ranks)])
            if v == self.vocab_rank:
                self.sequence_group = group
        if vocab_ranks > 1:
            for s in range(self.sequence_ranks):
                group = dist.new_group([s * vocab_ranks + v for v in range(vocab_ranks)])
                if s == self.sequence_rank:
                    self.vocab_group = group
        sizes = [vocab // vocab_ranks + (1 if v < vocab % vocab_ranks else 0) for v in range(vocab_ranks)]
        start = sum(sizes[:self.vocab_rank])
        self.vocab_rows = slice(start, start + sizes[self.vocab_rank])

    def positions(self, slicing: list[int] | str) -> slice | torch.Tensor:
        if slicing == "load-balanced":
            chunks = torch.arange(LENGTH).tensor_split(2 * self.sequence_ranks)
            return torch.cat([chunks[self.sequence_rank], chunks[2 * self.sequence_ranks - 1 - self.sequence_rank]])
        start = sum(slicing[:self.sequence_rank])
        return slice(start, start + slicing[self.sequence_rank])


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def run_case(inputs, shards: Shards, cols: slice, options: dict, dtype, backend: str, budget: float | None):
    """(sharded outputs, sharded grads summed over the sequence group, unsharded outputs restricted to ``cols``,
    unsharded grads: hidden restricted to ``cols``, weight / bias to this rank's vocabulary slice)."""
    options = {**BASE, **options}
    on_policy = options.pop("on_policy", False)
    token_advantages = options.pop("token_advantages", False)
    fractional = options.pop("fractional_mask", False)
    nonfinite = options.pop("nonfinite", False)
    no_bias = options.pop("no_bias", False)
    packed = options.pop("packed", False)
    hidden = inputs.hidden.to(dtype).clone()
    if nonfinite:
        hidden[0, LENGTH - 1, 2] = float("nan")
    mask = inputs.mask.double() * torch.linspace(0.3, 1.7, LENGTH, dtype=torch.float64) if fractional else inputs.mask
    advantages = inputs.advantages.to(dtype)
    if token_advantages:
        advantages = advantages.unsqueeze(1) + 0.3 * torch.cos(torch.arange(LENGTH, dtype=dtype))
    old = None if on_policy else inputs.old.to(dtype)
    if packed:  # two sequences per row, split at an uneven position: S = 2 B, one advantage each
        split = torch.tensor([2, 6, 4, 9]).unsqueeze(1)
        rows = torch.arange(4).unsqueeze(1)
        options["sequence_ids"] = 2 * rows + (torch.arange(LENGTH) >= split).long()
        advantages = torch.cat([advantages, -0.5 * advantages.flip(0)])

    def per_token(t, sharded):
        if t is None or not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):  # [B, T] or [B, T, K]
            return t
        t = t.to(dtype) if t.is_floating_point() else t
        return t[:, cols] if sharded else t

    results = []
    for sharded in (True, False):
        h = _leaf(hidden[:, cols] if sharded else hidden)
        w = _leaf(inputs.weight.to(dtype)[shards.vocab_rows] if sharded else inputs.weight.to(dtype))
        b = None if no_bias else _leaf(inputs.bias.to(dtype)[shards.vocab_rows] if sharded else inputs.bias.to(dtype))
        kwargs = {k: per_token(v, sharded) for k, v in options.items()}
        if sharded:
            kwargs.update(sequence_group=shards.sequence_group, process_group=shards.vocab_group)
        out = gated_policy_loss(h, w, per_token(inputs.ids, sharded), per_token(advantages, sharded),
                                per_token(mask, sharded), per_token(old, sharded), per_token(inputs.ref, sharded),
                                bias=b, backend=backend, memory_budget_mb=budget, **kwargs)
        out.loss.backward()
        grads = [h.grad, w.grad, None if b is None else b.grad]
        if sharded:  # each rank's share of the head's gradient: their sum is the whole one
            for grad in grads[1:]:
                if grad is not None:
                    dist.all_reduce(grad, group=shards.sequence_group)
            results.append(Run(out, tuple(grads)))
        else:
            view = SimpleNamespace(loss=out.loss, eur=out.eur, metrics=out.metrics,
                                   **{name: getattr(out, name)[:, cols] for name in PER_TOKEN})
            w_grad = grads[1][shards.vocab_rows]
            b_grad = None if grads[2] is None else grads[2][shards.vocab_rows]
            results.append(Run(view, (grads[0][:, cols], w_grad, b_grad)))
    return results


def compare(results, tolerance: Tolerance, label: str) -> None:
    try:
        assert_within(output_errors(*results), tolerance, against=f"the unsharded call, {label}")
    except AssertionError as error:
        raise AssertionError(f"rank {dist.get_rank()}: {error}") from None


def check_everything(inputs, shards: Shards, checks: set[str]) -> int:
    ran = 0
    for slicing in SLICINGS[shards.sequence_ranks]:
        cols = shards.positions(slicing)
        label = f"slicing {slicing}"
        if "float64" in checks:
            cases = {**grid_cases(), **option_cases(inputs)}
            for i, (name, options) in enumerate(cases.items()):
                budget = 0.002 if i % 3 == 0 else None  # several chunks per rank, or one
                compare(run_case(inputs, shards, cols, options, torch.float64, "torch", budget), TOLERANCES[
                    torch.float64], f"float64 {name} ({label}, budget {budget})")
                ran += 1
        if "float32" in checks:
            for name, options in option_cases(inputs).items():
                compare(run_case(inputs, shards, cols, options, torch.float32, "torch", None),
                        TOLERANCES[torch.float32], f"float32 {name} ({label})")
                ran += 1
        if "triton" in checks:
            subset = ("sigmoid-kl", "erf-entropy-mask-bonus-sequence", "clip-delta-kl-bias-correction",
                      "softsign-off-policy-mask")
            cases = option_cases(inputs)
            for name in subset:
                compare(run_case(inputs, shards, cols, cases[name], torch.float32, "triton", 0.002),
                        TOLERANCES[torch.float32], f"triton {name} ({label})")
                ran += 1
        if "logprobs" in checks:
            for backend, dtype, atol, masked in (("torch", torch.float64, 1e-12, True),
                                                 ("torch", torch.float64, 1e-12, False),
                                                 ("triton", torch.float32, 2e-5, True)):
                h, w, b = (t.to(dtype) for t in (inputs.hidden, inputs.weight, inputs.bias))
                mask = inputs.mask if masked else None
                ours = token_logprobs(h[:, cols], w[shards.vocab_rows], inputs.ids[:, cols],
                                      None if mask is None else mask[:, cols], bias=b[shards.vocab_rows],
                                      temperature=0.8, logit_softcap=3.0, backend=backend,
                                      process_group=shards.vocab_group, sequence_group=shards.sequence_group)
                whole = token_logprobs(h, w, inputs.ids, mask, bias=b, temperature=0.8, logit_softcap=3.0,
                                       backend=backend)
                for got, want, what in ((ours[0], whole[0][:, cols], "logp"), (ours[1], whole[1][:, cols], "entropy")):
                    error = max_abs(got, want)
                    assert error <= atol, f"rank {dist.get_rank()}: {backend} token_logprobs {what} {label}: {error}"
                ran += 1
        if "entropy_mask" in checks:
            ran += check_entropy_mask(inputs, shards, cols, label)
    return ran


def trl_high_entropy_mask(entropies, mask, threshold):
    """TRL 1.16's ``GRPOTrainer.get_high_entropy_mask`` on one process (the whole batch)."""
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    return (entropies * mask.float() >= torch.quantile(local, threshold)) & mask.bool()


def check_entropy_mask(inputs, shards: Shards, cols: slice, label: str) -> int:
    """The mask from each rank's slice equals TRL's on the whole batch: ties, a negative rounding, float64
    entropies, the extreme quantiles."""
    g = torch.Generator().manual_seed(9)
    ran = 0
    for trial in range(40):
        entropies = torch.rand(inputs.mask.shape, generator=g, dtype=torch.float64) * 4
        if trial % 3 == 0:
            entropies = (entropies * 2).round() / 2  # ties
        if trial % 2:
            entropies = entropies.float()
        entropies[0, 0] = -1e-7
        threshold = (0.0, 1.0, 0.8, 0.37)[trial % 4] if trial < 8 else float(torch.rand(1, generator=g))
        ours = high_entropy_mask(entropies[:, cols], inputs.mask[:, cols], threshold, shards.sequence_group)
        whole = trl_high_entropy_mask(entropies, inputs.mask, threshold)[:, cols]
        assert torch.equal(ours, whole), f"rank {dist.get_rank()}: entropy mask {label} trial {trial}"
        ran += 1
    return ran


ERROR_CASES = ("rows", "option", "advantages", "argument", "value", "logprobs-option", "batch-statistic")


def check_errors(inputs, shards: Shards) -> None:
    """Ranks that disagree, or whose own checks fail, all raise (and the group stays usable): prints
    ``rank R: CASE: Type: message`` per case for the test to read."""
    cols = shards.positions(SLICINGS[shards.sequence_ranks][0])
    last = shards.sequence_rank == shards.sequence_ranks - 1
    for case in ERROR_CASES:
        h, ids, mask = inputs.hidden[:, cols].clone(), inputs.ids[:, cols], inputs.mask[:, cols]
        advantages, options = inputs.advantages.clone(), dict(BASE)
        if case == "rows" and last:
            h, ids, mask, advantages = h[:3], ids[:3], mask[:3], advantages[:3]
        if case == "option" and last:
            options["tau_pos"] = 2.5
        if case == "advantages" and last:
            advantages[0] += 1e-3
        if case == "argument" and last:
            ids = ids[:, :-1]
        if case == "value" and last:
            h[0, -1, 0] = float("inf")
        if case == "batch-statistic":
            options["gate"] = "m2po"
        try:
            if case == "logprobs-option":
                token_logprobs(h, inputs.weight, ids, mask, temperature=0.8 if last else 0.7,
                               sequence_group=shards.sequence_group)
            else:
                gated_policy_loss(h, inputs.weight, ids, advantages, mask, sequence_group=shards.sequence_group,
                                  **options)
            print(f"rank {dist.get_rank()}: {case}: no error")
        except (ValueError, TypeError) as error:
            print(f"rank {dist.get_rank()}: {case}: {type(error).__name__}: {error}")
    # the group still works after every refusal
    run_case(inputs, shards, cols, {"gate": "sigmoid"}, torch.float64, "torch", None)


def main() -> None:
    checks = set(sys.argv[1].split(","))
    vocab_ranks = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    dist.init_process_group("gloo")
    inputs = make_case_inputs()
    shards = Shards(vocab_ranks, inputs.weight.shape[0])
    ran = check_everything(inputs, shards, checks)
    if "errors" in checks:
        check_errors(inputs, shards)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {dist.get_rank() if dist.is_initialized() else os.environ['RANK']}: ok ({ran} cases)")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
