"""A config as a run will use it, written out whole: what ``mmllm config`` prints.

A stage YAML names an assembly YAML and a LoRA YAML, leaves most keys at their defaults and is changed by
``key.sub=value`` overrides; relative paths in it resolve from the working directory, then from its folder.
:func:`resolved_stage` gives all of it as one plain mapping: every key with its default filled in (each part's
options too, from its kind's ``Options``), the overrides applied, the assembly and LoRA written in as mappings
(``assembly:`` and ``lora:`` take a mapping as well as a path) and every path absolute, as training resolves
it. Written as YAML and given back as ``--config``, it loads to the same stage, assembly and LoRA settings; and
it is its own resolved form (a fixed point). Nothing is built and no weights are read: the parts' modules are
imported, to check their options as ``train`` does before it builds them. :func:`recorded_stage` gives the
stage config a training checkpoint records (``mmllm config --checkpoint``), which resolves the same way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from mmllm import __version__
from mmllm.config import (
    DATA_PATHS,
    AssemblyConfig,
    ConfigError,
    StageConfig,
    config_source,
    load_assembly,
    load_lora,
    load_stage,
    to_dict,
)

log = logging.getLogger(__name__)


def resolved_assembly(assembly: AssemblyConfig) -> dict[str, Any]:
    """``assembly`` as plain data with every default filled in: the assembly's own (projections, signal tokens)
    and those of each part's options, nested parts included (a part whose options do not parse is as written)."""
    from mmllm.training.init_from import normalized_assembly

    return normalized_assembly(assembly)


def shown_path(value: str | None) -> str | None:
    """``value`` absolute, as training opens it (a relative path is the working directory's), ``..`` taken out
    where that leads to the same place (not through a link to another folder)."""
    if value is None:
        return None
    absolute = Path(value).expanduser().absolute()
    normal = os.path.abspath(absolute)
    if absolute.exists() and not (os.path.exists(normal) and os.path.samefile(normal, absolute)):
        return str(absolute)
    return normal


