"""Batch inference (`mmllm infer`) on a tiny checkpoint trained to route: text -> image/audio/video
and image/audio/video -> text end to end through the CLI; outputs and their metadata; the same
output alone or in a batch; every bad input an error record while the rest completes; resume, and
a re-run with another checkpoint or settings refused; a failing request or decoder batch isolated;
the GIF fallback; the gallery's markup."""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import weakref
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmllm.cli import main, torch_threads  # tiny models are overhead-bound: one thread is faster
from mmllm.data.media import Audio, save_audio, save_video
from mmllm.data.samples import moving, tone
from mmllm.inference import runner
from mmllm.inference.gallery import latest_records, render_gallery
from mmllm.inference.generate import Request, Settings, _trim, generate_answers, prepare_request
from mmllm.inference.runner import checkpoint_fingerprint, run_requests
from mmllm.inference.tiny import train_tiny_checkpoint
from mmllm.model import AnyToAnyModel

GENERATE = {"image": "Generate an image: a red circle", "audio": "Generate a sound: a high beep",
            "video": "Generate a video: a blue square moving left"}
FILE_SUFFIX = {"image": (".png",), "audio": (".wav",), "video": (".mp4", ".gif")}


def trained_checkpoint(tmp_path_factory) -> Path:
    """Train once per session (~15 s), shared by every test module that asks (a marker file in basetemp)."""
    root = tmp_path_factory.getbasetemp() / "infer-tiny"
    marker = root / "checkpoint.txt"
    if not marker.is_file():
        with torch_threads(1):
            ckpt = train_tiny_checkpoint(root)
        marker.write_text(str(ckpt))
    return Path(marker.read_text())


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def media(ckpt) -> Path:
    return ckpt.parents[1] / "samples" / "media"  # written by train_tiny_checkpoint


@pytest.fixture(scope="module")
def model(ckpt):
    return AnyToAnyModel.from_pretrained(ckpt).eval()


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def write_requests(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def records_by_id(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def read_media(path: Path) -> np.ndarray:
    if path.suffix == ".wav":
        return sf.read(path, dtype="int16")[0]
    if path.suffix in (".mp4", ".gif"):
        with av.open(str(path)) as c:
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    return np.asarray(Image.open(path))


# ------------------------------------------------------------------------------------------ end to end


def test_cli_answers_text_to_media_and_media_to_text(ckpt, media, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "shape.png").write_bytes((media / "red_circle.png").read_bytes())
    (inp / "beep.wav").write_bytes((media / "high.wav").read_bytes())
    save_video(moving("green", "square", "right"), inp / "clip.mp4")
    requests = write_requests(inp / "requests.jsonl", [
        {"id": "to-image", "prompt": GENERATE["image"], "seed": 1},
        {"id": "to-audio", "prompt": GENERATE["audio"]},
        {"id": "to-video", "prompt": GENERATE["video"]},
        {"id": "from-image", "prompt": "What is this?", "image": "shape.png"},  # relative to the requests file
        {"id": "from-audio", "prompt": "What do you hear?", "media": ["beep.wav"]},  # modality from the suffix
        {"id": "from-video", "messages": [{"role": "user", "content": "Hello"},
                                          {"role": "assistant", "content": "Hi."},
                                          {"role": "user", "content": "<video>", "media": ["clip.mp4"]}]},
    ])
    out = tmp_path / "out"
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out),
                 "--batch-size", "4"]) == 0
    recs = records_by_id(out)
    assert set(recs) == {"to-image", "to-audio", "to-video", "from-image", "from-audio", "from-video"}
    assert all(r["error"] is None for r in recs.values())
    fingerprint = checkpoint_fingerprint(ckpt)
    for modality in ("image", "audio", "video"):
        rec = recs[f"to-{modality}"]
        assert len(rec["files"]) == 1 and rec["files"][0].endswith(FILE_SUFFIX[modality]), rec
        path = out / rec["files"][0]
        assert path.is_file()
        assert set(rec["seconds"]) == {"prepare", "llm", "decode", "write"} and rec["seconds"]["decode"] > 0
        if modality == "image":
            img = Image.open(path)
            assert img.size == (32, 32) and img.mode == "RGB"
            assert img.text == {"mmllm_id": "to-image", "seed": "1", "prompt": GENERATE["image"],
                                "checkpoint": fingerprint}
        elif modality == "audio":
            with sf.SoundFile(path) as fh:
                assert fh.subtype == "PCM_16" and fh.samplerate == 16000 and fh.frames > 0
                assert f"checkpoint={fingerprint}" in fh.comment and "seed=0" in fh.comment
        else:
            with av.open(str(path)) as c:
                meta = json.loads(c.metadata["comment"])
                assert sum(1 for _ in c.decode(video=0)) == 4
            assert meta == {"mmllm_id": "to-video", "seed": "0", "prompt": GENERATE["video"],
                            "checkpoint": fingerprint}
    for modality in ("image", "audio", "video"):
        assert recs[f"from-{modality}"]["text"].strip(), recs[f"from-{modality}"]
    assert recs["from-image"]["inputs"] == [str(inp / "shape.png")]
    page = (out / "index.html").read_text()
    assert all(f in page for r in recs.values() for f in r["files"])
    assert "<script" not in page.lower() and "http" not in page


def test_cli_single_request_from_flags_and_rerun_skips_it(ckpt, media, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["infer", "--checkpoint", str(ckpt), "--output", str(out), "--prompt", "What is this?",
            "--image", str(media / "red_circle.png")]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["id"].startswith("prompt-") and printed["text"].strip() and printed["error"] is None
    assert main(args) == 0  # same request: already done
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    assert main([*args[:-4], "--prompt", GENERATE["image"]]) == 0  # another prompt: a new request
    recs = records_by_id(out)
    assert len(recs) == 2 and any(r["files"] for r in recs.values())
    assert main(["infer", "--checkpoint", str(ckpt), "--output", str(out), "--input", "x.jsonl", "--image",
                 "a.png"]) == 2
    assert "--image goes with --prompt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ batch invariance


def mixed_requests(media: Path) -> list[dict]:
    return [
        {"id": "img", "prompt": GENERATE["image"], "seed": 3},
        {"id": "long", "prompt": "Tell me a long story about shapes and sounds and colours, please. " * 3},
        {"id": "aud", "prompt": GENERATE["audio"], "seed": 4},
        {"id": "from-img", "prompt": "What is this?", "image": str(media / "blue_square.png")},
        {"id": "vid", "prompt": GENERATE["video"], "seed": 5},
        {"id": "img2", "prompt": "Generate an image: a yellow square", "seed": 6},
    ]


def test_text_and_conditioning_are_identical_alone_or_in_a_batch(model, media):
    parsed = [runner.parse_request(r, media, 0) for r in mixed_requests(media)]
    prepared = [prepare_request(model, p.request) for p in parsed]
    batch = generate_answers(model, prepared, Settings(max_new_tokens=24))
    assert len({len(p.ids) for p in prepared}) > 2  # really left-padded
    assert sum(bool(r.conditioning) for r in batch) >= 4
    for p, in_batch in zip(prepared, batch):
        alone = generate_answers(model, [p], Settings(max_new_tokens=24))[0]
        assert alone.token_ids == in_batch.token_ids and alone.text == in_batch.text
        assert alone.conditioning.keys() == in_batch.conditioning.keys()
        for m in alone.conditioning:
            assert all(torch.equal(a, b) for a, b in zip(alone.conditioning[m], in_batch.conditioning[m]))


def test_media_files_are_the_same_alone_or_in_a_batch(model, media, tmp_path):
    requests = write_requests(tmp_path / "requests.jsonl", mixed_requests(media))
    runs = {"alone": dict(batch_size=1), "batch": dict(batch_size=6),
            "batch-exact": dict(batch_size=6, decode_batch_size=1)}
    recs = {}
    for name, kwargs in runs.items():
        counts = run_requests(model, requests, tmp_path / name, max_new_tokens=24, **kwargs)
        assert counts["done"] == 6, counts
        recs[name] = records_by_id(tmp_path / name)
    alone = recs["alone"]
    assert sum(bool(r["files"]) for r in alone.values()) >= 4
    for name in ("batch", "batch-exact"):
        for rid, rec in recs[name].items():
            assert rec["text"] == alone[rid]["text"] and rec["seed"] == alone[rid]["seed"]
            assert rec["files"] == alone[rid]["files"]
            for f in rec["files"]:
                a = read_media(tmp_path / "alone" / f).astype(np.int64)
                b = read_media(tmp_path / name / f).astype(np.int64)
                assert a.shape == b.shape
                if name == "batch-exact":
                    assert np.array_equal(a, b), f
                elif f.endswith(".mp4"):  # H.264 is lossy: a one-step change in a frame may move a block a little
                    assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 16, f
                else:  # batched decoder kernels may round differently: at most one quantisation step
                    assert np.abs(a - b).max() <= 1, f


def test_sampled_text_is_reproducible_per_request(model):
    reqs = [Request([{"role": "user", "content": "Say something."}], seed=s, temperature=1.0) for s in (1, 2)]
    reqs.append(Request([{"role": "user", "content": "Something longer to say, with more words in it."}],
                        seed=3, temperature=0.8, top_p=0.9))
    prepared = [prepare_request(model, r) for r in reqs]
    batch = generate_answers(model, prepared, Settings(max_new_tokens=12))
    for p, in_batch in zip(prepared, batch):
        assert generate_answers(model, [p], Settings(max_new_tokens=12))[0].token_ids == in_batch.token_ids
    assert batch[0].token_ids != batch[1].token_ids  # another seed, another sample


def test_per_request_token_limit_and_cut_signal_groups(model):
    short = Request([{"role": "user", "content": "Say something."}], max_new_tokens=3)
    long = Request([{"role": "user", "content": "Say something."}], max_new_tokens=9)
    a, b = generate_answers(model, [prepare_request(model, r) for r in (short, long)], Settings())
    assert len(a.token_ids) <= 3 and b.token_ids[: len(a.token_ids)] == a.token_ids
    img = model.llm.signal_ids["image"]
    assert _trim([5, *img, 6, *img[:2]], [], model.llm.signal_ids) == ([5, *img, 6], "image")
    assert _trim([5, *img, 7, 8], [7], model.llm.signal_ids) == ([5, *img], None)
    assert _trim([5, 9, *img, 7, 8], [7, 9], model.llm.signal_ids) == ([5], None)  # any end-of-turn id ends it


def test_generation_stops_at_the_token_the_chat_template_closes_answers_with(tiny_assembly):
    """Training labels the template's end-of-turn token after every reply; where it is not the core's EOS (a base
    core given ChatML through llm.chat_template), generation ran on past it to max_new_tokens."""
    from mmllm.inference.generate import end_of_turn_ids
    from mmllm.model import AnyToAnyModel

    model = AnyToAnyModel.assemble(tiny_assembly)
    tok = model.llm.tokenizer
    assert end_of_turn_ids(model) == [tok.eos_token_id]  # the tiny template closes turns with its EOS
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|bos|>{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")  # as llm.chat_template sets it
    closer = tok.convert_tokens_to_ids("<|bos|>")
    assert closer != tok.eos_token_id and end_of_turn_ids(model) == sorted({tok.eos_token_id, closer})
    prepared = [prepare_request(model, Request([{"role": "user", "content": "Say something."}]))]
    first = generate_answers(model, prepared, Settings(max_new_tokens=6))[0].token_ids[0]
    head = model.llm.lm_head().base.weight
    with torch.no_grad():  # the closing token now scores twice what the first answer token scored
        head[closer] = 2 * head[first]
    assert generate_answers(model, prepared, Settings(max_new_tokens=6))[0].token_ids == []


def _closing_template(closer: str) -> str:
    """The tiny template with ``closer`` written after each assistant reply (prompts render as before)."""
    return ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}" + closer + "{% endif %}<|eos|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")


def test_the_end_of_turn_text_is_what_the_template_closes_a_reply_with_before_any_special_token():
    from mmllm.inference.generate import template_end_of_turn_text
    from mmllm.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    assert template_end_of_turn_text(tok) is None  # the tiny template closes replies with its EOS token
    for closer, text in [("</s>", "</s>"), ("<|end|>", "<|end|>"), (" ### End\n\n", "### End"), ("\n\n", None)]:
        tok.chat_template = _closing_template(closer)
        assert template_end_of_turn_text(tok) == text, closer
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})  # one added token: an id, not a text
    tok.chat_template = _closing_template("<|end|>")
    assert template_end_of_turn_text(tok) is None


