"""Compile every Triton kernel of fused_gates.kernels ahead of time for a GPU target, without a GPU.

The interpreter runs the kernels' Python; it does not check what only the compiler sees (types of loop-carried
values, constexpr branches, layouts of tl.dot, register limits of the autotuning configurations). This compiles
each kernel to a cubin for ``--arch`` (default 90: H100 / H200) for every gate, every dtype and flag combination
the launchers use, and every autotuning configuration. Run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_gates.gates import BUILTIN_KERNEL_IDS, CUSTOM_KERNEL_ID
from fused_gates.kernels import chunk_grad, gates, logprob_stats


@triton.jit
def cauchy_value(ratio, tau):
    x = tau * (ratio - 1.0)
    return 1.0 + (x / (1.0 + x * x) + gates.atan(x)) / (2.0 * tau)


@triton.jit
def cauchy_derivative(ratio, tau):
    x = tau * (ratio - 1.0)
    d = 1.0 + x * x
    return 1.0 / (d * d)


def _unwrap(kernel):
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def _signature(kernel, types: dict[str, str], constexprs: dict) -> dict[str, str]:
    signature = {}
    for name in _unwrap(kernel).arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name.startswith("p_"):
            signature[name] = "*fp32"
        else:
            raise KeyError(f"{_unwrap(kernel).__name__}: no type for argument {name!r}")
    return signature


def compile_kernel(kernel, types, constexprs, target, num_warps=4, num_stages=3) -> None:
    fn = _unwrap(kernel)
    source = ASTSource(fn=fn, signature=_signature(kernel, types, constexprs), constexprs=constexprs)
    compiled = triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    assert "cubin" in compiled.asm, f"{fn.__name__}: no cubin"


GATE_CHOICES = [(gid, None, None) for gid in BUILTIN_KERNEL_IDS.values()] + [
    (CUSTOM_KERNEL_ID, cauchy_value, cauchy_derivative)
]
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    count = 0

    # no-grad statistics: every autotuning configuration and input dtype (bias on for bf16: the flag only adds a load)
    stats = logprob_stats._tile_statistics_kernel
    stats_variants = [(c, d, d[0] == "bf16") for c in logprob_stats._GPU_CONFIGS for d in DTYPES.items()]
    for config, (dtype, ptr), has_bias in stats_variants:
        types = {"p_hidden": ptr, "p_weight": ptr, "p_bias": ptr, "p_targets": "*i64", "N": "i32", "V": "i32",
                 "H": "i32", "stride_hidden": "i32", "stride_weight": "i32", "columns_per_split": "i32",
                 "inv_temperature": "fp32"}
        constexprs = {"HAS_BIAS": bool(has_bias), "INPUT_PRECISION": logprob_stats.dot_input_precision(
            {"bf16": logprob_stats.torch.bfloat16, "fp16": logprob_stats.torch.float16,
             "fp32": logprob_stats.torch.float32}[dtype]), **config.kwargs}
        compile_kernel(stats, types, constexprs, target, config.num_warps, config.num_stages)
        count += 1
    compile_kernel(logprob_stats._merge_splits_kernel, {"N": "i32", "SPLIT": "i32"}, {"BLOCK_N": 128}, target)
    count += 1

    # the training row kernel: every gate with all options off and all on, each option alone (sigmoid), for float32
    # heads (dz and bias in float32) and bfloat16 heads (dz straight into the bfloat16 operand, bfloat16 bias)
    launch = {"BLOCK_V": chunk_grad.ROW_BLOCK_V}
    row_types = {"p_targets": "*i64", "V": "i32", "stride_logits": "i32", "stride_dz": "i32",
                 "inv_temperature": "fp32", "tau_pos": "fp32", "tau_neg": "fp32", "epsilon_low": "fp32",
                 "epsilon_high": "fp32", "beta": "fp32"}
    flag_names = ("HAS_BIAS", "HAS_OLD", "HAS_KL", "BIAS_CORRECTION", "HAS_ENTROPY")
    flag_sets = [dict.fromkeys(flag_names, False), dict.fromkeys(flag_names, True)]
    single = [{**dict.fromkeys(flag_names, False), name: True} for name in flag_names if name != "BIAS_CORRECTION"]
    heads = (("*fp32", "*fp32"), ("*bf16", "*bf16"))
    variants = [(g, f, h) for g in GATE_CHOICES for f in flag_sets for h in heads]
    variants += [(GATE_CHOICES[1], f, h) for f in single for h in heads]
    for (gate_id, value, derivative), flags, (dz, bias_ptr) in variants:
        constexprs = {"GATE": gate_id, "CUSTOM_VALUE": value, "CUSTOM_DERIVATIVE": derivative, **flags, **launch}
        compile_kernel(chunk_grad._fused_token_rows_kernel, {**row_types, "p_dz": dz, "p_bias": bias_ptr},
                       constexprs, target, chunk_grad.ROW_NUM_WARPS)
        count += 1
    for has_bias, has_entropy, dz in itertools.product((False, True), (False, True), ("*fp32", "*bf16")):
        compile_kernel(chunk_grad._rows_grad_kernel, {**row_types, "p_dz": dz, "p_bias": "*bf16"},
                       {"HAS_BIAS": has_bias, "HAS_ENTROPY": has_entropy, **launch}, target,
                       chunk_grad.ROW_NUM_WARPS)
        count += 1
    for has_bias in (False, True):
        compile_kernel(chunk_grad._rows_statistics_kernel, {**row_types, "p_bias": "*bf16"},
                       {"HAS_BIAS": has_bias, **launch}, target, chunk_grad.ROW_NUM_WARPS)
        count += 1
    for gate_id, value, derivative in GATE_CHOICES:
        compile_kernel(gates._gate_grid_kernel, {"n": "i32", "tau_pos": "fp32", "tau_neg": "fp32",
                                                 "epsilon_low": "fp32", "epsilon_high": "fp32"},
                       {"GATE": gate_id, "CUSTOM_VALUE": value, "CUSTOM_DERIVATIVE": derivative, "BLOCK": 1024},
                       target)
        count += 1
    print(f"compiled {count} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
