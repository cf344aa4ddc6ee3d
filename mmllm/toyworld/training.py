"""A small, resumable training loop shared by every toy-world part.

A :class:`Recipe` says what learns (:meth:`~Recipe.trainable`), what one step's loss is (a pure
function of the step index: data come from seeded samplers) and how the result is exported. The
loop adds AdamW, linear warm-up then cosine decay to 10 %, gradient clipping, a progress bar, and a
checkpoint (modules, optimizer, step, losses) every ``save_every`` steps: ``resume=True`` continues
from it and reaches the same weights as an uninterrupted run (torch's global RNG is re-seeded from
``(seed, step)`` at every step, so dropout masks do not depend on where a run was interrupted).
"""

from __future__ import annotations

import json
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmllm.atomic import atomic_write
from mmllm.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class Optim:
    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Recipe(ABC):
    """One part's training: ``name``, ``optim`` and ``seed`` set by the subclass."""

    name: str
    optim: Optim
    seed: int

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Modules whose state is checkpointed (trainable ones and any learned extras)."""

    @abstractmethod
    def trainable(self) -> list[nn.Parameter]:
        ...

    @abstractmethod
    def loss(self, step: int) -> torch.Tensor:
        """The loss of step ``step`` (its data are a pure function of ``(seed, step)``)."""

    @abstractmethod
    def export(self, folder: Path) -> dict[str, Any]:
        """Write the finished part under ``folder``; return manifest extras (metrics, files)."""

    def describe(self) -> dict[str, Any]:
        """Everything that defines the run (a resume refuses a checkpoint made with another)."""
        return {}


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # wall clock
    step_cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time (all threads)


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def train(
    recipe: Recipe,
    state_path: Path,
    resume: bool = False,
    save_every: int = 200,
    max_steps: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run ``recipe`` to ``recipe.optim.steps`` (or stop after ``max_steps`` more, for timing)."""
    params = recipe.trainable()
    optimizer = torch.optim.AdamW(params, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
    step, losses, elapsed = 0, [], 0.0
    identity = json.dumps(recipe.describe(), sort_keys=True, default=str)
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)  # tensors and plain values only
        if state["identity"] != identity:
            raise ValueError(
                f"{state_path} was made by a different configuration of {recipe.name}; "
                "delete it or run without --resume"
            )
        for name, module in recipe.modules().items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        step, losses, elapsed = state["step"], state["losses"], state["elapsed"]
        log.info("%s: resumed at step %d / %d", recipe.name, step, recipe.optim.steps)

    def save() -> None:
        _atomic_save(
            {
                "identity": identity,
                "modules": {n: m.state_dict() for n, m in recipe.modules().items()},
                "optimizer": optimizer.state_dict(),
                "step": step,
                "losses": losses,
                "elapsed": elapsed,
            },
            state_path,
        )

    end = recipe.optim.steps if max_steps is None else min(recipe.optim.steps, step + max_steps)
    step_seconds: list[float] = []
    step_cpu_seconds: list[float] = []
    bar = progress_bar(total=end, initial=step, desc=recipe.name, disable=not progress, dynamic_ncols=True)
    while step < end:
        started, cpu_started = time.perf_counter(), time.process_time()
        for group in optimizer.param_groups:
            group["lr"] = recipe.optim.lr_at(step)
        with torch.random.fork_rng(devices=[]):  # anything drawing from torch's global RNG (dropout) is
            torch.manual_seed(recipe.seed * 1_000_003 + step)  # a function of (seed, step): resumable
            loss = recipe.loss(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{recipe.name}: non-finite loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.optim.max_grad_norm)
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        took = time.perf_counter() - started
        elapsed += took
        step_seconds.append(took)
        step_cpu_seconds.append(time.process_time() - cpu_started)
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if save_every and step % save_every == 0 and step < end:
            save()
    bar.close()
    if max_steps is None or step >= recipe.optim.steps:
        save()
    return TrainResult(step, elapsed, losses, step_seconds, step_cpu_seconds)
