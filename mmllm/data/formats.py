"""mmllm's own data formats (JSONL), read into one normal form: a :class:`Conversation`.

``mmllm-pairs`` -- one media item and its caption per line (the alignment stages)::

    {"id": "img-001", "modality": "image", "media": "images/001.png", "caption": "a red circle"}
    {"id": "cap-007", "modality": "image", "caption": "a blue square"}   # caption only: decode-align

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
Media paths resolve relative to the data file's folder (or the dataset's ``root``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmllm.config import MODALITIES

log = logging.getLogger(__name__)

PLACEHOLDER_RE = re.compile(r"<(image|audio|video)>")


class DataFormatError(ValueError):
    """A malformed record; the message names the file and line."""


@dataclass
class MediaRef:
    modality: str
    path: Path


@dataclass
class OutputRef:
    modality: str
    caption: str
    path: Path | None = None


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


@dataclass
class CaptionPair:
    id: str
    modality: str
    caption: str
    media: Path | None = None
    source: str = ""


def _resolve(root: Path, value: str, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DataFormatError(f"{where}: expected a media path string, got {value!r}")
    p = Path(value)
    return p if p.is_absolute() else root / p


def iter_jsonl(path: Path):
    """(line number, record or DataFormatError) for each non-blank line."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, DataFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(rec, dict):
                yield lineno, DataFormatError(f"{path}:{lineno}: expected a JSON object")
                continue
            yield lineno, rec


def parse_pair(rec: dict[str, Any], root: Path, where: str) -> CaptionPair:
    modality = rec.get("modality")
    if modality not in MODALITIES:
        raise DataFormatError(f"{where}: modality {modality!r} is not one of {', '.join(MODALITIES)}")
    caption = rec.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise DataFormatError(f"{where}: missing or empty 'caption'")
    media = _resolve(root, rec["media"], where) if rec.get("media") else None
    return CaptionPair(str(rec.get("id", where)), modality, caption.strip(), media, where)


def parse_message(rec: dict[str, Any], root: Path, where: str) -> Message:
    role = rec.get("role")
    if role not in ("system", "user", "assistant"):
        raise DataFormatError(f"{where}: role {role!r} is not system/user/assistant")
    content = rec.get("content", "")
    if not isinstance(content, str):
        raise DataFormatError(f"{where}: content must be a string")
    paths = rec.get("media", []) or []
    if isinstance(paths, str):
        paths = [paths]
    slots = PLACEHOLDER_RE.findall(content)
    if len(slots) != len(paths):
        raise DataFormatError(
            f"{where}: content has {len(slots)} media placeholder(s) {slots} but 'media' lists {len(paths)} path(s)"
        )
    media = [MediaRef(m, _resolve(root, p, f"{where}.media[{i}]")) for i, (m, p) in enumerate(zip(slots, paths))]
    outputs = []
    for j, out in enumerate(rec.get("outputs", []) or []):
        w = f"{where}.outputs[{j}]"
        if role != "assistant":
            raise DataFormatError(f"{w}: only assistant messages have outputs")
        if not isinstance(out, dict) or out.get("modality") not in MODALITIES:
            raise DataFormatError(f"{w}: expected {{'modality': one of {MODALITIES}, 'caption': ...}}")
        caption = out.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise DataFormatError(f"{w}: missing or empty 'caption'")
        target = _resolve(root, out["media"], w) if out.get("media") else None
        outputs.append(OutputRef(out["modality"], caption.strip(), target))
    return Message(role, content, media, outputs)


def parse_chat(rec: dict[str, Any], root: Path, where: str) -> Conversation:
    messages = rec.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: expected a non-empty 'messages' list")
    parsed = [parse_message(m if isinstance(m, dict) else {}, root, f"{where}.messages[{i}]")
              for i, m in enumerate(messages)]
    if not any(m.role == "assistant" for m in parsed):
        raise DataFormatError(f"{where}: no assistant message to learn from")
    return Conversation(str(rec.get("id", where)), parsed, where)


def read_records(path: str | Path, fmt: str, root: str | Path | None = None) -> tuple[list[Any], list[str]]:
    """Read a JSONL file in ``fmt``; returns (records, errors). Malformed lines are reported, not fatal."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    base = Path(root) if root else path.parent
    parse = {"mmllm-pairs": parse_pair, "mmllm-chat": parse_chat}[fmt]
    records, errors = [], []
    for lineno, rec in iter_jsonl(path):
        if isinstance(rec, DataFormatError):
            errors.append(str(rec))
            continue
        try:
            records.append(parse(rec, base, f"{path}:{lineno}"))
        except (DataFormatError, KeyError) as exc:
            errors.append(str(exc))
    for err in errors:
        log.warning("skipping record: %s", err)
    return records, errors
