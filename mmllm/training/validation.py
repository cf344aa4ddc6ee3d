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

What does not change between evaluations is prepared once per run and kept (up to the stage's
``eval_cache_mb`` of host memory; batches past it are prepared again at each evaluation): each batch read,
tokenized and collated, with its noise seeds, and, where the model is not sharded (FSDP, DeepSpeed) and the
encoders and decoders are frozen (as every stage has them), the encoders' features of its media and the
decoders' conditioning targets of its captions, computed as the forward would (under the same autocast) and
given to it in their place, so the scores are the same bits as recomputing them. The held-out samples are
batched by token length (sorted once, from their text alone), which cuts padding: each part is a sum over
its units divided by their count over the whole set, so the batching changes only the order of the sums and
the padded width of the matrix products -- float rounding, not what is measured.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmllm.config import LossConfig
from mmllm.data.dataset import SampleError, StageDataset, collate
from mmllm.model import unit_counts
from mmllm.progress import progress_bar

log = logging.getLogger(__name__)

EVAL_SEED = 1 << 40  # the denoising loss's noise seeds for held-out samples start here (training's are smaller)
GROUPS_PER_SAMPLE = 1 << 10  # held-out sample n's k-th signal group of a modality: EVAL_SEED + n * this + k


@dataclass
class Validation:
    """The held-out samples of a stage, in a fixed order (by token length), the batch size to score them with,
    and the prepared batches kept between evaluations (at most ``cache_bytes`` of them; 0 keeps none)."""

    datasets: list[StageDataset]
    batch_size: int
    cache_bytes: int = 0
    _order: list[tuple[int, int]] | None = field(default=None, init=False, repr=False)
    _kept: dict[tuple[tuple[int, int], ...], dict[str, Any]] = field(default_factory=dict, init=False, repr=False)
    kept_bytes: int = field(default=0, init=False)
    _told_full: bool = field(default=False, init=False, repr=False)

    @property
    def size(self) -> int:
        return sum(len(d) for d in self.datasets)

    def order(self) -> list[tuple[int, int]]:
        """Every held-out ``(dataset, index)``, shortest first (a stable sort of the token lengths, from the
        samples' text alone), so that a batch's samples have similar lengths and little padding."""
        if self._order is None:
            every = [(d, i) for d, ds in enumerate(self.datasets) for i in range(len(ds))]
            lengths = [self.datasets[d].length(i) for d, i in every]
            self._order = [every[k] for k in sorted(range(len(every)), key=lengths.__getitem__)]
        return self._order

    def shares(self, rank: int, world: int) -> list[list[tuple[int, int]]]:
        """This process's batches of ``(dataset, index)``: every ``world``-th sample of :meth:`order` from
        ``rank`` on, in batches of ``batch_size``, padded with empty batches so every process runs as many
        forwards (under FSDP each forward is a collective)."""
        order = self.order()
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

    def batch(self, picks: list[tuple[int, int]], pad_id: int,
              freeze: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
        """The collated batch of ``picks`` with its noise seeds (no ``input_ids``: none of them is readable),
        ``freeze`` applied (what puts the frozen parts' outputs in it); kept while ``cache_bytes`` allows."""
        key = tuple(picks)
        if key in self._kept:
            return self._kept[key]
        samples = [self.datasets[d][i] for d, i in picks]
        batch = collate(samples, pad_id)
        if "input_ids" in batch:
            batch["noise_seeds"] = self.noise_seeds(picks, samples)
            if freeze is not None and self.kept_bytes < self.cache_bytes:  # else the forward computes them
                batch = freeze(batch)
        size = nbytes(batch)
        if self.kept_bytes + size <= self.cache_bytes:
            self._kept[key] = batch
            self.kept_bytes += size
        elif self.cache_bytes and not self._told_full:
            self._told_full = True
            log.info("validation: eval_cache_mb=%d holds %d held-out batches (%.1f MB); the others are read and "
                     "prepared again at every evaluation (raise eval_cache_mb to keep them)",
                     self.cache_bytes >> 20, len(self._kept), self.kept_bytes / 2**20)
        return batch


def nbytes(value: Any) -> int:
    """About the host memory ``value`` (a collated batch: tensors, arrays, images, strings in dicts and lists)
    holds."""
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, Image.Image):
        return value.width * value.height * len(value.getbands())
    if isinstance(value, dict):
        return sum(nbytes(k) + nbytes(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(nbytes(v) for v in value)
    return sys.getsizeof(value)


def frozen_outputs_cacheable(accelerator, inner) -> bool:
    """Whether the encoders' features and the decoders' conditioning can be computed apart from the forward
    and kept: the parts are frozen, and the model is not sharded (a sharded part's forward is a collective
    the processes must run together, inside the model's)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return False
    return not any(p.requires_grad for part in (inner.encoders, inner.decoders) for p in part.parameters())


def with_frozen_outputs(accelerator, inner, batch: dict[str, Any], losses: LossConfig) -> dict[str, Any]:
    """``batch`` with its media replaced by the encoders' features (``media_features``, all items in
    placeholder order) and, where the MSE loss is on, every caption's conditioning target given
    (``signal_targets``): what the forward would compute from them, computed the same way (no gradients,
    the run's autocast), on the host."""
    media, given = batch.get("media", {}), batch.get("media_features", {})
    with torch.no_grad(), accelerator.autocast():
        features = {}
        for m in [*media, *(k for k in given if k not in media)]:
            feats = inner._encoder_features(m, media.get(m), given.get(m))
            if feats is not None:
                features[m] = {"features": feats.cpu(), "index": torch.arange(feats.shape[0])}
        targets = {}
        if losses.mse:
            for m, captions in batch["signal_captions"].items():
                if captions:
                    rows = inner.signal_targets(m, list(captions), batch.get("signal_targets", {}).get(m))
                    targets[m] = list(rows.cpu().unbind(0))
    return {**batch, "media": {}, "media_features": features,
            "signal_targets": {**batch.get("signal_targets", {}), **targets}}


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
    freeze = None
    if frozen_outputs_cacheable(accelerator, inner):
        def freeze(batch: dict[str, Any]) -> dict[str, Any]:
            return with_frozen_outputs(accelerator, inner, batch, losses)
    try:
        with torch.no_grad():
            for b, picks in enumerate(progress_bar(batches, desc="validation", leave=False,
                                                   disable=not accelerator.is_local_main_process or len(batches) < 10)):
                batch = validation.batch(picks, inner.llm.tokenizer.pad_token_id, freeze)
                skipped += len(batch["skipped"])
                empty = "input_ids" not in batch
                if empty:  # run for the collectives only; its result is not used
                    batch = {**fallback, "noise_seed": EVAL_SEED + b * world + rank}
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
