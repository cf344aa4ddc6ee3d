"""mmllm: assemble, train and run any-to-any multimodal models from pretrained parts.

The names a script or notebook uses (docs/python.md, "Using mmllm from Python")::

    from mmllm import AnyToAnyModel, Request, load_assembly, load_stage, train

They are imported on first use, so ``import mmllm`` (and the ``mmllm`` command's start) reads no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # configs: YAML files <-> dataclasses
    "AssemblyConfig": "mmllm.config",
    "ComponentSpec": "mmllm.config",
    "ConfigError": "mmllm.config",
    "DatasetConfig": "mmllm.config",
    "InputProjectionConfig": "mmllm.config",
    "LoraConfig": "mmllm.config",
    "OutputProjectionConfig": "mmllm.config",
    "StageConfig": "mmllm.config",
    "load_assembly": "mmllm.config",
    "load_lora": "mmllm.config",
    "load_stage": "mmllm.config",
    "parse_assembly": "mmllm.config",
    "save_assembly": "mmllm.config",
    # the model
    "AnyToAnyModel": "mmllm.model",
    "GenerationResult": "mmllm.model",
    # parts of one's own (``kind: package.module:Class``)
    "MediaDecoder": "mmllm.decoders.base",
    "MediaEncoder": "mmllm.encoders.base",
    # training and inference
    "TrainResult": "mmllm.training.loop",
    "TrainingInterrupted": "mmllm.training.interrupt",
    "train": "mmllm.training.loop",
    "Request": "mmllm.inference.generate",
    "run_requests": "mmllm.inference.runner",
}

__all__ = [  # _EXPORTS' names (tests/test_library.py checks they agree)
    "__version__",
    "AnyToAnyModel",
    "AssemblyConfig",
    "ComponentSpec",
    "ConfigError",
    "DatasetConfig",
    "GenerationResult",
    "InputProjectionConfig",
    "LoraConfig",
    "MediaDecoder",
    "MediaEncoder",
    "OutputProjectionConfig",
    "Request",
    "StageConfig",
    "TrainResult",
    "TrainingInterrupted",
    "load_assembly",
    "load_lora",
    "load_stage",
    "parse_assembly",
    "run_requests",
    "save_assembly",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mmllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from mmllm.config import (
        AssemblyConfig,
        ComponentSpec,
        ConfigError,
        DatasetConfig,
        InputProjectionConfig,
        LoraConfig,
        OutputProjectionConfig,
        StageConfig,
        load_assembly,
        load_lora,
        load_stage,
        parse_assembly,
        save_assembly,
    )
    from mmllm.decoders.base import MediaDecoder
    from mmllm.encoders.base import MediaEncoder
    from mmllm.inference.generate import Request
    from mmllm.inference.runner import run_requests
    from mmllm.model import AnyToAnyModel, GenerationResult
    from mmllm.training.interrupt import TrainingInterrupted
    from mmllm.training.loop import TrainResult, train
