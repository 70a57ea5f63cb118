"""What the process environment says about running the kernels: read in one place."""

from __future__ import annotations

import os


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, read by Triton when it is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