def resolved_stage(cfg: StageConfig, assembly: AssemblyConfig, base: Path | None = None) -> dict[str, Any]:
    """``cfg`` (as :func:`~mmllm.config.load_stage` gives it) as plain data with ``assembly`` (the stage's
    assembly, overrides applied) and its LoRA file written in, and its paths absolute. ``base``: the stage
    file's folder, where a data path found from neither the working directory nor there is shown (with a
    warning): where the config's relative paths point, and where it is looked up once it exists."""
    data = to_dict(cfg)
    data["trainable"] = cfg.resolved_trainable()  # null: the stage's default, written as what it is
    data["assembly"] = resolved_assembly(assembly)
    data["lora"] = to_dict(load_lora(cfg.lora)) if cfg.lora is not None else None
    for key in ("output_dir", "init_from"):
        data[key] = shown_path(data[key])
    data["cache"]["dir"] = shown_path(data["cache"]["dir"])
    missing = []
    for section in ("data", "eval_data"):
        for i, ds in enumerate(data[section]):
            for key in DATA_PATHS:
                value = ds[key]
                if value is not None and base is not None and not Path(value).is_absolute() and not Path(value).exists():
                    missing.append(f"{section}[{i}].{key} {value}")
                    value = str(base / value)
                ds[key] = shown_path(value)
    if missing:
        log.warning("not found from the working directory %s nor from the stage's folder %s: %s. Shown in the "
                    "stage's folder, where its relative paths point; training refuses them until they exist",
                    Path.cwd(), base, "; ".join(missing[:3]) + (f"; and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return data


def stage_assembly_checked(cfg: StageConfig) -> AssemblyConfig:
    """The stage's own assembly (its ``assembly:`` and ``assembly.*`` overrides), checked as ``train`` checks
    it before anything is built: against ``init_from``'s recorded one when that checkpoint exists (the one that
    trains then), else each part's options."""
    from mmllm.registry import check_part_options
    from mmllm.training.init_from import continues_checkpoint

    assembly = load_assembly(cfg.assembly, cfg.assembly_overrides)
    if continues_checkpoint(cfg):
        log.info("init_from %s exists: training continues the assembly its mmllm.json records (compared with "
                 "this one above); the assembly printed is the stage's own", cfg.init_from)
    else:
        check_part_options(assembly, config_source(cfg.assembly), cfg.assembly_overrides, "assembly.")
    return assembly


def config_yaml(config: str | Path, overrides: list[str] | None = None) -> str:
    """The resolved config of the stage or assembly YAML ``config`` with ``overrides``, as YAML text with a
    header saying what it is (:func:`resolved_stage`; an assembly YAML: :func:`resolved_assembly`)."""
    from mmllm.config import is_stage_yaml, read_yaml
    from mmllm.registry import check_part_options

    overrides = list(overrides or [])
    if is_stage_yaml(read_yaml(config)):
        cfg = load_stage(config, overrides)
        base = Path(config).expanduser().resolve().parent
        data, kind = resolved_stage(cfg, stage_assembly_checked(cfg), base), "stage"
    else:
        assembly = load_assembly(config, overrides, "")
        check_part_options(assembly, str(config), overrides)
        data, kind = resolved_assembly(assembly), "assembly"
    return with_header(data, kind, f"the {kind} config of: {' '.join([f'--config {config}', *overrides])}")


def checkpoint_config_yaml(checkpoint: str | Path, overrides: list[str] | None = None) -> str:
    """The stage config that trained ``checkpoint`` (:func:`recorded_stage`) with ``overrides``, resolved as
    :func:`config_yaml` resolves a stage YAML, as YAML text with a header saying what it is."""
    overrides = list(overrides or [])
    cfg = recorded_stage(Path(checkpoint), overrides)
    data = resolved_stage(cfg, stage_assembly_checked(cfg))
    return with_header(data, "stage", "the stage config that trained the checkpoint: "
                       + " ".join([f"--checkpoint {checkpoint}", *overrides]),
                       ["assembly: and lora: are those it records as built (init_from's, where it names one)."])


def _relative_note(recorded: list[tuple[Any, str]]) -> str:
    """What a refusal adds where an export or refine's output records a relative path to what it was made from
    (``recorded``: (path, the command that recorded it)). An older mmllm recorded the path as given, relative to
    the folder that command ran in, which from any other folder leads elsewhere; this one records it absolute."""
    relative = [f"{path}: relative to the folder `{command}` ran in" for path, command in recorded
                if path is not None and not Path(str(path)).is_absolute()]
    return f" ({'; '.join(relative)})" if relative else ""


def recorded_stage(checkpoint: Path, overrides: list[str]) -> StageConfig:
    """The stage config a training checkpoint's ``mmllm.json`` records, with the assembly it built and the LoRA
    it added written in, its relative paths made absolute from the folder training ran in, and ``overrides``
    applied. The checkpoint's manifest is verified first; a folder that records no training of its own (an
    export, a merged export, a checkpoint written before mmllm recorded its stage) is refused
    (:class:`~mmllm.training.checkpoint.CheckpointError`), saying why. One that records its stage but not the
    folder training ran in (an older mmllm's) is read with its relative paths taken from the working directory,
    with a warning naming them (:func:`assumed_working_dir`)."""
    from mmllm.config import from_dict, stage_from_mapping
    from mmllm.training import checkpoint as ckpt

    ckpt.verify_manifest(checkpoint)
    meta = ckpt.read_meta(checkpoint)
    where = checkpoint / ckpt.CONFIG_FILE
    refined = meta.get("refined_from") if "stage" not in meta else None  # refine records no stage of its own
    for key, what in (("exported_from", "an export (mmllm export)"), ("merged_from", "a merged export")):
        if key in meta:
            source = meta[key].get("checkpoint") if isinstance(meta[key], dict) else meta[key]
            if refined is not None:  # an export of refine's output (the shipped default's glue)
                note = _relative_note([(source, "mmllm export"), (refined, "mmllm refine")])
                raise ckpt.CheckpointError(
                    f"{checkpoint} is {what} of {source}, which mmllm refine made from {refined}{note}: no stage "
                    f"trained either. Give the checkpoint it was refined from (mmllm config --checkpoint {refined})")
            note = _relative_note([(source, "mmllm export")])
            raise ckpt.CheckpointError(f"{checkpoint} is {what} of {source}{note}, not a training checkpoint: no "
                                       "stage trained it. Give the step-N checkpoint it was exported from")
    if refined is not None:
        raise ckpt.CheckpointError(f"{checkpoint} was made by mmllm refine from {refined}"
                                   f"{_relative_note([(refined, 'mmllm refine')])} (its output projections "
                                   "refitted), not by a training stage: give the checkpoint it was refined from "
                                   f"(mmllm config --checkpoint {refined})")
    stage, working_dir = meta.get("stage"), meta.get("working_dir")
    if not isinstance(stage, dict):
        raise ckpt.CheckpointError(f"{where}: does not record the stage that trained it (a checkpoint written by an "
                                   "older mmllm, or not by training); give a step-N checkpoint of a training run, or "
                                   "print the stage YAML it was trained with: mmllm config --config STAGE.yaml")
    if stage.get("lora") is not None and not isinstance(meta.get("lora"), dict):
        raise ckpt.CheckpointError(f"{where}: its stage names a lora: but it records no LoRA adapter; the file is "
                                   "damaged or was not written by mmllm")
    recorded = {**stage, "assembly": to_dict(ckpt.checkpoint_assembly(checkpoint, meta)),
                "lora": meta["lora"] if stage.get("lora") is not None else None}
    try:
        cfg = from_dict(StageConfig, recorded)
    except (ConfigError, ValueError, TypeError) as exc:
        raise ckpt.CheckpointError(f"{where}: its stage record does not parse ({exc}); the file is damaged or "
                                   "was not written by mmllm") from exc
    if not isinstance(working_dir, str):  # written before mmllm recorded the folder training ran in
        working_dir = str(assumed_working_dir(cfg, where, overrides))
    return stage_from_mapping(to_dict(absolute_from(cfg, Path(working_dir))), overrides, where)


def assumed_working_dir(cfg: StageConfig, where: Path, overrides: list[str] = ()) -> Path:
    """The folder the relative paths of a stage record are taken from when its checkpoint (``where``, its
    ``mmllm.json``) does not record the folder training ran in (an older mmllm's): the working directory, which
    training took them from where it ran here. Said in a warning where the stage has relative paths that
    ``overrides`` (``KEY=VALUE``) do not replace (it matters then: the warning's advice is to give them)."""
    given = [o.split("=", 1)[0].strip() for o in overrides if "=" in o]
    relative = [path for path in relative_paths(cfg)
                if not any(path.split(" ", 1)[0] == key or path.startswith((f"{key}.", f"{key}[")) for key in given)]
    if relative:
        log.warning("%s does not record the folder training ran in (a checkpoint written by an older mmllm): its "
                    "relative paths (%s) are taken from the working directory %s, as training took them if it ran "
                    "there. Run this from the folder training ran in, or give those paths as overrides (e.g. "
                    "output_dir=PATH)", where, "; ".join(relative), Path.cwd())
    return Path.cwd()


def relative_paths(cfg: StageConfig) -> list[str]:
    """``key value`` of each path of ``cfg`` that is relative (output_dir, init_from, cache.dir, data paths)."""
    named = [("output_dir", cfg.output_dir), ("init_from", cfg.init_from), ("cache.dir", cfg.cache.dir)]
    for section in ("data", "eval_data"):
        for i, ds in enumerate(getattr(cfg, section)):
            named += [(f"{section}[{i}].{key}", getattr(ds, key)) for key in DATA_PATHS]
    return [f"{key} {value}" for key, value in named if value is not None and not Path(value).is_absolute()]


def absolute_from(cfg: StageConfig, folder: Path) -> StageConfig:
    """``cfg`` with its relative paths (as loaded in ``folder``) joined to ``folder``."""
    def join(value: str | None) -> str | None:
        return None if value is None else str(folder / value)  # an absolute value stays as it is

    cfg.output_dir, cfg.init_from, cfg.cache.dir = join(cfg.output_dir), join(cfg.init_from), join(cfg.cache.dir)
    for ds in cfg.all_data():
        for key in DATA_PATHS:
            setattr(ds, key, join(getattr(ds, key)))
    return cfg


def with_header(data: dict[str, Any], kind: str, what: str, notes: list[str] | None = None) -> str:
    """``data`` (a resolved ``kind`` config) as YAML below comment lines saying ``what`` it is."""
    header = [f"mmllm {__version__}, {what}",
              "every key with its default filled in, the overrides applied" + (
                  ", the assembly: and lora: files written in, paths absolute" if kind == "stage" else ""),
              f"(as training resolves them). Given back as --config, this file is the same {kind} config.",
              *(notes or [])]
    if kind == "stage" and data["assembly_overrides"]:
        header.append("assembly_overrides are applied in assembly: already (again, they change nothing); they are "
                      "kept for init_from,")
        header.append("whose checkpoint is refused where it contradicts one, as it is for the original config.")
    return "".join(f"# {line}\n" for line in header) + dump_yaml(data)


class _PlainDumper(yaml.SafeDumper):
    """YAML without anchors and aliases: a value met twice (the tiny assembly's ViT config) is written twice."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: dict[str, Any]) -> str:
    """``data`` as block YAML in its own key order, that ``yaml.safe_load`` reads back equal."""
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True, width=120)
