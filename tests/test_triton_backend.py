"""The Triton backend against the naive float64 reference and the torch backend.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, so shapes are tiny but odd: V = 203 is not
a multiple of any vocabulary block (64 in the interpreter), H = 24 and 40 are not powers of two (ragged ``tl.dot``
slices of 16), rows are fully masked or have A = 0, and small memory budgets force several chunks. float16 is the
low-precision dtype here (``tl.dot`` on bfloat16 is not usable in the interpreter); bfloat16 runs in test_gpu.py.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import zlib
from dataclasses import dataclass, field, replace

import pytest
import triton
import triton.language as tl  # noqa: F401  (a @triton.jit module must see triton.language)
from helpers import (
    DEVICE,
    GRADS,
    PER_TOKEN,
    Run,
    assert_matches_reference,
    make_inputs,
    max_abs,
    output_errors,
    run_loss,
    run_reference,
)

from fused_gates import (
    LOSS_TYPES,
    PAPER_GATES,
    Gate,
    GateParameters,
    check_admissible,
    gated_policy_loss,
    get_gate,
    token_logprobs,
)
from fused_gates.kernels import logprob_stats
from fused_gates.kernels.gates import atan, evaluate_gate
from fused_gates.reference import reference_gate_value

# The interpreter evaluates both sides of tl.where with numpy, which warns on the overflow of the side not taken
# (exp(-x) for x << 0 in the sigmoid); results are checked for finiteness instead.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")



# A Cauchy-like custom gate: f'(r) = (1 + x^2)^-2 with x = tau (r - 1), and its integral
# f(r) = 1 + (x / (1 + x^2) + atan(x)) / (2 tau).
def cauchy_value(ratio, tau):
    x = tau * (ratio - 1)
    return 1 + (x / (1 + x * x) + torch.atan(x)) / (2 * tau)


def cauchy_derivative(ratio, tau):
    x = tau * (ratio - 1)
    return (1 + x * x).reciprocal().square()


@triton.jit
def cauchy_value_kernel(ratio, tau):
    x = tau * (ratio - 1.0)
    return 1.0 + (x / (1.0 + x * x) + atan(x)) / (2.0 * tau)


@triton.jit
def cauchy_derivative_kernel(ratio, tau):
    x = tau * (ratio - 1.0)
    d = 1.0 / (1.0 + x * x)
    return d * d


@triton.jit
def cauchy_value_wrong_kernel(ratio, tau):
    x = tau * (ratio - 1.0)
    return 1.0 + (x / (1.0 + x * x) + atan(x)) / 2.0  # forgets 1 / tau


CAUCHY = Gate("cauchy", cauchy_value, cauchy_derivative, cauchy_value_kernel, cauchy_derivative_kernel)
GATES = [*PAPER_GATES, "cauchy"]


def gate_argument(name: str) -> str | Gate:
    return CAUCHY if name == "cauchy" else name


def test_custom_gate_is_admissible():
    check_admissible("cauchy", cauchy_value, cauchy_derivative, (0.5, 1.0, 2.0, 5.0, 10.0, 20.0))


# ----------------------------------------------------------------------------------------------------------------
# Gates as device functions


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf in a discarded branch
@pytest.mark.parametrize("name", GATES)
def test_gate_device_functions_match_torch(name):
    gate = CAUCHY if name == "cauchy" else get_gate(name)
    # ratios around 1 (both clip edges included), r = 0 and far tails up to exp(80), the largest ratio the
    # objective forms (it clamps log-ratios at 80)
    ratio = torch.cat([torch.linspace(0.0, 3.0, 301), torch.tensor([0.8, 1.28, 1e3, 1e6, 1e20, 5.5e34])])
    advantages = torch.tensor([1.0, -1.0, 0.0]).repeat(ratio.numel())
    ratio = ratio.repeat_interleave(3)
    params = GateParameters(tau_pos=2.0, tau_neg=0.7, epsilon_low=0.2, epsilon_high=0.28)
    value, derivative = evaluate_gate(gate, ratio.to(DEVICE), advantages.to(DEVICE), params)
    expected_value, expected_derivative = gate.evaluate(ratio, advantages, params)
    assert torch.isfinite(value).all() and torch.isfinite(derivative).all()
    torch.testing.assert_close(value.cpu(), expected_value, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(derivative.cpu(), expected_derivative, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("tau", [1e-6, 1e-3, 12.0], ids=["tau1e-6", "tau1e-3", "tau12"])
def test_erf_device_function_keeps_float32_precision_at_small_temperatures(tau):
    ratio = torch.tensor([0.5, 0.9, 0.999, 1.001, 1.3, 2.0, 5.0], dtype=torch.float64)
    truth = reference_gate_value("erf", ratio, torch.ones_like(ratio), {"tau_pos": tau, "tau_neg": tau})
    value, _ = evaluate_gate(get_gate("erf"), ratio.float().to(DEVICE), torch.ones(7, device=DEVICE),
                             GateParameters(tau_pos=tau, tau_neg=tau))
    assert ((value.cpu().double() - truth).abs() / truth).max().item() < 1e-6


def test_custom_gate_without_triton_functions_is_refused():
    inputs = make_inputs(batch=2, length=3, hidden_size=8, vocab=19)
    h, w, _ = inputs.leaves(torch.float32)
    gate = Gate("cauchy_torch_only", cauchy_value, cauchy_derivative)
    with pytest.raises(ValueError, match=r"cauchy_torch_only.*triton_value/triton_derivative.*backend='torch'"):
        gated_policy_loss(h, w, inputs.ids, inputs.advantages.float(), gate=gate, backend="triton")


def test_custom_gate_whose_triton_form_disagrees_is_refused():
    inputs = make_inputs(batch=2, length=3, hidden_size=8, vocab=19)
    h, w, _ = inputs.leaves(torch.float32)
    gate = Gate("cauchy_wrong", cauchy_value, cauchy_derivative, cauchy_value_wrong_kernel, cauchy_derivative_kernel)
    with pytest.raises(ValueError, match=r"cauchy_wrong.*triton_value.*r=.*tau="):
        gated_policy_loss(h, w, inputs.ids, inputs.advantages.float(), gate=gate, backend="triton")


# ----------------------------------------------------------------------------------------------------------------
# The loss: Triton vs the float64 reference and the torch backend


@dataclass
class Case:
    gate: str = "sigmoid"
    loss_type: str = "grpo"
    level: str = "token"
    batch: int = 4
    length: int = 7
    hidden_size: int = 24
    vocab: int = 203
    on_policy: bool = False
    with_bias: bool = True
    frozen_weight: bool = False
    token_advantages: bool = False
    memory_budget_mb: float | None = None
    vocab_splits: int | None = None
    options: dict = field(default_factory=dict)

    def loss_options(self) -> dict:
        options = dict(
            tau_pos=2.0,
            tau_neg=3.0,
            epsilon_low=0.2,
            epsilon_high=0.28,
            loss_type=self.loss_type,
            max_completion_length=9,
            importance_sampling_level=self.level,
            beta=0.04,
            use_bias_correction_kl=True,
            temperature=0.7,
            entropy_coef=0.01,
        )
        options.update(self.options)
        return options

    def run_options(self) -> dict:
        """Everything the helpers' runs take: the loss options, the gate, the bias, the frozen weight, the budget."""
        return dict(self.loss_options(), gate=gate_argument(self.gate), bias=self.with_bias,
                    frozen_weight=self.frozen_weight, memory_budget_mb=self.memory_budget_mb)


