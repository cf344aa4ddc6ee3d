"""Dataset files -> one normal form: :class:`Conversation` (or :class:`CaptionPair` for the alignment stages).

This module holds the normal form, the shared reading machinery (JSON Lines or a JSON array, with the
line of every record; media paths checked against the data root) and mmllm's own JSONL formats.
The readers of other layouts live beside it: :mod:`mmllm.data.nextgpt` (``nextgpt-pairs``,
``nextgpt-t2x``, ``nextgpt-mosit``) and :mod:`mmllm.data.llava` (``llava``).

``mmllm-pairs`` -- one media item and its caption per line (the alignment stages)::

    {"id": "img-001", "modality": "image", "media": "images/001.png", "caption": "a red circle"}
    {"id": "cap-007", "modality": "image", "caption": "a blue square"}   # caption only: decode-align

    optional: "embedding": "embed/001.npy" -- a precomputed conditioning target for the caption.

``mmllm-chat`` -- conversations with media in and out (the instruct stage)::

    {"id": "c1", "messages": [
      {"role": "user", "content": "<image>\\nWhat is this?", "media": ["images/001.png"]},
      {"role": "assistant", "content": "A red circle."},
      {"role": "user", "content": "Now draw it blue."},
      {"role": "assistant", "content": "Here it is.",
       "outputs": [{"modality": "image", "caption": "a blue circle", "media": "images/002.png"}]}]}

Each ``<image>``/``<audio>``/``<video>`` in a message's content takes the next path of that
message's ``media`` list. An assistant ``outputs`` entry becomes that modality's signal tokens at
the end of the reply; its ``caption`` is what the decoder's own text encoder turns into the
output projection's target, and its optional ``media`` is the target for the denoising loss.

Media paths resolve relative to the dataset's ``root`` (default: the data file's folder). A path
that leaves the root (``../``, or an absolute path elsewhere) is refused unless the dataset sets
``allow_outside_root: true``. The check is lexical: symbolic links that you placed *inside* the
root (say ``images -> /mnt/storage/coco``) are followed as you intended.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmllm.config import MODALITIES, ConfigError, files_named_in
from mmllm.data.keys import Keys, KeyTally, keys

log = logging.getLogger(__name__)

PLACEHOLDER_RE = re.compile(r"<(image|audio|video)>")
MAX_LOGGED_ERRORS = 20  # per file; the rest are counted, not logged one by one


class DataFormatError(ValueError):
    """A malformed record; the message names the file and line and says how to fix it."""


@dataclass
class MediaRef:
    modality: str
    path: Path


@dataclass
class OutputRef:
    modality: str
    caption: str
    path: Path | None = None  # target media (denoising loss)
    embedding: Path | None = None  # a precomputed conditioning target (.npy), e.g. NExT-GPT's


@dataclass
class Message:
    role: str
    content: str
    media: list[MediaRef] = field(default_factory=list)
    outputs: list[OutputRef] = field(default_factory=list)


@dataclass
class Conversation:
    id: str
    messages: list[Message]
    source: str = ""

    def media_refs(self) -> list[MediaRef]:
        return [r for msg in self.messages for r in msg.media]

    def output_refs(self) -> list[OutputRef]:
        return [o for msg in self.messages for o in msg.outputs]

    def empty_replies(self) -> int:
        """Assistant turns that say nothing and ask for no output: each one teaches only the template's
        end-of-turn marker (answer nothing), and is more often a conversion slip than a wish."""
        return sum(1 for m in self.messages if m.role == "assistant" and not m.content.strip() and not m.outputs)


@dataclass
class CaptionPair:
    id: str
    modality: str
    caption: str
    media: Path | None = None
    source: str = ""
    embedding: Path | None = None  # a precomputed conditioning target for the caption (.npy)
    # stage -> (user text, assistant text) replacing the default prompt of that stage; the
    # encode-align user text holds the media placeholder (NExT-GPT's comprehension/generation files)
    prompts: dict[str, tuple[str, str]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


@dataclass
class MediaRoot:
    """Resolves media paths against a data root, refusing those that leave it unless allowed."""

    root: Path
    allow_outside: bool = False

    def __post_init__(self) -> None:
        self.root = Path(os.path.abspath(Path(self.root).expanduser()))
        root = str(self.root)
        self._root = root
        self._inside = root if root.endswith(os.sep) else root + os.sep  # what a path under the root starts with

    def resolve(self, value: Any, where: str) -> Path:
        """The absolute, normalized path of ``value``, refused when it leaves the root."""
        return Path(self.resolve_str(value, where))

    def resolve_str(self, value: Any, where: str) -> str:
        """:meth:`resolve` as a string. Worked out on strings (os.path): pathlib's parsing took 38 us a path,
        most of the time it took to read a data file of 3 M caption pairs."""
        if not isinstance(value, str) or not value.strip():
            raise DataFormatError(f"{where}: expected a media path string, got {value!r}")
        p = os.path.expanduser(value.strip())
        full = os.path.normpath(p if os.path.isabs(p) else os.path.join(self._root, p))
        if not self.allow_outside and not self._under_root(full):
            raise DataFormatError(
                f"{where}: media path {value!r} resolves to {full}, outside the data root {self.root}; "
                "move the file under the root, point the dataset's `root:` at a folder that holds it, "
                "or set `allow_outside_root: true` on the dataset if this is intended"
            )
        return full

    def _under_root(self, full: str) -> bool:
        if full.startswith("//"):  # POSIX keeps a leading "//" as a root of its own: pathlib says what it means
            return Path(full).is_relative_to(self.root)
        return full == self._root or full.startswith(self._inside)


# --------------------------------------------------------------------------------------------
# Reading JSON Lines or a JSON array, keeping line numbers
# --------------------------------------------------------------------------------------------


class NotUtf8Error(DataFormatError):
    """Bytes that are not UTF-8, at ``line``."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.line)


