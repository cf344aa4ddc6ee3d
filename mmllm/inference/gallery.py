"""A self-contained HTML gallery of ``results.jsonl`` (relative paths, no scripts, no network)."""

from __future__ import annotations

import html
import json
import os
import tempfile
from pathlib import Path


def _media_tag(rel: str) -> str:
    src = html.escape(rel, quote=True)
    suffix = Path(rel).suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg", ".gif", ".webp"):
        return f'<img src="{src}" alt="{src}" class="media">'
    if suffix in (".wav", ".flac", ".mp3", ".ogg"):
        return f'<audio controls src="{src}"></audio>'
    if suffix in (".mp4", ".webm"):
        return f'<video controls loop muted autoplay playsinline src="{src}" class="media"></video>'
    return f'<a href="{src}">{src}</a>'


def write_gallery(out: Path) -> Path:
    records: dict[str, dict] = {}
    results = out / "results.jsonl"
    if results.is_file():
        for line in results.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[rec["id"]] = rec  # the latest record of an id wins
    rows = []
    for rec in records.values():
        body = (
            f'<p class="error">{html.escape(str(rec["error"]))}</p>'
            if rec.get("error")
            else f'<p class="text">{html.escape(rec.get("text", ""))}</p>'
            + "".join(_media_tag(f) for f in rec.get("files", []))
        )
        rows.append(
            f'<section><h2>{html.escape(rec["id"])}</h2>'
            f'<p class="prompt">{html.escape(rec.get("prompt", ""))}</p>{body}</section>'
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>mmllm results</title><style>"
        "body{font-family:sans-serif;max-width:960px;margin:auto}section{border-bottom:1px solid #ccc;padding:8px}"
        ".prompt{color:#555}.error{color:#b00}.media{width:192px;image-rendering:pixelated;margin:4px}"
        "</style></head><body><h1>mmllm results</h1>" + "".join(rows) + "</body></html>"
    )
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".index.", suffix=".html")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(page)
    os.replace(tmp, out / "index.html")
    return out / "index.html"
