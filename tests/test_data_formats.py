"""Every data format read into the normal form; every malformed record reported with file:line and
skipped; media paths outside the data root refused unless allowed. No model, all fast."""

import json

import pytest

from mmllm.config import DatasetConfig
from mmllm.data.dataset import load_stage_records
from mmllm.data.formats import read_records
from mmllm.data.template import pair_to_conversation
from tests.conftest import REPO

MEDIA = REPO / "data/samples/media"
EXAMPLES = {
    "mmllm-pairs.jsonl": "mmllm-pairs",
    "mmllm-chat.jsonl": "mmllm-chat",
    "nextgpt/cc3m.json": "nextgpt-pairs",
    "nextgpt/audiocap_comprehension.json": "nextgpt-pairs",
    "nextgpt/webvid_generation.json": "nextgpt-pairs",
    "nextgpt/image_t2x.json": "nextgpt-t2x",
    "nextgpt/mosit.json": "nextgpt-mosit",
    "llava/llava_instruct.json": "llava",
}


def _write(path, records, array=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    if array:
        path.write_text(json.dumps(records, indent=4))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _touch(root, *names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_documented_examples_read_cleanly_and_name_existing_media(name):
    records, errors = read_records(REPO / "data/examples" / name, EXAMPLES[name], MEDIA)
    assert records and not errors
    for rec in records:
        paths = [rec.media] if hasattr(rec, "caption") else [r.path for r in rec.media_refs()] + [
            o.path for o in rec.output_refs() if o.path]
        assert all(p is None or p.is_file() for p in paths), paths


def test_nextgpt_pairs_raw_comprehension_and_generation_with_subfolders_and_embeddings(tmp_path):
    _touch(tmp_path, "images/001.jpg", "audios/7.wav", "videos/v.mp4")
    raw = _write(tmp_path / "cc3m.json", [{"caption": "a dog ", "id": "001", "image_name": "001.jpg"}])
    comp = _write(tmp_path / "audiocap_comprehension.json", [{"input_audio": "7.wav", "conversations": [
        {"from": "human", "value": "<audio>\nWhat is it?"}, {"from": "gpt", "value": "a train horn"}]}])
    gen = _write(tmp_path / "webvid_generation.json", [{
        "output_video": "v.mp4", "video_captions": "waves on a beach", "video_caption_embeddings": "v.mp4.npy",
        "conversations": [{"from": "human", "value": "make a clip of waves on a beach"},
                          {"from": "gpt", "value": "Sure thing! <video>"}]}])
    (pair,), errors = read_records(raw, "nextgpt-pairs", embeddings=tmp_path / "embed")
    assert not errors and pair.modality == "image" and pair.caption == "a dog"
    assert pair.media == tmp_path / "images/001.jpg" and pair.embedding == tmp_path / "embed/001.jpg.npy"
    (c,), _ = read_records(comp, "nextgpt-pairs")
    ea = pair_to_conversation(c, "encode-align")
    assert ea.messages[0].content == "<audio>\nWhat is it?" and ea.messages[1].content == "a train horn"
    assert ea.messages[0].media[0].path == tmp_path / "audios/7.wav"
    (g,), _ = read_records(gen, "nextgpt-pairs", embeddings=tmp_path / "embed")
    da = pair_to_conversation(g, "decode-align")
    assert da.messages[0].content == "make a clip of waves on a beach"
    assert da.messages[1].content == "Sure thing!"  # the <video> marker is replaced by signal tokens
    out = da.messages[1].outputs[0]
    assert (out.modality, out.caption, out.embedding) == ("video", "waves on a beach", tmp_path / "embed/v.mp4.npy")
    assert pair_to_conversation(g, "encode-align").messages[0].content == "<video>"  # no prompt for that stage


def test_nextgpt_media_are_looked_up_per_record_in_root_then_the_subfolder(tmp_path):
    _touch(tmp_path, "red.png", "images/only_in_sub.png", "images/a.png", "images/b.png")
    raw = _write(tmp_path / "cc3m.json", [{"caption": c, "image_name": n} for c, n in (
        ("red", "red.png"), ("sub", "only_in_sub.png"), ("gone", "gone.png"))])
    pairs, errors = read_records(raw, "nextgpt-pairs")
    assert not errors
    assert [p.media for p in pairs[:2]] == [tmp_path / "red.png", tmp_path / "images/only_in_sub.png"]
    assert pairs[2].media == tmp_path / "gone.png"  # neither: where this file's first record was found
    nested = _write(tmp_path / "nested.json", [{"caption": c, "image_name": n} for c, n in (
        ("a", "a.png"), ("gone", "gone.png"))])
    pairs, _ = read_records(nested, "nextgpt-pairs")
    assert [p.media for p in pairs] == [tmp_path / "images/a.png", tmp_path / "images/gone.png"]


def test_nextgpt_t2x_old_and_new_layouts(tmp_path):
    path = _write(tmp_path / "audio_t2x.json", [
        {"mm_name": "34706.wav", "output_modality": "audio", "conversation": [
            {"from": "human", "value": "I need an engine sound.", "input_modality": "text"},
            {"from": "gpt", "value": "Here you are.", "caption": "an engine works", "output_modality": "audio"}]},
        {"audio_captions": ["rain falls"], "audio_caption_embeddings": ["r.wav.npy"], "conversations": [
            {"from": "human", "value": "Rain, please."},
            {"from": "gpt", "value": "Listen <audio> and relax."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello.",
                                                              "caption": "", "output_modality": "text"}]},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y <image>"}]},
        # a misspelt modality: the caption was dropped without a word, leaving a plain text answer
        {"conversations": [{"from": "human", "value": "Draw a cat."},
                           {"from": "gpt", "value": "Here.", "caption": "a cat", "output_modality": "picture"}]},
    ])
    convs, errors = read_records(path, "nextgpt-t2x", embeddings=tmp_path)
    old, new, text = convs
    assert [m.role for m in old.messages] == ["user", "assistant"]
    out = old.messages[1].outputs[0]
    assert (out.modality, out.caption, out.embedding.name) == ("audio", "an engine works", "34706.wav.npy")
    out = new.messages[1].outputs[0]
    assert new.messages[1].content == "Listen and relax."
    assert (out.modality, out.caption, out.embedding.name) == ("audio", "rain falls", "r.wav.npy")
    assert text.messages[1].outputs == []
    assert len(errors) == 2 and f"{path}:" in errors[0] and "no caption" in errors[0]
    assert f"{path}:" in errors[1] and "output_modality 'picture'" in errors[1] and "'a cat'" in errors[1]


def test_nextgpt_t2x_a_bare_marker_after_a_captioned_turn_takes_the_next_caption(tmp_path):
    """The record's `image_captions` list every output, the first turn's also on the turn: the second turn's
    bare <image> took the list's first caption again (the first image's) as its target."""
    path = _write(tmp_path / "image_t2x.json", [{"image_captions": ["a red cat", "a blue dog"], "conversations": [
        {"from": "human", "value": "Draw a red cat."},
        {"from": "gpt", "value": "Here. <image>", "caption": "a red cat", "output_modality": "image"},
        {"from": "human", "value": "Now a blue dog."}, {"from": "gpt", "value": "Sure. <image>"}]}])
    (conv,), errors = read_records(path, "nextgpt-t2x")
    assert not errors and [o.caption for o in conv.output_refs()] == ["a red cat", "a blue dog"]


def test_nextgpt_mosit_inputs_outputs_and_lists(tmp_path):
    _touch(tmp_path, "rain.wav", "a.jpg", "clouds.jpg")
    path = _write(tmp_path / "mosit.json", [
        {"image_list": ["a.jpg"], "conversation": [
            {"from": "human", "value": "Hear <Audio>thunder and rain</Audio> and see <image>", "audio_list": ["rain.wav"]},
            {"from": "gpt", "value": "A storm! <Image>dark storm\nclouds</Image> <Video>lightning</Video>",
             "image_list": ["clouds.jpg"]},
            {"from": "human", "value": "Another?"},
            {"from": "gpt", "value": "Sure <image>", "caption": "a rainbow"}]},
        {"conversation": [{"from": "human", "value": "look <Image>a cat</Image>"}, {"from": "gpt", "value": "ok"}]},
    ])
    (conv,), errors = read_records(path, "nextgpt-mosit")
    user, reply, _, last = conv.messages
    assert user.content == "Hear <audio> and see <image>"
    assert [(r.modality, r.path.name) for r in user.media] == [("audio", "rain.wav"), ("image", "a.jpg")]
    assert reply.content == "A storm!"
    assert [(o.modality, o.caption, o.path and o.path.name) for o in reply.outputs] == [
        ("image", "dark storm clouds", "clouds.jpg"), ("video", "lightning", None)]
    assert [(o.modality, o.caption) for o in last.outputs] == [("image", "a rainbow")]
    assert len(errors) == 1 and f"{path}:" in errors[0] and "image_list" in errors[0]


def test_llava_conversations_placeholders_and_text_only(tmp_path):
    _touch(tmp_path, "coco/1.jpg", "coco/2.jpg")
    path = _write(tmp_path / "llava.json", [
        {"id": "a", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A bus."}]},
        {"id": "b", "image": "coco/2.jpg", "conversations": [
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A cat."}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "d", "image": ["coco/1.jpg", "coco/2.jpg"], "conversations": [
            {"from": "human", "value": "<image> vs <image> vs <image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "e", "conversations": [{"from": "robot", "value": "beep"}]},
    ])
    convs, errors = read_records(path, "llava")
    a, b, c = convs
    assert a.messages[0].media[0].path == tmp_path / "coco/1.jpg"
    assert b.messages[0].content.startswith("<image>\n") and b.messages[0].media[0].path.name == "2.jpg"
    assert c.media_refs() == [] and c.messages[1].role == "assistant"
    assert len(errors) == 2
    assert f"{path}:" in errors[0] and "3 <image> placeholder(s)" in errors[0] and "2 file(s)" in errors[0]
    assert "'robot'" in errors[1]


def test_errors_name_file_and_line_and_reading_goes_on(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"caption": "ok", "image_name": "a.jpg"},\n  {"caption": "x"},\n  7,\n'
                    '  {"caption": "fine", "image_name": "b.jpg"}\n]\n')
    records, errors = read_records(path, "nextgpt-pairs")
    assert [r.caption for r in records] == ["ok", "fine"]
    assert errors[0].startswith(f"{path}:3:") and "not a NExT-GPT pair record" in errors[0]
    assert errors[1].startswith(f"{path}:4:") and "expected a JSON object" in errors[1]
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"caption": "ok", "image_name": "a.jpg"},\n {"caption": oops}\n]')
    records, errors = read_records(broken, "nextgpt-pairs")
    assert len(records) == 1 and errors[0].startswith(f"{broken}:3:") and "not valid JSON" in errors[0]
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"modality": "image", "caption": "a", "media": "a.png"}\nnot json\n{"modality": "smell"}\n')
    records, errors = read_records(jsonl, "mmllm-pairs")
    assert len(records) == 1 and errors[0].startswith(f"{jsonl}:2:") and errors[1].startswith(f"{jsonl}:3:")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_records(tmp_path / "nope.json", "llava")


def test_a_byte_that_is_not_utf8_is_an_error_with_its_line_not_a_crash(tmp_path):
    """A Latin-1 caption among UTF-8 ones raised a bare UnicodeDecodeError (no file, no line) out of the
    reader: training stopped with a traceback, and the rest of the file was lost."""
    lines = [json.dumps({"modality": "image", "caption": c}).encode() for c in ("a red circle", "café", "a cat")]
    lines[1] = lines[1].replace(b"caf\\u00e9", b"caf\xe9")
    jsonl = tmp_path / "latin.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # a BOM too
    records, errors = read_records(jsonl, "mmllm-pairs")
    assert [r.caption for r in records] == ["a red circle", "a cat"]
    assert len(errors) == 1 and errors[0].startswith(f"{jsonl}:2: not valid UTF-8 (byte 0xe9 at column 38)")
    array = tmp_path / "latin.json"
    array.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")
    records, errors = read_records(array, "mmllm-pairs")
    assert not records and len(errors) == 1 and errors[0].startswith(f"{array}:3: not valid UTF-8 (byte 0xe9")


def test_paths_outside_the_root_are_refused_unless_allowed(tmp_path):
    root = tmp_path / "data"
    _touch(tmp_path, "secret.png", "data/ok.png")
    (root / "linked").symlink_to(tmp_path)  # a link the user placed inside the root is followed
    lines = [{"modality": "image", "caption": c, "media": m} for c, m in
             [("ok", "ok.png"), ("up", "../secret.png"), ("abs", str(tmp_path / "secret.png")),
              ("link", "linked/secret.png")]]
    path = _write(root / "pairs.jsonl", lines, array=False)
    records, errors = read_records(path, "mmllm-pairs")
    assert [r.caption for r in records] == ["ok", "link"]
    assert len(errors) == 2 and all("outside the data root" in e and "allow_outside_root" in e for e in errors)
    assert errors[0].startswith(f"{path}:2.media:")
    records, errors = read_records(path, "mmllm-pairs", allow_outside_root=True)
    assert len(records) == 4 and not errors
    ds = DatasetConfig(path=str(path), format="mmllm-pairs", allow_outside_root=True)
    per, _, errs = load_stage_records([ds], "encode-align")
    assert len(per[0]) == 4 and not errs


def test_pair_formats_are_refused_for_the_instruct_stage(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"modality": "image", "caption": "a"}], array=False)
    with pytest.raises(ValueError, match="instruct stage reads conversations"):
        load_stage_records([DatasetConfig(path=str(path), format="mmllm-pairs")], "instruct")


