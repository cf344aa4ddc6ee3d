"""``mmllm`` command line: train, infer, inspect, export, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("mmllm")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args: argparse.Namespace) -> int:
    from mmllm.config import load_stage
    from mmllm.training.loop import train

    cfg = load_stage(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    losses = result.losses
    log.info("done: %d steps, loss %.4f -> %.4f, %d samples skipped; checkpoint %s",
             result.steps, losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"),
             result.skipped, result.final_checkpoint)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from mmllm.config import STAGE_DEFAULT_TRAINABLE, load_assembly, load_lora, read_yaml
    from mmllm.model import AnyToAnyModel
    from mmllm.training.freeze import apply_trainable

    data = read_yaml(args.config)
    if "stage" in data:  # a stage config: inspect its assembly
        from mmllm.config import load_stage

        stage = load_stage(args.config, args.overrides)
        assembly, lora = load_assembly(stage.assembly), stage.lora
    else:
        stage, assembly, lora = None, load_assembly(args.config, args.overrides), args.lora
    model = AnyToAnyModel.assemble(assembly)
    print(f"assembly: {assembly.name}")
    print(f"  llm: {assembly.llm.kind} {assembly.llm.options}  hidden={model.llm.hidden_size}")
    for m, spec in assembly.encoders.items():
        enc = model.encoders[m]
        print(f"  encoders.{m}: {spec.kind} -> ({enc.num_tokens}, {enc.output_dim})")
    for m, spec in assembly.decoders.items():
        print(f"  decoders.{m}: {spec.kind} conditioning {model.decoders[m].conditioning_shape}, "
              f"{assembly.signal_tokens[m]} signal tokens")
    print("dimension checks passed:")
    for line in model.checks:
        print(f"  ok  {line}")
    if lora:
        model.add_lora(load_lora(lora))
    stages = {stage.stage: stage.resolved_trainable()} if stage else STAGE_DEFAULT_TRAINABLE
    table = {}
    for name, flags in stages.items():
        flags = dict(flags)
        if flags.get("lora") and model.lora_config is None:
            flags["lora"] = False
            note = " (no LoRA config given: pass --lora configs/lora/X.yaml to count it)"
        else:
            note = ""
        rows = apply_trainable(model, flags)
        table[name] = {r.name: {"trainable": r.trainable, "frozen": r.frozen} for r in rows}
        print(f"stage {name}{note}:")
        for r in rows:
            print(f"  {r.name:<30} trainable {r.trainable:>12,}  frozen {r.frozen:>12,}")
        print(f"  {'total':<30} trainable {sum(r.trainable for r in rows):>12,}  "
              f"frozen {sum(r.frozen for r in rows):>12,}")
    if args.json:
        Path(args.json).write_text(json.dumps({"checks": model.checks, "stages": table}, indent=2))
    return 0


def _load_model(checkpoint: str, device: str, dtype: str):
    import torch

    from mmllm.model import AnyToAnyModel

    model = AnyToAnyModel.from_pretrained(checkpoint)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise SystemExit(f"--dtype must be one of {list(dtypes)}")
    return model.to(device=device, dtype=dtypes[dtype]).eval()


def cmd_infer(args: argparse.Namespace) -> int:
    import tempfile

    from mmllm.inference.runner import run_requests

    if not Path(args.checkpoint).is_dir():
        raise SystemExit(f"--checkpoint {args.checkpoint}: not a directory")
    if bool(args.input) == bool(args.prompt):
        raise SystemExit("give either --input requests.jsonl or --prompt TEXT")
    model = _load_model(args.checkpoint, args.device, args.dtype)
    if args.input:
        requests = Path(args.input)
        if not requests.is_file():
            raise SystemExit(f"--input {requests}: file not found")
    else:
        rec = {"id": "prompt", "prompt": args.prompt}
        for m in ("image", "audio", "video"):
            if getattr(args, m):
                rec[m] = str(Path(getattr(args, m)).resolve())
        requests = Path(tempfile.mkdtemp()) / "request.jsonl"
        requests.write_text(json.dumps(rec) + "\n")
    counts = run_requests(model, requests, Path(args.output), batch_size=args.batch_size, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, steps=args.steps, guidance=args.guidance,
                          fail_fast=args.fail_fast, checkpoint=Path(args.checkpoint))
    log.info("requests: %(done)d done, %(failed)d failed, %(skipped)d already done", counts)
    if args.prompt:
        for line in (Path(args.output) / "results.jsonl").read_text().splitlines()[-1:]:
            print(line)
    return 1 if counts["failed"] else 0


def cmd_export(args: argparse.Namespace) -> int:
    from mmllm.training.checkpoint import export_merged

    if not args.merge_lora:
        raise SystemExit("export currently writes merged copies only: pass --merge-lora")
    path = export_merged(Path(args.checkpoint), Path(args.output))
    log.info("wrote merged model to %s", path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mmllm.demo import run_demo

    return run_demo(Path(args.output), quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmllm", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one stage from a stage YAML")
    t.add_argument("--config", required=True)
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    t.set_defaults(fn=cmd_train)

    i = sub.add_parser("inspect", help="assemble and print parts, dimension checks, per-stage parameter counts")
    i.add_argument("--config", required=True, help="an assembly or stage YAML")
    i.add_argument("--lora", help="a LoRA YAML, to count the instruct stage's adapter")
    i.add_argument("--json", help="also write the counts here")
    i.add_argument("overrides", nargs="*")
    i.set_defaults(fn=cmd_inspect)

    r = sub.add_parser("infer", help="batch inference from a checkpoint")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--input", help="requests JSONL")
    r.add_argument("--output", required=True)
    r.add_argument("--prompt")
    r.add_argument("--image")
    r.add_argument("--audio")
    r.add_argument("--video")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="float32")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--steps", type=int, default=None, help="decoder denoising steps")
    r.add_argument("--guidance", type=float, default=None, help="decoder classifier-free guidance scale")
    r.add_argument("--fail-fast", action="store_true")
    r.set_defaults(fn=cmd_infer)

    e = sub.add_parser("export", help="write a copy with the LoRA adapter merged into the LLM")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--output", required=True)
    e.add_argument("--merge-lora", action="store_true")
    e.set_defaults(fn=cmd_export)

    d = sub.add_parser("demo", help="run the built-in demo end to end, offline")
    d.add_argument("--output", default="outputs")
    d.add_argument("--quick", action="store_true", help="fewer steps (for tests)")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from mmllm.config import ConfigError

    try:
        return args.fn(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
