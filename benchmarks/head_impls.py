"""The implementations the benchmarks compare, in two modes, and the float32 reference they are checked against.

* ``TRAINING[name](case, gate) -> loss``: forward + backward of the gated policy loss (TRL's ``grpo`` aggregation;
  the sigmoid gate is TRL 1.16's ``loss_type="sapo"``) from last hidden states and the lm_head, leaving the
  gradients in ``case.hidden.grad`` / ``case.weight.grad``.
* ``FORWARD[name](case) -> log-probs [B, T]``: the no-grad pass that produces old / reference log-probs.

Implementations: ours (``backend="auto"``: Triton on CUDA, torch on CPU; ``fused_gates_torch`` forces the torch
backend; ``fused_gates_budget<M>`` sets ``memory_budget_mb=M``; the no-grad ``fused_gates_dot`` /
``fused_gates_cublas`` pick the Triton backend's statistics kernel through ``token_logprobs``'
``statistics_method`` option), the naive materialised-logits version, TRL 1.16's
``ChunkedLogProbFunction`` + TRL's SAPO formula (on CUDA over the valid tokens only, as TRL's trainer calls it on
Triton devices), Liger-Kernel's ``LigerFusedLinearGRPOLoss(loss_type="sapo")`` (training only: it has no
log-prob-only entry point), PyTorch's chunked ``linear_cross_entropy`` (its per-token loss is ``-logp``) + the same
formula, and ``floor``: the bare matrix products any implementation needs over the valid (unpadded) tokens (three
for forward + backward, one for the forward). ``unavailable(name, mode, device)`` names the reason an
implementation cannot run here, if any.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fused_gates import PAPER_GATES
from fused_gates.gates import INPUT_GATES
from fused_gates.reference import TRUST_REGION_DEFAULTS, trust_region_terms

TAU_POS, TAU_NEG = 1.0, 1.05
EPSILON = 0.2  # clip gate: epsilon_low = epsilon_high
GATES = (*PAPER_GATES, *INPUT_GATES)
# TRL 1.16's trainer passes trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE (vocabulary tile width); importing that
# module pulls in transformers, so the value is repeated here
TRL_CHUNK_SIZE = 32768
# The budget curve of the training step (MiB of working buffers); the default budget is the plain fused_gates row.
BUDGETS_MB = (256, 512, 1024, 2048, 4096)
# on CPU, the budgets below the default (512 MiB), at the headline shape
CPU_BUDGETS_MB = (128, 256)
# token_logprobs' choice of the Triton no-grad kernel: one tl.dot pass, or cuBLAS chunks + a row-statistics kernel
STATISTICS_METHODS = {"fused_gates_dot": "dot", "fused_gates_cublas": "cublas"}


@dataclass
class Case:
    hidden: Tensor  # [B, T, H], requires grad
    weight: Tensor  # [V, H], requires grad
    ids: Tensor  # [B, T]
    advantages: Tensor  # [B]
    mask: Tensor  # [B, T], the last 1/8 of each row is padding
    old: Tensor  # [B, T] float32
    _valid_rows: Tensor | None = field(default=None, repr=False)
    _topk: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict, repr=False)

    @property
    def tokens(self) -> int:
        return self.ids.numel()

    @property
    def valid_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def valid_hidden(self) -> Tensor:
        """The hidden states of the unpadded tokens [n, H], detached (gathered once, outside any timing)."""
        if self._valid_rows is None:
            flat = self.hidden.detach().reshape(-1, self.hidden.shape[-1])
            self._valid_rows = flat[self.mask.reshape(-1).bool()]
        return self._valid_rows

    def floor_flops(self, mode: str) -> float:
        # one product h W^T over the n valid tokens is 2 n H V flops; forward + backward needs three (logits,
        # dh = dz W, dW = dz^T h), the no-grad pass one
        products = 3 if mode == "fwd_bwd" else 1
        return products * 2.0 * self.valid_tokens * self.hidden.shape[-1] * self.weight.shape[0]

    def gradient_bytes(self) -> int:
        return (self.hidden.numel() + self.weight.numel()) * self.hidden.element_size()

    def reset(self) -> None:
        self.hidden.grad = self.weight.grad = None


def make_case(batch: int, length: int, hidden_size: int, vocab: int, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", seed: int = 0) -> Case:
    device = torch.device(device)
    # generated where they live: a 7B head's weight is 545M numbers, slow to draw on the CPU and copy over
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=g, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g, device=device) * 0.02).to(dtype)
    ids = torch.randint(0, vocab, (batch, length), generator=g, device=device)
    advantages = torch.randn(batch, generator=g, device=device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    mask[:, length - length // 8 :] = 0
    # old log-probs near the policy's: log-ratios of about +-0.1 (uniform log-probs under these weights)
    old = -math.log(vocab) + 0.1 * torch.randn(batch, length, generator=g, device=device)
    return Case(hidden.requires_grad_(True), weight.requires_grad_(True), ids, advantages, mask, old)


# ---------------------------------------------------------------------------------------------------------------
# The objective from per-token log-probs, written from the paper's gate formulas (no code shared with the package)


def gate_value(gate: str, ratio: Tensor, advantages: Tensor) -> Tensor:
    tau = torch.where(advantages > 0, TAU_POS, TAU_NEG)
    u = ratio - 1
    if gate == "clip":
        return torch.where(advantages > 0, ratio.clamp(max=1 + EPSILON), ratio.clamp(min=1 - EPSILON))
    if gate == "sigmoid":
        return torch.sigmoid(tau * u) * 4 / tau
    if gate == "erf":
        c = math.sqrt(math.pi / 2) / tau
        return c * (1 + torch.erf(tau * u / math.sqrt(2))) + 1 - c
    if gate == "arctan":
        return 1 + torch.atan(tau * u) / tau
    if gate == "softsign":
        return 1 + u / torch.sqrt(1 + tau**2 * u**2)
    raise ValueError(f"unknown gate {gate!r}")


TOPK_SUFFIX = "+topk"
"""``dppo+topk`` / ``dppo_kl+topk``: DPPO's Top-K divergence over the behaviour's top :data:`TOPK`
(:func:`behaviour_topk`)."""
TOPK = 20


@torch.no_grad()
def behaviour_topk(case: Case, k: int = TOPK) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids, behaviour log-probs, current log-probs)`` [B, T, k] of a behaviour policy whose logits are the current
    ones plus noise (its top-k), computed once per case in row blocks (float32)."""
    if k not in case._topk:
        b, t, h = case.hidden.shape
        x, w = case.hidden.detach().reshape(b * t, h).float(), case.weight.detach().float()
        generator = torch.Generator(device=x.device).manual_seed(5)
        ids, old, current = (torch.empty(b * t, k, device=x.device, dtype=dtype)
                             for dtype in (torch.long, torch.float32, torch.float32))
        rows = max(1, 2**28 // (4 * w.shape[0]))
        for start in range(0, b * t, rows):
            z = torch.log_softmax(x[start : start + rows] @ w.T, -1)
            noisy = torch.log_softmax(z + 0.5 * torch.randn(z.shape, generator=generator, device=z.device), -1)
            top = noisy.topk(k, dim=-1)
            ids[start : start + rows], old[start : start + rows] = top.indices, top.values
            current[start : start + rows] = z.gather(1, top.indices)
        case._topk[k] = (ids.view(b, t, k), old.view(b, t, k), current.view(b, t, k))
    return case._topk[k]


ESTR_SUFFIX = "+estr"
"""``<gate>+estr``: the gate with the entropy-scaled trust region (``estr_threshold``), the behaviour policy's
entropy given (:func:`behaviour_entropy`)."""
ESTR_THRESHOLD = 0.5


def behaviour_entropy(case: Case) -> Tensor:
    """A fixed behaviour-policy entropy per position in [0, 3) (the case's shape, its device)."""
    generator = torch.Generator().manual_seed(11)
    return (3.0 * torch.rand(case.ids.shape, generator=generator)).to(case.old.device)


def policy_loss(logps: Tensor, case: Case, gate: str = "sigmoid") -> Tensor:
    """``-f(r) A`` per token, averaged per sequence over its mask, then over sequences (TRL's ``grpo``); the gates that
    read more than r take the float64 specification's per-token term (``fused_gates.reference``) at the papers'
    defaults; ``<gate>+estr`` keeps the tokens with ``(log r)^2 <= tau (H + 0.01)``."""
    if gate.endswith(ESTR_SUFFIX):
        gate = gate.removesuffix(ESTR_SUFFIX)
        keep = ((logps.float() - case.old).square() <= ESTR_THRESHOLD * (behaviour_entropy(case) + 0.01)).float()
    else:
        keep = torch.ones_like(case.old)
    opts = dict(TRUST_REGION_DEFAULTS)
    if gate.endswith(TOPK_SUFFIX):
        gate = gate.removesuffix(TOPK_SUFFIX)
        _, old_topk, current_topk = behaviour_topk(case)
        opts["topk"] = (old_topk.double(), current_topk.double())
    if gate in INPUT_GATES:
        m = case.mask.double()
        if gate == "dppo_kl":
            opts["dppo_delta"] = opts["dppo_kl_delta"]
        per_token, _, _ = trust_region_terms(gate, logps.double(), case.old.double(),
                                             case.advantages.double().unsqueeze(1), m, EPSILON, EPSILON, opts)
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean().float()
    ratio = torch.exp(logps.float() - case.old)
    per_token = -gate_value(gate, ratio, case.advantages.unsqueeze(1)) * case.advantages.unsqueeze(1) * keep
    m = case.mask.to(per_token.dtype)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()


@torch.no_grad()
def reference_logprobs(case: Case) -> Tensor:
    """Float32 log-probs [B, T] of the same (possibly bfloat16) inputs.

    On CPU all rows at once: the naive implementation in float32. On CUDA blocks of rows whose float32 logits take
    at most 1 GiB, so that the reference never needs the N x V matrix that the naive peer may not fit.
    """
    b, t, h = case.hidden.shape
    x = case.hidden.detach().reshape(b * t, h)
    w = case.weight.detach().float()
    ids = case.ids.reshape(-1)
    rows = b * t if x.device.type == "cpu" else max(1, 2**30 // (4 * w.shape[0]))
    out = torch.empty(b * t, dtype=torch.float32, device=x.device)
    for start in range(0, b * t, rows):
        z = x[start : start + rows].float() @ w.T
        out[start : start + rows] = z.gather(1, ids[start : start + rows, None]).squeeze(1) - z.logsumexp(1)
    return out.view(b, t)


# ---------------------------------------------------------------------------------------------------------------
# Forward + backward


def _ours(case: Case, gate: str, backend: str, memory_budget_mb: float | None = None) -> Tensor:
    from fused_gates import gated_policy_loss

    estr = {}
    if gate.endswith(ESTR_SUFFIX):
        gate = gate.removesuffix(ESTR_SUFFIX)
        estr = dict(estr_threshold=ESTR_THRESHOLD, old_entropy=behaviour_entropy(case))
    if gate.endswith(TOPK_SUFFIX):
        gate = gate.removesuffix(TOPK_SUFFIX)
        ids, old_topk, _ = behaviour_topk(case)
        estr = dict(old_topk_ids=ids, old_topk_logprobs=old_topk)
    out = gated_policy_loss(case.hidden, case.weight, case.ids, case.advantages, case.mask, case.old, gate=gate,
                            tau_pos=TAU_POS, tau_neg=TAU_NEG, epsilon_low=EPSILON, epsilon_high=EPSILON,
                            backend=backend, memory_budget_mb=memory_budget_mb, **estr)
    out.loss.backward()
    return out.loss.detach()


def ours(case: Case, gate: str = "sigmoid", memory_budget_mb: float | None = None) -> Tensor:
    return _ours(case, gate, "auto", memory_budget_mb)


def ours_torch(case: Case, gate: str = "sigmoid", memory_budget_mb: float | None = None) -> Tensor:
    return _ours(case, gate, "torch", memory_budget_mb)


def ours_at_budget(memory_budget_mb: float) -> Callable[..., Tensor]:
    """``fused_gates`` (backend auto) with ``memory_budget_mb`` of working buffers: a point of the budget curve."""

    def step(case: Case, gate: str = "sigmoid") -> Tensor:
        return _ours(case, gate, "auto", memory_budget_mb)

    return step


def _train_from_logps(logps: Tensor, case: Case, gate: str) -> Tensor:
    loss = policy_loss(logps, case, gate)
    loss.backward()
    return loss.detach()


def _naive_logps(case: Case) -> Tensor:
    logits = (case.hidden @ case.weight.T).float()
    return torch.log_softmax(logits, -1).gather(-1, case.ids.unsqueeze(-1)).squeeze(-1)


def naive(case: Case, gate: str = "sigmoid") -> Tensor:
    return _train_from_logps(_naive_logps(case), case, gate)


def _trl_logps(case: Case) -> Tensor:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    b, t, h = case.hidden.shape
    # arguments: hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale,
    # outputs (() = log-probs only, no entropy). TRL 1.16's trainer passes only the valid positions on Triton
    # devices (CUDA) and scatters the result back; elsewhere every position.
    if case.hidden.is_cuda:
        valid = case.mask.bool()
        logps, *_ = ChunkedLogProbFunction.apply(case.hidden[valid], case.weight, None, case.ids[valid], 1.0,
                                                 TRL_CHUNK_SIZE, None, 1.0, ())
        return logps.new_zeros(b, t).masked_scatter(valid, logps)
    logps, *_ = ChunkedLogProbFunction.apply(case.hidden.reshape(b * t, h), case.weight, None, case.ids.reshape(-1),
                                             1.0, TRL_CHUNK_SIZE, None, 1.0, ())
    return logps.view(b, t)


def trl_chunked(case: Case, gate: str = "sigmoid") -> Tensor:
    return _train_from_logps(_trl_logps(case), case, gate)


def _lce_logps(case: Case) -> Tensor:
    from torch.nn import LinearCrossEntropyOptions
    from torch.nn.functional import linear_cross_entropy

    b, t, h = case.hidden.shape
    # options=LinearCrossEntropyOptions() selects the chunked path (options=None would materialise the logits)
    nll = linear_cross_entropy(case.hidden.reshape(b * t, h), case.weight, case.ids.reshape(-1), reduction="none",
                               options=LinearCrossEntropyOptions())
    return -nll.view(b, t)


def torch_lce(case: Case, gate: str = "sigmoid") -> Tensor:
    return _train_from_logps(_lce_logps(case), case, gate)


def liger(case: Case, gate: str = "sigmoid") -> Tensor:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    if gate != "sigmoid":
        raise ValueError("the Liger baseline is run with its SAPO (sigmoid) loss only")
    # compiled=False on CPU: torch.compile's CPU code generation would add minutes of compilation to each process
    fn = LigerFusedLinearGRPOLoss(beta=0.0, compiled=case.hidden.is_cuda, use_ref_model=False, loss_type="sapo",
                                  sapo_temperature_pos=TAU_POS, sapo_temperature_neg=TAU_NEG)
    loss, _ = fn(case.hidden, case.weight, case.ids, case.mask, case.advantages, old_per_token_logps=case.old)
    loss.backward()
    return loss.detach()


def floor(case: Case, gate: str = "sigmoid") -> Tensor:
    """Three products over the valid tokens: logits, then with the logits standing in for dz: dh = dz W and
    dW = dz^T h, in the input dtype (cuBLAS' own float32 accumulation)."""
    with torch.no_grad():
        x = case.valid_hidden
        z = x @ case.weight.T
        dh = z @ case.weight
        dw = z.T @ x
    return (dh[0, 0] + dw[0, 0]).float() * 0


# ---------------------------------------------------------------------------------------------------------------
# Forward only (no grad)


@torch.no_grad()
def ours_logprobs(case: Case, backend: str = "auto", memory_budget_mb: float | None = None, **options) -> Tensor:
    from fused_gates import token_logprobs

    logps, _ = token_logprobs(case.hidden, case.weight, case.ids, case.mask, backend=backend,
                              memory_budget_mb=memory_budget_mb, **options)
    return logps


@torch.no_grad()
def ours_torch_logprobs(case: Case, memory_budget_mb: float | None = None) -> Tensor:
    return ours_logprobs(case, "torch", memory_budget_mb)


def _ours_statistics_method(name: str) -> Callable[[Case], Tensor]:
    @torch.no_grad()
    def forward(case: Case) -> Tensor:
        return ours_logprobs(case, "triton", statistics_method=STATISTICS_METHODS[name])

    return forward


@torch.no_grad()
def naive_logprobs(case: Case) -> Tensor:
    return _naive_logps(case)


@torch.no_grad()
def trl_logprobs(case: Case) -> Tensor:
    return _trl_logps(case)


@torch.no_grad()
def lce_logprobs(case: Case) -> Tensor:
    return _lce_logps(case)


@torch.no_grad()
def floor_forward(case: Case) -> Tensor:
    """One product ``h W^T`` over the valid tokens."""
    z = case.valid_hidden @ case.weight.T
    return z[0, 0].float() * 0


# ---------------------------------------------------------------------------------------------------------------
# Registry

MODES = ("fwd_bwd", "forward")
TRAINING: dict[str, Callable[..., Tensor]] = {
    "fused_gates": ours,
    "fused_gates_torch": ours_torch,
    "naive_torch": naive,
    "trl_chunked_logprob": trl_chunked,
    "liger_fused_linear_grpo": liger,
    "torch_linear_cross_entropy": torch_lce,
    "floor": floor,
    **{f"fused_gates_budget{mb}": ours_at_budget(mb) for mb in sorted({*BUDGETS_MB, *CPU_BUDGETS_MB})},
}
FORWARD: dict[str, Callable[..., Tensor]] = {
    "fused_gates": ours_logprobs,
    **{name: _ours_statistics_method(name) for name in STATISTICS_METHODS},
    "fused_gates_torch": ours_torch_logprobs,
    "naive_torch": naive_logprobs,
    "trl_chunked_logprob": trl_logprobs,
    "torch_linear_cross_entropy": lce_logprobs,
    "floor": floor_forward,
}
IMPLEMENTATIONS = tuple(dict.fromkeys([*TRAINING, *FORWARD]))  # every name, in table order
REQUIRED_MODULE = {"trl_chunked_logprob": "trl", "liger_fused_linear_grpo": "liger_kernel"}


def step(name: str, mode: str) -> Callable[..., Tensor]:
    return (TRAINING if mode == "fwd_bwd" else FORWARD)[name]


def unavailable(name: str, mode: str, device: str) -> str | None:
    """Why ``name`` cannot run in ``mode`` on ``device`` (None if it can)."""
    registry = TRAINING if mode == "fwd_bwd" else FORWARD
    if name not in registry:
        if name == "liger_fused_linear_grpo":
            return f"{name} has no forward-only log-prob entry point (it computes the loss only)"
        return f"{name} is a {'no-grad' if mode == 'fwd_bwd' else 'training'} row only"
    if name == "fused_gates_torch" and device == "cpu":
        return "fused_gates_torch: backend='auto' already is the torch backend on CPU (the fused_gates row)"
    if name in STATISTICS_METHODS and device != "cuda" and not _interpreted():
        return f"{name}: the Triton statistics kernels need CUDA (or TRITON_INTERPRET=1)"
    module = REQUIRED_MODULE.get(name)
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{name} needs the '{module}' package (pip install -e '.[bench]')"
    if name == "torch_linear_cross_entropy" and not (
        hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    ):
        return f"{name}: torch {torch.__version__} has no chunked torch.nn.functional.linear_cross_entropy"
    return None


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (None: not installed), for the rows' ``versions``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def warm_up(name: str, mode: str, case: Case, gate: str = "sigmoid") -> None:
    """One step on the first 8 tokens of ``case`` (same weight): imports, lazy initialisation and the first-use
    costs that some implementations pay per head shape (up to seconds) happen here, not in a timed round or a
    memory measurement."""
    t = min(8, case.hidden.shape[1])
    small = Case(case.hidden[:1, :t].detach().clone().requires_grad_(True), case.weight, case.ids[:1, :t],
                 case.advantages[:1], case.mask[:1, :t].clone(), case.old[:1, :t])
    small.mask[:, 0] = 1  # at least one valid token
    if mode == "fwd_bwd":
        step(name, mode)(small, gate)
    else:
        step(name, mode)(small)
    case.reset()


def naive_bytes(case: Case, mode: str) -> int:
    """Estimated peak of the naive implementation beyond its inputs: N x V logits in the input dtype, their float32
    copy and log-softmax, and in backward two more float32 N x V buffers (the gather's gradient and log-softmax's);
    the CPU float32 measurement (about 14 bytes per logit at the 0.5B head) sits under this count."""
    nv = case.tokens * case.weight.shape[0]
    per_logit = case.hidden.element_size() + 4 + 4 + (8 if mode == "fwd_bwd" else 0)
    return nv * per_logit
