"""A self-contained HTML gallery of ``results.jsonl``: inline CSS, relative paths, no scripts, no network.

One section per request (its latest record): id, prompt, the answer's text, its images, audio
players and videos -- or the error. Written atomically next to ``results.jsonl``.

Given the requests a run answered (:func:`write_gallery`'s ``current``), the page shows those, in the
requests file's order, and counts only them; records of requests no longer in the file (removed,
renamed, or a malformed line since fixed) are kept in ``results.jsonl`` and shown apart, folded, at the end.

Pages hold :data:`PAGE_SIZE` requests each (one page of 100,000 was 31 MB of HTML, which a browser showed only
after minutes): the first is ``index.html``, the others ``pages/index-N.html``; each counts the whole run and links
the first, last and nearby pages, and ``pages/failed.html``, the failed requests alone, each linking its section. ``results.jsonl`` is read as an index of where each request's latest record is
(:func:`latest_entries`), the records themselves a page at a time.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
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


def media_tag(rel: str, prefix: str = "") -> str:
    """The element that shows one output file (``rel``: relative to ``OUT``; ``prefix`` leads there from the page)."""
    src = html.escape(quote(prefix + rel), quote=True)
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


@dataclass(frozen=True, slots=True)
class Entry:
    """Where a request's latest record is in ``results.jsonl`` (its byte offset), the requests-file line it names,
    and whether it failed: what paging and counting the gallery need, without the record (a million parsed
    records held 4 GB)."""

    offset: int
    line: int | None
    failed: bool


def latest_entries(results: Path) -> dict[tuple[str, str], Entry]:
    """Each request's (and unreadable line's) latest record, by :func:`record_key`, in the order they first
    appear in ``results``; read line by line."""
    entries: dict[tuple[str, str], Entry] = {}
    if not results.is_file():
        return entries
    with open(results, "rb") as fh:
        offset = 0
        for raw in fh:
            rec = _parse(raw)
            if rec is not None:
                line = rec.get("line")
                entries[record_key(rec)] = Entry(offset, line if type(line) is int else None, bool(rec.get("error")))
            offset += len(raw)
    return entries


def _parse(raw: bytes) -> dict[str, Any] | None:
    """A results.jsonl line's record; None for a torn line or one that is no record."""
    try:
        rec = json.loads(raw.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):  # a torn line; an integer of over 4300 digits
        return None
    return rec if isinstance(rec, dict) and "id" in rec else None


def every_record(results: Path) -> Iterator[dict[str, Any]]:
    """Every record of ``results`` in order, earlier ones of a request too, each parsed once (a caller keeping
    what it needs of each request's latest, by :func:`record_key`, reads the file once: :func:`iter_latest` parses
    the latest records twice)."""
    if not results.is_file():
        return
    with open(results, "rb") as fh:
        for raw in fh:
            rec = _parse(raw)
            if rec is not None:
                yield rec


def read_records(results: Path, entries: Iterable[Entry]) -> Iterator[dict[str, Any]]:
    """The records at ``entries`` (from :func:`latest_entries` of ``results``), one at a time."""
    with open(results, "rb") as fh:
        for entry in entries:
            fh.seek(entry.offset)
            rec = _parse(fh.readline())
            if rec is not None:
                yield rec


def iter_latest(results: Path) -> Iterator[dict[str, Any]]:
    """:func:`latest_records`, one record at a time (results.jsonl read twice, never held whole). The file is
    opened for each pass: read it holding its folder's lock (:func:`mmllm.folder_lock.hold_folder`), or a run
    starting that folder afresh between the passes leaves the second nothing, or another file, to read."""
    entries = latest_entries(results)
    if entries:
        yield from read_records(results, entries.values())


def latest_records(results: Path) -> list[dict[str, Any]]:
    """Each request's (and unreadable line's) latest record, in the order they first appear in ``results``."""
    return list(iter_latest(results))


