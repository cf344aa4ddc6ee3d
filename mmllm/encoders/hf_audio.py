"""Frozen transformers audio towers: the CLAP audio tower, the Whisper encoder, AST.

``family`` picks the tower and its own feature extractor (ClapFeatureExtractor,
WhisperFeatureExtractor, ASTFeatureExtractor). The tower comes from ``model`` (a hub id or a local
dir, via ``from_pretrained``) or from ``config`` (keyword arguments of the family's transformers
config class: random weights, built in-process). An in-process tower gets a feature extractor
consistent with its config (mel bins, input length), which ``feature_extractor`` can override.

=========  ========================================  ==========================================
family     tokens: pooled (1 token)                  tokens: sequence
=========  ========================================  ==========================================
clap       projected audio embedding (projection)    final Swin grid, (freq x time) tokens
whisper    mean of the encoder states (hidden)       encoder states, ``max_source_positions``
ast        mean of [CLS] and distillation (hidden)   all tokens incl. [CLS] and distillation
=========  ========================================  ==========================================

Preprocessing down-mixes to mono, resamples to the extractor's rate and keeps at most
``max_seconds`` (the head of the clip) and never more than the model's input window, so CLAP's
random crops of long clips never happen: the features of a clip never depend on chance or on the
other clips in its batch. For a fused CLAP model (``enable_fusion``) every clip is therefore a
"short" clip and ``is_longer`` is all false.

Tiny random towers used by the tests (YAML), see :meth:`HFAudioEncoder.tiny_options`::

    kind: hf-audio
    family: clap
    sampling_rate: 16000
    max_seconds: 1.0
    config: {num_mel_bins: 16, spec_size: 32, patch_size: 4, patch_stride: 4, depths: [1, 1],
             num_attention_heads: [2, 2], window_size: 4, patch_embeds_hidden_size: 16,
             hidden_size: 32, projection_dim: 24}
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import torch
from torch import nn

from mmllm.config import ConfigError
from mmllm.data.media import Audio, resample
from mmllm.encoders.base import EncoderShape, MediaEncoder
from mmllm.locations import resolve_source
from mmllm.part_errors import ARCHITECTURE_ERRORS, names_something_wrong, said

log = logging.getLogger(__name__)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "clap": {
        "num_mel_bins": 16,
        "spec_size": 32,
        "patch_size": 4,
        "patch_stride": 4,
        "depths": [1, 1],
        "num_attention_heads": [2, 2],
        "window_size": 4,
        "patch_embeds_hidden_size": 16,
        "hidden_size": 32,
        "projection_dim": 24,
    },
    "whisper": {
        "num_mel_bins": 16,
        "d_model": 32,
        "encoder_layers": 1,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "decoder_layers": 1,
        "decoder_attention_heads": 2,
        "decoder_ffn_dim": 64,
        "max_source_positions": 50,
    },
    "ast": {
        "num_mel_bins": 16,
        "max_length": 64,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "patch_size": 8,
        "frequency_stride": 8,
        "time_stride": 8,
    },
}


# ---------------------------------------------------------------------------------------------
# One small adapter per family: build/load, a matching feature extractor, shapes, forward.
# ---------------------------------------------------------------------------------------------


class _Tower(nn.Module):
    default_rate: int = 16000
    input_key: str = "input_features"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def config_class() -> type:
        raise NotImplementedError

    @classmethod
    def config_class_for(cls, kwargs: dict[str, Any]) -> type:
        """The config class that ``kwargs`` (the ``config`` option) are for."""
        return cls.config_class()

    @classmethod
    def make_config(cls, kwargs: dict[str, Any]) -> Any:
        return cls.config_class_for(kwargs)(**kwargs)

    @classmethod
    def build(cls, config: Any) -> _Tower:
        raise NotImplementedError

    @staticmethod
    def pretrained_class() -> type:
        raise NotImplementedError

    @staticmethod
    def extractor_class() -> type:
        raise NotImplementedError

    @staticmethod
    def keep(model: nn.Module) -> nn.Module:
        """The part of a loaded model that is kept."""
        return model

    kept_prefix: str = ""  # state-dict keys of the kept part, in the loaded model

    @classmethod
    def load(cls, name: str, trust_remote_code: bool) -> _Tower:
        model, info = cls.pretrained_class().from_pretrained(
            name, trust_remote_code=trust_remote_code, output_loading_info=True
        )
        missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith(cls.kept_prefix))
        if missing:  # transformers would leave them randomly initialised, with only a warning
            raise ConfigError(
                f"the checkpoint lacks {len(missing)} tensor(s) of the tower, e.g. {missing[:4]}"
            )
        return cls(cls.keep(model))

    def default_extractor(self, rate: int, max_seconds: float, overrides: dict[str, Any]) -> Any:
        raise NotImplementedError

    def window_samples(self, extractor: Any) -> int:
        """Audio samples the model sees at once (longer clips are cut to this)."""
        raise NotImplementedError

    def call_kwargs(self, extractor: Any) -> dict[str, Any]:
        return {}

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ConfigError if extractor output ``x`` (one item) does not fit the tower."""

    def shape(self, tokens: str) -> tuple[int, int]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, tokens: str) -> torch.Tensor:
        raise NotImplementedError


