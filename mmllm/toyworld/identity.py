"""Whether an assembly's encoders and decoders are the toy world's parts: what ``mmllm eval`` measures.

``mmllm eval`` scores a model on the toy world's media, read back by judges trained on that world; its scores
say how well a model works only where the model's encoders and decoders are the toy world's own (an encoder
that never saw those renderings, a decoder that draws other things, score near zero whatever the model learned).
A part is the toy world's when its kind is the toy part's and every folder it loads from (``model_name``,
``model``, ``text_encoder``, and those of the parts it builds, as ``frames-video``'s ``image``) is the toy part's
folder: the same folder, or a copy of it, holding every file the parts folder's ``manifest.json`` lists with the
same sha256 (so moved, copied or wheel-installed parts count; re-made or fine-tuned ones do not). The LLM,
the projections and the training data are not looked at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmllm.config import ConfigError
from mmllm.locations import resolve_location

SOURCE_KEYS = ("model_name", "model", "text_encoder")  # the options that say where a part's weights come from
LOCAL_DIR = "local-dir:"  # open-clip's prefix for a folder


def other_parts(assembly: Any, wanted: list[tuple[str, str]], parts_dirs: list[Path]) -> list[str]:
    """What in ``assembly`` (an AssemblyConfig) is not a toy-world part of any of ``parts_dirs``, one line each
    (``decoders.image.model is 'x' (the toy world's: '/.../decoder-image')``); ``wanted``: the
    ``("encoders" | "decoders", modality)`` to look at (those the assembly lacks are skipped). Empty: all are."""
    from mmllm.toyworld.parts import assembly_entries

    references = [(assembly_entries(d), _expected_files(d)) for d in dict.fromkeys(Path(p).resolve() for p in parts_dirs)]
    found = []
    for table, modality in wanted:
        spec = getattr(assembly, table).get(modality)
        if spec is None or not references:
            continue
        given = {"kind": spec.kind, **spec.options}
        tries = [_differences(f"{table}.{modality}", given, entries[table][modality], files)
                 for entries, files in references if modality in entries[table]]
        if tries and all(tries):
            found += tries[0]  # against the first parts folder (eval's --parts)
    return found


def _differences(where: str, given: dict[str, Any], toy: dict[str, Any], files: dict[Path, dict[str, str]]) -> list[str]:
    if given.get("kind") != toy["kind"]:
        return [f"{where} is kind {given.get('kind')!r} (the toy world's: {toy['kind']!r})"]
    out = []
    for key, want in toy.items():
        if isinstance(want, dict) and "kind" in want:  # a part it builds (frames-video's image encoder)
            inner = given.get(key)
            out += _differences(f"{where}.{key}", inner if isinstance(inner, dict) else {}, want, files)
        elif key in SOURCE_KEYS and not _same_source(given.get(key), want, files):
            said = "is not set" if given.get(key) is None else f"is {given[key]!r}"
            out.append(f"{where}.{key} {said} (the toy world's: {want!r})")
    return out


def _folder(source: Any) -> Path | None:
    if not isinstance(source, str) or not source:
        return None
    try:
        return resolve_location(source.removeprefix(LOCAL_DIR)).resolve()
    except ConfigError:  # a package: path of a package not installed here: not the toy world's folder
        return None


def _same_source(given: Any, want: str, files: dict[Path, dict[str, str]]) -> bool:
    """``given`` leads to the folder ``want`` names, or to a copy of it (every file the manifest lists for it). The
    same source as written is the same part, resolved or not: one not found here (the MiniLM wheel not installed)
    is for loading the model to name, not a part other than the toy world's."""
    if given == want:
        return True
    mine, theirs = _folder(given), _folder(want)
    if mine is None or theirs is None:
        return False
    if mine == theirs:
        return True
    expected = files.get(theirs)
    return bool(expected) and mine.is_dir() and all(_sha256(mine / rel) == digest for rel, digest in expected.items())


def _expected_files(parts_dir: Path) -> dict[Path, dict[str, str]]:
    """Per toy folder (resolved), the files its ``manifest.json`` lists with their sha256: each part's folder, and
    MiniLM's (the decoders' text encoder), whose weights the manifest records. Empty without a manifest."""
    try:
        manifest = json.loads((parts_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {(parts_dir / name).resolve(): dict(part.get("files") or {})
           for name, part in (manifest.get("parts") or {}).items()}
    text = manifest.get("text_encoder") or {}
    if text.get("source") and text.get("sha256") and (folder := _folder(text["source"])) is not None:
        out[folder] = {"model.safetensors": text["sha256"]}
    return out


def _sha256(path: Path) -> str | None:
    """The file's sha256 (:func:`~mmllm.data.fingerprint.file_hash`), None where it cannot be read."""
    from mmllm.data.fingerprint import file_hash

    try:
        return file_hash(path)
    except OSError:
        return None
