"""Training of the toy world's latent-diffusion parts: the autoencoders, then the denoisers.

* ``vae-image``: an AutoencoderKL over 32x32 RGB (images and video frames alike), ``vae-audio``:
  one over the world's 64x64 log-mel spectrograms. Loss: MSE + a small KL term; the latent
  ``scaling_factor`` (1 / std of the latents) is measured at export, as Stable Diffusion's was.
* ``decoder-*``: the denoiser of a diffusers pipeline, trained with the epsilon loss on the frozen
  VAE's latents, conditioned on MiniLM (image/video: token embeddings, cross-attention; audio: the
  sentence embedding through the class embedding, as AudioLDM does with CLAP). A caption is
  replaced by the empty one with probability ``uncond_prob``, so classifier-free guidance works;
  the pipelines' default negative conditioning is exactly that empty caption's.

Export assembles the real pipeline (StableDiffusionPipeline, AudioLDMPipeline with a Griffin-Lim
vocoder, TextToVideoSDPipeline), saves it, reloads it through the registry and checks that the
reloaded decoder conditions captions exactly as training did.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmllm.toyworld import parts as P
from mmllm.toyworld.judges import audio_waves, image_tensor, log_mel
from mmllm.toyworld.recipes import PROBE, Context, FeatureCache, step_generator, stream_seed
from mmllm.toyworld.training import Optim, Recipe
from mmllm.toyworld.world import Item, Sampler

log = logging.getLogger(__name__)

IMAGE_SHAPE = (3, P.IMAGE_SIZE, P.IMAGE_SIZE)


def media_batch(modality: str, items: list[Item]) -> torch.Tensor:
    """VAE inputs: images in [-1, 1] ``(B, 3, 32, 32)``; video -> ``(B, 8, 3, 32, 32)`` frames in
    [-1, 1]; audio -> the world's log-mel ``(B, 1, 64, 64)``."""
    if modality == "audio":
        return log_mel(audio_waves([i.media for i in items]))
    if modality == "video":
        frames = [f for i in items for f in i.media.frames]
        return (image_tensor(frames) * 2 - 1).reshape(len(items), -1, *IMAGE_SHAPE)
    return image_tensor([i.media for i in items]) * 2 - 1


# ------------------------------------------------------------------------------------------ VAEs


@dataclass
class VAESetup:
    modality: str  # image (also serves video frames) | audio
    vae: P.VAEConfig
    optim: Optim
    seed: int = 0
    kl_weight: float = 1e-6
    video_fraction: float = 0.5  # image VAE: share of each batch that is video frames
    probe_items: int = 256  # items measuring the latent scaling factor at export
    variants: int | None = None  # audio: renderings per combination (finite: log-mels cached)


