"""A stage with ``init_from`` continues the checkpoint's model, rebuilt from the assembly the checkpoint
records; the stage's own assembly (its ``assembly:`` file and the ``assembly.*`` overrides) builds
nothing. So before any weight loads, :func:`check_init_from` compares the two:

* an ``assembly.*`` override that disagrees with the checkpoint is a :class:`ConfigError` (it cannot
  apply: the checkpoint's learned weights have the checkpoint's shapes);
* the file disagreeing with the checkpoint, where no override asked for it, is a warning naming the
  keys: a previous stage trained with overrides that this one does not repeat (or a stage file that
  names another assembly) continues the checkpoint's assembly, as before.

Both sides are compared as plain data with every default filled in -- the assembly's own and those of
each component kind's options -- so an option written out at its default value, or a path written
relative in one and absolute in the other, is no difference.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmllm.config import (
    AssemblyConfig,
    ConfigError,
    StageConfig,
    config_source,
    load_assembly,
    parse_assembly,
    to_dict,
)
from mmllm.llm import MACHINE_OPTIONS

log = logging.getLogger(__name__)

SHOW = 8  # differences listed in a message


class _Absent:
    def __repr__(self) -> str:
        return "(not set)"


ABSENT: Any = _Absent()  # a key one side does not have


@dataclass(frozen=True)
class Difference:
    key: str  # dotted path in the assembly, e.g. input_projections.audio.kind
    checkpoint: Any
    stage: Any


def checkpoint_missing(cfg: StageConfig) -> bool:
    """``init_from`` is set but nothing is there yet (the previous stage has not been trained)."""
    return bool(cfg.init_from) and not Path(cfg.init_from).exists()


def missing_checkpoint_error(cfg: StageConfig) -> ConfigError:
    from mmllm.training.checkpoint import relative_path_note

    return ConfigError(
        f"init_from {cfg.init_from}: checkpoint directory not found{relative_path_note(cfg.init_from)}. "
        f"{_checkpoints_beside(Path(cfg.init_from))}"
        f"The stage {cfg.stage} continues the previous stage's checkpoint: train that stage first, point "
        f"init_from at its step-N folder, or set init_from=null to start from the stage's assembly ({config_source(cfg.assembly)})"
    )


def _checkpoints_beside(missing: Path) -> str:
    """What the run folder of a missing ``step-N`` holds, as a sentence naming the checkpoint to use (its
    ``final.json``'s, else its newest): a previous stage trained for fewer steps than the next stage's
    ``init_from`` names (a ``max_steps=`` override) leaves exactly this. Empty when there is no such run."""
    from mmllm.training.checkpoint import STEP_DIR, step_dirs

    run = missing.parent
    if not STEP_DIR.match(missing.name) or not run.is_dir() or not (steps := step_dirs(run)):
        return ""
    try:
        final = json.loads((run / "final.json").read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        final = None
    held = ", ".join(p.name for p in steps)
    if final is not None and (run / final).is_dir():
        return f"{run} holds {held}; its run finished on {final} (final.json): init_from={run / final}. "
    return f"{run} holds {held} (no final.json: that run has not finished); the newest is init_from={steps[-1]}. "


def normalized_assembly(assembly: AssemblyConfig | dict[str, Any]) -> dict[str, Any]:
    """``assembly`` as JSON-like data with the defaults of every component kind's options filled in
    (a component whose options do not parse is kept as written)."""
    data = to_dict(assembly) if isinstance(assembly, AssemblyConfig) else json.loads(json.dumps(assembly, default=str))
    if isinstance(data.get("llm"), dict):
        data["llm"] = _component("llm", data["llm"])
    for section, table in (("encoders", "encoder"), ("decoders", "decoder")):
        if isinstance(data.get(section), dict):
            data[section] = {m: _component(table, spec) for m, spec in data[section].items()}
    return json.loads(json.dumps(data, default=str))


def _component(table: str, spec: Any) -> Any:
    from mmllm import registry
    from mmllm.config import ComponentSpec

    if not isinstance(spec, dict) or "kind" not in spec:
        return spec
    try:
        parsed = ComponentSpec.parse(spec, table)
        options = to_dict(registry.parse_options(table, parsed, table))
    except (ConfigError, ImportError):
        return spec
    # a nested component of the same table (frames-video's per-frame image encoder)
    options = {k: _component(table, v) if isinstance(v, dict) and v.get("kind") in registry.TABLES[table] else v
               for k, v in options.items()}
    return {"kind": parsed.kind, **options}


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value
    return out


def _same_location(a: str, b: str) -> bool:
    """Two spellings (relative, absolute, ``package:``) of one existing file or folder."""
    from mmllm.locations import resolve_location

    prefix = "local-dir:"
    if a.startswith(prefix) != b.startswith(prefix):
        return False
    a, b = a.removeprefix(prefix), b.removeprefix(prefix)
    try:
        pa, pb = resolve_location(a), resolve_location(b)
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except (ConfigError, OSError, ValueError):
        return False


def same_value(a: Any, b: Any) -> bool:
    """Equal config values; two path strings are equal when they lead to the same place."""
    if a == b:
        return True
    return isinstance(a, str) and isinstance(b, str) and _same_location(a, b)


# where a machine keeps things, not what the model is: a checkpoint's is not used
MACHINE_KEYS = tuple(f"llm.{name}" for name in MACHINE_OPTIONS)


def assembly_differences(checkpoint: dict[str, Any], stage: dict[str, Any]) -> list[Difference]:
    """Leaf-by-leaf differences of two :func:`normalized_assembly` results."""
    a, b = _flatten(checkpoint, "", {}), _flatten(stage, "", {})
    keys = list(a) + [k for k in b if k not in a]
    return [Difference(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in keys
            if k not in MACHINE_KEYS and not same_value(a.get(k, ABSENT), b.get(k, ABSENT))]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _override_for(key: str, overrides: list[str]) -> str | None:
    """The last override that sets ``key`` or a mapping above or below it."""
    found = None
    for item in overrides:
        k = override_key(item)
        if key == k or key.startswith(k + ".") or k.startswith(key + "."):
            found = item
    return found


def _show(value: Any) -> str:
    text = repr(value) if value is ABSENT else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def list_differences(diffs: list[Difference], label: Callable[[Difference], str]) -> str:
    """The first differences as 'key: checkpoint's (checkpoint) vs other (label)' for an error message."""
    lines = [f"{d.key}: {_show(d.checkpoint)} (checkpoint) vs {_show(d.stage)} ({label(d)})" for d in diffs[:SHOW]]
    if len(diffs) > SHOW:
        lines.append(f"... and {len(diffs) - SHOW} more")
    return "; ".join(lines)


def warn_if_middle_step(cfg: StageConfig) -> None:
    """``init_from`` naming a checkpoint its run went past (``final.json`` names another) or that belongs to
    a run that has not finished: allowed, but more often a typo or a stage started too early."""
    from mmllm.training.checkpoint import STEP_DIR, step_dirs

    directory = Path(cfg.init_from) if cfg.init_from else None
    if directory is None or not STEP_DIR.match(directory.name) or not directory.is_dir():
        return
    run, final = directory.parent, directory.parent / "final.json"
    try:
        name = json.loads(final.read_text())["checkpoint"] if final.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return
    if name is not None and name != directory.name:
        log.warning("init_from %s: its run went on and finished on %s (final.json); this stage starts from the "
                    "earlier step, as asked. To continue the finished stage, set init_from=%s", directory, name,
                    run / name)
    elif name is None:
        log.warning("init_from %s: its run has not finished (no final.json beside it; newest checkpoint %s): if "
                    "that stage is still training or was interrupted, its later steps are not in this one",
                    directory, step_dirs(run)[-1].name)


def warn_if_adapter_frozen(cfg: StageConfig) -> None:
    """``init_from`` carrying a LoRA adapter (an instruct checkpoint) for a stage that does not train LoRA
    (``decode-align`` or ``encode-align`` after ``instruct``): allowed -- re-aligning a projection to the
    finished model is a use -- but the adapter stays attached and frozen, so what the stage learns is fitted
    to the adapted core, not to the core alone; more often the previous stage's checkpoint was meant."""
    from mmllm.training.checkpoint import read_meta

    if not cfg.init_from or cfg.resolved_trainable()["lora"]:
        return
    meta = read_meta(Path(cfg.init_from))
    if not meta.get("lora"):
        return
    trained_by = (meta.get("stage") or {}).get("stage", "an earlier stage")
    log.warning("init_from %s carries a LoRA adapter (trained by %s), which stage %s does not train: it stays on, "
                "frozen, so the stage learns on the adapted core's hidden states and its checkpoints carry the "
                "adapter. That is right for re-aligning the finished model; to continue the stage before %s, point "
                "init_from at that stage's checkpoint (or set init_from=null)", cfg.init_from, trained_by, cfg.stage,
                trained_by)


def check_init_from(cfg: StageConfig) -> None:
    """Compare the stage's resolved assembly with the one ``cfg.init_from`` records; raise on an
    override the checkpoint contradicts, warn on a file that differs. Reads ``mmllm.json`` only."""
    from mmllm.training.checkpoint import CONFIG_FILE, check_recorded_kinds, read_meta

    if not cfg.init_from:
        return
    if checkpoint_missing(cfg):
        raise missing_checkpoint_error(cfg)
    directory = Path(cfg.init_from)
    meta = read_meta(directory)
    check_recorded_kinds(directory, meta)
    saved = meta["assembly"]
    try:
        checkpoint_side = normalized_assembly(parse_assembly(saved, where=f"{directory}/{CONFIG_FILE}"))
    except ConfigError:  # written by an older mmllm: compare as recorded
        checkpoint_side = normalized_assembly(saved)
    stage_side = normalized_assembly(load_assembly(cfg.assembly, cfg.assembly_overrides))
    diffs = assembly_differences(checkpoint_side, stage_side)
    if not diffs:
        return
    by_override = {d.key: item for d in diffs if (item := _override_for(d.key, cfg.assembly_overrides))}
    if by_override:
        asked = [d for d in diffs if d.key in by_override]
        named = sorted({f"assembly.{override_key(by_override[d.key])}" for d in asked})
        raise ConfigError(
            f"init_from {directory}: the stage continues the checkpoint's model, built from the assembly the "
            f"checkpoint records, so the override(s) {', '.join(named)} cannot apply: "
            f"{list_differences(asked, lambda d: 'assembly.' + by_override[d.key])}. Drop the override(s) to continue "
            f"the checkpoint as it is, or set init_from=null to train the overridden assembly from the start"
        )
    log.warning(
        "init_from %s: the stage's assembly %s differs from the one the checkpoint was trained with at %d key(s): "
        "%s. Training continues the checkpoint's assembly; the file is not used. To train the file's assembly "
        "set init_from=null; to continue the checkpoint without this warning, make the file match it (or repeat "
        "the previous stage's assembly.* overrides)", directory, config_source(cfg.assembly), len(diffs),
        list_differences(diffs, lambda d: "stage's assembly"))


def stage_trusts_remote_code(cfg: StageConfig) -> bool:
    """Whether the stage may load ``cfg.init_from``'s parts that set ``trust_remote_code``: only when the stage's
    own assembly (the user's file and overrides) turns it on for each of them; the checkpoint's ``mmllm.json``
    alone never decides to run code. False when the checkpoint asks for none."""
    from mmllm.training.checkpoint import CONFIG_FILE, read_meta, remote_code_parts

    asked = remote_code_parts(read_meta(Path(cfg.init_from))["assembly"])
    if not asked:
        return False
    own = set(remote_code_parts(to_dict(load_assembly(cfg.assembly, cfg.assembly_overrides))))
    if missing := [p for p in asked if p not in own]:
        raise ConfigError(
            f"init_from {cfg.init_from}: its {CONFIG_FILE} sets trust_remote_code for {', '.join(missing)}, which "
            f"would run Python code from those models, but the stage's assembly {config_source(cfg.assembly)} does not: set "
            f"`trust_remote_code: true` for them there (or assembly.{missing[0]}.trust_remote_code=true) if you "
            "trust that code")
    return True


def continues_checkpoint(cfg: StageConfig) -> bool:
    """Whether the stage continues ``cfg.init_from``'s checkpoint (named, and there), which then trains the assembly
    it records; if so, that is checked as ``train`` checks it before anything is built: the stage's assembly against
    the recorded one (:func:`check_init_from`), and the code the checkpoint asks to run (:func:`stage_trusts_remote_code`)."""
    if not cfg.init_from or checkpoint_missing(cfg):
        return False
    check_init_from(cfg)  # warns where the checkpoint's assembly differs, refuses an override it contradicts
    stage_trusts_remote_code(cfg)
    return True
