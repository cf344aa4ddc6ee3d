"""The stage's conversations as an index into the data file (mmllm.data.index): the same conversations as
reading the file whole, no conversation objects held, a file changed under a run refused."""

from __future__ import annotations

import codecs
import errno
import gc
import json
import logging
import os
import pickle
from pathlib import Path

import pytest

from mmllm.config import DatasetConfig
from mmllm.data import index as index_module
from mmllm.data.dataset import load_stage_records
from mmllm.data.formats import CaptionPair, Conversation, MediaRoot, read_dataset
from mmllm.data.index import DataFileChanged, DataFileGone, DataFileUnreadable, index_dataset
from mmllm.data.template import pair_to_conversation


def eager(ds: DatasetConfig, stage: str) -> list[Conversation]:
    """What training held before: every record read into objects."""
    records, _ = read_dataset(ds)
    out = []
    for rec in records:
        try:
            out.append(pair_to_conversation(rec, stage) if isinstance(rec, CaptionPair) else rec)
        except ValueError:
            continue
    return out


def write_llava(path: Path, bom: bool) -> None:
    recs = [{"id": f"r{i}", "image": f"img/{i}.png",
             "conversations": [{"from": "human", "value": f"¿Qué es esto? ünïcödé {i} 😀"},
                               {"from": "gpt", "value": f"Réponse {i}"}]} for i in range(5)]
    recs.insert(2, {"id": "broken", "conversations": "nope"})
    text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(recs)) + "\n]\n"
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8"))


def write_pairs(path: Path, newline: bytes) -> None:
    lines = [json.dumps({"id": f"p{i}", "modality": "image", "media": f"img/{i}.png", "caption": f"ça {i} 😀"},
                        ensure_ascii=False).encode() for i in range(6)]
    lines[3] = b'{"id": "bad", "modality": "image"'  # malformed, skipped
    lines.insert(1, b"")  # blank
    lines.insert(4, b'{"id": "nomedia", "modality": "image", "caption": "no file"}')  # unusable for encode-align
    path.write_bytes(codecs.BOM_UTF8 + newline.join(lines) + newline)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_pairs_index_reads_what_the_whole_file_reads(tmp_path, newline):
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, newline)
    ds = DatasetConfig(path=str(path), format="mmllm-pairs")
    index, malformed, unusable = index_dataset(ds, "encode-align")
    assert list(index) == eager(ds, "encode-align")
    assert len(index) == 5 and len(malformed) == 1 and len(unusable) == 1
    assert [c.source for c in index][:2] == [f"{path}:1", f"{path}:3"]  # the lines of the file, as before
    assert index[-1] == index[4] and index[1:3] == [index[1], index[2]]


@pytest.mark.parametrize("bom", [False, True])
def test_json_array_index_reads_what_the_whole_file_reads(tmp_path, bom):
    path = tmp_path / "llava.json"
    write_llava(path, bom)
    ds = DatasetConfig(path=str(path), format="llava")
    index, malformed, _ = index_dataset(ds, "instruct")
    assert len(index) == 5 and len(malformed) == 1
    assert list(index) == eager(ds, "instruct")  # non-ASCII text before a record: its byte offset, not its character's


def test_load_stage_records_holds_no_conversation_objects(tmp_path, sample_data):
    gc.collect()
    before = sum(isinstance(o, Conversation) for o in gc.get_objects())
    per, _, _ = load_stage_records([DatasetConfig(path=str(sample_data["chat"]), format="mmllm-chat")], "instruct")
    gc.collect()
    assert len(per[0]) > 10
    assert sum(isinstance(o, Conversation) for o in gc.get_objects()) == before
    assert isinstance(per[0][3], Conversation)


def test_a_data_file_changed_in_place_is_refused_a_renamed_over_one_read_as_it_was(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, b"\n")
    ds = DatasetConfig(path=str(path), format="mmllm-pairs")
    first, _, _ = index_dataset(ds, "encode-align")
    second, _, _ = index_dataset(ds, "encode-align")
    was = first[2]
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(path.read_text().replace("ça", "la"))
    os.replace(replacement, path)  # an editor's save: the run keeps the file it opened
    assert first[2] == was
    third, _, _ = index_dataset(ds, "encode-align")
    with open(path, "r+b") as fh:  # changed in place
        fh.write(b"[")
    with pytest.raises(DataFileChanged, match=f"data file {path} changed while the run read samples"):
        third[0]
    assert second[2] == was


def test_an_index_is_pickled_without_its_open_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, b"\n")
    index, _, _ = index_dataset(DatasetConfig(path=str(path), format="mmllm-pairs"), "encode-align")
    copy = pickle.loads(pickle.dumps(index))
    assert list(copy) == list(index)


