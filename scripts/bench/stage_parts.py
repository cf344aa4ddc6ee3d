"""What each stage of the embedded default holds in memory, by what it loads of its parts, side by side.

For each stage config, one fresh process per row assembles the stage's model and reports the seconds
it took, the parameters it holds (the decoders' and the whole model's, shared ones once) and the
process's resident memory after it (and its peak, which is the LLM's loading):

* ``all, unshared`` -- every decoder part, a text-encoder copy per decoder (what every stage loaded
  before stages loaded only what they run);
* ``all`` -- every part, decoders naming the same text encoder sharing one copy (inference, or a
  stage with a denoising loss);
* the stage's own (``mmllm.training.loop.build_model``): decoders ``config`` for encode-align (no
  decoder weights), ``conditioning`` for decode-align and instruct (the text encoder, for the MSE
  targets); an encoder loads no weights where no sample gives it input (decode-align on caption pairs);
* for instruct also with a denoising loss: ``all`` beside the MSE (the text encoder for the targets, the
  UNet and VAE for the denoising loss) and ``denoise`` without it (no text encoder, no vocoder).

    python scripts/bench/stage_parts.py                 # the three default stages (~2 min on 2 cores)
    python scripts/bench/stage_parts.py --stages configs/stages/tiny/encode_align.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import _child  # noqa: E402  (beside this script)

STAGES = [REPO / f"configs/stages/default/{s}.yaml" for s in ("encode_align", "decode_align", "instruct")]


def child(stage: Path, parts: str, share: bool, overrides: list[str]) -> dict[str, float]:
    """Assemble the stage's model in this (fresh) process and measure it: ``parts`` "all" assembles every
    part; "stage" builds what training builds (with the stage config ``overrides``)."""
    import mmllm.model
    from mmllm.config import load_assembly, load_stage
    from mmllm.memory import peak_resident_mb
    from mmllm.model import AnyToAnyModel
    from mmllm.training.freeze import count_parameters
    from mmllm.training.loop import build_model

    cfg = load_stage(stage, ["init_from=null", *overrides])
    if not share:
        mmllm.model.shared_text_encoders = contextlib.nullcontext
    start = time.perf_counter()
    if parts == "stage":
        model = build_model(cfg)
    else:
        model = AnyToAnyModel.assemble(load_assembly(cfg.assembly, cfg.assembly_overrides), parts)
    seconds = time.perf_counter() - start
    rows = count_parameters(model)  # shared parameters counted once

    def millions(prefix: str = "") -> float:
        return sum(r.trainable + r.frozen for r in rows if r.name.startswith(prefix)) / 1e6

    return {
        "parts": next(iter(model.decoders.values())).parts,
        "seconds": seconds,
        "encoder_params": millions("encoders."),
        "decoder_params": millions("decoders."),
        "model_params": millions(),
        "rss_mb": _resident_mb(),
        "peak_mb": peak_resident_mb(),
    }


def _resident_mb() -> float:
    """This process's resident memory now (after the assembly; its peak is the LLM's loading)."""
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(stage: Path, parts: str, share: bool, overrides: tuple[str, ...] = ()) -> dict[str, float]:
    return _child.run_child(__file__, str(stage), parts, "share" if share else "copies", json.dumps(overrides))


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        print(json.dumps(child(Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "share", json.loads(sys.argv[5]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", nargs="+", type=Path, default=STAGES)
    args = ap.parse_args()

    run_child(args.stages[0], "config", True)  # warm-up: converts the GGUF once, fills the page cache
    print(f"{'stage':<14} {'decoders load':<28} {'build s':>8} {'encoder M params':>17} {'decoder M params':>17} "
          f"{'model M params':>15} {'resident MB':>12} {'peak RSS MB':>12}")
    for stage in args.stages:
        rows = [("all, unshared", run_child(stage, "all", False)), ("all", run_child(stage, "all", True))]
        own = run_child(stage, "stage", True)
        rows.append((f"{own['parts']} (the stage's)", own))
        if stage.stem == "instruct":
            for label, overrides in (("+ denoise", ("losses.denoise=0.5",)),
                                     ("denoise, mse 0", ("losses.denoise=0.5", "losses.mse=0"))):
                r = run_child(stage, "stage", True, overrides)
                rows.append((f"{r['parts']} ({label})", r))
        base = rows[0][1]
        for label, r in rows:
            print(f"{stage.stem:<14} {label:<28} {r['seconds']:>8.1f} {r['encoder_params']:>17.1f} "
                  f"{r['decoder_params']:>17.1f} "
                  f"{r['model_params']:>15.1f} {r['rss_mb']:>12.0f} {r['peak_mb']:>12.0f}"
                  + (f"   resident x{r['rss_mb'] / base['rss_mb']:.2f}" if r is not base else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
