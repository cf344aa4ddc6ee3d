"""Training on several machines, simulated here as two torchrun "nodes" on localhost (gloo, GPUs hidden):
what every process must see alike is checked before anything is written (mmllm/training/agreement.py),
and one process's view of ``output_dir`` that differs from the others' stops all of them with one message
instead of training on from different steps and data until the collectives no longer match (a hang)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import REPO
from tests.test_distributed import _free_port

STAGE = REPO / "configs/stages/tiny/encode_align.yaml"


class _Launch(SimpleNamespace):
    distributed_type = SimpleNamespace(value="MULTI_CPU")
    mixed_precision = "no"
    process_index, num_processes, is_main_process = 0, 1, True


def _describe(config: Path, *overrides: str) -> dict[str, str]:
    from mmllm.config import load_stage
    from mmllm.training.agreement import run_description

    return run_description(load_stage(config, list(overrides)), _Launch())


def _stage_reading(tmp_path: Path, name: str, data: Path) -> Path:
    """A copy of the tiny encode-align stage in ``tmp_path/name.yaml`` reading ``data`` (media from the samples)."""
    text = STAGE.read_text().replace("../../assemblies/tiny.yaml", str(REPO / "configs/assemblies/tiny.yaml"))
    text = text.replace("{path: ../../../data/samples/pairs.jsonl, format: mmllm-pairs}",
                        f"{{path: {data}, format: mmllm-pairs, root: {REPO / 'data/samples'}}}")
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_what_processes_compare_is_what_they_train_not_where_their_files_are(tmp_path):
    from mmllm.training.agreement import Seen, differences

    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    shutil.copy(REPO / "data/samples/pairs.jsonl", here / "pairs.jsonl")
    shutil.copy(REPO / "data/samples/pairs.jsonl", there / "pairs.jsonl")
    base = _describe(_stage_reading(here, "stage", here / "pairs.jsonl"), f"output_dir={here / 'out'}")
    # another machine: the config, the data and output_dir at other paths, the same contents
    moved = _describe(_stage_reading(there, "stage", there / "pairs.jsonl"), f"output_dir={there / 'out'}",
                      f"cache.dir={there / 'cache'}")
    assert moved == base
    edited = there / "pairs.jsonl"
    edited.write_text(edited.read_text().replace('"caption": "a red square"', '"caption": "a blue square"', 1))
    other = _describe(_stage_reading(there, "stage", edited), "optim.lr=0.02", "assembly.seed=7")
    lines = differences([Seen(0, "node-a", base), Seen(1, "node-b", other)])
    assert [line.split(":")[0] for line in lines] == ["optim.lr", "assembly.seed", "data[0].contents"]
    assert lines[0] == "optim.lr: 0.01 on process 0 (host node-a) vs 0.02 on process 1 (host node-b)"


def test_a_failure_on_one_process_is_raised_by_every_process_with_its_message(tmp_path):
    from mmllm.config import ConfigError
    from mmllm.training.agreement import on_every_process

    def refused():
        raise ConfigError("output_dir x already holds checkpoints")

    with pytest.raises(ConfigError, match="already holds checkpoints"):
        on_every_process(_Launch(), refused)
    assert [s.value for s in on_every_process(_Launch(), lambda: 3)] == [3]


def test_a_write_probe_of_another_machines_process_with_the_same_pid_is_left_alone(tmp_path):
    """A shared output_dir: processes of other machines probe it at the same time, and a container per machine
    gives them the same pids; this process's probe must not take another's name (and delete its file)."""
    from mmllm.training.loop import check_output_dir

    theirs = tmp_path / f".write-probe-{os.getpid()}"
    theirs.write_bytes(b"0" * 4096)
    check_output_dir(tmp_path)
    assert theirs.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [theirs.name]


def _two_nodes(tmp_path: Path, args: list[list[str]], timeout: float = 150) -> list[tuple[int, str]]:
    """``mmllm train`` on two simulated machines (torchrun --nnodes 2, one process each, static rendezvous on
    localhost), node ``i`` with ``args[i]``: each node's (exit code, output)."""
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    procs = []
    for rank, extra in enumerate(args):
        log = open(tmp_path / f"node{rank}.log", "w+")  # noqa: SIM115 -- closed below
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "mmllm.cli",
               "train", *extra]
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline, out = time.monotonic() + timeout, []
    try:
        for proc, log in procs:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            log.seek(0)
            out.append((rc, log.read()))
    finally:
        for proc, log in procs:
            if proc.poll() is None:  # hung (the old code): torchrun passes SIGTERM on to its worker (its own session)
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
    return out


