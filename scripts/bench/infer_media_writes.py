"""``mmllm infer``'s cost of writing media files, before and after, side by side: fsyncs made and milliseconds of
``seconds.write`` per file, for ``--requests`` text -> image requests answered by ``run_requests`` (batch 8) on a
tiny checkpoint. "before" is mmllm as of ``--before`` (a git ref), "after" this tree; each row runs in a fresh
process with that tree first on ``sys.path``, into a fresh ``OUT`` in the working directory's file system (where
fsyncs cost what they cost there; ``--dir`` chooses another).

    python scripts/bench/infer_media_writes.py                         # trains a tiny checkpoint (~15 s)
    python scripts/bench/infer_media_writes.py --checkpoint runs/tiny/instruct/step-30 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(tree: str, checkpoint: str, n: int, folder: str) -> dict:
    sys.path.insert(0, tree)
    import torch

    torch.set_num_threads(1)
    from mmllm.inference import runner
    from mmllm.model import AnyToAnyModel

    model = AnyToAnyModel.from_pretrained(Path(checkpoint)).eval()
    real, count = os.fsync, [0]

    def fsync(fd: int) -> None:
        count[0] += 1
        real(fd)

    os.fsync = fsync
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        requests = Path(tmp) / "r.jsonl"
        requests.write_text("".join(json.dumps({"id": f"i{k}", "prompt": "Generate an image: a red circle",
                                                "seed": k}) + "\n" for k in range(n)))
        counts = runner.run_requests(model, requests, Path(tmp) / "out", batch_size=8, max_new_tokens=8)
        records = [json.loads(line) for line in (Path(tmp) / "out" / "results.jsonl").read_text().splitlines()]
        files = sum(len(r["files"]) for r in records)
        return {"done": counts["done"], "files": files, "fsyncs": count[0],
                "write_ms_per_file": 1000 * counts["seconds"]["write"] / max(files, 1)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--before", default="65a157e", help="git ref of the code to compare with")
    ap.add_argument("--checkpoint", help="a checkpoint directory (default: train a tiny one in a temp dir)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=".", help="where OUT is written (its file system's fsyncs are measured)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from infer_scale import extract_tree

    with tempfile.TemporaryDirectory(prefix="mmllm-bench-media-writes-") as tmp:
        trees = {"before": extract_tree(args.before, Path(tmp) / "before"), "after": REPO}
        if args.checkpoint:
            checkpoint = Path(args.checkpoint).resolve()
        else:
            sys.path.insert(0, str(REPO))
            from mmllm.inference.tiny import train_tiny_checkpoint

            checkpoint = train_tiny_checkpoint(Path(tmp) / "tiny")
        for _ in range(args.repeat):
            for side, tree in trees.items():
                out = subprocess.run([sys.executable, __file__, "--child", str(tree), str(checkpoint),
                                      str(args.requests), str(Path(args.dir).resolve())],
                                     capture_output=True, text=True, check=True).stdout.splitlines()[-1]
                row = json.loads(out)
                print(f"{side:6s} {row['files']} files: {row['fsyncs']} fsyncs, "
                      f"{row['write_ms_per_file']:.2f} ms writing a file", flush=True)


if __name__ == "__main__":
    main()
