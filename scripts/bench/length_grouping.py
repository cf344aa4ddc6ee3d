"""What ``group_by_length`` does to a stage's padding and speed, side by side with the default sampler.

For each setting (off, on), in a fresh process per run: the stage's own ``train()`` (a fresh assembly,
``init_from=null``, no save but the last) for ``--steps`` steps, with timers around each step's forward,
backward and optimizer step; the batches it collates are counted (real tokens, padded tokens). Printed:
per setting, the padding share of the steps it ran, seconds per step, real (non-padding) tokens per second;
then the ratios on / off. Before that, from the tokenizer alone (no model run), the padding share of the
first ``--padding-steps`` batches under each setting. ``--rounds 2`` runs off, on, off, on: on a shared
machine the seconds move between runs, so look at both rounds.

The two settings read other samples in their first steps; over a whole number of chunks (``--steps`` a
multiple of 50 micro-batches, the grouping's chunk) they read the same samples, each as often, so their
seconds compare like for like. A step's seconds grow faster than its tokens (the per-step lines show it),
so a few steps of short grouped batches flatter the ratio; 50 steps do not.

    python scripts/bench/length_grouping.py                   # the default's instruct stage, 4 steps
    python scripts/bench/length_grouping.py --steps 3 --stage configs/stages/tiny/instruct.yaml

Threads: ``BENCH_THREADS`` (default 1). The default's stage data must exist (``mmllm world data --out
runs/default/data --plain data/default/plain_chat.jsonl``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import _child  # noqa: E402  (beside this script)

STAGE = REPO / "configs/stages/default/instruct.yaml"
SETTINGS = {"off": "group_by_length=false", "on": "group_by_length=true"}


def train_child(stage: Path, setting: str, steps: int) -> dict[str, Any]:
    """Train ``steps`` steps under ``setting``; seconds and token counts per step."""
    import torch

    import mmllm.training.loop as loop
    from mmllm.config import load_stage

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    seconds: dict[int, float] = {}
    tokens: dict[int, list[int]] = {}  # step -> [real, padded]

    def timed(inner):
        @functools.wraps(inner)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                step = pending[0]  # the step whose batches were drawn last
                seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - start
        return wrapper

    real_collate = loop.collate

    def counting_collate(samples, pad_id):
        batch = real_collate(samples, pad_id)
        if "attention_mask" in batch:
            mask = batch["attention_mask"]
            counts = tokens.setdefault(pending[0], [0, 0])
            counts[0] += int(mask.sum())
            counts[1] += mask.numel()
        return batch

    pending = [0]
    real_sampler = loop.stage_sampler

    def step_counting_sampler(*args: Any, **kwargs: Any):
        sampler = real_sampler(*args, **kwargs)
        draw = sampler.micro_batch

        def micro_batch(step: int, *rest: Any) -> Any:
            pending[0] = step
            return draw(step, *rest)

        sampler.micro_batch = micro_batch
        return sampler

    loop.collate = counting_collate
    loop.stage_sampler = step_counting_sampler
    loop._forward_backward = timed(loop._forward_backward)
    loop._clip_and_step = timed(loop._clip_and_step)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_stage(stage, ["init_from=null", f"max_steps={steps}", f"save_every={steps}", "report_to=none",
                                 f"output_dir={tmp}/out", "log_every=1", "eval_data=[]", SETTINGS[setting]])
        result = loop.train(cfg)
    return {"losses": result.losses, "seconds": [seconds[s] for s in range(steps)],
            "tokens": [tokens[s] for s in range(steps)]}


def padding_child(stage: Path, steps: int) -> dict[str, float]:
    """The padding share of the first ``steps`` batches (every micro-batch, one process) under each setting:
    the samples' lengths as training counts them (:meth:`StageDataset.length`); the LLM is built from its
    config alone, no weights."""
    from mmllm.config import load_assembly, load_stage
    from mmllm.data.dataset import StageDataset, load_stage_records
    from mmllm.model import AnyToAnyModel
    from mmllm.training.loop import stage_sampler, token_spec

    out = {}
    for setting, override in SETTINGS.items():
        cfg = load_stage(stage, ["init_from=null", override])
        if not out:
            model = AnyToAnyModel.assemble(load_assembly(cfg.assembly, cfg.assembly_overrides), "config", [],
                                           llm_weights=False)
            per_dataset, weights, _ = load_stage_records(cfg.data, cfg.stage)
            datasets = [StageDataset(c, model.llm.tokenizer, token_spec(model), {}) for c in per_dataset]
        sampler = stage_sampler(datasets, weights, cfg)
        real = padded = 0
        for step in range(steps):
            for micro in range(cfg.grad_accum):
                lengths = [datasets[d].length(i)
                           for d, i in sampler.micro_batch(step, micro, cfg.grad_accum, 0, 1, cfg.batch_size)]
                real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
        out[setting] = 1 - real / padded
    return out


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        kind, stage = sys.argv[2], Path(sys.argv[3])
        out = padding_child(stage, int(sys.argv[4])) if kind == "padding" else train_child(stage, kind, int(sys.argv[4]))
        print(json.dumps(out))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", type=Path, default=STAGE)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--padding-steps", type=int, default=450)
    args = ap.parse_args()
    pad = _child.run_child(__file__, "padding", str(args.stage), str(args.padding_steps))
    print(f"{args.stage.name}: padding among the tokens of the first {args.padding_steps} steps: "
          f"off {pad['off']:.1%}, on {pad['on']:.1%}")
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            r = _child.run_child(__file__, setting, str(args.stage), str(args.steps))
            runs[setting].append(r)
            real, total = (sum(t[k] for t in r["tokens"]) for k in (0, 1))
            sec = sum(r["seconds"])
            r["summary"] = {"padding": 1 - real / total, "s_per_step": sec / args.steps, "tokens_per_s": real / sec}
            print(f"  {setting:>3}: {args.steps} steps, padding {1 - real / total:.1%} of {total} tokens, "
                  f"{sec / args.steps:.2f} s/step, {real / sec:.1f} real tokens/s, {total / sec:.1f} tokens/s "
                  "counting padding")
            print("       per step: seconds / real tokens / tokens with padding: " + ", ".join(
                f"{s:.1f}/{t[0]}/{t[1]}" for s, t in zip(r["seconds"], r["tokens"])))
            print("       losses " + " / ".join(f"{x:.4f}" for x in r["losses"]))
    for k, (off, on) in enumerate(zip(runs["off"], runs["on"])):
        a, b = off["summary"], on["summary"]
        print(f"round {k + 1}, on / off: seconds per step {b['s_per_step'] / a['s_per_step']:.2f}x, "
              f"real tokens per second {b['tokens_per_s'] / a['tokens_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
