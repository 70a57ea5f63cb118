"""A first-use self-check of the Triton backend: before the Triton backend runs a kind of call for the first time in a
process, a small random problem of the same kind goes through it and through the torch backend, and the two must
agree.

What it guards against: a Triton / driver / GPU combination that compiles the kernels but computes them wrongly (a
miscompiled kernel, an interpreter bug), which would otherwise train silently on wrong gradients. On disagreement
beyond the dtype's tolerance, or an exception from the Triton run, one ``RuntimeWarning`` names the device, the torch
and Triton versions, the family and the error; for the rest of the process ``backend="auto"`` then takes the torch
backend for that family, and an explicit ``backend="triton"`` raises a ``ValueError`` (``backend: ...``) saying why.

A *family* (:func:`family_key`) is what selects the kernels: the device, the head's dtype, whether the head has a
bias and a soft cap, and the path,

* ``fused token-level row kernel`` (token-level objective, whole head): the gate and whether there is a KL term, its
  bias correction, an entropy term and the entropy-scaled trust region;
* ``split statistics / gradient kernels`` (sequence-level ratios, vespo, the off-policy mask, a gate without a kernel
  form such as m2po / bapo / gmpo, or a vocabulary slice):
  the same, plus the importance-sampling level and the off-policy mask;
* ``no-grad pass`` (:func:`~fused_gates.token_logprobs`): the statistics method (``auto`` checks both the ``tl.dot``
  tiles and the cuBLAS chunks, since the token count picks between them).

The problem: B=3, T=7, H=40 (48 where the head's hidden size is a multiple of 16), V=301 (304 where the head's
vocabulary slice is a multiple of 16: Triton specialises integer arguments on divisibility by 16, so the check then
compiles and runs the kernel variants the real call runs), random nonzero hidden states, weight and bias, a few
masked tokens, advantages of both signs and old / reference log-probs near the policy's, with the call's gate
parameters, temperature and soft cap. Compared: the loss, the per-token log-probs and entropies, and the gradients of
hidden, weight (and bias), each as ``||triton - torch|| / ||torch||`` against :data:`TOLERANCES` (float32 1e-4,
float16 / bfloat16 2e-2). A failure of the torch run itself leaves nothing to compare with and counts as passed.

Cost: the check runs once per family per process (results cached in :data:`RESULTS`). Measured on CPU in Triton's
interpreter (2 cores): ~0.3-0.5 s for a loss family (both backends, forward and backward), ~0.2 s for the no-grad
family with both statistics methods, against seconds for one interpreted loss call of a real size. On a GPU it is a
few dozen small launches per backend (three cuBLAS products, one or two row kernels, the O(n) objective ops) and one
host synchronisation: well under 10 ms once the kernels are compiled. Compilation is the larger one-time cost: the
row kernels' variants are shared with the real call (same constexprs and divisibility), but the ``tl.dot`` tile
kernel of the no-grad pass autotunes on (tokens bucket, V, H), so the check's small problem adds one autotuning
round (four configurations, about a second or two) to the process's first no-grad pass.

Skipped (treated as passed, nothing cached): with ``FUSED_GATES_SELF_CHECK=0``; by default in Triton's interpreter
(``TRITON_INTERPRET=1``: nothing is compiled there and only tests run; ``FUSED_GATES_SELF_CHECK=1`` turns it on; the
Triton backend's test file spans 25 families, ~14 s of checks on 2 CPU cores); while ``torch.compile`` traces
(``torch.compiler.is_compiling()``); during CUDA graph capture (a cached result is still honoured); and inside the
check's own calls.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .environment import self_check_enabled
from .head import Head
from .objective import ObjectiveConfig

TOLERANCES = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
"""Largest ``||triton - torch|| / ||torch||`` per head dtype (any other dtype: the low-precision bound)."""
LOW_PRECISION_TOLERANCE = 2e-2
ROWS, LENGTH = 3, 7
ENTROPY_COEF = 0.1  # the entropy term's weight where the call has one
SEED = 20240


@dataclass(frozen=True)
class CheckResult:
    """One family's check: ``passed``; ``error`` the measured errors or the exception (None where the torch run could
    not be compared with: ``note`` says why); the wall time in seconds."""

    passed: bool
    family: str
    error: str | None
    seconds: float
    note: str | None = None


RESULTS: dict[tuple, CheckResult] = {}
"""The checks this process has run, by :func:`family_key`."""

_state = threading.local()  # the check's own calls are not checked


def clear() -> None:
    """Forget every result (the next use of each family checks again)."""
    RESULTS.clear()


def family_key(head: Head, config: ObjectiveConfig | None) -> tuple:
    """What selects the Triton kernels of a call: cheap to compute, hashable."""
    weight = head.weight
    common = (str(weight.device), weight.dtype, head.bias is not None, head.softcap is not None)
    if config is None:
        return (*common, "no-grad", head.statistics_method)
    gate = config.gate
    objective = (gate.name, gate.kind, gate.kernel_id, config.beta != 0, config.use_bias_correction_kl,
                 config.has_entropy_bonus, config.estr_threshold is not None)
    if _split_path(head, config):
        return (*common, "split", *objective, config.sequence_level, config.off_policy_mask_threshold is not None)
    return (*common, "fused", *objective)


def describe_family(head: Head, config: ObjectiveConfig | None) -> str:
    weight = head.weight
    features = [str(weight.dtype).removeprefix("torch."), *(["bias"] if head.bias is not None else []),
                *(["softcap"] if head.softcap is not None else [])]
    if config is None:
        path = f"no-grad pass (statistics_method={head.statistics_method!r})"
    else:
        path = ("split statistics / gradient kernels" if _split_path(head, config)
                else "fused token-level row kernel")
        features.insert(0, f"gate {config.gate.name!r}")
        if config.sequence_level:
            features.append("sequence-level")
        if config.beta != 0:
            features.append("KL" + (" with bias correction" if config.use_bias_correction_kl else ""))
        if config.has_entropy_bonus:
            features.append("entropy term")
        if config.estr_threshold is not None:
            features.append("entropy-scaled trust region")
        if config.off_policy_mask_threshold is not None:
            features.append("off-policy mask")
    return f"{path}: {', '.join(features)} on {weight.device}"


def _split_path(head: Head, config: ObjectiveConfig) -> bool:
    return config.needs_whole_rows or head.shard is not None or not config.in_kernel_epilogue


def _skipped() -> bool:
    """Whether no check may run now: disabled, inside the check, under ``torch.compile`` or CUDA graph capture."""
    if not self_check_enabled() or getattr(_state, "running", False):
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    capturing = getattr(torch.cuda, "is_current_stream_capturing", None)
    try:
        return bool(capturing is not None and capturing())
    except RuntimeError:  # a torch build without the CUDA runtime (an emulated device): nothing can be capturing
        return False


def check(head: Head, config: ObjectiveConfig | None) -> CheckResult | None:
    """The family's result, running the check on its first use (None: skipped, see the module docstring)."""
    device = head.weight.device
    if _skipped():
        return None
    key = family_key(head, config)
    result = RESULTS.get(key)
    if result is not None or _capturing(device):
        return result
    result = run_check(head, config)
    RESULTS[key] = result
    if not result.passed:
        warnings.warn(_failure_message(head, result), RuntimeWarning, stacklevel=5)
    return result


