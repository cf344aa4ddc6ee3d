"""``mmllm cache``: compute what the frozen parts produce for a stage's data, once, into its cache.

For the stage's conversations: the encoder features of every media input (one entry per distinct
file content) and, when the stage has an MSE loss, the decoder conditioning target of every output
caption (one per distinct caption). Entries already cached under the current fingerprint are
skipped, so the command is incremental; files that cannot be read are reported and skipped.
Media are decoded and preprocessed one by one, exactly as :class:`~mmllm.data.dataset.StageDataset`
does, then run through the frozen part in batches.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmllm.config import ConfigError, to_dict
from mmllm.data.cache import FeatureCache
from mmllm.data.dataset import load_stage_records
from mmllm.data.fingerprint import decoder_fingerprint, encoder_fingerprint, file_hash, text_hash
from mmllm.data.index import readable
from mmllm.data.media import SAMPLE_ERRORS, load_media

log = logging.getLogger(__name__)


@dataclass
class CacheBuildReport:
    directory: Path
    computed: Counter = field(default_factory=Counter)  # "encoder/image" -> entries written now
    present: Counter = field(default_factory=Counter)  # entries that were already cached
    failed: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"feature cache {self.directory}"]
        for key in sorted(set(self.computed) | set(self.present)):
            lines.append(f"  {key}: {self.computed[key]} computed, {self.present[key]} already cached")
        if self.failed:
            lines.append(f"  {len(self.failed)} item(s) could not be read and were skipped:")
            lines += [f"    - {f}" for f in self.failed[:20]]
        return "\n".join(lines)


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), max(1, size))]


def build_cache(cfg: Any, model: Any, batch_size: int = 16, device: str = "cpu",
                per_dataset: list[list[Any]] | None = None) -> CacheBuildReport:
    """Compute what the stage's records need and the cache lacks; ``per_dataset``: the stage's records
    if already read (else they are read here)."""
    require_cache_dir(cfg)
    cache = FeatureCache(cfg.cache.dir)
    report = CacheBuildReport(cache.directory)
    if per_dataset is None:
        per_dataset = load_stage_records(cfg.all_data(), cfg.stage)[0]
    paths, captions = _what_to_cache(per_dataset)
    for part in (*model.encoders.values(), *model.decoders.values()):  # the LLM is not run (it may hold no weights)
        part.to(device)
    if cfg.cache.encoders:
        for m, encoder in model.encoders.items():
            if paths.get(m) and encoder.runnable:  # a released encoder: no sample of the stage gives m input
                _encoder_section(cache, cfg, model, m, encoder, paths[m], batch_size, report)
    if cfg.cache.targets and cfg.losses.mse:
        for m, decoder in model.decoders.items():
            if captions.get(m):
                _condition_section(cache, cfg, model, m, decoder, list(captions[m]), batch_size, report)
    elif cfg.cache.targets:
        log.info("stage %s has no MSE loss: no conditioning targets needed", cfg.stage)
    return report


def _what_to_cache(per_dataset: list[Any]) -> tuple[dict[str, dict[Path, str]], dict[str, dict[str, None]]]:
    """In one pass over the conversations (each read from its data file, none held): per modality, each
    media input file with the first record that names it (for the report), and each output caption once."""
    paths: dict[str, dict[Path, str]] = {}
    captions: dict[str, dict[str, None]] = {}
    for convs in per_dataset:
        for c in readable(convs):  # a record the file fails to give: its sample is skipped in training
            for r in c.media_refs():
                paths.setdefault(r.modality, {}).setdefault(r.path, c.source)
            for o in c.output_refs():
                captions.setdefault(o.modality, {})[o.caption] = None
    return paths, captions


def require_cache_dir(cfg: Any) -> None:
    """The stage config names the cache folder to fill (checked before anything loads)."""
    if not cfg.cache.dir:
        raise ConfigError("the stage config sets no cache.dir: add `cache: {dir: PATH}` or pass cache.dir=PATH")


def _component(model: Any, section: str, m: str, module: Any) -> dict[str, Any]:
    spec = getattr(model.config, section)[m]
    return {"part": f"{section}.{m}", "spec": to_dict(spec), "describe": module.describe()}


def _encoder_section(cache: FeatureCache, cfg: Any, model: Any, m: str, encoder: Any, paths: dict[Path, str],
                     batch_size: int, report: CacheBuildReport) -> None:
    """``paths``: each media file and where it is first referenced (``file:line``)."""
    fp = encoder_fingerprint(encoder)
    section = cache.section("encoder", m, fp)
    todo: dict[str, Path] = {}
    for path in paths:
        try:
            key = file_hash(path)
        except OSError as exc:
            report.failed.append(f"{path} (referenced at {paths[path]}): {exc}")
            continue
        if section is not None and key in section:
            report.present[f"encoder/{m}"] += 1
        else:
            todo.setdefault(key, path)
    dtype = next(encoder.parameters()).dtype
    with cache.writer("encoder", m, fp, _component(model, "encoders", m, encoder), cfg.cache.shard_mb) as writer:
        for batch in _batches(list(todo.items()), batch_size):
            keys, inputs = [], []
            for key, path in batch:
                try:
                    inputs.append(encoder.preprocess([load_media(m, path)]))
                    keys.append(key)
                except SAMPLE_ERRORS as exc:  # what training skips too
                    report.failed.append(f"{path} (referenced at {paths[path]}): {exc}")
            if not inputs:
                continue
            with torch.no_grad():
                feats = encoder(torch.cat(inputs).to(next(encoder.parameters()).device, dtype))
            for key, row in zip(keys, feats):
                writer.add(key, row)
            report.computed[f"encoder/{m}"] += len(keys)


def _condition_section(cache: FeatureCache, cfg: Any, model: Any, m: str, decoder: Any, captions: list[str],
                       batch_size: int, report: CacheBuildReport) -> None:
    fp = decoder_fingerprint(decoder)
    section = cache.section("condition", m, fp)
    todo = {}
    for caption in captions:
        key = text_hash(caption)
        if section is not None and key in section:
            report.present[f"condition/{m}"] += 1
        else:
            todo.setdefault(key, caption)
    with cache.writer("condition", m, fp, _component(model, "decoders", m, decoder), cfg.cache.shard_mb) as writer:
        for batch in _batches(list(todo.items()), batch_size):
            with torch.no_grad():
                rows = decoder.condition([caption for _, caption in batch])
            for (key, _), row in zip(batch, rows):
                writer.add(key, row)
            report.computed[f"condition/{m}"] += len(batch)
