"""`mmllm infer` at the scale of 100k-1M requests, checked on small inputs: what grows with the number of
requests -- the memory of the requests read, the passes over results.jsonl, fsyncs, the gallery's size and how
often it is rewritten -- stays bounded, and results.jsonl and resuming behave as before."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from mmllm import folder_lock
from mmllm.cli import main
from mmllm.inference import gallery, runner
from mmllm.inference.gallery import latest_records, write_gallery
from mmllm.inference.runner import run_requests
from tests.test_infer import GENERATE, ckpt, model, records_by_id, write_requests  # noqa: F401  (fixtures)

GENERATE_IMAGE = GENERATE["image"]


def _record(rid: str, line: int, error: str | None = None, files: list[str] | None = None) -> dict:
    rec = {"id": rid, "line": line, "prompt": f"prompt of {rid}", "text": f"answer of {rid}", "files": files or [],
           "seed": 0, "seconds": {"llm": 0.1}, "batch_size": 8, "error": error}
    return rec if error is None else {**rec, "error_stage": "prepare"}


def _write_results(out: Path, records: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _ids(page: str) -> list[str]:
    return re.findall(r"<h2>([^<]*)</h2>", page)


# ------------------------------------------------------------------------------------------ requests file


def test_reading_requests_holds_their_text_not_a_dict_each(tmp_path):
    """read_lines read the whole file with read_bytes and kept a parsed dict per request: 900 bytes each."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": f"r{i:06d}", "prompt": f"What is {i} plus {i}?",
                                                      "seed": i, "max_new_tokens": 8} for i in range(20_000)])
    tracemalloc.start()
    try:
        lines = runner.read_lines(requests)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_line = held / len(lines)
    assert len(lines) == 20_000 and lines[123].record == {"id": "r000123", "prompt": "What is 123 plus 123?",
                                                           "seed": 123, "max_new_tokens": 8}
    assert per_line < 400, f"{per_line:.0f} bytes held per request"  # 703 before (a dict per request)
    assert peak < held + requests.stat().st_size // 2  # never the whole file at once beside the lines


def test_a_malformed_line_s_error_position_is_on_its_own_line(tmp_path):
    requests = write_requests(tmp_path / "r.jsonl", ['{"id": "a", "prompt": "x"', {"id": "b", "prompt": "y"}])
    bad, good = runner.read_lines(requests)
    assert "r.jsonl:1: malformed request" in bad.error and "line 1 column" in bad.error
    assert good.record == {"id": "b", "prompt": "y"}


# ------------------------------------------------------------------------------------------ results.jsonl


@pytest.mark.parametrize("content", [b"", b"no newline", b"a\n", b"a\nb", b"abcdefgh\nij", b"\n" * 9 + b"x" * 9])
def test_the_end_of_the_last_line_is_found_reading_from_the_end(tmp_path, content):
    path = tmp_path / "results.jsonl"
    path.write_bytes(content)
    for block in (1, 2, 3, 4, 1 << 16):
        assert runner._end_of_last_line(path, block) == content.rfind(b"\n") + 1


