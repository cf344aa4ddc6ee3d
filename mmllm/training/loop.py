"""The training recipe shared by the three stages, on Accelerate.

A stage differs only in its data (caption pairs or conversations), which groups learn, and which
losses count -- all declared in its YAML. The loop: build (or load ``init_from``), attach LoRA if
asked, apply the trainable set, check the data before any step, then optimise with gradient
accumulation, warmup + decay, clipping, a progress bar, a log line every ``log_every`` steps and TensorBoard
(:mod:`.metrics`); checkpoints hold only what learned plus the resolved config and the training state
needed for an exact ``--resume``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmllm import registry
from mmllm.atomic import atomic_write_text
from mmllm.config import (
    ConfigError,
    LoraConfig,
    StageConfig,
    UserError,
    config_source,
    flat_keys,
    load_assembly,
    load_lora,
    naming_overrides,
    to_dict,
)
from mmllm.data.dataset import (
    LENGTH_ORDER_VERSION,
    LengthGroupedSampler,
    MixtureSampler,
    StageDataset,
    collate,
    load_stage_records,
    warn_empty_replies,
)
from mmllm.data.index import Chained, ReadStopped, waits_end_when
from mmllm.data.precomputed import open_precomputed
from mmllm.data.template import TokenSpec
from mmllm.folder_lock import hold_folder, holder, missing_folders, remove_empty
from mmllm.memory import peak_resident_mb
from mmllm.model import AnyToAnyModel, lora_layer_names, unit_counts
from mmllm.progress import progress_bar
from mmllm.seeding import global_generators_kept
from mmllm.training import checkpoint as ckpt
from mmllm.training import out_of_memory as oom
from mmllm.training import zero
from mmllm.training.agreement import (
    agreed_resume_point,
    check_same_run,
    check_same_samples,
    on_every_process,
    on_every_process_warning_once,
    warn_unless_shared,
)
from mmllm.training.faults import Failure, new_run, stops_together
from mmllm.training.freeze import apply_trainable
from mmllm.training.init_from import (
    check_init_from,
    stage_trusts_remote_code,
    warn_if_adapter_frozen,
    warn_if_middle_step,
)
from mmllm.training.interrupt import StopRequests, TrainingInterrupted
from mmllm.training.metrics import Interval, batch_size_counts, clip_to, report_line, total_grad_norm
from mmllm.training.out_of_memory import RunShape, stops_on_out_of_memory, takes_dtype
from mmllm.training.parts import StageParts, release_cached, require_cache_folder, stage_parts
from mmllm.training.resume import apply_hyperparameters, check_fresh_output_dir, check_resume, resume_point
from mmllm.training.validation import Validation, evaluate

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError, UserError):
    """``max_nonfinite_steps`` steps in a row had a non-finite loss or gradient: the run's settings or data are to
    change (the message says which), not mmllm -- the ``mmllm`` command says so in one line, exit code 2."""


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path
    losses: list[float]
    skipped: int
    steps: int
    validation: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", parts...} per evaluation


def token_spec(model: AnyToAnyModel) -> TokenSpec:
    from mmllm.llm import signal_token_strings

    return TokenSpec(
        placeholder_ids=model.llm.placeholder_ids,
        media_tokens={m: p.num_tokens for m, p in model.input_projections.items()},
        signal_tokens={m: signal_token_strings(m, n) for m, n in model.config.signal_tokens.items()},
        signal_ids=model.llm.signal_ids,
        max_length=model.config.max_length,
        template_date=model.config.template_date,
    )


def build_model(cfg: StageConfig, parts: StageParts | None = None, check_init: bool = True) -> AnyToAnyModel:
    """The stage's model: the previous stage's checkpoint if named, else a fresh assembly, holding only
    the frozen parts ``parts`` names (default: what the stage's data and losses run, :func:`stage_parts`).
    A checkpoint is rebuilt from the assembly it records: an ``assembly.*`` override that contradicts it is
    refused, a stage assembly file that differs is warned about, before any weight loads (:mod:`.init_from`;
    ``check_init=False``: the caller did)."""
    if check_init:
        check_init_from(cfg)
    if parts is None:
        parts = stage_parts(cfg.losses, load_stage_records(cfg.all_data(), cfg.stage)[0])
    log.info("stage %s: %s", cfg.stage, parts.describe())
    if cfg.init_from:
        resumed = Path(cfg.init_from).resolve().parent == Path(cfg.output_dir).resolve()  # --resume's own
        log.info("%s %s", "rebuilding the model from the checkpoint --resume continues," if resumed
                 else "initialising from", cfg.init_from)
        model = AnyToAnyModel.from_pretrained(cfg.init_from, trainable_lora=True, decoder_parts=parts.decoders,
                                              encoder_weights=parts.encoders,
                                              trust_remote_code=stage_trusts_remote_code(cfg))
    else:
        with naming_overrides(cfg.assembly_overrides, "assembly."):  # a dimension check names its override
            model = AnyToAnyModel.assemble(load_assembly(cfg.assembly, cfg.assembly_overrides), parts.decoders,
                                           parts.encoders)
    flags = cfg.resolved_trainable()
    if cfg.lora and model.lora_config is None:
        model.add_lora(load_lora(cfg.lora))
    elif cfg.lora:
        _continue_adapter(model, load_lora(cfg.lora), cfg)
    elif flags["lora"] and model.lora_config is None:
        raise ConfigError(f"stage {cfg.stage}: trainable.lora is on but no `lora:` file is set")
    if cfg.losses.retain and model.lora_config is None:
        raise ConfigError(f"stage {cfg.stage}: losses.retain holds a LoRA adapter to the core without it, but "
                         "the model has no adapter; set `lora:` or losses.retain=0")
    return model


def _continue_adapter(model: AnyToAnyModel, wanted: LoraConfig, cfg: StageConfig) -> None:
    """init_from carries an adapter and the stage names a `lora:` file: the adapter's shape must be
    what the file says; its dropout follows the file."""
    have = model.lora_config
    differ = [f"{k}: {getattr(have, k)} (checkpoint) vs {getattr(wanted, k)} ({config_source(cfg.lora, 'lora')})"
              for k in ("r", "alpha") if getattr(have, k) != getattr(wanted, k)]
    if lora_layer_names(model.llm.model, have.target_modules) != lora_layer_names(model.llm.model,
                                                                                 wanted.target_modules):
        differ.append(f"target_modules: {have.target_modules} (checkpoint) vs {wanted.target_modules} "
                      f"({config_source(cfg.lora, 'lora')})")
    if differ:
        raise ConfigError(f"init_from {cfg.init_from} carries a LoRA adapter that the stage's lora file does not "
                          f"describe: {'; '.join(differ)}. Continue the adapter as it is (drop `lora:` or "
                          "make the file match), or start from a checkpoint without one")
    if wanted.dropout != have.dropout:
        log.info("LoRA dropout %s -> %s (%s)", have.dropout, wanted.dropout, config_source(cfg.lora, "lora"))
        model.set_lora_dropout(wanted.dropout)


def lr_lambda(cfg: StageConfig):
    warm, total, floor = cfg.schedule.warmup_steps, max(cfg.max_steps, 1), cfg.schedule.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule.decay == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if cfg.schedule.decay == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def stage_sampler(datasets: list[StageDataset], weights: list[float],
                  cfg: StageConfig) -> MixtureSampler | LengthGroupedSampler:
    """The stage's sample order: the seeded mixture, grouped by token length with ``group_by_length``."""
    sampler = MixtureSampler([len(d) for d in datasets], weights, cfg.seed)
    if not cfg.group_by_length:
        return sampler
    return LengthGroupedSampler(sampler, lambda d, i: datasets[d].length(i))


def read_stage_data(accelerator, cfg: StageConfig) -> tuple[list[Any], list[float], list[str], list[Any], list[str]]:
    """The stage's data and held-out data read on every process (bad data: refused before any writing; a process
    that cannot read them stops every process), each data file giving every process as many usable records
    (:func:`~mmllm.training.agreement.check_same_samples`): (per data set, weights, errors, held out, their
    errors). Their warnings (malformed records, unknown keys, failed media lookups) are said once per run: by
    the main process, and by another process only where it saw what the main process did not."""
    got: dict[str, Any] = {}

    def read() -> list[int]:
        got["data"] = load_stage_records(cfg.data, cfg.stage)
        got["eval"] = load_stage_records(cfg.eval_data, cfg.stage)
        return [len(convs) for convs in got["data"][0] + got["eval"][0]]

    seen = on_every_process_warning_once(accelerator, read)  # the same files: their warnings once, not per process
    check_same_samples(seen, [ds.path for ds in cfg.all_data()])
    (per_dataset, weights, errors), (held_out, _, eval_errors) = got["data"], got["eval"]
    return per_dataset, weights, errors, held_out, eval_errors


def train(cfg: StageConfig, resume: bool = False, accelerator=None) -> TrainResult:
    """Train the stage ``cfg`` (:func:`mmllm.config.load_stage`) and return what it did: the loss of every
    step, the validation scores and the final checkpoint's folder (load it with
    :meth:`AnyToAnyModel.from_pretrained`). ``resume``: go on from the newest complete checkpoint in
    ``cfg.output_dir`` (the command's ``--resume``); without it, an ``output_dir`` holding checkpoints is
    refused. ``accelerator``: an ``accelerate.Accelerator`` of the caller's (default: one made here, after
    resetting Accelerate's process state when one process runs).

    Seeds Python's, NumPy's and torch's global generators with ``cfg.seed`` for the run and gives the caller's
    states back when it returns or raises (:func:`~mmllm.seeding.global_generators_kept`). On SIGINT or SIGTERM
    during the steps (from the main thread), saves the step under way and raises
    :class:`~mmllm.training.interrupt.TrainingInterrupted` (see :mod:`.interrupt`); the handlers that were
    there before are put back when it returns.

    The main process holds ``output_dir``'s lock (:mod:`mmllm.folder_lock`) from before it writes there
    until it returns: a second run into the same ``output_dir`` is refused
    (:class:`~mmllm.folder_lock.FolderInUse`) before its model is built."""
    made = missing_folders(Path(cfg.output_dir))
    try:
        with global_generators_kept(), StopRequests() as stop, contextlib.ExitStack() as held:
            return _train(cfg, resume, accelerator, stop, held)
    except BaseException:
        remove_empty(made)  # after `held` let go of the lock (and deleted its file)
        raise


def _hold_output_dir(accelerator, out_dir: Path, held: contextlib.ExitStack, resume: bool) -> None:
    """The main process takes ``out_dir``'s lock for the rest of the run (``held``); refused there, every
    process stops with its message (the others wait for the answer, they take no lock). Processes that do
    not see the lock file the main process wrote (``output_dir`` on its machine's disk alone) are warned
    about: the checkpoints will be there only."""
    # a --resume goes on from that run's checkpoints: another output_dir would not resume it
    elsewhere = ("let it go on: a --resume after it has stopped continues from its newest checkpoint" if resume
                 else "give this run another output_dir")
    _on_main_process_for_all(accelerator, lambda: held.enter_context(hold_folder(
        out_dir, "training --resume" if resume else "training", elsewhere)))
    warn_unless_shared(accelerator, out_dir, lambda: holder(out_dir), (
        "Only the main process writes checkpoints, so they will be on its machine alone: before a --resume or a "
        "next stage's init_from, copy them to the same path on every machine, or give an output_dir on a file "
        "system every machine sees"))


def _train(cfg: StageConfig, resume: bool, accelerator, stop: StopRequests, held: contextlib.ExitStack) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        DistributedType,
        ProjectConfiguration,
        set_seed,
    )

    out_dir = Path(cfg.output_dir)
    _deepspeed_on_cpu_without_a_device()
    if accelerator is None:
        _reset_single_process_state()
        accelerator = Accelerator(
            # Without an accelerator device, say so: Accelerate then runs multi-process CPU on gloo.
            cpu=not _has_accelerator_device(),
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            # TensorBoard events in OUTPUT_DIR/logs/<stage>/, apart from the step-N checkpoints
            project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
            # every trainable parameter is in every step's graph (AnyToAnyModel's zero-weight term over the
            # projections and signal rows; LoRA runs in every forward): DDP need not search for unused ones
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
    # one process failing stops them all, with its message (each would wait for it at its next collective)
    held.enter_context(stops_together(accelerator.process_index, accelerator.num_processes, new_run(accelerator)))
    # several processes (machines): the same settings and data files on each, before anything is written
    check_same_run(accelerator, cfg)
    last = None
    if resume:  # then every process finds the same newest checkpoint
        # locked first: a live run's half-written checkpoint is not a killed one's, to delete
        _hold_output_dir(accelerator, out_dir, held, resume=True)
        _on_main_process_for_all(accelerator, lambda: _recover_partial_writes(out_dir))
        # before any loading; the same on every process (an output_dir on one machine's disk is refused)
        last = agreed_resume_point(accelerator, out_dir, lambda: resume_point(out_dir, cfg.max_steps))
    # A resumed run rebuilds its model from the checkpoint it continues, which records the assembly and the
    # adapter init_from gave it: init_from may since have been pruned, moved or trained again.
    build_cfg = dataclasses.replace(cfg, init_from=str(last)) if last is not None and cfg.init_from else cfg
    check_init_from(build_cfg)  # before anything is written or loaded
    if not build_cfg.init_from:  # the stage's own assembly is built: its parts' options are checked first
        registry.check_part_options(load_assembly(cfg.assembly, cfg.assembly_overrides), config_source(cfg.assembly),
                                    cfg.assembly_overrides, "assembly.")
    if build_cfg is cfg:
        warn_if_middle_step(cfg)
        warn_if_adapter_frozen(cfg)
    per_dataset, weights, errors, held_out, eval_errors = read_stage_data(accelerator, cfg)  # before any writing
    if accelerator.is_main_process:
        warn_empty_replies(per_dataset + held_out, cfg.all_data())
    on_every_process(accelerator, lambda: check_output_dir(out_dir))  # one process refused: all stop with its word
    log.info("output_dir: %s", out_dir.resolve())  # as given it may be relative: say where it is
    if not resume:
        _hold_output_dir(accelerator, out_dir, held, resume=False)  # before its checkpoints are counted: a live run's are not
        on_every_process(accelerator, lambda: check_fresh_output_dir(out_dir))
    precision = accelerator.mixed_precision
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if accelerator.distributed_type == DistributedType.FSDP:
        _autocast_under_fsdp(accelerator.state.fsdp_plugin)
    elif deepspeed:
        precision = zero.configure(accelerator.state.deepspeed_plugin, cfg, accelerator.num_processes)
        accelerator.gradient_accumulation_steps = cfg.grad_accum  # what the engine is told, so Accelerate agrees
    run_info = {"processes": accelerator.num_processes, "samples": [len(convs) for convs in per_dataset]}
    if cfg.group_by_length:
        run_info["length_order"] = LENGTH_ORDER_VERSION
    if last is not None:
        check_resume(cfg, last, run_info["processes"], run_info["samples"])
    set_seed(cfg.seed)
    sharding = "fsdp" if accelerator.distributed_type == DistributedType.FSDP else "zero" if deepspeed else "none"
    # the model built or loaded, moved to the device and prepared: running out of memory here says what holds less
    before = oom.shape_before_build(build_cfg, accelerator.num_processes, precision, sharding)
    with stops_on_out_of_memory(cfg, before, oom.BUILD, 0):
        model = build_model(build_cfg, stage_parts(cfg.losses, per_dataset + held_out), check_init=False)
        precomputed = open_precomputed(cfg, model)  # cfg.cache + the data's own caption embeddings
        if cfg.cache.require:  # checked before training; frees the parts the cache replaces
            # a machine without the cache stops every process (the others would wait in the coverage exchange)
            on_every_process(accelerator, lambda: require_cache_folder(precomputed))
            release_cached(model, precomputed, Chained(per_dataset + held_out),
                           accelerator.process_index, accelerator.num_processes)
        flags = cfg.resolved_trainable()
        apply_trainable(model, flags)
        if cfg.grad_checkpointing:
            core = model.llm.model
            if hasattr(core, "activation_checkpointing_enable"):  # newer transformers 5 releases; the old name warns
                core.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                core.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.llm.model.enable_input_require_grads()

        spec = token_spec(model)
        preprocess = {m: enc.preprocess for m, enc in model.encoders.items()}
        datasets, eval_datasets = [
            [StageDataset(convs, model.llm.tokenizer, spec, preprocess, load_output_media=cfg.losses.denoise > 0,
                          precomputed=precomputed) for convs in records]
            for records in (per_dataset, held_out)
        ]
        sampler = stage_sampler(datasets, weights, cfg)
        validation = Validation(eval_datasets, cfg.batch_size, cfg.eval_cache_mb << 20) if eval_datasets else None
        log.info("stage %s: %d samples in %d dataset(s)%s, %d malformed record(s) skipped%s",
                 cfg.stage, sampler.epoch_size, len(datasets),
                 ", batched by length (group_by_length)" if cfg.group_by_length else "", len(errors),
                 f"; {validation.size} held-out samples ({len(eval_errors)} malformed skipped) scored at every save"
                 + (f" and every {cfg.eval_every} steps" if cfg.eval_every else "") if validation else "")

        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"stage {cfg.stage}: nothing is trainable; check the stage's `trainable:` flags")
        if cfg.optim.name == "sgd":
            optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                        weight_decay=cfg.optim.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                          betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

        start_step, losses, skipped, validations = 0, [], 0, []
        if last is not None:
            ckpt.load_learned_into(model, last)  # the files only: no second copy of the model
            progress = ckpt.load_training_state(last, scheduler, accelerator.process_index, accelerator.num_processes)
            start_step, losses, skipped = progress["step"], progress.get("losses", []), progress.get("skipped", 0)
            validations = progress.get("validation", [])
            log.info("resumed from %s at step %d%s", last, start_step,
                     "; it is the last step (max_steps): nothing left to train" if start_step == cfg.max_steps else "")

        model, optimizer = accelerator.prepare(model, optimizer)
        # FSDP replaces parameters with sharded ones: look them up again after prepare.
        params = [p for p in model.parameters() if p.requires_grad]
        if deepspeed:
            zero.after_prepare(model)  # `model` is now the DeepSpeed engine
        if start_step:
            ckpt.restore_optimizer_state(model, optimizer, last)  # sharded as the parameters now are
            apply_hyperparameters(optimizer, scheduler, cfg)  # the restored groups hold the checkpoint's
            _restore_loss_scale(accelerator, progress, last)
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers(f"{cfg.stage}", config=_tracker_config(cfg))
    world, rank = accelerator.num_processes, accelerator.process_index

    def exchange(work: Callable[[], Any]) -> list[Any]:
        return [seen.value for seen in on_every_process(accelerator, work)]

    held_mb, total_mb = _parameter_megabytes(model)
    log.info("%d process(es), %s, device %s, mixed precision %s; this process holds %.1f of the model's "
             "%.1f MB of parameters", world, accelerator.distributed_type.value, accelerator.device,
             precision, held_mb, total_mb)
    inner = _unwrap(accelerator, model)  # the AnyToAnyModel under any DDP/FSDP wrapper
    inner.sharded = accelerator.distributed_type == DistributedType.FSDP
    pad_id = inner.llm.tokenizer.pad_token_id
    shape = RunShape(world, precision, sharding, _core_dtype(inner), takes_dtype(inner.config.llm))

    bar = progress_bar(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
                       desc=cfg.stage, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    held.callback(bar.close)  # an error's message on a line of its own, not after the bar
    parts_keys = _part_keys(inner)
    nonfinite_in_row, since_save = 0, []
    model.train()
    _freeze_dropout(inner)
    fallback: dict[str, Any] | None = None
    interval = Interval(parts_keys)
    stop.armed = True
    for step in bar:
        started = time.perf_counter()
        batches, given_up = _read_step(cfg, sampler, datasets, step, rank, world, exchange, pad_id, stop)
        # a read given up on a stop, on any process (told in the step's one reduction): nothing of the step runs
        normalizers, samples, tokens, stopped = _global_counts(accelerator, batches, parts_keys, inner,
                                                               given_up is not None)
        if stopped:
            bar.close()
            name = stop.requested(accelerator) or "SIGINT"
            if step == 0:
                raise KeyboardInterrupt(name)  # nothing trained: stopped at once, as before the first step
            if since_save:  # else step-{step} is there: saved at it, or the checkpoint this run resumed
                metric, what = _checkpoint_metric(cfg, validation, validations, since_save, step)
                with stops_on_out_of_memory(cfg, shape, oom.SAVE, step):
                    save(accelerator, model, cfg, out_dir, step, optimizer, scheduler, losses, skipped, metric,
                         run_info, what, validations)
            log.warning("%s: stopped before step %d, whose samples were being read (%s)", name, step + 1,
                        given_up or "on another process")
            accelerator.wait_for_everyone()
            accelerator.end_training()
            raise TrainingInterrupted(name, step, cfg.max_steps, out_dir / f"step-{step}") from given_up
        skipped += sum(len(batch["skipped"]) for batch in batches)
        grad_norm: float | torch.Tensor | None = None
        if not normalizers:  # every sample of the step was unreadable, on every process: nothing to learn
            step_loss, parts, outcome = float("nan"), {}, "empty"
        else:
            optimizer.zero_grad(set_to_none=True)
            with stops_on_out_of_memory(cfg, shape, oom.STEP, step + 1):
                step_loss, parts, fallback = _forward_backward(
                    accelerator, model, batches, cfg, normalizers, step, deepspeed, fallback,
                    lambda: _first_readable_batch(datasets, pad_id))
                if deepspeed:
                    outcome = "stepped" if zero.step(model) and math.isfinite(step_loss) else "nonfinite"
                    grad_norm = model.get_global_grad_norm()  # the engine's, before its clipping; None: not computed
                else:
                    outcome, grad_norm = _clip_and_step(accelerator, optimizer, params, cfg.optim.max_grad_norm,
                                                        step_loss)
        if outcome == "empty":
            log.warning("step %d: every sample of this step was unreadable (on every process); no update, the "
                        "step counts as done", step + 1)
        elif outcome == "overflow":
            log.info("step %d: fp16 gradient overflow; step skipped, loss scale now %s",
                     step + 1, accelerator.scaler.get_scale())
        elif outcome == "nonfinite":
            nonfinite_in_row += 1
            ids = [i for b in batches for i in b["ids"]]
            log.warning("step %d: non-finite loss or gradient (%s); step skipped; samples on this process: %s",
                        step + 1, step_loss, ids)
            if nonfinite_in_row >= cfg.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"{nonfinite_in_row} steps in a row had a non-finite loss or gradient (last at step {step + 1}, "
                    f"samples {ids}); lower optim.lr, check the data, or try mixed_precision=no (fp32)"
                )
        else:
            nonfinite_in_row = 0
        with warnings.catch_warnings():
            # the schedule follows the step index, skipped steps included: torch's warning about a first
            # optimiser step that did not happen (skipped, or an fp16 overflow) says nothing true here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            scheduler.step()
        losses.append(step_loss)
        since_save.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", skipped=skipped)
        interval.add(time.perf_counter() - started, samples, tokens, step_loss, parts, normalizers, grad_norm,
                     updated=outcome == "stepped")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            _report(accelerator, cfg, step + 1, interval, scheduler.get_last_lr()[0], skipped)
            interval = Interval(parts_keys)
        done = step + 1 == cfg.max_steps
        signalled = None if done else stop.requested(accelerator)
        saving = bool(done or signalled or (cfg.save_every and (step + 1) % cfg.save_every == 0))
        evaluating = saving or bool(cfg.eval_every and (step + 1) % cfg.eval_every == 0)
        if validation is not None and evaluating and not signalled:  # a stop request saves without waiting
            with stops_on_out_of_memory(cfg, shape, oom.VALIDATION, step + 1):
                scores = evaluate(accelerator, model, inner, validation, cfg.losses, parts_keys,
                                  fallback or _first_readable_batch(datasets, pad_id))
            validations.append({"step": step + 1, **scores})
            accelerator.log({f"val/{k}": v for k, v in scores.items()}, step=step + 1)
            log.info("step %d: validation loss %.4f (%s)", step + 1, scores["loss"],
                     ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k not in ("loss", "skipped")))
            if not done:  # a request during the validation (it can outlast a step): this step is done, save it now
                signalled = stop.requested(accelerator)
                saving = saving or bool(signalled)
        if saving:
            metric, what = _checkpoint_metric(cfg, validation, validations, since_save, step + 1)
            with stops_on_out_of_memory(cfg, shape, oom.SAVE, step + 1):
                save(accelerator, model, cfg, out_dir, step + 1, optimizer, scheduler, losses, skipped, metric,
                     run_info, what, validations)
            since_save = []
            if not done and not signalled:  # a request during the save (it can outlast a step): stop on it
                signalled = stop.requested(accelerator)
        if signalled:
            bar.close()
            # together: a launcher (torchrun, accelerate launch) kills the others when the first process exits
            accelerator.wait_for_everyone()
            accelerator.end_training()  # flushes the trackers (TensorBoard) up to this step
            raise TrainingInterrupted(signalled, step + 1, cfg.max_steps, out_dir / f"step-{step + 1}")
    stop.armed = False
    bar.close()
    final = out_dir / f"step-{cfg.max_steps}"
    _on_main_process_for_all(accelerator, lambda: _link_final(out_dir, final))
    if accelerator.is_main_process:
        log.info("stage %s finished: %d samples skipped as unreadable; precomputed lookups: %s; peak memory "
                 "of this process: %s; it holds %.1f MB of optimizer state", cfg.stage, skipped,
                 precomputed.stats() or "none", _peak_memory(), _optimizer_megabytes(optimizer))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes trackers and, when distributed, the process group
    return TrainResult(out_dir, final, losses, skipped, cfg.max_steps, validations)


