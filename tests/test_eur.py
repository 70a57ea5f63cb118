"""The Effective Update Ratio's conventions (paper eq. 12): the mean over prompt groups of each group's token mean
of f'(r), weighted by the mask; a group without valid tokens is left out; without group information the batch is
one group, so every way of asking agrees."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import DEVICE, LossInputs, assert_matches_reference, make_inputs, max_abs

from fused_gates import BACKENDS, gated_policy_loss

COMPUTING_BACKENDS = [b for b in BACKENDS if b != "auto"]


def _eur(inputs, mask, backend, old=None, **options):
    h, w, b = (t.to(DEVICE) for t in inputs.leaves(torch.float32))
    out = gated_policy_loss(h, w, inputs.ids.to(DEVICE), inputs.advantages.float().to(DEVICE), mask.to(DEVICE),
                            None if old is None else old.float().to(DEVICE), bias=b, backend=backend, gate="erf",
                            tau_pos=3.0, tau_neg=4.0, **options)
    return out.eur.cpu()


@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_on_policy_eur_is_one_whatever_the_mask_weights(backend):
    inputs = make_inputs(batch=4, length=5, hidden_size=8, vocab=29, seed=41, masked_row=False)
    fractional = inputs.mask * 0.05  # weights whose total is below 1
    for group_size in (None, 1, 2, 4):
        assert _eur(inputs, fractional, backend, group_size=group_size).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_no_group_information_is_one_group_of_the_whole_batch(backend):
    inputs = make_inputs(batch=4, length=5, hidden_size=8, vocab=29, seed=42)
    mask = inputs.mask * torch.rand(4, 5, generator=torch.Generator().manual_seed(0))
    none = _eur(inputs, mask, backend, inputs.old)
    whole = _eur(inputs, mask, backend, inputs.old, group_size=4)
    assert max_abs(none, whole) < 1e-6 and 0 < none.item() < 1


@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_a_group_without_valid_tokens_is_left_out(backend):
    inputs = make_inputs(batch=6, length=5, hidden_size=8, vocab=29, seed=43, masked_row=False)
    mask = inputs.mask.clone()
    mask[2:4] = 0  # the second prompt group (rows 2, 3) has no valid token
    three_groups = _eur(inputs, mask, backend, inputs.old, group_size=2)
    keep = [0, 1, 4, 5]
    two_groups = _eur(_rows(inputs, keep), mask[keep], backend, inputs.old[keep], group_size=2)
    assert max_abs(three_groups, two_groups) < 1e-6
    comparison = assert_matches_reference(replace(inputs, mask=mask, ref=None), backend=backend, dtype=torch.float32,
                                          gate="erf", tau_pos=3.0, tau_neg=4.0, group_size=2)
    assert max_abs(three_groups, comparison.reference.out.eur) < 1e-6


@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_no_valid_token_at_all_gives_zero(backend):
    inputs = make_inputs(batch=2, length=3, hidden_size=8, vocab=29, seed=44)
    assert _eur(inputs, torch.zeros(2, 3), backend, inputs.old, group_size=1).item() == 0.0
    assert _eur(inputs, torch.zeros(2, 3), backend, inputs.old).item() == 0.0


def _rows(inputs, keep):
    return LossInputs(inputs.hidden[keep], inputs.weight, inputs.bias, inputs.ids[keep], inputs.advantages[keep],
                      inputs.mask[keep], inputs.old[keep], inputs.ref[keep])


@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_group_ids_may_be_any_integers_and_rows_in_any_order(backend):
    inputs = make_inputs(batch=6, length=5, hidden_size=8, vocab=29, seed=45)
    consecutive = _eur(inputs, inputs.mask, backend, inputs.old, group_size=2)
    ids = torch.tensor([103, 103, -7, -7, 12, 12])  # the same groups, labelled arbitrarily
    assert max_abs(_eur(inputs, inputs.mask, backend, inputs.old, group_ids=ids.to(DEVICE)), consecutive) < 1e-6
    order = [4, 0, 2, 5, 3, 1]  # rows shuffled, as TRL shuffles a generation batch
    shuffled = _rows(inputs, order)
    ids_shuffled = ids[order].to(DEVICE)
    assert max_abs(_eur(shuffled, shuffled.mask, backend, shuffled.old, group_ids=ids_shuffled), consecutive) < 1e-6