def test_records_are_flushed_at_once_and_fsynced_once_a_second_not_one_by_one(model, tmp_path, monkeypatch):  # noqa: F811
    """An fsync per record (3.5 ms here) was 60% of a run of text requests on the tiny model. A kill must
    still lose no record written: each is in the file (flushed) before the next request is answered."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": f"r{i}", "prompt": f"Hello number {i}."}
                                                     for i in range(10)])
    out = tmp_path / "out"
    real_write, real_fsync, fsyncs, seen = runner.write_outputs, os.fsync, [], []

    def count_fsync(fd):
        fsyncs.append(fd)
        real_fsync(fd)

    def look_at_the_file(out_, rid, *args, **kwargs):  # what a kill at this moment would leave
        seen.append(len((out / "results.jsonl").read_text().splitlines()) if (out / "results.jsonl").exists() else 0)
        return real_write(out_, rid, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", count_fsync)
    monkeypatch.setattr(runner, "write_outputs", look_at_the_file)
    counts = run_requests(model, requests, out, batch_size=1, max_new_tokens=3)
    assert counts["done"] == 10 and seen == list(range(10))
    assert len(fsyncs) <= 6, f"{len(fsyncs)} fsyncs for 10 records"  # the log's at its end, the gallery's 2 a write
    assert len(records_by_id(out)) == 10


def test_a_record_interrupted_before_its_flush_is_fsynced_when_the_log_closes(model, tmp_path, monkeypatch):  # noqa: F811
    """Ctrl-C between a record's write and its flush left it in the log's buffer: the log's close fsynced the file
    without it, and only then wrote it (on disk after a power loss: not)."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": f"r{i}", "prompt": f"Hello number {i}."}
                                                     for i in range(6)])
    out = tmp_path / "out"
    real_open, real_fsync, synced = open, os.fsync, []

    class CtrlCBeforeTheThirdFlush:
        def __init__(self, fh):
            self.fh, self.flushes = fh, 0

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def flush(self):
            self.flushes += 1
            if self.flushes == 3:
                raise KeyboardInterrupt
            self.fh.flush()

    def results_log_open(file, *args, **kwargs):  # the log opens its file descriptor; other opens pass
        fh = real_open(file, *args, **kwargs)
        return CtrlCBeforeTheThirdFlush(fh) if isinstance(file, int) else fh

    def fsync(fd):
        synced.append((os.fstat(fd).st_ino, os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(runner, "open", results_log_open, raising=False)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        run_requests(model, requests, out, batch_size=1, max_new_tokens=2)
    results = out / "results.jsonl"
    assert len(results.read_text().splitlines()) == 3  # the third written, not flushed when Ctrl-C came
    last_sync = [size for ino, size in synced if ino == results.stat().st_ino][-1]
    assert last_sync == results.stat().st_size


def test_a_resume_checks_earlier_answers_once(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """mmllm infer checked them before loading the model, and run_requests again: two passes over
    results.jsonl and the requests file, seconds each at 100,000 requests."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello."}, {"id": "b", "prompt": "Hi."}])
    out = tmp_path / "out"
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out), "--max-new-tokens", "3"]
    real, calls = runner.check_resume, []
    monkeypatch.setattr(runner, "check_resume", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(args) == 0
    write_requests(requests, [{"id": "a", "prompt": "Hello."}, {"id": "b", "prompt": "Hi."}, {"id": "c", "prompt": "Hey."}])
    assert main(args) == 0
    assert len(calls) == 2  # once per run
    assert sorted(records_by_id(out)) == ["a", "b", "c"]


def test_infer_reads_the_requests_file_once(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """mmllm infer read it to check the earlier answers, and run_requests again after the model loaded, the first
    copy still held: two at once (0.28 GB each at a million requests), and a run of other requests than checked."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello."}, {"id": "b", "prompt": "Hi."}])
    out = tmp_path / "out"
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out), "--max-new-tokens", "3"]
    real, reads = runner.read_lines, []
    monkeypatch.setattr(runner, "read_lines", lambda path: reads.append(path) or real(path))
    assert main(args) == 0 and len(reads) == 1
    write_requests(requests, [{"id": "a", "prompt": "Hello."}, {"id": "b", "prompt": "Hi."}, {"id": "c", "prompt": "Hey."}])
    assert main(args) == 0 and len(reads) == 2  # a resume: the model loads for c
    assert sorted(records_by_id(out)) == ["a", "b", "c"]