def _report(accelerator, cfg: StageConfig, step: int, interval: Interval, lr: float, skipped: int) -> None:
    """The report of the steps since the last (:mod:`.metrics`): on the main process one log line, and the
    tracker's ``train/*`` values. Every process calls it (the loss parts are reduced over processes)."""
    summary = interval.summary(accelerator)
    accelerator.log({f"train/{k}": v for k, v in summary.items()} | {"train/lr": lr, "train/skipped": skipped},
                    step=step)
    if accelerator.is_main_process:
        cuda = accelerator.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(accelerator.device) / 2**20 if cuda else None
        log.info("%s", report_line(step, cfg.max_steps, summary, lr, interval, peak))


def _checkpoint_metric(cfg: StageConfig, validation: Validation | None, validations: list[dict[str, float]],
                       since_save: list[float], step: int) -> tuple[float, str]:
    """What ``keep_best`` compares for the checkpoint of ``step``, and its name: the validation loss of that
    step (inf when the step was not scored: a stop request's), named by its held-out set so that a best
    measured on another set (a resume with other eval_data) is not compared with; without eval_data, the
    mean train loss of the steps since the last save. Not finite: inf (no candidate)."""
    if validation is not None:
        scored = bool(validations) and validations[-1]["step"] == step
        metric = validations[-1]["loss"] if scored else float("inf")
        what = f"validation loss on {', '.join(Path(ds.path).name for ds in cfg.eval_data)} ({validation.size} samples)"
    else:
        finite = [x for x in since_save if math.isfinite(x)]
        metric = sum(finite) / len(finite) if finite else float("inf")
        what = "mean train loss since the last save"
    return (metric if math.isfinite(metric) else float("inf")), what


