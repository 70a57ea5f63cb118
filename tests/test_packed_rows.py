"""Packed rows (padding-free batches, ``sequence_ids=``): several completions one after the other in a row of the
batch give the loss, metrics, EUR, per-token outputs and gradients of the same completions one per row with padding
-- float64 to 1e-10 over every gate and TRL objective x loss type x importance-sampling level and the options that
look at whole rows (groups, entropy mask and bonus, sampler ratio, vespo, off-policy mask, dapo's normaliser, KL),
with several chunks and one; float32 and the Triton kernels (interpreter) on a subset; and ids that break the
packing rules are refused naming ``sequence_ids``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import PER_TOKEN, TOLERANCES, Run, assert_within, make_inputs, output_errors
from torch import Tensor

from fused_gates import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, PAPER_GATES, POLICY_OBJECTIVES, gated_policy_loss

LENGTHS = (3, 7, 1, 5, 4, 6)  # the completions' lengths (each one a row of the unpacked batch, padded to 8)
PADDED = 8
CAPACITY = 11  # positions per packed row: rows [3, 7], [1, 5, 4], [6] with padding at each row's end


@dataclass
class Packed:
    """The unpacked inputs' completions packed into rows: ``to_packed`` maps each valid unpacked position (flat) to
    its packed position (flat)."""

    hidden: Tensor
    ids: Tensor
    mask: Tensor
    sequence_ids: Tensor
    per_token: dict[str, Tensor]
    unpacked_positions: Tensor
    packed_positions: Tensor


def pack(inputs, per_token: dict[str, Tensor]) -> Packed:
    rows, row, used = [], [], 0
    for s, length in enumerate(LENGTHS):
        if used + length > CAPACITY:
            rows.append(row)
            row, used = [], 0
        row.append(s)
        used += length
    rows.append(row)
    batch = len(rows)
    hidden = torch.zeros(batch, CAPACITY, inputs.hidden.shape[-1], dtype=inputs.hidden.dtype)
    ids = torch.zeros(batch, CAPACITY, dtype=torch.long)
    mask = torch.zeros(batch, CAPACITY, dtype=inputs.mask.dtype)
    sequence_ids = torch.full((batch, CAPACITY), -1, dtype=torch.long)
    packed_tokens = {k: torch.ones(batch, CAPACITY, dtype=v.dtype) for k, v in per_token.items()}
    unpacked, packed = [], []
    for b, sequences in enumerate(rows):
        t = 0
        for s in sequences:
            length = LENGTHS[s]
            hidden[b, t:t + length] = inputs.hidden[s, :length]
            ids[b, t:t + length] = inputs.ids[s, :length]
            mask[b, t:t + length] = inputs.mask[s, :length]
            sequence_ids[b, t:t + length] = s
            for k, v in per_token.items():
                packed_tokens[k][b, t:t + length] = v[s, :length]
            unpacked += [s * PADDED + i for i in range(length)]
            packed += [b * CAPACITY + t + i for i in range(length)]
            t += length
    return Packed(hidden, ids, mask, sequence_ids, packed_tokens, torch.tensor(unpacked), torch.tensor(packed))


def make_packing_inputs():
    inputs = make_inputs(batch=len(LENGTHS), length=PADDED, hidden_size=9, vocab=19, seed=11)
    for s, length in enumerate(LENGTHS):
        inputs.mask[s, length:] = 0  # the unpacked batch's padding
    inputs.mask[1] = 0  # a fully masked completion
    inputs.mask[3, 2] = 0  # a masked token inside a completion
    return inputs


CASES = {f"{gate}-{loss_type}-{level}": dict(gate=gate, loss_type=loss_type, importance_sampling_level=level)
         for gate in (*PAPER_GATES, *POLICY_OBJECTIVES) for loss_type in LOSS_TYPES
         for level in IMPORTANCE_SAMPLING_LEVELS}
_g = torch.Generator().manual_seed(2)
_SHAPE = (len(LENGTHS), PADDED)
OPTION_CASES = {
    "sigmoid-group-size": dict(gate="sigmoid", group_size=2),
    "erf-group-ids-sequence": dict(gate="erf", group_ids=torch.tensor([4, 1, 4, 1, 9, 9]),
                                   importance_sampling_level="sequence"),
    "arctan-entropy-mask-bonus": dict(gate="arctan", entropy_mask=(torch.rand(_SHAPE, generator=_g) > 0.3).double(),
                                      entropy_coef=0.04),
    "vespo-sampling-ratio": dict(gate="vespo", loss_type="dapo",
                                 sampling_ratio=torch.rand(_SHAPE, generator=_g, dtype=torch.float64) + 0.5),
    "softsign-sampling-ratio-sequence": dict(gate="softsign", importance_sampling_level="sequence",
                                             sampling_ratio=torch.rand(_SHAPE, generator=_g, dtype=torch.float64)
                                             + 0.5),
    "sigmoid-off-policy-mask": dict(gate="sigmoid", off_policy_mask_threshold=0.03),
    "clip-delta-kl-bias-correction-sequence": dict(gate="clip", delta=1.2, beta=0.05, use_bias_correction_kl=True,
                                                   importance_sampling_level="sequence"),
    "cispo-dapo-num-items": dict(gate="cispo", loss_type="dapo", epsilon_high=1.3, num_items_in_batch=21),
    "erf-softcap-entropy": dict(gate="erf", logit_softcap=2.5, entropy_coef=0.02),
}
BASE = dict(tau_pos=2.0, tau_neg=3.0, epsilon_low=0.2, epsilon_high=0.28, temperature=0.9, max_completion_length=8)


def run_both(inputs, options: dict, dtype=torch.float64, backend: str = "torch", budget: float | None = None):
    """(packed run with its per-token outputs and hidden gradient laid out as the unpacked batch's, unpacked run)."""
    options = {**BASE, **options}
    if "sampling_ratio" in options:  # vespo sums its log over every position of a row: 0 at the unpacked padding
        inside = torch.arange(PADDED) < torch.tensor(LENGTHS).unsqueeze(1)
        options["sampling_ratio"] = options["sampling_ratio"].where(inside, 1.0)
    per_token = {k: v for k, v in options.items() if isinstance(v, Tensor) and v.dim() == 2}
    per_token.update(old=inputs.old, ref=inputs.ref)
    packed = pack(inputs, per_token)
    runs = []
    for packing in (True, False):
        source = packed if packing else inputs
        h = source.hidden.to(dtype).detach().clone().requires_grad_()
        w = inputs.weight.to(dtype).detach().clone().requires_grad_()
        b = inputs.bias.to(dtype).detach().clone().requires_grad_()
        tensors = packed.per_token if packing else per_token
        kwargs = {k: tensors.get(k, v) for k, v in options.items()}
        kwargs = {k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
        if packing:
            kwargs["sequence_ids"] = packed.sequence_ids
        out = gated_policy_loss(h, w, source.ids, inputs.advantages.to(dtype), source.mask,
                                tensors["old"].to(dtype), tensors["ref"].to(dtype), bias=b, backend=backend,
                                memory_budget_mb=budget, **kwargs)
        out.loss.backward()
        runs.append(Run(out, (h.grad, w.grad, b.grad)))
    packed_run, unpacked_run = runs

    def unpack(values: Tensor) -> Tensor:
        flat = values.reshape(values.shape[0] * values.shape[1], *values.shape[2:])
        out = flat.new_zeros(len(LENGTHS) * PADDED, *values.shape[2:])
        out[packed.unpacked_positions] = flat[packed.packed_positions]
        return out.reshape(len(LENGTHS), PADDED, *values.shape[2:])

    view = type("PackedView", (), {})()
    view.loss, view.eur, view.metrics = packed_run.out.loss, packed_run.out.eur, packed_run.out.metrics
    for name in PER_TOKEN:
        setattr(view, name, unpack(getattr(packed_run.out, name)))
    grads = packed_run.grads
    return Run(view, (unpack(grads[0]), grads[1], grads[2])), unpacked_run


@pytest.mark.parametrize("budget", [None, 0.001], ids=["one-chunk", "several-chunks"])
def test_packed_rows_match_one_completion_per_row_over_every_gate_loss_type_and_level(budget):
    inputs = make_packing_inputs()
    for name, options in CASES.items():
        assert_within(output_errors(*run_both(inputs, options, budget=budget)), TOLERANCES[torch.float64],
                      against=f"the unpacked batch, {name}")


@pytest.mark.parametrize("name", OPTION_CASES, ids=OPTION_CASES.keys())
def test_packed_rows_match_one_completion_per_row_with_whole_row_options(name):
    inputs = make_packing_inputs()
    for budget in (None, 0.001):
        assert_within(output_errors(*run_both(inputs, OPTION_CASES[name], budget=budget)), TOLERANCES[torch.float64],
                      against=f"the unpacked batch, budget {budget}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["sigmoid-off-policy-mask", "erf-softcap-entropy"])
def test_packed_rows_in_float32(backend, name):
    inputs = make_packing_inputs()
    assert_within(output_errors(*run_both(inputs, OPTION_CASES[name], torch.float32, backend, 0.001)),
                  TOLERANCES[torch.float32], against=f"the unpacked batch ({backend}, float32)")


def _packed_call(inputs, **changes):
    packed = pack(inputs, {})
    arguments = dict(hidden=packed.hidden, weight=inputs.weight, completion_ids=packed.ids,
                     advantages=inputs.advantages, completion_mask=packed.mask, sequence_ids=packed.sequence_ids)
    arguments.update(changes)
    return gated_policy_loss(**arguments)


def test_packed_rows_refuse_ids_that_break_the_packing():
    inputs = make_packing_inputs()
    packed = pack(inputs, {})
    with pytest.raises(TypeError, match=r"sequence_ids: expected an integer tensor of shape \[3, 11\]"):
        _packed_call(inputs, sequence_ids=packed.sequence_ids[:, :5])
    with pytest.raises(ValueError, match=r"advantages: with sequence_ids, expected one advantage per sequence \[S\]"):
        _packed_call(inputs, advantages=torch.ones(3, CAPACITY, dtype=torch.float64))
    outside = packed.sequence_ids.clone()
    outside[0, 0] = len(LENGTHS)
    with pytest.raises(ValueError, match=r"sequence_ids: must lie in \[0, 6\) \(S, the advantages' length\)"):
        _packed_call(inputs, sequence_ids=outside)
    swapped = packed.sequence_ids.clone()
    swapped[0, 0] = 1
    with pytest.raises(ValueError, match="sequence_ids: must not decrease along the valid tokens"):
        _packed_call(inputs, sequence_ids=swapped)
    with pytest.raises(TypeError, match=r"group_ids: expected an integer tensor of shape \[6\]"):
        _packed_call(inputs, group_ids=torch.zeros(3, dtype=torch.long))