class VAERecipe(Recipe):
    def __init__(self, setup: VAESetup, ctx: Context, name: str) -> None:
        self.setup, self.ctx, self.name = setup, ctx, name
        self.optim, self.seed = setup.optim, setup.seed
        data_seed = stream_seed(setup.seed, name)
        self.samplers = {setup.modality: Sampler(ctx.world, setup.modality, "train", data_seed, setup.variants)}
        self.cache = FeatureCache(setup.variants is not None)
        if setup.modality == "image":
            self.samplers["video"] = Sampler(ctx.world, "video", "train", data_seed + 1)
        self.vae = P.build_vae(setup.vae, setup.seed)

    def modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

    def trainable(self) -> list[nn.Parameter]:
        return list(self.vae.parameters())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.setup)}

    def batch(self, step: int, size: int) -> torch.Tensor:
        generator = step_generator(self.seed, step)
        if self.setup.modality == "audio":
            items = self.samplers["audio"].batch(step, size)
            return self.cache.get(items, lambda chunk: media_batch("audio", chunk))
        n_video = int(round(size * self.setup.video_fraction))
        images = media_batch("image", self.samplers["image"].batch(step, size - n_video))
        if not n_video:
            return images
        frames = media_batch("video", self.samplers["video"].batch(step, n_video))
        pick = torch.randint(0, P.VIDEO_FRAMES, (n_video,), generator=generator)
        return torch.cat([images, frames[torch.arange(n_video), pick]])

    def loss(self, step: int) -> torch.Tensor:
        x = self.batch(step, self.optim.batch_size)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=step_generator(self.seed, step, 1)
        )
        recon = self.vae.decode(z).sample
        return F.mse_loss(recon, x) + self.setup.kl_weight * posterior.kl().mean()

    @torch.no_grad()
    def export(self, folder: Path) -> dict[str, Any]:
        x = self.batch(PROBE, self.setup.probe_items)
        means = torch.cat([self.vae.encode(chunk).latent_dist.mean for chunk in x.split(64)])
        scaling = float(1.0 / means.std())
        self.vae.register_to_config(scaling_factor=scaling)
        recon = torch.cat([self.vae.decode(m).sample for m in means.split(64)])
        self.vae.save_pretrained(folder, safe_serialization=True)
        return {
            "metrics": {"reconstruction_mse": float(F.mse_loss(recon, x)), "scaling_factor": scaling},
            "parameters": P.parameter_count(self.vae),
        }


# ------------------------------------------------------------------------------------------ decoders


@dataclass
class DecoderSetup:
    modality: str
    unet: P.UNetConfig
    optim: Optim
    seed: int = 0
    uncond_prob: float = 0.1
    variants: int | None = None  # audio: renderings per combination (finite: log-mels cached)
    init_from_image: bool = False  # video: start the UNet3D's spatial layers from decoder-image's UNet