def _main_cases() -> dict[str, Case]:
    """Every gate at both levels; loss types, KL flavour, entropy, on/off-policy and bias rotate through them."""
    cases = {}
    for i, gate in enumerate(GATES):
        for j, level in enumerate(("token", "sequence")):
            k = 2 * i + j
            loss_type = LOSS_TYPES[(i + 2 * j) % len(LOSS_TYPES)]
            options = {"use_bias_correction_kl": k % 2 == 0, "entropy_coef": 0.01 if k % 3 else 0.0}
            if k % 4 == 3:
                options["beta"] = 0.0
            case = Case(gate, loss_type, level, on_policy=k % 5 == 1, with_bias=k % 4 != 1, options=options)
            cases[f"{gate}-{loss_type}-{level}"] = case
    return cases


SPECIAL_CASES = {
    # a single token
    "one-token": Case(batch=1, length=1, options={"entropy_coef": 0.0}),
    # H = 40, V = 128 (a whole number of vocabulary blocks), per-token advantages, EUR per prompt group
    "h40-v128-token-advantages-groups": Case(
        "erf", "bnpo", hidden_size=40, vocab=128, token_advantages=True, options={"group_size": 2}
    ),
    # one-token to six-token chunks, dapo with an explicit normaliser
    "token-chunks-dapo": Case("clip", "dapo", memory_budget_mb=0.015, options={"num_items_in_batch": 17}),
    # chunks of two whole rows: statistics kernel, torch objective, dz kernel
    "sequence-row-chunks": Case("softsign", "grpo", "sequence", batch=5, memory_budget_mb=0.035),
    # rows longer than a chunk: tl.dot statistics in the forward, recomputed products in the backward
    "sequence-recompute-no-split": Case("arctan", "dr_grpo", "sequence", memory_budget_mb=0.005, vocab_splits=1),
    "sequence-recompute-vocab-split": Case("sigmoid", "bnpo", "sequence", memory_budget_mb=0.005, vocab_splits=3),
    # weight.requires_grad = False: dW skipped
    "frozen-weight": Case("cauchy", "grpo", frozen_weight=True, memory_budget_mb=0.015),
}
CASES = {**_main_cases(), **SPECIAL_CASES}


