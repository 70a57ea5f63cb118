"""Inputs in the layouts and types that users hand over without thinking about them: strided views (a column of a
wider tensor, a transposed tensor), a fractional float64 mask, tensors that hold no data (meta, sparse), odd
``num_items_in_batch`` values, and a float16 head under a loss-scaling upstream gradient. Each result is compared
with the same call on contiguous copies, or with the float64 reference; errors must name the argument.

Small odd shapes (B=3, T=5, H=12, V=67), float32, both computing backends (Triton in its interpreter on CPU).
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, make_inputs, run_reference

from fused_gates import BACKENDS, gated_policy_loss, token_logprobs

# The interpreter evaluates both sides of tl.where with numpy, which warns on the overflow of the side not taken.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

COMPUTING_BACKENDS = [b for b in BACKENDS if b != "auto"]
B, T, H, V = 3, 5, 12, 67
OPTIONS = dict(gate="erf", tau_pos=2.0, tau_neg=3.0, beta=0.05, entropy_coef=0.01, temperature=0.9, loss_type="bnpo")
PER_TOKEN = ("logprobs", "entropy", "ratio", "gate_value", "gate_grad", "kl", "policy_weight")
# float32: the strided call must give the contiguous call's numbers up to summation order
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


def _column(values: torch.Tensor, index: int = 0) -> torch.Tensor:
    """``values`` as column ``index`` of a wider tensor: the same numbers, the last stride 2."""
    wide = torch.stack([values, torch.full_like(values, 7)] if index == 0 else [torch.full_like(values, 7), values],
                       dim=-1)
    view = wide[..., index]
    assert not view.is_contiguous()
    return view


def _transposed(values: torch.Tensor) -> torch.Tensor:
    """``values`` [B, T] as the transpose of a contiguous [T, B] tensor."""
    view = values.t().contiguous().t()
    assert not view.is_contiguous() and torch.equal(view, values)
    return view


def _inputs(batch: int = B, seed: int = 3):
    inputs = make_inputs(batch, T, H, V, seed=seed, token_advantages=True)
    return {
        "hidden": inputs.hidden.float(),
        "weight": inputs.weight.float(),
        "bias": inputs.bias.float(),
        "ids": inputs.ids,
        "advantages": inputs.advantages.float(),
        "mask": inputs.mask,
        "old": inputs.old.float(),
        "ref": inputs.ref.float(),
    }


def _call(backend: str, t: dict, *, bias: torch.Tensor, bias_leaf: torch.Tensor, with_mask: bool, **options):
    """The loss and the gradients of hidden, weight and the bias leaf (which ``bias`` may be a view of)."""
    hidden = t["hidden"].to(DEVICE).requires_grad_()
    weight = t["weight"].to(DEVICE).requires_grad_()
    out = gated_policy_loss(hidden, weight, t["ids"], t["advantages"], t["mask"] if with_mask else None, t["old"],
                            t["ref"], bias=bias, backend=backend, **{**OPTIONS, **options})
    out.loss.backward()
    return out, (hidden.grad, weight.grad, bias_leaf.grad)


def _assert_same(strided, contiguous, what: str) -> None:
    (out, grads), (expected, expected_grads) = strided, contiguous
    loss_error = abs(out.loss.item() - expected.loss.item())
    assert loss_error <= LOSS_RTOL * max(1.0, abs(expected.loss.item())), f"{what}: loss differs by {loss_error:.3g}"
    for name in PER_TOKEN:
        got, want = getattr(out, name), getattr(expected, name)
        if want is None:
            continue
        error = (got.double() - want.double()).abs().max().item()
        assert error <= LOSS_RTOL * max(1.0, want.abs().max().item()), f"{what}: {name} differs by {error:.3g}"
    for name, got, want in zip(("hidden", "weight", "bias"), grads, expected_grads, strict=True):
        error = (got.double() - want.double()).abs().max().item()
        assert error <= GRAD_RTOL * max(1e-6, want.abs().max().item()), f"{what}: grad {name} differs by {error:.3g}"


def _on_device(t: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in t.items()}


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_strided_per_token_inputs_give_the_contiguous_result(backend, with_mask):
    """old_logprobs / ref_logprobs / ids / mask as a column of a [B, T, 2] tensor, token advantages as a transposed
    view, the bias as a column of a [V, 2] tensor (its gradient lands in that column)."""
    t = _on_device(_inputs())
    bias_leaf = t["bias"].clone().requires_grad_()
    contiguous = _call(backend, t, bias=bias_leaf, bias_leaf=bias_leaf, with_mask=with_mask)

    strided = dict(t, old=_column(t["old"]), ref=_column(t["ref"], 1), ids=_column(t["ids"]),
                   advantages=_transposed(t["advantages"]), mask=_column(t["mask"], 1))
    wide_bias = torch.stack([t["bias"], torch.full_like(t["bias"], 0.5)], dim=-1).requires_grad_()
    out, (h_grad, w_grad, wide_grad) = _call(backend, strided, bias=wide_bias[:, 0], bias_leaf=wide_bias,
                                             with_mask=with_mask)
    assert torch.count_nonzero(wide_grad[:, 1]) == 0, "the gradient of the bias leaked into the next column"
    _assert_same((out, (h_grad, w_grad, wide_grad[:, 0])), contiguous, f"{backend}, strided inputs")


@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_one_sequence_with_sequence_advantages_and_no_mask(backend):
    """B = 1: advantages of shape [1] and no mask, against the contiguous [1, T] per-token advantages."""
    t = _on_device(_inputs(batch=1, seed=4))
    bias = t["bias"].clone().requires_grad_()
    sequence = dict(t, advantages=t["advantages"][:, 0].contiguous())
    per_token = dict(t, advantages=t["advantages"][:, :1].expand(1, T).contiguous())
    ours = _call(backend, sequence, bias=bias, bias_leaf=bias, with_mask=False)
    bias_2 = t["bias"].clone().requires_grad_()
    _assert_same(ours, _call(backend, per_token, bias=bias_2, bias_leaf=bias_2, with_mask=False),
                 f"{backend}, B = 1 with [B] advantages")
    h, w, b = (x.double().requires_grad_() for x in (t["hidden"].cpu(), t["weight"].cpu(), t["bias"].cpu()))
    from fused_gates.reference import reference_loss

    ref = reference_loss(h, w, t["ids"].cpu(), sequence["advantages"].cpu().double(), None,
                         t["old"].cpu().double(), t["ref"].cpu().double(), bias=b, **OPTIONS)
    assert abs(ours[0].loss.item() - ref.loss.item()) <= 2e-5 * max(1.0, abs(ref.loss.item()))


@pytest.mark.parametrize("method", ["cublas", "dot"])
def test_strided_ids_in_token_logprobs(method):
    t = _on_device(_inputs(seed=5))
    args = dict(temperature=0.9, bias=t["bias"], backend="triton", statistics_method=method)
    expected = token_logprobs(t["hidden"], t["weight"], t["ids"], t["mask"], **args)
    got = token_logprobs(t["hidden"], t["weight"], _column(t["ids"]), _column(t["mask"], 1), **args)
    for name, a, b in zip(("logprobs", "entropy"), got, expected, strict=True):
        error = (a.double() - b.double()).abs().max().item()
        assert error <= LOSS_RTOL * max(1.0, b.abs().max().item()), f"{method}: strided ids change {name}: {error:.3g}"


def test_fractional_float64_mask_is_not_rounded_to_float32():
    """Mask weights such as 0.3 and 0.7 in float64 with float64 inputs: the loss is the reference's to 1e-12
    (a mask rounded to float32 would be off by ~3e-8 relative)."""
    inputs = make_inputs(B, T, H, V, seed=6)
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.3, 0.7, 0.1, 0.9, 1 / 3], dtype=torch.float64)
    inputs.mask = weights[torch.randint(0, 5, (B, T), generator=g)] * inputs.mask
    assert inputs.mask.dtype == torch.float64 and (inputs.mask.float().double() != inputs.mask).any()
    h, w, b = (x.detach().clone().requires_grad_() for x in (inputs.hidden, inputs.weight, inputs.bias))
    out = gated_policy_loss(h, w, inputs.ids, inputs.advantages, inputs.mask, inputs.old, inputs.ref, bias=b,
                            backend="torch", **OPTIONS)
    expected = run_reference(inputs, **OPTIONS).out.loss.item()
    error = abs(out.loss.item() - expected) / abs(expected)
    assert error <= 1e-12, f"loss with a float64 fractional mask: relative error {error:.3g} (float32 rounding?)"


def _small():
    t = _inputs()
    return t["hidden"], t["weight"], t["ids"], t["advantages"][:, 0].contiguous()


# hidden (and, for meta, the head too: a model built on the meta device) without strided data to read
HIDDEN_WITHOUT_DATA = {
    "meta": lambda h, w: (h.to("meta"), w.to("meta")),
    "sparse": lambda h, w: (h.to_sparse(), w),
}


@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
@pytest.mark.parametrize("make", HIDDEN_WITHOUT_DATA.values(), ids=HIDDEN_WITHOUT_DATA.keys())
def test_hidden_without_strided_data_is_refused_naming_hidden(make, backend):
    hidden, weight, ids, advantages = _small()
    hidden, weight = make(hidden, weight)
    try:
        gated_policy_loss(hidden, weight, ids, advantages, backend=backend)
    except (ValueError, TypeError) as error:
        assert str(error).startswith("hidden:"), f"the error does not start with 'hidden:': {error}"
    except Exception as error:  # any other error is the failure this test reports
        pytest.fail(f"{type(error).__name__} instead of a ValueError / TypeError naming hidden: {error}")
    else:
        pytest.fail(f"hidden on {hidden.layout} / {hidden.device} accepted")


BAD_ITEMS = {"nan": float("nan"), "inf": float("inf"), "string": "12", "negative": -3, "nan-tensor":
             torch.tensor(float("nan")), "two-element-tensor": torch.tensor([1.0, 2.0])}
# 0 is valid: a batch without a token (TRL's count over an all-masked batch); the normaliser is clamped to 1


@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
@pytest.mark.parametrize("items", BAD_ITEMS.values(), ids=BAD_ITEMS.keys())
def test_bad_num_items_in_batch_is_refused_naming_it(items, backend):
    hidden, weight, ids, advantages = _small()
    try:
        out = gated_policy_loss(hidden, weight, ids, advantages, loss_type="dapo", num_items_in_batch=items,
                                backend=backend)
    except (ValueError, TypeError) as error:
        assert str(error).startswith("num_items_in_batch:"), f"the error does not name the argument: {error}"
    except Exception as error:
        pytest.fail(f"{type(error).__name__} instead of a ValueError / TypeError naming num_items_in_batch: {error}")
    else:
        pytest.fail(f"num_items_in_batch={items!r} accepted: loss {out.loss.item()}")


# ----------------------------------------------------------------------------------------------------------------
# Loss scaling with a float16 head

SCALE = 65536.0  # a typical dynamic loss scale
FLOAT16_TINY = 2.0**-24  # the smallest float16 subnormal, ~6e-8: what is stored below about half of it is 0
FLOAT16_RTOL = 2e-3  # float16 rounding is 2^-11 ~ 4.9e-4 per operation
# with an entropy term the backward forms dz explicitly
FLOAT16_OPTIONS = dict(gate="sigmoid", entropy_coef=0.01)


def _float16_head_inputs():
    """Logits whose softmax tail is below float16's range at a unit upstream gradient: 8 vocabulary rows 12 nats down
    (a constant hidden feature times -12, so that the case needs no lm_head bias), whose entries of dz (p g and the
    entropy term's p (z - mean)) are at most ~5e-8, below or at float16's smallest subnormal (6e-8); times 65536 they
    are normal float16 numbers (up to ~3e-3). Simulated, a correct float16 backward (dz formed with the scale, rounded
    to float16, float32 products) keeps every row of both gradients to ~5e-4 relative; one that stores dz for a unit
    gradient and scales afterwards zeroes ~80 elements of the tail rows of the weight gradient."""
    inputs = make_inputs(B, T, H, V, seed=8, masked_row=False, zero_advantage_row=False)
    inputs.hidden[..., 0] = 1.0
    inputs.weight[V - 8 :, 0] = -12.0
    return inputs


def _float16_grads(backend: str, inputs, scale: float, with_bias: bool) -> dict[str, torch.Tensor]:
    h, w, b = (x.detach().half().to(DEVICE).requires_grad_() for x in (inputs.hidden, inputs.weight, inputs.bias))
    b = b if with_bias else None
    out = gated_policy_loss(h, w, inputs.ids.to(DEVICE), inputs.advantages.half().to(DEVICE), inputs.mask.to(DEVICE),
                            inputs.old.half().to(DEVICE), bias=b, backend=backend, **FLOAT16_OPTIONS)
    (scale * out.loss).backward()
    return {"hidden": h.grad.cpu().double(), "weight": w.grad.cpu().double()}


# A fresh process in which torch.mm / torch.addmm take float16 operands into a float32 result (``out_dtype``) on the
# CPU, as they do on CUDA: the loss then forms dz in float16 for its products, as on a GPU. (A fresh process because
# the package probes once per process whether such products exist.)
FLOAT32_OUTPUT_PRODUCTS_WORKER = """
import sys

import torch

_mm, _addmm = torch.mm, torch.addmm


def mm(a, b, *, out_dtype=None, out=None):
    if out_dtype is None:
        return _mm(a, b) if out is None else _mm(a, b, out=out)
    product = _mm(a.to(out_dtype), b.to(out_dtype))
    return product if out is None else out.copy_(product)


def addmm(acc, a, b, *, beta=1, alpha=1, out_dtype=None, out=None):
    if out_dtype is None:
        return _addmm(acc, a, b, beta=beta, alpha=alpha) if out is None else _addmm(acc, a, b, beta=beta,
                                                                                   alpha=alpha, out=out)
    total = _addmm(acc.to(out_dtype), a.to(out_dtype), b.to(out_dtype), beta=beta, alpha=alpha)
    return total if out is None else out.copy_(total)


torch.mm, torch.addmm = mm, addmm

from fused_gates import gated_policy_loss  # noqa: E402

data = torch.load(sys.argv[1])
h, w = (data[k].clone().requires_grad_() for k in ("hidden", "weight"))
b = None if data["bias"] is None else data["bias"].clone().requires_grad_()
out = gated_policy_loss(h, w, data["ids"], data["advantages"], data["mask"], data["old"], bias=b,
                        backend=data["backend"], **data["options"])
(data["scale"] * out.loss).backward()
torch.save({"hidden": h.grad.double(), "weight": w.grad.double()}, sys.argv[2])
"""


def _float16_grads_with_float32_output_products(backend: str, inputs, scale: float, with_bias: bool,
                                                tmp_path) -> dict[str, torch.Tensor]:
    import subprocess
    import sys

    worker = tmp_path / "worker.py"
    worker.write_text(FLOAT32_OUTPUT_PRODUCTS_WORKER)
    data = {k: getattr(inputs, k).detach().half() for k in ("hidden", "weight", "bias", "advantages", "old")}
    data.update(ids=inputs.ids, mask=inputs.mask, backend=backend, options=FLOAT16_OPTIONS, scale=scale)
    if not with_bias:
        data["bias"] = None
    torch.save(data, tmp_path / "inputs.pt")
    result = subprocess.run([sys.executable, str(worker), str(tmp_path / "inputs.pt"), str(tmp_path / "grads.pt")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(tmp_path / "grads.pt")


PRODUCTS = {
    "native-products": False,
    # only needed where the device has none (the CPU); on CUDA the native products already are these
    "float32-output-products": True,
}


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("emulate", PRODUCTS.values(), ids=PRODUCTS.keys())
@pytest.mark.parametrize("backend", COMPUTING_BACKENDS)
def test_float16_gradient_under_a_loss_scale_keeps_the_softmax_tail(backend, emulate, with_bias, tmp_path):
    """``(65536 * loss).backward()`` is 65536 times the gradient: within float16 precision of the float64 truth of
    the same float16 inputs, and nothing flushed to zero where the scaled truth is well inside float16's range (a
    backward that forms dz in float16 for a unit upstream gradient and scales afterwards loses the tail)."""
    if emulate and torch.cuda.is_available():
        pytest.skip("CUDA has float16 products with a float32 result: the native-products case covers them")
    inputs = _float16_head_inputs()
    truth = run_reference(inputs, dtype=torch.float16, bias=with_bias, **FLOAT16_OPTIONS).grads
    if emulate:
        scaled = _float16_grads_with_float32_output_products(backend, inputs, SCALE, with_bias, tmp_path)
    else:
        scaled = _float16_grads(backend, inputs, SCALE, with_bias)
    for name, exact in zip(("hidden", "weight"), truth[:2], strict=True):
        exact_scaled = SCALE * exact
        # the design of the case: some unit-scale entries are below float16's subnormals, their scaled ones are not
        if name == "weight":
            assert ((exact.abs() < FLOAT16_TINY) & (exact_scaled.abs() > 1e3 * FLOAT16_TINY)).any()
        flushed = (scaled[name] == 0) & (exact_scaled.abs() > 1e3 * FLOAT16_TINY)
        assert not flushed.any(), (
            f"{backend}: {int(flushed.sum())} element(s) of the scaled {name} gradient are 0 where the float64 truth "
            f"is up to {exact_scaled[flushed].abs().max().item():.3g}")
        # per row (a token's hidden gradient, a vocabulary row's weight gradient) whose truth is nonzero: the norm
        # of the error against the row's (an element alone can cancel to far below its terms' rounding)
        rows = exact.reshape(-1, exact.shape[-1]).norm(dim=1) != 0
        error = (scaled[name] - exact_scaled).reshape(-1, exact.shape[-1])[rows].norm(dim=1)
        relative = error / exact_scaled.reshape(-1, exact.shape[-1])[rows].norm(dim=1)
        worst = relative.max().item()
        assert worst <= FLOAT16_RTOL, f"{backend}: scaled {name} gradient, a row's relative error {worst:.3g}"
