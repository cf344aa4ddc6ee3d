"""Typed configuration: dataclasses loaded from YAML, with ``key.sub=value`` overrides.

Three kinds of file:

* ``configs/assemblies/*.yaml`` -> :class:`AssemblyConfig` (which parts, how they are joined);
* ``configs/stages/*.yaml``     -> :class:`StageConfig` (data, what learns, losses, optimisation);
* ``configs/lora/*.yaml``       -> :class:`LoraConfig`.

Unknown keys are errors that name the offending key path and list the valid ones. Component
options (everything beside ``kind`` in an ``llm``/``encoders``/``decoders`` entry) are checked
against the chosen kind's own options dataclass when the model is assembled.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import logging
import math
import os
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = ("image", "audio", "video")
STAGES: tuple[str, ...] = ("encode-align", "decode-align", "instruct")


EXIT_INTERNAL_ERROR = 70  # sysexits.h's EX_SOFTWARE: a fault of the program, not of what it was given


class UserError(Exception):
    """A problem in what the user gave -- a config, a path, a data or cache file -- that they can fix, the message
    saying what and where. The ``mmllm`` command reports it as one line, exit code 2 (an exception of another kind
    is a fault of mmllm or of what it runs: its traceback, exit code 70)."""


class ConfigError(ValueError, UserError):
    """A configuration problem the user can fix; the message names the key and the file."""


# --------------------------------------------------------------------------------------------
# Generic dataclass <-> dict machinery
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _shape_of(tp: type) -> str:
    """A dataclass's keys as a YAML mapping, the required ones first with their values elided: what to write."""
    fields = [f for f in dataclasses.fields(tp) if f.init]
    required = [f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    optional = [f.name for f in fields if f.name not in required]
    if not required:
        return f"keys: {', '.join(optional)}"
    return "{" + ", ".join(f"{k}: ..." for k in required) + "}" + (f"; optional: {', '.join(optional)}" if optional else "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {_type_name(tp)} ({_shape_of(tp)}), got {value!r}")
        return from_dict(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = args or (Any, Any)
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            item = args[0] if args and dataclasses.is_dataclass(args[0]) else None
            of = f" of {_type_name(item)} mappings ({_shape_of(item)})" if item else ""
            raise ConfigError(f"{where}: expected a list{of}, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is typing.Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads a bare no/off (yes/on) as false (true): take the choice it must have been
            words = [w for w in (("yes", "on", "true") if value else ("no", "off", "false")) if w in args]
            if len(words) == 1:
                return words[0]
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)} (YAML reads an unquoted "
                              "no/yes/off/on as false/true: quote the word)")
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, os.PathLike):  # a Path given in Python, where YAML gives the string
            return os.fspath(value)
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2024-07-26 as a date: what was written
            return value.isoformat()
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value



def check_guidance(value: float) -> float:
    """A classifier-free guidance scale: a finite number of at least 0 (at most 1 turns guidance off); else a
    ValueError saying so. The one rule for a decoder's option, ``run_requests`` and the CLI's flags."""
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"guidance must be a finite number >= 0 (<= 1 turns guidance off), got {value}")
    return value

