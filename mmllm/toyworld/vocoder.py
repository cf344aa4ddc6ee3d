"""A Griffin-Lim vocoder with AudioLDM's vocoder contract, so ``AudioLDMPipeline`` can use it.

AudioLDM calls ``vocoder(log_mel)`` with ``(B, frames, mel_bins)`` and reads ``sampling_rate``,
``upsample_rates`` (their product is the hop length) and ``model_in_dim`` (mel bins) from its
config. This module inverts exactly the log-mel that :meth:`AudioLDMDecoder.log_mel` computes
(Hann STFT, ``n_fft`` the power of two >= 4 x hop, Slaney mel filters from 0 Hz to Nyquist,
``log(clamp(mel, 1e-5))``): mel -> linear magnitude by non-negative least squares (multiplicative
updates), then fast Griffin-Lim (momentum 0.99) from a fixed initial phase, so it is deterministic.
It has no trained weights; its filter bank is stored so ``from_pretrained`` restores it as is.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

LOG_MEL_FLOOR = 1e-5


def mel_filters(sampling_rate: int, mel_bins: int, n_fft: int) -> np.ndarray:
    """``(n_fft // 2 + 1, mel_bins)`` Slaney filters from 0 Hz to Nyquist (AudioLDM's recipe)."""
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(
        n_fft // 2 + 1, mel_bins, 0.0, sampling_rate / 2, sampling_rate, norm="slaney", mel_scale="slaney"
    ).astype(np.float32)


class GriffinLimVocoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        sampling_rate: int = 16000,
        model_in_dim: int = 64,
        upsample_rates: tuple[int, ...] = (256,),
        n_iter: int = 32,
        nnls_iter: int = 10,
        momentum: float = 0.99,
    ) -> None:
        super().__init__()
        hop = int(np.prod(upsample_rates))
        self.hop_length = hop
        self.n_fft = 2 ** math.ceil(math.log2(4 * hop))
        filters = torch.from_numpy(mel_filters(sampling_rate, model_in_dim, self.n_fft).T.copy())  # (mel, freq)
        self.register_buffer("filters", filters)

    def _linear_magnitude(self, mel: torch.Tensor) -> torch.Tensor:
        """``(B, mel, T)`` mel magnitudes -> ``(B, freq, T)`` non-negative linear magnitudes."""
        fb = self.filters.float()
        target = fb.T @ mel
        spec = target / (fb.sum(0)[:, None] + 1e-8)
        for _ in range(self.config.nnls_iter):
            spec = spec * target / (fb.T @ (fb @ spec) + 1e-10)
        return spec

    @torch.no_grad()
    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        """``(B, T, mel)`` log-mel -> ``(B, T * hop)`` waveform."""
        mel = torch.exp(log_mel.float()).clamp(min=LOG_MEL_FLOOR).transpose(1, 2)
        mel = torch.where(mel <= LOG_MEL_FLOOR * 1.0001, torch.zeros_like(mel), mel)
        magnitude = self._linear_magnitude(mel)
        frames = magnitude.shape[-1]
        length = frames * self.hop_length
        window = torch.hann_window(self.n_fft, device=magnitude.device)

        def stft(x: torch.Tensor) -> torch.Tensor:
            spec = torch.stft(
                x, self.n_fft, self.hop_length, window=window, center=True, pad_mode="reflect", return_complex=True
            )
            return spec[..., :frames]

        def istft(spec: torch.Tensor) -> torch.Tensor:
            pad = torch.zeros(*spec.shape[:-1], 1, dtype=spec.dtype, device=spec.device)
            return torch.istft(
                torch.cat([spec, pad], -1), self.n_fft, self.hop_length, window=window, center=True, length=length
            )

        generator = torch.Generator(device="cpu").manual_seed(0)
        phase = torch.rand(magnitude.shape, generator=generator).to(magnitude.device) * 2 * math.pi
        angles = torch.polar(torch.ones_like(magnitude), phase)
        previous = torch.zeros_like(angles)
        alpha = self.config.momentum / (1 + self.config.momentum)
        for _ in range(self.config.n_iter):
            rebuilt = stft(istft(magnitude * angles))
            angles = rebuilt - alpha * previous
            angles = angles / angles.abs().clamp(min=1e-8)
            previous = rebuilt
        return istft(magnitude * angles).to(log_mel.dtype)