@pytest.mark.parametrize("value", ["a//b/./c.png", "a/../b.png", "../x.png", "/elsewhere/x.png", "a/b/", "./a",
                                   " sub/x.png ", "sub/../../root2/x.png", "//double/x.png"])
@pytest.mark.parametrize("allow", [False, True])
def test_media_paths_resolve_as_pathlib_resolves_them(tmp_path, value, allow):
    root = tmp_path / "root"

    def by_pathlib(value: str) -> Path:  # the resolution before it was done on strings
        p = Path(value.strip()).expanduser()
        full = Path(os.path.abspath(p if p.is_absolute() else root / p))
        if not allow and not full.is_relative_to(root):
            raise ValueError(full)
        return full

    try:
        want = by_pathlib(value)
    except ValueError:
        with pytest.raises(ValueError, match="outside the data root"):
            MediaRoot(root, allow).resolve(value, "here")
    else:
        assert MediaRoot(root, allow).resolve(value, "here") == want


def test_data_check_tokenizes_a_sample_within_the_context_once(tmp_path, monkeypatch, tiny_model):
    """A sample within max_length is the one its first encoding gave (nothing is cut): checking it again at
    max_length doubled the check's time; an over-long sample is still encoded at max_length and judged."""
    from mmllm.data import check
    from mmllm.data.check import _MediaProbe, check_dataset
    from mmllm.training.loop import token_spec

    path = tmp_path / "pairs.jsonl"
    recs = [{"id": f"p{i}", "modality": "image", "caption": "a red circle"} for i in range(3)]
    recs.append({"id": "long", "modality": "image", "caption": " ".join(["word"] * 400)})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    calls = []
    real, batch = check.encode_conversation, check.encode_conversations
    monkeypatch.setattr(check, "encode_conversation", lambda conv, *a: calls.append(conv.id) or real(conv, *a))
    monkeypatch.setattr(check, "encode_conversations",
                        lambda convs, *a: calls.extend(c.id for c in convs) or batch(convs, *a))
    spec = token_spec(tiny_model)
    out = check_dataset(DatasetConfig(path=str(path), format="mmllm-pairs"), "decode-align", tiny_model.llm.tokenizer,
                        spec, {}, _MediaProbe(decode=False))
    assert calls == ["p0", "p1", "p2", "long", "long"]
    assert out.conversations == 4 and len(out.too_long) == 1 and out.too_long[0].startswith("long at ")


def test_a_sample_drawn_from_a_file_changed_in_place_stops_training_rather_than_being_skipped(tmp_path, tiny_model):
    from mmllm.data.dataset import StageDataset
    from mmllm.training.loop import token_spec

    path = tmp_path / "pairs.jsonl"
    write_pairs(path, b"\n")
    per, _, _ = load_stage_records([DatasetConfig(path=str(path), format="mmllm-pairs")], "decode-align")
    ds = StageDataset(per[0], tiny_model.llm.tokenizer, token_spec(tiny_model), {})
    assert ds.length(0) > 0
    path.write_bytes(path.read_bytes().replace(b"p0", b"q0"))  # same size: the modification time tells
    os.utime(path, ns=(0, 10**9))
    with pytest.raises(DataFileChanged):
        ds[0]
    with pytest.raises(DataFileChanged):
        ds.length(1)


def test_a_data_file_touched_but_unchanged_is_read_on(tmp_path):
    """Only the modification time moved (``touch``, a copy of the same bytes written in place): the samples are
    the ones read at the start, so the run goes on; a change of the bytes is still refused."""
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, b"\n")
    index, _, _ = index_dataset(DatasetConfig(path=str(path), format="mmllm-pairs"), "encode-align")
    was = list(index)
    os.utime(path, ns=(10**9, 10**9))
    assert list(index) == was
    path.write_bytes(path.read_bytes())  # the same bytes written again in place
    assert list(index) == was
    path.write_bytes(path.read_bytes().replace(b"p0", b"q0"))
    os.utime(path, ns=(2 * 10**9, 2 * 10**9))
    with pytest.raises(DataFileChanged):
        index[0]


