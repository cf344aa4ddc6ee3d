"""What the diffusers-backed decoders share: options, freezing, seeds, schedulers and the training loss.

Kept to the parts that really are the same in every family; each family file still reads on its own.

* :class:`DiffusionOptions` -- the option keys every family has (``model`` or ``tiny``, steps, guidance,
  dtype, scheduler choice and ``prediction_type`` override, a ``text_encoder`` taken from elsewhere);
* :func:`load_parts` -- ``from_pretrained`` of a pipeline folder, with those options applied, loading
  only the parts a stage uses (``DECODER_PARTS``; the others as :class:`NotLoaded`, config only);
* :func:`row_generators` -- one ``torch.Generator`` per batch row, so a request draws the same noise
  alone or inside a batch;
* :func:`prediction_target` / :func:`denoising_mse` -- the diffusion loss through a frozen denoiser,
  honouring the scheduler's ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import inspect
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmllm.config import ConfigError, check_guidance, from_dict
from mmllm.decoders.base import DECODER_PARTS, MediaDecoder
from mmllm.locations import resolve_source
from mmllm.log_filters import diffusers_noise_dropped
from mmllm.part_errors import names_something_wrong

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Inference schedulers a config may name (exact diffusers class names). Stochastic samplers
# (DDPM, Euler ancestral) draw per-step noise from the per-row generators.
SCHEDULERS: tuple[str, ...] = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
)

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


@dataclass
class DiffusionOptions:
    """Options every diffusion decoder family takes; families subclass this and add their own."""

    model: str | None = None  # hub id, local dir or "package:<module>/<dir>" for ``from_pretrained`` (safetensors)
    tiny: dict[str, Any] | None = None  # sizes for an in-process random-weight build (tests, toy runs)
    steps: int = 25
    guidance: float = 7.5  # classifier-free guidance scale; <= 1 turns guidance off
    dtype: str = "float32"
    trust_remote_code: bool = False
    scheduler: str | None = None  # inference scheduler class name (see SCHEDULERS); None keeps the model's
    scheduler_prediction_type: str | None = None  # override the scheduler's prediction_type
    # weights of the pipeline's text encoder from elsewhere (hub id, local dir, "package:<module>/<dir>"):
    # for a pipeline folder that ships its text_encoder/config.json but not the (large, shared) weights
    text_encoder: str | None = None

    def __post_init__(self) -> None:
        if (self.model is None) == (self.tiny is None):
            raise ValueError("set exactly one of 'model' (hub id or local dir) and 'tiny' (in-process sizes)")
        if self.text_encoder is not None and self.model is None:
            raise ValueError("text_encoder applies to a pipeline loaded from 'model' only")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        check_guidance(self.guidance)
        parse_dtype(self.dtype)
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        if (
            self.scheduler_prediction_type is not None
            and self.scheduler_prediction_type not in PREDICTION_TYPES
        ):
            raise ValueError(
                f"unknown scheduler_prediction_type {self.scheduler_prediction_type!r}; "
                f"valid: {', '.join(PREDICTION_TYPES)}"
            )


def _model_index(pipeline_cls: type, source: str) -> dict[str, Any]:
    local = Path(source) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())
    return dict(pipeline_cls.load_config(source))


def _import_own_components(index: dict[str, Any]) -> None:
    """diffusers loads a component from a module only if it is already imported; mmllm's own
    component modules (e.g. the toy world's Griffin-Lim vocoder) are imported here, no others."""
    for value in index.values():
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
            if value[0] == "mmllm" or value[0].startswith("mmllm."):
                importlib.import_module(value[0])


# text encoders loaded inside shared_text_encoders(), by (class, weights, config, dtype)
_SHARED_TEXT_ENCODERS: contextvars.ContextVar[dict[tuple[str, ...], Any] | None] = contextvars.ContextVar(
    "mmllm_shared_text_encoders", default=None
)


@contextlib.contextmanager
def shared_text_encoders() -> Iterator[None]:
    """Inside the block (one model's assembly), decoders whose ``text_encoder:`` option names the same
    weights, with the same class, config and dtype, hold one module between them instead of a copy each
    (the embedded default's three decoders share one MiniLM). Frozen, so sharing changes no result."""
    token = _SHARED_TEXT_ENCODERS.set({})
    try:
        yield
    finally:
        _SHARED_TEXT_ENCODERS.reset(token)


def load_text_encoder(pipeline_cls: type, source: str, weights: str, dtype: torch.dtype) -> Any:
    """The pipeline's text encoder class (from model_index.json) and config (its ``text_encoder/``
    folder, when present: settings such as ``use_attention_mask`` stay), with weights from ``weights``;
    inside :func:`shared_text_encoders`, one already loaded the same way is reused."""
    import transformers

    library, class_name = _model_index(pipeline_cls, source).get("text_encoder", (None, None))
    if library != "transformers" or not hasattr(transformers, class_name):
        raise ConfigError(f"text_encoder: {source} has no transformers text encoder ({library}, {class_name})")
    cls = getattr(transformers, class_name)
    if Path(source).is_dir():  # transformers answers a missing subfolder with a default config, silently
        folder_config = Path(source) / "text_encoder" / "config.json"
        config = cls.config_class.from_pretrained(folder_config.parent) if folder_config.is_file() else None
    else:
        try:
            config = cls.config_class.from_pretrained(source, subfolder="text_encoder")
        except (OSError, ValueError):
            config = None
    shared = _SHARED_TEXT_ENCODERS.get()
    key = (class_name, weights, config.to_json_string() if config is not None else "", str(dtype))
    if shared is not None and key in shared:
        log.info("text_encoder: sharing the %s already loaded from %s", class_name, weights)
        return shared[key]
    try:
        model, info = cls.from_pretrained(weights, config=config, dtype=dtype, output_loading_info=True)
    except Exception as exc:  # OSError (not found / offline), ValueError, ...
        if not names_something_wrong(exc):  # a fault of transformers or of mmllm, or memory running out
            raise
        raise ConfigError(f"text_encoder: cannot load {class_name} weights from {weights!r}: {exc}") from exc
    if info.get("missing_keys"):
        raise ConfigError(
            f"text_encoder: {weights!r} lacks {len(info['missing_keys'])} tensor(s) of the {class_name}, "
            f"e.g. {sorted(info['missing_keys'])[:4]}"
        )
    if shared is not None:
        shared[key] = model
    return model


@dataclass(frozen=True)
class NotLoaded:
    """A pipeline part left unloaded because the stage never runs it: its config only, which the
    decoder's assembly-time checks and sizes read exactly as they read a loaded part's."""

    name: str
    config: Any


def loaded(part: Any) -> Any:
    """The part itself, or None for a :class:`NotLoaded` one (what a diffusers pipeline takes for "absent")."""
    return None if isinstance(part, NotLoaded) else part


def _check_tokenizer_length(parts: dict[str, Any], where: str, model: str | None) -> None:
    """The conditioning length is the tokenizer's ``model_max_length``; transformers reads an unset one as
    1e30, and a longer one than the text encoder's positions fails at its first caption."""
    tokenizer, encoder = parts.get("tokenizer"), parts.get("text_encoder")
    if tokenizer is None or encoder is None:
        return
    length = tokenizer.model_max_length
    positions = getattr(encoder.config, "max_position_embeddings", None)
    if length > 1_000_000 or (positions is not None and length > positions):
        raise ConfigError(
            f"{where}: the pipeline's tokenizer has model_max_length {length}"
            f"{' (unset: transformers reads it as 1e30)' if length > 1_000_000 else ''} but its text encoder takes "
            f"{positions if positions is not None else 'fewer'} positions: set \"model_max_length\" in "
            f"{model}/tokenizer/tokenizer_config.json to the length the text encoder was trained on (SD's CLIP: 77)"
        )


def _part_library(library: str, source: str, name: str) -> Any:
    """The module ``model_index.json`` names a part's class in, as diffusers resolves it: that file ships with the
    folder and importing a module runs it, so only diffusers and mmllm's own component modules are imported;
    any other must already be imported by the caller."""
    import diffusers

    if library == "diffusers":
        return diffusers
    if library == "mmllm" or library.startswith("mmllm."):  # this package's own components
        return importlib.import_module(library)
    if hasattr(diffusers.pipelines, library):
        return getattr(diffusers.pipelines, library)
    if library in sys.modules:
        return sys.modules[library]
    raise ConfigError(f"model: {source}/model_index.json names {name}'s library {library!r}, which neither diffusers "
                      "nor transformers is and which is not imported; mmllm does not import a module a pipeline "
                      "folder names (import it yourself first if it is yours)")


def part_config(pipeline_cls: type, source: str, name: str) -> Any:
    """One part's config without its weights: a transformers config, or a diffusers config with the
    class's defaults filled in (as ``register_to_config`` records them on a built model)."""
    import transformers

    library, class_name = _model_index(pipeline_cls, source)[name]
    if Path(source).is_dir() and not (Path(source) / name / "config.json").is_file():
        # transformers answers a missing subfolder with a default config (CLIP: width 512), silently
        raise ConfigError(f"model: {source} has no {name}/config.json, which its model_index.json names; "
                          f"copy the pipeline's {name}/ folder there")
    if library == "transformers":
        return getattr(transformers, class_name).config_class.from_pretrained(source, subfolder=name)
    cls = getattr(_part_library(library, source, name), class_name, None)
    if not isinstance(cls, type):
        raise ConfigError(f"model: {source}/model_index.json names {name} as {library}.{class_name}, which is no class")
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return SimpleNamespace(**{**defaults, **cls.load_config(source, subfolder=name)})


def load_parts(
    pipeline_cls: type,
    options: DiffusionOptions,
    dtype: torch.dtype,
    names: tuple[str, ...],
    skip: tuple[str, ...] = (),
    **kwargs: Any,
) -> dict[str, Any]:
    """``pipeline_cls.from_pretrained(options.model)`` (safetensors only), honouring ``package:`` sources
    and the ``text_encoder`` option, and returning the parts ``names``; those in ``skip`` are not loaded
    (their weights are never read) and come back as :class:`NotLoaded`. ``kwargs`` go to ``from_pretrained``."""
    source = resolve_source(options.model)
    if Path(source).is_dir():
        index = _model_index(pipeline_cls, source)
        _check_family(pipeline_cls, index, source, names, options)
        elsewhere = ("text_encoder",) if options.text_encoder is not None else ()
        absent = [n for n in names if n not in skip and n not in elsewhere and isinstance(index.get(n), list)
                  and index[n][0] is not None and not (Path(source) / n).is_dir()]
        if absent:
            raise ConfigError(f"model: {source} has no {', '.join(f'{n}/' for n in absent)} folder, which its "
                              "model_index.json names; copy the pipeline's folder(s) there")
        _import_own_components(index)
    if options.text_encoder is not None and "text_encoder" not in skip:
        weights = resolve_source(options.text_encoder)
        kwargs["text_encoder"] = load_text_encoder(pipeline_cls, source, weights, dtype)
    kwargs.update({name: None for name in skip})
    with diffusers_noise_dropped():  # a MiniLM given where the pipeline's annotation names CLIP, say
        pipe = pipeline_cls.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=options.trust_remote_code, **kwargs
        )
    if skip:
        log.info("%s: not loading %s (the stage does not use them)", options.model, ", ".join(skip))
    return {name: NotLoaded(name, _unloaded_config(pipeline_cls, options, source, name)) if name in skip
            else getattr(pipe, name) for name in names}


