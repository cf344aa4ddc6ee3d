"""Batch inference: requests JSONL in; media files, ``results.jsonl`` and ``index.html`` out.

Request schema (one JSON object per line; media paths resolve relative to the requests file)::

    {"id": "r1", "prompt": "Draw a red circle."}
    {"id": "r2", "prompt": "<image>\\nWhat is this?", "media": ["cat.png"]}
    {"id": "r3", "prompt": "Describe it.", "image": "cat.png"}        # placeholder prepended for you
    {"id": "r4", "messages": [{"role": "user", "content": "<audio> what is it?", "media": ["a.wav"]},
                             {"role": "assistant", "content": "A bell."},
                             {"role": "user", "content": "Now show it as a picture."}],
     "seed": 3, "max_new_tokens": 32}

A bad request (malformed line, missing or corrupt media, unknown modality, too long) becomes an
error record; every other request completes. Requests already done in ``OUT/results.jsonl`` are
skipped on a re-run, and files are written atomically, so a crash never leaves a half-written
output that looks done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmllm.config import MODALITIES
from mmllm.data.formats import PLACEHOLDER_RE
from mmllm.data.media import Audio, MediaError, Video, load_media, save_audio, save_image, save_video
from mmllm.inference.gallery import write_gallery
from mmllm.inference.generate import Request, generate

log = logging.getLogger(__name__)

MEDIA_SUFFIX = {"image": ".png", "audio": ".wav", "video": ".mp4"}


class RequestError(ValueError):
    pass


@dataclass
class ParsedRequest:
    id: str
    request: Request
    prompt_text: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_request(rec: dict[str, Any], base: Path, default_seed: int) -> ParsedRequest:
    rid = str(rec.get("id", ""))
    if not rid:
        raise RequestError("missing 'id'")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RequestError("'messages' must be a non-empty list")
    elif "prompt" in rec:
        msgs = [{"role": "user", "content": str(rec["prompt"]), "media": rec.get("media", [])}]
        for m in MODALITIES:  # "image": "x.png" shorthand
            if rec.get(m):
                paths = rec[m] if isinstance(rec[m], list) else [rec[m]]
                msgs[0]["content"] = "".join(f"<{m}>" for _ in paths) + "\n" + msgs[0]["content"]
                msgs[0]["media"] = list(paths) + list(msgs[0]["media"] or [])
    else:
        raise RequestError("needs 'prompt' or 'messages'")
    unknown = sorted(set(rec) - {"id", "prompt", "messages", "media", "seed", "max_new_tokens", *MODALITIES})
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}")
    messages, media = [], []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}]: needs a role of system/user/assistant")
        content = str(msg.get("content", ""))
        paths = msg.get("media", []) or []
        paths = [paths] if isinstance(paths, str) else paths
        slots = PLACEHOLDER_RE.findall(content)
        if len(slots) != len(paths):
            raise RequestError(f"messages[{i}]: {len(slots)} placeholder(s) but {len(paths)} media path(s)")
        for modality, p in zip(slots, paths):
            path = Path(p) if Path(p).is_absolute() else base / p
            media.append((modality, load_media(modality, path)))
        messages.append({"role": msg["role"], "content": content})
    if messages[-1]["role"] != "user":
        raise RequestError("the last message must be the user's")
    seed = rec.get("seed", default_seed)
    if not isinstance(seed, int):
        raise RequestError("'seed' must be an integer")
    options = {}
    if "max_new_tokens" in rec:
        options["max_new_tokens"] = int(rec["max_new_tokens"])
    return ParsedRequest(rid, Request(messages, media, seed), messages[-1]["content"], options)


def _append_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def done_ids(results: Path) -> set[str]:
    out = set()
    if results.is_file():
        for line in results.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            if not rec.get("error") and all((results.parent / f).is_file() for f in rec.get("files", [])):
                out.add(rec["id"])
    return out


def checkpoint_fingerprint(checkpoint: Path) -> str:
    manifest = Path(checkpoint) / "manifest.json"
    data = manifest.read_bytes() if manifest.is_file() else str(checkpoint).encode()
    return hashlib.sha256(data).hexdigest()[:12]


def write_outputs(out: Path, rid: str, result, prompt: str, seed: int, fingerprint: str) -> list[str]:
    files = []
    meta = {"mmllm_id": rid, "seed": str(seed), "prompt": prompt[:500], "checkpoint": fingerprint}
    for modality, items in result.media.items():
        for j, item in enumerate(items):
            name = Path("media") / f"{_safe(rid)}_{modality}{j}{MEDIA_SUFFIX[modality]}"
            if isinstance(item, Audio):
                path = save_audio(item, out / name, meta)
            elif isinstance(item, Video):
                path = save_video(item, out / name, meta)
            else:
                path = save_image(item, out / name, meta)
            files.append(str(path.relative_to(out)))
    return files


def _safe(rid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in rid)[:80]


def run_requests(
    model,
    requests_file: Path,
    out: Path,
    *,
    batch_size: int = 8,
    seed: int = 0,
    max_new_tokens: int = 64,
    steps: int | None = None,
    guidance: float | None = None,
    fail_fast: bool = False,
    checkpoint: Path | None = None,
) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    skip = done_ids(results)
    fingerprint = checkpoint_fingerprint(checkpoint) if checkpoint else "none"
    base = requests_file.parent
    counts = {"done": 0, "failed": 0, "skipped": 0}
    pending: list[ParsedRequest] = []
    lines = requests_file.read_text(encoding="utf-8").splitlines()

    def fail(rid: str, error: str) -> None:
        counts["failed"] += 1
        _append_record(results, {"id": rid, "error": error})
        log.warning("request %s failed: %s", rid, error)
        if fail_fast:
            raise RuntimeError(f"request {rid} failed: {error}")

    bar = tqdm(total=len([ln for ln in lines if ln.strip()]), desc="infer", unit="req", dynamic_ncols=True)
    start = time.perf_counter()

    def flush() -> None:
        if not pending:
            return
        groups: dict[int, list[ParsedRequest]] = {}
        for p in pending:
            groups.setdefault(p.options.get("max_new_tokens", max_new_tokens), []).append(p)
        for mnt, group in groups.items():
            t0 = time.perf_counter()
            try:
                outs = generate(model, [p.request for p in group], max_new_tokens=mnt, steps=steps, guidance=guidance)
            except Exception as exc:  # isolate the culprit: retry one by one
                if len(group) == 1:
                    fail(group[0].id, f"{type(exc).__name__}: {exc}")
                    bar.update(1)
                    continue
                outs = None
            if outs is None:
                for p in group:
                    pending_one = [p]
                    try:
                        res = generate(model, [p.request], max_new_tokens=mnt, steps=steps, guidance=guidance)[0]
                        _finish(p, res, time.perf_counter() - t0)
                    except Exception as exc:
                        fail(p.id, f"{type(exc).__name__}: {exc}")
                    bar.update(len(pending_one))
                continue
            elapsed = time.perf_counter() - t0
            for p, res in zip(group, outs):
                _finish(p, res, elapsed / len(group))
                bar.update(1)
        pending.clear()
        bar.set_postfix(req_s=f"{(counts['done'] + counts['failed']) / (time.perf_counter() - start):.2f}")

    def _finish(p: ParsedRequest, res, seconds: float) -> None:
        files = write_outputs(out, p.id, res, p.prompt_text, p.request.seed, fingerprint)
        _append_record(results, {"id": p.id, "prompt": p.prompt_text, "text": res.text, "files": files,
                                 "seed": p.request.seed, "seconds": round(seconds, 4), "error": None})
        counts["done"] += 1

    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise RequestError("expected a JSON object")
        except (json.JSONDecodeError, RequestError) as exc:
            fail(f"line-{lineno}", f"{requests_file}:{lineno}: malformed request: {exc}")
            bar.update(1)
            continue
        rid = str(rec.get("id", f"line-{lineno}"))
        if rid in skip:
            counts["skipped"] += 1
            bar.update(1)
            continue
        try:
            pending.append(parse_request(rec, base, seed))
        except (RequestError, MediaError, ValueError) as exc:
            fail(rid, str(exc))
            bar.update(1)
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
    bar.close()
    write_gallery(out)
    return counts
