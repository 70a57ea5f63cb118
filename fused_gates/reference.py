"""The specification: a naive reference of the loss that every backend is compared with (materialised logits,
float64, autograd).

Written from the paper's equations and TRL 1.16's ``GRPOTrainer._compute_loss`` directly, importing nothing else from
this package (a test enforces it): gate values are the paper's formulas and their derivatives come from autograd, so
a wrong closed-form f' in the package shows up as a gradient mismatch; TRL's objectives (clip with ``delta``, sapo,
cispo, vespo), its masks (off-policy, entropy), the sampler's importance ratio, the KL and the aggregations are
written as TRL writes them, on ``[B, T]`` tensors. The tests, the benchmarks' correctness checks and the GPU checks
all compare with :func:`reference_loss`.

Conventions it fixes: EUR (paper eq. 12) is the mean over prompt groups of the group's token mean of f'(r) with
the mask's weights; groups without a valid token are left out, no valid token at all gives 0, and without
``group_size`` / ``group_ids`` the batch is one group. For cispo and vespo, whose weight of ``-A logp`` is
detached, ``gate_value`` is that weight and ``gate_grad`` the weight over r; ``vespo/phi_seq_mean`` averages the
rows that have a valid token. ``nonfinite_tokens`` counts tokens with the mask set whose log-prob or entropy is not
finite. Per-token outputs are 0 at masked positions.

The trust-region objectives that read more than the ratio (dppo, m2po, bapo, aspo, gmpo) are written from their
papers' formulas on ``[B, T]`` tensors, their detached weights and masks with ``detach``, M2PO's mask by removing
the largest ``(log r)^2`` one token at a time and BAPO's bounds by the paper's loop; ``gate_grad`` is each token's
gradient weight relative to the unclipped policy gradient ``r A grad logp`` (autograd of the per-token term; for
gmpo of the token's clipped log-ratio), 1 where ``A = 0``, and EUR its mean as above. A gate that reads the
token's other inputs (``custom_input_value``) gets them as constants; autograd differentiates it in r only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor


def reference_gate_value(name: str, ratio: Tensor, advantages: Tensor, opts: dict) -> Tensor:
    tau = torch.where(advantages > 0, torch.tensor(opts["tau_pos"], dtype=ratio.dtype),
                      torch.tensor(opts["tau_neg"], dtype=ratio.dtype))
    u = ratio - 1
    if name == "sigmoid":  # eq. 3
        return torch.sigmoid(tau * u) * 4 / tau
    if name == "erf":  # eq. 6
        c = torch.sqrt(math.pi / (2 * tau**2))
        return c * (1 + torch.erf(tau * u / math.sqrt(2))) + 1 - c
    if name == "arctan":  # eq. 7
        return 1 + torch.atan(tau * u) / tau
    if name == "softsign":  # eq. 8
        return 1 + u / torch.sqrt(1 + tau**2 * u**2)
    raise ValueError(name)


@dataclass
class ReferenceResult:
    loss: Tensor
    logprobs: Tensor
    entropy: Tensor
    ratio: Tensor
    gate_value: Tensor
    gate_grad: Tensor
    eur: Tensor
    metrics: dict[str, Tensor]
    kl: Tensor
    policy_weight: Tensor
    kept_mass: Tensor | None = None  # with kept_mask: the mass of the whole-vocabulary softmax on the support


def _gamma_weights(advantages, log_ratio, mask, sampling_ratio, k_pos, lambda_pos, k_neg, lambda_neg):
    """TRL's vespo weight phi (detached), [B, 1] or [B, T]."""
    seq_log_ratio = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
    if sampling_ratio is not None:
        seq_log_ratio = seq_log_ratio + torch.clamp(torch.log(sampling_ratio), math.log(1e-8), 20.0).sum(
            -1, keepdim=True)
    log_w = torch.clamp(seq_log_ratio, math.log(1e-8), 20.0)
    nonnegative = advantages >= 0
    k = torch.where(nonnegative, k_pos, k_neg)
    lam = torch.where(nonnegative, lambda_pos, lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).detach()