def test_a_copy_opening_the_file_again_reads_a_renamed_over_identical_file_and_refuses_another(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, b"\n")
    index, _, _ = index_dataset(DatasetConfig(path=str(path), format="mmllm-pairs"), "encode-align")
    copy = pickle.loads(pickle.dumps(index))  # a spawned data-loader worker's: it opens the file by its name
    same = tmp_path / "same.jsonl"
    same.write_bytes(path.read_bytes())
    os.replace(same, path)  # e.g. a data folder synced again
    assert list(copy) == list(index)
    other = tmp_path / "other.jsonl"
    other.write_bytes(path.read_bytes().replace(b"p0", b"q0"))
    os.replace(other, path)
    copy = pickle.loads(pickle.dumps(index))
    with pytest.raises(DataFileChanged, match=f"data file {path}"):
        copy[0]
    assert index[0].id == "p0"  # the original still reads the file it opened


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts this process's open files in /proc")
def test_more_data_files_than_the_process_may_open_are_read(tmp_path):
    """A run of many data files (shards) holds a bounded number of them open: one descriptor per data file ran
    out of them (ulimit -n, often 1024) and stopped the run before step 1."""
    import resource

    paths = []
    for k in range(150):
        p = tmp_path / f"shard{k}.jsonl"
        p.write_text(json.dumps({"id": f"s{k}", "modality": "image", "media": "x.png", "caption": f"c {k}"}) + "\n")
        paths.append(p)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    gc.collect()
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 100, hard))
    try:
        per, _, _ = load_stage_records([DatasetConfig(path=str(p), format="mmllm-pairs") for p in paths],
                                       "encode-align")
        assert [convs[0].id for convs in per] == [f"s{k}" for k in range(150)]
        assert [convs[0].id for convs in reversed(per)] == [f"s{k}" for k in reversed(range(150))]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_closed_data_file_is_opened_again_where_it_was_found_after_a_change_of_working_directory(
        tmp_path, monkeypatch):
    """A data file closed for others (more than OPEN_DATA_FILES) is opened again by its name: a relative name
    (a config's data path as given) was looked up in the working directory of the moment, so a notebook that
    had changed directory since read another file, or none (FileNotFoundError)."""
    from mmllm.data import index as index_module

    monkeypatch.setattr(index_module._OPEN, "limit", 1)
    (tmp_path / "data").mkdir()
    write_pairs(tmp_path / "data" / "a.jsonl", b"\n")
    write_pairs(tmp_path / "data" / "b.jsonl", b"\n")
    monkeypatch.chdir(tmp_path)
    first, _, _ = index_dataset(DatasetConfig(path="data/a.jsonl", format="mmllm-pairs"), "encode-align")
    was = list(first)
    second, _, _ = index_dataset(DatasetConfig(path="data/b.jsonl", format="mmllm-pairs"), "encode-align")
    second[0]  # a.jsonl is closed
    monkeypatch.chdir(tmp_path / "data")
    assert list(first) == was


def test_a_record_that_cannot_be_read_again_from_an_unchanged_file_is_a_fault_not_a_changed_file(tmp_path):
    """A wrong span in the index (mmllm's fault: the file holds the bytes it held) was reported as DataFileChanged,
    a user error: one line, exit 2, no traceback, and the user told to restore a file nobody had touched."""
    from mmllm.config import UserError

    path = tmp_path / "pairs.jsonl"
    write_pairs(path, b"\n")
    index, _, _ = index_dataset(DatasetConfig(path=str(path), format="mmllm-pairs"), "encode-align")
    index.offsets = index.offsets.copy()
    index.offsets[1] += 3  # as a span computed wrongly would be
    with pytest.raises(RuntimeError, match=f"{path}:3: the record read at the start of the run cannot be read again "
                                           "from bytes") as raised:
        index[1]
    assert not isinstance(raised.value, UserError)


def test_a_length_asked_of_a_record_unreadable_from_an_unchanged_file_raises_the_fault(tmp_path, tiny_model):
    """group_by_length asks StageDataset.length() of each sample before drawing it: a record that cannot be read
    again from the unchanged file (a wrong span, mmllm's fault, exit 70) was taken there for a sample that cannot
    be encoded (length 0, nothing said), while drawing the same sample raised it."""
    from mmllm.data.dataset import StageDataset
    from mmllm.training.loop import token_spec

    path = tmp_path / "pairs.jsonl"
    write_pairs(path, b"\n")
    per, _, _ = load_stage_records([DatasetConfig(path=str(path), format="mmllm-pairs")], "decode-align")
    ds = StageDataset(per[0], tiny_model.llm.tokenizer, token_spec(tiny_model), {})
    assert ds.length(1) > 0
    per[0].offsets = per[0].offsets.copy()
    per[0].offsets[1] += 3  # as a span computed wrongly would be
    for read in (ds.__getitem__, ds.length):
        with pytest.raises(RuntimeError, match="cannot be read again from bytes"):
            read(1)
    assert ds.length(0) > 0


def test_a_file_changed_in_place_keeping_its_size_and_time_is_still_a_changed_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, b"\n")
    index, _, _ = index_dataset(DatasetConfig(path=str(path), format="mmllm-pairs"), "encode-align")
    st = path.stat()
    path.write_bytes(path.read_bytes().replace(b'{"id": "p2"', b'["id": "p2"'))  # same size, not JSON
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # a file system of coarse times: no change seen
    with pytest.raises(DataFileChanged, match="cannot be read again"):
        index[2]
