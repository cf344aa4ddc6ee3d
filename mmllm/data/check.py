"""``mmllm data check``: what a stage's data holds and what is wrong with it, without training.

For every dataset of a stage config: records read and malformed (with file:line), conversations
for the stage, media inputs and outputs per modality, media files that are missing or cannot be
decoded, samples longer than the context (truncated, or left with nothing to learn), and
precomputed caption embeddings that are missing or do not fit the decoder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmllm.atomic import atomic_write_text
from mmllm.data.formats import PAIR_FORMATS, Conversation
from mmllm.data.index import DataFileUnreadable, RecordUnreadable, index_dataset, readable
from mmllm.data.keys import did_you_mean
from mmllm.data.media import SAMPLE_ERRORS, load_media
from mmllm.data.precomputed import EmbeddingShapeError, load_embedding
from mmllm.data.template import EncodedSample, TokenSpec, encode_conversation, encode_conversations

SHOW = 10  # examples listed per kind of problem in the text report
ENCODE_BATCH = 64  # conversations whose texts the tokenizer is given at once (512 held so many objects that
# the garbage collector ran its full passes more often: 1.3x slower than 64)


@dataclass
class DatasetCheck:
    path: str
    format: str
    weight: float
    records: int = 0
    conversations: int = 0
    malformed: list[str] = field(default_factory=list)  # records, one each (file:line)
    # the dataset as a whole: unreadable file, unknown format, wrong kind for the stage, nothing usable
    dataset_problems: list[str] = field(default_factory=list)
    inputs: Counter = field(default_factory=Counter)  # modality -> media inputs
    outputs: Counter = field(default_factory=Counter)  # modality -> outputs (signal groups)
    missing: list[str] = field(default_factory=list)  # "file (referenced at file:line)"
    # missing media paths that name a file from the working directory: written from there, not from the root
    missing_from_cwd: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    too_long: list[str] = field(default_factory=list)  # longer than max_length (truncated)
    unusable: list[str] = field(default_factory=list)  # would be skipped in training
    embeddings: Counter = field(default_factory=Counter)  # used / missing / wrong_shape / unreadable
    embedding_problems: list[str] = field(default_factory=list)
    # ids given to more than one record: training reads both, but logs and skipped-sample reports name ids
    duplicate_ids: list[str] = field(default_factory=list)
    # conversations with assistant turns that say nothing and ask for no output (learned as end-of-turn only)
    empty_replies: list[str] = field(default_factory=list)
    empty_reply_turns: int = 0
    # keys of its records that the format does not read (not an error: ignored; a typo drops what it holds):
    # {"key", "first_line", "count", "did_you_mean"} each
    unknown_keys: list[dict[str, Any]] = field(default_factory=list)
    held_out: bool = False  # one of the stage's eval_data

    @property
    def problems(self) -> int:
        return (len(self.dataset_problems) + len(self.malformed) + len(self.missing) + len(self.unreadable) + len(self.unusable)
                + len(self.embedding_problems))


@dataclass
class CheckReport:
    stage: str
    max_length: int
    decoded: bool
    datasets: list[DatasetCheck]

    @property
    def ok(self) -> bool:
        return all(d.problems == 0 for d in self.datasets)

    def to_dict(self) -> dict[str, Any]:
        datasets = [{f.name: dict(v) if isinstance(v := getattr(d, f.name), Counter) else v
                     for f in dataclasses.fields(d)} for d in self.datasets]
        return {"stage": self.stage, "max_length": self.max_length, "decoded": self.decoded, "ok": self.ok,
                "datasets": datasets}

    def format(self) -> str:
        lines = [f"data check for stage {self.stage} (max_length {self.max_length}, media "
                 f"{'decoded' if self.decoded else 'checked for existence only'})"]
        total_in: Counter = Counter()
        total_out: Counter = Counter()
        for d in self.datasets:
            total_in.update(d.inputs)
            total_out.update(d.outputs)
            lines.append(f"\n{d.path} [{d.format}, {'held out (eval_data)' if d.held_out else f'weight {d.weight:g}'}]")
            lines.append(f"  records {d.records}, conversations for {self.stage} {d.conversations}, "
                         f"malformed {len(d.malformed)}")
            lines.append(f"  media in:  {_counts(d.inputs)}")
            lines.append(f"  media out: {_counts(d.outputs)}")
            if d.embeddings:
                lines.append(f"  precomputed caption embeddings: {_counts(d.embeddings)}")
            if d.unknown_keys:
                lines.append(f"  keys the {d.format} format does not read (ignored, not an error; a misspelt key "
                             f"drops what it holds from training): {len(d.unknown_keys)}")
                lines += [f"    - {_unknown_key(k)}" for k in d.unknown_keys[:SHOW]]
                if len(d.unknown_keys) > SHOW:
                    lines.append(f"    ... and {len(d.unknown_keys) - SHOW} more (--json lists all)")
            if d.missing_from_cwd:
                lines.append(f"  note: {len(d.missing_from_cwd)} missing media path(s) name files from the working "
                             f"directory (e.g. {d.missing_from_cwd[0]}): media paths resolve against the dataset's "
                             "root (`root:`, default the data file's folder); write them relative to it, or set root:")
            for title, items in (("dataset problems", d.dataset_problems), ("malformed records", d.malformed), ("missing files", d.missing),
                                 ("unreadable files", d.unreadable), ("over the context length", d.too_long),
                                 ("unusable samples (skipped in training)", d.unusable),
                                 ("embedding problems", d.embedding_problems),
                                 ("ids used by more than one record (not an error; logs name samples by id)",
                                  d.duplicate_ids),
                                 (f"conversations with empty assistant replies (not an error: {d.empty_reply_turns} turn(s) "
                                  "that teach the model only to end its turn at once)", d.empty_replies)):
                if items:
                    lines.append(f"  {title}: {len(items)}")
                    lines += [f"    - {item}" for item in items[:SHOW]]
                    if len(items) > SHOW:
                        lines.append(f"    ... and {len(items) - SHOW} more (--json lists all)")
        lines.append(f"\ntotal media in: {_counts(total_in)}; out: {_counts(total_out)}")
        lines.append("OK" if self.ok else f"{sum(d.problems for d in self.datasets)} problem(s) found")
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, default=str))


def _unknown_key(k: dict[str, Any]) -> str:
    return f"{k['key']}: {k['count']} record(s), first at line {k['first_line']}{did_you_mean(k['did_you_mean'])}"


def _counts(c: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"


class _MediaProbe:
    """Each file checked (and decoded) once, however many records name it."""

    def __init__(self, decode: bool):
        self.decode = decode
        self.seen: dict[tuple[str, Path], str | None] = {}

    def problem(self, modality: str, path: Path) -> str | None:
        key = (modality, path)
        if key not in self.seen:
            self.seen[key] = self._probe(modality, path)
        return self.seen[key]

    def _probe(self, modality: str, path: Path) -> str | None:
        try:
            if not path.is_file():
                return "missing"
        except OSError as exc:  # a name too long, a folder it may not enter: training skips it too
            return str(exc)
        if self.decode:
            try:
                load_media(modality, path)
            except SAMPLE_ERRORS as exc:  # what training skips too
                return str(exc)
        elif path.stat().st_size == 0:
            return "empty file"
        return None


def check_dataset(ds: Any, stage: str, tokenizer: Any, spec: TokenSpec, conditioning_shapes: dict[str, tuple],
                  probe: _MediaProbe, output_media: bool = False) -> DatasetCheck:
    """One dataset of a stage; ``output_media``: the stage reads its outputs' media (a denoising loss)."""
    out = DatasetCheck(str(ds.path), ds.format, ds.weight)
    if stage == "instruct" and ds.format in PAIR_FORMATS:
        out.dataset_problems.append(f"{ds.path}: format {ds.format} holds caption pairs; the instruct stage needs "
                             "conversations")
        return out
    try:
        convs, malformed, unusable = index_dataset(ds, stage)  # the conversations are read from the file, not held
    except (OSError, ValueError, DataFileUnreadable) as exc:
        out.dataset_problems.append(str(exc))
        return out
    out.records = len(convs) + len(malformed) + len(unusable)
    out.unknown_keys = [k.to_dict() for k in convs.unknown_keys]
    out.malformed += malformed + unusable
    if ds.embeddings and conditioning_shapes and not Path(ds.embeddings).is_dir():  # one problem, not one per file
        out.embedding_problems.append(f"embeddings folder {ds.embeddings} not found: every target of {ds.path} "
                                      "is computed with the decoders' own text encoders")
        conditioning_shapes = {}
    full = dataclasses.replace(spec, max_length=10**9)
    first_at: dict[str, str] = {}
    try:
        for batch in _batches(readable(convs, functools.partial(_unusable_record, out)), ENCODE_BATCH):
            for conv, encoded in zip(batch, encode_conversations(batch, tokenizer, full)):
                out.conversations += 1
                if conv.id in first_at and conv.id != conv.source:  # an id of the record's own, not its position
                    out.duplicate_ids.append(f"{conv.id} at {conv.source} (first at {first_at[conv.id]})")
                first_at.setdefault(conv.id, conv.source)
                _check_conversation(conv, encoded, out, tokenizer, spec, conditioning_shapes, probe, output_media)
        if out.missing:  # then some may name files from the working directory: read the conversations again
            out.missing_from_cwd = _found_from_cwd(readable(convs, _already_counted), ds, probe, output_media)
    except DataFileUnreadable as exc:  # the file (its disk) stopped giving records: the next data set is checked
        out.dataset_problems.append(str(exc))
        return out
    if not out.conversations:
        out.dataset_problems.append(f"{ds.path}: no usable records for stage {stage}; training refuses this dataset")
    return out