# the kind that loads each pipeline class, to name the right one when a folder is another family's
PIPELINE_KINDS = {"StableDiffusionPipeline": "sd-image", "AudioLDMPipeline": "audioldm-audio",
                  "TextToVideoSDPipeline": "t2v-video"}


def _check_family(pipeline_cls: type, index: dict[str, Any], source: str, names: tuple[str, ...],
                  options: DiffusionOptions) -> None:
    """The folder is a pipeline of the kind's family: it has every part the kind loads, and a UNet of the class
    the kind's pipeline takes (diffusers would load a text-to-video UNet into a Stable Diffusion pipeline,
    warning, and fail or draw noise at the first denoising step)."""
    theirs = index.get("_class_name", "?")
    kind = PIPELINE_KINDS.get(theirs)
    if kind and theirs != pipeline_cls.__name__:
        raise ConfigError(f"model: {source} is a {theirs}, and this kind loads a {pipeline_cls.__name__}: "
                          f"use kind {kind}")
    given = {"text_encoder"} if options.text_encoder is not None else set()
    lacking = [n for n in names if n not in given and not (isinstance(index.get(n), list) and index[n][0])]
    if lacking:
        raise ConfigError(f"model: {source} ({theirs}) has no {', '.join(lacking)}, which this kind's "
                          f"{pipeline_cls.__name__} needs")
    wanted = inspect.signature(pipeline_cls.__init__).parameters["unet"].annotation
    wanted_names = {getattr(t, "__name__", str(t)) for t in getattr(wanted, "__args__", (wanted,))}
    library, unet = index["unet"]
    if library == "diffusers" and unet not in wanted_names:
        raise ConfigError(f"model: {source} ({theirs}) holds a {unet}, but this kind's {pipeline_cls.__name__} "
                          f"takes a {' or '.join(sorted(wanted_names))}")


