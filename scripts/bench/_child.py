"""Run this bench script again in a fresh process (``--child ARGS``) and read the JSON line it prints last:
one row of a table, measured without what earlier rows left in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_child(script: str, *args: str) -> dict[str, Any]:
    """``python SCRIPT --child ARGS...`` from the repository root, offline; its last stdout line as JSON."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, script, "--child", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_step_seconds(loop: Any) -> Callable[[], float]:
    """Time ``loop``'s optimiser steps (mmllm.training.loop, patched: the end of each ``_clip_and_step``); the
    returned function gives the median time between consecutive step ends (nan with fewer than two)."""
    import time

    stamps: list[float] = []
    clip = loop._clip_and_step

    def timed(*a: Any, **kw: Any) -> Any:
        outcome = clip(*a, **kw)
        stamps.append(time.perf_counter())
        return outcome

    loop._clip_and_step = timed

    def median() -> float:
        per_step = sorted(b - a for a, b in zip(stamps, stamps[1:]))
        return per_step[len(per_step) // 2] if per_step else float("nan")

    return median
