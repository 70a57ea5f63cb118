"""What the process environment says about running the kernels: read in one place."""

from __future__ import annotations

import os


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, read by Triton when it is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def self_check_enabled() -> bool:
    """Whether the Triton backend checks itself against the torch backend on first use (:mod:`fused_gates.self_check`):
    ``FUSED_GATES_SELF_CHECK=0`` turns it off, ``1`` on; unset, it is on for compiled kernels and off in Triton's
    interpreter (which compiles nothing that could go wrong, and runs only tests). Read at each use."""
    value = os.environ.get("FUSED_GATES_SELF_CHECK", "").strip()
    if not value:
        return not triton_interpreted()
    return value != "0"
