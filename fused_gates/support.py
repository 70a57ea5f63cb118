"""Log-probs on the sampler's support: the kept sets of truncated sampling (given, or replayed from ``top_k`` /
``top_p`` / ``min_p``), applied to each chunk's logits buffer, the same way for every backend.

A sampler that truncates (``top_k``, ``top_p``, ``min_p``) draws from the distribution renormalised over the tokens it
kept, and reports those log-probs (vLLM's ``processed_logprobs``). Over that support ``K_t`` of token t:

    logp_t = z_y - lse_K,    H_t = lse_K - sum_{v in K} p_v z_v,    p_v = exp(z_v - lse_K) (v in K, 0 elsewhere),
    S_t = exp(lse_K - lse_V)   (the trainer's kept probability mass, lse_V over the whole vocabulary)

and the gradient of the logits is the full-vocabulary formula with ``p`` replaced by the support's ``p`` (0 outside the
support, so no logit outside it is trained).

**The support.** Either the kept ids are given (``kept_token_ids`` [B, T, K], -1 padding; the target must be in its
set), or the support is replayed on the trainer's own logits ``z`` (after the temperature and the soft-cap) with vLLM
v1's sampler semantics (``vllm/v1/sample``: the min-p processor, an argmax-invariant logits processor, runs before
``apply_top_k_top_p``):

1. ``min_p``: keep ``p_v >= min_p * max_u p_u``, i.e. ``z_v >= max z + log(min_p)``;
2. ``top_k``: keep ``z_v >= `` the k-th largest ``z`` -- every token tied with the k-th value is kept, as vLLM's
   threshold comparison keeps it (``top_k`` 0 or ``>= V``: no truncation);
3. ``top_p``: over the distribution renormalised on what 1-2 kept, keep ``v`` when the mass of the tokens whose logit
   is *strictly larger* than ``z_v`` is ``< top_p`` (vLLM removes a token when the ascending cumulative mass up to it
   is ``<= 1 - top_p``; the largest token always stays). Ties: a group of tokens with the same logit is kept or
   dropped whole (vLLM's sort may split such a group at the boundary; this rule keeps it whole, deterministically).

The replayed set is an upper set of logits, ``{v : z_v >= tau_t}``, plus the target itself: a token the sampler drew
was in the sampler's support, so a replay that excludes it (the trainer's logits differ from the sampler's in the last
bits) keeps it rather than give ``logp = -inf``. ``top_k > V``, ``top_p = 1`` and ``min_p = 0`` are no-ops: a call
where nothing truncates takes the full-vocabulary path itself (bitwise the same results, ``S = 1``).

**Cost of the replay (bounded).** Per chunk of ``n`` tokens and a vocabulary of ``V`` columns: the full statistics
(one exp pass, as the full-vocabulary path), the support statistics (a masked pass), and for the threshold one
``torch.topk`` of ``max(k, REPLAY_CANDIDATES)`` candidates per row (a partial selection, ``O(V)`` per row); the top-p
cut is found among those candidates (a sorted cumulative sum). A row whose top-p set reaches past the candidates is
resolved exactly by histograms of its mass over the logits' values (:func:`_histogram_cut`: one pass over the row
per level, at most :data:`HISTOGRAM_LEVELS` levels, usually one, then a sort of the few hundred tokens of the cut's
bin); with a ``min_p`` or ``top_k`` floor below the candidates, one more masked pass gives the floor's mass. The host
reads a few integers per chunk (the largest ``k``, whether rows overflow, the bins' counts). Under a
vocabulary-parallel head each rank takes its slice's candidates and they are all-gathered (``n x world x K`` floats);
the histograms are all-reduced.

**Layout of the support.** A support of at most :data:`SPARSE_SUPPORT_MAX` tokens per row (given kept sets, or a
replay whose support lies within the candidates: top-k, or top-p / min-p on a peaked distribution) is held as
columns: its statistics come from the gathered logits and its gradient reaches only those columns, so the backward
products over the vocabulary vanish (``O(n K H)`` gathers instead of two ``2 n V H`` products: cheaper than the
full-vocabulary step). A larger support is a mask beside the logits buffer (the full step's products plus a few
elementwise passes).

**Kept sets returned.** ``token_logprobs(..., return_kept_ids=K)`` gives each token's support as ids [B, T, K] (largest
logit first, -1 padding); a support larger than ``K`` raises, naming ``return_kept_ids``: a truncated set would change
the support that later passes renormalise over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from .chunk_driver import Backend
from .contract import ChunkGradient, ChunkStatistics, ChunkTargets, GradientNeeds
from .head import Head
from .objective import ObjectiveConfig
from .options import SupportOptions
from .tokens import TokenPlan, ValueCheck, run_value_checks
from .torch_backend import VOCAB_BLOCK, TorchChunks, _softcap_slope
from .validation import check_number, fail

REPLAY_CANDIDATES = 1024
"""Candidates per row (the largest logits, ``torch.topk``) among which the top-p cut is looked for; a row whose top-p
set is larger takes the histograms (exact either way)."""
HISTOGRAM_BINS = 2048
HISTOGRAM_LEVELS = 4
HISTOGRAM_FINISH = 512
HISTOGRAM_ROWS = 32
"""A top-p set larger than the candidates: histograms of the mass over the values, :data:`HISTOGRAM_BINS` bins a
level, at most :data:`HISTOGRAM_LEVELS` levels (one pass over the row each), until the cut's bin holds at most
:data:`HISTOGRAM_FINISH` tokens (then sorted); :data:`HISTOGRAM_ROWS` rows at a time (their ``exp`` and bin
indices: ``HISTOGRAM_ROWS x V`` floats and integers)."""
SPARSE_SUPPORT_MAX = 1024
"""A support of at most this many tokens per row is held as columns: its gradient reaches only those columns, so the
backward needs no product over the vocabulary (``O(n K H)`` instead of ``O(n V H)``)."""
EMPTY_SLICE_OFFSET = 1.0e4
"""A slice of a vocabulary-parallel head that holds none of a token's support reports ``lse`` this far below its own
largest logit (a weight ``exp(-1e4) = 0`` in the reduction, without the ``0 * inf`` of a true ``-inf``)."""


# -- the request, checked ------------------------------------------------------------------------------------------


@dataclass
class TokenSupport:
    """The support of the computed tokens [N] (or of one chunk's: :meth:`select`), and where its outputs go."""

    kept_ids: Tensor | None  # [N, K] int64, -1 padding
    top_k: Tensor | None  # [N] int64, 0: none
    top_p: Tensor | None  # [N] float64
    min_p: Tensor | None  # [N] float64
    kept_log_mass: Tensor  # [N] output: log S
    kept_out: Tensor | None  # [N, K_out] output of return_kept_ids
    kept_count: Tensor  # [N] output: the size of each token's support

    def select(self, rows: slice) -> TokenSupport:
        def part(x):
            return None if x is None else x[rows]

        return TokenSupport(part(self.kept_ids), part(self.top_k), part(self.top_p), part(self.min_p),
                            self.kept_log_mass[rows], part(self.kept_out), self.kept_count[rows])


@dataclass(frozen=True)
class SupportRequest:
    """The checked support options of a call, on [B, T] (``None`` from :func:`check_support`: the full vocabulary)."""

    kept_ids: Tensor | None  # [B*T, K]
    top_k: Tensor | None  # [B*T]
    top_p: Tensor | None
    min_p: Tensor | None
    return_kept_ids: int | None

    def plan(self, plan: TokenPlan, num_tokens: int, dtype: torch.dtype, device: torch.device) -> TokenSupport:
        def gathered(x):
            return None if x is None else plan.gather_rows(x)

        kept_out = None if self.return_kept_ids is None else torch.full(
            (num_tokens, self.return_kept_ids), -1, dtype=torch.int64, device=device)
        return TokenSupport(gathered(self.kept_ids), gathered(self.top_k), gathered(self.top_p), gathered(self.min_p),
                            torch.zeros(num_tokens, dtype=dtype, device=device), kept_out,
                            torch.zeros(num_tokens, dtype=torch.int64, device=device))


def _per_row(name: str, value: object, rows: int, length: int, device: torch.device, *, integer: bool,
             checks: list[ValueCheck], low: float, high: float | None, allow_low: bool, describe: str,
             noop) -> tuple[Tensor | None, Tensor | None]:
    """``(per position [B*T], truncates somewhere (0-dim bool))`` of a scalar or per-row ``[B]`` option."""
    if value is None:
        return None, None
    if isinstance(value, Tensor) and value.numel() != 1:
        if tuple(value.shape) != (rows,):
            raise fail(name, f"expected a number or a tensor of shape [{rows}] (one per row), got "
                       f"{list(value.shape)}")
        if value.device != device:
            raise fail(name, f"expected device {device} (that of hidden), got {value.device}")
        if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
            raise fail(name, f"expected an integer tensor, got dtype {value.dtype}", TypeError)
        if not integer and not value.dtype.is_floating_point:
            raise fail(name, f"expected a floating-point tensor, got dtype {value.dtype}", TypeError)
        values = value.to(torch.int64 if integer else torch.float64)
        ok = (values > low) | (values == low) if allow_low else values > low
        if high is not None:
            ok &= values <= high
        if not integer:
            ok &= torch.isfinite(values)
        checks.append(ValueCheck(name, f"every row's value must be {describe}", ~ok.all()))
    else:
        number = check_number(name, value, minimum=low, allow_minimum=allow_low, maximum=high, integer=integer)
        values = torch.tensor([number], dtype=torch.int64 if integer else torch.float64, device=device)
        values = values.expand(rows)
    per_position = values.unsqueeze(1).expand(rows, length).reshape(-1)
    return per_position, ~noop(values).all()


def check_support(options: SupportOptions, ids: Tensor, mask: Tensor | None, shape: tuple[int, int], vocab: int,
                  device: torch.device, *, logprob_pass: bool) -> SupportRequest | None:
    """The support options checked (each error names the option; the value checks in one host synchronisation), or
    ``None`` when the call computes over the whole vocabulary (no option, or only no-op values)."""
    rows, length = shape
    kept = options.kept_token_ids
    replayed = [n for n in ("top_k", "top_p", "min_p") if getattr(options, n) is not None]
    if kept is not None and replayed:
        raise fail("kept_token_ids", f"give the kept sets or replay them ({', '.join(replayed)}), not both")
    if options.return_kept_ids is not None:
        if not logprob_pass:
            raise fail("return_kept_ids", "only token_logprobs returns the kept sets")
        check_number("return_kept_ids", options.return_kept_ids, integer=True)
        if not replayed:
            raise fail("return_kept_ids", "returns the replayed kept sets: give top_k, top_p or min_p")
    if kept is None and not replayed:
        return None
    checks: list[ValueCheck] = []
    if kept is not None:
        if not isinstance(kept, Tensor):
            raise fail("kept_token_ids", f"expected a torch.Tensor, got {type(kept).__name__}", TypeError)
        if kept.dim() != 3 or tuple(kept.shape[:2]) != (rows, length):
            raise fail("kept_token_ids", f"expected shape [{rows}, {length}, K] (B, T of hidden), got "
                       f"{list(kept.shape)}")
        if kept.shape[2] == 0:
            raise fail("kept_token_ids", "K = 0: every token needs a non-empty kept set (it holds the token itself)")
        if kept.dtype.is_floating_point or kept.dtype.is_complex or kept.dtype == torch.bool:
            raise fail("kept_token_ids", f"expected an integer tensor, got dtype {kept.dtype}", TypeError)
        if kept.device != device:
            raise fail("kept_token_ids", f"expected device {device} (that of hidden), got {kept.device}")
        flat = kept.reshape(rows * length, kept.shape[2]).long()
        selected = torch.ones(rows * length, dtype=torch.bool, device=device) if mask is None else mask.reshape(-1) != 0
        bad = ((flat < -1) | (flat >= vocab)).any(1)
        checks.append(ValueCheck("kept_token_ids", f"ids must lie in [0, {vocab}) (V of weight), or be -1 (padding), "
                                 "where the mask is set", (bad & selected).any()))
        missing = ~(flat == ids.unsqueeze(1)).any(1)
        checks.append(ValueCheck("kept_token_ids", "{count} token(s) where the mask is set are not in their own kept "
                                 "set (completion_ids must be among the kept ids)", (missing & selected).sum()))
        run_value_checks(checks)
        return SupportRequest(flat, None, None, None, None)
    top_k, k_cuts = _per_row("top_k", options.top_k, rows, length, device, integer=True, checks=checks, low=0,
                             high=None, allow_low=True, describe="an int >= 0 (0: no top-k)",
                             noop=lambda k: (k == 0) | (k >= vocab))
    top_p, p_cuts = _per_row("top_p", options.top_p, rows, length, device, integer=False, checks=checks, low=0.0,
                             high=1.0, allow_low=False, describe="in (0, 1]", noop=lambda p: p >= 1.0)
    min_p, m_cuts = _per_row("min_p", options.min_p, rows, length, device, integer=False, checks=checks, low=0.0,
                             high=1.0, allow_low=True, describe="in [0, 1]", noop=lambda m: m <= 0.0)
    cuts = [c for c in (k_cuts, p_cuts, m_cuts) if c is not None]
    (truncates,) = run_value_checks(checks, torch.stack(cuts).any().reshape(1))
    if not truncates and options.return_kept_ids is None:
        return None
    return SupportRequest(None, top_k, top_p, min_p, options.return_kept_ids)


# -- the replay ----------------------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """Each row's largest logits: over the whole vocabulary (``values``, descending, merged across slices) and this
    slice's own (``local_values`` descending, at columns ``local_columns``)."""

    values: Tensor
    local_values: Tensor
    local_columns: Tensor


def _gathered_candidates(logits: Tensor, count: int, shard) -> Candidates:
    """The ``count`` largest logits of each row over the whole vocabulary (a slice's candidates are all-gathered and
    merged; rows shorter than ``count`` padded with -inf)."""
    local = min(count, logits.shape[1])
    top = torch.topk(logits, local, dim=1, sorted=True)
    if shard is None:
        return Candidates(top.values, top.values, top.indices)
    values = top.values
    width = min(count, shard.largest_slice)
    if local < width:
        values = torch.cat([values, values.new_full((values.shape[0], width - local), -math.inf)], dim=1)
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size(shard.group))]
    dist.all_gather(parts, values.contiguous(), group=shard.group)
    merged = torch.cat(parts, dim=1)
    merged = torch.topk(merged, min(count, merged.shape[1]), dim=1, sorted=True).values
    return Candidates(merged, top.values, top.indices)


