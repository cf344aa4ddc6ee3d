"""One process of a multi-process run fails -- runs out of memory, hits a fault of mmllm -- and every process stops
promptly with its message and an exit code of its kind (mmllm/training/faults.py), instead of the others failing
on gloo's "Connection closed by peer" (exit code 70 whatever the first one's was) or, under NCCL, waiting in their
next collective until its timeout.

The two processes are started here without a launcher, as on two machines: a launcher on one machine kills the
others when one exits, one on another machine does not. tests/faulty_rank.py puts the fault in."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmllm.training import faults
from tests.conftest import REPO
from tests.test_distributed import _free_port

STAGE = REPO / "configs/stages/tiny/encode_align.yaml"
PROMPTLY_S = 180  # well below any launcher's or NCCL's timeout (10 minutes and more); a run here takes 5-40 s


def _two_processes(tmp_path: Path, fault: str, *args: str, port: int | None = None,
                   **env_vars: str) -> list[tuple[int, str, float]]:
    """`mmllm train` on the tiny stage in two processes (gloo) with ``MMLLM_TEST_FAULT=fault``: each process's
    (exit code, output, seconds from the start to its exit). A process still running after :data:`PROMPTLY_S`
    is killed and reported with exit code None. ``port``: the store's (default: a free one, rank 0 hosts it)."""
    port = port or _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MMLLM_TEST_FAULT=fault, **env_vars)
    cmd = [sys.executable, "-m", "tests.faulty_rank", "train", "--config", str(STAGE), "report_to=none",
           f"output_dir={tmp_path / 'out'}", "batch_size=2", "max_steps=3", "log_every=1", *args]
    started, procs = time.monotonic(), []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for rank in range(2):
        log = open(tmp_path / f"rank{rank}.log", "w+")  # noqa: SIM115 -- closed below
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                       stdout=log, stderr=subprocess.STDOUT), log))
    out = []
    try:
        for proc, log in procs:
            try:
                rc = proc.wait(timeout=max(1.0, started + PROMPTLY_S - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = None
            took = time.monotonic() - started
            log.seek(0)
            out.append((rc, log.read(), took))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return out


def _logged_at(output: str, what: str) -> int:
    """The second of the day of the first log line of ``output`` holding ``what`` (HH:MM:SS LEVEL ..., maybe after
    a progress bar's text)."""
    hours, minutes, seconds = re.search(rf"(\d\d):(\d\d):(\d\d) [A-Z]+ [^\n]*{re.escape(what)}", output).groups()
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds)


def _said(out: list[tuple[int, str, float]]) -> str:
    return "".join(f"\n--- process {r}, exit code {rc} after {took:.0f} s:\n{log[-3000:]}"
                   for r, (rc, log, took) in enumerate(out))


def test_out_of_memory_on_one_process_stops_both_with_its_message_and_exit_code_2(tmp_path):
    out = _two_processes(tmp_path, "1:1:oom")
    assert [rc for rc, _, _ in out] == [2, 2], _said(out)
    ran_out = "stage encode-align ran out of memory at step 2 of 3, in the forward and backward"
    assert ran_out in out[1][1], _said(out)
    assert f"on process 1 (host {socket.gethostname()}): {ran_out}" in out[0][1], _said(out)
    assert "Connection closed by peer" not in out[0][1] and "Traceback" not in out[0][1], _said(out)


def test_a_fault_of_mmllm_on_one_process_is_a_fault_on_both_exit_code_70(tmp_path):
    out = _two_processes(tmp_path, "0:1:fault")
    assert [rc for rc, _, _ in out] == [70, 70], _said(out)
    assert "RuntimeError: a fault of mmllm (a test's)" in out[0][1], _said(out)  # its own traceback
    assert (f"on process 0 (host {socket.gethostname()}): unexpected error RuntimeError: a fault of mmllm (a test's)"
            in out[1][1]), _said(out)


@pytest.mark.slow  # 20 s: it waits faults.GRACE_S for process 0's training to stop on its own
def test_a_process_waiting_in_a_collective_that_never_returns_stops_on_the_others_failure(tmp_path):
    """Process 0 waits at step 2 as under NCCL for a peer that failed (gloo would fail it when the peer exits):
    the old code left it there (until NCCL's timeout, 10 minutes or more)."""
    out = _two_processes(tmp_path, "0:1:stuck;1:1:oom")
    assert [rc for rc, _, _ in out] == [2, 2], _said(out)
    assert "this process was still waiting for it in a collective, and stops" in out[0][1], _said(out)
    assert "on process 1 (host " in out[0][1] and "ran out of memory at step 2 of 3" in out[0][1], _said(out)
    # from process 1's failure to process 0's exit, by their log lines' clocks (starting up takes 10-40 s here)
    failed, stopped = _logged_at(out[1][1], "ran out of memory at step 2"), _logged_at(out[0][1], "still waiting for it")
    assert (stopped - failed) % 86400 <= faults.GRACE_S + 5, _said(out)


def test_a_fault_on_the_main_process_in_its_own_work_is_a_fault_on_every_process(tmp_path):
    """final.json is the main process's to write, the others waiting for its word: a fault there reached them as
    a configuration error (exit code 2) without saying where it happened."""
    out = _two_processes(tmp_path, "0:final:fault")
    assert [rc for rc, _, _ in out] == [70, 70], _said(out)
    assert f"on process 0 (host {socket.gethostname()}): unexpected error RuntimeError" in out[1][1], _said(out)


@pytest.mark.slow  # two runs: 30-70 s on a loaded 2-core machine
def test_a_restarted_run_on_the_store_of_a_failed_one_reports_its_own_failure_not_the_old_one(tmp_path):
    """A launcher that restarts a failed run (``torchrun --max-restarts``) keeps its store for the next attempt
    (TORCHELASTIC_USE_AGENT_STORE: the processes are its clients): the old code posted every run of a process
    under the same keys, so the second attempt found the first one's failure there. Its own first failure was then
    not posted (the count said another came first); process 1, whose own the old one was, ended on gloo's
    "Connection closed by peer" (exit code 70), and process 0 on process 1's old failure once GRACE_S had passed.
    torch's own keys of the first attempt (gloo's addresses) are removed before the second, as a launcher that
    gave each attempt a sound rendezvous would (torch 2.14 reads them again: pytorch/pytorch#135712)."""
    import torch.distributed as dist

    agent = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)  # the launcher's, for both attempts
    elastic = {"TORCHELASTIC_USE_AGENT_STORE": "True"}
    first = _two_processes(tmp_path / "1", "1:1:oom", port=agent.port, **elastic)
    assert [rc for rc, _, _ in first] == [2, 2], _said(first)
    left = [key for key in agent.list_keys() if "mmllm" in key]
    assert left, agent.list_keys()  # the first attempt's failure, as it posted it
    for key in set(agent.list_keys()) - set(left):
        agent.delete_key(key)
    again = _two_processes(tmp_path / "2", "0:1:oom", port=agent.port, **elastic)
    assert [rc for rc, _, _ in again] == [2, 2], _said(again)
    ran_out = "stage encode-align ran out of memory at step 2 of 3"
    assert f"on process 0 (host {socket.gethostname()}): {ran_out}" in again[1][1], _said(again)
    assert "on process 1" not in again[0][1], _said(again)


