"""``fused-gates`` command line: ``fused-gates demo`` runs the loss on a realistic lm_head with random weights."""

from __future__ import annotations

import argparse
import time

import torch

from .api import gated_policy_loss, token_logprobs
from .gates import available_gates
from .torch_backend import CPU_MEMORY_BUDGET_MB, plan_chunk_tokens


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
    chunk = plan_chunk_tokens(valid, vocab, CPU_MEMORY_BUDGET_MB)
    ours = chunk * vocab * 4
    print(f"memory: materialised logits need ~{naive / 2**30:.2f} GiB (logits, log-softmax, gradient; float32); "
          f"this loss keeps one {chunk}-token chunk: {ours / 2**20:.0f} MiB ({naive / ours:.0f}x less)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fused-gates", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="loss, EUR and gradients for a realistic lm_head on random inputs")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--length", type=int, default=128)
    demo.add_argument("--group-size", type=int, default=4)
    demo.add_argument("--hidden-size", type=int, default=896)
    demo.add_argument("--vocab", type=int, default=151_936)
    demo.add_argument("--gate", default="erf", choices=available_gates())
    demo.add_argument("--tau-pos", type=float, default=10.0)
    demo.add_argument("--tau-neg", type=float, default=12.0)
    demo.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        if args.command is None:
            args = parser.parse_args(["demo", *(argv or [])])
        return _demo(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
