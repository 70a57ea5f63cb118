"""The output-folder rules of the application's commands (training, evaluation, toy study): an existing output is never
silently reused, ``--resume`` continues it, ``--overwrite`` starts over in it; plus the helpers those rules need (the
latest checkpoint, a content hash of saved weights, signals that end a run cleanly).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "FolderError",
    "SignalFlag",
    "check_overwritable",
    "clear_folder",
    "holds_output",
    "latest_checkpoint",
    "refuse_reuse",
    "stop_on_signals",
    "weights_sha256",
]

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class FolderError(ValueError):
    """An output that cannot be used as asked; the message names the flags that say what to do."""


def holds_output(path: str | Path) -> bool:
    """Whether ``path`` exists and is not an empty folder."""
    path = Path(path)
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def refuse_reuse(path: str | Path, what: str, *, resume: bool, overwrite: bool) -> None:
    """Raises :class:`FolderError` when ``path`` already holds an output and neither flag says what to do with it."""
    if resume and overwrite:
        raise FolderError("--resume and --overwrite exclude each other: continue the existing output, or start over")
    if holds_output(path) and not (resume or overwrite):
        raise FolderError(f"{path} already holds {what}; pass --resume to continue it or --overwrite to start over "
                          "(or choose another output)")


def clear_folder(path: str | Path, markers: Iterable[str]) -> None:
    """Deletes ``path`` (for ``--overwrite``), but only when it holds one of ``markers`` (names or glob patterns of
    what the command writes): a folder that is not one of its outputs is refused, never deleted."""
    path = Path(path)
    if not path.exists():
        return
    check_overwritable(path, markers)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_overwritable(path: str | Path, markers: Iterable[str]) -> None:
    """Raises :class:`FolderError` unless ``path`` is missing, a file, an empty folder or one holding one of
    ``markers``."""
    path, markers = Path(path), list(markers)
    ours = any(next(path.glob(marker), None) is not None for marker in markers) if path.is_dir() else True
    if holds_output(path) and not ours:
        raise FolderError(f"--overwrite: {path} does not look like this command's output (none of "
                          f"{', '.join(markers)}); it is left alone: choose another output")


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The ``checkpoint-<step>`` sub-folder with the highest step (transformers' ``resume_from_checkpoint=True``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(match[1]), child) for child in folder.iterdir()
             if child.is_dir() and (match := CHECKPOINT.match(child.name))]
    return max(found)[1] if found else None


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimiser step a checkpoint was saved at (its ``trainer_state.json``, else its name)."""
    import json

    state = Path(checkpoint) / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text())["global_step"])
    match = CHECKPOINT.match(Path(checkpoint).name)
    if match is None:
        raise FolderError(f"--resume: {checkpoint} is not a checkpoint folder (no trainer_state.json)")
    return int(match[1])


def weights_sha256(folder: str | Path) -> str | None:
    """SHA-256 over the weight files of a saved model (``*.safetensors``, ``*.bin``, by name), None without any."""
    files = sorted(path for pattern in ("*.safetensors", "*.bin") for path in Path(folder).glob(pattern))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class SignalFlag:
    """Set by SIGINT / SIGTERM while :func:`stop_on_signals` is active; a second signal ends the process at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


@contextmanager
def stop_on_signals(flag: SignalFlag, message: str = "") -> Iterator[SignalFlag]:
    """SIGINT and SIGTERM set ``flag`` (the command stops at its next safe point) instead of killing the process; a
    second one raises ``KeyboardInterrupt``. The previous handlers come back on exit. A no-op outside the main
    thread (signals can only be handled there)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handle(signum, frame):
        if flag:
            raise KeyboardInterrupt
        flag.signum = signum
        if message:
            print(f"\n{signal.Signals(signum).name}: {message} (send it again to stop at once)", flush=True)

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
