"""The gated loss with every completion sharded by sequence over a context-parallel group: a runnable example that
counts what crosses the ranks.

    torchrun --nproc-per-node 2 -m fused_gates.integrations.app.context_parallel           # CPU (gloo) or GPUs (nccl)
    torchrun --nproc-per-node 3 -m fused_gates.integrations.app.context_parallel --level sequence --loss-type dapo
    torchrun --nproc-per-node 4 -m fused_gates.integrations.app.context_parallel --vocab-ranks 2   # 2 x 2 mesh

Each rank holds the same positions of every completion (what Ulysses or ring attention leave after the backbone:
here a contiguous, uneven split, the first ``T mod P`` ranks one position more; ring attention's load-balanced chunks
work the same), those positions of the hidden states, ids, mask and old log-probs, and the whole per-row
advantages. ``gated_policy_loss(..., sequence_group=group)`` gives every rank the global loss and metrics, its own
positions' hidden gradient and its share of the weight gradient (summed over the group, as data parallelism already
sums gradients). With ``--vocab-ranks R`` the world is a
(P / R) x R mesh: the head is also sliced by vocabulary (``process_group=``) over the R ranks that hold the same
positions.

The example checks every rank's results against the unsharded call on the whole batch, and counts the collectives
the sharded call makes (one loss step: forward and backward) and their bytes, which depend on the rows and the
objective, not on T, H or V, and times both steps (one step each, the first call: a rough figure); with ``--out``
rank 0 appends a JSON line per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from fused_gates import gated_policy_loss, token_logprobs


def _split(size: int, parts: int, index: int) -> slice:
    """Uneven where ``size`` is not a multiple of ``parts``: the first ``size mod parts`` take one more."""
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


@contextmanager
def counted_collectives(sequence_group: object):
    """Counts the ``all_reduce`` / ``all_gather_object`` calls meanwhile and this rank's bytes in them, by axis:
    ``sequence`` (over ``sequence_group``) or ``vocabulary`` (a vocabulary-parallel head's, over its group)."""
    calls, sent = Counter(), Counter()
    all_reduce, all_gather_object = dist.all_reduce, dist.all_gather_object

    def axis(kind: str, group: object) -> str:
        return f"{kind} ({'sequence' if group is sequence_group else 'vocabulary'})"

    def counting_all_reduce(tensor, *args, **kwargs):
        key = axis("all_reduce", kwargs.get("group"))
        calls[key] += 1
        sent[key] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *args, **kwargs)

    def counting_all_gather_object(out, obj, *args, **kwargs):
        key = axis("all_gather_object", kwargs.get("group"))
        calls[key] += 1
        sent[key] += len(pickle.dumps(obj))
        return all_gather_object(out, obj, *args, **kwargs)

    dist.all_reduce, dist.all_gather_object = counting_all_reduce, counting_all_gather_object
    try:
        yield calls, sent
    finally:
        dist.all_reduce, dist.all_gather_object = all_reduce, all_gather_object


