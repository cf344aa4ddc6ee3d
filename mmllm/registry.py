"""Component kinds by exact name.

Each table maps a ``kind`` (the YAML key) to ``"module:Class"``. A class declares its options as
a dataclass ``Options`` and builds itself with ``from_options(options)``. Lookup is exact: an
unknown kind is an error that lists the valid ones (no substring matching on model names).
Adding a family is one new file plus one line here.

A kind written as ``"package.module:Class"`` names a class of your own, imported from an installed
module (nothing is loaded from a checkpoint or a data folder): an encoder subclasses
:class:`~mmllm.encoders.base.MediaEncoder`, a decoder :class:`~mmllm.decoders.base.MediaDecoder`, an
LLM loader returns an :class:`~mmllm.llm.LLMCore`. Its ``from_options(options, where)`` may also take
what the assembly passes the shipped kinds (``weights`` for an encoder or LLM, ``parts`` for a
decoder); one that does not is built whole (an encoder not loaded for a stage is then wrapped as its
shape). A class that builds parts of its own through :func:`build` may list them in a classmethod
``nested_parts(options, where)`` (``(table, spec, where)`` each): :func:`check_part_options` checks theirs too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from mmllm.config import ComponentSpec, ConfigError, from_dict, naming_the_override

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
    at = f"{where + ': ' if where else ''}"
    if kind in kinds:
        target = kinds[kind]
    elif ":" in kind:
        target = kind  # a class of the user's own, by import path
    else:
        raise ConfigError(f"{at}unknown {table} kind {kind!r}; valid kinds are: {', '.join(sorted(kinds))} (or a "
                          "class of your own as 'package.module:Class')")
    module_name, class_name = target.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{at}kind {kind!r}: cannot import {module_name} ({exc}); install the package that "
                          "provides it") from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not hasattr(cls, "Options") or not hasattr(cls, "from_options"):
        # a class defined in a script or notebook is __main__'s: another process has it only if it defines it too
        hint = (f"; a class of a script or notebook is found only in a process that defines (or imports) "
                f"{class_name} in its own __main__ before building or loading: define it there, or move it into "
                "a package and name it as 'package.module:Class'" if module_name == "__main__" else "")
        raise ConfigError(f"{at}kind {kind!r}: {module_name} has no class {class_name} with an Options dataclass "
                          f"and a from_options classmethod{hint}")
    return cls


def custom_kinds(data: Any) -> list[str]:
    """The ``package.module:Class`` kinds anywhere in an assembly as a dict (nested parts included)."""
    found = []
    if isinstance(data, dict):
        kind = data.get("kind")
        if isinstance(kind, str) and ":" in kind and not any(kind in table for table in TABLES.values()):
            found.append(kind)
        for value in data.values():
            found += custom_kinds(value)
    elif isinstance(data, list):
        for value in data:
            found += custom_kinds(value)
    return found


def check_kind_not_inside(kind: str, folder: Path, where: str) -> None:
    """Refuse a ``package.module:Class`` kind that would be imported from a file inside ``folder`` (a checkpoint:
    with the working directory on ``sys.path``, as under ``python -m``, a checkpoint's own ``.py`` files are
    importable). Found level by level, before any of its code runs: each level is located first (finding
    ``a.b`` imports ``a``, already located outside)."""
    folder = Path(folder).resolve()
    parts = kind.split(":", 1)[0].split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        try:
            spec = sys.modules[name].__spec__ if name in sys.modules else importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError):
            return  # not importable: resolve() says so
        if spec is None:
            return
        places = [spec.origin] if spec.origin and spec.has_location else []
        places += list(spec.submodule_search_locations or [])
        inside = [p for p in places if _lies_in(Path(p), folder)]
        if inside:
            raise ConfigError(f"{where}: kind {kind!r} would import {name} from {inside[0]}, inside {folder}; a "
                              "part's class is imported from an installed package, never from a checkpoint (run "
                              "from another folder if this is your own module's folder)")


def _lies_in(path: Path, folder: Path) -> bool:
    """Whether ``path`` is in the (resolved) ``folder`` where it is found, or where it leads: a file of a hub-cache
    snapshot is a link to a blob outside the snapshot, so resolving the file alone would place it outside."""
    return any(p.is_relative_to(folder) for p in (path.resolve(), path.absolute().parent.resolve() / path.name))


def parse_options(table: str, spec: ComponentSpec, where: str) -> Any:
    """``spec``'s options checked strictly, and those of the parts it builds inside (a class's optional
    ``nested_parts(options, where)``: ``(table, spec, where)`` of each, e.g. frames-video's ``image``)."""
    cls = resolve(table, spec.kind, where)
    options = from_dict(cls.Options, spec.options, where)
    for inner_table, inner_spec, inner_where in nested_parts(cls, options, where):
        parse_options(inner_table, inner_spec, inner_where)
    return options


def nested_parts(cls: type, options: Any, where: str) -> list[tuple[str, ComponentSpec, str]]:
    """The parts a component of class ``cls`` builds through the registry itself, as ``(table, spec, where)``."""
    declared = getattr(cls, "nested_parts", None)
    return list(declared(options, where)) if callable(declared) else []


def check_part_options(config: Any, where: str, overrides: list[str] | None = None, prefix: str = "") -> None:
    """Every part's options of the assembly ``config`` (an AssemblyConfig) checked as :func:`build` checks them,
    nothing built: an option mistyped in an encoder or decoder is reported naming ``where`` (its file) before
    the LLM, which is built first and can take minutes to load, not after. ``overrides``: the command line's
    ``key=value`` the assembly was loaded with (written there as ``prefix`` + item): the one that set the option
    at fault is named, as the file does not hold it."""
    parts = [("llm", config.llm, "llm")]
    parts += [("encoder", spec, f"encoders.{m}") for m, spec in config.encoders.items()]
    parts += [("decoder", spec, f"decoders.{m}") for m, spec in config.decoders.items()]
    for table, spec, at in parts:
        try:
            parse_options(table, spec, at)
        except ConfigError as exc:
            raise naming_the_override(ConfigError(f"{where}: {exc}"), overrides or [], prefix, source=str(where)) from exc


def build(table: str, spec: ComponentSpec, where: str, **kwargs: Any) -> Any:
    """Resolve ``spec.kind`` in ``table``, check its options strictly, and build the component
    (``kwargs`` go to its ``from_options``: an encoder's or LLM's ``weights``, a decoder's ``parts``)."""
    cls = resolve(table, spec.kind, where)
    options = from_dict(cls.Options, spec.options, where)
    given = {"where": where, **kwargs}
    accepted = inspect.signature(cls.from_options).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    dropped = {k: v for k, v in given.items() if not takes_all and k not in accepted}
    built = cls.from_options(options, **{k: v for k, v in given.items() if k not in dropped})
    expected = _expected_type(table)
    if not isinstance(built, expected):
        raise ConfigError(f"{where}: kind {spec.kind!r} built a {type(built).__name__}, not a {expected.__name__}")
    if table == "encoder" and dropped.get("weights") is False:
        from mmllm.encoders.base import EncoderShape

        built = EncoderShape(built)  # the stage does not run it: keep its shape, drop the weights
    return built


def _expected_type(table: str) -> type:
    if table == "llm":
        from mmllm.llm import LLMCore

        return LLMCore
    if table == "encoder":
        from mmllm.encoders.base import MediaEncoder

        return MediaEncoder
    from mmllm.decoders.base import MediaDecoder

    return MediaDecoder