def run(case: Case, backend: str, dtype: torch.dtype, inputs) -> Run:
    return run_loss(inputs, backend=backend, dtype=dtype, **case.run_options())


def run_truth(case: Case, inputs, dtype: torch.dtype) -> Run:
    """The float64 truth for inputs rounded to ``dtype`` (so that only the computation's error is measured)."""
    return run_reference(inputs, dtype=dtype, **case.run_options())


def case_inputs(case: Case, name: str):
    inputs = make_inputs(
        case.batch,
        case.length,
        case.hidden_size,
        case.vocab,
        seed=zlib.crc32(name.encode()) % 1000,
        token_advantages=case.token_advantages,
    )
    return replace(inputs, old=None) if case.on_policy else inputs


def _force_vocab_splits(monkeypatch, splits: int | None) -> None:
    if splits is not None:
        monkeypatch.setattr(logprob_stats, "choose_vocab_splits", lambda *_: splits)


@pytest.mark.parametrize("name", CASES)
def test_float32_matches_reference_and_torch_backend(name, monkeypatch):
    case = CASES[name]
    _force_vocab_splits(monkeypatch, case.vocab_splits)
    inputs = case_inputs(case, name)
    triton_run = assert_matches_reference(inputs, backend="triton", dtype=torch.float32, **case.run_options()).ours
    torch_run = run(case, "torch", torch.float32, inputs)
    assert max_abs(triton_run.out.loss, torch_run.out.loss) <= 1e-5
    for name_, a, b in zip(GRADS, triton_run.grads, torch_run.grads, strict=True):
        assert (a is None) == (b is None), name_
        if a is not None:
            assert max_abs(a, b) <= 1e-5, f"grad {name_} differs from the torch backend"


FLOAT16_CASES = {
    "sigmoid-grpo-token": Case("sigmoid", "grpo", "token", memory_budget_mb=0.015),
    "clip-bnpo-sequence": Case("clip", "bnpo", "sequence", batch=5, memory_budget_mb=0.035),
    "cauchy-dr_grpo-token-onpolicy": Case("cauchy", "dr_grpo", on_policy=True, hidden_size=40),
    "erf-dapo-sequence-recompute": Case("erf", "dapo", "sequence", memory_budget_mb=0.005, vocab_splits=2),
}


