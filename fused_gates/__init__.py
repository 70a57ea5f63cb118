"""fused-gates: the gated policy-gradient loss of LLM RL (GRPO, SAPO and the soft gates of "A Systematic Study of
Gate Functions in SAPO") from last hidden states and the lm_head, without materialising the logits."""

from .admissibility import GateAdmissibilityError, check_admissible
from .api import GatedPolicyLossOutput, gated_policy_loss, token_logprobs
from .backends import BACKENDS
from .gates import (
    INPUT_GATES,
    PAPER_GATES,
    POLICY_OBJECTIVES,
    SOFT_GATES,
    Gate,
    GateInputs,
    GateParameters,
    available_gates,
    get_gate,
    register_gate,
    register_input_gate,
    unregister_gate,
)
from .objective import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES
from .options import NONFINITE_POLICIES, HeadOptions, LossOptions, SupportOptions
from .sequence_parallel import high_entropy_mask

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "IMPORTANCE_SAMPLING_LEVELS",
    "INPUT_GATES",
    "LOSS_TYPES",
    "NONFINITE_POLICIES",
    "PAPER_GATES",
    "POLICY_OBJECTIVES",
    "SOFT_GATES",
    "Gate",
    "GateAdmissibilityError",
    "GateInputs",
    "GateParameters",
    "GatedPolicyLossOutput",
    "HeadOptions",
    "LossOptions",
    "SupportOptions",
    "available_gates",
    "check_admissible",
    "gated_policy_loss",
    "get_gate",
    "high_entropy_mask",
    "register_gate",
    "register_input_gate",
    "token_logprobs",
    "unregister_gate",
]