def _unloaded_config(pipeline_cls: type, options: DiffusionOptions, source: str, name: str) -> Any:
    """A part's config without its weights; a text encoder whose weights come from ``text_encoder:`` and
    that the folder ships no config for has its weights' own config, as when it is loaded."""
    import transformers

    if (name == "text_encoder" and options.text_encoder is not None and Path(source).is_dir()
            and not (Path(source) / name / "config.json").is_file()):
        class_name = _model_index(pipeline_cls, source)[name][1]
        config_class = getattr(transformers, class_name).config_class
        return config_class.from_pretrained(resolve_source(options.text_encoder))
    return part_config(pipeline_cls, source, name)


def not_loaded(parts: dict[str, Any], skip: tuple[str, ...]) -> dict[str, Any]:
    """An in-process build's parts with those in ``skip`` dropped to their configs."""
    return {name: NotLoaded(name, part.config) if name in skip else part for name, part in parts.items()}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_tiny(cls: type, tiny: dict[str, Any]) -> Any:
    """Check a ``tiny:`` mapping against the family's tiny-size dataclass (unknown keys are errors)."""
    return from_dict(cls, tiny, "tiny")


def freeze(*modules: nn.Module | None) -> None:
    """Eval mode and no gradients: the decoder's parts never learn."""
    for module in modules:
        if module is not None:
            module.eval()
            module.requires_grad_(False)