@pytest.mark.parametrize("name", FLOAT16_CASES)
def test_float16_error_no_worse_than_torch_backend(name, monkeypatch):
    """CCE-style: the kernel's error against the float64 truth of the same (float16-rounded) inputs is at most that
    of the torch backend computing in float16, plus a small tolerance."""
    case = FLOAT16_CASES[name]
    _force_vocab_splits(monkeypatch, case.vocab_splits)
    inputs = case_inputs(case, name)
    truth = run_truth(case, inputs, torch.float16)
    ours = output_errors(run(case, "triton", torch.float16, inputs), truth)
    baseline = output_errors(run(case, "torch", torch.float16, inputs), truth)
    for key, err in ours.items():
        assert err <= 1.5 * baseline[key] + 1e-5, f"{key}: {err:.3g} vs torch float16 {baseline[key]:.3g}"


def test_no_grad_forward_uses_statistics_kernel():
    case = Case("softsign", "bnpo")
    inputs = case_inputs(case, "no-grad")
    with torch.no_grad():
        h, w, b = (t.float().to(DEVICE) for t in inputs.leaves(torch.float32))
        options = case.loss_options()
        args = (h, w, inputs.ids.to(DEVICE), inputs.advantages.float().to(DEVICE), inputs.mask.to(DEVICE),
                inputs.old.float().to(DEVICE), inputs.ref.float().to(DEVICE))
        ours = gated_policy_loss(*args, bias=b, gate="softsign", backend="triton", **options)
        theirs = gated_policy_loss(*args, bias=b, gate="softsign", backend="torch", **options)
    assert max_abs(ours.loss, theirs.loss) <= 1e-5
    for name in PER_TOKEN:
        assert max_abs(getattr(ours, name), getattr(theirs, name)) <= 1e-5, name


# ----------------------------------------------------------------------------------------------------------------
# token_logprobs: the tl.dot statistics kernel


METHODS = {"dot-one-split": ("dot", 1), "dot-vocab-split-4": ("dot", 4), "cublas-chunks": ("cublas", None)}


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_token_logprobs_match_reference(dtype, method, monkeypatch):
    statistics_method, splits = method
    _force_vocab_splits(monkeypatch, splits)
    inputs = make_inputs(batch=5, length=9, hidden_size=40, vocab=203, seed=11)
    h, w, b = (t.detach().to(dtype) for t in inputs.leaves(dtype))
    logp, entropy = token_logprobs(
        h.to(DEVICE), w.to(DEVICE), inputs.ids.to(DEVICE), inputs.mask.to(DEVICE), temperature=0.7,
        bias=b.to(DEVICE), backend="triton", statistics_method=statistics_method, memory_budget_mb=0.02,
    )
    logits = (h.double() @ w.double().T + b.double()) / 0.7
    log_probs = torch.log_softmax(logits, -1)
    valid = inputs.mask.bool()
    expected_logp = torch.where(valid, log_probs.gather(-1, inputs.ids.unsqueeze(-1)).squeeze(-1), 0.0)
    expected_entropy = torch.where(valid, -(log_probs.exp() * log_probs).sum(-1), 0.0)
    assert max_abs(logp.cpu(), expected_logp) <= 2e-5
    assert max_abs(entropy.cpu(), expected_entropy) <= 2e-5


def test_statistics_method_auto_picks_by_token_count():
    from fused_gates.head import Head
    from fused_gates.kernels.triton_backend import CUBLAS_STATISTICS_MIN_TOKENS, choose_statistics_method

    head = Head(torch.zeros(3, 2), None, 1.0, 64.0)
    assert choose_statistics_method(CUBLAS_STATISTICS_MIN_TOKENS - 1, head) == "dot"
    assert choose_statistics_method(CUBLAS_STATISTICS_MIN_TOKENS, head) == "cublas"


def test_statistics_method_is_refused_where_it_would_be_ignored():
    inputs = make_inputs(batch=2, length=3, hidden_size=8, vocab=19)
    h, w, _ = inputs.leaves(torch.float32, bias=False)
    with pytest.raises(ValueError, match="backend: backend='torch' cannot run this input: statistics_method='dot'"):
        token_logprobs(h, w, inputs.ids, backend="torch", statistics_method="dot")
    with pytest.raises(ValueError, match="statistics_method: unknown method 'gemm'"):
        token_logprobs(h, w, inputs.ids, backend="triton", statistics_method="gemm")
