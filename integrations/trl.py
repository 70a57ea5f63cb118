"""TRL drop-in: :class:`GatedGRPOTrainer`, a ``trl.GRPOTrainer`` whose policy loss is :func:`gated_policy_loss`.

The loss runs inside the model's forward (``model(..., fused_gates_head=fn)``): the backbone's last hidden states
and the lm_head go straight into the fused loss, so the completion logits are never materialised, and under
DeepSpeed ZeRO-3 the lm_head is gathered for the loss while the engine's hooks are armed. The no-grad old- and
reference-policy passes use :func:`token_logprobs` the same way.

Supported TRL 1.16 options: loss types grpo / bnpo / dr_grpo / dapo (with ``num_items_in_batch``),
``num_iterations`` > 1 (old log-probs), ``beta`` with a reference model (or PEFT's disabled adapter),
``use_bias_correction_kl``, sampling ``temperature``, token- and sequence-level importance sampling, the vLLM
importance-sampling correction, a static ``entropy_coef``, tool masks and gradient accumulation. Options whose
semantics the fused loss cannot reproduce are refused when the trainer is built.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx

from ..api import BACKENDS, GatedPolicyLossOutput, gated_policy_loss, token_logprobs
from ..gates import get_gate

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
                    "mm_token_type_ids", "image_position_ids", "spatial_shapes", "num_tiles")


@dataclass
class GatedGRPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the gate. ``loss_type`` sets the aggregation (grpo, bnpo, dr_grpo, dapo), ``gate`` the
    objective: ``gate="sigmoid"`` with ``loss_type="grpo"`` is TRL's ``sapo``; ``gate="clip"`` is TRL's clipped
    objective with ``epsilon`` / ``epsilon_high``."""

    gate: str = field(
        default="sigmoid",
        metadata={"help": "Gate: clip, sigmoid (SAPO), erf, arctan, softsign, or a name given to register_gate."},
    )
    gate_tau_pos: float = field(default=1.0, metadata={"help": "Gate temperature where the advantage is positive."})
    gate_tau_neg: float = field(default=1.05, metadata={"help": "Gate temperature where the advantage is <= 0."})
    gate_backend: str = field(default="auto", metadata={"help": "fused_gates backend: auto, torch or triton."})
    gate_memory_budget_mb: float | None = field(
        default=None, metadata={"help": "Working-buffer budget of the fused loss (MiB); default by device."}
    )


def _refuse_unsupported(args: GatedGRPOConfig) -> None:
    problems = []
    if args.loss_type == "sapo":
        problems.append("loss_type='sapo' is gate='sigmoid' with loss_type='grpo' here (temperatures: gate_tau_pos, "
                        "gate_tau_neg)")
    elif args.loss_type not in SUPPORTED_LOSS_TYPES:
        problems.append(f"loss_type={args.loss_type!r} is not a gated objective; use one of "
                        f"{', '.join(SUPPORTED_LOSS_TYPES)}")
    if args.delta is not None:
        problems.append("delta (two-sided clipping) is not supported by the fused loss")
    if args.top_entropy_quantile < 1.0:
        problems.append("top_entropy_quantile < 1 needs the entropies before the loss; not supported")
    if args.off_policy_mask_threshold is not None:
        problems.append("off_policy_mask_threshold needs the log-probs before the loss; not supported")
    if args.use_adaptive_entropy:
        problems.append("use_adaptive_entropy is not supported; use a static entropy_coef")
    if args.gate_backend not in BACKENDS:
        problems.append(f"gate_backend={args.gate_backend!r}; choose one of {', '.join(BACKENDS)}")
    try:
        get_gate(args.gate)
    except (ValueError, TypeError) as error:
        problems.append(str(error))
    for name in ("gate_tau_pos", "gate_tau_neg"):
        if not getattr(args, name) > 0:
            problems.append(f"{name} must be > 0, got {getattr(args, name)}")
    if problems:
        raise ValueError("GatedGRPOTrainer cannot train this configuration:\n- " + "\n- ".join(problems))


def _logit_scale(model: nn.Module) -> float:
    """The factor some architectures apply to the logits (folded into the temperature); refuses soft-capping."""
    config = model.config.get_text_config()
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise ValueError(
            "GatedGRPOTrainer: the model soft-caps its logits (final_logit_softcapping), which the fused loss does "
            "not implement"
        )
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    if getattr(config, "logits_scaling", None) is not None:
        return 1.0 / float(config.logits_scaling)
    return 1.0


def add_gated_head(model: nn.Module) -> None:
    """Let ``model(..., fused_gates_head=fn)`` run the backbone and return ``fn(last_hidden_state, lm_head)``.

    Without the keyword the forward is the previous one, so generation and TRL's own passes are unchanged. Apply it
    to the model PEFT wraps (the base model): PEFT forwards unknown keywords to it.
    """
    if getattr(model, "_fused_gates_head", False):
        return
    previous_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_gates_head: Callable[[torch.Tensor, nn.Module], Any] | None = None, **kwargs):
        if fused_gates_head is None:
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        return fused_gates_head(hidden, self.get_output_embeddings())

    model.forward = types.MethodType(forward, model)
    model._fused_gates_head = True


class GatedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with the gated policy loss of :func:`fused_gates.gated_policy_loss`.

    Logs per step, next to TRL's metrics: ``eur``, ``entropy``, ``gate/mean``, ``ratio/mean|min|max``, ``kl`` when
    ``beta != 0`` and, for the clip gate, TRL's ``clip_ratio/low_mean|high_mean|region_mean``. Multi-process values
    are the mean of the per-process values (min / max for the ratio's extremes).
    """

    def __init__(self, model, reward_funcs, args: GatedGRPOConfig | None = None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GatedGRPOConfig(f"{name.split('/')[-1]}-GatedGRPO")
        if not isinstance(args, GatedGRPOConfig):
            raise TypeError(f"args must be a GatedGRPOConfig, got {type(args).__name__}")
        _refuse_unsupported(args)
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._gate_logit_scale = _logit_scale(base)
        add_gated_head(base)
        if self.ref_model is not None:
            if _logit_scale(self.ref_model) != self._gate_logit_scale:
                raise ValueError("GatedGRPOTrainer: the reference model scales its logits differently")
            add_gated_head(self.ref_model)

    # -- the fused head ------------------------------------------------------------------------------------------

    @property
    def _head_temperature(self) -> float:
        # z = logit_scale * (h W^T + b) / T
        return self.temperature / self._gate_logit_scale

    def _head_inputs(self, hidden: torch.Tensor, lm_head: nn.Module, logits_to_keep: int):
        """Completion positions' states (the one before each completion token) and the head, in one dtype."""
        hidden = hidden[:, -logits_to_keep - 1 : -1]
        weight, bias = lm_head.weight, lm_head.bias
        hidden = hidden.to(weight.device)
        if self.args.cast_lm_head_to_fp32:
            hidden = hidden.float()
        elif hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(weight.dtype)
        return hidden, weight, bias

    def _autocast_for_head(self):
        if self.args.cast_lm_head_to_fp32:
            return torch.autocast(self.accelerator.device.type, enabled=False)
        return self.accelerator.autocast()

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        if torch.is_grad_enabled() or compute_aux_loss or any(v is not None for v in extra.values()):
            # Training passes go through _compute_loss; MoE aux losses and multimodal inputs keep TRL's path.
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **extra,
            )
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, attn = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            completion_ids, completion_mask = ids[:, -logits_to_keep:], attn[:, -logits_to_keep:]

            def head(hidden, lm_head, completion_ids=completion_ids, completion_mask=completion_mask):
                hidden, weight, bias = self._head_inputs(hidden, lm_head, logits_to_keep)
                with self._autocast_for_head(), maybe_gather_lm_head_ctx(weight, bias):
                    logps, entropy = token_logprobs(hidden, weight, completion_ids, completion_mask,
                                                    temperature=self._head_temperature, bias=bias,
                                                    backend=self.args.gate_backend,
                                                    memory_budget_mb=self.args.gate_memory_budget_mb)
                return {"log_probs": logps, "entropy": entropy}

            with self.accelerator.autocast():
                out = model(input_ids=ids, attention_mask=attn, fused_gates_head=head)
            all_logps.append(out["log_probs"])
            all_entropies.append(out["entropy"])
        entropies = torch.cat(all_entropies) if compute_entropy else None
        return torch.cat(all_logps), entropies, None

    # -- the loss ------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if any(inputs.get(key) is not None for key in _MULTIMODAL_KEYS):
            raise NotImplementedError("GatedGRPOTrainer: multimodal inputs are not supported by the fused loss")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        advantages = inputs["advantages"]
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL multiplies the policy term (not the KL) by the sampler's importance ratio: the same as scaling A.
            ratio = inputs["importance_sampling_ratio"]
            advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages) * ratio
            advantages = advantages.expand_as(completion_ids).contiguous()
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        entropy_coef = float(self.entropy_coef) if self._entropy_bonus_enabled else 0.0
        num_items = None
        if self.loss_type == "dapo":
            # num_items_in_batch spans the generation batch: rescale it to one accumulation window, as TRL does
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * accumulation / self.args.steps_per_generation
            entropy_coef = entropy_coef / accumulation  # TRL scales only the bonus for accumulation here
        batch = completion_ids.size(0)
        group_size = self.num_generations if batch % self.num_generations == 0 else None
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None

        def head(hidden, lm_head):
            hidden, weight, bias = self._head_inputs(hidden, lm_head, logits_to_keep)
            with self._autocast_for_head(), maybe_gather_lm_head_ctx(weight, bias):
                out = gated_policy_loss(
                    hidden, weight, completion_ids, advantages, mask, old, ref,
                    gate=self.args.gate, tau_pos=self.args.gate_tau_pos, tau_neg=self.args.gate_tau_neg,
                    epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, loss_type=self.loss_type,
                    max_completion_length=self.max_completion_length, num_items_in_batch=num_items,
                    importance_sampling_level=self.importance_sampling_level, beta=self.beta,
                    use_bias_correction_kl=self.args.use_bias_correction_kl, temperature=self._head_temperature,
                    entropy_coef=entropy_coef, bias=bias, group_size=group_size, backend=self.args.gate_backend,
                    memory_budget_mb=self.args.gate_memory_budget_mb,
                )
            return {"loss": out.loss, "fused_gates": out}

        with self.accelerator.autocast():
            result = model(input_ids=input_ids, attention_mask=attention_mask, fused_gates_head=head)
        out: GatedPolicyLossOutput = result["fused_gates"]
        loss = result["loss"]
        if self.loss_type != "dapo":
            loss = loss / accumulation
        self._log_gate_metrics(mode, out, entropy_coef)
        return loss

    def _log_gate_metrics(self, mode: str, out: GatedPolicyLossOutput, entropy_coef: float) -> None:
        metrics = self._metrics[mode]
        gather = self.accelerator.gather
        for key, value in out.metrics.items():
            values = gather(value.detach().float().reshape(1))
            if key == "ratio/min":
                metrics[key].append(values.min().item())
            elif key == "ratio/max":
                metrics[key].append(values.max().item())
            else:
                metrics[key].append(values.mean().item())
        if entropy_coef and mode == "train" and self.accelerator.sync_gradients:
            metrics["entropy_coef"].append(self.entropy_coef)