def test_generation_stops_at_an_end_of_turn_written_as_plain_text_row_by_row(tiny_assembly, monkeypatch):
    """A template closing replies with text spanning several tokens ("</s>" spelled out, "<|end|>" not in the
    vocabulary) was not an end of turn: answers ran on to max_new_tokens with the marker in their text."""
    model = AnyToAnyModel.assemble(tiny_assembly)
    tok = model.llm.tokenizer
    prompts = ["Say something.", "What is in the picture?", "hello how are you?", "draw a cat"]
    prepared = [prepare_request(model, Request([{"role": "user", "content": c}])) for c in prompts]
    free = generate_answers(model, prepared, Settings(max_new_tokens=16))
    assert len(free[0].token_ids) == 16  # the (random) core runs to the limit
    # the closer: text the core writes in answer 0 (two tokens or more), absent from answer 1
    pairs = (tok.decode(free[0].token_ids[i: i + 2]) for i in range(len(free[0].token_ids) - 1))
    stop = next(t for t in pairs if t.isascii() and t.isprintable() and t == t.strip() and t not in free[1].text
                and len(tok(t, add_special_tokens=False).input_ids) >= 2)
    tok.chat_template = _closing_template(stop)
    lengths: list[int] = []
    real = model.llm.model.generate

    def generate(*args, **kwargs):
        out = real(*args, **kwargs)
        lengths.append(out.shape[1])
        return out

    monkeypatch.setattr(model.llm.model, "generate", generate)
    batch = generate_answers(model, prepared, Settings(max_new_tokens=16))
    for f, b in zip(free, batch):
        cut = f.text.find(stop)
        assert b.text == (f.text[:cut].strip() if cut >= 0 else f.text)
        assert b.token_ids == f.token_ids[: len(b.token_ids)]
        assert stop not in tok.decode(b.token_ids)
    assert len(batch[0].token_ids) < 16 and batch[1].token_ids == free[1].token_ids  # each row stops on its own
    for p, in_batch in zip(prepared, batch):
        alone = generate_answers(model, [p], Settings(max_new_tokens=16))[0]
        assert alone.token_ids == in_batch.token_ids and alone.text == in_batch.text
    assert lengths[1] < 16  # answer 0 alone: generation stopped at the marker, not cut afterwards


def test_world_distil_ends_answers_where_inference_does(tiny_assembly, tmp_path, monkeypatch):
    """`mmllm world distil` generates through its own path, which ended answers at ChatML's <|im_end|> only: an
    end-of-turn written as plain text ran on to max_new_tokens and was taught as part of the reply, and so was
    every token after the template's closing token where that is not <|im_end|>."""
    from mmllm.toyworld.stage_data import distil_plain_chat

    model = AnyToAnyModel.assemble(tiny_assembly)
    tok = model.llm.tokenizer
    prompts = ("Say something.", "What is in the picture?", "hello how are you?", "draw a cat")
    prepared = [prepare_request(model, Request([{"role": "user", "content": c}])) for c in prompts]
    free = generate_answers(model, prepared, Settings(max_new_tokens=16))
    pairs = (tok.decode(free[0].token_ids[i: i + 2]) for i in range(len(free[0].token_ids) - 1))
    stop = next(t for t in pairs if t.isascii() and t.isprintable() and t == t.strip() and t not in free[1].text
                and len(tok(t, add_special_tokens=False).input_ids) >= 2)
    tok.chat_template = _closing_template(stop)  # prompts render as before
    lengths: list[int] = []
    real = model.llm.model.generate

    def generate(*args, **kwargs):
        out = real(*args, **kwargs)
        if "input_ids" in kwargs:  # distil's call (inference passes embeddings)
            lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(model.llm.model, "generate", generate)
    distilled = distil_plain_chat(model.llm, prompts[:1], tmp_path / "plain.jsonl", max_new_tokens=16)
    expected = generate_answers(model, prepared[:1], Settings(max_new_tokens=16))[0].text
    assert distilled[0]["answer"] == expected == free[0].text[: free[0].text.find(stop)].strip()
    assert lengths[0] < 16  # generation stopped at the marker
    assert [json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines()] == distilled

    # the template's closing token (an added token, not the core's EOS) ends an answer too
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|bos|>{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    closer = tok.convert_tokens_to_ids("<|bos|>")
    prepared = [prepare_request(model, Request([{"role": "user", "content": c}])) for c in prompts]
    first = generate_answers(model, prepared[:1], Settings(max_new_tokens=6))[0].token_ids[2]
    with torch.no_grad():  # the closing token now scores twice what the answer's third token scored
        model.llm.lm_head().base.weight[closer] = 2 * model.llm.lm_head().base.weight[first]
    expected = generate_answers(model, prepared[:1], Settings(max_new_tokens=16))[0]
    assert 0 < len(expected.token_ids) < 6  # ended by the closing token
    distilled = distil_plain_chat(model.llm, prompts[:1], tmp_path / "plain.jsonl", max_new_tokens=16)
    assert distilled[0]["answer"] == expected.text
    assert lengths[1] == len(expected.token_ids) + 1  # the answer and its closing token, not 16 tokens


def test_stop_strings_of_the_cores_generation_config_end_answers(tiny_assembly):
    """A core whose generation_config.json sets stop_strings: transformers' own check of them wants a tokenizer
    passed to generate, so every answer failed with its ValueError; mmllm stops at them itself."""
    model = AnyToAnyModel.assemble(tiny_assembly)
    tok = model.llm.tokenizer
    prepared = [prepare_request(model, Request([{"role": "user", "content": "Say something."}]))]
    free = generate_answers(model, prepared, Settings(max_new_tokens=16))[0]
    stop = tok.decode(free.token_ids[4:6]).strip()
    assert stop and stop in free.text
    model.llm.model.generation_config.stop_strings = [stop]
    cut = generate_answers(model, prepared, Settings(max_new_tokens=16))[0]
    assert cut.text == free.text[: free.text.find(stop)].strip()
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)] and len(cut.token_ids) <= 5


# ------------------------------------------------------------------------------------------ bad inputs


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid PNG header declaring a huge image (no pixel data is needed to be refused)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def test_bad_inputs_become_error_records_and_the_rest_completes(ckpt, media, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "empty.png").write_bytes(b"")
    (d / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(300))
    (d / "notes.txt").write_text("not an image")
    (d / "thing.xyz").write_bytes(b"\x00" * 10)
    huge_png(d / "huge.png", 9000, 9000)
    six = Audio(np.stack([tone("high", rate=11025).mono() * (0.5 + 0.1 * c) for c in range(6)], 1), 11025)
    save_audio(six, d / "six-channels.wav")
    save_audio(tone("low", rate=7919), d / "odd-rate.wav")
    bad = {
        "missing": ({"prompt": "What is this?", "image": "nowhere.png"}, "not found"),
        "empty": ({"prompt": "What is this?", "image": "empty.png"}, "empty"),
        "corrupt": ({"prompt": "What is this?", "image": "corrupt.png"}, "cannot decode"),
        "unsupported": ({"prompt": "What is this?", "image": "notes.txt"}, "unsupported image file"),
        "unknown-modality": ({"prompt": "What is this?", "media": ["thing.xyz"]}, "unknown modality"),
        "unknown-field": ({"prompt": "Smell this.", "smell": "rose.smell"}, "unknown field(s) ['smell']"),
        "too-long": ({"prompt": "shapes and sounds " * 200}, "max_length=128 (the checkpoint's assembly): shorten"),
        "huge-image": ({"prompt": "What is this?", "image": "huge.png"}, "image too large"),
        "placeholders": ({"prompt": "<image><image> compare", "media": ["huge.png"]}, "2 placeholder(s) but 1"),
        "empty-prompt": ({"prompt": "  "}, "the prompt is empty"),
        "bad-override": ({"prompt": "Hi", "max_new_tokens": "many"}, "'max_new_tokens' must be an integer"),
        "no-prompt": ({"text": "Hi"}, "unknown field(s) ['text']"),
    }
    good = [{"id": "ok-image", "prompt": GENERATE["image"]},
            {"id": "ok-describe", "prompt": "What is this?", "image": str(media / "red_square.png")},
            {"id": "six-channels", "prompt": "What do you hear?", "audio": "six-channels.wav"},
            {"id": "odd-rate", "prompt": "What do you hear?", "audio": "odd-rate.wav"}]
    lines = [{"id": rid, **rec} for rid, (rec, _) in bad.items()]
    lines[3:3] = ["{not json", '["a list"]', '{"prompt": "no id"}', '{"id": "ok-image", "prompt": "again"}']
    requests = write_requests(d / "requests.jsonl", good[:2] + lines + good[2:])
    out = tmp_path / "out"
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out),
                 "--batch-size", "4", "--max-new-tokens", "8"]) == 1  # some failed: exit code 1
    recs = records_by_id(out)
    for rid, (_, message) in bad.items():
        assert recs[rid]["error"] and message in recs[rid]["error"], (rid, recs[rid])
    malformed = sorted(r["error"] for rid, r in recs.items() if rid.startswith("line-"))
    assert len(malformed) == 4
    assert any("not valid JSON" in e for e in malformed) and any("expected a JSON object" in e for e in malformed)
    assert any("missing 'id'" in e for e in malformed) and any("duplicate id 'ok-image'" in e for e in malformed)
    for rec in good:  # the good ones completed, multi-channel / odd-rate audio normalised by the encoder
        assert recs[rec["id"]]["error"] is None, recs[rec["id"]]
    assert recs["ok-image"]["files"] and recs["six-channels"]["text"] and recs["odd-rate"]["text"]
    page = (out / "index.html").read_text()
    assert "image too large" in page and page.count('class="error"') == len(bad) + 4


