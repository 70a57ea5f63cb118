"""Which backend runs a call: ``torch`` (any device, any dtype) or ``triton`` (CUDA, or Triton's interpreter on CPU),
and ``auto``'s rule between them. The only module that imports the backends."""

from __future__ import annotations

import importlib.util

from .chunk_driver import Backend
from .environment import triton_interpreted
from .head import Head
from .objective import ObjectiveConfig

BACKENDS = ("auto", "torch", "triton")


def _triton_installed() -> bool:
    # Looked up, not imported: Triton decides at import whether its kernels run compiled or interpreted.
    return importlib.util.find_spec("triton") is not None


def backend_named(name: str) -> Backend:
    if name == "torch":
        from .torch_backend import BACKEND

        return BACKEND
    if name == "triton":
        from .kernels.triton_backend import BACKEND

        return BACKEND
    raise ValueError(f"backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def resolve_backend(requested: str, head: Head, config: ObjectiveConfig | None) -> Backend:
    """The backend for ``requested`` (``auto``: Triton on CUDA when installed and it supports the input, else torch).
    An explicitly requested backend that cannot run the input raises, naming why."""
    if requested not in BACKENDS:
        raise ValueError(f"backend: unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    device = head.weight.device
    if requested == "auto":
        if device.type == "cuda" and _triton_installed():
            triton_backend = backend_named("triton")
            if triton_backend.unsupported(head, config) is None:
                return triton_backend
        requested = "torch"
    if requested == "triton":
        if not _triton_installed():
            raise ValueError("backend: backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(f"backend: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    backend = backend_named(requested)
    reason = backend.unsupported(head, config)
    if reason is not None:
        raise ValueError(f"backend: backend={requested!r} cannot run this input: {reason}")
    return backend
