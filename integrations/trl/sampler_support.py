"""``logprob_support="sampler"``: the trainer's log-probs renormalised over the support the sampler drew from.

A sampler that truncates (``top_k``, ``top_p``, ``min_p``) reports log-probs over the tokens it kept (vLLM's
``processed_logprobs``); a trainer that takes a full-vocabulary softmax then sees ``log(pi_old / pi_sampler) = log S``
(S: the kept mass) at every token, a bias of the importance-sampling correction, not a policy change. With
``logprob_support="sampler"``:

- the **old-policy pass** (TRL's, when it runs: later iterations or optimiser steps over a generation batch, or the vLLM
  correction) replays the support on the old policy's logits (:func:`fused_gates.token_logprobs` with ``top_k`` /
  ``top_p`` / ``min_p`` of the configuration, vLLM v1's semantics) and returns the kept sets (at most
  ``sampler_kept_bound`` tokens per position: a larger support raises) and the kept mass; its log-probs are over that
  support, so TRL's ``importance_sampling_ratio = pi_old / pi_sampler`` compares like with like;
- the **current policy** in the loss renormalises over those same kept sets (the support belongs to the policy that
  sampled, not to the one being trained); without an old-policy pass (every micro-batch on-policy) the loss replays
  the support on its own logits;
- the **reference policy** stays over the whole vocabulary: it never sampled, and its KL regularises the whole
  distribution. (The loss's k3 KL term then compares the support's current log-prob with the full reference one, so
  it carries ``log S`` too; with ``beta = 0``, TRL's default, there is no such term.)

Logged (train and eval): ``sampler/kept_mass`` mean and min (the trainer's mass on the support, from the loss), and,
where TRL computes the vLLM importance-sampling ratio, its mean and fraction outside [0.9, 1.1] over the whole
vocabulary (``sampler/is_ratio_full/...``: the biased ratio TRL would use) and over the support
(``sampler/is_ratio_support/...``: the ratio used).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

KEPT_IDS_KEY = "fused_gates_kept_ids"
"""Input key of the kept sets [B, T, K] replayed in the old-policy pass (-1 padding)."""
RATIO_BAND = (0.9, 1.1)


def sampler_truncation(args: Any) -> dict[str, Any]:
    """The truncation the sampler applies: ``top_k`` / ``top_p`` / ``min_p`` of the configuration, overridden by
    ``generation_kwargs`` as TRL passes them on; only those that truncate."""
    values = {"top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p}
    overrides = args.generation_kwargs if isinstance(args.generation_kwargs, dict) else {}
    values.update({k: v for k, v in overrides.items() if k in values})
    truncation = {}
    if values["top_k"] not in (None, 0, -1):
        truncation["top_k"] = values["top_k"]
    if values["top_p"] is not None and values["top_p"] < 1.0:
        truncation["top_p"] = values["top_p"]
    if values["min_p"] not in (None, 0.0):
        truncation["min_p"] = values["min_p"]
    return truncation


@dataclass
class SamplerSupport:
    """The state of ``logprob_support="sampler"`` across the passes of a generation batch (see the module
    docstring). The fused head asks :meth:`logprob_options` at each no-grad pass and hands back the extra outputs."""

    truncation: dict[str, Any]
    bound: int
    replaying: bool = False  # set for the old-policy pass only
    kept_ids: list[Tensor] = field(default_factory=list)
    kept_mass: list[Tensor] = field(default_factory=list)

    def logprob_options(self) -> dict[str, Any]:
        if not self.replaying:
            return {}
        return dict(self.truncation, return_kept_mass=True, return_kept_ids=self.bound)

    def receive(self, outputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """The (log-probs, entropies) of a pass; the kept mass and sets of a replaying pass are kept, in order."""
        if self.replaying:
            self.kept_mass.append(outputs[2])
            self.kept_ids.append(outputs[3])
        return outputs[0], outputs[1]

    def start_old_pass(self) -> None:
        self.replaying = True
        self.kept_ids, self.kept_mass = [], []

    def finish_old_pass(self, length: int) -> tuple[Tensor, Tensor] | None:
        """The batch's kept sets [B, T, K] and kept mass [B, T] over its ``length`` completion positions (None when no
        old-policy pass ran)."""
        self.replaying = False
        if not self.kept_ids:
            return None
        kept_ids = torch.cat([ids[:, -length:] for ids in self.kept_ids])
        kept_mass = torch.cat([mass[:, -length:] for mass in self.kept_mass])
        self.kept_ids, self.kept_mass = [], []
        return kept_ids, kept_mass

    def loss_options(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The loss's support: the old pass's kept sets when it ran, else the replay."""
        kept = inputs.get(KEPT_IDS_KEY)
        return dict(self.truncation) if kept is None else {"kept_token_ids": kept}


def ratio_summary(log_ratio: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum of r, count outside the band)`` of ``r = exp(log_ratio)`` over ``mask``."""
    ratio = torch.exp(log_ratio)
    low, high = RATIO_BAND
    weights = mask.float()
    return (ratio * weights).sum(), (((ratio < low) | (ratio > high)).float() * weights).sum()
