"""The interface every media encoder implements.

An encoder is frozen; it turns a batch of decoded media into features of shape
``(batch, num_tokens, output_dim)``. Raw media reach it as produced by :mod:`mmllm.data.media`:

* image: a ``PIL.Image.Image`` in RGB;
* audio: an :class:`mmllm.data.media.Audio` (float32 waveform ``(samples, channels)`` and its rate);
* video: a :class:`mmllm.data.media.Video` (a list of RGB PIL frames and their fps).

``preprocess`` does everything the encoder's own pipeline would (resize, normalise, resample,
down-mix, frame sampling) and returns one tensor batch; ``forward`` runs the tower.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class MediaEncoder(nn.Module, ABC):
    modality: str = ""
    runnable: bool = True  # False for an EncoderShape: no weights, nothing to run

    @property
    @abstractmethod
    def output_dim(self) -> int:
        """Width of each output token."""

    @property
    @abstractmethod
    def num_tokens(self) -> int:
        """Number of output tokens per item."""

    @abstractmethod
    def preprocess(self, items: list[Any]) -> torch.Tensor:
        """Decoded media -> one input batch for :meth:`forward` (on CPU)."""

    @abstractmethod
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Input batch -> features ``(batch, num_tokens, output_dim)``."""

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (dropout, batch-norm) whatever the parent model does."""
        return super().train(False)

    def describe(self) -> dict[str, Any]:
        """What identifies this encoder and its preprocessing (feeds :meth:`fingerprint`)."""
        return {"class": type(self).__name__}

    def fingerprint(self) -> str:
        """Identity of this encoder's outputs: class, describe(), every weight, media decoding version."""
        from mmllm.data.fingerprint import encoder_fingerprint

        return encoder_fingerprint(self)

    @torch.no_grad()
    def encode(self, items: list[Any]) -> torch.Tensor:
        device = next(self.parameters()).device
        dtype = next(self.parameters()).dtype
        x = self.preprocess(items).to(device=device, dtype=dtype)
        return self.forward(x)


class EncoderShape(MediaEncoder):
    """An encoder in a stage that never runs it: its modality, token count, width, weight dtype and
    description, for the input projection and its checks; no weights. Either built from the encoder's
    config on the meta device (each family's ``from_options(..., weights=False)``) when no sample gives
    its modality as input, as in decode-align on caption pairs, or put in place of a loaded encoder
    whose every output the stage reads from the feature cache (``cache.require``). ``reason`` says
    which, in the refusal."""

    runnable = False
    NO_INPUT = ("no sample of this stage gives {modality} input, and a training stage loads the encoder of each "
                "modality its data gives as input; in Python, assemble the model with encoder_weights=None (all) "
                "or with '{modality}' among them")

    def __init__(self, encoder: MediaEncoder, reason: str = NO_INPUT) -> None:
        super().__init__()
        self.modality = encoder.modality
        self._shape = (encoder.num_tokens, encoder.output_dim)
        self._describe = encoder.describe()
        self._kind = type(encoder).__name__
        self._reason = reason.format(modality=encoder.modality)
        weight = next(encoder.parameters(), None)
        # what cached features are cast to, as for the loaded encoder (a meta-built one has the dtype too)
        self.dtype = weight.dtype if weight is not None else torch.float32

    @property
    def output_dim(self) -> int:
        return self._shape[1]

    @property
    def num_tokens(self) -> int:
        return self._shape[0]

    def _refuse(self, action: str) -> RuntimeError:
        return RuntimeError(
            f"the {self.modality} encoder ({self._kind}) holds no weights, so it cannot {action}: {self._reason}"
        )

    def preprocess(self, items: list[Any]) -> torch.Tensor:
        raise self._refuse("preprocess media")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        raise self._refuse("encode media")

    def encode(self, items: list[Any]) -> torch.Tensor:
        raise self._refuse("encode media")

    def describe(self) -> dict[str, Any]:
        return self._describe

    def fingerprint(self) -> str:
        raise self._refuse("fingerprint its outputs")
