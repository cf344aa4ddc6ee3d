"""How each toy-world part is trained: judges and contrastive encoders here, diffusion parts in
:mod:`mmllm.toyworld.diffusion`. :data:`PARTS` lists every part in training order with its default
(full-run) setup; ``scripts/pretrain_toy_components.py`` runs them.

Every step draws a fresh batch from the world's *training* combinations, seeded by ``(seed, step)``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmllm.toyworld import parts as P
from mmllm.toyworld.evaluate import judge_accuracy, retrieval_accuracy
from mmllm.toyworld.judges import (
    Judge,
    JudgeConfig,
    audio_waves,
    augment,
    griffin_lim_round_trip,
    log_mel,
    media_tensor,
)
from mmllm.toyworld.text import MiniLMText
from mmllm.toyworld.training import Optim, Recipe
from mmllm.toyworld.world import Sampler, World, evaluation_items

log = logging.getLogger(__name__)

EVAL_SEED = 1234  # evaluation items are drawn apart from every training stream
PROBE = 10**9  # batch index of data used for statistics (normalisers, scaling factors), never a training step


def stream_seed(seed: int, name: str) -> int:
    """A part's data seed: its run seed mixed with its name (parts never share a data stream)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % 2**62


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, step, salt]).integers(2**62)))


class FeatureCache:
    """Per-item tensors by ``(combo, media seed)``: with a sampler of finite ``variants`` a costly
    feature (a CLAP extractor pass, a Griffin-Lim round trip) is computed once per rendering."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._store: dict[tuple[Any, int], torch.Tensor] = {}

    def get(self, items: list[Any], compute: Callable[[list[Any]], torch.Tensor]) -> torch.Tensor:
        if not self.enabled:
            return compute(items)
        missing = [i for i in items if (i.combo, i.seed) not in self._store]
        if missing:
            for item, row in zip(missing, compute(missing)):
                self._store[(item.combo, item.seed)] = row
        return torch.stack([self._store[(i.combo, i.seed)] for i in items])


@dataclass
class Context:
    """What every recipe may use: the world, the output folder, MiniLM (loaded once, cached)."""

    world: World
    out: Path
    text_factory: Callable[[], MiniLMText]
    eval_per_combo: int = 2
    precompute: bool = True  # encode every caption up front (False: on first use, as tests do)
    _text: MiniLMText | None = None

    @property
    def text(self) -> MiniLMText:
        if self._text is None:
            self._text = self.text_factory()
        return self._text

    def precompute_captions(self, modality: str) -> None:
        """MiniLM embeddings of every caption a run of ``modality`` can draw, cached under ``out``."""
        if not self.precompute:
            return
        world = self.world
        captions = [""]
        for combo in world.combos(modality, "all"):
            attrs = world.attributes_of(modality, combo)
            if world.is_held_out(modality, attrs):
                captions.append(world.caption(modality, attrs))  # canonical only: retrieval targets
            else:
                captions.extend(world.all_captions(modality, attrs))
        self.text.precompute(captions, self.out / ".cache" / f"minilm-{modality}.pt")


# ------------------------------------------------------------------------------------------ judges


@dataclass
class JudgeSetup:
    modality: str
    judge: JudgeConfig
    optim: Optim
    seed: int = 0
    griffin_lim_fraction: float = 0.5  # audio: share of clips seen after a Griffin-Lim round trip
    variants: int | None = None  # renderings per combination (None: fresh ones; finite: features cached)


class JudgeRecipe(Recipe):
    def __init__(self, setup: JudgeSetup, ctx: Context, name: str) -> None:
        self.setup, self.ctx, self.name = setup, ctx, name
        self.optim, self.seed = setup.optim, setup.seed
        self.modality = setup.modality
        self.sampler = Sampler(ctx.world, self.modality, "train", stream_seed(setup.seed, name), setup.variants)
        self.clean = FeatureCache(setup.variants is not None)
        self.round_trip = FeatureCache(setup.variants is not None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(setup.seed)
            self.judge = Judge(setup.judge)

    def modules(self) -> dict[str, nn.Module]:
        return {"judge": self.judge}

    def trainable(self) -> list[nn.Parameter]:
        return list(self.judge.parameters())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.setup)}

    def inputs(self, items: list[Any], generator: torch.Generator) -> torch.Tensor:
        if self.modality != "audio":
            return self.clean.get(items, lambda chunk: media_tensor(self.modality, [i.media for i in chunk]))
        x = self.clean.get(items, lambda chunk: log_mel(audio_waves([i.media for i in chunk])))
        pick = (torch.rand(len(items), generator=generator) < self.setup.griffin_lim_fraction).tolist()
        picked = [i for i, p in zip(items, pick) if p]
        if picked:
            x = x.clone()
            x[torch.tensor(pick)] = self.round_trip.get(
                picked, lambda chunk: log_mel(griffin_lim_round_trip(audio_waves([i.media for i in chunk])))
            )
        return x

    def loss(self, step: int) -> torch.Tensor:
        generator = step_generator(self.seed, step)
        items = self.sampler.batch(step, self.optim.batch_size)
        x = augment(self.modality, self.inputs(items, generator), generator)
        self.judge.train()
        return self.judge.loss(x, self.judge.labels([i.attributes for i in items]))

    def export(self, folder: Path) -> dict[str, Any]:
        self.judge.eval()
        self.judge.save(folder)
        judge = Judge.load(folder)
        metrics = {
            split: judge_accuracy(
                judge, evaluation_items(self.ctx.world, self.modality, split, self.ctx.eval_per_combo, EVAL_SEED)
            )
            for split in ("train", "held_out")
        }
        return {"metrics": {"true_media": metrics}, "parameters": P.parameter_count(judge)}


# ------------------------------------------------------------------------------------------ encoders


@dataclass
class EncoderSetup:
    modality: str
    optim: Optim
    vit: P.ViTConfig | None = None  # image and video (frame) towers
    clap: P.ClapConfig | None = None  # audio tower
    seed: int = 0
    logit_scale_init: float = 2.6593  # log(1 / 0.07), as CLIP
    logit_scale_max: float = 4.6052  # log(100)
    probe_items: int = 128  # audio: clips measuring the input BatchNorm statistics
    variants: int | None = None  # renderings per combination (finite: preprocessed inputs cached)


class EncoderRecipe(Recipe):
    """A tower bound to MiniLM's sentence space by open_clip's ClipLoss (MiniLM side frozen).

    A batch holds distinct combinations (each with a random paraphrase), so no caption among the
    negatives describes the item. The encoder is trained through the very class that serves it
    (``OpenClipImageEncoder`` / ``FramesVideoEncoder`` / ``HFAudioEncoder``), preprocessing included.
    """

    def __init__(self, setup: EncoderSetup, ctx: Context, name: str) -> None:
        from open_clip.loss import ClipLoss

        self.setup, self.ctx, self.name = setup, ctx, name
        self.optim, self.seed, self.modality = setup.optim, setup.seed, setup.modality
        self.sampler = Sampler(ctx.world, self.modality, "train", stream_seed(setup.seed, name), setup.variants)
        self.cache = FeatureCache(setup.variants is not None)
        self.loss_fn = ClipLoss()
        self.scale = nn.Parameter(torch.tensor(setup.logit_scale_init))
        self.extras = nn.ParameterDict({"logit_scale": self.scale})
        if self.modality == "audio":
            assert setup.clap is not None
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(setup.seed)
                self.encoder = P.build_clap_encoder(setup.clap)
            self.tower: nn.Module = self.encoder.tower.model
            self._init_batch_norm()
        else:
            from mmllm.encoders.open_clip import OpenClipImageEncoder
            from mmllm.encoders.video import FramesVideoEncoder

            assert setup.vit is not None
            self.clip = P.build_open_clip(setup.vit, setup.seed)
            image = OpenClipImageEncoder(self.clip.visual, OpenClipImageEncoder.Options(model_name="toy"))
            self.tower = self.clip.visual
            self.encoder = image
            if self.modality == "video":
                options = FramesVideoEncoder.Options(image={"kind": "open-clip"}, num_frames=P.VIDEO_FRAMES)
                self.encoder = FramesVideoEncoder(image, options)
        self.tower.requires_grad_(True)
        ctx.precompute_captions(self.modality)

    def _init_batch_norm(self) -> None:
        """CLAP normalises its mel input with a BatchNorm; the frozen encoder runs it in eval mode, so its
        statistics are set once from training clips (and stay: training runs in eval mode too)."""
        items = self.sampler.batch(PROBE, self.setup.probe_items)
        feats = self.encoder.preprocess([i.media for i in items])  # (B, 1, T, mel)
        bn = next(m for m in self.tower.modules() if isinstance(m, nn.BatchNorm2d))
        with torch.no_grad():
            bn.running_mean.copy_(feats.mean(dim=(0, 1, 2)))
            bn.running_var.copy_(feats.var(dim=(0, 1, 2)))

    def modules(self) -> dict[str, nn.Module]:
        return {"tower": self.tower, "extras": self.extras}

    def trainable(self) -> list[nn.Parameter]:
        return [*self.tower.parameters(), self.scale]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.setup)}

    def loss(self, step: int) -> torch.Tensor:
        items = self.sampler.batch(step, self.optim.batch_size, unique=True)
        x = self.cache.get(items, lambda chunk: self.encoder.preprocess([i.media for i in chunk]))
        features = F.normalize(self.encoder(x)[:, 0], dim=-1)
        targets = self.ctx.text.sentence([i.caption for i in items])
        scale = self.scale.clamp(max=self.setup.logit_scale_max).exp()
        return self.loss_fn(features, targets, scale)

    def export(self, folder: Path) -> dict[str, Any]:
        if self.modality == "audio":
            P.save_clap(self.encoder, folder)
        else:
            with torch.no_grad():
                self.clip.logit_scale.copy_(self.scale.detach().clamp(max=self.setup.logit_scale_max))
            P.save_open_clip(self.clip, self.setup.vit, folder)
        entry = P.encoder_entries(folder.parent)[self.modality]
        loaded = P.build_part("encoder", entry, f"encoders.{self.modality}")
        metrics = {}
        for split in ("train", "held_out"):
            items = evaluation_items(self.ctx.world, self.modality, split, self.ctx.eval_per_combo, EVAL_SEED)
            metrics[split] = retrieval_accuracy(loaded, self.ctx.text, self.ctx.world, self.modality, items)
        return {
            "metrics": {"retrieval": metrics},
            "parameters": P.parameter_count(loaded),
            "logit_scale": float(self.scale.detach().clamp(max=self.setup.logit_scale_max).exp()),
            "registry_entry": entry,
        }


# ------------------------------------------------------------------------------------------ the parts


@dataclass
class PartSpec:
    name: str
    modality: str
    family: str  # judge | encoder | vae | decoder
    setup: Any
    depends_on: list[str] = field(default_factory=list)


def default_parts() -> list[PartSpec]:
    """Every part in training order, with its full-run setup (the time budget is in the script's docs)."""
    from mmllm.toyworld.diffusion import DecoderSetup, VAESetup

    image_vit = P.ViTConfig(patch_size=4, width=128, layers=4)
    frame_vit = P.ViTConfig(patch_size=8, width=128, layers=4)
    audio_vae = P.VAEConfig(in_channels=1, sample_size=P.MEL_BINS)
    image_unet = P.UNetConfig(channels=[64, 128, 128], attention=[True, True, False])
    audio_unet = P.UNetConfig(channels=[32, 64, 128], attention=[False, True, True], sample_size=16)
    variants = 128  # audio renderings per combination: their CLAP features / log-mels are computed once
    return [
        PartSpec("judge-image", "image", "judge", JudgeSetup("image", JudgeConfig("image"), Optim(600, 64, 2e-3))),
        PartSpec(
            "judge-audio",
            "audio",
            "judge",
            JudgeSetup("audio", JudgeConfig("audio"), Optim(600, 64, 2e-3), variants=variants),
        ),
        PartSpec("judge-video", "video", "judge", JudgeSetup("video", JudgeConfig("video"), Optim(600, 64, 2e-3))),
        PartSpec("encoder-image", "image", "encoder", EncoderSetup("image", Optim(3000, 64, 1e-3), vit=image_vit)),
        PartSpec(
            "encoder-audio",
            "audio",
            "encoder",
            EncoderSetup("audio", Optim(2000, 24, 1e-3), clap=P.ClapConfig(), variants=variants),
        ),
        PartSpec("encoder-video", "video", "encoder", EncoderSetup("video", Optim(2000, 32, 1e-3), vit=frame_vit)),
        PartSpec("vae-image", "image", "vae", VAESetup("image", P.VAEConfig(), Optim(1500, 32, 1e-3))),
        PartSpec(
            "vae-audio", "audio", "vae", VAESetup("audio", audio_vae, Optim(1500, 16, 1e-3), variants=variants)
        ),
        PartSpec(
            "decoder-image", "image", "decoder", DecoderSetup("image", image_unet, Optim(6000, 32, 5e-4)), ["vae-image"]
        ),
        PartSpec(
            "decoder-audio",
            "audio",
            "decoder",
            DecoderSetup("audio", audio_unet, Optim(4000, 32, 5e-4), variants=variants),
            ["vae-audio"],
        ),
        PartSpec(
            "decoder-video",
            "video",
            "decoder",
            DecoderSetup("video", copy.deepcopy(image_unet), Optim(1000, 8, 3e-4), init_from_image=True),
            ["vae-image", "decoder-image"],
        ),
    ]


GROUPS = {
    "all": lambda p: True,
    "judges": lambda p: p.family == "judge",
    "encoders": lambda p: p.family == "encoder",
    "decoders": lambda p: p.family in ("vae", "decoder"),
    "image": lambda p: p.modality == "image",
    "audio": lambda p: p.modality == "audio",
    "video": lambda p: p.modality == "video",
}


def select(names: str, parts: list[PartSpec]) -> list[PartSpec]:
    """``"encoders,decoder-image"`` -> those parts, in training order. Unknown names are errors."""
    wanted: set[str] = set()
    by_name = {p.name: p for p in parts}
    for token in (t.strip() for t in names.split(",") if t.strip()):
        if token in GROUPS:
            wanted |= {p.name for p in parts if GROUPS[token](p)}
        elif token in by_name:
            wanted.add(token)
        else:
            valid = ", ".join([*GROUPS, *by_name])
            raise ValueError(f"unknown part or group {token!r}; valid: {valid}")
    return [p for p in parts if p.name in wanted]


def build_recipe(part: PartSpec, ctx: Context) -> Recipe:
    from mmllm.toyworld.diffusion import DecoderRecipe, VAERecipe

    setup = copy.deepcopy(part.setup)
    if part.family == "judge":
        return JudgeRecipe(setup, ctx, part.name)
    if part.family == "encoder":
        return EncoderRecipe(setup, ctx, part.name)
    if part.family == "vae":
        return VAERecipe(setup, ctx, part.name)
    if part.family == "decoder":
        return DecoderRecipe(setup, ctx, part.name, vae_dir=ctx.out / part.depends_on[0])
    raise ValueError(f"unknown family {part.family!r}")
