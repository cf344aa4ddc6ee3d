"""Files from someone else: what a shared output folder, a requests file, its media or a dataset can make mmllm do.
Each test plays an attack that worked before its fix (links planted where mmllm writes, media whose decoders
run other programs or fetch other files, decompression bombs) and checks it is refused with a line that names
the file, while the user's own files stay as they were."""

from __future__ import annotations

import json
import os
import re
import shutil
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


# --------------------------------------------------------------------------------------------
# JSON from others: requests, datasets, a checkpoint's mmllm.json
# --------------------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, deeper than Python's parser recurses


@pytest.mark.parametrize(("bad_lines", "says"), [
    # RecursionError out of read_lines
    ([DEEP, f'{{"id": "deep", "prompt": "hi", "seed": {DEEP}}}'], ["malformed request (JSON nested too deeply)$"] * 2),
    # json.loads raises ValueError, not JSONDecodeError, for an integer of over 4300 digits
    ([f'{{"id": "big", "prompt": "hi", "seed": {"9" * 5000}}}'], ["malformed request (not valid JSON: Exceeds the limit"]),
])
def test_a_request_line_json_cannot_read_is_that_lines_error_and_the_rest_is_answered(tiny_model, tmp_path,
                                                                                       bad_lines, says):
    """Each stopped the run with a traceback, no request answered."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(f"{line}\n" for line in bad_lines) + '{"id": "r1", "prompt": "Hello"}\n')
    counts = run_requests(tiny_model, requests, tmp_path / "out", max_new_tokens=2)
    assert (counts["done"], counts["failed"]) == (1, len(bad_lines))
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    errors = {rec["id"]: rec["error"] for rec in records}
    for n, said in enumerate(says, 1):
        assert re.match(f"requests.jsonl:{n}: " + re.escape(said.removesuffix("$")) + ("$" if said.endswith("$") else ""),
                        errors[f"line-{n}"]), errors  # "$": the whole message
    assert errors["r1"] is None


@pytest.mark.parametrize("layout", ["lines", "array"])
def test_a_dataset_record_nested_too_deeply_is_a_data_error_naming_its_line(tmp_path, layout):
    from mmllm.data.formats import DataFormatError, iter_records

    path = tmp_path / "data.jsonl"
    ok = '{"caption": "a", "image": "a.png"}'
    path.write_text(f"{ok}\n{DEEP}\n{ok}\n" if layout == "lines" else f"[{ok},\n{DEEP}]\n")
    got = list(iter_records(path))
    assert got[0] == (1, json.loads(ok))
    line, error = got[1]
    assert line == 2 and isinstance(error, DataFormatError) and "nested too deeply" in str(error)
    assert str(error).startswith(f"{path}:2: ")


@pytest.mark.parametrize("layout", ["lines", "array"])
def test_a_dataset_record_with_an_integer_too_long_to_convert_is_a_data_error_naming_its_line(tmp_path, layout):
    """An integer of more than 4300 digits raised ValueError out of the reader: a traceback naming no file."""
    from mmllm.data.formats import read_records

    path = tmp_path / "data.json"
    ok = '{"caption": "a", "image_name": "a.jpg"}'
    huge = '{"caption": "b", "image_name": "b.jpg", "n": ' + "1" * 5000 + "}"
    path.write_text(f"{ok}\n{huge}\n{ok}\n" if layout == "lines" else f"[{ok},\n{huge},\n{ok}]\n")
    records, errors = read_records(path, "nextgpt-pairs")
    assert len(records) == (2 if layout == "lines" else 1) and len(errors) == 1
    assert errors[0].startswith(f"{path}:2: not valid JSON (an integer of more than 4300 digits")


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, tiny_assembly) -> Path:
    from mmllm.model import AnyToAnyModel

    return AnyToAnyModel.assemble(tiny_assembly).save_pretrained(tmp_path_factory.mktemp("ckpt") / "step-1")


@pytest.mark.parametrize(("change", "says"), [
    (lambda meta: DEEP, "unreadable (RecursionError"),
    (lambda meta: '{"n": ' + "1" * 5000 + "}", "unreadable (ValueError: Exceeds the limit"),
    (lambda meta: [meta], "holds a JSON list, not an mmllm checkpoint's object"),
    (lambda meta: {**meta, "assembly": 5}, "'assembly' is int '5', not the mapping mmllm writes"),
    (lambda meta: {**meta, "tokens": "abc"}, "'tokens' is str 'abc', not the mapping"),
    (lambda meta: {**meta, "assembly": {**meta["assembly"], "llm": [1, 2]}}, "'assembly.llm' is list '[1, 2]'"),
])
def test_a_checkpoint_config_of_other_types_is_refused_by_name(saved_checkpoint, tmp_path, change, says):
    """Whoever made the checkpoint also lists its hashes: a list or a number where mmllm writes a mapping stopped
    loading with a bare AttributeError or TypeError (a traceback from the CLI) rather than a CheckpointError."""
    from mmllm.model import AnyToAnyModel
    from mmllm.training import checkpoint as ckpt

    copy = Path(shutil.copytree(saved_checkpoint, tmp_path / "step-1"))
    changed = change(json.loads((copy / "mmllm.json").read_text()))
    (copy / "mmllm.json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    ckpt.write_manifest(copy)
    with pytest.raises(ckpt.CheckpointError, match=f"{copy / 'mmllm.json'}: .*" + re.escape(says)):
        AnyToAnyModel.from_pretrained(copy)


@pytest.mark.parametrize("header", ["offsets past the end", "header of exabytes"])
def test_a_safetensors_header_that_lies_is_a_checkpoint_error(saved_checkpoint, tmp_path, header):
    """safetensors itself refuses both before allocating anything; it reached the CLI as a bare SafetensorError."""
    import struct

    from mmllm.model import AnyToAnyModel
    from mmllm.training import checkpoint as ckpt

    copy = Path(shutil.copytree(saved_checkpoint, tmp_path / "step-1"))
    weights = copy / "learned.safetensors"
    raw = weights.read_bytes()
    if header == "offsets past the end":
        size = struct.unpack("<Q", raw[:8])[0]
        meta = json.loads(raw[8:8 + size])
        name = next(k for k in meta if k != "__metadata__")
        meta[name].update(shape=[100_000, 100_000], data_offsets=[0, 4 * 10**10])
        text = json.dumps(meta).encode()
        weights.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])
    else:
        weights.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    ckpt.write_manifest(copy)
    with pytest.raises(ckpt.CheckpointError, match=f"{weights}: not a readable safetensors file"):
        AnyToAnyModel.from_pretrained(copy)


# --------------------------------------------------------------------------------------------
# A GGUF core from someone else
# --------------------------------------------------------------------------------------------


def _gguf(path: Path, metadata: bytes, n_kv: int = 1) -> Path:
    import struct

    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + metadata)
    return path


def _kv(key: bytes, kind: int, value: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(key)) + key + struct.pack("<I", kind) + value


def _bombs(tmp_path: Path) -> dict[str, Path]:
    """100-byte GGUF files whose header claims what the gguf package's reader allocates, element by element."""
    import struct

    return {
        "array length": _gguf(tmp_path / "array.gguf", _kv(b"general.name", 9, struct.pack("<IQ", 4, 2**40) + bytes(64))),
        "string of": _gguf(tmp_path / "string.gguf", _kv(b"general.name", 8, struct.pack("<Q", 2**60) + b"x" * 16)),
        "metadata count": _gguf(tmp_path / "count.gguf", _kv(b"general.name", 4, bytes(4)), n_kv=2**40),
    }