def _top_p_cut(sorted_values: Tensor, floor: Tensor, top_p: Tensor, max_logit: Tensor, floor_mass: Tensor
               ) -> tuple[Tensor, Tensor]:
    """``(tau_p, kept count)`` from each row's largest logits in descending order: the smallest logit whose strictly
    larger logits (at or above ``floor``) hold less than ``top_p`` of the mass at or above ``floor``."""
    weights = torch.where(sorted_values >= floor.unsqueeze(1), torch.exp(sorted_values - max_logit.unsqueeze(1)),
                          torch.zeros((), dtype=sorted_values.dtype, device=sorted_values.device))
    exclusive = torch.cumsum(weights, dim=1) - weights
    # the mass strictly above a value: the exclusive sum at the first of its ties (ascending order of -values)
    negated = (-sorted_values).contiguous()
    first = torch.searchsorted(negated, negated, right=False).clamp(max=sorted_values.shape[1] - 1)
    above = exclusive.gather(1, first)
    kept = (above < top_p.unsqueeze(1) * floor_mass.unsqueeze(1)) & (sorted_values >= floor.unsqueeze(1))
    count = kept.sum(1)
    tau = sorted_values.gather(1, (count - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return tau, count


def _mass(logits: Tensor, max_logit: Tensor, shard, floor: Tensor | None = None,
          scratch: Tensor | None = None) -> Tensor:
    """``sum_{z_v >= floor} exp(z_v - max)`` over the whole vocabulary (one pass; every column without ``floor``)."""
    n, local = logits.shape
    total = logits.new_zeros(n)
    max_col = max_logit.unsqueeze(1)
    for start in range(0, local, VOCAB_BLOCK):
        block = logits[:, start:start + VOCAB_BLOCK]
        out = None if scratch is None else scratch[:n, : block.shape[1]]
        weights = torch.exp(torch.sub(block, max_col, out=out), out=out)
        if floor is not None:
            weights = torch.where(block >= floor.unsqueeze(1), weights, torch.zeros((), dtype=weights.dtype))
        total += weights.sum(1)
    if shard is not None:
        shard.all_reduce(total)
    return total


def _histogram_cut(logits: Tensor, floor: Tensor, top_p: Tensor, max_logit: Tensor, floor_mass: Tensor,
                   shard) -> Tensor:
    """``tau_p`` of rows whose top-p set is larger than the candidates, exactly, by histograms of the mass over the
    logits' values: each level splits the window that holds the cut into :data:`HISTOGRAM_BINS` bins (one pass: a bin
    index and two scatter-adds per logit; under a vocabulary-parallel head the histograms are all-reduced), until the
    cut's bin holds at most :data:`HISTOGRAM_FINISH` tokens, which are then sorted (a masked ``topk``)."""
    n = logits.shape[0]
    dtype, device = logits.dtype, logits.device
    bins = HISTOGRAM_BINS
    target = top_p * floor_mass
    high = max_logit.unsqueeze(1)
    valid_floor = floor > -math.inf
    low_local = logits.amin(1)
    low = low_local if shard is None else shard.all_reduce(low_local.clone(), dist.ReduceOp.MIN)
    low = torch.where(valid_floor, torch.maximum(floor, low), low).unsqueeze(1)
    member = logits >= low
    index = torch.empty(logits.shape, dtype=torch.int16 if bins < 2**15 else torch.int32, device=device)
    above = torch.zeros(n, dtype=dtype, device=device)  # the mass of the tokens above the window
    count = None
    for _ in range(HISTOGRAM_LEVELS):
        width = ((high - low) / bins).clamp(min=torch.finfo(dtype).tiny)
        packed = torch.zeros(2, n, bins + 1, dtype=dtype, device=device)
        for start in range(0, logits.shape[1], VOCAB_BLOCK):  # blocks: no [n, V] temporaries
            block, block_member = logits[:, start:start + VOCAB_BLOCK], member[:, start:start + VOCAB_BLOCK]
            block_index = torch.sub(high, block).div_(width).floor_().clamp_(0, bins - 1).long()
            block_index.masked_fill_(~block_member, bins)
            index[:, start:start + VOCAB_BLOCK] = block_index
            packed[0].scatter_add_(1, block_index, torch.sub(block, max_logit.unsqueeze(1)).exp_())
            packed[1].scatter_add_(1, block_index, block_member.to(dtype))
        if shard is not None:
            shard.all_reduce(packed)
        mass, counts = packed[0, :, :bins], packed[1, :, :bins]
        cumulative = above.unsqueeze(1) + torch.cumsum(mass, dim=1)
        cut = (cumulative < target.unsqueeze(1)).sum(1).clamp(max=bins - 1)  # the first bin reaching the target
        at_cut = cut.unsqueeze(1)
        above = cumulative.gather(1, at_cut).squeeze(1) - mass.gather(1, at_cut).squeeze(1)
        count = counts.gather(1, at_cut).squeeze(1)
        member &= index == at_cut.to(index.dtype)
        high, low = high - at_cut * width, high - (at_cut + 1) * width
        if int(count.max()) <= HISTOGRAM_FINISH:
            break
    # the cut's bin, sorted: its tokens' mass strictly above each is `above` plus the larger ones' (ties together)
    finish = max(1, int(count.max()))
    candidates = _gathered_candidates(torch.where(member, logits, torch.full((), -math.inf, dtype=dtype)), finish,
                                      shard).values
    in_bin = candidates > -math.inf
    bin_weights = torch.where(in_bin, torch.exp(candidates - max_logit.unsqueeze(1)), torch.zeros((), dtype=dtype))
    exclusive = torch.cumsum(bin_weights, dim=1) - bin_weights
    negated = (-candidates).contiguous()
    first = torch.searchsorted(negated, negated, right=False).clamp(max=candidates.shape[1] - 1)
    kept = in_bin & (above.unsqueeze(1) + exclusive.gather(1, first) < target.unsqueeze(1))
    last = (kept.sum(1) - 1).clamp(min=0)
    return candidates.gather(1, last.unsqueeze(1)).squeeze(1)


@dataclass
class Replay:
    """A replayed support: ``{v : z_v >= tau}`` per row; ``candidates`` hold it whole where ``complete``."""

    tau: Tensor
    candidates: Candidates | None
    complete: Tensor | None  # [n] bool: every token at or above tau is among the candidates


def replay_threshold(logits: Tensor, max_logit: Tensor, full_mass: Tensor, support: TokenSupport, vocab: int,
                     shard=None) -> Replay:
    """Each row's replayed support ``{v : z_v >= tau}``. ``max_logit`` is the whole vocabulary's largest logit and
    ``full_mass`` its ``sum exp(z - max)`` (global under a vocabulary-parallel head)."""
    n = logits.shape[0]
    dtype, device = logits.dtype, logits.device
    floor = torch.full((n,), -math.inf, dtype=dtype, device=device)
    if support.min_p is not None:
        floor = torch.maximum(floor, max_logit + torch.log(support.min_p.to(dtype)))
    k = None
    if support.top_k is not None:
        k = torch.where(support.top_k > 0, support.top_k.clamp(max=vocab), torch.full_like(support.top_k, vocab))
    needs_p = None if support.top_p is None else support.top_p < 1.0
    # one host read sizes the candidates (the largest k that cuts, and whether any row cuts with top-p)
    k_cut = 0 if k is None else int(torch.where(k < vocab, k, torch.zeros_like(k)).max())
    any_p = needs_p is not None and bool(needs_p.any())
    count = min(vocab, max(k_cut, REPLAY_CANDIDATES))
    candidates = _gathered_candidates(logits, count, shard)
    values = candidates.values
    if k_cut:
        kth = values.gather(1, (k.clamp(max=count) - 1).unsqueeze(1)).squeeze(1)
        floor = torch.where(k < vocab, torch.maximum(floor, kth), floor)
    # the candidates hold every token at or above the floor when their smallest is below it (or they are all)
    complete = (values[:, -1] < floor) | (count == vocab)
    if not any_p:
        return Replay(floor, candidates, complete)
    top_p = support.top_p.to(dtype)
    if bool(complete.all()):
        within = torch.where(values >= floor.unsqueeze(1), torch.exp(values - max_logit.unsqueeze(1)), 0.0)
        floor_mass = torch.where(floor == -math.inf, full_mass, within.sum(1))
    else:
        floor_mass = torch.where(floor == -math.inf, full_mass, _mass(logits, max_logit, shard, floor))
    tau, kept = _top_p_cut(values, floor, top_p, max_logit, floor_mass)
    overflow = needs_p & ~complete & (kept == count)
    if bool(overflow.any()):
        rows = overflow.nonzero().squeeze(1)
        for start in range(0, rows.numel(), HISTOGRAM_ROWS):
            part = rows[start:start + HISTOGRAM_ROWS]
            row_tau = _histogram_cut(logits.index_select(0, part), floor[part], top_p[part], max_logit[part],
                                     floor_mass[part], shard)
            tau = tau.index_copy(0, part, row_tau)
    tau = torch.where(needs_p, torch.maximum(floor, tau), floor)
    return Replay(tau, candidates, (values[:, -1] < tau) | (count == vocab))


# -- the chunks ----------------------------------------------------------------------------------------------------


def _unique_columns(columns: Tensor) -> Tensor:
    """Each row's columns with repeats (and the -1 padding) as -1, the others first."""
    ordered = torch.sort(columns, dim=1, descending=True).values
    repeated = torch.zeros_like(ordered, dtype=torch.bool)
    repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return torch.where(repeated, torch.full_like(ordered, -1), ordered)


class SupportChunks:
    """The chunk driver's contract with a support: the torch backend's logits buffer (whatever backend was asked for:
    see :func:`support_backend`) and the support's statistics and dz over it. A support of at most
    :data:`SPARSE_SUPPORT_MAX` tokens per row is held as columns (its statistics from the gathered logits, its
    gradient as those columns: no backward product over the vocabulary); a larger one as a mask beside the buffer."""

    def __init__(self, head: Head, needs: GradientNeeds):
        self.head = head
        self.inner = TorchChunks(head, needs)

    def bytes_per_row(self) -> int:
        return self.inner.bytes_per_row() + self.head.planning_vocab + 1  # the kept mask

    def allocate(self, rows: int) -> None:
        self.inner.allocate(rows)
        # one spare column takes the scatter of the -1 padding of kept sets
        self.mask = torch.empty(rows, self.head.local_vocab + 1, dtype=torch.bool, device=self.head.weight.device)

    def product_operands(self):
        return self.inner.product_operands()

    def dz_operand(self, matrix: Tensor) -> Tensor:
        return self.inner.dz_operand(matrix)

    def _dense_mask(self, columns: Tensor) -> Tensor:
        n, local = columns.shape[0], self.head.local_vocab
        mask = self.mask[:n]
        mask.zero_().scatter_(1, torch.where(columns >= 0, columns, torch.full_like(columns, local)), True)
        return mask[:, :local]

    def _support(self, logits: Tensor, targets: ChunkTargets, support: TokenSupport, max_logit: Tensor,
                 full_mass: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(columns [n, K] (-1: none), None)`` for a support held as columns, ``(None, mask [n, local V])`` else."""
        n, local = logits.shape
        shard = self.head.shard
        if support.kept_ids is not None:
            ids = support.kept_ids if shard is None else support.kept_ids - shard.offset
            columns = torch.where((ids >= 0) & (ids < local), ids, torch.full_like(ids, -1))
            if columns.shape[1] <= SPARSE_SUPPORT_MAX:
                return _unique_columns(columns), None
            return None, self._dense_mask(columns)
        replay = replay_threshold(logits, max_logit, full_mass, support, self.head.vocab, shard)
        owned = torch.ones_like(targets.read, dtype=torch.bool) if targets.owned is None else targets.owned
        local_values, local_columns = replay.candidates.local_values, replay.candidates.local_columns
        if local_values.shape[1] <= SPARSE_SUPPORT_MAX and bool(replay.complete.all()):
            kept = local_values >= replay.tau.unsqueeze(1)
            width = int(kept.sum(1).max()) if n else 0
            columns = torch.where(kept, local_columns, torch.full_like(local_columns, -1))[:, :width]
            # the target is always kept (the sampler drew it)
            missing = owned & ~(columns == targets.read.unsqueeze(1)).any(1)
            target = torch.where(missing, targets.read, torch.full_like(targets.read, -1))
            return torch.cat([columns, target.unsqueeze(1)], dim=1), None
        mask = self.mask[:n]
        kept = torch.ge(logits, replay.tau.unsqueeze(1), out=mask[:, :local])
        kept.scatter_(1, targets.read.unsqueeze(1), owned.unsqueeze(1) | kept.gather(1, targets.read.unsqueeze(1)))
        return None, kept

    def statistics(self, hidden: Tensor, targets: ChunkTargets, keep: str | None) -> ChunkStatistics:
        support: TokenSupport = targets.support
        logits = self.inner._logits(hidden)
        n, local = logits.shape
        shard = self.head.shard
        dtype = logits.dtype
        zero = torch.zeros((), dtype=dtype, device=logits.device)
        local_max = logits.amax(dim=1)
        max_logit = local_max if shard is None else shard.all_reduce(local_max.clone(), dist.ReduceOp.MAX)
        full_mass = _mass(logits, max_logit, shard, scratch=self.inner.block_a)
        columns, kept = self._support(logits, targets, support, max_logit, full_mass)
        self.columns = columns
        # the support's statistics over this slice, relative to the slice's largest kept logit
        if columns is not None:
            valid = columns >= 0
            values = logits.gather(1, torch.where(valid, columns, torch.zeros_like(columns)))
            self.column_values = values
            kept_max = torch.where(valid, values, torch.full((), -math.inf, dtype=dtype)).amax(dim=1)
            empty = kept_max == -math.inf
            kept_max = torch.where(empty, local_max, kept_max)
            shifted = values - kept_max.unsqueeze(1)
            weights = torch.where(valid, torch.exp(shifted), zero)
            sum_exp, sum_exp_shifted = weights.sum(1), (weights * shifted).sum(1)
            count = valid.sum(1)
        else:
            if support.kept_ids is None and shard is None:
                kept_max = local_max  # a replay keeps the largest logit
            else:
                kept_max = torch.where(kept, logits, torch.full((), -math.inf, dtype=dtype)).amax(dim=1)
            empty = kept_max == -math.inf
            kept_max = torch.where(empty, local_max, kept_max)
            sum_exp, sum_exp_shifted = logits.new_zeros(n), logits.new_zeros(n)
            max_col = kept_max.unsqueeze(1)
            for start in range(0, local, VOCAB_BLOCK):
                block, block_kept = logits[:, start:start + VOCAB_BLOCK], kept[:, start:start + VOCAB_BLOCK]
                width = block.shape[1]
                shifted = torch.sub(block, max_col, out=self.inner.block_a[:n, :width])
                # masked_fill, not a product: a logit outside the support may lie far above the support's largest
                weights = torch.exp(shifted, out=self.inner.block_b[:n, :width]).masked_fill_(~block_kept, 0.0)
                sum_exp += weights.sum(1)
                sum_exp_shifted += shifted.mul_(weights).sum(1)
            count = kept.sum(1)
        safe = torch.where(empty, torch.ones_like(sum_exp), sum_exp)
        log_sum = torch.log(safe)
        log_sum_exp = torch.where(empty, local_max - EMPTY_SLICE_OFFSET, kept_max + log_sum)
        entropy = torch.where(empty, zero, log_sum - sum_exp_shifted / safe)
        target_logit = logits.gather(1, targets.read.unsqueeze(1)).squeeze(1)
        logprobs = torch.where(empty, zero, target_logit - log_sum_exp)
        # the kept mass S = (support's mass) / (vocabulary's mass), both relative to the global maximum
        kept_mass = torch.where(empty, zero, sum_exp * torch.exp(kept_max - max_logit))
        if shard is not None:
            packed = torch.stack([kept_mass, count.to(dtype)])
            shard.all_reduce(packed)
            kept_mass, count = packed[0], packed[1].round().long()
        support.kept_log_mass.copy_(torch.log(kept_mass) - torch.log(full_mass))
        support.kept_count.copy_(count)
        if support.kept_out is not None:
            self._write_kept_ids(logits, kept if columns is None else self._dense_mask(columns), support.kept_out)
        self._target_logit = target_logit
        return ChunkStatistics(logprobs, entropy, log_sum_exp)

    def _write_kept_ids(self, logits: Tensor, kept: Tensor, out: Tensor) -> None:
        """The support's ids, largest logit first, -1 padding (a slice's are all-gathered and merged)."""
        shard = self.head.shard
        width = out.shape[1]
        masked = torch.where(kept, logits, torch.full((), -math.inf, dtype=logits.dtype))
        local_width = min(width, masked.shape[1])
        values, ids = torch.topk(masked, local_width, dim=1, sorted=True)
        if shard is not None:
            ids = ids + shard.offset
            pad = min(width, shard.largest_slice) - local_width
            if pad:
                values = torch.cat([values, values.new_full((values.shape[0], pad), -math.inf)], dim=1)
                ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], dim=1)
            world = dist.get_world_size(shard.group)
            value_parts = [torch.empty_like(values) for _ in range(world)]
            id_parts = [torch.empty_like(ids) for _ in range(world)]
            dist.all_gather(value_parts, values.contiguous(), group=shard.group)
            dist.all_gather(id_parts, ids.contiguous(), group=shard.group)
            values, ids = torch.cat(value_parts, dim=1), torch.cat(id_parts, dim=1)
            values, order = torch.topk(values, min(width, values.shape[1]), dim=1, sorted=True)
            ids = ids.gather(1, order)
        ids = torch.where(values == -math.inf, torch.full_like(ids, -1), ids)
        out[:, : ids.shape[1]] = ids

    def gradient(self, stats: ChunkStatistics, targets: ChunkTargets, grad_logprobs: Tensor,
                 grad_entropy: Tensor | None) -> ChunkGradient:
        """``dz_v = p_v (-g - e (z_v - mean_p z)) + g 1[v = y]`` with the support's ``p`` (0 outside the support),
        times the soft-cap's slope: over the support's columns, or written over the buffer (one-hot factored)."""
        n = grad_logprobs.shape[0]
        alpha = self.inner.softcap_alpha
        target_grad = grad_logprobs
        if alpha is not None:
            target_grad = target_grad * (1.0 - (self._target_logit / alpha).square())
        if targets.owned is not None:
            target_grad = target_grad * targets.owned
        offset = -grad_logprobs
        if grad_entropy is not None:
            offset = offset + grad_entropy * (stats.log_sum_exp - stats.entropy)
        offset = offset.unsqueeze(1)
        lse = stats.log_sum_exp.unsqueeze(1)
        if self.columns is not None:
            columns, values = self.columns, self.column_values
            valid = columns >= 0
            coefficient = offset if grad_entropy is None else values * (-grad_entropy).unsqueeze(1) + offset
            if alpha is not None:
                coefficient = coefficient * (1.0 - (values / alpha).square())
            grad = torch.where(valid, torch.exp(values - lse) * coefficient, torch.zeros((), dtype=values.dtype))
            is_target = valid & (columns == targets.read.unsqueeze(1))
            grad = grad + torch.where(is_target, target_grad.unsqueeze(1), torch.zeros((), dtype=values.dtype))
            return ChunkGradient(None, None, grad, columns)
        logits = self.inner.logits[:n]
        kept = self.mask[:n, : logits.shape[1]]
        neg_e = None if grad_entropy is None else (-grad_entropy).unsqueeze(1)
        for start in range(0, logits.shape[1], VOCAB_BLOCK):
            block, block_kept = logits[:, start:start + VOCAB_BLOCK], kept[:, start:start + VOCAB_BLOCK]
            width = block.shape[1]
            coefficient = offset
            if neg_e is not None:
                coefficient = torch.mul(block, neg_e, out=self.inner.block_a[:n, :width]).add_(offset)
            if alpha is not None:
                slope = _softcap_slope(block, alpha, self.inner.block_b[:n, :width])
                coefficient = slope.mul_(coefficient)
            block.sub_(lse).exp_().masked_fill_(~block_kept, 0.0).mul_(coefficient)
        return ChunkGradient(logits, None, target_grad, targets.read)


def _runs_every_input(head: Head, config: ObjectiveConfig | None) -> str | None:
    return None


def support_backend(requested: Backend, head: Head) -> Backend:
    """The backend of a call with a support: the support's chunks over the torch backend's logits buffer, for every
    requested backend (the Triton backend's row kernels and ``tl.dot`` tiles have no kept mask; its cuBLAS product
    and the torch buffer are the same product). ``requested`` has been resolved and checked already; a Triton
    statistics kernel asked for by name is refused rather than ignored."""
    if head.statistics_method != "auto":
        raise fail("statistics_method", f"{head.statistics_method!r} selects a Triton no-grad kernel, which has no "
                   "kept mask; a call with a sampler's support runs the shared buffer path: leave it 'auto'")
    return Backend(f"{requested.name}+support", SupportChunks, _runs_every_input)


def with_support(head: Head, support: TokenSupport) -> Head:
    return replace(head, support=support)


def kept_mass_metrics(kept_mass: Tensor, weights: Tensor) -> dict[str, Tensor]:
    """``kept_mass/mean`` (token-weighted) and ``kept_mass/min`` over the computed tokens with a weight, on device."""
    valid = weights != 0
    mean = (kept_mass * weights).sum() / weights.sum().clamp(min=1.0)
    low = torch.where(valid, kept_mass, torch.full_like(kept_mass, math.inf)).amin() if kept_mass.numel() else None
    low = kept_mass.new_zeros(()) if low is None else torch.where(valid.any(), low, kept_mass.new_zeros(()))
    return {"kept_mass/mean": mean, "kept_mass/min": low}


def scatter_kept_ids(plan: TokenPlan, kept_out: Tensor, kept_count: Tensor, bound: int) -> Tensor:
    """The computed tokens' kept ids [N, K] as [B, T, K] (-1 at masked positions), after checking that no support
    was larger than ``bound`` (one host read)."""
    largest = int(kept_count.max()) if kept_count.numel() else 0
    if largest > bound:
        raise fail("return_kept_ids", f"a replayed support holds {largest} tokens, more than the bound {bound}; "
                   "pass a larger return_kept_ids (returning fewer would change the support)")
    batch, length = plan.shape
    if plan.valid_index is None:
        return kept_out.reshape(batch, length, bound)
    out = kept_out.new_full((batch * length, bound), -1)
    out.index_copy_(0, plan.valid_index, kept_out)
    return out.reshape(batch, length, bound)