def test_empty_media_paths_and_nonsensical_settings_are_error_records_naming_line_and_field(model, tmp_path):
    """An empty media path was taken as no media (the request answered without its image); a negative, NaN or
    infinite setting reached the decoder or the sampler. Each is now its line's error; the rest completes."""
    bad = {
        "empty-image": ({"prompt": "What is this?", "image": ""}, "'image' holds an empty path"),
        "blank-audio": ({"prompt": "What is this?", "audio": " "}, "'audio' holds an empty path"),
        "empty-media": ({"prompt": "What is this?", "media": ""}, "'media' holds an empty path"),
        "empty-in-list": ({"prompt": "What is this?", "video": ["", "a.mp4"]}, "'video' holds an empty path"),
        "empty-in-turn": ({"messages": [{"role": "user", "content": "Hi", "media": ""}]},
                          "'messages[0].media' holds an empty path"),
        "empty-beside-messages": ({"messages": [{"role": "user", "content": "Hi"}], "image": ""},
                                  "'image' holds an empty path ('') beside 'messages': leave 'image' out"),
        "negative-guidance": ({"prompt": GENERATE["image"], "guidance": -1.5}, "'guidance' must be at least 0"),
        "nan-guidance": ({"prompt": GENERATE["image"], "guidance": float("nan")},
                         "'guidance' must be a finite number, got nan"),
        "word-guidance": ({"prompt": GENERATE["image"], "guidance": "high"}, "'guidance' must be a number"),
        "infinite-temperature": ({"prompt": "Hi", "temperature": float("inf")},
                                 "'temperature' must be a finite number, got inf"),
        "nan-steps": ({"prompt": GENERATE["image"], "steps": float("nan")}, "'steps' must be a finite number"),
    }
    good = [{"id": "null-image", "prompt": "Hi", "image": None, "media": []},  # JSON null / [] are no media
            {"id": "no-guidance", "prompt": GENERATE["image"], "guidance": 0.5}]  # <= 1: guidance off
    requests = write_requests(tmp_path / "r.jsonl", good + [{"id": rid, **rec} for rid, (rec, _) in bad.items()])
    counts = run_requests(model, requests, tmp_path / "out", max_new_tokens=6, batch_size=4)
    assert counts["done"] == 2 and counts["failed"] == len(bad), counts
    recs = records_by_id(tmp_path / "out")
    for lineno, (rid, (_, message)) in enumerate(bad.items(), len(good) + 1):
        assert recs[rid]["error"].startswith(f"r.jsonl:{lineno}: ") and message in recs[rid]["error"], recs[rid]
        assert recs[rid]["line"] == lineno
    assert all(recs[r["id"]]["error"] is None for r in good)
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        run_requests(model, requests, tmp_path / "out2", guidance=-1.0)


@pytest.mark.parametrize(("extra", "message"), [
    ({"image": ""}, "'image' holds an empty path ('') beside 'messages'"),
    ({"media": [" "]}, "'media' holds an empty path ([' ']) beside 'messages'"),
    ({"audio": ["a.wav", ""]}, "'audio' holds an empty path (['a.wav', '']) beside 'messages'"),
    ({"image": "a.png"}, "give either 'messages' (media inside them) or 'prompt' (+ media), not both"),
    ({"prompt": ""}, "give either 'messages'"),
])
def test_a_media_field_beside_messages_is_refused_naming_an_empty_path(tmp_path, extra, message):
    rec = {"id": "r", "messages": [{"role": "user", "content": "Hi"}], **extra}
    with pytest.raises(runner.RequestError) as caught:
        runner.parse_request(rec, tmp_path, 0)
    assert message in str(caught.value)
    assert runner.parse_request({"id": "r", "messages": rec["messages"], "image": None, "media": []}, tmp_path, 0)


def test_an_answers_reply_in_results_replays_it_as_training_renders_that_turn(model, media, tmp_path):
    """results.jsonl's text drops an answer's signal tokens (an image-making answer's text is often empty), so a
    client replaying it gave the model a turn that said nothing where training shows the signal tokens; its
    "reply" is the turn to give back, with the answer's outputs."""
    from mmllm.data.formats import Conversation, Message, OutputRef
    from mmllm.data.template import IGNORE, encode_conversation

    first = write_requests(tmp_path / "first.jsonl", [{"id": "draw", "prompt": GENERATE["image"]}])
    assert run_requests(model, first, tmp_path / "out1", max_new_tokens=8)["done"] == 1
    rec = records_by_id(tmp_path / "out1")["draw"]
    assert len(rec["files"]) == 1
    assert rec["reply"] == {"role": "assistant", "content": rec["text"], "outputs": [{"modality": "image"}]}
    then = [{"role": "user", "content": GENERATE["image"]}, rec["reply"], {"role": "user", "content": GENERATE["audio"]}]
    second = write_requests(tmp_path / "second.jsonl", [{"id": "sound", "messages": then}])
    parsed = runner.parse_request(json.loads(second.read_text()), tmp_path, 0)
    ids = prepare_request(model, parsed.request).ids
    spec = runner.token_spec(model)
    train = encode_conversation(Conversation("c", [
        Message("user", GENERATE["image"]), Message("assistant", rec["text"], outputs=[OutputRef("image", "a red circle")]),
        Message("user", GENERATE["audio"]), Message("assistant", "", outputs=[OutputRef("audio", "a high beep")])]),
        model.llm.tokenizer, spec)
    last = max(i for i in range(1, len(train.labels)) if train.labels[i] != IGNORE and train.labels[i - 1] == IGNORE)
    assert ids == train.input_ids[:last]
    assert run_requests(model, second, tmp_path / "out2", max_new_tokens=8)["done"] == 1
    answer = records_by_id(tmp_path / "out2")["sound"]  # the tiny model learnt single turns: any output will do
    assert sorted(o["modality"] for o in answer["reply"]["outputs"]) == sorted(Path(f).stem.split("_")[-1][:-1]
                                                                           for f in answer["files"])


