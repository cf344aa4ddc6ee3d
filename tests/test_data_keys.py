"""Keys of a training record (or of its messages, outputs, turns) that its format does not read: a typo
("output" for "outputs", "contnet" for "content", "medai" for "media") dropped outputs or media from training
without a word. Training warns once per key per file; `mmllm data check` lists them."""

from __future__ import annotations

import json
import logging

import pytest

from mmllm.cli import main
from mmllm.config import DatasetConfig
from mmllm.data.formats import CHAT_KEYS, read_records, scan_records
from mmllm.data.index import index_dataset
from mmllm.data.keys import MAX_UNKNOWN_KEYS, KeyTally
from tests.conftest import REPO


def chat(i: int, **extra) -> dict:
    """A conversation asking for an image output; ``extra``: keys added to its assistant message."""
    answer = {"role": "assistant", "content": "Here it is.",
              "outputs": [{"modality": "image", "caption": f"a red circle {i}"}], **extra}
    return {"id": f"c{i}", "messages": [{"role": "user", "content": f"Draw a circle {i}."}, answer]}


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def typo_file(tmp_path):
    """An mmllm-chat file: line 2's answer says "output" for "outputs" (as do lines 4 and 5), line 3's user
    message "contnet" for "content", line 5 has a record key "source" and an output's "medai"."""
    recs = [chat(0), chat(1, output=[{"modality": "image", "caption": "lost"}]), chat(2), chat(3, output=[]),
            chat(4, output=[])]
    recs[2]["messages"][0]["contnet"] = recs[2]["messages"][0].pop("content")
    recs[4]["source"] = "web"
    recs[4]["messages"][1]["outputs"][0]["medai"] = "img/4.png"
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, recs)
    return path


def test_training_warns_once_per_unknown_key_of_a_file_naming_its_first_line_count_and_likely_key(tmp_path, caplog):
    path = typo_file(tmp_path)
    with caplog.at_level(logging.WARNING):
        index, malformed, _ = index_dataset(DatasetConfig(path=str(path), format="mmllm-chat"), "instruct")
    assert len(index) == 5 and not malformed  # nothing refused: the keys were silently ignored
    warned = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert len(warned) == 4, warned  # one per key, not one per record
    (output,) = [w for w in warned if "messages[].output is" in w]
    assert output.startswith(f"{path}:2: messages[].output is a key the mmllm-chat format does not read")
    assert "did you mean 'outputs'?" in output and "3 record(s) of the file hold it" in output
    # a message's keys listed as `mmllm infer` lists them (role first), not alphabetically
    assert "(a message's keys: role, content, media, outputs)" in output
    assert "(a record's keys: id, messages)" in [w for w in warned if ": source is a key" in w][0]
    assert any(w.startswith(f"{path}:3: messages[].contnet ") and "did you mean 'content'?" in w for w in warned)
    assert any(w.startswith(f"{path}:5: messages[].outputs[].medai ") and "did you mean 'media'?" in w
               for w in warned)
    (source,) = [w for w in warned if ": source is a key" in w]
    assert "did you mean" not in source  # nothing close: said, not guessed
    assert [(k.place, k.first_line, k.count, k.did_you_mean) for k in index.unknown_keys] == [
        ("messages[].output", 2, 3, "outputs"), ("messages[].contnet", 3, 1, "content"), ("source", 5, 1, None),
        ("messages[].outputs[].medai", 5, 1, "media")]


def test_mmllm_refine_reading_a_file_warns_of_its_unknown_keys_too(tmp_path, caplog):
    records, _ = read_records(typo_file(tmp_path), "mmllm-chat")
    assert len(records) == 5
    assert sum("messages[].output is a key" in r.getMessage() for r in caplog.records) == 1


def test_a_refused_key_is_not_listed_again_as_unknown(tmp_path):
    """mmllm-chat refuses a message's "image": PATH (the requests file's shorthand) as malformed, saying so:
    not listed again among the keys ignored."""
    rec = chat(0)
    rec["messages"][0]["image"] = "a.png"
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [rec, chat(1)])
    index, malformed, _ = index_dataset(DatasetConfig(path=str(path), format="mmllm-chat"), "instruct")
    assert len(malformed) == 1 and "requests file's shorthand" in malformed[0]
    assert index.unknown_keys == []


