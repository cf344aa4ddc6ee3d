"""Stable Diffusion (1.x / 2.x layout) as a frozen image decoder, driven through ``prompt_embeds``.

Parts: ``UNet2DConditionModel`` + ``AutoencoderKL`` + ``CLIPTextModel`` + tokenizer + scheduler, from
a hub id / local dir (``model:``) or built in-process with random weights (``tiny:``). The conditioning
is the text encoder's last hidden state, ``(tokenizer.model_max_length, hidden_size)``: ``(77, 768)``
for SD 1.5, ``(77, 1024)`` for SD 2.x.

YAML::

    image: {kind: sd-image, model: stable-diffusion-v1-5/stable-diffusion-v1-5, steps: 25, guidance: 7.5}
    image: {kind: sd-image, tiny: {}, steps: 2, guidance: 2.0, height: 32, width: 32}
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

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


@dataclass
class TinySD:
    """Sizes of the in-process random-weight build (a few hundred thousand parameters)."""

    unet_channels: list[int] = field(default_factory=lambda: [8, 16])  # one entry per UNet level
    vae_channels: list[int] = field(default_factory=lambda: [8, 16])  # latent scale = 2 ** (levels - 1)
    latent_channels: int = 4
    norm_groups: int = 4
    text_dim: int = 32  # conditioning width D
    text_layers: int = 2
    text_heads: int = 2
    max_length: int = 16  # conditioning length L (the tokenizer's model_max_length)
    vocab_size: int = 512
    size: int = 32  # default image side in pixels
    seed: int = 0  # weight initialisation


def pipeline_sample_size(unet_config: Any) -> int:
    """The UNet's ``sample_size`` as ``StableDiffusionPipeline`` reads it: a UNet saved by diffusers < 0.9
    with a size under 64 counts as 64 (the pipeline rewrites a loaded UNet's config so). Applied to an
    unloaded UNet's config too, every ``parts`` mode draws -- and fingerprints -- the same size."""
    size = unet_config.sample_size
    saved = re.match(r"(\d+)\.(\d+)", str(getattr(unet_config, "_diffusers_version", "")))
    if saved and (int(saved[1]), int(saved[2])) < (0, 9) and isinstance(size, int) and size < 64:
        return 64
    return size


class StableDiffusionDecoder(FrozenDiffusionDecoder):
    modality = "image"
    Tiny = TinySD

    @dataclass
    class Options(DiffusionOptions):
        height: int | None = None  # None: the UNet's native size; multiples of 8 (the pipeline's rule)
        width: int | None = None

        def __post_init__(self) -> None:
            super().__post_init__()
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
        options: StableDiffusionDecoder.Options,
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
        size = pipeline_sample_size(unet.config)
        self.height = options.height or size * self.vae_scale_factor
        self.width = options.width or size * self.vae_scale_factor

    # ---------------------------------------------------------------------------------- building

    @classmethod
    def tiny_options(cls, **overrides: Any) -> dict[str, Any]:
        """The tiny build's options: its entry in configs/assemblies/_tiny_decoders.yaml minus ``kind``."""
        values: dict[str, Any] = {"tiny": {}, "steps": 2, "guidance": 2.0, "height": 32, "width": 32}
        return {**values, **overrides}

    @staticmethod
    def _load(options: StableDiffusionDecoder.Options, dtype: torch.dtype, skip: tuple[str, ...]) -> dict[str, Any]:
        from diffusers import StableDiffusionPipeline

        warn_remote_code(options, "sd-image")
        log.info("loading Stable Diffusion parts from %s", options.model)
        return load_parts(
            StableDiffusionPipeline,
            options,
            dtype,
            ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
            skip,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    @staticmethod
    def _build_tiny(t: TinySD) -> dict[str, Any]:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        tokenizer = tiny_text_tokenizer(t.max_length, t.vocab_size)
        levels = len(t.unet_channels)
        with seeded(t.seed):
            unet = UNet2DConditionModel(
                sample_size=t.size // 2 ** (len(t.vae_channels) - 1),
                in_channels=t.latent_channels,
                out_channels=t.latent_channels,
                block_out_channels=tuple(t.unet_channels),
                layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
                cross_attention_dim=t.text_dim,
                attention_head_dim=8,
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
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
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
    ) -> list[Image.Image]:
        check_conditioning(conditioning, self.conditioning_shape, "sd-image")
        self._require("all", "generate images")
        device, dtype = self._device_dtype()
        guidance = self.options.guidance if guidance is None else guidance
        batch = conditioning.shape[0]
        conditioning = conditioning.detach().to(device, dtype)
        negative = self._negative(negative_conditioning, batch, guidance)
        out = self.pipeline(
            prompt_embeds=conditioning,
            negative_prompt_embeds=negative,
            num_inference_steps=steps or self.options.steps,
            guidance_scale=guidance,
            height=self.height,
            width=self.width,
            generator=row_generators(seeds, batch, device),
            output_type="pil",
        )
        return list(out.images)

    def denoising_loss(
        self, conditioning: torch.Tensor, media: list[Image.Image], seed: int | list[int] | None = None
    ) -> torch.Tensor:
        check_conditioning(conditioning, self.conditioning_shape, "sd-image")
        if len(media) != conditioning.shape[0]:
            raise ValueError(f"{len(media)} images for {conditioning.shape[0]} conditioning rows")
        self._require("denoise", "compute the denoising loss")
        device, dtype = self._device_dtype()
        generator = seeded_generators(seed, device)
        pixels = self.pipeline.image_processor.preprocess(
            [image.convert("RGB") for image in media], height=self.height, width=self.width
        ).to(device, dtype)
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
            latents = latents * self.vae.config.scaling_factor
        conditioning = conditioning.to(device, dtype)

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return self.unet(noisy, timesteps, encoder_hidden_states=conditioning).sample

        return denoising_mse(predict, latents, self.noise_scheduler, generator)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": self.options.model or "tiny",
            "size": [self.height, self.width],
            "prediction_type": self.scheduler.config.prediction_type,
        }