def test_an_answer_whose_signal_group_the_token_limit_cut_off_says_so_in_its_record(model, tmp_path, caplog):
    """The tiny model answers an image prompt with its 4 image signal tokens alone: at max_new_tokens=2 the group
    was dropped with a warning that named no request, and the record (done, text "", no files) and its reply (an
    empty assistant turn, as an answer that chose to say nothing) did not tell the cut from that answer. The
    record's "cut_off" names the dropped group's modality, the warning the request; the reply still leaves the
    group out (no media was made from it)."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "cut", "prompt": GENERATE["image"], "max_new_tokens": 2},
                                                     {"id": "whole", "prompt": GENERATE["image"]}])
    with caplog.at_level(logging.WARNING, logger="mmllm"):
        assert run_requests(model, requests, tmp_path / "out", max_new_tokens=8)["done"] == 2
    cut, whole = records_by_id(tmp_path / "out")["cut"], records_by_id(tmp_path / "out")["whole"]
    assert cut["cut_off"] == "image" and cut["files"] == [] and cut["reply"]["outputs"] == []
    assert whole["cut_off"] is None and whole["reply"]["outputs"] == [{"modality": "image"}]
    assert "request cut: the answer's image signal group was cut off by the token limit" in caplog.text
    assert "request whole" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmllm"):
        short, long = model.generate([Request([{"role": "user", "content": GENERATE["image"]}], max_new_tokens=3),
                                      Request([{"role": "user", "content": GENERATE["image"]}])],
                                     max_new_tokens=8, decode_media=False)
    assert (short.cut_off, short.outputs, long.cut_off, long.outputs) == ("image", [], None, ["image"])
    assert "requests[0]: the answer's image signal group was cut off" in caplog.text and "requests[1]" not in caplog.text


def test_fail_fast_stops_at_the_first_failure(model, tmp_path):
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hi"},
                                                     {"id": "bad", "prompt": "x", "image": "missing.png"},
                                                     {"id": "c", "prompt": "Hi"}])
    counts = run_requests(model, requests, tmp_path / "out", batch_size=4, max_new_tokens=4, fail_fast=True)
    assert counts["stopped"] == 1 and counts["failed"] == 1 and counts["done"] == 0
    assert list(records_by_id(tmp_path / "out")) == ["bad"]


# ------------------------------------------------------------------------------------------ resume


def test_rerun_skips_done_requests_and_redoes_failed_torn_or_lost_ones(model, media, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    requests = write_requests(d / "requests.jsonl", [
        {"id": "img", "prompt": GENERATE["image"]},
        {"id": "aud", "prompt": GENERATE["audio"]},
        {"id": "describe", "prompt": "What is this?", "image": "later.png"},  # missing on the first run
        {"id": "hi", "prompt": "Hello there."},
        {"id": "vid", "prompt": GENERATE["video"]},
    ])
    out = tmp_path / "out"
    first = run_requests(model, requests, out, batch_size=2, max_new_tokens=8)
    assert (first["done"], first["failed"]) == (4, 1)
    recs = records_by_id(out)
    assert recs["img"]["files"] and recs["aud"]["files"]
    # after a crash: a torn last line, and a media file that never made it to disk
    with open(out / "results.jsonl", "a") as fh:
        fh.write('{"id": "vid", "text": "", "fil')
    (out / recs["aud"]["files"][0]).unlink()
    (d / "later.png").write_bytes((media / "red_circle.png").read_bytes())
    second = run_requests(model, requests, out, batch_size=2, max_new_tokens=8)
    assert (second["skipped"], second["done"], second["failed"]) == (3, 2, 0)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) == 4 + 1 + 2
    assert set(runner.done_ids(out / "results.jsonl")) == {"img", "aud", "describe", "hi", "vid"}
    # results.jsonl is a log (docs/inference.md): records in the order requests finished, the re-run's after the
    # first run's; each names its request's line, which gives the requests file's order back
    order = ["img", "aud", "describe", "hi", "vid"]
    recs = [json.loads(line) for line in lines]
    assert [r["id"] for r in recs[:5]] != order and {r["id"] for r in recs[5:]} == {"aud", "describe"}
    assert all(r["line"] == order.index(r["id"]) + 1 for r in recs)
    latest = sorted(latest_records(out / "results.jsonl"), key=lambda r: r["line"])
    assert [r["id"] for r in latest] == order and not any(r.get("error") for r in latest)
    assert "5 done, 0 failed" in (out / "index.html").read_text()


def _gallery_ids(out: Path) -> tuple[list[str], list[str], str]:
    """The ids of index.html's sections shown as current, those listed apart as earlier, and its summary."""
    page = (out / "index.html").read_text()
    current, _, earlier = page.partition("<details")
    summary = re.search(r"<p class='meta'>(\d+ done, \d+ failed)", page).group(1)  # a link to the failed ones after
    return re.findall(r"<h2>([^<]*)</h2>", current), re.findall(r"<h2>([^<]*)</h2>", earlier), summary


def test_the_gallery_shows_the_requests_file_as_it_is_now_and_earlier_records_apart(ckpt, tmp_path, monkeypatch):
    """A request removed from the requests file, or a malformed line since fixed, stayed in the gallery and
    its counts as if it were one of the file's requests."""
    requests = tmp_path / "r.jsonl"
    write_requests(requests, [{"id": "a", "prompt": "Hello."}, {"id": "b", "prompt": "Hi."}, "{not json"])
    out = tmp_path / "out"
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out), "--max-new-tokens", "3"]
    assert main(args) == 1  # the malformed line failed
    assert _gallery_ids(out) == (["a", "b", "line-3"], [], "2 done, 1 failed")
    # b dropped, line 3 fixed, d added before a
    write_requests(requests, [{"id": "d", "prompt": "Hey."}, {"id": "a", "prompt": "Hello."},
                              {"id": "c", "prompt": "Hello again."}])
    assert main(args) == 0
    assert _gallery_ids(out) == (["d", "a", "c"], ["b", "line-3"], "3 done, 0 failed")
    assert len(records_by_id(out)) == 5  # results.jsonl keeps every record
    write_requests(requests, [{"id": "a", "prompt": "Hello."}, {"id": "c", "prompt": "Hello again."}])
    _no_model_load(monkeypatch)
    assert main(args) == 0  # all done: nothing to answer, the gallery still follows the file
    assert _gallery_ids(out) == (["a", "c"], ["d", "b", "line-3"], "2 done, 0 failed")


def test_single_requests_from_flags_gather_in_one_gallery(ckpt, tmp_path):
    out = tmp_path / "out"
    for prompt in ("Hello.", "Hi."):
        assert main(["infer", "--checkpoint", str(ckpt), "--prompt", prompt, "--output", str(out),
                     "--max-new-tokens", "3"]) == 0
    current, earlier, summary = _gallery_ids(out)
    assert len(current) == 2 and earlier == [] and summary == "2 done, 0 failed"


def test_a_malformed_line_never_shadows_a_request_whose_id_is_line_n(model, tmp_path):
    # a malformed line's error record is labelled "line-N"; a real request may carry that very id
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "line-2", "prompt": "Hello there."}, "{not json"])
    out = tmp_path / "out"
    first = run_requests(model, requests, out, max_new_tokens=4)
    assert (first["done"], first["failed"]) == (1, 1)
    for _ in range(2):  # re-runs report the malformed line again; the answer stays done and shown
        again = run_requests(model, requests, out, max_new_tokens=4)
        assert (again["skipped"], again["done"], again["failed"]) == (1, 0, 1)
        assert runner.done_ids(out / "results.jsonl") == {"line-2"}
        page = (out / "index.html").read_text()
        assert "1 done, 1 failed" in page and "Hello there." in page and "not valid JSON" in page


