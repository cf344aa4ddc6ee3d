import pytest

from mmllm.config import (
    ConfigError,
    apply_overrides,
    load_assembly,
    load_stage,
    parse_assembly,
    to_dict,
)
from tests.conftest import REPO, TINY


def test_tiny_assembly_loads_and_round_trips(tiny_assembly):
    assert tiny_assembly.llm.kind == "tiny-llama"
    assert set(tiny_assembly.encoders) == {"image", "audio", "video"}
    again = parse_assembly(to_dict(tiny_assembly))
    assert to_dict(again) == to_dict(tiny_assembly)


def test_unknown_key_names_the_path_and_lists_valid_keys():
    data = to_dict(load_assembly(TINY))
    data["input_projections"]["image"]["num_tokns"] = 3
    with pytest.raises(ConfigError, match=r"input_projections\.image\.num_tokns.*valid keys.*num_tokens"):
        parse_assembly(data)


def test_unknown_modality_is_refused():
    data = to_dict(load_assembly(TINY))
    data["encoders"]["smell"] = data["encoders"]["image"]
    with pytest.raises(ConfigError, match="smell.*valid modalities"):
        parse_assembly(data)


def test_signal_token_order_does_not_follow_the_yaml_order():
    """Signal-token ids are assigned in dict order; a YAML re-dumped with sorted keys keeps them."""
    data = to_dict(load_assembly(TINY))
    data["signal_tokens"] = {"video": 2, "image": 3, "audio": 1}
    assert list(parse_assembly(data).signal_tokens.items()) == [("image", 3), ("audio", 1), ("video", 2)]


def test_overrides_parse_yaml_values_and_nest():
    data = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=3e-4", "schedule.decay=linear", "x=[1, 2]"])
    assert data == {"optim": {"lr": 3e-4}, "schedule": {"decay": "linear"}, "x": [1, 2]}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["no-equals-sign"])


def test_an_override_into_a_path_key_says_the_keys_are_in_that_file():
    """``lora:`` names a file: ``lora.r=4`` cannot set its rank, and the error says where the rank is set."""
    with pytest.raises(ConfigError, match=r"lora is a file path \(configs/lora/tiny\.yaml\).*lora=PATH"):
        apply_overrides({"lora": "configs/lora/tiny.yaml"}, ["lora.r=4"])


def test_stage_config_resolves_paths_and_routes_assembly_overrides():
    cfg = load_stage(REPO / "configs/stages/tiny/encode_align.yaml", ["max_steps=3", "assembly.llm.num_layers=1"])
    assert cfg.max_steps == 3
    assert cfg.assembly_overrides == ["llm.num_layers=1"]
    assert cfg.assembly.endswith("assemblies/tiny.yaml")
    assert cfg.resolved_trainable() == {
        "input_projections": True, "output_projections": False, "signal_embeddings": False, "lora": False}


def test_bad_values_and_missing_files_are_reported():
    with pytest.raises(ConfigError, match="not found"):
        load_stage("configs/stages/nope.yaml")
    with pytest.raises(ConfigError, match="max_steps: expected an integer"):
        load_stage(REPO / "configs/stages/tiny/encode_align.yaml", ["max_steps=many"])
    with pytest.raises(ConfigError, match="decay.*not one of"):
        load_stage(REPO / "configs/stages/tiny/encode_align.yaml", ["schedule.decay=zigzag"])
    with pytest.raises(ConfigError, match="decay: False is not one of .*quote the word"):
        load_stage(REPO / "configs/stages/tiny/encode_align.yaml", ["schedule.decay=no"])


