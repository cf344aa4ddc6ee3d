"""Atomic file writes, the one way mmllm writes a file that someone may be reading or may need after a crash.

The content goes into a temporary sibling (a dotfile ending in ``.tmp``), is fsynced, given the
permissions a plain ``open`` would give, and renamed over the target; the folder is fsynced so the
rename itself survives a power loss. A kill mid-write leaves the old file (or none), never a torn
one; a failed write leaves no temporary behind. Directories (checkpoints) use the same idea in
:func:`mmllm.training.checkpoint.atomic_dir`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it, process-wide


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then move it onto ``path``; returns ``path``.

    ``write`` must name the file format itself (the temporary's suffix is ``.tmp``). A target that
    exists and is not a regular file (``/dev/stdout``, a pipe) is written directly.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        write(path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; others may need to read it (a shared cache)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so that a rename or creation inside it survives a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
