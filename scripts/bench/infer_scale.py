"""``mmllm infer`` at the scale of batch jobs, before and after, side by side in one run: what grows with the
number of requests, outside the model.

A synthetic requests file of ``--requests`` lines (half text-only, half text -> image) and an ``OUT`` holding a
done record for each (as a run writes them; a 1-byte media file per image) are written to a temporary folder.
"before" is mmllm as of ``--before`` (a git ref, extracted with ``git archive``), "after" this tree. Each row runs
in a fresh process with that tree first on ``sys.path``, on its own copy of ``OUT``:

* read: ``read_lines`` of the requests file -- seconds (CPU), MB it holds (tracemalloc);
* resume, all done: ``mmllm infer`` on the whole file, every request done (the model is not loaded) -- wall and
  CPU seconds, peak resident MB above what the imports hold;
* resume, N left: the same with the last ``--left`` requests not done yet (the model loads and answers them,
  ``--max-new-tokens 1``);
* gallery: one rewrite of ``index.html`` for all records, as a run does now and then -- CPU seconds, MB of HTML in
  ``index.html`` (and its pages, after), and the share of a run's time rewrites take (before: one every 30 s);
* run: ``run_requests`` of ``--run`` text requests into a fresh ``OUT`` (``max_new_tokens`` 1) -- milliseconds per
  request spent outside the model (total less the LLM's and the decoders' time).

    python scripts/bench/infer_scale.py                          # 100k requests; trains a tiny checkpoint (~15 s)
    python scripts/bench/infer_scale.py --requests 1000000 --checkpoint runs/tiny/instruct/step-30
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TASKS = ("read", "resume", "resume-left", "gallery", "run")


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    """This process's own peak resident MB: :func:`mmllm.memory.peak_resident_mb` of this tree (a row runs with the
    "before" tree first on ``sys.path``, which may not have it), loaded from its file."""
    spec = importlib.util.spec_from_file_location("_mmllm_memory", REPO / "mmllm" / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    return memory.peak_resident_mb()


# ------------------------------------------------------------------------------------------ the data


def write_requests(path: Path, n: int) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            prompt = f"Generate an image: a red circle, number {i}" if i % 2 else f"What is {i} plus {i}?"
            fh.write(json.dumps({"id": f"r{i:07d}", "prompt": prompt, "seed": i}) + "\n")


def write_done_out(out: Path, requests: Path, checkpoint: Path, n: int) -> None:
    """``out`` holding a done record of each of the first ``n`` requests, as `mmllm infer --max-new-tokens 1` writes them."""
    from mmllm.inference.runner import _safe, media_digest, read_lines, request_settings, run_settings

    (out / "media").mkdir(parents=True)
    made = run_settings(checkpoint, "float32", max_new_tokens=1)  # as the resume rows run
    with open(out / "results.jsonl", "w") as fh:
        for line in read_lines(requests)[:n]:
            rec = line.record
            files = []
            if line.lineno % 2 == 0:
                files = [f"media/{_safe(line.id)}_image0.png"]
                (out / files[0]).write_bytes(b"x")
            fh.write(json.dumps({
                "id": line.id, "line": line.lineno, "prompt": rec["prompt"], "inputs": [],
                "text": "" if files else "It is twice the number.", "files": files, "seed": rec["seed"],
                "checkpoint": made["checkpoint"], "settings": {**request_settings(made, rec), "media": media_digest([])},
                "inputs_stat": [], "seconds": {"prepare": 0.0012, "llm": 0.1234, "decode": 0.2345, "write": 0.0034},
                "batch_size": 8, "error": None}) + "\n")


def copy_out(source: Path, target: Path) -> Path:
    """A copy of ``source`` to resume into: results.jsonl copied (runs append to it), media files linked."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source / "media", target / "media", copy_function=os.link)
    shutil.copy(source / "results.jsonl", target / "results.jsonl")
    return target