@pytest.mark.parametrize("override,message", [
    ("max_steps=0", "max_steps must be >= 1, got 0"),
    ("max_steps=-1", "max_steps must be >= 1, got -1"),
    ("batch_size=0", "batch_size must be >= 1"),
    ("grad_accum=0", "grad_accum must be >= 1"),
    ("log_every=0", "log_every must be >= 1"),
    ("keep_last=-1", "keep_last must be >= 0"),
    ("losses.mse=-1", "losses.mse must be >= 0"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("schedule.min_lr_ratio=1.5", r"schedule.min_lr_ratio must be in \[0, 1\]"),
    ("data=[{path: a.jsonl, weight: -1}]", "a.jsonl: weight must be a finite number >= 0"),
    # not "every dataset has weight 0" (NaN), nor an OverflowError once the model is built (inf)
    ("data=[{path: a.jsonl, weight: .nan}]", "a.jsonl: weight must be a finite number >= 0"),
    ("data=[{path: a.jsonl, weight: .inf}]", "a.jsonl: weight must be a finite number >= 0"),
    ("data=[{path: a.jsonl, weight: 0}, {path: b.jsonl, weight: 0}]", "data: every dataset has weight 0"),
    ("eval_every=5", "eval_every=5 scores the held-out eval_data, which is not set"),
])
def test_stage_values_that_cannot_train_are_refused_when_loading(override, message):
    with pytest.raises(ConfigError, match=f"encode_align.yaml: (StageConfig|data\\[0\\]): {message}"):
        load_stage(REPO / "configs/stages/tiny/encode_align.yaml", [override])


def test_a_missing_assembly_or_lora_file_says_where_it_was_looked_for():
    with pytest.raises(ConfigError, match=r"lora: \.\./\.\./lora/tinyy\.yaml not found \(a relative path is looked "
                                          r"up from the working directory .*, then from the stage config's folder "
                                          r".*configs/stages/tiny\)"):
        load_stage(REPO / "configs/stages/tiny/instruct.yaml", ["lora=../../lora/tinyy.yaml"])
    with pytest.raises(ConfigError, match="assembly: nowhere.yaml not found"):
        load_stage(REPO / "configs/stages/tiny/instruct.yaml", ["assembly=nowhere.yaml"])


def test_a_lora_file_with_a_wrong_key_is_refused_when_the_stage_loads(tmp_path):
    """Not after the stage has assembled its model (and loaded a core that can take minutes), as before."""
    lora = tmp_path / "lora.yaml"
    lora.write_text((REPO / "configs/lora/tiny.yaml").read_text().replace("r: 4", "rank: 4"))
    with pytest.raises(ConfigError, match=r"instruct\.yaml: lora: .*lora\.yaml: unknown key\(s\) rank; valid keys "
                                          r"here are: alpha, dropout, r, target_modules"):
        load_stage(REPO / "configs/stages/tiny/instruct.yaml", [f"lora={lora}"])


def test_an_override_into_a_list_says_to_give_the_list_whole_and_shows_it():
    data = {"data": [{"path": "my data/pairs.jsonl", "format": "mmllm-pairs", "weight": 0.5}], "max_steps": 3}
    with pytest.raises(ConfigError, match=r"data is a list, which an override replaces whole \(there is no "
                                          r"data\.0\.key=value\)") as err:
        apply_overrides(data, ["data.0.path=other.jsonl"])
    shown = str(err.value).split("e.g. '", 1)[1].split("' with your change", 1)[0]
    assert apply_overrides(data, [shown]) == data  # what it shows, given back, is the list as it is


def test_an_error_naming_a_part_names_the_overrides_that_changed_it_and_only_those():
    from mmllm.config import naming_the_override

    dims = ConfigError("input_projections.image.input_dim=32 disagrees with encoders.image (open-clip) output_dim=16")
    named = str(naming_the_override(dims, ["encoders.image.tokens=patch", "seed=3", "encoders.audio.tokens=pooled",
                                           "encoders.image.tokens=pooled", "input_projections.image.input_dim=32"],
                                    "assembly."))
    assert named == (f"{dims} (set on the command line by assembly.input_projections.image.input_dim=32; "
                     "encoders.image was changed on the command line by assembly.encoders.image.tokens=pooled)")
    assert str(naming_the_override(ConfigError(named), ["encoders.image.tokens=pooled"], "assembly.")) == named
    kind = ConfigError("llm: unknown llm kind 'gpt'; valid kinds are: hf-causal-lm, tiny-llama")
    assert str(naming_the_override(kind, ["llm.kind=gpt"])).endswith("(llm was changed on the command line by "
                                                                      "llm.kind=gpt)")
    # a key under the part is not the part: the file's unknown key is not blamed on another override of the part
    typo = ConfigError("tiny.yaml: unknown key(s) encoders.image.tokns; valid keys here are: encoders.image.tokens")
    assert naming_the_override(typo, ["encoders.image.tokens=pooled"], source="tiny.yaml") is typo
    prose = ConfigError("the encoders and decoders disagree")  # a word is not a part: `encoders` alone names none
    assert naming_the_override(prose, ["encoders.image.tokens=x", "decoders.image.steps=2"]) is prose


def test_a_bad_value_or_key_given_on_the_command_line_is_blamed_on_the_override_not_the_file(tmp_path):
    stage = REPO / "configs/stages/tiny/encode_align.yaml"
    with pytest.raises(ConfigError, match=r"encode_align\.yaml: max_steps: expected an integer, got 'ten' \(set on "
                                          r"the command line by max_steps=ten\)$"):
        load_stage(stage, ["seed=1", "max_steps=ten"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) optim\.learnin_rate; .* \(set on the command line by "
                                          r"optim\.learnin_rate=1\)$"):
        load_stage(stage, ["optim.learnin_rate=1"])
    with pytest.raises(ConfigError, match=r"tiny\.yaml: max_length: expected an integer, got 'long' \(set on the "
                                          r"command line by assembly\.max_length=long\)$"):
        load_assembly(load_stage(stage).assembly, ["max_length=long"])
    typo = tmp_path / "stage.yaml"  # the file's own mistake: no override blamed, though seed is a valid key
    typo.write_text(stage.read_text().replace("batch_size:", "batch_sise:"))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) batch_sise; valid keys here are: .*seed.*[^)]$"):
        load_stage(typo, ["seed=1"])


