"""Decoding and encoding of media files, with errors that say what is wrong and where.

Decoded forms used throughout mmllm:

* image -> ``PIL.Image.Image`` in RGB (EXIF orientation applied; grayscale and 16-bit grayscale
  scaled to 8 bits; RGBA, LA and palette images with transparency composited on white; the first
  frame of an animated file);
* audio -> :class:`Audio` (float32 ``(samples, channels)`` in [-1, 1] and its sample rate; any
  channel count and rate -- encoders down-mix and resample to their own rate with :func:`resample`;
  at most the first :data:`MAX_AUDIO_SECONDS`, and at most :data:`MAX_AUDIO_VALUES` samples over all channels;
  a file cut so is named in one warning per process, the first :data:`CUT_AUDIO_NAMED_MAX` such files);
* video -> :class:`Video` (RGB PIL frames of at most :data:`MAX_VIDEO_FRAME_PIXELS`, larger ones scaled
  down, and fps). A long clip is sampled, never cut: at most ``max_frames`` frames, evenly spread over the
  *whole* clip, are kept (a very long one is read by seeking to them, :func:`load_video`); a short one keeps
  every frame and :meth:`Video.sample_frames` repeats frames to fill what an encoder asks.

:func:`media_decode_version` names this behaviour per modality (:data:`MEDIA_DECODE_VERSION`, and
:data:`VIDEO_DECODE_VERSION` for video); it is part of the feature cache's fingerprint, so bump the one whose
decoding changes what an encoder would see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmllm.atomic import atomic_write

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg"}
VIDEO_EXTENSIONS = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"}
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs before decoding them
MAX_VIDEO_FRAMES = 64  # frames kept per clip, evenly spread over its whole length
# a larger video frame is scaled down (aspect kept) as it is decoded: 64 kept 4K frames are 1.6 GB per clip,
# where video encoders read a few hundred pixels a side
MAX_VIDEO_FRAME_PIXELS = 1024 * 1024
# audio is decoded up to this long (its head): an hour of 48 kHz stereo is 1.4 GB of float32 before the
# encoder resamples it all and keeps its own max_seconds (CLAP's, AST's 10 s, Whisper's 30 s)
MAX_AUDIO_SECONDS = 600.0
# and at most this many samples over all channels (256 MiB of float32; 600 s of 48 kHz stereo is 57.6 M): a
# compressed file of high rate and many channels is a decompression bomb (3.4 MB of FLAC silence at 655 kHz,
# 8 channels, 600 s asked for 11.7 GiB). Such a file keeps a shorter head, still longer than encoders read.
MAX_AUDIO_VALUES = 64 * 2**20
MEDIA_DECODE_VERSION = "3"  # bump when decoding changes (invalidates cached encoder features)
# video's own: "4" since long clips are read by seeking, which keeps other frames than "3" kept from a long
# variable-rate clip or one announcing no frame count (MKV, WebM, MPEG-TS); images' and audio's caches stay valid
VIDEO_DECODE_VERSION = "4"


def media_decode_version(modality: str) -> str:
    """The version of how files of ``modality`` are decoded, part of its encoder's cache fingerprint."""
    return VIDEO_DECODE_VERSION if modality == "video" else MEDIA_DECODE_VERSION


class MediaError(ValueError):
    """A media file cannot be used; the message names the file and the reason."""


# What reading and preparing one sample raises when the data, not the code, is at fault: training skips
# such a sample (StageDataset), the cache.require check counts its file as unreadable, and `mmllm cache` and
# `mmllm data check` report it.
SAMPLE_ERRORS: tuple[type[Exception], ...] = (MediaError, ValueError, OSError, RuntimeError, EOFError)


@dataclass
class Audio:
    waveform: np.ndarray  # float32 (samples, channels)
    sample_rate: int

    def __post_init__(self) -> None:
        if self.waveform.ndim == 1:
            self.waveform = self.waveform[:, None]
        self.waveform = np.asarray(self.waveform, dtype=np.float32)

    @property
    def duration(self) -> float:
        return self.waveform.shape[0] / float(self.sample_rate)

    def mono(self) -> np.ndarray:
        return self.waveform.mean(axis=1)

    def resampled(self, rate: int) -> Audio:
        return Audio(resample(self.waveform, self.sample_rate, rate), rate)