class _ClapTower(_Tower):
    default_rate = 48000

    @staticmethod
    def config_class() -> type:
        from transformers import ClapAudioConfig

        return ClapAudioConfig

    @classmethod
    def config_class_for(cls, kwargs: dict[str, Any]) -> type:
        if "audio_config" in kwargs:  # a whole ClapConfig
            from transformers import ClapConfig

            return ClapConfig
        return cls.config_class()

    @classmethod
    def make_config(cls, kwargs: dict[str, Any]) -> Any:
        config = cls.config_class_for(kwargs)(**kwargs)
        return getattr(config, "audio_config", config)  # of a whole ClapConfig, keep the audio side

    @classmethod
    def build(cls, config: Any) -> _ClapTower:
        from transformers import ClapAudioModelWithProjection

        return cls(ClapAudioModelWithProjection(config))

    @staticmethod
    def pretrained_class() -> type:
        from transformers import ClapAudioModelWithProjection

        return ClapAudioModelWithProjection  # from a whole CLAP checkpoint: the text side is left unloaded

    @staticmethod
    def extractor_class() -> type:
        from transformers import ClapFeatureExtractor

        return ClapFeatureExtractor

    @property
    def _spec_frames(self) -> int:
        return self.config.spec_size * (self.config.spec_size // self.config.num_mel_bins)

    def default_extractor(self, rate: int, max_seconds: float, overrides: dict[str, Any]) -> Any:
        window = round(max_seconds * rate)
        hop = math.ceil(window / (self._spec_frames - 1))  # the mel must fit the Swin input: frames <= spec
        kwargs = {
            "feature_size": self.config.num_mel_bins,
            "sampling_rate": rate,
            "hop_length": hop,
            "max_length_s": max_seconds,
            "fft_window_size": 2 ** math.ceil(math.log2(2 * hop)),
            "frequency_min": 50,
            "frequency_max": min(14000, rate // 2),
            "truncation": "fusion" if self.config.enable_fusion else "rand_trunc",
            "padding": "repeatpad",
        }
        return self.extractor_class()(**{**kwargs, **overrides})

    def window_samples(self, extractor: Any) -> int:
        return int(round(extractor.max_length_s * extractor.sampling_rate))

    def call_kwargs(self, extractor: Any) -> dict[str, Any]:
        return {"max_length": self.window_samples(extractor)}

    def check_input(self, x: torch.Tensor) -> None:
        channels, frames, mels = x.shape[-3:]
        if mels != self.config.num_mel_bins or frames > self._spec_frames:
            raise ConfigError(
                f"feature_extractor: gives {frames} frames x {mels} mel bins; the CLAP tower takes at most "
                f"{self._spec_frames} frames x {self.config.num_mel_bins} bins "
                "(adjust hop_length / feature_size)"
            )
        if self.config.enable_fusion and channels != 4:
            raise ConfigError(
                "feature_extractor: a fused CLAP tower needs truncation: fusion (4 mel channels)"
            )
        if not self.config.enable_fusion and channels != 1:
            raise ConfigError(
                f"feature_extractor: gives {channels} mel channels (truncation: fusion) but the CLAP tower is not "
                "fused (enable_fusion: false) and takes 1: set the extractor's truncation to rand_trunc (in its "
                "preprocessor_config.json, or feature_extractor: {truncation: rand_trunc} for an in-process tower)"
            )

    def shape(self, tokens: str) -> tuple[int, int]:
        if tokens == "pooled":
            return 1, self.config.projection_dim
        encoder = self.model.audio_model.audio_encoder
        side = self.config.spec_size // 2 ** (len(self.config.depths) - 1) // encoder.patch_stride[0]
        return side * side, encoder.num_features

    def forward(self, x: torch.Tensor, tokens: str) -> torch.Tensor:
        is_longer = None
        if self.config.enable_fusion:
            is_longer = torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)
        out = self.model(input_features=x, is_longer=is_longer)
        if tokens == "pooled":
            return out.audio_embeds.unsqueeze(1)
        return out.last_hidden_state.flatten(2).transpose(1, 2)  # (B, C, F, T) -> (B, F*T, C)


class _WhisperTower(_Tower):
    @staticmethod
    def config_class() -> type:
        from transformers import WhisperConfig

        return WhisperConfig

    @classmethod
    def build(cls, config: Any) -> _WhisperTower:
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return cls(WhisperEncoder(config))

    kept_prefix = "encoder."

    @staticmethod
    def pretrained_class() -> type:
        from transformers import WhisperModel

        return WhisperModel

    @staticmethod
    def keep(model: nn.Module) -> nn.Module:
        return model.get_encoder()  # the decoder is dropped with the model

    @staticmethod
    def extractor_class() -> type:
        from transformers import WhisperFeatureExtractor

        return WhisperFeatureExtractor

    def default_extractor(self, rate: int, max_seconds: float, overrides: dict[str, Any]) -> Any:
        hop = overrides.get("hop_length", 160)
        kwargs = {
            "feature_size": self.config.num_mel_bins,
            "sampling_rate": rate,
            "hop_length": hop,
            "n_fft": 400,
            "chunk_length": max(1, math.ceil(2 * self.config.max_source_positions * hop / rate)),
        }
        return self.extractor_class()(**{**kwargs, **overrides})

    def window_samples(self, extractor: Any) -> int:
        return 2 * self.config.max_source_positions * extractor.hop_length  # conv2 has stride 2

    def call_kwargs(self, extractor: Any) -> dict[str, Any]:
        return {"max_length": self.window_samples(extractor), "padding": "max_length"}

    def check_input(self, x: torch.Tensor) -> None:
        mels, frames = x.shape[-2:]
        want = (self.config.num_mel_bins, 2 * self.config.max_source_positions)
        if (mels, frames) != want:
            raise ConfigError(
                f"feature_extractor: gives {mels} mel bins x {frames} frames; the Whisper encoder takes "
                f"exactly {want[0]} x {want[1]} (adjust feature_size / hop_length)"
            )

    def shape(self, tokens: str) -> tuple[int, int]:
        return (1 if tokens == "pooled" else self.config.max_source_positions), self.config.d_model

    def forward(self, x: torch.Tensor, tokens: str) -> torch.Tensor:
        hidden = self.model(input_features=x).last_hidden_state
        return hidden.mean(dim=1, keepdim=True) if tokens == "pooled" else hidden


class _ASTTower(_Tower):
    input_key = "input_values"

    @staticmethod
    def config_class() -> type:
        from transformers import ASTConfig

        return ASTConfig

    @classmethod
    def build(cls, config: Any) -> _ASTTower:
        from transformers import ASTModel

        return cls(ASTModel(config))

    @staticmethod
    def pretrained_class() -> type:
        from transformers import ASTModel

        return ASTModel

    @staticmethod
    def extractor_class() -> type:
        from transformers import ASTFeatureExtractor

        return ASTFeatureExtractor

    def default_extractor(self, rate: int, max_seconds: float, overrides: dict[str, Any]) -> Any:
        kwargs = {
            "num_mel_bins": self.config.num_mel_bins,
            "max_length": self.config.max_length,
            "sampling_rate": rate,
        }
        return self.extractor_class()(**{**kwargs, **overrides})

    def window_samples(self, extractor: Any) -> int:
        # Kaldi fbank frames: a 10 ms hop and a 25 ms window
        return extractor.max_length * extractor.sampling_rate // 100 + extractor.sampling_rate // 40

    def check_input(self, x: torch.Tensor) -> None:
        frames, mels = x.shape[-2:]
        if (frames, mels) != (self.config.max_length, self.config.num_mel_bins):
            raise ConfigError(
                f"feature_extractor: gives {frames} frames x {mels} mel bins; the AST takes "
                f"{self.config.max_length} x {self.config.num_mel_bins} (adjust max_length / num_mel_bins)"
            )

    def shape(self, tokens: str) -> tuple[int, int]:
        if tokens == "pooled":
            return 1, self.config.hidden_size
        freq, time = self.model.embeddings.get_shape(self.config)
        return freq * time + 2, self.config.hidden_size

    def forward(self, x: torch.Tensor, tokens: str) -> torch.Tensor:
        out = self.model(input_values=x)
        return out.pooler_output.unsqueeze(1) if tokens == "pooled" else out.last_hidden_state


FAMILIES: dict[str, type[_Tower]] = {"clap": _ClapTower, "whisper": _WhisperTower, "ast": _ASTTower}


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------


class HFAudioEncoder(MediaEncoder):
    modality = "audio"

    @dataclass
    class Options:
        family: Literal["clap", "whisper", "ast"]
        model: str | None = None  # hub id or local dir (from_pretrained)
        config: dict[str, Any] | None = None  # kwargs of the family's config class: a random in-process tower
        # kwargs overriding the feature extractor derived from `config` (in-process towers only)
        feature_extractor: dict[str, Any] | None = None
        tokens: Literal["pooled", "sequence"] = "pooled"
        sampling_rate: int | None = None  # in-process: the extractor's rate; with model: must match it
        max_seconds: float = 10.0  # keep at most this much of each clip (its head)
        trust_remote_code: bool = False

        def __post_init__(self) -> None:
            if (self.model is None) == (self.config is None):
                raise ValueError(
                    "set exactly one of model (hub id or local dir) and config (in-process tower)"
                )
            if self.feature_extractor is not None and self.model is not None:
                raise ValueError("feature_extractor overrides apply to an in-process config only")
            if self.max_seconds <= 0:
                raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")

    @classmethod
    def tiny_options(cls, family: str = "clap", tokens: str = "sequence") -> dict[str, Any]:
        """Options of a tiny random tower of ``family`` (1 s of 16 kHz audio) for tests and demos."""
        return {
            "family": family,
            "config": copy.deepcopy(TINY_CONFIGS[family]),
            "tokens": tokens,
            "sampling_rate": 16000,
            "max_seconds": 1.0,
        }

    def __init__(self, tower: _Tower, extractor: Any, options: Options) -> None:
        super().__init__()
        self.options = options
        self.tower = tower
        self.extractor = extractor
        self.sampling_rate = int(extractor.sampling_rate)
        self.window = tower.window_samples(extractor)
        self.max_samples = min(self.window, round(options.max_seconds * self.sampling_rate))
        self._num_tokens, self._output_dim = tower.shape(options.tokens)
        self.requires_grad_(False)
        self.eval()
        tower.check_input(
            self.preprocess([Audio(np.zeros(self.sampling_rate // 10, np.float32), self.sampling_rate)])
        )

    @classmethod
    def from_options(cls, options: Options, where: str = "", weights: bool = True) -> MediaEncoder:
        """The encoder; with ``weights=False`` its :class:`EncoderShape`, built on the meta device from the
        config alone (a stage that never runs it reads none of its weights)."""
        prefix = f"{where}." if where else ""
        family = FAMILIES[options.family]
        if not weights:
            with torch.device("meta"):
                return EncoderShape(cls._build(family, options, prefix, weights=False))
        encoder = cls._build(family, options, prefix)
        log.info(
            "%s audio encoder %s: %d Hz, window %.2f s, %d token(s) x %d",
            options.family,
            options.model or "(in-process config)",
            encoder.sampling_rate,
            encoder.window / encoder.sampling_rate,
            encoder.num_tokens,
            encoder.output_dim,
        )
        return encoder

    @classmethod
    def _build(cls, family: type[_Tower], options: Options, prefix: str, weights: bool = True) -> HFAudioEncoder:
        if options.model is not None:
            tower, extractor = _load(family, options, prefix, weights)
        else:
            config = _make_config(family, options.config or {}, f"{prefix}config")
            tower = _build_tower(family, config, f"{prefix}config")
            rate = options.sampling_rate or family.default_rate
            _check_extractor_keys(
                family.extractor_class(), options.feature_extractor or {}, f"{prefix}feature_extractor"
            )
            try:
                extractor = tower.default_extractor(
                    rate, options.max_seconds, options.feature_extractor or {}
                )
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{prefix}feature_extractor: {exc}") from exc
        try:
            return cls(tower, extractor, options)
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from exc

    # -- MediaEncoder --------------------------------------------------------------------------

    @property
    def output_dim(self) -> int:
        return self._output_dim

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def train(self, mode: bool = True) -> Self:
        return super().train(False)  # frozen: dropout and batch-norm statistics never change

    def preprocess(self, items: list[Audio]) -> torch.Tensor:
        waves = []
        for i, audio in enumerate(items):
            wave = resample(audio.mono(), audio.sample_rate, self.sampling_rate)[: self.max_samples]
            if wave.shape[0] == 0:
                raise ValueError(f"audio item {i} has no samples")
            waves.append(wave)
        feats = self.extractor(
            waves,
            sampling_rate=self.sampling_rate,
            return_tensors="pt",
            **self.tower.call_kwargs(self.extractor),
        )
        return feats[self.tower.input_key].float()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.tower(inputs, self.options.tokens)

    def describe(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "family": self.options.family,
            "model": self.options.model,
            "config": self.options.config,
            "tokens": self.options.tokens,
            "max_samples": self.max_samples,
            "extractor": self.extractor.to_dict(),
        }


def _make_config(family: type[_Tower], kwargs: dict[str, Any], where: str) -> Any:
    cls = family.config_class_for(kwargs)
    valid = ({f.name for f in dataclasses.fields(cls)} | set(cls().to_dict())) - {
        "model_type",
        "transformers_version",
    }
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)} for {cls.__name__}; "
            f"valid keys are: {', '.join(sorted(k for k in valid if not k.startswith('_')))}"
        )
    try:
        return family.make_config(kwargs)
    except Exception as exc:  # strict-dataclass validation errors, TypeError, ValueError
        if not names_something_wrong(exc, TypeError):
            raise
        raise ConfigError(f"{where}: invalid {cls.__name__}: {exc}") from exc


def _build_tower(family: type[_Tower], config: Any, where: str) -> _Tower:
    """The tower of the architecture ``config`` (from the config's ``where``) spells out; sizes that do not fit
    together (``depths`` and ``num_attention_heads`` of different lengths: an IndexError) are the config's error."""
    try:
        return family.build(config)
    except Exception as exc:
        if not names_something_wrong(exc, *ARCHITECTURE_ERRORS):  # a fault of transformers or mmllm, out of memory
            raise
        raise ConfigError(f"{where}: transformers cannot build {type(config).__name__}'s model from it: "
                          f"{said(exc)} (check that its sizes fit together)") from exc


def _check_extractor_keys(cls: type, kwargs: dict[str, Any], where: str) -> None:
    """Feature extractors store unknown kwargs silently; refuse them here instead."""
    params = inspect.signature(cls.__init__).parameters
    valid = {n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD} | {"padding_side"}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)} for {cls.__name__}; "
            f"valid keys are: {', '.join(sorted(valid))}"
        )