def test_records_appended_to_a_data_file_are_read_on_and_said_once(tmp_path, caplog):
    """Appending to a JSONL file while a run reads it (new lines after the last, the indexed records' bytes
    unchanged) stopped the run; now the run reads on, warning once that the appended records are not trained
    on. A change of the indexed bytes after the append is still refused, and a copy that opens the file
    again by its name (a closed file, a worker) reads on too."""
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, b"\n")
    index, _, _ = index_dataset(DatasetConfig(path=str(path), format="mmllm-pairs"), "encode-align")
    was = list(index)
    late = b'{"id": "late", "modality": "image", "media": "img/9.png", "caption": "late"}\n'
    with caplog.at_level(logging.WARNING, logger="mmllm.data.index"):
        for _ in range(2):
            with open(path, "ab") as fh:
                fh.write(late)
            assert list(index) == was and len(index) == 5
    grown = [r.getMessage() for r in caplog.records if "grew by" in r.getMessage()]
    assert len(grown) == 1 and "not trained on in this run" in grown[0], grown
    assert list(pickle.loads(pickle.dumps(index))) == was  # opened again by its path
    data = path.read_bytes()
    path.write_bytes(data.replace(b"p0", b"q0") + late)  # an indexed record rewritten, the file grown
    with pytest.raises(DataFileChanged, match=f"data file {path} changed while the run read samples"):
        index[0]


def test_a_data_file_deleted_after_it_was_closed_says_so(tmp_path, monkeypatch):
    """A data file closed for another one (more than OPEN_DATA_FILES) and deleted: opening it again by its name
    raised a bare FileNotFoundError out of the training loop."""
    monkeypatch.setattr(index_module._OPEN, "limit", 1)
    write_pairs(tmp_path / "a.jsonl", b"\n")
    write_pairs(tmp_path / "b.jsonl", b"\n")
    first, _, _ = index_dataset(DatasetConfig(path=str(tmp_path / "a.jsonl"), format="mmllm-pairs"), "encode-align")
    second, _, _ = index_dataset(DatasetConfig(path=str(tmp_path / "b.jsonl"), format="mmllm-pairs"), "encode-align")
    second[0]  # a.jsonl is closed
    (tmp_path / "a.jsonl").unlink()
    with pytest.raises(DataFileGone, match="is gone: deleted or moved while the run read samples from it.*resume"):
        first[0]


def failing_pread(monkeypatch, fails) -> list[int]:
    """``os.pread`` raising EIO while ``fails(offset, calls so far at that offset)``; returns the offsets read."""
    real, calls = os.pread, []

    def pread(fd, length, offset):
        calls.append(offset)
        if fails(offset, calls.count(offset)):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(index_module, "READ_RETRY_DELAYS", (0, 0))
    monkeypatch.setattr(index_module, "FILE_RETRY_DELAYS", (0, 0))
    return calls


def pairs_dataset(tmp_path, tiny_model, n: int = 6):
    from mmllm.data.dataset import StageDataset
    from mmllm.training.loop import token_spec

    path = tmp_path / f"pairs{n}.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "modality": "image", "caption": f"a red circle {i}"}) + "\n"
                            for i in range(n)))
    per, _, _ = load_stage_records([DatasetConfig(path=str(path), format="mmllm-pairs")], "decode-align")
    return path, per[0], StageDataset(per[0], tiny_model.llm.tokenizer, token_spec(tiny_model), {})


def test_a_record_the_data_file_fails_to_give_is_skipped_and_counted_not_the_run_stopped(tmp_path, tiny_model):
    """An I/O error reading one sample's record (EIO: a bad block, a network file system) stopped a multi-day
    run: it came before the sample's error handling. It is tried again (the file opened again), then the sample
    is skipped, named in the log and counted, as one with an unreadable image is; a read that fails once and
    then works gives the sample."""
    from mmllm.data.dataset import SampleError, collate

    path, convs, ds = pairs_dataset(tmp_path, tiny_model)
    bad = int(convs.offsets[2])
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as mp:
        calls = failing_pread(mp, lambda offset, k: offset == bad)
        got = ds[2]
        assert isinstance(got, SampleError) and got.id == f"{path}:3"
        assert "Input/output error" in got.error and "tried 3 times" in got.error
        assert calls.count(bad) == 3 and len(calls) > 3  # three tries, and another record read (the file reads)
        batch = collate([ds[i] for i in range(4)], tiny_model.llm.tokenizer.pad_token_id)
        assert batch["ids"] == ["p0", "p1", "p3"] and [i for i, _ in batch["skipped"]] == [f"{path}:3"]
        assert ds.length(2) == 0 and ds.length(1) > 0
    with monkeypatch.context() as mp:
        failing_pread(mp, lambda offset, k: offset == bad and k == 1)  # once
        assert ds[2]["id"] == "p2"


