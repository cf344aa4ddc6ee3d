"""Checkpoints: one layout whatever the stage, written atomically, verified on load.

::

    CKPT/
      mmllm.json                 format version, resolved assembly (+ LoRA, stage) config, token additions
                                 (and, from training, the folder it ran in: working_dir)
      learned.safetensors        input/output projections and signal-token rows (all of them, always)
      adapter/                   the LoRA adapter in PEFT's own format (when LoRA is on)
      training_state/            optimizer, scheduler, RNG and data position (for --resume)
      manifest.json              sha256 of every file above

A checkpoint is written into a temporary sibling folder, fsynced, and renamed into place, so a
kill during the write leaves the previous checkpoint intact. On load, every file is checked
against the manifest; a truncated or altered file is refused with its name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmllm.atomic import atomic_write_text, fsync_dir
from mmllm.config import ConfigError, from_dict, parse_assembly, to_dict
from mmllm.data.fingerprint import file_hash
from mmllm.llm import without_machine_options

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "mmllm.json"
LEARNED_FILE = "learned.safetensors"
ADAPTER_DIR = "adapter"
STATE_DIR = "training_state"
MANIFEST = "manifest.json"


class CheckpointError(ConfigError):
    pass


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(root)


STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dirs(output_dir: Path) -> list[Path]:
    """``step-N`` folders under ``output_dir``, oldest first (anything else there is ignored)."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("step-*") if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


PARTIAL_DIR = re.compile(r"^\.(step-\d+)\.(tmp|old)-[\d-]+$")  # atomic_dir's working folders


def _partial_writes(output_dir: Path) -> dict[str, list[Path]]:
    """atomic_dir's working folders under ``output_dir`` by the checkpoint they were for, the one to restore
    first: a replacement (``tmp``: the newer write) before a replaced original (``old``), newer before older
    (their names end in the time they were made)."""
    found: dict[str, list[tuple[tuple[bool, int], Path]]] = {}
    for p in Path(output_dir).glob(".step-*"):
        if (m := PARTIAL_DIR.match(p.name)) and p.is_dir():
            order = (m.group(2) == "tmp", int(p.name.rsplit("-", 1)[1]))
            found.setdefault(m.group(1), []).append((order, p))
    return {name: [p for _, p in sorted(entries, reverse=True)] for name, entries in found.items()}


def _complete(folder: Path) -> bool:
    try:
        verify_manifest(folder)
        return True
    except CheckpointError:
        return False


def recoverable_partial_writes(output_dir: Path) -> list[Path]:
    """Complete checkpoints that only exist as atomic_dir's working folders: a kill between its two renames
    (while a step was saved again over itself) leaves ``step-N`` renamed to ``.step-N.old-*`` and its
    finished replacement in ``.step-N.tmp-*``; a kill after the manifest but before the rename leaves only the
    latter. So does a ``step-N`` that is there but incomplete (a corrupt checkpoint a resumed run went back
    behind and was saving again) beside a complete replacement. :func:`recover_partial_writes` puts them back."""
    out = []
    for name, partials in _partial_writes(output_dir).items():
        final = Path(output_dir) / name
        if not final.exists() or not _complete(final):
            if (complete := next((p for p in partials if _complete(p)), None)) is not None:
                out.append(complete)  # the first that verifies: the others are not hashed
    return out


def recover_partial_writes(output_dir: Path) -> tuple[list[Path], int]:
    """Tidy what a kill during :func:`atomic_dir` left under ``output_dir``: a ``step-N`` that is missing
    (or incomplete) gets back its newest complete working folder (the finished replacement, else the replaced original);
    every other working folder (a half-written checkpoint, an original already replaced) is deleted.
    Returns the restored checkpoints and the number of folders deleted. Only for a run that owns
    ``output_dir`` (``--resume``), on one process, before it reads or saves a checkpoint."""
    restored = []
    for partial in recoverable_partial_writes(output_dir):
        final = Path(output_dir) / PARTIAL_DIR.match(partial.name).group(1)
        if final.exists():  # incomplete (resume skips it): aside, deleted below with the other working folders
            final.rename(final.with_name(f".{final.name}.old-{time.time_ns()}"))
        partial.rename(final)
        restored.append(final)
    if restored:
        fsync_dir(Path(output_dir))
    leftovers = [p for partials in _partial_writes(output_dir).values() for p in partials]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return restored, len(leftovers)


def write_manifest(root: Path) -> None:
    files = {p.relative_to(root).as_posix(): file_hash(p) for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (root / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=1))


# Files that hubs, git and file browsers add beside a checkpoint's own, and that mmllm never reads: not in the
# manifest, yet no reason to refuse a checkpoint (a model repository's README.md and .gitattributes, the
# .cache/ that `hf download --local-dir` writes, a Mac's .DS_Store and ._ twins).
EXTRA_FILES = ("README.md", "README", ".gitattributes", ".gitignore", ".DS_Store", "Thumbs.db")
EXTRA_FOLDERS = (".cache", ".git")