def test_a_gguf_header_claiming_more_than_its_file_holds_is_refused_and_a_real_one_accepted(tmp_path):
    import gguf

    from mmllm.config import ConfigError
    from mmllm.gguf_header import check_gguf_header

    for what, path in _bombs(tmp_path).items():
        with pytest.raises(ConfigError, match=rf"{path}: not a GGUF file mmllm reads \({what}.*(past the end|does "
                                              "not fit)"):
            check_gguf_header(path)
    writer = gguf.GGUFWriter(str(tmp_path / "ok.gguf"), "llama")
    writer.add_name("tiny")
    writer.add_token_list(["a", "b", "<s>"])
    writer.add_token_scores([0.0, 1.0, 2.0])
    writer.add_chat_template("{{ messages }}")
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    check_gguf_header(tmp_path / "ok.gguf")
    assert len(gguf.GGUFReader(tmp_path / "ok.gguf").tensors) == 1


def test_a_gguf_bomb_is_refused_before_transformers_reads_it(tiny_assembly, tmp_path, monkeypatch):
    """Its conversion handed the file to transformers, whose gguf reader took memory until the machine ran out
    (caught here before transformers is reached, so the test stays small whatever the code does)."""
    import transformers

    from mmllm import registry
    from mmllm.config import ConfigError, parse_assembly, to_dict

    def reached(*args, **kwargs):
        raise AssertionError("the GGUF file reached transformers' reader unchecked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", reached)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", reached)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", reached)
    monkeypatch.delenv("MMLLM_GGUF_CACHE", raising=False)
    bomb = _bombs(tmp_path)["array length"]
    data = to_dict(tiny_assembly)
    data["llm"] = {"kind": "hf-causal-lm", "name_or_path": str(tmp_path), "gguf_file": bomb.name,
                   "gguf_cache": str(tmp_path / "cache")}
    with pytest.raises(ConfigError, match="array length of general.name 1099511627776"):
        registry.build("llm", parse_assembly(data).llm, "llm")
    assert not any((tmp_path / "cache").glob("*/config.json"))


