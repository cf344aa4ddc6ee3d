"""Where a training step's time goes, per stage, and where ``mmllm demo``'s answering time goes.

One fresh process per stage runs the stage's own ``train()`` (a fresh assembly, ``init_from=null``, one
save at the last step, which also scores ``eval_data``) with timers around the loop's pieces, and prints
each piece's seconds per step and share of the step, side by side:

* data: reading, tokenizing and decoding the samples (``StageDataset``) and collating them;
* encoders + input projections (``embed_inputs``); the LLM body (``hidden_states`` less that);
* losses: logits at the labelled positions, conditioning targets, output projections, retention KL;
* backward + optimizer: the rest of the step (backward, clipping, AdamW);

and the share of padding among the tokens of the stage's first 50 batches (what the LLM runs for nothing).

The ``infer`` row answers the demo's requests on the shipped default glue (``mmllm demo``'s code) and splits
its time the same way: model load, the LLM's generation, the per-answer re-forward that gives the signal
groups' conditioning (``_attach_conditioning``), the diffusion decoders, and reading / writing media.

    python scripts/bench/step_breakdown.py                         # the default's three stages + infer
    python scripts/bench/step_breakdown.py --steps 3 --stages configs/stages/tiny/instruct.yaml

Threads: ``BENCH_THREADS`` (default 1). The default's stage data must exist (``mmllm world data --out
runs/default/data --plain data/default/plain_chat.jsonl``). Shares, not absolute seconds, are what
carries over between runs on a shared machine.
"""

from __future__ import annotations

import argparse
import collections
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

STAGES = [REPO / f"configs/stages/default/{s}.yaml" for s in ("encode_align", "decode_align", "instruct")]