def test_a_crash_mid_run_resumes_where_it_stopped(model, tmp_path, monkeypatch):
    requests = write_requests(tmp_path / "r.jsonl", [{"id": f"r{i}", "prompt": f"Hello number {i}."}
                                                     for i in range(5)])
    real, calls = runner.write_outputs, []

    def crash_on_third(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # not an Exception: stops the run like a kill would
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "write_outputs", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_requests(model, requests, tmp_path / "out", batch_size=2, max_new_tokens=4)
    monkeypatch.setattr(runner, "write_outputs", real)
    assert len(runner.done_ids(tmp_path / "out" / "results.jsonl")) == 2
    counts = run_requests(model, requests, tmp_path / "out", batch_size=2, max_new_tokens=4)
    assert (counts["skipped"], counts["done"]) == (2, 3)


def _no_model_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the run was refused")

    monkeypatch.setattr("mmllm.cli._load_model", refuse)


def test_rerun_with_another_checkpoint_or_settings_is_refused_unless_overwrite(ckpt, tmp_path, monkeypatch, capsys):
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello."}, {"id": "b", "prompt": "Hi."}])
    out = tmp_path / "out"
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out)]
    assert main([*args, "--max-new-tokens", "4"]) == 0
    settings = records_by_id(out)["a"]["settings"]
    assert {k: v for k, v in settings.items() if k not in ("request", "media")} == {
        "seed": 0, "max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "steps": None, "guidance": None,
        "dtype": "float32", "device": "cpu", "render": runner.RENDERING}
    before = (out / "results.jsonl").read_text()
    from mmllm.training.checkpoint import export_weights_only

    other = export_weights_only(ckpt, tmp_path / "other-ckpt", dtype="float16")  # another checkpoint
    with monkeypatch.context() as m:
        _no_model_load(m)
        for extra, message in [(["--max-new-tokens", "6"], "max_new_tokens 4 (now 6)"),
                               (["--max-new-tokens", "4", "--seed", "2"], "seed 0 (now 2)"),
                               (["--max-new-tokens", "4", "--dtype", "bfloat16"], "dtype 'float32' (now 'bfloat16')"),
                               (["--max-new-tokens", "4", "--checkpoint", str(other)],
                                f"checkpoint '{checkpoint_fingerprint(ckpt)}' (now '{checkpoint_fingerprint(other)}')")]:
            assert main([*args, *extra]) == 2  # refused: a usage error, not a failed request (1)
            err = capsys.readouterr().err
            assert message in err and "2 request(s)" in err and "new --output, or pass --overwrite" in err
    assert (out / "results.jsonl").read_text() == before
    assert main([*args, "--max-new-tokens", "4"]) == 0  # the same settings: a resume, nothing redone
    assert (out / "results.jsonl").read_text() == before
    (out / "media").mkdir(exist_ok=True)
    (out / "media" / "old.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--max-new-tokens", "6", "--overwrite"]) == 0
    recs = records_by_id(out)
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert all(r["settings"]["max_new_tokens"] == 6 and r["error"] is None for r in recs.values())
    assert not (out / "media" / "old.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_answers_made_on_another_device_type_are_refused_not_mixed_in(ckpt, tmp_path, monkeypatch, capsys):
    """CPU and GPU kernels round differently (a greedy answer can take another word): answers made with --device
    cuda were kept, and the rest answered on the CPU, in one OUT. The device type is compared, not its index."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello."}, {"id": "b", "prompt": "Hi."}])
    out = tmp_path / "out"
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out), "--max-new-tokens", "4"]
    assert main(args) == 0
    results = out / "results.jsonl"
    lines = results.read_text().splitlines()
    assert all(json.loads(line)["settings"]["device"] == "cpu" for line in lines)
    # as if "a" had been answered on a GPU machine and OUT copied here
    results.write_text("\n".join([lines[0].replace('"device": "cpu"', '"device": "cuda"'), lines[1]]) + "\n")
    _no_model_load(monkeypatch)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1 request(s)" in err and "device 'cuda' (now 'cpu')" in err and "new --output, or pass --overwrite" in err
    made = runner.run_settings(ckpt, "float32", max_new_tokens=4, device="cuda:1")
    assert made["settings"]["device"] == "cuda"
    results.write_text(lines[0].replace('"device": "cpu"', '"device": "cuda"') + "\n")
    runner.check_resume(out, requests, made)  # cuda:0's answers resumed on cuda:1


def test_results_without_recorded_settings_are_compared_by_checkpoint(tmp_path):
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello."}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text(json.dumps({"id": "a", "text": "hi", "files": [], "checkpoint": "abc",
                                                   "error": None}) + "\n")
    made = runner.run_settings(None, "float32", max_new_tokens=9)
    runner.check_resume(out, requests, {**made, "checkpoint": "abc"})  # nothing recorded to differ
    with pytest.raises(runner.OutputError, match=r"checkpoint 'abc' \(now 'none'\)"):
        runner.check_resume(out, requests, made)
    runner.check_resume(out, write_requests(tmp_path / "other.jsonl", [{"id": "b", "prompt": "Hi."}]), made)


def test_a_request_with_its_own_settings_is_compared_by_what_it_is_answered_with(ckpt, tmp_path, monkeypatch,
                                                                                 capsys):
    """A request's own seed / max_new_tokens are what its answer was made with: other flags do not change
    it (resumed, not refused), an edited request does (refused, not silently kept)."""
    own = {"id": "a", "prompt": "Hello.", "seed": 3, "max_new_tokens": 4}
    requests = write_requests(tmp_path / "r.jsonl", [own])
    out = tmp_path / "out"
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out)]
    assert main(args) == 0
    before = (out / "results.jsonl").read_text()
    _no_model_load(monkeypatch)  # nothing left to answer: the model is not even loaded
    assert main([*args, "--seed", "5", "--max-new-tokens", "32"]) == 0  # the request's own values rule: resumed
    assert (out / "results.jsonl").read_text() == before
    assert "already done" in capsys.readouterr().err
    write_requests(requests, [{**own, "seed": 9}])
    assert main(args) == 2
    assert "seed 3 (now 9)" in capsys.readouterr().err
    write_requests(requests, [{**own, "prompt": "Hello there."}])
    assert main(args) == 2
    assert "another version of the request record" in capsys.readouterr().err


def test_an_input_file_replaced_under_the_same_name_is_refused_on_resume(ckpt, media, tmp_path, monkeypatch,
                                                                          capsys):
    """The answer to 'what is this?' depends on the file's bytes, not its name: a replaced picture makes it
    stale (refused before loading), the same bytes again resume, and a request run from another folder finds
    its files where the requests file says."""
    (tmp_path / "in").mkdir()
    picture = tmp_path / "in" / "shape.png"
    picture.write_bytes((media / "red_circle.png").read_bytes())
    requests = write_requests(tmp_path / "in" / "r.jsonl", [{"id": "see", "prompt": "What is this?",
                                                             "image": "shape.png"}, {"id": "hi", "prompt": "Hi."}])
    out = tmp_path / "out"
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out),
            "--max-new-tokens", "4"]
    assert main(args) == 0
    recorded = records_by_id(out)["see"]["settings"]["media"]
    assert recorded != records_by_id(out)["hi"]["settings"]["media"]
    _no_model_load(monkeypatch)
    picture.write_bytes((media / "blue_square.png").read_bytes())
    assert main(args) == 2
    assert "1 request(s)" in (err := capsys.readouterr().err) and "other contents in its input media files" in err
    picture.write_bytes((media / "red_circle.png").read_bytes())
    monkeypatch.chdir(tmp_path / "in")  # paths resolve against the requests file, wherever the run starts
    assert main([*args[:4], "r.jsonl", *args[5:]]) == 0
    assert "already done" in capsys.readouterr().err


def test_a_rerun_reads_only_the_input_files_whose_size_or_time_changed(ckpt, media, tmp_path, monkeypatch, capsys):
    """Checking a done answer's inputs read every input file in full on each re-run (100k pictures: their
    whole size, before anything else). Files with the size and modification time the record kept are not
    read; a touched file is read again, and the same bytes still resume."""
    picture = tmp_path / "shape.png"
    picture.write_bytes((media / "red_circle.png").read_bytes())
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "see", "prompt": "What is this?", "image": "shape.png"}])
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(tmp_path / "out"),
            "--max-new-tokens", "4"]
    assert main(args) == 0
    digested = []
    real = runner.media_digest
    monkeypatch.setattr(runner, "media_digest", lambda paths: digested.append(paths) or real(paths))
    _no_model_load(monkeypatch)
    assert main(args) == 0 and digested == []
    os.utime(picture, ns=(picture.stat().st_atime_ns, picture.stat().st_mtime_ns + 10**9))
    assert main(args) == 0 and digested == [[str(picture)]]
    assert "already done" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    # a request's own seed must be in [0, 2**63); --seed, the seed of the others, is held to the same
    (["--seed", "-1"], "--seed must be at least 0 and below 2**63, got -1"),
    (["--seed", str(2**64)], f"--seed must be at least 0 and below 2**63, got {2**64}"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_flags_no_run_could_use_are_refused_before_the_model_loads(ckpt, flags, message, tmp_path, monkeypatch,
                                                                  capsys):
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello.", "temperature": 1.0}])
    _no_model_load(monkeypatch)
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(tmp_path / "out")]
    assert main([*args, *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--guidance", "-2"], "argument --guidance: must be at least 0"),
    (["--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
    (["--guidance", "strong"], "argument --guidance: not a number: 'strong'"),
    (["--temperature", "inf"], "argument --temperature: must be a finite number, got 'inf'"),
    (["--top-p", "nan"], "argument --top-p: must be a finite number, got 'nan'"),
])
def test_nonsensical_sampling_and_guidance_flags_are_usage_errors(flags, message, tmp_path, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main(["infer", "--checkpoint", str(tmp_path), "--prompt", "Hi", "--output", str(tmp_path / "out"), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_overwrite_never_deletes_the_input_files_of_its_requests(ckpt, media, tmp_path, monkeypatch, capsys):
    # results written next to the requests file: its media/ holds the inputs, and --overwrite clears media/
    d = tmp_path / "project"
    (d / "media").mkdir(parents=True)
    picture = d / "media" / "red_circle.png"
    picture.write_bytes((media / "red_circle.png").read_bytes())
    requests = write_requests(d / "requests.jsonl", [{"id": "see", "prompt": "What is this?", "image": "media/red_circle.png"},
                                                     {"id": "hi", "prompt": "Hello."}])
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(d), "--max-new-tokens", "4"]
    assert main(args) == 0
    before = (d / "results.jsonl").read_text()
    _no_model_load(monkeypatch)
    assert main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"afresh (--overwrite) would delete {picture}, an input of request 'see'" in err and "another --output" in err
    assert picture.read_bytes() == (media / "red_circle.png").read_bytes()
    assert (d / "results.jsonl").read_text() == before
    inside = write_requests(d / "media" / "more.jsonl", [{"id": "hi", "prompt": "Hello."}])
    assert main([*args[:4], str(inside), *args[5:], "--overwrite"]) == 2
    assert f"afresh (--overwrite) would delete the requests file {inside}" in capsys.readouterr().err and inside.is_file()


def test_a_requests_file_without_requests_is_refused_before_the_model_loads(ckpt, tmp_path, monkeypatch, capsys):
    requests = write_requests(tmp_path / "r.jsonl", ["", "   "])
    _no_model_load(monkeypatch)
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(tmp_path / "out")]) == 2
    assert f"--input {requests}: holds no requests" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_run_folder_given_as_checkpoint_is_named_as_such_not_compared_with_earlier_answers(ckpt, tmp_path,
                                                                                               monkeypatch, capsys):
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello."}])
    out = tmp_path / "out"
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out),
                 "--max-new-tokens", "4"]) == 0
    _no_model_load(monkeypatch)
    assert main(["infer", "--checkpoint", str(ckpt.parent), "--input", str(requests), "--output", str(out),
                 "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert f"training run's folder; give one of its checkpoints, e.g. {ckpt}" in err and "answered there with" not in err


def test_overwrite_leaves_a_folder_without_results_as_it_is(tmp_path):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "photo.txt").write_text("precious")
    runner.start_afresh(tmp_path)
    assert (tmp_path / "media" / "photo.txt").read_text() == "precious"


def test_an_unwritable_output_or_missing_device_is_refused_before_the_model_loads(ckpt, tmp_path, monkeypatch,
                                                                                  capsys):
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello."}])
    _no_model_load(monkeypatch)
    (tmp_path / "a-file").write_text("x")
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests)]
    for out in [tmp_path / "a-file" / "out", *([Path("/proc/x")] if Path("/proc").is_dir() else [])]:
        assert main([*args, "--output", str(out)]) == 2
        assert re.search(f"--output {out}: cannot write there .*give a folder you can", capsys.readouterr().err)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*args, "--output", str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert re.search("--device cuda: CUDA is not available here .*use --device cpu", capsys.readouterr().err)
    assert main([*args, "--output", str(tmp_path / "out"), "--device", "gpu"]) == 2
    assert "--device gpu: not a device name" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ isolation


def test_a_failing_request_or_decoder_batch_fails_only_its_culprit(model, tmp_path, monkeypatch):
    requests = write_requests(tmp_path / "r.jsonl", [
        {"id": "a", "prompt": GENERATE["image"], "seed": 1},
        {"id": "boom", "prompt": "boom"},
        {"id": "b", "prompt": GENERATE["image"], "seed": 13},
        {"id": "c", "prompt": GENERATE["image"], "seed": 2},
    ])
    real_answers, real_decoder = runner.generate_answers, runner.run_decoder
    llm_batches, decoder_batches = [], []

    def answers(model, batch, settings):
        llm_batches.append(len(batch))
        if any(p.request.messages[-1]["content"] == "boom" for p in batch):
            raise RuntimeError("the LLM choked")
        return real_answers(model, batch, settings)

    def decoder(model, jobs):
        decoder_batches.append(len(jobs))
        if any(j.seed == 13 for j in jobs):
            raise RuntimeError("the decoder choked")
        return real_decoder(model, jobs)

    monkeypatch.setattr(runner, "generate_answers", answers)
    monkeypatch.setattr(runner, "run_decoder", decoder)
    counts = run_requests(model, requests, tmp_path / "out", batch_size=4, max_new_tokens=8)
    recs = records_by_id(tmp_path / "out")
    assert (counts["done"], counts["failed"]) == (2, 2)
    assert recs["boom"]["error_stage"] == "generate" and "the LLM choked" in recs["boom"]["error"]
    assert recs["b"]["error_stage"] == "decode" and "the decoder choked" in recs["b"]["error"]
    assert recs["a"]["files"] and recs["c"]["files"]
    assert llm_batches == [4, 1, 1, 1, 1] and decoder_batches == [3, 1, 1, 1]



def test_decoders_get_full_batches_across_llm_batches(model, media, tmp_path, monkeypatch):
    real, calls = runner.run_decoder, []

    def spy(model, jobs):
        calls.append((jobs[0].modality, len(jobs)))
        return real(model, jobs)

    monkeypatch.setattr(runner, "run_decoder", spy)
    describe = {"prompt": "What is this?", "image": str(media / "green_circle.png")}
    requests = write_requests(tmp_path / "r.jsonl", [
        {"id": f"r{i}", **({"prompt": GENERATE["image"], "seed": i} if i % 2 == 0 else describe)} for i in range(7)
    ])
    counts = run_requests(model, requests, tmp_path / "out", batch_size=2, max_new_tokens=8)
    assert counts["done"] == 7
    assert calls == [("image", 2), ("image", 2)]  # 4 image groups from 4 LLM batches of 2: two full calls


def test_video_falls_back_to_gif_and_the_record_names_the_real_file(model, tmp_path, monkeypatch):
    import mmllm.data.media as media_module

    def no_h264(*args, **kwargs):
        raise RuntimeError("no H.264 encoder in this build")

    monkeypatch.setattr(media_module, "_save_mp4", no_h264)
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "vid", "prompt": GENERATE["video"]}])
    assert run_requests(model, requests, tmp_path / "out", max_new_tokens=8)["done"] == 1
    rec = records_by_id(tmp_path / "out")["vid"]
    assert len(rec["files"]) == 1 and rec["files"][0].endswith(".gif")
    with Image.open(tmp_path / "out" / rec["files"][0]) as gif:  # a GIF's frames load lazily: its file stays open
        assert gif.format == "GIF" and gif.n_frames == 4
        comment = gif.info["comment"].decode()
    assert '"seed": "0"' in comment and f'"checkpoint": "{rec["checkpoint"]}"' in comment
    assert f'<img src="{rec["files"][0]}"' in (tmp_path / "out" / "index.html").read_text()


def test_media_metadata_keeps_a_long_prompt_whole_and_a_wav_comment_within_what_libsndfile_keeps(tmp_path,
                                                                                                   monkeypatch):
    """The GIF comment was cut at 255 bytes (GIF chains 255-byte sub-blocks; Pillow writes and reads them) and
    every prompt at 500 characters. save_audio cut a WAV comment at 1000 characters: in a non-Latin script that
    is more than the ~2045 bytes libsndfile keeps, and libsndfile then dropped the whole comment."""
    from mmllm.data.media import WAV_COMMENT_BYTES
    from mmllm.data.samples import draw_shape
    from mmllm.model import GenerationResult

    prompt = "Draw a red circle: " + "赤い円を描いて 🎨 " * 150  # 1,969 characters, 4.5 KB in UTF-8
    result = GenerationResult("", [], media={"image": [draw_shape("red", "circle")], "audio": [tone("high")],
                                             "video": [moving("blue", "square", "left", frames=3)]})
    files = runner.write_outputs(tmp_path / "mp4", "r1", result, prompt, 7, "abc")
    assert Image.open(tmp_path / "mp4" / files[0]).text["prompt"] == prompt
    with av.open(str(tmp_path / "mp4" / files[2])) as c:
        assert json.loads(c.metadata["comment"])["prompt"] == prompt
    with sf.SoundFile(tmp_path / "mp4" / files[1]) as fh:
        comment = fh.comment
    assert comment.startswith("mmllm_id=r1; seed=7; checkpoint=abc; prompt=Draw a red circle")
    assert prompt.startswith(comment.split("; prompt=", 1)[1])  # a cut only shortens the prompt
    assert WAV_COMMENT_BYTES - 4 < len(comment.encode()) <= WAV_COMMENT_BYTES
    save_audio(tone("low"), tmp_path / "cjk.wav", {"prompt": "赤い円" * 400})
    with sf.SoundFile(tmp_path / "cjk.wav") as fh:
        assert fh.comment.startswith("prompt=赤い円赤い円")

    import mmllm.data.media as media_module

    monkeypatch.setattr(media_module, "_save_mp4", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no H.264")))
    files = runner.write_outputs(tmp_path / "gif", "r1", result, prompt, 7, "abc")
    with Image.open(tmp_path / "gif" / files[2]) as gif:
        comment = gif.info["comment"].decode()
    assert json.loads(comment.removeprefix("comment="))["prompt"] == prompt
    with av.open(str(tmp_path / "gif" / files[2])) as c:  # a reader other than Pillow joins the sub-blocks too
        assert json.loads(c.metadata["comment"].removeprefix("comment="))["prompt"] == prompt


def test_gallery_markup_is_self_contained_and_escaped():
    page = render_gallery([
        {"id": "b", "line": 2, "prompt": "<b>bold</b>", "text": "a & b", "files": ["media/x.wav", "media/y.mp4"],
         "seed": 0, "batch_size": 1, "seconds": {"llm": 0.1}, "error": None},
        {"id": "a", "line": 1, "text": "", "files": ["media/x y.png", "media/z.gif"], "error": None},
        {"id": "e", "line": 3, "error": "cannot decode <image>", "error_stage": "prepare"},
    ])
    assert page.index("<h2>a</h2>") < page.index("<h2>b</h2>") < page.index("<h2>e</h2>")  # input order
    assert '<img src="media/x%20y.png"' in page and '<img src="media/z.gif"' in page
    assert '<audio controls preload="auto" src="media/x.wav"' in page
    assert '<video controls loop muted autoplay playsinline preload="auto" src="media/y.mp4"' in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "a &amp; b" in page and "cannot decode &lt;image&gt;" in page
    assert "<script" not in page and "http" not in page and "2 done, 1 failed" in page



def test_a_modality_the_model_cannot_read_is_an_error_record(ckpt, media, tmp_path):
    model = AnyToAnyModel.from_pretrained(ckpt).eval()
    del model.encoders["audio"]  # as if the assembly had no audio encoder
    requests = write_requests(tmp_path / "r.jsonl", [
        {"id": "hear", "prompt": "What do you hear?", "audio": str(media / "high.wav")},
        {"id": "see", "prompt": "What is this?", "image": str(media / "red_circle.png")},
    ])
    counts = run_requests(model, requests, tmp_path / "out", max_new_tokens=4)
    recs = records_by_id(tmp_path / "out")
    assert (counts["done"], counts["failed"]) == (1, 1)
    assert "this model has no audio encoder" in recs["hear"]["error"] and recs["see"]["text"]


def test_overwrite_never_deletes_the_earlier_results_given_as_the_requests(tmp_path):
    """The guard looked only inside OUT/media: `--input OUT/results.jsonl --overwrite` (re-asking the earlier
    prompts) deleted the requests file before a single one was read, and the earlier answers with it."""
    from mmllm.inference.runner import OutputError, check_overwrite

    out = tmp_path / "out"
    out.mkdir()
    results = write_requests(out / "results.jsonl", [{"id": "a", "prompt": "Hello.", "text": "Hi."}])
    with pytest.raises(OutputError, match=r"would delete the requests file .*results\.jsonl"):
        check_overwrite(out, results)
    (out / "media").mkdir()
    with pytest.raises(OutputError, match=r"would delete the requests file .*results\.jsonl"):
        check_overwrite(out, results)
    elsewhere = write_requests(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Hello."}])
    check_overwrite(out, elsewhere)  # nothing of it is removed


def test_output_file_names_stay_in_media_whatever_the_request_id(tmp_path):
    """Ids come from someone's requests file: separators, dots, reserved names and long ids (255 bytes is a
    file name's limit; 4-byte letters such as 𝐀 made a 60-character stem 249 bytes) are all written inside."""
    from types import SimpleNamespace

    from PIL import Image

    from mmllm.inference.runner import write_outputs

    (tmp_path / "out").mkdir()
    result = SimpleNamespace(media={"image": [Image.new("RGB", (4, 4))]})
    ids = ["../../x", "a/b", "/etc/passwd", "..", ".hidden", "CON", "nul\x00", "a\\b", "x" * 1000,
           "𝐃𝐫𝐚𝐰 " * 40, "图" * 200, "𠀀" * 100]
    names = set()
    for rid in ids:
        [rel] = write_outputs(tmp_path / "out", rid, result, "p", 0, "fp")
        path = (tmp_path / "out" / rel).resolve()
        assert path.parent == (tmp_path / "out" / "media").resolve() and path.is_file(), rid
        assert not path.name.startswith(".") and len(path.name.encode()) <= 200, rid
        names.add(path.name)
    assert len(names) == len(ids)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(names)  # nothing else written


