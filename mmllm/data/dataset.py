"""Stage datasets, a deterministic mixture sampler, and the collator.

* :class:`StageDataset` turns records into model-ready samples; a sample that cannot be read
  (missing/corrupt media, too long, malformed) comes back as an error record and is skipped and
  counted by the collator -- it never crashes an epoch. With a
  :class:`~mmllm.data.precomputed.Precomputed` it returns cached encoder features instead of
  encoder inputs, and precomputed conditioning targets, where they are found.
* :class:`MixtureSampler` is stateless: the samples of (step, micro-batch, rank) are a pure
  function of the seed, so resuming at step ``s`` reads exactly what an uninterrupted run would,
  and ``W`` processes with batch ``b`` read exactly what one process with batch ``W*b`` reads.
* :func:`collate` right-pads, stacks media per modality in placeholder order, and lists the
  signal-group captions per modality in the order the groups appear. Batch keys:

  - ``media[m]``: encoder inputs of the items of modality ``m`` that are computed;
  - ``media_features[m]``: ``{"features": (n, tokens, dim), "index": (n,)}`` -- cached encoder
    outputs and their positions among all ``m`` items (the model fills the rest from ``media[m]``);
  - ``signal_targets[m]``: per caption, a precomputed conditioning target or None (computed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mmllm.config import ConfigError
from mmllm.data.formats import PAIR_FORMATS, CaptionPair, Conversation, read_dataset
from mmllm.data.media import SAMPLE_ERRORS, load_media
from mmllm.data.precomputed import Precomputed
from mmllm.data.template import IGNORE, TokenSpec, encode_conversation, pair_to_conversation

log = logging.getLogger(__name__)


@dataclass
class SampleError:
    id: str
    error: str


class StageDataset(Dataset):
    def __init__(
        self,
        conversations: list[Conversation],
        tokenizer: Any,
        spec: TokenSpec,
        preprocess: dict[str, Callable[[list[Any]], torch.Tensor]],
        load_output_media: bool = False,
        precomputed: Precomputed | None = None,
    ):
        self.conversations = conversations
        self.tokenizer = tokenizer
        self.spec = spec
        self.preprocess = preprocess
        self.load_output_media = load_output_media
        self.precomputed = precomputed

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, Any] | SampleError:
        conv = self.conversations[index]
        pre = self.precomputed
        try:
            enc = encode_conversation(conv, self.tokenizer, self.spec)
            media: list[tuple[str, str, torch.Tensor]] = []  # (modality, "inputs" | "features", tensor)
            for ref in enc.media:
                if ref.modality not in self.preprocess:
                    raise ValueError(f"{ref.modality} input but the assembly has no encoders.{ref.modality}")
                feats = pre.features(ref.modality, ref.path) if pre is not None else None
                if feats is not None:
                    media.append((ref.modality, "features", feats))
                else:
                    item = load_media(ref.modality, ref.path)
                    media.append((ref.modality, "inputs", self.preprocess[ref.modality]([item])))
            outputs = []
            for out in enc.outputs:
                target = None
                if self.load_output_media and out.path is not None:
                    target = load_media(out.modality, out.path)
                cond = pre.target(out.modality, out.caption, out.embedding) if pre is not None else None
                outputs.append((out.modality, out.caption, target, cond))
        except SAMPLE_ERRORS as exc:  # the data's fault, not ours
            log.warning("skipping sample %s (%s): %s", conv.id, conv.source, exc)
            return SampleError(conv.id, str(exc))
        return {"id": enc.id, "input_ids": enc.input_ids, "labels": enc.labels, "media": media, "outputs": outputs}


def load_stage_records(
    datasets: list[Any], stage: str
) -> tuple[list[list[Conversation]], list[float], list[str]]:
    """Read every configured dataset into conversations for ``stage``; returns (per-dataset, weights, errors)."""
    per_dataset, weights, errors = [], [], []
    for ds in datasets:
        if stage == "instruct" and ds.format in PAIR_FORMATS:
            raise ConfigError(f"{ds.path}: format {ds.format} holds caption pairs, which are for the alignment "
                             "stages; the instruct stage reads conversations (mmllm-chat, nextgpt-t2x, "
                             "nextgpt-mosit, llava)")
        records, errs = read_dataset(ds)
        errors += errs
        convs = []
        for rec in records:
            if isinstance(rec, CaptionPair):
                try:
                    convs.append(pair_to_conversation(rec, stage))
                except ValueError as exc:
                    errors.append(str(exc))
            else:
                convs.append(rec)
        if not convs:
            raise ConfigError(f"{ds.path}: no usable records ({len(errs)} malformed); `mmllm data check` lists "
                             "what is wrong with them")
        per_dataset.append(convs)
        weights.append(ds.weight)
    return per_dataset, weights, errors


EMPTY_REPLY_NOTE = ("an assistant turn with an empty reply and no outputs teaches the model only to end its turn "
                    "at once; fix or drop those turns if that is not meant (`mmllm data check` lists them)")


def warn_empty_replies(per_dataset: list[list[Conversation]], datasets: list[Any], show: int = 5) -> None:
    """One warning per dataset whose conversations hold empty assistant replies, with counts and ids."""
    for convs, ds in zip(per_dataset, datasets):
        found = [(c.id, n) for c in convs if (n := c.empty_replies())]
        if found:
            ids = ", ".join(i for i, _ in found[:show]) + (", ..." if len(found) > show else "")
            log.warning("%s: %d empty assistant repl%s in %d conversation(s) (%s): %s", ds.path,
                        sum(n for _, n in found), "y" if sum(n for _, n in found) == 1 else "ies", len(found), ids,
                        EMPTY_REPLY_NOTE)


class MixtureSampler:
    """Deterministic, stateless sample order over several datasets.

    ``weight`` scales how much of each dataset one epoch holds (2.0 = every sample twice, 0.5 = half of
    it, 1.5 = every sample once and half of them again). The fractional part is a different share each
    epoch: the shares walk through a seeded permutation of the dataset, then the next one, so over
    epochs every sample is drawn equally often (to within one). The epoch's virtual list is shuffled
    with a seed derived from (seed, epoch).
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        if not sizes or any(n <= 0 for n in sizes):
            raise ValueError(f"every dataset must be non-empty, got sizes {sizes}")
        self.seed = seed
        rng = np.random.default_rng([seed, 7])
        virtual: list[tuple[int, int]] = []
        # per dataset with a fractional weight: (dataset, size, share, its slots' start, first permutation)
        self._shares: list[tuple[int, int, int, int, np.ndarray]] = []
        for d, (n, w) in enumerate(zip(sizes, weights)):
            if w <= 0:
                continue
            count = max(1, round(n * w))
            reps = math.ceil(count / n)
            perms = [rng.permutation(n) for _ in range(reps)]
            share = count % n
            if share:
                self._shares.append((d, n, share, len(virtual) + (reps - 1) * n, perms[-1]))
            virtual += [(d, int(i)) for i in np.concatenate(perms)[:count]]
        if not virtual:
            raise ValueError("all dataset weights are zero")
        self.virtual = virtual  # epoch 0's; a later epoch has other fractional shares in the same slots
        self._epoch_cache: dict[int, tuple[list[tuple[int, int]], np.ndarray]] = {}

    @property
    def epoch_size(self) -> int:
        return len(self.virtual)

    def _walk(self, d: int, n: int, first: np.ndarray, begin: int, length: int) -> list[int]:
        """Items ``begin .. begin + length`` of dataset ``d``'s endless walk: ``first``, then a seeded
        permutation per further lap."""
        out: list[int] = []
        k = begin
        while len(out) < length:
            lap, pos = divmod(k, n)
            perm = first if lap == 0 else np.random.default_rng([self.seed, 7, d, lap]).permutation(n)
            take = min(n - pos, length - len(out))
            out += [int(i) for i in perm[pos:pos + take]]
            k += take
        return out

    def _epoch(self, epoch: int) -> tuple[list[tuple[int, int]], np.ndarray]:
        if epoch not in self._epoch_cache:
            virtual = self.virtual
            if epoch and self._shares:
                virtual = list(self.virtual)
                for d, n, share, start, first in self._shares:
                    virtual[start:start + share] = [(d, i) for i in self._walk(d, n, first, epoch * share, share)]
            order = np.random.default_rng([self.seed, epoch]).permutation(len(virtual))
            self._epoch_cache = {epoch: (virtual, order)}
        return self._epoch_cache[epoch]

    def at(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, len(self.virtual))
        virtual, order = self._epoch(epoch)
        return virtual[int(order[offset])]

    def micro_batch(self, step: int, micro: int, accum: int, rank: int, world: int, batch: int) -> list[tuple[int, int]]:
        start = ((step * accum + micro) * world + rank) * batch
        return [self.at(start + j) for j in range(batch)]