# the transformers model types each family loads (a whole CLAP checkpoint, or its audio tower alone)
MODEL_TYPES: dict[str, tuple[str, ...]] = {"clap": ("clap", "clap_audio_model"), "whisper": ("whisper",),
                                           "ast": ("audio-spectrogram-transformer",)}


def _check_model_type(name: str, family: str, prefix: str) -> None:
    """A local folder of another family (a Whisper checkpoint under ``family: ast``) is refused naming the
    family that loads it; transformers would build the tower randomly and report missing tensors."""
    config = Path(name) / "config.json"
    if not config.is_file():
        return
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type in MODEL_TYPES[family]:
        return
    right = next((f for f, types in MODEL_TYPES.items() if model_type in types), None)
    hint = f": set family: {right}" if right else f"; hf-audio loads {', '.join(sorted(MODEL_TYPES))}"
    raise ConfigError(f"{prefix}model: {name} holds a {model_type!r} model, not a {family} one{hint}")


def _load(family: type[_Tower], options: HFAudioEncoder.Options, prefix: str,
          weights: bool = True) -> tuple[_Tower, Any]:
    """Tower and feature extractor from ``options.model``; with ``weights=False`` the tower from its config
    alone (to be built inside ``torch.device("meta")``)."""
    name = resolve_source(options.model)
    _check_model_type(name, options.family, prefix)
    try:
        if weights:
            tower = family.load(name, options.trust_remote_code)
        else:
            config_class = family.pretrained_class().config_class
            tower = family.build(config_class.from_pretrained(name, trust_remote_code=options.trust_remote_code))
        extractor = family.extractor_class().from_pretrained(
            name, trust_remote_code=options.trust_remote_code
        )
    except Exception as exc:  # OSError (not found / offline), ValueError (wrong model type), ...
        if not names_something_wrong(exc):  # a fault of transformers or of mmllm, or memory running out
            raise
        raise ConfigError(f"{prefix}model: cannot load {options.family} model {name!r}: {exc}") from exc
    if options.sampling_rate is not None and options.sampling_rate != extractor.sampling_rate:
        raise ConfigError(
            f"{prefix}sampling_rate: {options.sampling_rate} differs from the {extractor.sampling_rate} Hz "
            f"{name!r} was trained at (leave it unset; audio is resampled)"
        )
    return tower, extractor
