"""TRL drop-in: :class:`GatedGRPOTrainer`, a ``trl.GRPOTrainer`` whose policy loss is :func:`gated_policy_loss`.

Swap ``GRPOConfig`` for :class:`GatedGRPOConfig` and ``GRPOTrainer`` for :class:`GatedGRPOTrainer`: without ``gate``
the training is TRL 1.16's for every ``loss_type`` and option (the mapping is in :mod:`.config`), with the loss
computed from the last hidden states and the lm_head without materialising the completion logits.

How it runs. TRL installs its fused LM head on the policy (PEFT's base model) and the reference model while it builds
them, before any distributed wrapping; this trainer installs :func:`.fused_head.add_gated_head` in its place, so
TRL's own no-grad passes (old and reference log-probs, with its batching and multimodal slicing) get their log-probs
from :func:`token_logprobs`, and the training loss runs inside the model's forward
(``model(..., fused_gates_head=fn)``) as the lm_head's own call. Per micro-batch:

- ``top_entropy_quantile < 1``: one no-grad :func:`token_logprobs` pass on the same hidden states gives the
  entropies, TRL's ``get_high_entropy_mask`` the mask, then the loss with ``entropy_mask`` (one more product
  ``hidden @ W^T`` per micro-batch, no second backbone forward);
- the entropy bonus, ``use_adaptive_entropy`` (window statistics, controller state and checkpoint file as TRL's),
  the vLLM importance-sampling ratio, ``off_policy_mask_threshold``, the KL term and the MoE router loss (added,
  divided for gradient accumulation and logged as ``aux_loss``) are applied as TRL 1.16 applies them;
- the metrics are TRL's, by TRL's cross-process rules, plus the gate's (:mod:`.metrics`).

Off-policy micro-batches. A micro-batch is off-policy when at least one optimiser step has been taken since its
generation batch was sampled (the second and later of ``num_iterations``, or a later optimiser step of a generation
batch that spans several): its ratios ``pi_theta / pi_old`` can differ from 1. The first pass over a batch is
on-policy even with the vLLM importance-sampling correction: that correction multiplies the policy term by
``pi_old / pi_sampler`` but the gate sees ``pi_theta / pi_old = 1``, whose f'(1) = 1 says nothing about the gate.
``eur/off_policy`` and ``eur/on_policy`` are logged accordingly, and :meth:`GatedGRPOTrainer.pop_off_policy_eur`
returns the off-policy EUR for the adaptive gate temperature (``gate_eur_target``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from trl import GRPOTrainer

from fused_gates import GatedPolicyLossOutput, gated_policy_loss, token_logprobs
from fused_gates.validation import check_number

from .config import GatedGRPOConfig, GateObjective, resolve_objective
from .fused_head import LogitTransform, add_gated_head, is_patched, logit_transform
from .metrics import LossMetrics, MetricSettings
from .sampler_support import KEPT_IDS_KEY, SamplerSupport, ratio_summary, sampler_truncation

__all__ = ["GatedGRPOConfig", "GatedGRPOTrainer", "add_gated_head"]

GROUP_KEY = "fused_gates_group"
"""Input key of each row's prompt group (global row index // group size), attached when the batch is scored so that
it survives TRL's shuffle and split of the generation batch."""
GENERATED_AT_KEY = "fused_gates_generated_at_step"
OLD_ENTROPY_KEY = "fused_gates_old_entropy"
"""The old policy's per-token entropy from TRL's old-policy pass (the entropy-scaled trust region's H)."""
"""Input key of the optimiser step at which the batch was generated (0-dim): tells off-policy micro-batches."""

MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")
"""The batch's model inputs besides the token ids: TRL passes all of them for a micro-batch scored in one chunk
(``num_images`` / ``num_tiles`` only slice chunks)."""


class GatedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with the policy loss of :func:`fused_gates.gated_policy_loss` (see the module docstring).

    Logs per step, besides TRL's metrics: ``eur`` (over prompt groups), ``eur/on_policy`` / ``eur/off_policy``,
    ``gate/mean``, ``ratio/mean|min|max`` and ``nonfinite_tokens``; with ``logprob_support="sampler"``
    (:mod:`.sampler_support`) also ``sampler/kept_mass/mean|min`` and the vLLM importance-sampling ratio over the whole
    vocabulary and over the support, ``sampler/is_ratio_full|support/mean|outside_0.9_1.1``.
    """

    def __init__(self, model, reward_funcs=None, args: GatedGRPOConfig | None = None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GatedGRPOConfig(f"{name.split('/')[-1]}-GatedGRPO")
        if not isinstance(args, GatedGRPOConfig):
            raise TypeError(f"args must be a GatedGRPOConfig, got {type(args).__name__}")
        # refusals before anything is loaded
        self._objective: GateObjective = resolve_objective(args)
        if args.gate_eur_target is not None:
            from .adaptive_gate import check_can_adapt

            # off-policy updates: later iterations over a batch, or a generation batch spanning optimiser steps
            check_can_adapt(self._objective.gate, has_off_policy_updates=args.num_iterations > 1
                            or args.steps_per_generation > args.gradient_accumulation_steps)
            if args.restore_callback_states_from_checkpoint:
                raise ValueError("gate_eur_target: restore_callback_states_from_checkpoint=True would rebuild the "
                                 "adaptive-temperature callback without its trainer; leave it False (the callback "
                                 "restores its own state on resume)")
        self._gate_temperatures = (self._objective.tau_pos, self._objective.tau_neg)
        self._off_policy_eur_parts: torch.Tensor | None = None
        self._sampler_support = None
        if args.logprob_support == "sampler":
            self._sampler_support = SamplerSupport(sampler_truncation(args), args.sampler_kept_bound)
        self._expect_old_pass = False
        self._reads_old_entropy = args.gate_estr_threshold is not None
        self._old_entropy: torch.Tensor | None = None
        with self._gated_heads_installed(args, self._sampler_support):
            super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if not is_patched(policy):
            raise RuntimeError("GatedGRPOTrainer: TRL did not install its fused LM head through add_fused_lm_head; "
                               "this trainer supports TRL 1.16")
        self._logit_transform: LogitTransform = logit_transform(policy.config, self.temperature)
        self._loss_metrics = LossMetrics(self.accelerator, MetricSettings(
            objective=self._objective, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            delta=args.delta, sequence_level=self.importance_sampling_level == "sequence", beta=self.beta,
        ))
        if args.gate_eur_target is not None:
            from .adaptive_gate import AdaptiveGateCallback

            self.add_callback(AdaptiveGateCallback(self))
        self._truncation_warned = False
        self._warn_truncation_bias()

    def _warn_truncation_bias(self) -> None:
        """Once: vLLM's correction with truncated sampling and log-probs over the whole vocabulary (TRL's bias)."""
        args = self.args
        if self._truncation_warned or args.logprob_support != "full" or not sampler_truncation(args):
            return
        if self.use_vllm and self.vllm_importance_sampling_correction:
            self._truncation_warned = True
            warnings.warn(
                f"vLLM's importance-sampling correction is on with truncated sampling ({sampler_truncation(args)}) "
                "and logprob_support='full': the sampler's log-probs are over the tokens it kept, the trainer's over "
                "the whole vocabulary, so the correction's ratio carries the kept mass S < 1 at every token (TRL's "
                "bias); logprob_support='sampler' renormalises over the sampler's support", stacklevel=3)

    @staticmethod
    @contextmanager
    def _gated_heads_installed(args: GatedGRPOConfig, support: SamplerSupport | None = None) -> Iterator[None]:
        """While TRL builds the models, its ``add_fused_lm_head`` installs the fused-gates head instead (on the policy
        or PEFT's base model and on the reference model, before they are wrapped)."""
        module = sys.modules[GRPOTrainer.__module__]
        trl_head = module.add_fused_lm_head

        def install(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False, outputs=None) -> None:
            add_gated_head(model, logit_transform(model.config, temperature),
                           cast_lm_head_to_fp32=cast_lm_head_to_fp32, backend=args.gate_backend,
                           memory_budget_mb=args.gate_memory_budget_mb, support=support)

        module.add_fused_lm_head = install
        try:
            yield
        finally:
            module.add_fused_lm_head = trl_head

    # -- the adaptive gate temperature's interface -------------------------------------------------------------------

    def set_gate_temperatures(self, tau_pos: float, tau_neg: float) -> None:
        """The gate temperatures of every later loss call."""
        if not self._objective.tempered:
            raise ValueError(f"gate {self._objective.gate!r} has no temperature")
        self._gate_temperatures = (check_number("tau_pos", tau_pos), check_number("tau_neg", tau_neg))

    @property
    def gate_temperatures(self) -> tuple[float | None, float | None]:
        return self._gate_temperatures

    def pop_off_policy_eur(self) -> float | None:
        """Token-weighted mean EUR over every process's off-policy micro-batches since the last call (None when there
        were none). A collective: every process calls it at the same point."""
        parts = self._off_policy_eur_parts
        if parts is None:
            parts = torch.zeros(2, device=self.accelerator.device)
        self._off_policy_eur_parts = None
        total, tokens = self.accelerator.reduce(parts.clone(), reduction="sum").tolist()
        return total / tokens if tokens > 0 else None

    # -- generation: remember each row's prompt group and when the batch was sampled ---------------------------------

    def _generate_and_score_completions(self, inputs):
        self._warn_truncation_bias()  # use_vllm may have been set after construction
        support = self._sampler_support
        if support is not None or self._reads_old_entropy:
            # TRL's first log-prob pass of the batch is the old policy's when it runs one (the same condition as TRL)
            generate_every = self.args.steps_per_generation * self.num_iterations
            self._expect_old_pass = bool(self.args.gradient_accumulation_steps % generate_every != 0 or (
                self.use_vllm and self.vllm_importance_sampling_correction))
        self._old_entropy = None
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        self._expect_old_pass = False
        if self._old_entropy is not None:
            output[OLD_ENTROPY_KEY], self._old_entropy = self._old_entropy, None
        if support is not None:
            replayed = support.finish_old_pass(output["completion_ids"].size(1))
            if replayed is not None:
                output[KEPT_IDS_KEY] = replayed[0]
                self._record_sampler_ratios(mode, output, replayed[1])
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        rows = output["completion_ids"].size(0)
        first = self.accelerator.process_index * rows  # TRL's slice of the gathered, prompt-grouped rows
        index = torch.arange(first, first + rows, device=output["completion_ids"].device)
        output[GROUP_KEY] = torch.div(index, group_size, rounding_mode="floor")
        output[GENERATED_AT_KEY] = torch.tensor(self.state.global_step)
        return output

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if not self._expect_old_pass:
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        self._expect_old_pass = False  # the reference pass that may follow is not the old policy's
        if self._reads_old_entropy:  # the entropy-scaled trust region's H: the old policy's, from this same pass
            asked = kwargs.get("compute_entropy", False)
            logps, entropies, *rest = self._old_pass(model, args, {**kwargs, "compute_entropy": True})
            self._old_entropy = entropies.detach()
            return (logps, entropies if asked else None, *rest)
        return self._old_pass(model, args, kwargs)

    def _old_pass(self, model, args, kwargs):
        support = self._sampler_support
        if support is None:
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        support.start_old_pass()
        try:
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        except ValueError as error:
            if str(error).startswith("return_kept_ids:"):
                raise ValueError(f"sampler_kept_bound: {error} (the bound is GatedGRPOConfig's sampler_kept_bound, "
                                 f"{support.bound})") from error
            raise
        finally:
            support.replaying = False

    def _record_sampler_ratios(self, mode: str, output: dict[str, Any], kept_mass: torch.Tensor) -> None:
        """The vLLM importance-sampling ratio ``pi_old / pi_sampler`` over the whole vocabulary (what TRL would use)
        and over the support (what is used): mean and fraction outside [0.9, 1.1], over every process's tokens."""
        sampling, old = output.get("sampling_per_token_logps"), output.get("old_per_token_logps")
        if sampling is None or old is None:
            return
        mask = output["completion_mask"]
        if output.get("tool_mask") is not None:
            mask = mask * output["tool_mask"]
        mask = mask * torch.isfinite(sampling)
        log_ratio = torch.nan_to_num(old - sampling, nan=0.0)
        full = ratio_summary(log_ratio + torch.log(kept_mass.clamp(min=1e-30)), mask)
        used = ratio_summary(log_ratio, mask)
        totals = self.accelerator.reduce(torch.stack([*full, *used, mask.float().sum()]), reduction="sum").tolist()
        count = max(totals[4], 1.0)
        metrics = self._metrics[mode]
        for name, (ratio_sum, outside) in (("full", totals[0:2]), ("support", totals[2:4])):
            metrics[f"sampler/is_ratio_{name}/mean"].append(ratio_sum / count)
            metrics[f"sampler/is_ratio_{name}/outside_0.9_1.1"].append(outside / count)

    # -- the loss ----------------------------------------------------------------------------------------------------

    def _applied_entropy_coef(self) -> float:
        """TRL's coefficient for this accumulation window (adaptive: fixed at the end of the previous step)."""
        if not self._entropy_bonus_enabled:
            return 0.0
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            return 0.0
        return float(self.entropy_coef)

    def _loss_options(self, mode: str, inputs: dict[str, Any], accumulation: int) -> dict[str, Any]:
        objective, args = self._objective, self.args
        entropy_coef = self._applied_entropy_coef()
        num_items = None
        if not objective.divided_by_accumulation:
            # num_items_in_batch spans the generation batch: TRL rescales it to one accumulation window, and divides
            # only the entropy bonus by the accumulation steps
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * accumulation / args.steps_per_generation
            entropy_coef = entropy_coef / accumulation
        options: dict[str, Any] = dict(
            gate=objective.gate, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            loss_type=objective.aggregation, max_completion_length=self.max_completion_length,
            num_items_in_batch=num_items, importance_sampling_level=self.importance_sampling_level, beta=self.beta,
            use_bias_correction_kl=args.use_bias_correction_kl, entropy_coef=entropy_coef,
            off_policy_mask_threshold=self.off_policy_mask_threshold, on_nonfinite=args.gate_on_nonfinite,
            backend=args.gate_backend, memory_budget_mb=args.gate_memory_budget_mb, **self._logit_transform.options(),
        )
        if objective.tempered:
            options["tau_pos"], options["tau_neg"] = self._gate_temperatures
        if args.delta is not None:  # the configuration refuses it for a gate other than clip
            options["delta"] = args.delta
        options.update(objective.input_options)  # the options of the gate's trust region
        if self._reads_old_entropy:  # None (no old-policy pass): the current policy's entropy stands in
            options["old_entropy"] = inputs.get(OLD_ENTROPY_KEY)
        if objective.gate == "vespo":
            options["vespo_k"] = (args.vespo_k_pos, args.vespo_k_neg)
            options["vespo_lambda"] = (args.vespo_lambda_pos, args.vespo_lambda_neg)
        if self.off_policy_mask_threshold is not None:
            options["sampling_logprobs"] = inputs.get("sampling_per_token_logps")
        if self.use_vllm and self.vllm_importance_sampling_correction:
            ratio = inputs["importance_sampling_ratio"]
            if ratio.size(1) == 1 and objective.gate != "vespo":  # sequence modes: one ratio per sequence
                ratio = ratio.expand_as(inputs["completion_ids"])
            options["sampling_ratio"] = ratio
        if GROUP_KEY in inputs:
            options["group_ids"] = inputs[GROUP_KEY]
        if self._sampler_support is not None:
            options.update(self._sampler_support.loss_options(inputs))
        return options

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        options = self._loss_options(mode, inputs, accumulation)
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        transform, args = self._logit_transform, self.args
        model_inputs = {key: inputs[key] for key in MULTIMODAL_KEYS if inputs.get(key) is not None}
        if self.aux_loss_enabled:
            model_inputs["output_router_logits"] = True

        def head(hidden, weight, bias):
            hidden = hidden[:, -logits_to_keep - 1 : -1]
            entropy_mask = None
            if self.top_entropy_quantile < 1.0:
                # the entropies of this forward's hidden states, then TRL's quantile mask (gathered across processes)
                support = {} if self._sampler_support is None else self._sampler_support.loss_options(inputs)
                _, entropies = token_logprobs(hidden.detach(), weight.detach(), completion_ids, mask,
                                              bias=None if bias is None else bias.detach(), backend=args.gate_backend,
                                              memory_budget_mb=args.gate_memory_budget_mb, **transform.options(),
                                              **support)
                entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            out = gated_policy_loss(hidden, weight, completion_ids, advantages, mask, old, ref, bias=bias,
                                    entropy_mask=entropy_mask, **options)
            return {"loss": out.loss, "output": out, "entropy_mask": entropy_mask}

        with self.accelerator.autocast():
            result = model(input_ids=input_ids, attention_mask=attention_mask, fused_gates_head=head, **model_inputs)
        out: GatedPolicyLossOutput = result["head"]["output"]
        loss = result["head"]["loss"]
        if self._objective.divided_by_accumulation:
            loss = loss / accumulation
        if self.aux_loss_enabled:
            aux_loss = result["aux_loss"]
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach())
                                                   .mean().item())
        if self._entropy_bonus_enabled:
            self._record_entropy_bonus(mode, out, mask, result["head"]["entropy_mask"])
        self._record_metrics(mode, inputs, out, mask, advantages, old)
        if out.kept_mass is not None:
            self._record_kept_mass(mode, out.kept_mass, mask)
        return loss

    def _record_kept_mass(self, mode: str, kept_mass: torch.Tensor, mask: torch.Tensor) -> None:
        """``sampler/kept_mass/mean`` (token-weighted over every process) and ``/min``."""
        weights = mask.float()
        parts = torch.stack([(kept_mass.float() * weights).sum(), weights.sum()]).detach()
        total, count = self.accelerator.reduce(parts, reduction="sum").tolist()
        low = torch.where(weights > 0, kept_mass.float(), torch.ones_like(weights)).amin().detach()
        low = self.accelerator.gather(low.reshape(1)).amin().item()
        self._metrics[mode]["sampler/kept_mass/mean"].append(total / max(count, 1.0))
        self._metrics[mode]["sampler/kept_mass/min"].append(low)

    def _record_entropy_bonus(self, mode: str, out: GatedPolicyLossOutput, mask, entropy_mask) -> None:
        """TRL's policy_loss metric, adaptive entropy controller and entropy_coef metric."""
        policy_loss = out.metrics["policy_loss"].detach().float()
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            # the window's entropy sum and token count over the tokens the bonus acts on, reduced at the step's end
            effective = (mask if entropy_mask is None else mask * entropy_mask).float()
            stats = torch.stack([(out.entropy.float() * effective).sum(), effective.sum()]).detach()
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:
                totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                step = self.args.entropy_coef_delta
                if world_entropy <= self.args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + step, self.args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - step, self.args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _record_metrics(self, mode: str, inputs, out: GatedPolicyLossOutput, mask, advantages, old) -> None:
        phi_seq = None
        if self._objective.gate == "vespo":
            # TRL's own gamma weights of the log-probs this pass computed
            logprobs = out.logprobs
            log_ratio = logprobs - (logprobs if old is None else old)
            args = self.args
            phi_seq = GRPOTrainer.get_gamma_weights(
                advantages=advantages.unsqueeze(1) if advantages.dim() == 1 else advantages,
                log_ratio_per_token=log_ratio, mask=mask,
                importance_sampling_ratio=inputs.get("importance_sampling_ratio"), k_pos=args.vespo_k_pos,
                lambda_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg, lambda_neg=args.vespo_lambda_neg,
            )
        generated_at = inputs.get(GENERATED_AT_KEY)
        off_policy = mode == "train" and generated_at is not None and self.state.global_step > int(generated_at)
        parts = self._loss_metrics.record(self._metrics[mode], out, mask, advantages, group_ids=inputs.get(GROUP_KEY),
                                          off_policy=off_policy, phi_seq=phi_seq)
        if off_policy:
            previous = self._off_policy_eur_parts
            self._off_policy_eur_parts = parts if previous is None else previous + parts
