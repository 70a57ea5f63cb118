"""The current policy's log-probs at given token ids per position (DPPO's Top-K trust region,
``fused_gates.topk_divergence``): one no-gradient pass over the vocabulary, chunked within the memory budget, through
the head as the loss evaluates it (temperature, soft-cap, bias, vocabulary slice)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .chunk_driver import plan_chunk_rows
from .contract import NO_GRADIENT
from .head import Head
from .torch_backend import TorchChunks


@torch.no_grad()
def current_topk_logprobs(hidden: Tensor, head: Head, ids: Tensor) -> Tensor:
    """The current policy's log-probs [N, K] at ``ids`` [N, K] (whole-vocabulary ids), from ``hidden`` [N, H] through
    ``head`` (its temperature, soft-cap, bias and vocabulary slice), in the head's accumulation dtype."""
    count = hidden.shape[0]
    out = hidden.new_empty(ids.shape, dtype=head.accumulate_dtype)
    if count == 0:
        return out
    chunks = TorchChunks(head.detached(), NO_GRADIENT)
    rows = plan_chunk_rows(count, chunks.bytes_per_row(), head.memory_budget_mb)
    chunks.allocate(rows)
    shard = head.shard
    for start in range(0, count, rows):
        part = slice(start, min(start + rows, count))
        logits = chunks.chunk_logits(hidden[part])
        if shard is None:
            picked = logits.gather(1, ids[part])
        else:
            local, owned = shard.local_targets(ids[part])
            picked = logits.gather(1, local) * owned
        row_max = logits.amax(dim=1)
        sum_exp = logits.sub_(row_max[:, None]).exp_().sum(dim=1)  # in the buffer: no second [n, V]
        lse = row_max + torch.log(sum_exp)
        if shard is not None:  # the whole vocabulary's lse from the slices', and each id's logit from its owner
            global_max = shard.all_reduce(lse.clone(), dist.ReduceOp.MAX)
            sums = shard.all_reduce(torch.cat([torch.exp(lse - global_max)[:, None], picked], dim=1))
            lse, picked = global_max + torch.log(sums[:, 0]), sums[:, 1:]
        out[part] = picked - lse[:, None]
    return out
