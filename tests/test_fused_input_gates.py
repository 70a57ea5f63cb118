"""The token-local gates that read more than the ratio (dppo, dppo_kl, aspo) and registered input gates with a Triton
pair, fused into the Triton backend's token-level row kernel (interpreter, float32): they match the float64 reference
for several loss types, with the KL (bias-corrected too), the entropy bonus, the sampler's weights, on-policy and with
several chunks; the fused kernel is what runs (the unfused statistics kernel is never called) and agrees with the
unfused path; the gates that need a batch or a row (m2po, bapo, gmpo) and input gates without a Triton pair stay
unfused; a Triton pair that disagrees with its torch pair is refused, naming the function and the point; Binary-KL
in float32 is accurate and never NaN, and extreme log-ratios and probabilities next to 1 stay finite."""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl
from helpers import DEVICE, TOLERANCES, assert_matches_reference, assert_within, output_errors, run_loss, run_reference
from test_gate_inputs import entropy_scaled_sigmoid, entropy_scaled_sigmoid_derivative, gate_inputs

from fused_gates import register_input_gate, unregister_gate
from fused_gates.gate_inputs import binary_kl as torch_binary_kl
from fused_gates.gates import INPUT_GATES
from fused_gates.kernels.input_gates import FUSED_INPUT_GATES, binary_kl
from fused_gates.kernels.triton_backend import TritonChunks

FLOAT32 = TOLERANCES[torch.float32]
BASE = dict(temperature=0.7, max_completion_length=9, epsilon_high=0.28, tau_pos=2.0, tau_neg=3.0)
CHUNKS, ONE_CHUNK = 0.004, 64.0  # memory budgets (MB): ~5 tokens per chunk at V = 67, and the batch in one


def _seed(*parts: object) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode()) % 1000


