"""The Triton backend on a GPU at real sizes (``pytest -m gpu tests/test_gpu.py``), bfloat16 as in training.

Error is judged against a float64 truth computed from the same bfloat16 inputs in token chunks (logits of a chunk
materialised, never the whole N x V), relative to the error of the naive bfloat16 torch computation from that
truth (bfloat16 logits, as a model's lm_head produces them, then float32 softmax maths and autograd):
``err_triton <= 1.5 * err_naive_bf16 + tol`` (CCE's criterion), so the tolerance cannot hide a wrong kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() False)"),
]

TEMPERATURE = 0.9


@pytest.fixture
def no_tf32():
    """float32 products in float32: TF32 off for the test (another test or a library may have turned it on), restored
    afterwards. TF32 rounds the operands to 10 mantissa bits (~1e-3 relative), which the float32 bounds here would
    read as a wrong kernel. (An image's TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 beats these flags; tests/conftest.py sets
    it to 0 before the first product.)"""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
OPTIONS = dict(gate="sigmoid", tau_pos=1.0, tau_neg=1.05, loss_type="grpo", beta=0.04, entropy_coef=0.01)


@dataclass
class Batch:
    hidden: Tensor  # [B, T, H] bf16
    weight: Tensor  # [V, H] bf16
    ids: Tensor
    advantages: Tensor
    mask: Tensor
    old: Tensor
    ref: Tensor


def make_batch(batch: int, length: int, hidden_size: int, vocab: int, seed: int = 0) -> Batch:
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    # scales of a trained head: logits with a spread of a few units, so that softmax is neither flat nor one-hot
    hidden = torch.randn(batch, length, hidden_size, device=dev, generator=g).bfloat16()
    weight = (torch.randn(vocab, hidden_size, device=dev, generator=g) * (2.0 / math.sqrt(hidden_size))).bfloat16()
    ids = torch.randint(0, vocab, (batch, length), device=dev, generator=g)
    advantages = torch.randn(batch, device=dev, generator=g)
    mask = (torch.rand(batch, length, device=dev, generator=g) > 0.1).float()
    mask[0, length // 2 :] = 0  # a short completion
    logp = truth_statistics(hidden.reshape(-1, hidden_size), weight, ids.reshape(-1))[0].reshape(batch, length)
    old = (logp + 0.1 * torch.randn(batch, length, device=dev, generator=g, dtype=torch.float64)).float()
    ref = (logp + 0.1 * torch.randn(batch, length, device=dev, generator=g, dtype=torch.float64)).float()
    return Batch(hidden, weight, ids, advantages, mask, old, ref)


def _chunk_log_probs(hidden: Tensor, weight: Tensor) -> Tensor:
    return torch.log_softmax(hidden.double() @ weight.double().T / TEMPERATURE, dim=-1)


def truth_statistics(hidden: Tensor, weight: Tensor, ids: Tensor, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """float64 ``(logp, entropy)`` per token, a token chunk of logits at a time."""
    logp, entropy = [], []
    with torch.no_grad():
        for s in range(0, hidden.shape[0], chunk):
            log_probs = _chunk_log_probs(hidden[s : s + chunk], weight)
            logp.append(log_probs.gather(1, ids[s : s + chunk, None]).squeeze(1))
            entropy.append(-(log_probs.exp() * log_probs).sum(1))
    return torch.cat(logp), torch.cat(entropy)


def objective(logp: Tensor, entropy: Tensor, b: Batch) -> Tensor:
    """SAPO (sigmoid gate), grpo aggregation, k3 KL, entropy bonus: the paper's and TRL's formulas, any dtype."""
    dtype = logp.dtype
    adv = b.advantages.to(dtype)[:, None]
    ratio = torch.exp(logp - b.old.to(dtype))
    tau = torch.where(adv > 0, OPTIONS["tau_pos"], OPTIONS["tau_neg"]).to(dtype)
    gate = torch.sigmoid(tau * (ratio - 1)) * 4 / tau
    delta = b.ref.to(dtype) - logp
    per_token = -gate * adv + OPTIONS["beta"] * (torch.exp(delta) - delta - 1)
    mask = b.mask.to(dtype)
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    return loss - OPTIONS["entropy_coef"] * (entropy * mask).sum() / mask.sum().clamp(min=1)


def truth(b: Batch, chunk: int = 256) -> dict[str, Tensor]:
    """float64 loss, logp and gradients: the objective's d/dlogp and d/dH first (O(N)), then each token chunk's
    logits are recomputed with autograd and back-propagated with those coefficients."""
    batch, length, hidden_size = b.hidden.shape
    flat_hidden, flat_ids = b.hidden.reshape(-1, hidden_size), b.ids.reshape(-1)
    logp, entropy = truth_statistics(flat_hidden, b.weight, flat_ids)
    logp_leaf = logp.reshape(batch, length).requires_grad_()
    entropy_leaf = entropy.reshape(batch, length).requires_grad_()
    loss = objective(logp_leaf, entropy_leaf, b)
    grad_logp, grad_entropy = torch.autograd.grad(loss, (logp_leaf, entropy_leaf))
    grad_logp, grad_entropy = grad_logp.reshape(-1), grad_entropy.reshape(-1)

    hidden64 = flat_hidden.double().requires_grad_()
    weight64 = b.weight.double().requires_grad_()
    for s in range(0, flat_hidden.shape[0], chunk):
        rows = slice(s, s + chunk)
        log_probs = torch.log_softmax(hidden64[rows] @ weight64.T / TEMPERATURE, dim=-1)
        chunk_logp = log_probs.gather(1, flat_ids[rows, None]).squeeze(1)
        chunk_entropy = -(log_probs.exp() * log_probs).sum(1)
        torch.autograd.backward([chunk_logp, chunk_entropy], [grad_logp[rows], grad_entropy[rows]])
        del log_probs, chunk_logp, chunk_entropy
    return {
        "loss": loss.detach(),
        "logprobs": logp.reshape(batch, length),
        "hidden": hidden64.grad.reshape(batch, length, hidden_size),
        "weight": weight64.grad,
    }


def naive_bf16(b: Batch) -> dict[str, Tensor]:
    """What a bfloat16 model computes: logits in bfloat16, softmax maths in float32, autograd."""
    hidden = b.hidden.clone().requires_grad_()
    weight = b.weight.clone().requires_grad_()
    logits = (hidden @ weight.T).float() / TEMPERATURE
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, b.ids[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    del logits
    loss = objective(logp, entropy, b)
    loss.backward()
    return {"loss": loss.detach(), "logprobs": logp.detach(), "hidden": hidden.grad, "weight": weight.grad}


def fused(b: Batch, backend: str, memory_budget_mb: float | None = None) -> dict[str, Tensor]:
    from fused_gates import gated_policy_loss

    hidden = b.hidden.clone().requires_grad_()
    weight = b.weight.clone().requires_grad_()
    out = gated_policy_loss(
        hidden, weight, b.ids, b.advantages, b.mask, b.old, b.ref, temperature=TEMPERATURE, backend=backend,
        memory_budget_mb=memory_budget_mb, **OPTIONS
    )
    out.loss.backward()
    return {"loss": out.loss.detach(), "logprobs": out.logprobs, "hidden": hidden.grad, "weight": weight.grad}


def error(result: dict[str, Tensor], reference: dict[str, Tensor], mask: Tensor, key: str) -> float:
    ours, truth_value = result[key].double(), reference[key]
    if key == "logprobs":
        ours, truth_value = ours * mask, truth_value * mask
    return (ours - truth_value).abs().max().item()


HEADS = {
    # Qwen2.5-7B's lm_head: H = 3584, V = 152,064 (N * V > 2^31: int64 offsets matter)
    "qwen2.5-7b-head": (8, 512, 3584, 152064),
    # Qwen2.5-0.5B's lm_head: H = 896, V = 151,936
    "qwen2.5-0.5b-head": (8, 512, 896, 151936),
}


# the default working-memory budget at both heads, and the benchmark's low-memory setting (many chunks) at the 7B head
LOSS_CASES = [("qwen2.5-7b-head", None), ("qwen2.5-0.5b-head", None), ("qwen2.5-7b-head", 256)]


@pytest.mark.parametrize(("head", "memory_budget_mb"), LOSS_CASES,
                         ids=[f"{h}-budget-{b or 'default'}" for h, b in LOSS_CASES])
def test_bf16_loss_logprobs_and_grads_against_float64_truth(head, memory_budget_mb):
    torch.manual_seed(0)
    b = make_batch(*HEADS[head])
    reference = truth(b)
    naive = naive_bf16(b)
    torch.cuda.empty_cache()
    ours = fused(b, "triton", memory_budget_mb)
    for key in ("loss", "logprobs", "hidden", "weight"):
        err_ours = error(ours, reference, b.mask, key)
        err_naive = error(naive, reference, b.mask, key)
        scale = reference[key].abs().max().item()
        assert math.isfinite(err_ours), key
        assert err_ours <= 1.5 * err_naive + 1e-6 * scale, f"{key}: triton {err_ours:.3g} vs naive bf16 {err_naive:.3g}"


@pytest.mark.parametrize("head", HEADS)
def test_bf16_triton_matches_torch_backend(head):
    """Both backends use float32 statistics and accumulation: they agree to well below bfloat16's error."""
    b = make_batch(*HEADS[head], seed=1)
    ours, theirs = fused(b, "triton"), fused(b, "torch")
    assert abs(ours["loss"].item() - theirs["loss"].item()) <= 1e-4 * max(1.0, abs(theirs["loss"].item()))
    assert error(ours, {k: v.double() for k, v in theirs.items()}, b.mask, "logprobs") <= 0.05
    for key in ("hidden", "weight"):
        scale = theirs[key].float().abs().max().item()
        assert (ours[key].float() - theirs[key].float()).abs().max().item() <= 0.02 * scale, key


