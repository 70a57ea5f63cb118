"""The public entry points: :func:`gated_policy_loss` and :func:`token_logprobs`.

Each reads as: check the arguments (:mod:`~fused_gates.arguments`) -> plan the tokens (:mod:`~fused_gates.tokens`)
-> run a backend (through :class:`~fused_gates.function.GatedPolicyLossFunction` for the loss) -> package the
outputs and metrics (:mod:`~fused_gates.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .arguments import check_batch, check_loss_arguments
from .backends import resolve_backend
from .entropy_trust import ESTR_METRIC, estr_dropped
from .function import GatedPolicyLossFunction
from .gates import Gate
from .metrics import loss_metrics, masked_mean, nonfinite_tokens
from .options import HeadOptions, LossOptions, SupportOptions
from .self_check import use_public_functions
from .sequence_parallel import checked_on_every_rank, global_loss_and_metrics, head_fingerprint, loss_fingerprint
from .support import check_support, kept_mass_metrics, scatter_kept_ids, support_backend, with_support
from .tokens import plan_logprob_tokens, plan_loss_tokens
from .topk_logprobs import current_topk_logprobs
from .validation import fail

__all__ = ["GatedPolicyLossOutput", "gated_policy_loss", "token_logprobs"]
L, H, S = LossOptions, HeadOptions, SupportOptions  # the defaults below are the options objects' own


@dataclass
class GatedPolicyLossOutput:
    """Result of :func:`gated_policy_loss`.

    ``loss`` is differentiable w.r.t. ``hidden``, ``weight`` and ``bias``; everything else is detached. Per-token
    tensors are [B, T] float32 (float64 for float64 inputs) and hold 0 at masked positions (and at tokens dropped by
    ``on_nonfinite="zero"``). At sequence level ``ratio``, ``gate_value`` and ``gate_grad`` repeat the row's value on
    each of its tokens.
    """

    loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    ratio: Tensor
    gate_value: Tensor
    gate_grad: Tensor
    eur: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    kl: Tensor | None = None  # the KL term of the loss per token (times r with bias correction); 0 when beta == 0
    policy_weight: Tensor | None = None  # what multiplied the policy term: sampling ratio, entropy and off-policy masks
    kept_mass: Tensor | None = None  # with a support: the trainer's probability mass on each token's support (S)


def gated_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    gate: str | Gate = L.gate,
    tau_pos: float = L.tau_pos,
    tau_neg: float = L.tau_neg,
    epsilon_low: float = L.epsilon_low,
    epsilon_high: float | None = L.epsilon_high,
    delta: float | None = L.delta,
    vespo_k: tuple[float, float] | None = L.vespo_k,
    vespo_lambda: tuple[float, float] | None = L.vespo_lambda,
    loss_type: str = L.loss_type,
    max_completion_length: int | None = L.max_completion_length,
    num_items_in_batch: int | float | Tensor | None = L.num_items_in_batch,
    importance_sampling_level: str = L.importance_sampling_level,
    beta: float = L.beta,
    use_bias_correction_kl: bool = L.use_bias_correction_kl,
    temperature: float = H.temperature,
    logit_softcap: float | None = H.logit_softcap,
    entropy_coef: float = L.entropy_coef,
    bias: Tensor | None = H.bias,
    sampling_ratio: Tensor | None = L.sampling_ratio,
    entropy_mask: Tensor | None = L.entropy_mask,
    off_policy_mask_threshold: float | None = L.off_policy_mask_threshold,
    sampling_logprobs: Tensor | None = L.sampling_logprobs,
    group_size: int | None = L.group_size,
    group_ids: Tensor | None = L.group_ids,
    on_nonfinite: str = H.on_nonfinite,
    process_group: object | None = H.process_group,
    backend: str = H.backend,
    memory_budget_mb: float | None = H.memory_budget_mb,
    sequence_group: object | None = H.sequence_group,
    sequence_ids: Tensor | None = L.sequence_ids,
    dppo_delta: float | tuple[float, float] | None = L.dppo_delta,
    m2po_threshold: float | None = L.m2po_threshold,
    bapo_rho: float | None = L.bapo_rho,
    bapo_bounds: tuple[float, float, float, float] | None = L.bapo_bounds,
    bapo_steps: tuple[float, float] | None = L.bapo_steps,
    aspo_dual_clip: float | None = L.aspo_dual_clip,
    gmpo_epsilon: float | tuple[float, float] | None = L.gmpo_epsilon,
    kept_token_ids: Tensor | None = S.kept_token_ids,
    top_k: int | Tensor | None = S.top_k,
    top_p: float | Tensor | None = S.top_p,
    min_p: float | Tensor | None = S.min_p,
    estr_threshold: float | None = L.estr_threshold,
    estr_epsilon: float | None = L.estr_epsilon,
    old_entropy: Tensor | None = L.old_entropy,
    old_topk_ids: Tensor | None = L.old_topk_ids,
    old_topk_logprobs: Tensor | None = L.old_topk_logprobs,
) -> GatedPolicyLossOutput:
    """Gated policy-gradient loss (GRPO / SAPO and the paper's soft gates) from last hidden states and the lm_head,
    without materialising the ``[B*T, V]`` logits.

    Per completion token, with ``z = (hidden @ weight.T + bias) / temperature`` (soft-capped models: ``z =
    logit_softcap * tanh((hidden @ weight.T + bias) / logit_softcap) / temperature``): ``logp =
    log_softmax(z)[id]``, ``r = exp(logp - old_logprobs)`` (``r = 1`` with the on-policy gradient when
    ``old_logprobs`` is None), the gate ``f(r)`` with ``tau = tau_pos`` where the advantage is positive and
    ``tau_neg`` otherwise (``clip`` uses ``epsilon_low`` / ``epsilon_high``), and the per-token loss ``-f(r) A +
    beta * k3_kl(ref, logp)``. The tokens are aggregated as TRL 1.16's ``GRPOTrainer`` does for ``loss_type``
    (before dividing by gradient-accumulation steps): ``grpo`` (mean over rows of the row's token mean), ``bnpo``
    (token mean over the batch), ``dr_grpo`` (sum / (B * max_completion_length)), ``dapo`` (sum /
    num_items_in_batch, default the token count), ``luspo`` (mean over rows of the row's sum). ``entropy_coef``
    subtracts ``entropy_coef * mean entropy``.

    TRL 1.16's objectives map onto ``gate`` and ``loss_type``: its grpo / bnpo / dr_grpo / dapo / luspo are
    ``gate="clip"`` (with ``delta``) and that aggregation, ``sapo`` is ``gate="sigmoid"`` with ``loss_type="grpo"``,
    ``cispo`` is ``gate="cispo", loss_type="dapo"`` and ``vespo`` is ``gate="vespo", loss_type="dapo"``; the
    sampler's importance ratio, the entropy mask and the off-policy mask multiply the policy term as in TRL.

    Args:
        hidden: [B, T, H] states that predict ``completion_ids`` (already shifted).
        weight: [V, H] lm_head weight (same dtype as ``hidden`` unless autocast is on).
        completion_ids: [B, T] integer token ids in [0, V).
        advantages: [B] or [B, T].
        completion_mask: [B, T] (bool, integer or float weights); masked tokens are skipped entirely.
        old_logprobs: [B, T] behaviour-policy log-probs; None means on-policy.
        ref_logprobs: [B, T] reference-model log-probs, required when ``beta != 0``.
        gate: a registered gate name (``clip``, ``sigmoid``, ``erf``, ``arctan``, ``softsign``, or one added with
            :func:`fused_gates.register_gate`), TRL's detached-weight objectives ``cispo`` (weight
            ``min(r, epsilon_high)``) and ``vespo`` (TRL's gamma weight of the row's ratio), the trust-region
            objectives that read more than the ratio ``dppo``, ``dppo_kl``, ``m2po``, ``bapo``, ``aspo``, ``gmpo``
            (:mod:`fused_gates.gate_inputs`), or a :class:`Gate`.
        epsilon_high: defaults to ``epsilon_low``.
        delta: ``gate="clip"`` only: TRL's two-sided clipping, the unclipped term's ratio capped at ``delta``.
        vespo_k, vespo_lambda: ``gate="vespo"`` only: ``(positive, negative)`` shape of the gamma weight (TRL's
            ``vespo_k_pos/neg`` = (2, 3), ``vespo_lambda_pos/neg`` = (3, 2) by default).
        num_items_in_batch: the ``dapo`` normaliser (ignored by the other loss types).
        importance_sampling_level: ``token`` or ``sequence`` (GSPO: one ratio per row, the exp of the row's mean
            log-ratio).
        use_bias_correction_kl: multiply the KL term by the importance ratio (TRL's flag).
        sampling_ratio: [B, T] the sampler's importance ratio (TRL's vLLM ``importance_sampling_ratio``): multiplies
            the policy term (not the KL); for ``vespo`` it enters the gamma weight instead, as in TRL.
        entropy_mask: [B, T] TRL's ``top_entropy_quantile`` mask: multiplies the policy term, and the entropy bonus
            becomes the mean over the tokens it keeps. (It needs the entropies first: take them from a no-grad
            :func:`token_logprobs` pass, one product.)
        off_policy_mask_threshold: TRL's off-policy sequence mask, from the current log-probs in the same pass: a
            row with ``A < 0`` whose mean of ``sampling_logprobs - logp`` exceeds the threshold is dropped from the
            policy term. ``sampling_logprobs`` defaults to ``old_logprobs`` (on-policy: nothing is dropped).
        group_size: completions per prompt (consecutive rows); ``eur`` is then the paper's mean over prompt groups
            of the group's token mean of f'(r) (groups without a valid token are left out; no valid token: 0).
            Without it (or ``group_ids``) the batch is one group.
        group_ids: [B] integer prompt-group id of each row: EUR over these groups (rows with equal ids; they need not
            be consecutive, and the ids may be any integers, e.g. global prompt indices).
        on_nonfinite: what a token (mask set) with an inf / NaN hidden state does: ``"raise"`` (default: a
            ValueError naming ``hidden`` before any product; checked in the same host synchronisation as the other
            value checks), ``"zero"`` (dropped from the loss, its normalisers and the gradients, like a masked token,
            as are tokens with non-finite ``old_logprobs`` / ``ref_logprobs``) or ``"propagate"`` (computed as is:
            NaN reaches the loss and every gradient). ``metrics["nonfinite_tokens"]`` counts such tokens and tokens
            whose log-prob or entropy came out non-finite (e.g. from a non-finite weight), in every mode.
        logit_softcap: soft-capping of the logits before the temperature (Gemma 2 / 3's ``final_logit_softcapping``).
            A model that multiplies the logits by ``s`` first (``logit_scale``, ``logits_scaling``, ...) is
            ``logit_softcap = c / s`` and ``temperature = T / s`` (without a cap: ``temperature = T / s``).
        backend: ``auto`` (Triton on CUDA when installed and the input is supported, else ``torch``), ``torch`` or
            ``triton``.
        process_group: a vocabulary-parallel head: ``weight`` (and ``bias``) hold this rank's contiguous slice of the
            vocabulary rows, rank order = vocabulary order, slices may be uneven; everything else (``hidden``, global
            ``completion_ids``, advantages, masks, log-probs) is the same on every rank. Every rank returns the same
            loss, per-token outputs and metrics, the full ``hidden`` gradient, and its slice's ``weight`` / ``bias``
            gradient. A DTensor ``weight`` sharded on dimension 0 over a 1-D mesh needs no group (its mesh's is
            used) and gets a DTensor gradient. See :mod:`fused_gates.vocab_parallel` for the communication.
        memory_budget_mb: bound on the backend's working buffers (default 512 MiB on CPU; on CUDA 10% of the free
            memory within [256, 1792] MiB: :mod:`fused_gates.chunk_driver`); sets the token chunk size.
        sequence_group: rows sharded by sequence (context parallelism): each rank of this process group passes the
            same positions of every row -- a contiguous slice ``[t0, t1)`` as Ulysses leaves them (slices may be
            uneven or empty), or any other split, e.g. ring attention's load-balanced chunks -- of ``hidden``,
            ``completion_ids`` (shifted before the split), the mask and every per-token input, and the per-row
            inputs (``advantages`` [B], ``group_ids``) whole. Every rank returns the global loss, metrics and EUR
            (those of the unsharded call), its slice's per-token outputs, its own tokens' ``hidden`` gradient and its
            tokens' share of the ``weight`` / ``bias`` gradient (the sum over the ranks is the whole gradient).
            Only per-row sums are communicated: :mod:`fused_gates.sequence_parallel`. With ``process_group`` too,
            a 2-D mesh (each sequence rank's head sliced by vocabulary). TRL's entropy mask over sharded rows:
            :func:`fused_gates.high_entropy_mask`.
        sequence_ids: [B, T] integer: packed rows (padding-free batches), each position's sequence in [0, S) (padding:
            any other value, e.g. -1, with the mask 0). The loss's rows are then the S sequences (``grpo``'s mean,
            ``dr_grpo``'s ``S * max_completion_length``, sequence-level ratios, vespo, the off-policy mask, EUR's
            groups), ``advantages`` is [S] (one per sequence, indexed by the id) and ``group_ids`` / ``group_size``
            group sequences. Along the batch the valid tokens' ids never decrease (each sequence one run, in order).
            Works with ``sequence_group`` (each rank's slice of the packed rows). See :mod:`fused_gates.packed_rows`.
        dppo_delta, m2po_threshold, bapo_rho, bapo_bounds, bapo_steps, aspo_dual_clip, gmpo_epsilon: the
            hyperparameters of the gates that read more than the ratio (``gate=`` ``"dppo"`` (DPPO-Binary-TV),
            ``"dppo_kl"`` (DPPO-Binary-KL), ``"m2po"``, ``"bapo"``, ``"aspo"``, ``"gmpo"``; each refused with any other
            gate; None: the paper's default): DPPO's divergence bound delta (a number or a ``(low, high)`` pair:
            Binary-TV's bound on the probability difference, 0.15, in (0, 1]; Binary-KL's bound on the KL, 0.05),
            M2PO's second-moment bound tau_M2 (0.04), BAPO's target share rho_0 of positive tokens (0.5, in (0, 1)),
            its ranges ``(a-, b-, a+, b+)`` of c_low and c_high ((0.6, 0.9, 1.2, 3.0)) and steps ``(delta_1,
            delta_2)`` ((0.1, 0.05)), ASPO's soft dual clip c (3, > 1; its clip uses ``epsilon_low`` /
            ``epsilon_high``), GMPO's log-space clip range eps (0.4, or ``(low, high)``). Formulas, citations and
            the choices taken where a paper leaves one open: :mod:`fused_gates.gate_inputs`. They take
            ``importance_sampling_level="token"`` only; m2po and bapo read a statistic of the whole batch (one
            more product when the batch needs several chunks), gmpo the whole row.
        kept_token_ids: [B, T, K] the sampler's kept set of each token (-1 padding; the token itself must be in it):
            log-probs, entropy, ratios and gradients over that support (:mod:`fused_gates.support`).
        top_k, top_p, min_p: the support replayed on these logits as vLLM's sampler truncates (a number, or a [B]
            tensor per row; ``top_k`` 0 / ``top_p`` 1 / ``min_p`` 0: no truncation). Not with ``kept_token_ids``.
        estr_threshold, estr_epsilon, old_entropy: the entropy-scaled trust region (ESTR, arXiv:2607.22186;
            :mod:`fused_gates.entropy_trust`): a token's policy term is kept only where its log-ratio satisfies
            ``(logp - old_logprobs)^2 <= estr_threshold * (H + estr_epsilon)``, ``H`` the behaviour policy's entropy
            ``old_entropy`` [B, T] (None: the current policy's, detached). Off while ``estr_threshold`` is None (the
            paper's tau is not published with a default); ``estr_epsilon`` defaults to the paper's 0.01. With
            ``gate="clip"`` this is ESTR; with a soft gate, its entropy-scaled variant. Token level, gates of one
            token's ratio (the paper's, registered ones, cispo) only. Metric ``estr/masked_fraction``.
        old_topk_ids, old_topk_logprobs: [B, T, K] the behaviour policy's K most likely ids per position and their
            log-probs (an inference engine's top-K log-probs): with ``gate="dppo"`` / ``"dppo_kl"``, DPPO's Top-K TV /
            KL divergence (the K tokens and the rest as one bucket) replaces the Binary one, at the cost of one
            no-gradient pass more (:mod:`fused_gates.topk_divergence`). Not with the sampler's support.

    Returns:
        :class:`GatedPolicyLossOutput` with the scalar ``loss`` and detached per-token ``logprobs``, ``entropy``,
        ``ratio``, ``gate_value``, ``gate_grad`` (f'(r)), the Effective Update Ratio ``eur`` (paper eq. 12) and
        ``metrics`` (scalar tensors; no host synchronisation is forced to compute them). For every gate
        ``gate_grad`` is the token's gradient weight relative to the unclipped policy gradient ``r A grad logp``
        (f'(r) for a gate of r, 0 / 1 for a mask, ``w / r`` for a detached weight w), so ``eur`` is eq. 12
        generalised: its mean over tokens and prompt groups.

    The loss supports repeated backward through a retained graph; double backward (``create_graph=True``) raises.
    """
    arguments = locals()
    head_options, loss_options = HeadOptions.collect(arguments), LossOptions.collect(arguments)
    support_options = SupportOptions.collect(arguments)

    def check():
        batch = check_batch(hidden, weight, completion_ids, completion_mask, head_options)
        args = check_loss_arguments(batch, advantages, old_logprobs, ref_logprobs, loss_options)
        request = check_support(support_options, batch.ids, batch.mask, batch.shape, batch.head.vocab, batch.device,
                                logprob_pass=False)
        if sequence_group is not None:
            _refuse_with_sequence_group(args.config.needs_whole_batch, request)
        if request is not None and loss_options.old_topk_ids is not None:
            raise fail("old_topk_ids", "DPPO's Top-K divergence compares full-vocabulary distributions; it is not "
                       "combined with the sampler's support (kept_token_ids, top_k, top_p, min_p)")
        return batch, args, request

    given = {"completion_mask": completion_mask, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs}
    (batch, args, request), sequence = checked_on_every_rank(
        sequence_group, check, lambda c: loss_fingerprint(c[0], head_options, loss_options, advantages, given))
    implementation = resolve_backend(batch.backend, batch.head, args.config)
    planned = plan_loss_tokens(batch, args, sequence)

    head = batch.head
    topk_ids = args.options.old_topk_ids
    if topk_ids is not None:  # DPPO's Top-K divergence: the current log-probs at the ids, one pass before the loss
        ids = planned.plan.gather_rows(topk_ids.reshape(-1, topk_ids.shape[-1]).long())
        planned.tokens.current_topk_logprobs = current_topk_logprobs(planned.hidden.detach(), head, ids)
    support = None
    if request is not None:
        support = request.plan(planned.plan, planned.ids.shape[0], head.accumulate_dtype, batch.device)
        head, implementation = with_support(head, support), support_backend(implementation, head)
    loss, logp, entropy, ratio, gate_value, gate_grad, kl, policy_weight = GatedPolicyLossFunction.apply(
        planned.hidden, head.weight, head.bias, planned.ids, planned.tokens, args.config, head.without_tensors(),
        implementation,
    )

    plan, tokens = planned.plan, planned.tokens
    logprobs, entropies = plan.scatter(logp), plan.scatter(entropy)
    computed = plan.scatter(torch.ones_like(logp)) != 0
    nonfinite = nonfinite_tokens(planned.flagged, computed, logprobs, entropies)
    config = args.config
    dropped = None if config.estr_threshold is None else estr_dropped(
        logp, entropy, tokens.old_logprobs, tokens.old_entropy, config.estr_threshold, config.estr_epsilon)
    if sequence is None:
        metrics = loss_metrics(tokens, config, entropy, ratio, gate_value, gate_grad, kl,
                               args.options.group_size, args.options.group_ids, args.row_advantages)
        metrics["policy_loss"] = loss.detach() - (tokens.entropy_weight * entropy).sum()
        metrics["nonfinite_tokens"] = nonfinite
        if dropped is not None:
            metrics[ESTR_METRIC] = masked_mean(dropped, tokens.mask)
    else:
        outputs = dict(entropy=entropy, ratio=ratio, gate_value=gate_value, gate_grad=gate_grad, kl=kl,
                       estr_dropped=dropped)
        loss, metrics = global_loss_and_metrics(sequence, loss, tokens, args.config, args.options.group_size,
                                                args.options.group_ids, args.row_advantages, outputs, nonfinite)
    kept_mass = None
    if support is not None:
        kept_mass = plan.scatter(support.kept_log_mass.exp())
        metrics.update(kept_mass_metrics(support.kept_log_mass.exp(), tokens.mask))
    return GatedPolicyLossOutput(
        loss=loss,
        logprobs=logprobs,
        entropy=entropies,
        ratio=plan.scatter(ratio),
        gate_value=plan.scatter(gate_value),
        gate_grad=plan.scatter(gate_grad),
        eur=metrics["eur"],
        metrics=metrics,
        kl=plan.scatter(kl) if args.config.beta != 0 else torch.zeros_like(logprobs),
        policy_weight=plan.scatter(policy_weight if _has_policy_weight(args, tokens) else torch.ones_like(logp)),
        kept_mass=kept_mass,
    )


def _has_policy_weight(args, tokens) -> bool:
    return tokens.policy_weight is not None or args.config.off_policy_mask_threshold is not None


def _refuse_with_sequence_group(needs_whole_batch: bool, support: object | None) -> None:
    """What sequence sharding does not gather across its ranks (raised inside the agreement, so every rank raises)."""
    if needs_whole_batch:
        raise fail("sequence_group", "this gate reads a statistic of the whole batch (m2po, bapo), which is not "
                   "gathered across sequence-sharded ranks; use it without sequence_group")
    if support is not None:
        raise fail("sequence_group", "the sampler's support (kept_token_ids, top_k, top_p, min_p) is not combined "
                   "with sequence-sharded rows; use it without sequence_group")


@torch.no_grad()
def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor | None = None,
    *,
    temperature: float = H.temperature,
    logit_softcap: float | None = H.logit_softcap,
    bias: Tensor | None = H.bias,
    on_nonfinite: str = H.on_nonfinite,
    process_group: object | None = H.process_group,
    backend: str = H.backend,
    statistics_method: str = H.statistics_method,
    memory_budget_mb: float | None = H.memory_budget_mb,
    sequence_group: object | None = H.sequence_group,
    kept_token_ids: Tensor | None = S.kept_token_ids,
    top_k: int | Tensor | None = S.top_k,
    top_p: float | Tensor | None = S.top_p,
    min_p: float | Tensor | None = S.min_p,
    return_kept_mass: bool = False,
    return_kept_ids: int | None = S.return_kept_ids,
) -> tuple[Tensor, ...]:
    """Per-token log-probs and entropies [B, T] (float32, 0 where masked) of ``completion_ids`` under the lm_head,
    without gradient and without materialising the logits: the old- and reference-policy passes of RL training.
    One matrix product of ``hidden @ weight.T``; arguments as in :func:`gated_policy_loss` (``on_nonfinite``:
    ``"raise"`` or ``"propagate"``, which gives NaN at such tokens). ``statistics_method`` (Triton backend only):
    ``"dot"`` (``tl.dot`` tiles, the logits never written), ``"cublas"`` (cuBLAS chunk products read back by a row
    kernel) or ``"auto"`` (by the number of tokens; ``fused_gates.kernels.triton_backend.choose_statistics_method``).

    The sampler's support (``kept_token_ids``, or ``top_k`` / ``top_p`` / ``min_p`` replayed as vLLM's sampler
    truncates: :mod:`fused_gates.support`) renormalises the log-probs and entropies over each token's kept set.
    ``return_kept_mass=True`` appends the trainer's mass on the support, S [B, T] (1 without a support);
    ``return_kept_ids=K`` appends the replayed kept sets [B, T, K] (int64, largest logit first, -1 padding; a larger
    support raises), for later passes to renormalise over the same sets with ``kept_token_ids``.
    ``sequence_group``: each rank passes its slice of the positions (as :func:`gated_policy_loss` takes them) and gets
    its slice's values; the ranks only agree on the arguments (every rank raises the same error otherwise)."""
    arguments = locals()
    options = HeadOptions.collect(arguments)
    support_options = SupportOptions.collect(arguments)

    def check():
        batch = check_batch(hidden, weight, completion_ids, completion_mask, options,
                            nonfinite_policies=("raise", "propagate"))
        request = check_support(support_options, batch.ids, batch.mask, batch.shape, batch.head.vocab, batch.device,
                                logprob_pass=True)
        if sequence_group is not None:
            _refuse_with_sequence_group(False, request)
        return batch, request

    (batch, request), sequence = checked_on_every_rank(sequence_group, check, lambda c: head_fingerprint(c[0], options))
    implementation = resolve_backend(batch.backend, batch.head, None)
    planned = plan_logprob_tokens(batch, sequence)
    head, support = batch.head, None
    if request is not None:
        support = request.plan(planned.plan, planned.ids.shape[0], head.accumulate_dtype, batch.device)
        head, implementation = with_support(head, support), support_backend(implementation, head)
    logp, entropy, _ = implementation.logprobs_and_entropy(planned.hidden, planned.ids, head)
    plan = planned.plan
    out = [plan.scatter(logp), plan.scatter(entropy)]
    if return_kept_mass:
        out.append(plan.scatter(torch.ones_like(logp) if support is None else support.kept_log_mass.exp()))
    if return_kept_ids is not None:
        out.append(scatter_kept_ids(plan, support.kept_out, support.kept_count, return_kept_ids))
    return tuple(out)


use_public_functions(gated_policy_loss, token_logprobs)
