"""What ``group_by_length``'s lengths cost each process, per chunk of 50 micro-batches, before and after sharing.

Every process needs the token length of every draw of a chunk (``50 x batch x processes`` draws: the global
micro-batches are sorted). Before: each process tokenized all of them itself (``old``). Now each tokenizes a
``1/processes`` share and the processes exchange them (``new``: :meth:`LengthGroupedSampler.share_lengths`).
Both keep each length once known, so a sample is tokenized once per run; the figures are of a chunk of new
samples (the first epoch, and every chunk of a run shorter than one epoch).

The processes are simulated in this one process: ``old`` times what process 0 did (``chunk()`` from nothing);
``new`` times process 0's share of the tokenizing plus its ``chunk()``, the other processes' shares computed
beforehand, untimed, and handed over as the exchange would (the all-gather itself, a few KB per process every
50 steps, is not timed). Data: ``--samples`` synthetic text conversations (1-3 exchanges of 5-120 words) in an
mmllm-chat file, read through the data index as training reads them (each length parses its record again from
the file). Tokenizers: the tiny assembly's, and the default's SmolLM2 (its config alone, no weights; skipped
when it cannot be loaded offline).

    python scripts/bench/length_cost.py                          # 8 processes x batch 32
    python scripts/bench/length_cost.py --world 4 --batch 16
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

WORDS = ("a red circle moves left while the small blue square waits in the corner of the frame and a soft tone "
         "rises slowly then the picture turns green and the sound stops").split()
ASSEMBLIES = {"tiny": REPO / "configs/assemblies/tiny.yaml", "default (SmolLM2)": REPO / "configs/assemblies/default.yaml"}


def write_conversations(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120)))

    with path.open("w") as f:
        for n in range(count):
            messages = []
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
            f.write(json.dumps({"id": f"c{n}", "messages": messages}) + "\n")


def stage_dataset(assembly: Path, data: Path):
    from mmllm.config import DatasetConfig, load_assembly
    from mmllm.data.dataset import StageDataset, load_stage_records
    from mmllm.model import AnyToAnyModel
    from mmllm.training.loop import token_spec

    model = AnyToAnyModel.assemble(load_assembly(assembly), "config", [], llm_weights=False)
    per_dataset, _, _ = load_stage_records([DatasetConfig(path=str(data), format="mmllm-chat")], "instruct")
    return StageDataset(per_dataset[0], model.llm.tokenizer, token_spec(model), {})


def measure(dataset, world: int, batch: int) -> dict[str, float]:
    """Seconds and encodes on process 0 for chunk 0 (new samples), old and new; and for a chunk of known ones."""
    from mmllm.data.dataset import GROUP_BATCHES, LengthGroupedSampler, MixtureSampler

    def sampler(counts: list[int]) -> LengthGroupedSampler:
        def length(d: int, i: int) -> int:
            counts[0] += 1
            return dataset.length(i)

        return LengthGroupedSampler(MixtureSampler([len(dataset)], [1.0], seed=0), length)

    per_batch = world * batch
    old_count = [0]
    old = sampler(old_count)
    start = time.perf_counter()
    old_order = old.chunk(0, per_batch)
    old_s = time.perf_counter() - start

    new_count = [0]
    new = sampler(new_count)
    spent = [0.0]
    base = MixtureSampler([len(dataset)], [1.0], seed=0)
    distinct = list(dict.fromkeys(base.at(j) for j in range(GROUP_BATCHES * per_batch)))

    def exchange(work):
        start = time.perf_counter()
        mine = work()
        spent[0] += time.perf_counter() - start
        # what processes 1 .. world - 1 measured (each its share of the distinct draws), untimed
        return [mine] + [[dataset.length(i) for _, i in distinct[r::world]] for r in range(1, world)]

    new.share_lengths(0, 0, 1, 0, world, batch, exchange)
    start = time.perf_counter()
    new_order = new.chunk(0, per_batch)
    new_s = spent[0] + time.perf_counter() - start
    assert new_order == old_order, "sharing changed the batches"
    return {"draws": GROUP_BATCHES * per_batch, "old_s": old_s, "old_encodes": old_count[0],
            "new_s": new_s, "new_encodes": new_count[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=8, help="processes simulated (default 8)")
    ap.add_argument("--batch", type=int, default=32, help="batch_size per process (default 32)")
    ap.add_argument("--samples", type=int, default=0, help="conversations in the data (default: one chunk's draws)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from mmllm.data.dataset import GROUP_BATCHES

    chunk = GROUP_BATCHES * args.world * args.batch
    print(f"{args.world} processes x batch {args.batch}: a chunk is {GROUP_BATCHES} steps, {chunk} draws; "
          "the lengths' cost on each process for a chunk of new samples (grad_accum 1):")
    print(f"{'tokenizer':<20} {'old: encodes':>13} {'s / 50 steps':>13} {'new: encodes':>13} {'s / 50 steps':>13} "
          f"{'ms per encode':>14} {'new / old':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chat.jsonl"
        write_conversations(data, args.samples or chunk)
        for name, assembly in ASSEMBLIES.items():
            try:
                dataset = stage_dataset(assembly, data)
            except Exception as exc:  # noqa: BLE001 -- the default's core may not be installed here
                print(f"{name:<20} skipped: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            r = measure(dataset, args.world, args.batch)
            print(f"{name:<20} {r['old_encodes']:>13} {r['old_s']:>13.2f} {r['new_encodes']:>13} {r['new_s']:>13.2f} "
                  f"{1000 * r['old_s'] / r['old_encodes']:>14.3f} {r['new_s'] / r['old_s']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