def test_a_data_file_that_cannot_be_read_stops_the_run_rather_than_skipping_every_sample(tmp_path, tiny_model):
    _, convs, ds = pairs_dataset(tmp_path, tiny_model)
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as mp:
        failing_pread(mp, lambda offset, k: True)
        with pytest.raises(DataFileUnreadable, match=r"pairs6.jsonl cannot be read: not the record at line 3 .*nor "
                                                     r"the record at line 6.*resume the run"):
            ds[2]
        with pytest.raises(DataFileUnreadable):
            ds.length(0)
    _, _, one = pairs_dataset(tmp_path, tiny_model, n=1)
    with monkeypatch.context() as mp:
        failing_pread(mp, lambda offset, k: True)
        with pytest.raises(DataFileUnreadable, match="its only record"):
            one[0]
    assert ds[2]["id"] == "p2"  # readable again: read on


def test_a_media_lookup_the_file_system_refuses_skips_the_sample(tmp_path, tiny_model, monkeypatch):
    """nextgpt's media lookup (a stat) refused with EACCES when a sample is drawn (its folder's permissions
    changed mid-run) stopped the run; the sample is now skipped under its id, as an unreadable image is."""
    from mmllm.data import nextgpt
    from mmllm.data.dataset import SampleError, StageDataset
    from mmllm.training.loop import token_spec

    data = _pairs_file(tmp_path, [f"{i}.png" for i in range(3)])
    path = data.path
    per, _, _ = load_stage_records([data], "decode-align")
    ds = StageDataset(per[0], tiny_model.llm.tokenizer, token_spec(tiny_model), {})
    real = os.stat

    def stat(p, *a, **k):
        if str(p).endswith("1.png"):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real(p, *a, **k)

    monkeypatch.setattr(nextgpt.os, "stat", stat)
    got = ds[1]
    assert isinstance(got, SampleError) and got.id == "n1" and "Permission denied" in got.error
    assert f"{path}:" in got.error
    assert ds[0]["id"] == "n0"


def test_data_check_lists_a_record_the_data_file_fails_to_give_and_checks_the_rest(tmp_path, tiny_model):
    """Training skips a sample whose record the file fails to give (tried again); `mmllm data check` stopped at
    it (an OSError out of the command: one line, exit 2, no report). It lists it among the samples training
    skips and checks the others; a file that gives no record at all is a problem of that data set."""
    from mmllm.data.check import _MediaProbe, check_dataset
    from mmllm.training.loop import token_spec

    path, convs, _ = pairs_dataset(tmp_path, tiny_model)
    bad = int(convs.offsets[2])

    def check():
        return check_dataset(DatasetConfig(path=str(path), format="mmllm-pairs"), "decode-align",
                             tiny_model.llm.tokenizer, token_spec(tiny_model), {}, _MediaProbe(decode=False))

    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as mp:
        failing_pread(mp, lambda offset, k: offset == bad)
        out = check()
    assert out.conversations == 6 and out.problems == 1 and not out.dataset_problems
    assert len(out.unusable) == 1 and out.unusable[0].startswith(f"{path}:3: the record cannot be read")
    assert "Input/output error" in out.unusable[0]
    with monkeypatch.context() as mp:
        failing_pread(mp, lambda offset, k: offset >= bad)
        out = check()
    assert len(out.dataset_problems) == 1 and f"data file {path} cannot be read" in out.dataset_problems[0]
    assert check().problems == 0


def test_passes_over_the_whole_data_leave_out_a_record_the_file_fails_to_give(tmp_path, caplog):
    """`mmllm cache` (what to cache) and cache.require's check before step 1 read every record: one the data file
    fails to give, after its retries, stopped them (an OSError: one line, exit 2; a run that skips that sample
    could not start). They leave it out, as training skips it, saying so."""
    from mmllm.data.cache_build import _what_to_cache
    from mmllm.data.index import Chained, readable
    from mmllm.data.precomputed import Precomputed

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "modality": "image", "media": f"img/{i}.png",
                                        "caption": f"c {i}"}) + "\n" for i in range(6)))
    index, _, _ = index_dataset(DatasetConfig(path=str(path), format="mmllm-pairs"), "encode-align")
    bad = int(index.offsets[2])
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as mp, caplog.at_level(logging.WARNING, logger="mmllm.data.index"):
        failing_pread(mp, lambda offset, k: offset == bad)
        assert [c.id for c in readable(Chained([index, index]))] == ["p0", "p1", "p3", "p4", "p5"] * 2
        paths, _ = _what_to_cache([index])
        pre = Precomputed(None, tmp_path, {"image": "fp"}, {}, {"image": (4, 8)}, {})
        cov = pre.coverage(Chained([index]), ["encoder/image"])
    assert sorted(p.name for p in paths["image"]) == ["0.png", "1.png", "3.png", "4.png", "5.png"]
    assert len(cov.unreadable) == 5 and not any("2.png" in u for u in cov.unreadable)  # no file: unreadable
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert left_out and left_out[0].startswith(f"{path}:3: the record cannot be read"), left_out
    assert [c.id for c in readable([*index])] == [f"p{i}" for i in range(6)]


