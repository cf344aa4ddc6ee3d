"""Two mmllm runs into one folder at once: the second is refused (mmllm/folder_lock.py), the lock goes with
the process that held it (an exit, a SIGKILL), and a lock file left beside the checkpoints breaks nothing."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmllm.cli import main
from mmllm.config import ConfigError
from mmllm.folder_lock import LOCK_NAME, FolderInUse, hold_folder
from mmllm.inference.runner import run_requests
from mmllm.toyworld.report import ReportOptions, run_report
from mmllm.training import checkpoint as ckpt
from mmllm.training import loop
from mmllm.training.loop import train
from tests.conftest import REPO
from tests.test_stages import stage_cfg

HOLDER = """
import sys
from mmllm.folder_lock import hold_folder
with hold_folder(sys.argv[1], "the first run", "-"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills it)
"""


@contextlib.contextmanager
def held_by_another_process(folder: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``folder``'s lock until the block ends (or the test kills it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
        proc.wait(timeout=60)
        proc.stdout.close()


def _refusal_says_who_and_what_to_do(message: str, folder: Path, proc: subprocess.Popen, elsewhere: str) -> None:
    assert str(folder) in message
    assert f"pid {proc.pid} on host {socket.gethostname()}" in message
    assert "freed when that process exits" in message
    assert elsewhere in message


def test_a_second_process_is_refused_while_the_first_holds_the_folder_and_let_in_once_it_exits(tmp_path):
    with held_by_another_process(tmp_path) as first:
        assert (tmp_path / LOCK_NAME).is_file()
        with pytest.raises(FolderInUse) as refused, hold_folder(tmp_path, "training", "give another output_dir"):
            pass
        _refusal_says_who_and_what_to_do(str(refused.value), tmp_path, first, "give another output_dir")
        assert "-c " in str(refused.value)  # the holder's command line
    assert first.returncode == 0
    assert not (tmp_path / LOCK_NAME).exists()  # a holder that finishes takes its file with it
    with hold_folder(tmp_path, "training", "-"):
        assert (tmp_path / LOCK_NAME).is_file()
    assert list(tmp_path.iterdir()) == []


def test_a_holder_killed_with_sigkill_leaves_a_file_but_no_lock(tmp_path):
    with held_by_another_process(tmp_path) as first:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (tmp_path / LOCK_NAME).is_file()  # nothing ran to remove it
    with hold_folder(tmp_path, "training", "-"):  # the kernel let go of it with the process
        pass
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_process_holding_a_folder_may_take_it_again(tmp_path):
    with hold_folder(tmp_path, "outer", "-"):
        with hold_folder(tmp_path, "inner", "-"):
            pass
        assert (tmp_path / LOCK_NAME).is_file()  # still held by the outer hold
        # and still refused to another process while it is
        probe = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, input="",
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0 and "FolderInUse" in probe.stderr and f"pid {os.getpid()}" in probe.stderr
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("resume", [False, True])
def test_training_into_an_output_dir_another_run_holds_is_refused_before_the_model_is_built(
        resume, sample_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    live_save = out / ".step-2.tmp-123-456"  # what the live run is writing now: --resume took it for a killed one's
    live_save.mkdir()
    (live_save / "learned.safetensors").write_bytes(b"being written")

    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(loop, "build_model", built)
    with held_by_another_process(out) as first:
        with pytest.raises(FolderInUse) as refused:
            train(stage_cfg("encode-align", sample_data, out, max_steps=2), resume=resume)
        # a --resume is told to resume once the other has stopped: another output_dir would not resume it
        advice = "a --resume after it has stopped continues" if resume else "give this run another output_dir"
        _refusal_says_who_and_what_to_do(str(refused.value), out, first, advice)
    assert (live_save / "learned.safetensors").read_bytes() == b"being written"


def test_the_train_command_says_who_holds_the_output_dir_and_exits_2(sample_data, tmp_path, caplog):
    out = tmp_path / "run"
    with held_by_another_process(out) as first:
        code = main(["train", "--config", str(REPO / "configs/stages/tiny/encode_align.yaml"), f"output_dir={out}",
                     "report_to=none", f"data=[{{path: {sample_data['pairs']}, format: mmllm-pairs}}]", "--resume"])
    assert code == 2
    _refusal_says_who_and_what_to_do(caplog.text, out, first, "a --resume after it has stopped continues")


def test_a_lock_file_a_killed_run_left_beside_the_checkpoints_breaks_nothing(sample_data, tmp_path):
    out = tmp_path / "run"
    first = train(stage_cfg("encode-align", sample_data, out, max_steps=2, save_every=1))
    with held_by_another_process(out) as killed:  # a run killed after taking the lock, before its first save
        killed.send_signal(signal.SIGKILL)
    assert (out / LOCK_NAME).is_file()
    assert ckpt.latest_checkpoint(out) == out / "step-2"  # --resume's choice, inspect's and infer's reading
    resumed = train(stage_cfg("encode-align", sample_data, out, max_steps=4, save_every=1, keep_last=1), resume=True)
    assert len(resumed.losses) == 4 and resumed.losses[:2] == first.losses  # went on from step-2
    assert sorted(p.name for p in out.iterdir()) == ["final.json", "step-4"]  # pruned; the lock file gone
    ckpt.verify_manifest(out / "step-4")


def test_answering_into_a_held_output_is_refused_and_works_once_it_is_free(tiny_model, tmp_path, caplog):
    checkpoint = tiny_model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "r1", "prompt": "Hello"}\n')
    argv = ["infer", "--checkpoint", str(checkpoint), "--input", str(requests), "--output", str(out),
            "--max-new-tokens", "2"]
    with held_by_another_process(out) as first:
        assert main(argv) == 2
        _refusal_says_who_and_what_to_do(caplog.text, out, first, "give this run another --output")
        with pytest.raises(FolderInUse):  # the Python API too
            run_requests(tiny_model, requests, out, max_new_tokens=2)
        assert not (out / "results.jsonl").exists()
    assert main(argv) == 0
    assert (out / "results.jsonl").read_text().count('"id": "r1"') == 1
    assert not (out / LOCK_NAME).exists()


def test_eval_and_world_report_into_a_held_output_are_refused(tmp_path, caplog):
    out = tmp_path / "report"
    with held_by_another_process(out) as first:
        with pytest.raises(FolderInUse):
            run_report(ReportOptions(parts_dir=tmp_path, output=out))
        assert main(["eval", "--checkpoint", str(tmp_path), "--output", str(out)]) == 2
        _refusal_says_who_and_what_to_do(caplog.text, out, first, "give this run another --output")
    assert sorted(p.name for p in out.iterdir()) == []  # nothing of either was written



def test_a_folder_that_cannot_be_made_is_named(tmp_path):
    taken = tmp_path / "run"
    taken.write_text("a file where the folder should be")
    with pytest.raises(OSError, match=f"training: cannot create the folder {taken}"), hold_folder(taken, "training", "-"):
        pass


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    """flock fails there with ENOLCK/ENOSYS/EOPNOTSUPP (Lustre without -o flock, some FUSE file systems): the
    run stopped with a bare '[Errno 38] Function not implemented' where it worked before the lock existed."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="mmllm.folder_lock"):
        with hold_folder(tmp_path, "training", "-"), hold_folder(tmp_path, "training", "-"):
            (tmp_path / "step-1").mkdir()
    warned = [r.getMessage() for r in caplog.records if "does not lock files" in r.getMessage()]
    assert len(warned) == 1 and str(tmp_path) in warned[0] and "Function not implemented" in warned[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]  # no lock file left behind


