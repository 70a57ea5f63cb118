"""The Triton backend's first-use self-check (fused_gates.self_check): once per family per process, a fault makes
``auto`` take the torch backend and ``backend="triton"`` raise, ``FUSED_GATES_SELF_CHECK=0`` skips it.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

pytest.importorskip("triton")

from helpers import DEVICE, make_inputs, run_loss

from fused_gates import backends, self_check, token_logprobs
from fused_gates.head import Head
from fused_gates.kernels.triton_backend import TritonChunks
from fused_gates.options import LossOptions

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
FAILURE_PREFIX = "fused_gates: the Triton backend failed its first-use self-check"


@pytest.fixture(autouse=True)
def runs(monkeypatch):
    """A fresh result cache (restored empty afterwards), the check enabled (by default it is off in the interpreter),
    and the list of families checked."""
    monkeypatch.setenv("FUSED_GATES_SELF_CHECK", "1")
    self_check.clear()
    checked = []
    real = self_check.run_check

    def counting(head, config):
        checked.append(self_check.family_key(head, config))
        return real(head, config)

    monkeypatch.setattr(self_check, "run_check", counting)
    yield checked
    self_check.clear()


def head_and_config(dtype=torch.float32, bias=True, **options):
    """A head with a bias (as ``run_loss`` passes one) and the objective of ``options``."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(37, 13, generator=g, dtype=dtype)
    head = Head(weight.to(DEVICE), torch.randn(37, generator=g, dtype=dtype).to(DEVICE) if bias else None, 1.0, 128.0)
    return head, LossOptions(**options).check_scalars()


def failure_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)
            and str(w.message).startswith(FAILURE_PREFIX)]


def test_triton_passing_check_runs_once_per_family(runs):
    inputs = make_inputs(3, 5, 13, 37)
    first = run_loss(inputs, backend="triton", dtype=torch.float32, gate="sigmoid")
    again = run_loss(inputs, backend="triton", dtype=torch.float32, gate="sigmoid")
    assert len(runs) == 1  # the check's own calls are not checked again, the second call reads the cache
    (result,) = self_check.RESULTS.values()
    assert result.passed and result.error is None and "fused token-level row kernel" in result.family
    torch.testing.assert_close(first.out.loss, again.out.loss)
    expected = run_loss(inputs, backend="torch", dtype=torch.float32, gate="sigmoid")
    torch.testing.assert_close(first.out.loss, expected.out.loss, rtol=1e-5, atol=1e-6)
    h = inputs.hidden.float().to(DEVICE)
    w = inputs.weight.float().to(DEVICE)
    for _ in range(2):
        token_logprobs(h, w, inputs.ids.to(DEVICE), inputs.mask.to(DEVICE), backend="triton")
    assert len(runs) == 2 and runs[1][4] == "no-grad"


def test_triton_wrong_statistics_warn_once_then_auto_takes_torch_and_triton_raises(runs, monkeypatch):
    real = TritonChunks.statistics

    def wrong(self, hidden, targets, keep):
        stats = real(self, hidden, targets, keep)
        stats.log_sum_exp.add_(0.1)  # log-probs 0.1 too small, gradients off
        stats.logprobs.sub_(0.1)
        return stats

    monkeypatch.setattr(TritonChunks, "statistics", wrong)
    inputs = make_inputs(3, 5, 13, 37)
    options = dict(gate="sigmoid", importance_sampling_level="sequence")  # the split path calls statistics()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            with pytest.raises(ValueError, match=r"^backend: backend='triton' failed its first-use self-check"):
                run_loss(inputs, backend="triton", dtype=torch.float32, **options)
    (message,) = failure_warnings(record)
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    assert device_name in message and "relative error" in message and "split statistics" in message
    assert f"torch {torch.__version__}" in message and "triton " in message
    assert len(runs) == 1

    head, config = head_and_config(**options)
    monkeypatch.setattr(backends, "_auto_tries_triton", lambda device: True)  # auto on CPU, as on CUDA
    assert not self_check.triton_usable(head, config)
    assert backends.resolve_backend("auto", head, config).name == "torch"
    # the token-level family (the fused kernel, which statistics() does not touch) passes and stays on Triton
    head, token_config = head_and_config(gate="sigmoid")
    assert backends.resolve_backend("auto", head, token_config).name == "triton"
    assert len(runs) == 2


def test_triton_exception_in_the_kernels_fails_the_check(runs, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("injected kernel failure")

    monkeypatch.setattr(TritonChunks, "fused_token_chunk", broken)
    head, config = head_and_config(gate="clip")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"^backend: .*self-check.*injected kernel failure"):
            backends.resolve_backend("triton", head, config)
        monkeypatch.setattr(backends, "_auto_tries_triton", lambda device: True)
        assert backends.resolve_backend("auto", head, config).name == "torch"
    (message,) = failure_warnings(record)
    assert "RuntimeError: injected kernel failure" in message and "gate 'clip'" in message
    assert len(runs) == 1


def test_triton_opt_out_skips_the_check(runs, monkeypatch):
    monkeypatch.setenv("FUSED_GATES_SELF_CHECK", "0")
    monkeypatch.setattr(TritonChunks, "fused_token_chunk", lambda *a, **k: pytest.fail("the check ran"))
    head, config = head_and_config(gate="sigmoid")
    assert backends.resolve_backend("triton", head, config).name == "triton"
    assert self_check.triton_usable(head, config)
    assert runs == [] and not self_check.RESULTS


def test_triton_default_is_on_for_compiled_kernels_off_in_the_interpreter(runs, monkeypatch):
    from fused_gates.environment import self_check_enabled

    monkeypatch.delenv("FUSED_GATES_SELF_CHECK")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not self_check_enabled()
    monkeypatch.setenv("FUSED_GATES_SELF_CHECK", "1")
    assert self_check_enabled()
    monkeypatch.delenv("FUSED_GATES_SELF_CHECK")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert self_check_enabled()
    monkeypatch.setenv("FUSED_GATES_SELF_CHECK", "0")
    assert not self_check_enabled()


def test_triton_skipped_while_compiling(runs, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    head, config = head_and_config(gate="sigmoid")
    assert backends.resolve_backend("triton", head, config).name == "triton"
    assert runs == [] and not self_check.RESULTS


def test_triton_results_are_cached_per_family(runs):
    head, sigmoid = head_and_config(gate="sigmoid")
    _, clip = head_and_config(gate="clip")
    for config in (sigmoid, clip, sigmoid, clip):
        assert self_check.triton_usable(head, config)
    assert len(runs) == 2 and runs[0] != runs[1]
    assert len(self_check.RESULTS) == 2


def test_family_keys_separate_the_kernel_variants():
    head, token = head_and_config(gate="sigmoid")
    half, _ = head_and_config(torch.float16)
    _, sequence = head_and_config(gate="sigmoid", importance_sampling_level="sequence")
    _, entropy = head_and_config(gate="sigmoid", entropy_coef=0.01)
    _, other_tau = head_and_config(gate="sigmoid", tau_pos=3.0)
    unbiased, _ = head_and_config(bias=False)
    keys = [self_check.family_key(head, token), self_check.family_key(half, token),
            self_check.family_key(head, sequence), self_check.family_key(head, entropy),
            self_check.family_key(unbiased, token), self_check.family_key(head, None)]
    assert len(set(keys)) == len(keys)
    assert self_check.family_key(head, other_tau) == keys[0]  # the parameters are runtime floats: same kernels
