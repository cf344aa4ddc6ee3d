"""Real media decoding on files the tests write: images in every mode, audio in several containers,
channel counts and rates, video clips short and long; and each way a file can be unusable."""

import io

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmllm.config import ComponentSpec
from mmllm.data import media
from mmllm.data.media import Audio, MediaError, load_audio, load_image, load_media, load_video, resample

RED, BLUE = (230, 20, 20), (20, 20, 230)


# ------------------------------------------------------------------------------------------ images


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), RED)
    img.paste(Image.new("RGB", (10, 10), BLUE), (10, 0))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.mode == "RGB" and out.size == (10, 20)
    top, bottom = np.asarray(out)[2, 5], np.asarray(out)[17, 5]
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # red on top, blue below


def _exif(entries):
    """A little-endian EXIF block with the given (tag, type, count, 4-byte value) entries."""
    import struct

    body = struct.pack("<2sHIH", b"II", 42, 8, len(entries))
    body += b"".join(struct.pack("<HHI4s", *entry) for entry in entries)
    return b"Exif\x00\x00" + body + struct.pack("<I", 0)


def test_a_malformed_exif_tag_neither_crashes_nor_loses_the_orientation(tmp_path):
    """ImageWidth written as text (as some cameras and editors do): ImageOps.exif_transpose raised
    struct.error re-serialising it, which no caller catches (training died mid-epoch, data check too)."""
    import struct

    img = Image.new("RGB", (20, 10), RED)
    img.paste(Image.new("RGB", (10, 10), BLUE), (10, 0))
    exif = _exif([(0x0100, 2, 4, b"cam\x00"), (0x0112, 3, 1, struct.pack("<HH", 6, 0))])
    img.save(tmp_path / "odd.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "odd.jpg")
    assert out.mode == "RGB" and out.size == (10, 20)
    top, bottom = np.asarray(out)[2, 5], np.asarray(out)[17, 5]
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # turned as the orientation tag says


def test_image_modes_become_rgb(tmp_path):
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 4, 8))
    pal.save(tmp_path / "pal.png", transparency=1)  # index 1 (blue) is transparent
    rgba = Image.new("RGBA", (8, 8), (*RED, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 4, 8))
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "gray.jpg", quality=100)
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "gray16.png")
    Image.new("LA", (8, 8), (200, 0)).save(tmp_path / "la.png")
    Image.new("RGB", (8, 8), BLUE).save(tmp_path / "x.webp", lossless=True)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    px = {name: tuple(np.asarray(load_image(tmp_path / name))[4, 6]) for name in
          ("pal.png", "rgba.png", "gray.jpg", "gray16.png", "la.png", "x.webp", "cmyk.jpg")}
    assert px["pal.png"] == (255, 0, 0) and tuple(np.asarray(load_image(tmp_path / "pal.png"))[4, 1]) == (255,) * 3
    assert px["rgba.png"] == RED and tuple(np.asarray(load_image(tmp_path / "rgba.png"))[4, 1]) == (255,) * 3
    assert px["gray.jpg"][0] == px["gray.jpg"][1] == px["gray.jpg"][2] and abs(int(px["gray.jpg"][0]) - 77) <= 2
    assert px["gray16.png"] == (255, 255, 255)
    assert px["la.png"] == (255, 255, 255)  # fully transparent -> the white background
    assert px["x.webp"] == BLUE
    assert px["cmyk.jpg"][0] > 200 and px["cmyk.jpg"][1] < 60


def test_unusable_images_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    for name, needle in (("missing.png", "not found"), ("empty.png", "empty"), ("text.png", "cannot decode"),
                         ("cut.jpg", "cannot decode")):
        with pytest.raises(MediaError, match=needle) as err:
            load_image(tmp_path / name)
        assert name in str(err.value)
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(MediaError, match="too large.*big.png"):
        load_image(tmp_path / "big.png")


# ------------------------------------------------------------------------------------------ audio


def _tone(rate, seconds, channels, freq=440.0):
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1).astype(np.float32)


@pytest.mark.parametrize("fmt,rate,channels", [("WAV", 22050, 3), ("FLAC", 44100, 2), ("MP3", 32000, 1),
                                               ("WAV", 7919, 6)])
