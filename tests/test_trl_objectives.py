"""TRL 1.16's objectives and options inside the fused loss, against the float64 reference written from TRL's
``_compute_loss``: clip with ``delta``, cispo, vespo, luspo, the sampler's importance ratio, the entropy mask, the
off-policy mask and explicit prompt groups. The torch backend in float64 (to 1e-10) and the Triton backend in
float32 (in its interpreter on CPU). Each option is also shown to change the result, so that a test that ignored
it would fail."""

from __future__ import annotations

import zlib

import pytest
import torch
from helpers import assert_matches_reference, make_inputs, max_abs, run_loss, run_reference

from fused_gates import gated_policy_loss

BASE = dict(tau_pos=2.0, tau_neg=3.0, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=9, beta=0.04,
            use_bias_correction_kl=True, temperature=0.7, entropy_coef=0.01)


def extras(inputs, seed: int) -> dict[str, torch.Tensor]:
    """Per-token option tensors of realistic values: importance ratios near 1, a mask keeping most tokens, sampling
    log-probs that push some rows past the off-policy threshold."""
    g = torch.Generator().manual_seed(seed)
    shape = inputs.mask.shape
    return {
        "sampling_ratio": torch.exp(0.2 * torch.randn(shape, generator=g, dtype=torch.float64)),
        "entropy_mask": (torch.rand(shape, generator=g) > 0.3),
        "sampling_logprobs": inputs.old + 0.4 * torch.rand(shape, generator=g, dtype=torch.float64),
        "group_ids": torch.tensor([1, 0, 1, 0])[: shape[0]],
    }


CASES = {
    # gate, loss_type, level, options (names of extras to pass, and scalars)
    "clip-delta-dapo-token": ("clip", "dapo", "token", {"delta": 1.1}),
    "clip-delta-grpo-sequence": ("clip", "grpo", "sequence", {"delta": 1.03, "temperature": 1.0}),
    "clip-luspo-sequence": ("clip", "luspo", "sequence", {}),
    "clip-luspo-token-sampling-ratio": ("clip", "luspo", "token", {"sampling_ratio": True}),
    "cispo-dapo-token": ("cispo", "dapo", "token", {"epsilon_high": 1.1}),
    "cispo-dapo-sequence-entropy-mask": ("cispo", "dapo", "sequence", {"epsilon_high": 1.05, "entropy_mask": True}),
    "vespo-dapo-token": ("vespo", "dapo", "token", {}),
    "vespo-dapo-sequence-sampling-ratio": ("vespo", "dapo", "sequence", {"sampling_ratio": True,
                                                                          "vespo_k": (1.5, 2.5),
                                                                          "vespo_lambda": (2.0, 4.0)}),
    "sigmoid-grpo-off-policy-mask": ("sigmoid", "grpo", "token", {"off_policy_mask_threshold": 0.15}),
    "erf-bnpo-off-policy-sampling": ("erf", "bnpo", "sequence", {"off_policy_mask_threshold": 0.1,
                                                                 "sampling_logprobs": True}),
    "arctan-dr_grpo-every-mask": ("arctan", "dr_grpo", "token", {"entropy_mask": True, "sampling_ratio": True,
                                                                  "off_policy_mask_threshold": 0.2,
                                                                  "group_ids": True}),
}
# What each option is compared against (the same case without it) to show that it matters.
BASELINE = {"delta": None, "sampling_ratio": None, "entropy_mask": None, "off_policy_mask_threshold": None}


def case_options(name: str, inputs) -> dict:
    gate, loss_type, level, chosen = CASES[name]
    tensors = extras(inputs, zlib.crc32(name.encode()) % 1000)
    options = dict(BASE, gate=gate, loss_type=loss_type, importance_sampling_level=level)
    for key, value in chosen.items():
        options[key] = tensors[key] if value is True else value
    return options


# Seeds chosen where the name's own seed happens to leave an option without effect (no row past delta).
SEEDS = {"clip-delta-grpo-sequence": 295}


def inputs_for(name: str):
    return make_inputs(seed=SEEDS.get(name, zlib.crc32(name.encode()) % 1000), log_ratio_scale=0.4)


