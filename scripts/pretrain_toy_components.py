#!/usr/bin/env python
"""Pretrain the toy world's frozen parts: judges, encoders, VAEs and diffusion decoders.

Every part is trained on the world's training combinations only (the held-out ones are never
drawn), seeded, resumable, and exported in the layout its registry kind loads (open_clip folder,
transformers folder, diffusers pipeline folder), with ``manifest.json`` saying how it was made.

    # the full run (ships in mmllm/toyworld/weights)
    python scripts/pretrain_toy_components.py --parts all
    # some parts, fewer steps, elsewhere; --resume continues an interrupted run
    python scripts/pretrain_toy_components.py --parts encoders,judge-image --steps 200 --out /tmp/toy --resume
    # seconds per step of each part at its real size (5 timed steps each, nothing exported)
    python scripts/pretrain_toy_components.py --parts all --time 5 --out /tmp/toy-timing

``--parts`` takes part names (judge-image, encoder-audio, vae-image, decoder-video, ...) and groups
(all, judges, encoders, decoders, image, audio, video). ``--steps`` is one number for every selected
part or ``name=N,name=N``; likewise ``--batch-size``. Order and dependencies: the VAEs before the
decoders; decoder-video starts from decoder-image's UNet.

Time budget of the full run (``--time 4 --threads 1``: CPU seconds per step of one thread, measured
while the machine was otherwise idle; two threads ran 1.3-1.7x faster on the parts measured idle)::

    part            steps  batch  s/step (1 thread)  CPU-min
    judge-image       600     64    0.10                1.0
    judge-audio       600     64    0.90 (cold cache)   9.0  (Griffin-Lim once per rendering; ~2 when warm)
    judge-video       600     64    0.24                2.4
    encoder-image    3000     64    0.26               13.1
    encoder-audio    2000     24    0.39 (cold cache)  13.1
    encoder-video    2000     32    0.28                9.3
    vae-image        1500     32    0.26                6.4
    vae-audio        1500     16    0.61 (cold cache)  15.3
    decoder-image    6000     32    0.37               36.7
    decoder-audio    4000     32    0.53 (cold cache)  35.5
    decoder-video    1000      8    1.49               24.8
    total                                             167   -> about 1 h 50 min on 2 cores (/1.5), plus
                                                              ~5-10 min of caption encoding and export
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from mmllm.toyworld import recipes  # noqa: E402
from mmllm.toyworld.text import MINILM_SOURCE, MiniLMText, weights_sha256  # noqa: E402
from mmllm.toyworld.training import train  # noqa: E402
from mmllm.toyworld.world import SPECS, World  # noqa: E402

log = logging.getLogger("pretrain_toy_components")


def parse_overrides(value: str | None, names: list[str], what: str) -> dict[str, int]:
    if not value:
        return {}
    if "=" not in value:
        return dict.fromkeys(names, int(value))
    out = {}
    for item in value.split(","):
        name, _, number = item.partition("=")
        if name.strip() not in names:
            raise SystemExit(f"--{what}: {name.strip()!r} is not a selected part ({', '.join(names)})")
        out[name.strip()] = int(number)
    return out


def apply_overrides(part: recipes.PartSpec, steps: dict[str, int], batch: dict[str, int], seed: int) -> None:
    optim = part.setup.optim
    optim.steps = steps.get(part.name, optim.steps)
    optim.batch_size = batch.get(part.name, optim.batch_size)
    optim.warmup = min(optim.warmup, max(1, optim.steps // 10))
    part.setup.seed = seed


def file_hashes(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def world_recipe() -> dict[str, Any]:
    return {
        m: {
            "attributes": {a.name: list(a.values) for a in spec.attributes},
            "held_out": list(spec.held_out),
            "templates": list(spec.templates),
        }
        for m, spec in SPECS.items()
    }


def versions() -> dict[str, str]:
    import diffusers
    import open_clip
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "open_clip": open_clip.__version__,
    }


def read_manifest(out: Path) -> dict[str, Any]:
    path = out / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {"parts": {}}


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, out / "manifest.json")


def matmul_gflops() -> float:
    """Throughput right now (the machine is shared: this says how contended a timing was)."""
    a = torch.randn(512, 512)
    a @ a
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        best = min(best, time.perf_counter() - start)
    return 4 * 2 * 512**3 / best / 1e9


def run_part(part: recipes.PartSpec, ctx: recipes.Context, args: argparse.Namespace) -> dict[str, Any]:
    recipe = recipes.build_recipe(part, ctx)
    state = args.out / ".state" / f"{part.name}.pt"
    result = train(recipe, state, resume=args.resume, save_every=args.save_every, progress=not args.no_progress)
    folder = args.out / part.name
    if folder.exists():
        shutil.rmtree(folder)
    started = time.perf_counter()
    info = recipe.export(folder)
    losses = result.losses
    return {
        "family": part.family,
        "modality": part.modality,
        "setup": recipe.describe(),
        "seed": part.setup.seed,
        "steps": result.steps,
        "depends_on": part.depends_on,
        "data": {
            "source": "mmllm.toyworld.world.Sampler",
            "split": "train",
            "stream_seed": recipes.stream_seed(part.setup.seed, part.name),
            "held_out_never_drawn": list(SPECS[part.modality].held_out),
        },
        "train_seconds": round(result.seconds, 1),
        "export_seconds": round(time.perf_counter() - started, 1),
        "loss_first": sum(losses[:20]) / max(1, len(losses[:20])),
        "loss_last": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "files": file_hashes(folder),
        **info,
    }


def time_part(part: recipes.PartSpec, ctx: recipes.Context, args: argparse.Namespace) -> dict[str, Any]:
    for dep in part.depends_on:  # a random VAE of the right shape is enough to time a denoiser
        if dep.startswith("vae-") and not (ctx.out / dep / "config.json").is_file():
            spec = next(p for p in recipes.default_parts() if p.name == dep)
            vae = recipes.build_recipe(spec, ctx).vae
            vae.save_pretrained(ctx.out / dep)
    if getattr(part.setup, "init_from_image", False) and not (ctx.out / "decoder-image" / "unet").is_dir():
        part.setup.init_from_image = False  # random weights time the same
    recipe = recipes.build_recipe(part, ctx)
    gflops = matmul_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(recipe, Path(tmp) / "state.pt", save_every=0, max_steps=args.time + 1, progress=False)
    timed, cpu = result.step_seconds[1:], result.step_cpu_seconds[1:]  # the first step warms caches up
    row = {
        "steps_planned": part.setup.optim.steps,
        "batch_size": part.setup.optim.batch_size,
        "parameters": sum(p.numel() for p in recipe.trainable()),
        "threads": args.threads,
        "wall_s_per_step_min": round(min(timed), 3),
        "wall_s_per_step_median": round(statistics.median(timed), 3),
        "cpu_s_per_step_median": round(statistics.median(cpu), 3),  # robust to other processes' load
        "matmul_gflops": round(gflops, 1),
    }
    row["cpu_minutes_planned"] = round(row["cpu_s_per_step_median"] * row["steps_planned"] / 60, 1)
    log.info("%s: %s", part.name, row)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="all", help="part names and/or groups, comma-separated")
    p.add_argument("--out", type=Path, default=REPO / "mmllm" / "toyworld" / "weights")
    p.add_argument("--steps", help="N for every selected part, or name=N,name=N")
    p.add_argument("--batch-size", help="B for every selected part, or name=B,name=B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from out/.state; skip parts already done")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--eval-per-combo", type=int, default=2, help="evaluation items per combination at export")
    p.add_argument("--time", type=int, default=0, metavar="K", help="only time K steps of each part")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for handler in logging.getLogger().handlers:  # open_clip logs routine steps as INFO on the root logger
        handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    try:
        selected = recipes.select(args.parts, recipes.default_parts())
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    names = [s.name for s in selected]
    steps = parse_overrides(args.steps, names, "steps")
    batch = parse_overrides(args.batch_size, names, "batch-size")
    for part in selected:
        apply_overrides(part, steps, batch, args.seed)
    # timing builds random stand-in VAEs for the denoisers: keep them (and their caches) out of --out proper
    work = args.out / ".timing" if args.time else args.out
    ctx = recipes.Context(World(), work, MiniLMText, eval_per_combo=args.eval_per_combo)

    if args.time:
        table = {part.name: time_part(part, ctx, args) for part in selected}
        (args.out / "timing.json").write_text(json.dumps(table, indent=2) + "\n")
        print(json.dumps(table, indent=2))
        return 0

    manifest = read_manifest(args.out)
    manifest.update(
        {
            "about": "how each toy-world part was made; reproduce with scripts/pretrain_toy_components.py",
            "world": world_recipe(),
            "text_encoder": {"source": MINILM_SOURCE, "model": "all-MiniLM-L6-v2", "sha256": weights_sha256()},
            "versions": versions(),
        }
    )
    for part in selected:
        done = manifest["parts"].get(part.name)
        identity = json.dumps(dataclasses.asdict(part.setup), sort_keys=True, default=str)
        if args.resume and done and done.get("identity") == identity and (args.out / part.name).is_dir():
            log.info("%s: already done (manifest), skipped", part.name)
            continue
        entry = run_part(part, ctx, args)
        entry["identity"] = identity
        manifest["parts"][part.name] = entry
        write_manifest(args.out, manifest)
        log.info("%s: done in %.0f s; %s", part.name, entry["train_seconds"], entry.get("metrics", {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