def test_the_first_failure_is_what_the_others_raise_and_an_error_of_their_own_is_kept():
    """In one process, two processes' sides on one store: process 1 runs out of memory first; process 0's training
    then fails at the collective process 1 left (gloo's error, a fault in itself) and raises process 1's failure
    instead, of its kind; an error process 0 can tell the user about itself is raised as it is."""
    import torch.distributed as dist

    from mmllm.memory import OutOfMemory
    from mmllm.training import faults

    store = dist.TCPStore("127.0.0.1", 0, 1, True)
    first, second = faults._Watch(store, "t/run-1", 1, 2), faults._Watch(store, "t/run-1", 0, 2)
    for watch in (first, second):
        watch.start()
    try:
        ran_out = OutOfMemory("stage x ran out of memory at step 2")
        assert first.stopping(ran_out) is ran_out  # posted, and read by process 0's watching thread
        broken = RuntimeError("[gloo] Connection closed by peer")
        raised = second.stopping(broken)
        assert isinstance(raised, faults.UserErrorElsewhere) and faults.kind_of(raised) == "user"
        assert str(raised) == f"on process 1 (host {socket.gethostname()}): stage x ran out of memory at step 2"
        own = OSError(28, "No space left on device")
        assert second.stopping(own) is own
        assert isinstance(second.stopping(KeyboardInterrupt("SIGTERM")), faults.UserErrorElsewhere)  # the launcher's
    finally:
        for watch in (first, second):
            watch.stop()
    bug = faults.Failure.of(KeyError("k"), 0, "h").error()
    assert isinstance(bug, faults.FaultElsewhere) and faults.kind_of(bug) == "fault"
    assert str(bug) == "on process 0 (host h): unexpected error KeyError: 'k' (its traceback is in that process's output)"


