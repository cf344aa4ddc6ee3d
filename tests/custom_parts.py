"""Components of a user's own, named in YAML by import path (``kind: tests.custom_parts:PixelEncoder``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mmllm.encoders.base import MediaEncoder


class PixelEncoder(MediaEncoder):
    """A user's own encoder, named in YAML as `kind: tests.custom_parts:PixelEncoder`: an image shrunk to
    size x size pixels through one linear layer. Its from_options takes no `weights` (built whole)."""

    modality = "image"

    @dataclass
    class Options:
        size: int = 4
        dim: int = 8

    def __init__(self, o: Options):
        super().__init__()
        self.size = o.size
        self.proj = nn.Linear(3 * o.size * o.size, o.dim)

    @classmethod
    def from_options(cls, o: Options, where: str = "") -> PixelEncoder:
        return cls(o)

    @property
    def output_dim(self) -> int:
        return self.proj.out_features

    @property
    def num_tokens(self) -> int:
        return 1

    def preprocess(self, items):
        arrays = [np.asarray(im.convert("RGB").resize((self.size, self.size)), dtype=np.float32) / 255 for im in items]
        return torch.from_numpy(np.stack(arrays)).flatten(1)

    def forward(self, inputs):
        return self.proj(inputs)[:, None]

