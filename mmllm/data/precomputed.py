"""Precomputed outputs of the frozen parts, as a training stage reads them.

Two sources, looked up per sample by :class:`~mmllm.data.dataset.StageDataset`:

* the feature cache (:mod:`mmllm.data.cache`, filled by ``mmllm cache``): encoder features for
  media inputs, keyed by file content; conditioning targets for output captions, keyed by text;
* precomputed caption embeddings named by the data (NExT-GPT's ``.npy`` files), used as
  conditioning targets when their shape matches the decoder's ``conditioning_shape``.

Whatever is not found is computed by the model as usual. Nothing stale is used silently: a
cache section made by a different component (another fingerprint) is reported with a warning
when the stage opens the cache and again the first time a sample falls back because of it, and
every lookup is counted (:meth:`Precomputed.stats`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmllm.data.cache import FeatureCache, Section
from mmllm.data.fingerprint import (
    decoder_fingerprint,
    encoder_fingerprint,
    file_hash_unless_unchanged,
    text_hash,
)
from mmllm.data.index import readable
from mmllm.data.media import SAMPLE_ERRORS, load_media
from mmllm.progress import progress_bar

if TYPE_CHECKING:
    from mmllm.data.formats import Conversation

log = logging.getLogger(__name__)


@dataclass
class Precomputed:
    cache: FeatureCache | None
    cache_dir: Path | None  # the stage's cache.dir, also when it holds no cache yet
    encoder_fingerprints: dict[str, str]  # modality -> fingerprint (only modalities read from the cache)
    decoder_fingerprints: dict[str, str]
    feature_shapes: dict[str, tuple[int, int]]  # modality -> (num_tokens, output_dim) of its encoder
    conditioning_shapes: dict[str, tuple[int, int]]  # modality -> the decoder's conditioning_shape
    use_targets: bool = True  # False when the stage has no MSE loss: targets are not needed
    # parts ("encoder/image", "condition/audio") the stage no longer holds because these sources hold every
    # output it reads (cache.require): a lookup that fails there is the sample's error, not a fallback
    required: frozenset[str] = frozenset()
    counts: Counter = field(default_factory=Counter)
    _warned: set[str] = field(default_factory=set)

    # ------------------------------------------------------------------ encoder features
    def features(self, modality: str, path: Path) -> torch.Tensor | None:
        """Cached encoder features ``(tokens, dim)`` of a media file, or None (compute them)."""
        fp = self.encoder_fingerprints.get(modality)
        if self.cache is None or fp is None or not Path(path).is_file():
            return None
        if self.cache.section("encoder", modality, fp) is None and not self.cache.others("encoder", modality, fp):
            self._miss("encoder", modality, str(path))  # nothing to look up: no need to read the file
            found = None
        else:
            key = file_hash_unless_unchanged(path)
            found = self._lookup("encoder", modality, fp, key, self.feature_shapes[modality], str(path))
        if found is None and f"encoder/{modality}" in self.required:
            raise ValueError(f"{path} is not in the feature cache {self.cache.directory}, and this stage holds no "
                             f"{modality} encoder (cache.require): it could not be read when the cache was built, "
                             "or it changed since the run started; run `mmllm cache --config <this stage>`")
        return found

    # ------------------------------------------------------------------ conditioning targets
    def target(self, modality: str, caption: str, embedding: Path | None) -> torch.Tensor | None:
        """A precomputed conditioning target ``(tokens, dim)`` for an output, or None (compute it)."""
        if not self.use_targets or modality not in self.conditioning_shapes:
            return None
        found, problem = self._embedding(modality, embedding) if embedding is not None else (None, None)
        fp = self.decoder_fingerprints.get(modality)
        if found is None and self.cache is not None and fp is not None:
            found = self._lookup("condition", modality, fp, text_hash(caption), self.conditioning_shapes[modality],
                                 repr(caption[:60]))
        if found is None and f"condition/{modality}" in self.required:
            why = problem or "a cache file or embedding changed since the run started?"
            raise ValueError(f"no precomputed conditioning target for the {modality} caption {caption[:60]!r}, and "
                             f"this stage holds no text encoder for decoders.{modality} (cache.require; {why}); "
                             "run `mmllm cache --config <this stage>` or replace the embedding file")
        return found

    def _embedding(self, modality: str, path: Path) -> tuple[torch.Tensor | None, str | None]:
        """The embedding file's target, or None and what is wrong with the file."""
        shape = self.conditioning_shapes[modality]
        try:
            target = load_embedding(path, shape)
        except FileNotFoundError:
            self.counts[f"embedding/{modality}/missing"] += 1
            self._warn(f"missing-{path.parent}", "precomputed caption embedding %s not found; computing the "
                       "target with decoders.%s (further missing files in %s are counted, not logged)",
                       path, modality, path.parent)
            return None, f"{path} not found"
        except EmbeddingShapeError as exc:
            self.counts[f"embedding/{modality}/wrong_shape"] += 1
            self._warn(f"shape-{modality}-{exc.shape}", "%s; ignoring these embeddings and computing the targets "
                       "with decoders.%s's own text encoder", exc, modality)
            return None, str(exc)
        except ValueError as exc:
            self.counts[f"embedding/{modality}/unreadable"] += 1
            self._warn(f"bad-{path}", "%s; computing the target with decoders.%s", exc, modality)
            return None, str(exc)
        self.counts[f"embedding/{modality}/used"] += 1
        return target, None

    # ------------------------------------------------------------------ coverage (cache.require)
    def coverage(self, conversations: Iterable[Conversation], parts: Collection[str], rank: int = 0,
                 world: int = 1) -> Coverage:
        """Which of the items of ``parts`` (``"encoder/<m>"``: media inputs, ``"condition/<m>"``: output
        captions) that the conversations read these sources hold, checked as the lookups check them:
        media files are hashed (a progress bar for many), cache entries and embedding files are checked
        by their headers. A media file that is missing or cannot be decoded is *unreadable*, not missing:
        training skips its samples whatever the cache holds. With ``world > 1`` only every ``world``-th
        distinct item from ``rank`` on (the processes' parts add up to the whole: :meth:`Coverage.merged`)."""
        # modality -> media file -> where it is first referenced (file:line), for the unreadable message
        paths: dict[str, dict[Path, str]] = {p.split("/")[1]: {} for p in parts if p.startswith("encoder/")}
        targets: dict[str, dict[tuple[str, Path | None], None]] = {
            p.split("/")[1]: {} for p in parts if p.startswith("condition/")}
        for conv in readable(conversations):  # a record the file fails to give: its sample is skipped
            for ref in conv.media_refs():
                if ref.modality in paths:
                    paths[ref.modality].setdefault(Path(ref.path), conv.source)
            for out in conv.output_refs():
                if out.modality in targets:
                    targets[out.modality][(out.caption, out.embedding)] = None
        cov = Coverage()
        my_paths = {m: list(files)[rank::world] for m, files in paths.items()}
        my_targets = {m: list(captions)[rank::world] for m, captions in targets.items()}
        items = sum(map(len, my_paths.values())) + sum(map(len, my_targets.values()))
        with progress_bar(total=items, desc="checking precomputed inputs (cache.require)", disable=items < 1000) as bar:
            for m, files in my_paths.items():
                fp = self.encoder_fingerprints.get(m)
                section = self.cache.section("encoder", m, fp) if self.cache is not None and fp else None
                for path in files:
                    bar.update()
                    try:
                        key = file_hash_unless_unchanged(path)
                        found = section is not None and section.shape(key) == tuple(self.feature_shapes[m])
                        if not found:
                            load_media(m, path)  # what `mmllm cache` could not read, training skips too
                    except SAMPLE_ERRORS as exc:  # what training skips too
                        where = f" (referenced at {paths[m][path]})" if paths[m][path] else ""
                        cov.unreadable.append(f"{path}{where}: {exc}")
                        continue
                    cov.add(f"encoder/{m}", str(path), found)
            for m, captions in my_targets.items():
                fp = self.decoder_fingerprints.get(m)
                section = self.cache.section("condition", m, fp) if self.cache is not None and fp else None
                shape = tuple(self.conditioning_shapes[m])
                for caption, embedding in captions:
                    bar.update()
                    why = ""
                    if embedding is not None:
                        try:
                            open_embedding(embedding, shape)
                            cov.add(f"condition/{m}", repr(caption[:60]), True)
                            continue
                        except FileNotFoundError:
                            why = f" (embedding {embedding} not found)"
                        except ValueError as exc:
                            why = f" ({exc})"
                    found = section is not None and section.shape(text_hash(caption)) == shape
                    cov.add(f"condition/{m}", repr(caption[:60]) + why, found)
        return cov

    # ------------------------------------------------------------------ shared
    def _lookup(self, kind: str, modality: str, fp: str, key: str, shape: tuple[int, int],
                what: str) -> torch.Tensor | None:
        assert self.cache is not None
        section = self.cache.section(kind, modality, fp)
        tensor = section.get(key) if section is not None else None
        if tensor is not None and tuple(tensor.shape) == tuple(shape):
            self.counts[f"{kind}/{modality}/hit"] += 1
            return tensor
        if tensor is not None:  # same fingerprint, wrong shape: a damaged cache
            self.counts[f"{kind}/{modality}/stale"] += 1
            self._warn(f"shape-{kind}-{modality}", "feature cache %s: %s entry for %s has shape %s, expected %s; "
                       "recomputing; rebuild the cache with `mmllm cache`", self.cache.directory, kind, what,
                       tuple(tensor.shape), tuple(shape))
            return None
        stale = [s for s in self.cache.others(kind, modality, fp) if key in s]
        if stale:
            self.counts[f"{kind}/{modality}/stale"] += 1
            self._warn(f"stale-{kind}-{modality}", "feature cache %s holds %s %s output for %s, but made by a "
                       "different component (fingerprint %s, this model's is %s): NOT using it, recomputing; run "
                       "`mmllm cache --config <this stage>` to refresh", self.cache.directory, modality, kind,
                       what, stale[0].fingerprint, fp)
        else:
            self._miss(kind, modality, what)
        return None

    def _miss(self, kind: str, modality: str, what: str) -> None:
        """Counts and (once) reports an output the cache does not hold."""
        assert self.cache is not None
        self.counts[f"{kind}/{modality}/miss"] += 1
        self._warn(f"miss-{kind}-{modality}", "feature cache %s has no %s %s output for %s; computing it (and "
                   "further misses) on the fly; run `mmllm cache --config <this stage>` to fill the cache",
                   self.cache.directory, modality, kind, what)

    def _warn(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def stats(self) -> dict[str, int]:
        """Lookups so far: ``<kind>/<modality>/<hit|miss|stale>`` and ``embedding/<modality>/<outcome>``."""
        return dict(sorted(self.counts.items()))


@dataclass
class Coverage:
    """Per part (``"encoder/image"``, ``"condition/audio"``): how many distinct items a stage reads and
    which of them the precomputed sources do not hold."""

    total: Counter = field(default_factory=Counter)
    missing: dict[str, list[str]] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)  # media files that could not be hashed

    def add(self, part: str, item: str, found: bool) -> None:
        self.total[part] += 1
        if not found:
            self.missing.setdefault(part, []).append(item)

    def complete(self, part: str) -> bool:
        return self.total[part] > 0 and not self.missing.get(part)

    @staticmethod
    def merged(parts: Iterable[Coverage]) -> Coverage:
        """The coverage of the whole from the coverages of its parts (one per process)."""
        out = Coverage()
        for cov in parts:
            out.total.update(cov.total)
            for part, items in cov.missing.items():
                out.missing.setdefault(part, []).extend(items)
            out.unreadable.extend(cov.unreadable)
        return out


