"""torch.autograd.gradcheck of the loss w.r.t. hidden, weight and bias on tiny float64 inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs

from fused_gates import gated_policy_loss

CASES = {
    "sigmoid_token_grpo": dict(gate="sigmoid", loss_type="grpo"),
    "erf_sequence_bnpo_kl": dict(gate="erf", loss_type="bnpo", importance_sampling_level="sequence", beta=0.1),
    "arctan_token_dapo_entropy_temperature": dict(gate="arctan", loss_type="dapo", entropy_coef=0.05,
                                                  temperature=0.8),
    "softsign_token_dr_grpo_biascorr": dict(gate="softsign", loss_type="dr_grpo", max_completion_length=6, beta=0.2,
                                            use_bias_correction_kl=True),
    "clip_sequence_grpo_entropy": dict(gate="clip", importance_sampling_level="sequence", entropy_coef=0.1),
}
# several chunks with whole rows (one pass), and one-token chunks (the recomputing backward at sequence level)
BUDGETS = {"row_chunks": 0.02, "token_chunks": 1e-4}


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_gradcheck(options, budget):
    inputs = make_inputs(batch=3, length=4, hidden_size=5, vocab=11, seed=1, zero_advantage_row=False)
    h, w, b = inputs.leaves(torch.float64)

    def loss(h, w, b):
        return gated_policy_loss(h, w, inputs.ids, inputs.advantages, inputs.mask, inputs.old, inputs.ref, bias=b,
                                 memory_budget_mb=budget, **options).loss

    assert torch.autograd.gradcheck(loss, (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)
