"""Long media: a long clip is read by seeking to the frames it keeps (an hour at 30 fps was decoded whole,
108,000 frames, for 64), a short one frame by frame as before; audio cut at its limits says so."""

import logging
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile as sf

from mmllm.data import media
from mmllm.data.media import load_audio, load_video

BITS, STRIPE, H, BAND = 12, 4, 32, 12  # the frame index as black/white stripes (one per bit) in the top band
_Y, _X = np.mgrid[BAND:H, 0:BITS * STRIPE]


def _indexed(i: int) -> np.ndarray:
    """Frame ``i``: its index in stripes above a smoothly moving pattern (which x264 codes with B-frames)."""
    arr = np.zeros((H, BITS * STRIPE, 3), np.uint8)
    for bit in range(BITS):
        if i >> bit & 1:
            arr[:BAND, bit * STRIPE:(bit + 1) * STRIPE] = 255
    arr[BAND:] = (127 + 100 * np.sin((_X + 0.7 * i) / 7) * np.cos((_Y + 0.3 * i) / 5))[..., None].astype(np.uint8)
    return arr


def _index(img) -> int:
    row = np.asarray(img)[BAND // 2]
    return sum(1 << bit for bit in range(BITS) if row[bit * STRIPE + STRIPE // 2, 0] > 128)


def _clip(path, pts, fmt="mp4", codec="libx264", time_base=Fraction(1, 10), gop=30, b_frames=None):
    """Frame i at ``pts[i]`` (in ``time_base``), showing i."""
    with av.open(str(path), mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = BITS * STRIPE, H, "yuv420p"
        stream.codec_context.gop_size = gop
        if b_frames is not None:
            stream.codec_context.max_b_frames = b_frames
        stream.codec_context.time_base = time_base
        for i, t in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(_indexed(i), format="rgb24")
            frame.pts, frame.time_base = t, time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _sequential(path, max_frames):
    with av.open(str(path)) as container:
        return media._decode_sequentially(container, container.streams.video[0], max_frames)


@pytest.fixture
def seeks(monkeypatch):
    """The timestamps load_video seeks to."""
    calls, real = [], media._seek

    def spy(container, stream, pts):
        calls.append(pts)
        real(container, stream, pts)

    monkeypatch.setattr(media, "_seek", spy)
    return calls


@pytest.mark.parametrize("name,fmt,codec,start,counted", [
    ("long.mp4", "mp4", "libx264", 0, True),  # frame count in the header, B-frames
    ("late.mp4", "mp4", "libx264", 500, True),  # first frame at 50 s
    ("long.avi", "avi", "mpeg4", 0, True),
    ("long.mkv", "matroska", "libx264", 0, False),  # no frame count: the container's duration; B-frames
    ("long.webm", "webm", "libvpx-vp9", 0, False),
])
def test_a_long_clip_is_read_by_seeking_to_the_frames_it_keeps(tmp_path, seeks, name, fmt, codec, start, counted):
    """Every frame was decoded to keep every 150th; now each kept frame is sought: the targets, spread over
    the whole clip, in order, at the fps of the frames kept. Where the clip announces its frame count, these
    are the very frames decoding every frame keeps (where it does not, that kept every 128th: 0 .. 896)."""
    path = _clip(tmp_path / name, [start + i for i in range(1200)], fmt, codec)
    video = load_video(path, max_frames=8)
    assert [_index(f) for f in video.frames] == list(range(0, 1200, 150))
    assert len(seeks) == 8  # the 7 frames after the first, and where the clip announces its end
    assert video.fps == pytest.approx(10 / 150)
    if counted:
        before = _sequential(path, 8)
        assert [np.asarray(f).tolist() for f in video.frames] == [np.asarray(f).tolist() for f in before.frames]
        assert video.fps == before.fps


def test_a_long_avi_with_b_frames_keeps_the_frames_decoding_every_frame_keeps(tmp_path, seeks):
    """AVI stores no presentation times: with B-frames ffmpeg shows its first frame at pts 1, a frame after the
    stream's start_time 0. Targets counted from start_time kept the frame before each one (149, 299, ...), and
    no check noticed; they are counted from the first frame, as decoding every frame counts."""
    path = _clip(tmp_path / "bframes.avi", range(1200), "avi", "mpeg4", b_frames=2)
    video, before = load_video(path, max_frames=8), _sequential(path, 8)
    assert [_index(f) for f in video.frames] == list(range(0, 1200, 150))
    assert [np.asarray(f).tolist() for f in video.frames] == [np.asarray(f).tolist() for f in before.frames]
    assert len(seeks) == 8  # each lands on its keyframe (it landed a frame late, then a stride early, and read on)


def test_a_long_clip_decodes_about_a_keyframe_interval_per_kept_frame(tmp_path, monkeypatch):
    """1200 frames, a keyframe every 40 (never on a kept one but 0 and 600): decoding every frame handed back
    1200; seeking decodes at most the 40 from a keyframe to each of the 8 kept frames and to the announced end
    (fewer: B-frames before a kept frame are not decoded)."""
    path = _clip(tmp_path / "long.mp4", range(1200), gop=40)
    before = _sequential(path, 8)
    # the frames the seeking reader's decoder hands back (av.Packet.decode cannot be patched: PyAV 14-17's
    # Packet is an immutable type), and no falling back to decoding every frame
    decoded, real = [], media._Frames._decode

    def counting(self, container, stream):
        for frame in real(self, container, stream):
            decoded.append(frame.pts)
            yield frame

    def no_fallback(*args):
        raise AssertionError("decoded frame by frame")

    monkeypatch.setattr(media._Frames, "_decode", counting)
    monkeypatch.setattr(media, "_decode_sequentially", no_fallback)
    video = load_video(path, max_frames=8)
    assert 8 <= len(decoded) <= 9 * 40
    assert [np.asarray(f).tolist() for f in video.frames] == [np.asarray(f).tolist() for f in before.frames]


def test_frames_sought_in_a_long_phone_clip_are_upright(tmp_path, seeks):
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = BITS * STRIPE, H, "yuv420p"
        if not hasattr(stream, "set_display_rotation"):  # PyAV 14.1-17 read a display matrix, cannot write one
            pytest.skip(f"PyAV {av.__version__} cannot write a display rotation (18 can)")
        stream.set_display_rotation(-90)
        for i in range(1200):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_indexed(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    video = load_video(path, max_frames=8)
    assert seeks and {f.size for f in video.frames} == {(H, BITS * STRIPE)}  # portrait
    assert [_index(f.rotate(90, expand=True)) for f in video.frames] == list(range(0, 1200, 150))


def test_a_short_clip_is_decoded_frame_by_frame_as_before(tmp_path, seeks):
    path = _clip(tmp_path / "short.mp4", range(600))  # 75 frames between kept ones: not worth seeking
    video, before = load_video(path, max_frames=8), _sequential(path, 8)
    assert seeks == []
    assert [np.asarray(f).tolist() for f in video.frames] == [np.asarray(f).tolist() for f in before.frames]
    assert [_index(f) for f in video.frames] == list(range(0, 600, 75)) and video.fps == before.fps


@pytest.mark.parametrize("name,fmt", [("vfr.mp4", "mp4"), ("vfr.mkv", "matroska")])
def test_a_long_variable_rate_clip_keeps_frames_spread_over_its_time(tmp_path, seeks, name, fmt):
    """500 frames at 10 fps (50 s), then 500 at 40 fps (12.5 s): the kept frames are evenly spread over
    the clip's time."""
    ms = [i * 100 for i in range(500)] + [50_000 + i * 25 for i in range(500)]
    path = _clip(tmp_path / name, ms, fmt, time_base=Fraction(1, 1000))
    video = load_video(path, max_frames=4)
    assert seeks
    times = [ms[_index(f)] for f in video.frames]
    # a quarter of the clip's 62.5 s apart (within 3 frames of 10 fps), where the frame counts would be
    # 0, 25, 50, 56.25 s: most of the kept frames from the first, slow part
    assert len(times) == 4 and times == sorted(times)
    assert all(abs(t - k * 15_625) <= 300 for k, t in enumerate(times)), times


def test_keyframes_further_apart_than_the_kept_frames_decode_on_without_seeking_again(tmp_path, seeks):
    """One keyframe for the whole clip: each seek would land on the first frame and decode up to its target
    (about 4x the clip here); after the first such landing decoding carries on from there."""
    path = _clip(tmp_path / "one_keyframe.mp4", range(1200), gop=100_000)
    video = load_video(path, max_frames=8)
    assert len(seeks) == 1
    assert [_index(f) for f in video.frames] == list(range(0, 1200, 150))


def test_a_long_mpeg_ts_clip_is_read_by_seeking_to_its_end_too(tmp_path, seeks, caplog):
    """MPEG-TS has no index: asked for the clip's announced end, its seek landed past the last keyframe with
    nothing to decode, and the clip, sought through already, was decoded again frame by frame (keeping every
    256th frame, 0 .. 1024, as it announces no frame count)."""
    path = _clip(tmp_path / "long.ts", range(1200), "mpegts")
    with caplog.at_level(logging.DEBUG, logger="mmllm.data.media"):
        video = load_video(path, max_frames=8)
    assert seeks and "frame by frame" not in caplog.text
    assert [_index(f) for f in video.frames] == list(range(0, 1200, 150))
    assert video.fps == pytest.approx(10 / 150)


def _seek_past(container, stream, pts):
    container.seek(pts + int(40 / stream.time_base), stream=stream)  # 40 s (400 frames) late


def _seek_refused(container, stream, pts):
    raise av.error.PermissionError(1, "seek refused")


@pytest.mark.parametrize("broken", [_seek_past, _seek_refused])
def test_a_broken_seek_falls_back_to_decoding_every_frame(tmp_path, monkeypatch, caplog, broken):
    path = _clip(tmp_path / "long.mp4", range(1200))
    monkeypatch.setattr(media, "_seek", broken)
    with caplog.at_level(logging.DEBUG, logger="mmllm.data.media"):
        video = load_video(path, max_frames=8)
    assert "decoding it frame by frame" in caplog.text and "long.mp4" in caplog.text
    assert [_index(f) for f in video.frames] == list(range(0, 1200, 150))


def test_a_fault_of_the_seeking_code_itself_is_warned_of_not_hidden(tmp_path, monkeypatch, caplog):
    """Any exception fell back to decoding every frame at DEBUG: a PyAV whose API moved (an attribute gone, a
    setter's type) would have left every long clip decoded whole, unseen. Such a fault is a WARNING, once."""
    path = _clip(tmp_path / "long.mp4", range(1200))

    def moved_api(container, stream, pts):
        raise AttributeError("'VideoStream' object has no attribute 'seek'")

    monkeypatch.setattr(media, "_seek", moved_api)
    monkeypatch.setattr(media, "_SEEK_FAULT_WARNED", set(), raising=False)
    with caplog.at_level(logging.WARNING, logger="mmllm.data.media"):
        for _ in range(2):
            assert [_index(f) for f in load_video(path, max_frames=8).frames] == list(range(0, 1200, 150))
    (record,) = caplog.records
    assert "long.mp4" in record.getMessage() and "AttributeError" in record.getMessage()


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_a_clip_longer_or_shorter_than_announced_falls_back(tmp_path, monkeypatch, caplog, seeks, factor):
    """A clip announcing half its length had its second half left out; one announcing twice its length ran out
    of frames: either is found out while seeking, and the clip decoded frame by frame."""
    path = _clip(tmp_path / "long.mp4", range(2400))
    real = media._announced_length
    monkeypatch.setattr(media, "_announced_length",
                        lambda c, s: tuple(type(v)(v * factor) for v in real(c, s)))
    with caplog.at_level(logging.DEBUG, logger="mmllm.data.media"):
        video = load_video(path, max_frames=8)
    assert seeks and "decoding it frame by frame" in caplog.text
    assert [_index(f) for f in video.frames] == list(range(0, 2400, 300))  # the whole clip


# ------------------------------------------------------------------------------------------ audio


def test_audio_cut_at_its_length_limit_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(media, "MAX_AUDIO_SECONDS", 1.0, raising=False)
    sf.write(tmp_path / "long.flac", np.zeros((48_000, 2), np.float32), 16_000)
    sf.write(tmp_path / "exact.flac", np.zeros((16_000, 2), np.float32), 16_000)
    with caplog.at_level(logging.WARNING, logger="mmllm.data.media"):
        assert load_audio(tmp_path / "exact.flac").waveform.shape == (16_000, 2)
        assert caplog.records == []  # exactly the limit: nothing cut
        for _ in range(2):  # read again (the next epoch): no second warning
            assert load_audio(tmp_path / "long.flac").waveform.shape == (16_000, 2)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "long.flac" in message and "3.0 s" in message and "first 1.0 s" in message and "were kept" in message
    assert "MAX_AUDIO_SECONDS" in message


def test_audio_cut_at_its_sample_budget_says_so_in_both_decoders(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(media, "MAX_AUDIO_VALUES", 2**14, raising=False)
    for load in (media.load_audio, media._load_audio_av):  # soundfile, and PyAV where soundfile cannot read it
        path = tmp_path / f"wide{load.__name__}.flac"
        sf.write(path, np.zeros((8_000, 8), np.float32), 8_000)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mmllm.data.media"):
            assert load(path).waveform.shape == (2**14 // 8, 8)
        (record,) = caplog.records
        message = record.getMessage()
        assert path.name in message and "1.0 s long" in message and "first 0.3 s" in message, message
        assert "MAX_AUDIO_VALUES" in message


def test_audio_cut_warnings_stop_naming_files_after_a_few(tmp_path, monkeypatch, caplog):
    """Each cut file was remembered (and named) for the whole process: over a corpus of long recordings the set
    grew by every file. After CUT_AUDIO_NAMED_MAX files one warning says further ones go unnamed."""
    monkeypatch.setattr(media, "MAX_AUDIO_SECONDS", 0.5, raising=False)
    monkeypatch.setattr(media, "CUT_AUDIO_NAMED_MAX", 3, raising=False)
    monkeypatch.setattr(media, "_CUT_AUDIO_WARNED", set())
    paths = [tmp_path / f"long{k}.wav" for k in range(6)]
    for path in paths:
        sf.write(path, np.zeros((8_000, 1), np.float32), 8_000)
    with caplog.at_level(logging.WARNING, logger="mmllm.data.media"):
        for _ in range(2):
            for path in paths:
                assert load_audio(path).waveform.shape == (4_000, 1)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4 and len(media._CUT_AUDIO_WARNED) <= 4
    assert [p.name for p in paths[:3]] == [m.split()[1].rsplit("/", 1)[-1] for m in messages[:3]]
    assert "long3.wav is cut too" in messages[3] and "further cut audio files are not named" in messages[3]