@pytest.mark.slow  # 35 s: one run to make a checkpoint, then two 2-node launches that stop before the model loads
def test_two_machines_that_see_other_checkpoints_or_other_data_stop_together_with_one_message(sample_data, tmp_path):
    """Node 0's output_dir holds step-2; node 1's (its own disk) holds none. The old code resumed node 0 at step 2
    and node 1 at step 0 (another learning rate, other samples, DDP averaging their gradients), then hung at
    the first save. Then: node 1 reads an edited copy of the data file, which trained silently."""
    common = ["report_to=none", "batch_size=2"]
    first = subprocess.run([sys.executable, "-m", "mmllm.cli", "train", "--config", str(STAGE),
                            f"output_dir={tmp_path / 'node0'}", "max_steps=2", *common], cwd=REPO, capture_output=True,
                           text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    nodes = _two_nodes(tmp_path, [["--config", str(STAGE), f"output_dir={tmp_path / d}", "max_steps=4", *common,
                                   "--resume"] for d in ("node0", "node1")])
    for rc, log in nodes:
        assert rc != 0
        assert ("--resume: the processes of this run do not see the same checkpoints in output_dir" in log
                and "step-2 (manifest sha256" in log and "no checkpoint on process 1" in log), log[-3000:]
        assert "process(es), MULTI_CPU" not in log  # stopped before any model was built
    assert "is not a folder every process sees" in nodes[0][1]  # the main process's lock file, unseen on node 1
    assert not (tmp_path / "node1" / "step-2").exists() and not (tmp_path / "node0" / "step-4").exists()

    edited = tmp_path / "edited.jsonl"
    edited.write_text(sample_data["pairs"].read_text().replace('"caption": "a', '"caption": "the', 1))
    configs = [STAGE, _stage_reading(tmp_path, "edited", edited)]
    nodes = _two_nodes(tmp_path, [["--config", str(c), f"output_dir={tmp_path / 'fresh'}", "max_steps=2", *common]
                                  for c in configs])
    for rc, log in nodes:
        assert rc != 0
        assert "the 2 processes of this run do not train the same thing: data[0].contents: sha256" in log, log[-3000:]
    assert not list((tmp_path / "fresh").glob("step-*"))


@pytest.mark.slow  # 15 s: a 2-node launch that stops while it reads the config
def test_a_config_one_machine_cannot_read_stops_every_machine_with_its_message(tmp_path):
    """Node 1's stage config is missing (not copied there). The old code stopped node 1 before torch.distributed
    started, and node 0 waited for it to connect until torch.distributed's timeout (still waiting after 5 minutes)."""
    nodes = _two_nodes(tmp_path, [["--config", str(c), f"output_dir={tmp_path / 'out'}", "report_to=none"]
                                  for c in (STAGE, tmp_path / "not-copied-here.yaml")], timeout=120)
    for rc, log in nodes:
        assert rc != 0
        assert "config file not found: " + str(tmp_path / "not-copied-here.yaml") in log, log[-3000:]
    assert "on process 1 (host " in nodes[0][1]
    assert not (tmp_path / "out").exists()


def _convert_slowly(out: Path, log: Path) -> None:
    """One process of a run converting the model folder ``out`` (as ``convert_gguf`` does): counted in ``log``."""
    import time as clock

    from mmllm.llm import convert_once

    def make(tmp: Path) -> None:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        tmp.mkdir()
        clock.sleep(0.5)  # the others reach the lock meanwhile
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"weights")

    assert convert_once(out, make, "converting") == out


