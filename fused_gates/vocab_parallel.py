"""The vocabulary-parallel head: each rank of a process group holds a contiguous slice of the lm_head's rows (rank
order = vocabulary order, slices may be uneven), and per-slice softmax statistics are made global by reductions.

Per token, each rank folds its slice's logits into ``(m_r, S_r, Z_r)`` relative to its own maximum and, if it owns
the target, the target's logit. Two collectives per chunk of ``n`` tokens make them global:

1. ``all_reduce(MAX)`` of ``m_r``: ``M`` (``4 n`` bytes);
2. ``all_reduce(SUM)`` of ``(S_r e^{m_r - M}, e^{m_r - M} (Z_r + (m_r - M) S_r), z_y)`` (``12 n`` bytes),

that is 16 bytes per token per pass over the vocabulary, after which ``lse``, the entropy and ``logp`` are the same on
every rank, the objective (identical inputs, identical statistics) gives every rank the same coefficients, and the
logits gradient stays local to each slice: ``dW`` and ``db`` are the slice's, and ``dh`` (a partial sum over the
slices) is all-reduced once at the end (``4 H`` bytes per token). One more collective checks, before any work, that
the ranks agree on every shape (an all-gather of a few integers).

A ``torch.distributed.tensor.DTensor`` weight sharded on dimension 0 over a 1-D mesh (what ``ColwiseParallel`` makes
of an lm_head) is the same: its local tensor is this rank's slice and its mesh's group the process group; the
gradient comes back to the DTensor through ``to_local``'s own backward, with the same placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``[offset, offset + size)`` of a vocabulary of ``vocab`` rows split over ``group``."""

    group: object
    offset: int
    size: int
    vocab: int
    largest_slice: int  # the chunk plan must agree across ranks: it is made for the largest slice

    def local_targets(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(index, owned)``: each target's row in this slice (0 where another rank owns it, so that reading it is
        safe) and whether this rank owns it."""
        local = targets - self.offset
        owned = (local >= 0) & (local < self.size)
        return torch.where(owned, local, torch.zeros_like(local)), owned

    def all_reduce(self, tensor: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor


def unwrap_dtensor_weight(weight: Tensor, bias: Tensor | None, process_group: object):
    """``(weight, bias, group)`` with a DTensor weight replaced by its local slice (a differentiable ``to_local``, so
    that its gradient returns as a DTensor); plain tensors pass through."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        return weight, bias, process_group
    if not isinstance(weight, DTensor):
        if isinstance(bias, DTensor):
            raise TypeError("bias: a DTensor while weight is a plain tensor; give both as DTensors or neither")
        return weight, bias, process_group
    mesh, placements = weight.device_mesh, weight.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(f"weight: a DTensor must be sharded on dimension 0 over a 1-D mesh (ColwiseParallel), got "
                         f"placements {placements} on a {mesh.ndim}-D mesh")
    group = mesh.get_group()
    if process_group is not None and process_group is not group:
        raise ValueError("process_group: differs from the DTensor weight's mesh group; leave it None")
    if bias is not None:
        if not isinstance(bias, DTensor) or bias.placements != placements:
            raise ValueError("bias: must be a DTensor sharded like weight (Shard(0) on the same mesh)")
        bias = bias.to_local()
    return weight.to_local(), bias, group


def describe_shard(hidden: Tensor, weight: Tensor, bias: Tensor | None, group: object) -> VocabShard:
    """This rank's slice, after checking (one all-gather) that every rank has the same hidden, ids and head shapes
    and dtypes and a non-empty slice; every rank raises the same error naming the argument otherwise."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    batch, length, hidden_size = hidden.shape if hidden.dim() == 3 else (-1, -1, -1)
    rows = weight.shape[0] if weight.dim() == 2 else -1
    mine = torch.tensor(
        [batch, length, hidden_size, _DTYPE_CODES.get(weight.dtype, 0), int(bias is not None), rows],
        dtype=torch.int64,
    )
    # gloo and NCCL both gather tensors on the group's device; CPU tensors work with gloo, CUDA ones with NCCL.
    device = weight.device if weight.device.type == "cuda" else torch.device("cpu")
    gathered = [torch.empty_like(mine, device=device) for _ in range(world)]
    dist.all_gather(gathered, mine.to(device), group=group)
    table = torch.stack(gathered).cpu()
    names = ("hidden (B)", "hidden (T)", "hidden (H)", "weight (dtype)", "bias (given or not)")
    for column, name in enumerate(names):
        values = table[:, column].tolist()
        if len(set(values)) != 1:
            raise ValueError(f"{name.split()[0]}: the ranks of process_group disagree on {name}: {values}")
    sizes = table[:, 5].tolist()
    if min(sizes) <= 0:
        raise ValueError(f"weight: every rank of process_group must hold a non-empty slice of the vocabulary; "
                         f"slice sizes by rank: {sizes}")
    return VocabShard(group=group, offset=sum(sizes[:rank]), size=sizes[rank], vocab=sum(sizes),
                      largest_slice=max(sizes))


def reduce_statistics(
    shard: VocabShard, row_max: Tensor, sum_exp: Tensor, sum_exp_shifted: Tensor, target_logit: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Global ``(M, S, Z, z_y)`` from this slice's ``(m_r, S_r, Z_r)`` (relative to ``m_r``) and the target logit
    (0 where another rank owns the target): one MAX and one SUM all-reduce."""
    global_max = shard.all_reduce(row_max.clone(), dist.ReduceOp.MAX)
    scale = torch.exp(row_max - global_max)
    step = row_max - global_max
    packed = torch.stack([scale * sum_exp, scale * (sum_exp_shifted + step * sum_exp), target_logit])
    shard.all_reduce(packed)
    return global_max, packed[0], packed[1], packed[2]


def combine_slice_statistics(
    shard: VocabShard, logprobs: Tensor, entropy: Tensor, log_sum_exp: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Global ``(logp, entropy, lse)`` from those of this rank's slice alone (as the kernels compute them). A slice's
    statistics relative to its own ``lse_r`` are ``S = 1`` and ``Z = sum_v p_v (z_v - lse_r) = -H_r``; the slice's
    target logit is ``logp_r + lse_r`` where it owns the target."""
    _, owned = shard.local_targets(targets)
    target_logit = torch.where(owned, logprobs + log_sum_exp, torch.zeros_like(logprobs))
    row_max, sum_exp, sum_exp_shifted, target_logit = reduce_statistics(
        shard, log_sum_exp, torch.ones_like(log_sum_exp), -entropy, target_logit
    )
    log_sum = torch.log(sum_exp)
    lse = row_max + log_sum
    return target_logit - lse, log_sum - sum_exp_shifted / sum_exp, lse
