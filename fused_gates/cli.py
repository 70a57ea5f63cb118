"""``fused-gates`` command line.

* ``demo`` -- the loss on a realistic lm_head with random weights (also what runs without a subcommand);
* ``plot-gates`` -- the paper's Figure 1: every gate and its derivative for several temperatures;
* ``plot-runs`` -- reward, entropy and EUR against the step of training runs.

Benchmark accuracy (the paper's Table 1) is the application's ``fused-gates-evaluate``
(``fused_gates.integrations.app.evaluate``), the training run ``fused-gates-train``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence

import torch

from .api import gated_policy_loss, token_logprobs
from .backends import BACKENDS, backend_named
from .chunk_driver import CPU_MEMORY_BUDGET_MB, planned_chunk_rows
from .contract import GradientNeeds
from .gates import available_gates
from .head import Head
from .validation import number_argument

# ----------------------------------------------------------------------------------------------------------------------
# Argument types: a bad value is an argparse error naming the flag (exit code 2), never a wrong figure or a torch error

_positive_int = number_argument(int, lambda v: v > 0, "an integer > 0")
_positive_float = number_argument(float, lambda v: v > 0, "finite and > 0")
_epsilon = number_argument(float, lambda v: 0 < v < 1, "in (0, 1): the clip range [1 - eps, 1 + eps] around r = 1")
_r_max = number_argument(float, lambda v: v > 1, "finite and > 1: the figure spans ratios (0, r-max] around r = 1")
_group_size = number_argument(int, lambda v: v >= 2, "an integer >= 2 (advantages need a group's spread)")


# ----------------------------------------------------------------------------------------------------------------------
# Commands


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    batch, length, hidden_size, vocab = args.batch, args.length, args.hidden_size, args.vocab
    tokens = batch * length
    print(f"lm_head: H={hidden_size}, V={vocab:,} (Qwen2.5-0.5B's by default); {batch} completions x {length} tokens; "
          f"gate={args.gate} tau_pos={args.tau_pos} tau_neg={args.tau_neg}; backend={args.backend}; "
          f"{torch.get_num_threads()} CPU threads")
    hidden = torch.randn(batch, length, hidden_size) * 2.0
    weight = (torch.randn(vocab, hidden_size) * 0.02).requires_grad_(True)
    hidden.requires_grad_(True)
    ids = torch.randint(0, vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, length - length // 8 :] = 0  # shorter completions end in padding
    rewards = torch.rand(batch)
    groups = rewards.view(-1, args.group_size)
    advantages = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)

    # The behaviour policy of a second iteration on the same batch: a slightly different head.
    start = time.perf_counter()
    old_weight = weight.detach() + 0.004 * torch.randn_like(weight)
    old_logprobs, _ = token_logprobs(hidden.detach(), old_weight, ids, mask, backend=args.backend)
    old_time = time.perf_counter() - start
    del old_weight

    start = time.perf_counter()
    out = gated_policy_loss(hidden, weight, ids, advantages, mask, old_logprobs, gate=args.gate, tau_pos=args.tau_pos,
                            tau_neg=args.tau_neg, group_size=args.group_size, backend=args.backend)
    out.loss.backward()
    step_time = time.perf_counter() - start

    m = out.metrics
    print(f"old-policy log-probs (no grad, one product): {old_time:.2f} s")
    print(f"loss forward + backward:                     {step_time:.2f} s")
    print(f"loss        {out.loss.item():+.6f}")
    print(f"EUR         {out.eur.item():.4f}   (paper eq. 12, per prompt group of {args.group_size})")
    print(f"entropy     {m['entropy'].item():.4f} nats")
    print(f"ratio       mean {m['ratio/mean'].item():.4f}  min {m['ratio/min'].item():.4f}  "
          f"max {m['ratio/max'].item():.4f}")
    print(f"gate mean   {m['gate/mean'].item():.4f}")
    print(f"grad norms  hidden {hidden.grad.norm().item():.4e}  weight {weight.grad.norm().item():.4e}")
    valid = int(mask.sum())
    naive = 3 * tokens * vocab * 4  # logits, log-softmax and the logits' gradient, float32
    head = Head(weight.detach(), None, 1.0, CPU_MEMORY_BUDGET_MB)
    chunk = planned_chunk_rows(backend_named("torch"), head, GradientNeeds(True, True, False), valid)
    ours = chunk * vocab * 4
    print(f"memory: materialised logits need ~{naive / 2**30:.2f} GiB (logits, log-softmax, gradient; float32); "
          f"this loss keeps one {chunk}-token chunk: {ours / 2**20:.0f} MiB ({naive / ours:.0f}x less)")
    return 0


def _plot_gates(args: argparse.Namespace) -> int:
    from .plots import gate_curves, render_gates

    curves = gate_curves(args.gates, args.taus, epsilon=args.epsilon, r_max=args.r_max)
    print(f"wrote {render_gates(curves, args.out)} ({', '.join(curves)}; tau in {', '.join(map(str, args.taus))})")
    return 0


def _plot_runs(args: argparse.Namespace) -> int:
    from .plots import load_run, render_runs, run_curves

    runs = [load_run(folder) for folder in args.run_dirs]
    path = render_runs(run_curves(runs, args.smooth), args.out, window=args.smooth)
    print(f"wrote {path} ({len(runs)} runs: {'; '.join(run.label for run in runs)})")
    return 0


def _import_gate_modules(modules: list[str] | None) -> None:
    # A module that calls fused_gates.register_gate on import makes its gates available by name.
    for module in modules or []:
        importlib.import_module(module)


def _add_plot_gates(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("plot-gates", help="Figure 1: every gate and its derivative for several temperatures",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--taus", type=_positive_float, nargs="+", default=[1.0, 5.0, 10.0],
                        help="temperatures of the soft gates, each > 0")
    parser.add_argument("--gates", nargs="+", help="default: every registered gate (clip included)")
    parser.add_argument("--gate-module", action="append", help="module to import first (it may register gates)")
    parser.add_argument("--epsilon", type=_epsilon, default=0.2, help="clip range of the clip gate, in (0, 1)")
    parser.add_argument("--r-max", type=_r_max, default=3.0, help="ratios on (0, r-max], r-max > 1")
    parser.add_argument("--out", default="gates.png")
    parser.set_defaults(handler=_plot_gates, check=_check_plot_gates)


def _add_plot_runs(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("plot-runs", help="reward, entropy and EUR against the step of training runs",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="output folders with metrics.csv or trainer_state.json")
    parser.add_argument("--smooth", type=_positive_int, default=1,
                        help="moving-average window, in logged values (1: none)")
    parser.add_argument("--out", default="runs.png")
    parser.set_defaults(handler=_plot_runs)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="loss, EUR and gradients for a realistic lm_head on random inputs "
                            "(also what runs without a subcommand)",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=_positive_int, default=8, help="completions (a multiple of --group-size)")
    parser.add_argument("--length", type=_positive_int, default=128, help="tokens per completion")
    parser.add_argument("--group-size", type=_group_size, default=4, help="completions per prompt, >= 2")
    parser.add_argument("--hidden-size", type=_positive_int, default=896)
    parser.add_argument("--vocab", type=_positive_int, default=151_936)
    parser.add_argument("--gate", default="erf", choices=available_gates())
    parser.add_argument("--tau-pos", type=_positive_float, default=10.0)
    parser.add_argument("--tau-neg", type=_positive_float, default=12.0)
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_demo, check=_check_demo)


def _check_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.batch % args.group_size:
        parser.error(f"argument --group-size: must divide --batch ({args.batch}), got {args.group_size}")


def _check_plot_gates(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        _import_gate_modules(args.gate_module)
    except ImportError as error:
        parser.error(f"argument --gate-module: {error}")
    unknown = sorted(set(args.gates or []) - set(available_gates()))
    if unknown:
        parser.error(f"argument --gates: unknown gate(s) {', '.join(unknown)}; registered: "
                     f"{', '.join(sorted(available_gates()))}")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``fused-gates`` parser and its subcommands' parsers by name."""
    parser = argparse.ArgumentParser(prog="fused-gates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    _add_demo(sub)
    _add_plot_gates(sub)
    _add_plot_runs(sub)
    return parser, dict(sub.choices)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    # No subcommand runs the demo, with whatever demo options were given ("fused-gates --vocab 64").
    if not argv or (argv[0] not in commands and argv[0] not in ("-h", "--help")):
        argv = ["demo", *argv]
    args = parser.parse_args(argv)
    check = getattr(args, "check", None)
    if check is not None:  # combinations of arguments, after each one was parsed on its own
        check(commands[args.command], args)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
