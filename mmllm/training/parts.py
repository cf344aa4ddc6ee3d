"""What of the frozen parts a training stage runs, decided from its losses and its data.

A decoder runs only for the modalities some sample asks the model to produce, and then only as far as
the losses need: its text encoder for the MSE targets, its whole pipeline for the denoising loss. An
encoder runs only for the modalities some sample gives as input. Everything else is built from its
config alone, reading no weights (a decoder's unloaded parts, an encoder's ``EncoderShape``), so a
stage holds no weights it never runs: encode-align (media -> caption) loads no decoder weights,
decode-align (caption -> signal tokens) no encoder weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmllm.config import LossConfig
from mmllm.data.formats import Conversation


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
