"""Reading an hours-long clip: every frame decoded (before) vs seeking to the kept ones (now), side by side.

Writes a long clip of small frames into a temporary folder (PyAV; the frame index drawn into each frame as
black/white stripes, one per bit, above a moving pattern; a keyframe every ``--gop`` frames, x264's default), then times
``load_video`` as it was (:func:`mmllm.data.media._decode_sequentially`: decode every frame, keep every
stride-th) and as it is (``load_video``: seek to each kept frame), alternating, in one process:

    python scripts/bench/long_video.py [--minutes 30] [--fps 30] [--gop 250] [--format mp4] [--rounds 3] \
        [--stripe 5] [--height 48]   # frames 18 * stripe x height pixels

Prints the median wall-clock and CPU seconds of each, their ratio, the frames each decoded, and which frames
came back: their indices read from the stripes, against the evenly spread targets, first and last.
The smaller the frames, the more a seek itself costs beside decoding them: the CPU-time ratio approaches the
ratio of frames decoded as frames grow.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import av  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mmllm.data import media  # noqa: E402

BITS = 18  # the index as 18 stripes: up to 262,143 frames (2.4 h at 30 fps)
STRIPE, HEIGHT = 5, 48  # --stripe, --height; the stripes fill the top quarter, a moving pattern the rest
CODECS = {"mp4": "libx264", "mkv": "libx264", "webm": "libvpx-vp9", "avi": "mpeg4"}
FORMATS = {"mp4": "mp4", "mkv": "matroska", "webm": "webm", "avi": "avi"}


def frame_with_index(i: int) -> np.ndarray:
    """Frame ``i``: its index in stripes above a smoothly moving pattern, which x264 codes as camera footage
    is, with B-frames (stripes alone, whose bits change at random, it codes with P-frames only)."""
    width, band = (BITS * STRIPE + 7) // 2 * 2, max(4, HEIGHT // 4)  # width even for yuv420p
    y, x = np.mgrid[band:HEIGHT, 0:width]
    arr = np.zeros((HEIGHT, width, 3), np.uint8)
    for bit in range(BITS):
        if i >> bit & 1:
            arr[:band, bit * STRIPE:(bit + 1) * STRIPE] = 255
    arr[band:] = (127 + 100 * np.sin((x + 0.7 * i) / 7) * np.cos((y + 0.3 * i) / 9))[..., None].astype(np.uint8)
    return arr


def index_of(img) -> int:
    row = np.asarray(img)[max(4, HEIGHT // 4) // 2]
    return sum(1 << bit for bit in range(BITS) if row[bit * STRIPE + STRIPE // 2, 0] > 128)


def write_clip(path: Path, frames: int, fps: int, gop: int, fmt: str) -> None:
    with av.open(str(path), mode="w", format=FORMATS[fmt]) as out:
        stream = out.add_stream(CODECS[fmt], rate=fps)
        stream.height, stream.width = frame_with_index(0).shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if fmt == "webm":
            stream.codec_context.options = {"deadline": "realtime", "cpu-used": "8"}
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_with_index(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def decode_sequentially(path: Path) -> media.Video:
    """load_video as it was before seeking: every frame decoded."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return media._decode_sequentially(container, stream, media.MAX_VIDEO_FRAMES)


class FrameCounter:
    """Counts the frames the decoders hand back (both paths decode through ``container.decode`` or
    ``packet.decode``), by wrapping ``av.Packet.decode``."""

    def __init__(self) -> None:
        self.count = 0
        self._original = av.Packet.decode

    def __enter__(self) -> FrameCounter:
        def counting(packet):
            frames = self._original(packet)
            self.count += len(frames)
            return frames
        try:
            av.Packet.decode = counting
        except TypeError:  # an extension type that cannot be patched: no counts
            self.count = -1
        return self

    def __exit__(self, *exc) -> None:
        if self.count >= 0:
            av.Packet.decode = self._original


def timed(fn, path: Path) -> tuple[float, float, media.Video]:
    wall, cpu = time.perf_counter(), time.process_time()
    video = fn(path)
    return time.perf_counter() - wall, time.process_time() - cpu, video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--gop", type=int, default=250)
    parser.add_argument("--format", choices=sorted(CODECS), default="mp4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stripe", type=int, default=5, help="pixels per bit: frames are 18 x this wide")
    parser.add_argument("--height", type=int, default=48)
    args = parser.parse_args()
    global STRIPE, HEIGHT
    STRIPE, HEIGHT = args.stripe, args.height
    frames = round(args.minutes * 60 * args.fps)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"long.{args.format}"
        start = time.perf_counter()
        write_clip(path, frames, args.fps, args.gop, args.format)
        print(f"wrote {frames} frames ({args.minutes:g} min at {args.fps} fps, a keyframe every {args.gop}, "
              f"{frame_with_index(0).shape[1]}x{HEIGHT}, {args.format}) in {time.perf_counter() - start:.1f} s, "
              f"{path.stat().st_size / 1e6:.1f} MB")
        old, new = [], []
        for _ in range(args.rounds):  # alternate, so load from other processes hits both alike
            old.append(timed(decode_sequentially, path))
            new.append(timed(media.load_video, path))
        with FrameCounter() as old_count:
            decode_sequentially(path)
        with FrameCounter() as new_count:
            media.load_video(path)
    for name, runs, counter in (("sequential (before)", old, old_count), ("seeking (now)", new, new_count)):
        wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        decoded = f", {counter.count} frames decoded" if counter.count >= 0 else ""
        print(f"{name:>20}: {wall:7.3f} s wall, {cpu:7.3f} s CPU (median of {len(runs)}){decoded}")
    ratio_wall = statistics.median(r[0] for r in old) / statistics.median(r[0] for r in new)
    ratio_cpu = statistics.median(r[1] for r in old) / statistics.median(r[1] for r in new)
    print(f"{'speed-up':>20}: {ratio_wall:.1f}x wall, {ratio_cpu:.1f}x CPU")
    got = [index_of(f) for f in new[-1][2].frames]
    before = [index_of(f) for f in old[-1][2].frames]
    stride = -(-frames // media.MAX_VIDEO_FRAMES)
    targets = list(range(0, frames, stride))[:media.MAX_VIDEO_FRAMES]
    off = max(abs(g - t) for g, t in zip(got, targets)) if len(got) == len(targets) else None
    print(f"kept {len(got)} frames, indices {got[:3]} ... {got[-2:]} of 0..{frames - 1} "
          f"(last at {got[-1] / (frames - 1):.1%} of the clip); targets every {stride} frames, largest miss "
          f"{off} frames; in order: {got == sorted(set(got))}; same as before: {got == before}; "
          f"fps {new[-1][2].fps:.4f} (before {old[-1][2].fps:.4f})")


if __name__ == "__main__":
    main()
