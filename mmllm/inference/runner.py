"""Batch inference: requests JSONL in; media files, ``results.jsonl`` and ``index.html`` out.

Request schema (one JSON object per line; media paths resolve relative to the requests file)::

    {"id": "r1", "prompt": "Draw a red circle."}
    {"id": "r2", "prompt": "<image>\\nWhat is this?", "media": ["cat.png"]}
    {"id": "r3", "prompt": "Describe it.", "image": "cat.png"}         # placeholder prepended for you
    {"id": "r4", "prompt": "Describe them.", "media": ["cat.png", "bell.wav"]}  # modality from the suffix
    {"id": "r5", "messages": [{"role": "user", "content": "<audio> what is it?", "media": ["a.wav"]},
                             {"role": "assistant", "content": "A bell."},
                             {"role": "user", "content": "Now show it as a picture."}],
     "seed": 3, "max_new_tokens": 32, "steps": 10, "guidance": 3.0}
    {"id": "r6", "messages": [{"role": "user", "content": "Draw a red circle."},
                             {"role": "assistant", "content": "Here it is.", "outputs": [{"modality": "image"}]},
                             {"role": "user", "content": "Now make a sound of it."}]}

An earlier assistant message that produced media lists them under ``outputs`` (as training data does; other keys,
such as a ``caption``, are allowed and not read): it is rendered with its signal tokens, as training renders that
turn. Each answer's record holds it as ``reply``, the message to give back in a later request.
A message's keys are ``role``, ``content``, ``media`` and ``outputs``; any other is not read, and a run warns about
it once per key (:func:`unknown_message_keys`). A message's text holding a special token's string (``<img_0>``, the
chat template's end-of-turn) is the request's error (:func:`mmllm.data.template.check_message_texts`).

Optional per-request overrides: ``seed`` (default ``--seed``), ``max_new_tokens``, ``temperature``
(0 = greedy, the default), ``top_p``, decoder ``steps`` and ``guidance`` (>= 0; <= 1 turns it off), finite
numbers all. A media field holding an empty path is an error (``null`` or ``[]``: no media).

A request's outputs do not depend on the batch it runs in (see :mod:`mmllm.inference.generate`).
A bad request (malformed line, missing / empty / corrupt / unsupported media, unknown modality,
a prompt longer than the context, ...) becomes an error record; every other request completes. A
batch that fails as a whole is retried one request at a time, so only the culprit fails.

Outputs under ``OUT``: ``media/`` (PNG, 16-bit WAV, MP4 -- GIF where no H.264 encoder is available
-- each carrying the request id, seed, prompt and checkpoint fingerprint in its metadata),
``results.jsonl`` (one record per request, appended as each batch finishes) and ``index.html`` (the
requests file's requests, 1000 a page, the pages after the first in ``pages/``; records of requests no longer in it
apart, see :mod:`mmllm.inference.gallery`).
Media files are written atomically and a record is appended only after all of its files exist,
so a crash never leaves something that looks done; a re-run on the same ``OUT`` skips the requests
already done and retries the failed ones. Each done record carries the checkpoint fingerprint and the
``settings`` it was answered with (seed, max_new_tokens, temperature, top_p, steps, guidance: the
request's own or the run's; the dtype and the device type; a digest of the request record and one of its input media
files' bytes; the :data:`RENDERING` of its prompt): a re-run whose checkpoint or settings differ from those of a request it would skip, or
whose input files were replaced, is refused (:class:`OutputError`) unless ``overwrite`` starts ``OUT``
afresh.

Requests go through the LLM ``--batch-size`` at a time; their signal groups then wait in one queue
per output modality (and decoder steps/guidance) and are decoded ``--decode-batch-size`` at a time
(default: the batch size), so each decoder runs on full batches even when requests mix modalities.

Record timings (seconds): ``prepare`` (this request's media loading and tokenisation), ``write``
(its files), ``llm`` -- the wall time of the LLM batch it was part of (``batch_size`` requests) --
and ``decode`` -- the wall time of the decoder calls its signal groups were part of.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmllm.atomic import fsync_dir, without_link
from mmllm.config import MODALITIES, check_guidance
from mmllm.data.formats import PLACEHOLDER_RE
from mmllm.data.keys import closest, did_you_mean, in_reading_order
from mmllm.data.media import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Audio,
    MediaError,
    Video,
    load_media,
    save_audio,
    save_image,
    save_video,
)
from mmllm.data.template import ContextLengthError, SpecialTextError
from mmllm.folder_lock import hold_folder
from mmllm.inference.gallery import (
    FAILED_PAGE,
    FIND_FAILED,
    PAGES,
    every_record,
    iter_latest,
    record_key,
    write_gallery,
)
from mmllm.inference.generate import (
    DecodeJob,
    PreparedRequest,
    Request,
    Settings,
    cut_off_note,
    decode_jobs,
    eval_mode,
    generate_answers,
    outputs_problem,
    prepare_request,
    run_decoder,
    token_spec,
)
from mmllm.memory import first_line, is_out_of_memory, ran_out_on_the_host, release_memory
from mmllm.progress import progress_bar

log = logging.getLogger(__name__)

MEDIA_SUFFIX = {"image": ".png", "audio": ".wav", "video": ".mp4"}
EXTENSIONS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS, "video": VIDEO_EXTENSIONS}
OVERRIDES: dict[str, type] = {"seed": int, "max_new_tokens": int, "temperature": float, "top_p": float,
                              "steps": int, "guidance": float}
FIELDS = {"id", "prompt", "messages", "media", *MODALITIES, *OVERRIDES}
MESSAGE_KEYS = in_reading_order(("role", "content", "media", "outputs"))  # what a request's message holds (others are not
# read), listed as data's warnings list a message's keys
GALLERY_EVERY_S = 30.0  # rewrite index.html at most this often during a run (and always at its end)
GALLERY_SHARE = 0.05  # ... and at most this share of the run's time: a rewrite reads all of results.jsonl


class RequestError(ValueError):
    """A request that cannot be run as written; the message says what to change."""


class OutputError(ValueError):
    """``OUT`` cannot be used as asked (not writable, or holds answers made otherwise); the message says why."""


class _FailFast(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Parsing requests
# --------------------------------------------------------------------------------------------


@dataclass
class ParsedRequest:
    id: str
    request: Request
    prompt_text: str
    inputs: list[str] = field(default_factory=list)


def _as_list(value: Any, what: str) -> list[str]:
    """A media field's paths; ``None`` (JSON null) and ``[]`` are no media. An empty path is refused, not
    taken as no media: ``"image": ""`` is most likely a path a script failed to fill in."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise RequestError(f"'{what}' must be a path or a list of paths, got {value!r}")
    if any(not v.strip() for v in items):
        raise RequestError(f"'{what}' holds an empty path ({value!r}): give the media file's path, or leave "
                           f"'{what}' out for a request without one")
    if any("\0" in v for v in items):  # no file has one; os.stat raised ValueError in every later run's checks
        raise RequestError(f"'{what}' holds a path with a NUL character ({value!r}), which no file name has")
    return items


def modality_of(path: str) -> str:
    suffix = Path(path).suffix.lower()
    matches = [m for m, exts in EXTENSIONS.items() if suffix in exts]
    if len(matches) != 1:
        why = "could be " + " or ".join(matches) if matches else "is not a known media type"
        raise RequestError(f"unknown modality for {path!r}: {suffix or 'no suffix'} {why}; "
                           f"use the 'image'/'audio'/'video' fields or a <modality> placeholder")
    return matches[0]


