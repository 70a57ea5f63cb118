"""Triton kernels of fused-gates (installed as ``fused_gates.kernels``)."""
