"""Fingerprints of the frozen parts' outputs, and content hashes of what goes into them.

A cached tensor is valid exactly when (the content it was computed from, the component that
computed it) are unchanged. Content: :func:`file_hash` (the bytes of a media file) or
:func:`text_hash` (a caption). Component:

* :func:`encoder_fingerprint` (what :meth:`~mmllm.encoders.base.MediaEncoder.fingerprint` returns) --
  the encoder's ``describe()`` (family, options, preprocessing), **all** of its weights, their dtypes, and
  :func:`~mmllm.data.media.media_decode_version` of its modality (how files are decoded before ``preprocess``);
* :func:`decoder_fingerprint` -- what ``decoder.condition(captions)`` depends on: ``describe()``,
  its options and scalar settings, the weights of the pipeline's text side (``text_encoder``/``text_encoder_2``/``text_projection``
  when present, else the whole decoder) and the tokenizer (vocabulary, merges, length, specials).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmllm.data.media import media_decode_version

CACHE_FORMAT_VERSION = "1"
TEXT_SIDE = ("text_encoder", "text_encoder_2", "text_projection")


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hash_unless_unchanged(path: str | Path) -> str:
    """:func:`file_hash`, read once while the file stays as it was: remembered under the path and the file's
    device, inode, size and modification and change times (ns). Any write moves the modification time and
    every replacement (a rename, a copy keeping the old time: ``cp -p``, ``rsync -t``) the change time, which
    no user can set back, so a changed file is hashed again. A training stage looks up every media file
    once per epoch; it used to read each one in full every time."""
    st = os.stat(path)
    return _remembered_hash(os.fspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@lru_cache(maxsize=1 << 20)  # a path and a 64-character hash: about 0.2 KB an entry
def _remembered_hash(path: str, device: int, inode: int, size: int, modified_ns: int, changed_ns: int) -> str:
    return file_hash(path)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _update_weights(h: Any, module: nn.Module, prefix: str) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{prefix}{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, default=str).encode()


def tokenizer_identity(tokenizer: Any) -> Any:
    """Everything that decides how a tokenizer splits text, as plain data."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # padding/truncation are per-call state that each encode call rewrites: not identity
        core = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    else:
        core = sorted(tokenizer.get_vocab().items())
    return {
        "class": type(tokenizer).__name__,
        "core": hashlib.sha256(_json(core)).hexdigest(),
        "model_max_length": getattr(tokenizer, "model_max_length", None),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "special": getattr(tokenizer, "special_tokens_map", None),
    }


def encoder_fingerprint(encoder: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(_json({"cache": CACHE_FORMAT_VERSION, "media": media_decode_version(getattr(encoder, "modality", "")),
                    "class": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
                    "describe": encoder.describe()}))
    _update_weights(h, encoder, "")
    return h.hexdigest()


def _settings(module: nn.Module) -> dict[str, Any]:
    """A component's plain settings: its ``options`` dataclass and public scalar attributes (flags such
    as a decoder's ``text_projection`` that change what ``condition`` computes)."""
    out: dict[str, Any] = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training":
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[name] = dataclasses.asdict(value)
        elif isinstance(value, (bool, int, float, str, type(None))):
            out[name] = value
    return out


# describe() entries that say what a decoder loaded, not what ``condition`` computes: a cache built by a
# model assembled with every part is valid for one assembled with the text side only, and vice versa
LOADING_ONLY = ("parts", "parameters")


def decoder_fingerprint(decoder: nn.Module) -> str:
    if hasattr(decoder, "holds") and not decoder.holds("conditioning"):
        raise ValueError(f"{type(decoder).__name__} was assembled without its text encoder "
                         f"(parts={decoder.parts!r}): it has no conditioning to fingerprint")
    h = hashlib.blake2b(digest_size=12)
    parts = [n for n in TEXT_SIDE if isinstance(getattr(decoder, n, None), nn.Module)]
    describe = {k: v for k, v in decoder.describe().items() if k not in LOADING_ONLY}
    h.update(_json({"cache": CACHE_FORMAT_VERSION,
                    "class": f"{type(decoder).__module__}.{type(decoder).__qualname__}",
                    "describe": describe, "settings": _settings(decoder), "text_side": parts,
                    "tokenizer": tokenizer_identity(getattr(decoder, "tokenizer", None)),
                    "tokenizer_2": tokenizer_identity(getattr(decoder, "tokenizer_2", None))}))
    if parts:
        for name in parts:
            _update_weights(h, getattr(decoder, name), f"{name}.")
    else:
        _update_weights(h, decoder, "")
    return h.hexdigest()