# --------------------------------------------------------------------------------------------
# Conversations of thousands of turns
# --------------------------------------------------------------------------------------------


def _chat(turns: int):
    from mmllm.data.formats import MediaRoot, ReadContext, parse_chat

    rec = {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(turns)]}
    return parse_chat(rec, ReadContext(Path("chat.jsonl"), MediaRoot(Path("."))), "chat.jsonl:1")


def test_a_conversation_of_thousands_of_turns_renders_only_what_its_context_reaches(tiny_model, monkeypatch):
    """Each reply was placed by rendering the whole conversation up to it: 1600 short turns took 7 s, 16000 over
    ten minutes, for a sample truncated to max_length tokens anyway (now 0.03 s both)."""
    from mmllm.data import template
    from mmllm.training.loop import token_spec

    spec = token_spec(tiny_model)
    renders = []
    real = template._render
    monkeypatch.setattr(template, "_render", lambda *args, **kwargs: renders.append(1) or real(*args, **kwargs))
    sample = template._encode_conversation(_chat(1_000), tiny_model.llm.tokenizer, spec)
    assert sample.truncated and len(sample.input_ids) == spec.max_length
    assert len(renders) < 100  # it was 1000: two per reply (now those of the 64 messages kept, and one)


@pytest.mark.parametrize("turns", [70, 300])
def test_cutting_a_long_conversation_to_its_context_changes_nothing_it_encodes(tiny_model, monkeypatch, turns):
    from mmllm.data import template
    from mmllm.training.loop import token_spec

    spec = token_spec(tiny_model)
    cut = template._encode_conversation(_chat(turns), tiny_model.llm.tokenizer, spec)
    monkeypatch.setattr(template, "LONG_CONVERSATION", 10**9, raising=False)
    whole = template._encode_conversation(_chat(turns), tiny_model.llm.tokenizer, spec)
    assert cut == whole and cut.truncated