def _not_utf8(path: Path, line: int, byte: int, column: int) -> NotUtf8Error:
    return NotUtf8Error(
        f"{path}:{line}: not valid UTF-8 (byte 0x{byte:02x} at column {column}); mmllm reads UTF-8 "
        "text: re-encode the file (e.g. `iconv -f latin1 -t utf-8`)", line
    )


Span = tuple[int, int]  # a record's bytes in its file: (offset, length)
LONE_CR = re.compile(rb"\r(?!\n)")


def _jsonl_lines(fh: Any) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes) of each line of a binary file, split as Python's text files split
    lines (at \\n, \\r\\n or a lone \\r), a UTF-8 byte order mark at its start left out."""
    lineno, pos = 0, 0
    for raw in fh:
        start, pos = pos, pos + len(raw)
        if start == 0 and raw.startswith(codecs.BOM_UTF8):
            raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
        if b"\r" not in raw:
            lineno += 1
            yield lineno, start, raw
            continue
        cut = 0
        for match in LONE_CR.finditer(raw):
            lineno += 1
            yield lineno, start + cut, raw[cut:match.end()]
            cut = match.end()
        if cut < len(raw):
            lineno += 1
            yield lineno, start + cut, raw[cut:]


_TOO_LONG_INT = (f"not valid JSON (an integer of more than {sys.get_int_max_str_digits()} digits, more than Python "
                 "reads: write it as a string)")


def _json_line(path: Path, lineno: int, line: str) -> dict[str, Any] | DataFormatError | None:
    """One JSON Lines line -> its record, the error that names it, or None (a blank line)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as exc:  # surrogateescape's stand-in for a byte that is not UTF-8
        column = len(line[:exc.start].encode("utf-8", "surrogateescape"))
        return _not_utf8(path, lineno, line[exc.start].encode("utf-8", "surrogateescape")[0], column + 1)
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        return DataFormatError(
            f"{path}:{lineno}: not valid JSON ({exc.msg}); mmllm reads JSON Lines (one object "
            "per line) or one JSON array of objects"
        )
    except RecursionError:  # "[[[[..." many thousand deep: a traceback that stopped reading the file
        return DataFormatError(f"{path}:{lineno}: not valid JSON (nested too deeply to read)")
    except ValueError:  # an integer of more digits than Python converts (4300): a traceback, as above
        return DataFormatError(f"{path}:{lineno}: {_TOO_LONG_INT}")
    if not isinstance(rec, dict):
        return DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
    return rec