def test_a_failure_is_read_while_torch_waits_on_the_store_for_a_key_that_does_not_come():
    """torch waits on the run's store for keys (the NCCL id of a process group's first collective, which a failed
    process never posts) until its timeout, and a store client serves one request at a time: the old code's
    watching thread, on that same client, read nothing until then (10 minutes and more; here 5 s)."""
    import datetime
    import threading

    import torch.distributed as dist

    from mmllm.memory import OutOfMemory
    from mmllm.training import faults

    server = dist.TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
    clients = [dist.PrefixStore("default_pg/0/", dist.TCPStore("127.0.0.1", server.port, 2, False,
                                                               timeout=datetime.timedelta(seconds=5)))
               for _ in range(2)]  # each process's own, as torch.distributed made it
    waiting = threading.Thread(target=lambda: pytest.raises(dist.DistStoreError, clients[0].get, "nccl-id"),
                               daemon=True)
    waiting.start()  # process 0's torch, waiting for the id process 1 never posts
    watches = [faults._Watch(clients[rank], "t/run", rank, 2) for rank in range(2)]
    for watch in watches:
        watch.start()
    try:
        time.sleep(0.2)
        started = time.monotonic()
        watches[1].stopping(OutOfMemory("stage x ran out of memory at step 2"))  # waits until process 0 read it
        deadline = started + 3
        while watches[0].seen is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watches[0].seen is not None and watches[0].seen.rank == 1
        assert time.monotonic() - started < 3
    finally:
        watches[0].stopping(RuntimeError("[gloo] Connection closed by peer"))  # its training stops on it
        for watch in watches:
            watch.stop()
        waiting.join()


@pytest.mark.parametrize("kind, text", [
    ("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB"),  # the caching allocator's
    ("RuntimeError", "CUDA error: out of memory"),  # a library's allocation
    ("RuntimeError", "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1024 bytes"),
])
def test_torchs_out_of_memory_outside_a_step_is_told_to_the_others_as_out_of_memory(kind, text):
    """Memory running out where no step wraps it (a model loading onto the GPU): the process that ran out exits 2
    (the command's out-of-memory report), but the others were told an "unexpected error" of mmllm, and a process
    its watching thread stopped exited 70, as for a fault."""
    import torch

    failure = faults.Failure.of({"OutOfMemoryError": torch.OutOfMemoryError, "RuntimeError": RuntimeError}[kind](text),
                                1, "h")
    assert failure.kind == "user" and faults.exit_code(failure.kind) == 2
    assert str(failure.error()) == f"on process 1 (host h): {text}"
