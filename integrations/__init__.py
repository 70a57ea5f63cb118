"""Integrations of fused-gates with training frameworks (installed as ``fused_gates.integrations``)."""