def test_the_processes_of_a_run_convert_a_gguf_file_once_and_the_others_wait_for_it(tmp_path):
    """Every process of a run converts the same GGUF file into one cache folder (~/.cache/mmllm/gguf, maybe shared
    by several machines): one converts while the others wait, instead of each holding two fp32 copies of the
    model at once; the temporary folder is named by host and pid, which containers on other machines reuse."""
    import multiprocessing

    out, log = tmp_path / "cache" / "model-0123", tmp_path / "made.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_convert_slowly, args=(out, log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model-0123", "model-0123.lock"]


def test_a_gguf_conversion_on_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    """flock fails there with ENOSYS (Lustre without -o flock, some FUSE file systems): loading a GGUF core
    stopped with a bare '[Errno 38] Function not implemented' where the conversion worked before its lock existed."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out, log = tmp_path / "cache" / "model-0123", tmp_path / "made.log"
    with caplog.at_level("WARNING", logger="mmllm.llm"):
        _convert_slowly(out, log)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert any("does not lock files" in r.getMessage() and "Function not implemented" in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow  # 25 s: the feature cache, then a 2-node launch that stops before training
def test_a_machine_without_the_required_feature_cache_stops_every_machine_with_its_message(tmp_path):
    """cache.require, and node 1's cache.dir (its own disk) is empty: node 1 stopped alone and node 0 failed in the
    coverage exchange with gloo's "Connection closed by peer" (under NCCL: waited for it)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    made = subprocess.run([sys.executable, "-m", "mmllm.cli", "cache", "--config", str(STAGE),
                           f"cache.dir={tmp_path / 'cache0'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    (tmp_path / "cache1").mkdir()
    nodes = _two_nodes(tmp_path, [["--config", str(STAGE), f"output_dir={tmp_path / 'out'}", "report_to=none",
                                   "cache.require=true", f"cache.dir={tmp_path / c}"] for c in ("cache0", "cache1")],
                       timeout=120)
    for rc, log in nodes:
        assert rc != 0
        assert f"cache.require: cache.dir {tmp_path / 'cache1'} holds no feature cache yet" in log, log[-3000:]
        assert "Connection closed by peer" not in log
    assert "on process 1 (host " in nodes[0][1]


