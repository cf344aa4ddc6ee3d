"""What a training run reports every ``log_every`` steps: one log line on the main process and the same
numbers to the tracker (TensorBoard), summed over the steps since the last report.

The numbers cost the step no device sync of their own: the loss and the gradient norm are read every
step anyway (the skip decision needs them), the sample and token counts ride along the per-step reduction
of the loss normalisers, and the loss parts stay on the device until the report, which reduces them
over processes once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def total_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The 2-norm of every gradient of ``params`` taken as one vector, over all processes, left on the
    device: what ``Accelerator.clip_grad_norm_`` computes (per FSDP mesh, a shard's norm all-reduced by
    ``full_tensor``; DDP's gradients are the same on every process, so no reduction there).
    Zero when no parameter has a gradient."""
    norms = [torch.nn.utils.get_total_norm([p.grad for p in group]) for group in grads_by_mesh(params)]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([_full(n) for n in norms]), 2)


def clip_to(params: list[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale the gradients so that their total norm (``total_norm``, :func:`total_grad_norm`) is at most
    ``max_norm``, per FSDP mesh as Accelerate does."""
    for group in grads_by_mesh(params):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total_norm)


def grads_by_mesh(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """The parameters with a gradient, grouped by their gradient's device mesh (one group without FSDP)."""
    groups: dict[object, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    return list(groups.values())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def batch_size_counts(batches: list[dict]) -> tuple[float, float]:
    """(samples, real tokens) in a step's collated micro-batches on this process: the readable samples
    and their non-padding tokens (the attention mask's ones; media placeholders count, padding does not)."""
    samples = sum(len(b["ids"]) for b in batches if "input_ids" in b)
    tokens = sum(float(b["attention_mask"].sum()) for b in batches if "input_ids" in b)
    return float(samples), tokens


@dataclass
class Interval:
    """The steps since the last report. ``keys``: the loss parts a step can have, the same on every process."""

    keys: list[str]
    steps: int = 0
    seconds: float = 0.0
    samples: float = 0.0  # over all processes
    tokens: float = 0.0
    skipped_updates: int = 0  # steps without an update: non-finite, fp16 overflow, empty
    losses: list[float] = field(default_factory=list)  # the finite step losses
    grad_norms: list[float | torch.Tensor] = field(default_factory=list)
    part_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # this process's, on its device
    part_steps: dict[str, int] = field(default_factory=dict)  # counted steps with units of the part

    def add(self, seconds: float, samples: float, tokens: float, loss: float, parts: dict[str, torch.Tensor],
            units: dict[str, float], grad_norm: float | torch.Tensor | None, updated: bool) -> None:
        """One step: its wall time, samples and tokens over all processes, its loss (over all processes),
        this process's loss parts, the parts' unit counts (over all processes), its pre-clipping gradient
        norm (None: not computed) and whether the optimiser updated. A step whose loss is not finite
        counts for the time and throughput only (as ``keep_best``'s mean train loss leaves it out)."""
        self.steps += 1
        self.seconds += seconds
        self.samples += samples
        self.tokens += tokens
        self.skipped_updates += not updated
        if grad_norm is not None and updated:
            self.grad_norms.append(grad_norm)
        if not math.isfinite(loss):
            return
        self.losses.append(loss)
        for k, v in parts.items():
            if k in self.keys:
                self.part_sums[k] = self.part_sums[k] + v if k in self.part_sums else v
        for k in units:
            self.part_steps[k] = self.part_steps.get(k, 0) + 1

    def summary(self, accelerator) -> dict[str, float]:
        """The interval's numbers, over all processes: ``loss`` and the parts (means over the steps with a
        finite loss, a part over those with units of it), ``grad_norm`` (mean over the updated steps),
        ``step_s``, ``samples_per_s``, ``tokens_per_s``. Every process calls it: the parts are reduced here."""
        device = accelerator.device
        local = [self.part_sums.get(k, torch.zeros((), device=device)).float().to(device) for k in self.keys]
        seen = torch.tensor([float(k in self.part_sums) for k in self.keys], device=device)
        reduced = accelerator.reduce(torch.cat([torch.stack(local), seen]), "sum").tolist() if self.keys else []
        sums, seen_anywhere = reduced[:len(self.keys)], reduced[len(self.keys):]
        out = {"loss": sum(self.losses) / len(self.losses) if self.losses else float("nan")}
        for k, s, n in zip(self.keys, sums, seen_anywhere, strict=True):
            if n and self.part_steps.get(k):
                out[k] = s / self.part_steps[k]
        norms = [float(n) for n in self.grad_norms]
        out["grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
        seconds = max(self.seconds, 1e-9)
        out |= {"step_s": self.seconds / max(self.steps, 1), "samples_per_s": self.samples / seconds,
                "tokens_per_s": self.tokens / seconds}
        return out


def report_line(step: int, max_steps: int, summary: dict[str, float], lr: float, interval: Interval,
                peak_mb: float | None) -> str:
    """The log line of a report: ``step 20/100: loss 1.2345 (ce 1.2000, mse_image 0.0345), lr 1.00e-04,
    grad_norm 0.8123, 0.1534 s/step, 52.31 samples/s, 1234 tokens/s[, 1 of 10 steps skipped][, peak 812 MB
    allocated on the GPU]``."""
    parts = ", ".join(f"{k} {summary[k]:.4f}" for k in interval.keys if k in summary)
    line = (f"step {step}/{max_steps}: loss {summary['loss']:.4f}{f' ({parts})' if parts else ''}, lr {lr:.2e}, "
            f"grad_norm {summary['grad_norm']:.4g}, {summary['step_s']:.4g} s/step, "
            f"{_rate(summary['samples_per_s'])} samples/s, {_rate(summary['tokens_per_s'])} tokens/s")
    if interval.skipped_updates:
        line += f", {interval.skipped_updates} of {interval.steps} steps skipped"
    if peak_mb is not None:
        line += f", peak {peak_mb:.0f} MB allocated on the GPU"
    return line


def _rate(x: float) -> str:
    """Four significant digits, whole numbers from 1000 on."""
    return f"{x:.0f}" if x >= 1000 else f"{x:.4g}"
