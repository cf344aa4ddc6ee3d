"""Validation on held-out data (a stage's ``eval_data``): the score is the stage's loss over the whole set
whatever the batch size, training is unchanged by it, keep_best follows it, resume carries it on, and bad
held-out data is refused before training."""

import json

import pytest
import torch

from mmllm.cli import main
from mmllm.model import AnyToAnyModel
from mmllm.training import checkpoint as ckpt
from mmllm.training.loop import train
from tests.conftest import REPO, sigint_during_step, signal_on_call
from tests.test_stages import fixed_batch_loss, stage_cfg


def held_out(path, fmt: str = "mmllm-chat") -> str:
    return f"[{{path: {path}, format: {fmt}}}]"


def test_the_validation_loss_is_the_stage_loss_over_the_whole_held_out_set(sample_data, tmp_path):
    """Scored in batches of 3 at steps 2 and 4; the last score equals the loss of the final checkpoint
    over the whole set in one batch, part by part."""
    cfg = stage_cfg("instruct", sample_data, tmp_path / "run", max_steps=4, eval_every=2, batch_size=3,
                    eval_data=held_out(sample_data["chat"]))
    result = train(cfg)
    assert [v["step"] for v in result.validation] == [2, 4]
    direct = fixed_batch_loss(AnyToAnyModel.from_pretrained(result.final_checkpoint), cfg)
    last = result.validation[-1]
    parts = {k for k in direct if k != "loss"}
    assert parts >= {"ce", "mse_image", "mse_audio", "mse_video"} and parts == set(last) - {"step", "loss", "skipped"}
    for key in ("loss", *parts):
        assert last[key] == pytest.approx(direct[key], rel=1e-5), key
    assert last["skipped"] == 0
    assert ckpt.read_progress(result.final_checkpoint)["validation"] == result.validation


def test_validation_changes_nothing_in_training_and_resumes_with_the_run(sample_data, tmp_path):
    scored = {"eval_data": held_out(sample_data["chat"]), "eval_every": 1}
    plain = train(stage_cfg("instruct", sample_data, tmp_path / "plain", max_steps=4, save_every=2))
    full = train(stage_cfg("instruct", sample_data, tmp_path / "full", max_steps=4, save_every=2, **scored))
    assert full.losses == plain.losses
    a, b = (AnyToAnyModel.from_pretrained(r.final_checkpoint) for r in (plain, full))
    for k, v in {**a.learned_state_dict(), **a.lora_parameters()}.items():
        assert torch.equal({**b.learned_state_dict(), **b.lora_parameters()}[k], v), k
    assert [v["step"] for v in full.validation] == [1, 2, 3, 4]

    train(stage_cfg("instruct", sample_data, tmp_path / "part", max_steps=2, save_every=2, **scored))
    resumed = train(stage_cfg("instruct", sample_data, tmp_path / "part", max_steps=4, save_every=2, **scored),
                    resume=True)
    for a, b in zip(full.validation, resumed.validation, strict=True):
        assert b == pytest.approx(a, rel=1e-5)


def test_keep_best_keeps_the_checkpoint_with_the_lowest_validation_loss(sample_data, tmp_path):
    result = train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=4, save_every=1, keep_last=1,
                             keep_best=True, eval_data=held_out(sample_data["pairs"], "mmllm-pairs")))
    best = json.loads((tmp_path / "best.json").read_text())
    scores = {f"step-{v['step']}": v["loss"] for v in result.validation}
    assert best["metric_name"] == "validation loss on pairs.jsonl (19 samples)"
    assert best["metric"] == min(scores.values())
    assert scores[best["checkpoint"]] == best["metric"]
    assert {p.name for p in tmp_path.glob("step-*")} == {"step-4", best["checkpoint"]}


