"""Bad input gets a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs

from fused_gates import gated_policy_loss, token_logprobs

BASE = make_inputs(batch=4, length=5, hidden_size=6, vocab=17, seed=0)


def call(**overrides):
    args = dict(
        hidden=BASE.hidden.float(), weight=BASE.weight.float(), completion_ids=BASE.ids,
        advantages=BASE.advantages.float(),
        completion_mask=BASE.mask, old_logprobs=BASE.old.float(), ref_logprobs=BASE.ref.float(),
    )
    args.update(overrides)
    return gated_policy_loss(**args)


ids_out_of_range = BASE.ids.clone()
ids_out_of_range[0, 0] = 17
negative_ids = BASE.ids.clone()
negative_ids[3, 4] = -1
nan_advantages = BASE.advantages.float().clone()
nan_advantages[0] = float("nan")

CASES = {
    "hidden_rank": (dict(hidden=BASE.hidden.float()[0]), ValueError, "hidden: expected 3 dimensions"),
    "hidden_dtype": (dict(hidden=BASE.hidden.long()), TypeError, "hidden: expected a floating-point"),
    "hidden_not_tensor": (dict(hidden=[1.0]), TypeError, "hidden: expected a torch.Tensor"),
    "weight_hidden_size": (dict(weight=BASE.weight.float()[:, :5]), ValueError, r"weight: expected shape \[V, 6\]"),
    "weight_dtype_mismatch": (dict(weight=BASE.weight.double()), TypeError, "weight: dtype torch.float64 differs"),
    "ids_shape": (dict(completion_ids=BASE.ids[:, :4]), ValueError, r"completion_ids: expected shape \[4, 5\]"),
    "ids_float": (dict(completion_ids=BASE.ids.float()), TypeError, "completion_ids: expected an integer"),
    "ids_too_large": (dict(completion_ids=ids_out_of_range), ValueError,
                      r"completion_ids: token ids must lie in \[0, 17\)"),
    "ids_negative": (dict(completion_ids=negative_ids), ValueError, "completion_ids: token ids must lie"),
    "advantages_shape": (dict(advantages=BASE.advantages.float()[:3]), ValueError, r"advantages: expected shape \[4\]"),
    "advantages_nan": (dict(advantages=nan_advantages), ValueError, "advantages: must be finite"),
    "advantages_int": (dict(advantages=BASE.advantages.long()), TypeError, "advantages: expected a floating-point"),
    "mask_shape": (dict(completion_mask=BASE.mask[:2]), ValueError, "completion_mask: expected shape"),
    "mask_negative": (dict(completion_mask=-BASE.mask), ValueError, "completion_mask: must be finite and >= 0"),
    "old_shape": (dict(old_logprobs=BASE.old.float()[:, 1:]), ValueError, "old_logprobs: expected shape"),
    "ref_shape": (dict(ref_logprobs=BASE.ref.float()[:, 1:]), ValueError, "ref_logprobs: expected shape"),
    "tau_pos_zero": (dict(tau_pos=0.0), ValueError, "tau_pos: must be finite and > 0"),
    "tau_neg_negative": (dict(tau_neg=-1.0), ValueError, "tau_neg: must be finite and > 0"),
    "tau_nan": (dict(tau_pos=float("nan")), ValueError, "tau_pos"),
    "epsilon_low_above_one": (dict(epsilon_low=1.5), ValueError, r"epsilon_low: must be in \[0, 1\]"),
    "epsilon_high_negative": (dict(epsilon_high=-0.1), ValueError, "epsilon_high: must be finite and >= 0"),
    "unknown_gate": (dict(gate="tanh"), ValueError, "unknown gate 'tanh'"),
    "gate_not_a_name": (dict(gate=3), TypeError, "gate: expected a gate name"),
    "unknown_loss_type": (dict(loss_type="ppo"), ValueError, "loss_type: unknown loss_type 'ppo'"),
    "unknown_level": (dict(importance_sampling_level="batch"), ValueError, "importance_sampling_level: unknown"),
    "unknown_backend": (dict(backend="cuda"), ValueError, "backend: unknown backend 'cuda'"),
    "dr_grpo_without_length": (dict(loss_type="dr_grpo"), ValueError, "max_completion_length: is required"),
    "dr_grpo_bad_length": (dict(loss_type="dr_grpo", max_completion_length=0), ValueError, "max_completion_length"),
    "beta_without_ref": (dict(beta=0.1, ref_logprobs=None), ValueError, "ref_logprobs: is required when beta != 0"),
    "beta_negative": (dict(beta=-0.1), ValueError, "beta: must be finite and >= 0"),
    "temperature_zero": (dict(temperature=0.0), ValueError, "temperature: must be finite and > 0"),
    "group_size_not_dividing": (dict(group_size=3), ValueError, "group_size: 3 does not divide the batch size B=4"),
    "group_size_zero": (dict(group_size=0), ValueError, "group_size: must be a positive int"),
    "bias_shape": (dict(bias=torch.zeros(16)), ValueError, r"bias: expected shape \[17\]"),
    "bias_dtype": (dict(bias=torch.zeros(17, dtype=torch.float64)), TypeError, "bias: dtype torch.float64 differs"),
    "memory_budget_zero": (dict(memory_budget_mb=0), ValueError, "memory_budget_mb: must be finite and > 0"),
    "entropy_coef_nan": (dict(entropy_coef=float("nan")), ValueError, "entropy_coef: must be a finite number"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_argument_is_named_in_the_error(case):
    overrides, kind, message = case
    with pytest.raises(kind, match=message):
        call(**overrides)


def test_mismatched_device_is_named():
    meta = torch.empty(4, 5, device="meta")
    with pytest.raises(ValueError, match="completion_mask: expected device"):
        call(completion_mask=meta)


def test_triton_backend_without_cuda_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: backend='triton' is valid here")
    with pytest.raises(ValueError, match="backend"):
        call(backend="triton")


def test_token_logprobs_checks_ids():
    with pytest.raises(ValueError, match="completion_ids: token ids must lie"):
        token_logprobs(BASE.hidden.float(), BASE.weight.float(), ids_out_of_range)