@dataclass
class Video:
    frames: list[Image.Image] = field(default_factory=list)
    fps: float = 8.0

    def sample_frames(self, n: int) -> list[Image.Image]:
        """``n`` frames evenly spaced over the clip (repeating frames of a short clip)."""
        if not self.frames:
            raise MediaError("video has no frames")
        idx = np.linspace(0, len(self.frames) - 1, n).round().astype(int)
        return [self.frames[i] for i in idx]


def resample(waveform: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Polyphase resampling along axis 0 (anti-aliased); exact ratio unless it is very uneven."""
    if src_rate == dst_rate:
        return waveform.astype(np.float32)
    from scipy.signal import resample_poly

    frac = Fraction(dst_rate, src_rate)
    if max(frac.numerator, frac.denominator) > 50_000:  # e.g. 7919 Hz: approximate within 0.1 %
        frac = frac.limit_denominator(1000)
    out = resample_poly(waveform, frac.numerator, frac.denominator, axis=0)
    return out.astype(np.float32)


def _check_file(path: Path, kind: str) -> None:
    if not path.exists():
        raise MediaError(f"{kind} file not found: {path}")
    if not path.is_file():
        raise MediaError(f"{kind} path is not a file: {path}")
    if path.stat().st_size == 0:
        raise MediaError(f"{kind} file is empty: {path}")


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose applies it)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# Pillow formats never opened: EPS hands the file to Ghostscript, another program with a long record of exploits
# (PIL picks the format from the bytes, so a received "cat.png" holding PostScript ran it where gs is installed)
REFUSED_IMAGE_FORMATS = frozenset({"EPS"})


def _image_formats() -> list[str]:
    """The Pillow formats :func:`load_image` tries: every one installed but :data:`REFUSED_IMAGE_FORMATS`."""
    Image.init()
    return [name for name in Image.OPEN if name not in REFUSED_IMAGE_FORMATS]


def _refuse_postscript(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] == b"%!" or head == b"\xc5\xd0\xd3\xc6":  # PostScript, or DOS EPS with its binary header
        raise MediaError(f"cannot decode image {path}: it holds PostScript (EPS), which mmllm does not open (it "
                         "would run Ghostscript on it); convert it to PNG first")


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    _check_file(path, "image")
    _refuse_postscript(path)
    try:
        with Image.open(path, formats=_image_formats()) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise MediaError(
                    f"image too large: {path} is {img.width}x{img.height} "
                    f"(> {MAX_IMAGE_PIXELS} pixels); downscale it first"
                )
            return _to_rgb(_upright(img))
    except MediaError:
        raise
    except Exception as exc:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise MediaError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says. Only the tag is read: ImageOps.exif_transpose also
    rewrites the rest of the EXIF block, which fails (struct.error) on a tag of the wrong type that
    cameras and editors do write, though the pixels and the orientation are fine."""
    img.load()
    orientation = img.getexif().get(0x0112, 1)
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return img.transpose(method) if method is not None else img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit grayscale: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def load_audio(path: str | Path) -> Audio:
    import soundfile as sf

    path = Path(path)
    _check_file(path, "audio")
    try:
        with sf.SoundFile(str(path)) as fh:
            rate, channels, total = fh.samplerate, fh.channels, fh.frames
            limit = audio_frame_limit(rate, channels)
            data = fh.read(frames=limit + 1, dtype="float32", always_2d=True)  # one more: is there more?
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        try:
            return _load_audio_av(path)
        except Exception:
            raise MediaError(f"cannot decode audio {path}: {exc}") from exc
    if data.shape[0] > limit:
        data = data[:limit]
        _warn_audio_cut(path, limit, int(rate), channels, total / rate if total > limit else None)
    return _checked_audio(path, data, int(rate))


_CUT_AUDIO_WARNED: set[str] = set()  # files whose cut was reported: once per process, not once per epoch
# files named so at most: a corpus of long recordings would otherwise grow the set (and the log) by every file
CUT_AUDIO_NAMED_MAX = 100


def _warn_audio_cut(path: Path, kept: int, rate: int, channels: int, seconds: float | None) -> None:
    """Log (once per file, for the first :data:`CUT_AUDIO_NAMED_MAX` files) that only the head of ``path`` was
    decoded, and why; then once that further cut files go unnamed."""
    if str(path) in _CUT_AUDIO_WARNED or len(_CUT_AUDIO_WARNED) > CUT_AUDIO_NAMED_MAX:
        return
    if len(_CUT_AUDIO_WARNED) == CUT_AUDIO_NAMED_MAX:
        _CUT_AUDIO_WARNED.add("")  # the set's last entry: this is said once
        log.warning("audio %s is cut too, as the %d files named above were; further cut audio files are not "
                    "named (CUT_AUDIO_NAMED_MAX)", path, CUT_AUDIO_NAMED_MAX)
        return
    _CUT_AUDIO_WARNED.add(str(path))
    if kept < int(MAX_AUDIO_SECONDS * rate):
        why = (f"MAX_AUDIO_VALUES: at most {MAX_AUDIO_VALUES} samples over all channels, here {channels} channels "
               f"at {rate} Hz")
    else:
        why = f"MAX_AUDIO_SECONDS: at most {MAX_AUDIO_SECONDS:g} s"
    length = f"is {seconds:.1f} s long" if seconds else "is longer"
    log.warning("audio %s %s; only its first %.1f s (%d frames) were kept (%s); cut it into shorter files to "
                "use the rest", path, length, kept / rate, kept, why)


def audio_frame_limit(rate: float, channels: int) -> int:
    """How many frames of audio at ``rate`` with ``channels`` are decoded: :data:`MAX_AUDIO_SECONDS` of it, fewer
    where that would hold more than :data:`MAX_AUDIO_VALUES` samples."""
    return max(1, min(int(MAX_AUDIO_SECONDS * rate), MAX_AUDIO_VALUES // max(1, channels)))


def _checked_audio(path: Path, data: np.ndarray, rate: int) -> Audio:
    if data.shape[0] == 0:
        raise MediaError(f"audio file has no samples: {path}")
    if rate <= 0:
        raise MediaError(f"audio file has sample rate {rate}: {path}")
    if not np.isfinite(data).all():
        raise MediaError(f"audio file holds NaN or infinite samples: {path}")
    return Audio(data, rate)


def _load_audio_av(path: Path) -> Audio:
    import av

    with av.open(str(path)) as container:
        stream = next(s for s in container.streams if s.type == "audio")
        chunks, samples, limit, cut = [], 0, audio_frame_limit(stream.rate or 1, 1), False
        for frame in container.decode(stream):
            if samples >= limit:
                cut = True  # a frame beyond the limit
                break
            arr = frame.to_ndarray()
            limit = audio_frame_limit(stream.rate or 1, len(frame.layout.channels))
            if arr.dtype != np.float32:
                arr = arr.astype(np.float32) / max(np.iinfo(arr.dtype).max, 1) if arr.dtype.kind == "i" else arr
            if frame.format.is_planar:
                arr = arr.T
            else:
                arr = arr.reshape(-1, len(frame.layout.channels))
            chunks.append(arr)
            samples += arr.shape[0]
        rate, channels = stream.rate, chunks[-1].shape[1] if chunks else 1
        seconds = _announced_seconds(container, stream)
    if not chunks:
        raise MediaError(f"audio file has no samples: {path}")
    data = np.concatenate(chunks, axis=0)
    if cut or data.shape[0] > limit:
        data = data[:limit]
        _warn_audio_cut(path, limit, int(rate), channels, seconds if seconds and seconds * rate > limit else None)
    return _checked_audio(path, data, int(rate))


def _announced_seconds(container: Any, stream: Any) -> float | None:
    """How long a stream says it lasts (its own duration, else the container's), or None where it does not."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # av.time_base
    return None


def load_video(path: str | Path, max_frames: int = MAX_VIDEO_FRAMES) -> Video:
    """Decode a clip, keeping at most ``max_frames`` frames evenly spread over its whole length.

    A clip that announces its length and is long enough (a stride of at least :data:`SEEK_MIN_STRIDE` frames
    between kept frames) is read by seeking to each kept frame (:func:`_decode_by_seeking`), decoding about a
    keyframe interval per kept frame instead of every frame; any other clip, and a long one whose seeking fails,
    is decoded frame by frame (:func:`_decode_sequentially`). Both keep the same frames of a constant-rate clip
    whose length is announced truly."""
    import av

    path = Path(path)
    _check_file(path, "video")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    try:
        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is None:
                raise MediaError(f"no video stream in {path}")
            plan = _seek_plan(container, stream, max_frames)
            if plan is not None:
                try:
                    return _decode_by_seeking(container, stream, plan)
                except Exception as exc:  # any failure of the shortcut: decode every frame instead
                    _log_seek_failure(path, exc)
        with av.open(str(path)) as container:
            stream = next(s for s in container.streams if s.type == "video")
            video = _decode_sequentially(container, stream, max_frames)
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot decode video {path}: {exc}") from exc
    if not video.frames:
        raise MediaError(f"video has no frames: {path}")
    return video


_SEEK_FAULT_WARNED: set[str] = set()  # kinds of unexpected seeking failure already warned of, once per process


def _log_seek_failure(path: Path, exc: Exception) -> None:
    """A clip that cannot be sought (:class:`_SeekFailed`, an FFmpeg error) is said at DEBUG: decoding it frame by
    frame is what every clip had. Any other exception is a fault of the shortcut itself (a PyAV whose API moved),
    which would leave every long clip decoded whole, unseen: a WARNING, once per kind of exception."""
    import av

    message = f"seeking through {path} failed ({type(exc).__name__}: {exc}); decoding it frame by frame"
    if isinstance(exc, (_SeekFailed, av.error.FFmpegError)):
        log.debug("%s", message)
    elif type(exc).__name__ not in _SEEK_FAULT_WARNED:
        _SEEK_FAULT_WARNED.add(type(exc).__name__)
        log.warning("%s, which for a long clip is many times slower; this is a fault of mmllm's seeking "
                    "(PyAV %s): please report it", message, av.__version__)
    else:
        log.debug("%s", message)


def _decode_sequentially(container: Any, stream: Any, max_frames: int) -> Video:
    """Every frame decoded, every ``stride``-th kept: ceil(frames / max_frames) where the stream announces
    its frame count, else 1, doubled whenever more than ``max_frames`` would be kept."""
    fps = float(stream.average_rate or stream.guessed_rate or 8.0)
    stride = max(1, -(-int(stream.frames or 0) // max_frames))  # known length: ceil(frames / max)
    kept: list[tuple[int, Image.Image]] = []
    for index, frame in enumerate(container.decode(stream)):
        if index % stride:
            continue
        kept.append((index, _frame_image(frame)))
        if len(kept) > max_frames:  # longer than announced: keep every other frame, double the stride
            kept = kept[::2]
            stride *= 2
    return Video([img for _, img in kept[:max_frames]], fps / stride)  # fps of the frames kept


# a clip is read by seeking when its kept frames are at least this many frames apart: seeking decodes from the
# keyframe at or before each kept frame, about half a keyframe interval (x264's default interval is 250 frames,
# phones' 30-60), so it wins where frames between kept ones outnumber that; shorter clips are decoded whole
SEEK_MIN_STRIDE = 120


@dataclass(frozen=True)
class _SeekPlan:
    """Where the frames kept from a long clip are, in its stream's time base."""

    targets: list[int]  # pts of the frames to keep: one every `stride` frames from the first
    tolerance: float  # half a frame: the first frame after target - tolerance is the one kept
    end: int  # announced end of the clip
    spacing: int  # between targets
    fps: float  # of the frames kept


class _SeekFailed(RuntimeError):
    """Seeking gave frames that cannot be the ones asked for; the clip is decoded frame by frame instead."""


def _announced_length(container: Any, stream: Any) -> tuple[int, float] | None:
    """(frames, seconds) the clip says it lasts -- the stream's frame count and duration, else the container's
    duration at the stream's average rate -- or None where it does not say."""
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    seconds = _announced_seconds(container, stream)
    frames = int(stream.frames or 0)
    if frames <= 0 and seconds and fps > 0:
        frames = round(seconds * fps)
    if frames <= 0:
        return None
    if not seconds or seconds <= 0:
        if fps <= 0:
            return None
        seconds = frames / fps
    return frames, seconds


def _seek_plan(container: Any, stream: Any, max_frames: int) -> _SeekPlan | None:
    """The frames to seek to in a long clip of announced length (as :func:`_decode_sequentially` keeps them
    from a constant-rate clip: every ``stride``-th from the first), or None where the clip is to be decoded
    frame by frame: short, of unknown length or time base."""
    length = _announced_length(container, stream)
    if length is None or not stream.time_base:
        return None
    frames, seconds = length
    stride = -(-frames // max_frames)
    if stride < SEEK_MIN_STRIDE:
        return None
    per_frame = seconds / frames / float(stream.time_base)  # average frame duration in time-base units
    start = int(stream.start_time or 0)
    count = min(max_frames, -(-frames // stride))
    fps = float(stream.average_rate or stream.guessed_rate or frames / seconds)
    return _SeekPlan(targets=[start + round(k * stride * per_frame) for k in range(count)],
                     tolerance=per_frame / 2, end=start + round(frames * per_frame),
                     spacing=max(1, round(stride * per_frame)), fps=fps / stride)


def _seek(container: Any, stream: Any, pts: int) -> None:
    """Position the demuxer on the keyframe at or before ``pts`` (the stream's time base); flushes the decoder."""
    container.seek(pts, stream=stream, backward=True)


class _Frames:
    """The decoded frames of a stream from where its demuxer is. Frames no one asks for -- before the time
    :meth:`first_after` looks for -- are not decoded where nothing refers to them (B-frames mostly: the
    decoder's ``skip_frame``). A packet without a pts fails: PyAV numbers such frames by decode order, which
    means nothing after a seek."""

    def __init__(self, container: Any, stream: Any) -> None:
        self._wanted = float("-inf")
        self._pending: Any | None = None
        self._frames = self._decode(container, stream)

    def _decode(self, container: Any, stream: Any):
        context = stream.codec_context
        for packet in container.demux(stream):
            if packet.pts is None and packet.size:
                raise _SeekFailed("a packet has no presentation timestamp")
            context.skip_frame = "NONREF" if packet.pts is not None and packet.pts <= self._wanted else "DEFAULT"
            yield from packet.decode()

    def peek(self) -> Any | None:
        """The next frame, left to come next; None at the end."""
        if self._pending is None:
            self._pending = next(self._frames, None)
        return self._pending

    def next(self) -> Any | None:
        """The next frame, None at the end."""
        if self._pending is not None:
            frame, self._pending = self._pending, None
            return frame
        return next(self._frames, None)

    def first_after(self, pts: float) -> Any | None:
        """The first frame after ``pts`` (None where the stream ends before it)."""
        self._wanted = pts
        while (frame := self.next()) is not None:
            if frame.pts is None:
                raise _SeekFailed("a frame has no presentation timestamp")
            if frame.pts > pts:
                return frame
        return None


def _decode_by_seeking(container: Any, stream: Any, plan: _SeekPlan) -> Video:
    """The frames of ``plan``: for each target, the first frame less than half a frame before it or later,
    decoded from the keyframe at or before it. Where a seek lands at or before the last frame kept (keyframes are
    further apart than the targets), decoding carries on from there without seeking again. Raises
    :class:`_SeekFailed` on frames that are not what was asked for: a seek landing past its target, frames
    out of order or repeated, the clip ending before a target or going on past its announced end."""
    frames = _Frames(container, stream)  # from the start: the first target is the first frame
    first = frames.first_after(float("-inf"))
    if first is None:
        raise _SeekFailed("the clip has no frame")
    plan = _counted_from(plan, first.pts)
    seeking = True
    kept: list[tuple[int, Image.Image]] = [(first.pts, _frame_image(first))]
    for target in plan.targets[1:]:
        if seeking:
            frames, landed = _seek_to(container, stream, target, plan)
            seeking = landed > kept[-1][0]
        frame = frames.first_after(target - plan.tolerance)
        if frame is None:
            raise _SeekFailed(f"the clip ended before pts {target} (it announced {plan.end})")
        if frame.pts <= kept[-1][0]:  # kept holds the first frame from the start
            raise _SeekFailed(f"frame at pts {frame.pts} came after one at {kept[-1][0]}")
        kept.append((frame.pts, _frame_image(frame)))
    if seeking:
        frames, _ = _seek_to(container, stream, plan.end, plan)
    if frames.first_after(plan.end + plan.spacing) is not None:
        raise _SeekFailed(f"the clip goes on past its announced end (pts {plan.end})")
    return Video([img for _, img in kept], plan.fps)


def _counted_from(plan: _SeekPlan, first: int) -> _SeekPlan:
    """``plan`` with its targets (and end) counted from the clip's first frame, at pts ``first``, as decoding
    every frame counts them, rather than from the stream's ``start_time``: an AVI with B-frames (no presentation
    times stored; ffmpeg makes them from decode times) shows its first frame at pts 1, a frame after its start."""
    shift = first - plan.targets[0]
    return replace(plan, targets=[t + shift for t in plan.targets], end=plan.end + shift)


def _seek_to(container: Any, stream: Any, target: int, plan: _SeekPlan, tries: int = 3) -> tuple[_Frames, int]:
    """Seek for ``target``: (the frames from the keyframe landed on, that keyframe's pts). A demuxer whose
    index holds decode timestamps lands a little late in a clip with B-frames, and one without an index (MPEG-TS)
    may land past the last keyframe, with nothing to decode, when asked for the clip's end: each retry asks a
    spacing earlier."""
    landed = "nothing to decode"
    for attempt in range(tries):
        _seek(container, stream, max(plan.targets[0], target - attempt * plan.spacing))
        frames = _Frames(container, stream)
        first = frames.peek()
        if first is not None and first.pts is None:
            raise _SeekFailed(f"a frame has no presentation timestamp after seeking to pts {target}")
        if first is not None and first.pts <= target + plan.tolerance:
            return frames, first.pts
        landed = "nothing to decode" if first is None else f"landed at {first.pts}, past it"
    raise _SeekFailed(f"seeking to pts {target}: {landed}")


# a display matrix's counter-clockwise rotation (VideoFrame.rotation: phones record portrait clips as
# landscape frames plus -90) -> the transpose that shows the frame upright
_DISPLAY_ROTATION = {90: Image.Transpose.ROTATE_90, -90: Image.Transpose.ROTATE_270, 270: Image.Transpose.ROTATE_270,
                     180: Image.Transpose.ROTATE_180, -180: Image.Transpose.ROTATE_180}


def _frame_image(frame: Any) -> Image.Image:
    """A decoded frame as an upright RGB image (its display rotation applied, as EXIF orientation is to
    images) of at most :data:`MAX_VIDEO_FRAME_PIXELS` (scaled down, aspect kept)."""
    w, h = frame.width, frame.height
    if w * h <= MAX_VIDEO_FRAME_PIXELS:
        img = frame.to_image().convert("RGB")
    else:
        scale = (MAX_VIDEO_FRAME_PIXELS / (w * h)) ** 0.5
        size = max(1, int(w * scale)), max(1, int(h * scale))
        img = frame.reformat(width=size[0], height=size[1], format="rgb24", interpolation="AREA").to_image()
    method = _DISPLAY_ROTATION.get(round(getattr(frame, "rotation", 0) or 0))
    return img.transpose(method) if method is not None else img


def load_media(modality: str, path: str | Path):
    loaders = {"image": load_image, "audio": load_audio, "video": load_video}
    if modality not in loaders:
        raise MediaError(f"unknown modality {modality!r}; valid: {', '.join(loaders)}")
    return loaders[modality](path)


# --------------------------------------------------------------------------------------------
# Writers (atomic: write to a temporary file in the same folder, then rename)
# --------------------------------------------------------------------------------------------


def save_image(image: Image.Image, path: str | Path, metadata: dict[str, str] | None = None,
               sync_folder: bool = True) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(k, str(v))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), sync_folder)


# libsndfile drops a RIFF INFO string longer than about 2045 UTF-8 bytes, silently and whole (libsndfile 1.2)
WAV_COMMENT_BYTES = 2000


def cut_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, never inside a character."""
    return text.encode()[:limit].decode(errors="ignore")


def save_audio(audio: Audio, path: str | Path, metadata: dict[str, str] | None = None,
               sync_folder: bool = True) -> Path:
    """16-bit PCM WAV; metadata goes into the RIFF INFO comment, cut to :data:`WAV_COMMENT_BYTES` (the
    metadata's last entry is the one a cut shortens)."""
    import soundfile as sf

    def write(tmp: Path) -> None:
        with sf.SoundFile(tmp, "w", samplerate=audio.sample_rate, channels=audio.waveform.shape[1],
                          subtype="PCM_16", format="WAV") as fh:
            if metadata:
                fh.comment = cut_utf8("; ".join(f"{k}={v}" for k, v in metadata.items()), WAV_COMMENT_BYTES)
            fh.write(np.clip(audio.waveform, -1.0, 1.0))

    return atomic_write(path, write, sync_folder)


def save_video(video: Video, path: str | Path, metadata: dict[str, str] | None = None,
               sync_folder: bool = True) -> Path:
    """MP4 (H.264) when the suffix is .mp4 and an encoder is available, else an animated GIF. A GIF's
    metadata goes whole into its comment extension (a chain of 255-byte sub-blocks, which Pillow writes and
    reads back joined)."""
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        try:
            return _save_mp4(video, path, metadata, sync_folder)
        except Exception as exc:  # no H.264 encoder in this build of PyAV
            log.warning("MP4 encoding failed (%s); writing GIF instead", exc)
            path = path.with_suffix(".gif")
    frames = video.frames
    return atomic_write(path, lambda tmp: frames[0].save(
        tmp, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / max(video.fps, 1)),
        loop=0, comment=("; ".join(f"{k}={v}" for k, v in (metadata or {}).items())).encode()), sync_folder)


def save_media(modality: str, item: Any, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save one decoded item of ``modality`` (image, audio or video) atomically; returns the path written."""
    savers = {"image": save_image, "audio": save_audio, "video": save_video}
    if modality not in savers:
        raise ValueError(f"unknown modality {modality!r}; valid: {', '.join(savers)}")
    return savers[modality](item, path, metadata)


def _save_mp4(video: Video, path: Path, metadata: dict[str, str] | None, sync_folder: bool = True) -> Path:
    import av

    w, h = video.frames[0].size
    # H.264 with yuv420p needs even sizes; upscale small clips so players show them.
    scale = max(1, 128 // max(min(w, h), 1))
    W, H = (w * scale) // 2 * 2, (h * scale) // 2 * 2

    def write(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            for k, v in (metadata or {}).items():
                container.metadata[k] = str(v)
            stream = container.add_stream("libx264", rate=Fraction(video.fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            for img in video.frames:
                frame = av.VideoFrame.from_image(img.convert("RGB").resize((W, H), Image.NEAREST))
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    return atomic_write(path, write, sync_folder)