LOGPROB_CASES = [(tokens, method) for method in (None, "dot", "cublas") for tokens in (64, 4096)]
LOGPROB_IDS = [f"{'vocab-split' if t == 64 else 'token-blocks'}-{m or 'default'}" for t, m in LOGPROB_CASES]


@pytest.mark.parametrize(("tokens", "method"), LOGPROB_CASES, ids=LOGPROB_IDS)
def test_bf16_token_logprobs_against_float64_truth(tokens, method):
    """The no-grad statistics (each kernel ``statistics_method`` can choose); 64 tokens make too few token blocks for
    the tl.dot kernel, so the vocabulary is split."""
    from fused_gates import token_logprobs

    options = {} if method is None else {"statistics_method": method}
    b = make_batch(1, tokens, 3584, 152064, seed=2)
    logp, entropy = token_logprobs(b.hidden, b.weight, b.ids, temperature=TEMPERATURE, backend="triton", **options)
    true_logp, true_entropy = truth_statistics(b.hidden[0], b.weight, b.ids[0])
    with torch.no_grad():
        naive = torch.log_softmax((b.hidden[0] @ b.weight.T).float() / TEMPERATURE, -1)
    naive_logp = naive.gather(1, b.ids[0, :, None]).squeeze(1)
    naive_entropy = -(naive.exp() * naive).sum(1)
    assert (logp[0] - true_logp).abs().max() <= 1.5 * (naive_logp - true_logp).abs().max() + 1e-5
    assert (entropy[0] - true_entropy).abs().max() <= 1.5 * (naive_entropy - true_entropy).abs().max() + 1e-5