def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise a ConfigError that lists valid keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        path = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ConfigError(f"unknown key(s) {path}; valid keys here are: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        path = ", ".join(f"{where}.{k}" if where else k for k in missing)
        raise ConfigError(f"missing required key(s): {path}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (for YAML/JSON), components flattened back to ``kind`` + options."""
    if isinstance(obj, ComponentSpec):
        return {"kind": obj.kind, **to_dict(copy.deepcopy(obj.options))}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def flat_keys(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (:func:`to_dict`'s) as one level of dotted keys: ``{"optim": {"lr": 0.1}}`` ->
    ``{"optim.lr": 0.1}``, under ``prefix`` (``"lora"`` -> ``"lora.r"``). An empty mapping adds no key."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= flat_keys(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: value}


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


@dataclass
class ComponentSpec:
    """A registry component: ``kind`` picks the family; the rest of the YAML mapping is its options."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any, where: str) -> ComponentSpec:
        if isinstance(value, ComponentSpec):
            return value
        if not isinstance(value, dict) or "kind" not in value:
            raise ConfigError(f"{where}: expected a mapping with a 'kind' key, got {value!r}")
        options = dict(value)
        kind = options.pop("kind")
        if not isinstance(kind, str):
            raise ConfigError(f"{where}.kind: expected a string, got {kind!r}")
        return cls(kind=kind, options=options)


@dataclass
class InputProjectionConfig:
    """Encoder features (B, T, D_enc) -> LLM embeddings (B, num_tokens, D_llm)."""

    kind: typing.Literal["linear", "mlp", "resampler"] = "linear"
    input_dim: int = 0  # 0 = the encoder's output width; if set, it must agree (checked at assembly)
    hidden_dim: int = 0  # mlp/resampler width; 0 = LLM hidden size
    num_layers: int = 2  # mlp depth / resampler cross-attention blocks
    num_tokens: int = 0  # resampler queries; 0 keeps the encoder's token count (linear/mlp only)
    num_heads: int = 4
    dropout: float = 0.0


@dataclass
class OutputProjectionConfig:
    """Signal-token hidden states (B, k, D_llm) -> decoder conditioning (B, L, D_dec)."""

    hidden_dim: int = 256
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.0
    # 0 = take from the decoder's conditioning shape; if set, must agree (checked at assembly)
    num_queries: int = 0
    output_dim: int = 0
    use_token_embeddings: bool = True  # add the signal tokens' input embeddings to their hidden states


DEFAULT_SIGNAL_TOKENS = {"image": 4, "audio": 8, "video": 24}
# The date chat templates that print one (Llama 3.x's "Today Date:", via `date_string` or `strftime_now`)
# are given: Llama 3.1's own fallback. A fixed date keeps every sample the same from day to day and across
# a resume, and inference prompts as training did.
DEFAULT_TEMPLATE_DATE = "2024-07-26"


@dataclass
class AssemblyConfig:
    name: str
    llm: ComponentSpec
    encoders: dict[str, ComponentSpec] = field(default_factory=dict)
    decoders: dict[str, ComponentSpec] = field(default_factory=dict)
    input_projections: dict[str, InputProjectionConfig] = field(default_factory=dict)
    output_projections: dict[str, OutputProjectionConfig] = field(default_factory=dict)
    signal_tokens: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SIGNAL_TOKENS))
    max_length: int = 512
    seed: int = 0
    # the date (YYYY-MM-DD) chat templates render as today's (`date_string`, `strftime_now`); null = the
    # real date of each rendering, as transformers gives it (samples then change from day to day)
    template_date: str | None = DEFAULT_TEMPLATE_DATE

    def __post_init__(self) -> None:
        if self.template_date is not None:
            try:
                datetime.date.fromisoformat(self.template_date)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"template_date: {self.template_date!r} is not a date written YYYY-MM-DD (or null "
                                  "for the real date of each rendering)") from exc
        for section in ("encoders", "decoders", "input_projections", "output_projections", "signal_tokens"):
            for modality in getattr(self, section):
                if modality not in MODALITIES:
                    raise ConfigError(
                        f"{section}.{modality}: unknown modality; valid modalities are {', '.join(MODALITIES)}"
                    )
        for modality in self.encoders:
            self.input_projections.setdefault(modality, InputProjectionConfig())
        for modality in self.decoders:
            self.output_projections.setdefault(modality, OutputProjectionConfig())
            self.signal_tokens.setdefault(modality, DEFAULT_SIGNAL_TOKENS[modality])
        # Signal-token ids are assigned in this dict's order: MODALITIES order, not the YAML's, so a
        # config re-dumped with sorted keys keeps the same ids.
        self.signal_tokens = {m: self.signal_tokens[m] for m in MODALITIES
                              if m in self.signal_tokens and m in self.decoders}
        for modality, n in self.signal_tokens.items():
            if n < 1:
                raise ConfigError(f"signal_tokens.{modality}: must be >= 1, got {n}")
        extra = sorted(set(self.input_projections) - set(self.encoders))
        if extra:
            raise ConfigError(f"input_projections.{extra[0]} is set but encoders.{extra[0]} is not")
        extra = sorted(set(self.output_projections) - set(self.decoders))
        if extra:
            raise ConfigError(f"output_projections.{extra[0]} is set but decoders.{extra[0]} is not")

    def checked(self) -> AssemblyConfig:
        """A copy, checked and completed as at construction: an AssemblyConfig changed in Python after it was
        made (an encoder or decoder added, one taken out) gets its projection and signal-token defaults, and
        loses the signal tokens of a decoder it no longer has, as the same YAML would."""
        return dataclasses.replace(copy.deepcopy(self))


def parse_assembly(data: dict[str, Any], where: str = "assembly") -> AssemblyConfig:
    data = dict(data)
    if "llm" in data:
        data["llm"] = ComponentSpec.parse(data["llm"], f"{where}.llm")
    for section in ("encoders", "decoders"):
        if section in data:
            if not isinstance(data[section], dict):
                raise ConfigError(f"{where}.{section}: expected a mapping modality -> component")
            data[section] = {
                m: ComponentSpec.parse(v, f"{where}.{section}.{m}") for m, v in (data[section] or {}).items()
            }
    try:
        return from_dict(AssemblyConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# LoRA and stages
# --------------------------------------------------------------------------------------------


ALL_LINEAR = "all-linear"  # LoRA on every linear layer of the core but its LM head (PEFT's shortcut)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # layer names (PEFT's rule for a list: a module's whole name or its last dotted parts), or "all-linear"
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            raise ValueError(f"target_modules: a list of layer names or {ALL_LINEAR!r}, got {self.target_modules!r} "
                             f"(for one layer write [{self.target_modules}])")


def lora_targets_key(targets: list[str] | str) -> str | tuple[str, ...]:
    """``target_modules`` in a form two configs can be compared by (a list's order does not matter)."""
    return targets if isinstance(targets, str) else tuple(sorted(targets))


# Dataset file layouts mmllm reads (see mmllm/data/formats.py, nextgpt.py, llava.py and data/README.md).
DataFormat = typing.Literal["mmllm-pairs", "mmllm-chat", "nextgpt-pairs", "nextgpt-t2x", "nextgpt-mosit", "llava"]


# the fields of a DatasetConfig that are paths (relative ones are looked up as load_stage says)
DATA_PATHS: tuple[str, ...] = ("path", "root", "embeddings")


@dataclass
class DatasetConfig:
    path: str
    format: DataFormat = "mmllm-pairs"
    weight: float = 1.0
    root: str | None = None  # media paths resolve against this (default: the file's folder)
    # A media path that leaves ``root`` (``../``, an absolute path elsewhere) is refused unless this is true.
    allow_outside_root: bool = False
    # NExT-GPT: folder of precomputed caption-embedding ``.npy`` files (their ``embed_path``); null = compute
    # the decoders' conditioning targets with the decoders' own text encoders.
    embeddings: str | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight) or self.weight < 0:  # NaN and inf: no epoch can be built from them
            raise ValueError(f"{self.path}: weight must be a finite number >= 0 (0 leaves the dataset out), "
                             f"got {self.weight}")


@dataclass
class CacheConfig:
    """Precomputed outputs of the frozen parts, filled by ``mmllm cache --config C`` (see mmllm/data/cache.py)."""

    dir: str | None = None  # null = no cache; relative paths resolve from the working directory
    encoders: bool = True  # read cached encoder features for media inputs
    targets: bool = True  # read cached decoder conditioning targets for output captions
    # every encoder output and conditioning target the stage reads must be precomputed (checked before
    # training); the parts they replace are then not held (an encoder, a decoder's text encoder)
    require: bool = False
    shard_mb: int = 256  # size of one safetensors shard written by ``mmllm cache``


@dataclass
class TrainableConfig:
    """What learns. ``None`` means the stage's default (see ``STAGE_DEFAULT_TRAINABLE``)."""

    input_projections: bool | None = None
    output_projections: bool | None = None
    signal_embeddings: bool | None = None
    lora: bool | None = None


STAGE_DEFAULT_TRAINABLE: dict[str, dict[str, bool]] = {
    "encode-align": {"input_projections": True, "output_projections": False, "signal_embeddings": False, "lora": False},
    "decode-align": {"input_projections": False, "output_projections": True, "signal_embeddings": True, "lora": False},
    "instruct": {"input_projections": True, "output_projections": True, "signal_embeddings": True, "lora": True},
}


@dataclass
class LossConfig:
    ce: float = 1.0  # next-token cross-entropy on answer/caption/signal tokens
    mse: float = 1.0  # output projection vs the decoder's own conditioning of the caption
    # divide each group's squared error by its target's mean square: decoders whose conditioning is
    # small (a unit-norm sentence embedding: ~1/D per element) then weigh as much as token-level ones
    mse_relative: bool = False
    denoise: float = 0.0  # diffusion loss through the frozen UNet (needs target media)
    # KL(core || model) at every token of the text-only samples (no media, no signal tokens), the
    # core being the LLM with the LoRA adapter switched off: keeps plain-text skills without pulling
    # the model towards one greedy answer (as CE on distilled answers does). Needs LoRA.
    retain: float = 0.0


@dataclass
class OptimConfig:
    name: typing.Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    decay: typing.Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1


@dataclass
class StageConfig:
    stage: typing.Literal["encode-align", "decode-align", "instruct"]
    # an assembly YAML's path, or the assembly itself as a mapping (what `mmllm config` prints)
    assembly: str | dict[str, Any]
    data: list[DatasetConfig]
    output_dir: str
    init_from: str | None = None  # the previous stage's checkpoint directory
    lora: str | dict[str, Any] | None = None  # a configs/lora/*.yaml (instruct stage), or its keys as a mapping
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch_size: int = 8
    grad_accum: int = 1
    # batches of samples of similar token length (less padding): the sampler's draws sorted by length within
    # chunks of 50 micro-batches, the batches of a chunk shuffled (mmllm.data.dataset.LengthGroupedSampler)
    group_by_length: bool = False
    max_steps: int = 100
    seed: int = 0
    # null = as launched (`accelerate launch --mixed_precision` / its config file), else no
    mixed_precision: typing.Literal["no", "bf16", "fp16"] | None = None
    grad_checkpointing: bool = False
    log_every: int = 10
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # newest step-* checkpoints kept (0 = all)
    # also keep the checkpoint with the lowest validation loss (with eval_data), else the lowest mean train
    # loss since its previous save; best.json names it
    keep_best: bool = False
    # held-out data in the stage's formats, scored with the stage's losses at every save and every
    # eval_every steps (0: at saves only); logged as val/* and kept in progress.json
    eval_data: list[DatasetConfig] = field(default_factory=list)
    eval_every: int = 0
    # host memory (MB) for the held-out batches kept between evaluations, prepared once (read, collated, the
    # frozen encoders' features and decoders' targets computed); batches past it are prepared at each one
    eval_cache_mb: int = 1024
    max_nonfinite_steps: int = 5  # stop after this many steps in a row with a NaN/inf loss or gradient
    report_to: str = "tensorboard"  # or "none"
    cache: CacheConfig = field(default_factory=CacheConfig)
    # ``assembly.some.key=value`` command-line overrides, applied to the assembly YAML
    assembly_overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        at_least = {"max_steps": 1, "batch_size": 1, "grad_accum": 1, "log_every": 1, "max_nonfinite_steps": 1,
                    "save_every": 0, "keep_last": 0, "schedule.warmup_steps": 0, "eval_every": 0,
                    "eval_cache_mb": 0}
        for key, low in at_least.items():
            value = getattr(self.schedule, key.split(".")[1]) if "." in key else getattr(self, key)
            if value < low:
                raise ValueError(f"{key} must be >= {low}, got {value}")
        for key, value in dataclasses.asdict(self.losses).items():
            if not isinstance(value, bool) and value < 0:
                raise ValueError(f"losses.{key} must be >= 0 (a weight; 0 turns the loss off), got {value}")
        if self.optim.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.optim.lr}")
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.schedule.min_lr_ratio}")
        if self.data and not any(ds.weight > 0 for ds in self.data):
            raise ValueError("data: every dataset has weight 0; give at least one a weight > 0")
        if self.eval_every and not self.eval_data:  # else no validation would run, and keep_best uses the train loss
            raise ValueError(f"eval_every={self.eval_every} scores the held-out eval_data, which is not set: give "
                             "eval_data (datasets like data:) or eval_every=0")

    def all_data(self) -> list[DatasetConfig]:
        """The training datasets, then the held-out ones: everything the stage reads."""
        return [*self.data, *self.eval_data]

    def resolved_trainable(self) -> dict[str, bool]:
        out = dict(STAGE_DEFAULT_TRAINABLE[self.stage])
        for key, value in dataclasses.asdict(self.trainable).items():
            if value is not None:
                out[key] = value
        return out


# --------------------------------------------------------------------------------------------
# Files and overrides
# --------------------------------------------------------------------------------------------


def files_named_in(folder: Path, *patterns: str, most: int = 4) -> str:
    """A few of the files in ``folder`` matching ``patterns``, for an error that was given the folder itself."""
    found: list[Path] = []
    for depth in ("", "*/"):  # a folder of folders (configs/stages/): the files one level down
        found = sorted({p for pattern in patterns for p in folder.glob(depth + pattern) if p.is_file()})
        if found:
            break
    if not found:
        return "it holds none"
    return "e.g. " + ", ".join(str(p) for p in found[:most]) + (", ..." if len(found) > most else "")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder; give a YAML file in it "
                          f"({files_named_in(path, '*.yaml', '*.yml')})")
    if str(path) == "-" or (path.exists() and not path.is_file()):
        raise ConfigError(_not_a_config_file(path))
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (check the path; relative paths resolve from {Path.cwd()})")
    try:  # bytes: YAML reads UTF-8, or UTF-16 after its byte order mark, and names a byte that is neither (read as
        data = yaml.safe_load(path.read_bytes())  # text, that was a UnicodeDecodeError traceback, exit 70)
    except yaml.reader.ReaderError as exc:  # a byte that is not UTF-8, or a control character
        raise ConfigError(f"{path}: not valid YAML: {exc}; mmllm reads YAML as UTF-8 text: re-encode the file "
                          "(e.g. `iconv -f latin1 -t utf-8`)") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _not_a_config_file(path: Path) -> str:
    """Why a config is not read from standard input (``-``, ``/dev/stdin``) or another pipe or device, and what to
    do: a config is read more than once (``mmllm config`` and ``inspect`` read it twice, each process of a launch
    once), which a pipe does not allow, and its relative paths are looked up from its folder, which a pipe has not."""
    what = "standard input" if str(path) in ("-", "/dev/stdin") else "not a regular file (a pipe or a device)"
    return (f"config {path}: {what}; mmllm reads a config from a file (it reads it more than once, and looks up its "
            "relative paths from its folder): save it first, e.g. `mmllm config --checkpoint DIR > stage.yaml`, "
            "then give --config stage.yaml")


# assembly keys whose parts are registry kinds, each with its own options (a projection's kind is one field)
REGISTRY_PARTS = ("llm", "encoders", "decoders")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict, returning a copy.

    An override of a registry part's ``kind`` (under :data:`REGISTRY_PARTS`) that changes it
    (``llm.kind=hf-causal-lm`` over a ``tiny-llama``) replaces the part: the file's other keys for it are options of the old kind, so they are dropped and
    the part is what the overrides say (applied first, whatever their order)."""
    data = copy.deepcopy(data)
    kinds_first = sorted(overrides, key=lambda o: o.split("=", 1)[0].strip().rsplit(".", 1)[-1] != "kind")
    for item in kinds_first:
        if "=" not in item:
            hint = (" (a path: --resume takes none, it continues from the newest checkpoint in output_dir; "
                    "to start from a checkpoint use init_from=PATH)" if Path(item).exists() else "")
            raise ConfigError(f"override {item!r}: expected key.sub=value{hint}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node = data
        for depth, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                where = ".".join(parts[:depth + 1])
                if isinstance(nxt, str):  # a file named by path (a stage's lora:, assembly:): set keys there
                    raise ConfigError(f"override {item!r}: {where} is a file path ({nxt}), not keys to set: "
                                      f"edit that file, or give another one with {where}=PATH")
                if isinstance(nxt, list):  # no indexing into a list (data, eval_data): it is given whole
                    whole = yaml.safe_dump(nxt, default_flow_style=True, sort_keys=False, width=10**6).strip()
                    raise ConfigError(f"override {item!r}: {where} is a list, which an override replaces whole "
                                      f"(there is no {where}.0.key=value): give all of it, e.g. '{where}={whole}' "
                                      "with your change, quoted for the shell")
                raise ConfigError(f"override {item!r}: {where} is {nxt!r}, not a mapping")
            node = nxt
        if parts[-1] == "kind" and parts[0] in REGISTRY_PARTS and "kind" in node and node["kind"] != value:
            where = ".".join(parts[:-1]) or "the top level"
            log.info("%s: kind %s -> %s by override; the file's other %s keys (%s) are dropped with it", where,
                     node["kind"], value, where, ", ".join(sorted(k for k in node if k != "kind")) or "none")
            node.clear()
        node[parts[-1]] = value
    return data


def user_path(value: str | None) -> str | None:
    """A path as a user typed it, ``~`` expanded (the shell does not expand it inside ``key=~/x`` or YAML)."""
    return None if value is None else os.path.expanduser(value)


def resolve_path(base: Path, value: str | None) -> str | None:
    """Resolve ``value`` against ``base`` (a config file's folder) unless it is absolute or exists as given."""
    if value is None:
        return None
    p = Path(value).expanduser()
    candidate = base / p
    if p.is_absolute() or p.exists():
        if not p.is_absolute() and candidate.exists() and not _same_file(p, candidate):
            log.warning("%s: both %s (from the working directory %s) and %s (beside the config) exist; the first is "
                        "used, as relative paths are looked up from the working directory first. Give the path "
                        "absolute, or run from elsewhere, if you meant the other", value, p, Path.cwd(), candidate)
        return str(p)
    return str(candidate) if candidate.exists() else str(p)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def naming_the_override(exc: ConfigError, overrides: list[str], prefix: str = "", source: str = "") -> ConfigError:
    """``exc`` with the command-line overrides that set what it names, if any did: an error such as
    'max_steps: expected an integer, got 'ten'' otherwise sends one to a file that does not hold the value.
    An override of a key the message names is named as what set it, and one under a part the message names
    whole (``encoders.image: unknown encoder kind 'x'`` after ``encoders.image.kind=x``, a dimension check naming
    ``encoders.image (open-clip) output_dim=16`` after ``encoders.image.tokens=pooled``) as what changed that part. ``source``: the file the message starts with, whose name is not a key
    (``stage.yaml`` names no ``stage``). An error that already names its override is returned as it is."""
    message = str(exc)
    if ON_THE_COMMAND_LINE in message:
        return exc
    named = message.removeprefix(source).split("valid keys here are:", 1)[0]  # the keys at fault, not valid ones
    last: dict[str, str] = {}  # each key's last override: the one that took effect
    for item in overrides:
        if key := item.split("=", 1)[0].strip():
            last.pop(key, None)
            last[key] = item
    setting = [prefix + item for key, item in last.items() if _names_key(named, key)]
    changing: dict[str, list[str]] = {}
    for key, item in last.items():
        if not _names_key(named, key) and (part := _named_part(named, key)) is not None:
            changing.setdefault(part, []).append(prefix + item)
    said = [f"set {ON_THE_COMMAND_LINE} {' and '.join(setting)}"] if setting else []
    said += [f"{part} was changed {ON_THE_COMMAND_LINE} {' and '.join(items)}" for part, items in changing.items()]
    return ConfigError(f"{message} ({'; '.join(said)})") if said else exc


ON_THE_COMMAND_LINE = "on the command line by"


def _names_key(text: str, key: str) -> bool:
    """Whether ``text`` names the dotted ``key`` itself (not a longer key it begins)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", text) is not None


def _named_part(text: str, key: str) -> str | None:
    """The longest part above the dotted ``key`` that ``text`` names whole (``encoders.image`` for
    ``encoders.image.tokens``, not where it names a key under it, ``encoders.image.model_name``), else None. A
    one-word part only where it is one (``llm``): ``encoders`` alone names no part."""
    segments = key.split(".")
    for n in range(len(segments) - 1, 0, -1):
        part = ".".join(segments[:n])
        if n == 1 and part != "llm":
            break
        if re.search(rf"(?<![\w.]){re.escape(part)}(?![\w]|\.\w)", text):
            return part
    return None


@contextlib.contextmanager
def naming_overrides(overrides: list[str], prefix: str = "") -> Iterator[None]:
    """A :class:`ConfigError` raised in the block (a dimension check when the model is assembled, a part's kind
    or source refused when it is built) names the command-line override behind it (:func:`naming_the_override`);
    ``prefix`` is how the command line wrote them (a stage's ``assembly.``)."""
    try:
        yield
    except ConfigError as exc:
        named = naming_the_override(exc, overrides, prefix)
        if named is exc:
            raise
        raise named from exc


def config_source(value: str | Path | dict[str, Any], key: str = "assembly") -> str:
    """How a message names a stage's ``assembly:`` or ``lora:``: its file, or the mapping written in the stage."""
    return f"the {key}: written in the stage" if isinstance(value, dict) else str(value)


def load_assembly(path: str | Path | dict[str, Any], overrides: list[str] | None = None,
                  override_prefix: str = "assembly.") -> AssemblyConfig:
    """Load an assembly YAML, with ``key.sub=value`` ``overrides`` (``"encoders.image.tokens=pooled"``);
    ``override_prefix``: how the command line wrote them, for an error that names one (a stage's
    ``assembly.``; nothing where the assembly file is the command's own ``--config``). ``path`` may be the
    assembly itself, as a mapping (a stage's ``assembly:`` written out, as ``mmllm config`` prints it)."""
    where = "assembly" if isinstance(path, dict) else str(path)
    data = apply_overrides(path if isinstance(path, dict) else read_yaml(path), overrides or [])
    try:
        return parse_assembly(data, where=where)
    except ConfigError as exc:
        raise naming_the_override(exc, overrides or [], override_prefix, source=where) from exc


def save_assembly(config: AssemblyConfig, path: str | Path) -> Path:
    """Write ``config`` as an assembly YAML that :func:`load_assembly` reads back equal: how an assembly built
    or changed in Python reaches a stage, whose ``assembly:`` names a file. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path


def load_lora(path: str | Path | dict[str, Any]) -> LoraConfig:
    """A LoRA YAML, or its keys as a mapping (a stage's ``lora:`` written out, as ``mmllm config`` prints it)."""
    if isinstance(path, dict):
        return from_dict(LoraConfig, path, "lora")
    try:
        return from_dict(LoraConfig, read_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def is_stage_yaml(raw: dict[str, Any]) -> bool:
    """Whether a config file's content is a stage's (else an assembly's), for the commands that take either: one
    with ``stage:``, or without ``llm:`` but naming an ``assembly:`` (a stage file missing its ``stage:`` key is
    told so, as ``train`` tells it, not that every stage key is unknown to an assembly)."""
    return "stage" in raw or ("llm" not in raw and "assembly" in raw)


def load_stage(path: str | Path, overrides: list[str] | None = None) -> StageConfig:
    """Load a stage YAML, with ``overrides`` as the command line gives them (``"max_steps=5"``,
    ``"assembly.max_length=64"``, ``"assembly=other.yaml"``). Relative paths inside it resolve against the
    CWD, then the YAML's folder."""
    path = Path(path).expanduser()
    raw = read_yaml(path)
    if "stage" not in raw and "llm" in raw:
        raise ConfigError(f"{path} is an assembly YAML; this command takes a stage YAML (configs/stages/), which "
                          "names its assembly as `assembly: FILE`")
    return stage_from_mapping(raw, overrides, path)


def stage_from_mapping(raw: dict[str, Any], overrides: list[str] | None, path: Path) -> StageConfig:
    """:func:`load_stage` of a stage YAML's content ``raw``, read from ``path`` (which messages name and whose
    folder relative paths are looked up from after the working directory)."""
    overrides = overrides or []
    to_assembly = [o[len("assembly."):] for o in overrides if o.startswith("assembly.")]
    data = apply_overrides(raw, [o for o in overrides if not o.startswith("assembly.")])
    given = data.get("assembly_overrides") or []  # null (an emptied list): none
    if not isinstance(given, list):  # list("a=1") would be its letters (the items' type: checked as any key's)
        raise ConfigError(f"{path}: assembly_overrides: expected a list of key.sub=value strings (the assembly's "
                          f"own keys, as `mmllm config` prints them, e.g. [max_length=64]), got {given!r}")
    data["assembly_overrides"] = list(given) + to_assembly
    try:
        cfg = from_dict(StageConfig, data)
    except ConfigError as exc:
        raise naming_the_override(ConfigError(f"{path}: {exc}"), overrides, source=str(path)) from exc
    base = path.resolve().parent
    cfg.output_dir = user_path(cfg.output_dir)
    cfg.init_from = user_path(cfg.init_from)
    cfg.cache.dir = user_path(cfg.cache.dir)
    for key in ("assembly", "lora"):  # a file's path; a mapping is the file's content, written in the stage
        if isinstance(value := getattr(cfg, key), str):
            setattr(cfg, key, resolve_path(base, value))
    for key in ("assembly", "lora"):
        value = getattr(cfg, key)
        if isinstance(value, str) and not Path(value).is_file():
            raise ConfigError(f"{path}: {key}: {value} not found (a relative path is looked up from the working "
                              f"directory {Path.cwd()}, then from the stage config's folder {base})")
    if cfg.lora is not None:  # its keys checked now, not after the model is built (minutes with a large core)
        try:
            load_lora(cfg.lora)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {'' if isinstance(cfg.lora, dict) else 'lora: '}{exc}") from exc
    if isinstance(cfg.assembly, dict):  # a file's keys are checked where it is loaded, naming the file
        try:
            load_assembly(cfg.assembly, cfg.assembly_overrides)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    for ds in cfg.all_data():
        for key in DATA_PATHS:
            setattr(ds, key, resolve_path(base, getattr(ds, key)))
    return cfg
