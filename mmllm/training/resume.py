"""``--resume``: which checkpoint a run continues, and what may differ from the run that wrote it.

A checkpoint records the stage config it was trained with (``mmllm.json``'s ``stage``) and, in its
training state, how many processes trained it and how many samples each data set held. Against those,
the resumed run's config is sorted three ways before any weight loads (:func:`check_resume`):

* refused: what the saved state cannot continue -- another stage, other trainable groups, another
  optimizer, a LoRA adapter of another shape, another assembly;
* applied, with a warning: the optimizer's hyperparameters, the schedule, ``max_steps`` and the loss
  weights. The optimizer state restores the old hyperparameters, so :func:`apply_hyperparameters` sets
  the config's again and recomputes the next step's learning rate; the warning gives the jump;
* allowed, with a warning that the resumed run no longer draws the samples the uninterrupted run would
  have: ``seed``, ``group_by_length``, the split of the samples into steps where it changes what a step reads
  (:func:`_split_changes`: ungrouped the samples per step, grouped the micro-batch size and ``grad_accum``), the data sets and
  their sizes, and a grouped run's batch order (``length_order`` in its progress; a checkpoint within the first
  chunk written by an mmllm with another order).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from mmllm.config import (
    DATA_PATHS,
    STAGE_DEFAULT_TRAINABLE,
    ConfigError,
    StageConfig,
    config_source,
    flat_keys,
    load_assembly,
    load_lora,
    lora_targets_key,
    to_dict,
)
from mmllm.data.dataset import GROUP_BATCHES, LENGTH_ORDER_VERSION
from mmllm.training import checkpoint as ckpt
from mmllm.training.init_from import assembly_differences, list_differences, normalized_assembly, same_value

log = logging.getLogger(__name__)

APPLIED = ("optim", "schedule", "max_steps", "losses")  # the resumed run uses the new values


def resume_point(out_dir: Path, max_steps: int) -> Path | None:
    """The newest complete checkpoint under ``out_dir`` (None: start from step 0), refused when it is
    past ``max_steps`` (the run would train nothing and end on a step it never saved)."""
    last = ckpt.latest_checkpoint(out_dir)
    if last is None:
        log.warning("--resume: no complete checkpoint under %s; starting from step 0", out_dir)
        return None
    step = int(ckpt.read_progress(last)["step"])
    if step > max_steps:
        raise ConfigError(f"--resume: the newest checkpoint under {out_dir} is {last.name}, past max_steps={max_steps}; "
                          f"set max_steps to more than {step} to train on from it, or give another output_dir")
    return last


def check_fresh_output_dir(out_dir: Path) -> None:
    """A run without ``--resume`` refuses an ``output_dir`` that holds another run's checkpoints: its
    saves would sit beside them, retention (``keep_last``, ``best.json``) would count them, and a later
    ``--resume`` would continue whichever is newest."""
    found = ckpt.step_dirs(out_dir)
    if found:
        names = found[0].name if len(found) == 1 else f"{found[0].name} .. {found[-1].name}"
        raise ConfigError(f"output_dir {out_dir} already holds checkpoints of a run ({names}); pass --resume (in Python: train(cfg, resume=True)) to continue it, or give another output_dir (or delete "
                          "its step-* folders) to start over")
    if kept := ckpt.recoverable_partial_writes(out_dir):
        raise ConfigError(f"output_dir {out_dir} holds a checkpoint a run was killed while saving ({kept[0].name}, complete); pass --resume "
                          "(in Python: train(cfg, resume=True)) to restore it and continue, or give another output_dir (or delete its .step-* folders) to start over")


def _trainable(stage: dict[str, Any]) -> dict[str, bool]:
    out = dict(STAGE_DEFAULT_TRAINABLE[stage["stage"]])
    out.update({k: v for k, v in (stage.get("trainable") or {}).items() if v is not None})
    return out


def _lora_shape(lora: dict[str, Any] | None) -> dict[str, Any] | None:
    if lora is None:
        return None
    return {"r": lora["r"], "alpha": lora["alpha"], "target_modules": lora_targets_key(lora["target_modules"])}


def _same_adapter(saved: dict[str, Any] | None, wanted: dict[str, Any] | None, last: Path,
                  meta: dict[str, Any]) -> bool:
    """Two :func:`_lora_shape` results that describe one adapter: its rank and alpha, and the layers it
    adapts. Targets written two ways (``all-linear`` and the list of what it expands to) are compared by the
    layers they name in the checkpoint's core, built from its config alone (no weights read)."""
    if saved == wanted or saved is None or wanted is None:
        return saved == wanted
    if (saved["r"], saved["alpha"]) != (wanted["r"], wanted["alpha"]):
        return False
    from mmllm import registry
    from mmllm.model import lora_layer_names

    assembly = ckpt.checkpoint_assembly(last, meta)
    core = registry.build("llm", assembly.llm, "llm", weights=False)
    core.add_tokens(assembly.signal_tokens, seed=assembly.seed)
    return lora_layer_names(core.model, saved["target_modules"]) == lora_layer_names(core.model,
                                                                                    wanted["target_modules"])


