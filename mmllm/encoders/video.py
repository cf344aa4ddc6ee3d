"""Video as ``num_frames`` evenly spaced frames through a frozen image encoder.

``image`` is any image encoder component (``kind`` + its options), built through the registry.
``temporal`` says how the per-frame tokens ``(F, T, D)`` become the clip's tokens:

* ``mean``   -> ``(T, D)``: tokens averaged over frames (motion is lost, order too);
* ``concat`` -> ``(F * T, D)``: frame-major, frame 0's tokens first.

There is deliberately no ``attention`` mode: the encoder is frozen, and attention without learned
weights is only a data-dependent weighted mean. Learned temporal pooling belongs to the trainable
side: use ``temporal: concat`` with ``input_projections.video.kind: resampler``, whose learned
queries attend over all frames' tokens.

Tiny example (YAML)::

    kind: frames-video
    num_frames: 4
    temporal: concat
    image: {kind: open-clip, model_name: tiny-vit, tokens: pooled, model_config: {...}}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Self

import torch

from mmllm.config import ComponentSpec, ConfigError
from mmllm.data.media import Video
from mmllm.encoders.base import EncoderShape, MediaEncoder

log = logging.getLogger(__name__)


class FramesVideoEncoder(MediaEncoder):
    modality = "video"

    @dataclass
    class Options:
        image: dict[str, Any]  # an image encoder component: {kind: ..., <its options>}
        num_frames: int = 8
        temporal: Literal["mean", "concat"] = "mean"

        def __post_init__(self) -> None:
            if self.num_frames < 1:
                raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")

    @classmethod
    def tiny_options(cls, temporal: str = "concat") -> dict[str, Any]:
        """4 frames through the tiny open_clip ViT (pooled), for tests and demos."""
        from mmllm.encoders.open_clip import OpenClipImageEncoder

        image = {"kind": "open-clip", **OpenClipImageEncoder.tiny_options(tokens="pooled")}
        return {"image": image, "num_frames": 4, "temporal": temporal}

    def __init__(self, image: MediaEncoder, options: Options) -> None:
        super().__init__()
        self.options = options
        self.image = image
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def nested_parts(cls, options: Options, where: str = "") -> list[tuple[str, ComponentSpec, str]]:
        """The image encoder it builds, as ``(table, spec, where)``: the registry checks its options with ours."""
        image_where = f"{where}.image" if where else "image"
        return [("encoder", ComponentSpec.parse(options.image, image_where), image_where)]

    @classmethod
    def from_options(cls, options: Options, where: str = "", weights: bool = True) -> MediaEncoder:
        """The encoder; with ``weights=False`` its :class:`EncoderShape`, built without reading any weights."""
        from mmllm import registry

        [(table, image_spec, image_where)] = cls.nested_parts(options, where)
        image = registry.build(table, image_spec, image_where, weights=weights)
        if getattr(image, "modality", None) != "image":
            raise ConfigError(
                f"{image_where}.kind: {options.image.get('kind')!r} is a "
                f"{image.modality or 'non-image'} encoder; "
                "frames-video needs an image encoder"
            )
        encoder = cls(image, options)
        if not weights:
            return EncoderShape(encoder)
        log.info(
            "frames-video encoder: %d frames x %s, temporal=%s -> %d token(s) x %d",
            options.num_frames,
            type(image).__name__,
            options.temporal,
            encoder.num_tokens,
            encoder.output_dim,
        )
        return encoder

    @property
    def output_dim(self) -> int:
        return self.image.output_dim

    @property
    def num_tokens(self) -> int:
        frames = self.options.num_frames if self.options.temporal == "concat" else 1
        return frames * self.image.num_tokens

    def train(self, mode: bool = True) -> Self:
        return super().train(False)  # frozen

    def preprocess(self, items: list[Video]) -> torch.Tensor:
        """-> ``(B, F, *image_input)``, e.g. ``(B, F, 3, H, W)``."""
        return torch.stack(
            [self.image.preprocess(video.sample_frames(self.options.num_frames)) for video in items]
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        batch, frames = inputs.shape[:2]
        feats = self.image(inputs.flatten(0, 1))  # (B*F, T, D)
        feats = feats.reshape(batch, frames, *feats.shape[1:])
        if self.options.temporal == "mean":
            return feats.mean(dim=1)
        return feats.flatten(1, 2)

    def describe(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "image": self.image.describe(),
            "num_frames": self.options.num_frames,
            "temporal": self.options.temporal,
        }
