"""Compile every Triton kernel variant that fused_gates launches, for sm_80 (A100) and sm_90 (H100 / H200), without
a GPU, and report registers and spills per variant; exit 1 on a compile error, on a spill or an unloadable
shared-memory size in a variant that runs at the default shapes, or when a scenario launches no kernel.

    python tests/aot/compile_kernels.py [--arch 80 90] [--scope default|all] [--json REPORT.json]

The variants are not listed here: the scenarios below call the public API (``gated_policy_loss`` + backward,
``token_logprobs``) at real shapes on an emulated GPU, and :mod:`launch_capture` compiles what the launchers
actually launch, with the specialisations (divisibility by 16, equal-to-1, ``None`` arguments), heuristics,
autotuning configurations, warps and stages that Triton's launcher derives from those arguments. ``default``
scenarios are the shapes and options the GPU check, the GPU tests and the TRL trainer run (the 7B / 0.5B heads at
N = 8192 with 1/8 padding in bfloat16, the benchmark's memory budgets, the trainer's on-policy step at the 1.5B
head); ``all`` adds every gate with every option, float32 / float16 heads, sequence-level importance sampling and
the recomputing backward (their spills are reported, not fatal). Run without TRITON_INTERPRET, from a folder where
the installed package (with ``fused_gates.kernels``) is the one imported.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="fused-gates-aot-"))  # every variant compiles here
# floating-point contraction on, as every Triton release up to 3.9 compiles by default (3.9 warns it will change)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# the first-use self-check would launch its own small problem on the emulated device: the scenarios alone are captured
os.environ["FUSED_GATES_SELF_CHECK"] = "0"

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from launch_capture import DEVICES, Variant, emulated_gpu

import fused_gates
from fused_gates import available_gates, gated_policy_loss, token_logprobs
from fused_gates.kernels.input_gates import FUSED_INPUT_GATES

HEADS = {"7b": (3584, 152_064), "1.5b": (1536, 151_936), "0.5b": (896, 151_936)}  # Qwen2.5 lm_heads: (H, V)
BENCHMARK_BUDGETS_MB = (256, 512, 1024, 2048, 4096)  # the benchmark's budget curve, beside the default (None)
STATISTICS_METHOD_PARAMETER = "statistics_method"  # token_logprobs' choice of no-grad kernel, when the API has it
STATISTICS_METHODS = ("dot", "cublas")


@dataclass(frozen=True)
class Scenario:
    name: str
    default: bool  # runs at the default shapes: a spill there fails
    run: Callable[[], None]


def _inputs(head: str, batch: int, length: int, dtype: torch.dtype, *, seed: int = 0, bias: bool = False,
            random_mask: bool = False) -> dict:
    """Inputs on the emulated GPU: hidden and weight uninitialised (only their layout matters), the rest real."""
    hidden_size, vocab = HEADS[head]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.empty(batch, length, hidden_size, dtype=dtype, device="cuda").requires_grad_()
    weight = torch.empty(vocab, hidden_size, dtype=dtype, device="cuda").requires_grad_()
    mask = torch.ones(batch, length, dtype=torch.long)
    if random_mask:
        mask = (torch.rand(batch, length, generator=g) > 0.1).long()
        mask[0, length // 2 :] = 0
    else:
        mask[:, length - length // 8 :] = 0  # the last 1/8 of each row is padding
    base = -math.log(vocab)
    return {
        "hidden": hidden,
        "weight": weight,
        "completion_ids": torch.randint(0, vocab, (batch, length), generator=g).cuda(),
        "completion_mask": mask.cuda(),
        "advantages": torch.randn(batch, generator=g).cuda(),
        "old": (base + 0.1 * torch.randn(batch, length, generator=g)).cuda(),
        "ref": (base + 0.1 * torch.randn(batch, length, generator=g)).cuda(),
        "bias": (0.01 * torch.randn(vocab, generator=g)).to(dtype).cuda().requires_grad_() if bias else None,
    }


def _train(x: dict, *, old: bool = True, beta: float = 0.0, backend: str = "auto", **options) -> None:
    out = gated_policy_loss(x["hidden"], x["weight"], x["completion_ids"], x["advantages"], x["completion_mask"],
                            x["old"] if old else None, x["ref"] if beta else None, beta=beta, bias=x["bias"],
                            backend=backend, **options)
    out.loss.backward()


def _logprobs(x: dict, backend: str = "auto", **options) -> None:
    with torch.no_grad():
        token_logprobs(x["hidden"], x["weight"], x["completion_ids"], x["completion_mask"], bias=x["bias"],
                       backend=backend, **options)


def _statistics_methods() -> list[dict]:
    """One option set per no-grad kernel the API can be asked for ({} when it has no choice)."""
    if STATISTICS_METHOD_PARAMETER in inspect.signature(token_logprobs).parameters:
        return [{STATISTICS_METHOD_PARAMETER: method} for method in STATISTICS_METHODS]
    return [{}]


def scenarios(scope: str) -> list[Scenario]:
    bf16, sapo = torch.bfloat16, dict(gate="sigmoid", tau_pos=1.0, tau_neg=1.05)
    gpu_test = dict(gate="sigmoid", tau_pos=1.0, tau_neg=1.05, loss_type="grpo", beta=0.04, entropy_coef=0.01,
                    temperature=0.9)
    found: list[Scenario] = []
    # the GPU benchmark: training step and no-grad pass at N = 8192 (16 x 512, 1/8 padding), every budget
    for head in ("7b", "0.5b"):
        for budget in (None, *BENCHMARK_BUDGETS_MB) if head == "7b" else (None,):
            found.append(Scenario(f"benchmark-train-{head}-budget-{budget or 'default'}", True,
                                  lambda h=head, b=budget: _train(_inputs(h, 16, 512, bf16), memory_budget_mb=b,
                                                                  **sapo)))
        for options in _statistics_methods():
            label = "-".join(str(v) for v in options.values()) or "auto"
            found.append(Scenario(f"benchmark-logprobs-{head}-{label}", True,
                                  lambda h=head, o=options: _logprobs(_inputs(h, 16, 512, bf16), **o)))
    # the GPU tests (tests/test_gpu.py): KL, entropy bonus and temperature, Triton explicitly
    for head in ("7b", "0.5b"):
        found.append(Scenario(f"gpu-test-train-{head}", True,
                              lambda h=head: _train(_inputs(h, 8, 512, bf16, random_mask=True), backend="triton",
                                                    **gpu_test)))
    for tokens in (64, 4096):
        for options in _statistics_methods():
            label = "-".join(str(v) for v in options.values()) or "auto"
            found.append(Scenario(f"gpu-test-logprobs-7b-N{tokens}-{label}", True,
                                  lambda n=tokens, o=options: _logprobs(_inputs("7b", 1, n, bf16), backend="triton",
                                                                        temperature=0.9, **o)))
    # the TRL trainer's step (end-to-end benchmark): on-policy (no old log-probs), beta = 0, the 1.5B head
    found.append(Scenario("trainer-step-1.5b-on-policy", True,
                          lambda: _train(_inputs("1.5b", 8, 512, bf16), old=False, **sapo)))
    found.append(Scenario("trainer-step-1.5b-clip", True,
                          lambda: _train(_inputs("1.5b", 8, 512, bf16), gate="clip")))
    # the gates that read more than r with a kernel form (the trainer's gate= options): their epilogues, with the KL
    # and the entropy term
    for gate in FUSED_INPUT_GATES:
        found.append(Scenario(f"input-gate-{gate}-0.5b-kl-entropy", True,
                              lambda g=gate: _train(_inputs("0.5b", 8, 512, bf16), gate=g, backend="triton",
                                                    beta=0.04, entropy_coef=0.01)))
    # the entropy-scaled trust region in the same epilogue: the soft gate, the behaviour entropy given
    found.append(Scenario("estr-sigmoid-0.5b-old-entropy", True,
                          lambda: _train(_inputs("0.5b", 8, 512, bf16), backend="triton", estr_threshold=0.5,
                                         old_entropy=torch.rand(8, 512).cuda(), **sapo)))
    if scope == "default":
        return found

    everything = dict(beta=0.04, use_bias_correction_kl=True, entropy_coef=0.01, temperature=0.7, tau_pos=2.0,
                      tau_neg=3.0)
    for gate in available_gates():
        found.append(Scenario(f"gate-{gate}-all-options-bias", False,
                              lambda g=gate: _train(_inputs("0.5b", 4, 256, bf16, bias=True), gate=g,
                                                    backend="triton", **everything)))
        found.append(Scenario(f"gate-{gate}-no-options", False,
                              lambda g=gate: _train(_inputs("0.5b", 4, 256, bf16), gate=g, backend="triton")))
    for dtype in (torch.float32, torch.float16):
        name = str(dtype).removeprefix("torch.")
        found.append(Scenario(f"train-0.5b-{name}", False,
                              lambda d=dtype: _train(_inputs("0.5b", 4, 256, d), backend="triton", **sapo)))
        found.append(Scenario(f"logprobs-0.5b-{name}-bias", False,
                              lambda d=dtype: _logprobs(_inputs("0.5b", 4, 256, d, bias=True), backend="triton")))
    sequence = dict(importance_sampling_level="sequence", gate="sigmoid", entropy_coef=0.01, beta=0.04)
    found.append(Scenario("sequence-level-row-chunks", False,
                          lambda: _train(_inputs("0.5b", 8, 256, bf16), backend="triton", **sequence)))
    # about 17 tokens per chunk at V = 151,936: each 256-token row exceeds a chunk, so the backward recomputes
    found.append(Scenario("sequence-level-recompute", False,
                          lambda: _train(_inputs("0.5b", 8, 256, bf16, bias=True), backend="triton",
                                         memory_budget_mb=16, **sequence)))
    return found


def compile_for(arch: int, scope: str) -> tuple[list[Variant], list[str]]:
    """The variants launched by the scenarios on the emulated ``sm_<arch>`` device, and the scenarios that launched
    no Triton kernel."""
    silent = []
    with emulated_gpu(arch) as compiler:
        for scenario in scenarios(scope):
            before = sum(len(v.scenarios) for v in compiler.variants.values())
            with compiler.scenario_named(scenario.name):
                scenario.run()
            if sum(len(v.scenarios) for v in compiler.variants.values()) == before:
                silent.append(scenario.name)
    defaults = {s.name for s in scenarios(scope) if s.default}
    variants = sorted(compiler.variants.values(), key=lambda v: (v.kernel, v.autotuned, str(v.constexprs)))
    for variant in variants:
        variant.scenarios = {s for s in variant.scenarios if s}
        variant.default = bool(variant.scenarios & defaults)  # type: ignore[attr-defined]
    return variants, silent


def _constexpr_text(variant: Variant) -> str:
    return ", ".join(f"{k}={v}" for k, v in variant.constexprs.items())


def _divisible_text(variant: Variant) -> str:
    return " ".join(k for k, v in variant.signature.items() if v.endswith(":16")) or "-"


def _types_text(variant: Variant) -> str:
    """Arguments grouped by type (the pointers' element types decide the loads and stores)."""
    groups: dict[str, list[str]] = {}
    for name, ty in variant.signature.items():
        groups.setdefault(ty.removesuffix(":16"), []).append(name)
    return "; ".join(f"{ty}: {' '.join(names)}" for ty, names in groups.items())


def report(arch: int, variants: list[Variant]) -> list[str]:
    columns = ("kernel", "constexprs", "argument types", "divisible by 16", "warps", "stages", "regs", "spill st/ld",
               "stack", "smem", "default", "scenarios")
    lines = [f"## sm_{arch} ({DEVICES[arch].name} emulated), Triton {triton.__version__}, {len(variants)} variants",
             "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for v in variants:
        cells = (f"{v.kernel}{' (autotuned)' if v.autotuned else ''}", _constexpr_text(v), _types_text(v),
                 _divisible_text(v), v.num_warps, v.num_stages, v.registers,
                 "?" if v.spill_stores is None else f"{v.spill_stores}/{v.spill_loads}", v.stack_frame,
                 v.shared_bytes, "yes" if v.default else "no", len(v.scenarios))
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def problems(arch: int, variants: list[Variant], silent: list[str]) -> list[str]:
    """What fails the check; variants that differ only in argument alignment are reported once, with a count."""
    found = [f"sm_{arch}: scenario {name} launched no Triton kernel" for name in silent]
    grouped: dict[str, list[str]] = {}
    for v in variants:
        where = f"sm_{arch} {v.kernel} [{_constexpr_text(v)}; warps {v.num_warps}, stages {v.num_stages}]"
        if v.registers is None or v.spill_stores is None:
            grouped.setdefault(f"{where}: no ptxas resource report (registers / spills unknown)", []).append(v.hash)
        elif v.default and v.spills:
            grouped.setdefault(f"{where} runs at the default shapes and spills ({v.spill_stores} bytes stored, "
                               f"{v.spill_loads} loaded, {v.registers} registers)", []).append(v.hash)
        if v.default and not v.autotuned and v.over_shared_limit():
            grouped.setdefault(f"{where} needs {v.shared_bytes} bytes of shared memory, over the "
                               f"{DEVICES[arch].shared_memory_per_block_optin} a block may use: it would not load",
                               []).append(v.hash)
    for message, hashes in grouped.items():
        found.append(message if len(hashes) == 1 else f"{message} (x{len(hashes)} argument specialisations)")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(DEVICES))
    parser.add_argument("--scope", choices=("default", "all"), default="all")
    parser.add_argument("--json", type=Path, help="write every variant's record here")
    args = parser.parse_args()
    print(f"fused_gates from {Path(fused_gates.__file__).parent}; torch {torch.__version__}, "
          f"triton {triton.__version__}; scope {args.scope}")
    records, failures = [], []
    for arch in args.arch:
        start = time.perf_counter()
        variants, silent = compile_for(arch, args.scope)
        print("\n".join(report(arch, variants)))
        spilling = [v for v in variants if v.spills]
        print(f"\nsm_{arch}: {len(variants)} variants of {len({v.kernel for v in variants})} kernels compiled in "
              f"{time.perf_counter() - start:.0f} s; {len(spilling)} spill "
              f"({sum(v.default for v in spilling)} of them in default variants)\n")
        failures += problems(arch, variants, silent)
        records += [{**asdict(v), "scenarios": sorted(v.scenarios), "default": v.default} for v in variants]
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "torch": torch.__version__,
                                         "variants": records}, indent=1, default=str))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"compiled every launched variant for {', '.join(f'sm_{a}' for a in args.arch)}: no spill and no "
          "unloadable variant at the default shapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