def nextgpt_pairs(tmp_path, tiny_model, n: int = 16):
    """nextgpt pairs, whose parser looks each image up (a stat) when a sample is read: captions of 1 to 5 times a
    phrase, so that their token lengths differ (sample 2 among the longest)."""
    from mmllm.data.dataset import StageDataset
    from mmllm.training.loop import token_spec

    path = tmp_path / "cc3m.json"
    path.write_text(json.dumps([{"id": f"n{i}", "caption": " ".join(["a red circle"] * (1 + i * 7 % 5)),
                                 "image_name": f"{i}.png"} for i in range(n)]))
    per, _, _ = load_stage_records([DatasetConfig(path=str(path), format="nextgpt-pairs")], "decode-align")
    return StageDataset(per[0], tiny_model.llm.tokenizer, token_spec(tiny_model), {})


def flaky_stat(monkeypatch, name: str, failures: int | None) -> list[int]:
    """nextgpt's media lookup (``os.stat``) of the image ``name`` failing with EIO its first ``failures`` times
    (None: always); returns one entry per failure."""
    from mmllm.data import nextgpt

    real, failed = os.stat, []

    def stat(p, *a, **k):
        if str(p).endswith(os.sep + name) and (failures is None or len(failed) < failures):
            failed.append(1)
            raise OSError(errno.EIO, "Input/output error", str(p))
        return real(p, *a, **k)

    monkeypatch.setattr(nextgpt.os, "stat", stat)
    monkeypatch.setattr(index_module, "READ_RETRY_DELAYS", (0, 0))
    return failed


def grouped_order(ds) -> list[list[tuple[int, int]]]:
    """The micro-batches (of 2) of 2 epochs of ``ds`` grouped by length in chunks of 4 micro-batches, as training
    orders them."""
    from mmllm.data.dataset import LengthGroupedSampler, MixtureSampler

    sampler = LengthGroupedSampler(MixtureSampler([len(ds)], [1.0], 0), lambda d, i: ds.length(i), group_batches=4)
    return [sampler.micro_batch(step, 0, 1, 0, 1, 2) for step in range(len(ds))]


def test_a_media_lookup_that_fails_once_gives_the_batch_order_of_a_clean_read(tmp_path, tiny_model, monkeypatch,
                                                                             caplog):
    """An I/O error looking up a sample's image (a stat: a network file system's hiccup) while group_by_length
    measured the sample made its length 0 (it was not tried again, as a read of the record's bytes is), so its
    chunk's batches came in another order than in a run without the hiccup -- a resumed run, or another process
    measuring that sample, read other batches. It is now tried again: one failure gives the clean order."""
    ds = nextgpt_pairs(tmp_path, tiny_model)
    clean = grouped_order(ds)
    assert ds.length(2) > min(ds.length(i) for i in range(len(ds)))  # a length 0 would move it
    with monkeypatch.context() as mp:
        failed = flaky_stat(mp, "2.png", 1)
        assert grouped_order(ds) == clean
    assert failed == [1]  # it did fail, once
    assert "looking up the record's media failed" in caplog.text


def test_a_sample_that_stays_unreadable_is_ordered_alike_in_every_run_and_named(tmp_path, tiny_model, monkeypatch,
                                                                              caplog):
    """A sample whose image lookup keeps failing is measured as length 0 in every run (the order is the same in
    a resumed run that finds it unreadable too), said with its id as the read that skips it says it, and still
    drawn (the other samples keep their places among the draws), then skipped."""
    from mmllm.data.dataset import SampleError

    ds = nextgpt_pairs(tmp_path, tiny_model)
    clean = grouped_order(ds)
    with monkeypatch.context() as mp:
        flaky_stat(mp, "2.png", None)
        once = grouped_order(ds)
        assert grouped_order(ds) == once
        got = ds[2]
    assert isinstance(got, SampleError) and got.id == "n2"
    assert "sample n2 cannot be read" in caplog.text and "ordered as length 0" in caplog.text
    assert sorted(p for b in once for p in b) == sorted(p for b in clean for p in b)


