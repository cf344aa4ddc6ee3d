"""``mmllm demo``: the whole data path end to end, offline, on this machine.

The default demo loads the embedded default -- the real SmolLM2-135M-Instruct core, the toy world's
pretrained encoders and diffusion decoders, and the glue trained by ``scripts/train_default.sh``
(``mmllm/toyworld/weights/default-glue``) -- renders a few input media from the toy world, and
answers a batch of requests covering every direction (text -> image / sound / clip, image / sound /
clip -> text, image -> clip, text -> image + sound, a multi-turn dialogue, plain chat). It writes the
media, ``results.jsonl`` and ``index.html`` under the output folder.

``--tiny`` runs the wiring demo instead: it trains the three stages of the tiny random assembly on
the shipped sample data (``data/samples``) in seconds and answers ``data/samples/requests.jsonl``;
its outputs show the plumbing, not quality.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from mmllm.config import load_stage
from mmllm.data.media import save_media
from mmllm.folder_lock import hold_folder
from mmllm.inference.runner import check_overwrite, run_requests
from mmllm.locations import SOURCE_TREE, repository_root
from mmllm.model import AnyToAnyModel
from mmllm.training.loop import train

log = logging.getLogger(__name__)

STAGES = ("encode_align", "decode_align", "instruct")
DEMO_SEED = 2026

# The inputs: one item of a seen combination per modality, rendered from the world.
INPUTS = {
    "image": ("inputs/blue-square.png", {"colour": "blue", "shape": "square", "size": "large", "position": "top-left"}),
    "audio": ("inputs/high-buzzy.wav", {"pitch": "high", "timbre": "buzzy", "rhythm": "double"}),
    "video": ("inputs/orange-triangle.gif", {"colour": "orange", "shape": "triangle", "direction": "up"}),
}
REQUESTS = [
    {"id": "text-to-image", "prompt": "Draw a small purple triangle in the bottom right corner."},
    {"id": "text-to-audio", "prompt": "Make a sound: a low bright tone beeping four times"},
    {"id": "text-to-video", "prompt": "Show a clip of a green square moving up."},
    {"id": "image-to-text", "prompt": "<image>\nDescribe this image.", "media": [INPUTS["image"][0]]},
    {"id": "audio-to-text", "prompt": "<audio>\nWhat do you hear?", "media": [INPUTS["audio"][0]]},
    {"id": "video-to-text", "prompt": "<video>\nWhat happens in this clip?", "media": [INPUTS["video"][0]]},
    {"id": "image-to-video", "prompt": "<image>\nMake a video of the shape in this picture moving down.",
     "media": [INPUTS["image"][0]]},
    {"id": "text-to-image-and-audio",
     "prompt": "Draw a large red circle in the middle. Also, make a sound: a medium pure tone held steadily"},
    {"id": "dialogue", "messages": [
        {"role": "user", "content": "Draw a small yellow cross in the top right corner."},
        # an earlier answer that drew the picture: its outputs render its signal tokens, as the world's training
        # dialogues have them (its text alone is a context the model never saw)
        {"role": "assistant", "content": "Here is a picture of a small yellow cross in the top right corner.",
         "outputs": [{"modality": "image"}]},
        {"role": "user", "content": "Now make a sound: a high pure tone held steadily"}]},
    {"id": "plain-chat", "prompt": "What is the capital of Spain?"},
]


def shipped_default() -> Path:
    from mmllm.toyworld.parts import shipped_dir

    return shipped_dir() / "default-glue"


def write_default_requests(out: Path) -> Path:
    """Render the demo's input media from the toy world and write its requests file under ``out``."""
    from mmllm.toyworld.world import World

    world = World()
    for modality, (rel, attributes) in INPUTS.items():
        media = world.render(modality, attributes, DEMO_SEED)
        save_media(modality, media, out / rel)
    path = out / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    return path


def run_demo(out: Path, quick: bool = False, tiny: bool = False) -> int:
    out = out.resolve()
    if tiny or not shipped_default().is_dir():
        tiny_demo_inputs()  # a wheel install lacks the tiny demo's configs: said before --output is made
    with hold_folder(out, "mmllm demo", "give this run another --output"):  # see mmllm.folder_lock
        return _run_demo(out, quick, tiny)


def _run_demo(out: Path, quick: bool, tiny: bool) -> int:
    if tiny:
        return run_tiny_demo(out, quick)
    checkpoint = shipped_default()
    if not checkpoint.is_dir():
        log.warning("the embedded default's trained glue is not installed (%s; scripts/train_default.sh makes "
                    "it): running the tiny wiring demo instead", checkpoint)
        return run_tiny_demo(out, quick)
    log.info("demo: loading the embedded default (SmolLM2-135M-Instruct + the toy world's parts) from %s",
             checkpoint)
    model = AnyToAnyModel.from_pretrained(checkpoint)
    requests = write_default_requests(out)
    # overwrite: a re-run shows the current checkpoint's answers (a resume would refuse another checkpoint's)
    counts = run_requests(model, requests, out, batch_size=len(REQUESTS), checkpoint=checkpoint,
                          seed=DEMO_SEED, max_new_tokens=64, overwrite=True)
    return _finish(out, counts)


def tiny_demo_inputs() -> tuple[Path, Path]:
    """The tiny demo's stage configs folder and requests file, from the repository mmllm runs from."""
    repo = repository_root()
    if repo is None:
        raise SystemExit(f"`mmllm demo --tiny` trains from the repository's configs/stages/tiny and data/samples, "
                         f"which a wheel does not install (this mmllm is installed in {SOURCE_TREE}): run it from "
                         "a clone of the repository (`pip install -e .` there), or run `mmllm demo`, whose "
                         "embedded default ships inside the package")
    configs, requests = repo / "configs" / "stages" / "tiny", repo / "data" / "samples" / "requests.jsonl"
    if not configs.is_dir() or not requests.is_file():
        raise SystemExit(f"the tiny demo needs {configs} and {requests}: restore them from the repository "
                         "(`git checkout -- configs data`)")
    return configs, requests


def run_tiny_demo(out: Path, quick: bool = False) -> int:
    configs, requests = tiny_demo_inputs()
    check_overwrite(out, requests)  # before training: the answers start `out` afresh
    previous = None
    for name in STAGES:
        run = out / "runs" / name
        if run.is_dir():  # the demo trains afresh each time; train() refuses to mix with an earlier run
            shutil.rmtree(run)
        overrides = [f"output_dir={run}", "report_to=none"]
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
    counts = run_requests(model, requests, out, batch_size=4, checkpoint=previous, overwrite=True)  # just trained
    return _finish(out, counts)


def _finish(out: Path, counts: dict) -> int:
    log.info("demo: %(done)d requests answered, %(failed)d failed", counts)
    for line in (out / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        media = ", ".join(Path(f).name for f in rec.get("files", []))
        log.info("  %-24s %s%s", rec["id"], (rec.get("text") or rec.get("error") or "")[:90],
                 f"  [{media}]" if media else "")
    return 0 if counts["failed"] == 0 else 1