def triton_usable(head: Head, config: ObjectiveConfig | None) -> bool:
    """Whether ``backend="auto"`` may take the Triton backend for this call's family (checking it on first use)."""
    result = check(head, config)
    return result is None or result.passed


def failure(head: Head, config: ObjectiveConfig | None) -> str | None:
    """Why the Triton backend failed this family's check (None: passed or skipped)."""
    result = check(head, config)
    if result is None or result.passed:
        return None
    return f"{result.family}: {result.error}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            return f"{torch.cuda.get_device_name(device)} ({device})"
        except Exception:
            return str(device)
    return device.type


def _failure_message(head: Head, result: CheckResult) -> str:
    import triton

    return (f"fused_gates: the Triton backend failed its first-use self-check against the torch backend on "
            f"{device_name(head.weight.device)} (torch {torch.__version__}, triton {triton.__version__}) for the "
            f"{result.family}: {result.error}. In this process backend='auto' uses the torch backend for this case "
            "and backend='triton' raises; FUSED_GATES_SELF_CHECK=0 skips the check.")


# -- the check -----------------------------------------------------------------------------------------------------


@contextmanager
def _checking(device: torch.device):
    """The check's own calls: not checked again, with gradients, outside inference mode and autocast."""
    _state.running = True
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            yield
    finally:
        _state.running = False


