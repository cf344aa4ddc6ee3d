"""Whether the settings that need less memory on a GPU need less of the machine's memory when training runs on
CPU: ``mixed_precision=bf16`` (autocast) and a bfloat16 core (``llm.dtype: bfloat16``), each alone and together.

One fresh process per row trains the tiny instruct stage (LoRA through the core) for a few steps on CPU, with its
core swapped for a mid-sized random Llama (``hf-causal-lm``, saved locally, no hub) so that the core's weights
and activations are larger than what importing torch holds; it reports the process's peak resident memory
(:func:`mmllm.memory.peak_resident_mb`), the seconds per step after the first and the losses.

    python scripts/bench/cpu_precision_memory.py                  # ~3 min on 2 cores
    python scripts/bench/cpu_precision_memory.py --steps 4 --layers 4 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import _child  # noqa: E402  (beside this script)

STAGE = REPO / "configs/stages/tiny/instruct.yaml"
ROWS = {"float32 core, no autocast": ("float32", "no"), "float32 core, bf16 autocast": ("float32", "bf16"),
        "bfloat16 core, no autocast": ("bfloat16", "no"), "bfloat16 core, bf16 autocast": ("bfloat16", "bf16")}


def save_core(folder: Path, hidden: int, layers: int) -> Path:
    """A random Llama core of ``layers`` layers of width ``hidden`` and the tiny tokenizer, as a local model dir."""
    import torch
    import transformers

    from mmllm.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(512, 256)
    config = transformers.LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=math.gcd(4, hidden // 64),
        intermediate_size=hidden * 11 // 4, max_position_embeddings=512, vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_assembly(core: Path, dtype: str, path: Path) -> Path:
    """The tiny assembly with ``core`` as its LLM, held in ``dtype``."""
    from mmllm.config import load_assembly, to_dict
    from mmllm.resolved_config import dump_yaml

    data = to_dict(load_assembly(REPO / "configs/assemblies/tiny.yaml"))
    data["llm"] = {"kind": "hf-causal-lm", "name_or_path": str(core), "dtype": dtype}
    path.write_text(dump_yaml(data))
    return path


def child(args: list[str]) -> dict[str, object]:
    """Train the stage in this (fresh) process; its peak resident memory and step times."""
    import torch

    import mmllm.training.loop as loop
    from mmllm.config import load_stage
    from mmllm.memory import peak_resident_mb

    step_s = _child.median_step_seconds(loop)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    result = loop.train(load_stage(STAGE, args))
    return {"losses": result.losses, "peak_mb": peak_resident_mb(),
            "step_s": step_s()}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024, help="the core's width, a multiple of 64")
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        core = save_core(Path(tmp) / "core", args.hidden, args.layers)
        table = []
        for row, (label, (dtype, precision)) in enumerate(ROWS.items()):
            assembly = write_assembly(core, dtype, Path(tmp) / f"assembly-{dtype}.yaml")
            overrides = [f"assembly={assembly}", f"mixed_precision={precision}", "init_from=null",
                         f"max_steps={args.steps}", f"batch_size={args.batch_size}", "save_every=0",
                         "report_to=none", f"output_dir={Path(tmp) / f'out-{row}'}",
                         f"data=[{{path: {REPO / 'data/samples/chat.jsonl'}, format: mmllm-chat}}]"]
            table.append((label, _child.run_child(__file__, json.dumps(overrides))))
            print(label, table[-1][1], flush=True)
        print(f"\n{'run':<30} {'peak RSS MB':>12} {'s/step':>7}  losses")
        for label, r in table:
            print(f"{label:<30} {r['peak_mb']:>12.0f} {r['step_s']:>7.2f}  " + " / ".join(f"{x:.4f}" for x in r["losses"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
