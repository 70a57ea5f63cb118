"""The gated loss with the lm_head sharded over a tensor-parallel group: a runnable example and its benchmark.

    torchrun --nproc-per-node 2 -m fused_gates.integrations.app.tensor_parallel              # CPU (gloo) or GPUs (nccl)
    torchrun --nproc-per-node 2 -m fused_gates.integrations.app.tensor_parallel --benchmark sharded --out tp.jsonl
    torchrun --nproc-per-node 2 -m fused_gates.integrations.app.tensor_parallel --benchmark gathered --out tp.jsonl

Each rank holds a contiguous slice of the vocabulary rows of the head (``ColwiseParallel``'s layout) and the same
hidden states, ids and advantages. ``gated_policy_loss(..., process_group=group)`` gives every rank the same loss and
the full hidden gradient, and each rank its slice's weight gradient. The example checks that against the obvious
alternative, gathering the whole head on every rank and computing the loss there. ``--benchmark MODE`` times one of
the two (one per process, so that each peak is its own) and reports each rank's peak extra memory (CUDA: the
allocator's peak; CPU: the growth of the resident set), appending a JSON line per rank to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fused_gates import gated_policy_loss, token_logprobs


def _peak_resident_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _slice_rows(vocab: int, world: int, rank: int) -> slice:
    """Uneven where V is not a multiple of the group: the first ``V mod P`` ranks take one row more."""
    base, extra = divmod(vocab, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def _inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(args.seed)  # the same on every rank
    hidden = torch.randn(args.batch, args.length, args.hidden_size, generator=g) * 2
    weight = torch.randn(args.vocab, args.hidden_size, generator=g) * 0.02
    ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=g)
    mask = torch.ones(args.batch, args.length, dtype=torch.long)
    mask[:, args.length - args.length // 8 :] = 0
    advantages = torch.randn(args.batch, generator=g)
    # the behaviour policy of a second iteration on the batch: a slightly different head
    old_weight = weight + 0.002 * torch.randn(weight.shape, generator=g)
    hidden, weight, old_weight, advantages = (t.to(device, dtype) for t in (hidden, weight, old_weight, advantages))
    ids, mask = ids.to(device), mask.to(device)
    old, _ = token_logprobs(hidden, old_weight, ids, mask)
    return hidden, weight, ids, mask, advantages, old


def _loss(hidden, weight, ids, mask, advantages, old, args, group=None):
    return gated_policy_loss(hidden, weight, ids, advantages, mask, old, gate=args.gate, tau_pos=10.0, tau_neg=12.0,
                             process_group=group)


def _sharded_step(hidden, full_weight, rows, ids, mask, advantages, old, args, group):
    h = hidden.detach().requires_grad_()
    w = full_weight[rows].detach().clone().requires_grad_()
    out = _loss(h, w, ids, mask, advantages, old, args, group)
    out.loss.backward()
    return out, h.grad, w.grad


def _gathered_step(hidden, full_weight, rows, ids, mask, advantages, old, args, group):
    """The alternative: all-gather the head's slices into the whole head on every rank, then the loss there."""
    world = dist.get_world_size(group)
    local = full_weight[rows].detach().clone()
    sizes = [len(range(full_weight.shape[0])[_slice_rows(full_weight.shape[0], world, r)]) for r in range(world)]
    padded = local.new_zeros(max(sizes), local.shape[1])  # all_gather takes equal sizes: pad uneven slices
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    whole = torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).requires_grad_()
    h = hidden.detach().requires_grad_()
    out = _loss(h, whole, ids, mask, advantages, old, args)
    out.loss.backward()
    return out, h.grad, whole.grad[rows]


def _time(step, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median seconds, peak extra MB) of ``step``."""
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_resident_mb()
    for _ in range(repeats):  # the first is also the warm-up: its page faults belong to the peak
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else _peak_resident_mb() - base
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--gate", default="erf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--benchmark", choices=["sharded", "gathered"],
                        help="time this way of computing the loss (one per process: peaks are per process)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="JSON file for the benchmark rows (rank 0 writes it)")
    args = parser.parse_args(argv)
    for name in ("batch", "length", "hidden_size", "vocab", "repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    group = dist.group.WORLD
    rows = _slice_rows(args.vocab, world, rank)
    hidden, weight, ids, mask, advantages, old = _inputs(args, device, dtype)

    if args.benchmark:
        step = _sharded_step if args.benchmark == "sharded" else _gathered_step
        seconds, peak = _time(lambda: step(hidden, weight, rows, ids, mask, advantages, old, args, group),
                              args.repeats, device)
        row = {"mode": args.benchmark, "rank": rank, "world": world, "device": str(device), "dtype": str(dtype),
               "tokens": int(mask.sum()), "hidden_size": args.hidden_size, "vocab": args.vocab, "seconds": seconds,
               "peak_extra_mb": peak, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "cpus": os.cpu_count()}
        rows_all = [None] * world
        dist.all_gather_object(rows_all, row)
        if rank == 0:
            for r in rows_all:
                print(f"{r['mode']}: rank {r['rank']} {r['seconds']:.3f} s per step, +{r['peak_extra_mb']:.0f} MB")
            if args.out:
                with Path(args.out).open("a") as handle:
                    handle.writelines(json.dumps(r) + "\n" for r in rows_all)

    out, h_grad, w_grad = _sharded_step(hidden, weight, rows, ids, mask, advantages, old, args, group)
    ref, ref_h_grad, ref_w_grad = _gathered_step(hidden, weight, rows, ids, mask, advantages, old, args, group)
    errors = {
        "loss": (out.loss - ref.loss).abs().item(),
        "hidden grad": (h_grad - ref_h_grad).abs().max().item(),
        "weight grad (this slice)": (w_grad - ref_w_grad).abs().max().item(),
    }
    print(f"rank {rank}/{world}: vocabulary rows [{rows.start}, {rows.stop}) of {args.vocab}; "
          f"loss {out.loss.item():.6f} (gathered head {ref.loss.item():.6f}); EUR {out.eur.item():.4f}; "
          "max |difference| "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()), flush=True)

    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
