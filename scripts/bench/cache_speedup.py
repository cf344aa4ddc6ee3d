"""Speed-up of a training step from the feature cache, on the tiny assembly (CPU, a few seconds).

For encode-align (encoder features) and decode-align (conditioning targets): build the cache for
the sample data with ``mmllm cache``'s code, then time the same training steps (read samples,
collate, forward, backward, optimiser step) with and without it, from one model, one process.

    python scripts/bench/cache_speedup.py [--steps 8] [--rounds 3] [--batch-size 4] [--threads 1]

Prints the median wall-clock and CPU milliseconds per step without -> with the cache and their
ratios for each stage, and checks that the losses agree. Runs alternate, so load from other
processes on a shared machine hits both sides alike; CPU time is the steadier figure there.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mmllm.config import load_stage  # noqa: E402
from mmllm.data.cache_build import build_cache  # noqa: E402
from mmllm.data.dataset import MixtureSampler, StageDataset, collate, load_stage_records  # noqa: E402
from mmllm.data.precomputed import open_precomputed  # noqa: E402
from mmllm.data.samples import write_sample_dataset  # noqa: E402
from mmllm.training.freeze import apply_trainable  # noqa: E402
from mmllm.training.loop import build_model, token_spec  # noqa: E402


class Runner:
    """Training steps over the stage's data, with or without precomputed features, from fixed weights."""

    def __init__(self, cfg, model, precomputed):
        per_dataset, weights, _ = load_stage_records(cfg.data, cfg.stage)
        preprocess = {m: e.preprocess for m, e in model.encoders.items()}
        self.datasets = [StageDataset(c, model.llm.tokenizer, token_spec(model), preprocess, precomputed=precomputed)
                         for c in per_dataset]
        self.sampler = MixtureSampler([len(d) for d in self.datasets], weights, cfg.seed)
        self.cfg, self.model = cfg, model

    def run(self, first: int, steps: int) -> tuple[list[tuple[float, float]], list[float]]:
        """(wall, CPU) seconds of each step and its loss, for steps ``first .. first+steps-1``, from the
        start weights."""
        model, cfg = self.model, self.cfg
        start = {k: v.detach().clone() for k, v in model.learned_state_dict().items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr)
        times, losses = [], []
        model.train()
        for step in range(first, first + steps):
            began, began_cpu = time.perf_counter(), time.process_time()
            picks = self.sampler.micro_batch(step, 0, 1, 0, 1, cfg.batch_size)
            batch = collate([self.datasets[d][i] for d, i in picks], model.llm.tokenizer.pad_token_id)
            optimizer.zero_grad(set_to_none=True)
            loss = model(batch, cfg.losses)["loss"]
            loss.backward()
            optimizer.step()
            times.append((time.perf_counter() - began, time.process_time() - began_cpu))
            losses.append(float(loss.detach()))
        model.load_learned_state_dict(start, "bench start")
        return times, losses


def compare(cfg, model, steps: int, rounds: int) -> dict[str, float | bool]:
    """Median wall and CPU seconds per step without and with the cache, alternating rounds."""
    plain, cached = Runner(cfg, model, None), Runner(cfg, model, open_precomputed(cfg, model))
    plain.run(0, 1)  # warm-up: imports, lazy pipelines
    cached.run(0, 1)
    t_plain, t_cached, agree = [], [], True
    for r in range(rounds):
        a, la = plain.run(r * steps, steps)
        b, lb = cached.run(r * steps, steps)
        t_plain += a
        t_cached += b
        agree = agree and torch.allclose(torch.tensor(la), torch.tensor(lb), rtol=1e-4, atol=1e-5)
    return {"wall": statistics.median(t for t, _ in t_plain), "wall_cached": statistics.median(t for t, _ in t_cached),
            "cpu": statistics.median(c for _, c in t_plain), "cpu_cached": statistics.median(c for _, c in t_cached),
            "agree": agree}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating without / with the cache")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_sample_dataset(Path(tmp) / "data")
        for stage, name in (("encode-align", "encode_align"), ("decode-align", "decode_align")):
            cfg = load_stage(REPO / "configs/stages/tiny" / f"{name}.yaml", [
                f"output_dir={tmp}/out", "report_to=none", "init_from=null", f"batch_size={args.batch_size}",
                f"data=[{{path: {files['pairs']}, format: mmllm-pairs}}]", f"cache.dir={tmp}/cache-{name}"])
            model = build_model(cfg)
            apply_trainable(model, cfg.resolved_trainable())
            began = time.perf_counter()
            build_cache(cfg, model)
            build = time.perf_counter() - began
            r = compare(cfg, model, args.steps, args.rounds)
            print(f"{stage:<13} wall {r['wall'] * 1000:6.1f} -> {r['wall_cached'] * 1000:6.1f} ms/step "
                  f"(x{r['wall'] / r['wall_cached']:.2f})   CPU {r['cpu'] * 1000:6.1f} -> {r['cpu_cached'] * 1000:6.1f} "
                  f"ms/step (x{r['cpu'] / r['cpu_cached']:.2f})   cache built in {build:.1f} s; "
                  f"losses agree: {r['agree']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