def _sampler_weights(inputs, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    sampling_ratio = torch.rand(inputs.mask.shape, generator=generator, dtype=torch.float64) + 0.5
    entropy_mask = (torch.rand(inputs.mask.shape, generator=generator) > 0.3).long()
    return dict(sampling_ratio=sampling_ratio, entropy_mask=entropy_mask, group_size=1)


def count_paths(monkeypatch) -> Counter:
    """Calls of the fused row kernel's chunk and of the unfused path's statistics kernel, from now on."""
    calls: Counter = Counter()
    for name in ("fused_token_chunk", "statistics"):
        original = getattr(TritonChunks, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TritonChunks, name, counted)
    return calls


FUSED_CASES = {
    "dppo-grpo-kl-entropy-chunks": dict(gate="dppo", beta=0.04, entropy_coef=0.01, memory_budget_mb=CHUNKS),
    "dppo-dapo-sampler-one-chunk": dict(gate="dppo", loss_type="dapo", sampler=True, memory_budget_mb=ONE_CHUNK),
    "dppo-bnpo-delta-pair-bias-corrected-kl": dict(gate="dppo", loss_type="bnpo", dppo_delta=(0.05, 0.3), beta=0.1,
                                                   use_bias_correction_kl=True, memory_budget_mb=CHUNKS),
    "dppo-luspo-on-policy": dict(gate="dppo", loss_type="luspo", on_policy=True, beta=0.04, memory_budget_mb=CHUNKS),
    "dppo_kl-bnpo-kl-chunks": dict(gate="dppo_kl", loss_type="bnpo", beta=0.04, memory_budget_mb=CHUNKS),
    "dppo_kl-dr_grpo-sampler-entropy": dict(gate="dppo_kl", loss_type="dr_grpo", sampler=True, entropy_coef=0.02,
                                            memory_budget_mb=CHUNKS),
    "dppo_kl-grpo-delta-pair-bias-corrected-kl": dict(gate="dppo_kl", dppo_delta=(0.2, 0.02), beta=0.1,
                                                      use_bias_correction_kl=True, memory_budget_mb=ONE_CHUNK),
    "dppo_kl-dapo-on-policy": dict(gate="dppo_kl", loss_type="dapo", on_policy=True, memory_budget_mb=CHUNKS),
    "aspo-grpo-entropy-chunks": dict(gate="aspo", entropy_coef=0.01, memory_budget_mb=CHUNKS),
    "aspo-dapo-sampler-bias-corrected-kl": dict(gate="aspo", loss_type="dapo", sampler=True, beta=0.1,
                                                use_bias_correction_kl=True, memory_budget_mb=CHUNKS),
    "aspo-dr_grpo-dual-clip-epsilons": dict(gate="aspo", loss_type="dr_grpo", aspo_dual_clip=2.0, epsilon_low=0.1,
                                            epsilon_high=0.4, beta=0.04, memory_budget_mb=ONE_CHUNK),
    "aspo-luspo-on-policy": dict(gate="aspo", loss_type="luspo", on_policy=True, entropy_coef=0.01,
                                 memory_budget_mb=CHUNKS),
}
SIZES = [dict(batch=3, length=9, vocab=67), dict(batch=5, length=7, vocab=37), dict(batch=4, length=8, vocab=53)]


def _case(name: str):
    """The inputs and the loss's options of a case of :data:`FUSED_CASES`."""
    options = dict(FUSED_CASES[name])
    sampler, on_policy = options.pop("sampler", False), options.pop("on_policy", False)
    seed = _seed(name)
    inputs = gate_inputs(options["gate"], seed, **SIZES[seed % len(SIZES)])
    if on_policy:
        inputs = replace(inputs, old=None)
    options = dict(BASE, **options)
    if sampler:
        options.update(_sampler_weights(inputs, seed))
    return inputs, options, on_policy


@pytest.mark.parametrize("name", FUSED_CASES)
def test_fused_input_gate_matches_reference_and_runs_in_the_row_kernel(name, monkeypatch):
    inputs, options, on_policy = _case(name)
    calls = count_paths(monkeypatch)
    comparison = assert_matches_reference(inputs, backend="triton", dtype=torch.float32, tolerances=FLOAT32,
                                          **options)
    assert calls["fused_token_chunk"] >= (2 if options["memory_budget_mb"] == CHUNKS else 1)
    assert calls["statistics"] == 0, "the unfused statistics kernel ran"
    out = comparison.ours.out
    valid = inputs.mask.bool() & (inputs.advantages != 0)
    weights = out.gate_grad[valid]
    if on_policy:
        assert torch.all(out.ratio[inputs.mask.bool()] == 1)
    else:  # the inputs reach the gate's masked / clipped branch and its unclipped one
        assert ((weights == 0) | ((weights - 1).abs() > 1e-3)).any(), "no token is clipped: the test cannot see it"
        assert (weights != 0).any(), "every token is masked"


@pytest.mark.parametrize("gate", FUSED_INPUT_GATES)
def test_fused_and_unfused_triton_paths_agree(gate, monkeypatch):
    inputs = gate_inputs(gate, _seed(gate, "paths"), batch=4, length=9, vocab=59)
    options = dict(BASE, gate=gate, beta=0.04, entropy_coef=0.01, memory_budget_mb=CHUNKS)
    calls = count_paths(monkeypatch)
    fused = run_loss(inputs, backend="triton", dtype=torch.float32, **options)
    assert calls["fused_token_chunk"] > 1 and calls["statistics"] == 0
    with monkeypatch.context() as patch:
        patch.setattr(TritonChunks, "fused_token_chunk", None)  # the chunk driver then takes the unfused path
        unfused = run_loss(inputs, backend="triton", dtype=torch.float32, **options)
    assert calls["statistics"] > 1
    assert_within(output_errors(fused, unfused), FLOAT32, against="the unfused Triton path")


def test_the_token_local_gates_have_a_kernel_form():
    assert FUSED_INPUT_GATES == ("dppo", "dppo_kl", "aspo")


@pytest.mark.parametrize("gate", [g for g in INPUT_GATES if g not in FUSED_INPUT_GATES])
def test_gates_that_need_the_batch_or_the_row_stay_unfused(gate, monkeypatch):
    inputs = gate_inputs(gate, _seed(gate, "unfused"), batch=3, length=7, vocab=41)
    calls = count_paths(monkeypatch)
    run_loss(inputs, backend="triton", dtype=torch.float32, gate=gate, backward=False, memory_budget_mb=ONE_CHUNK)
    assert calls["fused_token_chunk"] == 0 and calls["statistics"] == 1


# -- registered input gates with a Triton pair ---------------------------------------------------------------------


@triton.jit
def entropy_sigmoid_value(ratio, tau, advantage, logprob, old_logprob, entropy):
    scaled = tau * (1.0 + entropy)
    return (4.0 / scaled) / (1.0 + tl.exp(-scaled * (ratio - 1.0)))


@triton.jit
def entropy_sigmoid_derivative(ratio, tau, advantage, logprob, old_logprob, entropy):
    x = tau * (1.0 + entropy) * (ratio - 1.0)
    return 4.0 / ((1.0 + tl.exp(-x)) * (1.0 + tl.exp(x)))


@triton.jit
def entropy_blind_value(ratio, tau, advantage, logprob, old_logprob, entropy):
    return (4.0 / tau) / (1.0 + tl.exp(-tau * (ratio - 1.0)))  # forgets the entropy


@triton.jit
def entropy_blind_derivative(ratio, tau, advantage, logprob, old_logprob, entropy):
    x = tau * (ratio - 1.0)
    return 4.0 / ((1.0 + tl.exp(-x)) * (1.0 + tl.exp(x)))


# the temperatures and entropies the tests use (the default admissibility grids take a minute on two cores)
CHECKS = dict(check_taus=(2.0, 3.0), check_entropies=(0.1, 5.0), check_logprobs=(-1.0,))
NAME = "entropy_sigmoid_fused"


@pytest.fixture
def registered():
    """Registers :data:`NAME` with the given Triton pair (None: without one); unregisters it afterwards."""
    names = []

    def register(triton_value=None, triton_derivative=None):
        names.append(NAME)
        return register_input_gate(NAME, entropy_scaled_sigmoid, entropy_scaled_sigmoid_derivative, overwrite=True,
                                   triton_value=triton_value, triton_derivative=triton_derivative, **CHECKS)

    yield register
    if names:
        unregister_gate(NAME)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_registered_input_gate_with_a_triton_pair_matches_reference_fused(registered, loss_type, monkeypatch):
    registered(entropy_sigmoid_value, entropy_sigmoid_derivative)
    inputs = gate_inputs("aspo", _seed("registered", loss_type), batch=4, length=7, vocab=43)
    options = dict(BASE, loss_type=loss_type, beta=0.04, entropy_coef=0.01, memory_budget_mb=CHUNKS)
    calls = count_paths(monkeypatch)
    ours = run_loss(inputs, backend="triton", dtype=torch.float32, gate=NAME, **options)
    assert calls["fused_token_chunk"] > 1 and calls["statistics"] == 0
    reference = run_reference(inputs, dtype=torch.float32, gate=NAME, custom_input_value=entropy_scaled_sigmoid,
                              **options)
    assert_within(output_errors(ours, reference), FLOAT32)
    plain = run_loss(inputs, backend="triton", dtype=torch.float32, gate="sigmoid", **options).out
    assert (ours.out.gate_grad - plain.gate_grad).abs().max() > 1e-3  # the entropy changes the gate


def test_registered_input_gate_without_a_triton_pair_stays_unfused(registered, monkeypatch):
    gate = registered()
    assert gate.kernel_id is None
    inputs = gate_inputs("aspo", _seed("registered", "unfused"), batch=3, length=7, vocab=41)
    calls = count_paths(monkeypatch)
    run_loss(inputs, backend="triton", dtype=torch.float32, gate=NAME, backward=False, memory_budget_mb=ONE_CHUNK,
             **BASE)
    assert calls["fused_token_chunk"] == 0 and calls["statistics"] == 1


WRONG_PAIRS = {
    "value": ((entropy_blind_value, entropy_sigmoid_derivative), "triton_value (f) 'entropy_blind_value'"),
    "derivative": ((entropy_sigmoid_value, entropy_blind_derivative),
                   "triton_derivative (df/dr) 'entropy_blind_derivative'"),
}


@pytest.mark.parametrize("which", WRONG_PAIRS)
def test_triton_pair_that_disagrees_with_the_torch_pair_is_refused_naming_the_function(registered, which):
    pair, named = WRONG_PAIRS[which]
    registered(*pair)
    inputs = gate_inputs("aspo", 1, batch=3, length=7, vocab=41)
    message = re.escape(f"gate {NAME!r}: {named} disagrees with its torch form at r=") + r".*tau=.*entropy="
    with pytest.raises(ValueError, match=message):
        run_loss(inputs, backend="triton", dtype=torch.float32, gate=NAME, **BASE)


def test_triton_pair_must_be_given_whole():
    with pytest.raises(TypeError, match="triton_value and triton_derivative must be given together"):
        register_input_gate(NAME, entropy_scaled_sigmoid, entropy_scaled_sigmoid_derivative,
                            triton_value=entropy_sigmoid_value, **CHECKS)


# -- Binary-KL in float32, extreme inputs --------------------------------------------------------------------------


@triton.jit
def _binary_kl_kernel(p_old, p_logp, p_out, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(p_out + o, binary_kl(tl.load(p_old + o, mask=m, other=0.0), tl.load(p_logp + o, mask=m, other=0.0)),
             mask=m)


LOGPROBS = (0.0, -1e-9, -1e-7, -3e-5, -1e-3, -0.05, -0.3, -0.6931, -0.6932, -0.9, -2.0, -7.0, -20.0, -50.0, -80.0)


def test_binary_kl_in_float32_is_accurate_and_never_nan():
    old, logp = torch.cartesian_prod(torch.tensor(LOGPROBS), torch.tensor(LOGPROBS)).unbind(1)
    old, logp = old.contiguous(), logp.contiguous()
    got = torch.empty(old.shape, device=DEVICE)
    _binary_kl_kernel[(triton.cdiv(old.numel(), 128),)](old.to(DEVICE), logp.to(DEVICE), got, old.numel(), BLOCK=128)
    got = got.cpu()
    truth = torch_binary_kl(old.double(), logp.double())  # the same exact form, in float64
    assert not got.isnan().any()
    infinite = (logp == 0) & (old < 0)  # p = 1 > p_old
    assert torch.equal(got.isinf(), infinite) and torch.equal(truth.isinf(), infinite)
    assert torch.all(got[old == logp] == 0)
    finite = ~infinite
    # within 2e-6 of the size of its two terms (token, the rest: |D| + 2 |token| bounds their sum), even where they
    # cancel to 1e-8 (p and p_old on either side of 1/2, where log(1 - p) switches form)
    token = (old.double().exp() * (old.double() - logp.double())).abs()[finite]
    error = (got[finite].double() - truth[finite]).abs()
    assert torch.all(error <= 2e-6 * (truth[finite].abs() + 2 * token) + 1e-30), f"largest error {error.max():.3g}"


@pytest.mark.parametrize("gate", FUSED_INPUT_GATES)
def test_extreme_log_ratios_and_near_certain_tokens_stay_finite_and_match_reference(gate, monkeypatch):
    inputs = gate_inputs(gate, _seed(gate, "extreme"), batch=4, length=9, vocab=47)
    inputs = replace(inputs, weight=inputs.weight * 40)  # logits of ~100: the greedy tokens' p within 1e-6 of 1
    logits = inputs.hidden @ inputs.weight.T + inputs.bias
    inputs.ids[:, ::2] = logits.argmax(-1)[:, ::2]
    logp = torch.log_softmax(logits / BASE["temperature"], -1).gather(-1, inputs.ids.unsqueeze(-1)).squeeze(-1)
    assert (logp[:, ::2] > -1e-6).float().mean() > 0.5, "the greedy tokens are not near certain"
    # in turn: log-ratios of +50; of -50 (p_old = 1 where logp > -50); p_old = 1 (a log-ratio of -50 where
    # logp < -50); on-policy
    cases = torch.stack([logp - 50, (logp + 50).clamp(max=0.0), torch.where(logp > -50, 0.0, logp + 50), logp])
    pattern = torch.arange(logp.numel()).reshape(logp.shape) % 4
    old = cases.gather(0, pattern.unsqueeze(0)).squeeze(0)
    ref = logp + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inputs = replace(inputs, old=old, ref=ref)
    options = dict(BASE, gate=gate, beta=0.04, memory_budget_mb=CHUNKS)
    calls = count_paths(monkeypatch)
    ours = run_loss(inputs, backend="triton", dtype=torch.float32, **options)
    assert calls["fused_token_chunk"] > 1 and calls["statistics"] == 0
    out, mask = ours.out, inputs.mask.bool()
    for name in ("ratio", "gate_value", "gate_grad", "logprobs", "kl"):
        assert torch.isfinite(getattr(out, name)).all(), name
    assert math.isfinite(out.loss.item()) and all(torch.isfinite(g).all() for g in ours.grads)
    assert out.ratio[mask].max() > 1e21 and out.ratio[mask].min() < 1e-21
    # against the float64 reference: the float32 tolerances, or 4x the torch backend's float32 error (logits of ~100
    # round to ~1e-5 and the row kernel's single pass rounds them a little more; the hidden state's gradient scales
    # with the weight; ASPO's c / r reaches 1e22); ratios of e^50 relatively
    reference = run_reference(inputs, dtype=torch.float32, **options)
    errors = output_errors(ours, reference)
    torch_errors = output_errors(run_loss(inputs, backend="torch", dtype=torch.float32, **options), reference)
    relative = ("ratio", "metrics[ratio/max]")
    assert_within({k: e / max(1.0, 4 * torch_errors[k] / FLOAT32.of(k)) for k, e in errors.items()}, FLOAT32,
                  ignore=relative)
    # the ratio from a log-ratio within the per-token tolerance of the log-probs (logits of ~100: up to ~1e-4)
    assert torch.allclose(out.ratio[mask], reference.out.ratio[mask].float(), rtol=2 * FLOAT32.per_token, atol=0)