def _prompt_messages(rec: dict[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(rec["prompt"], str):
        raise RequestError("'prompt' must be a string")
    content = rec["prompt"]
    paths = _as_list(rec.get("media"), "media")
    if paths and not PLACEHOLDER_RE.search(content):  # no placeholders: one per file, by suffix
        content = "".join(f"<{modality_of(p)}>" for p in paths) + "\n" + content
    for m in MODALITIES:  # "image": "x.png" shorthand, placeholders prepended
        extra = _as_list(rec.get(m), m)
        if extra:
            content = "".join(f"<{m}>" for _ in extra) + "\n" + content
            paths = extra + paths
    return [{"role": "user", "content": content, "media": paths}]


def unknown_message_keys(rec: dict[str, Any]) -> list[tuple[int, str]]:
    """(message index, key) of each key of a request's messages that is not one of :data:`MESSAGE_KEYS`: it is not
    read, so a misspelt ``outputs`` or ``content`` changes the prompt without a word."""
    messages = rec.get("messages")
    if not isinstance(messages, list):
        return []
    return [(i, str(key)) for i, msg in enumerate(messages) if isinstance(msg, dict)
            for key in msg if key not in MESSAGE_KEYS]


def unknown_key_warning(where: str, index: int, key: str) -> str:
    """The warning of :func:`unknown_message_keys`' ``key`` of message ``index`` of the request at ``where``."""
    guess = did_you_mean(closest(key, MESSAGE_KEYS))
    return (f"{where}: messages[{index}] has the key {key!r}, which mmllm does not read (a message's keys: "
            f"{', '.join(MESSAGE_KEYS)}): it is ignored{guess} (said once per key of this file)")


def _check_not_cwd_relative(modality: str, given: Path, path: Path, base: Path) -> None:
    """A relative media path missing beside the requests file but found from the working directory: the
    paths of a requests file kept in another folder were written from where the command runs."""
    if not given.is_absolute() and not path.exists() and given.exists():
        raise MediaError(f"{modality} file not found: {path} (media paths are relative to the requests file's "
                         f"folder {base}; {given} is a file from the working directory {Path.cwd()}: write it "
                         "relative to the requests file, or absolute)")


def _load(modality: str, path: Path) -> Any:
    try:
        return load_media(modality, path)
    except MediaError as exc:
        suffix = path.suffix.lower()
        if path.is_file() and path.stat().st_size and suffix not in EXTENSIONS.get(modality, set()):
            raise MediaError(f"unsupported {modality} file {path} ({suffix or 'no suffix'}; "
                             f"supported: {', '.join(sorted(EXTENSIONS[modality]))}): {exc}") from exc
        raise


def _refuse_empty_fields_beside_messages(rec: dict[str, Any]) -> None:
    """A media field holding an empty path beside ``messages`` is named as such (it is also "both messages and
    media", but the empty path is most likely a path a script failed to fill in)."""
    for m in (*MODALITIES, "media"):
        value = rec.get(m)
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and any(isinstance(v, str) and not v.strip() for v in items):
            raise RequestError(f"'{m}' holds an empty path ({value!r}) beside 'messages': leave '{m}' out; a "
                               "messages request gives its media inside its messages (a message's 'media' list)")


def parse_request(rec: dict[str, Any], base: Path, default_seed: int, load: bool = True) -> ParsedRequest:
    """A request record -> messages and decoded media (their paths with ``load=False``).
    Raises RequestError / MediaError."""
    rid = rec["id"]
    unknown = sorted(set(rec) - FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; valid: {sorted(FIELDS)}")
    if "messages" in rec:
        _refuse_empty_fields_beside_messages(rec)
        if "prompt" in rec or any(rec.get(m) not in (None, []) for m in (*MODALITIES, "media")):
            raise RequestError("give either 'messages' (media inside them) or 'prompt' (+ media), not both")
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RequestError("'messages' must be a non-empty list")
    elif "prompt" in rec:
        msgs = _prompt_messages(rec)
    else:
        raise RequestError("needs 'prompt' or 'messages'")
    messages, media, inputs = [], [], []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}]: needs a role of system/user/assistant")
        content = msg.get("content", "")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}]: 'content' must be a string")
        paths = _as_list(msg.get("media"), f"messages[{i}].media")
        slots = PLACEHOLDER_RE.findall(content)
        if len(slots) != len(paths):
            raise RequestError(f"messages[{i}]: {len(slots)} placeholder(s) but {len(paths)} media path(s)")
        for modality, p in zip(slots, paths):
            given = Path(p).expanduser()  # as the data formats' media paths are
            path = given if given.is_absolute() else base / given
            if load:
                _check_not_cwd_relative(modality, given, path, base)
            media.append((modality, _load(modality, path) if load else path))
            inputs.append(str(path))
        problem = outputs_problem(msg)
        if problem:
            raise RequestError(f"messages[{i}]: {problem}")
        outputs = [{"modality": o["modality"]} for o in msg.get("outputs") or []]
        messages.append({"role": msg["role"], "content": content, **({"outputs": outputs} if outputs else {})})
    if messages[-1]["role"] != "user":
        raise RequestError("the last message must be the user's")
    if not messages[-1]["content"].strip():
        raise RequestError(_empty_prompt_error(msgs[-1], len(msgs) - 1))
    options = {}
    for key, kind in OVERRIDES.items():
        if key in rec:
            value = rec[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RequestError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN and Infinity parse as floats
                raise RequestError(f"'{key}' must be a finite number, got {value}")
            if kind is int and value != int(value):
                raise RequestError(f"'{key}' must be an integer, got {value!r}")
            options[key] = kind(value)
    _check_ranges(options)
    seed = options.pop("seed", default_seed)
    return ParsedRequest(rid, Request(messages, media, seed, **options), messages[-1]["content"], inputs)


def _empty_prompt_error(msg: dict[str, Any], index: int) -> str:
    """Why the last message's text is empty: a misspelt ``content`` ("contnet") is named, with the key it likely
    meant, rather than only "the prompt is empty" (its warning, logged just before, is easily missed)."""
    unknown = [str(key) for key in msg if key not in MESSAGE_KEYS]
    if not unknown:
        return "the prompt is empty"
    guess = next((g for key in unknown if (g := closest(key, MESSAGE_KEYS))), None)
    return (f"messages[{index}]: the prompt is empty; the message has the key(s) {', '.join(map(repr, unknown))}, "
            f"which mmllm does not read (a message's keys: {', '.join(MESSAGE_KEYS)}){did_you_mean(guess)}")


def _check_ranges(options: dict[str, Any]) -> None:
    rules = {"max_new_tokens": (1, "at least 1"), "steps": (1, "at least 1"), "temperature": (0, "at least 0"),
             "seed": (0, "at least 0"), "guidance": (0, "at least 0 (at most 1 turns guidance off)")}
    for key, (low, text) in rules.items():
        if key in options and options[key] < low:
            raise RequestError(f"'{key}' must be {text}, got {options[key]}")
    if options.get("seed", 0) >= 2**63:
        raise RequestError(f"'seed' must be below 2**63, got {options['seed']}")
    if "top_p" in options and not 0 < options["top_p"] <= 1:
        raise RequestError(f"'top_p' must be in (0, 1], got {options['top_p']}")


# --------------------------------------------------------------------------------------------
# The results file
# --------------------------------------------------------------------------------------------


NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record to ``path`` and fsync it (one record; a run writes through :class:`_ResultsLog`)."""
    with _ResultsLog(path) as results:
        results.append(record)


SYNC_EVERY_S = 1.0  # fsync results.jsonl at most this often during a run (and at its end)


class _ResultsLog:
    """``results.jsonl``, open for appending for one run. Each record is written at once (a killed run loses
    none: it is in the kernel's hands) and fsynced at most SYNC_EVERY_S seconds after it is written: with the
    record that comes that long after the last fsync, or else by a timer (a thread) armed by the first record not
    synced yet, so records written before a long step (a decoder batch of minutes) do not wait for the next record;
    and when the log closes. An fsync per record took 3.5 ms on a local disk, 60% of a run of text requests on the
    tiny model. A power loss loses at most the last second's records, whose requests a re-run answers again (their
    media files are written atomically, and replaced).

    ``folders``: folders whose renames (the media files written beside the records, atomically but without
    fsyncing their folder) are fsynced before each fsync of the log, so a record that survives a power loss
    has its files too (a media file cost two fsyncs, its own and its folder's)."""

    def __init__(self, path: Path, folders: tuple[Path, ...] = ()):
        self.path, self.fh, self.synced = path, None, time.monotonic()  # opened at the first record
        self.folders, self.renamed = folders, False  # renamed: a file was renamed into a folder since the last fsync
        self.lock = threading.Lock()  # the timer's fsync against the run's appends and close
        self.timer: threading.Timer | None = None  # armed while a record waits for its fsync
        self.timer_error: OSError | None = None  # the timer's failed fsync, raised by the run's next call here

    def append(self, record: dict[str, Any]) -> None:
        with self.lock:
            if self.fh is None:  # never through a link (refused up front by prepare_output; one made since: ELOOP)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW, 0o666)
                self.fh = open(fd, "a", encoding="utf-8")
            self.fh.write(json.dumps(record, default=str) + "\n")
            self.fh.flush()
            self._raise_timer_error()
            if time.monotonic() - self.synced >= SYNC_EVERY_S:
                self._sync()
            elif self.timer is None:
                self.timer = threading.Timer(SYNC_EVERY_S, self._sync_waiting)
                self.timer.daemon = True
                self.timer.start()

    def files_renamed(self) -> None:
        """Media files were renamed into :attr:`folders` (without an fsync of the folder): fsync it before the log."""
        self.renamed = True

    def _sync_waiting(self) -> None:
        """The timer's: fsync the records waiting for it (the run is in a long step, writing none)."""
        with self.lock:
            self.timer = None
            if self.fh is not None and not self.fh.closed:
                try:
                    self._sync()
                except OSError as exc:  # kept for the run to raise: the kernel reports a failed write-back once,
                    self.timer_error = exc  # to this fsync -- the run's next fsync of the same file succeeds

    def _raise_timer_error(self) -> None:
        """Raise (in the run's thread) the error of an fsync the timer made, if one failed: the records written
        before it may not be on disk, and the run must not go on (or end) as if they were."""
        error, self.timer_error = self.timer_error, None
        if error is not None:
            raise OSError(error.errno, f"{self.path}: an fsync failed ({error.strerror or error}); the records "
                          "written before it may not be on disk. Free or fix the disk and run the same command "
                          "again: it answers the requests not recorded") from error

    def _sync(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.renamed:
            # cleared first: a file renamed while the folders are fsynced (the run writes media while the timer
            # fsyncs) sets it again, so the fsync before the log's next one covers that file's rename too
            self.renamed = False
            try:
                for folder in self.folders:
                    if folder.is_dir():
                        fsync_dir(folder)
            except BaseException:
                self.renamed = True
                raise
        if self.fh is not None:
            self.fh.flush()  # a record an interrupted append left in the buffer (a Ctrl-C before its flush) too
            os.fsync(self.fh.fileno())
        self.synced = time.monotonic()

    def close(self) -> None:
        with self.lock:
            if self.fh is not None and not self.fh.closed:
                try:
                    self._sync()
                finally:
                    self.fh.close()
            elif self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self._raise_timer_error()

    def __enter__(self) -> _ResultsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _repair_tail(results: Path) -> None:
    """Drop a partial last line left by a crash, so the next append starts on a fresh line."""
    if not results.is_file() or results.stat().st_size == 0:
        return
    keep = _end_of_last_line(results)
    if keep == results.stat().st_size:
        return
    log.warning("%s: dropping a partial last record (an interrupted run)", results)
    fd = os.open(results, os.O_WRONLY | NO_FOLLOW)
    try:
        os.ftruncate(fd, keep)
    finally:
        os.close(fd)


def _end_of_last_line(path: Path, block: int = 1 << 16) -> int:
    """The size ``path`` has up to and with its last newline (0 if it has none), read from its end: the whole
    file (a million records, 0.5 GB) was read to look at its last byte."""
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - block)
            fh.seek(start)
            found = fh.read(end - start).rfind(b"\n")
            if found >= 0:
                return start + found + 1
            end = start
    return 0


def _is_done(out: Path, rec: dict[str, Any]) -> bool:
    return not rec.get("error") and all(_is_nonempty_file(os.path.join(out, f)) for f in rec.get("files", []))


def _is_nonempty_file(path: str) -> bool:
    """One stat (two through pathlib: 14% of a resume's check at 100,000 requests, half with an image)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size > 0


def done_ids(results: Path) -> set[str]:
    """Requests whose latest record has no error and all of whose files exist (non-empty)."""
    return {str(rec["id"]) for rec in iter_latest(results) if _is_done(results.parent, rec)}


def pending_lines(lines: list[_Line], out: Path, done: set[str] | None = None) -> list[_Line]:
    """The requests a run into ``out`` still has to handle: not done there, or malformed (reported again).
    ``done``: the ids :func:`check_resume` found done there (holding ``out``'s lock since), else read again."""
    if done is None:
        done = done_ids(Path(out) / "results.jsonl")
    return [ln for ln in lines if ln.id not in done or ln.error]


def run_settings(checkpoint: Path | None, dtype: str, seed: int = 0, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, steps: int | None = None,
                 guidance: float | None = None, device: str = "cpu") -> dict[str, Any]:
    """What changes a run's answers, as done records store it: the checkpoint fingerprint and ``settings``.

    The device is kept by its type (``cpu``, ``cuda``, ...): CPU and GPU kernels round differently, so a greedy
    answer can take another word; ``cuda:0`` and ``cuda:1`` are one type. Batch sizes are left out: answers
    do not depend on them (see the module docstring).
    """
    return {"checkpoint": checkpoint_fingerprint(checkpoint) if checkpoint else "none",
            "settings": {"seed": seed, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                         "steps": steps, "guidance": guidance, "dtype": dtype, "device": device_type(device)}}


def device_type(device: Any) -> str:
    """``cpu``, ``cuda``, ``mps``, ... of a device or its name (``cuda:1`` -> ``cuda``)."""
    import torch

    return torch.device(device).type


# How a request's messages become its prompt, as a done record keeps it (settings' "render"): 1, before it was
# recorded: an earlier answer's outputs were not rendered; 2: they render with their signal tokens, as training
# renders that turn. A change that renders some requests otherwise takes the next number, and
# :func:`rendered_alike` says which requests it changes.
RENDERING = 2


def request_settings(made: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """What one request is answered with: the run's settings (``made``, from :func:`run_settings`) with the
    request's own overrides, a digest of the request record (an edited prompt is another request) and the
    :data:`RENDERING` of its prompt."""
    own = {k: rec[k] for k in OVERRIDES if k in rec}
    digest = hashlib.sha1(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {**made["settings"], **own, "request": digest, "render": RENDERING}


def recorded_rendering(rec: dict[str, Any]) -> int:
    """The :data:`RENDERING` done record ``rec`` was answered with: its settings' "render"; before that was
    recorded, 2 where the record holds the answer's "reply" (written since an earlier answer's outputs render with
    their signal tokens), else 1."""
    render = rec.get("settings", {}).get("render")
    if isinstance(render, int):
        return render
    return 2 if "reply" in rec else 1


def rendered_alike(record: dict[str, Any], rendering: int) -> bool:
    """Whether request ``record`` renders to the prompt it had under ``rendering``: before 2, an earlier answer's
    outputs were left out, so a request whose messages give an assistant turn's outputs was another prompt (its
    record, and so its digest, the same). A newer mmllm's rendering (above :data:`RENDERING`) may differ for any
    request, which this one cannot tell: never alike. The prompt's ids are not digested instead: that needs the
    tokenizer before the model loads, and tokenizing every request of a resume."""
    if rendering != RENDERING:
        return rendering < RENDERING and _renders_alike_before_outputs(record)
    return True


def _renders_alike_before_outputs(record: dict[str, Any]) -> bool:
    """Whether request ``record`` rendered alike before an earlier answer's outputs were (rendering 1)."""
    messages = record.get("messages")
    return not (isinstance(messages, list) and any(isinstance(m, dict) and m.get("role") == "assistant"
                                                   and m.get("outputs") for m in messages))


def _render_difference(was: int, now: int) -> str:
    """How an answer's recorded rendering ``was`` differs from this mmllm's (``now``), in :func:`check_resume`'s
    refusal."""
    if was > now:
        return (f"a newer mmllm (its prompt rendering {was}; this one's is {now}, which may render the request "
                "otherwise)")
    return ("an older mmllm, whose prompt left out an earlier answer's outputs (now rendered with their signal "
            "tokens, as training renders that turn)")


def media_digest(paths: list[str]) -> str | None:
    """A digest of the bytes of a request's input media files (in order), so that a file replaced under the
    same name makes the answer stale; ``None`` when one of them is gone (nothing to compare with)."""
    digest = hashlib.sha256()
    for name in paths:
        try:
            with open(name, "rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
        except OSError:
            return None
    return digest.hexdigest()[:16]


def media_stats(paths: list[str]) -> list[list[int]] | None:
    """Each input file's size and modification time (ns), as a done record keeps them beside its
    :func:`media_digest`; ``None`` when one of them is gone."""
    try:
        return [[(st := os.stat(name)).st_size, st.st_mtime_ns] for name in paths]
    except OSError:
        return None


def _input_paths(record: dict[str, Any], base: Path) -> list[str] | None:
    """The input media paths a request names (not read); None for a record that is no request."""
    try:
        return parse_request(record, base, 0, load=False).inputs
    except RequestError:
        return None


def _current_media(record: dict[str, Any], base: Path, rec: dict[str, Any], same_request: bool) -> str | None:
    """The digest of the input files of request ``record`` as they are now. Files whose size and modification time
    are those the done record ``rec`` kept are taken to be the ones it digested (make's and rsync's quick check),
    so a re-run does not read every input file again; any other file is read and digested. A request the same as
    ``rec``'s (``same_request``) that named no file names none now: it is not parsed again (a quarter of a resume's
    check at 100,000 text requests)."""
    if same_request and rec.get("inputs") == []:
        return media_digest([])
    inputs = _input_paths(record, base)
    if inputs is None:
        return None
    stats = media_stats(inputs)
    if stats is not None and rec.get("inputs_stat") == stats and rec.get("inputs") == inputs:
        return rec.get("settings", {}).get("media")
    return media_digest(inputs)


def prepare_output(out: Path) -> Path:
    """Create ``out`` (and its parents); an :class:`OutputError` naming the folder if that is impossible."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".mmllm-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"--output {out}: cannot write there ({exc.strerror or exc}); "
                          f"give a folder you can create and write to") from exc
    results = out / "results.jsonl"
    if results.is_symlink():
        raise OutputError(f"--output {out}: its results.jsonl is a symbolic link (to {os.readlink(results)}), which "
                          "mmllm infer never makes: appending answers would write into that file, and resuming "
                          f"would cut its last line. Remove the link ({results}), or give another --output")
    return out


def check_resume(out: Path, requests_file: Path, made: dict[str, Any], lines: list[_Line] | None = None) -> set[str]:
    """Refuse (:class:`OutputError`) when a request ``out`` would skip was answered with another checkpoint or
    other settings than ``made`` (from :func:`run_settings`): skipping it would keep a stale answer. ``lines``:
    the requests file's, where the caller has read them (:func:`read_lines`). Returns the ids of the requests done
    in ``out`` (for :func:`pending_lines`: results.jsonl read once, not once more to find them: 1.6 of 6.5 CPU-s
    of a re-run of 100,000 requests). Each record is parsed once, and what it says of its request kept until a later
    record of the request replaces it (:func:`~mmllm.inference.gallery.iter_latest` parses the latest twice)."""
    results = Path(out) / "results.jsonl"
    if not results.is_file():
        return set()
    if lines is None:
        lines = read_lines(Path(requests_file))
    by_id = {ln.id: ln for ln in lines if not ln.error}
    verdicts: dict[tuple[str, str], Any] = {}  # each request's latest record's verdict (see _resume_verdict)
    for rec in every_record(results):
        verdicts[record_key(rec)] = _resume_verdict(rec, by_id, made, Path(requests_file).parent, results.parent)
    done: set[str] = set()
    stale, unrecorded = 0, 0
    differ: dict[str, tuple[Any, Any]] = {}  # setting -> (the first recorded value that differs, this run's)
    for verdict in verdicts.values():
        if verdict is None:
            continue
        rid, changed, recorded = (verdict, {}, True) if isinstance(verdict, str) else verdict
        done.add(rid)
        unrecorded += not recorded
        stale += bool(changed)
        for key, values in changed.items():
            differ.setdefault(key, values)
    if unrecorded:
        log.warning("%s: %d answer(s) from before mmllm recorded their settings: only their checkpoint is "
                    "compared with this run's", results, unrecorded)
    if differ:
        named = {"request": "another version of the request record",
                 "media": "other contents in its input media files (same names)",
                 "render": _render_difference(*differ.get("render", (RENDERING, RENDERING)))}
        what = ", ".join(named.get(k) or f"{k} {was!r} (now {value!r})" for k, (was, value) in differ.items())
        raise OutputError(f"--output {out}: {stale} request(s) of {requests_file} were answered there with "
                          f"{what}; resuming would skip them and keep those answers. Give a new --output, or "
                          f"pass --overwrite to start {out} afresh (its results.jsonl, media/, index.html and pages/ "
                          f"are replaced)")
    return done


def _resume_verdict(rec: dict[str, Any], by_id: dict[str, _Line], made: dict[str, Any], base: Path,
                    out: Path) -> str | tuple[str, dict[str, tuple[Any, Any]], bool] | None:
    """What :func:`check_resume` keeps of a record: None unless it is a done answer of a request of the requests
    file (``by_id``); else the request's id (the requests file's string: held once), alone where the answer was
    made as this run's would be (``made``), else with the settings in which it differs -- recorded value, this
    run's -- and whether it recorded its settings."""
    line = by_id.get(str(rec["id"]))
    if line is None or rec.get("error_stage") == "parse" or not _is_done(out, rec):
        return None
    old = {"checkpoint": rec.get("checkpoint"), **rec.get("settings", {})}
    record = line.record or {}
    now = {"checkpoint": made["checkpoint"], **request_settings(made, record)}
    if old.get("media") is not None:  # the request's input files as they are now
        same = now["request"] == old.get("request")
        now["media"] = _current_media(record, base, rec, same) or old["media"]
    changed = {k: (old[k], now[k]) for k in now if k in old and old[k] != now[k] and k != "render"}
    rendering = recorded_rendering(rec)
    if not rendered_alike(record, rendering):
        changed["render"] = (rendering, now["render"])
    return (line.id, changed, "settings" in rec) if changed or "settings" not in rec else line.id


def check_overwrite(out: Path, requests_file: Path, lines: list[_Line] | None = None) -> None:
    """Refuse (:class:`OutputError`) an ``overwrite`` that would delete the requests file or an input file of
    a request: what :func:`start_afresh` removes, ``out``'s results.jsonl, index.html and its ``media/``
    whole (results written next to their requests; the earlier results given as requests). ``lines``: the
    requests file's, where the caller has read them (:func:`read_lines`), as :func:`check_resume` takes them."""
    out, requests_file = Path(out), Path(requests_file)
    removed = [path.resolve() for path in _run_outputs(out)]
    if not removed:
        return  # start_afresh removes nothing

    def doomed(path: Path) -> bool:
        return any(path.resolve().is_relative_to(r) for r in removed)

    how = (f"it removes {out}'s results.jsonl, media/, index.html and pages/. Move the file out of there, or give "
           "another --output")
    if doomed(requests_file):
        raise OutputError(f"starting {out} afresh (--overwrite) would delete the requests file {requests_file}: "
                          f"{how}")
    for line in read_lines(requests_file) if lines is None else lines:
        record = line.record  # parsed from the line's text on each access: once here
        if record is None:
            continue
        for name in _input_paths(record, requests_file.parent) or []:
            if doomed(Path(name)):
                raise OutputError(f"starting {out} afresh (--overwrite) would delete {name}, an input of request "
                                  f"{line.id!r} ({requests_file}:{line.lineno}): {how}")


def _run_outputs(out: Path) -> list[Path]:
    """What a run wrote to ``out`` and :func:`start_afresh` removes: its results.jsonl, media/, index.html, pages/
    (``results.jsonl`` first); nothing where there is no ``results.jsonl`` (no run's outputs)."""
    if not (out / "results.jsonl").is_file():
        return []
    return [out / name for name in ("results.jsonl", "media", "index.html", PAGES) if (out / name).exists()]


def start_afresh(out: Path) -> None:
    """Remove what a run wrote to ``out`` (results.jsonl, media/, index.html, pages/), nothing else; a folder
    without a ``results.jsonl`` holds no run's outputs and is left as it is.

    ``results.jsonl`` goes first, in one rename: a crash part-way leaves at worst unlisted media files
    (overwritten by the new run), never old answers that look done.
    """
    out = Path(out)
    names = [path.name for path in _run_outputs(out)]
    if not names:
        return
    trash = out / f".overwritten-{time.time_ns()}"
    trash.mkdir()
    try:
        for name in names:
            (out / name).rename(trash / name)
            fsync_dir(out)
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    log.info("starting %s afresh: removed its earlier %s", out, ", ".join(names))


def checkpoint_fingerprint(checkpoint: Path) -> str:
    manifest = Path(checkpoint) / "manifest.json"
    data = manifest.read_bytes() if manifest.is_file() else str(checkpoint).encode()
    return hashlib.sha256(data).hexdigest()[:12]


STEM_BYTES = 100  # of an id's readable part: with the hash, suffix and atomic_write's temporary name, well below 255


def _safe(rid: str) -> str:
    """A file-name stem for an id: readable, and distinct for distinct ids; no separator, no leading dot, and at
    most 60 characters and STEM_BYTES bytes of the id (file names end at 255 bytes, and a letter can take 4)."""
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in rid)[:60].lstrip(".")
    while len(readable.encode()) > STEM_BYTES:
        readable = readable[:-1]
    return f"{readable}-{hashlib.sha1(rid.encode()).hexdigest()[:8]}"


def write_outputs(out: Path, rid: str, result, prompt: str, seed: int, fingerprint: str,
                  sync_folder: bool = True) -> list[str]:
    """Save a result's media under ``out/media``; the paths (relative to ``out``) actually written.
    ``sync_folder=False``: ``out/media`` is not fsynced after each file (the run's results log does it once before
    its own fsync, see :class:`_ResultsLog`)."""
    files = []
    # prompt last: a WAV comment is length-limited (see save_audio), and a cut should only shorten the prompt
    meta = {"mmllm_id": rid, "seed": str(seed), "checkpoint": fingerprint, "prompt": prompt}
    for modality, items in result.media.items():
        for j, item in enumerate(items):
            name = without_link(out / "media" / f"{_safe(rid)}_{modality}{j}{MEDIA_SUFFIX[modality]}")
            without_link(name.with_suffix(".gif"))  # where a video goes without an H.264 encoder
            if isinstance(item, Audio):
                path = save_audio(item, name, meta, sync_folder)
            elif isinstance(item, Video):  # MP4 keeps only standard tags such as "comment"
                path = save_video(item, name, {"comment": json.dumps(meta)}, sync_folder)
            else:
                path = save_image(item, name, meta, sync_folder)
            files.append(path.relative_to(out).as_posix())
    return files


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Line:
    """A non-blank line of a requests file: a request (``text``, the line as read) or a line that is none (``error``).

    The request is parsed again where it is needed (:attr:`record`) rather than kept parsed: a dict per request
    held 900 bytes where the line's text holds about 100 (a million requests: 0.9 GB against 0.1 GB)."""

    lineno: int
    id: str
    text: str | None = None
    error: str | None = None

    @property
    def record(self) -> dict[str, Any] | None:
        """The request as a dict, its id as a string; None for a line that is no request."""
        return None if self.text is None else {**json.loads(self.text), "id": self.id}


def gallery_keys(lines: list[_Line]) -> dict[tuple[str, str], int]:
    """What the gallery shows of a requests file: the :func:`~mmllm.inference.gallery.record_key` of each of
    its requests and unreadable lines -> its line (see :func:`~mmllm.inference.gallery.write_gallery`)."""
    return {(("line", str(ln.lineno)) if ln.error else ("id", ln.id)): ln.lineno for ln in lines}


def read_lines(requests_file: Path) -> list[_Line]:
    """Every non-blank line, parsed as far as a JSON object with an id; problems kept as errors."""
    out: list[_Line] = []
    seen: dict[str, int] = {}
    with open(requests_file, "rb") as fh:  # line by line: the file whole and its lines at once took 2x its size
        for lineno, raw in enumerate(fh, 1):
            if raw.strip():  # without its newline, as JSON error positions were given: "line 1 column N"
                _read_line(requests_file.name, lineno, raw.removesuffix(b"\n"), out, seen)
    return out


def _read_line(name: str, lineno: int, raw: bytes, out: list[_Line], seen: dict[str, int]) -> None:
    """Append line ``lineno`` (``raw``, not blank) to ``out`` as a request or as the reason it is none."""
    where = f"{name}:{lineno}"
    try:
        text = raw.decode("utf-8")
        rec = json.loads(text)
    except ValueError as exc:  # not UTF-8, not JSON, or an integer of more digits than Python converts (4300)
        out.append(_Line(lineno, f"line-{lineno}", error=f"{where}: malformed request (not valid JSON: {exc})"))
        return
    except RecursionError:  # "[[[[..." many thousand deep stopped the whole run with a traceback
        out.append(_Line(lineno, f"line-{lineno}", error=f"{where}: malformed request (JSON nested too deeply)"))
        return
    if not isinstance(rec, dict):
        out.append(_Line(lineno, f"line-{lineno}", error=f"{where}: malformed request (expected a JSON object)"))
        return
    rid = rec.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or not str(rid).strip():
        out.append(_Line(lineno, f"line-{lineno}", error=f"{where}: missing 'id' (a non-empty string)"))
        return
    rid = str(rid)
    if rid in seen:
        out.append(_Line(lineno, f"line-{lineno}",
                         error=f"{where}: duplicate id {rid!r} (first on line {seen[rid]})"))
        return
    seen[rid] = lineno
    out.append(_Line(lineno, rid, text))


@dataclass
class _InFlight:
    """A request past the LLM, waiting for its signal groups to be decoded."""

    parsed: ParsedRequest
    line: int
    result: Any
    seconds: dict[str, float]
    batch_size: int
    settings: dict[str, Any]  # what it is answered with (request_settings), for its record
    left: int = 0  # groups not decoded yet
    failed: bool = False


class _Run:
    """One ``run_requests`` call: the LLM batches, the decoder queues, the results file, the progress bar.

    Requests go through the LLM ``batch_size`` at a time. Their signal groups wait in one queue per
    (modality, steps, guidance) until ``decode_batch_size`` of them are there (or the input ends),
    so each decoder runs on full batches even when a batch of requests mixes modalities.
    """

    def __init__(self, model, out: Path, settings: Settings, batch_size: int, fail_fast: bool, fingerprint: str,
                 made: dict[str, Any], total: int):
        self.model, self.out, self.settings = model, out, settings
        self.batch_size, self.decode_batch_size = batch_size, settings.decode_batch_size or batch_size
        self.decode_sizes: dict[str, int] = {}  # a decoder's batch size after one of its batches ran out of memory
        self.fail_fast, self.fingerprint, self.made = fail_fast, fingerprint, made
        self.log = _ResultsLog(out / "results.jsonl", (out / "media",))  # closed by _answer_all
        self.counts = {"done": 0, "failed": 0, "skipped": 0}
        self.seconds = {"prepare": 0.0, "llm": 0.0, "decode": 0.0, "write": 0.0}
        self.queues: dict[tuple, list[DecodeJob]] = {}
        self.spec = token_spec(model)
        self.bar = progress_bar(total=total, desc="infer", unit="req", dynamic_ncols=True)
        self.dtype = next(model.parameters()).dtype  # what a request that runs out of memory alone is told
        self.unknown_keys: set[str] = set()  # message keys warned about (once per key)
        self.source: str | None = None  # what errors name a request by, if not its file and line (run_requests)

    def warn_unknown_keys(self, record: dict[str, Any], where: str) -> None:
        for index, key in unknown_message_keys(record):
            if key not in self.unknown_keys:
                self.unknown_keys.add(key)
                log.warning("%s", unknown_key_warning(where, index, key))

    def fail(self, rid: str, stage: str, error: str, **extra: Any) -> None:
        self.counts["failed"] += 1
        self.log.append({"id": rid, **extra, "error": error, "error_stage": stage})
        log.warning("request %s failed (%s): %s", rid, stage, error)
        self.bar.update(1)
        self.bar.set_postfix(failed=self.counts["failed"])
        if self.fail_fast:
            raise _FailFast(rid)

    # -------------------------------------------------------------- prepare and the LLM
    def run_batch(self, lines: list[_Line], requests_file: Path, default_seed: int) -> None:
        ready: list[tuple[ParsedRequest, PreparedRequest, float]] = []
        line_of: dict[str, int] = {}
        settings_of: dict[str, dict[str, Any]] = {}
        for line in lines:
            t0 = time.perf_counter()
            record = line.record or {}
            where = self.source or f"{requests_file.name}:{line.lineno}"
            self.warn_unknown_keys(record, where)
            try:
                parsed = parse_request(record, requests_file.parent, default_seed)
                prepared = prepare_request(self.model, parsed.request, self.spec)
            except (RequestError, SpecialTextError, MediaError, ContextLengthError) as exc:  # each named by its
                # line (or --prompt), as a malformed line is: "r.jsonl:4: image file not found: ..."
                self.fail(line.id, "prepare", f"{where}: {exc}", line=line.lineno)
                continue
            except Exception as exc:  # an input nobody foresaw: this request fails, the batch goes on
                self.fail(line.id, "prepare", f"{where}: {type(exc).__name__}: {exc}", line=line.lineno)
                continue
            ready.append((parsed, prepared, time.perf_counter() - t0))
            line_of[parsed.id] = line.lineno
            settings_of[parsed.id] = request_settings(self.made, record)
            self.seconds["prepare"] += ready[-1][2]
        for (parsed, prepared, prep_s), outcome in zip(ready, self.answer([p for _, p, _ in ready])):
            if isinstance(outcome, str):
                self.fail(parsed.id, "generate", outcome, line=line_of[parsed.id], prompt=parsed.prompt_text)
                continue
            result, llm_s = outcome
            if result.cut_off is not None:
                log.warning("request %s: %s", parsed.id, cut_off_note(result.cut_off))
            item = _InFlight(parsed, line_of[parsed.id], result, {"prepare": prep_s, "llm": llm_s, "decode": 0.0},
                             len(ready), settings_of[parsed.id])
            self.enqueue(item, prepared)
        self.drain(force=False)

    def answer(self, batch: list[PreparedRequest]) -> list[Any]:
        """(result, seconds) per request, or the error text of one that failed; a failed batch is retried one
        request at a time, after the memory it held is freed."""
        if not batch:
            return []
        t0 = time.perf_counter()
        try:
            results = generate_answers(self.model, batch, self.settings)
        except Exception as exc:  # any failure of one request must not stop the others
            if len(batch) == 1:
                log.debug("request failed", exc_info=True)
                return [failure_text(exc, alone_hints(self.dtype, ran_out_on_the_host(exc))[0])]  # the text: the exception's frames hold the attempt's tensors
            retry = retry_note(exc, len(batch), "the LLM's batch", "requests", "--batch-size")
            if retry[0]:
                self.batch_size = self.halved(self.batch_size, len(batch), "requests through the LLM", "--batch-size")
        else:
            elapsed = time.perf_counter() - t0
            self.seconds["llm"] += elapsed
            return [(r, elapsed) for r in results]
        # here, out of the except block, the failed attempt's tensors (held by its traceback) are gone
        return self.retry_one_by_one(retry, lambda p: self.answer([p])[0], batch)

    @staticmethod
    def halved(size: int, failed: int, what: str, flag: str, scope: str = "") -> int:
        """The batch size for the rest of the run after a batch of ``failed`` ran out of memory: half of it (the
        next batch of the same size would most likely run out too, and be retried one by one again), said once
        each time it changes. ``scope``: what else ``flag`` sets, where it sets more than this batch (appended
        to the hint, e.g. :data:`EVERY_DECODER`)."""
        smaller = min(size, max(1, failed // 2))
        if smaller < size:
            log.warning("ran out of memory at a batch of %d: the rest of this run takes %d %s at a time (give %s %d "
                        "to start there%s)", failed, smaller, what, flag, smaller, scope)
        return smaller

    def retry_one_by_one(self, note: tuple[bool, str], attempt: Any, items: list[Any]) -> list[Any]:
        """``attempt`` on each of ``items`` in turn, after a batch of them failed as ``note`` says (from
        :func:`retry_note`): out of memory, the CUDA cache is emptied first."""
        out_of_memory, text = note
        if out_of_memory:
            release_memory()
        log.warning("%s", text)
        return [attempt(item) for item in items]

    # -------------------------------------------------------------- the decoders
    def enqueue(self, item: _InFlight, prepared: PreparedRequest) -> None:
        jobs = decode_jobs(prepared, item.result, self.settings, owner=item)
        item.left = len(jobs)
        if not jobs:
            self.finish(item)
        for job in jobs:
            self.queues.setdefault(job.key, []).append(job)

    def drain(self, force: bool) -> None:
        """Decode full batches of waiting groups (and, when ``force``, the rest)."""
        for (modality, _, _), queue in self.queues.items():
            while len(queue) >= (size := self.decode_size(modality)) or (force and queue):
                chunk = [j for j in queue[:size] if not j.owner.failed]
                del queue[:size]
                if chunk:
                    self.decode(chunk)

    def decode_size(self, modality: str) -> int:
        """Signal groups per call of ``modality``'s decoder: ``--decode-batch-size``, halved after one of its
        batches ran out of memory (:meth:`halved`)."""
        return self.decode_sizes.get(modality, self.decode_batch_size)

    def decode(self, chunk: list[DecodeJob]) -> None:
        t0 = time.perf_counter()
        try:
            items = run_decoder(self.model, chunk)
        except Exception as exc:  # isolate the culprit: retry one group at a time
            if len(chunk) == 1:
                error = failure_text(exc, alone_hints(self.dtype, ran_out_on_the_host(exc))[1])  # the text: the exception's frames hold the attempt's tensors
            else:
                retry = retry_note(exc, len(chunk), f"the {chunk[0].modality} decoder's batch", "signal groups",
                                   "--decode-batch-size", EVERY_DECODER)
                if retry[0]:
                    modality = chunk[0].modality  # the others' decoders hold other amounts: theirs is kept
                    self.decode_sizes[modality] = self.halved(self.decode_size(modality), len(chunk),
                                                              f"signal groups per {modality} decoder call",
                                                              "--decode-batch-size", EVERY_DECODER)
        else:
            return self.decoded(chunk, items, time.perf_counter() - t0)
        # here, out of the except block, the failed attempt's tensors (held by its traceback) are gone
        if len(chunk) > 1:
            self.retry_one_by_one(retry, self.decode_alone, chunk)
            return
        owner = chunk[0].owner
        owner.failed = True
        self.fail(owner.parsed.id, "decode", error, line=owner.line, prompt=owner.parsed.prompt_text)

    def decode_alone(self, job: DecodeJob) -> None:
        if not job.owner.failed:  # another group of its request failed: no use decoding this one
            self.decode([job])

    def decoded(self, chunk: list[DecodeJob], items: list[Any], elapsed: float) -> None:
        """The media of a decoder call into their requests' results; a request whose last group this was is done."""
        self.seconds["decode"] += elapsed
        for job, media in zip(chunk, items):
            owner: _InFlight = job.owner
            owner.result.media[job.modality][job.index] = media
            owner.seconds["decode"] += elapsed
            owner.left -= 1
            if owner.left == 0 and not owner.failed:
                self.finish(owner)

    # -------------------------------------------------------------- outputs
    def finish(self, item: _InFlight) -> None:
        parsed, result = item.parsed, item.result
        t0 = time.perf_counter()
        try:
            files = write_outputs(self.out, parsed.id, result, parsed.prompt_text, parsed.request.seed,
                                  self.fingerprint, sync_folder=False)
        except Exception as exc:  # e.g. a full disk: this request fails, the run goes on
            self.fail(parsed.id, "write", f"{type(exc).__name__}: {exc}", line=item.line, prompt=parsed.prompt_text)
            return
        finally:
            self.log.files_renamed()  # media/ fsynced before the log's next fsync
        seconds = {**item.seconds, "write": time.perf_counter() - t0}
        self.seconds["write"] += seconds["write"]
        self.log.append({
            "id": parsed.id, "line": item.line, "prompt": parsed.prompt_text, "inputs": parsed.inputs, "text": result.text,
            "reply": result.reply, "cut_off": result.cut_off, "files": files, "seed": parsed.request.seed, "checkpoint": self.fingerprint,
            "settings": {**item.settings, "media": media_digest(parsed.inputs)},
            "inputs_stat": media_stats(parsed.inputs),
            "seconds": {k: round(v, 4) for k, v in seconds.items()}, "batch_size": item.batch_size,
            "error": None,
        })
        self.counts["done"] += 1
        self.bar.update(1)


def alone_hints(dtype: torch.dtype, host: bool = False) -> tuple[str, str]:
    """What the error record of a request that ran out of memory alone too says to change: (the LLM's, a
    decoder's). ``--dtype bfloat16`` only where the model is held in float32: a run given it already is told
    what else there is. ``host``: the machine's memory ran out (torch's CPU allocator), where --device cpu and a
    GPU are no way out."""
    smaller = "--dtype bfloat16 (or float16) holds the model in less" if dtype == torch.float32 else None
    llm = ", ".join(x for x in (smaller, "a smaller max_new_tokens needs less for the answer") if x)
    more = "a machine with more memory" if host else "a GPU with more memory, or --device cpu"
    decoder = smaller or f"the model is held in {str(dtype).removeprefix('torch.')} already: {more}"
    return (f"it ran out of memory answered alone too: {llm}", f"it ran out of memory decoded alone too: {decoder}")



def failure_text(exc: Exception, out_of_memory_hint: str) -> str:
    """A failed request's error, as its record keeps it: an out-of-memory error's first line (torch's advice
    about its allocator follows it) and ``out_of_memory_hint``."""
    if is_out_of_memory(exc):
        return f"{type(exc).__name__}: {first_line(exc)}; {out_of_memory_hint}"
    return f"{type(exc).__name__}: {exc}"


# what --decode-batch-size sets besides the batches of the decoder that ran out of memory: the run halves that
# decoder's alone (the others hold other amounts), a smaller --decode-batch-size makes every decoder's smaller
EVERY_DECODER = "; it sets every decoder's batch size, not this one's alone"


def retry_note(exc: Exception, size: int, what: str, items: str, flag: str, scope: str = "") -> tuple[bool, str]:
    """(out of memory?, the warning) for a batch of ``size`` ``items`` that failed with ``exc`` and is retried one
    by one; ``scope``: what else ``flag`` sets (as :meth:`_Run.halved` takes it)."""
    if is_out_of_memory(exc):
        return True, (f"{what} of {size} ran out of memory ({first_line(exc)}); freed the memory it held and "
                      f"retrying its {items} one at a time (a smaller {flag} avoids these retries{scope})")
    return False, f"{what} of {size} failed ({type(exc).__name__}: {exc}); retrying one by one"


def run_requests(
    model,
    requests_file: Path,
    out: Path,
    *,
    batch_size: int = 8,
    seed: int = 0,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    steps: int | None = None,
    guidance: float | None = None,
    decode_batch_size: int | None = None,
    fail_fast: bool = False,
    checkpoint: Path | None = None,
    overwrite: bool = False,
    gallery: str = "requests",
    resume_checked: bool = False,
    lines: list[_Line] | None = None,
    done: set[str] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Answer every request of ``requests_file`` into ``out``.

    Raises :class:`OutputError` when ``out`` cannot be written, or when a request it holds done was
    answered with another checkpoint or settings (see :func:`check_resume`) and ``overwrite`` is false;
    ``overwrite`` first removes the earlier results instead (:func:`start_afresh`), unless that would delete
    the requests file or an input file of a request (:func:`check_overwrite`).

    Returns counts -- ``done``, ``failed``, ``skipped`` (done in an earlier run), ``stopped`` (1 if
    ``fail_fast`` stopped the run) -- and ``seconds``: wall time per stage (prepare, llm, decode,
    write) and in ``total``. ``decode_batch_size`` (default ``batch_size``) is the number of signal
    groups per decoder call. ``gallery``: ``"requests"`` shows the requests of ``requests_file`` in
    ``index.html`` and the records of others ``out`` holds apart; ``"all"`` shows every record alike (one
    request per run, as ``mmllm infer --prompt`` makes, gathering in one ``out``). ``resume_checked``: the
    caller ran :func:`check_resume` for this ``out``, requests file and these settings, holding ``out``'s lock
    (``mmllm infer`` does, before it loads the model): it is not run again (seconds per 100,000 records).
    ``lines``: the requests file as the caller read it (:func:`read_lines`), given to :func:`check_resume` there:
    the run answers those, and does not read the file again (a second copy held beside the caller's: 0.28 GB at a
    million requests). ``done``: what that :func:`check_resume` returned (the requests done in ``out``), so that
    results.jsonl is not read again to find them. ``source``: what a request's error names it by, in place of
    ``FILE:LINE`` (``mmllm infer --prompt`` gives ``--prompt``: its requests file is a temporary one the user never
    wrote, gone once the run ends).
    """
    if gallery not in ("requests", "all"):
        raise ValueError(f"gallery must be 'requests' or 'all', got {gallery!r}")
    if batch_size < 1 or (decode_batch_size is not None and decode_batch_size < 1):
        raise ValueError(f"batch sizes must be >= 1, got {batch_size} / {decode_batch_size}")
    if guidance is not None:
        check_guidance(guidance)
    requests_file, out = Path(requests_file), prepare_output(Path(out))
    with hold_folder(out, "answering requests", "give this run another output folder"):  # see mmllm.folder_lock
        weight = next(model.parameters())
        made = run_settings(checkpoint, str(weight.dtype).removeprefix("torch."), seed, max_new_tokens, temperature,
                            top_p, steps, guidance, weight.device)
        if lines is None:
            lines = read_lines(requests_file)
        if overwrite:
            check_overwrite(out, requests_file, lines)
            start_afresh(out)
            done = set()
        elif not resume_checked:
            done = check_resume(out, requests_file, made, lines)
        results = out / "results.jsonl"
        _repair_tail(results)
        current = gallery_keys(lines) if gallery == "requests" else None
        todo = pending_lines(lines, out, done)
        settings = Settings(max_new_tokens, temperature, top_p, steps, guidance, decode_batch_size)
        run = _Run(model, out, settings, batch_size, fail_fast, made["checkpoint"], made, len(todo))
        run.source = source
        run.counts["skipped"] = len(lines) - len(todo)
        if run.counts["skipped"]:
            log.info("%d request(s) already done in %s: skipped", run.counts["skipped"], results)
        start = time.perf_counter()
        with eval_mode(model):  # a model that was training gets its modes back after the run
            stopped = _answer_all(run, todo, requests_file, seed, out, current)
        elapsed = time.perf_counter() - start
        n = run.counts["done"] + run.counts["failed"]
        log.info("%d request(s) in %.1f s (%.2f req/s): %d done, %d failed, %d skipped; gallery %s", n, elapsed,
                 n / elapsed if elapsed > 0 else 0.0, run.counts["done"], run.counts["failed"], run.counts["skipped"],
                 out / "index.html")
        return {**run.counts, "stopped": stopped, "seconds": {**run.seconds, "total": elapsed}}


def where_failed(out: Path, overwrite: bool = False) -> str:
    """Where a run's user finds its failed requests, and how to retry them (the line ``mmllm infer`` ends with);
    ``overwrite``: the run was given ``--overwrite``, which the retry must leave out (with it, every request is
    answered again)."""
    retry = "the same command without --overwrite" if overwrite else "the same command"
    return (f"failed requests: {out / PAGES / FAILED_PAGE} lists them with their errors (linked from "
            f"{out / 'index.html'}); every failure is a record with an error in {out / 'results.jsonl'} ("
            f"{FIND_FAILED.replace('results.jsonl', shlex.quote(str(out / 'results.jsonl')))}); {retry} "
            "retries only them")


def gallery_wait(cost: float) -> float:
    """Seconds to wait before rewriting the gallery again, one rewrite having taken ``cost``: at least
    GALLERY_EVERY_S, and long enough that rewrites take at most GALLERY_SHARE of the run (one takes seconds at
    100,000 records, and every 30 s it took a run of a million requests over, rewritten after every batch)."""
    return max(GALLERY_EVERY_S, cost / GALLERY_SHARE)


def _answer_all(run: _Run, todo: list[_Line], requests_file: Path, seed: int, out: Path,
                current: dict[tuple[str, str], int] | None) -> int:
    """Answer ``todo`` in batches of ``run.batch_size`` (halved where one ran out of memory), refreshing the
    gallery now and then and at the end; 1 if ``fail_fast`` stopped the run, else 0."""
    stopped = 0
    try:
        for line in [ln for ln in todo if ln.error]:
            run.fail(line.id, "parse", line.error or "", line=line.lineno)
        good = [ln for ln in todo if not ln.error]
        shown, cost = time.perf_counter(), 0.0
        start = 0
        while start < len(good):
            size = run.batch_size
            run.run_batch(good[start: start + size], requests_file, seed)
            start += size
            if time.perf_counter() - shown > gallery_wait(cost):  # a crash still leaves a recent gallery
                started = time.perf_counter()
                write_gallery(out, current)
                shown = time.perf_counter()
                cost = shown - started
        run.drain(force=True)
    except _FailFast as exc:
        log.error("stopping at the first failure (request %s; --fail-fast)", exc)
        stopped = 1
    finally:
        run.bar.close()
        run.log.close()
        write_gallery(out, current)
    return stopped
