"""Forward + backward timing of the fused gated policy loss at the Qwen2.5-7B head size, against its floor and peers.

    python benchmarks/gpu_bench.py OUT_DIR            # CUDA, N = 8192, H = 3584, V = 152,064, bfloat16
    python benchmarks/gpu_bench.py OUT_DIR --smoke    # tiny sizes, runs on CPU (Triton in its interpreter)

Timed (CUDA events, warm-up, median of repeats), each after checking its loss against the torch backend's:

* ``triton`` / ``torch``: this package's backends, gate sigmoid (SAPO), at the default memory budget and a large one;
* ``3-GEMM floor``: ``h W^T``, ``dz W`` and ``dz^T h`` as three bfloat16 ``torch.mm`` (no softmax at all);
* ``naive``: materialised bfloat16 logits, float32 log-softmax, autograd;
* ``trl``: ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` log-probs + the SAPO formula in torch;
* ``liger``: ``LigerFusedLinearGRPOLoss(loss_type="sapo")``;
* no-grad forward (``token_logprobs``) against one GEMM ``h W^T``.

FLOP counts: one product ``h W^T`` is ``2 N H V``; forward + backward needs three (TFLOP/s below use ``6 N H V``),
a forward alone one. Peak memory is ``torch.cuda.max_memory_allocated`` minus what was allocated before the call
(inputs and their gradients' buffers from earlier runs freed).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SAPO = dict(gate="sigmoid", tau_pos=1.0, tau_neg=1.05, loss_type="grpo")


@dataclass
class Problem:
    hidden: torch.Tensor  # [B, T, H]
    weight: torch.Tensor  # [V, H]
    ids: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    old: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.ids.numel()

    @property
    def flops_per_product(self) -> float:
        return 2.0 * self.tokens * self.hidden.shape[-1] * self.weight.shape[0]


@dataclass
class Row:
    name: str
    ms: float | None
    peak_extra_gib: float | None
    loss: float | None = None
    note: str = ""
    flops: float = 0.0
    extra: dict = field(default_factory=dict)


def make_problem(batch: int, length: int, hidden_size: int, vocab: int, dtype, device) -> Problem:
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, length, hidden_size, device=device, generator=g).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=g) * (2.0 / hidden_size**0.5)).to(dtype)
    ids = torch.randint(0, vocab, (batch, length), device=device, generator=g)
    advantages = torch.randn(batch, device=device, generator=g)
    mask = torch.ones(batch, length, device=device)
    mask[0, length // 2 :] = 0
    from fused_gates import token_logprobs

    logp, _ = token_logprobs(hidden, weight, ids, backend="torch", memory_budget_mb=1024)
    old = logp + 0.05 * torch.randn(batch, length, device=device, generator=g)
    return Problem(hidden, weight, ids, advantages, mask, old)


def sapo_from_logprobs(logp: torch.Tensor, p: Problem) -> torch.Tensor:
    """SAPO with grpo aggregation from per-token log-probs [B, T] (TRL's ``loss_type="sapo"`` formula)."""
    adv = p.advantages[:, None]
    ratio = torch.exp(logp - p.old)
    tau = torch.where(adv > 0, SAPO["tau_pos"], SAPO["tau_neg"])
    per_token = -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * adv
    return ((per_token * p.mask).sum(-1) / p.mask.sum(-1).clamp(min=1)).mean()


# ---------------------------------------------------------------------------------------------------------------
# Implementations: each returns a closure running forward + backward and returning the loss


def leaves(p: Problem):
    return p.hidden.detach().clone().requires_grad_(), p.weight.detach().clone().requires_grad_()


def fused_backend(p: Problem, backend: str, budget_mb: float | None) -> Callable[[], torch.Tensor]:
    from fused_gates import gated_policy_loss

    h, w = leaves(p)

    def step():
        h.grad = w.grad = None
        out = gated_policy_loss(h, w, p.ids, p.advantages, p.mask, p.old, backend=backend, memory_budget_mb=budget_mb,
                                **SAPO)
        out.loss.backward()
        return out.loss.detach()

    return step


def naive(p: Problem) -> Callable[[], torch.Tensor]:
    h, w = leaves(p)

    def step():
        h.grad = w.grad = None
        logits = (h @ w.T).float()
        logp = torch.log_softmax(logits, -1).gather(-1, p.ids[..., None]).squeeze(-1)
        loss = sapo_from_logprobs(logp, p)
        loss.backward()
        return loss.detach()

    return step


def three_gemm_floor(p: Problem) -> Callable[[], torch.Tensor]:
    h = p.hidden.reshape(-1, p.hidden.shape[-1])
    w = p.weight

    def step():
        z = h @ w.T  # [N, V]: stands in for dz
        dh = z @ w
        dw = z.T @ h
        return (dh.float().sum() + dw.float().sum()) * 0

    return step


def trl_chunked(p: Problem) -> Callable[[], torch.Tensor]:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    names = list(inspect.signature(ChunkedLogProbFunction.forward).parameters)[1:]
    if names[:5] != ["hidden", "weight", "bias", "targets", "temperature"]:
        raise RuntimeError(f"unexpected ChunkedLogProbFunction.forward parameters {names}")
    extra = ()
    if len(names) > 5 and names[5] == "chunk_size":  # TRL 1.16: the vocabulary tile width, set by its trainer
        try:
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk_size
        except ImportError:
            chunk_size = 32768
        extra = (chunk_size,)
    h, w = leaves(p)
    batch, length, hidden_size = p.hidden.shape

    def step():
        h.grad = w.grad = None
        out = ChunkedLogProbFunction.apply(h.reshape(-1, hidden_size), w, None, p.ids.reshape(-1), 1.0, *extra)
        logp = out[0].reshape(batch, length)
        loss = sapo_from_logprobs(logp, p)
        loss.backward()
        return loss.detach()

    return step


def liger_sapo(p: Problem) -> Callable[[], torch.Tensor]:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    accepted = inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters
    options = {"loss_type": "sapo", "beta": 0.0, "use_ref_model": False, "temperature": 1.0}
    for name, value in (("sapo_temperature_pos", SAPO["tau_pos"]), ("sapo_temperature_neg", SAPO["tau_neg"])):
        if name in accepted:
            options[name] = value
    module = LigerFusedLinearGRPOLoss(**{k: v for k, v in options.items() if k in accepted})
    h, w = leaves(p)

    def step():
        h.grad = w.grad = None
        result = module(h, w, p.ids, p.mask, p.advantages, old_per_token_logps=p.old)
        loss = result[0] if isinstance(result, tuple) else result
        loss.backward()
        return loss.detach()

    return step


def no_grad_forward(p: Problem, backend: str) -> Callable[[], torch.Tensor]:
    from fused_gates import token_logprobs

    def step():
        logp, _ = token_logprobs(p.hidden, p.weight, p.ids, backend=backend, memory_budget_mb=2048)
        return logp.sum()

    return step


def one_gemm(p: Problem) -> Callable[[], torch.Tensor]:
    h = p.hidden.reshape(-1, p.hidden.shape[-1])

    def step():
        return (h @ p.weight.T)[0, 0].float() * 0

    return step


# ---------------------------------------------------------------------------------------------------------------
# Timing


def measure(step: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int):
    """(median ms, peak extra GiB, loss of the first call)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    loss = step()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak, float(loss)


def check_loss(name: str, loss: float, expected: float, tolerance: float) -> str:
    if abs(loss - expected) > tolerance * max(1.0, abs(expected)):
        return f"LOSS MISMATCH: {loss:.6g} vs torch backend {expected:.6g}"
    return ""


def probe_out_dtype(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (cpu)"
    a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
    try:
        out = torch.empty(16, 16, device=device, dtype=torch.float32)
        torch.mm(a, a, out_dtype=torch.float32, out=out)
        return "yes"
    except (TypeError, RuntimeError) as e:
        return f"no ({type(e).__name__}: falls back to float32 copies)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (Triton interpreted)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        shape = dict(batch=16, length=512, hidden_size=3584, vocab=152064)  # N = 8192, Qwen2.5-7B head
        dtype, warmup, repeats = torch.bfloat16, args.warmup, args.repeats
    else:
        shape = dict(batch=2, length=16, hidden_size=40, vocab=1003)
        dtype, warmup, repeats = torch.float32, 0, 1
    problem = make_problem(**shape, dtype=dtype, device=device)
    print(f"device {torch.cuda.get_device_name() if cuda else platform.processor() or 'cpu'}, shape {shape}, {dtype}")

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    def optional(name: str, factory):
        try:
            return factory()
        except Exception as e:  # the peer is missing or its API changed: report, do not crash the run
            print(f"skip {name}: {type(e).__name__}: {e}")
            return f"skipped: {type(e).__name__}: {e}"

    big_budget = 4096.0 if cuda else 0.05
    candidates: list[tuple[str, Callable[[], Callable[[], torch.Tensor]] | None, float, str]] = [
        ("torch backend (default budget)", lambda: fused_backend(problem, "torch", None), 3, "check"),
        (f"torch backend ({big_budget:g} MiB)", lambda: fused_backend(problem, "torch", big_budget), 3, "check"),
        ("triton backend (default budget)", lambda: fused_backend(problem, "triton", None), 3, "check"),
        (f"triton backend ({big_budget:g} MiB)", lambda: fused_backend(problem, "triton", big_budget), 3, "check"),
        ("3-GEMM floor", lambda: three_gemm_floor(problem), 3, "floor"),
        ("naive torch (materialised)", lambda: naive(problem), 3, "check"),
        ("TRL ChunkedLogProbFunction + SAPO", lambda: trl_chunked(problem), 3, "peer"),
        ("Liger LigerFusedLinearGRPOLoss(sapo)", lambda: liger_sapo(problem), 3, "peer"),
        ("no-grad forward: triton token_logprobs", lambda: no_grad_forward(problem, "triton"), 1, "forward"),
        ("no-grad forward: torch token_logprobs", lambda: no_grad_forward(problem, "torch"), 1, "forward"),
        ("no-grad forward: one GEMM", lambda: one_gemm(problem), 1, "forward"),
    ]
    rows: list[Row] = []
    reference_loss = None
    failures = []
    for name, factory, products, kind in candidates:
        step = optional(name, factory) if kind == "peer" else factory()
        if isinstance(step, str):
            rows.append(Row(name, None, None, note=step))
            continue
        try:
            ms, peak, loss = measure(step, device, warmup, repeats)
        except Exception as e:
            if kind != "peer":
                raise
            print(f"skip {name}: {type(e).__name__}: {e}")
            rows.append(Row(name, None, None, note=f"failed: {type(e).__name__}: {e}"))
            continue
        finally:
            del step
        note = ""
        if kind in ("check", "peer"):
            if reference_loss is None:
                reference_loss = loss  # the first row: the torch backend
            # bfloat16 logits (naive, TRL-style tiles) move the loss by ~1e-3 relative; a wrong loss moves it by O(1)
            note = check_loss(name, loss, reference_loss, 1e-2 if kind == "peer" or "naive" in name else 1e-3)
            if note:
                failures.append(f"{name}: {note}")
                print(f"!!! {name}: {note}")
        rows.append(Row(name, ms, peak, loss, note, flops=products * problem.flops_per_product))
        peak_text = f"+{peak:.2f} GiB" if peak is not None else "n/a"
        print(f"{name:45s} {ms:10.2f} ms   peak {peak_text}   loss {loss:.6g}")

    def find(prefix: str) -> float | None:
        for r in rows:
            if r.name.startswith(prefix) and r.ms:
                return r.ms
        return None

    floor, trl_ms, liger_ms, gemm_ms = find("3-GEMM"), find("TRL"), find("Liger"), find("no-grad forward: one GEMM")
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "mm_out_dtype_float32": probe_out_dtype(device),
        "shape": shape,
        "dtype": str(dtype),
        "warmup": warmup,
        "repeats": repeats,
        "failures": failures,
    }
    for module in ("trl", "liger_kernel"):
        try:
            info[module] = __import__(module).__version__
        except Exception:
            info[module] = None

    table = [
        "| implementation | median ms | TFLOP/s | x floor | x TRL | x Liger | peak extra GiB | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    records = []
    for r in rows:
        is_forward = r.name.startswith("no-grad")
        base = gemm_ms if is_forward else floor

        def ratio(x: float | None, r: Row = r) -> str:
            return f"{r.ms / x:.2f}" if (r.ms and x) else "-"

        tflops = f"{r.flops / (r.ms * 1e-3) / 1e12:.0f}" if r.ms and r.flops else "-"
        peak = f"{r.peak_extra_gib:.2f}" if r.peak_extra_gib is not None else "-"
        ms = f"{r.ms:.2f}" if r.ms else "-"
        vs_trl = "-" if is_forward else ratio(trl_ms)
        vs_liger = "-" if is_forward else ratio(liger_ms)
        table.append(f"| {r.name} | {ms} | {tflops} | {ratio(base)} | {vs_trl} | {vs_liger} | {peak} | {r.note} |")
        records.append({**r.__dict__})
    header = [
        f"# Fused gated policy loss: forward + backward, {info['device']}",
        "",
        f"{info['date']}; torch {info['torch']}, triton {info['triton']}, trl {info['trl']}, "
        f"liger-kernel {info['liger_kernel']}; shape {shape} ({dtype}); median of {repeats} after {warmup} warm-up; "
        f"mm(out_dtype=float32): {info['mm_out_dtype_float32']}.",
        "TFLOP/s count 3 products (6 N H V) for forward + backward, one (2 N H V) for the no-grad forward; "
        "'x floor' is against three bfloat16 GEMMs (one for the no-grad rows).",
        "",
    ]
    (args.out_dir / "gpu_bench.md").write_text("\n".join(header + table) + "\n")
    (args.out_dir / "gpu_bench.json").write_text(json.dumps({"info": info, "rows": records}, indent=2))
    print("\n".join(table))
    if failures:
        print("LOSS MISMATCHES:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
