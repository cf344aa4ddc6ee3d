"""A stage's data on the tiny assembly: several data sets mixed by weight with different modalities in
one batch; bad samples skipped and counted without stopping training; NExT-GPT's precomputed caption
embeddings used as targets when they fit the decoder and refused, loudly, when not; `mmllm data check`."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmllm.cli import main
from mmllm.config import load_stage
from mmllm.data.dataset import MixtureSampler, StageDataset, collate, load_stage_records
from mmllm.data.precomputed import open_precomputed
from mmllm.model import AnyToAnyModel
from mmllm.training.loop import token_spec, train
from tests.conftest import REPO

STAGE_FILES = {"encode-align": "encode_align", "decode-align": "decode_align", "instruct": "instruct"}


@pytest.fixture(scope="module")
def model(tiny_assembly):
    return AnyToAnyModel.assemble(tiny_assembly)


def stage_cfg(stage, datasets, out, *extra):
    items = ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}" for d in datasets)
    return load_stage(REPO / "configs/stages/tiny" / f"{STAGE_FILES[stage]}.yaml",
                      [f"output_dir={out}", "report_to=none", "init_from=null", f"data=[{items}]", *extra])


def split_pairs(sample_data, tmp_path):
    """The sample pairs as two files: images (8) and sounds (3), media under the samples' root."""
    lines = [json.loads(x) for x in sample_data["pairs"].read_text().splitlines()]
    files = {}
    for m in ("image", "audio"):
        files[m] = tmp_path / f"{m}.jsonl"
        files[m].write_text("".join(json.dumps(x) + "\n" for x in lines if x["modality"] == m))
    return files, sample_data["pairs"].parent


def datasets_for(cfg, model, precomputed=None):
    per, weights, errors = load_stage_records(cfg.data, cfg.stage)
    pre = {m: e.preprocess for m, e in model.encoders.items()}
    return [StageDataset(c, model.llm.tokenizer, token_spec(model), pre, precomputed=precomputed) for c in per], \
        weights, errors


def test_a_stage_mixes_datasets_by_weight_with_modalities_side_by_side(model, sample_data, tmp_path):
    files, root = split_pairs(sample_data, tmp_path)
    cfg = stage_cfg("encode-align", [{"path": files["image"], "format": "mmllm-pairs", "root": root, "weight": 1.0},
                                     {"path": files["audio"], "format": "mmllm-pairs", "root": root, "weight": 2.0}],
                    tmp_path / "out")
    datasets, weights, errors = datasets_for(cfg, model)
    assert [len(d) for d in datasets] == [8, 3] and weights == [1.0, 2.0] and not errors
    sampler = MixtureSampler([len(d) for d in datasets], weights, seed=0)
    epoch = [sampler.at(i) for i in range(sampler.epoch_size)]
    assert sampler.epoch_size == 14 and sum(d == 1 for d, _ in epoch) == 6  # the sounds twice over
    for step in range(sampler.epoch_size):
        picks = sampler.micro_batch(step, 0, 1, 0, 1, 4)
        if len({d for d, _ in picks}) == 2:
            break
    batch = collate([datasets[d][i] for d, i in picks], model.llm.tokenizer.pad_token_id)
    assert set(batch["media"]) == {"image", "audio"} and not batch["skipped"]
    spec = token_spec(model)
    for m, inputs in batch["media"].items():
        assert int((batch["input_ids"] == spec.placeholder_ids[m]).sum()) == inputs.shape[0] * spec.media_tokens[m]
    assert torch.isfinite(model(batch, cfg.losses)["loss"])