def _inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(args.seed)  # the same whole batch on every rank; each keeps its slice
    hidden = torch.randn(args.batch, args.length, args.hidden_size, generator=g) * 2
    weight = torch.randn(args.vocab, args.hidden_size, generator=g) * 0.02
    ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=g)
    lengths = torch.randint(args.length // 4, args.length + 1, (args.batch,), generator=g)
    mask = (torch.arange(args.length) < lengths.unsqueeze(1)).long()  # completions of different lengths
    advantages = torch.randn(args.batch, generator=g)
    old_weight = weight + 0.002 * torch.randn(weight.shape, generator=g)  # the behaviour policy
    hidden, weight, old_weight, advantages = (t.to(device, dtype) for t in (hidden, weight, old_weight, advantages))
    ids, mask = ids.to(device), mask.to(device)
    old, _ = token_logprobs(hidden, old_weight, ids, mask)
    return hidden, weight, ids, mask, advantages, old


def _step(hidden, weight, ids, mask, advantages, old, args, **groups):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = gated_policy_loss(h, w, ids, advantages, mask, old, gate=args.gate, loss_type=args.loss_type,
                            importance_sampling_level=args.level, tau_pos=10.0, tau_neg=12.0,
                            max_completion_length=args.length, **groups)
    out.loss.backward()
    return out, h.grad, w.grad


def _mesh(vocab_ranks: int) -> tuple[object, object | None, int, int]:
    """(sequence group, vocabulary group or None, position index, vocabulary index) of this rank; rank =
    position index * vocab_ranks + vocabulary index."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if vocab_ranks == 1:
        return dist.group.WORLD, None, rank, 0
    sequence_ranks = world // vocab_ranks
    sequence_group = vocab_group = None
    for v in range(vocab_ranks):  # every rank creates every group, in the same order
        group = dist.new_group([s * vocab_ranks + v for s in range(sequence_ranks)])
        if v == rank % vocab_ranks:
            sequence_group = group
    for s in range(sequence_ranks):
        group = dist.new_group([s * vocab_ranks + v for v in range(vocab_ranks)])
        if s == rank // vocab_ranks:
            vocab_group = group
    return sequence_group, vocab_group, rank // vocab_ranks, rank % vocab_ranks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--gate", default="erf")
    parser.add_argument("--loss-type", default="grpo")
    parser.add_argument("--level", default="token", choices=["token", "sequence"])
    parser.add_argument("--vocab-ranks", type=int, default=1, help="slice the head by vocabulary too (2-D mesh)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON file for the traffic rows (rank 0 appends them)")
    args = parser.parse_args(argv)
    for name in ("batch", "length", "hidden_size", "vocab", "vocab_ranks"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % args.vocab_ranks:
        parser.error(f"--vocab-ranks {args.vocab_ranks} does not divide the {world} processes")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    sequence_group, vocab_group, position_index, vocab_index = _mesh(args.vocab_ranks)
    sequence_ranks = world // args.vocab_ranks
    cols = _split(args.length, sequence_ranks, position_index)
    rows = _split(args.vocab, args.vocab_ranks, vocab_index)
    hidden, weight, ids, mask, advantages, old = _inputs(args, device, dtype)

    with counted_collectives(sequence_group) as (calls, sent):
        start = time.perf_counter()
        out, h_grad, w_grad = _step(hidden[:, cols], weight[rows], ids[:, cols], mask[:, cols], advantages,
                                    old[:, cols], args, sequence_group=sequence_group, process_group=vocab_group)
        seconds = time.perf_counter() - start
    dist.all_reduce(w_grad, group=sequence_group)  # the shares of the head's gradient, as data parallelism sums them
    start = time.perf_counter()
    ref, ref_h_grad, ref_w_grad = _step(hidden, weight, ids, mask, advantages, old, args)
    unsharded_seconds = time.perf_counter() - start
    errors = {
        "loss": (out.loss - ref.loss).abs().item(),
        "eur": (out.eur - ref.eur).abs().item(),
        "hidden grad (own positions)": (h_grad - ref_h_grad[:, cols]).abs().max().item() if h_grad.numel() else 0.0,
        "weight grad (summed)": (w_grad - ref_w_grad[rows]).abs().max().item(),
    }
    sequence_bytes = sum(v for k, v in sent.items() if k.endswith("(sequence)"))
    row = {"rank": rank, "world": world, "vocab_ranks": args.vocab_ranks, "positions": [cols.start, cols.stop],
           "batch": args.batch, "length": args.length, "gate": args.gate, "loss_type": args.loss_type,
           "level": args.level, "dtype": str(dtype), "collectives": dict(calls), "bytes": dict(sent),
           "sequence_bytes_per_row": sequence_bytes / args.batch, "seconds": seconds,
           "unsharded_seconds": unsharded_seconds, "errors": errors,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(f"rank {rank}/{world}: positions [{cols.start}, {cols.stop}) of {args.length}, vocabulary rows "
          f"[{rows.start}, {rows.stop}); loss {out.loss.item():.6f} (unsharded {ref.loss.item():.6f}); "
          f"collectives {dict(calls)}, bytes sent {dict(sent)} (sequence axis: {sequence_bytes / args.batch:.0f} per "
          f"row); {seconds:.3f} s (unsharded, the whole batch on one rank: {unsharded_seconds:.3f} s); "
          "max |difference| " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()), flush=True)
    rows_all = [None] * world
    dist.all_gather_object(rows_all, row)
    if rank == 0 and args.out:
        with Path(args.out).open("a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows_all)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
