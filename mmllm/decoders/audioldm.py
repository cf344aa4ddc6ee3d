"""AudioLDM (1) as a frozen audio decoder, driven through ``prompt_embeds``.

Parts: ``UNet2DConditionModel`` (conditioned through its *class embedding*, not cross-attention) +
``AutoencoderKL`` over log-mel spectrograms + ``ClapTextModelWithProjection`` + tokenizer +
``SpeechT5HifiGan`` vocoder + scheduler. AudioLDM's conditioning is one L2-normalised CLAP text
embedding per prompt, shape ``(D,)``; here it is ``(1, D)`` so every decoder's conditioning is
``(tokens, dim)``, and it is reshaped to ``(B, D)`` at the pipeline boundary.

The text encoder may also be a plain sentence encoder without a projection (a BERT such as
all-MiniLM-L6-v2, as in the toy world): its embedding is then the sentence-transformers one, the
masked mean of the last hidden state, L2-normalised, of width ``hidden_size``. Any vocoder with
AudioLDM's call contract (log-mel ``(B, T, mel)`` -> waveform ``(B, samples)``) and config keys
(``sampling_rate``, ``upsample_rates``, ``model_in_dim``) works, e.g. a Griffin-Lim module.

diffusers 0.42 keeps ``AudioLDMPipeline`` under ``pipelines/deprecated`` (the deprecation warning it logs when
this decoder builds its pipeline is dropped: :mod:`mmllm.log_filters`); it still imports as ``diffusers.AudioLDMPipeline``.

YAML::

    audio: {kind: audioldm-audio, model: cvssp/audioldm-s-full-v2, steps: 25, audio_length_s: 5.12}
    audio: {kind: audioldm-audio, tiny: {}, steps: 2, guidance: 2.0}
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmllm.data.media import Audio
from mmllm.decoders._diffusion import (
    DiffusionOptions,
    FrozenDiffusionDecoder,
    check_conditioning,
    denoising_mse,
    load_parts,
    make_scheduler,
    row_generators,
    seeded_generators,
    tiny_text_tokenizer,
    training_scheduler,
    warn_remote_code,
)
from mmllm.seeding import seeded

log = logging.getLogger(__name__)

LOG_MEL_FLOOR = 1e-5  # AudioLDM / HiFi-GAN dynamic range compression: log(clamp(mel, 1e-5))


@dataclass
class TinyAudioLDM:
    """Sizes of the in-process random-weight build."""

    unet_channels: list[int] = field(default_factory=lambda: [8, 16])
    vae_channels: list[int] = field(default_factory=lambda: [8, 16])  # latent scale = 2 ** (levels - 1)
    latent_channels: int = 4
    norm_groups: int = 4
    text_dim: int = 16  # CLAP text transformer width
    text_layers: int = 1
    text_heads: int = 2
    projection_dim: int = 16  # conditioning width D
    max_length: int = 16
    vocab_size: int = 512
    mel_bins: int = 16  # vocoder model_in_dim; must be divisible by the latent scale
    frames: int = 64  # native spectrogram length (UNet sample_size = frames / latent scale)
    sampling_rate: int = 16000
    upsample_rates: list[int] = field(default_factory=lambda: [4, 4])  # hop length = product
    vocoder_channels: int = 16
    seed: int = 0


class AudioLDMDecoder(FrozenDiffusionDecoder):
    modality = "audio"
    Tiny = TinyAudioLDM
    GENERATION_PARTS = ("unet", "vae", "vocoder")

    @dataclass
    class Options(DiffusionOptions):
        guidance: float = 2.5
        audio_length_s: float | None = None  # None: the UNet's native length (5.12 s for AudioLDM-S)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.audio_length_s is not None and self.audio_length_s <= 0:
                raise ValueError(f"audio_length_s must be > 0, got {self.audio_length_s}")

    def __init__(
        self,
        unet: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        vocoder: Any,
        scheduler: Any,
        options: AudioLDMDecoder.Options,
        parts: str = "all",
    ) -> None:
        self.text_projection = hasattr(text_encoder.config, "projection_dim")  # CLAP; else mean pooling
        dim = text_encoder.config.projection_dim if self.text_projection else text_encoder.config.hidden_size
        expected = unet.config.projection_class_embeddings_input_dim
        if unet.config.class_embed_type != "simple_projection" or expected != dim:
            raise ValueError(
                f"UNet class embedding expects {expected}-d input, the text embedding is {dim}-d"
            )
        super().__init__((1, dim), parts)
        self._adopt(unet=unet, vae=vae, text_encoder=text_encoder, vocoder=vocoder)
        self.tokenizer = tokenizer
        self.scheduler = make_scheduler(scheduler, options.scheduler, options.scheduler_prediction_type)
        self.noise_scheduler = training_scheduler(self.scheduler)
        self.options = options
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.sampling_rate = int(vocoder.config.sampling_rate)
        self.hop_length = int(np.prod(vocoder.config.upsample_rates))
        self.mel_bins = int(vocoder.config.model_in_dim)
        seconds_per_frame = self.hop_length / self.sampling_rate
        length = options.audio_length_s
        if length is None:
            length = unet.config.sample_size * self.vae_scale_factor * seconds_per_frame
        self.audio_length_s = float(length)
        # Spectrogram frames, rounded up to the latent grid exactly as the pipeline does.
        frames = int(self.audio_length_s / seconds_per_frame)
        self.frames = math.ceil(frames / self.vae_scale_factor) * self.vae_scale_factor

    # ---------------------------------------------------------------------------------- building

    @classmethod
    def tiny_options(cls, **overrides: Any) -> dict[str, Any]:
        """The tiny build's options: its entry in configs/assemblies/_tiny_decoders.yaml minus ``kind``."""
        values: dict[str, Any] = {"tiny": {}, "steps": 2, "guidance": 2.0, "audio_length_s": 0.064}
        return {**values, **overrides}

    @staticmethod
    def _load(options: AudioLDMDecoder.Options, dtype: torch.dtype, skip: tuple[str, ...]) -> dict[str, Any]:
        from diffusers import AudioLDMPipeline

        warn_remote_code(options, "audioldm-audio")
        log.info("loading AudioLDM parts from %s", options.model)
        return load_parts(
            AudioLDMPipeline, options, dtype, ("unet", "vae", "text_encoder", "tokenizer", "vocoder", "scheduler"), skip
        )

    @staticmethod
    def _build_tiny(t: TinyAudioLDM) -> dict[str, Any]:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import (
            ClapTextConfig,
            ClapTextModelWithProjection,
            SpeechT5HifiGan,
            SpeechT5HifiGanConfig,
        )

        scale = 2 ** (len(t.vae_channels) - 1)
        if t.mel_bins % scale or t.frames % scale:
            raise ValueError(f"tiny.mel_bins and tiny.frames must be multiples of the latent scale {scale}")
        tokenizer = tiny_text_tokenizer(t.max_length, t.vocab_size)
        levels = len(t.unet_channels)
        with seeded(t.seed):
            unet = UNet2DConditionModel(
                sample_size=t.frames // scale,
                in_channels=t.latent_channels,
                out_channels=t.latent_channels,
                block_out_channels=tuple(t.unet_channels),
                layers_per_block=1,
                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
                up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
                # AudioLDM passes no encoder_hidden_states: its "cross" attention is self-attention,
                # so each level's cross_attention_dim is that level's width.
                cross_attention_dim=tuple(t.unet_channels),
                attention_head_dim=8,
                norm_num_groups=t.norm_groups,
                class_embed_type="simple_projection",
                projection_class_embeddings_input_dim=t.projection_dim,
                class_embeddings_concat=True,
            )
            vae = AutoencoderKL(
                in_channels=1,
                out_channels=1,
                down_block_types=("DownEncoderBlock2D",) * len(t.vae_channels),
                up_block_types=("UpDecoderBlock2D",) * len(t.vae_channels),
                block_out_channels=tuple(t.vae_channels),
                latent_channels=t.latent_channels,
                norm_num_groups=t.norm_groups,
                sample_size=t.frames,
            )
            text_encoder = ClapTextModelWithProjection(
                ClapTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=t.text_dim,
                    intermediate_size=2 * t.text_dim,
                    num_hidden_layers=t.text_layers,
                    num_attention_heads=t.text_heads,
                    # RoBERTa-style positions start after the pad id
                    max_position_embeddings=t.max_length + tokenizer.pad_token_id + 2,
                    projection_dim=t.projection_dim,
                    pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            )
            vocoder = SpeechT5HifiGan(
                SpeechT5HifiGanConfig(
                    model_in_dim=t.mel_bins,
                    sampling_rate=t.sampling_rate,
                    upsample_initial_channel=t.vocoder_channels,
                    upsample_rates=list(t.upsample_rates),
                    upsample_kernel_sizes=[2 * r for r in t.upsample_rates],
                    resblock_kernel_sizes=[3],
                    resblock_dilation_sizes=[[1, 3]],
                    normalize_before=False,
                )
            )
        scheduler = DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.0015,
            beta_end=0.0195,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "vocoder": vocoder,
                "scheduler": scheduler}

    def _build_pipeline(self) -> Any:
        from diffusers import AudioLDMPipeline

        return AudioLDMPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            vocoder=self.vocoder,
        )

    # ---------------------------------------------------------------------------------- interface

    @torch.no_grad()
    def condition(self, captions: list[str]) -> torch.Tensor:
        """Normalised text embeddings, ``(B, 1, D)``: CLAP's projected embedding (the pipeline's own
        ``_encode_prompt``) or, for a text encoder without projection, the masked mean pooling."""
        if not captions:
            raise ValueError("condition() needs at least one caption")
        self._require("conditioning", "encode captions")
        device, _ = self._device_dtype()
        if self.text_projection:
            embeds = self.pipeline._encode_prompt(list(captions), device, 1, False)
            return embeds[:, None, :]
        batch = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).to(device)
        hidden = self.text_encoder(batch.input_ids, attention_mask=batch.attention_mask)[0]
        mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)[:, None, :]

    def generate(
        self,
        conditioning: torch.Tensor,
        *,
        negative_conditioning: torch.Tensor | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seeds: list[int] | None = None,
    ) -> list[Audio]:
        check_conditioning(conditioning, self.conditioning_shape, "audioldm-audio")
        self._require("all", "generate audio")
        device, dtype = self._device_dtype()
        guidance = self.options.guidance if guidance is None else guidance
        batch = conditioning.shape[0]
        negative = self._negative(negative_conditioning, batch, guidance)
        if negative is not None:
            negative = negative.reshape(batch, -1)
        out = self.pipeline(
            prompt_embeds=unit_class_labels(conditioning.detach()).to(device, dtype),
            negative_prompt_embeds=negative,
            num_inference_steps=steps or self.options.steps,
            guidance_scale=guidance,
            audio_length_in_s=self.audio_length_s,
            generator=row_generators(seeds, batch, device),
            output_type="np",
        )
        return [Audio(np.asarray(wave, dtype=np.float32), self.sampling_rate) for wave in out.audios]

    def log_mel(self, audio: Audio) -> torch.Tensor:
        """AudioLDM's input features: ``(frames, mel_bins)`` log-mel of the (resampled, mono) waveform.

        Same recipe as AudioLDM's training data: mean removed, peak scaled to 0.5, Hann STFT with
        ``n_fft`` the power of two >= 4 x hop (1024 for hop 160), Slaney mel filters from 0 Hz to
        Nyquist, ``log(clamp(mel, 1e-5))``, cropped or padded to this decoder's frame count.
        """
        from transformers.audio_utils import mel_filter_bank

        if audio.sample_rate != self.sampling_rate:
            audio = audio.resampled(self.sampling_rate)
        wave = torch.from_numpy(audio.mono().astype(np.float32))
        wave = wave - wave.mean()
        wave = 0.5 * wave / (wave.abs().max() + 1e-8)
        samples = self.frames * self.hop_length
        wave = torch.nn.functional.pad(wave[:samples], (0, max(0, samples - wave.shape[0])))
        n_fft = 2 ** math.ceil(math.log2(4 * self.hop_length))
        spec = torch.stft(
            wave,
            n_fft,
            hop_length=self.hop_length,
            window=torch.hann_window(n_fft),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        ).abs()
        filters = mel_filter_bank(
            n_fft // 2 + 1,
            self.mel_bins,
            0.0,
            self.sampling_rate / 2,
            self.sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        mel = torch.from_numpy(filters.T.astype(np.float32)) @ spec
        return torch.log(mel.clamp(min=LOG_MEL_FLOOR)).T[: self.frames]

    def denoising_loss(
        self, conditioning: torch.Tensor, media: list[Audio], seed: int | list[int] | None = None
    ) -> torch.Tensor:
        check_conditioning(conditioning, self.conditioning_shape, "audioldm-audio")
        batch = conditioning.shape[0]
        if len(media) != batch:
            raise ValueError(f"{len(media)} audio clips for {batch} conditioning rows")
        self._require("denoise", "compute the denoising loss")
        device, dtype = self._device_dtype()
        generator = seeded_generators(seed, device)
        mels = torch.stack([self.log_mel(a) for a in media])[:, None].to(device, dtype)  # (B, 1, T, mel)
        with torch.no_grad():
            latents = self.vae.encode(mels).latent_dist.sample(generator=generator)
            latents = latents * self.vae.config.scaling_factor
        class_labels = unit_class_labels(conditioning).to(device, dtype)

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return self.unet(noisy, timesteps, encoder_hidden_states=None, class_labels=class_labels).sample

        return denoising_mse(predict, latents, self.noise_scheduler, generator)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": self.options.model or "tiny",
            "sampling_rate": self.sampling_rate,
            "audio_length_s": self.audio_length_s,
            "prediction_type": self.scheduler.config.prediction_type,
        }


def unit_class_labels(conditioning: torch.Tensor) -> torch.Tensor:
    """``(B, 1, D)`` conditioning -> the UNet's ``(B, D)`` class labels, L2-normalised in fp32: AudioLDM's
    UNet only ever saw unit vectors (its pipeline normalises the text embeddings it computes, and leaves
    ``prompt_embeds`` given to it as they are), and :meth:`AudioLDMDecoder.condition` -- the MSE target -- is
    unit-norm too, so a projection that is near it but not on the sphere is put there, in training's
    denoising loss and in generation alike."""
    flat = conditioning.reshape(conditioning.shape[0], -1)
    return torch.nn.functional.normalize(flat.float(), dim=-1)