def test_a_resume_scored_on_another_held_out_set_starts_keep_best_afresh(sample_data, tmp_path):
    """Validation losses of two held-out sets are not comparable: best.json names its set, and a resume with
    another one does not compare its scores with the old best."""
    pairs = sample_data["pairs"]
    subset = tmp_path / "few.jsonl"
    subset.write_text("".join(pairs.read_text().splitlines(keepends=True)[:5]))
    settings = {"save_every": 1, "keep_best": True}
    train(stage_cfg("decode-align", sample_data, tmp_path / "run", max_steps=2, **settings,
                    eval_data=held_out(pairs, "mmllm-pairs")))
    assert json.loads((tmp_path / "run" / "best.json").read_text())["metric_name"].endswith("pairs.jsonl (19 samples)")
    train(stage_cfg("decode-align", sample_data, tmp_path / "run", max_steps=3, **settings,
                    eval_data=f"[{{path: {subset}, format: mmllm-pairs, root: {pairs.parent}}}]"), resume=True)
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert (best["checkpoint"], best["metric_name"]) == ("step-3", "validation loss on few.jsonl (5 samples)")


def test_held_out_data_is_checked_with_the_stage_and_bad_held_out_data_refused_first(sample_data, tmp_path,
                                                                                     capsys):
    config = str(REPO / "configs/stages/tiny/instruct.yaml")
    common = [f"output_dir={tmp_path / 'run'}", "init_from=null", "report_to=none",
              f"data={held_out(sample_data['chat'])}"]
    assert main(["data", "check", "--config", config, *common,
                 f"eval_data={held_out(sample_data['chat'])}"]) == 0
    report = capsys.readouterr().out
    assert f"{sample_data['chat']} [mmllm-chat, weight 1]" in report
    assert f"{sample_data['chat']} [mmllm-chat, held out (eval_data)]" in report
    assert main(["train", "--config", config, *common, f"eval_data={held_out(tmp_path / 'none.jsonl')}"]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    assert main(["train", "--config", config, *common, f"eval_data={held_out(sample_data['pairs'], 'mmllm-pairs')}"]) == 2
    assert "caption pairs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_stop_request_saves_without_waiting_for_the_validation(sample_data, tmp_path, monkeypatch):
    """Ctrl-C saves the step under way at once: that step is not scored (nor a keep_best candidate), and the
    resumed run scores the rest as the uninterrupted one does."""
    from mmllm.training.interrupt import TrainingInterrupted

    scored = {"eval_data": held_out(sample_data["chat"]), "eval_every": 1, "keep_best": True}
    full = train(stage_cfg("instruct", sample_data, tmp_path / "full", max_steps=4, **scored))
    sigint_during_step(monkeypatch, 2)
    cut = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted):
        train(stage_cfg("instruct", sample_data, cut, max_steps=4, **scored))
    assert [v["step"] for v in ckpt.read_progress(cut / "step-3")["validation"]] == [1, 2]
    assert not (cut / "best.json").exists()  # its only checkpoint, step-3, was not scored
    monkeypatch.undo()
    resumed = train(stage_cfg("instruct", sample_data, cut, max_steps=4, **scored), resume=True)
    assert [v["step"] for v in resumed.validation] == [1, 2, 4]
    for v in resumed.validation:
        assert v == pytest.approx(full.validation[v["step"] - 1], rel=1e-5)
    assert json.loads((cut / "best.json").read_text())["checkpoint"] == "step-4"


def test_the_held_out_denoising_loss_does_not_depend_on_the_batch_size(sample_data, tmp_path):
    """Each held-out signal group draws its noise from its own seed: scoring the set in batches of 1 or of 3
    (or on more processes) gives the same denoising loss, as docs/distributed.md says of every part."""
    from accelerate import Accelerator

    from mmllm.data.dataset import StageDataset, load_stage_records
    from mmllm.training.loop import _part_keys, _reset_single_process_state, build_model, token_spec
    from mmllm.training.validation import Validation, evaluate

    cfg = stage_cfg("instruct", sample_data, tmp_path, **{"losses.denoise": 1.0})
    model = build_model(cfg)
    records = load_stage_records(cfg.data, cfg.stage)[0][0]
    dataset = StageDataset(records, model.llm.tokenizer, token_spec(model),
                           {m: e.preprocess for m, e in model.encoders.items()}, load_output_media=True)
    _reset_single_process_state()
    accelerator = Accelerator(cpu=True)
    keys = _part_keys(model)
    one, three = (evaluate(accelerator, model, model, Validation([dataset], size), cfg.losses, keys, {})
                  for size in (1, 3))
    assert one["denoise_image"] > 0
    assert one == pytest.approx(three, rel=1e-5)