def _section(rec: dict[str, Any], prefix: str = "", anchor: str = "") -> str:
    """One request's section; ``prefix`` leads from the page to ``OUT`` (``../`` from ``pages/``); ``anchor``: its
    HTML id, which the page of failed requests links to."""
    parts = [f"<h2>{html.escape(str(rec['id']))}</h2>"]
    if rec.get("prompt"):
        parts.append(f'<p class="prompt">{html.escape(str(rec["prompt"]))}</p>')
    if rec.get("error"):
        stage = f" ({html.escape(str(rec['error_stage']))})" if rec.get("error_stage") else ""
        parts.append(f'<p class="error">error{stage}: {html.escape(str(rec["error"]))}</p>')
    else:
        parts.append(f'<p class="text">{html.escape(str(rec.get("text", "")))}</p>')
        parts.append("<div>" + "".join(media_tag(str(f), prefix) for f in rec.get("files", [])) + "</div>")
        seconds = rec.get("seconds") or {}
        timing = ", ".join(f"{k} {v:.3f}s" for k, v in seconds.items() if isinstance(v, (int, float)))
        parts.append(f'<p class="meta">seed {html.escape(str(rec.get("seed", "")))}; batch of '
                     f'{html.escape(str(rec.get("batch_size", "")))}; {html.escape(timing)}</p>')
    return (f"<section id='{anchor}'>" if anchor else "<section>") + "".join(parts) + "</section>"


def _line_of(line: Any) -> float:
    return line if isinstance(line, int) else float("inf")


def _by_line(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: _line_of(r.get("line")))


def _earlier(sections: str, count: int) -> str:
    return (f"<details class='earlier'><summary>{count} earlier record(s) of requests no longer in the requests file "
            "(kept in results.jsonl)</summary>" + sections + "</details>")


def _page(summary: str, body: str, nav: str = "", title: str = "mmllm results") -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{STYLE}</style></head><body><h1>{title}</h1><p class='meta'>{summary}</p>"
        + nav + body + nav
        + "</body></html>"
    )


def render_gallery(records: list[dict[str, Any]], earlier: list[dict[str, Any]] | None = None) -> str:
    """The page; requests in the order of their lines in the requests file where records say it. ``earlier``:
    records of requests not in the requests file any more, listed apart (folded) after the others."""
    records = _by_line(records)
    failed = sum(1 for r in records if r.get("error"))
    apart = _earlier("".join(_section(r) for r in _by_line(earlier)), len(earlier)) if earlier else ""
    return _page(f"{len(records) - failed} done, {failed} failed", "".join(_section(r) for r in records) + apart)


PAGE_SIZE = 1000  # requests per gallery page: a browser shows a page of 100,000 (31 MB of HTML) only after minutes
PAGES = "pages"  # OUT's folder of the gallery's pages after the first (index.html)
FAILED_PAGE = "failed.html"  # in PAGES: the failed requests alone, each linking the page that shows it
FAILED_SHOWN = PAGE_SIZE  # failed requests listed there (the rest: results.jsonl, see docs/inference.md)
FIND_FAILED = "jq -c 'select(.error)' results.jsonl"  # every failure it holds (of requests answered since, too)


def page_name(page: int, from_pages: bool) -> str:
    """The link to gallery page ``page`` (1-based) from index.html, or from a page in ``pages/``."""
    if page == 1:
        return "../index.html" if from_pages else "index.html"
    return f"index-{page}.html" if from_pages else f"{PAGES}/index-{page}.html"


def _nav(page: int, pages: int, first: int, last: int, total: int) -> str:
    """Links to the first, previous, nearby, next and last pages (not all: a million requests make 1,000)."""
    if pages == 1:
        return ""
    from_pages = page > 1
    near = sorted({1, pages, *range(max(1, page - 3), min(pages, page + 3) + 1)})
    links, before = [], 0
    for p in near:
        if p - before > 1:
            links.append("...")
        links.append(f"<b>{p}</b>" if p == page else f"<a href='{page_name(p, from_pages)}'>{p}</a>")
        before = p
    step = [f"<a href='{page_name(page - 1, from_pages)}'>previous</a>"] if page > 1 else []
    step += [f"<a href='{page_name(page + 1, from_pages)}'>next</a>"] if page < pages else []
    return (f"<p class='meta'>page {page} of {pages} ({PAGE_SIZE} per page): entries {first}-{last} of {total}; "
            + " ".join(links) + " | " + " ".join(step) + "</p>")


