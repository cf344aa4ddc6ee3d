"""Files from someone else: what a shared output folder, a requests file, its media or a dataset can make mmllm do.
Each test plays an attack that worked before its fix (links planted where mmllm writes, media whose decoders
run other programs or fetch other files, decompression bombs) and checks it is refused with a line that names
the file, while the user's own files stay as they were."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mmllm.cli import main
from mmllm.folder_lock import LOCK_NAME, LinkedLockFile, hold_folder, waiting_lock
from mmllm.inference import runner
from mmllm.inference.runner import OutputError, run_requests


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file of the user's that a link planted in a folder mmllm writes leads to."""
    path = tmp_path / "victim.txt"
    path.write_text("the user's own file\nwithout a newline at its end")
    return path


def test_a_link_planted_as_a_folders_lock_file_is_refused_and_its_target_left_alone(tmp_path, victim):
    """The lock file was opened through the link, cut, rewritten, and at the end deleted: the target, as the
    lock was kept by its resolved path (an infer run deleted any file the user may delete)."""
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / LOCK_NAME)
    with pytest.raises(LinkedLockFile, match=rf"{LOCK_NAME} is a symbolic link \(to {victim}\).*Remove the link"):
        with hold_folder(out, "mmllm infer", "give this run another --output"):
            pass
    assert victim.read_text() == "the user's own file\nwithout a newline at its end"
    with pytest.raises(LinkedLockFile):  # the waiting lock of the feature cache and GGUF conversions too
        with waiting_lock(out / LOCK_NAME, "goes on"):
            pass
    assert victim.read_text() == "the user's own file\nwithout a newline at its end"


def test_a_folders_lock_is_still_taken_and_removed_as_before(tmp_path):
    out = tmp_path / "out"
    with hold_folder(out, "mmllm infer", "-"):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with hold_folder(out, "mmllm infer", "-"):  # taken again by its holder
            pass
        assert (out / LOCK_NAME).is_file()
    assert not (out / LOCK_NAME).exists()


def test_a_linked_results_file_in_the_output_is_refused_before_anything_is_written(tiny_model, tmp_path, victim,
                                                                                   caplog):
    """A results.jsonl link (an output folder that came with the requests, or one others can write) had its
    target's last line cut as "a partial record" and every answer appended to it."""
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "results.jsonl")
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "r1", "prompt": "Hello"}\n')
    checkpoint = tiny_model.save_pretrained(tmp_path / "ckpt")
    argv = ["infer", "--checkpoint", str(checkpoint), "--input", str(requests), "--output", str(out),
            "--max-new-tokens", "2"]
    assert main(argv) == 2
    assert "results.jsonl is a symbolic link" in caplog.text and "Remove the link" in caplog.text
    with pytest.raises(OutputError, match="results.jsonl is a symbolic link"):  # the Python API too
        run_requests(tiny_model, requests, out, max_new_tokens=2)
    assert victim.read_text() == "the user's own file\nwithout a newline at its end"


def test_a_results_file_linked_after_the_check_is_not_written_through(tmp_path, victim):
    os.symlink(victim, tmp_path / "results.jsonl")
    with pytest.raises(OSError):
        runner._append_record(tmp_path / "results.jsonl", {"id": "r1"})
    with pytest.raises(OSError):
        runner._repair_tail(tmp_path / "results.jsonl")
    assert victim.read_text() == "the user's own file\nwithout a newline at its end"


# --------------------------------------------------------------------------------------------
# Media a requests file or a dataset names
# --------------------------------------------------------------------------------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"


@pytest.mark.parametrize("name", ["cat.png", "cat.eps", "cat.jpg"])
def test_postscript_named_as_an_image_never_reaches_ghostscript(tmp_path, monkeypatch, name):
    """Pillow picks the format from the bytes: a received cat.png holding PostScript was handed to Ghostscript
    (run where gs is installed; here the call is caught before it would start)."""
    from PIL import EpsImagePlugin

    from mmllm.data.media import MediaError, load_image

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append(args))
    (tmp_path / name).write_bytes(EPS)
    with pytest.raises(MediaError, match=rf"{name}: it holds PostScript \(EPS\).*convert it to PNG"):
        load_image(tmp_path / name)
    assert calls == []


def test_images_of_the_formats_mmllm_reads_still_load(tmp_path):
    from PIL import Image

    from mmllm.data.media import load_image

    for suffix in (".png", ".jpg", ".webp", ".bmp", ".gif", ".tif"):
        Image.new("RGB", (6, 4), (200, 10, 10)).save(tmp_path / f"red{suffix}")
        img = load_image(tmp_path / f"red{suffix}")
        assert img.size == (6, 4) and img.getpixel((0, 0))[0] > 150


def test_audio_of_many_channels_and_a_high_rate_is_decoded_only_up_to_a_sample_budget(tmp_path, monkeypatch):
    """Audio was cut at 600 s whatever its rate and channels: 3.4 MB of FLAC silence at 655 kHz with 8 channels
    decoded to an 11.7 GiB array. A budget of samples over all channels bounds it (shrunk here to stay small)."""
    import soundfile as sf

    from mmllm.data import media

    assert media.audio_frame_limit(48_000, 2) == 600 * 48_000  # 10 minutes of 48 kHz stereo fit as before
    path = tmp_path / "bomb.flac"
    sf.write(path, np.zeros((96_000, 8), dtype=np.int16), 48_000, subtype="PCM_16")
    monkeypatch.setattr(media, "MAX_AUDIO_VALUES", 2**16, raising=False)
    for load in (media.load_audio, media._load_audio_av):  # soundfile, and PyAV where soundfile cannot read it
        audio = load(path)
        assert audio.waveform.shape == (2**16 // 8, 8), load.__name__
        assert audio.sample_rate == 48_000