# --------------------------------------------------------------------------------------------
# precomputed caption embeddings (.npy)
# --------------------------------------------------------------------------------------------


class EmbeddingShapeError(ValueError):
    def __init__(self, path: Path, shape: tuple[int, ...], expected: tuple[int, int]):
        self.shape = tuple(shape)
        super().__init__(
            f"precomputed caption embedding {path} has shape {self.shape}, but the decoder's conditioning_shape "
            f"is {tuple(expected)}: it was made for a different decoder (NExT-GPT's are (77, 768) for SD 1.5, "
            f"(77, 1024) for ZeroScope, (512,) for AudioLDM)"
        )


def open_embedding(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A ``.npy`` caption embedding memory-mapped and checked against ``shape`` from its header alone (no
    data read): floats, and a leading batch axis of 1 or a 1-D ``(dim,)`` for a ``(1, dim)`` shape are
    accepted. Pickled arrays are refused. Raises FileNotFoundError, :class:`EmbeddingShapeError` or
    ValueError (unreadable), each naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"cannot read precomputed embedding {path}: {exc} (pickled .npy files are refused)") from exc
    except (OSError, EOFError) as exc:  # an empty or truncated file
        raise ValueError(f"cannot read precomputed embedding {path}: {exc}") from exc
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"precomputed embedding {path} has dtype {arr.dtype}, expected floats")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 1 and shape[0] == 1:
        arr = arr[None, :]
    if tuple(arr.shape) != tuple(shape):
        raise EmbeddingShapeError(path, arr.shape, shape)
    return arr