def noise_seed(seed: int, draw: int) -> int:
    """The seed of a training step's ``draw``-th denoising-noise draw under the stage's ``seed``."""
    return (seed * 1_000_003 + draw) % 2**63


def _forward_backward(accelerator, model, batches: list[dict[str, Any]], cfg: StageConfig,
                      normalizers: dict[str, float], step: int, deepspeed: bool, fallback: dict[str, Any] | None,
                      first_readable: Callable[[], dict[str, Any]]) -> tuple[float, dict[str, torch.Tensor], Any]:
    """A step's micro-batches through forward and backward: gradients accumulate locally and are
    all-reduced once, at the last. A micro-batch whose every sample was unreadable runs ``fallback`` (the
    last readable batch, else ``first_readable()``) with weight 0, so that this process still joins the
    gradient all-reduce. Returns the step's loss summed over processes, this process's loss parts (on its
    device, unread), and the fallback for later steps."""
    world = accelerator.num_processes
    step_loss, parts = torch.zeros((), device=accelerator.device), {}
    saw_nonfinite = False
    for micro, batch in enumerate(batches):
        empty = "input_ids" not in batch
        if empty:
            fallback = fallback or first_readable()
            batch = fallback
        else:
            fallback = batch
        batch["step"] = step
        # the denoising loss's noise and timesteps: one draw per micro-batch of the whole step (seeding by the
        # step alone gave every micro-batch and process the same timesteps and noise), reproducible on resume,
        # and another for another `seed` (as the sample order and dropout are)
        batch["noise_seed"] = noise_seed(cfg.seed, (step * len(batches) + micro) * world + accelerator.process_index)
        sync = micro == len(batches) - 1
        with contextlib.ExitStack() as stack:
            if not sync:  # accumulate locally; all-reduce once per optimiser step
                stack.enter_context(accelerator.no_sync(model))
            with accelerator.autocast():
                out = model(batch, cfg.losses, normalizers)
            # DDP averages gradients over processes; the normalizers already span them all.
            loss = out["loss"] * (0.0 if empty else world)
            if deepspeed:
                saw_nonfinite = saw_nonfinite or not bool(torch.isfinite(loss.detach()))
                zero.backward(model, loss, boundary=sync, poison=sync and saw_nonfinite)
            else:
                accelerator.backward(loss)
        if empty:
            continue
        step_loss += loss.detach().float() / world
        for k, v in out.items():
            parts[k] = parts[k] + v.detach().float() if k in parts else v.detach().float()
    return float(accelerator.reduce(step_loss, "sum")), parts, fallback


