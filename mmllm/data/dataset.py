"""Stage datasets, a deterministic mixture sampler, and the collator.

* :class:`StageDataset` turns records into model-ready samples; a sample that cannot be read
  (missing/corrupt media, too long, malformed, its record unreadable in the data file: an I/O error that
  trying again did not clear, :class:`~mmllm.data.index.RecordUnreadable`) comes back as an error record and is
  skipped and counted by the collator -- it never crashes an epoch. With a
  :class:`~mmllm.data.precomputed.Precomputed` it returns cached encoder features instead of
  encoder inputs, and precomputed conditioning targets, where they are found.
* :class:`MixtureSampler` is stateless: the samples of (step, micro-batch, rank) are a pure
  function of the seed, so resuming at step ``s`` reads exactly what an uninterrupted run would,
  and ``W`` processes with batch ``b`` read exactly what one process with batch ``W*b`` reads.
  :class:`LengthGroupedSampler` (the stage's ``group_by_length``) reorders its draws within chunks
  so that each micro-batch holds samples of similar token length, keeping both properties.
* :func:`collate` right-pads, stacks media per modality in placeholder order, and lists the
  signal-group captions per modality in the order the groups appear. Batch keys:

  - ``media[m]``: encoder inputs of the items of modality ``m`` that are computed;
  - ``media_features[m]``: ``{"features": (n, tokens, dim), "index": (n,)}`` -- cached encoder
    outputs and their positions among all ``m`` items (the model fills the rest from ``media[m]``);
  - ``signal_targets[m]``: per caption, a precomputed conditioning target or None (computed).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mmllm.config import ConfigError
from mmllm.data.formats import PAIR_FORMATS, Conversation
from mmllm.data.index import ConversationIndex, ReadStopped, RecordUnreadable, data_summary, index_dataset
from mmllm.data.media import SAMPLE_ERRORS, load_media
from mmllm.data.precomputed import Precomputed
from mmllm.data.template import IGNORE, TokenSpec, encode_conversation

log = logging.getLogger(__name__)


@dataclass
class SampleError:
    id: str
    error: str


class StageDataset(Dataset):
    def __init__(
        self,
        conversations: Sequence[Conversation],
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
        """Sample ``index`` encoded, its media read; a :class:`SampleError` (skipped) when it cannot be. A stop asked
        for while its read waited to be tried again (:class:`~mmllm.data.index.ReadStopped`) is raised: the sample
        is not unreadable, and a step without it is not the step an uninterrupted run trains."""
        try:
            conv = self.conversations[index]
        except RecordUnreadable as exc:  # its record, re-read from the data file, or its media lookup
            log.warning("skipping sample %s: %s", exc.sample_id, exc)  # the message says where
            return SampleError(exc.sample_id, str(exc))
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

    def length(self, index: int) -> int:
        """The tokens sample ``index`` puts in a batch (placeholders expanded, truncated to ``max_length``), from
        its text alone: no media is read or decoded. 0 for a sample that cannot be encoded (it is skipped), its
        record unreadable included (after the retries the index gives a read and a media lookup that fail: a failure
        that passes gives the length an uninterrupted read gives, so that the batch order does not depend on it),
        said with its id as :meth:`__getitem__` says it; what :meth:`__getitem__` raises (a changed data file, a
        fault of mmllm's index) is raised here too, not taken for a skipped sample, and so is
        :class:`~mmllm.data.index.ReadStopped` (a stop asked for during the retries: the length is not known)."""
        try:
            conv = self.conversations[index]
        except RecordUnreadable as exc:  # skipped when drawn, which says so again
            log.warning("sample %s cannot be read (%s): ordered as length 0 by group_by_length, skipped when drawn",
                        exc.sample_id, exc)
            return 0
        try:
            return len(encode_conversation(conv, self.tokenizer, self.spec).input_ids)
        except SAMPLE_ERRORS:
            return 0


def load_stage_records(
    datasets: list[Any], stage: str
) -> tuple[list[ConversationIndex], list[float], list[str]]:
    """Read every configured dataset into conversations for ``stage``; returns (per-dataset, weights, errors).
    Each data set's conversations are a :class:`~mmllm.data.index.ConversationIndex`: read and checked once
    here, then parsed from the file again when a sample is drawn."""
    per_dataset, weights, errors = [], [], []
    for ds in datasets:
        if stage == "instruct" and ds.format in PAIR_FORMATS:
            raise ConfigError(f"{ds.path}: format {ds.format} holds caption pairs, which are for the alignment "
                             "stages; the instruct stage reads conversations (mmllm-chat, nextgpt-t2x, "
                             "nextgpt-mosit, llava)")
        convs, malformed, unusable = index_dataset(ds, stage)
        errors += malformed + unusable
        if not len(convs):
            raise ConfigError(f"{ds.path}: no usable records ({len(malformed)} malformed); `mmllm data check` lists "
                             "what is wrong with them")
        per_dataset.append(convs)
        weights.append(ds.weight)
    return per_dataset, weights, errors


EMPTY_REPLY_NOTE = ("an assistant turn with an empty reply and no outputs teaches the model only to end its turn "
                    "at once; fix or drop those turns if that is not meant (`mmllm data check` lists them)")


def warn_empty_replies(per_dataset: list[Sequence[Conversation]], datasets: list[Any], show: int = 5) -> None:
    """One warning per dataset whose conversations hold empty assistant replies, with counts and ids."""
    for convs, ds in zip(per_dataset, datasets):
        summary = data_summary(convs)
        if found := summary.empty_reply_conversations:
            turns = summary.empty_reply_turns
            ids = ", ".join(summary.empty_reply_ids[:show]) + (", ..." if found > show else "")
            log.warning("%s: %d empty assistant repl%s in %d conversation(s) (%s): %s", ds.path,
                        turns, "y" if turns == 1 else "ies", found, ids, EMPTY_REPLY_NOTE)


@dataclass
class _Slots:
    """One dataset's run of an epoch's virtual list (before shuffling): slot ``k`` holds sample
    ``laps[k]``, but for the fractional share ``[share_from, count)`` of an epoch after the first."""

    dataset: int
    size: int
    start: int  # its first slot in the virtual list
    count: int
    laps: np.ndarray  # the seeded permutations, one per lap, end to end (int32 where the size allows);
    # the last one whole: the fractional share's walk goes on from it
    share_from: int  # count when its weight has no fractional part


class MixtureSampler:
    """Deterministic, stateless sample order over several datasets.

    ``weight`` scales how much of each dataset one epoch holds (2.0 = every sample twice, 0.5 = half of
    it, 1.5 = every sample once and half of them again). The fractional part is a different share each
    epoch: the shares walk through a seeded permutation of the dataset, then the next one, so over
    epochs every sample is drawn equally often (to within one). The epoch's virtual list is shuffled
    with a seed derived from (seed, epoch).

    Memory: the virtual list is never built as Python objects; per dataset the seeded permutations it is
    made of are kept as one integer array, and per epoch the shuffle (``epoch_size`` integers): 8 bytes a
    slot. Weight 1000 on 10,000 samples (10 M slots) took 1.1 GB as a list of tuples (7.7 s to build and
    look up 3 epochs); now 80 MB, 190 MB at the peak (1.7 s). The samples a seed draws are those it drew.
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        if not sizes or any(n <= 0 for n in sizes):
            raise ValueError(f"every dataset must be non-empty, got sizes {sizes}")
        self.seed, self.sizes = seed, list(sizes)
        rng = np.random.default_rng([seed, 7])
        self._runs: list[_Slots] = []
        total = 0
        for d, (n, w) in enumerate(zip(sizes, weights)):
            if w <= 0:
                continue
            count = max(1, round(n * w))
            reps = math.ceil(count / n)
            small = np.int32 if n <= np.iinfo(np.int32).max else np.int64
            laps = np.empty(reps * n, dtype=small)
            for r in range(reps):  # the same draws, in the same order, as ever: the order of a seed is kept
                laps[r * n:(r + 1) * n] = rng.permutation(n)
            share_from = (reps - 1) * n if count % n else count
            self._runs.append(_Slots(d, n, total, count, laps, share_from))
            total += count
        if not total:
            raise ValueError("all dataset weights are zero")
        self._size = total
        self._starts = [r.start for r in self._runs]
        self._epoch_cache: dict[int, tuple[np.ndarray, dict[int, np.ndarray]]] = {}

    @property
    def epoch_size(self) -> int:
        return self._size

    def _walk(self, run: _Slots, begin: int, length: int) -> np.ndarray:
        """Items ``begin .. begin + length`` of a dataset's endless walk: its last lap's permutation, then a
        seeded permutation per further lap."""
        n, out = run.size, []
        k, end = begin, begin + length
        while k < end:
            lap, pos = divmod(k, n)
            perm = (run.laps[run.share_from:run.share_from + n] if lap == 0
                    else np.random.default_rng([self.seed, 7, run.dataset, lap]).permutation(n))
            take = min(n - pos, end - k)
            out.append(perm[pos:pos + take])
            k += take
        return np.concatenate(out)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """The epoch's shuffle, and per dataset with a fractional share the samples of its share slots."""
        if epoch not in self._epoch_cache:
            shares = {}
            if epoch:
                for i, run in enumerate(self._runs):
                    share = run.count - run.share_from
                    if run.share_from < run.count:
                        shares[i] = self._walk(run, epoch * share, share)
            order = np.random.default_rng([self.seed, epoch]).permutation(self._size)
            if self._size <= np.iinfo(np.int32).max:
                order = order.astype(np.int32)
            self._epoch_cache = {epoch: (order, shares)}
        return self._epoch_cache[epoch]

    def at(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self._size)
        order, shares = self._epoch(epoch)
        slot = int(order[offset])
        i = bisect.bisect_right(self._starts, slot) - 1
        run, k = self._runs[i], slot - self._runs[i].start
        if i in shares and k >= run.share_from:
            return run.dataset, int(shares[i][k - run.share_from])
        return run.dataset, int(run.laps[k])

    def micro_batch(self, step: int, micro: int, accum: int, rank: int, world: int, batch: int) -> list[tuple[int, int]]:
        start = ((step * accum + micro) * world + rank) * batch
        return [self.at(start + j) for j in range(batch)]


GROUP_BATCHES = 50  # micro-batches per chunk that LengthGroupedSampler sorts by length
# LengthGroupedSampler's order, recorded in a grouped run's checkpoints and compared on --resume: 2, the first
# chunk's longest micro-batch first (:func:`longest_first`); a checkpoint recording none may be of the order before
LENGTH_ORDER_VERSION = 2


def longest_first(order: np.ndarray) -> np.ndarray:
    """``order`` (a permutation of a chunk's batches, batch ``n - 1`` the longest) with the longest batch
    swapped to the front, so that a step that runs out of memory does so at the first step."""
    order = order.copy()
    at = int(np.flatnonzero(order == len(order) - 1)[0])
    order[[0, at]] = order[[at, 0]]
    return order


class LengthGroupedSampler:
    """A :class:`MixtureSampler`'s draws, reordered so that each micro-batch holds samples of similar length.

    The draws are taken in chunks of ``group_batches`` global micro-batches (``batch x processes`` samples
    each, so ``chunk = group_batches * batch * processes`` draws): chunk ``k`` holds exactly the draws
    ``k * chunk .. (k + 1) * chunk`` of ``base`` (so the data sets mix by their weights, and over whole chunks
    every sample is drawn as often as without grouping), sorted by length (ties in draw order), cut into
    micro-batches and those shuffled with a seed derived from (seed, chunk). The first chunk's longest
    micro-batch (its longest samples: the most tokens, and the longest row, so the most padded tokens too)
    is then swapped to the front, as HF's ``LengthGroupedSampler`` does, so that a batch too big for memory
    fails the first step rather than one late in the run. A process's share of a global micro-batch is a
    contiguous run of the sorted samples (so each process's first batch is its own longest of the chunk).
    The order is a pure function of the seed, the lengths and ``batch x processes``: a resumed run reads what
    an uninterrupted one does, and W processes with batch b read what one process with batch W*b reads.

    ``length(dataset, index)``: a sample's token count (:meth:`StageDataset.length`), asked for once per
    sample, when a chunk first draws it, and kept (4 bytes a sample): later epochs tokenize nothing.

    Several processes: each one needs every length of a chunk (the whole global micro-batches are sorted), so
    without help each process tokenized the chunk's every draw (8 processes x batch 32: 12,800 encodes per
    chunk on each). :meth:`share_lengths`, called by every process before each step's micro-batches, has each
    process tokenize a ``1/processes`` share of the chunk's samples not yet known and exchange them: the same
    exact lengths, so the same batches, for a ``1/processes`` of the tokenizing (the figures: docs/configs.md).
    """

    def __init__(self, base: MixtureSampler, length: Callable[[int, int], int], group_batches: int = GROUP_BATCHES):
        if group_batches < 1:
            raise ValueError(f"group_batches must be >= 1, got {group_batches}")
        self.base = base
        self.seed = base.seed
        self.group_batches = group_batches
        self._length = length
        # each sample's length once known (-1: not yet), 4 bytes a sample: a dict was ~100
        self._known = [np.full(n, -1, dtype=np.int32) for n in base.sizes]
        self._chunk_cache: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._shared: tuple[int, int] | None = None  # the (chunk, per_batch) whose lengths share_lengths filled

    @property
    def epoch_size(self) -> int:
        return self.base.epoch_size

    def length(self, dataset: int, index: int) -> int:
        known = self._known[dataset]
        if known[index] < 0:
            known[index] = int(self._length(dataset, index))
        return int(known[index])

    def _draws(self, k: int, per_batch: int) -> list[tuple[int, int]]:
        """Chunk ``k``'s draws in the base sampler's order."""
        size = self.group_batches * per_batch
        return [self.base.at(k * size + j) for j in range(size)]

    def share_lengths(self, step: int, micro: int, accum: int, rank: int, world: int, batch: int,
                      exchange: Callable[[Callable[[], list[int]]], list[list[int]]]) -> None:
        """Fill in the lengths :meth:`micro_batch` ``(step, micro, ...)`` sorts by, this process tokenizing a
        ``1/world`` share of them. Every process must call it with the same arguments, for the same steps in the
        same order (as the training loop asks for its micro-batches); it exchanges only when the micro-batch
        starts a chunk it has not filled, so all of them exchange at the same calls. ``exchange(work)``: run
        ``work`` on every process and return what each returned, in process order (an all-gather; one process
        failing must stop all, :func:`mmllm.training.agreement.on_every_process`). A stop asked for while a read
        waited to be tried again on any process (:class:`~mmllm.data.index.ReadStopped`) is raised on every one.

        Process ``r`` measures the chunk's distinct draws ``r, r + world, ...`` (those already known cost
        nothing); afterwards every process knows every length of the chunk, so :meth:`chunk` tokenizes nothing
        and its order is exactly the one each process would have found alone."""
        per_batch = world * batch
        k = (step * accum + micro) // self.group_batches
        if self._shared == (k, per_batch):
            return
        draws = list(dict.fromkeys(self._draws(k, per_batch)))  # distinct, in draw order: the same on every process
        def measure() -> list[int] | tuple[str, str]:
            try:
                return [self.length(d, i) for d, i in draws[rank::world]]
            except ReadStopped as exc:  # every process raises it below, at the same call: they stop together
                return exc.where, str(exc)

        shares = exchange(measure)
        stopped = next((got for got in shares if isinstance(got, tuple)), None)
        if stopped is not None:
            raise ReadStopped(stopped[1], stopped[0])
        if len(shares) != world:
            raise RuntimeError(f"share_lengths: the exchange returned {len(shares)} shares for {world} processes")
        for r, lengths in enumerate(shares):
            for (d, i), n in zip(draws[r::world], lengths, strict=True):
                self._known[d][i] = n
        self._shared = (k, per_batch)

    def chunk(self, k: int, per_batch: int) -> list[tuple[int, int]]:
        """Chunk ``k``'s draws in their grouped order, for global micro-batches of ``per_batch`` samples."""
        key = (k, per_batch)
        if key not in self._chunk_cache:
            draws = self._draws(k, per_batch)
            lengths = np.array([self.length(d, i) for d, i in draws], dtype=np.int64)
            by_length = np.argsort(lengths, kind="stable").reshape(self.group_batches, per_batch)
            batches = np.random.default_rng([self.seed, 11, per_batch, k]).permutation(self.group_batches)
            if k == 0:
                batches = longest_first(batches)
            self._chunk_cache = {key: [draws[j] for j in by_length[batches].ravel()]}
        return self._chunk_cache[key]

    def micro_batch(self, step: int, micro: int, accum: int, rank: int, world: int, batch: int) -> list[tuple[int, int]]:
        per_batch = world * batch
        k, j = divmod(step * accum + micro, self.group_batches)
        start = j * per_batch + rank * batch
        return self.chunk(k, per_batch)[start:start + batch]


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