# one record per format, every key its parser reads, and a typo at one level
EVERY_FORMAT = {
    "mmllm-pairs": ({"id": "p", "modality": "image", "media": "a.png", "caption": "a red circle",
                     "embedding": "a.npy"}, lambda r: r.update(captoin="x"), "captoin", "caption"),
    "mmllm-chat": ({"id": "c", "messages": [
        {"role": "user", "content": "<image>\nWhat?", "media": ["a.png"]},
        {"role": "assistant", "content": "This.",
         "outputs": [{"modality": "image", "caption": "a circle", "media": "b.png", "embedding": "b.npy"}]}]},
        lambda r: r["messages"][0].update(medai=["a.png"]), "messages[].medai", "media"),
    "llava": ({"id": "l", "image": "a.png", "video": [], "audio": [], "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "This."}]},
        lambda r: r.update(imgae="b.png"), "imgae", "image"),
    "nextgpt-pairs": ({"id": "g", "output_image": "a.png", "image_captions": ["a circle"],
                       "image_caption_embeddings": ["a.npy"], "conversations": [
                           {"from": "human", "value": "draw a circle"}, {"from": "gpt", "value": "Here. <image>"}]},
                      lambda r: r["conversations"][1].update(vlaue="x"), "conversations[].vlaue", "value"),
    "nextgpt-t2x": ({"id": "t", "output_modality": "image", "mm_name": "a", "image_captions": ["a circle"],
                     "image_caption_embeddings": ["a.npy"], "conversation": [
                         {"from": "human", "value": "Draw a circle."},
                         {"from": "gpt", "value": "Here.", "caption": "a circle", "output_modality": "image"}]},
                    lambda r: r["conversation"][1].update(captions="x"), "conversation[].captions", "caption"),
    "nextgpt-mosit": ({"id": "m", "audio_list": ["rain.wav"], "conversation": [
        {"from": "human", "value": "Listen: <Audio>rain</Audio>", "audio_list": ["rain.wav"]},
        {"from": "gpt", "value": "Storm: <Image>clouds</Image>", "image_list": ["c.png"], "caption": "clouds"}]},
        lambda r: r["conversation"][1].update(image_lsit=["c.png"]), "conversation[].image_lsit", "image_list"),
}


@pytest.mark.parametrize("fmt", list(EVERY_FORMAT))
def test_every_format_reads_its_own_keys_and_names_a_typo_at_each_level(tmp_path, fmt):
    good, add_typo, place, meant = EVERY_FORMAT[fmt]
    bad = json.loads(json.dumps(good))
    add_typo(bad)
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [good, bad])
    records, errors = read_records(path, fmt)
    assert len(records) == 2, errors  # the records themselves are well formed
    tally = KeyTally(_parser_keys(path, fmt))
    tally.see(good, 1)
    assert tally.unknown() == []  # every key the format reads is known to it
    tally.see(bad, 2)
    assert [(k.place, k.first_line, k.did_you_mean) for k in tally.unknown()] == [(place, 2, meant)]


def _parser_keys(path, fmt):
    from mmllm.data.formats import record_parser

    return record_parser(path, fmt).keys


def test_a_file_whose_records_each_hold_a_key_of_their_own_keeps_a_bounded_tally():
    """Records keyed by their own ids ({"r17": ...}) would add an unknown key per record: past MAX_UNKNOWN_KEYS
    they are counted together, so the state kept does not grow with the file."""
    tally = KeyTally(CHAT_KEYS)
    for i in range(MAX_UNKNOWN_KEYS + 50):
        tally.see({"messages": [], f"r{i}": 1}, i + 1)
    assert len(tally.unknown()) == MAX_UNKNOWN_KEYS
    assert tally.more == 50 and tally.more_line == MAX_UNKNOWN_KEYS + 1
    assert "50 record(s) hold still other keys" in tally.more_warning("f.jsonl", "mmllm-chat")


