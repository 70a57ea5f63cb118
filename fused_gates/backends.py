"""Which backend runs a call: ``torch`` (any device, any dtype) or ``triton`` (CUDA, or Triton's interpreter on CPU),
and ``auto``'s rule between them. The only module that imports the backends."""

from __future__ import annotations

import importlib.util

from . import self_check
from .chunk_driver import Backend
from .environment import triton_interpreted
from .head import Head
from .objective import ObjectiveConfig

BACKENDS = ("auto", "torch", "triton")


def _triton_installed() -> bool:
    # Looked up, not imported: Triton decides at import whether its kernels run compiled or interpreted.
    return importlib.util.find_spec("triton") is not None


def _auto_tries_triton(device) -> bool:
    """``auto`` considers Triton on CUDA only (the interpreter is for tests, not for speed)."""
    return device.type == "cuda"


def backend_named(name: str) -> Backend:
    if name == "torch":
        from .torch_backend import BACKEND

        return BACKEND
    if name == "triton":
        from .kernels.triton_backend import BACKEND

        return BACKEND
    raise ValueError(f"backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def resolve_backend(requested: str, head: Head, config: ObjectiveConfig | None) -> Backend:
    """The backend for ``requested`` (``auto``: Triton on CUDA when installed, it supports the input and it passed its
    first-use self-check for this kind of call (:mod:`fused_gates.self_check`), else torch). An explicitly requested
    backend that cannot run the input, or a Triton backend that failed its self-check, raises, naming why."""
    if requested not in BACKENDS:
        raise ValueError(f"backend: unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    device = head.weight.device
    if requested == "auto":
        if _auto_tries_triton(device) and _triton_installed():
            triton_backend = backend_named("triton")
            if triton_backend.unsupported(head, config) is None and self_check.triton_usable(head, config):
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
    if requested == "triton":
        failed = self_check.failure(head, config)
        if failed is not None:
            raise ValueError(f"backend: backend='triton' failed its first-use self-check against the torch backend in "
                             f"this process ({failed}); use backend='torch' or 'auto', or set "
                             "FUSED_GATES_SELF_CHECK=0 to skip the check")
    return backend
