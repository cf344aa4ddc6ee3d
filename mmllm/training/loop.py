"""The training recipe shared by the three stages, on Accelerate.

A stage differs only in its data (caption pairs or conversations), which groups learn, and which
losses count -- all declared in its YAML. The loop: build (or load ``init_from``), attach LoRA if
asked, apply the trainable set, check the data before any step, then optimise with gradient
accumulation, warmup + decay, clipping, a tqdm bar and TensorBoard; checkpoints hold only what
learned plus the resolved config and the training state needed for an exact ``--resume``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmllm.config import StageConfig, load_assembly, load_lora, to_dict
from mmllm.data.dataset import MixtureSampler, StageDataset, collate, load_stage_records
from mmllm.data.template import TokenSpec
from mmllm.model import AnyToAnyModel
from mmllm.training import checkpoint as ckpt
from mmllm.training.freeze import apply_trainable

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path
    losses: list[float]
    skipped: int
    steps: int


def token_spec(model: AnyToAnyModel) -> TokenSpec:
    from mmllm.llm import signal_token_strings

    return TokenSpec(
        placeholder_ids=model.llm.placeholder_ids,
        media_tokens={m: p.num_tokens for m, p in model.input_projections.items()},
        signal_tokens={m: signal_token_strings(m, n) for m, n in model.config.signal_tokens.items()},
        signal_ids=model.llm.signal_ids,
        max_length=model.config.max_length,
    )


def build_model(cfg: StageConfig) -> AnyToAnyModel:
    """The stage's model: the previous stage's checkpoint if named, else a fresh assembly."""
    if cfg.init_from:
        log.info("initialising from %s", cfg.init_from)
        model = AnyToAnyModel.from_pretrained(cfg.init_from, trainable_lora=True)
    else:
        model = AnyToAnyModel.assemble(load_assembly(cfg.assembly, cfg.assembly_overrides))
    flags = cfg.resolved_trainable()
    if cfg.lora and model.lora_config is None:
        model.add_lora(load_lora(cfg.lora))
    elif flags["lora"] and model.lora_config is None:
        raise ValueError(f"stage {cfg.stage}: trainable.lora is on but no `lora:` file is set")
    return model


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


def train(cfg: StageConfig, resume: bool = False, accelerator=None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    out_dir = Path(cfg.output_dir)
    if accelerator is None:
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_dir=str(out_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
    check_output_dir(out_dir)
    set_seed(cfg.seed)
    model = build_model(cfg)
    flags = cfg.resolved_trainable()
    apply_trainable(model, flags)
    if cfg.grad_checkpointing:
        model.llm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.llm.model.enable_input_require_grads()

    per_dataset, weights, errors = load_stage_records(cfg.data, cfg.stage)
    spec = token_spec(model)
    preprocess = {m: enc.preprocess for m, enc in model.encoders.items()}
    datasets = [
        StageDataset(convs, model.llm.tokenizer, spec, preprocess, load_output_media=cfg.losses.denoise > 0)
        for convs in per_dataset
    ]
    sampler = MixtureSampler([len(d) for d in datasets], weights, cfg.seed)
    log.info("stage %s: %d samples in %d dataset(s), %d malformed record(s) skipped",
             cfg.stage, sampler.epoch_size, len(datasets), len(errors))

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"stage {cfg.stage}: nothing is trainable; check the stage's `trainable:` flags")
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    start_step, losses, skipped = 0, [], 0
    if resume:
        last = ckpt.latest_checkpoint(out_dir)
        if last is None:
            log.warning("--resume: no complete checkpoint under %s; starting from step 0", out_dir)
        else:
            state = AnyToAnyModel.from_pretrained(last, trainable_lora=True)
            model.load_learned_state_dict(state.learned_state_dict(), str(last))
            if state.lora_config is not None:
                with torch.no_grad():
                    src = state.lora_parameters()
                    for name, p in model.lora_parameters().items():
                        p.copy_(src[name])
            progress = ckpt.load_training_state(last, optimizer, scheduler)
            start_step, losses, skipped = progress["step"], progress.get("losses", []), progress.get("skipped", 0)
            log.info("resumed from %s at step %d", last, start_step)

    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers(f"{cfg.stage}", config=_flat(to_dict(cfg)))
    world, rank = accelerator.num_processes, accelerator.process_index
    pad_id = _unwrap(accelerator, model).llm.tokenizer.pad_token_id

    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
               desc=cfg.stage, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    model.train()
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        step_loss, parts = 0.0, {}
        for micro in range(cfg.grad_accum):
            picks = sampler.micro_batch(step, micro, cfg.grad_accum, rank, world, cfg.batch_size)
            batch = collate([datasets[d][i] for d, i in picks], pad_id)
            skipped += len(batch["skipped"])
            if "input_ids" not in batch:
                continue
            batch["step"] = step
            with accelerator.autocast():
                out = model(batch, cfg.losses)
            loss = out["loss"] / cfg.grad_accum
            accelerator.backward(loss)
            step_loss += float(loss.detach())
            for k, v in out.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        if cfg.optim.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step_loss = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "mean"))
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", skipped=skipped)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            accelerator.log({f"train/{k}": v for k, v in parts.items()} | {"train/lr": scheduler.get_last_lr()[0]},
                            step=step + 1)
        done = step + 1 == cfg.max_steps
        if done or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            save(accelerator, model, cfg, out_dir, step + 1, optimizer, scheduler, losses, skipped)
    bar.close()
    accelerator.end_training()
    final = out_dir / f"step-{cfg.max_steps}"
    if accelerator.is_main_process:
        _link_final(out_dir, final)
    accelerator.wait_for_everyone()
    return TrainResult(out_dir, final, losses, skipped, cfg.max_steps)


def save(accelerator, model, cfg, out_dir, step, optimizer, scheduler, losses, skipped) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        inner = _unwrap(accelerator, model)
        extra = ckpt.stage_meta(cfg) | {"step": step}

        def fill(tmp: Path) -> None:
            ckpt._write_model_files(inner, tmp, extra)
            ckpt.save_training_state(tmp, optimizer, scheduler, step, {"losses": losses, "skipped": skipped})

        path = ckpt.atomic_dir(out_dir / f"step-{step}", fill)
        ckpt.prune_checkpoints(out_dir, cfg.keep_last)
        log.info("saved %s", path)
    accelerator.wait_for_everyone()


def _link_final(out_dir: Path, final: Path) -> None:
    (out_dir / "final.json").write_text(json.dumps({"checkpoint": final.name}))


def _unwrap(accelerator, model) -> AnyToAnyModel:
    return accelerator.unwrap_model(model)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def check_output_dir(out_dir: Path) -> None:
    """Fail before training if the output dir cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-probe"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise OSError(f"cannot write to output_dir {out_dir}: {exc}; fix permissions or free space") from exc
