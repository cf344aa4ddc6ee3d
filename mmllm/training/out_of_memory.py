"""A training run that runs out of memory stops with one message: where (the stage, the step and what it was
doing: building and placing the model before the first step, the step's forward and backward, the validation,
the checkpoint save), the checkpoint ``--resume`` goes on from, and the settings of this stage that need less
memory, each named as the override that sets it.

The step under way is not saved: its optimizer step did not run (or ran half, under FSDP or ZeRO), and its
random state has moved, so a checkpoint of it would not resume exactly. The steps since the newest
checkpoint are lost, as after a kill; ``save_every`` bounds them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mmllm.config import ComponentSpec, ConfigError, StageConfig
from mmllm.locations import doc_page
from mmllm.memory import OutOfMemory, first_line, is_out_of_memory, ran_out_on_the_host
from mmllm.training import checkpoint as ckpt


@dataclass
class RunShape:
    """What the advice depends on beyond the stage config: how the run was launched and holds its core."""

    processes: int
    precision: str  # Accelerate's mixed precision: "no", "bf16", "fp16"
    # how the processes hold the model: FSDP shards every parameter, the frozen core's too; DeepSpeed ZeRO-1/2
    # partitions only the learned glue's gradients and optimizer state (tens of MB), the core replicated
    sharding: typing.Literal["none", "fsdp", "zero"]
    core_dtype: torch.dtype
    # whether the core's kind has a ``dtype`` option (hf-causal-lm does; tiny-llama, built in float32, does not):
    # else ``llm.dtype`` is no setting of this assembly, and an override of it is refused
    dtype_option: bool = True


BUILD = "building and placing the model"  # before the first step: built or loaded, moved to the device, prepared
STEP, VALIDATION, SAVE = "the forward and backward", "the validation", "saving its checkpoint"
# another assembly where output_dir holds no checkpoint: nothing to --resume, so no new output_dir needed
NO_CHECKPOINT_YET = "no checkpoint yet: the same command starts the run again with it"


def shape_before_build(cfg: StageConfig, processes: int, precision: str,
                       sharding: typing.Literal["none", "fsdp", "zero"]) -> RunShape:
    """The :class:`RunShape` of a run whose model is not built yet: its core's dtype and whether its kind takes
    one, read from the assembly :func:`planned_core` names (``cfg``: the stage as it is built, ``init_from``
    the checkpoint a ``--resume`` continues where it has one)."""
    from mmllm.llm import DTYPES

    core = planned_core(cfg)
    dtype_option = takes_dtype(core)
    dtype = DTYPES.get(core.options.get("dtype", "float32"), torch.float32) if dtype_option else torch.float32
    return RunShape(processes, precision, sharding, dtype, dtype_option)


def planned_core(cfg: StageConfig) -> ComponentSpec:
    """The LLM core a stage builds: ``init_from``'s recorded one where that checkpoint exists, else the stage's own
    (checked and compared by training already: read here without its warnings)."""
    from mmllm.config import load_assembly
    from mmllm.training.init_from import checkpoint_missing

    if cfg.init_from and not checkpoint_missing(cfg):
        return ckpt.checkpoint_assembly(Path(cfg.init_from)).llm
    return load_assembly(cfg.assembly, cfg.assembly_overrides).llm


@contextlib.contextmanager
def stops_on_out_of_memory(cfg: StageConfig, shape: RunShape, doing: str, step: int) -> Iterator[None]:
    """Turn torch running out of memory (:func:`~mmllm.memory.is_out_of_memory`: a GPU's ``torch.OutOfMemoryError``,
    the CPU allocator's ``RuntimeError``) while ``doing`` (at ``step``, 1-based) into
    :class:`~mmllm.memory.OutOfMemory` with the message :func:`message` writes; anything else passes as it is."""
    try:
        yield
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        raise OutOfMemory(message(cfg, shape, doing, step, first_line(exc), host=ran_out_on_the_host(exc))) from exc


def message(cfg: StageConfig, shape: RunShape, doing: str, step: int, what: str, host: bool = False) -> str:
    """The one line of a run that ran out of memory (``what``: torch's first line) while ``doing`` at ``step``;
    ``host``: the machine's memory ran out (torch's CPU allocator), not a GPU's."""
    out_dir = Path(cfg.output_dir)
    newest = ckpt.latest_checkpoint(out_dir)
    if newest is not None:
        finished = step if doing != STEP else step - 1  # a validation or save: its step had finished
        lost = max(0, finished - int(newest.name.removeprefix("step-")))
        kept = (f"the newest checkpoint, {newest}, is intact"
                + (f" (the {lost} step(s) after it are lost)" if lost else "")
                + ": the same command with --resume goes on from it")
    else:
        kept = f"no checkpoint was written yet in {out_dir}: the same command starts the run again"
    at = f"at step {step} of {cfg.max_steps}" if step else "before the first step"
    ways = ways_to_need_less(cfg, shape, doing, checkpointed=newest is not None, host=host)
    return (f"stage {cfg.stage} ran out of memory {at}, in {doing} ({what}); {kept}, "
            f"with settings that need less memory: {'; '.join(ways)} "
            f"({doc_page('distributed.md', 'Out of memory')})")


def ways_to_need_less(cfg: StageConfig, shape: RunShape, doing: str, checkpointed: bool = True,
                      host: bool = False) -> list[str]:
    """The settings of this run that would need less memory, most effective first, as the overrides to give.
    While the model is built and placed (:data:`BUILD`) only those that hold less of it: the batch, activations
    and autocast are not there yet. ``checkpointed``: ``output_dir`` holds a checkpoint of this run, which
    ``--resume`` would go on from (it refuses another assembly: a change of the assembly then needs a new
    ``output_dir``); without one the same command, the same ``output_dir``, starts again with any assembly.

    ``host``: the machine's memory ran out (torch's CPU allocator), not a GPU's. Then neither FSDP nor ZeRO
    (they share the model among GPUs; the processes of one machine share its memory) nor a GPU is a way out,
    nor is ``mixed_precision=bf16``: CPU autocast keeps bfloat16 copies of the weights beside the float32
    ones, and a few steps of a tiny stage peaked higher with it (docs/distributed.md, Measurements). A
    bfloat16 core holds its weights in half and is still listed."""
    ways = []
    building = doing == BUILD
    if cfg.batch_size > 1 and not building:
        factor = _smallest_factor(cfg.batch_size)
        effective = cfg.batch_size * cfg.grad_accum * shape.processes
        ways.append(f"batch_size={cfg.batch_size // factor} grad_accum={cfg.grad_accum * factor} (the same "
                    f"{effective} samples per optimizer step)")
    if not cfg.grad_checkpointing and doing not in (VALIDATION, BUILD):  # validation keeps no activations for a backward
        ways.append("grad_checkpointing=true")
    if shape.precision == "no" and not building and not host:  # autocast: the weights stay float32
        ways.append("mixed_precision=bf16")
    if not cfg.cache.require:
        ways.append("cache.dir=DIR cache.require=true after `mmllm cache --config CONFIG cache.dir=DIR` (the frozen "
                    "encoders are not held)")
    if not host:  # sharding divides the model among GPUs: the machine's memory holds every process's share
        ways += _sharding_ways(shape)
    if shape.core_dtype == torch.float32 and shape.dtype_option:
        where = "the first stage's assembly (init_from carries it)" if cfg.init_from else "the assembly"
        again = (", in a new output_dir (--resume refuses another assembly)" if checkpointed
                 else f" ({NO_CHECKPOINT_YET})")
        ways.append(f"llm.dtype: bfloat16 in {where}{again}")
    more = "a machine with more memory" if host else "a GPU with more memory"
    if building:
        return ways or [f"none left in this config: {more}"]
    again = ", in a new output_dir" if checkpointed else f"; {NO_CHECKPOINT_YET}"
    return ways or [f"none left in this config: {more}, or shorter samples (the assembly's max_length{again})"]


def _sharding_ways(shape: RunShape) -> list[str]:
    """FSDP, where the run does not shard the frozen core yet: it divides the model among the GPUs."""
    if shape.sharding == "zero":
        return ["FSDP instead of ZeRO (accelerate launch --config_file configs/accelerate/fsdp.yaml): ZeRO-1/2 "
                "partitions only the learned glue's gradients and optimizer state, FSDP shards the frozen core too"]
    if shape.sharding == "none":
        return ["FSDP over several GPUs, which shards the frozen core (accelerate launch --config_file "
                "configs/accelerate/fsdp.yaml)"]
    return []


def _smallest_factor(n: int) -> int:
    """The smallest factor of ``n`` above 1 (``n`` itself for a prime): splits a batch into equal micro-batches."""
    return next(f for f in range(2, n + 1) if n % f == 0)


def takes_dtype(llm: ComponentSpec) -> bool:
    """Whether the LLM core's kind has a ``dtype`` option (``llm.dtype: bfloat16`` is then a setting of its
    assembly); a kind that cannot be resolved here: no."""
    from mmllm import registry

    try:
        options = registry.resolve("llm", llm.kind, "llm").Options
    except ConfigError:
        return False
    return dataclasses.is_dataclass(options) and "dtype" in {f.name for f in dataclasses.fields(options)}
