"""What of the frozen parts a training stage runs, decided from its losses and its data.

A decoder runs only for the modalities some sample asks the model to produce, and then only as far as
the losses need: its text encoder for the MSE targets, its denoiser and VAE for the denoising loss. An
encoder runs only for the modalities some sample gives as input. Everything else is built from its
config alone, reading no weights (a decoder's unloaded parts, an encoder's ``EncoderShape``), so a
stage holds no weights it never runs: encode-align (media -> caption) loads no decoder weights,
decode-align (caption -> signal tokens) no encoder weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mmllm.config import ConfigError, LossConfig
from mmllm.data.formats import Conversation
from mmllm.data.index import data_summary, embedded_output_modalities
from mmllm.data.precomputed import Coverage, Precomputed
from mmllm.encoders.base import EncoderShape

if TYPE_CHECKING:
    from mmllm.model import AnyToAnyModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageParts:
    """Per output modality, what its decoder loads (one of ``DECODER_PARTS``; a modality not named
    loads ``"config"``); the input modalities whose encoder is kept."""

    decoders: dict[str, str] = field(default_factory=dict)
    encoders: frozenset[str] = frozenset()

    def describe(self) -> str:
        decoders = ", ".join(f"{m} {p}" for m, p in sorted(self.decoders.items()) if p != "config")
        encoders = ", ".join(sorted(self.encoders)) or "none"
        return f"decoders {decoders + ' (others: config only)' if decoders else 'config only'}; encoders {encoders}"


# a decoder's parts -> the same without its text side (what cache.require frees when the targets are precomputed)
TEXT_SIDE_RELEASE = {"conditioning": "config", "all": "denoise"}


def decoder_parts_for(losses: LossConfig) -> str:
    """What a decoder loads for a modality the stage's samples ask for: the text encoder for MSE
    targets, the denoiser and VAE for the denoising loss (which is conditioned on the output
    projection), both for both, else its config only."""
    if losses.denoise > 0:
        return "all" if losses.mse > 0 else "denoise"
    return "conditioning" if losses.mse > 0 else "config"


def cache_parts(parts: StageParts) -> StageParts:
    """What ``mmllm cache`` runs of a stage's parts: its encoders and its decoders' text side (the
    conditioning targets); never a denoiser."""
    decoders = {m: "conditioning" for m, p in parts.decoders.items() if p in TEXT_SIDE_RELEASE}  # hold the text side
    return StageParts(decoders, parts.encoders)


def stage_parts(losses: LossConfig, per_dataset: list[Sequence[Conversation]]) -> StageParts:
    """What the stage's conversations and losses run."""
    summaries = [data_summary(convs) for convs in per_dataset]  # gathered as the data was read
    inputs = {m for s in summaries for m in s.inputs}
    outputs = {m for s in summaries for m in s.outputs}
    parts = decoder_parts_for(losses)
    return StageParts({m: parts for m in sorted(outputs) if parts != "config"}, frozenset(inputs))


def require_cache_folder(precomputed: Precomputed) -> None:
    """``cache.require`` with a ``cache.dir`` that holds no feature cache (on this machine): refused."""
    if precomputed.cache_dir is not None and precomputed.cache is None:
        raise ConfigError(f"cache.require: cache.dir {precomputed.cache_dir} holds no feature cache yet; run `mmllm "
                          "cache --config <this stage>` first (with several machines: on each, or give a cache.dir "
                          "every machine sees)")


