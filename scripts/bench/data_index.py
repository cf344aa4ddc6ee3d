"""A stage's data at scale: reading it, the memory it holds, a sample's read, and ``train()`` to its first step,
for the conversations held as objects (old) and as an index into the data file (new), side by side.

A synthetic data set of ``--lines`` records in each ``--formats`` (a few hundred tiny PNGs named over and over,
so the disk stays small) is written to a temporary folder. Each row runs in a fresh process:

* old: every record read into objects and held (``read_records`` + ``pair_to_conversation`` into lists,
  as ``load_stage_records`` did), media paths resolved with pathlib (as ``MediaRoot.resolve`` did);
* new: ``load_stage_records`` as it is (a ``ConversationIndex`` per file);
* whole (JSON array files only): ``load_stage_records`` as it is, but the array read as it was before it was
  read in chunks (``JSON_ARRAY_CHUNK``): the whole file's bytes, then the whole text decoded, then parsed.

Printed per row: seconds to read, MB the conversations hold once read (resident memory after minus
before), the process's peak resident MB (and how far above what it held before reading: the imports), microseconds
to get one random sample's conversation; with
``--train``, for the first format, ``train()`` (tiny assembly, 1 step, group_by_length) wall seconds and peak MB.
Then the ratios old / new.

    python scripts/bench/data_index.py                       # 200k lines, mmllm-pairs and llava, train too
    python scripts/bench/data_index.py --lines 1000000 --formats mmllm-pairs --no-train
    python scripts/bench/data_index.py --formats llava --no-train  # a JSON array: read whole vs in chunks too
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import _child  # noqa: E402  (beside this script)

FILES = {"mmllm-pairs": ("pairs.jsonl", "encode-align"), "nextgpt-pairs": ("cc3m.json", "encode-align"),
         "llava": ("llava.json", "instruct"), "mmllm-chat": ("chat.jsonl", "instruct")}
IMAGES = 300
WORDS = "a the red blue green dog cat man woman street car tree house sky sits runs near under with on in".split()


def write_data(root: Path, lines: int, fmt: str) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    for k in range(IMAGES):
        if not (root / "images" / f"{k:05d}.png").exists():
            Image.new("RGB", (32, 32), (k % 256, (k * 7) % 256, (k * 13) % 256)).save(root / "images" / f"{k:05d}.png")
    rng = random.Random(0)

    def caption() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20)))

    out = root / FILES[fmt][0]
    array = out.suffix == ".json"
    with open(out, "w") as fh:
        fh.write("[\n" if array else "")
        for i in range(lines):
            img = f"{i % IMAGES:05d}.png"
            if fmt == "mmllm-pairs":
                rec: dict[str, Any] = {"id": f"p{i}", "modality": "image", "media": f"images/{img}", "caption": caption()}
            elif fmt == "nextgpt-pairs":
                rec = {"caption": caption(), "image_name": img}
            elif fmt == "llava":
                rec = {"id": f"{i:012d}", "image": f"images/{img}", "conversations": [
                    {"from": "human", "value": "<image>\n" + caption() + "?"}, {"from": "gpt", "value": caption()},
                    {"from": "human", "value": caption() + "?"}, {"from": "gpt", "value": caption()}]}
            else:
                rec = {"id": f"c{i}", "messages": [
                    {"role": "user", "content": "<image>\n" + caption(), "media": [f"images/{img}"]},
                    {"role": "assistant", "content": caption()}]}
            fh.write(("," if array and i else "") + json.dumps(rec) + "\n")
        fh.write("]\n" if array else "")
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def use_old_reading() -> None:
    """The reading as it was: pathlib paths, every conversation held in a list."""
    from mmllm.data import dataset, formats, nextgpt
    from mmllm.data.template import pair_to_conversation
    from mmllm.training import loop

    def resolve_str(self: formats.MediaRoot, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise formats.DataFormatError(f"{where}: expected a media path string, got {value!r}")
        p = Path(value.strip()).expanduser()
        full = Path(os.path.abspath(p if p.is_absolute() else self.root / p))
        if not self.allow_outside and not full.is_relative_to(self.root):
            raise formats.DataFormatError(f"{where}: outside the root")
        return full

    def load_stage_records(datasets: list[Any], stage: str) -> tuple[list[list[Any]], list[float], list[str]]:
        per_dataset, weights, errors = [], [], []
        for ds in datasets:
            records, errs = formats.read_dataset(ds)
            errors += errs
            convs = []
            for rec in records:
                if isinstance(rec, formats.CaptionPair):
                    try:
                        convs.append(pair_to_conversation(rec, stage))
                    except ValueError as exc:
                        errors.append(str(exc))
                else:
                    convs.append(rec)
            per_dataset.append(convs)
            weights.append(ds.weight)
        return per_dataset, weights, errors

    formats.MediaRoot.resolve_str = resolve_str  # resolve() wraps it: Path(Path) is the Path
    nextgpt._exists = lambda path: Path(path).exists()
    dataset.load_stage_records = loop.load_stage_records = load_stage_records


def use_whole_array_reading() -> None:
    """A JSON array file read as it was before it was read in chunks: its bytes, then its text, whole."""
    import codecs
    import re

    from mmllm.data import formats

    class ByteOffsets:
        def __init__(self, text: str, skipped: int):
            self.text, self.skipped = text, skipped
            self.ascii = text.isascii()
            self.char, self.byte = 0, skipped

        def __call__(self, char: int) -> int:
            if self.ascii:
                return char + self.skipped
            self.byte += len(self.text[self.char:char].encode("utf-8"))
            self.char = char
            return self.byte

    def iter_json_array(path: Path, text: str, start: int, skipped: int) -> Any:
        decoder = json.JSONDecoder()
        ws = re.compile(r"[\s,]*")
        to_byte = ByteOffsets(text, skipped)
        pos, line, counted = start + 1, 1 + text.count("\n", 0, start), start
        while True:
            pos = ws.match(text, pos).end()
            line += text.count("\n", counted, pos)
            counted = pos
            if pos >= len(text):
                yield line, formats.DataFormatError(f"{path}:{line}: the JSON array is not closed"), (0, 0)
                return
            if text[pos] == "]":
                return
            try:
                rec, end = decoder.raw_decode(text, pos)
            except (json.JSONDecodeError, RecursionError) as exc:
                yield line, formats.DataFormatError(f"{path}:{line}: not valid JSON ({exc})"), (0, 0)
                return
            if isinstance(rec, dict):
                first = to_byte(pos)
                yield line, rec, (first, to_byte(end) - first)
            else:
                yield line, formats.DataFormatError(f"{path}:{line}: expected a JSON object"), (0, 0)
            pos = end

    streamed = formats.scan_records

    def scan_records(path: Path, fh: Any) -> Any:
        head = fh.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
        fh.seek(0)
        if not head.startswith(b"["):
            yield from streamed(path, fh)
            return
        data = fh.read()
        bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
        text = data.decode("utf-8-sig")
        del data
        yield from iter_json_array(path, text, text.index("["), bom)

    formats.scan_records = scan_records


def child(mode: str, path: str, fmt: str, train: bool) -> dict[str, Any]:
    from mmllm.config import DatasetConfig
    from mmllm.memory import peak_resident_mb

    if mode == "old":
        use_old_reading()
    elif mode == "whole":
        use_whole_array_reading()
    from mmllm.data import dataset

    stage = FILES[fmt][1]
    row: dict[str, Any] = {"mode": mode, "format": fmt}
    if train:
        import logging

        from mmllm.config import load_stage
        from mmllm.training.loop import train as run_train

        logging.disable(logging.WARNING)
        out = tempfile.mkdtemp(prefix="bench-data-index-")
        cfg = load_stage(REPO / "configs/stages/tiny/encode_align.yaml",
                         [f"output_dir={out}", "report_to=none", f"data=[{{path: {path}, format: {fmt}}}]",
                          "init_from=null", "max_steps=1", "group_by_length=true", "save_every=0"])
        start = time.perf_counter()
        run_train(cfg)
        row.update(train_s=time.perf_counter() - start,
                   train_peak_mb=peak_resident_mb())
        return row
    before = rss_mb()
    row["before_mb"] = before
    start = time.perf_counter()
    per, _, _ = dataset.load_stage_records([DatasetConfig(path=path, format=fmt)], stage)
    row["read_s"] = time.perf_counter() - start
    row["held_mb"] = rss_mb() - before
    row["peak_mb"] = peak_resident_mb()
    convs = per[0]
    picks = random.Random(1).choices(range(len(convs)), k=20000)
    start = time.perf_counter()
    for i in picks:
        convs[i]
    row["sample_us"] = (time.perf_counter() - start) / len(picks) * 1e6
    row["samples"] = len(convs)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--formats", default="mmllm-pairs,llava")
    ap.add_argument("--no-train", action="store_true", help="skip the train() rows")
    ap.add_argument("--skip-old", action="store_true", help="skip the old rows (objects held): slow at scale")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, path, fmt, train = args.child
        print(json.dumps(child(mode, path, fmt, train == "train")))
        return
    with tempfile.TemporaryDirectory(prefix="bench-data-index-") as tmp:
        for k, fmt in enumerate(args.formats.split(",")):
            path = write_data(Path(tmp), args.lines, fmt)
            modes = [m for m in ("old", "whole", "new")
                     if (m != "whole" or path.suffix == ".json") and (m != "old" or not args.skip_old)]
            rows = {mode: _child.run_child(__file__, mode, str(path), fmt, "read") for mode in modes}
            print(f"{fmt}, {rows['new']['samples']} samples ({path.stat().st_size / 2**20:.0f} MB file):")
            for mode, r in rows.items():
                print(f"  {mode}: read {r['read_s']:.2f} s, conversations hold {r['held_mb']:.0f} MB "
                      f"({r['held_mb'] * 2**20 / r['samples']:.0f} B/sample), peak {r['peak_mb']:.0f} MB "
                      f"(+{r['peak_mb'] - r['before_mb']:.0f} MB over the {r['before_mb']:.0f} MB before reading), "
                      f"a random sample {r['sample_us']:.1f} us")
            old, new = rows.get("old"), rows["new"]
            if old:
                print(f"  old/new: read time x{old['read_s'] / new['read_s']:.2f}, held memory "
                      f"x{old['held_mb'] / max(new['held_mb'], 1):.0f}, peak x{old['peak_mb'] / new['peak_mb']:.2f}, "
                      f"sample access x{old['sample_us'] / new['sample_us']:.3f}")
            if "whole" in rows:
                whole = rows["whole"]
                print(f"  whole/new (the array read whole / in chunks): read time "
                      f"x{whole['read_s'] / new['read_s']:.2f}, peak x{whole['peak_mb'] / new['peak_mb']:.2f}, "
                      f"peak over before reading x{(whole['peak_mb'] - whole['before_mb']) / max(new['peak_mb'] - new['before_mb'], 1):.2f}")
            if k == 0 and not args.no_train and FILES[fmt][1] == "encode-align":
                rows = {mode: _child.run_child(__file__, mode, str(path), fmt, "train") for mode in ("old", "new")}
                for mode, r in rows.items():
                    print(f"  train() to 1 step, {mode}: {r['train_s']:.1f} s, peak {r['train_peak_mb']:.0f} MB")
                print(f"  train() old/new: time x{rows['old']['train_s'] / rows['new']['train_s']:.2f}, "
                      f"peak x{rows['old']['train_peak_mb'] / rows['new']['train_peak_mb']:.2f}")


if __name__ == "__main__":
    main()