@dataclass
class _Problem:
    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    ids: Tensor
    mask: Tensor
    advantages: Tensor
    old: Tensor
    ref: Tensor


def _problem(head: Head, config: ObjectiveConfig | None) -> _Problem:
    """Random, odd-sized inputs on the call's device and dtype, generated on the CPU (the global RNG is untouched)."""
    weight = head.weight
    hidden_size = 48 if weight.shape[1] % 16 == 0 else 40
    vocab = 304 if weight.shape[0] % 16 == 0 else 301
    g = torch.Generator().manual_seed(SEED)
    f64 = torch.float64
    hidden = torch.randn(ROWS, LENGTH, hidden_size, generator=g, dtype=f64)
    w = torch.randn(vocab, hidden_size, generator=g, dtype=f64) * (1.5 / math.sqrt(hidden_size))
    b = torch.randn(vocab, generator=g, dtype=f64) * 0.2 if head.bias is not None else None
    ids = torch.randint(0, vocab, (ROWS, LENGTH), generator=g)
    mask = (torch.rand(ROWS, LENGTH, generator=g) > 0.2).long()
    mask[:, 0] = 1
    advantages = torch.tensor([1.0, -0.6, 0.4], dtype=f64)
    # old / ref log-probs near the policy's (rounded to the dtype first), so that the ratios spread around 1
    x = hidden.to(weight.dtype).to(f64) @ w.to(weight.dtype).to(f64).T
    if b is not None:
        x = x + b.to(weight.dtype).to(f64)
    if head.softcap is not None:
        x = head.softcap * torch.tanh(x / head.softcap)
    logp = torch.log_softmax(x * head.inv_temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logp + 0.2 * torch.randn(ROWS, LENGTH, generator=g, dtype=f64)
    ref = logp + 0.2 * torch.randn(ROWS, LENGTH, generator=g, dtype=f64)
    device, dtype = weight.device, weight.dtype
    return _Problem(hidden.to(device, dtype), w.to(device, dtype), None if b is None else b.to(device, dtype),
                    ids.to(device), mask.to(device), advantages.to(device, dtype), old.to(device, dtype),
                    ref.to(device, dtype))


def _loss_options(head: Head, config: ObjectiveConfig) -> dict:
    params, gate = config.params, config.gate
    options = dict(
        gate=gate, tau_pos=params.tau_pos, tau_neg=params.tau_neg, epsilon_low=params.epsilon_low,
        epsilon_high=params.epsilon_high, beta=config.beta, use_bias_correction_kl=config.use_bias_correction_kl,
        importance_sampling_level="sequence" if config.sequence_level else "token",
        entropy_coef=ENTROPY_COEF if config.has_entropy_bonus else 0.0,
        off_policy_mask_threshold=config.off_policy_mask_threshold,
        temperature=1.0 / head.inv_temperature, logit_softcap=head.softcap,
    )
    if gate.is_clip and math.isfinite(params.delta):
        options["delta"] = params.delta
    if config.estr_threshold is not None:
        options.update(estr_threshold=config.estr_threshold, estr_epsilon=config.estr_epsilon)
    if gate.is_vespo:
        options["vespo_k"] = (params.vespo_k_pos, params.vespo_k_neg)
        options["vespo_lambda"] = (params.vespo_lambda_pos, params.vespo_lambda_neg)
    if head.shard is not None and not config.needs_whole_rows:
        # a vocabulary slice runs the split kernels; on the check's whole head a mask that drops nothing takes them
        options["off_policy_mask_threshold"] = 1e30
    return options


PUBLIC_FUNCTIONS: dict[str, Callable] = {}
"""``gated_policy_loss`` and ``token_logprobs``, handed in by :mod:`fused_gates.api` when it is imported (the check
runs the public functions, which sit above the backend choice that calls it: passed down, not imported up)."""


def use_public_functions(loss: Callable, logprobs: Callable) -> None:
    PUBLIC_FUNCTIONS.update(loss=loss, logprobs=logprobs)


def _run_loss(problem: _Problem, backend: str, options: dict) -> dict[str, Tensor]:
    gated_policy_loss = PUBLIC_FUNCTIONS["loss"]
    h = problem.hidden.detach().clone().requires_grad_(True)
    w = problem.weight.detach().clone().requires_grad_(True)
    b = None if problem.bias is None else problem.bias.detach().clone().requires_grad_(True)
    out = gated_policy_loss(h, w, problem.ids, problem.advantages, problem.mask, problem.old, problem.ref, bias=b,
                            backend=backend, **options)
    out.loss.backward()
    found = {"loss": out.loss.detach(), "logprobs": out.logprobs, "entropy": out.entropy,
             "grad hidden": h.grad, "grad weight": w.grad}
    if b is not None:
        found["grad bias"] = b.grad
    return found


def _run_logprobs(problem: _Problem, backend: str, head: Head) -> dict[str, Tensor]:
    token_logprobs = PUBLIC_FUNCTIONS["logprobs"]
    methods = ("dot", "cublas") if head.statistics_method == "auto" else (head.statistics_method,)
    found = {}
    for method in methods if backend == "triton" else ("auto",):
        logp, entropy = token_logprobs(problem.hidden, problem.weight, problem.ids, problem.mask,
                                       temperature=1.0 / head.inv_temperature, logit_softcap=head.softcap,
                                       bias=problem.bias, backend=backend, statistics_method=method)
        # the torch backend has one method: its result stands for each of Triton's
        for name in methods if backend != "triton" else (method,):
            found[f"logprobs ({name})"], found[f"entropy ({name})"] = logp, entropy
    return found


def relative_error(got: Tensor | None, want: Tensor | None) -> float:
    """``||got - want|| / ||want||`` in float64 (0 where both are zero; NaN where either is non-finite)."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else math.nan
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = torch.linalg.vector_norm(want).item()
    diff = torch.linalg.vector_norm(got - want).item()
    if not math.isfinite(scale):
        return math.nan
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def run_check(head: Head, config: ObjectiveConfig | None) -> CheckResult:
    """Runs the family's problem through both backends and compares (uncached; :func:`check` caches)."""
    start = time.perf_counter()
    family = describe_family(head, config)
    device, dtype = head.weight.device, head.weight.dtype
    tolerance = TOLERANCES.get(dtype, LOW_PRECISION_TOLERANCE)
    with _checking(device):
        problem = _problem(head, config)
        if config is None:
            run = lambda backend: _run_logprobs(problem, backend, head)  # noqa: E731
        else:
            options = _loss_options(head, config)
            run = lambda backend: _run_loss(problem, backend, options)  # noqa: E731
        try:
            ours = run("triton")
        except Exception as error:
            return CheckResult(False, family, f"the Triton run raised {type(error).__name__}: {error}",
                               time.perf_counter() - start)
        try:
            expected = run("torch")
        except Exception as error:
            return CheckResult(True, family, None, time.perf_counter() - start,
                               note=f"the torch run raised {type(error).__name__}: {error}")
    errors = {name: relative_error(ours[name], want) for name, want in expected.items()}
    failed = {name: err for name, err in errors.items() if not err <= tolerance}
    error = None
    if failed:
        error = ("relative error " + ", ".join(f"{name} {err:.3g}" for name, err in failed.items())
                 + f" > {tolerance:g} (||triton - torch|| / ||torch||)")
    return CheckResult(not failed, family, error, time.perf_counter() - start)
