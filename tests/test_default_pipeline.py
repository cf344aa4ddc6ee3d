"""The embedded default's pipeline pieces on tiny stand-ins: world stage data, weights-only export,
package paths, and ``mmllm eval`` end to end on a tiny trained checkpoint with the shipped judges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmllm.config import ConfigError, load_stage
from mmllm.data.formats import read_records
from mmllm.locations import resolve_location, resolve_source
from mmllm.model import AnyToAnyModel
from mmllm.toyworld.judges import attribute_accuracy
from mmllm.toyworld.model_eval import EvalOptions, read_attributes, run_eval
from mmllm.toyworld.parts import shipped_dir
from mmllm.toyworld.stage_data import StageDataOptions, write_stage_data
from mmllm.toyworld.world import World
from mmllm.training.checkpoint import CheckpointError, export_merged, export_weights_only, verify_manifest
from tests.test_infer import trained_checkpoint

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(renderings={"image": 1, "audio": 1, "video": 1}, generate=30, t2x=30, x2t=30, x2y=20, multi=12,
             dialogue=16)


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage-data")
    plain = root / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Hi?", "answer": "Hello."}) + "\n")
    counts = write_stage_data(StageDataOptions(out=root / "data", seed=3, plain_answers=plain, **SMALL))
    return root / "data", counts


def test_stage_data_covers_every_kind_and_only_training_combos(stage_data):
    out, counts = stage_data
    world = World()
    assert counts["align-image"] == len(world.combos("image", "train"))
    for name in ("generate", "t2x", "x2t", "x2y", "multi", "dialogue", "plain"):
        records, errors = read_records(out / f"{name}.jsonl", "mmllm-chat")
        assert not errors and len(records) == counts[name], name
    for modality in ("image", "audio", "video"):
        pairs, errors = read_records(out / f"align-{modality}.jsonl", "mmllm-pairs")
        assert not errors
        for pair in pairs:
            assert pair.media.is_file()
            assert not world.is_held_out(modality, world.parse(modality, pair.caption))
    multi, _ = read_records(out / "multi.jsonl", "mmllm-chat")
    assert all(len(c.output_refs()) == 2 for c in multi)
    dialogue, _ = read_records(out / "dialogue.jsonl", "mmllm-chat")
    assert any(sum(m.role == "user" for m in c.messages) >= 2 for c in dialogue)
    x2y, _ = read_records(out / "x2y.jsonl", "mmllm-chat")
    for conv in x2y:  # the output keeps the input's colour and shape
        source = conv.media_refs()[0]
        target = conv.output_refs()[0]
        src_attrs = world.parse(source.modality, next(
            p.caption for p in read_records(out / f"align-{source.modality}.jsonl", "mmllm-pairs")[0]
            if p.media == source.path))
        out_attrs = world.parse(target.modality, target.caption)
        assert (src_attrs["colour"], src_attrs["shape"]) == (out_attrs["colour"], out_attrs["shape"])


def test_held_out_data_names_only_held_out_combinations_and_the_default_stages_score_it(stage_data):
    out, counts = stage_data
    world = World()
    held = out / "held-out"
    for modality in ("image", "audio", "video"):
        pairs, errors = read_records(held / f"align-{modality}.jsonl", "mmllm-pairs")
        assert not errors and len(pairs) == counts[f"held-out/align-{modality}"] > 0
        assert {p.caption for p in pairs} == {world.caption(modality, world.attributes_of(modality, c))
                                              for c in world.combos(modality, "held_out")}
        assert all(p.media.is_file() and p.media.is_relative_to(held / "media") for p in pairs)
    for name in ("generate", "t2x"):
        convs, errors = read_records(held / f"{name}.jsonl", "mmllm-chat")
        assert not errors and len(convs) == counts[f"held-out/{name}"]
        for ref in (r for c in convs for r in c.output_refs()):
            assert world.is_held_out(ref.modality, world.parse(ref.modality, ref.caption))
    x2t, errors = read_records(held / "x2t.jsonl", "mmllm-chat")
    assert not errors and all(r.path.is_relative_to(held / "media") for c in x2t for r in c.media_refs())
    for name in ("encode_align", "decode_align", "instruct"):  # what their eval_data names, world data writes
        cfg = load_stage(REPO / "configs" / "stages" / "default" / f"{name}.yaml")
        assert cfg.eval_data, name
        for ds in cfg.eval_data:
            rel = Path(ds.path).as_posix().split("runs/default/data/", 1)[1]
            assert (out / rel).is_file(), (name, rel)


def test_stage_data_is_a_function_of_the_seed(stage_data, tmp_path):
    out, _ = stage_data
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Hi?", "answer": "Hello."}) + "\n")
    write_stage_data(StageDataOptions(out=tmp_path / "again", seed=3, plain_answers=plain, **SMALL))
    for name in ("t2x.jsonl", "dialogue.jsonl", "align-audio.jsonl", "held-out/x2t.jsonl", "held-out/align-video.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    first = sorted((out / "media" / "audio").iterdir())[0]
    assert (tmp_path / "again" / "media" / "audio" / first.name).read_bytes() == first.read_bytes()


def test_default_stage_configs_parse():
    for name in ("encode_align", "decode_align", "instruct"):
        cfg = load_stage(REPO / "configs" / "stages" / "default" / f"{name}.yaml")
        assert cfg.assembly.endswith("default.yaml")


def test_read_attributes_and_scoring():
    world = World()
    got = read_attributes(world, "image", "The picture shows a big blue disc in the upper left corner.")
    assert got == {"colour": "blue", "shape": "circle", "size": "large", "position": "top-left"}
    vague = read_attributes(world, "image", "a red or blue square")
    assert vague["colour"] is None and vague["shape"] == "square" and vague["position"] is None
    truth = {"colour": "blue", "shape": "circle", "size": "large", "position": "top-left"}
    s = attribute_accuracy([got, vague], [truth, truth])
    assert s["colour"] == 0.5 and s["all"] == 0.5 and s["position"] == 0.5


def test_package_paths_resolve_and_fail_clearly():
    assert Path(resolve_source("package:mmllm/toyworld")).is_dir()
    assert resolve_location("pkg:mmllm/nothing-here").name == "nothing-here"
    assert resolve_source("openai/clip") == "openai/clip"
    with pytest.raises(ConfigError, match="no installed Python package"):
        resolve_source("package:not_a_package_xyz/a")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source("package:mmllm/no/such/folder")


def test_weights_only_export_is_small_verified_and_loads(tmp_path_factory, tmp_path):
    ckpt = trained_checkpoint(tmp_path_factory)
    out = export_weights_only(ckpt, tmp_path / "ship", dtype="float16")
    verify_manifest(out)
    assert not (out / "training_state").exists()
    assert all(t.dtype == torch.float16 for t in load_file(str(out / "learned.safetensors")).values())
    original = AnyToAnyModel.from_pretrained(ckpt).learned_state_dict()
    shipped = AnyToAnyModel.from_pretrained(out).learned_state_dict()
    for name, tensor in original.items():
        torch.testing.assert_close(shipped[name], tensor, atol=2e-3, rtol=1e-3)
    (out / "learned.safetensors").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="learned.safetensors"):
        AnyToAnyModel.from_pretrained(out)


def test_a_weights_only_export_of_a_merged_export_carries_its_llm(tmp_path_factory, tmp_path):
    ckpt = trained_checkpoint(tmp_path_factory)
    merged = export_merged(ckpt, tmp_path / "merged")
    shipped = export_weights_only(merged, tmp_path / "ship", dtype="float16")
    verify_manifest(shipped)
    assert (shipped / "llm" / "config.json").is_file()  # its assembly names ./llm, inside the export
    a, b = AnyToAnyModel.from_pretrained(merged), AnyToAnyModel.from_pretrained(shipped)
    frozen = [(name, p, q) for (name, p), q in zip(a.llm.model.named_parameters(), b.llm.model.parameters())
              if ".signal" not in name]  # the learned signal rows are cast to float16; the LLM is copied as it is
    assert frozen and all(torch.equal(p, q) for _, p, q in frozen)


def test_merge_lora_refuses_an_assembly_it_would_not_record(tmp_path_factory, tmp_path, capsys):
    from mmllm.cli import main

    ckpt = trained_checkpoint(tmp_path_factory)
    args = ["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "merged"), "--merge-lora"]
    assert main([*args, "--assembly", str(REPO / "configs" / "assemblies" / "tiny.yaml")]) == 2
    assert "--assembly goes with a weights-only export" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_an_export_never_replaces_its_checkpoint_or_unrelated_files(tmp_path_factory, tmp_path):
    ckpt = trained_checkpoint(tmp_path_factory)
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    for out in (ckpt, ckpt.parent, ckpt / "export"):  # itself, the run folder holding it, inside it
        with pytest.raises(ConfigError, match="would replace the checkpoint"):
            export_weights_only(ckpt, out, dtype="float16")
        with pytest.raises(ConfigError, match="would replace the checkpoint"):
            export_merged(ckpt, out)
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier `mmllm export`"):
        export_weights_only(ckpt, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    again = export_weights_only(ckpt, tmp_path / "ship")
    assert export_weights_only(ckpt, again, dtype="bfloat16") == again  # an earlier export is replaced


@pytest.mark.skipif(not (shipped_dir() / "judge-image").is_dir(), reason="shipped judges missing")
def test_eval_end_to_end_on_a_tiny_checkpoint(tmp_path_factory, tmp_path):
    torch.set_num_threads(1)
    model = AnyToAnyModel.from_pretrained(trained_checkpoint(tmp_path_factory))
    from mmllm.toyworld.judges import Judge

    judges = {"image": Judge.load(shipped_dir() / "judge-image")}
    options = EvalOptions(output=tmp_path, items=2, batch_size=2, max_new_tokens=8, steps=1, text_chunks=2,
                          text_tokens=16, modalities=["image"], two_output_requests=3,
                          allow_other_parts=True)  # the tiny assembly's random parts stand in for the toy world's
    report = run_eval(model, judges, options)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["x2t"]["image"].keys() == {"seen", "held_out"}
    for split in ("seen", "held_out"):
        t2x = saved["t2x"]["image"][split]
        assert 0.0 <= t2x["model"]["mean"] <= 1.0 and 0.0 <= t2x["oracle"]["mean"] <= 1.0
    # x2t and t2x: 2 items x 2 splits each; 20 plain-chat prompts; 3 two-output requests
    assert 0.0 <= report["routing"]["all"] <= 1.0 and report["routing"]["n"] == 4 + 4 + 20 + 3
    # no LoRA here: the model differs from its base only by the signal rows' extra logits, which can
    # only add probability mass away from the text's tokens
    assert report["text"]["model"] >= report["text"]["base"] - 1e-6
    assert report["text"]["tokens"] == 2 * 15


def test_demo_requests_cover_every_direction_and_parse(tmp_path):
    from mmllm.demo import write_default_requests
    from mmllm.inference.runner import parse_request, read_lines

    path = write_default_requests(tmp_path)
    lines = read_lines(path)
    assert not [ln for ln in lines if ln.error]
    kinds = {ln.id for ln in lines}
    assert {"text-to-image", "text-to-audio", "text-to-video", "image-to-text", "audio-to-text", "video-to-text",
            "image-to-video", "text-to-image-and-audio", "dialogue", "plain-chat"} <= kinds
    world = World()
    for ln in lines:
        parsed = parse_request(ln.record, tmp_path, 0)
        expected = [m for m in ("image", "audio", "video") if f"<{m}>" in json.dumps(ln.record)]
        assert [m for m, item in parsed.request.media if item is not None] == expected, ln.id
    for rel in ("inputs/blue-square.png", "inputs/high-buzzy.wav", "inputs/orange-triangle.gif"):
        assert (tmp_path / rel).is_file()
    from mmllm.demo import INPUTS

    assert not any(world.is_held_out(m, attrs) for m, (_, attrs) in INPUTS.items())


def test_the_demos_dialogue_gives_its_earlier_answer_as_the_worlds_training_dialogues_render_it(tiny_model, tmp_path):
    """The dialogue's earlier answer is the world's "make" turn (stage_data's make_turn), which training renders
    with the picture's signal tokens; the demo gave it as text alone, so the model answered the second turn in a
    context it never saw."""
    from mmllm.data.formats import Conversation, Message, OutputRef
    from mmllm.data.template import IGNORE, encode_conversation, encode_prompt
    from mmllm.demo import REQUESTS
    from mmllm.inference.runner import parse_request
    from mmllm.toyworld.stage_data import _Writer
    from mmllm.training.loop import token_spec

    world = World()
    drawn = {"colour": "yellow", "shape": "cross", "size": "small", "position": "top-right"}
    made = _Writer(world, None, 0).make_turn("image", tuple(drawn[n] for n in world.specs["image"].names))
    record = next(r for r in REQUESTS if r["id"] == "dialogue")
    first, answer, then = record["messages"]
    assert answer["content"] == made["content"]
    spec, tok = token_spec(tiny_model), tiny_model.llm.tokenizer
    conv = Conversation("dialogue", [
        Message("user", first["content"]),
        Message("assistant", made["content"], outputs=[OutputRef(o["modality"], o["caption"]) for o in made["outputs"]]),
        Message("user", then["content"]), Message("assistant", "ok")])
    train = encode_conversation(conv, tok, spec)
    last = max(i for i in range(1, len(train.labels)) if train.labels[i] != IGNORE and train.labels[i - 1] == IGNORE)
    prompt, _ = encode_prompt(parse_request(record, tmp_path, 0).request.messages, tok, spec)
    assert prompt == train.input_ids[:last]


def test_weights_only_export_can_record_another_assembly(tmp_path_factory, tmp_path):
    import yaml

    ckpt = trained_checkpoint(tmp_path_factory)
    tiny = REPO / "configs" / "assemblies" / "tiny.yaml"
    out = export_weights_only(ckpt, tmp_path / "repointed", assembly=tiny)
    assert json.loads((out / "mmllm.json").read_text())["exported_from"]["assembly"] == str(tiny)
    AnyToAnyModel.from_pretrained(out)
    # an assembly the learned weights do not fit is refused on load, naming the weights file
    data = yaml.safe_load(tiny.read_text())
    data["output_projections"]["image"]["hidden_dim"] = 32
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data, sort_keys=False))
    for name in ("_tiny_encoders.yaml", "_tiny_decoders.yaml"):
        if (tiny.parent / name).is_file():
            (tmp_path / name).write_text((tiny.parent / name).read_text())
    bad = export_weights_only(ckpt, tmp_path / "bad", assembly=other)
    with pytest.raises(ConfigError, match="learned.safetensors"):
        AnyToAnyModel.from_pretrained(bad)