def test_a_signal_ends_the_wait_before_a_read_is_tried_again(tmp_path, tiny_model, monkeypatch):
    """A failed read waits before it is tried again (0.1 s and 1 s, then 5 s and 30 s for another record of the
    file); training's SIGTERM handler only records the request, which wakes no sleep, so a `kill` during them
    took up to 36 s to be acted on. Within waits_end_when a signal ends the wait at once, raising ReadStopped: for
    the sample drawn (not skipped as unreadable: training stops before that step) and for a length asked for."""
    import signal
    import threading
    import time

    from mmllm.data.index import ReadStopped, waits_end_when
    from mmllm.training.interrupt import StopRequests

    _, convs, ds = pairs_dataset(tmp_path, tiny_model)
    failing_pread(monkeypatch, lambda offset, k: True)
    monkeypatch.setattr(index_module, "READ_RETRY_DELAYS", (20.0, 20.0))
    with StopRequests() as stop:
        stop.armed = True  # as while steps run: the handler records the signal and returns
        with waits_end_when(lambda: stop.name is not None):
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
            started = time.monotonic()
            with pytest.raises(ReadStopped, match="a stop was asked for while a failed read of the data file "
                                                  "waited") as given_up:
                ds[2]
            took = time.monotonic() - started
            assert stop.name == "SIGTERM"
            assert given_up.value.where == f"{convs.path}:3"
            assert took < 2.0, took
            started = time.monotonic()
            with pytest.raises(ReadStopped):  # asked for already: no wait at all
                ds.length(3)
            assert time.monotonic() - started < 0.5


def test_missing_media_files_are_not_waited_on(tmp_path, monkeypatch):
    """A media lookup that fails with an error that may pass is tried again after waits (READ_RETRY_DELAYS, 1.1 s
    a sample); a media file that is not there (the common case: a download that missed some) is no such error
    (nextgpt's lookup takes ENOENT for "not there"): drawing 200 such samples waits for nothing."""
    import time

    per, _, _ = load_stage_records([_pairs_file(tmp_path, [f"{i}.png" for i in range(200)])], "decode-align")
    monkeypatch.setattr(index_module, "READ_RETRY_DELAYS", (5.0, 5.0))
    started = time.monotonic()
    got = [per[0][i] for i in range(len(per[0]))]
    assert time.monotonic() - started < 2.0
    assert [c.id for c in got] == [f"n{i}" for i in range(200)]
    assert not any(p.exists() for c in got for p in (r.path for r in c.media_refs()))


def test_a_media_lookup_that_fails_once_while_the_file_is_first_read_keeps_the_record(tmp_path, tiny_model,
                                                                                      monkeypatch, caplog):
    """An I/O error looking up a sample's image while training first read the data file (nextgpt's stat: a
    network file system's hiccup) made the record malformed for the whole run: one sample fewer, so every batch
    after it held other samples, and a resumed run (reading cleanly) warned of "fewer records". The lookup is
    tried again as a drawn sample's is: the run has the samples, and the batch order, of a clean read."""
    (tmp_path / "clean").mkdir()
    (tmp_path / "flaky").mkdir()
    clean = grouped_order(nextgpt_pairs(tmp_path / "clean", tiny_model))
    with monkeypatch.context() as mp:
        failed = flaky_stat(mp, "2.png", 1)
        ds = nextgpt_pairs(tmp_path / "flaky", tiny_model)
    assert failed == [1]  # it did fail, once, while the file was read
    assert len(ds) == 16 and grouped_order(ds) == clean
    assert "looking up the record's media failed" in caplog.text and "malformed" not in caplog.text


def test_media_lookups_that_keep_failing_while_the_file_is_first_read_stop_the_run_at_once(tmp_path, monkeypatch):
    """Every media lookup failing (a dead mount) would cost each record its retries (1.1 s: 13 days for a
    million records) and skip them all as malformed: two records in a row whose lookups still fail stop the
    run (DataFileUnreadable, naming both), having tried only those two."""
    import time

    data = _pairs_file(tmp_path, [f"{i}.png" for i in range(1000)])
    calls = _stat_failing(monkeypatch, lambda name, tries: True)  # every image's, not the data file's
    monkeypatch.setattr(index_module, "READ_RETRY_DELAYS", (0.05, 0.1))
    started = time.monotonic()
    with pytest.raises(DataFileUnreadable, match=r"the media of 2 records in a row cannot be looked up \(line 1: "
                                                 r".*0\.png.*; line 1: .*1\.png.*Check the storage"):
        index_dataset(data, "decode-align")
    assert time.monotonic() - started < 1.0
    assert len(calls) == 6  # two records, three tries each