def test_an_override_is_not_blamed_for_a_mistake_of_a_file_whose_name_holds_its_key(tmp_path):
    """The key was looked for in the whole message, the file's path included: a stage.yaml with its own bad
    max_steps was blamed on a valid stage=... override, an assembly's in a folder seed/ on assembly.seed=3."""
    stage = tmp_path / "stage.yaml"
    stage.write_text((REPO / "configs/stages/tiny/encode_align.yaml").read_text().replace(
        "max_steps: 30", "max_steps: ten").replace("../../assemblies/tiny.yaml", str(TINY)))
    with pytest.raises(ConfigError, match=r"stage\.yaml: max_steps: expected an integer, got 'ten'$"):
        load_stage(stage, ["stage=encode-align"])
    (tmp_path / "seed").mkdir()
    assembly = tmp_path / "seed" / "tiny.yaml"
    assembly.write_text(TINY.read_text().replace("max_length: 128", "max_length: long"))
    with pytest.raises(ConfigError, match=r"max_length: expected an integer, got 'long'$"):
        load_assembly(assembly, ["seed=3"])


@pytest.mark.parametrize("data, message", [
    ("mydata/pairs.jsonl", "data: expected a list of DatasetConfig mappings ({path: ...}; optional: format, weight, "
                           "root, allow_outside_root, embeddings), got 'mydata/pairs.jsonl'"),
    ("[mydata/pairs.jsonl]", "data[0]: expected a mapping for DatasetConfig ({path: ...}; optional: format, "),
    ("{path: mydata/pairs.jsonl}", "data: expected a list of DatasetConfig mappings ({path: ...}; optional: "),
])
def test_data_given_in_another_shape_says_what_to_write(data, message):
    """A data file named as a string or a bare mapping: the error said only 'expected a list'."""
    with pytest.raises(ConfigError) as err:
        load_stage(REPO / "configs/stages/tiny/encode_align.yaml", [f"data={data}"])
    assert message in str(err.value)


def test_a_section_of_optional_keys_given_a_value_lists_them():
    with pytest.raises(ConfigError, match=r"optim: expected a mapping for OptimConfig \(keys: name, lr, .*\), got 0\.1"):
        load_stage(REPO / "configs/stages/tiny/encode_align.yaml", ["optim=0.1"])