def test_a_stop_request_during_a_validation_saves_that_scored_step(sample_data, tmp_path, monkeypatch):
    """Ctrl-C while step 2's validation runs (held-out sets can take longer than a step): step 2 is done and
    scored, so it is saved at once, as a keep_best candidate, instead of training step 3 first."""
    import signal

    from mmllm.training import loop
    from mmllm.training.interrupt import TrainingInterrupted

    signal_on_call(monkeypatch, loop, "evaluate", 2, signal.SIGINT)
    scored = {"eval_data": held_out(sample_data["chat"]), "eval_every": 1, "keep_best": True}
    with pytest.raises(TrainingInterrupted) as stopped:
        train(stage_cfg("instruct", sample_data, tmp_path, max_steps=4, **scored))
    assert stopped.value.step == 2
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-2"]
    assert [v["step"] for v in ckpt.read_progress(tmp_path / "step-2")["validation"]] == [1, 2]
    assert json.loads((tmp_path / "best.json").read_text())["checkpoint"] == "step-2"


def _held_out_setup(sample_data, tmp_path, stage="instruct", **overrides):
    """A tiny stage's model (its learned parts as built), its sample data as a held-out set, a CPU
    Accelerator and the loss parts."""
    from accelerate import Accelerator

    from mmllm.data.dataset import StageDataset, load_stage_records
    from mmllm.training.loop import _part_keys, _reset_single_process_state, build_model, token_spec

    cfg = stage_cfg(stage, sample_data, tmp_path, **overrides)
    model = build_model(cfg)
    model.requires_grad_(False)
    records = load_stage_records(cfg.data, cfg.stage)[0][0]
    dataset = StageDataset(records, model.llm.tokenizer, token_spec(model),
                           {m: e.preprocess for m, e in model.encoders.items()})
    _reset_single_process_state()
    return cfg, model, dataset, Accelerator(cpu=True), _part_keys(model)


def _count_frozen_calls(model) -> dict[str, int]:
    """Count the encoders' forwards and the decoders' conditioning calls of ``model`` from now on."""
    calls = {"encoders": 0, "conditioning": 0}
    for encoder in model.encoders.values():
        encoder.register_forward_hook(lambda *_: calls.__setitem__("encoders", calls["encoders"] + 1))
    for decoder in model.decoders.values():
        real = decoder.condition

        def counted(captions, real=real):
            calls["conditioning"] += 1
            return real(captions)
        decoder.condition = counted
    return calls


def test_kept_held_out_batches_score_the_same_bits_without_rerunning_the_frozen_parts(sample_data, tmp_path):
    """A validation that keeps its prepared batches scores exactly what one that prepares them at every
    evaluation does, at the first evaluation and at the next one after the learned parts changed; the next
    one reads no sample and runs neither the encoders nor the decoders' conditioning. A bound smaller than
    the set keeps some batches and prepares the others again, with the same scores."""
    from mmllm.data.dataset import StageDataset
    from mmllm.training.validation import Validation, evaluate, nbytes

    cfg, model, dataset, accelerator, keys = _held_out_setup(sample_data, tmp_path, batch_size=3)
    calls = _count_frozen_calls(model)
    reads = []
    real_getitem = StageDataset.__getitem__
    StageDataset.__getitem__ = lambda self, i: reads.append(i) or real_getitem(self, i)
    try:
        fresh, kept = Validation([dataset], 3), Validation([dataset], 3, cache_bytes=1 << 30)
        first = evaluate(accelerator, model, model, fresh, cfg.losses, keys, {})
        assert calls["encoders"] and calls["conditioning"]  # the set has media inputs and signal outputs
        assert evaluate(accelerator, model, model, kept, cfg.losses, keys, {}) == first
        assert len(kept._kept) == len(kept.shares(0, 1)) and 0 < kept.kept_bytes <= kept.cache_bytes
        with torch.no_grad():  # training moved the learned parts
            for p in [*model.input_projections.parameters(), *model.output_projections.parameters()]:
                p.add_(0.05 * torch.randn_like(p))
        calls.update(encoders=0, conditioning=0)
        reads.clear()
        second = evaluate(accelerator, model, model, kept, cfg.losses, keys, {})
        assert calls == {"encoders": 0, "conditioning": 0} and reads == []
        assert second == evaluate(accelerator, model, model, fresh, cfg.losses, keys, {})
        assert second["loss"] != first["loss"]
        one_batch = nbytes(kept._kept[tuple(kept.shares(0, 1)[0])])  # the first batch scored
        bounded = Validation([dataset], 3, cache_bytes=one_batch)
        for _ in range(2):
            assert evaluate(accelerator, model, model, bounded, cfg.losses, keys, {}) == second
        assert 0 < len(bounded._kept) < len(bounded.shares(0, 1)) and bounded.kept_bytes <= one_batch
    finally:
        StageDataset.__getitem__ = real_getitem


