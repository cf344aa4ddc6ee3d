"""A stage's conversations, held as where their records lie in the data file rather than as objects.

Training reads every record once at its start (so a malformed one is reported, and counted, before step 1),
then keeps of each usable one only its bytes' place in the file and its line: 16 bytes a sample. A
sample is parsed again from the file when it is drawn (a read of its own bytes, some microseconds).
Held as Python objects (:class:`~mmllm.data.formats.Conversation`, its messages, paths and strings), a
CC3M-size file of 3 M caption pairs took 1.6 KB a sample, 4.7 GB in every training process (9.8 GB at the
peak of reading it); the index takes 48 MB.

The file stays open while the index lives (a process holds at most :data:`OPEN_DATA_FILES` data files open,
the least recently read closed first, so that thousands of data files do not run out of file descriptors): a
file replaced (renamed over, as editors and ``cp`` to another name then ``mv`` do) is still read as it was; a
file changed in place is refused at the next read (:class:`DataFileChanged`), naming it, rather than giving
other samples than the ones read at the start. A file whose size or modification time moved while its bytes
stayed the same (``touch``, the same bytes copied over it, a closed file opened again by its name after an
identical copy replaced it) is read on: the index keeps a checksum of the bytes it read (CRC-32, some GB/s).
A file appended to (new records after the last, the bytes read at the start the same) is read on too: the
records appended are not trained on in this run (said once, in a warning). Each change is checked once, by
the checksum of the bytes read at the start (a pass over them, at the next read after the change).

A read of the file that fails (an I/O error: a bad block, a network file system's hiccup, a stale handle) is
tried again (:data:`READ_RETRY_DELAYS`, the file opened again by its path); a record still unreadable after
that is skipped as a sample with unreadable media is (:class:`RecordUnreadable`, counted in the run's skipped
samples), unless another record of the file cannot be read either (tried for :data:`FILE_RETRY_DELAYS`):
then the file, or the disk it is on, is what is unreadable, and the run stops (:class:`DataFileUnreadable`)
rather than skip every sample. A media path whose lookup the file system refuses (a folder the process may
not enter) skips the sample too; a lookup failing otherwise (an I/O error, a stale handle: :data:`LASTING_ERRNOS`
are not tried again) is tried again first, as a read is. Training ends the waits before a retry when it is asked to
stop (:func:`waits_end_when`). A file deleted (or moved) once a process had closed it stops the run
(:class:`DataFileGone`), saying so.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import threading
import time
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from mmllm.config import UserError
from mmllm.data.formats import (
    CaptionPair,
    Conversation,
    RecordParser,
    log_skipped,
    log_unknown_keys,
    parse_file,
    record_parser,
)
from mmllm.data.keys import KeyTally, UnknownKey
from mmllm.data.template import pair_to_conversation
from mmllm.log_filters import AS_IT_HAPPENS

EMPTY_REPLY_IDS = 5  # ids of conversations with empty replies kept for the warning that names them
OPEN_DATA_FILES = 64  # data files a process holds open at once (an index whose file was closed opens it again)
CHECKSUM_CHUNK = 1 << 23
# seconds waited before each new try of a read of the data file that failed: of the record drawn, then (when it
# still fails) of another record of the file, to tell one unreadable record from an unreadable file
READ_RETRY_DELAYS = (0.1, 1.0)
FILE_RETRY_DELAYS = (5.0, 30.0)
# the first read of a data file: records in a row whose media lookups still fail when tried again (the run stops:
# the media's storage is unreadable), and records whose lookups failed for good after which a failed lookup is no
# longer tried again (each costs READ_RETRY_DELAYS, 1.1 s)
LOOKUP_FAILURES_IN_A_ROW = 2
LOOKUP_RETRIED_RECORDS = 5
WAIT_SLICE = 0.05  # seconds between looks at whether a stop was asked for, while a retry waits
# what a media lookup that fails with these says holds until someone changes it (a folder the process may not
# enter, a name too long): not tried again (each sample of such a folder would wait its retries, every draw)
LASTING_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR,
                            errno.EINVAL})

log = logging.getLogger(__name__)


class DataFileChanged(UserError):
    """A data file changed in place while a run read samples from it. Not one of the errors a sample is
    skipped for (:data:`~mmllm.data.media.SAMPLE_ERRORS`): every later sample would be another record.
    A :class:`~mmllm.config.UserError` (not a ValueError): the command stops with its one line, exit code 2."""


class DataFileGone(DataFileChanged):
    """A data file closed by this process (it holds at most :data:`OPEN_DATA_FILES` open) was not there when it
    was opened again by its path: deleted or moved while the run read samples from it."""


class DataFileUnreadable(UserError):
    """Reads of a data file fail for more than one record, tried again: the file (or its disk, its mount) cannot
    be read. Not a :data:`~mmllm.data.media.SAMPLE_ERRORS`: skipping would skip every sample. A
    :class:`~mmllm.config.UserError`: the command stops with its one line (what to check), exit code 2."""


class ReadStopped(Exception):
    """A stop was asked for (training's SIGINT or SIGTERM, :func:`waits_end_when`) while a failed read of a data
    file waited to be tried again: the wait ends at once and the read is given up. Neither an ``OSError`` nor any
    of :data:`~mmllm.data.media.SAMPLE_ERRORS`: the sample is not taken for unreadable (its length for
    ``group_by_length`` is not taken for 0); the training loop stops on it. ``where``: the record (``file:line``)."""

    def __init__(self, message: str, where: str):
        super().__init__(message)
        self.where = where

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.args[0], self.where)


class RecordUnreadable(OSError):
    """One sample cannot be read: its record's bytes (an I/O error that trying again did not clear, while other
    records of the file read) or a media path the file system refuses to look up. An ``OSError``, so one of the
    :data:`~mmllm.data.media.SAMPLE_ERRORS`: the sample is skipped and counted. ``sample_id``: the record's id
    when its bytes were read, else where it is (``file:line``)."""

    def __init__(self, message: str, sample_id: str, source: str):
        super().__init__(message)
        self.sample_id, self.source = sample_id, source

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:  # pickled (a data-loader worker's) with its fields
        return type(self), (self.args[0], self.sample_id, self.source)


@dataclass
class DataSummary:
    """What training needs to know of all of a data set's conversations before step 1, gathered as they
    are read: the modalities of their media inputs and outputs, and their empty assistant replies."""

    inputs: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)
    embedded_outputs: set[str] = field(default_factory=set)  # output modalities with a precomputed embedding
    empty_reply_ids: list[str] = field(default_factory=list)  # the first EMPTY_REPLY_IDS
    empty_reply_conversations: int = 0
    empty_reply_turns: int = 0

    def add(self, conv: Conversation) -> None:
        self.inputs.update(ref.modality for ref in conv.media_refs())
        for out in conv.output_refs():
            self.outputs.add(out.modality)
            if out.embedding is not None:
                self.embedded_outputs.add(out.modality)
        if n := conv.empty_replies():
            if len(self.empty_reply_ids) < EMPTY_REPLY_IDS:
                self.empty_reply_ids.append(conv.id)
            self.empty_reply_conversations += 1
            self.empty_reply_turns += n

    @classmethod
    def of(cls, conversations: Iterable[Conversation]) -> DataSummary:
        out = cls()
        for conv in conversations:
            out.add(conv)
        return out


def data_summary(conversations: Sequence[Conversation]) -> DataSummary:
    """The summary of a data set: gathered when a :class:`ConversationIndex` was built, else read now."""
    if isinstance(conversations, ConversationIndex):
        return conversations.summary
    return DataSummary.of(conversations)


def embedded_output_modalities(conversations: Iterable[Conversation]) -> set[str]:
    """The output modalities some conversation gives a precomputed embedding for: from the summaries gathered
    as the data was read (a :class:`Chained` of indexes is not read again), else by reading them now."""
    parts = conversations.parts if isinstance(conversations, Chained) else [conversations]
    return set().union(*(data_summary(part).embedded_outputs for part in parts))


class Chained(Iterable[Conversation]):
    """The conversations of several data sets, one after the other, read again at each pass (not held)."""

    def __init__(self, parts: Iterable[Sequence[Conversation]]):
        self.parts = list(parts)

    def __iter__(self) -> Iterator[Conversation]:
        for part in self.parts:
            yield from part


def readable(conversations: Iterable[Conversation],
             unreadable: Callable[[RecordUnreadable], None] | None = None) -> Iterator[Conversation]:
    """``conversations`` (a :class:`ConversationIndex`, a :class:`Chained` of them, or held ones) in one pass,
    leaving out each whose record the data file fails to give (:class:`RecordUnreadable`, after its retries:
    training skips that sample), each said in a warning or given to ``unreadable``: a pass over the whole data
    (``mmllm cache``, ``cache.require``, ``mmllm data check``) reads what training reads rather than stopping at
    one unreadable record."""
    parts = conversations.parts if isinstance(conversations, Chained) else [conversations]
    for part in parts:
        if not isinstance(part, ConversationIndex):
            yield from part
            continue
        for i in range(len(part)):
            try:
                conv = part[i]
            except RecordUnreadable as exc:
                if unreadable is None:
                    log.warning("%s: left out, as training skips that sample", exc)
                else:
                    unreadable(exc)
                continue
            yield conv


def _compact(values: array) -> np.ndarray:
    """``values`` as int32 where they fit, else int64."""
    out = np.frombuffer(values, dtype=np.int64) if len(values) else np.zeros(0, dtype=np.int64)
    return out.astype(np.int32) if not len(out) or out.max() <= np.iinfo(np.int32).max else out.copy()


_stop_asked: Callable[[], bool] | None = None  # set by waits_end_when: whether a retry's wait is to end


@contextlib.contextmanager
def waits_end_when(asked: Callable[[], bool]) -> Iterator[None]:
    """Within the ``with``, a wait before a failed read of a data file is tried again (:data:`READ_RETRY_DELAYS`,
    :data:`FILE_RETRY_DELAYS`: up to 36 s) ends as soon as ``asked()`` is true (looked at every
    :data:`WAIT_SLICE` s, and before it starts), raising :class:`ReadStopped`. Training's steps hold it with "a
    signal asked to stop": a signal handler that only records the request (it lets the step finish) wakes no
    ``time.sleep``, so a SIGTERM during the waits took up to 36 s to be acted on."""
    global _stop_asked
    before, _stop_asked = _stop_asked, asked
    try:
        yield
    finally:
        _stop_asked = before


def _wait(delay: float, where: str) -> None:
    """``time.sleep(delay)``, ended by :class:`ReadStopped` when a stop is asked for (:func:`waits_end_when`)."""
    end = time.monotonic() + delay
    while True:
        if _stop_asked is not None and _stop_asked():
            raise ReadStopped(f"{where}: a stop was asked for while a failed read of the data file waited to be "
                              "tried again; the read is given up", where)
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, WAIT_SLICE))


def parse_retrying(parser: RecordParser, rec: Any, line: int, where: str,
                   lasting: Callable[[OSError], bool] | None = None) -> Any:
    """``parser`` on record ``rec``, tried again after each of :data:`READ_RETRY_DELAYS` while it raises an
    ``OSError`` that may pass (a media lookup's I/O error, a stale handle, a timeout: not one of
    :data:`LASTING_ERRNOS`, nor one ``lasting`` says holds), as a read of the record's bytes is; the last try's
    error is raised."""
    for delay in READ_RETRY_DELAYS:
        try:
            return parser(rec, line)
        except OSError as exc:
            if exc.errno in LASTING_ERRNOS or (lasting is not None and lasting(exc)):
                raise
            log.warning("%s: looking up the record's media failed (%s); trying again in %g s", where, exc, delay,
                        extra=AS_IT_HAPPENS)
        _wait(delay, where)
    return parser(rec, line)


class _ScanLookups:
    """The parser of the first read of a data file (:func:`index_dataset`), a failed media lookup tried again
    (:func:`parse_retrying`) so that a passing error does not make the record malformed for the whole run (the
    sample count, and with it every batch's samples, would differ from a run without it). Bounded as record reads
    are: a lookup still failing for two records in a row is an unreadable disk or mount, and the run stops
    (:class:`DataFileUnreadable`) rather than wait 1.1 s for each of millions of records; after
    :data:`LOOKUP_RETRIED_RECORDS` records whose lookups failed for good, or for a path already seen failing for
    good, a failed lookup is not tried again (the record is malformed, said as one) -- but for the record after
    one that so failed untried: it is tried again, so that only failures that outlast their retries stop the run
    (two records in a row each failing once on a flaky mount are not a dead one)."""

    def __init__(self, parser: RecordParser):
        self.parser, self.path = parser, str(parser.path)
        # path (or the error) -> (line, error) of the lookups that failed for good: at most LOOKUP_RETRIED_RECORDS
        self.failed: dict[str, tuple[int, OSError]] = {}
        self.row: list[tuple[int, OSError]] = []  # records whose lookups failed for good since one parsed
        self.untried = False  # the last record's lookup failed and was not tried again (past the bound)
        self.retried = False  # whether the current record's failed lookup was tried again

    def __call__(self, rec: dict[str, Any], line: int) -> Any:
        where = f"{self.path}:{line}"
        self.retried = False
        try:
            got = parse_retrying(self.parser, rec, line, where, self._not_retried)
        except OSError as exc:
            if exc.errno not in LASTING_ERRNOS:
                self._failed_for_good(exc, line)
            raise
        self.row.clear()  # (a record malformed otherwise says nothing of the storage)
        self.untried = False
        return got

    @staticmethod
    def _what(exc: OSError) -> str:
        return str(exc.filename) if exc.filename is not None else str(exc)

    def _not_retried(self, exc: OSError) -> bool:
        """A path already seen failing for good (no news of the storage: not waited for again), or any, once
        :data:`LOOKUP_RETRIED_RECORDS` records failed for good -- unless the record before failed too (untried,
        or for good): whether the storage is gone is then told by trying this one again."""
        if self._what(exc) in self.failed:
            return True
        self.retried = len(self.failed) < LOOKUP_RETRIED_RECORDS or self.untried or bool(self.row)
        return not self.retried

    def _failed_for_good(self, exc: OSError, line: int) -> None:
        what = self._what(exc)
        if what in self.failed:
            return
        if not self.retried:  # failed once, not tried again: not known to outlast a retry, so not in the row
            self.untried = True
            return
        self.untried = False
        self.row.append((line, exc))
        if len(self.failed) < LOOKUP_RETRIED_RECORDS:
            self.failed[what] = (line, exc)
            if len(self.failed) == LOOKUP_RETRIED_RECORDS:
                log.warning("%s: the media lookups of %d records failed even when tried again; a failed lookup of "
                            "this file is no longer tried again (its record is skipped as malformed)",
                            self.parser.path, len(self.failed))
        if len(self.row) >= LOOKUP_FAILURES_IN_A_ROW:
            lines = "; ".join(f"line {n}: {e}" for n, e in self.row)
            raise DataFileUnreadable(
                f"data file {self.parser.path}: the media of {len(self.row)} records in a row cannot be looked up "
                f"({lines}), each tried again. The disk or network mount the media are on is unreadable (a record "
                "whose media alone cannot be looked up is skipped as malformed; this would skip them all). Check the "
                "storage (the system log: dmesg; the mount), then start the run again") from exc


class _OpenFiles:
    """The data files the indexes of this process hold open, at most ``limit``: the least recently read is
    closed first (its index opens it again by its name when it is next read). ``lock`` is held while a
    descriptor is in use, so that no other thread closes it (and the number is reused) under a read."""

    def __init__(self, limit: int):
        self.limit = limit
        self.files: OrderedDict[int, Any] = OrderedDict()
        self.lock = threading.RLock()

    def put(self, key: int, fh: Any) -> None:
        self.files[key] = fh
        self.files.move_to_end(key)
        while len(self.files) > self.limit:
            _, old = self.files.popitem(last=False)
            old.close()

    def get(self, key: int) -> Any | None:
        fh = self.files.get(key)
        if fh is not None:
            self.files.move_to_end(key)
        return fh

    def close(self, key: int) -> None:
        fh = self.files.pop(key, None)
        if fh is not None:
            fh.close()

    def after_fork(self) -> None:  # a lock held by another thread at the fork would never be let go in the child
        self.lock = threading.RLock()


_OPEN = _OpenFiles(OPEN_DATA_FILES)
_KEYS = itertools.count()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_OPEN.after_fork)


def _checksum(fd: int, size: int) -> int:
    """CRC-32 of the first ``size`` bytes of the file open as ``fd``."""
    crc, offset = 0, 0
    while offset < size:
        chunk = os.pread(fd, min(CHECKSUM_CHUNK, size - offset), offset)
        if not chunk:
            break
        crc, offset = zlib.crc32(chunk, crc), offset + len(chunk)
    return crc


class ConversationIndex(Sequence[Conversation]):
    """The usable conversations of one data file for one stage, read from the file when asked for."""

    def __init__(self, parser: RecordParser, stage: str, fh: Any, offsets: np.ndarray, lengths: np.ndarray,
                 lines: np.ndarray, summary: DataSummary, identity: tuple[int, int, int, int],
                 checksum: int | None = None, unknown_keys: Sequence[UnknownKey] = ()):
        self.parser, self.stage = parser, stage
        self.unknown_keys = list(unknown_keys)  # keys of the file's records that its format does not read
        self.offsets, self.lengths, self.lines = offsets, lengths, lines
        self.summary = summary
        self._identity = identity  # the file's, before it was read
        self._checksum = checksum  # of the bytes read (None: the file changed while it was read)
        self._size = identity[2]  # the bytes the checksum is of: a file grown past them is read on if they are kept
        self._grown = False  # the warning that records were appended was given
        self._where = os.path.abspath(self.path)  # opened again here: not where a later working directory points
        self._key = next(_KEYS)
        with _OPEN.lock:
            _OPEN.put(self._key, fh)

    @staticmethod
    def _file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    @property
    def path(self) -> Path:
        return self.parser.path

    def __len__(self) -> int:
        return len(self.offsets)

    @overload
    def __getitem__(self, index: int) -> Conversation: ...

    @overload
    def __getitem__(self, index: slice) -> list[Conversation]: ...

    def __getitem__(self, index: int | slice) -> Conversation | list[Conversation]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample {index} of a data set of {n}")
        i = index % n
        got = self._record(i)
        return pair_to_conversation(got, self.stage) if isinstance(got, CaptionPair) else got

    def _record(self, i: int) -> Any:
        """Record ``i`` parsed: its bytes read again (tried again when the read fails), then its format's parser."""
        line = int(self.lines[i])
        where = f"{self.path}:{line}"
        try:
            raw = self._retrying(lambda: self._read(i), READ_RETRY_DELAYS, where)
        except OSError as exc:
            self._check_readable(i, exc)
            raise RecordUnreadable(f"{where}: the record cannot be read from the data file ({exc}; tried "
                                   f"{len(READ_RETRY_DELAYS) + 1} times, while other records of the file read)",
                                   where, where) from exc
        rec = None
        try:
            rec = json.loads(raw.decode("utf-8"))
            return self._parsed(rec, line, where)
        except ValueError as exc:  # what read it at the start reads it again, unless the file changed
            with _OPEN.lock:
                fd = self._open()  # checks the file
                unchanged = self._checksum is not None and _checksum(fd, self._size) == self._checksum
            if not unchanged:
                raise DataFileChanged(f"{where}: the record read at the start of the run cannot be read "
                                      f"again ({exc})") from exc
            # the same bytes as at the start (a change keeping size and modification time is told by them):
            # the index is wrong, not the file -- mmllm's fault, its traceback (exit 70), not "restore the file"
            raise RuntimeError(f"{where}: the record read at the start of the run cannot be read again from bytes "
                               f"{int(self.offsets[i])}..{int(self.offsets[i] + self.lengths[i])} of the unchanged "
                               f"file ({exc})") from exc
        except OSError as exc:  # a media path the file system refuses to look up (a folder it may not enter)
            sample_id = str(rec.get("id", where)) if isinstance(rec, dict) else where
            raise RecordUnreadable(f"{where}: {exc}", sample_id, where) from exc

    def _parsed(self, rec: Any, line: int, where: str) -> Any:
        """The format's parser on record ``rec``, a failed media lookup tried again (:func:`parse_retrying`): a
        sample whose lookup failed once was skipped, and its length for ``group_by_length`` taken as 0, reordering
        its chunk's batches in this run only."""
        return parse_retrying(self.parser, rec, line, where)

    def _read(self, i: int) -> bytes:
        """The bytes of record ``i``, from the file checked to be the one read at the start."""
        with _OPEN.lock:
            return os.pread(self._open(), int(self.lengths[i]), int(self.offsets[i]))

    def _retrying(self, read: Callable[[], bytes], delays: Sequence[float], where: str) -> bytes:
        """``read()``, tried again after each of ``delays`` while it raises an ``OSError`` (the file opened again
        by its path before each new try: a stale handle is not read again); the last try's error is raised."""
        for delay in delays:
            try:
                return read()
            except OSError as exc:
                log.warning("%s: reading the data file failed (%s); trying again in %g s", where, exc, delay, extra=AS_IT_HAPPENS)
            _wait(delay, where)
            self.close()
        return read()

    def _check_readable(self, i: int, error: OSError) -> None:
        """Record ``i`` could not be read (``error``): read another record, far from it in the file (not in the
        same bad block); when that fails too, the file is what cannot be read: :class:`DataFileUnreadable`."""
        n = len(self)
        j = (i + n // 2) % n
        if j != i:
            try:
                self._retrying(lambda: self._read(j), FILE_RETRY_DELAYS, f"{self.path}:{int(self.lines[j])}")
                return
            except OSError as exc:
                also = f", nor the record at line {int(self.lines[j])} ({exc})"
        else:
            also = " (its only record)"
        raise DataFileUnreadable(
            f"data file {self.path} cannot be read: not the record at line {int(self.lines[i])} ({error}){also}, "
            "each tried again. The file, or the disk or network mount it is on, is unreadable (a sample whose "
            "record alone cannot be read is skipped; this would skip them all). Check the storage (the system "
            "log: dmesg; the mount), restore the file at that path, then resume the run (--resume)") from error

    def __iter__(self) -> Iterator[Conversation]:
        for i in range(len(self)):
            yield self[i]

    def _open(self) -> int:
        """The file's descriptor, checked to hold what it held when the index was built (``_OPEN.lock`` held)."""
        fh = _OPEN.get(self._key)
        if fh is None:  # closed for another data file, or unpickled: the file is opened again, by its path
            try:
                fh = open(self._where, "rb")  # noqa: SIM115 -- held in _OPEN
            except FileNotFoundError as exc:
                raise DataFileGone(
                    f"data file {self.path} is gone: deleted or moved while the run read samples from it (this "
                    f"process had closed it -- it holds at most {_OPEN.limit} data files open, the least recently "
                    "read closed first, and closes one to read it again after a read error -- and found no file at "
                    f"{self._where} when it opened it again). Put the "
                    "file back there, the same bytes, and resume the run (--resume); a data file must stay where "
                    "it is until the run has stopped") from exc
            _OPEN.put(self._key, fh)
        self._check_unchanged(fh.fileno())
        return fh.fileno()

    def _check_unchanged(self, fd: int) -> None:
        now = self._file_identity(os.fstat(fd))
        if now == self._identity:
            return
        read = self._size  # the bytes read at the start: those the checksum is of
        if now[2] >= read and self._checksum is not None and _checksum(fd, read) == self._checksum:
            if now[2] > read and not self._grown:
                log.warning("data file %s grew by %d bytes since the run read it, its first %d bytes (the %d records "
                            "indexed) unchanged: records appended. The run reads on; the records appended are not "
                            "trained on in this run (a run started now reads them)", self.path, now[2] - read,
                            read, len(self))
                self._grown = True
            elif now[2] == read:
                log.info("data file %s: its modification time or inode changed, not its bytes: read on", self.path)
            self._identity = now  # checked once per change
            return
        raise DataFileChanged(
            f"data file {self.path} changed while the run read samples from it (it no longer holds the bytes "
            "read when the run started; records appended at its end would be read on); the samples a step draws "
            "are read from it as they are needed. Restore the "
            "file, or write changes to a new file and rename it over the old one once the run has stopped, then "
            "resume the run (--resume) to read the new one")

    def __getstate__(self) -> dict[str, Any]:  # a copy in another process opens the file again
        return {k: v for k, v in vars(self).items() if k != "_key"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._key = next(_KEYS)

    def close(self) -> None:
        with _OPEN.lock:
            _OPEN.close(self._key)

    def __del__(self) -> None:
        if "_key" in vars(self) and _OPEN is not None:  # _OPEN: None at interpreter exit
            try:
                self.close()
            except Exception:  # noqa: BLE001 -- a finalizer raises into nothing
                pass


def index_dataset(ds: Any, stage: str) -> tuple[ConversationIndex, list[str], list[str]]:
    """Read the data file of :class:`~mmllm.config.DatasetConfig` ``ds`` once, for ``stage``: its usable
    conversations as a :class:`ConversationIndex`, and the errors of the rest: the malformed records' (logged
    as :func:`~mmllm.data.formats.read_records` logs them) and those of caption pairs the stage cannot use."""
    parser = record_parser(ds.path, ds.format, getattr(ds, "root", None),
                           allow_outside_root=getattr(ds, "allow_outside_root", False),
                           embeddings=getattr(ds, "embeddings", None))
    offsets, lengths, lines = array("q"), array("q"), array("q")
    malformed, unusable = [], []
    summary = DataSummary()
    tally = KeyTally(parser.keys)
    fh = open(parser.path, "rb")  # noqa: SIM115 -- the index holds it open, to read samples from
    identity = ConversationIndex._file_identity(os.fstat(fh.fileno()))
    try:
        for lineno, (offset, length), got in parse_file(parser, fh, tally, _ScanLookups(parser)):
            if isinstance(got, str):
                malformed.append(got)
                continue
            if isinstance(got, CaptionPair):
                try:
                    conv = pair_to_conversation(got, stage)
                except ValueError as exc:
                    unusable.append(str(exc))
                    continue
            else:
                conv = got
            summary.add(conv)
            offsets.append(offset)
            lengths.append(length)
            lines.append(lineno)
        checksum: int | None = _checksum(fh.fileno(), identity[2])
        if ConversationIndex._file_identity(os.fstat(fh.fileno())) != identity:
            checksum = None  # changed while it was read: the first sample drawn says so
    except BaseException:
        fh.close()
        raise
    log_unknown_keys(parser, tally)
    log_skipped(parser.path, malformed)
    index = ConversationIndex(parser, stage, fh, _compact(offsets), _compact(lengths), _compact(lines), summary,
                              identity, checksum, tally.unknown())
    return index, malformed, unusable
