"""``mmllm demo``: the whole data path end to end, offline, on this machine.

Until the embedded default (a real LLM core with the toy world's pretrained parts) ships, the demo
runs the tiny assembly: it trains the three stages on the shipped sample data
(``data/samples``), then answers ``data/samples/requests.jsonl`` -- text to image/audio/video and
image/audio/video to text -- writing media files, ``results.jsonl`` and ``index.html`` under the
output folder. The tiny parts have random weights, so the outputs show the plumbing, not quality.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmllm.config import load_stage
from mmllm.inference.runner import run_requests
from mmllm.model import AnyToAnyModel
from mmllm.training.loop import train

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
STAGES = ("encode_align", "decode_align", "instruct")


def run_demo(out: Path, quick: bool = False) -> int:
    configs = REPO / "configs" / "stages" / "tiny"
    requests = REPO / "data" / "samples" / "requests.jsonl"
    if not configs.is_dir() or not requests.is_file():
        raise SystemExit(f"the demo needs the repository's configs/ and data/ next to the package ({REPO})")
    out = out.resolve()
    previous = None
    for name in STAGES:
        overrides = [f"output_dir={out / 'runs' / name}", "report_to=none"]
        if quick:
            overrides.append("max_steps=4")
        if previous is not None:
            overrides.append(f"init_from={previous}")
        cfg = load_stage(configs / f"{name}.yaml", overrides)
        log.info("demo: training stage %s for %d steps", cfg.stage, cfg.max_steps)
        result = train(cfg)
        log.info("demo: %s loss %.3f -> %.3f", cfg.stage, result.losses[0], result.losses[-1])
        previous = result.final_checkpoint
    model = AnyToAnyModel.from_pretrained(previous)
    counts = run_requests(model, requests, out, batch_size=4, checkpoint=previous)
    log.info("demo: %(done)d requests answered, %(failed)d failed", counts)
    log.info("demo: open %s", out / "index.html")
    return 0 if counts["failed"] == 0 else 1