def resolve_seeds(seeds: list[int] | None, batch: int) -> list[int]:
    """Seeds per row; ``None`` means row ``i`` uses seed ``i``."""
    if seeds is None:
        return list(range(batch))
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
    return [int(s) for s in seeds]


def row_generators(seeds: list[int] | None, batch: int, device: torch.device) -> list[torch.Generator]:
    """One generator per row, seeded from ``seeds[i]``: a row's noise does not depend on its batch."""
    return [torch.Generator(device=device).manual_seed(s) for s in resolve_seeds(seeds, batch)]


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator:
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return torch.Generator(device=device).manual_seed(int(seed))


Generators = torch.Generator | list[torch.Generator]


def seeded_generators(seed: int | list[int] | None, device: torch.device) -> Generators:
    """One generator for the batch, or, for a list of seeds (one per row), one per row: a denoising loss
    given per-row seeds draws each row's VAE sample, noise and timestep from its own generator, so a row's
    draws do not depend on which rows share its batch."""
    if isinstance(seed, list):
        return row_generators(seed, len(seed), device)
    return seeded_generator(seed, device)


def repeat_generators(generator: Generators, times: int) -> Generators:
    """Per-row generators for a batch whose rows are each expanded into ``times`` rows (video frames)."""
    return [g for g in generator for _ in range(times)] if isinstance(generator, list) else generator


