"""The CLI on the tiny assembly: inspect, train (with overrides), export --merge-lora."""

import argparse
import json
import logging
import os
import re

import pytest
import torch

from mmllm.cli import main
from mmllm.model import AnyToAnyModel
from tests.conftest import REPO, TINY


def test_inspect_prints_parts_checks_and_per_stage_counts(capsys, tmp_path):
    out_json = tmp_path / "inspect.json"
    assert main(["inspect", "--config", str(TINY), "--lora", str(REPO / "configs/lora/tiny.yaml"),
                 "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    for needle in ("encoders.image: open-clip", "decoders.audio: audioldm-audio", "dimension checks passed",
                   "stage encode-align", "stage decode-align", "stage instruct"):
        assert needle in text
    data = json.loads(out_json.read_text())
    ea, inst = data["stages"]["encode-align"], data["stages"]["instruct"]
    assert ea["input_projections.image"]["trainable"] > 0 and ea["output_projections.image"]["trainable"] == 0
    assert inst["llm.lora"]["trainable"] > 0
    assert all(v["trainable"] == 0 for k, v in inst.items() if k.startswith(("encoders.", "decoders.")))
    assert inst["llm (original weights)"]["trainable"] == 0
    # without stage data, the most each stage's losses could need: every encoder, the decoders' text side
    assert "stage encode-align: holds at most decoders audio conditioning" in text
    assert all(v["frozen"] > 0 for k, v in ea.items() if k.startswith(("encoders.", "decoders.")))


def test_inspect_json_replaces_its_file_whole(tmp_path):
    """--json was rewritten in place (a kill mid-write left half a report; a reader saw it half-written) and
    needed its folder to exist; it is written as every other report is, beside and then renamed over."""
    out_json = tmp_path / "reports" / "inspect.json"
    out_json.parent.mkdir()
    out_json.write_text("the previous report")
    os.link(out_json, tmp_path / "held.json")  # a reader holding the previous file
    assert main(["inspect", "--config", str(TINY), "--json", str(out_json)]) == 0
    assert (tmp_path / "held.json").read_text() == "the previous report"
    assert "stages" in json.loads(out_json.read_text())
    assert main(["inspect", "--config", str(TINY), "--json", str(tmp_path / "new" / "inspect.json")]) == 0
    assert (tmp_path / "new" / "inspect.json").is_file()


def test_inspect_of_a_stage_counts_what_its_data_runs(capsys, tmp_path):
    out_json = tmp_path / "inspect.json"
    assert main(["inspect", "--config", str(REPO / "configs/stages/tiny/decode_align.yaml"),
                 "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "stage decode-align: holds decoders audio conditioning, image conditioning, video conditioning" in text
    da = json.loads(out_json.read_text())["stages"]["decode-align"]
    assert all(v["frozen"] == 0 for k, v in da.items() if k.startswith("encoders."))  # captions only: released
    assert all(v["frozen"] > 0 for k, v in da.items() if k.startswith("decoders."))


def test_inspect_of_a_stage_applies_its_assembly_overrides(capsys):
    assert main(["inspect", "--config", str(REPO / "configs/stages/tiny/encode_align.yaml"),
                 "assembly.input_projections.audio.kind=linear"]) == 0
    assert "input_projections.audio (linear)" in capsys.readouterr().out


def test_inspect_reports_a_dimension_mismatch_as_an_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("image: {hidden_dim: 64,", "image: {num_queries: 77, hidden_dim: 64,"))
    assert main(["inspect", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "output_projections.image" in err and "decoders.image" in err


def _train_cli(stage, data, out, *extra):
    name = {"encode-align": "encode_align", "decode-align": "decode_align", "instruct": "instruct"}[stage]
    fmt = "mmllm-chat" if stage == "instruct" else "mmllm-pairs"
    args = ["train", "--config", str(REPO / f"configs/stages/tiny/{name}.yaml"), f"output_dir={out}",
            "report_to=tensorboard", f"data=[{{path: {data}, format: {fmt}}}]", "init_from=null", *extra]
    assert main(args) == 0
    return out / f"step-{[a for a in extra if a.startswith('max_steps=')][0].split('=')[1]}"


def test_train_then_export_merged_lora_gives_the_same_outputs(sample_data, tmp_path):
    ckpt = _train_cli("instruct", sample_data["chat"], tmp_path / "run", "max_steps=3", "optim.lr=0.05")
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events and all(e.is_relative_to(tmp_path / "run" / "logs" / "instruct") for e in events), events
    merged = tmp_path / "merged"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(merged), "--merge-lora"]) == 0
    assert (merged / "llm" / "config.json").is_file() and not (merged / "adapter").exists()
    assert not (tmp_path / ".merged.mmllm.lock").exists()  # the lock beside it goes with the export
    a = AnyToAnyModel.from_pretrained(ckpt).eval()
    b = AnyToAnyModel.from_pretrained(merged).eval()
    assert b.lora_config is None
    ids = torch.tensor([[3, 40, 41, 42, a.llm.signal_ids["image"][0]]])
    with torch.no_grad():
        la = a.llm.lm_head()(a.llm.decoder()(inputs_embeds=a.llm.embed(ids)).last_hidden_state)
        lb = b.llm.lm_head()(b.llm.decoder()(inputs_embeds=b.llm.embed(ids)).last_hidden_state)
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
    for k, v in a.learned_state_dict().items():
        assert torch.equal(v, b.learned_state_dict()[k])


@pytest.mark.parametrize("argv,message", [
    (["eval", "--modalities", "imag"], "--modalities 'imag': unknown imag; valid: image, audio, video"),
    (["eval", "--tasks", "x2t,foo"], "--tasks 'x2t,foo': unknown foo; valid: x2t, t2x, routing, text"),
    (["world", "report", "--modalities", "audio,vidoe"], "unknown vidoe; valid: image, audio, video"),
    (["eval", "--parts", "no/such/parts"], "--parts no/such/parts: not a directory"),  # was: t2x silently unscored
    (["eval", "--items", "0"], "--items 0: give at least 1"),
])
def test_unknown_list_values_are_refused_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    import mmllm.model

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(mmllm.model.AnyToAnyModel, "from_pretrained", no_loading)
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_path_is_an_error_message_not_a_traceback(tmp_path, capsys):
    argv = ["train", "--config", str(REPO / "configs/stages/tiny/encode_align.yaml"), "init_from=null",
            f"output_dir={tmp_path / 'out'}", "data=[{path: nowhere/pairs.jsonl, format: mmllm-pairs}]"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "data file not found: nowhere/pairs.jsonl (relative to the working directory" in err
    assert "Traceback" not in err
    # attention heads that do not divide the width: named by the config key, not a bare torch assertion
    assert main(["inspect", "--config", str(TINY), "input_projections.image.num_heads=3"]) == 2
    assert main(["inspect", "--config", str(TINY), "output_projections.audio.num_heads=5"]) == 2
    err = capsys.readouterr().err
    assert "input_projections.image: num_heads=3 does not divide" in err
    assert "output_projections.audio: num_heads=5 does not divide" in err


def test_data_check_and_cache_run_before_the_previous_stage_is_trained(sample_data, tmp_path, capsys):
    """Both come before training: a decode-align config whose init_from is not there yet takes the stage's
    own assembly, which gives the same report as the checkpoint, and a cache that training from the
    checkpoint (trained afterwards) reads in full."""
    stage = str(REPO / "configs/stages/tiny/decode_align.yaml")
    data = f"data=[{{path: {sample_data['pairs']}, format: mmllm-pairs}}]"
    previous = tmp_path / "encode_align" / "step-1"
    assert main(["data", "check", "--config", stage, "--json", str(tmp_path / "before.json"), data,
                 f"init_from={previous}"]) == 0
    assert main(["cache", "--config", stage, data, f"init_from={previous}", f"cache.dir={tmp_path / 'c'}"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "is not there yet" in line]
    assert len(notes) == 2 and all("stage's own assembly" in n for n in notes)

    assert _train_cli("encode-align", sample_data["pairs"], tmp_path / "encode_align", "max_steps=1") == previous
    assert main(["data", "check", "--config", stage, "--json", str(tmp_path / "after.json"), data,
                 f"init_from={previous}"]) == 0
    assert json.loads((tmp_path / "after.json").read_text()) == json.loads((tmp_path / "before.json").read_text())
    # every conditioning target the stage reads is found under the checkpoint's decoders' fingerprints
    assert main(["train", "--config", stage, data, f"init_from={previous}", f"cache.dir={tmp_path / 'c'}",
                 "cache.require=true", f"output_dir={tmp_path / 'decode_align'}", "max_steps=1",
                 "report_to=none"]) == 0


def test_misplaced_arguments_are_explained_before_anything_loads(tmp_path, capsys, monkeypatch):
    import mmllm.training.loop

    def no_building(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(mmllm.training.loop, "build_model", no_building)
    stage = str(REPO / "configs/stages/tiny/encode_align.yaml")
    assert main(["cache", "--config", stage, "cache.dir=null", "init_from=null"]) == 2
    assert "sets no cache.dir" in capsys.readouterr().err
    assert main(["demo", "--quick", "--output", str(tmp_path / "demo")]) == 2
    assert "--quick shortens the training of --tiny" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "step-4").mkdir(parents=True)
    (run / "final.json").write_text(json.dumps({"checkpoint": "step-4"}))
    assert main(["train", "--config", stage, "--resume", str(run / "step-4")]) == 2
    assert "--resume takes none" in capsys.readouterr().err
    from mmllm.training.checkpoint import CheckpointError, verify_manifest

    with pytest.raises(CheckpointError, match=r"training run's folder; give one of its checkpoints, e\.g\. .*step-4"):
        verify_manifest(run)


def test_overrides_may_follow_options(tmp_path, capsys):
    stage = str(REPO / "configs/stages/tiny/decode_align.yaml")
    out = tmp_path / "run"
    assert main(["train", "--config", stage, "init_from=null", "--resume", f"output_dir={out}", "max_steps=1",
                 "report_to=none"]) == 0
    assert (out / "step-1").is_dir()
    with pytest.raises(SystemExit):
        main(["train", "--config", stage, "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_the_tiny_demo_never_deletes_its_own_sample_inputs(tmp_path, capsys, monkeypatch):
    import shutil

    import mmllm.demo

    def no_training(*args, **kwargs):
        raise AssertionError("the demo trained before refusing its --output")

    repo = tmp_path / "repo"  # a copy of the repository's configs and sample data
    (repo / "configs").mkdir(parents=True)
    (repo / "configs" / "stages").symlink_to(REPO / "configs" / "stages")
    shutil.copytree(REPO / "data" / "samples", repo / "data" / "samples")
    samples = repo / "data" / "samples"
    (samples / "results.jsonl").write_text("")  # an earlier demo answered into the samples folder
    monkeypatch.setattr(mmllm.demo, "repository_root", lambda: repo)
    monkeypatch.setattr(mmllm.demo, "train", no_training)
    assert main(["demo", "--tiny", "--quick", "--output", str(samples)]) == 2
    assert "afresh (--overwrite) would delete" in capsys.readouterr().err
    assert (samples / "media" / "red_circle.png").is_file()


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_is_accepted_before_or_after_the_command(where, tmp_path, capsys):
    """Errors say "run with -v for the traceback": a user adds -v at the end of the command they ran."""
    argv = ["train", "--config", str(REPO / "configs/stages/tiny/encode_align.yaml"), "init_from=null",
            "data=[{path: nowhere/pairs.jsonl, format: mmllm-pairs}]", f"output_dir={tmp_path / 'out'}"]
    argv = ["-v", *argv] if where == "before" else [*argv, "-v"]
    assert main(argv) == 2
    assert "Traceback" in capsys.readouterr().err
    # a config error too (it was one line with -v as without)
    stage = str(REPO / "configs/stages/tiny/encode_align.yaml")
    assert main(["train", "--config", stage, "optim.lrr=1", "-v"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) optim.lrr" in err and "Traceback" in err


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_that_stops_at_once_is_one_line_and_its_exit_code(name, code, monkeypatch, tmp_path, capsys):
    """A signal while the model loads (or a second one) stops at once: one line saying what is lost and how
    to go on, and 128 + the signal's number, as a stop after a step gives (not a traceback from the loader)."""
    import mmllm.training.loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt(name)  # what mmllm.training.interrupt raises before the first step

    monkeypatch.setattr(mmllm.training.loop, "train", interrupted)
    stage = str(REPO / "configs/stages/tiny/encode_align.yaml")
    assert main(["train", "--config", stage, f"output_dir={tmp_path / 'out'}"]) == code
    err = capsys.readouterr().err
    assert f"stopped by {name} at once" in err and "--resume" in err and "Traceback" not in err


def test_export_refuses_flags_that_merge_lora_would_ignore(monkeypatch, tmp_path, capsys):
    """--assembly (and --dtype) apply to the weights-only copy; with --merge-lora they were silently ignored."""
    import mmllm.training.checkpoint

    def no_export(*args, **kwargs):
        raise AssertionError("exported, ignoring a flag")

    monkeypatch.setattr(mmllm.training.checkpoint, "export_merged", no_export)
    base = ["export", "--checkpoint", str(tmp_path / "step-1"), "--output", str(tmp_path / "out"), "--merge-lora"]
    assert main([*base, "--assembly", str(TINY)]) == 2
    assert "--assembly goes with a weights-only export" in capsys.readouterr().err
    assert main([*base, "--dtype", "float32"]) == 2
    assert "leave --dtype unset" in capsys.readouterr().err


def test_a_hub_part_missing_offline_says_the_cli_runs_offline_by_default(monkeypatch, capsys):
    """The CLI sets HF_HUB_OFFLINE=1 unless the environment sets it: a hub id not in the local cache then
    fails to "connect", and the error says how to let it download."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["inspect", "--config", str(TINY), "llm.kind=hf-causal-lm",
                 "llm.name_or_path=mmllm-tests/no-such-model"]) == 2
    assert "HF_HUB_OFFLINE=0" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set by the user: no hint, they know
    assert main(["inspect", "--config", str(TINY), "llm.kind=hf-causal-lm",
                 "llm.name_or_path=mmllm-tests/no-such-model"]) == 2
    assert "HF_HUB_OFFLINE=0" not in capsys.readouterr().err


def test_an_assembly_yaml_given_where_a_stage_yaml_goes_is_named_as_such(tmp_path, capsys):
    """`inspect` takes either; `train`, `data check` and `cache` take a stage YAML, which names the assembly."""
    assert main(["train", "--config", str(TINY), f"output_dir={tmp_path / 'out'}"]) == 2
    assert "is an assembly YAML; this command takes a stage YAML" in capsys.readouterr().err


def test_inspect_of_a_stage_refuses_lora_rather_than_ignoring_it(capsys):
    """A stage config's adapter is its own `lora:` file; --lora (for an assembly YAML) was silently ignored."""
    assert main(["inspect", "--config", str(REPO / "configs/stages/tiny/instruct.yaml"), "init_from=null",
                 "--lora", str(REPO / "configs/lora/default.yaml")]) == 2
    assert "lora=PATH" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["root", "mmllm"])
def test_main_called_from_python_logs_once_when_the_caller_already_logs_to_stderr(capsys, where):
    """A caller's own stderr handler (``logging.basicConfig()``, or one on the ``mmllm`` logger) shows the
    command's lines; the CLI's handler beside it printed each line a second time."""
    logger = logging.getLogger() if where == "root" else logging.getLogger("mmllm")
    callers = logging.StreamHandler()  # sys.stderr as it is now: capsys's
    callers.setFormatter(logging.Formatter("caller: %(levelname)s %(message)s"))
    logger.addHandler(callers)
    try:
        assert main(["train", "--config", str(REPO / "configs/stages/tiny/encode_align.yaml"), "optim.lrr=1"]) == 2
    finally:
        logger.removeHandler(callers)
    err = capsys.readouterr().err
    assert err.count("unknown key(s) optim.lrr") == 1, err
    assert re.search(r"^caller: ERROR \S+encode_align\.yaml: unknown key\(s\) optim\.lrr", err, re.M)
    # without it, the command's own handler prints the line, once, in its format
    assert main(["train", "--config", str(REPO / "configs/stages/tiny/encode_align.yaml"), "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("unknown key(s) optim.lrr") == 1 and re.search(r"^\d\d:\d\d:\d\d ERROR mmllm: ", err, re.M)


def test_a_callers_stderr_handler_for_warnings_only_does_not_silence_the_commands_info_lines(capsys):
    """A handler that writes to stderr but only from WARNING up was taken for one that shows the command's
    lines, so none of its own was added: progress and 'wrote ...' lines were shown nowhere."""
    from mmllm.cli import cli_logging

    callers = logging.StreamHandler()  # sys.stderr as it is now: capsys's
    callers.setLevel(logging.WARNING)
    callers.setFormatter(logging.Formatter("caller: %(levelname)s %(message)s"))
    logging.getLogger().addHandler(callers)
    try:
        with cli_logging(verbose=False):
            logging.getLogger("mmllm.training").info("step 1 of 2")
            logging.getLogger("mmllm.training").warning("a warning")
    finally:
        logging.getLogger().removeHandler(callers)
    err = capsys.readouterr().err
    assert re.search(r"^\d\d:\d\d:\d\d INFO mmllm\.training: step 1 of 2$", err, re.M), err
    assert "caller: WARNING a warning" in err  # the caller's handler still shows what it is set to show


@pytest.mark.parametrize(("override", "said"), [
    ("encoders.image.tokns=patch", "unknown key(s) encoders.image.tokns"),
    ("max_length=long", "max_length: expected an integer, got 'long'"),
])
def test_inspect_of_an_assembly_names_the_override_at_fault_as_it_was_written(override, said, capsys):
    """A part option set on the command line was blamed on the file alone; a key of the assembly was named
    as 'assembly.max_length=long', which inspect of an assembly file does not take."""
    assert main(["inspect", "--config", str(REPO / "configs/assemblies/tiny.yaml"), override]) == 2
    err = capsys.readouterr().err
    assert said in err and f"(set on the command line by {override})" in err, err


@pytest.mark.parametrize(("config", "overrides", "said"), [
    ("assemblies/tiny.yaml", ["input_projections.image.input_dim=7"],
     "input_projections.image.input_dim=7 disagrees with encoders.image (open-clip) output_dim=32 (set on the "
     "command line by input_projections.image.input_dim=7)"),
    ("assemblies/tiny.yaml", ["input_projections.image.input_dim=32", "encoders.image.tokens=pooled"],
     "output_dim=16 (set on the command line by input_projections.image.input_dim=32; encoders.image was changed "
     "on the command line by encoders.image.tokens=pooled)"),
    ("stages/tiny/encode_align.yaml", ["assembly.output_projections.image.output_dim=5"],
     "(output_projections.image was changed on the command line by assembly.output_projections.image.output_dim=5)"),
    ("assemblies/tiny.yaml", ["encoders.image.kind=nope"],
     "unknown encoder kind 'nope'; valid kinds are: frames-video, hf-audio, open-clip (or a class of your own as "
     "'package.module:Class') (encoders.image was changed on the command line by encoders.image.kind=nope)"),
])
def test_a_dimension_or_kind_an_override_set_names_that_override(config, overrides, said, capsys):
    """The dimension checks made when the model is assembled named the config keys only, and an unknown kind set
    by an override was blamed on the file: the override that set the value (or changed the part) is named."""
    assert main(["inspect", "--config", str(REPO / "configs" / config), *overrides]) == 2
    err = capsys.readouterr().err
    assert said in err, err


def test_main_called_from_python_keeps_the_callers_log_handlers_and_levels(caplog, capsys):
    """``logging.basicConfig(force=True)`` removed every root handler for the rest of the process: a caller's
    own, and pytest's caplog. The command's lines still go to stderr in its format."""
    root, own = logging.getLogger(), logging.getLogger("mmllm")
    heard: list[logging.LogRecord] = []
    callers = logging.Handler()
    callers.emit = heard.append
    root.addHandler(callers)
    handlers_before, levels_before = list(root.handlers), (root.level, own.level)
    try:
        assert main(["train", "--config", str(REPO / "configs/stages/tiny/encode_align.yaml"), "optim.lrr=1"]) == 2
        handlers_after = list(root.handlers)
    finally:
        root.removeHandler(callers)
    assert handlers_after == handlers_before and (root.level, own.level) == levels_before
    assert any("unknown key(s) optim.lrr" in r.getMessage() for r in heard)
    assert "unknown key(s) optim.lrr" in caplog.text
    line = r"^\d\d:\d\d:\d\d ERROR mmllm: \S+encode_align\.yaml: unknown key\(s\) optim\.lrr"
    assert re.search(line, capsys.readouterr().err, re.M)


@pytest.mark.parametrize("command", ["infer", "eval", "refine"])
def test_threads_is_restored_when_the_command_returns(command, tmp_path, request, monkeypatch):
    """`main([... "--threads", N])` called from Python left torch's thread count at N for the rest of the caller's
    process: restored as found when the command returns (here one stopped where it loads the model)."""
    from mmllm.config import ConfigError

    checkpoint = tmp_path / "checkpoint"
    if command == "infer":  # infer checks the checkpoint's files before it sets the threads
        request.getfixturevalue("tiny_model").save_pretrained(checkpoint)
    else:
        checkpoint.mkdir()
    data = tmp_path / "chat.jsonl"
    data.write_text("")

    def stop_here(*args, **kwargs):
        raise ConfigError("stopped where the model loads")

    monkeypatch.setattr(AnyToAnyModel, "from_pretrained", stop_here)
    out = ["--output", str(tmp_path / "out")]
    argv = {"infer": ["infer", "--checkpoint", str(checkpoint), "--prompt", "hi", *out],
            "eval": ["eval", "--checkpoint", str(checkpoint), "--parts", str(tmp_path), *out],
            "refine": ["refine", "--checkpoint", str(checkpoint), "--data", str(data), *out]}
    before = torch.get_num_threads()
    seen = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real_set(n)))
    assert main([*argv[command], "--threads", str(before + 1)]) == 2
    assert before + 1 in seen  # the command did set it
    assert torch.get_num_threads() == before


def test_eval_text_batch_size_reaches_the_perplexity(tmp_path, monkeypatch, capsys):
    from mmllm.toyworld import model_eval

    checkpoint, seen = tmp_path / "checkpoint", []
    checkpoint.mkdir()
    monkeypatch.setattr(AnyToAnyModel, "from_pretrained", lambda *args, **kwargs: "a model")
    monkeypatch.setattr(model_eval, "run_eval", lambda model, judges, options: seen.append(options) or {})
    monkeypatch.setattr(model_eval, "format_eval", lambda report: "report")
    argv = ["eval", "--checkpoint", str(checkpoint), "--parts", str(tmp_path), "--output", str(tmp_path / "out")]
    assert main([*argv, "--text-batch-size", "3"]) == 0 and main(argv) == 0
    assert [o.text_batch_size for o in seen] == [3, 8] and seen[0].batch_size == 16


@pytest.mark.parametrize("argv,message", [
    (["refine", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),  # was: trained nothing, "wrote"
    (["refine", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["refine", "--limit", "-1"], "--limit must be at least 0"),
    (["refine", "--lr", "0"], "--lr must be a number above 0, got 0.0"),
    (["refine", "--format", "chat"], "unknown data format 'chat'; valid formats: mmllm-pairs, mmllm-chat"),  # was a traceback
    (["eval", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["eval", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["eval", "--text-batch-size", "0"], "--text-batch-size must be at least 1, got 0"),
    (["cache", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["world", "report", "--per-combo", "0"], "--per-combo must be at least 1, got 0"),  # was torch.cat's traceback
    (["world", "report", "--decoder-items", "0"], "--decoder-items must be at least 1, got 0"),
    (["world", "distil", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
])
def test_counts_no_run_could_use_are_refused_before_anything_loads(argv, message, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(AnyToAnyModel, "from_pretrained", no_loading)
    monkeypatch.setattr(AnyToAnyModel, "assemble", no_loading)
    given = {
        "refine": ["--checkpoint", str(tmp_path), "--data", str(REPO / "data/samples/chat.jsonl"),
                   "--output", str(tmp_path / "out")],
        "eval": ["--output", str(tmp_path / "out")],
        "cache": ["--config", str(REPO / "configs/stages/tiny/encode_align.yaml"), f"cache.dir={tmp_path / 'out'}"],
        "world": ["--output" if argv[1] == "report" else "--out", str(tmp_path / "out")],
    }[argv[0]]
    assert main([*argv, *given]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_folder_given_where_a_file_goes_is_named_as_a_folder_before_the_work(tmp_path, capsys):
    """`--config configs/stages` said "config file not found" (it is there), a data path naming a folder "data
    file not found", and `inspect --json DIR` failed after printing every count: each says it is a folder."""
    assert main(["train", "--config", str(REPO / "configs/stages")]) == 2
    err = capsys.readouterr().err
    assert f"config {REPO / 'configs/stages'} is a folder; give a YAML file in it (e.g. " in err
    assert str(REPO / "configs/stages/default/decode_align.yaml") in err
    stage = str(REPO / "configs/stages/tiny/encode_align.yaml")
    data = f"data=[{{path: {REPO / 'data/samples'}, format: mmllm-pairs}}]"
    assert main(["train", "--config", stage, "init_from=null", data, f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"data file {REPO / 'data/samples'} is a folder; give a data file in it (e.g. " in err
    assert str(REPO / "data/samples/pairs.jsonl") in err
    for argv in (["inspect", "--config", str(TINY)], ["data", "check", "--config", stage, "init_from=null"]):
        assert main([*argv, "--json", str(tmp_path)]) == 2
        out, err = capsys.readouterr()
        assert f"--json {tmp_path}: a folder; give a file path" in err
        assert out == ""  # refused before the work, not after it


def _commands(parser=None, path=("mmllm",)):
    """Every runnable command's (path, parser): `mmllm train`, `mmllm data check`, ..."""
    import argparse

    from mmllm.cli import build_parser

    parser = parser or build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _commands(child, (*path, name))


def _parse_example(line: str) -> None:
    """An example as `main` parses it: a flag that does not exist, or a bad value, ends the test (SystemExit)."""
    import shlex

    from mmllm.cli import build_parser

    argv = shlex.split(line, comments=True)
    redirected = [i for i, word in enumerate(argv) if re.match(r"\d?>|\|", word)]  # `2> train.log`: the shell's
    argv = argv[:redirected[0]] if redirected else argv
    assert argv[0] == "mmllm", line
    args, extra = build_parser().parse_known_args(argv[1:])
    assert all("=" in e and hasattr(args, "overrides") for e in extra), f"{line}: unrecognized {extra}"


def test_every_commands_help_gives_its_defaults_outputs_and_an_example_that_parses(capsys):
    """`mmllm X --help` listed flags without their defaults (--batch-size, --steps, --output of demo/eval...),
    said nothing of where results go, and gave no example; the top-level help did not give the exit codes."""
    import argparse

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "exit codes:" in out and "130/143" in out and "stderr" in out
    commands = list(_commands())
    assert len(commands) == 13
    for path, parser in commands:
        with pytest.raises(SystemExit) as done:
            main([*path[1:], "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0
        assert re.search(r"^(writes|prints)", out, re.M), f"{' '.join(path)} --help: no word on its outputs"
        text = re.sub(r"\\\n\s+", " ", out.split("\nexample", 1)[1])  # continuation lines joined
        examples = [line.strip() for line in text.splitlines() if line.strip().startswith("mmllm ")]
        assert examples, f"{' '.join(path)} --help: no example"
        for example in examples:
            assert example.split()[:len(path)] == list(path)
            _parse_example(example)
        for action in parser._actions:
            unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
            if action.option_strings and not unset:
                assert "default" in _option_help(out, action.option_strings[-1]), \
                    f"{' '.join(path)} {action.option_strings[-1]}: default not shown"


def _option_help(help_out: str, flag: str) -> str:
    """The lines of ``flag``'s entry in a --help text's options."""
    lines = help_out.split("\noptions:\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"  (-\w, )?{flag}\b", line))
    entry = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("    ") or line.strip().startswith("-"):
            break
        entry.append(line)
    return " ".join(" ".join(entry).split())


def test_every_mmllm_command_in_the_docs_parses_with_flags_that_exist():
    """Each `mmllm ...` line of the shell blocks of README.md and docs/*.md, and each inline `mmllm ...` with
    flags, names flags the command has (spelled out, not an abbreviation argparse would also take)."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) > 5
    text = "\n".join(page.read_text() for page in pages)
    lines, block = [], False
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        if line.startswith("```"):
            block = not block
        elif block and line.strip().startswith("mmllm "):
            lines.append(line.strip())
    runnable = len(lines)  # the code blocks' lines run as written; inline mentions (`mmllm infer --threads`) may not
    lines += [span for span in re.findall(r"`(mmllm [^`]+)`", text) if " -" in span]
    assert runnable > 15 and len(lines) > runnable
    from mmllm.cli import build_parser

    parsers = {("mmllm",): build_parser(), **dict(_commands())}
    for n, line in enumerate(lines):
        words = line.split("#")[0].split()
        path = max((p for p in parsers if tuple(words[:len(p)]) == p), key=len, default=None)
        assert path is not None, f"docs: {line!r} names no command"
        flags = {o for a in parsers[path]._actions for o in a.option_strings}
        for word in words:
            flag = re.match(r"\[?(--?[a-z][a-z-]*)", word)
            assert flag is None or flag.group(1) in flags, f"docs: {line!r}: {path[-1]} has no {flag.group(1)}"
        if n < runnable and path != ("mmllm",) and not re.search(r"[[|]|\.\.\.", line):  # a synopsis is not run as written
            _parse_example(line.split("#")[0])


def test_an_unknown_flag_is_shown_with_its_commands_usage_and_the_flag_it_resembles(tmp_path, capsys):
    """`mmllm infer ... --batchsize 4` printed the top-level usage (COMMAND ...) and no hint of --batch-size."""
    with pytest.raises(SystemExit) as done:
        main(["infer", "--checkpoint", str(tmp_path), "--prompt", "Hi", "--output", str(tmp_path / "out"),
              "--batchsize", "4"])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert "usage: mmllm infer" in err and "mmllm infer: error: unrecognized arguments: --batchsize 4" in err
    assert "--batchsize: did you mean --batch-size?" in err
    with pytest.raises(SystemExit):
        main(["world", "report", "--per-combos", "2", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "mmllm world report: error:" in err and "--per-combos: did you mean --per-combo?" in err
    assert not (tmp_path / "out").exists()


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every command's parser under it."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser, *(p for sub in subs for child in sub.choices.values() for p in _parsers(child))]


def test_a_flag_is_taken_only_as_written_in_full_by_every_command(tmp_path, capsys):
    """argparse took any unambiguous abbreviation (`inspect --conf`, `config --check DIR`), and `--o` was ambiguous
    in some commands (--output, --overwrite) but not others: an abbreviation a script used would change meaning or
    stop working when a flag starting alike was added. Refused, with the flag it resembles."""
    from mmllm.cli import build_parser

    parsers = _parsers(build_parser())
    assert len(parsers) >= 15 and all(not p.allow_abbrev for p in parsers), [p.prog for p in parsers if p.allow_abbrev]
    lora = str(REPO / "configs" / "lora" / "tiny.yaml")
    for argv, flag, meant in [(["inspect", "--config", str(TINY), "--lor", lora], "--lor", "--lora"),
                              (["infer", "--checkpoint", str(tmp_path), "--prompt", "Hi", "--output",
                                str(tmp_path / "w"), "--over"], "--over", "--overwrite"),
                              (["world", "data", "--out", str(tmp_path / "w"), "--pla", lora], "--pla", "--plain")]:
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capsys.readouterr().err
        assert done.value.code == 2 and f"unrecognized arguments: {flag}" in err, err
        assert f"{flag}: did you mean {meant}?" in err, err
    assert not (tmp_path / "w").exists()
    assert main(["inspect", f"--config={TINY}"]) == 0  # written in full, with = too


def test_an_abbreviation_of_a_required_flag_is_named_with_the_flag_it_resembles(tmp_path, capsys):
    """`export --checkpoint C --out DIR` (the docs' own example of a refused abbreviation) said only "the following
    arguments are required: --output": argparse reports the missing required flag before the unknown --out."""
    for argv in (["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "w"), "--merge-lora"],
                 ["infer", "--checkpoint", str(tmp_path), "--prompt", "Hi", f"--out={tmp_path / 'w'}"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capsys.readouterr().err
        assert done.value.code == 2 and f"usage: mmllm {argv[0]}" in err, err
        assert "the following arguments are required: --output; --out: did you mean --output?" in err, err
    with pytest.raises(SystemExit):  # nothing unknown given: argparse's message alone
        main(["export", "--checkpoint", str(tmp_path)])
    assert capsys.readouterr().err.rstrip().endswith("error: the following arguments are required: --output")
    assert not (tmp_path / "w").exists()


def test_a_required_flags_error_adds_only_the_hints_not_pieces_of_the_unknown_words(tmp_path, capsys):
    """The hints were cut from :func:`unrecognized`'s message at each "; ", so a word holding one (a quoted value,
    `--out=a; b`) put its tail ("b") among them."""
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(tmp_path), "--out=a; b"])
    err = capsys.readouterr().err.rstrip()
    assert err.endswith("error: the following arguments are required: --output; --out: did you mean --output?"), err


def test_world_data_and_distil_take_output_as_every_other_command_does(tmp_path, capsys):
    """Every other command writes to --output; `world data --output DIR` was refused (--out required)."""
    from mmllm.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["world", "data", "--output", str(tmp_path)]).out == str(tmp_path)
    assert parser.parse_args(["world", "distil", "--output", str(tmp_path / "p.jsonl")]).out == str(tmp_path / "p.jsonl")
    assert parser.parse_args(["world", "data", "--out", str(tmp_path)]).out == str(tmp_path)  # as before
    with pytest.raises(SystemExit):  # export's --dtype names its choices in the usage, as infer's does
        main(["export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "x"), "--dtype", "fp16"])
    assert "argument --dtype: invalid choice: 'fp16' (choose from 'float32', 'bfloat16', 'float16')" in \
        capsys.readouterr().err


@pytest.mark.parametrize("buffering", [-1, 0])  # block-buffered (a pipe), and PYTHONUNBUFFERED's raw writes
def test_a_reader_that_stops_reading_stdout_ends_the_command_quietly_with_sigpipes_code(buffering, monkeypatch,
                                                                                        capsys):
    """`mmllm inspect ... | head -3` said "ERROR [Errno 32] Broken pipe" and exited 2, as if what was given were
    wrong: the reader has what it wanted, so nothing is said, and the exit code is a SIGPIPE's (141)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes its first line
    stdout = open(write_end, "wb" if buffering == 0 else "w", buffering=buffering)  # noqa: SIM115
    if buffering == 0:
        import io

        stdout = io.TextIOWrapper(stdout, write_through=True)
    monkeypatch.setattr("sys.stdout", stdout)
    try:
        assert main(["inspect", "--config", str(TINY)]) == 141
    finally:
        stdout.close()  # what was left is flushed to /dev/null, not failing again
    assert "Broken pipe" not in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_shows_warnings_only_no_progress_bars_and_the_same_stdout(where, sample_data, tmp_path, capsys):
    """CI logs and log files want warnings and errors only: -q (before or after the command) drops the INFO lines
    and every progress bar (the training loop's sets disable= itself), and keeps what stdout shows."""
    def quiet(argv):
        return ["-q", *argv] if where == "before" else [*argv, "-q"]

    train = ["train", "--config", str(REPO / "configs/stages/tiny/instruct.yaml"), f"output_dir={tmp_path / 'run'}",
             f"data=[{{path: {sample_data['chat']}, format: mmllm-chat}}]", "init_from=null", "max_steps=2"]
    assert main(quiet(train)) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "run" / "step-2").is_dir() and out.startswith("done: 2 steps, ")  # its result: stdout, kept
    assert out.endswith(f"checkpoint {tmp_path / 'run' / 'step-2'}\n") and out.count("\n") == 1
    assert "it/s" not in err and "\r" not in err and " INFO " not in err, err
    infer = ["infer", "--checkpoint", str(tmp_path / "run" / "step-2"), "--prompt", "What is this?",
             "--output", str(tmp_path / "answers"), "--max-new-tokens", "4", "--overwrite"]
    assert main(infer) == 0
    loud_out, loud_err = capsys.readouterr()
    assert "infer: 100%" in loud_err and " INFO " in loud_err  # what -q leaves out is there without it
    assert main(quiet(infer)) == 0
    out, err = capsys.readouterr()
    record, loud_record = json.loads(out), json.loads(loud_out)
    assert record.pop("seconds").keys() == loud_record.pop("seconds").keys()  # timings: all else is the same
    assert record["id"].startswith("prompt-") and record == loud_record
    assert "req/s" not in err and "\r" not in err and " INFO " not in err, err
    assert all(" WARNING " in line or " ERROR " in line for line in err.splitlines() if line.strip()), err


def test_quiet_also_hides_the_bars_transformers_draws_when_exporting_and_loading_a_merged_export(sample_data, tmp_path,
                                                                                                 capsys):
    """-q promises no progress bar: `export --merge-lora` showed transformers' "Writing model shards" and loading the
    merged export its "Loading weights"; the library's own switch is turned back on after the command."""
    from transformers.utils import logging as transformers_logging

    train = ["train", "--config", str(REPO / "configs/stages/tiny/instruct.yaml"), f"output_dir={tmp_path / 'run'}",
             f"data=[{{path: {sample_data['chat']}, format: mmllm-chat}}]", "init_from=null", "max_steps=1", "-q"]
    assert main(train) == 0
    assert main(["-q", "export", "--checkpoint", str(tmp_path / "run" / "step-1"), "--output", str(tmp_path / "merged"),
                 "--merge-lora"]) == 0
    assert main(["-q", "infer", "--checkpoint", str(tmp_path / "merged"), "--prompt", "hi", "--output",
                 str(tmp_path / "answers"), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert (tmp_path / "merged" / "llm").is_dir()
    assert "\r" not in err and "it/s" not in err and "Writing model shards" not in err, err
    assert transformers_logging.is_progress_bar_enabled()  # as the command found it


def test_quiet_and_verbose_together_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["-q", "inspect", "--config", str(TINY), "-v"])
    assert stopped.value.code == 2
    assert "-q/--quiet and -v/--verbose" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["export", "--dtype", "float16"],  # said "no manifest.json; this is not a complete mmllm checkpoint"
    ["export", "--merge-lora"],
    ["infer", "--prompt", "hi"],
    ["refine", "--data", "DATA"],
    ["eval", "--allow-other-parts"],
])
@pytest.mark.parametrize("given", ["missing", "file"])
def test_a_checkpoint_that_is_not_there_or_a_file_is_said_so_alike_by_every_command(argv, given, tmp_path,
                                                                                    sample_data, capsys):
    checkpoint = tmp_path / "runs" / "step-30"
    if given == "file":
        checkpoint.parent.mkdir()
        checkpoint.write_text("")
    argv = [a.replace("DATA", str(sample_data["chat"])) for a in argv]
    assert main([argv[0], "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), *argv[1:]]) == 2
    err = capsys.readouterr().err
    said = "not found" if given == "missing" else "a file, not a checkpoint directory"
    assert f"--checkpoint {checkpoint}: {said}; give a checkpoint's folder" in err, err
    assert "manifest" not in err and "Traceback" not in err and "malformed" not in err
    assert not (tmp_path / "out").exists()


def test_the_library_says_a_missing_checkpoint_is_missing_not_incomplete(tmp_path):
    from mmllm.training.checkpoint import CheckpointError, export_weights_only, read_meta

    with pytest.raises(CheckpointError) as err:
        export_weights_only(tmp_path / "nowhere", tmp_path / "out", "float16")
    assert str(err.value) == f"checkpoint {tmp_path / 'nowhere'}: not found; give a checkpoint's folder (a training " \
                             "run's step-N)"
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="a file, not a checkpoint directory; give a checkpoint's folder"):
        read_meta(tmp_path / "file")


def test_a_relative_checkpoint_not_found_says_where_it_was_looked_for(tmp_path, monkeypatch, capsys):
    """The library's twin of the command's check said "checkpoint directory not found: runs/x" without where a
    relative path leads nor what to give; the command's said no more of where. One check, one message."""
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--checkpoint", "runs/x/step-3", "--output", "out"]) == 2
    err = capsys.readouterr().err
    assert (f"--checkpoint runs/x/step-3: not found (a relative path resolves from {tmp_path}); give a checkpoint's "
            "folder (a training run's step-N)") in err, err


ENTRY_WITH_TEARDOWN_MARK = """
import atexit, sys
atexit.register(lambda: print("TEARDOWN RAN", flush=True))
sys.argv = ["mmllm", "inspect", "--config", sys.argv[1]]
from mmllm.cli import entry
entry()
"""


@pytest.mark.parametrize("world_size", [None, "2"])
def test_a_process_of_a_multi_process_launch_skips_the_interpreters_teardown_keeping_its_output(world_size):
    """gloo's threads destroyed in the interpreter's teardown aborted a rank after a finished run ("terminate called
    without an active exception"): under a launcher (WORLD_SIZE > 1) the command ends with os._exit once its output
    is flushed (no atexit handler runs), with its exit code and all it printed; alone it exits as usual."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"} | ({"WORLD_SIZE": world_size} if world_size else {})
    proc = subprocess.run([sys.executable, "-c", ENTRY_WITH_TEARDOWN_MARK, str(TINY)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("assembly: ") and re.search(r"\n  total +trainable", proc.stdout)  # all of it
    assert ("TEARDOWN RAN" in proc.stdout) == (world_size is None)


def test_eval_without_the_shipped_default_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    """`mmllm eval` without --checkpoint reads the shipped default glue; where it is not there, the check every
    command shares says so naming it as the shipped default, with where to get it (a branch no test ran)."""
    import mmllm.demo

    missing = tmp_path / "shipped" / "default-glue"
    monkeypatch.setattr(mmllm.demo, "shipped_default", lambda: missing)
    assert main(["eval"]) == 2
    err = capsys.readouterr().err
    assert (f"the shipped default glue {missing}: not found (train it with scripts/train_default.sh, or give "
            "--checkpoint); give a checkpoint's folder (a training run's step-N)") in err, err


def test_the_demo_says_where_its_gallery_is_on_stdout_under_quiet_too(tmp_path, capsys, monkeypatch):
    """Under -q the demo said nothing at all: its answers and the gallery's path were INFO lines."""
    import mmllm.demo

    monkeypatch.setattr(mmllm.demo, "run_demo", lambda out, quick, tiny: 0)
    assert main(["demo", "-q", "--output", str(tmp_path / "demo")]) == 0
    assert capsys.readouterr().out == f"demo: open {tmp_path / 'demo' / 'index.html'}\n"