def test_without_fcntl_the_folder_is_still_made(tmp_path, monkeypatch):
    """Not POSIX (no fcntl): the lock is skipped, but the callers (world report, eval) rely on hold_folder for
    their --output folder, which was then never made."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    out = tmp_path / "report" / "inner"
    with hold_folder(out, "mmllm world report", "-"):
        assert out.is_dir()
    assert list(out.iterdir()) == []


HOLDER_BESIDE = """
import sys
from mmllm.folder_lock import hold_beside
with hold_beside(sys.argv[1], "the first export", "-"):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.mark.parametrize("command", ["export", "refine"])
def test_writing_an_output_another_export_or_refine_holds_is_refused_at_once(command, tmp_path, caplog):
    """Two exports (or refines) into one --output each replaced it whole: the last won, the other still said
    "wrote", and in a narrow window one failed on a raw rename error. The second is now refused by name."""
    out = tmp_path / "exported"
    (tmp_path / "ckpt").mkdir()  # a folder, not a checkpoint: a missing one is refused before the lock is tried
    argv = {"export": ["export", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(out)],
            "refine": ["refine", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "d.jsonl"),
                       "--output", str(out)]}[command]
    proc = subprocess.Popen([sys.executable, "-c", HOLDER_BESIDE, str(out)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        assert (tmp_path / ".exported.mmllm.lock").is_file()
        assert main(argv) == 2
        _refusal_says_who_and_what_to_do(caplog.text, out, proc, "give this ")
        assert ".exported.mmllm.lock beside that folder" in caplog.text
        assert not out.exists()
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        proc.stdout.close()
    caplog.clear()
    assert main(argv) == 2  # let in once it is free: on to the incomplete checkpoint (data), the lock let go after
    assert "is in use" not in caplog.text and str(tmp_path) in caplog.text
    assert not (tmp_path / ".exported.mmllm.lock").exists()


def test_exports_and_eval_called_from_python_take_the_lock_the_commands_take(tiny_model, tmp_path):
    """`mmllm export` and `mmllm eval` locked their --output, but export_weights_only, export_merged and run_eval
    called from Python did not: two of them wrote one folder at once, the last one winning."""
    from mmllm.toyworld.model_eval import EvalOptions, run_eval

    checkpoint = tiny_model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "exported"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER_BESIDE, str(out)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        for export in (lambda: ckpt.export_weights_only(checkpoint, out), lambda: ckpt.export_merged(checkpoint, out)):
            with pytest.raises(FolderInUse) as refused:
                export()
            _refusal_says_who_and_what_to_do(str(refused.value), out, proc, "give this export another output folder")
        assert not out.exists()
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        proc.stdout.close()
    assert ckpt.export_weights_only(checkpoint, out) == out  # once free
    assert not (tmp_path / ".exported.mmllm.lock").exists()

    report = tmp_path / "eval"
    options = EvalOptions(output=report, modalities=[], tasks=["text"], text_chunks=1, text_tokens=8)
    with held_by_another_process(report) as first:
        with pytest.raises(FolderInUse) as refused:
            run_eval(tiny_model, {}, options)
        _refusal_says_who_and_what_to_do(str(refused.value), report, first, "give this run another output folder")
        assert not (report / "eval.json").exists()
    assert run_eval(tiny_model, {}, options)["complete"] is True
    assert sorted(p.name for p in report.iterdir()) == ["eval.json"]  # the lock let go


@pytest.mark.parametrize("merge", [False, True])
def test_a_refused_export_leaves_no_folder_it_made(merge, tiny_model, tmp_path, caplog):
    """The lock beside --output was taken, making its parent folders, before the export was refused (a checkpoint
    that is not there, an output that would replace it): the refused export left them behind, empty."""
    checkpoint = tiny_model.save_pretrained(tmp_path / "ckpt")
    cases = [(tmp_path / "no-such-ckpt", tmp_path / "new" / "deeper" / "out", str(tmp_path / "no-such-ckpt")),
             (checkpoint, checkpoint / "sub" / "out", "the export would replace the checkpoint")]
    for source, out, said in cases:
        argv = ["export", "--checkpoint", str(source), "--output", str(out), *(["--merge-lora"] if merge else [])]
        assert main(argv) == 2
        assert said in caplog.text
        assert not (tmp_path / "new").exists() and not (checkpoint / "sub").exists()
    ckpt.verify_manifest(checkpoint)  # the checkpoint as it was: nothing added to it
    with pytest.raises((ConfigError, FileNotFoundError), match=re.escape(str(tmp_path / "gone"))):  # in Python too
        (ckpt.export_merged if merge else ckpt.export_weights_only)(tmp_path / "gone", tmp_path / "a" / "b" / "out")
    assert not (tmp_path / "a").exists()
    deep = tmp_path / "made" / "out"  # an export that goes through keeps its folders
    assert main(["export", "--checkpoint", str(checkpoint), "--output", str(deep)]) == 0
    assert sorted(p.name for p in deep.parent.iterdir()) == ["out"]


def test_a_run_failing_in_a_new_output_folder_leaves_no_folder_it_made(tmp_path, caplog):
    """`mmllm eval --output a/b/out` of a broken checkpoint left a/b/out behind, empty; folders holding what a
    failing run wrote (and folders that were there before) stay."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mmllm.json").write_text("{}")
    assert main(["eval", "--checkpoint", str(broken), "--output", str(tmp_path / "a/b/out"), "--items", "1"]) == 2
    assert "no manifest.json" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
    with pytest.raises(RuntimeError), hold_folder(tmp_path / "c/d", "test", "elsewhere"):
        (tmp_path / "c/d/partial.txt").write_text("written before failing")
        raise RuntimeError("failed")
    assert (tmp_path / "c/d/partial.txt").is_file() and not (tmp_path / "c/d" / LOCK_NAME).exists()
    with pytest.raises(RuntimeError), hold_folder(tmp_path, "test", "elsewhere"):
        raise RuntimeError("failed in a folder that was there")
    assert tmp_path.is_dir()
