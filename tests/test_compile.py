"""A torch.compile'd training step with the loss inside: same loss and gradients as eager (Dynamo breaks the graph
around the autograd.Function's data-dependent parts; it must not crash)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs, max_abs

from fused_gates import gated_policy_loss


@pytest.mark.parametrize("gate", ["clip", "erf"])
def test_compiled_step_matches_eager(gate):
    inputs = make_inputs(batch=3, length=5, hidden_size=8, vocab=31, seed=12)
    torch.manual_seed(0)
    projection = torch.nn.Linear(8, 8).float()
    weight = torch.nn.Parameter(inputs.weight.float())

    def step(x):
        out = gated_policy_loss(projection(x), weight, inputs.ids, inputs.advantages.float(), inputs.mask,
                                inputs.old.float(), gate=gate, tau_pos=2.0, tau_neg=3.0, entropy_coef=0.01)
        return out.loss

    x = inputs.hidden.float()
    compiled_loss = torch.compile(step)(x)
    compiled_loss.backward()
    compiled_grads = [weight.grad.clone(), projection.weight.grad.clone()]
    weight.grad = projection.weight.grad = None
    eager_loss = step(x)
    eager_loss.backward()
    assert max_abs(compiled_loss, eager_loss) < 1e-6
    assert max_abs(compiled_grads[0], weight.grad) < 1e-6
    assert max_abs(compiled_grads[1], projection.weight.grad) < 1e-6
