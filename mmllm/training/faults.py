"""One process of a multi-process run fails: every process stops, promptly, with its message and its kind of exit code.

The processes of a run meet at collectives (the gradient all-reduce, the step's unit counts, the sampler's length
exchange, validation's reductions, the barriers around a checkpoint save). A process that raises between two of
them -- it ran out of memory, read a damaged cache file, hit a fault of mmllm -- leaves the others waiting at the
next one: under NCCL until its timeout (10 minutes or more), under gloo until the failed process exits, when they
fail with "Connection closed by peer" (an unexpected error, exit code 70, whatever the first one's was).

One mechanism covers every such place, at no cost to a step: :func:`stops_together` wraps the run. The first
process to fail posts its error (its process, host, kind and message) in the key-value store that
``torch.distributed`` started with (the rendezvous store, which every machine reaches), under the run's name
(:func:`new_run`: a store can outlive a run), and waits, a few seconds at most, for every other process to have
read it. Each process watches that key from a thread, polling every :data:`POLL_S` on a connection of its own. A
process whose own training then fails -- at a collective the failed process left, a gloo error once it exits -- raises the first failure instead, saying where it happened (:class:`FromAnotherProcess`); one
that does not get there within :data:`GRACE_S` (stuck in an NCCL collective that only a timeout would end) logs it
and exits with its exit code from the watching thread. Exit codes are of the first failure's kind: 2 for what
the user can fix (:class:`~mmllm.config.UserError`, ``OSError``, running out of memory), 70 for a fault of mmllm.

Errors that every process raises together already (the exchanges of :mod:`.agreement`, an error on the main
process that ``_on_main_process_for_all`` passes on) keep their own messages: each process's own error is raised
where it is one the user can fix. A process killed outright (SIGKILL, the kernel's out-of-memory killer) posts
nothing: the others fail as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from mmllm.config import EXIT_INTERNAL_ERROR, ConfigError, UserError
from mmllm.memory import OutOfMemory, is_out_of_memory

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a process looks for another's failure (one small request to the store)
GRACE_S = 10.0  # how long a process that saw another's failure waits for its own training to stop on it
EXIT_USER, EXIT_FAULT = 2, EXIT_INTERNAL_ERROR  # the mmllm command's: what was given refused / a fault of mmllm


class FromAnotherProcess(Exception):
    """Raised by every other process when one process failed: the message names that process and its error."""

    kind = "user"


class UserErrorElsewhere(ConfigError, FromAnotherProcess):
    """Another process stopped on something the user can fix (the ``mmllm`` command: exit code 2)."""


class OSErrorElsewhere(OSError, FromAnotherProcess):
    """Another process could not read or write a file (exit code 2)."""

    kind = "os"


class FaultElsewhere(RuntimeError, FromAnotherProcess):
    """Another process stopped on a fault of mmllm or of what it runs (the ``mmllm`` command: exit code 70)."""

    kind = "fault"


def kind_of(exc: BaseException) -> str:
    """``"os"``, ``"user"`` (both: exit code 2, one line) or ``"fault"`` (exit code 70, a traceback)."""
    if isinstance(exc, FromAnotherProcess):
        return exc.kind
    if isinstance(exc, OSError):
        return "os"
    if isinstance(exc, (UserError, OutOfMemory)) or is_out_of_memory(exc):  # also torch's own, not yet OutOfMemory
        return "user"
    return "fault"


def exit_code(kind: str) -> int:
    return EXIT_FAULT if kind == "fault" else EXIT_USER


@dataclass(frozen=True)
class Failure:
    """One process's error, as the others are told it."""

    rank: int
    host: str
    kind: str  # kind_of
    message: str

    @classmethod
    def of(cls, exc: BaseException, rank: int, host: str | None = None) -> Failure:
        text = str(exc) or type(exc).__name__
        if kind_of(exc) == "fault" and not isinstance(exc, FromAnotherProcess):
            text = f"unexpected error {type(exc).__name__}: {text} (its traceback is in that process's output)"
        return cls(rank, host or socket.gethostname(), kind_of(exc), text)

    @property
    def where(self) -> str:
        return f"process {self.rank} (host {self.host})"

    def error(self) -> FromAnotherProcess:
        """What another process raises: the message says where it happened, the class keeps its kind."""
        text = f"on {self.where}: {self.message}"
        if self.kind == "os":
            return OSErrorElsewhere(text)
        return FaultElsewhere(text) if self.kind == "fault" else UserErrorElsewhere(text)


