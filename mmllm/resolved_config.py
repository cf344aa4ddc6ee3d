"""A config as a run will use it, written out whole: what ``mmllm config`` prints.

A stage YAML names an assembly YAML and a LoRA YAML, leaves most keys at their defaults and is changed by
``key.sub=value`` overrides; relative paths in it resolve from the working directory, then from its folder.
:func:`resolved_stage` gives all of it as one plain mapping: every key with its default filled in (each part's
options too, from its kind's ``Options``), the overrides applied, the assembly and LoRA written in as mappings
(``assembly:`` and ``lora:`` take a mapping as well as a path) and every path absolute, as training resolves
it. Written as YAML and given back as ``--config``, it loads to the same stage, assembly and LoRA settings; and
it is its own resolved form (a fixed point). Nothing is built and no weights are read: the parts' modules are
imported, to check their options as ``train`` does before it builds them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from mmllm import __version__
from mmllm.config import (
    AssemblyConfig,
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
            for key in ("path", "root", "embeddings"):
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
    from mmllm.training.init_from import check_init_from, checkpoint_missing, stage_trusts_remote_code

    assembly = load_assembly(cfg.assembly, cfg.assembly_overrides)
    if cfg.init_from and not checkpoint_missing(cfg):
        check_init_from(cfg)  # warns where the checkpoint's assembly differs, refuses an override it contradicts
        stage_trusts_remote_code(cfg)
        log.info("init_from %s exists: training continues the assembly its mmllm.json records (compared with "
                 "this one above); the assembly printed is the stage's own", cfg.init_from)
    else:
        check_part_options(assembly, config_source(cfg.assembly), cfg.assembly_overrides, "assembly.")
    return assembly


def config_yaml(config: str | Path, overrides: list[str] | None = None) -> str:
    """The resolved config of the stage or assembly YAML ``config`` with ``overrides``, as YAML text with a
    header saying what it is (:func:`resolved_stage`; an assembly YAML: :func:`resolved_assembly`)."""
    from mmllm.config import read_yaml
    from mmllm.registry import check_part_options

    overrides = list(overrides or [])
    if "stage" in read_yaml(config):
        cfg = load_stage(config, overrides)
        base = Path(config).expanduser().resolve().parent
        data, kind = resolved_stage(cfg, stage_assembly_checked(cfg), base), "stage"
    else:
        assembly = load_assembly(config, overrides, "")
        check_part_options(assembly, str(config), overrides)
        data, kind = resolved_assembly(assembly), "assembly"
    given = " ".join([f"--config {config}", *overrides])
    header = [f"mmllm {__version__}, the {kind} config of: {given}",
              "every key with its default filled in, the overrides applied" + (
                  ", the assembly: and lora: files written in, paths absolute" if kind == "stage" else ""),
              f"(as training resolves them). Given back as --config, this file is the same {kind} config."]
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