def _extra(rel: str) -> bool:
    """A file mmllm never reads that a hub, git or a file browser adds to a checkpoint (:data:`EXTRA_FILES`)."""
    parts = rel.split("/")
    name = parts[-1]  # "._x": the AppleDouble twin macOS writes beside each file copied to SMB or exFAT storage
    return parts[0] in EXTRA_FOLDERS or name in EXTRA_FILES or name.startswith(("LICENSE", "._"))


def _held_files(root: Path) -> set[str]:
    """Every file under ``root`` by its path relative to it (``/``-separated). A linked file counts as a file
    (the hub's cache links each file of a snapshot to its blob; the manifest's hash checks what it holds); a
    linked folder is refused: mmllm writes none, and its files would not be where the manifest says."""
    held = set()
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = Path(folder) / name
            if path.is_symlink():
                raise CheckpointError(f"{path}: a linked folder (to {os.readlink(path)}) inside a checkpoint; mmllm "
                                      "writes none. Replace it by the folder itself, or use a checkpoint as `mmllm` "
                                      "wrote it")
        held.update(Path(folder, name).relative_to(root).as_posix() for name in files)
    return held


def _inside(rel: str) -> bool:
    """A manifest entry (``/``-separated) that names a file inside the checkpoint: relative, with no ``..``."""
    parts = rel.split("/")
    return bool(rel) and ":" not in parts[0] and not any(p in ("", ".", "..") for p in parts)


def relative_path_note(path: str | Path) -> str:
    """What a "not found" refusal of ``path`` adds where it is relative: the folder it resolved from."""
    return "" if Path(path).is_absolute() else f" (a relative path resolves from {Path.cwd()})"


def require_checkpoint_folder(directory: str | Path, given_as: str = "checkpoint", hint: str = "") -> None:
    """A checkpoint path that is no folder (a typo, a file) refused as such, in the same words by the library and
    every command, before anything loads: "no manifest.json; this is not a complete mmllm checkpoint" told of a
    folder that does not exist, as if it were a broken checkpoint. ``given_as``: how the user gave it (a command's
    ``--checkpoint``); ``hint``: what else to say of it (the shipped default's, where to get it)."""
    directory = Path(directory)
    if directory.is_dir():
        return
    if directory.exists():
        what = "a file, not a checkpoint directory"
    else:
        what = f"not found{relative_path_note(directory)}"
    raise CheckpointError(f"{given_as} {directory}: {what}{hint}; give a checkpoint's folder (a training run's "
                          "step-N)")


def verify_manifest(root: Path) -> None:
    """Every file of the checkpoint ``root`` against its manifest, before any of them is used: each listed file
    must be there with its hash, and each file there must be listed (an unlisted one, e.g. weights or code
    added to a downloaded checkpoint, would be read unchecked) unless it is one mmllm never reads that hubs add
    (:data:`EXTRA_FILES`); entries leading outside ``root`` and linked folders are refused."""
    root = Path(root)
    require_checkpoint_folder(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{root}: no {MANIFEST}; this is not a complete mmllm checkpoint."
                              + _run_folder_hint(Path(root)))
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # ValueError: not JSON, an int of >4300 digits
        raise CheckpointError(f"{manifest}: unreadable manifest ({exc})") from exc
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        raise CheckpointError(f"{manifest}: unreadable manifest (\"files\" is no mapping of file to sha256)")
    files = {rel.replace("\\", "/"): digest for rel, digest in files.items()}  # one written on Windows
    for required in (CONFIG_FILE, LEARNED_FILE):
        if required not in files:
            raise CheckpointError(f"{manifest}: does not list {required}; this is not a complete mmllm checkpoint")
    outside = [rel for rel in files if not _inside(rel)]
    if outside:
        raise CheckpointError(f"{manifest}: lists {outside[:3]}, outside the checkpoint's folder; refusing it (an "
                              "mmllm manifest names files inside the checkpoint only)")
    held = _held_files(root)
    for rel, digest in files.items():
        path = root / rel
        if rel not in held or not path.is_file():  # a link to a blob that is gone: missing too
            raise CheckpointError(f"{path}: listed in the manifest but missing; the checkpoint is incomplete")
        if file_hash(path) != digest:
            raise CheckpointError(f"{path}: contents do not match the manifest (truncated or modified); refusing it")
    unlisted = sorted(held - set(files) - {MANIFEST})
    extras = [rel for rel in unlisted if _extra(rel)]
    if extras:
        log.info("%s: not in its %s, and never read by mmllm: %s", root, MANIFEST, ", ".join(extras[:5]))
    unlisted = [rel for rel in unlisted if not _extra(rel)]
    if unlisted:
        raise CheckpointError(f"{root}: holds {len(unlisted)} file(s) its {MANIFEST} does not list "
                              f"({', '.join(unlisted[:5])}), which loading could read unchecked; refusing it. "
                              "Remove them (a checkpoint holds what mmllm wrote into it, nothing else)")


