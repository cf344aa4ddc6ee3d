"""Judges: one small classifier per modality that reads every attribute back from media.

A judge is trained on true media of the world's *training* combinations only, apart from every
other part (no encoder, decoder or VAE is involved), with augmentations standing in for the
defects of generated media (noise, blur, colour and gain jitter; for sound, a Griffin-Lim
round trip, which is a fixed algorithm, not a trained part). It scores:

* true media (its own accuracy, seen and held-out combinations);
* generated media (a decoder's judged attribute accuracy).

Inputs: image -> ``(3, 32, 32)`` in [0, 1]; video -> 8 frames stacked as ``(24, 32, 32)``;
audio -> the world's log-mel ``(1, 64, 64)`` (16 kHz, hop 256, peak-normalised).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmllm.data.media import Audio, Video
from mmllm.toyworld.render import IMAGE_SIZE, SAMPLE_RATE, SOUND_SAMPLES, VIDEO_FRAMES
from mmllm.toyworld.vocoder import mel_filters
from mmllm.toyworld.world import SPECS

log = logging.getLogger(__name__)

HOP = 256
MEL_BINS = 64
FRAMES = SOUND_SAMPLES // HOP  # 64
N_FFT = 1024


@dataclass
class JudgeConfig:
    modality: str
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    hidden: int = 128


def image_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images -> ``(B, 3, 32, 32)`` floats in [0, 1] (resized if another size)."""
    out = []
    for img in images:
        img = img.convert("RGB")
        if img.size != (IMAGE_SIZE, IMAGE_SIZE):
            img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


def video_tensor(videos: list[Video]) -> torch.Tensor:
    """Videos -> ``(B, 3 * 8, 32, 32)``: 8 evenly spaced frames, stacked along channels."""
    return torch.stack([image_tensor(v.sample_frames(VIDEO_FRAMES)).flatten(0, 1) for v in videos])


_FILTERS: torch.Tensor | None = None


def log_mel(waves: torch.Tensor) -> torch.Tensor:
    """``(B, samples)`` at 16 kHz -> ``(B, 1, 64, 64)`` log-mel (time x mel): the AudioLDM recipe
    (mean removed, peak 0.5, Hann STFT, Slaney mel 0-8 kHz, ``log(clamp(mel, 1e-5))``)."""
    global _FILTERS
    if _FILTERS is None:
        _FILTERS = torch.from_numpy(mel_filters(SAMPLE_RATE, MEL_BINS, N_FFT).T.copy())
    samples = FRAMES * HOP
    waves = waves[:, :samples]
    waves = F.pad(waves, (0, samples - waves.shape[1]))
    waves = waves - waves.mean(dim=1, keepdim=True)
    waves = 0.5 * waves / (waves.abs().amax(dim=1, keepdim=True) + 1e-8)
    spec = torch.stft(
        waves, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, pad_mode="reflect", return_complex=True
    ).abs()
    mel = _FILTERS @ spec  # (B, mel, T + 1)
    return torch.log(mel.clamp(min=1e-5)).transpose(1, 2)[:, None, :FRAMES]


def audio_waves(clips: list[Audio]) -> torch.Tensor:
    waves = []
    for clip in clips:
        if clip.sample_rate != SAMPLE_RATE:
            clip = clip.resampled(SAMPLE_RATE)
        wave = torch.from_numpy(clip.mono().astype(np.float32))[:SOUND_SAMPLES]
        waves.append(F.pad(wave, (0, SOUND_SAMPLES - wave.shape[0])))
    return torch.stack(waves)


def media_tensor(modality: str, media: list[Any]) -> torch.Tensor:
    if modality == "image":
        return image_tensor(media)
    if modality == "video":
        return video_tensor(media)
    if modality == "audio":
        return log_mel(audio_waves(media))
    raise ValueError(f"unknown modality {modality!r}")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.SiLU(),
        nn.MaxPool2d(2),
    )


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, cout))