def test_audio_any_container_channel_count_and_rate(tmp_path, fmt, rate, channels):
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, _tone(rate, 0.5, channels), rate, format=fmt)
    audio = load_audio(path)
    assert audio.sample_rate == rate and audio.waveform.shape[1] == channels
    assert audio.waveform.dtype == np.float32 and abs(audio.duration - 0.5) < 0.1
    out = audio.resampled(16000)
    assert out.sample_rate == 16000 and abs(out.waveform.shape[0] - audio.waveform.shape[0] * 16000 / rate) <= 2
    spectrum = np.abs(np.fft.rfft(out.mono()))
    assert abs(np.argmax(spectrum) * 16000 / len(out.mono()) - 440) < 15  # the tone survives resampling


def test_audio_reaches_the_encoder_at_its_rate(tmp_path):
    from mmllm import registry
    from mmllm.encoders.hf_audio import HFAudioEncoder

    encoder = registry.build("encoder", ComponentSpec.parse({"kind": "hf-audio", **HFAudioEncoder.tiny_options()},
                                                            "e"), "e")
    sf.write(tmp_path / "a.wav", _tone(44100, 0.3, 4), 44100)
    sf.write(tmp_path / "b.wav", _tone(16000, 0.3, 1), 16000)
    a, b = (encoder.preprocess([load_audio(tmp_path / n)]) for n in ("a.wav", "b.wav"))
    assert a.shape == b.shape and encoder(a).shape[1:] == (encoder.num_tokens, encoder.output_dim)


def test_a_long_recording_is_decoded_up_to_its_head_only(tmp_path, monkeypatch):
    """An hour of 48 kHz stereo was decoded whole (1.4 GB of float32), then resampled whole, for an encoder
    that keeps its first 10-30 s; now decoding stops at MAX_AUDIO_SECONDS (here 1 s), in both decoders."""
    monkeypatch.setattr(media, "MAX_AUDIO_SECONDS", 1.0, raising=False)
    wave = _tone(16000, 3.0, 2)
    sf.write(tmp_path / "long.flac", wave, 16000)
    with av.open(str(tmp_path / "long.m4a"), mode="w", format="mp4") as out:  # soundfile cannot: PyAV decodes
        stream = out.add_stream("aac", rate=16000)
        for start in range(0, 48000, 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[start:start + 1024].T), format="fltp",
                                               layout="stereo")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    for name in ("long.flac", "long.m4a"):
        audio = load_audio(tmp_path / name)
        assert audio.sample_rate == 16000 and audio.waveform.shape == (16000, 2), name
    assert np.allclose(load_audio(tmp_path / "long.flac").waveform, wave[:16000], atol=1e-3)  # the head


def test_unusable_audio_names_the_file(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"RIFF....WAVEjunkjunkjunk" * 4)
    sf.write(tmp_path / "nan.wav", np.array([0.0, np.nan, 0.1], dtype=np.float32), 16000, subtype="FLOAT")
    sf.write(tmp_path / "silent.flac", np.zeros((0, 1), dtype=np.float32), 16000)
    for name, needle in (("junk.wav", "cannot decode"), ("nan.wav", "NaN"), ("silent.flac", "no samples|empty"),
                         ("gone.mp3", "not found")):
        with pytest.raises(MediaError, match=needle) as err:
            load_audio(tmp_path / name)
        assert name in str(err.value)
    assert resample(np.ones((10, 2), np.float32), 16000, 16000).shape == (10, 2)
    assert Audio(np.zeros(5, np.float32), 8000).waveform.shape == (5, 1)


# ------------------------------------------------------------------------------------------ video