def test_a_folder_or_missing_file_given_to_infer_flags_is_refused_before_the_model_loads(ckpt, tmp_path, monkeypatch,
                                                                                         capsys):
    """A folder as --input said "file not found", and a typo'd --image became an error record (exit 1) after
    the model had loaded: both are refused at once (exit 2), saying what to give."""
    folder = tmp_path / "requests"
    write_requests(folder / "r.jsonl", [{"id": "a", "prompt": "Hello."}])
    _no_model_load(monkeypatch)
    out = ["--checkpoint", str(ckpt), "--output", str(tmp_path / "out")]
    assert main(["infer", *out, "--input", str(folder)]) == 2
    assert f"--input {folder}: a folder; give the requests file (JSONL) in it (e.g. {folder / 'r.jsonl'})" in \
        capsys.readouterr().err
    assert main(["infer", *out, "--prompt", "What is this?", "--image", str(tmp_path / "cat.png")]) == 2
    assert f"--image {tmp_path / 'cat.png'}: file not found" in capsys.readouterr().err
    assert main(["infer", *out, "--prompt", "What is this?", "--audio", str(folder)]) == 2
    assert f"--audio {folder}: a folder" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_media_flag_naming_a_pipe_is_refused_as_not_a_regular_file(ckpt, tmp_path, monkeypatch, capsys):
    """`--image <(curl ...)` names a pipe that exists: it was refused as "file not found"."""
    pipe = tmp_path / "image-pipe"
    os.mkfifo(pipe)
    _no_model_load(monkeypatch)
    out = ["--checkpoint", str(ckpt), "--output", str(tmp_path / "out")]
    assert main(["infer", *out, "--prompt", "What is this?", "--image", str(pipe)]) == 2
    err = capsys.readouterr().err
    assert f"--image {pipe}: not a regular file" in err and "not found" not in err