def test_data_check_lists_the_unknown_keys_of_each_file_without_failing(tmp_path, capsys):
    path = typo_file(tmp_path)
    report = tmp_path / "report.json"
    stage = str(REPO / "configs/stages/tiny/instruct.yaml")
    code = main(["data", "check", "--config", stage, "init_from=null", "--json", str(report),
                 f"data=[{{path: {path}, format: mmllm-chat}}]"])
    text = capsys.readouterr().out
    assert "keys the mmllm-chat format does not read (ignored, not an error" in text
    assert "- messages[].output: 3 record(s), first at line 2; did you mean 'outputs'?" in text
    assert "- messages[].contnet: 1 record(s), first at line 3; did you mean 'content'?" in text
    (checked,) = json.loads(report.read_text())["datasets"]
    assert checked["unknown_keys"][0] == {"key": "messages[].output", "first_line": 2, "count": 3,
                                          "did_you_mean": "outputs"}
    assert [k["key"] for k in checked["unknown_keys"]] == ["messages[].output", "messages[].contnet", "source",
                                                          "messages[].outputs[].medai"]
    assert code == 0, text  # not an error: an extra key may be meant (a "source" kept beside the data)


# (file, format) of every data file shipped with mmllm: examples of each layout, as the real files are written
SHIPPED_DATA = [
    ("data/samples/pairs.jsonl", "mmllm-pairs"), ("data/samples/chat.jsonl", "mmllm-chat"),
    ("data/examples/mmllm-pairs.jsonl", "mmllm-pairs"), ("data/examples/mmllm-chat.jsonl", "mmllm-chat"),
    ("data/examples/llava/llava_instruct.json", "llava"),
    ("data/examples/nextgpt/cc3m.json", "nextgpt-pairs"),
    ("data/examples/nextgpt/audiocap_comprehension.json", "nextgpt-pairs"),
    ("data/examples/nextgpt/webvid_generation.json", "nextgpt-pairs"),
    ("data/examples/nextgpt/image_t2x.json", "nextgpt-t2x"), ("data/examples/nextgpt/mosit.json", "nextgpt-mosit"),
]


@pytest.mark.parametrize(("path", "fmt"), SHIPPED_DATA)
def test_the_shipped_data_files_have_no_unknown_keys(path, fmt):
    """data/examples/nextgpt/image_t2x.json (NExT-GPT's t2x layout: "input_modality": "text" on each human turn)
    was warned of in every record, with "did you mean 'output_modality'?"."""
    records, _ = read_records(REPO / path, fmt)
    tally = KeyTally(_parser_keys(REPO / path, fmt))
    with open(REPO / path, "rb") as fh:
        for line, rec, _ in scan_records(REPO / path, fh):
            if isinstance(rec, dict):
                tally.see(rec, line)
    assert records and tally.unknown() == []


# records as NExT-GPT's data/prepare_data.py (and LLaVA's release) write them (keys no format needs: the clip's AudioCaps id, the pair
# a t2x conversation was written from, a human turn's input modality)
NEXTGPT_RELEASED = {
    "nextgpt-pairs": {"audio_id": 91139, "audio_name": "91139.wav", "caption": "a dog barks"},
    "nextgpt-t2x": {"audio_captions": ["an engine"], "audio_caption_embeddings": ["34706.wav.npy"],
                    "source_data": {"audiocap_id": 34706}, "conversations": [
                        {"from": "human", "value": "I need an engine sound.", "input_modality": "text"},
                        {"from": "gpt", "value": "Here. <audio>", "caption": "an engine", "output_modality": "audio"}]},
    # LLaVA-1.5's mix665k: a text-only ShareGPT record carries an empty "model"
    "llava": {"id": "sharegpt-1", "model": "", "conversations": [{"from": "human", "value": "Hi."},
                                                                 {"from": "gpt", "value": "Hello."}]},
}


@pytest.mark.parametrize("fmt", list(NEXTGPT_RELEASED))
def test_nextgpt_released_records_have_no_unknown_keys(tmp_path, fmt):
    rec = NEXTGPT_RELEASED[fmt]
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [rec])
    records, errors = read_records(path, fmt)
    assert len(records) == 1, errors
    tally = KeyTally(_parser_keys(path, fmt))
    tally.see(rec, 1)
    assert tally.unknown() == []