def extract_tree(ref: str, target: Path) -> Path:
    """The ``mmllm`` package as of git ``ref``, under ``target``."""
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "mmllm"], cwd=REPO, capture_output=True,
                             check=True).stdout
    target.mkdir(parents=True)
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


# ------------------------------------------------------------------------------------------ the rows (children)


def child(task: str, root: Path, checkpoint: Path, args: dict[str, Any]) -> dict[str, Any]:
    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    from mmllm.inference import runner

    requests, base = root / "requests.jsonl", rss_mb()
    if task == "read":
        import tracemalloc

        tracemalloc.start()
        cpu = time.process_time()
        lines = runner.read_lines(requests)
        cpu = time.process_time() - cpu
        held = tracemalloc.get_traced_memory()[0] / 2**20
        return {"cpu_s": cpu, "held_mb": held, "n": len(lines)}
    if task in ("resume", "resume-left"):
        from mmllm.cli import main

        out = root / f"out-{task}"
        argv = ["infer", "--checkpoint", str(checkpoint), "--input", str(requests), "--output", str(out),
                "--max-new-tokens", "1", "--threads", "1"]
        wall, cpu = time.perf_counter(), time.process_time()
        code = main(argv)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return {"code": code, "wall_s": wall, "cpu_s": cpu, "peak_mb": peak_mb() - base, **gallery_size(out)}
    if task == "gallery":
        from mmllm.inference.gallery import write_gallery

        out = root / "out-gallery"
        current = runner.gallery_keys(runner.read_lines(requests))
        wall, cpu = time.perf_counter(), time.process_time()
        write_gallery(out, current)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        every, share = runner.GALLERY_EVERY_S, getattr(runner, "GALLERY_SHARE", None)
        wait = runner.gallery_wait(wall) if hasattr(runner, "gallery_wait") else every
        return {"wall_s": wall, "cpu_s": cpu, "peak_mb": peak_mb() - base, "run_share": wall / (wall + wait),
                "share_cap": share, **gallery_size(out)}
    if task == "run":
        from mmllm.model import AnyToAnyModel

        model = AnyToAnyModel.from_pretrained(checkpoint).eval()
        small = root / "run-requests.jsonl"
        small.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"What is {i} plus {i}?"}) + "\n"
                                 for i in range(args["run"])))
        out = root / "out-run"
        shutil.rmtree(out, ignore_errors=True)
        counts = runner.run_requests(model, small, out, batch_size=8, max_new_tokens=1)
        sec = counts["seconds"]
        return {"total_s": sec["total"], "model_s": sec["llm"] + sec["decode"],
                "outside_ms": 1000 * (sec["total"] - sec["llm"] - sec["decode"]) / args["run"]}
    raise SystemExit(f"unknown task {task}")


def gallery_size(out: Path) -> dict[str, Any]:
    pages = sorted((out / "pages").glob("*.html")) if (out / "pages").is_dir() else []
    return {"index_mb": (out / "index.html").stat().st_size / 1e6, "pages": 1 + len(pages),
            "all_pages_mb": sum(p.stat().st_size for p in [out / "index.html", *pages]) / 1e6}


