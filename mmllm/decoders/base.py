"""The interface every media decoder implements.

A decoder wraps a frozen diffusers pipeline that accepts ``prompt_embeds``. It exposes:

* :attr:`conditioning_shape` -- ``(tokens, dim)`` of one item's conditioning, known at assembly;
* :meth:`condition` -- captions -> the conditioning tensor made by the pipeline's *own* text
  encoder: the target the output projection learns to match;
* :meth:`generate` -- conditioning (and optional negative conditioning for classifier-free
  guidance) -> decoded media (PIL images, :class:`~mmllm.data.media.Audio`, or
  :class:`~mmllm.data.media.Video`);
* :meth:`denoising_loss` -- the diffusion training loss through the frozen denoiser, honouring
  the scheduler's ``prediction_type``.

The pipeline object is built once, lazily, from the submodules registered on this module, and kept.

A decoder is assembled with the parts a stage uses (:data:`DECODER_PARTS`): ``"all"`` to generate, or
for the denoising loss together with the MSE targets; ``"denoise"`` (denoiser and VAE, no text encoder)
for the denoising loss alone, which is conditioned on the output projection; ``"conditioning"`` (text
encoder and tokenizer) for the MSE targets; ``"config"`` (no weights at all) when only
:attr:`conditioning_shape` matters, as in ``encode-align``. Every assembly-time check runs in every
mode, on the unloaded parts' configs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

# What a decoder loads, least to most: see the module docstring.
DECODER_PARTS: tuple[str, ...] = ("config", "conditioning", "denoise", "all")


class MediaDecoder(nn.Module, ABC):
    modality: str = ""

    @property
    @abstractmethod
    def conditioning_shape(self) -> tuple[int, int]:
        """(tokens, dim) of one item's conditioning."""

    @abstractmethod
    def condition(self, captions: list[str]) -> torch.Tensor:
        """Captions -> conditioning ``(batch, *conditioning_shape)`` from the pipeline's text encoder."""

    @abstractmethod
    def generate(
        self,
        conditioning: torch.Tensor,
        *,
        negative_conditioning: torch.Tensor | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seeds: list[int] | None = None,
    ) -> list[Any]:
        """Conditioning ``(batch, L, D)`` -> one decoded media item per row."""

    def denoising_loss(self, conditioning: torch.Tensor, media: list[Any],
                       seed: int | list[int] | None = None) -> torch.Tensor:
        """The mean diffusion loss of ``media`` conditioned on ``conditioning`` (one row each); ``seed`` seeds
        the batch's draws, or, a list, each row's draws from its own seed (independent of the batch)."""
        raise NotImplementedError(f"{type(self).__name__} has no denoising loss; set losses.denoise: 0")

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (dropout, batch-norm) whatever the parent model does."""
        return super().train(False)

    def holds(self, parts: str) -> bool:
        """Whether this decoder holds everything ``parts`` (one of DECODER_PARTS) loads."""
        return True

    def parameters_of(self, parts: str) -> list[nn.Parameter]:
        """The parameters this decoder would hold assembled with ``parts`` (one of DECODER_PARTS)."""
        return list(self.parameters())

    def describe(self) -> dict[str, Any]:
        return {"class": type(self).__name__}