def test_a_media_file_whose_lookup_keeps_failing_is_malformed_and_waited_on_once(tmp_path, monkeypatch, caplog):
    """One image whose lookup keeps failing (a bad block), named by several records: the first record is tried
    again, then skipped as malformed; the others naming it are not waited on again, and a few other such files,
    each between records that read, do not stop the run. Past LOOKUP_RETRIED_RECORDS of them a failed lookup is
    not tried again: the waits of a file are bounded."""
    from mmllm.data import nextgpt

    names = ["bad.png" if i % 10 == 3 else f"b{i}.png" if i % 10 == 7 else f"{i}.png" for i in range(100)]
    real, failed = os.stat, []

    def stat(p, *a, **k):
        if os.path.basename(str(p)) == "bad.png" or os.path.basename(str(p)).startswith("b"):
            failed.append(os.path.basename(str(p)))
            raise OSError(errno.EIO, "Input/output error", str(p))
        return real(p, *a, **k)

    monkeypatch.setattr(nextgpt.os, "stat", stat)
    monkeypatch.setattr(index_module, "READ_RETRY_DELAYS", (0, 0))
    index, malformed, _ = index_dataset(_pairs_file(tmp_path, names), "decode-align")
    assert len(index) == 80 and len(malformed) == 20
    assert failed.count("bad.png") == 3 + 9  # tried three times for its first record, once for each other
    retried = index_module.LOOKUP_RETRIED_RECORDS
    assert len(failed) == 12 + 3 * (retried - 1) + (10 - (retried - 1))  # b7, b17, ...: retried up to the bound
    assert "no longer tried again" in caplog.text


def _pairs_file(tmp_path, names: list[str]):
    path = tmp_path / "cc3m.json"
    path.write_text(json.dumps([{"id": f"n{i}", "caption": f"a red circle {i}", "image_name": name}
                                for i, name in enumerate(names)]))
    return DatasetConfig(path=str(path), format="nextgpt-pairs")


def _stat_failing(monkeypatch, fails) -> list[str]:
    """nextgpt's media lookup failing with EIO where ``fails(name, tries so far of it)``; the names tried."""
    from mmllm.data import nextgpt

    real, tried = os.stat, []

    def stat(p, *a, **k):
        name = os.path.basename(str(p))
        if name.endswith(".png"):
            tried.append(name)
            if fails(name, tried.count(name)):
                raise OSError(errno.EIO, "Input/output error", str(p))
        return real(p, *a, **k)

    monkeypatch.setattr(nextgpt.os, "stat", stat)
    monkeypatch.setattr(index_module, "READ_RETRY_DELAYS", (0, 0))
    return tried


def test_past_the_retry_bound_two_records_in_a_row_failing_once_do_not_stop_the_run(tmp_path, monkeypatch):
    """Past LOOKUP_RETRIED_RECORDS bad files (each between records that read), a failed lookup is not tried again:
    two records in a row whose lookups each failed once (a flaky mount: tried again they read) stopped the run as
    an unreadable mount, though neither had been tried again. The second is tried again: it reads, and the run
    goes on (the first, untried, is malformed as the bound says)."""
    bound = index_module.LOOKUP_RETRIED_RECORDS
    names = [n for i in range(bound) for n in (f"bad{i}.png", f"{i}.png")] + ["once0.png", "once1.png", "z.png"]
    _stat_failing(monkeypatch, lambda name, tries: name.startswith("bad") or (name.startswith("once") and tries == 1))
    index, malformed, _ = index_dataset(_pairs_file(tmp_path, names), "decode-align")
    assert len(malformed) == bound + 1  # the bad files, and once0.png (failed untried)
    assert [c.id for c in index] == [f"n{2 * i + 1}" for i in range(bound)] + [f"n{2 * bound + 1}", f"n{2 * bound + 2}"]


def test_past_the_retry_bound_a_mount_gone_dead_still_stops_the_run(tmp_path, monkeypatch):
    """Past the bound, every lookup failing from some record on (the mount gone): the record after the first
    untried failure is tried again, and two records in a row failing for good still stop the run."""
    bound = index_module.LOOKUP_RETRIED_RECORDS
    names = [n for i in range(bound) for n in (f"bad{i}.png", f"{i}.png")] + [f"dead{i}.png" for i in range(50)]
    tried = _stat_failing(monkeypatch, lambda name, tries: not name[0].isdigit())
    with pytest.raises(DataFileUnreadable, match=r"2 records in a row .*dead1\.png.*dead2\.png"):
        index_dataset(_pairs_file(tmp_path, names), "decode-align")
    assert sum(n.startswith("dead") for n in tried) == 1 + 3 + 3  # dead0 untried, then dead1 and dead2 three times