def _clip(path, frames, codec, fmt, fps=10):
    with av.open(str(path), mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(frames):
            arr = np.zeros((32, 32, 3), np.uint8)
            arr[..., 0] = min(255, i * 250 // max(frames - 1, 1))  # red grows with the frame index
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _red(img):
    arr = np.asarray(img)
    return int(arr[arr.shape[0] // 2, arr.shape[1] // 2, 0])


@pytest.mark.parametrize("name,codec,fmt", [("long.mp4", "libx264", "mp4"),  # frame count in the header
                                             ("long.webm", "libvpx-vp9", "webm")])  # count unknown: decimated
def test_long_clips_are_sampled_over_their_whole_length(tmp_path, name, codec, fmt):
    video = load_video(_clip(tmp_path / name, 40, codec, fmt), max_frames=8)
    assert 4 <= len(video.frames) <= 8
    reds = [_red(f) for f in video.frames]
    assert reds[0] < 30 and reds[-1] > 180 and reds == sorted(reds)  # first to (almost) last frame, in order
    assert abs(len(video.frames) / video.fps - 4.0) <= 1.0  # fps is that of the frames kept: duration holds
    picked = [_red(f) for f in video.sample_frames(4)]
    assert picked == sorted(picked) and picked[0] == reds[0] and picked[-1] == reds[-1]


def test_large_frames_are_scaled_down_as_they_are_decoded(tmp_path):
    """64 kept frames of a 4K clip were 1.6 GB per sample, at full size, where an encoder reads a few
    hundred pixels a side; now each frame is at most MAX_VIDEO_FRAME_PIXELS, its aspect kept."""
    path = tmp_path / "big.mp4"
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 2048, 1152, "yuv420p"
        arr = np.zeros((1152, 2048, 3), np.uint8)
        arr[:, 1024:, 2] = 200  # right half blue
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    video = load_video(path)
    (w, h), = {f.size for f in video.frames}
    assert 0.95 * 1024 * 1024 < w * h <= 1024 * 1024  # media.MAX_VIDEO_FRAME_PIXELS
    assert abs(w / h - 2048 / 1152) < 0.01
    left, right = np.asarray(video.frames[0])[h // 2, w // 4], np.asarray(video.frames[0])[h // 2, 3 * w // 4]
    assert left[2] < 40 and right[2] > 160
    small = load_video(_clip(tmp_path / "small.mp4", 2, "libx264", "mp4"))
    assert small.frames[0].size == (32, 32)  # small clips are decoded as they are


@pytest.mark.parametrize("rotation,blue_at", [(90, "top"), (-90, "bottom"), (180, "left")])
def test_a_clip_is_turned_as_its_display_matrix_says(tmp_path, rotation, blue_at):
    """Phones store a portrait clip as landscape frames and a display rotation; frames were decoded as
    stored, on their side (images had their EXIF orientation applied, videos not)."""
    path = tmp_path / "phone.mp4"
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        if not hasattr(stream, "set_display_rotation"):  # PyAV 14.1-17 read a display matrix, cannot write one
            pytest.skip(f"PyAV {av.__version__} cannot write a display rotation (18 can)")
        stream.set_display_rotation(rotation)  # counter-clockwise, as VideoFrame.rotation reads it back
        arr = np.zeros((32, 64, 3), np.uint8)
        arr[:, 32:, 2] = 220  # stored: right half blue
        for _ in range(2):
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    frame = np.asarray(load_video(path).frames[0])
    assert frame.shape[:2] == ((32, 64) if rotation == 180 else (64, 32))
    h, w = frame.shape[:2]
    probe = {"top": frame[h // 4, w // 2], "bottom": frame[3 * h // 4, w // 2], "left": frame[h // 2, w // 4]}
    opposite = {"top": "bottom", "bottom": "top", "left": "right"}[blue_at]
    probe["right"] = frame[h // 2, 3 * w // 4]
    assert probe[blue_at][2] > 150 and probe[opposite][2] < 60


def test_short_clips_repeat_frames(tmp_path):
    short = load_video(_clip(tmp_path / "short.webm", 3, "libvpx-vp9", "webm"))
    assert len(short.frames) == 3 and len(short.sample_frames(8)) == 8
    frames = [Image.new("RGB", (16, 16), (i * 80, 0, 0)) for i in range(2)]
    frames[0].save(tmp_path / "two.gif", save_all=True, append_images=frames[1:], duration=100)
    gif = load_media("video", tmp_path / "two.gif")
    assert [_red(f) for f in gif.sample_frames(4)] == [0, 0, 80, 80]


def test_unusable_video_names_the_file(tmp_path):
    with av.open(str(tmp_path / "sound.mp4"), mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50)
    for name, needle in (("sound.mp4", "no video stream"), ("junk.mp4", "cannot decode"),
                         ("gone.webm", "not found")):
        with pytest.raises(MediaError, match=needle) as err:
            load_video(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(MediaError, match="unknown modality"):
        load_media("smell", tmp_path / "x")