FLOAT32_CASES = [(gate, "token") for gate in ("clip", "sigmoid", "erf", "arctan", "softsign")]
FLOAT32_CASES += [("sigmoid", "sequence"), ("clip", "sequence")]


@pytest.mark.usefixtures("no_tf32")
def test_float32_products_are_not_tf32():
    """The fixture and conftest hold even in an image that sets TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1: a float32
    product agrees with float64 to float32 precision (TF32 would be off by ~1e-3 relative)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(256, 512, device="cuda", generator=g)
    b = torch.randn(512, 256, device="cuda", generator=g)
    exact = a.double() @ b.double()
    error = ((a @ b).double() - exact).abs().max().item() / exact.abs().max().item()
    assert error <= 1e-5, f"float32 product off by {error:.3g} relative: TF32 is on"


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize(("gate", "level"), FLOAT32_CASES, ids=[f"{g}-{lvl}" for g, lvl in FLOAT32_CASES])
def test_float32_every_gate_against_reference(gate, level):
    """Compiled (not interpreted) kernels in float32 against the naive float64 reference at a moderate odd size."""
    from helpers import make_inputs

    from fused_gates import gated_policy_loss
    from fused_gates.reference import reference_loss

    inputs = make_inputs(batch=6, length=33, hidden_size=200, vocab=5003, seed=7)
    options = dict(
        gate=gate, tau_pos=2.0, tau_neg=3.0, loss_type="bnpo", importance_sampling_level=level, beta=0.04,
        use_bias_correction_kl=True, temperature=0.7, entropy_coef=0.01,
    )
    h, w, b = (t.detach().float().cuda().requires_grad_() for t in inputs.leaves(torch.float32))
    cuda = {name: getattr(inputs, name).cuda() for name in ("ids", "mask")}
    out = gated_policy_loss(
        h, w, cuda["ids"], inputs.advantages.float().cuda(), cuda["mask"], inputs.old.float().cuda(),
        inputs.ref.float().cuda(), bias=b, backend="triton", memory_budget_mb=8.0, **options,
    )
    out.loss.backward()
    rh, rw, rb = inputs.leaves(torch.float64)
    ref = reference_loss(rh, rw, inputs.ids, inputs.advantages, inputs.mask, inputs.old, inputs.ref, bias=rb, **options)
    ref.loss.backward()
    # float32 logits of magnitude ~10 carry ~1e-6 absolute rounding; the bounds leave an order of magnitude
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-4 * max(1.0, abs(ref.loss.item()))
    assert (out.logprobs.cpu().double() - ref.logprobs).abs().max() <= 2e-4
    assert (out.gate_grad.cpu().double() - ref.gate_grad).abs().max() <= 2e-4
    for name, ours, theirs in (("hidden", h.grad, rh.grad), ("weight", w.grad, rw.grad), ("bias", b.grad, rb.grad)):
        assert (ours.cpu().double() - theirs).abs().max() <= 1e-4 * theirs.abs().max() + 1e-7, name
