"""Batch-inference throughput: requests/s of ``mmllm infer``'s runner at batch 1 and batch 16, one run.

The same mixed request set (text -> image / audio / video, image / audio / video -> text) goes
through :func:`mmllm.inference.runner.run_requests` -- loading media, batched generation,
decoding, writing files, records and the gallery -- at each batch size, from one loaded model.
Runs alternate (1, 16, 1, 16, ...) so load from other processes on a shared machine hits both
sides alike; the best run of each side is reported, with the median beside it.

    python scripts/bench/infer_throughput.py                       # trains a tiny checkpoint first (~15 s)
    python scripts/bench/infer_throughput.py --checkpoint runs/tiny/instruct/step-30 --requests 64

Target: batch 16 >= 3x batch 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the measurement

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mmllm.data.samples import COLOURS, DIRECTIONS, PITCHES, SHAPES, write_sample_dataset  # noqa: E402
from mmllm.data.template import GENERATE_PROMPTS  # noqa: E402
from mmllm.inference.runner import run_requests  # noqa: E402
from mmllm.inference.tiny import train_tiny_checkpoint  # noqa: E402
from mmllm.model import AnyToAnyModel  # noqa: E402


def request_set(n: int, media: Path) -> list[dict]:
    """``n`` requests cycling over the six directions (three out, three in)."""
    shapes = [(c, s) for c in COLOURS for s in SHAPES]
    out = []
    for i in range(n):
        colour, shape = shapes[i % len(shapes)]
        pitch = list(PITCHES)[i % len(PITCHES)]
        direction = list(DIRECTIONS)[i % len(DIRECTIONS)]
        kind = i % 6
        if kind == 0:
            rec = {"prompt": GENERATE_PROMPTS["image"].format(caption=f"a {colour} {shape}")}
        elif kind == 1:
            rec = {"prompt": GENERATE_PROMPTS["audio"].format(caption=f"a {pitch} beep")}
        elif kind == 2:
            rec = {"prompt": GENERATE_PROMPTS["video"].format(caption=f"a {colour} {shape} moving {direction}")}
        elif kind == 3:
            rec = {"prompt": "What is this?", "image": str(media / f"{colour}_{shape}.png")}
        elif kind == 4:
            rec = {"prompt": "What do you hear?", "audio": str(media / f"{pitch}.wav")}
        else:
            rec = {"prompt": "What happens?", "video": str(sorted(media.glob(f"{colour}_{shape}_*.gif"))[0])}
        out.append({"id": f"r{i:04d}", "seed": i, **rec})
    return out


def timed_run(model, requests: Path, out: Path, batch_size: int, max_new_tokens: int,
              checkpoint: Path) -> dict[str, float]:
    """One run into a fresh ``out``; the runner's seconds per stage and ``total``."""
    shutil.rmtree(out, ignore_errors=True)
    counts = run_requests(model, requests, out, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          checkpoint=checkpoint)
    if counts["failed"]:
        raise SystemExit(f"{counts['failed']} request(s) failed at batch {batch_size}; see {out}/results.jsonl")
    return counts["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a checkpoint directory (default: train a tiny one in a temp dir)")
    ap.add_argument("--requests", type=int, default=48, help="requests per run (a multiple of 16 is fairest)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each batch size, alternating")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="as `mmllm infer`'s default")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default, as `mmllm infer`). 1 by default: on a shared 2-core "
                         "machine several threads of tiny ops stall whenever another process holds a core")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="mmllm-bench-infer-") as tmp:
        root = Path(tmp)
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
            media = write_sample_dataset(root / "samples")["pairs"].parent / "media"
        else:
            print("training a tiny checkpoint (decode-align, then encode-align) ...", flush=True)
            checkpoint = train_tiny_checkpoint(root / "tiny")
            media = root / "tiny" / "samples" / "media"
        requests = root / "requests.jsonl"
        requests.write_text("".join(json.dumps(r) + "\n" for r in request_set(args.requests, media)))
        model = AnyToAnyModel.from_pretrained(checkpoint).eval()
        # warm-up: builds the decoders' pipelines and touches every code path once
        timed_run(model, requests, root / "warmup", 16, args.max_new_tokens, checkpoint)

        runs: dict[int, list[dict[str, float]]] = {1: [], 16: []}
        for _ in range(args.rounds):
            for bs in runs:
                runs[bs].append(timed_run(model, requests, root / f"out-{bs}", bs, args.max_new_tokens, checkpoint))
        print(f"\ncheckpoint {checkpoint}; {args.requests} mixed requests per run, max_new_tokens "
              f"{args.max_new_tokens}, torch threads {torch.get_num_threads()}, {args.rounds} round(s)")
        rate = {}
        for bs, seconds in runs.items():
            best = min(seconds, key=lambda s: s["total"])
            rate[bs] = args.requests / best["total"]
            median = statistics.median(s["total"] for s in seconds)
            print(f"  batch {bs:>2}: {rate[bs]:7.2f} req/s (best; median {args.requests / median:.2f})"
                  "   best run, s per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in best.items()))
        ratio = rate[16] / rate[1]
        print(f"  batch 16 / batch 1: {ratio:.2f}x  (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})")


if __name__ == "__main__":
    main()