@pytest.mark.parametrize("budget", [0.02, 64.0], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize("name", CASES)
def test_torch_backend_matches_trl_reference(name, budget):
    inputs = inputs_for(name)
    assert_matches_reference(inputs, memory_budget_mb=budget, **case_options(name, inputs))


@pytest.mark.parametrize("name", CASES)
def test_triton_backend_matches_trl_reference(name):
    inputs = inputs_for(name)
    assert_matches_reference(inputs, backend="triton", dtype=torch.float32, memory_budget_mb=0.02,
                             **case_options(name, inputs))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if set(c[3]) & set(BASELINE)])
def test_each_option_changes_the_loss(name):
    inputs = inputs_for(name)
    options = case_options(name, inputs)
    without = {k: v for k, v in options.items() if k not in BASELINE and k != "sampling_logprobs"}
    changed = run_loss(inputs, memory_budget_mb=0.02, backward=False, **options).out
    plain = run_loss(inputs, memory_budget_mb=0.02, backward=False, **without).out
    assert abs(changed.loss.item() - plain.loss.item()) > 1e-6
    if "off_policy_mask_threshold" in options:  # some rows must actually be dropped in these cases
        assert (changed.policy_weight == 0).any()


def test_cispo_and_vespo_take_no_gradient_through_their_weight():
    """d loss / d logp of cispo is -min(r, eps) A w: autograd of the reference agrees, and a naive version that
    kept the weight attached would not (it shows the check can fail)."""
    inputs = inputs_for("cispo-dapo-token")
    options = case_options("cispo-dapo-token", inputs)
    grads = run_loss(inputs, memory_budget_mb=0.02, **options).grads
    ref_grads = run_reference(inputs, **options).grads
    assert max_abs(grads[1].cpu(), ref_grads[1]) < 1e-10
    h, w, b = inputs.leaves(torch.float64)
    logits = (h @ w.T + b) / options["temperature"]
    logp = torch.log_softmax(logits, -1).gather(-1, inputs.ids.unsqueeze(-1)).squeeze(-1)
    attached = torch.clamp(torch.exp(logp - inputs.old), max=options["epsilon_high"])
    wrong = (-(attached * inputs.advantages.unsqueeze(1) * logp) * inputs.mask).sum()
    (wrong_grad,) = torch.autograd.grad(wrong / inputs.mask.sum(), w)
    assert max_abs(wrong_grad, ref_grads[1]) > 1e-6


BAD = {
    "delta-with-sigmoid": (dict(gate="sigmoid", delta=1.2), ValueError, "delta: only applies to gate='clip'"),
    "vespo-k-with-clip": (dict(gate="clip", vespo_k=(1.0, 2.0)), ValueError, "vespo_k: only applies to gate='vespo'"),
    "sampling-logprobs-without-threshold": (dict(sampling_logprobs=torch.zeros(4, 7)), ValueError,
                                            "sampling_logprobs: only applies with off_policy_mask_threshold"),
    "group-ids-and-size": (dict(group_ids=torch.zeros(4, dtype=torch.long), group_size=2), ValueError,
                           "group_ids: give group_size or group_ids, not both"),
    "group-ids-float": (dict(group_ids=torch.tensor([0.0, 1.0, 2.0, 4.0])), TypeError, r"group_ids: expected an int"),
    "negative-sampling-ratio": (dict(sampling_ratio=-torch.ones(4, 7)), ValueError, "sampling_ratio: must be finite"),
    "entropy-mask-shape": (dict(entropy_mask=torch.ones(4, 6)), ValueError, r"entropy_mask: expected shape \[4, 7\]"),
    "vespo-k-not-a-pair": (dict(gate="vespo", vespo_k=2.0), TypeError, "vespo_k: expected a"),
    "delta-zero": (dict(gate="clip", delta=0.0), ValueError, "delta: must be finite and > 0"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_option_errors_name_the_argument(case):
    overrides, kind, message = case
    inputs = make_inputs(batch=4, length=7)
    h, w, _ = inputs.leaves(torch.float32, bias=False)
    with pytest.raises(kind, match=message):
        gated_policy_loss(h, w, inputs.ids, inputs.advantages.float(), inputs.mask, inputs.old.float(), **overrides)