def collate(samples: list[dict[str, Any] | SampleError], pad_id: int) -> dict[str, Any]:
    good = [s for s in samples if not isinstance(s, SampleError)]
    skipped = [s for s in samples if isinstance(s, SampleError)]
    batch: dict[str, Any] = {"ids": [s["id"] for s in good], "skipped": [(s.id, s.error) for s in skipped]}
    if not good:
        return batch
    length = max(len(s["input_ids"]) for s in good)
    ids = torch.full((len(good), length), pad_id, dtype=torch.long)
    labels = torch.full((len(good), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(good), length), dtype=torch.long)
    media: dict[str, list[torch.Tensor]] = {}
    features: dict[str, list[torch.Tensor]] = {}
    positions: dict[str, list[int]] = {}
    count: dict[str, int] = {}
    captions: dict[str, list[str]] = {}
    targets: dict[str, list[Any]] = {}
    conditioning: dict[str, list[torch.Tensor | None]] = {}
    for row, s in enumerate(good):
        n = len(s["input_ids"])
        ids[row, :n] = torch.tensor(s["input_ids"])
        labels[row, :n] = torch.tensor(s["labels"])
        mask[row, :n] = 1
        for modality, kind, tensor in s["media"]:
            if kind == "features":
                features.setdefault(modality, []).append(tensor)
                positions.setdefault(modality, []).append(count.get(modality, 0))
            else:
                media.setdefault(modality, []).append(tensor)
            count[modality] = count.get(modality, 0) + 1
        for modality, caption, target, cond in s["outputs"]:
            captions.setdefault(modality, []).append(caption)
            targets.setdefault(modality, []).append(target)
            conditioning.setdefault(modality, []).append(cond)
    batch.update(
        input_ids=ids,
        labels=labels,
        attention_mask=mask,
        media={m: torch.cat(v) for m, v in media.items()},
        signal_captions=captions,
        signal_media=targets,
    )
    if features:
        batch["media_features"] = {
            m: {"features": torch.stack(v), "index": torch.tensor(positions[m], dtype=torch.long)}
            for m, v in features.items()
        }
    given = {m: v for m, v in conditioning.items() if any(t is not None for t in v)}
    if given:
        batch["signal_targets"] = given
    return batch
