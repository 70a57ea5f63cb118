"""The entropy-scaled trust region (ESTR) of Zhao et al. 2026, "Deconstructing Off-Policy Ratios: Entropy-Scaled
Trust Regions for Asynchronous Reinforcement Learning" (arXiv:2607.22186), as a keep mask on any token-level gate.

The paper's observation: the natural scale of a token's log-ratio ``delta_t = log pi(y_t) / mu(y_t)`` grows with
the behaviour policy's entropy at that position, ``E[delta_t^2] ~ H_t``, so one fixed bound on the ratio keeps the
amplified sampling noise of low-entropy positions and drops the legitimate moves of high-entropy ones. ESTR scores
each token by its log-ratio in units of its entropy and keeps it only inside the scaled region:

    S_t = delta_t^2 / (H_t + eps),      M_t = 1[S_t <= tau]      (|delta_t| <= sqrt(tau (H_t + eps)))

and the loss is the gate's policy term times ``M_t`` (the mask detached): with ``gate="clip"`` exactly the paper's
``-M_t min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``; with the soft gates (``sigmoid``, ``erf``, ``arctan``,
``softsign``, registered ones) the entropy-scaled variant of the soft gates, ``-M_t f(r) A``: the gate shapes the
step inside the region, the mask bounds the region by the token's own uncertainty. ``eps = 0.01`` is the paper's
floor (the bound tends to ``sqrt(tau eps)`` as the entropy vanishes). The paper's ``tau`` is not in the sources this
module was written from (it sits in the paper's sensitivity appendix), so ``estr_threshold`` has no default: the
mask is off until a threshold is given. ``H_t`` is the behaviour policy's entropy (the inference engine's, at
generation); where the caller has none, the current policy's entropy at the token (detached) stands in for it,
equal at the first update on fresh samples up to the engines' mismatch.

Where ``A = 0`` a masked token's ``gate_grad`` stays the gate's own (the token is not clipped, as every gate counts
it); elsewhere a masked token has ``gate_value = gate_grad = 0``, so EUR (the mean gradient weight relative to the
unclipped policy gradient) counts the mask. Metric: ``estr/masked_fraction``, the paper's rho_mask (the
mask-weighted share of tokens dropped).
"""

from __future__ import annotations

from torch import Tensor

ESTR_EPSILON = 0.01
"""The paper's entropy floor eps."""
ESTR_METRIC = "estr/masked_fraction"


def estr_keep(log_ratio: Tensor, entropy: Tensor, threshold: float, epsilon: float) -> Tensor:
    """``M_t = 1[delta_t^2 <= tau (H_t + eps)]`` (1 kept, 0 dropped) in the dtype of ``log_ratio``; the product form
    never divides, so a zero entropy with a zero floor keeps exactly the tokens with ``delta_t = 0``."""
    return (log_ratio.square() <= threshold * (entropy + epsilon)).to(log_ratio.dtype)


def estr_dropped(logprobs: Tensor, entropy: Tensor, old_logprobs: Tensor | None, old_entropy: Tensor | None,
                 threshold: float, epsilon: float) -> Tensor:
    """``1 - M_t`` per token, from the log-probs and entropies the loss computed (the metric's flags: the same
    operations as the objective's mask)."""
    log_ratio = logprobs - old_logprobs if old_logprobs is not None else logprobs.new_zeros(logprobs.shape)
    return 1 - estr_keep(log_ratio, entropy if old_entropy is None else old_entropy, threshold, epsilon)


def apply_estr(keep: Tensor, advantages: Tensor, gate_value: Tensor, gate_grad: Tensor) -> tuple[Tensor, Tensor]:
    """The diagnostics of a masked token: ``gate_value`` and ``gate_grad`` are 0 where dropped, except ``gate_grad``
    where ``A = 0`` (no update either way; the gate's own value, as for the unmasked gates)."""
    return gate_value * keep, gate_grad.where(advantages == 0, gate_grad * keep)
