"""A cache of what the frozen parts produce, in sharded safetensors under one folder.

Layout::

    <dir>/index.json                                   sections and their shards
    <dir>/encoder-image-<fingerprint>-<id>.safetensors   tensors named by content hash

A *section* holds the outputs of one component for one modality: ``encoder`` sections hold
encoder features ``(tokens, dim)`` keyed by the SHA-256 of a media file's bytes; ``condition``
sections hold decoder conditioning targets ``(tokens, dim)`` keyed by the SHA-256 of a caption.
The section's fingerprint (:mod:`mmllm.data.fingerprint`) covers the component's weights,
options and preprocessing, so a key is found only under the fingerprint that computed it; a
changed component finds its section *stale* and training recomputes (and says so).

Writes are atomic: a shard is written to a temporary file, fsynced and renamed; the index is
rewritten the same way (under a lock) after every shard, so an interrupted ``mmllm cache`` leaves
a valid cache holding everything up to its last shard. Shard headers are the source of truth for
which keys exist; ``index.json`` lists sections, their components and their shards.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmllm.atomic import atomic_write
from mmllm.config import UserError
from mmllm.data.fingerprint import CACHE_FORMAT_VERSION
from mmllm.folder_lock import waiting_lock

log = logging.getLogger(__name__)

INDEX = "index.json"
KINDS = ("encoder", "condition")


class CacheError(RuntimeError, UserError):
    """The cache folder cannot be used; the message names the file and how to fix it."""


def section_name(kind: str, modality: str, fingerprint: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"cache section kind must be one of {KINDS}, got {kind!r}")
    return f"{kind}-{modality}-{fingerprint}"


@dataclass
class Section:
    """One component's outputs for one modality; keys are read from the shard headers on first use."""

    directory: Path
    name: str
    info: dict[str, Any]
    _keys: dict[str, str] | None = field(default=None, repr=False)
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    def keys(self) -> dict[str, str]:
        """content hash -> shard file name."""
        if self._keys is None:
            from safetensors import safe_open

            keys: dict[str, str] = {}
            for shard in self.info.get("shards", []):
                path = self.directory / shard
                try:
                    with safe_open(str(path), framework="pt") as fh:
                        keys.update(dict.fromkeys(fh.keys(), shard))
                except Exception as exc:  # missing or corrupt shard: its keys are simply absent
                    log.warning("feature cache: cannot read shard %s (%s); its entries will be recomputed; "
                                "run `mmllm cache` again to rewrite it", path, exc)
            self._keys = keys
        return self._keys

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __len__(self) -> int:
        return len(self.keys())

    def _handle(self, key: str) -> Any:
        shard = self.keys().get(key)
        if shard is None:
            return None
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(str(self.directory / shard), framework="pt")
        return self._handles[shard]

    def get(self, key: str) -> torch.Tensor | None:
        return self._read(key, lambda handle: handle.get_tensor(key))

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The entry's shape from its shard's header (no tensor read), or None when absent."""
        return self._read(key, lambda handle: tuple(handle.get_slice(key).get_shape()))

    def _read(self, key: str, what: Callable[[Any], Any]) -> Any:
        """``what(handle)`` of ``key``'s shard, or None when absent. A shard that can no longer be opened
        (truncated, removed or its permissions changed since its keys were listed) is as one whose keys could not
        be listed: its entries are absent from then on, with a warning -- not an error raised in one process of a
        run (the others would wait for it at their next collective). One cut short once open (memory-mapped)
        raises SIGBUS on reading, which no exception handler sees."""
        from safetensors import SafetensorError

        try:
            handle = self._handle(key)
            return None if handle is None else what(handle)
        except (SafetensorError, OSError) as exc:
            shard = self.keys()[key]
            self._keys = {k: s for k, s in self.keys().items() if s != shard}
            self._handles.pop(shard, None)
            log.warning("feature cache: cannot read shard %s any more (%s); its entries will be recomputed; run "
                        "`mmllm cache` again to rewrite it", self.directory / shard, exc)
            return None

    def __getstate__(self) -> dict[str, Any]:  # data-loader workers reopen shards lazily
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


class FeatureCache:
    """Read side of a cache folder (:meth:`writer` gives the write side)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.sections: dict[str, Section] = {}
        self.reload()

    def reload(self) -> None:
        index = self._read_index()
        self.sections = {name: Section(self.directory, name, info) for name, info in index["sections"].items()}

    def _read_index(self) -> dict[str, Any]:
        path = self.directory / INDEX
        if not path.exists():
            return {"format": "mmllm-feature-cache", "version": CACHE_FORMAT_VERSION, "sections": {}}
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON, an int of >4300 digits
            raise CacheError(f"{path}: unreadable cache index ({exc}); delete the folder and run `mmllm cache` "
                             "again") from exc
        if index.get("format") != "mmllm-feature-cache" or not isinstance(index.get("sections"), dict):
            raise CacheError(f"{path}: not an mmllm feature cache index; point `cache.dir` at another folder")
        if str(index.get("version")) != CACHE_FORMAT_VERSION:
            log.warning("feature cache %s has format version %s, this mmllm writes %s: ignoring it; run "
                        "`mmllm cache` to rebuild", self.directory, index.get("version"), CACHE_FORMAT_VERSION)
            index["sections"] = {}
        return index

    def section(self, kind: str, modality: str, fingerprint: str) -> Section | None:
        return self.sections.get(section_name(kind, modality, fingerprint))

    def others(self, kind: str, modality: str, fingerprint: str) -> list[Section]:
        """Sections of the same kind and modality made by a *different* component (stale for this one)."""
        return [s for s in self.sections.values()
                if s.info.get("kind") == kind and s.info.get("modality") == modality
                and s.fingerprint != fingerprint]

    def writer(self, kind: str, modality: str, fingerprint: str, component: dict[str, Any],
               shard_mb: int = 256) -> CacheWriter:
        return CacheWriter(self, kind, modality, fingerprint, component, shard_mb)

    def add_shard(self, name: str, info: dict[str, Any], shard: str) -> None:
        """Record a finished shard in the index (read-modify-write under a lock, atomic replace)."""
        with waiting_lock(self.directory / ".lock", "mmllm cache processes writing this cache at the same time "
                          "may lose each other's index entries: run one at a time"):
            index = self._read_index()
            entry = index["sections"].setdefault(name, {**info, "shards": []})
            entry["shards"] = [*entry.get("shards", []), shard]
            entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            text = json.dumps(index, indent=1, sort_keys=True, default=str)
            atomic_write(self.directory / INDEX, lambda tmp: tmp.write_text(text))
        self.reload()