def test_infer_overwrite_reads_the_requests_file_once(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """--overwrite's check (mmllm infer's, then run_requests') read the file again each time, while mmllm infer's
    copy was held: three reads, two copies at once (0.28 GB each at a million requests)."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello."}, {"id": "b", "prompt": "Hi."}])
    out = tmp_path / "out"
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out), "--max-new-tokens", "3"]
    assert main(args) == 0  # OUT holds a run's outputs: the overwrite's check looks at every request's inputs
    real, reads = runner.read_lines, []
    monkeypatch.setattr(runner, "read_lines", lambda path: reads.append(path) or real(path))
    assert main([*args, "--overwrite"]) == 0 and len(reads) == 1
    assert sorted(records_by_id(out)) == ["a", "b"]


def test_a_resume_parses_again_only_the_requests_that_name_input_files(model, tmp_path, monkeypatch):  # noqa: F811
    """Each done request was parsed again to find its input files, a quarter of a resume's check at 100,000
    text requests; one unchanged that named none names none now."""
    red = tmp_path / "red.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(red)
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello."}, {"id": "b", "prompt": "Hi."},
                                                     {"id": "c", "prompt": "What is this?", "image": "red.png"}])
    out = tmp_path / "out"
    assert run_requests(model, requests, out, max_new_tokens=3)["done"] == 3
    real, parsed = runner._input_paths, []
    monkeypatch.setattr(runner, "_input_paths", lambda record, base: parsed.append(record["id"]) or real(record, base))
    made = runner.run_settings(None, "float32", max_new_tokens=3)
    runner.check_resume(out, requests, made)
    assert parsed == ["c"]
    Image.new("RGB", (8, 8), (0, 0, 255)).save(red)  # replaced under the same name: still refused
    with pytest.raises(runner.OutputError, match="other contents in its input media files"):
        runner.check_resume(out, requests, made)


def test_infer_prompt_reads_its_answer_s_record_while_it_holds_the_output_folder(ckpt, tmp_path, monkeypatch, capsys):  # noqa: F811
    """The record `mmllm infer --prompt` prints was read after the output folder's lock was let go, in two passes
    (where the records are, then the records): another run taking the folder in between (--overwrite) left the
    second pass nothing, or another file, to read."""
    out = tmp_path / "out"
    real, locked = gallery.iter_latest, []

    def held_elsewhere() -> bool:  # another open file description cannot take the lock while a run holds it
        with open(folder_lock.lock_path(out)) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False

    def reading(results):
        locked.append(folder_lock.lock_path(out).exists() and held_elsewhere())
        return real(results)

    monkeypatch.setattr(gallery, "iter_latest", reading)
    assert main(["infer", "--checkpoint", str(ckpt), "--prompt", "Hello.", "--output", str(out),
                 "--max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["id"].startswith("prompt-") and locked == [True]


def test_latest_records_keep_the_last_record_of_each_request_in_first_seen_order(tmp_path):
    _write_results(tmp_path, [_record("a", 1, error="boom"), _record("b", 2), _record("a", 1)])
    with open(tmp_path / "results.jsonl", "a") as fh:
        fh.write('{"id": "c", "te')  # torn
    assert [(r["id"], r["error"]) for r in latest_records(tmp_path / "results.jsonl")] == [("a", None), ("b", None)]


# ------------------------------------------------------------------------------------------ the gallery


def test_a_large_gallery_is_paged_and_each_page_links_the_others(tmp_path, monkeypatch):
    """One page of 100,000 requests was 31 MB of HTML, which a browser shows only after minutes."""
    monkeypatch.setattr(gallery, "PAGE_SIZE", 2)
    out = tmp_path / "out"
    (out / "media").mkdir(parents=True)
    (out / "media" / "e.png").write_bytes(b"png")
    records = [_record("e", 5, files=["media/e.png"]), _record("a", 1), _record("c", 3, error="bad"), _record("b", 2),
               _record("d", 4), _record("gone", 9)]
    _write_results(out, records)
    current = {("id", rid): line for rid, line in (("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5))}
    write_gallery(out, current)
    first = (out / "index.html").read_text()
    pages = [(out / "pages" / f"index-{k}.html").read_text() for k in (2, 3)]
    assert sorted(p.name for p in (out / "pages").iterdir()) == ["failed.html", "index-2.html", "index-3.html"]
    assert _ids(first) == ["a", "b"] and _ids(pages[0]) == ["c", "d"] and _ids(pages[1]) == ["e", "gone"]
    assert all("4 done, 1 failed" in p for p in [first, *pages])  # every page counts the whole run
    assert "page 1 of 3" in first and "href='pages/index-2.html'" in first and "href='pages/index-3.html'" in first
    assert "href='../index.html'" in pages[0] and "href='index-3.html'" in pages[0]
    assert 'src="../media/e.png"' in pages[1]  # media links lead from pages/ to OUT/media
    current_part, _, earlier = pages[1].partition("<details")
    assert _ids(current_part) == ["e"] and _ids(earlier) == ["gone"] and "1 earlier record(s)" in earlier
    # fewer requests: the pages no longer needed go
    _write_results(out, records[:2])
    write_gallery(out, {("id", "a"): 1, ("id", "e"): 5})
    assert _ids((out / "index.html").read_text()) == ["a", "e"] and not (out / "pages").exists()
    assert "page 1 of" not in (out / "index.html").read_text()  # one page: no page links


def test_a_paged_gallery_goes_with_overwrite(model, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(gallery, "PAGE_SIZE", 1)
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello."}, {"id": "b", "prompt": "Hi."}])
    out = tmp_path / "out"
    run_requests(model, requests, out, max_new_tokens=3)
    assert (out / "pages" / "index-2.html").is_file()
    monkeypatch.setattr(gallery, "PAGE_SIZE", 1000)
    run_requests(model, requests, out, max_new_tokens=4, overwrite=True)
    assert not (out / "pages").exists() and _ids((out / "index.html").read_text()) == ["a", "b"]


def test_the_gallery_is_rewritten_during_a_run_at_most_a_small_share_of_its_time(model, tmp_path, monkeypatch):  # noqa: F811
    """Rewritten every 30 s whatever it cost: at a million records a rewrite took over 30 s, so the gallery was
    rewritten after every batch, and the run spent its time rewriting it."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": f"r{i}", "prompt": f"Hello {i}."} for i in range(12)])
    real, writes = runner.write_gallery, []

    def slow_gallery(*args, **kwargs):  # as one of a million records
        writes.append(time.perf_counter())
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "write_gallery", slow_gallery)
    monkeypatch.setattr(runner, "GALLERY_EVERY_S", 0.0)
    run_requests(model, requests, tmp_path / "out", batch_size=1, max_new_tokens=2)
    gaps = [b - a for a, b in zip(writes, writes[1:-1])]
    assert len(writes) >= 2 and all(gap >= 0.2 / runner.GALLERY_SHARE for gap in gaps), gaps
    assert len(writes) <= 4  # was 13: after each of the 12 batches, and at the end
    assert runner.gallery_wait(0.0) == runner.GALLERY_EVERY_S and runner.gallery_wait(10.0) == 10.0 / runner.GALLERY_SHARE


