"""A stage of the embedded default on one process, under DDP, FSDP and ZeRO-2, side by side in one run.

The instruct stage (the default) starts from the shipped glue with LoRA dropout 0 (so that one process
with batch 2b and W processes with batch b read the same samples and draw no different masks);
encode-align (``--stage encode_align``) from a fresh assembly, which loads no decoder weights and no
MiniLM (the smallest set of files to run it on another machine). Each run trains the same steps with
the stage's own AdamW. Printed per run: wall time, the parameter and optimizer-state MB
one process holds, its peak memory (resident on CPU, allocated on a GPU), the losses at a few steps,
and the largest relative loss difference from the one-process fp32 run.

    python scripts/bench/distributed_default.py                          # all runs, 8 steps (~7 min on 2 cores)
    python scripts/bench/distributed_default.py --runs one-fp32 fsdp-fp32 --steps 4
    python scripts/bench/distributed_default.py --stage encode_align --runs one-fp32 fsdp-fp32 fsdp-bf16

On GPUs each launched run takes one process per GPU, at most its count here (one GPU: FSDP and ZeRO
runs of one process). On a machine without GPUs, FSDP and DeepSpeed run through tests/accelerate_on_cpu.py (Accelerate allows
them only on accelerator devices; torch's FSDP2 and DeepSpeed's CPU accelerator run on gloo). Needs
`mmllm world data` first (the script runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES = ("instruct", "encode_align")
GLUE = REPO / "mmllm/toyworld/weights/default-glue"

# name -> (processes, launcher config or None, mixed precision)
RUNS = {
    "one-fp32": (1, None, "no"),
    "fsdp-fp32": (2, "fsdp", "no"),
    "one-bf16": (1, None, "bf16"),
    "ddp-bf16": (2, "ddp", "bf16"),
    "fsdp-bf16": (2, "fsdp", "bf16"),
    "zero2-fp32": (2, "deepspeed_zero2", "no"),
    "zero2-bf16": (2, "deepspeed_zero2", "bf16"),
}


def command(name: str, args: argparse.Namespace, out: Path, lora: Path) -> tuple[list[str], dict[str, str]]:
    procs, launcher, precision = RUNS[name]
    gpus = _gpu_count()
    if gpus and launcher is not None:  # one process per GPU (NCCL refuses two on one): FSDP on 1 GPU is 1 process
        procs = min(procs, gpus)
    threads = max(1, (os.cpu_count() or 1) // procs) if not gpus else 4
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
               TQDM_DISABLE="1")
    stage = ["train", "--config", str(REPO / f"configs/stages/default/{args.stage}.yaml"), f"output_dir={out / name}",
             "report_to=none", f"max_steps={args.steps}", f"batch_size={args.batch // procs}", "save_every=0",
             f"mixed_precision='{precision}'"]
    if args.stage == "instruct":
        stage += [f"init_from={GLUE}", f"lora={lora}"]
    if launcher is None:
        return [sys.executable, "-m", "mmllm.cli", *stage], env
    module = "tests.accelerate_on_cpu" if launcher != "ddp" and not gpus else "mmllm.cli"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / f"configs/accelerate/{launcher}.yaml"), f"--num_processes={procs}",
              f"--mixed_precision={precision}", "-m", module]
    return [*launch, *stage], env


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--stage", choices=STAGES, default="instruct")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="global batch (per process: batch / processes)")
    ap.add_argument("--out", type=Path, default=None, help="default: runs/bench/distributed_default/STAGE")
    args = ap.parse_args()

    args.out = args.out or REPO / "runs/bench/distributed_default" / args.stage
    args.out.mkdir(parents=True, exist_ok=True)
    if not (REPO / "runs/default/data/t2x.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "mmllm.cli", "world", "data", "--out", "runs/default/data",
                        "--plain", "data/default/plain_chat.jsonl"], cwd=REPO, check=True)
    lora = args.out / "lora-no-dropout.yaml"
    lora.write_text((REPO / "configs/lora/default.yaml").read_text().replace("dropout: 0.05", "dropout: 0.0"))

    rows = {}
    for name in args.runs:
        shutil.rmtree(args.out / name, ignore_errors=True)  # a rerun measures afresh (train refuses an old run's folder)
        cmd, env = command(name, args, args.out, lora)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        ckpt = args.out / name / f"step-{args.steps}"
        held = re.search(r"holds ([\d.]+) of the model's ([\d.]+) MB", proc.stderr)
        peak = re.search(r"peak memory of this process: ([^;]+)", proc.stderr)
        optim = re.search(r"holds ([\d.]+) MB of optimizer state", proc.stderr)
        rows[name] = {
            "seconds": seconds,
            "held": f"{float(held.group(1)):.0f} / {float(held.group(2)):.0f}" if held else "?",
            "peak": peak.group(1).strip() if peak else "?",
            "optim": f"{float(optim.group(1)):.0f}" if optim else "?",
            "losses": json.loads((ckpt / "training_state/progress.json").read_text())["losses"],
        }
    ref = rows.get("one-fp32", {}).get("losses")
    shown = sorted({0, len(next(iter(rows.values()))["losses"]) // 2 - 1, args.steps - 1})
    gpus = _gpu_count()
    print(f"\nembedded default, {args.stage} stage, {args.steps} steps, global batch {args.batch}, "
          f"{f'{gpus} GPU(s)' if gpus else 'CPU'}")
    print(f"{'run':<10} {'wall s':>7} {'param MB held / model':>22} {'optim MB':>9} {'peak memory':>28}   "
          f"losses at steps {', '.join(str(i + 1) for i in shown):<14} max rel diff vs one-fp32")
    for name, r in rows.items():
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref)) if ref else float("nan")
        losses = " / ".join(f"{r['losses'][i]:.4f}" for i in shown)
        print(f"{name:<10} {r['seconds']:>7.1f} {r['held']:>22} {r['optim']:>9} {r['peak']:>28}   {losses:<30} "
              f"{diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
