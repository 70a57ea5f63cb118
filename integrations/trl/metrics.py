"""The training metrics of one micro-batch, from the fused loss's per-token outputs, reduced across processes: the
formulas are the core's (:mod:`fused_gates.metrics`: sums, counts, indicators), this module sums them over processes.

TRL 1.16's metrics as TRL computes them: a mean over tokens is global and token-weighted (the sums and the token
counts of every process are summed, then divided); at sequence level a per-sequence quantity counts sequences;
``clip_ratio/low_min`` / ``clip_ratio/high_max`` are the extremes over every process's sequences of the sequence's
clipped fraction. Keys: ``entropy``, ``kl`` (beta != 0), ``clip_ratio/low_mean|high_mean|region_mean|low_min|
high_max`` (clip), ``cispo_clip_ratio`` (cispo), ``vespo/phi_seq_mean`` (vespo).

The gate's own, by the same rules: ``eur`` (the Effective Update Ratio, paper eq. 12: the mean over prompt groups of
the group's token mean of f'(r), over the true groups of the generation batch whatever rows each process and
micro-batch holds), ``eur/on_policy`` or ``eur/off_policy`` (token-weighted f'(r) of the micro-batch, by whether the
policy has changed since its log-probs were sampled), ``gate/mean``, ``ratio/mean|min|max`` and
``nonfinite_tokens`` (the sum over processes of the tokens the loss dropped); what a gate that reads more than r
decided (``dppo/masked_fraction``, ...) and the entropy-scaled trust region's ``estr/masked_fraction``.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fused_gates import GatedPolicyLossOutput
from fused_gates.entropy_trust import ESTR_METRIC
from fused_gates.metrics import cispo_flags, clip_flags, group_mean_parts, masked_sum_and_count

from .config import GateObjective

MetricStore = MutableMapping[str, list[float]]

INPUT_GATE_METRICS = {"dppo": ("dppo/masked_fraction",), "dppo_kl": ("dppo_kl/masked_fraction",),
                      "m2po": ("m2po/masked_fraction",), "bapo": ("bapo/c_low", "bapo/c_high")}
"""The decisions of the gates that read more than r, logged as ``fused_gates.gate_inputs.input_gate_metrics``
reports them."""


@dataclass(frozen=True)
class MetricSettings:
    objective: GateObjective
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    sequence_level: bool
    beta: float


def _nan_extreme(values: Tensor, largest: bool) -> float:
    values = values[~torch.isnan(values)]
    if values.numel() == 0:
        return float("nan")
    return (values.max() if largest else values.min()).item()


class LossMetrics:
    """Computes and appends one micro-batch's metrics to a TRL metric store (``trainer._metrics[mode]``).

    Collectives: one ``reduce`` of every (sum, count) pair and one ``gather`` of every per-sequence value, the same
    on every process.
    """

    def __init__(self, accelerator, settings: MetricSettings):
        self.accelerator = accelerator
        self.settings = settings

    def record(self, store: MetricStore, out: GatedPolicyLossOutput, mask: Tensor, advantages: Tensor, *,
               group_ids: Tensor | None, off_policy: bool, phi_seq: Tensor | None = None) -> Tensor:
        """Appends the metrics and returns this process's ``[sum of m f'(r), sum of m]`` (the token-weighted EUR's
        parts)."""
        s = self.settings
        m = mask.float()
        batch = m.shape[0]
        row_tokens = m.sum(-1)
        has_tokens = row_tokens > 0
        sums: dict[str, tuple[Tensor, Tensor]] = {}
        count = m.sum()

        def token_mean(name: str, values: Tensor) -> None:
            sums[name] = masked_sum_and_count(values.float(), m)

        rows = torch.tensor(float(batch), device=m.device)
        token_mean("entropy", out.entropy)
        if s.beta != 0.0:
            token_mean("kl", out.kl)
        token_mean("gate/mean", out.gate_value)
        token_mean("ratio/mean", out.ratio)
        token_mean("eur/off_policy" if off_policy else "eur/on_policy", out.gate_grad)
        gate_grad_sum = sums["eur/off_policy" if off_policy else "eur/on_policy"][0]
        if "nonfinite_tokens" in out.metrics:
            sums["nonfinite_tokens"] = (out.metrics["nonfinite_tokens"].float().reshape(()), rows.new_ones(()))

        # TRL's coef_1 has one value per sequence at sequence level (with per-sequence advantages): it is 1 for a
        # sequence without tokens (log-ratio 0 / 1), and its indicators are averaged over sequences.
        row_level = s.sequence_level and advantages.dim() == 1
        row_advantages = advantages.float() if advantages.dim() == 1 else None
        per_row_columns: list[Tensor] = []
        if row_level:
            ratio = torch.where(has_tokens, (out.ratio.float() * m).sum(-1) / row_tokens.clamp(min=1), 1.0)
            adv = row_advantages
        else:
            ratio = out.ratio.float()
            adv = advantages.float().unsqueeze(1) if advantages.dim() == 1 else advantages.float()

        def indicator_mean(name: str, flags: Tensor) -> Tensor:
            flags = flags.float()
            if row_level:
                sums[name] = (flags.sum(), rows)
                return flags  # one value per sequence
            sums[name] = ((flags * m).sum(), count)
            return (flags * m).sum(-1) / row_tokens  # NaN for a sequence without tokens, as TRL's

        gate = s.objective.gate
        if gate == "clip":
            low, high = clip_flags(ratio, adv, s.epsilon_low, s.epsilon_high, s.delta)  # TRL's coef_1 after delta
            per_row_columns.append(indicator_mean("clip_ratio/low_mean", low))
            per_row_columns.append(indicator_mean("clip_ratio/high_mean", high))
            indicator_mean("clip_ratio/region_mean", low | high)
        elif gate == "cispo":
            indicator_mean("cispo_clip_ratio", cispo_flags(ratio, adv, s.epsilon_high))
        elif gate == "vespo" and phi_seq is not None:
            sums["vespo/phi_seq_mean"] = (phi_seq.float().sum(), rows)
        for name in (*INPUT_GATE_METRICS.get(gate, ()), *(k for k in (ESTR_METRIC,) if k in out.metrics)):
            value = out.metrics[name].float().reshape(())
            # the masked share token-weighted over processes, BAPO's bounds averaged over processes
            sums[name] = (value * count, count) if name.endswith("masked_fraction") else (value, rows.new_ones(()))

        # per-sequence values gathered from every process: the prompt group and its f'(r) sums, the ratio's range
        valid = m > 0
        inf = torch.tensor(float("inf"), device=m.device)
        ratio_tokens = out.ratio.float()
        row_min = torch.where(valid, ratio_tokens, inf).amin(-1)
        row_max = torch.where(valid, ratio_tokens, -inf).amax(-1)
        nan = torch.tensor(float("nan"), device=m.device)
        row_min, row_max = torch.where(has_tokens, row_min, nan), torch.where(has_tokens, row_max, nan)
        group = group_ids.float() if group_ids is not None else torch.full((batch,), -1.0, device=m.device)
        columns = [group, (out.gate_grad.float() * m).sum(-1), row_tokens, row_min, row_max, *per_row_columns]

        names = list(sums)
        totals = self.accelerator.reduce(torch.stack([torch.stack(sums[n]) for n in names]), reduction="sum")
        gathered = self.accelerator.gather(torch.stack(columns, dim=1).contiguous())
        for name, (total, denominator) in zip(names, totals.tolist(), strict=True):
            if name == "nonfinite_tokens":
                store[name].append(total)
            else:
                store[name].append(total / max(denominator, 1.0))
        store["eur"].append(_group_mean_eur(gathered[:, 0], gathered[:, 1], gathered[:, 2]))
        store["ratio/min"].append(_nan_extreme(gathered[:, 3], largest=False))
        store["ratio/max"].append(_nan_extreme(gathered[:, 4], largest=True))
        if gate == "clip":
            store["clip_ratio/low_min"].append(_nan_extreme(gathered[:, 5], largest=False))
            store["clip_ratio/high_max"].append(_nan_extreme(gathered[:, 6], largest=True))
        return torch.stack([gate_grad_sum, count]).detach()


def _group_mean_eur(group: Tensor, gate_grad_sum: Tensor, tokens: Tensor) -> float:
    """Mean over the prompt groups with tokens of the group's token mean of f'(r) (token mean without groups)."""
    if bool((group < 0).any()):
        total = tokens.sum()
        return (gate_grad_sum.sum() / total).item() if total > 0 else float("nan")
    ids, index = torch.unique(group, return_inverse=True)
    group_sum = torch.zeros(len(ids), dtype=gate_grad_sum.dtype, device=group.device).index_add_(0, index,
                                                                                                gate_grad_sum)
    group_tokens = torch.zeros_like(group_sum).index_add_(0, index, tokens)
    total, groups = group_mean_parts(group_sum, group_tokens)
    if not bool(groups > 0):
        return float("nan")  # no token: no value (TRL's log() leaves NaN entries out of the mean)
    return (total / groups).item()