WEIRD = [{}, {"conversations": 5}, {"conversations": [{"from": "human", "value": 3}]}, {"conversation": [7]},
         {"image": 5, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
         {"image_list": {"a": 1}, "conversation": [{"from": "human", "value": "<Image>x</Image>"}]},
         {"caption": None, "image_name": "a.jpg"}, {"input_image": "a.jpg", "conversations": []},
         {"output_image": "a.jpg", "image_captions": ["a", "b"], "conversations": []},
         {"messages": [{"role": "user", "content": "<image>", "media": [1]}]}, {"modality": "image", "caption": 3}]


@pytest.mark.parametrize("fmt", sorted({*EXAMPLES.values()}))
def test_odd_records_are_errors_with_their_line_never_exceptions(tmp_path, fmt):
    path = _write(tmp_path / "odd.jsonl", WEIRD, array=False)
    records, errors = read_records(path, fmt)
    assert records == [] and len(errors) == len(WEIRD)
    assert all(e.startswith(f"{path}:{i + 1}") for i, e in enumerate(errors))


def test_chat_mistakes_from_other_formats_are_named(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "messages": [{"role": "user", "content": "draw"}, {"role": "assistant", "content": "Here <image>",
                                                                        "media": ["x.png"]}]},
        {"id": "b", "messages": [{"role": "user", "content": "<Image> what?", "media": ["x.png"]},
                                 {"role": "assistant", "content": "x"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    ]))
    records, errors = read_records(path, "mmllm-chat")
    assert not records and len(errors) == 3
    assert "an assistant message with <image>: placeholders mark media *inputs*" in errors[0] and "'outputs'" in errors[0]
    assert "placeholders are lower-case" in errors[1]
    assert "that is format: llava" in errors[2]


def test_pair_mistakes_of_a_first_captions_file_name_the_fields_it_has(tmp_path):
    """A captions file as one first writes it ({"image", "text"}), or with the caption under another name: the
    error names the missing field and the keys the record does have, not "modality None"."""
    path = _write(tmp_path / "captions.jsonl", [
        {"image": "a.png", "text": "a red circle"},
        {"id": "p1", "modality": "image", "media": "a.png", "text": "a red circle"},
        {"id": "p2", "modality": "smell", "media": "a.png", "caption": "roses"},
        {"id": "p3", "modality": "image", "media": "a.png", "caption": " "},
    ], array=False)
    records, errors = read_records(path, "mmllm-pairs")
    assert not records and len(errors) == 4
    assert errors[0] == (f"{path}:1: no 'modality' (one of image, audio, video); an mmllm-pairs record is "
                         "{\"id\", \"modality\", \"media\", \"caption\"}, this one has the keys ['image', 'text']")
    assert errors[1].startswith(f"{path}:2: missing or empty 'caption'") and "['id', 'media', 'modality', 'text']" in errors[1]
    assert errors[2] == f"{path}:3: modality 'smell' is not one of image, audio, video"
    assert errors[3] == f"{path}:4: missing or empty 'caption'"  # it has the field: no list of keys


def test_chat_mistakes_of_a_first_conversations_file_say_what_to_write(tmp_path):
    """The requests file's "image": PATH shorthand in a message was ignored without a word (the conversation
    trained as text alone); outputs under other names, or not a list, named neither what was given nor the fix."""
    _touch(tmp_path, "a.png")
    draw = {"role": "user", "content": "Draw a red circle."}
    path = _write(tmp_path / "chat.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "What is this?", "image": "a.png"},
                                 {"role": "assistant", "content": "A red circle."}]},
        {"id": "b", "messages": [draw, {"role": "assistant", "content": "Here.",
                                        "outputs": [{"type": "image", "caption": "a red circle"}]}]},
        {"id": "c", "messages": [draw, {"role": "assistant", "content": "Here.", "outputs": "a red circle"}]},
        {"id": "d", "messages": [draw, {"role": "assistant", "content": "Here.",
                                        "outputs": [{"modality": "image", "text": "a red circle"}]}]},
        {"id": "e", "messages": [{"role": "user", "content": "What is this?", "media": ["a.png"]},
                                 {"role": "assistant", "content": "A red circle."}]},
        {"id": "f", "messages": [{"role": "user", "content": "<image>\nWhat is this?", "media": ["a.png"]},
                                 {"role": "assistant", "content": "A red circle."}]},
    ], array=False)
    records, errors = read_records(path, "mmllm-chat")
    assert [r.id for r in records] == ["f"] and len(errors) == 5
    assert errors[0].startswith(f"{path}:1.messages[0]: a message field 'image': in mmllm-chat a message lists its "
                                "media files under 'media' and marks where each goes with <image> in 'content'")
    assert errors[1].endswith("outputs[0]: expected {'modality': one of ('image', 'audio', 'video'), 'caption': ...}; "
                              "it has the keys ['caption', 'type']")
    assert errors[2] == (f"{path}:3.messages[1].outputs: expected a list of {{'modality': ..., 'caption': ...}}, "
                         "got 'a red circle'")
    assert errors[3].endswith("outputs[0]: missing or empty 'caption'; it has the keys ['modality', 'text']")
    assert errors[4].endswith("but 'media' lists 1 path(s) (each media path needs its <image>, <audio> or <video> "
                              "in 'content', where the media goes)")


