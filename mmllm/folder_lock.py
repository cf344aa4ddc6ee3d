"""One mmllm process at a time writing a folder: an advisory lock the kernel frees when its holder exits.

Two runs launched into the same folder by mistake (two terminals, a scheduler's retry while the first job
still runs, a ``--resume`` started beside the live run) would otherwise both write there: training runs
replace each other's ``step-N`` checkpoints and ``final.json`` (a ``--resume`` also deletes the live run's
half-written checkpoint as a killed run's leftover), and two ``mmllm infer`` runs answer every request
twice into one ``results.jsonl``, with media of one run under records of the other. :func:`hold_folder`
takes ``fcntl.flock`` on ``<folder>/.mmllm.lock`` without waiting and refuses with :class:`FolderInUse`,
naming the holder's pid, host and command, when another process has it. A folder written elsewhere and
renamed into place whole (``mmllm export``'s and ``mmllm refine``'s output) is locked by :func:`hold_beside`
instead, with ``.<name>.mmllm.lock`` beside it: two such runs would otherwise replace each other's output, the
one replaced still saying "wrote".

``flock`` belongs to the open file, so the lock goes with the process: a holder killed with SIGKILL leaves
the file but not the lock, and the next run takes it (no stale-lock cleanup). A holder that finishes
deletes the file, so a finished run's folder holds what it did before locks existed. The file is never in
a ``step-N`` checkpoint (whose manifest lists every file): it sits beside them, and the names mmllm reads
from an ``output_dir`` (``step-N``, ``.step-N.tmp-*``, ``final.json``, ``best.json``, ``logs/``) do not
match it. On a file system that cannot lock (``flock`` fails with ENOLCK, ENOSYS or EOPNOTSUPP) the run goes
on unlocked, with a warning. Taken again by the process that holds it (``mmllm infer`` locks its ``--output`` and then
:func:`mmllm.inference.runner.run_requests` does; ``mmllm eval`` and ``run_eval`` alike), it is held until the
outermost hold ends: counted, not locked twice. A refused or failed :func:`hold_beside` removes the parent folders
it made for its lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mmllm.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".mmllm.lock"


class FolderInUse(ConfigError):
    """Another process holds the folder's lock; the message names it and how to go on."""


@dataclass
class _Held:
    handle: IO[str] | None  # None where the folder's file system cannot lock
    depth: int = 1


_held: dict[Path, _Held] = {}  # this process's locks, by the lock file's resolved path


def lock_path(folder: str | Path) -> Path:
    return Path(folder) / LOCK_NAME


def beside_lock_path(folder: str | Path) -> Path:
    """The lock of a folder that is replaced whole (renamed into place): a dotfile beside it, ``.<name>.mmllm.lock``."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}{LOCK_NAME}")


def holder(folder: str | Path) -> dict[str, Any] | None:
    """What the holder of ``folder``'s lock recorded (pid, host, command, since), or None if unreadable."""
    return _recorded(lock_path(folder))