def write_gallery(out: Path, current: dict[tuple[str, str], int] | None = None) -> Path:
    """Render ``out/results.jsonl`` into ``out/index.html`` (atomically), :data:`PAGE_SIZE` requests a page: the
    first page is ``index.html``, the others ``out/pages/index-N.html`` (pages no longer needed are removed).
    ``current``: the :func:`record_key` of each request of the requests file (and of each line that could not be
    read as one) -> its line; records of others go apart, after them (see :func:`render_gallery`). None: every
    record is current. Records are read a page at a time."""
    out = Path(out)
    results = out / "results.jsonl"
    entries = latest_entries(results)
    if current is None:
        shown = [(e, e.line) for e in entries.values()]
        apart: list[Entry] = []
    else:
        shown = [(e, current[k]) for k, e in entries.items() if k in current]
        apart = [e for k, e in entries.items() if k not in current]
    shown.sort(key=lambda item: _line_of(item[1]))
    apart.sort(key=lambda e: _line_of(e.line))
    failed = sum(e.failed for e, _ in shown)
    items = [(e, line, False) for e, line in shown] + [(e, e.line, True) for e in apart]
    pages = max(1, -(-len(items) // PAGE_SIZE))
    for page in range(1, pages + 1):
        chunk = items[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
        prefix = "../" if page > 1 else ""
        records = read_records(results, [e for e, _, _ in chunk]) if chunk else iter(())
        now, before = [], []
        for n, ((_, line, is_apart), rec) in enumerate(zip(chunk, records), (page - 1) * PAGE_SIZE + 1):
            (before if is_apart else now).append(_section({**rec, "line": line}, prefix, _anchor(n)))
        body = "".join(now) + (_earlier("".join(before), len(apart)) if before else "")
        nav = _nav(page, pages, (page - 1) * PAGE_SIZE + 1, (page - 1) * PAGE_SIZE + len(chunk), len(items))
        target = out / "index.html" if page == 1 else without_link(out / PAGES) / f"index-{page}.html"
        atomic_write_text(without_link(target), _page(_summary(len(shown), failed, page > 1), body, nav))
    first_failed = islice(((n, e) for n, (e, _, is_apart) in enumerate(items, 1) if e.failed and not is_apart),
                          FAILED_SHOWN)
    _write_failed_page(out, results, list(first_failed), failed, len(shown))
    _remove_pages_after(out / PAGES, pages)
    return out / "index.html"


def _anchor(n: int) -> str:
    """The HTML id of the gallery's ``n``-th entry (1-based), on whichever page shows it."""
    return f"e{n}"


def _summary(shown: int, failed: int, from_pages: bool) -> str:
    """The count a gallery page opens with; the failed ones link their own page."""
    if not failed:
        return f"{shown} done, 0 failed"
    link = FAILED_PAGE if from_pages else f"{PAGES}/{FAILED_PAGE}"
    return f"{shown - failed} done, {failed} failed (<a href='{link}'>list the failed</a>)"


def _write_failed_page(out: Path, results: Path, listed: list[tuple[int, Entry]], failed: int, shown: int) -> None:
    """``out/pages/failed.html``: the failed requests the gallery shows (``listed``: the first
    :data:`FAILED_SHOWN` of the ``failed``, by entry number), each with its error and a link to its section on the
    page that shows it; removed when none failed."""
    target = out / PAGES / FAILED_PAGE
    if not failed:
        if target.is_file() and not (out / PAGES).is_symlink():
            target.unlink()
        return
    rows = []
    for (n, _), rec in zip(listed, read_records(results, [e for _, e in listed])):
        page = (n - 1) // PAGE_SIZE + 1
        stage = f" ({html.escape(str(rec['error_stage']))})" if rec.get("error_stage") else ""
        rows.append(f"<section><h2><a href='{page_name(page, True)}#{_anchor(n)}'>{html.escape(str(rec['id']))}</a>"
                    f"</h2><p class='meta'>entry {n}, page {page}</p>"
                    f"<p class='error'>error{stage}: {html.escape(str(rec.get('error')))}</p></section>")
    more = (f"<p class='meta'>the first {len(listed)} of {failed} are listed here; every failure is a record "
            f"with an error in results.jsonl: <code>{html.escape(FIND_FAILED)}</code></p>"
            if failed > len(listed) else "")
    summary = (f"{failed} of {shown} requests failed (their latest answer); running the same mmllm infer "
               f"command again (without --overwrite, which answers every request again) retries them. "
               f"<a href='{page_name(1, True)}'>all requests</a>")
    atomic_write_text(without_link(without_link(out / PAGES) / FAILED_PAGE),
                      _page(summary, more + "".join(rows) + more, title="mmllm results: the failed requests"))


def _remove_pages_after(folder: Path, pages: int) -> None:
    """Remove the gallery pages numbered above ``pages`` (an earlier run's, for more requests), and the folder
    once empty."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for page in folder.glob("index-*.html"):  # (failed.html is written or removed with the gallery)
        number = page.stem.removeprefix("index-")
        if number.isdigit() and int(number) > pages:
            page.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()
