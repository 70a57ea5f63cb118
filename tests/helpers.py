"""What the tests share: random, odd-sized inputs for the loss (never zeros); running the loss and the float64
reference on them and comparing every field (``assert_matches_reference``, tolerances per dtype in ``TOLERANCES``);
the multi-process launcher."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LossInputs:
    hidden: Tensor
    weight: Tensor
    bias: Tensor
    ids: Tensor
    advantages: Tensor
    mask: Tensor | None
    old: Tensor | None  # None: on-policy (the loss's default)
    ref: Tensor | None

    def leaves(self, dtype: torch.dtype = torch.float64, bias: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """Fresh leaf copies of hidden, weight (and bias) in ``dtype`` that require grad."""
        h = self.hidden.detach().to(dtype, copy=True).requires_grad_(True)
        w = self.weight.detach().to(dtype, copy=True).requires_grad_(True)
        b = self.bias.detach().to(dtype, copy=True).requires_grad_(True) if bias else None
        return h, w, b


def make_inputs(
    batch: int = 4,
    length: int = 7,
    hidden_size: int = 13,
    vocab: int = 37,
    *,
    seed: int = 0,
    masked_row: bool = True,
    zero_advantage_row: bool = True,
    log_ratio_scale: float = 0.3,
    token_advantages: bool = False,
) -> LossInputs:
    """Inputs with a fully masked row, a row with A = 0 and log-ratios of a realistic spread."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * 0.4
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.2
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    shape = (batch, length) if token_advantages else (batch,)
    advantages = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(batch, length, generator=g) > 0.25).long()
    mask[:, 0] = 1
    if masked_row and batch > 2:
        mask[1] = 0
    if zero_advantage_row and batch > 3:
        advantages[2] = 0.0
    # old / ref log-probs near the policy's so that ratios spread around 1 on both sides of the clip range
    logits = hidden @ weight.T + bias
    logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logp + log_ratio_scale * torch.randn(batch, length, generator=g, dtype=torch.float64)
    ref = logp + log_ratio_scale * torch.randn(batch, length, generator=g, dtype=torch.float64)
    return LossInputs(hidden, weight, bias, ids, advantages, mask, old, ref)


