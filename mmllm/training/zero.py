"""DeepSpeed ZeRO-1/2 under the training loop (``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml``).

The DeepSpeed engine owns what the loop does itself elsewhere: it reduces and partitions the
gradients, clips them and steps the optimizer. What this module makes it do the loop's way:

- the stage YAML decides batch size, gradient accumulation and clipping (written into the
  DeepSpeed config before ``deepspeed.initialize``), and the loop's losses are already normalised
  over the whole step, so the engine does not divide them by the accumulation count again;
- mixed precision is autocast, as under DDP and FSDP: DeepSpeed's own bf16 casts every parameter of
  the module, the frozen encoders, decoders and the core's norms included; fp16 is refused;
- a step with a non-finite loss or gradient is skipped: the engine checks the gradients it holds
  (partitioned, never whole on one process) and skips the update itself;
- the optimizer state is saved whole and by parameter name -- the format of every other mode, so a
  ZeRO run resumes in one process and the other way round -- and re-partitioned on resume.

ZeRO-3 (which partitions the parameters too) is refused: use FSDP for that.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import torch

from mmllm.config import ConfigError, StageConfig

log = logging.getLogger(__name__)


def is_engine(model: Any) -> bool:
    """Whether ``model`` is a DeepSpeed engine (without importing DeepSpeed when nothing else did)."""
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


def configure(plugin, cfg: StageConfig, world: int) -> str:
    """Fill the DeepSpeed config Accelerate hands to ``deepspeed.initialize`` from the stage; returns
    the precision in effect, for the log. Refuses what the loop cannot run, before any model is built."""
    ds = plugin.deepspeed_config
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage not in (1, 2):
        raise ConfigError(f"DeepSpeed ZeRO stage {stage}: mmllm trains with ZeRO stage 1 or 2 (`zero_stage: 2` in "
                          "the accelerate config, as configs/accelerate/deepspeed_zero2.yaml); to shard the "
                          "parameters too, use FSDP (configs/accelerate/fsdp.yaml)")
    zero_cfg = ds["zero_optimization"]
    offload = {k: zero_cfg.get(k, {}).get("device", "none") for k in ("offload_optimizer", "offload_param")}
    if any(str(v).lower() not in ("none", "auto") for v in offload.values()):
        raise ConfigError(f"DeepSpeed ZeRO offload ({offload}): not supported -- the state it would move is the "
                          "learned glue's optimizer state, tens of MB; set offload_optimizer_device and "
                          "offload_param_device to none in the accelerate config")
    wanted = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
              "train_batch_size": cfg.batch_size * cfg.grad_accum * world,
              "gradient_clipping": float(cfg.optim.max_grad_norm or 0.0)}
    for key, value in wanted.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            log.warning("DeepSpeed config %s=%s replaced by the stage's %s (the stage YAML decides batch, "
                        "accumulation and clipping in every mode)", key, given, value)
        ds[key] = value
    if str(zero_cfg.get("round_robin_gradients", False)).lower() == "true":
        # DeepSpeed then lays the partitions out in another order than its fragment addresses say
        # (its own safe_get_full_* helpers read the wrong elements too), and the optimizer state
        # mmllm saves would be scrambled
        raise ConfigError("DeepSpeed zero_optimization.round_robin_gradients: not supported; set it to false")
    if _enabled(ds, "fp16"):
        raise ConfigError("DeepSpeed fp16 casts every parameter to float16, the frozen encoders and decoders "
                          "too; use mixed_precision bf16 (autocast) under DeepSpeed, or fp16 under DDP")
    if _enabled(ds, "bf16"):
        ds["bf16"] = {"enabled": False}
        # autocast, as under DDP/FSDP; an empty list keeps every gradient's reduction in fp32
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    autocast = ds.get("torch_autocast", {})
    return f"{autocast.get('dtype', 'bf16')} (autocast)" if autocast.get("enabled") else "no"


def _enabled(ds: dict[str, Any], key: str) -> bool:
    value = ds.get(key, {}).get("enabled", False)
    return value is True or str(value).lower() == "true"


def after_prepare(engine) -> None:
    """Have the engine check its (partitioned) gradients for inf/nan before every update and skip the
    update if any process has one. Outside fp16 DeepSpeed otherwise notices them only through the norm
    it computes for clipping (`zero_optimization.compute_grad_norm`, on by default)."""
    engine.optimizer.check_grad_overflow = True


def backward(engine, loss: torch.Tensor, boundary: bool, poison: bool) -> None:
    """One micro-batch's backward. ``boundary``: the step's last micro-batch. ``poison``: this process
    saw a non-finite loss this step; its gradients are made non-finite too, so that the engine's
    gradient check -- the one way to have it skip the update -- sees it whatever the loss's gradient."""
    if poison:
        loss = loss * math.nan
    engine.set_gradient_accumulation_boundary(boundary)
    engine.backward(loss, scale_wrt_gas=False)  # the loop's loss is already normalised over the step