def test_a_batch_that_runs_out_of_memory_is_retried_one_at_a_time_with_its_memory_freed_first(
        model, tmp_path, monkeypatch, caplog):
    """An OOM on a batch of requests (LLM or decoder) retries them one at a time, and only a request that runs out
    of memory alone gets an error record. The retry used to run inside the ``except`` block, while the failed
    attempt's traceback still held its tensors (a GPU retry then ran out of memory again); a request that failed
    alone was kept as its exception, holding its tensors through the retries of the rest of the batch."""
    requests = write_requests(tmp_path / "r.jsonl", [
        {"id": "a", "prompt": GENERATE["image"], "seed": 1},
        {"id": "huge", "prompt": "huge"},
        {"id": "b", "prompt": GENERATE["image"], "seed": 13},
        {"id": "c", "prompt": GENERATE["image"], "seed": 2},
    ])
    real_answers, real_decoder = runner.generate_answers, runner.run_decoder
    attempts, llm_batches, decoder_batches, freed = [], [], [], []

    def no_earlier_attempt_holds_memory():
        assert all(held() is None for held in attempts), "a failed attempt's tensors are still held"

    def answers(model, batch, settings):
        no_earlier_attempt_holds_memory()
        llm_batches.append(len(batch))
        activations = torch.zeros(1024)  # what a forward holds when the allocator gives up
        attempts.append(weakref.ref(activations))
        if len(batch) > 1 or batch[0].request.messages[-1]["content"] == "huge":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nSee PYTORCH_CUDA_ALLOC_CONF")
        return real_answers(model, batch, settings)

    def decoder(model, jobs):
        no_earlier_attempt_holds_memory()
        decoder_batches.append(len(jobs))
        latents = torch.zeros(1024)
        attempts.append(weakref.ref(latents))
        if len(jobs) > 1 or jobs[0].seed == 13:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")
        return real_decoder(model, jobs)

    monkeypatch.setattr(runner, "generate_answers", answers)
    monkeypatch.setattr(runner, "run_decoder", decoder)
    monkeypatch.setattr(runner, "release_memory", lambda: freed.append(True))
    counts = run_requests(model, requests, tmp_path / "out", batch_size=4, max_new_tokens=8)
    recs = records_by_id(tmp_path / "out")
    assert (counts["done"], counts["failed"]) == (2, 2)
    assert recs["a"]["files"] and recs["c"]["files"]
    assert recs["huge"]["error_stage"] == "generate" and recs["b"]["error_stage"] == "decode"
    for rid in ("huge", "b"):
        assert recs[rid]["error"].startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate")
        assert "--dtype bfloat16" in recs[rid]["error"] and "PYTORCH_CUDA_ALLOC_CONF" not in recs[rid]["error"]
    assert llm_batches == [4, 1, 1, 1, 1] and decoder_batches == [3, 1, 1, 1]
    assert len(freed) == 2  # before the LLM's retries and before the decoder's
    assert "the LLM's batch of 4 ran out of memory" in caplog.text and "a smaller --batch-size" in caplog.text
    assert "the image decoder's batch of 3 ran out of memory" in caplog.text


def test_a_request_out_of_the_machines_memory_alone_is_not_told_to_use_the_cpu(ckpt, tmp_path, monkeypatch):
    """torch's CPU allocator running out is out of memory now, but the record of a request decoded alone under
    --dtype bfloat16 --device cpu said "a GPU with more memory, or --device cpu": the device it ran on."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "img", "prompt": GENERATE["image"], "seed": 1}])

    def decoder(model, jobs):
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: torch's CPU allocator's own error, at once

    monkeypatch.setattr(runner, "run_decoder", decoder)
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(tmp_path / "out"),
                 "--dtype", "bfloat16", "--device", "cpu"]) == 1
    record = records_by_id(tmp_path / "out")["img"]
    assert record["error_stage"] == "decode", record
    assert record["error"].startswith("RuntimeError: ") and "DefaultCPUAllocator: can't allocate memory" in record["error"]
    assert record["error"].endswith("it ran out of memory decoded alone too: the model is held in bfloat16 already: "
                                    "a machine with more memory"), record["error"]


def test_out_of_memory_advice_of_infer_leaves_out_the_dtype_it_was_given(ckpt, tmp_path, monkeypatch, capsys):
    """A request that ran out of memory alone, and a model that ran out while it was placed, were told to give
    `--dtype bfloat16` whatever --dtype the run had: under --dtype bfloat16 itself, advice that changes nothing.
    Now a model held in float32 is told so, and one held in bfloat16 what else there is."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "huge", "prompt": "huge"}])

    def answers(model, batch, settings):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setattr(runner, "generate_answers", answers)
    errors = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert main(["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out),
                     "--dtype", dtype]) == 1
        errors[dtype] = records_by_id(out)["huge"]["error"]
    assert "--dtype bfloat16 (or float16) holds the model in less" in errors["float32"]
    assert "--dtype" not in errors["bfloat16"] and "a smaller max_new_tokens" in errors["bfloat16"]
    assert runner.alone_hints(torch.bfloat16)[1] == ("it ran out of memory decoded alone too: the model is held in "
                                                     "bfloat16 already: a GPU with more memory, or --device cpu")
    capsys.readouterr()

    def placed(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB.")

    monkeypatch.setattr(AnyToAnyModel, "to", placed)
    for dtype, said in (("float32", "--dtype bfloat16 (or float16), or --device cpu"),
                        ("bfloat16", "the model is loaded in bfloat16 already: --device cpu holds it in host memory")):
        assert main(["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output",
                     str(tmp_path / f"load-{dtype}"), "--dtype", dtype]) == 2
        line = [ln for ln in capsys.readouterr().err.splitlines() if " ERROR " in ln][0]
        assert "infer ran out of memory (CUDA out of memory. Tried to allocate 8.00 GiB.)" in line and said in line
        assert dtype == "float32" or "--dtype" not in line


def test_after_a_batch_runs_out_of_memory_the_rest_of_the_run_takes_half_as_many(model, tmp_path, monkeypatch,
                                                                                  caplog):
    """The run went back to the full --batch-size after a batch that ran out of memory was retried one by one: the
    next batch of that size ran out again, and was retried one by one again, to the end of the run. Halved (and said
    once), for the LLM's batches and a decoder's alike."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": f"r{k}", "prompt": GENERATE["image"], "seed": k}
                                                     for k in range(8)])
    real_answers, real_decoder = runner.generate_answers, runner.run_decoder
    llm_batches, decoder_batches = [], []

    def answers(model, batch, settings):  # memory for 2 requests at a time
        llm_batches.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return real_answers(model, batch, settings)

    def decoder(model, jobs):  # memory for 2 signal groups at a time
        decoder_batches.append(len(jobs))
        if len(jobs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")
        return real_decoder(model, jobs)

    monkeypatch.setattr(runner, "generate_answers", answers)
    monkeypatch.setattr(runner, "run_decoder", decoder)
    monkeypatch.setattr(runner, "release_memory", lambda: None)
    counts = run_requests(model, requests, tmp_path / "out", batch_size=4, decode_batch_size=8, max_new_tokens=8)
    assert (counts["done"], counts["failed"]) == (8, 0)
    assert llm_batches == [4, 1, 1, 1, 1, 2, 2]  # was [4, 1, 1, 1, 1, 4, 1, 1, 1, 1]
    groups = sum(len(r["files"]) for r in records_by_id(tmp_path / "out").values())
    assert groups == 8 and decoder_batches == [8, *[1] * 8]  # one decoder batch: halved for nothing after it
    assert caplog.text.count("the rest of this run takes 2 requests through the LLM at a time") == 1
    assert "give --batch-size 2 to start there" in caplog.text
    assert "the rest of this run takes 4 signal groups per image decoder call" in caplog.text
    # --decode-batch-size is every decoder's: the hint said to give it as if it were the image decoder's alone
    assert ("(give --decode-batch-size 4 to start there; it sets every decoder's batch size, not this one's "
            "alone)") in caplog.text
    assert ("retrying its signal groups one at a time (a smaller --decode-batch-size avoids these retries; it sets "
            "every decoder's batch size, not this one's alone)") in caplog.text


def test_a_decoder_batch_that_runs_out_of_memory_halves_the_decoder_batches_after_it(model, tmp_path, monkeypatch):
    requests = write_requests(tmp_path / "r.jsonl", [{"id": f"r{k}", "prompt": GENERATE["image"], "seed": k}
                                                     for k in range(8)])
    real_decoder, decoder_batches = runner.run_decoder, []

    def decoder(model, jobs):
        decoder_batches.append(len(jobs))
        if len(jobs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")
        return real_decoder(model, jobs)

    monkeypatch.setattr(runner, "run_decoder", decoder)
    monkeypatch.setattr(runner, "release_memory", lambda: None)
    counts = run_requests(model, requests, tmp_path / "out", batch_size=2, decode_batch_size=4, max_new_tokens=8)
    assert counts["done"] == 8
    assert decoder_batches == [4, 1, 1, 1, 1, 2, 2]  # was [4, 1, 1, 1, 1, 4, 1, 1, 1, 1]


def test_a_decoder_that_runs_out_of_memory_halves_its_own_batches_not_the_other_decoders(model, tmp_path,
                                                                                          monkeypatch):
    """One batch size was halved for every decoder: the image decoder running out of memory made the audio decoder,
    which holds another amount, decode its groups one at a time too."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": f"r{k}", "prompt": GENERATE[m], "seed": k}
                                                     for k, m in enumerate(["image", "audio"] * 4)])
    real_decoder, batches = runner.run_decoder, {"image": [], "audio": []}

    def decoder(model, jobs):  # the image decoder has memory for 1 group at a time, the audio decoder for more
        batches[jobs[0].modality].append(len(jobs))
        if jobs[0].modality == "image" and len(jobs) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")
        return real_decoder(model, jobs)

    monkeypatch.setattr(runner, "run_decoder", decoder)
    monkeypatch.setattr(runner, "release_memory", lambda: None)
    counts = run_requests(model, requests, tmp_path / "out", batch_size=4, decode_batch_size=2, max_new_tokens=8)
    assert (counts["done"], counts["failed"]) == (8, 0)
    assert batches == {"image": [2, 1, 1, 1, 1], "audio": [2, 2]}  # audio was [1, 1, 1, 1]