def _recorded(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def describe_holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "a process that has not yet recorded itself"
    where = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
    since = f", since {info['since']}" if info.get("since") else ""
    command = f": `{info['command']}`" if info.get("command") else ""
    return f"{where}{since}{command}"


def hold_folder(folder: str | Path, what: str, elsewhere: str) -> contextlib.AbstractContextManager[None]:
    """Hold ``folder``'s lock (creating the folder) while the block runs; :class:`FolderInUse` at once if
    another process holds it. ``what`` names this run for the message ("training", "mmllm infer"),
    ``elsewhere`` how to run it beside the other ("give another output_dir"). A run failing in the block leaves
    none of the folders it made that are still empty (``mmllm eval --output new/folder`` of a broken checkpoint
    left ``new/folder``)."""
    folder = Path(folder)
    return _made_and_held(folder, lock_path(folder), folder, what, elsewhere)


def hold_beside(folder: str | Path, what: str, elsewhere: str) -> contextlib.AbstractContextManager[None]:
    """As :func:`hold_folder`, for a folder written elsewhere and renamed into place whole (an export, a refined
    checkpoint), which a lock inside would not survive: the lock is :func:`beside_lock_path` (its parent made). A
    run refused or failing in the block leaves none of the parent folders it made (they hold nothing of it)."""
    folder = Path(folder)
    return _made_and_held(folder.parent, beside_lock_path(folder), folder, what, elsewhere)


@contextlib.contextmanager
def _made_and_held(make: Path, lock: Path, folder: Path, what: str, elsewhere: str) -> Iterator[None]:
    """``make`` made (with its missing parents), then ``folder``'s ``lock`` held while the block runs; refused or
    failing there, the folders it made that are still empty go again (after the lock file: what the run wrote
    keeps its folders)."""
    made = _make(make, what)
    try:
        with _hold(lock, folder, what, elsewhere):
            yield
    except BaseException:
        remove_empty(made)
        raise


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first: what writing there creates."""
    missing = []
    for path in (folder.absolute(), *folder.absolute().parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (innermost first) while it is empty, stopping at the first that is not (or is
    gone): what a run that wrote nothing made. ``rmdir`` refuses a folder holding anything, whoever put it there."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
        log.debug("removed the empty folder %s this run made", folder)


def _make(folder: Path, what: str) -> list[Path]:
    """Make ``folder`` and its missing parents; the folders it made, innermost first."""
    missing = missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"{what}: cannot create the folder {folder} ({exc.strerror or exc}); fix its "
                      "permissions or free space, or give another one") from exc
    return missing


@contextlib.contextmanager
def _hold(lock: Path, folder: Path, what: str, elsewhere: str) -> Iterator[None]:
    """Hold the lock file ``lock`` (of ``folder``) while the block runs."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one writer per folder assumed, as for the feature cache's lock
        yield
        return
    path = lock.parent.resolve() / lock.name  # never the target of a link planted there: released, it is deleted
    if (held := _held.get(path)) is not None:
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
        return
    # None: the file system has no locks, and the run goes on unlocked (as before locks existed), warned once
    handle = _acquire(fcntl, path, folder, what, elsewhere)
    _held[path] = _Held(handle)
    try:
        yield
    finally:
        del _held[path]
        if handle is not None:
            _release(fcntl, path, handle)


# flock's errors on a file system without locks (Lustre mounted without -o flock, some FUSE and network
# file systems): not another holder, and no reason to refuse a run that worked there before locks existed
NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


_warned_unlockable: set[Path] = set()  # lock files whose file system could not lock, warned about once


@contextlib.contextmanager
def waiting_lock(path: Path, unlocked: str) -> Iterator[None]:
    """An exclusive ``flock`` on the file ``path`` while the block runs, waiting for whoever holds it (a short
    read-modify-write or a one-time conversion, where the others should wait rather than be refused). None where
    not POSIX, and none, with a warning once per file, on a file system that cannot lock (:data:`NO_LOCKS`):
    ``unlocked`` says what then goes on without it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one writer assumed
        yield
        return
    with _open_lock_file(path) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                raise
            if path not in _warned_unlockable:
                _warned_unlockable.add(path)
                log.warning("the file system of %s does not lock files (%s): %s", path.parent,
                            exc.strerror or exc, unlocked)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class LinkedLockFile(ConfigError):
    """A lock file's name holds a symbolic link: mmllm never makes one, and following it would truncate, rewrite and
    then delete the file it leads to (whoever can write the folder chooses which of the user's files)."""


def _open_lock_file(path: Path) -> IO[str]:
    """``path`` opened for reading and appending (created where missing), never through a symbolic link."""
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise LinkedLockFile(f"{path} is a symbolic link (to {os.readlink(path)}), where mmllm keeps its lock "
                                 f"file: following it would overwrite and then delete that file. Remove the link "
                                 f"({path}) and run again") from None
        raise
    return os.fdopen(fd, "a+", encoding="utf-8")


def _acquire(fcntl: Any, path: Path, folder: Path, what: str, elsewhere: str) -> IO[str] | None:
    """The lock file, open and locked; None (with a warning) where ``folder``'s file system cannot lock."""
    while True:
        try:
            handle = _open_lock_file(path)  # held until _release
        except OSError as exc:
            raise OSError(exc.errno, f"{what}: cannot write the lock file {path} ({exc.strerror or exc}); fix "
                          f"{path.parent}'s permissions or free space, or give another folder") from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FolderInUse(
                f"{folder} is in use by another mmllm process ({describe_holder(_recorded(path))}); {what} "
                f"there at the same time would mix both runs' files. Wait for it to finish (its lock, {path.name} "
                f"{'beside' if path.parent != folder.resolve() else 'in'} that folder, is freed when that process "
                f"exits, even if it is killed), stop it, or "
                f"{elsewhere}") from None
        except OSError as exc:
            handle.close()
            if exc.errno not in NO_LOCKS:
                raise
            _remove(path)
            log.warning("%s: the file system of %s does not lock files (%s), so another mmllm run writing into that "
                        "folder at the same time would not be refused: make sure only one does", what, folder,
                        exc.strerror or exc)
            return None
        except BaseException:
            handle.close()
            raise
        if _same_file(handle, path):
            break
        # the holder finished and deleted the file between our open and flock: the lock taken is on a
        # file no one else will open; take the one that is there now
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "command": _command()[:500],
                             "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}) + "\n")
    handle.flush()
    # on disk before the other processes of the run look for it: on a network file system, another machine
    # reads what reached the server (training warns when processes elsewhere do not see it)
    os.fsync(handle.fileno())
    return handle


def _command() -> str:
    """This process's command line, its program by name (``mmllm``, ``cli.py``, ``pytest``)."""
    return " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])


def _same_file(handle: IO[str], path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("could not remove %s: %s", path, exc)


def _release(fcntl: Any, path: Path, handle: IO[str]) -> None:
    """Delete the file while still holding it (whoever opened it meanwhile sees it gone and opens the new
    one), then let go."""
    _remove(path)  # a folder made read-only meanwhile: the file stays, the lock still goes
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()
