"""The fused head a causal LM gets for training: the loss (or the log-probs) from the backbone's last hidden states
and the lm_head weight, inside the model's own forward, without materialising the logits.

:func:`add_gated_head` patches ``model.forward`` (before the model is wrapped for distribution, as TRL does with its
own fused head). The patched forward, given

- ``fused_gates_head=fn``, runs the backbone and returns ``{"head": fn(hidden, weight, bias), "aux_loss": ...}``:
  the training loss of :class:`~fused_gates.integrations.trl.GatedGRPOTrainer`;
- ``fused_lm_head=True`` with ``labels`` (TRL 1.16's ``add_fused_lm_head`` contract, which TRL's own
  ``_get_per_token_logps_and_entropies`` calls), returns a ``FusedCausalLMOutput`` whose per-token log-probs and
  entropies come from :func:`fused_gates.token_logprobs` (no gradient: the old- and reference-policy passes);
- neither, is the previous forward (generation is unchanged).

``fn`` runs as the forward of the lm_head module itself (:func:`call_through_head`), so every wrapper of the head
acts as for the model's own logits: an FSDP unit of the head unshards its weight and reduce-scatters its gradient,
ZeRO-3 gathers and re-partitions it, offload hooks move it. A weight still a ``DTensor`` inside that call (a
tensor-parallel head: every rank holds the same rows of data) is gathered with ``full_tensor()``.

Logit conventions, read from the text config exactly as TRL's fused head reads them: a scale ``s`` from
``logit_scale``, else ``output_multiplier``, else ``lm_head_multiplier``, else ``1 / logits_scaling``
(``logits_scaling`` itself for model type ``hyperclovax``, which multiplies), then ``final_logit_softcapping``
``c``, then the sampling temperature ``T``: ``z = c tanh(s x / c) / T`` with ``x = h W^T + b``. In the core's terms
that is ``logit_softcap = c / s`` and ``temperature = T / s`` (:func:`logit_transform`).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import transformers
from packaging.version import Version
from torch import Tensor, nn

from fused_gates import token_logprobs
from fused_gates.validation import check_number, is_number

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support has no DTensor either
    DTensor = ()

Result = TypeVar("Result")
HeadFunction = Callable[[Tensor, Tensor, "Tensor | None"], Any]
"""``(hidden [B, L, H], weight [V, H], bias [V] | None) -> anything``: what runs as the lm_head's forward."""

_PATCHED = "_fused_gates_head"
_ORIGINAL_FORWARD = "_fused_gates_original_forward"


@dataclass(frozen=True)
class LogitTransform:
    """``z = logit_softcap * tanh(x / logit_softcap) / temperature`` (no cap when ``logit_softcap`` is None), with
    ``x = h W^T + b``: the arguments :func:`fused_gates.gated_policy_loss` and :func:`fused_gates.token_logprobs`
    take for a model's logit scale, soft-cap and the sampling temperature."""

    temperature: float
    logit_softcap: float | None = None

    def options(self) -> dict[str, float]:
        """The keyword arguments of the loss and of :func:`fused_gates.token_logprobs` (no cap: none)."""
        if self.logit_softcap is None:
            return {"temperature": self.temperature}
        return {"temperature": self.temperature, "logit_softcap": self.logit_softcap}


def logit_scale(config: Any) -> float:
    """The factor the model multiplies its logits by before soft-capping (1 when it has none), read as TRL does."""
    text_config = config.get_text_config()
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text_config, name, None)
        if scale is not None:
            break
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        # Granite and MiniCPM3 divide the logits by logits_scaling; HyperCLOVA X multiplies them by it.
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return 1.0 if scale is None else float(scale)


def logit_transform(config: Any, temperature: float) -> LogitTransform:
    """The core's temperature and soft-cap for a model with this config, sampled at ``temperature``."""
    scale = logit_scale(config)
    model_type = config.get_text_config().model_type
    if not is_number(scale):
        raise ValueError(f"model type {model_type!r} scales its logits by {scale}; the fused head needs a finite "
                         "scale > 0")
    softcap = getattr(config.get_text_config(), "final_logit_softcapping", None)
    if softcap is not None:
        check_number(f"model type {model_type!r}: final_logit_softcapping", softcap)
    return LogitTransform(temperature=temperature / scale, logit_softcap=None if softcap is None else softcap / scale)


def _innermost(module: nn.Module) -> nn.Module:
    # FSDP1 wraps a unit in a FullyShardedDataParallel module; its parameters live on the wrapped module.
    while hasattr(module, "_fsdp_wrapped_module"):
        module = module._fsdp_wrapped_module
    return module