def test_processes_joined_before_the_accelerator_stay_on_cpu_when_the_launch_says_cpu(monkeypatch):
    """``accelerate launch --cpu`` (``ACCELERATE_USE_CPU``) on machines with an accelerator: the state the command
    starts before reading the config is the one ``train()``'s Accelerator would start (CPU processes on gloo), not a
    device run the Accelerator then inherits."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from mmllm.training import loop
    from tests.test_distributed import _free_port

    monkeypatch.setattr(loop, "_has_accelerator_device", lambda: True)
    for key, value in {"ACCELERATE_USE_CPU": "true", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        state = loop.join_processes()
        assert (state.distributed_type, state.backend, state.device.type) == (DistributedType.MULTI_CPU, "gloo", "cpu")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)


def test_an_init_from_no_machine_holds_is_the_same_on_machines_with_other_home_folders(tmp_path, monkeypatch):
    """``--resume`` of a stage whose ``init_from`` (``~/runs/...``, expanded per user) was pruned on every machine:
    the resumed run does not read it, so machines whose home folders differ do not differ there."""
    config = _stage_reading(tmp_path, "stage", REPO / "data/samples/pairs.jsonl")
    seen = []
    for user in ("alice", "bob"):
        monkeypatch.setenv("HOME", str(tmp_path / user))
        seen.append(_describe(config, "init_from=~/runs/encode-align/step-10")["init_from"])
    assert seen[0] == seen[1]


class _TwoProcesses(_Launch):
    process_index, num_processes, is_main_process = 0, 2, True


def test_processes_that_read_other_numbers_of_usable_records_stop_together(tmp_path, monkeypatch):
    """Each process reads the data files itself before step 1; a record whose media lookup failed for good on
    one process (a flaky mount) is malformed there alone, and that process's sampler drew from another list of
    samples than the others' (nothing compared the counts). Now every process stops, naming the file and the
    counts. (The other process is simulated: what it gathers is this one's view, one record fewer.)"""
    import accelerate.utils

    from mmllm.config import ConfigError, load_stage
    from mmllm.training.agreement import Seen
    from mmllm.training.loop import read_stage_data

    cfg = load_stage(STAGE, [f"output_dir={tmp_path / 'out'}"])
    other = {"fewer": 0}

    def gather_object(mine):
        theirs = Seen(1, "node-b", [n - other["fewer"] for n in mine[0].value])
        return [*mine, theirs]

    monkeypatch.setattr(accelerate.utils, "gather_object", gather_object)
    per_dataset, weights, errors, held_out, _ = read_stage_data(_TwoProcesses(), cfg)  # the same counts: read on
    n = len(per_dataset[0])
    assert n > 0 and weights == [1.0] and not held_out
    other["fewer"] = 1
    with pytest.raises(ConfigError, match=rf"the 2 processes of this run read other numbers of usable records .*"
                                          rf"pairs\.jsonl: {n} on process 0 \(host .*\) vs {n - 1} on process 1 "
                                          r"\(host node-b\).*check the storage"):
        read_stage_data(_TwoProcesses(), cfg)


def _read_as(rank: int, cfg, monkeypatch, main_saw=lambda said: said) -> None:
    """``read_stage_data`` as process ``rank`` of 2, the other process simulated: what it gathers is this
    process's own view, as seen on the other process (its warnings through ``main_saw`` when that is the main
    process's)."""
    import dataclasses

    import accelerate.utils

    from mmllm.training.loop import read_stage_data

    def gather_object(mine):
        other = dataclasses.replace(mine[0], rank=1 - rank, host="node-b")
        if rank == 1 and hasattr(other, "said"):
            other.said = main_saw(list(other.said))
        return [*mine, other]

    class Launch(_Launch):
        process_index, num_processes, is_main_process = rank, 2, rank == 0

    monkeypatch.setattr(accelerate.utils, "gather_object", gather_object)
    read_stage_data(Launch(), cfg)


def _data_with_a_bad_record_and_an_unknown_key(tmp_path: Path):
    from mmllm.config import load_stage

    lines = (REPO / "data/samples/pairs.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"caption"', '"captoin"')  # a typo: the key is not read, the record malformed
    lines[2] = lines[2][:-1] + ', "note": "x"}'  # a key the format does not read
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return load_stage(_stage_reading(tmp_path, "stage", data), [f"output_dir={tmp_path / 'out'}"])


def test_the_first_reads_data_warnings_are_said_once_across_processes(tmp_path, monkeypatch, caplog):
    """Every process reads the data files itself: a malformed record or a key the format does not read was
    warned about once per process (8 copies on an 8-GPU node). Now the main process says them, and another
    process says only what the main process did not see."""
    cfg = _data_with_a_bad_record_and_an_unknown_key(tmp_path)
    caplog.set_level("INFO", logger="mmllm")
    for rank in (0, 1):  # both processes' logs, one after the other
        _read_as(rank, cfg, monkeypatch)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w.startswith("skipping record:") and "pairs.jsonl:2" in w for w in warned].count(True) == 1, warned
    assert ["pairs.jsonl:3: note is a key" in w for w in warned].count(True) == 1, warned
    assert len(warned) == len(set(warned)) == 3, warned  # the third: captoin, a key not read either


def test_a_warning_the_main_process_did_not_see_is_said_by_the_process_that_saw_it(tmp_path, monkeypatch, caplog):
    cfg = _data_with_a_bad_record_and_an_unknown_key(tmp_path)
    caplog.set_level("INFO", logger="mmllm")
    _read_as(1, cfg, monkeypatch, main_saw=lambda said: [m for m in said if not m.startswith("skipping record:")])
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith("process 1 (host "), warned
    assert "not on the main process: skipping record:" in warned[0]


def _gathering_as_the_other_too(monkeypatch) -> None:
    import dataclasses

    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "gather_object",
                        lambda mine: [*mine, dataclasses.replace(mine[0], rank=1, host="node-b")])