# ------------------------------------------------------------------------------------------ the bench


def test_the_bench_reports_a_row_s_own_peak_memory_not_its_parent_s():
    """scripts/bench/infer_scale.py took each row's peak from ru_maxrss, which Linux carries over from the process
    that started it: every row reported the bench's own 600+ MB (a trained checkpoint, the requests) instead."""
    held = b"x" * (256 * 2**20)  # this process holds 256 MB more, resident
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "infer_scale.py"
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('bench', sys.argv[1]); "
            "bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench); print(bench.peak_mb())")
    child = subprocess.run([sys.executable, "-c", code, str(script)], capture_output=True, text=True, check=True)
    assert len(held) and float(child.stdout) < 128, f"a bare Python reported {child.stdout.strip()} MB"


# ------------------------------------------------------------------------------------------ durability and passes


def _fsynced_paths(monkeypatch) -> list[tuple[str, int]]:
    """Each fsync from now on, as (the path fsynced, its size then)."""
    real, synced = os.fsync, []

    def fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fsynced file from /proc")
def test_a_record_waits_at_most_a_second_for_its_fsync_even_when_no_record_follows(tmp_path, monkeypatch):
    """A record was fsynced only with the next one written a second or more after the last fsync: one written before
    a long decoder batch waited the whole batch. A timer now fsyncs it; records coming together still share one."""
    monkeypatch.setattr(runner, "SYNC_EVERY_S", 0.2)
    synced = _fsynced_paths(monkeypatch)
    path = tmp_path / "results.jsonl"
    log = runner._ResultsLog(path)
    try:
        log.append(_record("a", 1))
        log.append(_record("b", 2))
        assert synced == []  # not one fsync per record
        deadline = time.monotonic() + 5
        while not synced and time.monotonic() < deadline:  # the run is in a long step: nothing else is written
            time.sleep(0.02)
        assert synced == [(str(path), path.stat().st_size)]
        time.sleep(0.3)
        log.append(_record("c", 3))  # a second or more (here 0.2 s) after the last fsync: fsynced as it is written
        assert len(synced) == 2 and synced[-1][1] == path.stat().st_size
    finally:
        log.close()
    assert len(synced) == 3  # at the end


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fsynced file from /proc")
def test_records_written_before_a_long_decoder_batch_are_fsynced_while_it_runs(model, tmp_path, monkeypatch):  # noqa: F811
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "t0", "prompt": "Hello."}, {"id": "t1", "prompt": "Hi."},
                                                     {"id": "img", "prompt": GENERATE_IMAGE}])
    out, real, seen = tmp_path / "out", runner.run_decoder, []
    monkeypatch.setattr(runner, "SYNC_EVERY_S", 0.3)
    synced = _fsynced_paths(monkeypatch)

    def long_decoder(model, jobs):
        if jobs[0].owner.parsed.id == "img":  # the last request's: t0's and t1's records are written
            time.sleep(1.0)  # minutes, for a real decoder batch
            results = out / "results.jsonl"
            seen.append(([size for path, size in synced if path == str(results)], results.stat().st_size))
        return real(model, jobs)

    monkeypatch.setattr(runner, "run_decoder", long_decoder)
    assert run_requests(model, requests, out, batch_size=1, max_new_tokens=8)["done"] == 3
    (log_syncs, size), = seen
    assert size > 0 and log_syncs and log_syncs[-1] == size  # t0's and t1's records on disk before the batch ends


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fsynced file from /proc")
def test_a_media_file_costs_one_fsync_and_its_folder_is_fsynced_before_the_log(model, tmp_path, monkeypatch):  # noqa: F811
    """Each media file fsynced itself and then media/ (its rename): two fsyncs a file. media/ is now fsynced once
    before each fsync of results.jsonl, so a record on disk still has its files on disk."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": f"i{k}", "prompt": GENERATE_IMAGE, "seed": k}
                                                     for k in range(4)])
    out = tmp_path / "out"
    synced = _fsynced_paths(monkeypatch)
    assert run_requests(model, requests, out, batch_size=4, max_new_tokens=8)["done"] == 4
    files = [p for p, _ in synced if p.endswith(".tmp") and "/media/" in p]
    folder = [k for k, (p, _) in enumerate(synced) if p == str(out / "media")]
    log = [k for k, (p, _) in enumerate(synced) if p == str(out / "results.jsonl")]
    assert len(files) == 4 and 1 <= len(folder) <= len(log)
    assert folder[-1] < log[-1] and folder[-1] > max(k for k, (p, _) in enumerate(synced) if p in files)


def test_a_media_file_renamed_while_the_timer_fsyncs_its_folder_is_fsynced_before_its_record(tmp_path, monkeypatch):
    """The timer fsyncs media/ in its thread while the run goes on writing media: a file renamed into media/ during
    that fsync (after the folder was read) set the flag saying so, and the timer then cleared it, so the log's next
    fsync put on disk a record naming a file whose rename might not be (a power loss: a record, no file)."""
    media, folder_syncs = tmp_path / "media", []
    media.mkdir()
    log = runner._ResultsLog(tmp_path / "results.jsonl", (media,))

    def fsync_dir(folder):
        folder_syncs.append(folder)
        if len(folder_syncs) == 1:  # the run, meanwhile: a media file renamed into media/, then its record
            (media / "x.png").write_bytes(b"png")
            log.files_renamed()

    monkeypatch.setattr(runner, "fsync_dir", fsync_dir)
    try:
        log.files_renamed()
        log.append(_record("a", 1))
        log._sync_waiting()  # the timer's fsync
        log.append(_record("x", 2, files=["media/x.png"]))
    finally:
        log.close()
    assert folder_syncs == [media, media]  # was [media]: x's record fsynced, media/ not since x's rename


def test_an_fsync_the_timer_made_that_failed_is_raised_in_the_run(tmp_path, monkeypatch):
    """The timer's failed fsync was only logged, "the run's next fsync raises it": Linux reports a failed write-back
    once, to the first fsync after it (the timer's), and the run's next one succeeded -- the run went on and ended
    as if the records before it were on disk."""
    monkeypatch.setattr(runner, "SYNC_EVERY_S", 0.1)
    real, failed = os.fsync, []

    def fsync(fd):
        if not failed:  # once, as the kernel reports it
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    log = runner._ResultsLog(tmp_path / "results.jsonl")
    try:
        log.append(_record("a", 1))  # arms the timer
        monkeypatch.setattr(os, "fsync", fsync)
        deadline = time.monotonic() + 5
        while not failed and time.monotonic() < deadline:
            time.sleep(0.02)
        with log.lock:  # the timer's fsync over
            assert failed
        with pytest.raises(OSError, match="an fsync failed .*Input/output error.*may not be on disk"):
            log.append(_record("b", 2))
    finally:
        log.close()
    assert [r["id"] for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())] == ["a", "b"]


def test_a_rerun_parses_each_record_once_to_check_it_and_find_what_is_left(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """The check of earlier answers found the requests done, and then mmllm infer and run_requests each read
    results.jsonl again to find them, each pass parsing every record and the latest again: 1.6 of 6.5 CPU-s of a
    re-run of 100,000 went to the two passes that found them, 0.45 to the second parse of the check's."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello."}, {"id": "b", "prompt": "Hi."}])
    out = tmp_path / "out"
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out), "--max-new-tokens", "3"]
    assert main(args) == 0
    real, parsed = gallery._parse, []
    monkeypatch.setattr(gallery, "_parse", lambda raw: parsed.append(raw) or real(raw))
    for module in (runner, gallery):  # the gallery's own two passes (the second a page at a time) left out
        monkeypatch.setattr(module, "write_gallery", lambda *args, **kwargs: None)
    assert main(args) == 0 and len(parsed) == 2  # all done: the model is not loaded
    write_requests(requests, [{"id": "a", "prompt": "Hello."}, {"id": "b", "prompt": "Hi."}, {"id": "c", "prompt": "Hey."}])
    assert main(args) == 0 and len(parsed) == 4  # one left: the model loads and answers it
    assert sorted(records_by_id(out)) == ["a", "b", "c"]