def _changed(saved: dict[str, Any], now: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    a, b = flat_keys({k: saved.get(k) for k in sections}), flat_keys({k: now.get(k) for k in sections})
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _recorded_data(meta: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The data sets (``data`` or ``eval_data``) the checkpoint's stage record names, their relative paths joined
    to the folder training ran in where the checkpoint records it (``working_dir``): a run resumed from another
    folder (``mmllm config --checkpoint``'s absolute paths) reads the same files."""
    sets = (meta.get("stage") or {}).get(key) or []
    folder = meta.get("working_dir")
    if not isinstance(folder, str):
        return sets
    return [{**ds, **{k: str(Path(folder) / v) for k, v in ds.items() if k in DATA_PATHS and _relative(v)}}
            if isinstance(ds, dict) else ds for ds in sets]


def _relative(value: Any) -> bool:
    from mmllm.locations import is_package_path

    return isinstance(value, str) and not is_package_path(value) and not Path(value).expanduser().is_absolute()


def _same_data(saved: list[dict[str, Any]], now: list[dict[str, Any]]) -> bool:
    if len(saved) != len(now):
        return False
    return all(same_value(s.get(k), n.get(k)) for s, n in zip(saved, now) for k in set(s) | set(n))


def _lr_follows_max_steps(saved: dict[str, Any], cfg: StageConfig) -> bool:
    """Whether ``max_steps`` sets any step's learning rate, in the checkpoint's schedule or this run's: a
    decay spreads over it; warmup and a constant schedule do not read it (:func:`~mmllm.training.loop.lr_lambda`)."""
    was = (saved.get("schedule") or {}).get("decay", "cosine")
    return not (was == "constant" and cfg.schedule.decay == "constant")


def check_resume(cfg: StageConfig, last: Path, processes: int, samples: list[int]) -> None:
    """Compare the run about to resume with the one that saved ``last`` (see the module docstring);
    reads ``mmllm.json`` and the training progress only. ``samples``: this run's samples per data set."""
    meta = ckpt.read_meta(last)
    saved, now = meta.get("stage") or {}, to_dict(cfg)
    progress = ckpt.read_progress(last)
    where = f"--resume from {last}"
    fresh = "give another output_dir to train the new setting from the start (init_from can name this checkpoint)"
    refused = []
    if saved.get("stage") != cfg.stage:
        refused.append(f"stage: {saved.get('stage')} (checkpoint) vs {cfg.stage}")
    else:
        was, wants = _trainable(saved), cfg.resolved_trainable()
        refused += [f"trainable.{k}: {was.get(k)} (checkpoint) vs {wants[k]}" for k in wants if was.get(k) != wants[k]]
    if saved.get("optim", {}).get("name") != cfg.optim.name:
        refused.append(f"optim.name: {saved.get('optim', {}).get('name')} (checkpoint; its optimizer state is that "
                       f"optimizer's) vs {cfg.optim.name}")
    # with init_from, the model is rebuilt from ``last`` itself (its assembly and adapter): only a `lora:`
    # file can disagree; without, from the stage's assembly, which must be the checkpoint's
    adapter = _lora_shape(meta.get("lora"))
    wanted_lora = load_lora(cfg.lora) if cfg.lora else None
    lora = _lora_shape(to_dict(wanted_lora)) if wanted_lora else (adapter if cfg.init_from else None)
    if not _same_adapter(adapter, lora, last, meta):
        refused.append(f"LoRA adapter: {adapter} (checkpoint) vs {lora}")
    if not cfg.init_from:
        built = normalized_assembly(load_assembly(cfg.assembly, cfg.assembly_overrides))
        diffs = assembly_differences(normalized_assembly(ckpt.checkpoint_assembly(last, meta)), built)
        if diffs:
            refused.append(f"assembly: {list_differences(diffs, lambda d: 'this run')}")
    if refused:
        raise ConfigError(f"{where}: the checkpoint's training state cannot continue this run: {'; '.join(refused)}. "
                          f"Resume with the settings it was trained with, or {fresh}")

    applied = _changed(saved, now, APPLIED)
    if not _lr_follows_max_steps(saved, cfg):  # a longer or shorter run, each step at the learning rate it had
        length = [a for a in applied if a.startswith("max_steps:")]
        applied = [a for a in applied if a not in length]
        if length:
            log.info("%s: %s; the schedule is constant, so no step's learning rate changes with it", where, length[0])
    if applied:
        log.warning("%s: %s. The resumed run uses the new values (the checkpoint's mmllm.json records the old "
                    "ones); the learning rate is recomputed from them", where, "; ".join(applied))
    was_dropout = (meta.get("lora") or {}).get("dropout")
    if wanted_lora and was_dropout is not None and wanted_lora.dropout != was_dropout:
        log.warning("%s: LoRA dropout %s (checkpoint) -> %s (%s): training goes on, but from step %d it draws other "
                    "dropout masks than the interrupted run: it will not end on the weights an uninterrupted run "
                    "gives", where, was_dropout, wanted_lora.dropout, config_source(cfg.lora, "lora"), progress["step"] + 1)
    order = _changed({"group_by_length": False} | saved, now, ("seed", "group_by_length"))
    grouped = bool(cfg.group_by_length and saved.get("group_by_length"))
    old_world = progress.get("processes")
    order += _split_changes(saved.get("batch_size"), saved.get("grad_accum"), old_world, cfg.batch_size,
                            cfg.grad_accum, processes, grouped)
    if cfg.group_by_length and saved.get("group_by_length") and progress["step"] * cfg.grad_accum < GROUP_BATCHES:
        was = progress.get("length_order")  # later chunks are ordered alike: only the first's can differ
        if was != LENGTH_ORDER_VERSION:
            order.append(f"group_by_length's batch order: {f'version {was}' if was else 'none recorded (an older mmllm)'}"
                         f" -> version {LENGTH_ORDER_VERSION} (the first chunk's longest micro-batch first)")
    if not _same_data(_recorded_data(meta, "data"), now["data"]):
        order.append("data: the data sets or their weights")
    elif progress.get("samples") not in (None, samples):
        order.append(f"samples per data set: {progress['samples']} -> {samples} (a data file was edited)")
    if order:
        log.warning("%s: %s. Training goes on, but from step %d it reads other samples than the interrupted run "
                    "would have: it will not end on the weights an uninterrupted run gives", where,
                    "; ".join(order), progress["step"] + 1)
    if not _same_data(_recorded_data(meta, "eval_data"), now.get("eval_data") or []):
        log.warning("%s: eval_data differs from the interrupted run's: validation scores from step %d on are of "
                    "another held-out set than those before them (progress.json keeps both, and keep_best compares "
                    "only checkpoints scored on the same set)", where, progress["step"] + 1)
    split = (saved.get("batch_size"), saved.get("grad_accum"), old_world or processes)
    if not order and split != (cfg.batch_size, cfg.grad_accum, processes):
        log.info("%s: batch_size x grad_accum x processes %s x %s x %s (checkpoint) -> %d x %d x %d: each step reads "
                 "the same samples, split into other micro-batches", where, *split, cfg.batch_size, cfg.grad_accum,
                 processes)


def _split_changes(batch: int | None, accum: int | None, world: int | None, new_batch: int, new_accum: int,
                   new_world: int, grouped: bool) -> list[str]:
    """What of the samples' split into steps changed so that a step reads other samples (the sampler's
    ``micro_batch(step, micro, accum, rank, world, batch)``): without ``group_by_length`` the samples of step ``s``
    are draws ``s*N .. (s+1)*N`` of the seeded order, ``N = batch_size x processes x grad_accum``, however they are
    split into micro-batches (batch 4 x 1 step and batch 2 x 2 micro-batches read the same 4); grouped, the draws are
    sorted in chunks of :data:`GROUP_BATCHES` global micro-batches of ``batch_size x processes`` samples, and a step
    takes ``grad_accum`` of them: both count. ``world`` None: not recorded (an older mmllm), any change said."""
    if world is None:
        return [f"{key}: {was} -> {now}" for key, was, now in (("batch_size", batch, new_batch),
                                                              ("grad_accum", accum, new_accum)) if was != now]
    accum = accum or 1
    if not grouped:
        if batch is None or batch * world * accum != new_batch * new_world * new_accum:
            return [f"samples per optimizer step (batch_size x processes x grad_accum): {batch} x {world} x {accum} "
                    f"-> {new_batch} x {new_world} x {new_accum}"]
        return []
    out = []
    if batch is None or batch * world != new_batch * new_world:
        out.append(f"samples per micro-batch (batch_size x processes, what group_by_length sorts in chunks of "
                   f"{GROUP_BATCHES}): {batch} x {world} -> {new_batch} x {new_world}")
    if accum != new_accum:
        out.append(f"grad_accum (grouped micro-batches per step): {accum} -> {new_accum}")
    return out


def apply_hyperparameters(optimizer, scheduler, cfg: StageConfig) -> None:
    """After the optimizer state is restored: the config's hyperparameters (the restored param groups hold
    the checkpoint's) and the next step's learning rate, recomputed from this run's lr, schedule and
    ``max_steps``; a jump is logged. Unchanged settings give the saved values bit for bit."""
    opt = ckpt.bare_optimizer(optimizer)
    scheduler.base_lrs = [cfg.optim.lr for _ in opt.param_groups]
    before = [g["lr"] for g in opt.param_groups]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(opt.param_groups, lrs):
        group["initial_lr"] = cfg.optim.lr
        group["weight_decay"] = cfg.optim.weight_decay
        if cfg.optim.name == "sgd":
            group["momentum"] = cfg.optim.momentum
        else:
            group["betas"] = tuple(cfg.optim.betas)
            group["eps"] = cfg.optim.eps
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    scheduler._last_lr = lrs
    if any(not math.isclose(float(a), b, rel_tol=1e-9) for a, b in zip(before, lrs)):
        log.warning("the learning rate of step %d is %.3g, not the %.3g the checkpoint's schedule gave it (optim.lr, "
                    "schedule or max_steps changed)", scheduler.last_epoch + 1, lrs[0], float(before[0]))
