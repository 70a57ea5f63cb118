"""Compatibility path of the training script, for existing command lines: ``python -m
fused_gates.integrations.train_grpo`` runs :mod:`fused_gates.integrations.app.train` (its documented name)."""

from __future__ import annotations

import sys

from .app.train import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