def _clip_and_step(accelerator, optimizer, params, max_grad_norm: float,
                   step_loss: float) -> tuple[str, float | None]:
    """Check, clip and step; returns "stepped", "nonfinite" (skipped) or "overflow" (an fp16
    overflow, skipped: normal while the loss scale settles; the scale is lowered), and the gradients'
    total norm before clipping (None when the loss was not finite: not read).

    The total norm is computed once (as ``Accelerator.clip_grad_norm_`` does, sharding-aware) and is the
    finite check: a finite norm means every gradient on every process is finite. A norm that is not
    finite (a gradient that is not, or a sum of squares past float32's range) is checked gradient by
    gradient, so that the skip decision is exactly :func:`_all_finite`'s."""
    scaler = accelerator.scaler  # fp16: gradients are scaled until unscaled here (accelerate's clip would again)
    if scaler is not None:
        accelerator.unscale_gradients()
    total_norm = total_grad_norm(params)  # every process: under FSDP it all-reduces the shards' norms
    grad_norm = float(total_norm) if math.isfinite(step_loss) else None  # the step's one read of its gradients
    finite = grad_norm is not None and (math.isfinite(grad_norm) or _all_finite(accelerator, step_loss, params))
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and math.isfinite(step_loss):
            scaler.update()
            return "overflow", grad_norm
        return "nonfinite", grad_norm
    if max_grad_norm:
        clip_to(params, max_grad_norm, total_norm)
    optimizer.step()
    return "stepped", grad_norm