def load_embedding(path: Path, shape: tuple[int, int]) -> torch.Tensor:
    """A ``.npy`` caption embedding (:func:`open_embedding`) as a ``shape`` float32 tensor; NaN or
    infinite values are refused."""
    arr = np.array(open_embedding(path, shape), dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"precomputed embedding {path} holds NaN or infinite values")
    return torch.from_numpy(arr)


# --------------------------------------------------------------------------------------------
# opening for a stage
# --------------------------------------------------------------------------------------------


def open_precomputed(cfg: Any, model: Any) -> Precomputed:
    """The stage's precomputed sources: its ``cache:`` folder (if any) and the data's own embeddings."""
    cache = None
    cache_cfg = getattr(cfg, "cache", None)
    if cache_cfg is not None and cache_cfg.dir:
        directory = Path(cache_cfg.dir)
        if not (directory / "index.json").is_file():
            log.warning("cache.dir %s holds no feature cache; everything is computed on the fly; run "
                        "`mmllm cache --config <this stage>` first", directory)
        else:
            cache = FeatureCache(directory)
    use_targets = bool(cfg.losses.mse)
    enc_fps: dict[str, str] = {}
    dec_fps: dict[str, str] = {}
    if cache is not None:
        if cache_cfg.encoders:
            enc_fps = {m: encoder_fingerprint(e) for m, e in model.encoders.items() if e.runnable}
        if cache_cfg.targets and use_targets:
            # a decoder without its text side computes no targets (no sample asks for its modality)
            dec_fps = {m: decoder_fingerprint(d) for m, d in model.decoders.items() if d.holds("conditioning")}
        report_sections(cache, enc_fps, dec_fps)
    return Precomputed(
        cache=cache,
        cache_dir=Path(cache_cfg.dir) if cache_cfg is not None and cache_cfg.dir else None,
        encoder_fingerprints=enc_fps,
        decoder_fingerprints=dec_fps,
        feature_shapes={m: (e.num_tokens, e.output_dim) for m, e in model.encoders.items()},
        conditioning_shapes={m: tuple(d.conditioning_shape) for m, d in model.decoders.items()},
        use_targets=use_targets,
    )


def report_sections(cache: FeatureCache, enc_fps: dict[str, str], dec_fps: dict[str, str]) -> None:
    for kind, fps in (("encoder", enc_fps), ("condition", dec_fps)):
        for m, fp in fps.items():
            part = f"{'encoders' if kind == 'encoder' else 'decoders'}.{m}"
            section: Section | None = cache.section(kind, m, fp)
            others = cache.others(kind, m, fp)
            if section is not None:
                log.info("feature cache %s: %s matches (%d entries, fingerprint %s)", cache.directory, part,
                         len(section), fp)
            elif others:
                log.warning("feature cache %s: STALE for %s: it was computed by a different component "
                            "(fingerprint %s; this model's is %s); not using it, recomputing on the fly; run "
                            "`mmllm cache --config <this stage>` to refresh", cache.directory, part,
                            others[0].fingerprint, fp)
            else:
                log.info("feature cache %s: nothing cached for %s", cache.directory, part)