def atomic_dir(final: Path, fill) -> Path:
    """Call ``fill(tmp_dir)``, then fsync and rename ``tmp_dir`` to ``final`` (replacing it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}")
    try:
        tmp.mkdir()
        fill(tmp)
        write_manifest(tmp)
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{time.time_ns()}")
            final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:  # put the original back: a failed save must leave the checkpoint it replaces
            if old is not None and not final.exists():
                old.rename(final)
            raise
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_failure(final: Path, exc: BaseException) -> OSError | None:
    """A checkpoint write into ``final`` that failed for want of room or rights (``exc`` from
    :func:`atomic_dir`, which left nothing of it) as one error saying what is intact and what to do; None
    for anything else (a bug: keep its traceback)."""
    from safetensors import SafetensorError

    wrote = isinstance(exc, (OSError, SafetensorError)) or (isinstance(exc, RuntimeError) and "writ" in str(exc))
    if not wrote:
        return None
    final = Path(final)
    kept = [d.name for d in step_dirs(final.parent) if d != final]
    intact = f"the checkpoints already there ({', '.join(kept)}) are untouched" if kept else "no earlier checkpoint is there"
    return OSError(f"could not write the checkpoint {final}: {exc}. Nothing of it was kept and {intact}. Free space "
                   "(a save needs room for one checkpoint more than keep_last keeps) or fix the folder's permissions, "
                   "then continue with --resume")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _token_additions(model) -> dict[str, Any]:
    return {"first_new_id": model.llm.first_new_id, "signal_ids": model.llm.signal_ids,
            "placeholder_ids": model.llm.placeholder_ids}


def _write_model_files(
    model, root: Path, extra: dict[str, Any], gathered: tuple[dict, dict | None] | None = None
) -> None:
    """``gathered``: (learned, LoRA) state dicts when the caller gathered them (FSDP: on every process)."""
    meta = {"format_version": FORMAT_VERSION, **model.describe(), "tokens": _token_additions(model), **extra}
    (root / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))
    learned, lora = gathered if gathered is not None else (model.learned_state_dict(), model.lora_state_dict())
    save_file(learned, str(root / LEARNED_FILE), metadata={"format": "pt"})
    if model._peft_model is not None:
        model._peft_model.save_pretrained(str(root / ADAPTER_DIR), state_dict=lora)


def save_model_checkpoint(model, directory: Path, extra: dict[str, Any]) -> Path:
    """``model``'s learned weights, config and ``extra`` as a checkpoint in ``directory``, written atomically;
    weights holding NaN or inf are refused before anything is written (:func:`refuse_to_save_nonfinite`)."""
    gathered = model.learned_state_dict(), model.lora_state_dict()
    refuse_to_save_nonfinite(*gathered, Path(directory))
    return atomic_dir(directory, lambda tmp: _write_model_files(model, tmp, extra, gathered))


def read_meta(directory: Path) -> dict[str, Any]:
    require_checkpoint_folder(directory)
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; is this an mmllm checkpoint directory?"
                              + _run_folder_hint(Path(directory)))
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, an integer of over 4300 digits, too deep
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc}); is this an mmllm checkpoint "
                              "directory?") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(meta).__name__}, not an mmllm checkpoint's object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    _check_meta_shape(path, meta)
    return meta


def _check_meta_shape(path: Path, meta: dict[str, Any]) -> None:
    """The parts of ``mmllm.json`` read before its assembly is parsed hold the types mmllm writes (a checkpoint
    from someone else stopped with a bare AttributeError or TypeError on a list or number in their place)."""
    assembly = meta.get("assembly", {})
    mappings = {"assembly": assembly, "tokens": meta.get("tokens", {}),
                "assembly.llm": assembly.get("llm", {}) if isinstance(assembly, dict) else {}}
    for key, value in mappings.items():
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: {key!r} is {type(value).__name__} {str(value)[:80]!r}, not the mapping "
                                  "mmllm writes; the file is damaged or was not written by mmllm")


def _run_folder_hint(directory: Path) -> str:
    """For a training run's folder given where one of its checkpoints is wanted: which one to give."""
    final = directory / "final.json"
    try:
        name = json.loads(final.read_text())["checkpoint"] if final.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        name = None
    steps = step_dirs(directory)
    if name is None and not steps:
        return ""
    chosen = directory / name if name else steps[-1]
    return (f" It is a training run's folder; give one of its checkpoints, e.g. {chosen} "
            f"({'the final one, final.json' if name else 'the newest'})")


def merged_llm_folder(meta: dict[str, Any]) -> str | None:
    """The folder, inside the checkpoint, that holds a merged export's LLM (``llm``); None for any other
    checkpoint, whose ``./``-relative paths lead from the working directory as the assembly's always do."""
    llm = meta["assembly"]["llm"]
    name = str(llm.get("name_or_path", ""))
    if "merged_from" in meta and llm.get("kind") == "hf-causal-lm" and name.startswith("./"):
        if not _inside(name[2:]):
            raise CheckpointError(f"{CONFIG_FILE}: llm.name_or_path {name!r} leads outside the checkpoint, where a "
                                  "merged export keeps its LLM (./llm); refusing it")
        return name[2:]
    return None