def default_store():
    """The store ``torch.distributed`` started with (every process of the run reaches it), or None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (ImportError, RuntimeError, ValueError):  # a private function: gone, or no default group
        return None


def new_run(accelerator) -> str:
    """A name for this run that every process of it agrees on (the main process's, broadcast), unlike any other
    run's: the keys of :func:`stops_together`. The store can outlive a run: a launcher that restarts a failed run
    (``torchrun --max-restarts``, ``accelerate launch --max_restarts``) keeps its store, holding the failed
    attempt's keys, for the next."""
    if accelerator.num_processes == 1:
        return "single"
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([uuid.uuid4().hex if accelerator.is_main_process else None])[0]


@contextlib.contextmanager
def stops_together(rank: int, world: int, run: str, store=None) -> Iterator[None]:
    """Run the ``with`` body (a whole training run) so that a failure of one process stops every process
    (this module's docstring); one process, or no store: the body as it is. ``run``: the run's name, the same on
    every process of it and unlike any other run's on that store (:func:`new_run`)."""
    store = store if store is not None or world == 1 else default_store()
    if world == 1 or store is None:
        yield
        return
    watch = _Watch(store, f"mmllm/faults/{run}", rank, world)
    watch.start()
    try:
        yield
    except BaseException as exc:
        raised = watch.stopping(exc)
        if raised is exc:
            raise
        raise raised from exc
    finally:
        watch.stop()


class _Watch:
    """This process's side of :func:`stops_together`: posting its failure, watching for another's."""

    def __init__(self, store, prefix: str, rank: int, world: int):
        self.store, self.prefix, self.rank, self.world = _own_client(store), prefix, rank, world
        self.host = socket.gethostname()
        self.seen: Failure | None = None  # the first failure, another process's, once read
        self._stopping, self._done = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="mmllm-faults", daemon=True)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """The run is over here: stop watching, and tell a process that failed after it that it need not wait."""
        self._done.set()
        self._say_read()
        self._thread.join(timeout=2 * POLL_S)

    def stopping(self, exc: BaseException) -> BaseException:
        """What this process raises for ``exc``: its own error, or the first failure when that was another
        process's and ``exc`` is not one the user can fix in itself (a collective broken by the other's exit,
        the launcher's SIGTERM, an error every process raises already). Posts ``exc`` when it is the first."""
        self._stopping.set()
        own = isinstance(exc, Exception) and not isinstance(exc, FromAnotherProcess) and not _coordinated(exc)
        first = self._post(Failure.of(exc, self.rank, self.host)) if own else None
        other = self._read()
        self._say_read()
        if first:
            self._wait_for_the_others()
            return exc
        if other is not None and (kind_of(exc) == "fault" or not isinstance(exc, Exception)):
            return other.error()
        return exc

    def _post(self, failure: Failure) -> bool:
        """Post ``failure`` unless another process posted first; whether this one is the first."""
        try:
            if self.store.add(self._key("failures"), 1) != 1:
                return False
            self.store.set(self._key("first"), json.dumps(dataclasses.asdict(failure)))
        except Exception as exc:  # noqa: BLE001 -- the store gone (its host process exited): nobody to tell
            log.debug("could not post this process's failure: %s", exc)
            return False
        return True

    def _read(self) -> Failure | None:
        """The first failure when it was another process's (read once, kept: its store may go with it)."""
        with self._lock:
            if self.seen is None:
                try:
                    if self.store.check([self._key("first")]):
                        failure = Failure(**json.loads(self.store.get(self._key("first"))))
                        self.seen = failure if failure.rank != self.rank else None
                except Exception as exc:  # noqa: BLE001 -- the store gone: what was read is all there is
                    log.debug("could not read the run's failures: %s", exc)
            return self.seen

    def _say_read(self) -> None:
        with contextlib.suppress(Exception):
            self.store.set(self._key(f"read-{self.rank}"), b"1")

    def _wait_for_the_others(self) -> None:
        """The first to fail waits until every other process has read its failure (its exit may close the
        store, under a launcher it makes the others be killed), :data:`GRACE_S` at most."""
        keys = [self._key(f"read-{r}") for r in range(self.world) if r != self.rank]
        deadline = time.monotonic() + GRACE_S
        with contextlib.suppress(Exception):
            while not self.store.check(keys) and time.monotonic() < deadline:
                time.sleep(POLL_S / 5)

    def _watch(self) -> None:
        """The watching thread: another process's failure read, and this process's training not stopping on
        it within :data:`GRACE_S` (stuck in a collective): log it, and exit with its code."""
        while not self._done.wait(POLL_S):
            try:
                failure = self._read() if self.store.check([self._key("first")]) else None
            except Exception:  # noqa: BLE001 -- the store gone: the run is over, or its host process exited
                return
            if failure is None:
                continue
            self._say_read()
            if self._stopping.wait(GRACE_S) or self._done.is_set():
                return
            log.error("%s; this process was still waiting for it in a collective, and stops", failure.error())
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):  # os._exit skips Python's own flush of what is buffered
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(exit_code(failure.kind))


def _own_client(store):
    """A connection of this module's own to ``store``'s server, where it can make one: a store client serves one
    request at a time, and torch waits on the run's own for keys that may never come (the NCCL id of a process
    group's first collective, from a process that failed), holding up every other request until its timeout
    (10 minutes and more)."""
    try:
        return store.clone()
    except Exception as exc:  # noqa: BLE001 -- a store that cannot clone itself (torch < 2.6, a FileStore): share it
        log.debug("watching for failures on the run's own store client: %s", exc)
        return store


def _coordinated(exc: BaseException) -> bool:
    """Errors every process raises at the same point already: a stop on a signal after a saved step."""
    from mmllm.training.interrupt import TrainingInterrupted

    return isinstance(exc, TrainingInterrupted)