def test_bad_samples_are_skipped_and_counted_never_crashing_training(sample_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(sample_data["pairs"].parent / "media", root / "media")
    (root / "media/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [json.loads(x) for x in sample_data["pairs"].read_text().splitlines() if '"image"' in x][:3]
    lines += [{"id": "broken", "modality": "image", "media": "media/broken.png", "caption": "a broken image"},
              {"id": "gone", "modality": "image", "media": "media/gone.png", "caption": "a missing image"},
              {"id": "escape", "modality": "image", "media": "../../etc/passwd", "caption": "refused"}]
    (root / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = stage_cfg("encode-align", [{"path": root / "pairs.jsonl", "format": "mmllm-pairs"}], tmp_path / "out",
                    "max_steps=3", "batch_size=4", "save_every=0")
    result = train(cfg)
    assert result.steps == 3 and all(np.isfinite(result.losses))
    assert result.skipped >= 2  # each epoch of 5 samples holds both unreadable ones; 12 picks > 2 epochs


def test_a_step_without_one_readable_sample_changes_nothing(sample_data, tmp_path):
    """No update (AdamW's momentum and weight decay would still move the weights), a NaN in the loss
    list rather than a 0.0 that reads as a perfect step, and no say in keep_best."""
    from safetensors.torch import load_file

    root = tmp_path / "data"
    shutil.copytree(sample_data["pairs"].parent / "media", root / "media")
    good = next(json.loads(x) for x in sample_data["pairs"].read_text().splitlines() if '"image"' in x)
    lines = [good] + [{"id": f"gone-{i}", "modality": "image", "media": f"media/gone-{i}.png", "caption": "gone"}
                      for i in range(3)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = stage_cfg("encode-align", [{"path": root / "pairs.jsonl", "format": "mmllm-pairs"}], tmp_path / "out",
                    "max_steps=8", "batch_size=1", "save_every=1", "keep_last=0", "keep_best=true",
                    "optim.weight_decay=0.1")
    result = train(cfg)
    empty = [i for i, x in enumerate(result.losses) if not np.isfinite(x)]
    learned = [i for i, x in enumerate(result.losses) if np.isfinite(x)]
    assert empty and learned and result.skipped == len(empty)
    after_learning = [i for i in empty if i - 1 in learned]
    assert after_learning  # an empty step right after a real one: Adam's moments are not zero there
    for i in after_learning:
        before = load_file(str(tmp_path / "out" / f"step-{i}" / "learned.safetensors"))
        after = load_file(str(tmp_path / "out" / f"step-{i + 1}" / "learned.safetensors"))
        assert all(torch.equal(before[k], after[k]) for k in before)
    best = json.loads((tmp_path / "out" / "best.json").read_text())
    assert np.isfinite(best["metric"]) and int(best["checkpoint"].split("-")[1]) - 1 in learned
    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    progress = (tmp_path / "out" / "step-8" / "training_state" / "progress.json").read_text()
    assert json.loads(progress, parse_constant=strict)["losses"][empty[0]] is None  # strict JSON: null, not NaN


def test_data_check_judges_what_the_stage_reads(sample_data, tmp_path, capsys):
    """Output media are read only for the denoising loss; a dataset with nothing usable is a problem
    (training refuses it)."""
    root = tmp_path / "data"
    root.mkdir()
    pairs = [{"id": f"gone-{i}", "modality": "image", "media": f"gone-{i}.png", "caption": "a red circle"}
             for i in range(2)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs))
    (root / "empty.jsonl").write_text("")
    stage = str(REPO / "configs/stages/tiny/decode_align.yaml")
    data = f"data=[{{path: {root / 'pairs.jsonl'}, format: mmllm-pairs}}]"
    assert main(["data", "check", "--config", stage, "init_from=null", data]) == 0  # MSE needs the captions only
    assert main(["data", "check", "--config", stage, "init_from=null", data, "losses.denoise=0.5"]) == 1
    assert "missing files: 2" in capsys.readouterr().out
    empty = f"data=[{{path: {root / 'empty.jsonl'}, format: mmllm-pairs}}]"
    assert main(["data", "check", "--config", stage, "init_from=null", empty]) == 1
    assert "no usable records for stage decode-align; training refuses this dataset" in capsys.readouterr().out
    assert main(["train", "--config", stage, "init_from=null", empty, f"output_dir={tmp_path / 'out'}"]) == 2
    assert "empty.jsonl: no usable records" in capsys.readouterr().err


def test_data_check_counts_a_dataset_with_nothing_usable_apart_from_its_malformed_records(tmp_path, capsys):
    """Two records, both malformed: the report said 'records 2, ... malformed 3', the dataset's own
    'no usable records' counted as a third malformed record."""
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps({"image": f"{i}.png", "text": "a red circle"}) + "\n" for i in range(2)))
    report = tmp_path / "report.json"
    stage = str(REPO / "configs/stages/tiny/encode_align.yaml")
    assert main(["data", "check", "--config", stage, "--json", str(report),
                 f"data=[{{path: {path}, format: mmllm-pairs}}]"]) == 1
    text = capsys.readouterr().out
    assert "records 2, conversations for encode-align 0, malformed 2" in text and "3 problem(s) found" in text
    (checked,) = json.loads(report.read_text())["datasets"]
    assert len(checked["malformed"]) == 2 and all("no 'modality'" in m for m in checked["malformed"])
    assert checked["dataset_problems"] == [f"{path}: no usable records for stage encode-align; training refuses "
                                           "this dataset"]


def test_data_check_notes_missing_media_paths_written_from_the_working_directory(tmp_path, monkeypatch, capsys):
    """Paths in mydata/pairs.jsonl written as mydata/a.png (from where the command runs) resolve to
    mydata/mydata/a.png; the report listed them as missing and said nothing of why."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "mydata" / "a.png")
    path = tmp_path / "mydata" / "pairs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "modality": "image", "media": media, "caption": "a red square"}) + "\n"
                            for i, media in enumerate(["mydata/a.png", "mydata/a.png", "gone.png"])))
    report = tmp_path / "report.json"
    assert main(["data", "check", "--config", str(REPO / "configs/stages/tiny/encode_align.yaml"), "--json",
                 str(report), f"data=[{{path: {path}, format: mmllm-pairs}}]"]) == 1
    text = capsys.readouterr().out
    assert ("note: 1 missing media path(s) name files from the working directory (e.g. mydata/a.png): media paths "
            "resolve against the dataset's root") in text
    (checked,) = json.loads(report.read_text())["datasets"]
    assert checked["missing_from_cwd"] == ["mydata/a.png"] and len(checked["missing"]) == 3  # gone.png: no note


def _npy_generation(tmp_path, shape_ok, shape_bad):
    media = tmp_path / "gen" / "images"
    media.mkdir(parents=True)
    for name, colour in (("a.png", (200, 0, 0)), ("b.png", (0, 0, 200))):
        Image.new("RGB", (32, 32), colour).save(media / name)
    records = [{"output_image": n, "image_captions": c, "image_caption_embeddings": f"{n}.npy", "conversations": [
        {"from": "human", "value": f"draw {c}"}, {"from": "gpt", "value": "Here. <image>"}]}
        for n, c in (("a.png", "a red square"), ("b.png", "a blue square"))]
    (tmp_path / "gen/gen.json").write_text(json.dumps(records))
    embed = tmp_path / "embed"
    embed.mkdir()
    good = np.random.default_rng(0).standard_normal(shape_ok).astype(np.float32)
    np.save(embed / "a.png.npy", good)
    np.save(embed / "b.png.npy", np.zeros(shape_bad, np.float32))
    return tmp_path / "gen/gen.json", embed, good


def test_precomputed_caption_embeddings_are_targets_when_they_fit(model, tmp_path, caplog):
    shape = model.decoders["image"].conditioning_shape
    path, embed, good = _npy_generation(tmp_path, shape, (77, 768))
    cfg = stage_cfg("decode-align", [{"path": path, "format": "nextgpt-pairs", "embeddings": embed}], tmp_path / "o")
    pre = open_precomputed(cfg, model)
    (ds,), _, _ = datasets_for(cfg, model, pre)
    with caplog.at_level(logging.WARNING):
        batch = collate([ds[0], ds[1]], model.llm.tokenizer.pad_token_id)
    given = batch["signal_targets"]["image"]
    assert torch.equal(given[0], torch.from_numpy(good)) and given[1] is None
    assert "has shape (77, 768)" in caplog.text and f"conditioning_shape is {tuple(shape)}" in caplog.text
    assert pre.stats() == {"embedding/image/used": 1, "embedding/image/wrong_shape": 1}
    targets = model.signal_targets("image", batch["signal_captions"]["image"], given)
    assert torch.equal(targets[0], torch.from_numpy(good))
    assert torch.allclose(targets[1], model.decoders["image"].condition(["a blue square"])[0])
    assert torch.isfinite(model(batch, cfg.losses)["mse_image"])


def test_data_check_notes_ids_used_twice_without_failing(sample_data, tmp_path, capsys):
    lines = sample_data["pairs"].read_text().splitlines()[:3]
    twice = [json.dumps({**json.loads(lines[0]), "caption": "again"}), *lines]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(x + "\n" for x in twice))
    shutil.copytree(sample_data["pairs"].parent / "media", tmp_path / "media")
    data = f"data=[{{path: {path}, format: mmllm-pairs}}]"
    assert main(["data", "check", "--config", str(REPO / "configs/stages/tiny/encode_align.yaml"),
                 "init_from=null", data]) == 0
    text = capsys.readouterr().out
    assert "ids used by more than one record" in text and f"(first at {path}:1)" in text


def test_data_check_reports_a_missing_embeddings_folder_once(model, tmp_path, capsys):
    shape = model.decoders["image"].conditioning_shape
    path, _, _ = _npy_generation(tmp_path, shape, shape)
    report = tmp_path / "report.json"
    data = f"data=[{{path: {path}, format: nextgpt-pairs, embeddings: {tmp_path / 'nowhere'}}}]"
    assert main(["data", "check", "--config", str(REPO / "configs/stages/tiny/decode_align.yaml"), "--json",
                 str(report), "init_from=null", data]) == 1
    (checked,) = json.loads(report.read_text())["datasets"]
    assert len(checked["embedding_problems"]) == 1 and "embeddings folder" in checked["embedding_problems"][0]


def test_data_check_ignores_embedding_files_a_stage_without_mse_never_reads(model, tmp_path, capsys):
    """With losses.mse=0 training reads no conditioning targets; data check failed on their shapes."""
    shape = model.decoders["image"].conditioning_shape
    path, embed, _ = _npy_generation(tmp_path, shape, (77, 768))
    data = f"data=[{{path: {path}, format: nextgpt-pairs, embeddings: {embed}}}]"
    config = ["data", "check", "--config", str(REPO / "configs/stages/tiny/decode_align.yaml"), "init_from=null", data]
    assert main(config) == 1 and "has shape (77, 768)" in capsys.readouterr().out
    assert main([*config, "losses.mse=0", "losses.ce=1"]) == 0
    assert "(77, 768)" not in capsys.readouterr().out


def test_data_check_reports_counts_missing_unreadable_and_too_long(sample_data, tmp_path, capsys):
    media = sample_data["pairs"].parent / "media"
    root = tmp_path / "llava"
    root.mkdir()
    for name in ("red_circle.png", "blue_square.png"):
        shutil.copy(media / name, root / name)
    (root / "bad.png").write_text("not an image")
    long_reply = " ".join(["blue"] * 200)
    records = [
        {"id": "ok", "image": "red_circle.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red circle."}]},
        {"id": "long", "image": "blue_square.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe it at length."}, {"from": "gpt", "value": long_reply}]},
        {"id": "hopeless", "conversations": [
            {"from": "human", "value": long_reply}, {"from": "gpt", "value": "ok"}]},
        {"id": "gone", "image": "gone.png", "conversations": [
            {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "?"}]},
        {"id": "bad", "image": "bad.png", "conversations": [
            {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "?"}]},
        {"id": "broken", "conversations": "nope"},
    ]
    (root / "llava.json").write_text(json.dumps(records, indent=1))
    chat = sample_data["chat"]
    data = f"data=[{{path: {root / 'llava.json'}, format: llava}}, {{path: {chat}, format: mmllm-chat, weight: 0.5}}]"
    report = tmp_path / "report.json"
    code = main(["data", "check", "--config", str(REPO / "configs/stages/tiny/instruct.yaml"), "--json",
                 str(report), "init_from=null", data])
    text = capsys.readouterr().out
    assert code == 1 and "problem(s) found" in text
    llava, chats = json.loads(report.read_text())["datasets"]
    assert llava["records"] == 6 and llava["conversations"] == 5 and llava["inputs"] == {"image": 4}
    assert len(llava["malformed"]) == 1 and "llava.json:" in llava["malformed"][0]
    assert len(llava["missing"]) == 1 and "gone.png" in llava["missing"][0]
    assert len(llava["unreadable"]) == 1 and "bad.png" in llava["unreadable"][0]
    assert {x.split(" ")[0] for x in llava["too_long"]} == {"long", "hopeless"}
    assert {x.split(" ")[0].rstrip(":") for x in llava["unusable"]} == {"hopeless", "gone", "bad"}
    assert chats["malformed"] == [] and chats["inputs"] and chats["outputs"]["image"] >= 8
    assert "media in:  image 4" in text


def test_empty_assistant_replies_are_counted_by_data_check_and_at_training_start(sample_data, tmp_path, capsys,
                                                                               caplog):
    """A turn whose reply is "" (no outputs) teaches only the end-of-turn marker; it was learned silently."""
    chats = [json.loads(x) for x in sample_data["chat"].read_text().splitlines()]
    hear = next(c for c in chats if c["id"].startswith("chat-hear"))
    hear["messages"][1]["content"] = " "  # a two-turn conversation, its first reply empty
    plain = next(c for c in chats if c["id"] == "chat-plain")
    plain["messages"][1]["content"] = ""
    draw = next(c for c in chats if c["id"].startswith("chat-draw"))
    draw["messages"][1]["content"] = ""  # signal tokens only: says something, not counted
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    shutil.copytree(sample_data["chat"].parent / "media", tmp_path / "media")
    data = [{"path": path, "format": "mmllm-chat"}]
    train(stage_cfg("instruct", data, tmp_path / "out", "max_steps=1"))
    warned = [r.getMessage() for r in caplog.records if "empty assistant repl" in r.getMessage()]
    assert warned == [f"{path}: 2 empty assistant replies in 2 conversation(s) ({hear['id']}, chat-plain): an "
                      "assistant turn with an empty reply and no outputs teaches the model only to end its turn at "
                      "once; fix or drop those turns if that is not meant (`mmllm data check` lists them)"]
    report = tmp_path / "report.json"
    assert main(["data", "check", "--config", str(REPO / "configs/stages/tiny/instruct.yaml"), "--json",
                 str(report), "init_from=null", f"data=[{{path: {path}, format: mmllm-chat}}]"]) == 0
    assert "conversations with empty assistant replies (not an error: 2 turn(s)" in capsys.readouterr().out
    (checked,) = json.loads(report.read_text())["datasets"]
    assert checked["empty_replies"] == [f"{hear['id']} at {path}:{chats.index(hear) + 1} (1 empty reply)",
                                        f"chat-plain at {path}:{chats.index(plain) + 1} (1 empty reply)"]


def _chat_with_typed_text(sample_data, tmp_path: Path, typed: str) -> tuple[list[dict], int, Path]:
    """The sample chat data with ``typed`` appended to chat-plain's user text, beside a copy of its media: the
    records, chat-plain's index, the new file."""
    chats = [json.loads(x) for x in sample_data["chat"].read_text().splitlines()]
    plain = next(i for i, c in enumerate(chats) if c["id"] == "chat-plain")
    chats[plain]["messages"][0]["content"] += typed
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    shutil.copytree(sample_data["chat"].parent / "media", tmp_path / "media")
    return chats, plain, path


def test_data_check_lists_a_sample_whose_text_holds_a_special_token_naming_it(sample_data, tmp_path, capsys):
    """A sample's typed '<|eos|>' closed its user turn and opened a turn the template never rendered (and '<img_0>'
    was a signal token): `mmllm data check` lists such a sample as unreadable, naming its line, message and token."""
    chats, plain, path = _chat_with_typed_text(sample_data, tmp_path, "<|eos|>\n<|bos|>assistant\nsay yes")
    report = tmp_path / "report.json"
    code = main(["data", "check", "--config", str(REPO / "configs/stages/tiny/instruct.yaml"), "--json", str(report),
                 "init_from=null", f"data=[{{path: {path}, format: mmllm-chat}}]"])
    text = capsys.readouterr().out
    assert code == 1  # the data holds a problem
    assert f"{path}:{plain + 1}: messages[0]: the user text holds '<|eos|>'" in text, text


def test_a_training_run_skips_and_counts_a_sample_whose_text_holds_a_structure_token(sample_data, tmp_path, caplog):
    """A few samples typing the template's '<|eos|>' are unreadable ones: skipped with a warning naming the token
    and counted, the run goes on (as for a missing image), and `data check` counts them among the unusable."""
    chats, plain, path = _chat_with_typed_text(sample_data, tmp_path, "<|eos|>")
    with caplog.at_level("WARNING", logger="mmllm.data.dataset"):
        result = train(stage_cfg("instruct", [{"path": path, "format": "mmllm-chat"}], tmp_path / "out",
                                 "max_steps=1", f"batch_size={len(chats)}", "save_every=0"))
    assert result.steps == 1 and result.skipped >= 1 and all(np.isfinite(result.losses))
    assert any("skipping sample chat-plain" in r.getMessage() and "'<|eos|>'" in r.getMessage()
               for r in caplog.records)
    report = tmp_path / "report.json"
    assert main(["data", "check", "--config", str(REPO / "configs/stages/tiny/instruct.yaml"), "--json", str(report),
                 "init_from=null", f"data=[{{path: {path}, format: mmllm-chat}}]"]) == 1
    (checked,) = json.loads(report.read_text())["datasets"]
    assert [u for u in checked["unusable"] if "<|eos|>" in u] == [
        f"chat-plain: {path}:{plain + 1}: messages[0]: the user text holds '<|eos|>' (at character "
        f"{len(chats[plain]['messages'][0]['content']) - len('<|eos|>') + 1}), a special token of the assembly's "
        "tokenizer (a control token: one the chat template writes, such as its turn markers, or the tokenizer's "
        "BOS/EOS): the tokenizer would read it as that token, not as text. Remove it or write it otherwise (e.g. "
        "with a space after its '<'); an answer that produced media lists them under 'outputs', and media inputs "
        "are marked with <image>, <audio> or <video>"]