def _unusable_record(out: DatasetCheck, exc: RecordUnreadable) -> None:
    """A conversation whose record cannot be read from the data file (an I/O error that trying again did not
    clear: training skips that sample), counted and listed as unusable in ``out`` rather than stopping the check."""
    out.conversations += 1
    reason = str(exc)
    out.unusable.append(reason if exc.sample_id == exc.source else f"{exc.sample_id}: {reason}")


def _already_counted(exc: RecordUnreadable) -> None:
    """A record the check's first pass counted as unusable (:func:`_unusable_record`): left out of a later pass,
    not listed again."""


def _batches(convs: Iterable[Conversation], size: int) -> Iterator[list[Conversation]]:
    batch: list[Conversation] = []
    for conv in convs:
        batch.append(conv)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _found_from_cwd(convs: Iterable[Conversation], ds: Any, probe: _MediaProbe, output_media: bool) -> list[str]:
    """The missing media files of ``convs`` whose path, taken from the working directory instead of the
    dataset's root (``root:``, default the data file's folder), names a file: paths written from where the
    command runs."""
    root = Path(os.path.abspath(Path(ds.root or Path(ds.path).parent).expanduser()))
    found: dict[str, None] = {}
    for conv in convs:
        files = [(r.modality, r.path) for r in conv.media_refs()]
        files += [(o.modality, o.path) for o in conv.output_refs() if output_media and o.path is not None]
        for modality, path in files:
            if probe.seen.get((modality, path)) == "missing" and path.is_relative_to(root):
                rel = path.relative_to(root)
                if rel.is_file():
                    found[str(rel)] = None
    return list(found)


