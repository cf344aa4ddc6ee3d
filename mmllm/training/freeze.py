"""The one place that decides what learns, and logs it per component."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from mmllm.config import ConfigError
from mmllm.model import AnyToAnyModel
from mmllm.training.parts import StageParts

log = logging.getLogger(__name__)


@dataclass
class ComponentCount:
    name: str
    trainable: int
    frozen: int


def apply_trainable(model: AnyToAnyModel, flags: dict[str, bool], log_table: bool = True) -> list[ComponentCount]:
    """Freeze everything, then unfreeze exactly the groups whose flag is true; log the result."""
    model.requires_grad_(False)
    groups = model.glue_parameters()
    unknown = sorted(set(flags) - set(groups))
    if unknown:
        raise ConfigError(f"unknown trainable group(s) {unknown}; valid: {sorted(groups)}")
    if flags.get("lora") and not groups["lora"]:
        raise ConfigError("trainable.lora is true but no LoRA adapter is attached (set the stage's `lora:` file)")
    for group, params in groups.items():
        for p in params.values():
            p.requires_grad_(bool(flags.get(group, False)))
    report = count_parameters(model)
    for row in report if log_table else []:
        log.info("%-28s %s  trainable %12s  frozen %12s", row.name,
                 "TRAINABLE" if row.trainable else "frozen   ", f"{row.trainable:,}", f"{row.frozen:,}")
    return report


def count_parameters(model: AnyToAnyModel, parts: StageParts | None = None) -> list[ComponentCount]:
    """Per component: trainable and frozen parameter counts (shared parameters counted once). Given
    ``parts``, what a stage holding only those would hold, counted on a model assembled whole."""
    seen: set[int] = set()
    rows: list[ComponentCount] = []

    def add(name: str, params: list[nn.Parameter]) -> None:
        t = f = 0
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                t += p.numel()
            else:
                f += p.numel()
        rows.append(ComponentCount(name, t, f))

    groups = model.glue_parameters()
    add("llm.signal_embeddings", list(groups["signal_embeddings"].values()))
    add("llm.lora", list(groups["lora"].values()))
    add("llm (original weights)", list(model.llm.parameters()))
    for m, mod in model.encoders.items():
        add(f"encoders.{m}", list(mod.parameters()) if parts is None or m in parts.encoders else [])
    for m, mod in model.input_projections.items():
        add(f"input_projections.{m}", list(mod.parameters()))
    for m, mod in model.output_projections.items():
        add(f"output_projections.{m}", list(mod.parameters()))
    for m, mod in model.decoders.items():
        held = mod.parameters_of(parts.decoders.get(m, "config")) if parts is not None else mod.parameters()
        add(f"decoders.{m}", list(held))
    return rows