def call_through_head(lm_head: nn.Module, hidden: Tensor, fn: Callable[[Tensor, Tensor, Tensor | None], Result],
                      *, cast_to_fp32: bool = False) -> Result:
    """``fn(hidden, weight, bias)`` run as the forward of ``lm_head``, in the dtype and on the device of its weight
    (float32 with autocast off when ``cast_to_fp32``, TRL's ``cast_lm_head_to_fp32``)."""
    inner = _innermost(lm_head)

    def forward(states: Tensor) -> Result:
        weight, bias = inner.weight, inner.bias
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
        if isinstance(bias, DTensor):
            bias = bias.full_tensor()
        states = states.to(weight.device)
        if cast_to_fp32:
            with torch.autocast(states.device.type, enabled=False):
                return fn(states.float(), weight.float(), None if bias is None else bias.float())
        if states.dtype != weight.dtype and not torch.is_autocast_enabled(states.device.type):
            states = states.to(weight.dtype)
        return fn(states, weight, bias)

    previous = inner.__dict__.get("forward")  # an instance-level forward (TRL's fp32 cast) is put back afterwards
    inner.forward = forward
    try:
        return lm_head(hidden)
    finally:
        if previous is None:
            del inner.forward
        else:
            inner.forward = previous


def _router_aux_loss(model: nn.Module, backbone_outputs: Any, attention_mask: Tensor | None) -> Tensor:
    """The MoE load-balancing loss of the router logits, as the model's own forward (and TRL's head) computes it."""
    # Every MoE family in transformers uses Mixtral's load-balancing loss.
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text_config = model.config.get_text_config()
    if Version(transformers.__version__) < Version("5.0.0"):
        num_experts, top_k = model.num_experts, model.num_experts_per_tok
    else:
        num_experts, top_k = text_config.num_experts, text_config.num_experts_per_tok
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, top_k, attention_mask)


def add_gated_head(model: nn.Module, transform: LogitTransform, *, cast_lm_head_to_fp32: bool = False,
                   backend: str = "auto", memory_budget_mb: float | None = None, support: Any = None) -> None:
    """Patch ``model.forward`` with the fused head (see the module docstring). Apply it to the model PEFT wraps (the
    base model: PEFT forwards unknown keywords to it), before any distributed wrapper. ``support``: a
    :class:`~.sampler_support.SamplerSupport` whose options the no-grad passes take."""
    # patching again (a model reused by another trainer) replaces the previous patch and its settings
    previous_forward = getattr(model, _ORIGINAL_FORWARD, None) or model.forward
    setattr(model, _ORIGINAL_FORWARD, previous_forward)
    text_config = model.config.get_text_config()
    # Before transformers 5, vision-language models expose their language backbone as `model`.
    backbone_name = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_name = "model"

    @functools.wraps(type(model).forward)  # keeps the signature that `generate` validates its kwargs against
    def forward(self, *args, fused_gates_head: HeadFunction | None = None, fused_lm_head: bool = False,
                labels: Tensor | None = None, shift_labels: Tensor | None = None,
                num_items_in_batch: Any = None, **kwargs):
        if fused_gates_head is None and not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = getattr(self, backbone_name)(*args, **kwargs)
        hidden = backbone_outputs.last_hidden_state
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_aux_loss(self, backbone_outputs, kwargs.get("attention_mask"))
        lm_head = self.get_output_embeddings()
        if fused_gates_head is not None:
            result = call_through_head(lm_head, hidden, fused_gates_head, cast_to_fp32=cast_lm_head_to_fp32)
            return {"head": result, "aux_loss": aux_loss}
        return _trl_fused_output(self, lm_head, hidden, labels, shift_labels, num_items_in_batch, aux_loss)

    def _trl_fused_output(self, lm_head, hidden, labels, shift_labels, num_items_in_batch, aux_loss):
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise RuntimeError("fused_lm_head=True on a model with the fused-gates head computes log-probs without "
                               "gradient; the training loss runs through fused_gates_head")
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels)")
        if shift_labels is None:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        targets = targets.to(hidden.device)
        mask = targets != -100

        def logprobs(states, weight, bias):
            extra = {} if support is None else support.logprob_options()
            result = token_logprobs(states, weight, targets.clamp(min=0), mask, bias=bias, backend=backend,
                                    memory_budget_mb=memory_budget_mb, **transform.options(), **extra)
            return result if support is None else support.receive(result)

        log_probs, entropy = call_through_head(lm_head, hidden, logprobs, cast_to_fp32=cast_lm_head_to_fp32)
        from trl.trainer.utils import FusedCausalLMOutput

        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        if aux_loss is not None:
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask,
                                   aux_loss=aux_loss)

    model.forward = types.MethodType(forward, model)
    setattr(model, _PATCHED, True)


def is_patched(model: nn.Module) -> bool:
    return bool(getattr(model, _PATCHED, False))
