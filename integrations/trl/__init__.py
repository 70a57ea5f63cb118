"""TRL drop-in: ``from fused_gates.integrations.trl import GatedGRPOConfig, GatedGRPOTrainer`` in place of TRL's
``GRPOConfig`` / ``GRPOTrainer`` (the trainer in :mod:`.trainer`, its configuration in :mod:`.config`, its metrics in
:mod:`.metrics`, the fused head in :mod:`.fused_head`, the adaptive gate temperature in :mod:`.adaptive_gate`).

The names are loaded on first use, so that importing a sub-module (the adaptive controller's checks, say) does not
import TRL's trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["GENERATED_AT_KEY", "GROUP_KEY", "GatedGRPOConfig", "GatedGRPOTrainer", "add_gated_head"]

_HOMES = {
    "GatedGRPOConfig": "config",
    "GatedGRPOTrainer": "trainer",
    "GROUP_KEY": "trainer",
    "GENERATED_AT_KEY": "trainer",
    "add_gated_head": "fused_head",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