def foreground(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, F * 3, H, W)`` frames in [0, 1] -> (colour-blind foreground map ``(B, F, H, W)``: each
    pixel's distance from the frame's background colour (the median of its border), the foreground's
    mean colour ``(B, 3)`` and the background colour ``(B, 3)``)."""
    b, _, h, w = x.shape
    frames = x.reshape(b, -1, 3, h, w)
    border = torch.cat([frames[..., 0, :], frames[..., -1, :], frames[..., 0], frames[..., -1]], dim=-1)
    background = border.median(dim=-1).values  # (B, F, 3)
    distance = (frames - background[..., None, None]).norm(dim=2) / math.sqrt(3)  # (B, F, H, W)
    weight = distance.pow(4)
    colour = (frames * weight[:, :, None]).sum(dim=(1, 3, 4)) / weight.sum(dim=(1, 2, 3))[:, None].clamp(min=1e-6)
    return distance, colour, background.mean(dim=1)


def profiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 1, T, mel)`` log-mel -> (energy envelope over time ``(B, T)``, spectrum of the sounding
    frames ``(B, mel)``), both in log units relative to their maximum."""
    logmel = x[:, 0]
    energy = torch.logsumexp(logmel, dim=-1)  # (B, T)
    envelope = energy - energy.amax(dim=1, keepdim=True)
    active = torch.softmax(4 * envelope, dim=1)  # the loud frames
    spectrum = (logmel * active[..., None]).sum(dim=1)
    return envelope, spectrum - spectrum.amax(dim=1, keepdim=True)