def check_recorded_kinds(directory: Path, meta: dict[str, Any]) -> None:
    """Before a checkpoint's assembly is parsed (which imports the kinds it names): none of its own classes may
    come from a file inside the checkpoint."""
    from mmllm.registry import check_kind_not_inside, custom_kinds

    for kind in custom_kinds(meta.get("assembly")):
        check_kind_not_inside(kind, Path(directory), f"{Path(directory) / CONFIG_FILE}")


def checkpoint_assembly(directory: Path, meta: dict[str, Any] | None = None):
    """The assembly a checkpoint records (an exported merged LLM's ``./llm`` made a path; ``llm.gguf_cache``
    left to the loading machine's settings)."""
    directory = Path(directory)
    meta = read_meta(directory) if meta is None else meta
    check_recorded_kinds(directory, meta)
    assembly = dict(meta["assembly"])
    if "llm" in assembly:  # this machine's GGUF cache, not the recorder's
        assembly["llm"] = without_machine_options(assembly["llm"])
    folder = merged_llm_folder(meta)
    if folder is not None:
        assembly["llm"] = {**assembly["llm"], "name_or_path": str(directory / folder)}
    return parse_assembly(assembly, where=f"{directory}/{CONFIG_FILE}")


def remote_code_parts(assembly: Any, where: str = "") -> list[str]:
    """The parts of a recorded assembly (as in ``mmllm.json``) that set ``trust_remote_code``: loading them runs
    Python code from their model folder or hub repository."""
    found = []
    if isinstance(assembly, dict):
        for key, value in assembly.items():
            if key == "trust_remote_code":
                found += [where or "assembly"] if value else []
            else:
                found += remote_code_parts(value, f"{where}.{key}" if where else str(key))
    return found


def check_remote_code(directory: Path, meta: dict[str, Any], trust_remote_code: bool) -> None:
    """A checkpoint whose assembly turns ``trust_remote_code`` on loads only when the caller turns it on too: the
    checkpoint's own ``mmllm.json`` (someone else's, for a downloaded one) must not decide to run code."""
    parts = remote_code_parts(meta.get("assembly"))
    if parts and not trust_remote_code:
        raise CheckpointError(
            f"{Path(directory) / CONFIG_FILE}: its assembly sets trust_remote_code for {', '.join(parts)}, so loading "
            "it would run Python code from those models' folders or hub repositories; refusing it. If you trust "
            "where the checkpoint and those models came from, pass --trust-remote-code (Python: "
            "AnyToAnyModel.from_pretrained(dir, trust_remote_code=True))")
    if parts:
        log.warning("%s: trust_remote_code is on for %s: their own Python code runs", directory, ", ".join(parts))


def load_model_checkpoint(directory: Path, trainable_lora: bool = False, verify: bool = True,
                          decoder_parts: Any = "all", encoder_weights: Any = None, trust_remote_code: bool = False):
    from mmllm.config import LoraConfig
    from mmllm.model import AnyToAnyModel

    directory = Path(directory)
    if verify:  # verify_manifest and read_meta each say first when the folder is not there
        verify_manifest(directory)
    meta = read_meta(directory)
    check_remote_code(directory, meta, trust_remote_code)
    model = AnyToAnyModel.assemble(checkpoint_assembly(directory, meta), decoder_parts, encoder_weights)
    tokens = _token_additions(model)
    saved = {k: meta["tokens"][k] for k in tokens}
    if json.loads(json.dumps(tokens)) != saved:
        raise CheckpointError(f"{directory}: token additions differ from the rebuilt tokenizer: {saved} vs {tokens}")
    if (directory / ADAPTER_DIR).is_dir():
        attach_adapter(model, directory / ADAPTER_DIR, from_dict(LoraConfig, meta["lora"]), trainable_lora)
    load_learned_file(model, directory)
    # In eval mode, as transformers' from_pretrained: a freshly built module trains, and the adapter's
    # dropout (and the projections') would make `model(batch)` or `hidden_states` random. Training calls train().
    return model.eval()


def attach_adapter(model, adapter_dir: Path, lora_cfg, trainable: bool = False) -> None:
    model.add_lora(lora_cfg, allow_unmatched=True)  # what the checkpoint recorded; its adapter says the rest
    load_adapter_weights(model, adapter_dir)
    for p in model.lora_parameters().values():
        p.requires_grad_(trainable)