class CacheWriter:
    """Buffers tensors of one section and writes them as shards of about ``shard_mb`` MB."""

    def __init__(self, cache: FeatureCache, kind: str, modality: str, fingerprint: str,
                 component: dict[str, Any], shard_mb: int):
        self.cache = cache
        self.name = section_name(kind, modality, fingerprint)
        self.info = {"kind": kind, "modality": modality, "fingerprint": fingerprint, "component": component}
        self.limit = max(1, shard_mb) * 2**20
        self.buffer: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.written = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.buffer:
            return
        tensor = tensor.detach().cpu().contiguous().clone()
        self.buffer[key] = tensor
        self.bytes += tensor.numel() * tensor.element_size()
        if self.bytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        from safetensors.torch import save_file

        self.cache.directory.mkdir(parents=True, exist_ok=True)
        shard = f"{self.name}-{uuid.uuid4().hex[:10]}.safetensors"
        meta = {k: str(v) for k, v in self.info.items() if k != "component"}
        tensors = self.buffer
        atomic_write(self.cache.directory / shard, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        self.cache.add_shard(self.name, self.info, shard)
        self.written += len(self.buffer)
        log.info("feature cache: wrote %d %s tensor(s) to %s", len(self.buffer), self.name, shard)
        self.buffer, self.bytes = {}, 0

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.flush()
