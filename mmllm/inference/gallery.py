"""A self-contained HTML gallery of ``results.jsonl``: inline CSS, relative paths, no scripts, no network.

One section per request (its latest record): id, prompt, the answer's text, its images, audio
players and videos -- or the error. Written atomically next to ``results.jsonl``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mmllm.atomic import atomic_write_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
VIDEO_SUFFIXES = (".mp4", ".webm")

STYLE = (
    "body{font-family:sans-serif;max-width:960px;margin:auto;padding:0 8px}"
    "section{border-bottom:1px solid #ccc;padding:8px 0}h2{font-size:1.1em;margin:4px 0}"
    ".prompt{color:#555;white-space:pre-wrap}.text{white-space:pre-wrap}.error{color:#b00;white-space:pre-wrap}"
    ".meta{color:#888;font-size:.85em}.media{width:192px;image-rendering:pixelated;margin:4px;vertical-align:top}"
    "audio{margin:4px;vertical-align:middle}"
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
            except json.JSONDecodeError:
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


def render_gallery(records: list[dict[str, Any]]) -> str:
    """The page; requests in the order of their lines in the requests file where records say it."""
    records = sorted(records, key=lambda r: r["line"] if isinstance(r.get("line"), int) else float("inf"))
    failed = sum(1 for r in records if r.get("error"))
    summary = f"{len(records) - failed} done, {failed} failed"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>mmllm results</title>"
        f"<style>{STYLE}</style></head><body><h1>mmllm results</h1><p class='meta'>{summary}</p>"
        + "".join(_section(r) for r in records)
        + "</body></html>"
    )


def write_gallery(out: Path) -> Path:
    """Render ``out/results.jsonl`` into ``out/index.html`` (atomically)."""
    out = Path(out)
    page = render_gallery(latest_records(out / "results.jsonl"))
    return atomic_write_text(out / "index.html", page)
