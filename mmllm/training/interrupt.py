"""Ctrl-C (SIGINT) and SIGTERM (what a cluster scheduler sends before it preempts a job) while a stage
trains: the step under way finishes, is saved as a checkpoint, and training stops with
:class:`TrainingInterrupted`, naming the checkpoint and the ``--resume`` that continues it. Without this,
a signal lost every step since the last ``save_every`` checkpoint (and Ctrl-C printed a traceback from
wherever the step happened to be).

A second signal stops at once, as before. A repeat within :data:`REPEAT_S` of the first counts as the same
request: ``accelerate launch`` (torch's elastic agent) passes the terminal's Ctrl-C on to processes that
got it from the terminal already. With several processes, all of them stop after the same step: each
process's request is gathered from all of them at the end of every step, and every process stops with the
same signal's exit code (the highest-numbered, where processes got different ones). Signals arriving while
the model loads, before the first step, stop at once; signal handlers can only be set from the main
thread, and elsewhere signals behave as Python's defaults.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

REPEAT_S = 2.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after ``step``, saved as ``checkpoint``."""

    def __init__(self, name: str, step: int, max_steps: int, checkpoint: Path):
        self.name, self.step, self.checkpoint = name, step, checkpoint
        self.exit_code = 128 + signal.Signals[name]
        super().__init__(f"stopped by {name} after step {step} of {max_steps}; saved {checkpoint}. Continue with "
                         "the same command and --resume (in Python: train(cfg, resume=True))")


class StopRequests:
    """Signal handlers for the duration of a ``with``; :attr:`armed` while steps run (otherwise a signal
    raises :class:`KeyboardInterrupt` at once)."""

    def __init__(self) -> None:
        self.armed = False
        self.name: str | None = None
        self._at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.armed:
            raise KeyboardInterrupt(name)
        if self.name is None:
            self.name, self._at = name, time.monotonic()
            log.warning("%s: finishing this step, saving it and stopping; send it again to stop at once, losing the "
                        "steps since the last checkpoint", name)
        elif time.monotonic() - self._at > REPEAT_S:
            raise KeyboardInterrupt(name)

    def requested(self, accelerator) -> str | None:
        """The signal that asked to stop, on this process or any other (the highest-numbered where processes
        got different ones), so every process stops with the same exit code; a collective when there are
        several processes: every process calls it after every step."""
        if accelerator.num_processes == 1:
            return self.name
        mine = 0 if self.name is None else int(signal.Signals[self.name])
        asked = accelerator.gather(torch.tensor([mine], dtype=torch.int64, device=accelerator.device))
        got = max(int(x) for x in asked.tolist())
        return signal.Signals(got).name if got else None