def split_generators(generator: Generators, sizes: list[int]) -> list[Generators]:
    """Per-row generators split like the batch (VAE chunks); one shared generator goes to every chunk."""
    if not isinstance(generator, list):
        return [generator] * len(sizes)
    out, start = [], 0
    for n in sizes:
        out.append(generator[start:start + n])
        start += n
    return out


def make_scheduler(scheduler: Any, name: str | None, prediction_type: str | None) -> Any:
    """Swap the scheduler class and/or override ``prediction_type``, keeping the rest of its config."""
    if name is None and prediction_type is None:
        return scheduler
    import diffusers

    cls = getattr(diffusers, name) if name is not None else type(scheduler)
    overrides = {"prediction_type": prediction_type} if prediction_type is not None else {}
    return cls.from_config(scheduler.config, **overrides)


def training_scheduler(scheduler: Any) -> Any:
    """A DDPM scheduler with the same betas and prediction type, for ``add_noise`` / ``get_velocity``.

    Multistep samplers (DPM-Solver, UniPC) index ``add_noise`` through the sigmas of their current
    *inference* schedule; training needs the fixed training schedule, as in diffusers' training scripts.
    """
    from diffusers import DDPMScheduler

    if "prediction_type" not in scheduler.config or "num_train_timesteps" not in scheduler.config:
        raise ValueError(
            f"{type(scheduler).__name__} is not a DDPM-family scheduler; the denoising loss needs one"
        )
    keys = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "prediction_type",
        "rescale_betas_zero_snr",
    )
    config = {k: scheduler.config[k] for k in keys if k in scheduler.config}
    return DDPMScheduler.from_config(config)


def prediction_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the denoiser is trained to predict, by ``scheduler.config.prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(
        f"unsupported prediction_type {kind!r} for the denoising loss; valid: {', '.join(PREDICTION_TYPES)}"
    )


def denoising_mse(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    scheduler: Any,
    generator: Generators,
) -> torch.Tensor:
    """Noise ``latents`` at random training timesteps and score ``predict(noisy, t)`` against the target.

    ``scheduler`` should be a :func:`training_scheduler`. ``predict`` closes over the conditioning,
    so gradients reach it while the (frozen) denoiser's weights stay untouched. ``generator``: one for the
    batch, or one per row (:func:`seeded_generators`), each row's noise and timestep then from its own.
    """
    latents = latents.detach()
    steps = scheduler.config.num_train_timesteps
    if isinstance(generator, list):
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g, device=g.device) for g in generator])
        timesteps = timesteps.to(latents.device)
    else:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(scheduler, latents, noise, timesteps)
    prediction = predict(noisy, timesteps)
    return F.mse_loss(prediction.float(), target.float())