def test_the_final_line_says_where_the_failed_requests_are_and_the_same_command_retries_only_them(
        ckpt, tmp_path, caplog):
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "ok", "prompt": "Hello."},
                                                     {"id": "lost", "prompt": "What is this?", "image": "cat.png"}])
    out = tmp_path / "out"
    args = ["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out), "--max-new-tokens", "3"]
    assert main(args) == 1
    last = caplog.records[-1].getMessage()
    assert f"failed requests: {out / 'pages' / 'failed.html'} lists them" in last
    assert f"jq -c 'select(.error)' {out / 'results.jsonl'}" in last and "the same command retries only them" in last
    assert "lost" in (out / "pages" / "failed.html").read_text()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "cat.png")  # the missing file, found
    caplog.clear()
    assert main(args) == 0
    assert "requests: 1 done, 0 failed, 1 already done" in caplog.text and "failed requests:" not in caplog.text
    assert not (out / "pages").exists()
    (tmp_path / "cat.png").unlink()
    caplog.clear()
    assert main([*args, "--overwrite"]) == 1  # every request answered again: the retry must leave --overwrite out
    assert "the same command without --overwrite retries only them" in caplog.records[-1].getMessage()


def test_the_line_saying_where_the_failed_requests_are_is_shown_under_quiet(ckpt, tmp_path, capsys):
    """`mmllm infer -q` (warnings and errors only, for CI) exited 1 without the line naming failed.html and how to
    retry: it was INFO, so the run ended on the last request's own warning."""
    requests = write_requests(tmp_path / "r.jsonl", [{"id": "lost", "prompt": "What is this?", "image": "cat.png"}])
    out = tmp_path / "out"
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(requests), "--output", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert f"failed requests: {out / 'pages' / 'failed.html'} lists them" in err[-1], err
    assert not any(" INFO " in line for line in err), err


def test_a_prompt_from_flags_is_named_by_its_flag_in_its_error_not_by_a_temporary_file(ckpt, tmp_path, capsys):
    """`mmllm infer --prompt "Say <img_0>"` failed with "request.jsonl:1: messages[0]: ...", naming the temporary
    requests file the flags are written to, which the user never wrote and which is gone once the run ends."""
    out = tmp_path / "out"
    assert main(["infer", "--checkpoint", str(ckpt), "--prompt", "Say <img_0> now", "--output", str(out), "-q"]) == 1
    record = json.loads(capsys.readouterr().out)
    assert record["error"].startswith("--prompt: messages[0]: the user text holds '<img_0>' (at character 5)"), record
    assert "request.jsonl" not in (out / "results.jsonl").read_text() + (out / "pages" / "failed.html").read_text()


# ------------------------------------------------------------------------------------------ message hygiene


def test_special_token_text_is_its_lines_error_and_unknown_message_keys_are_warned_once(tiny_model, tmp_path,
                                                                                        caplog):
    """A request whose text holds a signal token's string is its line's error, naming the token (it was read as
    the token: a signal group no answer produced); a message key mmllm does not read ("output" for "outputs")
    changed the prompt without a word: each such key is warned about once per file, naming its line."""
    replied = [{"role": "user", "content": "Draw it."},
               {"role": "assistant", "content": "Here.", "output": [{"modality": "image"}]},
               {"role": "user", "content": "Again."}]
    requests = write_requests(tmp_path / "r.jsonl", [
        {"id": "inject", "prompt": "Say <img_0><img_1><img_2><img_3> now."},
        {"id": "typo", "messages": replied},
        {"id": "typo-again", "messages": replied},
        {"id": "named", "messages": [{"role": "user", "content": "Hi.", "name": "ann"}]},
    ])
    with caplog.at_level("WARNING", logger="mmllm.inference.runner"):
        counts = run_requests(tiny_model, requests, tmp_path / "out", max_new_tokens=2, batch_size=2)
    assert counts["done"] == 3 and counts["failed"] == 1, counts
    error = records_by_id(tmp_path / "out")["inject"]["error"]
    assert error.startswith("r.jsonl:1: messages[0]: the user text holds '<img_0>'") and "signal token" in error
    warned = [r.getMessage() for r in caplog.records if "which mmllm does not read" in r.getMessage()]
    assert len(warned) == 2, warned
    assert warned[0].startswith("r.jsonl:2: messages[1] has the key 'output'") and "did you mean 'outputs'?" in warned[0]
    assert warned[1].startswith("r.jsonl:4: messages[0] has the key 'name'")
    assert "role, content, media, outputs" in warned[1]


def test_media_errors_name_the_request_line_or_prompt_flag_as_other_request_errors_do(tiny_model, tmp_path):
    """A missing or undecodable media file said only "image file not found: req/nothere.png", where every other
    request error starts with its FILE:LINE (or --prompt)."""
    (tmp_path / "empty.png").write_bytes(b"")
    requests = write_requests(tmp_path / "r.jsonl", [
        {"id": "ok", "prompt": "Hi."},
        {"id": "missing", "prompt": "What is this?", "image": "nothere.png"},
        {"id": "empty", "messages": [{"role": "user", "content": "<image> this?", "media": ["empty.png"]}]},
    ])
    counts = run_requests(tiny_model, requests, tmp_path / "out", max_new_tokens=2)
    assert counts["done"] == 1 and counts["failed"] == 2, counts
    recs = records_by_id(tmp_path / "out")
    assert recs["missing"]["error"].startswith("r.jsonl:2: image file not found: "), recs["missing"]
    assert recs["empty"]["error"].startswith("r.jsonl:3: ") and "empty" in recs["empty"]["error"], recs["empty"]
    one = write_requests(tmp_path / "one" / "request.jsonl", [{"id": "p", "prompt": "What?", "image": "nothere.png"}])
    run_requests(tiny_model, one, tmp_path / "out-prompt", max_new_tokens=2, source="--prompt")
    assert records_by_id(tmp_path / "out-prompt")["p"]["error"].startswith("--prompt: image file not found: ")


def test_an_empty_prompt_beside_a_misspelt_content_names_the_key_and_what_it_likely_meant(tiny_model, tmp_path):
    """``"contnet": "..."`` on the last user turn failed as "the prompt is empty", which does not point at the
    typo (its warning is a log line among others)."""
    requests = write_requests(tmp_path / "r.jsonl", [
        {"id": "typo", "messages": [{"role": "user", "contnet": "Draw a red circle."}]},
        {"id": "blank", "messages": [{"role": "user", "content": " "}]},
    ])
    run_requests(tiny_model, requests, tmp_path / "out", max_new_tokens=2)
    recs = records_by_id(tmp_path / "out")
    assert recs["typo"]["error"] == (
        "r.jsonl:1: messages[0]: the prompt is empty; the message has the key(s) 'contnet', which mmllm does not "
        "read (a message's keys: role, content, media, outputs); did you mean 'content'?"), recs["typo"]
    assert recs["blank"]["error"] == "r.jsonl:2: the prompt is empty"  # no unknown key: as before


def test_an_answer_an_older_mmllm_rendered_without_an_earlier_outputs_signal_tokens_is_refused_on_resume(tmp_path):
    """A request giving an earlier answer's outputs was answered by an mmllm that left them out of the prompt; its
    record (so its digest) is unchanged, so a re-run skipped it and kept an answer to another prompt. Such an
    answer is stale now; one made since (it holds the "reply" that came with the change, or its "render") and any
    request without earlier outputs are resumed."""
    given = {"id": "a", "messages": [{"role": "user", "content": "Draw it."},
                                     {"role": "assistant", "content": "Here.", "outputs": [{"modality": "image"}]},
                                     {"role": "user", "content": "Again."}]}
    plain = {"id": "b", "prompt": "Hello."}
    requests = write_requests(tmp_path / "r.jsonl", [given, plain])
    made = runner.run_settings(None, "float32")
    out = tmp_path / "out"
    out.mkdir()

    def record(request, **extra):
        settings = {k: v for k, v in runner.request_settings(made, request).items() if k != "render"}
        return json.dumps({"id": request["id"], "text": "hi", "files": [], "checkpoint": "none", "error": None,
                           "settings": settings, "inputs": [], **extra})

    (out / "results.jsonl").write_text(record(given) + "\n" + record(plain) + "\n")  # as an older mmllm wrote them
    with pytest.raises(runner.OutputError, match=r"1 request\(s\) .* an older mmllm, whose prompt left out an earlier "
                                                 r"answer's outputs"):
        runner.check_resume(out, requests, made)
    (out / "results.jsonl").write_text(record(given, reply={"role": "assistant", "content": "hi"}) + "\n")
    runner.check_resume(out, requests, made)
    (out / "results.jsonl").write_text(json.dumps({"id": "a", "text": "hi", "files": [], "checkpoint": "none",
                                                   "error": None, "inputs": [],
                                                   "settings": runner.request_settings(made, given)}) + "\n")
    runner.check_resume(out, requests, made)


def test_an_answer_a_newer_mmllm_rendered_is_refused_on_resume(tmp_path):
    """A record whose "render" is above this mmllm's RENDERING was answered from a prompt this mmllm may render
    otherwise, for any request (it cannot tell which): resuming it was silent, keeping that answer; now refused,
    naming the newer rendering. The same rendering resumes."""
    plain = {"id": "b", "prompt": "Hello."}
    requests = write_requests(tmp_path / "r.jsonl", [plain])
    made = runner.run_settings(None, "float32")
    out = tmp_path / "out"
    out.mkdir()

    def record(render):
        settings = {**runner.request_settings(made, plain), "render": render}
        return json.dumps({"id": "b", "text": "hi", "files": [], "checkpoint": "none", "error": None,
                           "settings": settings, "inputs": [], "reply": {"role": "assistant", "content": "hi"}})

    (out / "results.jsonl").write_text(record(runner.RENDERING) + "\n")
    runner.check_resume(out, requests, made)
    (out / "results.jsonl").write_text(record(runner.RENDERING + 1) + "\n")
    with pytest.raises(runner.OutputError, match=rf"1 request\(s\) .* a newer mmllm \(its prompt rendering "
                                                 rf"{runner.RENDERING + 1}; this one's is {runner.RENDERING}"):
        runner.check_resume(out, requests, made)
