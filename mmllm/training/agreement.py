"""Several processes, one run: what every process must see alike, checked before anything is written.

Under ``torchrun`` / ``accelerate launch`` every process reads its own copy of the stage config and its
overrides, its data files, the assembly, the LoRA file, ``init_from`` and, with ``--resume``, the
checkpoints in ``output_dir``. On one machine these are the same files. Across machines they are whatever
each machine holds: a data file edited on one node, an override typed on one node's command line, or an
``output_dir`` on a disk of the first machine alone (its checkpoints unseen by the others) would otherwise
train on silently -- DDP averages the gradients of processes that read other samples, apply another
learning rate or start from another step -- until the processes' collectives no longer match and the run
hangs. Each check here runs on every process, gathers what each saw (with its host) and stops every
process with one message naming what differs where.

What is compared (:func:`run_description`): the stage settings as resolved (paths that say where a machine
keeps a file are replaced by what the file holds: a data file by the SHA-256 of its bytes, the assembly by
its resolved content, the LoRA file by its settings, ``init_from`` by its checkpoint's manifest), the
launch settings Accelerate resolved (distributed type, mixed precision), and -- a warning only -- the
versions of mmllm and the libraries it trains with. Not compared: the media files the records name (every
process would read them all), ``output_dir`` and ``cache.dir`` (paths; ``--resume`` compares the checkpoint
each process would continue, :func:`agreed_resume_point`).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmllm.config import ConfigError, StageConfig, flat_keys, load_assembly, load_lora, to_dict
from mmllm.log_filters import said_as_it_happens
from mmllm.training.faults import Failure

log = logging.getLogger(__name__)

VERSIONED = ("mmllm", "torch", "transformers", "accelerate", "peft", "diffusers")
# stage settings that name where this machine keeps things; their content is compared instead (or not at all)
MACHINE_PATHS = ("output_dir", "cache.dir", "assembly", "lora", "init_from", "data", "eval_data")
SHOWN = 6  # differing settings named in one message


@dataclass
class Seen:
    """What one process got from a check: its value, or the error it raised (as a kind and a message)."""

    rank: int
    host: str
    value: Any = None
    error: Failure | None = None
    said: list[str] = field(default_factory=list)  # the warnings it logged (on_every_process_warning_once)

    @property
    def where(self) -> str:
        return f"process {self.rank} (host {self.host})"


def on_every_process(accelerator, work: Callable[[], Any]) -> list[Seen]:
    """Run ``work`` on every process and gather what each got, in process order. When any process raised,
    every process raises: the main process's own error where it failed (its exception itself on the main
    process), else the first failing process's message, naming that process and host -- instead of one
    process stopping alone while the others wait for it at their next collective. The others' error says
    where it happened and keeps its kind (:func:`~mmllm.training.faults.kind_of`: a fault of mmllm on one
    process is one on every process, exit code 70; what the user can fix, exit code 2)."""
    mine, failure = _attempt(accelerator, work)
    seen = _gathered(accelerator, mine)
    _raise_any_failure(seen, failure, accelerator.process_index)
    return seen


def on_every_process_warning_once(accelerator, work: Callable[[], Any]) -> list[Seen]:
    """:func:`on_every_process`, the warnings ``work`` logs (``mmllm``'s, WARNING and above) said once per run
    rather than once per process: each process holds its own until every process has done ``work``; then the
    main process logs all of its own, and any other process logs only those the main process did not log,
    prefixed with where it saw them -- what a process saw alone (a media lookup that failed there) is never
    lost. (Every process reads the same data files: their warnings would otherwise repeat once per process.)
    One process: logged as they come."""
    if accelerator.num_processes == 1:
        return on_every_process(accelerator, work)
    held = HeldWarnings()
    try:
        with held:
            mine, failure = _attempt(accelerator, work)
        mine.said = held.messages()
        seen = _gathered(accelerator, mine)
    except BaseException:  # not an Exception (Ctrl-C, SystemExit) in work, or the processes could not compare:
        held.log_held()  # what was held is said before it goes on, not lost
        raise
    main = next(s for s in seen if s.rank == 0) if not accelerator.is_main_process else None
    held.log_held(None if main is None else set(main.said), mine.where)
    _raise_any_failure(seen, failure, accelerator.process_index)
    return seen


class HeldWarnings(logging.Handler):
    """While entered, the WARNING and above records of the ``mmllm`` loggers logged by the thread that entered it
    are held here instead of being shown; lower levels, a wait reported while it happens
    (:data:`mmllm.log_filters.AS_IT_HAPPENS`: "... trying again in 30 s"), and every record of another thread (the
    faults watch's error, logged just before it ends the process), pass on as they come. :meth:`log_held` logs the held ones
    after (once left)."""

    def __init__(self, name: str = "mmllm"):
        super().__init__(logging.NOTSET)
        self.logger = logging.getLogger(name)
        self.records: list[logging.LogRecord] = []
        self._kept: tuple[list[logging.Handler], bool] = ([], True)
        self._thread: int | None = None  # the thread whose records are held

    def __enter__(self) -> HeldWarnings:
        self._thread = threading.get_ident()
        self._kept = (self.logger.handlers, self.logger.propagate)
        self.logger.handlers, self.logger.propagate = [self], False
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.handlers, self.logger.propagate = self._kept

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING and record.thread == self._thread and not said_as_it_happens(record):
            self.records.append(record)
        else:
            _pass_on(record, self.logger, *self._kept)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def log_held(self, shown_elsewhere: set[str] | None = None, where: str = "") -> None:
        """Log the held records (once the handler is left): all of them with ``shown_elsewhere`` None (the main
        process), else those whose message is not in it, each prefixed with ``where`` they were seen."""
        for record in self.records:
            if shown_elsewhere is not None:
                message = record.getMessage()
                if message in shown_elsewhere:
                    continue
                record.msg, record.args = f"{where}, not on the main process: {message}", None
            logging.getLogger(record.name).handle(record)
        self.records = []


def _pass_on(record: logging.LogRecord, logger: logging.Logger, handlers: list[logging.Handler],
             propagate: bool) -> None:
    """What ``logger`` would have done with ``record`` had its handlers been ``handlers`` (logging's own walk)."""
    for handler in handlers:
        if record.levelno >= handler.level:
            handler.handle(record)
    parent = logger.parent if propagate else None
    while parent is not None:
        for handler in parent.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
        parent = parent.parent if parent.propagate else None


def _attempt(accelerator, work: Callable[[], Any]) -> tuple[Seen, Exception | None]:
    rank, host = accelerator.process_index, socket.gethostname()
    try:
        return Seen(rank, host, value=work()), None
    except Exception as exc:  # noqa: BLE001 -- every kind reaches the other processes, then is raised
        return Seen(rank, host, error=Failure.of(exc, rank, host)), exc


def _gathered(accelerator, mine: Seen) -> list[Seen]:
    if accelerator.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    return sorted(gather_object([mine]), key=lambda s: s.rank)


def _raise_any_failure(seen: list[Seen], failure: Exception | None, rank: int) -> None:
    failed = [s for s in seen if s.error is not None]
    if failed:
        first = failed[0]
        if first.rank == rank and failure is not None:
            raise failure
        raise first.error.error()


def run_description(cfg: StageConfig, accelerator) -> dict[str, str]:
    """What this process trains, flat (``"optim.lr": "0.01"``): the settings every process of a run must share."""
    stage = to_dict(cfg)
    out = {k: v for k, v in flat_keys(stage).items() if not k.startswith(MACHINE_PATHS)}
    out |= flat_keys(_assembly(cfg), "assembly")
    if cfg.lora:
        out |= flat_keys(to_dict(load_lora(cfg.lora)), "lora")
    if cfg.init_from:
        out["init_from"] = _checkpoint_identity(Path(cfg.init_from))
    for section in ("data", "eval_data"):
        for i, ds in enumerate(getattr(cfg, section)):
            key = f"{section}[{i}]"
            out |= {f"{key}.contents": _file_identity(Path(ds.path)), f"{key}.format": ds.format,
                    f"{key}.weight": ds.weight, f"{key}.allow_outside_root": ds.allow_outside_root}
    out["launch.distributed_type"] = str(accelerator.distributed_type.value)
    out["launch.mixed_precision"] = str(accelerator.mixed_precision)
    out |= {f"version.{name}": _version(name) for name in VERSIONED}
    return {k: str(v) for k, v in out.items()}


def check_same_run(accelerator, cfg: StageConfig) -> None:
    """Every process trains the same settings on the same data (:func:`run_description`); else every process
    stops with a message naming what differs on which processes and hosts. Other library versions: a warning."""
    if accelerator.num_processes == 1:
        return
    seen = on_every_process(accelerator, lambda: run_description(cfg, accelerator))
    differing = differences(seen)
    versions = [d for d in differing if d.startswith("version.")]
    settings = [d for d in differing if not d.startswith("version.")]
    if versions and accelerator.is_main_process:
        log.warning("the processes of this run have other library versions: %s. Install the same versions on "
                    "every machine", "; ".join(versions))
    if settings:
        more = f"; and {len(settings) - SHOWN} more" if len(settings) > SHOWN else ""
        raise ConfigError(
            f"the {len(seen)} processes of this run do not train the same thing: {'; '.join(settings[:SHOWN])}{more}. "
            "Every process must read the same stage config, overrides and data: on several machines, launch the "
            "same command on each with the same files there (a shared file system, or identical copies)")


def differences(seen: list[Seen]) -> list[str]:
    """One line per key whose value is not the same on every process: each value, with where it was seen."""
    keys = list(seen[0].value) + sorted({k for s in seen[1:] for k in s.value} - set(seen[0].value))
    lines = []
    for key in keys:
        groups: dict[str, list[Seen]] = {}
        for s in seen:
            groups.setdefault(s.value.get(key, "(not set)"), []).append(s)
        if len(groups) > 1:
            lines.append(f"{key}: " + " vs ".join(f"{_short(v)} on {_places(where)}" for v, where in groups.items()))
    return lines


def check_same_samples(seen: list[Seen], paths: list[str]) -> None:
    """Every process read as many usable records from each data file (``seen``: each process's counts, in the
    order of ``paths``). Each process reads the files itself before step 1, and a record whose media lookup
    failed there for good (a flaky mount: the first read tries a lookup again, within bounds) is malformed on
    that process alone: its sampler would then draw from another list of samples than the others' (DDP
    averaging gradients of samples drawn twice and of others never), and a resumed run could not continue it."""
    differing = differences([Seen(s.rank, s.host, dict(zip(paths, map(str, s.value)))) for s in seen])
    if differing:
        more = f"; and {len(differing) - SHOWN} more" if len(differing) > SHOWN else ""
        raise ConfigError(
            f"the {len(seen)} processes of this run read other numbers of usable records from the same data files "
            f"(usable records of {'; '.join(differing[:SHOWN])}{more}): each would draw other samples. A record "
            "whose media could not be looked up on a process is malformed there alone (that process's warnings "
            "name it: 'process N (host H), not on the main process: ...'): check the storage the media are on (the system log: dmesg; the mount) from every machine, "
            "then start the run again")


def agreed_resume_point(accelerator, out_dir: Path, find: Callable[[], Path | None]) -> Path | None:
    """The checkpoint ``--resume`` continues (``find``, run on every process), which every process must see
    alike: the same newest ``step-N`` with the same manifest. Else every process stops: on several machines
    an ``output_dir`` on one machine's disk leaves the others starting from step 0 beside a process
    continuing from step N."""
    if accelerator.num_processes == 1:
        return find()
    seen = on_every_process(accelerator, lambda: _resume_view(find()))
    if len({s.value for s in seen}) > 1:
        groups: dict[tuple[str, str] | None, list[Seen]] = {}
        for s in seen:
            groups.setdefault(s.value, []).append(s)
        found = " vs ".join(f"{'no checkpoint' if v is None else f'{v[0]} ({v[1]})'} on {_places(where)}"
                            for v, where in groups.items())
        raise ConfigError(
            f"--resume: the processes of this run do not see the same checkpoints in output_dir {out_dir}: {found}; "
            "they would continue from different steps. With several machines, output_dir must be a folder every "
            "machine sees (a shared file system), or hold the same checkpoints on each: copy the newest step-N "
            "folder into output_dir on every machine")
    view = seen[0].value
    return None if view is None else out_dir / view[0]


def warn_unless_shared(accelerator, folder: Path, read: Callable[[], Any], consequence: str) -> None:
    """Warn (on the main process) when processes do not read in ``folder`` (``read``, on every process) what the
    main process reads there, a file it wrote: ``folder`` is then on the main process's machine alone."""
    if accelerator.num_processes == 1:
        return
    seen = on_every_process(accelerator, read)
    blind = [s for s in seen if s.value != seen[0].value]
    if blind and accelerator.is_main_process:
        log.warning("output_dir %s is not a folder every process sees: the files the main process writes there are "
                    "not seen by %s. %s", folder, _places(blind), consequence)


def _resume_view(last: Path | None) -> tuple[str, str] | None:
    return None if last is None else (last.name, _checkpoint_identity(last))


def _checkpoint_identity(folder: Path) -> str:
    from mmllm.training.checkpoint import MANIFEST

    manifest = folder / MANIFEST
    if not manifest.is_file():  # not where it was (a resumed run need not read it): not its path, machine-dependent
        return f"none (no {MANIFEST} there)"
    return f"manifest sha256 {hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]}"


def _file_identity(path: Path) -> str:
    from mmllm.data.fingerprint import file_hash_unless_unchanged

    try:
        return f"sha256 {file_hash_unless_unchanged(path)[:12]}"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"


def _assembly(cfg: StageConfig) -> dict[str, Any]:
    from mmllm.training.init_from import MACHINE_KEYS, normalized_assembly

    flat = flat_keys(normalized_assembly(load_assembly(cfg.assembly, cfg.assembly_overrides)))
    return {k: v for k, v in flat.items() if k not in MACHINE_KEYS}


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _places(seen: list[Seen]) -> str:
    ranks = [s.rank for s in seen]
    hosts = sorted({s.host for s in seen})
    which = f"process {ranks[0]}" if len(ranks) == 1 else f"processes {_ranks(ranks)}"
    return f"{which} (host{'s' if len(hosts) > 1 else ''} {', '.join(hosts[:4])}{', ...' if len(hosts) > 4 else ''})"


def _ranks(ranks: list[int]) -> str:
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")


def _short(value: str, width: int = 60) -> str:
    return value if len(value) <= width else value[: width - 3] + "..."