def max_abs(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Running the loss and the float64 reference, and comparing every field

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PER_TOKEN = ("logprobs", "entropy", "ratio", "gate_value", "gate_grad", "kl", "policy_weight")
GRADS = ("hidden", "weight", "bias")


@dataclass(frozen=True)
class Tolerance:
    """Largest absolute errors allowed: ``loss`` for the loss and EUR, ``per_token`` for the [B, T] outputs,
    ``metrics`` for each metric, ``grad`` for the gradients of hidden / weight / bias."""

    loss: float
    per_token: float
    metrics: float
    grad: float

    @classmethod
    def uniform(cls, atol: float) -> Tolerance:
        return cls(atol, atol, atol, atol)

    def of(self, key: str) -> float:
        if key.startswith("grad "):
            return self.grad
        if key.startswith("metrics["):
            return self.metrics
        return self.per_token if key in PER_TOKEN else self.loss


# Against the float64 reference of the same inputs rounded to the dtype (only the computation's error counts).
# float64: summation order only. float32: logits of magnitude ~3 carry ~3e-7 absolute rounding; a log-ratio or an
# entropy adds a few of them, the loss and gradients average them.
TOLERANCES = {
    torch.float64: Tolerance(loss=1e-10, per_token=1e-9, metrics=1e-9, grad=1e-10),
    torch.float32: Tolerance(loss=2e-5, per_token=1e-4, metrics=2e-5, grad=2e-5),
}


@dataclass
class Run:
    """One call's outputs (a ``GatedPolicyLossOutput`` or a ``ReferenceResult``) and the gradients of hidden,
    weight and bias (None where that input has no gradient)."""

    out: object
    grads: tuple[Tensor | None, Tensor | None, Tensor | None]


@dataclass
class Comparison:
    ours: Run
    reference: Run
    errors: dict[str, float]


def _option(value, dtype: torch.dtype, device: str | torch.device):
    """A tensor option on ``device``, floating ones in ``dtype``; other options unchanged."""
    if isinstance(value, Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return value


def _leaves(inputs: LossInputs, dtype: torch.dtype, *, bias: bool, frozen_weight: bool, device, round_to=None):
    h, w, b = inputs.leaves(round_to or dtype, bias=bias)
    h, w, b = (None if t is None else t.detach().to(device, dtype) for t in (h, w, b))
    return h.requires_grad_(), w.requires_grad_(not frozen_weight), None if b is None else b.requires_grad_()


def run_loss(inputs: LossInputs, *, backend: str = "torch", dtype: torch.dtype = torch.float64, bias: bool = True,
             frozen_weight: bool = False, backward: bool = True, device: str | torch.device = DEVICE,
             **options) -> Run:
    """``gated_policy_loss`` on ``inputs`` in ``dtype`` on ``device`` (old / ref log-probs left out where
    ``inputs.old`` / ``inputs.ref`` is None), then ``loss.backward()``."""
    from fused_gates import gated_policy_loss

    h, w, b = _leaves(inputs, dtype, bias=bias, frozen_weight=frozen_weight, device=device)
    mask = None if inputs.mask is None else inputs.mask.to(device)  # the mask keeps its own dtype
    old, ref = (None if t is None else t.to(device, dtype) for t in (inputs.old, inputs.ref))
    out = gated_policy_loss(h, w, inputs.ids.to(device), inputs.advantages.to(device, dtype), mask, old, ref, bias=b,
                            backend=backend, **{k: _option(v, dtype, device) for k, v in options.items()})
    if backward:
        out.loss.backward()
    return Run(out, (h.grad, w.grad, None if b is None else b.grad))


def run_reference(inputs: LossInputs, *, dtype: torch.dtype = torch.float64, compute_dtype: torch.dtype = torch.float64,
                  bias: bool = True, frozen_weight: bool = False, **options) -> Run:
    """``reference_loss`` (on the CPU) of ``inputs`` rounded to ``dtype``, computed in ``compute_dtype`` (float64:
    the truth), with its autograd gradients. A ``Gate`` object becomes the reference's ``custom_value``; options
    that only steer our implementation (``memory_budget_mb``, ``on_nonfinite``) are dropped."""
    from fused_gates import Gate
    from fused_gates.reference import reference_loss

    options = {k: v for k, v in options.items() if k not in ("memory_budget_mb", "on_nonfinite")}
    gate = options.get("gate")
    if isinstance(gate, Gate):
        options.update(gate=gate.name, custom_value=gate.value)

    def rounded(t):
        if t is None or not isinstance(t, Tensor) or not t.is_floating_point():
            return t
        return t.detach().cpu().to(dtype).to(compute_dtype)

    h, w, b = _leaves(inputs, compute_dtype, bias=bias, frozen_weight=frozen_weight, device="cpu", round_to=dtype)
    mask = inputs.mask
    if mask is not None and mask.is_floating_point():
        mask = mask.to(compute_dtype)
    ref = reference_loss(h, w, inputs.ids, rounded(inputs.advantages), mask, rounded(inputs.old), rounded(inputs.ref),
                         bias=b, **{k: rounded(v) if isinstance(v, Tensor) else v for k, v in options.items()})
    ref.loss.backward()
    return Run(ref, (h.grad, w.grad, None if b is None else b.grad))


def output_errors(ours: Run, expected: Run) -> dict[str, float]:
    """Largest absolute difference of every field: loss, EUR, each per-token output, each metric (relative above 1;
    the two sets of metric names must agree) and each gradient (present in both or in neither)."""
    a, e = ours.out, expected.out
    errors = {"loss": max_abs(a.loss.detach().cpu(), e.loss.detach().cpu()),
              "eur": max_abs(a.eur.cpu(), e.eur.cpu())}
    for name in PER_TOKEN:
        got, want = getattr(a, name), getattr(e, name)
        assert (got is None) == (want is None), f"{name}: {'missing' if got is None else 'unexpected'}"
        if want is not None:
            errors[name] = max_abs(got.cpu(), want.cpu())
    assert set(a.metrics) == set(e.metrics), (
        f"metric names differ: only ours {sorted(set(a.metrics) - set(e.metrics))}, "
        f"only expected {sorted(set(e.metrics) - set(a.metrics))}")
    for key, value in e.metrics.items():  # relative where a metric exceeds 1 (ratio/max of a ratio ~ e^4: float32
        # rounds it to ~5e-6 relative, far beyond an absolute 2e-5)
        scale = max(1.0, value.detach().abs().max().item()) if value.numel() else 1.0
        errors[f"metrics[{key}]"] = max_abs(a.metrics[key].cpu(), value.cpu()) / scale
    for name, got, want in zip(GRADS, ours.grads, expected.grads, strict=True):
        assert (got is None) == (want is None), f"grad {name}: {'missing' if got is None else 'unexpected'}"
        if want is not None:
            errors[f"grad {name}"] = max_abs(got.cpu(), want.cpu())
    return errors


def assert_within(errors: dict[str, float], tolerance: Tolerance, *, against: str = "the float64 reference",
                  ignore: tuple[str, ...] = ()) -> None:
    """Every error within its kind's tolerance (NaN fails); the message names each field that is not."""
    failed = [f"{key}: error {err:.3g} > {tolerance.of(key):.3g}" for key, err in errors.items()
              if key not in ignore and not err <= tolerance.of(key)]
    assert not failed, f"against {against}: " + "; ".join(failed)


def assert_matches_reference(inputs: LossInputs, *, backend: str = "torch", dtype: torch.dtype = torch.float64,
                             tolerances: Tolerance | None = None, bias: bool = True, frozen_weight: bool = False,
                             **options) -> Comparison:
    """Runs ``gated_policy_loss`` (``backend``, ``dtype``; ``options`` as the loss takes them, ``memory_budget_mb``
    included) and the float64 reference of the same inputs rounded to ``dtype``, and asserts that every field
    (loss, per-token outputs, EUR, metrics, gradients of hidden / weight / bias) is within ``tolerances`` (default:
    ``TOLERANCES[dtype]``). Returns both runs and the errors."""
    ours = run_loss(inputs, backend=backend, dtype=dtype, bias=bias, frozen_weight=frozen_weight, **options)
    reference = run_reference(inputs, dtype=dtype, bias=bias, frozen_weight=frozen_weight, **options)
    errors = output_errors(ours, reference)
    assert_within(errors, tolerances or TOLERANCES[dtype], against=f"the float64 reference ({backend}, {dtype})")
    return Comparison(ours, reference, errors)


def run_distributed(nproc: int, target: list[str], *, env: dict[str, str] | None = None, timeout: float = 600):
    """``torch.distributed.run`` of ``target`` (a script and its arguments, or ``-m module ...``) on ``nproc`` CPU
    processes (gloo) and a free local port; returns the completed process (output captured)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full_env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           *target]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