def test_a_media_root_that_is_not_a_folder_is_refused_naming_it(tmp_path):
    """Every media path of the file would be missing: training skipped every sample with media, one by one."""
    path = _write(tmp_path / "pairs.jsonl", [{"modality": "image", "media": "a.png", "caption": "x"}], array=False)
    _touch(tmp_path, "media/a.png")
    with pytest.raises(FileNotFoundError, match=r"pairs.jsonl: its media root .*/medai is not a folder; fix the "
                                                r"dataset's `root:`"):
        read_records(path, "mmllm-pairs", tmp_path / "medai")
    (records, errors) = read_records(path, "mmllm-pairs", tmp_path / "media")
    assert records[0].media == tmp_path / "media/a.png" and not errors


def test_an_unpaired_surrogate_escape_is_a_malformed_record_not_a_crash_in_training(tmp_path):
    """JSON may escape half an emoji ("\\ud83d", a string cut by a UTF-16 length limit); the reader took it,
    and the tokenizer then raised TypeError mid-training (and `mmllm cache` UnicodeEncodeError)."""
    jsonl = tmp_path / "cut.jsonl"
    jsonl.write_text('{"modality": "image", "caption": "a cat \\ud83d"}\n'
                     '{"modality": "image", "caption": "a cat \\ud83d\\ude00"}\n'
                     '{"id": "l", "conversations": [{"from": "human", "value": "hi \\udc00"}, '
                     '{"from": "gpt", "value": "x"}]}\n')
    records, errors = read_records(jsonl, "mmllm-pairs")
    assert [r.caption for r in records] == ["a cat \U0001F600"]  # a whole pair is one emoji
    assert errors[0].startswith(f"{jsonl}:1: text with an unpaired UTF-16 surrogate ('a cat \\ud83d'")
    records, errors = read_records(jsonl, "llava")
    assert any(e.startswith(f"{jsonl}:3: text with an unpaired UTF-16 surrogate ('hi \\udc00'") for e in errors)


