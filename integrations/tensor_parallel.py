"""Compatibility path of the tensor-parallel example, for existing launch lines: ``torchrun ... -m
fused_gates.integrations.tensor_parallel`` runs :mod:`fused_gates.integrations.app.tensor_parallel`."""

from __future__ import annotations

import runpy

if __name__ == "__main__":
    runpy.run_module("fused_gates.integrations.app.tensor_parallel", run_name="__main__", alter_sys=True)