def release_cached(model: AnyToAnyModel, precomputed: Precomputed, conversations: Iterable[Conversation],
                   rank: int = 0, world: int = 1) -> list[str]:
    """``cache.require``: check that the precomputed sources hold every encoder output and conditioning
    target the conversations read (else an error naming what is missing and how to fill it, before
    training), then free the parts they replace: an encoder becomes its :class:`EncoderShape`, a
    decoder's text encoder is freed (``"conditioning"`` -> ``"config"``; loaded whole for the denoising
    loss too, ``"all"`` -> ``"denoise"``). Checked are the encoders read from the cache, and the decoders
    holding their text side whose targets come from the cache or from the data's embedding files. With
    ``world`` processes each checks its share and they exchange the results (every
    process then frees the same). Returns the parts freed (``"encoders.image"``, ...); lookups for them can
    no longer fall back (``precomputed.required``)."""
    require_cache_folder(precomputed)
    cache_dir = precomputed.cache_dir
    embedded = embedded_output_modalities(conversations)  # gathered as the data was read, not a pass of its own
    parts = sorted({*(f"encoder/{m}" for m in precomputed.encoder_fingerprints),
                    *(f"condition/{m}" for m, d in model.decoders.items()
                      if precomputed.use_targets and getattr(d, "parts", None) in TEXT_SIDE_RELEASE
                      and (m in precomputed.decoder_fingerprints or m in embedded))})
    if not parts:
        raise ConfigError(
            "cache.require is set, but nothing this stage holds can come from precomputed sources ("
            + ("cache.dir is not set" if cache_dir is None else
               f"cache.dir {cache_dir} is used for neither encoder inputs nor conditioning targets here")
            + "); set cache.dir and run `mmllm cache --config <this stage>`, or drop cache.require")
    coverage = precomputed.coverage(conversations, parts, rank, world)
    if world > 1:
        from accelerate.utils import gather_object

        coverage = Coverage.merged(gather_object([coverage]))
    incomplete = [p for p in parts if coverage.missing.get(p)]
    if incomplete:
        lines = []
        for p in incomplete:
            kind, m = p.split("/")
            fill = ("`mmllm cache --config <this stage>` adds them" if kind == "encoder"
                    or m in precomputed.decoder_fingerprints else
                    "only the data's embedding files can hold them here (no cache.dir, or cache.targets is false)")
            lines.append(f"{p}: {len(coverage.missing[p])} of {coverage.total[p]} not found ({fill}), e.g. "
                         f"{', '.join(coverage.missing[p][:3])}")
        raise ConfigError("cache.require: the precomputed sources (cache.dir "
                          f"{cache_dir if cache_dir is not None else 'not set'}, embedding files) do not hold "
                          "everything this stage reads -- " + "; ".join(lines)
                          + ". A stale cache section means the part changed since; or set cache.require=false")
    before = _held(model)
    freed = []
    for part in parts:
        kind, m = part.split("/")
        if not coverage.complete(part):  # none of these can be read: nothing to free
            continue
        if kind == "encoder":
            model.encoders[m] = EncoderShape(model.encoders[m], reason=(
                f"the feature cache held the features of every {m} input this stage reads when it started "
                "(cache.require); run `mmllm cache --config <this stage>` to add what changed, or set "
                "cache.require=false"))
        else:
            decoder = model.decoders[m]
            decoder.release(TEXT_SIDE_RELEASE[decoder.parts])
        freed.append(part)
    precomputed.required = frozenset(freed)
    if coverage.unreadable:
        log.warning("cache.require: %d media file(s) cannot be read; their samples will be skipped, e.g. %s",
                    len(coverage.unreadable), coverage.unreadable[0])
    log.info("cache.require: the precomputed sources hold all %s this stage reads; not holding %s (%.1f M "
             "parameters freed)",
             ", ".join(f"{coverage.total[p]} {p.split('/')[1]} {'inputs' if p.startswith('encoder') else 'targets'}"
                       for p in freed),
             ", ".join(_label(p) + ("" if p.startswith("encoder") else " text encoder") for p in freed) or "nothing",
             (before - _held(model)) / 1e6)
    return [_label(p) for p in freed]


def _label(part: str) -> str:
    """``"encoder/image"`` -> ``"encoders.image"``, ``"condition/audio"`` -> ``"decoders.audio"``."""
    kind, m = part.split("/")
    return f"{'encoders' if kind == 'encoder' else 'decoders'}.{m}"


def _held(model: AnyToAnyModel) -> int:
    from mmllm.training.freeze import count_parameters  # freeze imports this module

    return sum(r.trainable + r.frozen for r in count_parameters(model))  # shared parameters once
