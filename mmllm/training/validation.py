"""Validation loss on held-out data: a stage's ``eval_data``, scored at every save and every ``eval_every``
steps.

The validation loss is the stage's own weighted loss (``losses.*``), each part a mean over the whole held-out
set: CE per label token, MSE per signal group, denoising per signal group with target media, retain per text
token -- so it is comparable from step to step and with the training loss. It does not depend on the number
of processes or the batch size: every process scores its share (every ``world``-th sample) and the per-part
sums and unit counts are added over processes before dividing. The denoising loss draws each signal group's
noise and timesteps from a seed of its own, fixed by the sample's place in the held-out set (not by the
batch it falls in: that depends on the batch size and the number of processes), the same at every
evaluation. Evaluation runs with dropout off and no gradients, and touches no random state the training
reads, so a run with validation trains exactly as one without it (and resumes as exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from mmllm.config import LossConfig
from mmllm.data.dataset import SampleError, StageDataset, collate
from mmllm.model import unit_counts

EVAL_SEED = 1 << 40  # the denoising loss's noise seeds for held-out samples start here (training's are smaller)
GROUPS_PER_SAMPLE = 1 << 10  # held-out sample n's k-th signal group of a modality: EVAL_SEED + n * this + k


@dataclass
class Validation:
    """The held-out samples of a stage, in a fixed order, and the batch size to score them with."""

    datasets: list[StageDataset]
    batch_size: int

    @property
    def size(self) -> int:
        return sum(len(d) for d in self.datasets)

    def shares(self, rank: int, world: int) -> list[list[tuple[int, int]]]:
        """This process's batches of ``(dataset, index)``: every ``world``-th sample from ``rank`` on, in
        batches of ``batch_size``, padded with empty batches so every process runs as many forwards (under
        FSDP each forward is a collective)."""
        order = [(d, i) for d, ds in enumerate(self.datasets) for i in range(len(ds))]
        mine = order[rank::world]
        count = math.ceil(math.ceil(len(order) / world) / self.batch_size)
        return [mine[b * self.batch_size:(b + 1) * self.batch_size] for b in range(count)]

    def noise_seeds(self, picks: list[tuple[int, int]], samples: list[Any]) -> dict[str, list[int]]:
        """The denoising loss's seed of each signal group in the batch ``collate(samples)`` (``samples``: the
        items at ``picks``, unreadable ones included), per modality in the batch's group order: a function of
        the sample's index in the held-out set and the group's place in the sample alone."""
        offsets = [sum(len(d) for d in self.datasets[:k]) for k in range(len(self.datasets))]
        seeds: dict[str, list[int]] = {}
        for (d, i), sample in zip(picks, samples, strict=True):
            if isinstance(sample, SampleError):  # unreadable: collate leaves it out
                continue
            mine: dict[str, int] = {}
            for modality, *_ in sample["outputs"]:
                k = mine[modality] = mine.get(modality, -1) + 1
                seeds.setdefault(modality, []).append(EVAL_SEED + (offsets[d] + i) * GROUPS_PER_SAMPLE + k)
        return seeds


def loss_weights(losses: LossConfig, keys: list[str]) -> dict[str, float]:
    """Each loss part's weight in the stage loss (``ce``, ``retain``, ``mse_<m>``, ``denoise_<m>``)."""
    return {k: float(getattr(losses, k.split("_")[0])) for k in keys}


def evaluate(accelerator, model, inner, validation: Validation, losses: LossConfig, keys: list[str],
             fallback: dict[str, Any]) -> dict[str, float]:
    """The validation loss and its parts (means over the held-out set), the same on every process.

    ``model`` is the prepared (possibly wrapped) model, ``inner`` the AnyToAnyModel under it, ``keys`` the
    loss parts, ``fallback`` a readable batch run with its result unused where a process has no sample
    left (so that every process joins each forward's collectives). Each module's train/eval mode is restored.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    ones = dict.fromkeys(keys, 1.0)  # normalizers of 1: each part comes back as a sum over its units
    sums = dict.fromkeys(keys, 0.0)
    counts = dict.fromkeys(keys, 0.0)
    skipped = 0
    modes = [(m, m.training) for m in model.modules()]  # restored as they were (the frozen core's dropout stays off)
    model.eval()
    batches = validation.shares(rank, world)
    try:
        with torch.no_grad():
            for b, picks in enumerate(tqdm(batches, desc="validation", leave=False,
                                           disable=not accelerator.is_local_main_process or len(batches) < 10)):
                samples = [validation.datasets[d][i] for d, i in picks]
                batch = collate(samples, inner.llm.tokenizer.pad_token_id)
                skipped += len(batch["skipped"])
                empty = "input_ids" not in batch
                if empty:  # run for the collectives only; its result is not used
                    batch = {**fallback, "noise_seed": EVAL_SEED + b * world + rank}
                else:
                    batch = {**batch, "noise_seeds": validation.noise_seeds(picks, samples)}
                with accelerator.autocast():
                    out = model(batch, losses, ones)
                if empty:
                    continue
                for k, n in unit_counts(batch, inner).items():
                    counts[k] += n
                for k in keys:
                    if k in out:
                        sums[k] += float(out[k].float())
    finally:
        for module, training in modes:
            module.training = training
        _reshard(model)
    totals = torch.tensor([[sums[k], counts[k]] for k in keys] + [[float(skipped), 0.0]], dtype=torch.float64,
                          device=accelerator.device)
    totals = accelerator.reduce(totals, "sum").tolist()
    weights = loss_weights(losses, keys)
    parts = {k: s / n for k, (s, n) in zip(keys, totals) if n > 0 and weights[k]}
    result = {"loss": sum(weights[k] * v for k, v in parts.items()) if parts else float("nan"), **parts}
    result["skipped"] = totals[-1][0]
    return result


def _reshard(model) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward (its backward reshards them); after a
    forward without one, reshard so the model holds the sharded parameters the optimizer steps."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
