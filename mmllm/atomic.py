"""Atomic file writes, the one way mmllm writes a file that someone may be reading or may need after a crash.

The content goes into a temporary sibling (a dotfile ending in ``.tmp``, created as a plain ``open``
creates a file, so the kernel gives it the permissions that would: 0666 less the umask, or a folder's
default ACL), is fsynced and renamed over the target; the folder is fsynced so the
rename itself survives a power loss. A kill mid-write leaves the old file (or none), never a torn
one; a failed write leaves no temporary behind. Directories (checkpoints) use the same idea in
:func:`mmllm.training.checkpoint.atomic_dir`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], Any], sync_folder: bool = True) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then move it onto ``path``; returns ``path``.

    ``write`` must name the file format itself (the temporary's suffix is ``.tmp``). A target that
    exists and is not a regular file (``/dev/stdout``, a pipe) is written directly. ``sync_folder=False`` leaves
    the fsync of the folder (the rename's) to the caller, who writes many files there and fsyncs it once for them
    (``mmllm infer``'s media: one fsync a file rather than two).
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        write(path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_folder:
        fsync_dir(path.parent)
    return path


def _new_temporary(path: Path) -> Path:
    """A new empty sibling of ``path``, with the permissions a plain ``open`` gives a new file: mode 0666 given
    to the kernel, which takes the umask off (others may need to read it: a shared cache). ``mkstemp`` makes
    0600, and the umask can be read only by setting it, process-wide: a file another thread created meanwhile
    got the mode set for the read."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: 100 temporary names for {path.name} were taken; remove its "
                          f".{path.name}.*.tmp files")


def without_link(path: str | Path) -> Path:
    """``path``, after removing a symbolic link found there: for a file mmllm names itself (an answer's media, a
    gallery), which :func:`atomic_write` would otherwise write *through* where the link leads to something that is
    not a regular file (a device, a FIFO), as it does for a ``/dev/stdout`` the user gives."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
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