def test_a_relative_path_found_both_from_the_working_directory_and_beside_the_config_warns(tmp_path, monkeypatch,
                                                                                          caplog):
    """The working directory's file wins (as documented); when the config's folder holds another file of that
    name, which is what a config kept with its data means, that used to happen without a word."""
    (tmp_path / "my").mkdir()
    for folder in (tmp_path, tmp_path / "my"):
        (folder / "tiny.yaml").write_text(TINY.read_text())
    stage = tmp_path / "my" / "stage.yaml"
    stage.write_text((REPO / "configs/stages/tiny/encode_align.yaml").read_text().replace(
        "../../assemblies/tiny.yaml", "tiny.yaml"))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="mmllm.config"):
        assert load_stage(stage).assembly == "tiny.yaml"
    assert any(f"both tiny.yaml (from the working directory {tmp_path}) and {tmp_path / 'my' / 'tiny.yaml'} (beside "
               "the config) exist; the first is used" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.chdir(tmp_path / "my")  # one file, found both ways: nothing to warn about
    with caplog.at_level("WARNING", logger="mmllm.config"):
        load_stage(stage)
    assert not [r for r in caplog.records if "both" in r.getMessage()]


def test_a_bare_yaml_no_means_the_word_where_the_choice_has_it():
    # YAML 1.1 reads `no` as false; `mixed_precision=no` on a shell command line cannot be quoted
    cfg = load_stage(REPO / "configs/stages/tiny/encode_align.yaml", ["mixed_precision=no"])
    assert cfg.mixed_precision == "no"


# --- the assembly a stage asks for vs the one an init_from checkpoint records (mmllm/training/init_from.py)


@pytest.mark.parametrize("stage", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs/stages").glob("*/*.yaml")))
def test_a_shipped_stage_assembly_equals_itself_as_a_checkpoint_records_it(stage):
    """A checkpoint records to_dict(assembly) as JSON; read back, it must compare equal to the stage's own."""
    import json

    from mmllm.training.init_from import assembly_differences, normalized_assembly

    assembly = load_assembly(load_stage(REPO / stage).assembly)
    recorded = json.loads(json.dumps(to_dict(assembly), default=str))
    assert assembly_differences(normalized_assembly(parse_assembly(recorded)), normalized_assembly(assembly)) == []


def test_assembly_comparison_fills_defaults_and_sees_through_path_spellings(tmp_path):
    from mmllm.training.init_from import assembly_differences, normalized_assembly

    base = to_dict(load_assembly(TINY))
    spelled = apply_overrides(base, [
        "llm.max_position_embeddings=512", "llm.seed=0",  # TinyLlama's option defaults, written out
        "decoders.image.dtype=float32", "decoders.audio.scheduler=null",  # diffusion decoder defaults
        "input_projections.video.dropout=0.0", "encoders.video.image.pretrained=null"])  # nested in frames-video
    del base["llm"]["init_std"]  # not a default here (0.1 vs 0.02): must show
    diffs = assembly_differences(normalized_assembly(parse_assembly(spelled)), normalized_assembly(parse_assembly(base)))
    assert [(d.key, d.checkpoint, d.stage) for d in diffs] == [("llm.init_std", 0.1, 0.02)]

    weights = tmp_path / "decoder"
    weights.mkdir()
    (tmp_path / "other").mkdir()
    default = to_dict(load_assembly(REPO / "configs/assemblies/default.yaml"))
    absolute = apply_overrides(default, [f"decoders.image.model={weights}"])
    relative = apply_overrides(default, [f"decoders.image.model={weights}/../{weights.name}"])
    other = apply_overrides(default, [f"decoders.image.model={tmp_path / 'other'}"])
    norm = [normalized_assembly(parse_assembly(a)) for a in (absolute, relative, other)]
    assert assembly_differences(norm[0], norm[1]) == []
    assert [d.key for d in assembly_differences(norm[0], norm[2])] == ["decoders.image.model"]


def test_overriding_a_parts_kind_replaces_the_part(caplog):
    """`llm.kind=hf-causal-lm` over the tiny assembly kept tiny-llama's hidden_size, num_layers, ... and was
    refused as unknown keys of hf-causal-lm: a swap from the command line could not be written at all."""
    from mmllm.config import apply_overrides

    data = {"llm": {"kind": "tiny-llama", "hidden_size": 64, "num_layers": 2}, "max_length": 128}
    with caplog.at_level("INFO", logger="mmllm.config"):
        out = apply_overrides(data, ["llm.name_or_path=/models/qwen", "llm.kind=hf-causal-lm", "max_length=64"])
    assert out == {"llm": {"kind": "hf-causal-lm", "name_or_path": "/models/qwen"}, "max_length": 64}
    assert "kind tiny-llama -> hf-causal-lm by override" in caplog.text and "hidden_size, num_layers" in caplog.text
    assert apply_overrides(data, ["llm.kind=tiny-llama", "llm.num_layers=3"])["llm"] == {
        "kind": "tiny-llama", "hidden_size": 64, "num_layers": 3}  # the same kind keeps the part
    assert data["llm"]["kind"] == "tiny-llama"  # the input is not changed
    projection = {"input_projections": {"audio": {"kind": "mlp", "hidden_dim": 64}}}  # one config, not a kind's
    assert apply_overrides(projection, ["input_projections.audio.kind=resampler"]) == {
        "input_projections": {"audio": {"kind": "resampler", "hidden_dim": 64}}}
