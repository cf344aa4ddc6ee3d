"""``mmllm world report``: how well the toy world's parts work, per modality, on seen and held-out combinations.

For each modality whose parts are present under ``parts_dir``:

* ``judge``: the judge's attribute accuracy on true media;
* ``encoder_retrieval``: the encoder's zero-shot caption retrieval (see :func:`retrieval_accuracy`);
* ``decoder_oracle``: the decoder's judged attribute accuracy when given the true caption's own
  conditioning.

Writes ``report.json``, a PNG contact sheet (true and generated images / video frames next to their
prompts) and a few generated WAVs, and returns the report. Targets (from the design): judges >= 98 %
on true media, encoders top-1 >= 90 % on seen combinations, decoders >= 85 % seen / >= 70 % held-out
(the ``mean`` over attributes).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from mmllm.atomic import atomic_write_text
from mmllm.data.media import Video, save_audio
from mmllm.folder_lock import hold_folder
from mmllm.toyworld import parts as P
from mmllm.toyworld.evaluate import decoder_accuracy, judge_accuracy, retrieval_accuracy
from mmllm.toyworld.judges import Judge
from mmllm.toyworld.text import MiniLMText
from mmllm.toyworld.world import MODALITIES, Item, World, balanced_items, evaluation_items, spread_evenly

log = logging.getLogger(__name__)

SPLITS = {"seen": "train", "held_out": "held_out"}
TARGETS = {
    "judge": {"seen": 0.98, "held_out": 0.98},
    "encoder_retrieval": {"seen": 0.90},
    "decoder_oracle": {"seen": 0.85, "held_out": 0.70},
}
EVAL_SEED = 4321
SCALE = 3  # contact-sheet magnification of 32x32 media


@dataclass
class ReportOptions:
    parts_dir: Path
    output: Path
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    per_combo: int = 2  # true items per combination for the judge and retrieval
    decoder_items: int = 48  # generated items per split and modality (spread over combinations)
    steps: int | None = None  # decoder denoising steps (None: the decoder's own)
    guidance: float | None = None
    sheet_rows: int = 8  # prompts per split and modality on the contact sheet
    seed: int = 0


def _spread(items: list[Item], n: int) -> list[Item]:
    return items if len(items) <= n else [items[i] for i in spread_evenly(len(items), n)]


def _score(metrics: dict[str, float] | None, key: str) -> float | None:
    return None if not metrics else metrics.get(key)


def run_report(options: ReportOptions) -> dict[str, Any]:
    """Measure the parts into ``options.output`` (report.json, contact_sheet.png, audio/), holding its lock
    (:mod:`mmllm.folder_lock`): a second report into the same folder is refused before anything loads."""
    with hold_folder(options.output, "mmllm world report", "give this run another --output"):
        return _run_report(options)


def _run_report(options: ReportOptions) -> dict[str, Any]:
    world = World()
    parts_dir = Path(options.parts_dir)
    text: MiniLMText | None = None
    report: dict[str, Any] = {"parts_dir": str(parts_dir), "settings": _settings(options), "complete": False,
                              "modalities": {}}
    sheet_rows: list[tuple[str, str, Any, Any]] = []
    for modality in options.modalities:
        result: dict[str, Any] = {}
        true_items = {
            name: evaluation_items(world, modality, split, options.per_combo, EVAL_SEED)
            for name, split in SPLITS.items()
        }
        judge = Judge.load(parts_dir / f"judge-{modality}") if (parts_dir / f"judge-{modality}").is_dir() else None
        if judge is not None:
            result["judge"] = {name: judge_accuracy(judge, items) for name, items in true_items.items()}
        if (parts_dir / f"encoder-{modality}").is_dir():
            text = text or MiniLMText()
            entry = P.encoder_entries(parts_dir)[modality]
            encoder = P.build_part("encoder", entry, f"encoders.{modality}")
            result["encoder_retrieval"] = {
                name: retrieval_accuracy(encoder, text, world, modality, items) for name, items in true_items.items()
            }
        if (parts_dir / f"decoder-{modality}").is_dir() and judge is not None:
            entry = P.decoder_entries(parts_dir)[modality]
            decoder = P.build_part("decoder", entry, f"decoders.{modality}")
            result["decoder_oracle"] = {}
            for name, split in SPLITS.items():
                items = balanced_items(world, modality, split, options.decoder_items, EVAL_SEED + 1)
                accuracy, generated = decoder_accuracy(
                    decoder, judge, items, options.steps, options.guidance, seed=options.seed
                )
                result["decoder_oracle"][name] = accuracy
                _keep_examples(options, modality, name, items, generated, sheet_rows)
        elif (parts_dir / f"decoder-{modality}").is_dir():
            log.warning("decoder-%s present but judge-%s is not: the decoder cannot be scored", modality, modality)
        result["checks"] = _checks(result)
        report["modalities"][modality] = result
        _save(report, options)  # a later modality that fails keeps this one's scores
    if sheet_rows:
        sheet = contact_sheet(sheet_rows)
        sheet.save(options.output / "contact_sheet.png")
        report["contact_sheet"] = str(options.output / "contact_sheet.png")
    report["complete"] = True
    _save(report, options)
    return report


def _save(report: dict[str, Any], options: ReportOptions) -> None:
    atomic_write_text(options.output / "report.json", json.dumps(report, indent=2) + "\n")


def _settings(options: ReportOptions) -> dict[str, Any]:
    out = asdict(options)
    out["parts_dir"], out["output"] = str(options.parts_dir), str(options.output)
    return out


def _checks(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each measured score against its target: ``{"judge.seen": {"value": .., "target": .., "ok": ..}}``."""
    checks = {}
    for metric, targets in TARGETS.items():
        for split, target in targets.items():
            key = "top1" if metric == "encoder_retrieval" else "mean"
            value = _score(result.get(metric, {}).get(split), key)
            if value is not None:
                checks[f"{metric}.{split}"] = {"value": round(value, 4), "target": target, "ok": value >= target}
    return checks