def _check_conversation(conv: Conversation, encoded: EncodedSample | ValueError, out: DatasetCheck, tokenizer: Any,
                        spec: TokenSpec, conditioning_shapes: dict[str, tuple], probe: _MediaProbe,
                        output_media: bool) -> None:
    """One conversation's counts and problems; ``encoded``: it encoded without a length limit (or the error)."""
    bad_media = False
    if n := conv.empty_replies():
        out.empty_replies.append(f"{conv.id} at {conv.source} ({n} empty repl{'y' if n == 1 else 'ies'})")
        out.empty_reply_turns += n
    files = [(r.modality, r.path) for r in conv.media_refs()]
    if output_media:  # output media are read only for the denoising loss
        files += [(o.modality, o.path) for o in conv.output_refs() if o.path is not None]
    for ref in conv.media_refs():
        out.inputs[ref.modality] += 1
    for o in conv.output_refs():
        out.outputs[o.modality] += 1
        if o.embedding is not None and o.modality in conditioning_shapes:
            _check_embedding(o.embedding, conditioning_shapes[o.modality], conv, out)
    for modality, path in files:
        problem = probe.problem(modality, path)
        if problem == "missing":
            out.missing.append(f"{path} ({modality}, referenced at {conv.source})")
        elif problem is not None:
            out.unreadable.append(f"{path} ({modality}, referenced at {conv.source}): {problem}")
        bad_media = bad_media or problem is not None
    try:
        if isinstance(encoded, ValueError):
            raise encoded
        length = len(encoded.input_ids)
        if length > spec.max_length:  # within the context, the sample is what was encoded: nothing is cut
            out.too_long.append(f"{conv.id} at {conv.source}: {length} tokens > max_length {spec.max_length}")
            encode_conversation(conv, tokenizer, spec)
    except ValueError as exc:
        reason = str(exc)
        out.unusable.append(f"{conv.id}: {reason}" if reason.startswith(conv.source) else
                            f"{conv.id} at {conv.source}: {reason}")
        return
    if bad_media:
        out.unusable.append(f"{conv.id} at {conv.source}: a media file is missing or unreadable")


def _check_embedding(path: Path, shape: tuple, conv: Conversation, out: DatasetCheck) -> None:
    try:
        load_embedding(path, shape)
    except FileNotFoundError:
        out.embeddings["missing"] += 1
        out.embedding_problems.append(f"{path} not found (referenced at {conv.source}); the target is computed")
    except EmbeddingShapeError as exc:
        out.embeddings["wrong_shape"] += 1
        out.embedding_problems.append(f"{exc} (referenced at {conv.source}); the target is computed")
    except ValueError as exc:
        out.embeddings["unreadable"] += 1
        out.embedding_problems.append(f"{exc} (referenced at {conv.source})")
    else:
        out.embeddings["used"] += 1


def check_stage_data(cfg: Any, model: Any, decode: bool = True) -> CheckReport:
    """Check every dataset of stage config ``cfg`` against the assembled ``model`` (tokenizer, sizes)."""
    from mmllm.training.loop import token_spec

    spec = token_spec(model)
    # without an MSE loss training reads no conditioning targets, so no embedding file is checked
    shapes = {m: tuple(d.conditioning_shape) for m, d in model.decoders.items()} if cfg.losses.mse else {}
    probe = _MediaProbe(decode)
    checks = [check_dataset(ds, cfg.stage, model.llm.tokenizer, spec, shapes, probe, cfg.losses.denoise > 0)
              for ds in cfg.all_data()]
    for c in checks[len(cfg.data):]:
        c.held_out = True
    return CheckReport(cfg.stage, spec.max_length, decode, checks)