def _scan_jsonl(path: Path, fh: Any) -> Iterator[tuple[int, dict[str, Any] | DataFormatError, Span]]:
    """(line number, record or DataFormatError, its bytes) for each non-blank line of the binary file ``fh``; a
    line that is not UTF-8 is an error of its own (an undecodable byte is kept as a lone surrogate, so one bad
    byte does not stop the whole file). Lines end as Python's text files end them: at \\n, \\r\\n or a lone
    \\r."""
    for lineno, start, raw in _jsonl_lines(fh):
        rec = _json_line(path, lineno, raw.decode("utf-8", "surrogateescape"))
        if rec is not None:
            yield lineno, rec, (start, len(raw))


def _complete_utf8(data: bytes) -> int:
    """The length of ``data`` without the UTF-8 character its last bytes begin but do not finish (a read cut
    it): those bytes are decoded with the next read's. Bytes that are not UTF-8 are left to the decoder."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: nothing is cut
            return len(data)
        if byte >= 0xC0:  # a lead byte: of a character of 2, 3 or 4 bytes
            size = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= size else len(data) - back
    return len(data)


class _Utf8Reader:
    """The text of a binary file from byte ``start`` on, read and decoded a bounded number of bytes at a time
    (never cutting a character); bytes that are not UTF-8 raise the :class:`NotUtf8Error` naming their line
    and column (in bytes, from the line's start; after the byte order mark on line 1)."""

    def __init__(self, path: Path, fh: Any, start: int):
        self.path, self.fh, self.start = path, fh, start
        self.offset = start  # of the next byte to decode
        self.carry = b""  # the bytes of a character a read cut, decoded with the next read's
        fh.seek(start)

    def read(self, size: int) -> str:
        """About ``size`` more bytes (at least one character) of the file as text; "" at its end."""
        while True:
            raw = self.fh.read(size)
            data = self.carry + raw
            cut = _complete_utf8(data) if raw else len(data)
            try:
                text = codecs.utf_8_decode(data[:cut] if cut < len(data) else data, "strict", True)[0]
            except UnicodeDecodeError as exc:
                raise self._not_utf8(data[exc.start], self.offset + exc.start) from None
            self.offset, self.carry = self.offset + cut, data[cut:]
            if text or not raw:
                return text

    def check(self, size: int) -> None:
        """Read the rest of the file ``size`` bytes at a time, only to raise if some are not UTF-8."""
        while raw := self.fh.read(size):
            if not self.carry and raw.isascii():  # most data files: nothing to decode
                self.offset += len(raw)
                continue
            data = self.carry + raw  # decoded where it was read, not read again (twice as fast)
            try:
                # a character the read cut is not used; the text is held until the next is decoded: one freed at
                # once made each 4 MiB string a fresh mmap of the allocator's, its pages faulted in (2x slower)
                _text, used = codecs.utf_8_decode(data, "strict", False)
            except UnicodeDecodeError as exc:
                raise self._not_utf8(data[exc.start], self.offset + exc.start) from None
            self.offset, self.carry = self.offset + used, data[used:]
        self.read(size)  # the bytes of a character the file's end cut

    def _not_utf8(self, byte: int, at: int) -> NotUtf8Error:
        """The error of the byte at ``at``: its line and column counted in the file read again up to it (a
        rare error; counting lines as the file is read would cost every file that is UTF-8)."""
        self.fh.seek(self.start)
        line, line_start, offset = 1, self.start, self.start
        while offset < at and (data := self.fh.read(min(JSON_ARRAY_CHUNK, at - offset))):
            line += data.count(b"\n")
            if (newline := data.rfind(b"\n")) >= 0:
                line_start = offset + newline + 1
            offset += len(data)
        return _not_utf8(self.path, line, byte, at - line_start + 1)


JSON_ARRAY_CHUNK = 1 << 22  # bytes of a JSON array file read at a time (4 MiB); a longer element is read whole
JSON_CUT_MARGIN = 64  # characters: a JSON error this near the end of the text read so far may be the read's cut
ARRAY_GAP = re.compile(r"[\s,]*")  # between the elements of an array


class _ArrayText:
    """The part of a JSON array file read and not yet consumed: its text, where that starts in the file (byte,
    line, column) and the byte offsets of its characters, asked for in increasing order."""

    def __init__(self, reader: _Utf8Reader):
        self.reader = reader
        self.text, self.eof = "", False
        self.byte, self.line, self.column = reader.offset, 1, 0  # of text[0]; column: characters before it
        self._char, self._byte, self.ascii = 0, self.byte, True  # the last byte offset asked for

    def extend(self, keep: int) -> bool:
        """Drop the text before ``keep`` and read more (at least as much again as is kept, so that an element
        read in many pieces is parsed a bounded number of times); False at the end of the file."""
        text = self.reader.read(max(JSON_ARRAY_CHUNK, len(self.text) - keep))
        if not text:
            self.eof = True
            return False
        byte = self.to_byte(keep)
        self.line += self.text.count("\n", 0, keep)
        newline = self.text.rfind("\n", 0, keep)
        self.column = keep - newline - 1 if newline >= 0 else self.column + keep
        self.text = self.text[keep:] + text
        self.byte = self._byte = byte
        self._char, self.ascii = 0, self.text.isascii()
        return True

    def to_byte(self, char: int) -> int:
        if self.ascii:
            return self.byte + char
        self._byte += len(self.text[self._char:char].encode("utf-8"))
        self._char = char
        return self._byte

    def line_and_column(self, char: int) -> tuple[int, int]:
        """The line and column (1-based, in characters) of ``text[char]`` in the file, as json counts them."""
        newline = self.text.rfind("\n", 0, char)
        column = char - newline if newline >= 0 else self.column + char + 1
        return self.line + self.text.count("\n", 0, char), column

    def may_be_cut(self, exc: json.JSONDecodeError) -> bool:
        """Whether a JSON error may come from the text read so far ending where it does: a string not closed
        by then, or an error found within a few characters of its end (a number, a literal or an escape cut)."""
        return not self.eof and (exc.pos >= len(self.text) - JSON_CUT_MARGIN
                                 or exc.msg.startswith("Unterminated string"))


def _may_go_on(element: Any, end: int, text: str) -> bool:
    """Whether an element parsed from ``text`` up to ``end`` may be the start of a longer one the read cut: a
    number that ends at the text's end ("12" of "12345"), or just before it ("1" of "1.5e3" cut after "1.",
    "1.5" cut after "1.5e-": the rest then read as a second element, not JSON, which stopped the reading)."""
    return end == len(text) or (type(element) in (int, float) and end >= len(text) - JSON_CUT_MARGIN)


def _iter_json_array(path: Path, reader: _Utf8Reader) -> Iterator[tuple[int, dict[str, Any] | DataFormatError, Span]]:
    """The elements of the JSON array whose text ``reader`` reads, as :func:`scan_records` yields them. The
    file is read :data:`JSON_ARRAY_CHUNK` bytes at a time; only the unconsumed part of the text is held (an
    element is kept whole until it is parsed)."""
    decoder = json.JSONDecoder()
    buf = _ArrayText(reader)
    while "[" not in buf.text:  # only whitespace before it (scan_records looked)
        if not buf.extend(len(buf.text)):
            yield 1, DataFormatError(f"{path}:1: no JSON array (the file changed while it was read?)"), (0, 0)
            return
    pos = buf.text.index("[")
    line, counted = buf.line + buf.text.count("\n", 0, pos), pos  # buf.line: lines of whitespace dropped
    pos += 1
    while True:
        text = buf.text
        pos = ARRAY_GAP.match(text, pos).end()
        line += text.count("\n", counted, pos)
        counted = pos
        if pos >= len(text):
            if buf.extend(pos):
                pos = counted = 0
                continue
            yield line, DataFormatError(f"{path}:{line}: the JSON array is not closed with ']'"), (0, 0)
            return
        if text[pos] == "]":
            return
        try:
            rec, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if buf.may_be_cut(exc) and buf.extend(pos):
                pos = counted = 0
                continue
            lineno, colno = buf.line_and_column(exc.pos)
            yield lineno, DataFormatError(
                f"{path}:{lineno}: not valid JSON ({exc.msg}, column {colno}); records after it "
                "cannot be read until it is fixed"
            ), (0, 0)
            return
        except RecursionError:
            yield line, DataFormatError(f"{path}:{line}: not valid JSON (nested too deeply to read); records after "
                                        "it cannot be read until it is fixed"), (0, 0)
            return
        except ValueError:
            yield line, DataFormatError(f"{path}:{line}: {_TOO_LONG_INT}; records after it cannot be read until it is "
                                        "fixed"), (0, 0)
            return
        if end > len(text) - JSON_CUT_MARGIN and _may_go_on(rec, end, text) and not buf.eof and buf.extend(pos):
            pos = counted = 0
            continue
        if isinstance(rec, dict):
            first = buf.to_byte(pos)
            yield line, rec, (first, buf.to_byte(end) - first)
        else:
            yield line, DataFormatError(f"{path}:{line}: expected a JSON object, got {type(rec).__name__}"), (0, 0)
        pos = end


def _unpaired_surrogate(value: Any) -> str | None:
    """The first string in a parsed record holding a lone surrogate (JSON allows the escape, UTF-8 does not),
    as the few characters around it, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return value[max(0, exc.start - 20):exc.end + 5]
        return None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        if (found := _unpaired_surrogate(item)) is not None:
            return found
    return None


def scan_records(path: Path, fh: Any) -> Iterator[tuple[int, dict[str, Any] | DataFormatError, Span]]:
    """Records of a JSON Lines file or of a JSON array file (``fh``: it, open in binary), with the line each
    starts on and its bytes in the file (:class:`~mmllm.data.index.ConversationIndex` reads one again)."""
    head = fh.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    fh.seek(0)
    if head.startswith(b"["):
        bom = len(codecs.BOM_UTF8) if fh.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
        try:  # one JSON array: nothing can be read until the whole file is UTF-8, so that is checked first
            _Utf8Reader(path, fh, bom).check(JSON_ARRAY_CHUNK)
            yield from _iter_json_array(path, _Utf8Reader(path, fh, bom))
        except NotUtf8Error as exc:
            yield exc.line, exc, (0, 0)
    else:
        yield from _scan_jsonl(path, fh)


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | DataFormatError]]:
    """Records of a JSON Lines file or of a JSON array file, with the line each starts on."""
    with open(path, "rb") as fh:
        for line, rec, _ in scan_records(path, fh):
            yield line, rec


# --------------------------------------------------------------------------------------------
# mmllm's own formats
# --------------------------------------------------------------------------------------------


@dataclass
class ReadContext:
    """What a record parser needs besides the record: where media and embeddings live."""

    path: Path
    media: MediaRoot
    embeddings: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)  # per-file memo of a reader (e.g. media subfolders)

    def embedding(self, name: Any, where: str) -> Path | None:
        """A precomputed-embedding file name -> its path in the ``embeddings`` folder (None if unset)."""
        if self.embeddings is None or not name:
            return None
        if not isinstance(name, str):
            raise DataFormatError(f"{where}: expected an embedding file name, got {name!r}")
        return self.embeddings / Path(name).name


PAIR_FIELDS = '{"id", "modality", "media", "caption"}'  # an mmllm-pairs record, as errors spell it
# the keys mmllm's formats read (others are ignored, and said: mmllm.data.keys)
PAIR_KEYS = keys({"id", "modality", "media", "caption", "embedding"})
CHAT_OUTPUT_KEYS = keys({"modality", "caption", "media", "embedding"}, what="an output")
CHAT_MESSAGE_KEYS = keys({"role", "content", "media", "outputs"}, {"outputs": CHAT_OUTPUT_KEYS},
                         refused=MODALITIES, what="a message")  # "image": PATH is refused, said as such
CHAT_KEYS = keys({"id", "messages"}, {"messages": CHAT_MESSAGE_KEYS})


def parse_pair(rec: dict[str, Any], ctx: ReadContext, where: str) -> CaptionPair:
    modality = rec.get("modality")
    if "modality" not in rec:
        raise DataFormatError(f"{where}: no 'modality' (one of {', '.join(MODALITIES)}); an mmllm-pairs record is "
                              f"{PAIR_FIELDS}, this one has the keys {sorted(rec)}")
    if modality not in MODALITIES:
        raise DataFormatError(f"{where}: modality {modality!r} is not one of {', '.join(MODALITIES)}")
    caption = rec.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        keys = "" if "caption" in rec else f"; an mmllm-pairs record is {PAIR_FIELDS}, this one has the keys {sorted(rec)}"
        raise DataFormatError(f"{where}: missing or empty 'caption'{keys}")
    media = ctx.media.resolve(rec["media"], f"{where}.media") if rec.get("media") else None
    embedding = ctx.media.resolve(rec["embedding"], f"{where}.embedding") if rec.get("embedding") else None
    return CaptionPair(str(rec.get("id", where)), modality, caption.strip(), media, where, embedding)


def parse_message(rec: dict[str, Any], ctx: ReadContext, where: str) -> Message:
    role = rec.get("role")
    if role not in ("system", "user", "assistant"):
        raise DataFormatError(f"{where}: role {role!r} is not system/user/assistant")
    content = rec.get("content", "")
    if not isinstance(content, str):
        raise DataFormatError(f"{where}: content must be a string")
    if shorthand := [m for m in MODALITIES if m in rec]:  # the requests file's shorthand, not read here
        raise DataFormatError(
            f"{where}: a message field {shorthand[0]!r}: in mmllm-chat a message lists its media files under 'media' "
            f"and marks where each goes with <{shorthand[0]}> in 'content' (\"{shorthand[0]}\": PATH is a requests "
            "file's shorthand only); as it is, the file would not be read"
        )
    paths = rec.get("media", []) or []
    if isinstance(paths, str):
        paths = [paths]
    slots = PLACEHOLDER_RE.findall(content)
    if slots and role == "assistant":
        raise DataFormatError(
            f"{where}: an assistant message with {', '.join(f'<{m}>' for m in slots)}: placeholders mark media "
            "*inputs*, which come from the user; an answer that produces media lists them under 'outputs' "
            "([{\"modality\": \"image\", \"caption\": \"...\"}]) and says it in words"
        )
    if len(slots) != len(paths):
        hint = (" (placeholders are lower-case: <image>, <audio>, <video>)"
                if re.search(r"<(?i:image|audio|video)>", content) and not slots else
                " (each media path needs its <image>, <audio> or <video> in 'content', where the media goes)"
                if len(paths) > len(slots) else "")
        raise DataFormatError(
            f"{where}: content has {len(slots)} media placeholder(s) {slots} but 'media' lists {len(paths)} path(s)"
            + hint
        )
    media = [MediaRef(m, ctx.media.resolve(p, f"{where}.media[{i}]")) for i, (m, p) in enumerate(zip(slots, paths))]
    outputs = []
    listed = rec.get("outputs", []) or []
    if not isinstance(listed, list):
        raise DataFormatError(f"{where}.outputs: expected a list of {{'modality': ..., 'caption': ...}}, got {listed!r}")
    for j, out in enumerate(listed):
        w = f"{where}.outputs[{j}]"
        if role != "assistant":
            raise DataFormatError(f"{w}: only assistant messages have outputs")
        keys = f"; it has the keys {sorted(out)}" if isinstance(out, dict) else f", got {out!r}"
        if not isinstance(out, dict) or out.get("modality") not in MODALITIES:
            raise DataFormatError(f"{w}: expected {{'modality': one of {MODALITIES}, 'caption': ...}}{keys}")
        caption = out.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise DataFormatError(f"{w}: missing or empty 'caption'" + ("" if "caption" in out else keys))
        target = ctx.media.resolve(out["media"], f"{w}.media") if out.get("media") else None
        embedding = ctx.media.resolve(out["embedding"], f"{w}.embedding") if out.get("embedding") else None
        outputs.append(OutputRef(out["modality"], caption.strip(), target, embedding))
    return Message(role, content, media, outputs)


def parse_chat(rec: dict[str, Any], ctx: ReadContext, where: str) -> Conversation:
    messages = rec.get("messages")
    if not isinstance(messages, list) or not messages:
        hint = (" (this record has 'conversations' with from/value turns: that is format: llava, or one of the "
                "nextgpt-* formats)" if "conversations" in rec else f" (its keys: {sorted(rec)})")
        raise DataFormatError(f"{where}: expected a non-empty 'messages' list{hint}")
    parsed = [parse_message(m if isinstance(m, dict) else {}, ctx, f"{where}.messages[{i}]")
              for i, m in enumerate(messages)]
    return checked_conversation(Conversation(str(rec.get("id", where)), parsed, where))


def checked_conversation(conv: Conversation) -> Conversation:
    """``conv`` without the turns after its last assistant message: nothing is learned from them, so no
    sample renders them, and their media would be read (and hashed, cached, checked) for no placeholder."""
    answers = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
    if not answers:
        raise DataFormatError(f"{conv.source}: no assistant message to learn from")
    del conv.messages[answers[-1] + 1:]
    return conv


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

Parser = Callable[[dict[str, Any], ReadContext, str], "CaptionPair | Conversation"]


def _parsers() -> dict[str, Parser]:
    from mmllm.data import llava, nextgpt

    return {
        "mmllm-pairs": parse_pair,
        "mmllm-chat": parse_chat,
        "nextgpt-pairs": nextgpt.parse_pair,
        "nextgpt-t2x": nextgpt.parse_t2x,
        "nextgpt-mosit": nextgpt.parse_mosit,
        "llava": llava.parse_llava,
    }


def _schemas() -> dict[str, Keys]:
    """Each format's keys, by format name (as :func:`_parsers`)."""
    from mmllm.data import llava, nextgpt

    return {"mmllm-pairs": PAIR_KEYS, "mmllm-chat": CHAT_KEYS, "nextgpt-pairs": nextgpt.PAIR_KEYS,
            "nextgpt-t2x": nextgpt.T2X_KEYS, "nextgpt-mosit": nextgpt.MOSIT_KEYS, "llava": llava.LLAVA_KEYS}


PAIR_FORMATS = ("mmllm-pairs", "nextgpt-pairs")  # records are CaptionPairs (the alignment stages)


@dataclass
class RecordParser:
    """How the records of one data file become normal-form records: its format's parser, its paths."""

    path: Path
    parse: Parser
    ctx: ReadContext
    format: str = ""
    keys: Keys | None = None  # the keys the format reads (None: not checked)

    def __call__(self, rec: dict[str, Any], lineno: int) -> Any:
        return self.parse(rec, self.ctx, f"{self.path}:{lineno}")


def record_parser(
    path: str | Path,
    fmt: str,
    root: str | Path | None = None,
    *,
    allow_outside_root: bool = False,
    embeddings: str | Path | None = None,
) -> RecordParser:
    """The parser of data file ``path`` in ``fmt``; refused (an error saying how to fix it) when the file, the
    format or the media root is not there."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"data file {path} is a folder; give a data file in it "
                                f"({files_named_in(path, '*.jsonl', '*.json')})")
    if not path.is_file():
        where = "" if path.is_absolute() else (f" (relative to the working directory {Path.cwd()}; a stage "
                                               "config's data paths are also looked up beside the config)")
        raise FileNotFoundError(f"data file not found: {path}{where}")
    parsers = _parsers()
    if fmt not in parsers:
        raise ConfigError(f"unknown data format {fmt!r}; valid formats: {', '.join(parsers)}")
    if root and not Path(root).expanduser().is_dir():  # every media path of the file would be missing
        raise FileNotFoundError(f"{path}: its media root {root} is not a folder; fix the dataset's `root:` "
                                "(or remove it: media paths then resolve against the data file's folder)")
    ctx = ReadContext(path, MediaRoot(Path(root) if root else path.parent, allow_outside_root),
                      Path(os.path.abspath(Path(embeddings).expanduser())) if embeddings else None)
    return RecordParser(path, parsers[fmt], ctx, fmt, _schemas()[fmt])


def parse_file(parser: RecordParser, fh: Any, tally: KeyTally | None = None,
               parse: Callable[[dict[str, Any], int], Any] | None = None) -> Iterator[tuple[int, Span, Any]]:
    """(line, bytes in the file, record or the error message naming it) of each record of the file open as
    ``fh`` (binary). Malformed records are reported, not fatal. ``tally``: counts the keys of each record
    (malformed ones too: a typo may be why) that the format does not read. ``parse``: parses a record in place of
    ``parser`` (one that tries a failed media lookup again)."""
    path = parser.path
    parse = parse or parser
    for lineno, rec, span in scan_records(path, fh):
        if isinstance(rec, DataFormatError):
            yield lineno, span, str(rec)
            continue
        if tally is not None:
            tally.see(rec, lineno)
        try:
            if (broken := _unpaired_surrogate(rec)) is not None:
                raise DataFormatError(
                    f"{path}:{lineno}: text with an unpaired UTF-16 surrogate ({broken!r}: a \\ud800-\\udfff "
                    "escape without its pair, e.g. an emoji cut in half), which no tokenizer can read; fix or "
                    "remove those characters"
                )
            yield lineno, span, parse(rec, lineno)
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:  # one bad record never stops
            # the file (OSError: a media path the file system refuses to look up, e.g. a name too long)
            yield lineno, span, str(exc) if isinstance(exc, DataFormatError) else \
                f"{path}:{lineno}: malformed record ({exc!r})"


def log_unknown_keys(parser: RecordParser, tally: KeyTally) -> None:
    """One warning per key of the file that its format does not read."""
    for key in tally.unknown():
        log.warning("%s", key.warning(parser.path, parser.format))
    if (more := tally.more_warning(parser.path, parser.format)) is not None:
        log.warning("%s", more)


def log_skipped(path: Path, errors: list[str]) -> None:
    for err in errors[:MAX_LOGGED_ERRORS]:
        log.warning("skipping record: %s", err)
    if len(errors) > MAX_LOGGED_ERRORS:
        log.warning("%s: %d more malformed record(s) skipped; `mmllm data check` lists them all",
                    path, len(errors) - MAX_LOGGED_ERRORS)


def read_records(
    path: str | Path,
    fmt: str,
    root: str | Path | None = None,
    *,
    allow_outside_root: bool = False,
    embeddings: str | Path | None = None,
) -> tuple[list[Any], list[str]]:
    """Read a data file in ``fmt``; returns (records, errors). Malformed records are reported, not fatal."""
    parser = record_parser(path, fmt, root, allow_outside_root=allow_outside_root, embeddings=embeddings)
    records, errors = [], []
    tally = KeyTally(parser.keys)
    with open(parser.path, "rb") as fh:
        for _, _, got in parse_file(parser, fh, tally):
            (errors if isinstance(got, str) else records).append(got)
    log_unknown_keys(parser, tally)
    log_skipped(parser.path, errors)
    return records, errors


def read_dataset(ds: Any) -> tuple[list[Any], list[str]]:
    """:func:`read_records` for a :class:`mmllm.config.DatasetConfig`."""
    return read_records(ds.path, ds.format, getattr(ds, "root", None),
                        allow_outside_root=getattr(ds, "allow_outside_root", False),
                        embeddings=getattr(ds, "embeddings", None))