def tiny_text_tokenizer(max_length: int, vocab_size: int = 512) -> Any:
    """The in-process tokenizer, adding ``<|bos|> ... <|eos|>`` like CLIP and RoBERTa tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    from mmllm.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(vocab_size=vocab_size, model_max_length=max_length)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)],
    )
    return tokenizer


def check_conditioning(conditioning: torch.Tensor, shape: tuple[int, int], name: str) -> None:
    if conditioning.dim() != 3 or tuple(conditioning.shape[1:]) != tuple(shape):
        raise ValueError(
            f"{name}: conditioning must have shape (batch, {shape[0]}, {shape[1]}), "
            f"got {tuple(conditioning.shape)}"
        )


def warn_remote_code(options: DiffusionOptions, name: str) -> None:
    if options.trust_remote_code:
        log.warning("%s: trust_remote_code=True lets the model repository run its own Python code", name)


class FrozenDiffusionDecoder(MediaDecoder):
    """Common plumbing: frozen parts always in eval mode, a conditioning shape, a pipeline built once,
    and the parts loaded (``DECODER_PARTS``)."""

    # the pipeline parts only generation and the denoising loss run (a family adds its own, e.g. a vocoder)
    GENERATION_PARTS: tuple[str, ...] = ("unet", "vae")
    # those of them the denoising loss runs (it is conditioned on the output projection, not on the text encoder)
    DENOISE_PARTS: tuple[str, ...] = ("unet", "vae")
    Tiny: type  # the family's in-process sizes dataclass

    def __init__(self, conditioning_shape: tuple[int, int], parts: str = "all") -> None:
        super().__init__()
        self._conditioning_shape = (int(conditioning_shape[0]), int(conditioning_shape[1]))
        self._pipeline: Any = None
        self._parts = parts

    def _adopt(self, **parts: Any) -> None:
        """Register the frozen parts as submodules; a :class:`NotLoaded` one as None (so ``self.unet`` is
        None, and the module's plain attributes, which the cache fingerprint reads, do not change)."""
        for name, part in parts.items():
            self.register_module(name, loaded(part))
            freeze(loaded(part))

    @classmethod
    def from_options(cls, options: DiffusionOptions, where: str = "", parts: str = "all") -> FrozenDiffusionDecoder:
        """Load (``model:``) or build in-process (``tiny:``, sizes checked against ``cls.Tiny``) the family's
        parts, those ``parts`` does not use as :class:`NotLoaded`, and assemble the decoder."""
        dtype = parse_dtype(options.dtype)
        skip = cls.skipped(parts)
        at = f"{where}." if where else ""
        if options.tiny is not None:
            built = not_loaded(cls._build_tiny(parse_tiny(cls.Tiny, options.tiny)), skip)
        else:
            try:
                built = cls._load(options, dtype, skip)
            except ConfigError as exc:
                raise ConfigError(f"{at}{exc}") from exc
            except (OSError, ValueError) as exc:  # a missing or partial folder, an unknown hub id offline, ...
                raise ConfigError(
                    f"{at}model: cannot load the {cls.__name__} parts from {options.model!r}: {exc} (a diffusers "
                    "pipeline folder: model_index.json and a subfolder per part, weights as .safetensors)"
                ) from exc
            _check_tokenizer_length(built, f"{at}model", options.model)
        try:
            return cls(**built, options=options, parts=parts).to(dtype)
        except ValueError as exc:  # parts that do not fit together (UNet vs text encoder widths, ...)
            raise ConfigError(f"{at}{'model' if options.model else 'tiny'}: {exc}") from exc

    @staticmethod
    def _load(options: Any, dtype: torch.dtype, skip: tuple[str, ...]) -> dict[str, Any]:
        """The family's parts from ``options.model`` (:func:`load_parts`)."""
        raise NotImplementedError

    @staticmethod
    def _build_tiny(sizes: Any) -> dict[str, Any]:
        """The family's parts built in-process with random (seeded) weights."""
        raise NotImplementedError

    @classmethod
    def skipped(cls, parts: str) -> tuple[str, ...]:
        """The pipeline parts that ``parts`` (one of DECODER_PARTS) leaves unloaded."""
        if parts not in DECODER_PARTS:
            raise ValueError(f"unknown decoder parts {parts!r}; valid: {', '.join(DECODER_PARTS)}")
        generation = cls.GENERATION_PARTS
        unused_by_denoising = tuple(p for p in generation if p not in cls.DENOISE_PARTS)
        return {"all": (), "denoise": ("text_encoder", *unused_by_denoising), "conditioning": generation,
                "config": (*generation, "text_encoder")}[parts]

    def holds(self, parts: str) -> bool:
        """Whether this decoder holds everything ``parts`` loads (the levels are not a chain: ``denoise``
        lacks the text encoder ``conditioning`` has)."""
        return set(self.skipped(self._parts)) <= set(self.skipped(parts))

    @property
    def parts(self) -> str:
        """What this decoder loaded: one of ``DECODER_PARTS``."""
        return self._parts

    def parameters_of(self, parts: str) -> list[nn.Parameter]:
        """The parameters this decoder would hold assembled with ``parts`` (at most what it holds now)."""
        skip = set(self.skipped(parts))
        return [p for name, child in self.named_children() if name not in skip for p in child.parameters()]

    def release(self, parts: str) -> None:
        """Keep only what ``parts`` loads (at most what is loaded now): the parts it does not run are freed;
        the sizes read from them at assembly stay. Used when the feature cache holds every conditioning
        target a stage reads (``cache.require``): ``"conditioning"`` -> ``"config"``, ``"all"`` -> ``"denoise"``."""
        if not self.holds(parts):
            raise ValueError(f"{type(self).__name__} holds parts={self._parts!r}; it cannot release to {parts!r}")
        for name in sorted(set(self.skipped(parts)) - set(self.skipped(self._parts))):
            self.register_module(name, None)
        self._parts, self._pipeline = parts, None

    def _require(self, parts: str, action: str) -> None:
        """Refuse ``action`` when the decoder was assembled without the parts it runs."""
        if not self.holds(parts):
            missing = sorted(set(self.skipped(self._parts)) - set(self.skipped(parts)))
            raise RuntimeError(
                f"{type(self).__name__} ({self.modality}) was assembled with parts={self._parts!r}, without its "
                f"{', '.join(missing)}, so it cannot {action} (a training stage loads what its data and losses "
                f"run); in Python, assemble the model with decoder_parts={parts!r} "
                f"(`AnyToAnyModel.from_pretrained(dir, decoder_parts={parts!r})`)"
            )

    @property
    def conditioning_shape(self) -> tuple[int, int]:
        return self._conditioning_shape

    def train(self, mode: bool = True) -> FrozenDiffusionDecoder:
        """A frozen decoder stays in eval mode (no dropout) whatever the training loop asks."""
        return super().train(False)

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline over this module's own parts; built on first use and kept."""
        if self._pipeline is None:
            with diffusers_noise_dropped():  # AudioLDM's and text-to-video's deprecation notice: once a process
                self._pipeline = self._build_pipeline()
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    def _build_pipeline(self) -> Any:
        raise NotImplementedError

    def _negative(self, negative: torch.Tensor | None, batch: int, guidance: float) -> torch.Tensor | None:
        """Negative conditioning for classifier-free guidance: None when guidance is off; the empty
        prompt's encoding when not given; one row broadcast to the batch."""
        if guidance <= 1.0:
            return None
        if negative is None:
            negative = self.condition([""])
        check_conditioning(negative, self.conditioning_shape, f"{type(self).__name__} negative")
        if negative.shape[0] == 1:
            negative = negative.expand(batch, -1, -1)
        if negative.shape[0] != batch:
            raise ValueError(f"negative conditioning has {negative.shape[0]} rows for a batch of {batch}")
        device, dtype = self._device_dtype()
        return negative.detach().to(device, dtype)

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        param = next(self.parameters())
        return param.device, param.dtype

    def describe(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "modality": self.modality,
            "conditioning_shape": list(self.conditioning_shape),
            "parts": self._parts,
            "parameters": sum(p.numel() for p in self.parameters()),
        }
