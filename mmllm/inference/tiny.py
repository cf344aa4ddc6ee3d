"""A tiny checkpoint that answers like a real one, for inference tests and benchmarks.

The tiny assembly has random weights; a few dozen steps of decode-align on captions balanced over
the three output modalities teach it to answer "Generate an image: ..." / "Generate a sound: ..." /
"Generate a video: ..." with the matching signal tokens, and a few steps of encode-align after that
teach it to answer a media prompt with (nonsense) text instead of signal tokens. A few seconds on a CPU.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mmllm.data.samples import COLOURS, DIRECTIONS, PITCHES, SHAPES, write_sample_dataset

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent.parent
STAGE_CONFIGS = REPO / "configs" / "stages" / "tiny"
SOUNDS = ("beep", "hum", "chime")


def balanced_captions() -> list[dict[str, str]]:
    """Caption-only pairs, about as many per output modality (decode-align needs no media)."""
    pairs = []
    for colour in COLOURS:
        for shape in SHAPES:
            pairs.append({"modality": "image", "caption": f"a {colour} {shape}"})
            direction = list(DIRECTIONS)[len(pairs) % len(DIRECTIONS)]
            pairs.append({"modality": "video", "caption": f"a {colour} {shape} moving {direction}"})
    for pitch in PITCHES:
        for sound in SOUNDS:
            pairs.append({"modality": "audio", "caption": f"a {pitch} {sound}"})
    return [{"id": f"cap-{i}", **p} for i, p in enumerate(pairs)]


def train_tiny_checkpoint(root: Path, decode_steps: int = 40, encode_steps: int = 40) -> Path:
    """Train decode-align then encode-align on the tiny assembly under ``root``; the final checkpoint.

    With the defaults, all 44 probe prompts (24 "Generate ..." prompts, 20 media prompts) route right;
    fewer decode steps confuse image and sound, fewer encode steps let a video prompt draw a picture.
    """
    from mmllm.config import load_stage
    from mmllm.training.loop import train

    root = Path(root)
    samples = write_sample_dataset(root / "samples")
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps(p) + "\n" for p in balanced_captions()))
    previous: Path | None = None
    for name, data, steps in (("decode_align", captions, decode_steps), ("encode_align", samples["pairs"], encode_steps)):
        overrides = [f"output_dir={root / name}", "report_to=none", f"max_steps={steps}", f"save_every={steps}",
                     f"data=[{{path: {data}, format: mmllm-pairs}}]",
                     f"init_from={previous}" if previous else "init_from=null"]
        result = train(load_stage(STAGE_CONFIGS / f"{name}.yaml", overrides))
        log.info("tiny checkpoint: %s loss %.3f -> %.3f", name, result.losses[0], result.losses[-1])
        previous = result.final_checkpoint
    assert previous is not None
    return previous
