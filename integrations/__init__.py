"""Integrations of fused-gates with training frameworks (installed as ``fused_gates.integrations``), in two rooms:

* :mod:`fused_gates.integrations.trl` -- the TRL library: ``GatedGRPOConfig`` / ``GatedGRPOTrainer``, their metrics,
  the fused head and the adaptive gate temperature;
* :mod:`fused_gates.integrations.app` -- the paper's application built on it: the training script and its settings,
  report, warm-up, rewards, data, tiny model, evaluator, toy study and the tensor-parallel example.

``accelerate/`` holds the accelerate configurations (DeepSpeed ZeRO-2/3, FSDP2) both rooms launch with.
"""
