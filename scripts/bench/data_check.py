"""``mmllm data check``'s time on caption pairs: each conversation encoded on its own (old) and a batch at a time,
the tokenizer called once for all of a batch's texts (new), side by side, with where the time goes.

A synthetic ``mmllm-pairs`` file of ``--lines`` records (``data_index.py``'s: a few hundred tiny PNGs named over
and over) is checked for the encode-align stage with the tokenizer of each ``--assemblies`` (tiny: the tiny
assembly's; default: the embedded default's SmolLM2, its weights not loaded, as ``mmllm data check`` builds it),
media decoded as the command does. Each row runs in a fresh process, one thread (``TOKENIZERS_PARALLELISM``
false: the tokenizers library's own threads would share a batch's texts on a machine with free cores):
``check_dataset``'s CPU seconds (what other jobs on the machine change least) and wall seconds, the CPU seconds
in encoding (the rest: reading the records, the media probe, the report), and a digest of the report, which must
be the same in every row; each row the fastest of ``--repeat`` rounds of the modes in turn.

    python scripts/bench/data_check.py                  # 100k lines, tiny and default
    python scripts/bench/data_check.py --lines 20000 --assemblies tiny
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import _child  # noqa: E402  (beside this script)
import data_index  # noqa: E402  (beside this script: the synthetic data)


def child(mode: str, path: str, assembly: str) -> dict[str, Any]:
    from mmllm.config import DatasetConfig, load_assembly
    from mmllm.data import check
    from mmllm.data.check import _MediaProbe, check_dataset
    from mmllm.data.template import encode_conversation
    from mmllm.model import AnyToAnyModel
    from mmllm.training.loop import token_spec

    model = AnyToAnyModel.assemble(load_assembly(REPO / f"configs/assemblies/{assembly}.yaml"), "config", [],
                                   llm_weights=False)
    spec = token_spec(model)
    batched = check.encode_conversations
    encoding = [0.0]

    def each(convs: list[Any], tokenizer: Any, spec: Any) -> list[Any]:  # the old loop: one encode a conversation
        out: list[Any] = []
        for conv in convs:
            try:
                out.append(encode_conversation(conv, tokenizer, spec))
            except ValueError as exc:
                out.append(exc)
        return out

    def timed(convs: list[Any], tokenizer: Any, spec: Any) -> list[Any]:
        start = time.process_time()
        out = (each if mode == "old" else batched)(convs, tokenizer, spec)
        encoding[0] += time.process_time() - start
        return out

    check.encode_conversations = timed
    start, cpu = time.perf_counter(), time.process_time()
    report = check_dataset(DatasetConfig(path=path, format="mmllm-pairs"), "encode-align", model.llm.tokenizer, spec,
                           {}, _MediaProbe(decode=True))
    wall, total = time.perf_counter() - start, time.process_time() - cpu
    summary = json.dumps({k: v for k, v in vars(report).items()}, sort_keys=True, default=str)
    return {"mode": mode, "total_s": total, "wall_s": wall, "encode_s": encoding[0], "conversations": report.conversations,
            "problems": report.problems, "report": hashlib.sha256(summary.encode()).hexdigest()[:12]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--assemblies", default="tiny,default")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of the two modes; each row its fastest")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-data-check-") as tmp:
        path = data_index.write_data(Path(tmp), args.lines, "mmllm-pairs")
        for assembly in args.assemblies.split(","):
            rows: dict[str, dict[str, Any]] = {}
            for _ in range(args.repeat):  # the modes in turn, each row its fastest: other jobs share the cores
                for mode in ("old", "new"):
                    r = _child.run_child(__file__, mode, str(path), assembly)
                    if mode not in rows or r["total_s"] < rows[mode]["total_s"]:
                        rows[mode] = r
            old = rows["old"]
            print(f"{assembly} assembly's tokenizer, {old['conversations']} caption pairs:")
            for mode, r in rows.items():
                print(f"  {mode}: CPU {r['total_s']:.1f} s ({r['total_s'] / r['conversations'] * 1e6:.0f} us a sample; "
                      f"wall {r['wall_s']:.1f} s), encoding {r['encode_s']:.1f} s, the rest "
                      f"{r['total_s'] - r['encode_s']:.1f} s; report {r['report']}, {r['problems']} problem(s)")
            same = len({r["report"] for r in rows.values()}) == 1
            print(f"  old/new: CPU x{old['total_s'] / rows['new']['total_s']:.2f} (encoding "
                  f"x{old['encode_s'] / rows['new']['encode_s']:.2f}), wall x{old['wall_s'] / rows['new']['wall_s']:.2f}; "
                  f"the same report: {same}")
            if not same:
                raise SystemExit("the reports differ")


if __name__ == "__main__":
    main()
