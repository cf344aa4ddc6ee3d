"""What tallying the keys a format does not read costs the first read of a data file (``index_dataset``).

A synthetic ``mmllm-chat`` file of ``--records`` conversations (4 messages, an output each; every key a known
one, or with ``--typos`` a misspelt key in each record's answer) is indexed as before the tally (no keys, no
retrying parser: "before"), with the retrying parser only ("retry") and with both ("now"), the modes in turn, the fastest of ``--repeat`` rounds of each (CPU seconds of
this process: what other jobs on the machine change least).

    python scripts/bench/data_keys.py                      # 20,000 records
    python scripts/bench/data_keys.py --records 5000 --typos
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def write(path: Path, n: int, typos: bool) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            answer = {"role": "assistant", "content": f"Here is circle {i}.",
                      "outputs": [{"modality": "image", "caption": f"a red circle {i}"}]}
            if typos:
                answer["output"] = []
            rec = {"id": f"c{i}", "messages": [
                {"role": "user", "content": f"<image>\nWhat is {i}?", "media": [f"img/{i}.png"]},
                {"role": "assistant", "content": "A circle."},
                {"role": "user", "content": "Draw it again."}, answer]}
            fh.write(json.dumps(rec) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--typos", action="store_true")
    args = ap.parse_args()
    from mmllm.config import DatasetConfig
    from mmllm.data import formats
    from mmllm.data import index as index_module
    from mmllm.data.index import index_dataset

    logging.disable(logging.WARNING)
    modes = ("before", "retry", "now")
    best = dict.fromkeys(modes, float("inf"))
    real, lookups = formats._schemas, index_module._ScanLookups
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        write(path, args.records, args.typos)
        ds = DatasetConfig(path=str(path), format="mmllm-chat")
        for _ in range(args.repeat):
            for mode in modes:
                formats._schemas = real if mode == "now" else (lambda: dict.fromkeys(real()))
                index_module._ScanLookups = lookups if mode != "before" else (lambda parser: parser)
                started = time.process_time()
                index, _, _ = index_dataset(ds, "instruct")
                best[mode] = min(best[mode], time.process_time() - started)
                assert len(index) == args.records
                index.close()
    formats._schemas, index_module._ScanLookups = real, lookups
    print(f"{args.records} records{' (a typo each)' if args.typos else ''}: index_dataset CPU seconds, the "
          f"fastest of {args.repeat}")
    for mode in modes:
        extra = (best[mode] - best["before"]) / args.records * 1e6
        print(f"  {mode:>6}: {best[mode]:.3f} s (+{100 * (best[mode] / best['before'] - 1):.1f}%, "
              f"+{extra:.2f} us a record)")


if __name__ == "__main__":
    main()