def _restore_loss_scale(accelerator, progress: dict[str, Any], last: Path) -> None:
    """fp16: the gradient scaler's state from the checkpoint, so a resumed run does not start again from
    the initial loss scale (skipping steps as overflows while it settles) and ends where an uninterrupted
    run does. A checkpoint of a run without fp16 has none: the scaler starts afresh, as it says."""
    scaler = accelerator.scaler
    if scaler is None:
        return
    if progress.get("grad_scaler"):
        scaler.load_state_dict(progress["grad_scaler"])
    else:
        log.info("--resume: %s holds no fp16 loss scale (trained without fp16); the scaler starts at %s",
                 last, scaler.get_scale())


def _on_main_process_for_all(accelerator, work: Callable[[], None]) -> None:
    """Run ``work`` on the main process while the others wait; when it raises, every process raises its
    message (the main process its own exception; the others one of its kind, naming the main process:
    :class:`~mmllm.training.faults.Failure`), so that all of them stop with the one error and exit code instead
    of the others waiting at a barrier until the launcher kills them."""
    from accelerate.utils import broadcast_object_list

    failure: Exception | None = None
    report: list[Failure | None] = [None]
    if accelerator.is_main_process:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 -- every kind reaches the other processes, then is raised
            failure, report = exc, [Failure.of(exc, accelerator.process_index)]
    report = broadcast_object_list(report)  # a barrier too
    if failure is not None:
        raise failure
    if report[0] is not None:
        raise report[0].error()


