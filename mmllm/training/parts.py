"""What of the frozen parts a training stage runs, decided from its losses and its data.

A decoder runs only for the modalities some sample asks the model to produce, and then only as far as
the losses need: its text encoder for the MSE targets, its whole pipeline for the denoising loss. An
encoder runs only for the modalities some sample gives as input. Everything else is built from its
config alone, reading no weights (a decoder's unloaded parts, an encoder's ``EncoderShape``), so a
stage holds no weights it never runs: encode-align (media -> caption) loads no decoder weights,
decode-align (caption -> signal tokens) no encoder weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mmllm.config import ConfigError, LossConfig
from mmllm.data.formats import Conversation
from mmllm.data.precomputed import Precomputed
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


def decoder_parts_for(losses: LossConfig) -> str:
    """What a decoder loads for a modality the stage's samples ask for: the whole pipeline for the
    denoising loss, the text encoder for MSE targets, else its config only."""
    if losses.denoise > 0:
        return "all"
    return "conditioning" if losses.mse > 0 else "config"


def stage_parts(losses: LossConfig, per_dataset: list[list[Conversation]]) -> StageParts:
    """What the stage's conversations and losses run."""
    inputs = {ref.modality for convs in per_dataset for conv in convs for ref in conv.media_refs()}
    outputs = {out.modality for convs in per_dataset for conv in convs for out in conv.output_refs()}
    parts = decoder_parts_for(losses)
    return StageParts({m: parts for m in sorted(outputs) if parts != "config"}, frozenset(inputs))


def release_cached(model: AnyToAnyModel, precomputed: Precomputed, conversations: list[Conversation]) -> list[str]:
    """``cache.require``: check that the precomputed sources hold every encoder output and conditioning
    target the conversations read (else an error naming what is missing and how to fill it, before
    training), then free the parts they replace: an encoder becomes its :class:`EncoderShape`, a
    decoder holding its text encoder for the MSE targets only drops to its config. Returns the parts
    freed (``"encoders.image"``, ...); lookups for them can no longer fall back (``precomputed.required``)."""
    parts = sorted({*(f"encoder/{m}" for m in precomputed.encoder_fingerprints),
                    *(f"condition/{m}" for m, d in model.decoders.items()
                      if precomputed.use_targets and d.parts != "config")})
    if not parts:
        raise ConfigError(
            "cache.require is set, but nothing this stage runs can come from precomputed sources: "
            + ("cache.dir is not set" if precomputed.cache is None else
               f"cache.dir {precomputed.cache.directory} is used for neither encoders nor targets here")
            + "; run `mmllm cache --config <this stage>` with cache.dir set, or drop cache.require")
    coverage = precomputed.coverage(conversations)
    incomplete = [p for p in parts if coverage.missing.get(p)]
    if incomplete:
        where = precomputed.cache.directory if precomputed.cache is not None else "(no cache.dir)"
        lines = [f"{p}: {len(coverage.missing[p])} of {coverage.total[p]} not found, e.g. "
                 f"{', '.join(coverage.missing[p][:3])}" for p in incomplete]
        raise ConfigError(f"cache.require: the feature cache {where} does not hold everything this stage reads -- "
                          + "; ".join(lines) + ". Run `mmllm cache --config <this stage>` (it adds only what is "
                          "missing; a stale section means a part changed since), or set cache.require=false")
    before = _held(model)
    freed, required = [], set()
    for part in parts:
        kind, m = part.split("/")
        if not coverage.complete(part):  # the stage reads none of these: nothing to check or free
            continue
        if kind == "encoder":
            model.encoders[m] = EncoderShape(model.encoders[m], reason=(
                f"the feature cache held the features of every {m} input this stage reads when it started "
                "(cache.require); run `mmllm cache --config <this stage>` to add what changed, or set "
                "cache.require=false"))
        elif model.decoders[m].parts != "conditioning" or not model.decoders[m].release("config"):
            log.info("cache.require: decoders.%s keeps its text encoder (%s)", m,
                     "it holds the whole pipeline for the denoising loss, parts='all'"
                     if model.decoders[m].parts == "all" else "it cannot release parts")
            continue
        freed.append(f"{'encoders' if kind == 'encoder' else 'decoders'}.{m}")
        required.add(part)
    precomputed.required = frozenset(required)
    if coverage.unreadable:
        log.warning("cache.require: %d media file(s) could not be read (their samples will be skipped), e.g. %s",
                    len(coverage.unreadable), coverage.unreadable[0])
    held = ", ".join(f"{coverage.total[p]} {p.split('/')[1]} {'inputs' if p.startswith('encoder') else 'targets'}"
                     for p in parts if coverage.complete(p))
    log.info("cache.require: the precomputed sources hold all %s this stage reads; not holding %s (%.1f M "
             "parameters freed)", held, ", ".join(f"{f}{'' if f.startswith('encoders') else ' text encoder'}"
                                                   for f in freed) or "anything more", (before - _held(model)) / 1e6)
    return freed


def _held(model: AnyToAnyModel) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
