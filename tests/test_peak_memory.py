"""A process's own peak memory (mmllm.memory.peak_resident_mb), as training logs it and the benches report it.

On Linux ``getrusage(RUSAGE_SELF).ru_maxrss`` of a process started by fork + exec is at least what its parent held
at the fork: training under ``accelerate launch`` (each rank exec'd from a launcher holding torch, ~0.5 GB) and
each bench row (a fresh process started by a bench that may hold a model) reported their parent's memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="the fork + exec carry-over is Linux's")


def run_python(code: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]


def hold(mb: int) -> bytes:
    """``mb`` MB of this process's memory, written, so resident."""
    return b"x" * (mb * 2**20)


@linux_only
def test_a_child_of_a_big_parent_reports_its_own_peak():
    held = hold(512)
    child = float(run_python("from mmllm.memory import peak_resident_mb; print(peak_resident_mb())"))
    assert len(held) and child < 128, f"a bare Python reported {child:.0f} MB with its parent holding 512 MB"


@linux_only
def test_the_peak_counts_what_the_process_held_and_let_go():
    code = ("from mmllm.memory import peak_resident_mb; before = peak_resident_mb(); b = b'x' * (300 * 2**20); "
            "del b; print(before, peak_resident_mb())")
    before, after = map(float, run_python(code).split())
    assert 290 <= after - before < 330


@linux_only
def test_the_peak_is_at_least_what_this_process_holds_now():
    from mmllm.memory import peak_resident_mb

    held = hold(64)
    resident = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS:")) / 1024
    assert len(held) and peak_resident_mb() >= resident >= 64


def test_without_proc_the_peak_is_ru_maxrss_in_mb(monkeypatch):
    """Off Linux (no /proc) the fallback is ru_maxrss, KB on Linux and the BSDs, bytes on macOS: in MB either way."""
    import resource

    from mmllm import memory

    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr(memory, "open", no_proc, raising=False)
    held = hold(64)
    peak = memory.peak_resident_mb()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert len(held) and 64 <= peak and peak * 2**20 / (1 if sys.platform == "darwin" else 1024) == pytest.approx(maxrss)


@linux_only
def test_training_logs_its_own_peak_not_its_launcher_s():
    """``accelerate launch`` execs each rank from a process holding torch; training logged ``ru_maxrss``."""
    held = hold(1536)  # more than the child's own peak (imports: torch, transformers, diffusers)
    line = run_python("from mmllm.training.loop import _peak_memory; print(_peak_memory())")
    mb = float(line.removesuffix(" MB resident"))
    assert len(held) and mb < 1200, f"training logged {line} with its parent holding 1536 MB"


@linux_only
def test_a_data_index_bench_row_reports_its_own_peak(tmp_path):
    sys.path.insert(0, str(REPO / "scripts" / "bench"))
    try:
        import _child
    finally:
        sys.path.remove(str(REPO / "scripts" / "bench"))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "modality": "image", "media": "a.png", "caption": "a red dog"})
                            + "\n" for i in range(50)))
    held = hold(1536)
    row = _child.run_child(str(REPO / "scripts/bench/data_index.py"), "new", str(data), "mmllm-pairs", "read")
    assert len(held) and row["samples"] == 50 and row["peak_mb"] < 1200, row


def test_no_peak_memory_is_read_from_ru_maxrss_outside_the_helper():
    """The benches and the library report a peak through mmllm.memory.peak_resident_mb, whose fallback off Linux is
    the only ``getrusage`` call."""
    readers = [path.relative_to(REPO).as_posix() for folder in ("mmllm", "scripts") for path in (REPO / folder).rglob("*.py")
               if "getrusage(" in path.read_text() and path != REPO / "mmllm" / "memory.py"]
    assert readers == []