# ------------------------------------------------------------------------------------------ failed requests


def test_the_failed_requests_have_a_page_of_their_own_linking_where_each_is_shown(tmp_path, monkeypatch):
    """At 100,000 requests the gallery is 100 pages, and a failure could be on any: index.html now links a page
    listing only the failed requests, each with its error and a link to its section on the page that shows it."""
    monkeypatch.setattr(gallery, "PAGE_SIZE", 2)
    monkeypatch.setattr(gallery, "FAILED_SHOWN", 2)
    out = tmp_path / "out"
    records = [_record("a", 1), _record("b", 2, error="b's <error>"), _record("c", 3), _record("d", 4),
               _record("e", 5, error="e's error"), _record("f", 6, error="f's error"), _record("gone", 9, error="old")]
    _write_results(out, records)
    current = {("id", r["id"]): r["line"] for r in records[:-1]}
    write_gallery(out, current)
    failed = (out / "pages" / "failed.html").read_text()
    assert "3 done, 3 failed (<a href='pages/failed.html'>" in (out / "index.html").read_text()
    assert "3 done, 3 failed (<a href='failed.html'>" in (out / "pages" / "index-3.html").read_text()
    assert re.findall(r"<h2><a href='([^']*)'>([^<]*)</a>", failed) == [("../index.html#e2", "b"),
                                                                        ("index-3.html#e5", "e")]
    assert "b&#x27;s &lt;error&gt;" in failed and "f's error" not in failed and "old" not in failed  # 2 of 3 shown
    assert "the first 2 of 3" in failed and "jq -c &#x27;select(.error)&#x27; results.jsonl" in failed
    assert "id='e2'><h2>b</h2>" in (out / "index.html").read_text()
    assert "id='e5'><h2>e</h2>" in (out / "pages" / "index-3.html").read_text()
    _write_results(out, [_record("a", 1)])  # none failed: no page of failures, no link to one
    write_gallery(out, {("id", "a"): 1})
    assert not (out / "pages").exists() and "failed.html" not in (out / "index.html").read_text()


def test_the_check_of_earlier_answers_judges_each_request_by_its_latest_record(tmp_path):
    """Read in one pass (each record parsed once), an earlier record of a request never counts over a later one."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello."}, {"id": "b", "prompt": "Hi."}])
    made = runner.run_settings(None, "float32")
    mine, other = {"checkpoint": made["checkpoint"]}, {"checkpoint": "another"}
    out = tmp_path / "out"
    _write_results(out, [{**_record("a", 1), **other}, _record("b", 2, error="bad"), _record("a", 1, error="bad"),
                         {**_record("b", 2), **mine}])
    assert runner.check_resume(out, requests, made) == {"b"}  # a's answer of another checkpoint: failed since
    _write_results(out, [{**_record("a", 1), **mine}, {**_record("a", 1), **other}])
    with pytest.raises(runner.OutputError, match="1 request"):
        runner.check_resume(out, requests, made)