TRUST_REGION_GATES = ("dppo", "dppo_kl", "m2po", "bapo", "aspo", "gmpo")
TRUST_REGION_DEFAULTS = {"dppo_delta": (0.15, 0.15), "dppo_kl_delta": (0.05, 0.05), "m2po_threshold": 0.04,
                         "bapo_rho": 0.5, "bapo_bounds": (0.6, 0.9, 1.2, 3.0), "bapo_steps": (0.1, 0.05),
                         "aspo_dual_clip": 3.0, "gmpo_epsilon": (0.4, 0.4)}
"""The papers' hyperparameters of the trust-region objectives (the defaults of :func:`reference_loss`)."""


def trust_region_terms(gate: str, logp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, eps_low: float,
                        eps_high: float, opts: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``(per-token policy term, gate value, ratio)`` of the trust-region objectives, differentiable in ``logp``,
    each written from its paper (and, where the paper leaves it open, verl's or the authors' code)."""
    a = adv.expand_as(logp)
    ratio = torch.exp(logp - old)
    r = ratio.detach()
    if gate in ("dppo", "dppo_kl") and opts.get("topk") is not None:  # arXiv:2602.04879, Top-K TV / KL
        delta_low, delta_high = opts["dppo_delta"]
        old_topk, current_topk = opts["topk"]
        p_k, q_k = old_topk.exp(), current_topk.exp()
        p_rest = torch.clamp(1 - p_k.sum(-1), min=0.0)
        q_rest = torch.clamp(1 - q_k.sum(-1), min=0.0)
        if gate == "dppo":
            divergence = 0.5 * ((p_k - q_k).abs().sum(-1) + (p_rest - q_rest).abs())
        else:
            rest = torch.where(p_rest > 0, p_rest * torch.log(p_rest / q_rest), torch.zeros_like(p_rest))
            divergence = (p_k * (old_topk - current_topk)).sum(-1) + rest
        p, p_old = logp.detach().exp(), old.exp()
        invalid = torch.where(a > 0, (divergence > delta_high) & (p > p_old), (divergence > delta_low) & (p < p_old))
        weight = torch.clamp(r, max=20.0) * (~invalid).to(logp.dtype)
        return -a * weight * logp, weight, ratio
    if gate == "dppo":  # arXiv:2602.04879, Binary-TV; verl's dppo_tv (truncation at 20)
        delta_low, delta_high = opts["dppo_delta"]
        shift = logp.detach().exp() - old.exp()
        valid = torch.where(a > 0, shift <= delta_high, shift >= -delta_low).to(logp.dtype)
        weight = torch.clamp(r, max=20.0) * valid
        return -a * weight * logp, weight, ratio
    if gate == "dppo_kl":  # arXiv:2602.04879, Binary-KL; verl's dppo_kl (truncation at 20), without its 1e-8
        delta_low, delta_high = opts["dppo_delta"]
        p, p_old = logp.detach().exp(), old.exp()
        with torch.no_grad():  # KL(Bernoulli(p_old) || Bernoulli(p)) in float64 from the probabilities
            rest = torch.where(p_old < 1, (1 - p_old) * torch.log((1 - p_old) / (1 - p)), torch.zeros_like(p))
            divergence = p_old * torch.log(p_old / p) + rest
        valid = torch.where(a > 0, (divergence <= delta_high) | (p <= p_old),
                            (divergence <= delta_low) | (p >= p_old)).to(logp.dtype)
        weight = torch.clamp(r, max=20.0) * valid
        return -a * weight * logp, weight, ratio
    if gate == "m2po":  # arXiv:2510.01161: mask the largest (log r)^2 one at a time until M2 <= tau
        second = (logp.detach() - old) ** 2
        keep = (mask != 0).to(logp.dtype)
        while (keep * mask).sum() > 0 and (second * mask * keep).sum() / (mask * keep).sum() > opts["m2po_threshold"]:
            flat = torch.where(keep.reshape(-1) > 0, second.reshape(-1), torch.tensor(-math.inf, dtype=logp.dtype))
            keep.view(-1)[int(torch.argmax(flat))] = 0.0
        return -keep * ratio * a, keep * r, ratio
    if gate == "bapo":  # arXiv:2510.18927, Algorithm 1
        low_start, low_max, high_start, high_max = opts["bapo_bounds"]
        step_high, step_low = opts["bapo_steps"]

        def share(c_low: float, c_high: float) -> float:
            loss = (torch.min(r * a, torch.clamp(r, c_low, c_high) * a).abs() * mask)
            total = float(loss.sum())
            return 1.0 if total <= 0 else float((loss * (a > 0)).sum()) / total

        c_low, c_high = low_start, high_start
        while share(c_low, c_high) < opts["bapo_rho"] and c_low + step_low <= low_max + 1e-9:
            if c_high + step_high <= high_max + 1e-9:
                c_high += step_high
            else:
                c_low += step_low
        opts["bapo_chosen"] = (c_low, c_high)
        per_token = -torch.min(ratio * a, torch.clamp(ratio, c_low, c_high) * a)
        value = torch.where(a > 0, torch.clamp(r, max=c_high), torch.clamp(r, min=c_low))
        return per_token, value, ratio
    if gate == "aspo":  # arXiv:2510.06062, the authors' loss with one pair of epsilons
        c = opts["aspo_dual_clip"]
        negative_rho = torch.clamp(ratio, min=1 - eps_low)
        positive_rho = torch.clamp(ratio, max=1 + eps_high)
        negative_dual = negative_rho.detach() > c
        negative = torch.where(negative_dual, -a * c * logp, -a * negative_rho)
        positive_dual = 1 / positive_rho.detach() > c
        flipped = (positive_rho / positive_rho.detach()) / positive_rho.detach()
        positive = torch.where(positive_dual, -a * c * logp, -a * flipped)
        value = torch.where(a < 0, torch.where(negative_dual, c, negative_rho.detach()),
                            torch.where(positive_dual, c, 1 / positive_rho.detach()))
        return torch.where(a < 0, negative, positive), value, ratio
    if gate == "gmpo":  # arXiv:2507.20673, as verl's geo_mean writes it
        low, high = opts["gmpo_epsilon"]
        log_ratio = torch.clamp(logp - old, -20.0, 20.0)
        sign = torch.sign(a)
        clipped = sign * torch.min(sign * log_ratio, sign * torch.clamp(log_ratio, -low, high))
        row_ratio = torch.exp((clipped * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
        return -a * row_ratio, row_ratio.detach().expand_as(logp), row_ratio
    raise ValueError(gate)


def _trust_region_gate_grad(gate: str, logp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, eps_low: float,
                            eps_high: float, opts: dict) -> Tensor:
    """Each token's gradient weight relative to the unclipped policy gradient ``r A grad logp`` (1 where A = 0):
    from autograd of the per-token term (token-level gates), or of the token's clipped log-ratio (gmpo)."""
    a = adv.expand_as(logp)
    probe = logp.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if gate == "gmpo":
            low, high = opts["gmpo_epsilon"]
            log_ratio = torch.clamp(probe - old, -20.0, 20.0)
            sign = torch.sign(a)
            clipped = sign * torch.min(sign * log_ratio, sign * torch.clamp(log_ratio, -low, high))
            (slope,) = torch.autograd.grad(clipped.sum(), probe)
            weight = slope
        else:
            per_token, _, _ = trust_region_terms(gate, probe, old, adv, mask, eps_low, eps_high, opts)
            (grad,) = torch.autograd.grad(per_token.sum(), probe)
            unclipped = -a * torch.exp(logp.detach() - old)
            weight = grad / torch.where(a != 0, unclipped, torch.ones_like(unclipped))
    return torch.where(a == 0, torch.ones_like(weight), weight)


def reference_loss(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    gate: str = "sigmoid",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    vespo_k: tuple[float, float] = (2.0, 3.0),
    vespo_lambda: tuple[float, float] = (3.0, 2.0),
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    use_bias_correction_kl: bool = False,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    entropy_coef: float = 0.0,
    bias: Tensor | None = None,
    sampling_ratio: Tensor | None = None,
    entropy_mask: Tensor | None = None,
    off_policy_mask_threshold: float | None = None,
    sampling_logprobs: Tensor | None = None,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    custom_value=None,
    dppo_delta: tuple[float, float] | None = None,
    m2po_threshold: float = 0.04,
    bapo_rho: float = 0.5,
    bapo_bounds: tuple[float, float, float, float] = (0.6, 0.9, 1.2, 3.0),
    bapo_steps: tuple[float, float] = (0.1, 0.05),
    aspo_dual_clip: float = 3.0,
    gmpo_epsilon: tuple[float, float] = (0.4, 0.4),
    custom_input_value=None,
    kept_mask: Tensor | None = None,
    estr_threshold: float | None = None,
    estr_epsilon: float = 0.01,
    old_entropy: Tensor | None = None,
    old_topk_ids: Tensor | None = None,
    old_topk_logprobs: Tensor | None = None,
) -> ReferenceResult:
    """Differentiable w.r.t. whichever of hidden / weight / bias require grad (use float64 leaves). ``kept_mask``
    [B, T, V] (bool): the sampler's support of each token; log-probs and entropies are then those of the softmax
    renormalised over it (e.g. from :func:`reference_sampler_support`). ``estr_threshold``: ESTR's keep mask
    (arXiv:2607.22186) ``1[(logp - old)^2 / (H + estr_epsilon) <= estr_threshold]`` on the policy term, ``H`` the
    behaviour entropy ``old_entropy`` or the current one. ``old_topk_ids`` / ``old_topk_logprobs`` [B, T, K]: DPPO's
    Top-K divergence between the behaviour's top-K (plus the rest) and the current policy at the same ids."""
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    batch, length, _ = hidden.shape
    dtype = hidden.dtype
    mask = torch.ones(batch, length, dtype=dtype)
    if completion_mask is not None:
        mask = completion_mask.to(dtype)
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    logits = logits / temperature
    kept_mass = None
    if kept_mask is not None:
        supported = logits.masked_fill(~kept_mask, -math.inf)
        kept_mass = torch.exp(torch.logsumexp(supported, -1) - torch.logsumexp(logits, -1)).detach()
        logits = supported
    log_probs_all = torch.log_softmax(logits, dim=-1)
    logp = log_probs_all.gather(-1, completion_ids.long().unsqueeze(-1)).squeeze(-1)
    probs = log_probs_all.exp()
    entropy = -(probs * torch.where(probs > 0, log_probs_all, torch.zeros((), dtype=dtype))).sum(-1)

    adv = advantages.to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    old = logp.detach() if old_logprobs is None else old_logprobs.to(dtype)
    log_ratio = logp - old
    if importance_sampling_level == "sequence":
        log_importance = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_importance = log_ratio
    coef_1 = torch.exp(log_importance)
    a_b = adv.expand(batch, length)
    r_b = coef_1.expand(batch, length)

    phi = None
    if gate in TRUST_REGION_GATES:
        if dppo_delta is None:  # each variant's own bound
            dppo_delta = TRUST_REGION_DEFAULTS["dppo_kl_delta" if gate == "dppo_kl" else "dppo_delta"]
        topk = None
        if old_topk_ids is not None:
            topk = (old_topk_logprobs.to(dtype), log_probs_all.detach().gather(-1, old_topk_ids.long()))
        opts = {"topk": topk, "dppo_delta": dppo_delta, "m2po_threshold": m2po_threshold, "bapo_rho": bapo_rho,
                "bapo_bounds": bapo_bounds, "bapo_steps": bapo_steps, "aspo_dual_clip": aspo_dual_clip,
                "gmpo_epsilon": gmpo_epsilon}
        per_token, gate_value, coef_1 = trust_region_terms(gate, logp, old, adv, mask, epsilon_low, eps_high, opts)
        gate_grad = _trust_region_gate_grad(gate, logp, old, adv, mask, epsilon_low, eps_high, opts)
        r_b = coef_1.expand(batch, length)
        bapo_chosen = opts.get("bapo_chosen")
    elif gate == "clip":
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + eps_high)
        capped = coef_1 if delta is None else torch.clamp(coef_1, max=delta)
        per_token = -torch.min(capped * adv, coef_2 * adv)
        # f(r) = -per_token / A where A != 0; the same form (the A < 0 branch) where A = 0
        gate_value = torch.where(a_b > 0, torch.min(capped, coef_2).expand(batch, length),
                                 torch.max(capped, coef_2).expand(batch, length))
        probe = r_b.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            probe_capped = probe if delta is None else torch.clamp(probe, max=delta)
            probe_clipped = torch.clamp(probe, 1 - epsilon_low, 1 + eps_high)
            f = torch.where(a_b > 0, torch.min(probe_capped, probe_clipped), torch.max(probe_capped, probe_clipped))
            (gate_grad,) = torch.autograd.grad(f.sum(), probe)
        gate_grad = torch.where(a_b == 0, torch.ones_like(gate_grad), gate_grad)
    elif gate == "cispo":
        clamped = torch.clamp(coef_1, max=eps_high).detach()
        per_token = -clamped * adv * logp
        gate_value = clamped.expand(batch, length)
        gate_grad = (clamped / coef_1.detach()).expand(batch, length)
    elif gate == "vespo":
        phi = _gamma_weights(adv, log_ratio, mask, sampling_ratio, vespo_k[0], vespo_lambda[0], vespo_k[1],
                             vespo_lambda[1])
        per_token = -phi * adv * logp
        gate_value = phi.expand(batch, length)
        gate_grad = (phi / coef_1.detach()).expand(batch, length)
    else:
        opts = {"tau_pos": tau_pos, "tau_neg": tau_neg}

        def value(r: Tensor) -> Tensor:
            if custom_input_value is not None:  # f of (r, tau) and the token's other inputs, held constant
                tau = torch.where(a_b > 0, torch.tensor(tau_pos, dtype=r.dtype), torch.tensor(tau_neg, dtype=r.dtype))
                lp = logp.detach()
                return custom_input_value(SimpleNamespace(ratio=r, tau=tau, advantages=a_b, logprobs=lp,
                                                          old_logprobs=old.expand_as(lp), entropy=entropy.detach()))
            if custom_value is not None:
                tau = torch.where(a_b > 0, torch.tensor(tau_pos, dtype=r.dtype), torch.tensor(tau_neg, dtype=r.dtype))
                return custom_value(r, tau)
            return reference_gate_value(gate, r, a_b, opts)

        gate_value = value(r_b)
        per_token = -gate_value * a_b
        probe = r_b.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (gate_grad,) = torch.autograd.grad(value(probe).sum(), probe)

    estr_dropped = None
    if estr_threshold is not None:  # the entropy-scaled score S = delta^2 / (H + eps), kept where S <= tau
        behaviour = entropy.detach() if old_entropy is None else old_entropy.to(dtype)
        score = (logp.detach() - old) ** 2 / (behaviour + estr_epsilon)
        keep = (score <= estr_threshold).to(dtype)
        estr_dropped = 1 - keep
        per_token = per_token * keep
        gate_value = gate_value * keep
        gate_grad = torch.where(a_b == 0, gate_grad, gate_grad * keep)

    policy_weight = torch.ones(batch, length, dtype=dtype)
    if off_policy_mask_threshold is not None:
        sampling = old if sampling_logprobs is None else sampling_logprobs.to(dtype)
        divergence = torch.nan_to_num(sampling - logp.detach(), nan=0.0)
        mean_divergence = (divergence * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        policy_weight = policy_weight * ((adv >= 0) | (mean_divergence <= off_policy_mask_threshold)).to(dtype)
    if entropy_mask is not None:
        policy_weight = policy_weight * entropy_mask.to(dtype)
    if sampling_ratio is not None and gate != "vespo":
        policy_weight = policy_weight * sampling_ratio.to(dtype)
    per_token = per_token * policy_weight

    kl = torch.zeros(batch, length, dtype=dtype)
    if beta != 0:
        kl = torch.exp(ref_logprobs - logp) - (ref_logprobs - logp) - 1
        if use_bias_correction_kl:
            kl = kl * coef_1
        per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (batch * max_completion_length)
    elif loss_type == "dapo":
        items = mask.sum() if num_items_in_batch is None else torch.as_tensor(float(num_items_in_batch))
        loss = (per_token * mask).sum() / items.clamp(min=1.0)
    elif loss_type == "luspo":
        loss = (per_token * mask).sum(-1).mean()
    else:
        raise ValueError(loss_type)
    policy_loss = loss.detach()
    if entropy_coef:
        bonus_mask = mask if entropy_mask is None else mask * entropy_mask.to(dtype)
        loss = loss - entropy_coef * (entropy * bonus_mask).sum() / bonus_mask.sum().clamp(min=1.0)

    def masked_mean(x: Tensor) -> Tensor:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    gg = gate_grad.detach()
    if group_ids is None:
        size = batch if group_size is None else group_size
        group_ids = torch.arange(batch) // size
    per_group = []
    for g in torch.unique(group_ids).tolist():
        rows = group_ids == g
        count = mask[rows].sum()
        if count > 0:
            per_group.append((gg[rows] * mask[rows]).sum() / count)
    eur = torch.stack(per_group).mean() if per_group else torch.zeros((), dtype=dtype)
    valid = mask != 0
    metrics = {
        "eur": eur,
        "entropy": masked_mean(entropy.detach()),
        "ratio/mean": masked_mean(r_b.detach()),
        "ratio/min": r_b.detach()[valid].min() if valid.any() else torch.zeros((), dtype=dtype),
        "ratio/max": r_b.detach()[valid].max() if valid.any() else torch.zeros((), dtype=dtype),
        "gate/mean": masked_mean(gate_value.detach()),
        "policy_loss": policy_loss,
        "nonfinite_tokens": (valid & ~(logp.detach().isfinite() & entropy.detach().isfinite())).sum().to(dtype),
    }
    if beta != 0:
        metrics["kl"] = masked_mean(kl.detach().expand(batch, length))  # TRL logs the corrected term
    if estr_dropped is not None:
        metrics["estr/masked_fraction"] = masked_mean(estr_dropped)
    if kept_mass is not None:
        metrics["kept_mass/mean"] = masked_mean(kept_mass)
        metrics["kept_mass/min"] = kept_mass[valid].min() if valid.any() else torch.zeros((), dtype=dtype)

    def trl_mean(flags: Tensor) -> Tensor:  # TRL's global_masked_mean on one process
        return flags.mean() if flags.shape[1] == 1 else masked_mean(flags)

    if gate == "clip":
        capped = coef_1 if delta is None else torch.clamp(coef_1, max=delta)  # TRL reassigns coef_1
        low = ((capped < 1 - epsilon_low) & (adv < 0)).to(dtype)
        high = ((capped > 1 + eps_high) & (adv > 0)).to(dtype)
        metrics.update({
            "clip_ratio/low_mean": trl_mean(low),
            "clip_ratio/high_mean": trl_mean(high),
            "clip_ratio/region_mean": trl_mean(low) + trl_mean(high),
        })
    elif gate == "cispo":
        metrics["cispo_clip_ratio"] = trl_mean(((coef_1 > eps_high) & (adv > 0)).to(dtype))
    elif gate in ("dppo", "dppo_kl", "m2po"):
        metrics[f"{gate}/masked_fraction"] = masked_mean((gate_value.detach() == 0).to(dtype))
    elif gate == "bapo":
        metrics["bapo/c_low"], metrics["bapo/c_high"] = (torch.tensor(c, dtype=dtype) for c in bapo_chosen)
    elif gate == "vespo":  # over the rows that have a valid token (TRL's would also average phi of empty rows)
        rows = mask.sum(-1) > 0
        metrics["vespo/phi_seq_mean"] = (phi[rows].mean() if phi.shape[1] == 1 else masked_mean(phi)) \
            if rows.any() else torch.zeros((), dtype=dtype)

    def zero_masked(x: Tensor) -> Tensor:
        return torch.where(valid, x.detach().expand(batch, length), torch.zeros((), dtype=x.dtype))

    return ReferenceResult(
        loss=loss,
        logprobs=zero_masked(logp),
        entropy=zero_masked(entropy),
        ratio=zero_masked(coef_1),
        gate_value=zero_masked(gate_value),
        gate_grad=zero_masked(gate_grad),
        eur=eur,
        metrics=metrics,
        kl=zero_masked(kl),
        policy_weight=zero_masked(policy_weight),
        kept_mass=None if kept_mass is None else zero_masked(kept_mass),
    )


def reference_sampler_support(logits: Tensor, top_k: Tensor | None = None, top_p: Tensor | None = None,
                              min_p: Tensor | None = None) -> Tensor:
    """The tokens a vLLM (v1) sampler keeps, bool [R, V], from processed logits [R, V] (after the temperature) and
    per-row options [R] (None: not applied), one row and one token at a time, in float64 and vLLM's order:

    1. min_p: keep a token whose probability is at least ``min_p`` times the largest probability;
    2. top_k (0 or >= V: off): keep the tokens whose logit is not below the k-th largest logit left by step 1 (ties
       with it are kept; fewer than k left: all of them);
    3. top_p (1: off): over the softmax of what steps 1-2 kept, keep a token when the tokens with a strictly larger
       logit hold less than ``top_p`` of the mass (vLLM drops a token when the ascending cumulative mass up to it is
       at most ``1 - top_p``; a tie group is kept whole here, the largest logit always).
    """
    rows, vocab = logits.shape
    z_all = logits.detach().to(torch.float64)
    kept = torch.zeros(rows, vocab, dtype=torch.bool)
    for i in range(rows):
        z = z_all[i]
        keep = [True] * vocab
        if min_p is not None and float(min_p[i]) > 0:
            probs = torch.softmax(z, 0)
            largest = float(probs.max())
            keep = [keep[v] and float(probs[v]) >= float(min_p[i]) * largest for v in range(vocab)]
        if top_k is not None and 0 < int(top_k[i]) < vocab:
            left = sorted((float(z[v]) for v in range(vocab) if keep[v]), reverse=True)
            if len(left) >= int(top_k[i]):
                kth = left[int(top_k[i]) - 1]
                keep = [keep[v] and float(z[v]) >= kth for v in range(vocab)]
        if top_p is not None and float(top_p[i]) < 1:
            masked = torch.tensor([float(z[v]) if keep[v] else -math.inf for v in range(vocab)], dtype=torch.float64)
            probs = torch.softmax(masked, 0)
            keep = [keep[v] and float(probs[masked > masked[v]].sum()) < float(top_p[i]) for v in range(vocab)]
        kept[i] = torch.tensor(keep)
    return kept