def test_another_threads_error_during_the_held_read_is_said_as_it_comes(monkeypatch, caplog):
    """The faults watch thread logs another process's failure and then ends this process (os._exit) -- possibly
    while this process's read holds its warnings: held, that error was never said. Only the reading thread's
    warnings are held."""
    import logging
    import threading

    from mmllm.training.agreement import on_every_process_warning_once

    _gathering_as_the_other_too(monkeypatch)
    caplog.set_level("INFO", logger="mmllm")
    said_during: list[list[str]] = []

    def read() -> int:
        logging.getLogger("mmllm.data.formats").warning("a data warning")
        watch = threading.Thread(target=lambda: logging.getLogger("mmllm.training.faults").error("process 1 failed"))
        watch.start()
        watch.join()
        said_during.append([r.getMessage() for r in caplog.records])
        return 1

    on_every_process_warning_once(_TwoProcesses(), read)
    assert said_during == [["process 1 failed"]]  # the data warning held, the other thread's error not
    assert [r.getMessage() for r in caplog.records] == ["process 1 failed", "a data warning"]


def test_a_failed_lookup_waiting_to_be_tried_again_is_said_while_the_read_holds_its_warnings(monkeypatch, caplog):
    """"looking up the record's media failed (...); trying again in 30 s" reports a wait while it happens: held with
    the first read's warnings, it was said only once the wait (and the whole read) was over."""
    import logging

    from mmllm.data import index as index_module
    from mmllm.training.agreement import on_every_process_warning_once

    _gathering_as_the_other_too(monkeypatch)
    monkeypatch.setattr(index_module, "READ_RETRY_DELAYS", (0.01,))
    caplog.set_level("INFO", logger="mmllm")
    said_during: list[list[str]] = []
    tries = []

    def parser(rec, line):  # a media lookup's passing I/O error, then the record
        tries.append(line)
        if len(tries) == 1:
            said_during.append([r.getMessage() for r in caplog.records])
            raise OSError(5, "Input/output error")
        said_during.append([r.getMessage() for r in caplog.records])
        return rec

    def read() -> int:
        logging.getLogger("mmllm.data.formats").warning("a data warning")
        assert index_module.parse_retrying(parser, {"id": "a"}, 1, "d.jsonl:1") == {"id": "a"}
        return 1

    on_every_process_warning_once(_TwoProcesses(), read)
    waited = "d.jsonl:1: looking up the record's media failed ([Errno 5] Input/output error); trying again in 0.01 s"
    assert said_during == [[], [waited]]  # said while the read went on; the data warning still held
    assert [r.getMessage() for r in caplog.records] == [waited, "a data warning"]


def test_warnings_held_when_the_read_is_interrupted_are_said(monkeypatch, caplog):
    """Ctrl-C (KeyboardInterrupt) during the first read: the warnings held so far went with it."""
    import logging

    from mmllm.training.agreement import on_every_process_warning_once

    _gathering_as_the_other_too(monkeypatch)
    caplog.set_level("INFO", logger="mmllm")

    def read() -> int:
        logging.getLogger("mmllm.data.formats").warning("skipping record: pairs.jsonl:2: malformed")
        raise KeyboardInterrupt

    before = list(logging.getLogger("mmllm").handlers), logging.getLogger("mmllm").propagate
    with pytest.raises(KeyboardInterrupt):
        on_every_process_warning_once(_TwoProcesses(), read)
    assert [r.getMessage() for r in caplog.records] == ["skipping record: pairs.jsonl:2: malformed"]
    assert (logging.getLogger("mmllm").handlers, logging.getLogger("mmllm").propagate) == before  # restored
