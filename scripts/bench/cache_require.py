"""What a training stage of the embedded default holds and how fast it steps: without a feature cache,
with one, and with one and ``cache.require`` (the parts the cache replaces are not held), side by side.

For each stage config: ``mmllm cache``'s code fills a cache for the stage's data, then one fresh
process per row runs the stage's own ``train()`` for a few steps (a fresh assembly, ``init_from=null``)
and reports the parameters the process holds (shared ones once, after the stage has set itself up),
the seconds per step after the first, the process's peak resident memory, and the losses -- which
must be the same in the two cached rows (the same features, cast the same way) and agree with the
uncached row to float tolerance.

    python scripts/bench/cache_require.py                 # the three default stages (~6 min on 2 cores)
    python scripts/bench/cache_require.py --steps 6 --stages configs/stages/default/decode_align.yaml

The default's stage data must exist (``mmllm world data --out runs/default/data --plain
data/default/plain_chat.jsonl``, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import _child  # noqa: E402  (beside this script)

STAGES = [REPO / f"configs/stages/default/{s}.yaml" for s in ("encode_align", "decode_align", "instruct")]
ROWS = {"no cache": ["cache.dir=null"], "cache": [], "cache + require": ["cache.require=true"]}


def overrides(cache: Path, out: Path, steps: int) -> list[str]:
    return ["init_from=null", f"max_steps={steps}", "save_every=0", "report_to=none", f"output_dir={out}",
            f"cache.dir={cache}", "log_every=1"]


def child(stage: Path, args: list[str]) -> dict[str, object]:
    """Train the stage in this (fresh) process; measure what it holds once set up, and its step times."""
    import torch

    import mmllm.training.loop as loop
    from mmllm.config import load_stage
    from mmllm.memory import peak_resident_mb
    from mmllm.training.freeze import count_parameters

    held: dict[str, float] = {}
    measure = loop._parameter_megabytes

    def recorded(model):  # called by train() once the model is set up and prepared
        rows = count_parameters(model)  # one process: the AnyToAnyModel itself
        held["params_m"] = sum(r.trainable + r.frozen for r in rows) / 1e6  # shared parameters once
        return measure(model)

    loop._parameter_megabytes = recorded
    step_s = _child.median_step_seconds(loop)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    result = loop.train(load_stage(stage, args))
    return {"losses": result.losses, "params_m": held["params_m"], "skipped": result.skipped,
            "step_s": step_s(),
            "peak_mb": peak_resident_mb()}  # not ru_maxrss: that counts this bench's process too (its model)


def build(stage: Path, cache: Path) -> float:
    from mmllm.config import load_stage
    from mmllm.data.cache_build import build_cache
    from mmllm.training.loop import build_model

    cfg = load_stage(stage, ["init_from=null", f"cache.dir={cache}"])
    start = time.perf_counter()
    report = build_cache(cfg, build_model(cfg))
    print(report.format().replace("\n", "\n    "))
    return time.perf_counter() - start


def run_child(stage: Path, args: list[str]) -> dict[str, object]:
    return _child.run_child(__file__, str(stage), json.dumps(args))


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(Path(sys.argv[2]), json.loads(sys.argv[3]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", nargs="+", type=Path, default=STAGES)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        table = []
        for stage in args.stages:
            cache = Path(tmp) / f"cache-{stage.stem}"
            print(f"{stage.stem}: cache built in {build(stage, cache):.1f} s")
            for row, (label, extra) in enumerate(ROWS.items()):  # a folder per row: train refuses an old run's
                r = run_child(stage, overrides(cache, Path(tmp) / f"out-{stage.stem}-{row}", args.steps) + extra)
                table.append((stage.stem, label, r))
        print(f"\n{'stage':<14} {'run':<16} {'M params held':>14} {'s/step':>7} {'peak RSS MB':>12}  losses")
        for name, label, r in table:
            base = next(x for n, lab, x in table if n == name and lab == "cache")
            diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["losses"], base["losses"]))
            same = "" if r is base else ("  (= cache)" if diff == 0 else f"  (max rel. diff from cache {diff:.1e})")
            print(f"{name:<14} {label:<16} {r['params_m']:>14.1f} {r['step_s']:>7.2f} {r['peak_mb']:>12.0f}  "
                  + " / ".join(f"{x:.4f}" for x in r["losses"]) + same)
    return 0


if __name__ == "__main__":
    sys.exit(main())