class Judge(nn.Module):
    """Reads each attribute from only what it depends on, so no head can lean on the attribute
    correlations of the training combinations (which the held-out ones break):

    * image / video: ``shape``, ``size``, ``position``, ``direction`` from a CNN over the colour-blind
      foreground map of each frame; ``colour`` from the foreground's mean colour (and the background's);
    * audio: ``rhythm`` from the energy envelope over time; ``pitch`` and ``timbre`` from the
      spectrum of the sounding frames.
    """

    def __init__(self, config: JudgeConfig) -> None:
        super().__init__()
        self.config = config
        self.spec = SPECS[config.modality]
        hidden = config.hidden
        names = [a.name for a in self.spec.attributes]
        sizes = {a.name: len(a.values) for a in self.spec.attributes}
        if config.modality == "audio":
            self.rhythm = _mlp(FRAMES, hidden, sizes["rhythm"])
            self.spectral = _mlp(MEL_BINS, hidden, sizes["pitch"] + sizes["timbre"])
        else:
            frames = VIDEO_FRAMES if config.modality == "video" else 1
            chans = [frames, *config.channels]
            side = IMAGE_SIZE // 2 ** len(config.channels)
            self.body = nn.Sequential(
                *(_block(a, b) for a, b in zip(chans[:-1], chans[1:])),
                nn.Flatten(),
                nn.Linear(chans[-1] * side * side, hidden),
                nn.SiLU(),
                nn.Dropout(0.1),
            )
            self.form = nn.Linear(hidden, sum(sizes[n] for n in names if n != "colour"))
            self.colour = _mlp(6, hidden, sizes["colour"])
        self.sizes = sizes

    @property
    def modality(self) -> str:
        return self.config.modality

    def _split(self, logits: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        return dict(zip(names, logits.split([self.sizes[n] for n in names], dim=-1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.modality == "audio":
            envelope, spectrum = profiles(x)
            out = self._split(self.spectral(spectrum / 4), ["pitch", "timbre"])
            out["rhythm"] = self.rhythm(envelope / 4)
            return out
        distance, colour, background = foreground(x)
        form_names = [a.name for a in self.spec.attributes if a.name != "colour"]
        out = self._split(self.form(self.body(distance * 4)), form_names)
        out["colour"] = self.colour(torch.cat([colour, background], dim=-1) * 2 - 1)
        return out

    def loss(self, x: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(x)
        return sum(F.cross_entropy(logits[k], labels[k]) for k in logits) / len(logits)

    def labels(self, attributes: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        return {
            a.name: torch.tensor([a.index(attrs[a.name]) for attrs in attributes]) for a in self.spec.attributes
        }

    @torch.no_grad()
    def predict(self, media: list[Any], batch_size: int = 64) -> list[dict[str, str]]:
        """Media -> one ``{attribute: value}`` per item."""
        was_training = self.training
        self.eval()
        out: list[dict[str, str]] = []
        for start in range(0, len(media), batch_size):
            logits = self(media_tensor(self.modality, media[start : start + batch_size]))
            picks = {k: v.argmax(-1).tolist() for k, v in logits.items()}
            for i in range(len(next(iter(picks.values())))):
                out.append({a.name: a.values[picks[a.name][i]] for a in self.spec.attributes})
        self.train(was_training)
        return out

    # -- files ------------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: Path) -> Judge:
        from safetensors.torch import load_file

        config = JudgeConfig(**json.loads((Path(folder) / "config.json").read_text()))
        judge = cls(config)
        judge.load_state_dict(load_file(str(Path(folder) / "model.safetensors")), strict=True)
        return judge.eval().requires_grad_(False)


def attribute_accuracy(
    predicted: list[dict[str, str | None]], truth: list[dict[str, str]]
) -> dict[str, float]:
    """Per-attribute accuracy, ``all`` (every attribute right), ``mean`` (mean over attributes) and ``n`` (the
    items scored). Every item counts: one prediction per item, in order (an attribute that could not be read
    is ``None``, and wrong), so that no score is over fewer items than were asked."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} items: score every item "
                         "(an unreadable one as None), not a subset")
    if not truth:
        return {}
    names = list(truth[0])
    out = {n: float(np.mean([p.get(n) == t[n] for p, t in zip(predicted, truth)])) for n in names}
    out["all"] = float(np.mean([all(p.get(n) == t[n] for n in names) for p, t in zip(predicted, truth)]))
    out["mean"] = float(np.mean([out[n] for n in names]))
    out["n"] = len(truth)
    return out


# ------------------------------------------------------------------------------------ augmentation


def augment(modality: str, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Defects generated media may have: noise, blur, small colour/brightness shifts (image, video);
    noise and smearing of the log-mel (audio). Attributes stay unambiguous."""
    b = x.shape[0]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    if modality in ("image", "video"):
        frames = x.reshape(b, -1, 3, *x.shape[-2:])
        shift = (rand(b, 1, 3, 1, 1) - 0.5) * 0.08 + (rand(b, 1, 1, 1, 1) - 0.5) * 0.1
        frames = frames + shift
        blur = rand(b) < 0.4
        if blur.any():
            kernel = torch.tensor([0.25, 0.5, 0.25])
            k2 = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
            flat = frames[blur].flatten(0, 1)
            frames[blur] = F.conv2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), k2, groups=3).reshape(
                frames[blur].shape
            )
        sigma = rand(b, 1, 1, 1, 1) * 0.06
        frames = frames + sigma * torch.randn(frames.shape, generator=generator)
        return frames.clamp(0, 1).reshape(x.shape)
    if modality == "audio":
        sigma = rand(b, 1, 1, 1) * 0.5
        x = x + sigma * torch.randn(x.shape, generator=generator)
        smear = rand(b) < 0.3
        if smear.any():
            x[smear] = F.avg_pool2d(F.pad(x[smear], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return x
    raise ValueError(f"unknown modality {modality!r}")


def griffin_lim_round_trip(waves: torch.Tensor, n_iter: int = 16) -> torch.Tensor:
    """True waveforms -> log-mel -> Griffin-Lim -> waveforms: what the audio decoder's vocoder does."""
    from mmllm.toyworld.vocoder import GriffinLimVocoder

    vocoder = GriffinLimVocoder(SAMPLE_RATE, MEL_BINS, (HOP,), n_iter=n_iter)
    return vocoder(log_mel(waves)[:, 0])
