"""What keeping the held-out batches between saves, and batching them by length, saves per validation.

One fresh process per stage builds the stage's model (a fresh assembly, ``init_from=null``, the stage's own
trainable flags) and its ``eval_data`` held-out set, then scores the set with ``evaluate`` (what every save
runs) in three ways, side by side on the same model:

* ``old``: the held-out set in file order, every batch read, tokenized, collated and run through the frozen
  encoders and the decoders' conditioning again (what every save did before ``eval_cache_mb``);
* ``by length``: the set sorted by token length (less padding), still prepared again at every evaluation
  (``eval_cache_mb=0``);
* ``kept``: by length, the prepared batches kept (``eval_cache_mb``, the default): its first evaluation
  prepares and keeps them, the next ones (``kept, next saves``) only run the learned parts and the core.

Printed per stage: the padding share of each order, the wall and CPU seconds of each way per evaluation
(``--rounds`` rounds of old / by length / kept; on a shared machine the wall seconds move with the other
jobs, the process's CPU seconds less so), the ratios of the medians old / kept and old / by length, and that the scores agree (kept and by length: the same
bits; old: the same to float rounding).

    python scripts/bench/validation_cache.py        # the default's encode-align and decode-align stages
    python scripts/bench/validation_cache.py --stages configs/stages/default/decode_align.yaml --rounds 1

Threads: ``BENCH_THREADS`` (default 1). The default's stage data must exist (``mmllm world data --out
runs/default/data --plain data/default/plain_chat.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import _child  # noqa: E402  (beside this script)

STAGES = [REPO / "configs/stages/default/encode_align.yaml", REPO / "configs/stages/default/decode_align.yaml"]


def stage_child(stage: Path, rounds: int) -> dict[str, Any]:
    """Score the stage's held-out set ``rounds`` times each way; (wall, CPU) seconds, scores and padding."""
    import torch
    from accelerate import Accelerator

    from mmllm.config import load_stage
    from mmllm.data.dataset import StageDataset, load_stage_records
    from mmllm.data.precomputed import open_precomputed
    from mmllm.training.freeze import apply_trainable
    from mmllm.training.loop import _part_keys, build_model, token_spec
    from mmllm.training.validation import Validation, evaluate

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_stage(stage, ["init_from=null", "report_to=none", f"output_dir={tmp}/out"])
    if not cfg.eval_data:
        raise SystemExit(f"{stage}: no eval_data to score")
    model = build_model(cfg)
    apply_trainable(model, cfg.resolved_trainable(), log_table=False)
    accelerator = Accelerator()
    model.to(accelerator.device)
    records = load_stage_records(cfg.eval_data, cfg.stage)[0]
    precomputed = open_precomputed(cfg, model)
    datasets = [StageDataset(r, model.llm.tokenizer, token_spec(model),
                             {m: e.preprocess for m, e in model.encoders.items()},
                             load_output_media=cfg.losses.denoise > 0, precomputed=precomputed) for r in records]
    keys = _part_keys(model)
    old = Validation(datasets, cfg.batch_size)
    old._order = [(d, i) for d, ds in enumerate(datasets) for i in range(len(ds))]  # the file order
    ways = {"old": old, "by length": Validation(datasets, cfg.batch_size),
            "kept": Validation(datasets, cfg.batch_size, cfg.eval_cache_mb << 20)}
    seconds: dict[str, list[tuple[float, float]]] = {"old": [], "by length": [], "kept, first save": [], "kept, next saves": []}
    scores: dict[str, list[dict[str, float]]] = {k: [] for k in ways}
    for r in range(rounds + 1):  # round 0 fills the kept batches (timed as the first save)
        for name, validation in ways.items():
            if r == 0 and name != "kept":
                continue
            start, cpu = time.perf_counter(), time.process_time()
            scores[name].append(evaluate(accelerator, model, model, validation, cfg.losses, keys, {}))
            took = (time.perf_counter() - start, time.process_time() - cpu)
            seconds[name if name != "kept" else "kept, first save" if r == 0 else "kept, next saves"].append(took)

    def padding(validation: Validation) -> float:
        lengths = [[datasets[d].length(i) for d, i in b] for b in validation.shares(0, 1)]
        return 1 - sum(map(sum, lengths)) / sum(len(b) * max(b) for b in lengths if b)

    return {"samples": old.size, "batch_size": cfg.batch_size, "kept_mb": ways["kept"].kept_bytes / 2**20,
            "padding": {"old": padding(old), "by length": padding(ways["by length"])}, "seconds": seconds,
            "same_bits": all(s == scores["by length"][0] for s in scores["kept"] + scores["by length"]),
            "max_rel_diff_old": max(abs(a - b) / max(abs(b), 1e-12) for a, b in
                                    ((scores["kept"][0][k], scores["old"][0][k]) for k in scores["old"][0]))}


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        print(json.dumps(stage_child(Path(sys.argv[2]), int(sys.argv[3]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", nargs="+", type=Path, default=STAGES)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for stage in args.stages:
        r = _child.run_child(__file__, str(stage), str(args.rounds))
        sec = r["seconds"]
        print(f"\n{stage.stem} ({stage.parent.name}): {r['samples']} held-out samples, batch {r['batch_size']}; "
              f"padding {r['padding']['old']:.1%} in file order, {r['padding']['by length']:.1%} by length; "
              f"kept {r['kept_mb']:.1f} MB")
        print(f"  {'seconds (wall / CPU)':<18} " + "  ".join(f"{'round ' + str(k + 1):>15}" for k in range(args.rounds)))
        for name, runs in sec.items():
            print(f"  {name:<18} " + "  ".join(f"{w:6.2f} / {c:6.2f}" for w, c in runs))
        for i, clock in enumerate(("wall", "CPU")):
            old, grouped, kept = (statistics.median(s[i] for s in sec[k]) for k in ("old", "by length", "kept, next saves"))
            print(f"  {clock:>4} (medians): old / by length {old / grouped:.2f}x, old / kept {old / kept:.2f}x per save "
                  "after the first")
        print(f"  kept and by length score the same bits: {r['same_bits']}; largest relative difference from old's "
              f"scores: {r['max_rel_diff_old']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