def _recover_partial_writes(out_dir: Path) -> None:
    """Before ``--resume`` picks its checkpoint: put back a checkpoint a kill left mid-rename, delete the rest."""
    try:
        restored, removed = ckpt.recover_partial_writes(out_dir)
    except OSError as exc:
        raise ConfigError(f"--resume: could not tidy what a killed checkpoint write left in {out_dir}: {exc}; "
                          "fix the folder's permissions and run again") from exc
    for folder in restored:
        log.warning("--resume: restored %s, which a run killed while saving it left as a working folder", folder.name)
    if removed:
        log.info("--resume: removed %d partly written checkpoint folder(s) a killed run left in %s", removed, out_dir)


def _autocast_under_fsdp(plugin) -> None:
    """Mixed precision under FSDP is autocast, as under DDP: frozen parameters keep their dtype
    (Accelerate upcasts trainable ones to fp32) and gradients are reduced in fp32. Accelerate's bf16
    policy would cast every sharded parameter to bf16 -- the frozen core's norms and residual stream,
    and the learned glue too: in the tiny 2-process test that put the losses 0.17% from fp32
    (autocast: 0.04%, and exactly DDP's). To halve the frozen core's memory and all-gather traffic,
    give it `dtype: bfloat16` in the assembly."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if plugin.fsdp_version != 2:
        raise ConfigError(f"FSDP version {plugin.fsdp_version}: mmllm trains with FSDP2; set `fsdp_version: 2` "
                          "in the accelerate config (see configs/accelerate/fsdp.yaml)")
    plugin.mixed_precision_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)


def _peak_memory() -> str:
    """This process's own peak: not its launcher's (``accelerate launch`` execs each rank from a process holding
    torch, whose resident size ``ru_maxrss`` would count)."""
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MB allocated on the GPU"
    peak = peak_resident_mb()
    return "unknown (resident)" if peak is None else f"{peak:.0f} MB resident"


def _core_dtype(model: AnyToAnyModel) -> torch.dtype:
    """The dtype most of the LLM core's parameters have (its signal rows are fp32 whatever the core's)."""
    held: dict[torch.dtype, int] = {}
    for param in model.llm.model.parameters():
        held[param.dtype] = held.get(param.dtype, 0) + param.numel()
    return max(held, key=held.__getitem__)


def _parameter_megabytes(model: torch.nn.Module) -> tuple[float, float]:
    """(held by this process, whole model): an FSDP shard counts its local part."""
    params = list(model.parameters())
    return _megabytes(_local_part(p) for p in params), _megabytes(params)  # a DTensor's numel is the whole's


def _optimizer_megabytes(optimizer) -> float:
    """The optimizer state this process holds: under FSDP its shards, under ZeRO its partitions."""
    state = ckpt.bare_optimizer(optimizer).state.values()
    return _megabytes(_local_part(v) for s in state for v in s.values() if torch.is_tensor(v))


def _megabytes(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _local_part(t: torch.Tensor) -> torch.Tensor:
    """This process's part of an FSDP shard (a DTensor); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def join_processes():
    """Under a launcher (``WORLD_SIZE`` > 1): start torch.distributed as :func:`train` would (Accelerate's
    process state, on gloo without an accelerator device) and return that state. The command calls it before
    it reads the stage config: a config one machine cannot read (a file missing there, a bad override on its
    command line) then stops every process with its message; a process that stopped before joining left the
    others waiting to connect to it until torch.distributed timed out (still waiting after 5 minutes
    in a 2-machine test). ``accelerate launch --cpu`` (``ACCELERATE_USE_CPU``) keeps the processes on CPU, as the
    Accelerator would: the state started here is the one it then takes over."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    _deepspeed_on_cpu_without_a_device()
    return PartialState(cpu=not _has_accelerator_device() or parse_flag_from_env("ACCELERATE_USE_CPU"))


def _deepspeed_on_cpu_without_a_device() -> None:
    if not _has_accelerator_device():
        # DeepSpeed (imported by Accelerate when installed) otherwise warns on every process that it found
        # no accelerator and uses the CPU, which is what a machine without one does
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _reset_single_process_state() -> None:
    """Accelerate keeps one global state per process; let one process run several stages with
    different settings (e.g. mixed precision) one after another. Never reset a distributed run."""
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's own tests do the same


def _has_accelerator_device() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool(torch.cuda.is_available() or (mps and mps.is_available()) or (xpu and xpu.is_available()))


def _freeze_dropout(model: AnyToAnyModel) -> None:
    """The frozen core runs in eval mode (LoRA's dropout modules alone train): its hidden states must be
    a function of the input, as at inference and as the decode-align cache assumes. Turning off only its
    ``nn.Dropout`` modules is not enough: transformers applies attention dropout (Llama, Qwen, Mistral,
    Phi, ...: ``config.attention_dropout``) and some models residual dropout and layer drop (OPT's
    ``dropout``, ``layerdrop``) by ``self.training``. Under gradient checkpointing transformers checkpoints
    only in training mode (and only then turns the KV cache off), so the modules it checkpoints keep
    that mode, with the dropout rates they hold themselves set to 0 (their submodules are in eval mode)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    zeroed = set()
    for name, module in model.llm.model.named_modules():
        if "lora_" in name or isinstance(module, BaseTunerLayer):
            continue  # LoRA's own modules (its dropout) keep the training mode model.train() gave them
        checkpointed = getattr(module, "gradient_checkpointing", False) is True
        module.training = checkpointed  # per module: Module.train() would recurse into the LoRA modules too
        if checkpointed:
            for attr, value in vars(module).items():
                if ("dropout" in attr or "layerdrop" in attr) and isinstance(value, float) and value > 0:
                    setattr(module, attr, 0.0)
                    zeroed.add(attr)
    if zeroed:
        log.info("frozen LLM: dropout rates %s of the checkpointed modules set to 0 (they stay in training mode "
                 "for gradient checkpointing)", sorted(zeroed))


def _first_readable_batch(datasets: list[StageDataset], pad_id: int) -> dict[str, Any]:
    """A deterministic stand-in batch (the first readable sample) for a micro-batch with none."""
    for ds in datasets:
        for i in range(len(ds)):
            batch = collate([ds[i]], pad_id)
            if "input_ids" in batch:
                return batch
    raise ConfigError("no sample of any dataset can be read; see the warnings above")


def _part_keys(model: AnyToAnyModel) -> list[str]:
    return ["ce", "retain"] + [f"{kind}_{m}" for m in sorted(model.decoders) for kind in ("mse", "denoise")]


def _read_step(cfg: StageConfig, sampler, datasets: list[StageDataset], step: int, rank: int, world: int,
               exchange: Callable[[Callable[[], Any]], list[Any]], pad_id: int,
               stop: StopRequests) -> tuple[list[dict[str, Any]], ReadStopped | None]:
    """The micro-batches of ``step`` on this process, and the read given up on a stop, if one was: a signal ends
    a failed read's wait for its retry (a wait ran up to 36 s), and a step without that sample (or with its
    ``group_by_length`` length taken for 0) is not the step an uninterrupted run trains. A length that
    :meth:`~mmllm.data.dataset.LengthGroupedSampler.share_lengths` gives up is given up on every process at the
    same call; a sample's read on this process only, so the rest of the step's lengths are still shared (the
    others exchange them) and the caller tells every process (:func:`_global_counts`)."""
    batches: list[dict[str, Any]] = []
    given_up: ReadStopped | None = None
    with waits_end_when(lambda: stop.name is not None):
        for micro in range(cfg.grad_accum):
            if world > 1 and isinstance(sampler, LengthGroupedSampler):  # each process tokenizes 1/world
                try:
                    sampler.share_lengths(step, micro, cfg.grad_accum, rank, world, cfg.batch_size, exchange)
                except ReadStopped as exc:  # on every process, at this call
                    return batches, exc
            if given_up is not None:
                continue
            try:
                picks = sampler.micro_batch(step, micro, cfg.grad_accum, rank, world, cfg.batch_size)
                batches.append(collate([datasets[d][i] for d, i in picks], pad_id))
            except ReadStopped as exc:
                given_up = exc
    return batches, given_up


def _global_counts(
    accelerator, batches: list[dict[str, Any]], keys: list[str], model: AnyToAnyModel, given_up: bool = False
) -> tuple[dict[str, float], float, float, bool]:
    """Units (label tokens, text-only tokens, signal groups; for ``denoise_*`` the groups with target media)
    per loss part over the whole step, and the step's readable samples and real tokens
    (:func:`~mmllm.training.metrics.batch_size_counts`), all summed over processes in one reduction, which also
    tells whether any process ``given_up`` a read of the step on a stop (:func:`_read_step`)."""
    local = dict.fromkeys(keys, 0.0)
    for b in batches:
        if "labels" not in b:
            continue
        for k, n in unit_counts(b, model).items():
            local[k] += n
    vec = torch.tensor([local[k] for k in keys] + list(batch_size_counts(batches)) + [float(given_up)],
                       dtype=torch.float64, device=accelerator.device)
    *units, samples, tokens, stopped = accelerator.reduce(vec, "sum").tolist()
    return {k: float(v) for k, v in zip(keys, units) if v > 0}, samples, tokens, stopped > 0


def _all_finite(accelerator, loss: float, params: list[torch.nn.Parameter]) -> bool:
    """Whether the loss and every process's gradients are finite. Each gradient's check stays on its device
    and one reduction reads them all (a check per tensor read back was one device sync per parameter)."""
    # the local part: a DTensor's .all() would be a collective, and ranks leave this check apart
    finite = [torch.isfinite(_local_part(p.grad)).all().to(accelerator.device) for p in params if p.grad is not None]
    bad = torch.tensor(0.0 if math.isfinite(loss) else 1.0, device=accelerator.device)
    if finite:
        bad = bad + (~torch.stack(finite).all()).float()
    return float(accelerator.reduce(bad, "sum")) == 0.0


def save(accelerator, model, cfg, out_dir, step, optimizer, scheduler, losses, skipped, metric,
         run_info: dict[str, Any], metric_name: str = "mean train loss since the last save",
         validations: list | None = None) -> None:
    """``run_info``: the processes and samples per data set, which ``--resume`` compares (:mod:`.resume`);
    ``metric``: what ``keep_best`` compares (``metric_name``); ``validations``: the held-out scores so far."""
    from accelerate.utils import gather_object

    accelerator.wait_for_everyone()
    inner = _unwrap(accelerator, model)
    # on every process: under FSDP these gather the shards
    gathered = inner.learned_state_dict(), inner.lora_state_dict()
    optim_state = ckpt.optimizer_state(model, optimizer)
    rng_states = gather_object([ckpt.rng_state()])  # every process's: each draws its own dropout masks
    extra = ckpt.stage_meta(cfg) | {"step": step, "metric": metric, "metric_name": metric_name}

    def fill(tmp: Path) -> None:
        ckpt._write_model_files(inner, tmp, extra, gathered)
        progress = {"losses": losses, "skipped": skipped, "validation": validations or []} | run_info
        if accelerator.scaler is not None:  # fp16: the loss scale it has settled on, and its growth count
            progress["grad_scaler"] = accelerator.scaler.state_dict()
        ckpt.save_training_state(tmp, optim_state, scheduler, step, progress, rng_states)

    def write() -> None:
        # finite gradients can still make weights NaN or inf (an update past float32's range, AdamW's 0/0 at eps=0)
        ckpt.refuse_to_save_nonfinite(*gathered, out_dir / f"step-{step}")
        try:
            path = ckpt.atomic_dir(out_dir / f"step-{step}", fill)
        except Exception as exc:  # disk full, quota, permissions changed mid-run: say so in one line
            failure = ckpt.write_failure(out_dir / f"step-{step}", exc)
            if failure is None:
                raise
            raise failure from exc
        ckpt.record_best(out_dir, path, metric, enabled=cfg.keep_best, metric_name=metric_name)
        ckpt.prune_checkpoints(out_dir, cfg.keep_last, up_to=step)
        log.info("saved %s (%s %.4f)", path, metric_name, metric)

    _on_main_process_for_all(accelerator, write)  # a failed write stops every process with its message


def _link_final(out_dir: Path, final: Path) -> None:
    """``final.json``: which checkpoint the finished stage ends at (what a next stage's ``init_from`` may name)."""
    try:
        atomic_write_text(out_dir / "final.json", json.dumps({"checkpoint": final.name}))
    except OSError as exc:
        raise OSError(exc.errno, f"could not write {out_dir / 'final.json'} ({exc.strerror or exc}); the stage's "
                      f"checkpoints are written, its last is {final}: free space or fix permissions and run with "
                      "--resume to write it") from exc


def _unwrap(accelerator, model) -> AnyToAnyModel:
    return accelerator.unwrap_model(model)


def _tracker_config(cfg: StageConfig) -> dict[str, Any]:
    """The stage's settings as the tracker's hyperparameters: dotted keys, values a number, text or bool."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_keys(to_dict(cfg)).items()}


def check_output_dir(out_dir: Path) -> None:
    """Fail before training if the output dir cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # per process: ranks probe at the same time, and on a shared folder those of other machines too, whose
        # pids may be this one's (a container per machine numbers its processes alike)
        probe = out_dir / f".write-probe-{secrets.token_hex(8)}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise OSError(f"cannot write to output_dir {out_dir}: {exc}; {output_dir_advice(exc)}") from exc


def output_dir_advice(exc: OSError) -> str:
    """What to do about ``exc``, raised making or writing into output_dir: a file where a folder of the path goes
    was told to "fix permissions or free space"."""
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):  # a file on the path, or output_dir itself a file
        return "a file stands where a folder of that path goes: give another output_dir, or move the file"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on its disk, or give an output_dir on another"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "give an output_dir you can write, or fix its permissions"
    return "fix permissions or free space"
