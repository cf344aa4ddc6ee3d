"""A self-contained HTML gallery of ``results.jsonl``: inline CSS, relative paths, no scripts, no network.

One section per request (its latest record): id, prompt, the answer's text, its images, audio
players and videos -- or the error. Written atomically next to ``results.jsonl``.

Given the requests a run answered (:func:`write_gallery`'s ``current``), the page shows those, in the
requests file's order, and counts only them; records of requests no longer in the file (removed,
renamed, or a malformed line since fixed) are kept in ``results.jsonl`` and shown apart, folded, at the end.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mmllm.atomic import atomic_write_text, without_link

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
VIDEO_SUFFIXES = (".mp4", ".webm")

STYLE = (
    "body{font-family:sans-serif;max-width:960px;margin:auto;padding:0 8px}"
    "section{border-bottom:1px solid #ccc;padding:8px 0}h2{font-size:1.1em;margin:4px 0}"
    ".prompt{color:#555;white-space:pre-wrap}.text{white-space:pre-wrap}.error{color:#b00;white-space:pre-wrap}"
    ".meta{color:#888;font-size:.85em}.media{width:192px;image-rendering:pixelated;margin:4px;vertical-align:top}"
    "audio{margin:4px;vertical-align:middle}details.earlier{margin-top:16px}summary{color:#555;padding:4px 0}"
)


def media_tag(rel: str) -> str:
    """The element that shows one output file (relative to the gallery)."""
    src = html.escape(quote(rel), quote=True)
    label = html.escape(rel)
    suffix = Path(rel).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return f'<img src="{src}" alt="{label}" title="{label}" class="media">'
    if suffix in AUDIO_SUFFIXES:
        return f'<audio controls preload="auto" src="{src}" title="{label}"></audio>'
    if suffix in VIDEO_SUFFIXES:
        return (f'<video controls loop muted autoplay playsinline preload="auto" src="{src}" '
                f'title="{label}" class="media"></video>')
    return f'<a href="{src}">{label}</a>'


def record_key(rec: dict[str, Any]) -> tuple[str, str]:
    """What a record answers: a request (by id), or a requests-file line that could not be read as one.

    The latter are labelled ``line-N`` for people, but a request may carry that id itself: keyed apart,
    a malformed line's error never replaces a request's answer.
    """
    if rec.get("error_stage") == "parse":
        return "line", str(rec.get("line", rec["id"]))
    return "id", str(rec["id"])


def latest_records(results: Path) -> list[dict[str, Any]]:
    """Each request's (and unreadable line's) latest record, in the order they first appear in ``results``."""
    records: dict[tuple[str, str], dict[str, Any]] = {}
    if results.is_file():
        for line in results.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):  # a torn line; an integer of over 4300 digits
                continue
            if isinstance(rec, dict) and "id" in rec:
                records[record_key(rec)] = rec
    return list(records.values())


def _section(rec: dict[str, Any]) -> str:
    parts = [f"<h2>{html.escape(str(rec['id']))}</h2>"]
    if rec.get("prompt"):
        parts.append(f'<p class="prompt">{html.escape(str(rec["prompt"]))}</p>')
    if rec.get("error"):
        stage = f" ({html.escape(str(rec['error_stage']))})" if rec.get("error_stage") else ""
        parts.append(f'<p class="error">error{stage}: {html.escape(str(rec["error"]))}</p>')
    else:
        parts.append(f'<p class="text">{html.escape(str(rec.get("text", "")))}</p>')
        parts.append("<div>" + "".join(media_tag(str(f)) for f in rec.get("files", [])) + "</div>")
        seconds = rec.get("seconds") or {}
        timing = ", ".join(f"{k} {v:.3f}s" for k, v in seconds.items() if isinstance(v, (int, float)))
        parts.append(f'<p class="meta">seed {html.escape(str(rec.get("seed", "")))}; batch of '
                     f'{html.escape(str(rec.get("batch_size", "")))}; {html.escape(timing)}</p>')
    return "<section>" + "".join(parts) + "</section>"


def _by_line(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: r["line"] if isinstance(r.get("line"), int) else float("inf"))


def render_gallery(records: list[dict[str, Any]], earlier: list[dict[str, Any]] | None = None) -> str:
    """The page; requests in the order of their lines in the requests file where records say it. ``earlier``:
    records of requests not in the requests file any more, listed apart (folded) after the others."""
    records = _by_line(records)
    failed = sum(1 for r in records if r.get("error"))
    summary = f"{len(records) - failed} done, {failed} failed"
    apart = ""
    if earlier:
        apart = (f"<details class='earlier'><summary>{len(earlier)} earlier record(s) of requests no longer in the "
                 "requests file (kept in results.jsonl)</summary>"
                 + "".join(_section(r) for r in _by_line(earlier)) + "</details>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>mmllm results</title>"
        f"<style>{STYLE}</style></head><body><h1>mmllm results</h1><p class='meta'>{summary}</p>"
        + "".join(_section(r) for r in records)
        + apart
        + "</body></html>"
    )


def write_gallery(out: Path, current: dict[tuple[str, str], int] | None = None) -> Path:
    """Render ``out/results.jsonl`` into ``out/index.html`` (atomically). ``current``: the :func:`record_key`
    of each request of the requests file (and of each line that could not be read as one) -> its line;
    records of others go apart (see :func:`render_gallery`). None: every record is current."""
    out = Path(out)
    records = latest_records(out / "results.jsonl")
    if current is None:
        return atomic_write_text(without_link(out / "index.html"), render_gallery(records))
    shown = [{**r, "line": current[record_key(r)]} for r in records if record_key(r) in current]
    earlier = [r for r in records if record_key(r) not in current]
    return atomic_write_text(without_link(out / "index.html"), render_gallery(shown, earlier))