def test_a_media_path_with_a_nul_is_that_requests_error_on_every_run(tiny_model, tmp_path):
    """The first run failed the request, but every later one (resuming, or --overwrite) stopped before answering
    anything: os.stat raised ValueError on the path in the checks of earlier answers."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "nul", "prompt": "What is it?", "image": "a\\u0000b.png"}\n'
                        '{"id": "r1", "prompt": "Hello"}\n')
    out = tmp_path / "out"
    for overwrite in (False, False, True):
        counts = run_requests(tiny_model, requests, out, max_new_tokens=2, overwrite=overwrite)
        assert counts["failed"] == 1 and counts["done"] + counts["skipped"] == 1
    errors = {rec["id"]: rec["error"] for rec in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert "'image' holds a path with a NUL character" in errors["nul"]


def test_a_link_planted_at_the_gallery_is_replaced_not_written_through(tiny_model, tmp_path):
    """atomic_write writes straight into a target that is not a regular file (for a /dev/stdout the user gives):
    a link planted at index.html (or at an answer's predictable media name, below) led the write into a device
    or a FIFO (which blocks the run)."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "r1", "prompt": "Hello"}\n')
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(os.devnull, out / "index.html")  # stands for a disk, a terminal or a FIFO
    run_requests(tiny_model, requests, out, max_new_tokens=2)
    gallery = out / "index.html"
    assert gallery.is_file() and not gallery.is_symlink() and "r1" in gallery.read_text()


def test_links_planted_at_an_answers_media_names_are_replaced_not_written_through(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from mmllm.data.media import Audio, Video

    out = tmp_path / "out"
    (out / "media").mkdir(parents=True)
    for m, suffix in (("image", ".png"), ("audio", ".wav"), ("video", ".mp4"), ("video", ".gif")):
        os.symlink(os.devnull, out / "media" / f"{runner._safe('r1')}_{m}0{suffix}")
    frames = [Image.new("RGB", (16, 16), (200, 0, 0)) for _ in range(4)]
    result = SimpleNamespace(media={"image": [frames[0]], "audio": [Audio(np.zeros(1600, np.float32), 16_000)],
                                    "video": [Video(frames, 8.0)]})
    files = runner.write_outputs(out, "r1", result, "p", 0, "fp")
    assert len(files) == 3
    for rel in files:
        assert (out / rel).is_file() and not (out / rel).is_symlink() and (out / rel).stat().st_size > 0, rel


def _chat_with_a_long_user_turn(at: int, with_image: bool):
    """A system turn, then short exchanges, the user turn at message ``at`` long (with an image, if asked)."""
    from mmllm.data.formats import MediaRoot, ReadContext, parse_chat

    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(1, 200):
        messages.append({"role": "user" if i % 2 else "assistant", "content": f"turn {i}"})
    messages[at]["content"] = ("<image> " if with_image else "") + "word " * 2000
    if with_image:
        messages[at]["media"] = ["photo.png"]
    return parse_chat({"messages": messages}, ReadContext(Path("chat.jsonl"), MediaRoot(Path("."))), "chat.jsonl:1")


@pytest.mark.parametrize("with_image", [False, True])
def test_a_cut_long_conversation_keeps_a_long_user_turn_its_context_reaches(tiny_model, monkeypatch, with_image):
    """The cut was at the 64th message, here a user turn (after the system one) whose words run past the context.
    The text encoded ends at the last reply placed, so the cut one lost that turn: fewer tokens, untruncated (the
    retain loss counts every token of a text-only row), and with an image in it, a sample refused ("0 placeholders
    in the text but 1 media items") that encoded whole."""
    from mmllm.data import template
    from mmllm.training.loop import token_spec

    spec = token_spec(tiny_model)
    spec.max_length = 1500  # the 63 short messages before the long turn fit in it
    cut = template._encode_conversation(_chat_with_a_long_user_turn(63, with_image), tiny_model.llm.tokenizer, spec)
    monkeypatch.setattr(template, "LONG_CONVERSATION", 10**9, raising=False)
    whole = template._encode_conversation(_chat_with_a_long_user_turn(63, with_image), tiny_model.llm.tokenizer, spec)
    assert whole.truncated and len(whole.input_ids) == spec.max_length and len(whole.media) == int(with_image)
    assert cut == whole


def test_a_manifest_or_cache_index_with_an_integer_too_long_to_convert_is_refused_by_name(saved_checkpoint, tmp_path):
    """json.loads raises ValueError, not JSONDecodeError, for an integer of over 4300 digits: both files were let
    through as a bare ValueError (a traceback, exit 70) instead of the error naming the file."""
    from mmllm.data.cache import INDEX, CacheError, FeatureCache
    from mmllm.model import AnyToAnyModel
    from mmllm.training import checkpoint as ckpt

    huge = '{"files": ' + "1" * 5000 + "}"
    copy = Path(shutil.copytree(saved_checkpoint, tmp_path / "step-1"))
    (copy / ckpt.MANIFEST).write_text(huge)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{copy / ckpt.MANIFEST}: unreadable manifest")):
        AnyToAnyModel.from_pretrained(copy)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / INDEX).write_text(huge)
    with pytest.raises(CacheError, match=re.escape(f"{cache / INDEX}: unreadable cache index")):
        FeatureCache(cache)
