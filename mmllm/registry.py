"""Component kinds by exact name.

Each table maps a ``kind`` (the YAML key) to ``"module:Class"``. A class declares its options as
a dataclass ``Options`` and builds itself with ``from_options(options)``. Lookup is exact: an
unknown kind is an error that lists the valid ones (no substring matching on model names).
Adding a family is one new file plus one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmllm.config import ComponentSpec, ConfigError, from_dict

LLMS: dict[str, str] = {
    "hf-causal-lm": "mmllm.llm:HFCausalLM",  # hub id, local dir, or GGUF file
    "tiny-llama": "mmllm.llm:TinyLlama",  # built in-process from a LlamaConfig, random weights
}

ENCODERS: dict[str, str] = {
    "open-clip": "mmllm.encoders.open_clip:OpenClipImageEncoder",
    "hf-audio": "mmllm.encoders.hf_audio:HFAudioEncoder",  # CLAP audio tower, Whisper encoder, AST
    "frames-video": "mmllm.encoders.video:FramesVideoEncoder",  # N frames through an image encoder
}

DECODERS: dict[str, str] = {
    "sd-image": "mmllm.decoders.sd_image:StableDiffusionDecoder",
    "audioldm-audio": "mmllm.decoders.audioldm:AudioLDMDecoder",
    "t2v-video": "mmllm.decoders.text_to_video:TextToVideoDecoder",
}

TABLES = {"llm": LLMS, "encoder": ENCODERS, "decoder": DECODERS}


def resolve(table: str, kind: str, where: str = "") -> type:
    kinds = TABLES[table]
    if kind not in kinds:
        raise ConfigError(
            f"{where + ': ' if where else ''}unknown {table} kind {kind!r}; valid kinds are: {', '.join(sorted(kinds))}"
        )
    module_name, class_name = kinds[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def parse_options(table: str, spec: ComponentSpec, where: str) -> Any:
    cls = resolve(table, spec.kind, where)
    return from_dict(cls.Options, spec.options, where)


def build(table: str, spec: ComponentSpec, where: str, **kwargs: Any) -> Any:
    """Resolve ``spec.kind`` in ``table``, check its options strictly, and build the component
    (``kwargs`` go to its ``from_options``: a decoder's ``parts``)."""
    cls = resolve(table, spec.kind, where)
    options = from_dict(cls.Options, spec.options, where)
    return cls.from_options(options, where=where, **kwargs)