def run_child(tree: Path, task: str, root: Path, checkpoint: Path, extra: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(tree))
    cmd = [sys.executable, __file__, "--child", str(tree), task, str(root), str(checkpoint), json.dumps(extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{task} ({tree}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        tree, task, root, checkpoint, extra = sys.argv[2:7]
        sys.path.insert(0, tree)
        print(json.dumps(child(task, Path(root), Path(checkpoint), json.loads(extra))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--left", type=int, default=256, help="requests not done yet in the second resume")
    ap.add_argument("--run", type=int, default=1000, help="text requests of the run row")
    ap.add_argument("--before", default="325e241", help="git ref of the code to compare with (default: the commit "
                                                        "before these changes)")
    ap.add_argument("--checkpoint", help="a checkpoint directory (default: train a tiny one in a temp dir)")
    ap.add_argument("--rows", default=",".join(TASKS), help=f"which rows, of {','.join(TASKS)}")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory(prefix="mmllm-bench-infer-scale-") as tmp:
        root = Path(tmp)
        trees = {"before": extract_tree(args.before, root / "before"), "after": REPO}
        if args.checkpoint:
            checkpoint = Path(args.checkpoint).resolve()
        else:
            print("training a tiny checkpoint ...", flush=True)
            from mmllm.inference.tiny import train_tiny_checkpoint

            checkpoint = train_tiny_checkpoint(root / "tiny")
        data = root / "data"
        data.mkdir()
        t0 = time.perf_counter()
        write_requests(data / "requests.jsonl", args.requests)
        write_done_out(data / "done", data / "requests.jsonl", checkpoint, args.requests)
        mb = (data / "done" / "results.jsonl").stat().st_size / 1e6
        print(f"{args.requests:,} requests ({(data / 'requests.jsonl').stat().st_size / 1e6:.1f} MB), results.jsonl "
              f"{mb:.1f} MB, written in {time.perf_counter() - t0:.0f} s; before = {args.before}, after = this tree",
              flush=True)
        rows: dict[str, dict[str, dict[str, Any]]] = {}
        for side, tree in trees.items():
            copy_out(data / "done", data / "out-resume")
            copy_out(data / "done", data / "out-gallery")
            left = copy_out(data / "done", data / "out-resume-left")
            keep = args.requests - args.left
            lines = (left / "results.jsonl").read_text().splitlines(keepends=True)[:keep]
            (left / "results.jsonl").write_text("".join(lines))
            extra = {"run": args.run}
            rows[side] = {task: run_child(tree, task, data, checkpoint, extra) for task in args.rows.split(",")}
            print(f"  {side} done", flush=True)
        report(rows, args)


def report(rows: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace) -> None:
    b, a = rows["before"], rows["after"]
    print(f"\n{'':44}{'before':>16}{'after':>16}{'before/after':>14}")

    def line(label: str, x: float, y: float, fmt: str = "{:.2f}") -> None:
        ratio = f"{x / y:.1f}x" if y else ""
        print(f"{label:44}{fmt.format(x):>16}{fmt.format(y):>16}{ratio:>14}")

    if "read" in b:
        line("read requests: CPU s", b["read"]["cpu_s"], a["read"]["cpu_s"])
        line("read requests: MB held", b["read"]["held_mb"], a["read"]["held_mb"], "{:.0f}")
    for task, label in (("resume", "resume, all done"), ("resume-left", f"resume, {args.left} left")):
        if task in b:
            line(f"{label}: wall s", b[task]["wall_s"], a[task]["wall_s"])
            line(f"{label}: CPU s", b[task]["cpu_s"], a[task]["cpu_s"])
            line(f"{label}: peak MB over imports", b[task]["peak_mb"], a[task]["peak_mb"], "{:.0f}")
    if "gallery" in b:
        g, h = b["gallery"], a["gallery"]
        line("gallery rewrite: CPU s", g["cpu_s"], h["cpu_s"])
        line("gallery rewrite: peak MB over imports", g["peak_mb"], h["peak_mb"], "{:.0f}")
        line("index.html MB", g["index_mb"], h["index_mb"])
        print(f"{'gallery pages (MB, all pages)':44}{g['pages']:>10} ({g['all_pages_mb']:.0f})"
              f"{h['pages']:>10} ({h['all_pages_mb']:.0f})")
        line("share of a run's time spent rewriting it %", 100 * g["run_share"], 100 * h["run_share"], "{:.1f}")
    if "run" in b:
        line(f"run of {args.run} text: ms/request outside model", b["run"]["outside_ms"], a["run"]["outside_ms"])
        line(f"run of {args.run} text: total s", b["run"]["total_s"], a["run"]["total_s"])
    failed = [f"{side} {task}: exit {r['code']}" for side, rs in rows.items() for task, r in rs.items()
              if r.get("code") not in (None, 0)]
    if failed:
        print("NOTE: " + "; ".join(failed))


if __name__ == "__main__":
    main()