def test_a_media_name_the_file_system_refuses_is_one_bad_record_and_one_unreadable_file(tmp_path):
    """A name longer than the file system allows: looking it up raised OSError out of the reader (nextgpt
    formats look media up while reading) and out of `mmllm data check`'s probe, stopping both."""
    from mmllm.data.check import _MediaProbe

    _touch(tmp_path, "b.jpg")
    path = _write(tmp_path / "cc3m.json", [{"caption": "x", "image_name": "a" * 300 + ".jpg"},
                                           {"caption": "y", "image_name": "b.jpg"}])
    records, errors = read_records(path, "nextgpt-pairs")
    assert [r.caption for r in records] == ["y"]
    assert len(errors) == 1 and errors[0].startswith(f"{path}:2: malformed record") and "too long" in errors[0]
    problem = _MediaProbe(decode=False).problem("image", tmp_path / ("a" * 300 + ".jpg"))
    assert problem is not None and problem != "missing" and "too long" in problem


def test_json_lines_ending_in_a_lone_carriage_return_are_still_lines(tmp_path):
    """Reading the file as bytes (for per-line UTF-8 errors) split lines at \\n only: a file with classic Mac
    line ends (\\r) became one line, "not valid JSON (Extra data)", where text mode had read every record."""
    lines = [json.dumps({"modality": "image", "caption": c}) for c in ("a red circle", "a cat", "a dog")]
    path = tmp_path / "mac.jsonl"
    path.write_bytes("\r".join(lines[:2]).encode() + b"\r\n" + lines[2].encode() + b"\r")
    records, errors = read_records(path, "mmllm-pairs")
    assert not errors and [r.caption for r in records] == ["a red circle", "a cat", "a dog"]
    path.write_bytes(b"\r".join([lines[0].encode(), lines[1].encode().replace(b"cat", b"c\xe4t"), lines[2].encode()]))
    records, errors = read_records(path, "mmllm-pairs")
    assert [r.caption for r in records] == ["a red circle", "a dog"]
    assert len(errors) == 1 and errors[0].startswith(f"{path}:2: not valid UTF-8 (byte 0xe4 at column 38)")