class DecoderRecipe(Recipe):
    def __init__(self, setup: DecoderSetup, ctx: Context, name: str, vae_dir: Path) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler

        self.setup, self.ctx, self.name = setup, ctx, name
        self.optim, self.seed, self.modality = setup.optim, setup.seed, setup.modality
        if not (vae_dir / "config.json").is_file():
            raise FileNotFoundError(f"{name} needs the trained VAE in {vae_dir}: train {vae_dir.name} first")
        self.vae_dir = vae_dir
        self.vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
        self.scaling = float(self.vae.config.scaling_factor)
        latent = self.vae.config.latent_channels
        build = {"image": P.build_image_unet, "audio": P.build_audio_unet, "video": P.build_video_unet}
        self.unet = build[self.modality](setup.unet, latent, setup.seed)
        self.noise_scheduler = DDPMScheduler(
            **{k: v for k, v in P.SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")}
        )
        self.sampler = Sampler(ctx.world, self.modality, "train", stream_seed(setup.seed, name), setup.variants)
        self.cache = FeatureCache(setup.variants is not None)
        if setup.init_from_image:
            self._init_from_image(ctx.out / "decoder-image" / "unet")
        ctx.precompute_captions(self.modality)

    def _init_from_image(self, folder: Path) -> None:
        """ModelScope's recipe: the video UNet starts as the image UNet (every spatial tensor, same names),
        its temporal layers new; the denoiser then learns motion rather than the world's look anew."""
        from safetensors.torch import load_file

        if not (folder / "diffusion_pytorch_model.safetensors").is_file():
            raise FileNotFoundError(f"{self.name} starts from the image decoder's UNet: train decoder-image first")
        image = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
        own = self.unet.state_dict()
        # UNet2D projects attention in/out with 1x1 convolutions, UNet3D with linear layers: same weights
        matched = {
            k: v.reshape(own[k].shape) for k, v in image.items() if k in own and own[k].numel() == v.numel()
        }
        if len(matched) < 0.9 * len(image):
            raise ValueError(f"only {len(matched)} of {len(image)} image UNet tensors fit the video UNet")
        self.unet.load_state_dict(matched, strict=False)
        log.info("%s: %d tensors from the image UNet, %d new (temporal)", self.name, len(matched), len(own) - len(matched))

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def trainable(self) -> list[nn.Parameter]:
        return list(self.unet.parameters())

    def describe(self) -> dict[str, Any]:
        vae_config = {k: v for k, v in self.vae.config.items() if not k.startswith("_")}
        return {"name": self.name, **dataclasses.asdict(self.setup), "vae": vae_config}

    def conditioning(self, captions: list[str]) -> torch.Tensor:
        text = self.ctx.text
        return text.sentence(captions) if self.modality == "audio" else text.tokens(captions)

    @torch.no_grad()
    def latents(self, items: list[Item], generator: torch.Generator) -> torch.Tensor:
        x = self.cache.get(items, lambda chunk: media_batch(self.modality, chunk))
        if self.modality == "video":
            x = x.flatten(0, 1)
        z = torch.cat([self.vae.encode(c).latent_dist.sample(generator=generator) for c in x.split(64)])
        z = z * self.scaling
        if self.modality == "video":  # (B*F, C, h, w) -> (B, C, F, h, w)
            z = z.reshape(len(items), P.VIDEO_FRAMES, *z.shape[1:]).permute(0, 2, 1, 3, 4)
        return z

    def loss(self, step: int) -> torch.Tensor:
        generator = step_generator(self.seed, step)
        items = self.sampler.batch(step, self.optim.batch_size)
        z = self.latents(items, generator)
        captions = [i.caption for i in items]
        drop = torch.rand(len(items), generator=generator) < self.setup.uncond_prob
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        cond = self.conditioning(captions)
        noise = torch.randn(z.shape, generator=generator)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(items),), generator=generator)
        noisy = self.noise_scheduler.add_noise(z, noise, t)
        if self.modality == "audio":
            pred = self.unet(noisy, t, encoder_hidden_states=None, class_labels=cond).sample
        else:
            pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
        return F.mse_loss(pred, noise)

    def build_decoder(self, options: dict[str, Any]) -> Any:
        """The serving decoder class around this recipe's parts (in-process, MiniLM from ``ctx``)."""
        from mmllm.decoders.audioldm import AudioLDMDecoder
        from mmllm.decoders.sd_image import StableDiffusionDecoder
        from mmllm.decoders.text_to_video import TextToVideoDecoder
        from mmllm.toyworld.vocoder import GriffinLimVocoder

        text = self.ctx.text
        scheduler = P.inference_scheduler()
        if self.modality == "image":
            opts = StableDiffusionDecoder.Options(**options)
            return StableDiffusionDecoder(self.unet, self.vae, text.model, text.tokenizer, scheduler, opts)
        if self.modality == "video":
            opts = TextToVideoDecoder.Options(**options)
            return TextToVideoDecoder(self.unet, self.vae, text.model, text.tokenizer, scheduler, opts)
        vocoder = GriffinLimVocoder(P.SAMPLE_RATE, P.MEL_BINS, (P.HOP,))
        opts = AudioLDMDecoder.Options(**options)
        return AudioLDMDecoder(self.unet, self.vae, text.model, text.tokenizer, vocoder, scheduler, opts)

    def export(self, folder: Path) -> dict[str, Any]:
        options = {k: v for k, v in P.decoder_options(self.modality, str(folder)).items() if k != "text_encoder"}
        decoder = self.build_decoder(options)
        P.save_pipeline(decoder.pipeline, folder)
        P.store_half(folder)
        entry = P.decoder_entries(folder.parent)[self.modality]
        loaded = P.build_part("decoder", entry, f"decoders.{self.modality}")
        probe = [self.sampler.batch(0, 1)[0].caption, ""]
        expected = self.conditioning(probe)
        expected = expected[:, None] if self.modality == "audio" else expected
        torch.testing.assert_close(loaded.condition(probe), expected, atol=1e-4, rtol=1e-4)
        return {
            "parameters": P.parameter_count(self.unet),
            "conditioning_shape": list(loaded.conditioning_shape),
            "registry_entry": entry,
        }