class Timers:
    """Wall seconds spent inside wrapped functions (inclusive), and their call counts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self.prefix = ""  # "val " while validation runs: its reads and forwards are counted apart

    def wrap(self, owner: Any, name: str, label: str, prefix: str | None = None) -> None:
        """Time ``owner.name`` under ``label``; with ``prefix``, what runs inside it is labelled with it."""
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Any:
            key, outer = self.prefix + label, self.prefix
            if prefix is not None:
                self.prefix = prefix
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self.calls[key] += 1
                self.prefix = outer

        setattr(owner, name, timed)


def stage_child(stage: Path, steps: int) -> dict[str, Any]:
    import torch

    import mmllm.data.dataset as dataset
    import mmllm.model as model
    import mmllm.training.loop as loop
    from mmllm.config import load_stage

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    t = Timers()
    t.wrap(dataset.StageDataset, "__getitem__", "getitem")
    t.wrap(loop, "collate", "collate")
    t.wrap(model.AnyToAnyModel, "embed_inputs", "embed_inputs")
    t.wrap(model.AnyToAnyModel, "hidden_states", "hidden_states")
    t.wrap(model.AnyToAnyModel, "forward", "forward")
    t.wrap(loop, "_forward_backward", "forward_backward")
    t.wrap(loop, "_clip_and_step", "clip_and_step")
    t.wrap(loop, "evaluate", "validation", prefix="val ")
    t.wrap(loop, "save", "save")
    with tempfile.TemporaryDirectory() as tmp:
        # eval_cache_mb=0: the one validation runs the frozen encoders and targets inside the forward, where the
        # rows below find them (a kept batch gets them computed beforehand; scripts/bench/validation_cache.py)
        cfg = load_stage(stage, ["init_from=null", f"max_steps={steps}", f"save_every={steps}", "report_to=none",
                                 f"output_dir={tmp}/out", "log_every=1", "eval_cache_mb=0"])
        result = loop.train(cfg)
    s = {k: v / steps for k, v in t.seconds.items() if not k.startswith("val ")}  # per training step
    v = {k[4:]: x for k, x in t.seconds.items() if k.startswith("val ")}  # the one validation, whole
    validation = None if "validation" not in t.seconds else {
        "data (read, tokenize, decode media, collate)": v.get("getitem", 0.0),
        "encoders + input projections": v.get("embed_inputs", 0.0),
        "LLM body": v.get("hidden_states", 0.0) - v.get("embed_inputs", 0.0),
        "losses (logits, targets, output proj., KL)": v.get("forward", 0.0) - v.get("hidden_states", 0.0),
        "rest": t.seconds["validation"] - v.get("getitem", 0.0) - v.get("forward", 0.0),
    }
    return {"steps": steps, "losses": result.losses, "save_s": s["save"] * steps, "padding": padding_share(stage),
            "per_step": {
                "data (read, tokenize, decode media, collate)": s["getitem"] + s["collate"],
                "encoders + input projections": s["embed_inputs"],
                "LLM body": s["hidden_states"] - s["embed_inputs"],
                "losses (logits, targets, output proj., KL)": s["forward"] - s["hidden_states"],
                "backward + optimizer": s["forward_backward"] + s["clip_and_step"] - s["forward"],
            },
            "validation": validation}


def padding_share(stage: Path, steps: int = 50) -> float:
    """The share of padding among the tokens of the stage's first ``steps`` training batches (the sampler's
    own picks, tokenized as training does; the LLM is built from its config alone, no weights)."""
    from mmllm.config import load_assembly, load_stage
    from mmllm.data.dataset import MixtureSampler, load_stage_records
    from mmllm.data.template import encode_conversation
    from mmllm.model import AnyToAnyModel
    from mmllm.training.loop import token_spec

    cfg = load_stage(stage, ["init_from=null"])
    model = AnyToAnyModel.assemble(load_assembly(cfg.assembly, cfg.assembly_overrides), "config", [],
                                   llm_weights=False)
    spec, tok = token_spec(model), model.llm.tokenizer
    per_dataset, weights, _ = load_stage_records(cfg.data, cfg.stage)
    sampler = MixtureSampler([len(c) for c in per_dataset], weights, cfg.seed)
    real = padded = 0
    for step in range(steps):
        lengths = [len(encode_conversation(per_dataset[d][i], tok, spec).input_ids)
                   for d, i in sampler.micro_batch(step, 0, cfg.grad_accum, 0, 1, cfg.batch_size)]
        real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
    return 1 - real / padded


def infer_child() -> dict[str, Any]:
    import torch

    import mmllm.inference.generate as generate
    from mmllm.demo import DEMO_SEED, REQUESTS, shipped_default, write_default_requests
    from mmllm.inference.runner import run_requests
    from mmllm.model import AnyToAnyModel

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    t = Timers()
    t.wrap(generate, "_attach_conditioning", "reforward")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        model = AnyToAnyModel.from_pretrained(shipped_default())
        load = time.perf_counter() - start
        requests = write_default_requests(out)
        counts = run_requests(model, requests, out / "answers", batch_size=len(REQUESTS), seed=DEMO_SEED,
                              max_new_tokens=64, checkpoint=shipped_default(), overwrite=True)
    sec = counts["seconds"]  # the runner's own split: prepare, llm, decode, write, total
    return {"load_s": load, "answer_s": sec["total"], "parts": {
        "prepare (parse, read and preprocess media)": sec["prepare"],
        "LLM generation": sec["llm"] - t.seconds["reforward"],
        "conditioning re-forward (per answer)": t.seconds["reforward"],
        "diffusion decoders": sec["decode"],
        "writing media, records, gallery": sec["write"],
    }}


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        out = infer_child() if sys.argv[2] == "infer" else stage_child(Path(sys.argv[2]), int(sys.argv[3]))
        print(json.dumps(out))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", nargs="+", type=Path, default=STAGES)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-infer", action="store_true", help="leave out the demo's answering")
    args = ap.parse_args()
    for stage in args.stages:
        r = _child.run_child(__file__, str(stage), str(args.steps))
        per = r["per_step"]
        total = sum(per.values())
        val = r["validation"]  # None: the stage has no eval_data
        val_total = sum(val.values()) if val else 0.0
        print(f"\n{stage.stem} ({stage.parent.name}), {r['steps']} steps, losses "
              + " / ".join(f"{x:.4f}" for x in r["losses"]) + f"; one save {r['save_s']:.2f} s; padding "
              f"{r['padding']:.1%} of the tokens of the first 50 training batches")
        print(f"  {'':<46} {'per step':>8}  {'share':>6}" + (f"   {'validation':>10}  {'share':>6}" if val else ""))
        rows = [*per, "rest of validation (collate, sums)", "total"] if val else [*per, "total"]
        per = per | {"total": total}
        val = (val or {}) | {"total": val_total, "rest of validation (collate, sums)": (val or {}).get("rest", 0.0)}
        for name in rows:
            left = f"{per[name]:8.3f}  {per[name] / total:6.1%}" if name in per else " " * 16
            right = f"   {val.get(name, 0.0):10.3f}  {val.get(name, 0.0) / val_total:6.1%}" if val_total else ""
            print(f"  {name:<46} {left}{right}")
    if not args.no_infer:
        r = _child.run_child(__file__, "infer")
        total = r["answer_s"]
        print(f"\ninfer (mmllm demo's 10 requests): load {r['load_s']:.1f} s, answering {total:.1f} s")
        for name, sec in r["parts"].items():
            print(f"  {name:<44} {sec:8.3f} s  {sec / total:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