def test_held_out_batches_grouped_by_length_pad_less_and_score_the_same_to_float_rounding(sample_data, tmp_path,
                                                                                         monkeypatch):
    """The held-out set is batched shortest first: fewer padded tokens than in the set's own order, and
    every part of the score is the same mean over the same units (only the sums' order and the padded widths
    differ)."""
    from mmllm.training import validation as val

    cfg, model, dataset, accelerator, keys = _held_out_setup(sample_data, tmp_path)
    grouped = val.Validation([dataset], 3)
    lengths = [dataset.length(i) for i in range(len(dataset))]
    assert sorted(lengths) != lengths  # the set's own order is not sorted already

    def padded(validation) -> int:
        return sum(len(b) * max(lengths[i] for _, i in b) for b in validation.shares(0, 1))

    in_file_order = val.Validation([dataset], 3)
    in_file_order._order = [(0, i) for i in range(len(dataset))]
    assert padded(grouped) < padded(in_file_order)
    by_length, as_read = (val.evaluate(accelerator, model, model, v, cfg.losses, keys, {})
                          for v in (grouped, in_file_order))
    assert by_length["loss"] > 0 and set(by_length) == set(as_read)
    for key in as_read:
        assert by_length[key] == pytest.approx(as_read[key], rel=1e-6, abs=1e-9), key


def test_a_run_prepares_its_held_out_batches_once_and_scores_as_one_that_keeps_none(sample_data, tmp_path,
                                                                                     monkeypatch):
    """train() keeps the held-out batches (eval_cache_mb): the decoders' conditioning of the held-out captions
    runs at the first save's validation only, and the scores are the bits of a run with eval_cache_mb=0."""
    import mmllm.training.loop as loop
    from mmllm.model import AnyToAnyModel

    computed: list[int] = []  # conditioning rows computed during each validation
    validating = [False]
    real_evaluate, real_targets = loop.evaluate, AnyToAnyModel.signal_targets

    def evaluate(*args, **kwargs):
        computed.append(0)
        validating[0] = True
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            validating[0] = False

    def signal_targets(self, m, captions, given):
        if validating[0]:
            computed[-1] += sum(t is None for t in (given or [None] * len(captions)))
        return real_targets(self, m, captions, given)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    monkeypatch.setattr(AnyToAnyModel, "signal_targets", signal_targets)
    scored = {"eval_data": held_out(sample_data["pairs"], "mmllm-pairs"), "save_every": 1, "max_steps": 3}
    kept = train(stage_cfg("decode-align", sample_data, tmp_path / "kept", **scored))
    assert computed[0] > 0 and computed[1:] == [0, 0]
    computed.clear()
    fresh = train(stage_cfg("decode-align", sample_data, tmp_path / "fresh", eval_cache_mb=0, **scored))
    assert len(computed) == 3 and all(computed)
    assert kept.validation == fresh.validation and kept.losses == fresh.losses
