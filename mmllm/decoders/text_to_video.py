"""ModelScope-style text-to-video as a frozen video decoder, driven through ``prompt_embeds``.

Parts: ``UNet3DConditionModel`` + ``AutoencoderKL`` (applied frame by frame) + ``CLIPTextModel`` +
tokenizer + scheduler. The conditioning is the text encoder's last hidden state,
``(tokenizer.model_max_length, hidden_size)``: ``(77, 1024)`` for damo-vilab/text-to-video-ms-1.7b.

diffusers 0.42 keeps ``TextToVideoSDPipeline`` under ``pipelines/deprecated`` (the deprecation
warning it logs when this decoder builds its pipeline is dropped: :mod:`mmllm.log_filters`). Its denoising loop folds frames into the
batch for ``scheduler.step``, so only deterministic samplers (DDIM with eta 0, DPM-Solver, ...) work
with per-row generators.

YAML::

    video: {kind: t2v-video, model: damo-vilab/text-to-video-ms-1.7b, num_frames: 16, steps: 25}
    video: {kind: t2v-video, tiny: {}, num_frames: 4, steps: 2, guidance: 2.0, height: 32, width: 32}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from mmllm.data.media import Video
from mmllm.decoders._diffusion import (
    DiffusionOptions,
    FrozenDiffusionDecoder,
    check_conditioning,
    denoising_mse,
    load_parts,
    make_scheduler,
    repeat_generators,
    row_generators,
    seeded_generators,
    split_generators,
    tiny_text_tokenizer,
    training_scheduler,
    warn_remote_code,
)
from mmllm.seeding import seeded

log = logging.getLogger(__name__)

VAE_CHUNK = 16  # frames per VAE encode call in the denoising loss


@dataclass
class TinyT2V:
    """Sizes of the in-process random-weight build."""

    unet_channels: list[int] = field(default_factory=lambda: [8, 16])
    vae_channels: list[int] = field(default_factory=lambda: [8, 16])  # latent scale = 2 ** (levels - 1)
    latent_channels: int = 4
    norm_groups: int = 4
    heads: int = 2  # UNet3D attention heads (diffusers names this attention_head_dim)
    text_dim: int = 32  # conditioning width D
    text_layers: int = 2
    text_heads: int = 2
    max_length: int = 16  # conditioning length L
    vocab_size: int = 512
    size: int = 32  # default frame side in pixels
    seed: int = 0


class TextToVideoDecoder(FrozenDiffusionDecoder):
    modality = "video"
    Tiny = TinyT2V

    @dataclass
    class Options(DiffusionOptions):
        guidance: float = 9.0
        num_frames: int = 16
        fps: float = 8.0
        height: int | None = None  # None: the UNet's native size; multiples of 8 (the pipeline's rule)
        width: int | None = None

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.num_frames < 1:
                raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
            for name in ("height", "width"):
                value = getattr(self, name)
                if value is not None and (value < 8 or value % 8):
                    raise ValueError(f"{name} must be a positive multiple of 8, got {value}")

    def __init__(
        self,
        unet: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler: Any,
        options: TextToVideoDecoder.Options,
        parts: str = "all",
    ) -> None:
        hidden = text_encoder.config.hidden_size
        if unet.config.cross_attention_dim != hidden:
            raise ValueError(
                f"UNet cross_attention_dim {unet.config.cross_attention_dim} != text encoder width {hidden}"
            )
        super().__init__((tokenizer.model_max_length, hidden), parts)
        self._adopt(unet=unet, vae=vae, text_encoder=text_encoder)
        self.tokenizer = tokenizer
        self.scheduler = make_scheduler(scheduler, options.scheduler, options.scheduler_prediction_type)
        self.noise_scheduler = training_scheduler(self.scheduler)
        self.options = options
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.height = options.height or unet.config.sample_size * self.vae_scale_factor
        self.width = options.width or unet.config.sample_size * self.vae_scale_factor

    # ---------------------------------------------------------------------------------- building

    @classmethod
    def tiny_options(cls, **overrides: Any) -> dict[str, Any]:
        """The tiny build's options: its entry in configs/assemblies/_tiny_decoders.yaml minus ``kind``."""
        values: dict[str, Any] = {
            "tiny": {},
            "steps": 2,
            "guidance": 2.0,
            "num_frames": 4,
            "fps": 8.0,
            "height": 32,
            "width": 32,
        }
        return {**values, **overrides}

    @staticmethod
    def _load(options: TextToVideoDecoder.Options, dtype: torch.dtype, skip: tuple[str, ...]) -> dict[str, Any]:
        from diffusers import TextToVideoSDPipeline

        warn_remote_code(options, "t2v-video")
        log.info("loading text-to-video parts from %s", options.model)
        return load_parts(
            TextToVideoSDPipeline, options, dtype, ("unet", "vae", "text_encoder", "tokenizer", "scheduler"), skip
        )

    @staticmethod
    def _build_tiny(t: TinyT2V) -> dict[str, Any]:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        tokenizer = tiny_text_tokenizer(t.max_length, t.vocab_size)
        levels = len(t.unet_channels)
        with seeded(t.seed):
            unet = UNet3DConditionModel(
                sample_size=t.size // 2 ** (len(t.vae_channels) - 1),
                in_channels=t.latent_channels,
                out_channels=t.latent_channels,
                block_out_channels=tuple(t.unet_channels),
                layers_per_block=1,
                down_block_types=("CrossAttnDownBlock3D",) * (levels - 1) + ("DownBlock3D",),
                up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (levels - 1),
                cross_attention_dim=t.text_dim,
                attention_head_dim=t.heads,
                norm_num_groups=t.norm_groups,
            )
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * len(t.vae_channels),
                up_block_types=("UpDecoderBlock2D",) * len(t.vae_channels),
                block_out_channels=tuple(t.vae_channels),
                latent_channels=t.latent_channels,
                norm_num_groups=t.norm_groups,
                sample_size=t.size,
            )
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=t.text_dim,
                    intermediate_size=2 * t.text_dim,
                    num_hidden_layers=t.text_layers,
                    num_attention_heads=t.text_heads,
                    max_position_embeddings=t.max_length,
                    projection_dim=t.text_dim,
                    pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            )
        scheduler = DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}

    def _build_pipeline(self) -> Any:
        from diffusers import TextToVideoSDPipeline

        return TextToVideoSDPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
        )

    # ---------------------------------------------------------------------------------- interface

    @torch.no_grad()
    def condition(self, captions: list[str]) -> torch.Tensor:
        if not captions:
            raise ValueError("condition() needs at least one caption")
        self._require("conditioning", "encode captions")
        device, _ = self._device_dtype()
        embeds, _ = self.pipeline.encode_prompt(list(captions), device, 1, False)
        return embeds

    def generate(
        self,
        conditioning: torch.Tensor,
        *,
        negative_conditioning: torch.Tensor | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seeds: list[int] | None = None,
    ) -> list[Video]:
        check_conditioning(conditioning, self.conditioning_shape, "t2v-video")
        self._require("all", "generate videos")
        device, dtype = self._device_dtype()
        guidance = self.options.guidance if guidance is None else guidance
        batch = conditioning.shape[0]
        negative = self._negative(negative_conditioning, batch, guidance)
        out = self.pipeline(
            prompt_embeds=conditioning.detach().to(device, dtype),
            negative_prompt_embeds=negative,
            num_inference_steps=steps or self.options.steps,
            guidance_scale=guidance,
            height=self.height,
            width=self.width,
            num_frames=self.options.num_frames,
            generator=row_generators(seeds, batch, device),
            output_type="pil",
        )
        return [
            Video(frames=[f.convert("RGB") for f in frames], fps=self.options.fps) for frames in out.frames
        ]

    def denoising_loss(
        self, conditioning: torch.Tensor, media: list[Video], seed: int | list[int] | None = None
    ) -> torch.Tensor:
        """Diffusion loss over per-frame VAE latents ``(B, C, num_frames, h, w)``; each clip is sampled
        at ``num_frames`` evenly spaced frames."""
        from diffusers.image_processor import VaeImageProcessor

        check_conditioning(conditioning, self.conditioning_shape, "t2v-video")
        batch, frames = conditioning.shape[0], self.options.num_frames
        if len(media) != batch:
            raise ValueError(f"{len(media)} videos for {batch} conditioning rows")
        self._require("denoise", "compute the denoising loss")
        device, dtype = self._device_dtype()
        generator = seeded_generators(seed, device)
        images = [frame.convert("RGB") for video in media for frame in video.sample_frames(frames)]
        # the pipeline's own video_processor does not resize; frames are resized like SD's images
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        pixels = processor.preprocess(images, height=self.height, width=self.width).to(device, dtype)
        chunks = pixels.split(VAE_CHUNK)
        frame_generators = split_generators(repeat_generators(generator, frames), [len(c) for c in chunks])
        with torch.no_grad():
            latents = torch.cat([self.vae.encode(chunk).latent_dist.sample(generator=g)
                                 for chunk, g in zip(chunks, frame_generators, strict=True)])
            latents = latents * self.vae.config.scaling_factor
        latents = latents.reshape(batch, frames, *latents.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C, F, h, w)
        conditioning = conditioning.to(device, dtype)

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return self.unet(noisy, timesteps, encoder_hidden_states=conditioning).sample

        return denoising_mse(predict, latents, self.noise_scheduler, generator)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": self.options.model or "tiny",
            "size": [self.height, self.width],
            "num_frames": self.options.num_frames,
            "prediction_type": self.scheduler.config.prediction_type,
        }