def load_learned_file(model, directory: Path) -> None:
    """``directory``'s learned rows and projections into ``model`` (which refuses NaN or inf values itself:
    :meth:`~mmllm.model.AnyToAnyModel.load_learned_state_dict`)."""
    path = Path(directory) / LEARNED_FILE
    model.load_learned_state_dict(_read_safetensors(path), str(path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; one whose header is not safetensors' own (offsets past its end, a header
    claiming exabytes) is a :class:`CheckpointError` naming it, not a bare SafetensorError traceback."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file of learned weights (projections and signal rows, or LoRA), read as
    :func:`_read_safetensors` reads it and refused when it holds NaN or inf values (:func:`refuse_nonfinite`)."""
    state = _read_safetensors(path)
    refuse_nonfinite(state, str(path))
    return state


def nonfinite_counts(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """The floating-point tensors of ``state`` holding NaN or inf values: (how many, of how many values)."""
    counts = {}
    for name, t in state.items():
        # a finite sum means finite values (one NaN or inf makes it NaN or inf), and a sum is quicker than an
        # isfinite pass (on the shipped default's 11 M fp16 values, 7 ms against 50); a sum past float32's range
        # of finite values is told apart by the exact count
        if t.is_floating_point() and not bool(torch.isfinite(t.float().sum())):
            if bad := int(t.numel() - torch.isfinite(t).sum()):
                counts[name] = (bad, t.numel())
    return counts


def _describe_nonfinite(counts: dict[str, tuple[int, int]]) -> str:
    shown = ", ".join(f"{name} ({bad} of {total} values)" for name, (bad, total) in list(counts.items())[:5])
    return f"{len(counts)} tensor(s) hold NaN or inf: {shown}{', ...' if len(counts) > 5 else ''}"


def refuse_nonfinite(state: dict[str, torch.Tensor], source: str) -> None:
    """Learned weights that hold NaN or inf are refused at load, naming ``source``, the tensors and how many values:
    loaded, they would make every output garbage without a word."""
    if counts := nonfinite_counts(state):
        raise CheckpointError(
            f"{source}: {_describe_nonfinite(counts)}; a model loaded from it would give garbage. The training run "
            "that wrote it diverged: use an earlier checkpoint of that run (saved before its loss went NaN), or "
            "train again with a lower optim.lr")


def refuse_to_save_nonfinite(learned: dict[str, torch.Tensor], lora: dict[str, torch.Tensor] | None,
                             target: Path) -> None:
    """Before a checkpoint is written into ``target``: learned weights (``learned``, ``lora``) holding NaN or inf
    are refused, so that no checkpoint of a diverged run is written (loading would refuse it anyway)."""
    counts = nonfinite_counts(learned) | {f"lora: {k}": v for k, v in nonfinite_counts(lora or {}).items()}
    if counts:
        kept = [d.name for d in step_dirs(Path(target).parent) if d != Path(target)]
        earlier = (f"the checkpoints already there ({', '.join(kept)}) are untouched" if kept
                   else "no earlier checkpoint is there")
        raise CheckpointError(
            f"refusing to write the checkpoint {target}: the learned weights have diverged, "
            f"{_describe_nonfinite(counts)}; nothing of it was written and {earlier}. Lower optim.lr and train again, "
            "or go on with it from an earlier checkpoint (--resume)")


def load_adapter_weights(model, adapter_dir: Path) -> None:
    """Load a PEFT adapter's weights into the attached LoRA, strictly."""
    from peft import set_peft_model_state_dict

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing LoRA weights")
    state = read_weights(weights)
    result = set_peft_model_state_dict(model._peft_model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{weights}: missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}")


def load_learned_into(model, directory: Path) -> None:
    """Verified learned rows, projections and LoRA of ``directory`` into an already built ``model``."""
    directory = Path(directory)
    verify_manifest(directory)
    load_learned_file(model, directory)
    adapter = directory / ADAPTER_DIR
    if adapter.is_dir() != (model._peft_model is not None):
        raise CheckpointError(f"{directory}: LoRA adapter present={adapter.is_dir()} but the model's LoRA is "
                              f"{'on' if model._peft_model is not None else 'off'}")
    if adapter.is_dir():
        load_adapter_weights(model, adapter)


# --------------------------------------------------------------------------------------------
# Training state (for --resume)
# --------------------------------------------------------------------------------------------


def optimizer_state(model, optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name and whole -- FSDP shards or ZeRO partitions
    gathered -- on the main process (the others may get an empty dict). A collective under FSDP and
    DeepSpeed: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from mmllm.training import zero

    if zero.is_engine(model):  # partitioned by DeepSpeed ZeRO
        import torch.distributed as dist

        return zero.optimizer_state(model, is_main=dist.get_rank() == 0)
    opt = bare_optimizer(optimizer)
    if not opt.state:  # no step taken yet (or a stateless optimizer): torch would take a fake one first
        return opt.state_dict()
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore_optimizer_state(model, optimizer, root: Path) -> None:
    """Load the optimizer state saved under ``root`` into ``optimizer`` as it is now: after
    ``accelerator.prepare``, so that under FSDP and ZeRO each process keeps its shards or partitions.
    Every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from mmllm.training import zero

    saved = torch.load(Path(root) / STATE_DIR / "optimizer.pt", weights_only=True)
    opt = bare_optimizer(optimizer)
    positional = any(isinstance(k, int) for k in saved["state"])
    deepspeed = zero.is_engine(model)
    if positional and (deepspeed or any(hasattr(p, "to_local") for g in opt.param_groups for p in g["params"])):
        raise CheckpointError(f"{root}: its optimizer state was written by an older mmllm, by position and "
                              f"unsharded; resume it on one process or under DDP, not {'DeepSpeed' if deepspeed else 'FSDP'}")
    if deepspeed:
        zero.restore_optimizer_state(model, saved, str(root))
        return
    if positional or not saved["state"]:
        # Positional (written before names were used) or empty (no step yet, or SGD without
        # momentum): the parameters are in the same order, and no tensor needs sharding.
        opt.load_state_dict(saved)
        return
    set_optimizer_state_dict(model, opt, saved, options=StateDictOptions(full_state_dict=True))


def bare_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under Accelerate's wrapper (and DeepSpeed's ZeRO optimizer, which steps it)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def rng_state() -> dict[str, Any]:
    """This process's random number generators (LoRA dropout draws from torch's), in types ``torch.load``
    reads with ``weights_only=True`` (numpy's key array as a tensor): restoring them unpickles no code."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


# what a plain numpy array pickles as: allowed so that rng.pt files holding numpy's state as an array still load
_NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.empty(0).__reduce__()[0]]


def save_training_state(root: Path, optim_state: dict[str, Any], scheduler, step: int, extra: dict[str, Any],
                        rng_states: list[dict[str, Any]] | None = None) -> None:
    """``optim_state`` from :func:`optimizer_state`; ``rng_states``: every process's :func:`rng_state`, by
    rank (default: this process's alone). The main process's is also saved at the top level of ``rng.pt``,
    where checkpoints written before the per-process states kept it."""
    state = root / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    torch.save(optim_state, state / "optimizer.pt")
    torch.save(scheduler.state_dict(), state / "scheduler.pt")
    states = rng_states or [rng_state()]
    torch.save(states[0] | {"per_process": states}, state / "rng.pt")
    # strict JSON: a step's loss that is not a number (a step skipped) is written null, read back as NaN
    progress = {"step": step, **extra}
    if "losses" in progress:
        progress["losses"] = [x if math.isfinite(x) else None for x in progress["losses"]]
    if "validation" in progress:  # a validation with no readable held-out sample: loss NaN
        progress["validation"] = [{k: v if math.isfinite(v) else None for k, v in scores.items()}
                                  for scores in progress["validation"]]
    (state / "progress.json").write_text(json.dumps(progress, indent=1, allow_nan=False))


def load_training_state(root: Path, scheduler, rank: int = 0, processes: int = 1) -> dict[str, Any]:
    """Restore scheduler and RNG from a checkpoint this library wrote (manifest-verified); the
    optimizer follows after ``prepare`` (:func:`restore_optimizer_state`). Process ``rank`` gets the RNG
    state its own rank saved when as many processes saved it, else the main process's (dropout masks then
    differ from an uninterrupted run's, as they do between process counts anyway)."""
    progress = read_progress(root)
    state = Path(root) / STATE_DIR
    scheduler.load_state_dict(torch.load(state / "scheduler.pt", weights_only=True))
    with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):  # rng.pt written before rng_state made tensors
        rng = torch.load(state / "rng.pt", weights_only=True)
    per_process = rng.get("per_process")
    if per_process and len(per_process) == processes:
        rng = per_process[rank]
    random.setstate(rng["python"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return progress


def read_progress(root: Path) -> dict[str, Any]:
    """A checkpoint's training progress (``step``, ``losses`` -- NaN for a skipped step's --, ``skipped``,
    ``validation``: the held-out scores so far);
    refused when it was saved without training state."""
    path = Path(root) / STATE_DIR / "progress.json"
    if not path.is_file():
        raise CheckpointError(f"{root}: no {STATE_DIR}/ to resume from (it was saved without training state, "
                              "e.g. by `mmllm export`)")
    progress = json.loads(path.read_text())
    progress["losses"] = [float("nan") if x is None else x for x in progress.get("losses", [])]
    progress["validation"] = [{k: float("nan") if v is None else v for k, v in scores.items()}
                              for scores in progress.get("validation", [])]
    return progress


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete ``step-*`` checkpoint under ``output_dir`` (incomplete ones are skipped)."""
    for c in reversed(step_dirs(output_dir)):
        try:
            verify_manifest(c)
            return c
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", c, exc)
    return None


BEST_FILE = "best.json"


def record_best(output_dir: Path, checkpoint: Path, metric: float, enabled: bool,
                metric_name: str = "mean train loss since the last save") -> None:
    """Point ``best.json`` at ``checkpoint`` when its metric beats the recorded best (a best measured by
    another metric -- a resumed run that added ``eval_data`` -- is not compared with, and is replaced). A
    checkpoint without a finite metric (no step since the last save read a sample; a stop request's
    checkpoint, not scored) is no candidate."""
    if not enabled:
        return
    path = Path(output_dir) / BEST_FILE
    best = json.loads(path.read_text()) if path.is_file() else None
    if not math.isfinite(metric):
        if best is not None and best["checkpoint"] == checkpoint.name:  # written over the best, unscored
            path.unlink()
            log.info("keep_best: %s was saved again without a score; no best is recorded until the next one",
                     checkpoint.name)
        return
    if best is not None and best.get("metric_name", metric_name) != metric_name:
        log.info("keep_best: %s recorded the best by %s; from now on by %s", path, best["metric_name"], metric_name)
        best = None
    # the best named a checkpoint that is gone, or the one just written over it (a run resumed behind a
    # corrupt newest checkpoint saves that step again): its recorded metric describes nothing that exists
    stale = best is not None and (best["checkpoint"] == checkpoint.name
                                  or not (Path(output_dir) / best["checkpoint"]).is_dir())
    if best is None or stale or metric < best["metric"]:
        atomic_write_text(path, json.dumps({"checkpoint": checkpoint.name, "metric": metric,
                                            "metric_name": metric_name}))


def prune_checkpoints(output_dir: Path, keep_last: int, up_to: int | None = None) -> None:
    """Delete all but the newest ``keep_last`` step-* checkpoints, never the one best.json names.
    ``up_to``: the step just saved; folders of later steps (left by an earlier try that a resumed run
    went back behind, e.g. a corrupt newest checkpoint) neither count nor go: the run replaces each
    when it gets there. Counting them would delete the checkpoint just saved."""
    if keep_last <= 0:
        return
    best_file = Path(output_dir) / BEST_FILE
    best = json.loads(best_file.read_text())["checkpoint"] if best_file.is_file() else None
    dirs = [d for d in step_dirs(output_dir) if up_to is None or int(d.name.removeprefix("step-")) <= up_to]
    for old in dirs[:-keep_last]:
        if old.name != best:
            shutil.rmtree(old, ignore_errors=True)


def check_export_target(checkpoint: Path, out: Path) -> None:
    """Refuse an export whose output would replace what it must not: the checkpoint itself (or a folder
    holding it or inside it), or an existing folder that is neither empty nor an earlier export (the
    export replaces its output whole)."""
    src, dst = Path(checkpoint).resolve(), Path(out).resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise ConfigError(f"--output {out}: the export would replace the checkpoint {checkpoint} (an export "
                          "replaces its output folder whole); give a new folder, e.g. "
                          f"{Path(checkpoint).parent / (Path(checkpoint).name + '-export')}")
    if dst.is_file():
        raise ConfigError(f"--output {out} is a file; give a folder")
    if dst.is_dir() and any(dst.iterdir()):
        try:
            earlier = {"exported_from", "merged_from"} & set(read_meta(dst))
        except (OSError, ValueError, CheckpointError):
            earlier = set()
        if not earlier:
            raise ConfigError(f"--output {out} exists and holds files that are not an earlier `mmllm export`; an "
                              "export replaces its output folder whole, so give a new or empty folder")


def export_folder(out: Path) -> Path:
    """Where an export into ``out`` goes: ``out``, or the folder it leads to where it is a symbolic link (the user's
    output folder on another disk). The export is renamed into place whole, so the link itself was renamed away
    and the export left on this disk, in its place. A link leading to no folder is refused (a disk not mounted)."""
    out = Path(out)
    if not out.is_symlink():
        return out
    target = Path(os.path.realpath(out))
    if not target.is_dir():
        raise ConfigError(f"--output {out} is a link to {os.readlink(out)}, which is no folder here (a disk not "
                          "mounted?): make that folder, or give another --output")
    return target


def holding_export(out: Path) -> AbstractContextManager[None]:
    """The lock of an export into ``out``: one export at a time there (a second is refused at once, naming the
    first), as each replaces it whole and the last would win; a refused or failed export leaves no folder it
    made for it."""
    from mmllm.folder_lock import hold_beside

    return hold_beside(Path(out), "mmllm export", "give this export another output folder (--output)")


def export_merged(checkpoint: Path, out: Path, trust_remote_code: bool = False) -> Path:
    """A copy with LoRA merged into the LLM, saved as a plain HF model dir under ``out/llm``. Holds ``out``'s
    lock while it runs (:func:`holding_export`)."""
    out = export_folder(out)
    with holding_export(out):
        return _export_merged(Path(checkpoint), out, trust_remote_code)


def _export_merged(checkpoint: Path, out: Path, trust_remote_code: bool) -> Path:
    check_export_target(checkpoint, out)
    # the LLM, its adapter and the learned weights are all it writes: no decoder or encoder weights are read
    model = load_model_checkpoint(checkpoint, decoder_parts="config", encoder_weights=[],
                                  trust_remote_code=trust_remote_code)
    meta = read_meta(checkpoint)
    if model._peft_model is None:
        stage = meta.get("stage") if isinstance(meta.get("stage"), dict) else {}
        log.warning("%s has no LoRA adapter (stage %s): there is nothing to merge; the export holds the "
                    "LLM as it is, saved in full under llm/ (a weights-only export, without --merge-lora, is "
                    "smaller)", checkpoint, stage.get("stage", "adapter-less"))

    def fill(tmp: Path) -> None:
        save_file(model.learned_state_dict(), str(tmp / LEARNED_FILE), metadata={"format": "pt"})
        llm = model.llm
        base_model = model._peft_model.merge_and_unload() if model._peft_model is not None else llm.model
        emb, head = base_model.get_input_embeddings(), base_model.get_output_embeddings()
        base_model.set_input_embeddings(emb.base)
        if head is not None:
            base_model.set_output_embeddings(head.base)
        tied = head is not None and head.base.weight is emb.base.weight
        base_model.config.tie_word_embeddings = tied
        tokenizer = _base_tokenizer(llm)
        base_model.save_pretrained(str(tmp / "llm"))
        tokenizer.save_pretrained(str(tmp / "llm"))
        meta_out = dict(meta)
        meta_out["assembly"] = dict(meta["assembly"])
        llm_options = meta["assembly"]["llm"]
        meta_out["assembly"]["llm"] = {"kind": "hf-causal-lm", "name_or_path": "./llm",
                                       "dtype": llm_options.get("dtype", "float32")}
        if llm_options.get("trust_remote_code"):  # its classes are in its folder, saved with it into llm/
            meta_out["assembly"]["llm"]["trust_remote_code"] = True
        meta_out["lora"] = None
        meta_out["merged_from"] = str(Path(checkpoint).absolute())  # named right from any folder
        (tmp / CONFIG_FILE).write_text(json.dumps(meta_out, indent=2, default=str))

    return atomic_dir(out, fill)


def export_weights_only(checkpoint: Path, out: Path, dtype: str = "float32", assembly: Path | None = None) -> Path:
    """A copy for inference and shipping: config, learned weights and adapter, no training state,
    floating-point tensors cast to ``dtype`` (they are cast back to the model's dtype on load); a merged
    export's LLM folder (``./llm``), which its assembly names inside it, is copied as it is.
    ``assembly`` (a YAML) replaces the recorded assembly, e.g. to point at parts that moved or at
    the shipped decoders after training with stand-ins; the learned weights must fit it (checked
    on load). The source checkpoint is verified first; the copy gets its own manifest. Holds ``out``'s lock
    while it runs (:func:`holding_export`)."""
    out = export_folder(out)
    with holding_export(out):
        return _export_weights_only(Path(checkpoint), out, dtype, assembly)


def _export_weights_only(checkpoint: Path, out: Path, dtype: str, assembly: Path | None) -> Path:
    from mmllm.config import load_assembly

    check_export_target(checkpoint, out)
    verify_manifest(checkpoint)
    new_assembly = to_dict(load_assembly(assembly)) if assembly is not None else None
    target = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if target is None:
        raise ConfigError(f"--dtype {dtype!r}: use float32, float16 or bfloat16")

    def cast(src: Path, dst: Path) -> None:
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in read_weights(src).items()}
        if counts := nonfinite_counts(state):  # finite values past float16's range (65504) become inf
            raise CheckpointError(f"{src}: --dtype {dtype} cannot hold its values: cast, {_describe_nonfinite(counts)}; "
                                  "export with --dtype bfloat16 or float32")
        save_file(state, str(dst), metadata={"format": "pt"})

    def fill(tmp: Path) -> None:
        meta = read_meta(checkpoint)
        meta["exported_from"] = {"checkpoint": str(Path(checkpoint).absolute()), "dtype": dtype}  # right from any folder
        if new_assembly is not None:
            meta["exported_from"]["assembly"] = str(Path(assembly).absolute())
            meta["assembly"] = new_assembly
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))
        cast(checkpoint / LEARNED_FILE, tmp / LEARNED_FILE)
        if (folder := merged_llm_folder(meta)) is not None:  # a merged export's LLM lives inside it: copied too
            shutil.copytree(checkpoint / folder, tmp / folder)
        adapter = checkpoint / ADAPTER_DIR
        if adapter.is_dir():
            (tmp / ADAPTER_DIR).mkdir()
            for f in adapter.iterdir():
                if f.name == "adapter_model.safetensors":
                    cast(f, tmp / ADAPTER_DIR / f.name)
                elif f.is_file():
                    shutil.copy2(f, tmp / ADAPTER_DIR / f.name)

    return atomic_dir(Path(out), fill)


def _base_tokenizer(llm):
    """The tokenizer without mmllm's additions (they are re-added, with the same ids, on load)."""
    import copy

    tok = copy.deepcopy(llm.tokenizer)
    backend = tok.backend_tokenizer if hasattr(tok, "backend_tokenizer") else None
    if backend is None:
        raise CheckpointError("export needs a fast tokenizer")
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < llm.first_new_id]
    from transformers import PreTrainedTokenizerFast

    base = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token, unk_token=tok.unk_token,
        model_max_length=tok.model_max_length,
    )
    base.chat_template = tok.chat_template
    return base


def stage_meta(stage_cfg) -> dict[str, Any]:
    """What a training checkpoint records of its stage: its settings as loaded, and the folder training ran in
    (``working_dir``), which their relative paths (``output_dir``, a data path found from there) lead from:
    ``mmllm config --checkpoint`` writes them out absolute."""
    return {"stage": to_dict(stage_cfg), "working_dir": str(Path.cwd())}