def _keep_examples(
    options: ReportOptions,
    modality: str,
    split: str,
    items: list[Item],
    generated: list[Any],
    rows: list[tuple[str, str, Any, Any]],
) -> None:
    picks = _spread(list(range(len(items))), options.sheet_rows)
    if modality == "audio":
        folder = options.output / "audio"
        for k in picks:
            name = f"{split}_{k:03d}_" + "_".join(items[k].combo)
            save_audio(generated[k], folder / f"{name}.wav", {"caption": items[k].caption})
        return
    rows.extend((f"[{modality}, {split}] {items[k].caption}", modality, items[k].media, generated[k]) for k in picks)


def _strip(media: Any) -> Image.Image:
    frames = media.frames if isinstance(media, Video) else [media]
    strip = Image.new("RGB", (32 * len(frames), 32), (255, 255, 255))
    for i, frame in enumerate(frames):
        strip.paste(frame.convert("RGB").resize((32, 32)), (32 * i, 0))
    return strip.resize((strip.width * SCALE, strip.height * SCALE), Image.Resampling.NEAREST)


def contact_sheet(rows: list[tuple[str, str, Any, Any]]) -> Image.Image:
    """One row per prompt: the prompt, then ``true | generated`` (a video shows its frames in a row)."""
    text_w, pad = 430, 6
    tiles = [(caption, _strip(true), _strip(gen)) for caption, _, true, gen in rows]
    width = text_w + max(t.width + g.width for _, t, g in tiles) + 3 * pad
    height = sum(max(t.height, g.height) + pad for _, t, g in tiles) + pad + 16
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 2), "prompt", fill=(0, 0, 0))
    draw.text((text_w, 2), "true (left) | generated from the caption's conditioning (right)", fill=(0, 0, 0))
    y = 16 + pad
    for caption, true, gen in tiles:
        draw.text((pad, y + true.height // 2 - 6), caption[:70], fill=(0, 0, 0))
        sheet.paste(true, (text_w, y))
        sheet.paste(gen, (text_w + true.width + pad, y))
        y += max(true.height, gen.height) + pad
    return sheet


def format_report(report: dict[str, Any]) -> str:
    lines = [f"toy world report ({report['parts_dir']})"]
    for modality, result in report["modalities"].items():
        for metric in ("judge", "encoder_retrieval", "decoder_oracle"):
            if metric not in result:
                lines.append(f"  {modality:<6} {metric:<18} (part missing)")
                continue
            key = "top1" if metric == "encoder_retrieval" else "mean"
            cells = []
            for split, scores in result[metric].items():
                target = TARGETS[metric].get(split)
                mark = "" if target is None else (" ok" if scores[key] >= target else f" <{target:.0%}")
                cells.append(f"{split} {scores[key]:6.1%} of {scores['n']}{mark}")
            lines.append(f"  {modality:<6} {metric:<18} {key:<5} " + "   ".join(cells))
    if "contact_sheet" in report:
        lines.append(f"  contact sheet: {report['contact_sheet']}")
    return "\n".join(lines)