def step(engine) -> bool:
    """Clip and step (the engine skips the update when a gradient on any process is not finite);
    returns whether the update was applied."""
    skipped = engine.skipped_steps
    engine.step()
    return engine.skipped_steps == skipped


# --------------------------------------------------------------------------------------------
# Optimizer state: whole and by parameter name
# --------------------------------------------------------------------------------------------


def _groups(engine):
    """Per ZeRO parameter group: (the model's parameters, this process's flat fp32 partition)."""
    zero = engine.optimizer
    return list(zip(zero.bit16_groups, zero.single_partition_of_fp32_groups, strict=True))


def _names(engine) -> dict[int, str]:
    return {id(p): n for n, p in engine.module.named_parameters()}


def optimizer_state(engine, is_main: bool) -> dict[str, Any]:
    """The optimizer state in the layout of torch's full optimizer state dict (what every other mode
    saves): ``state`` by parameter name, whole; ``param_groups`` listing names. Each process holds
    its partition of each moment; a collective: every process calls it. The main process gets it."""
    base, names = engine.optimizer.optimizer, _names(engine)
    saved: dict[str, Any] = {"state": {}, "param_groups": []}
    for (params, flat), group in zip(_groups(engine), base.param_groups, strict=True):
        saved["param_groups"].append({**{k: v for k, v in group.items() if k != "params"},
                                      "params": [names[id(p)] for p in params]})
        state = base.state.get(flat, {})
        for p in params:
            entry = {}
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == flat.shape:
                    whole = _gather(p, value)  # a collective: on every process, kept on the main one
                    entry[key] = whole.cpu() if is_main else None
                else:
                    entry[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
            if entry:
                saved["state"][names[id(p)]] = entry
    return saved if is_main else {}


def _gather(p: torch.nn.Parameter, flat_state: torch.Tensor) -> torch.Tensor:
    """The whole of one parameter's slice of a partitioned flat state (every process calls it)."""
    import deepspeed.comm as dist

    full = torch.zeros(p.numel(), dtype=flat_state.dtype, device=flat_state.device)
    mapping = p._hp_mapping
    if mapping is not None:  # this process's partition holds part of p
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        full.narrow(0, lp.start, lp.numel).copy_(flat_state.narrow(0, hp.start, hp.numel))
    dist.all_reduce(full, group=p._dp_group)
    return full.view_as(p)


def restore_optimizer_state(engine, saved: dict[str, Any], where: str) -> None:
    """Load a whole, by-name optimizer state into the engine's partitions (each process keeps its own),
    and the saved hyperparameters (the learning rate of the step it stopped at) into its groups.
    (A positional state with tensors, from an older mmllm, is refused by the caller.)"""
    from mmllm.training.checkpoint import CheckpointError

    base, names = engine.optimizer.optimizer, _names(engine)
    zero_groups = _groups(engine)
    if any(isinstance(n, int) for g in saved["param_groups"] for n in g["params"]):
        # torch's own layout, saved with no state yet (one process before its first step, or SGD
        # without momentum): the groups are in the order the optimizer was built, as ZeRO's are
        if len(saved["param_groups"]) != len(zero_groups):
            raise CheckpointError(f"{where}: {len(saved['param_groups'])} optimizer parameter group(s) saved, "
                                  f"{len(zero_groups)} now")
        saved = {"state": {}, "param_groups": [dict(g, params=[names[id(p)] for p in params])
                                               for g, (params, _) in zip(saved["param_groups"], zero_groups)]}
    saved_groups = {n: g for g in saved["param_groups"] for n in g["params"]}
    state, groups = {}, []
    for i, (params, flat) in enumerate(zero_groups):
        wanted = [names[id(p)] for p in params]
        # an empty state (no step yet, SGD without momentum) still carries the groups' hyperparameters
        missing = [n for n in wanted if n not in saved_groups or (saved["state"] and n not in saved["state"])]
        if missing:
            raise CheckpointError(f"{where}: no optimizer state for {missing[:5]}; was it saved by another stage "
                                  "or with other trainable groups?")
        groups.append({**{k: v for k, v in saved_groups[wanted[0]].items() if k != "params"}, "params": [i]})
        if not saved["state"]:
            continue
        entry = {}
        for key, value in saved["state"][wanted[0]].items():
            per_element = [saved["state"][n][key] for n in wanted]
            if all(torch.is_tensor(v) and v.shape == p.shape for v, p in zip(per_element, params, strict=True)) \
                    and key != "step":
                entry[key] = _partition(params, flat, per_element)
            else:
                entry[key] = value  # the step count, the same for every parameter of a group
        state[i] = entry
    base.load_state_dict({"state": state, "param_groups": groups})


def _partition(params: list[torch.nn.Parameter], flat: torch.Tensor, whole: list[torch.Tensor]) -> torch.Tensor:
    """This process's flat partition of one state, from each parameter's whole tensor."""
    out = torch.zeros_like(flat)
    for p, value in zip(params, whole, strict=True):
        mapping = p._hp_mapping
        if mapping is None:
            continue
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        out.narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))
    return out
