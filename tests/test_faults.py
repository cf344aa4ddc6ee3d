"""Surviving faults: kill -9 and --resume, a kill during a checkpoint write, non-finite steps,
retention, and an unwritable output directory reported before training."""

import dataclasses
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mmllm.cli import entry, main
from mmllm.config import ConfigError, load_stage
from mmllm.memory import OutOfMemory
from mmllm.model import AnyToAnyModel
from mmllm.training import checkpoint as ckpt
from mmllm.training import interrupt, loop
from mmllm.training.interrupt import TrainingInterrupted
from mmllm.training.loop import train
from mmllm.training.resume import check_fresh_output_dir, check_resume
from tests.conftest import REPO, sigint_during_step, signal_on_call, sigterm_during_a_read_retry
from tests.test_stages import stage_cfg


def _cli(sample_data, out, *extra):
    return [sys.executable, "-m", "mmllm.cli", "train", "--config", str(REPO / "configs/stages/tiny/instruct.yaml"),
            f"output_dir={out}", "report_to=none", "init_from=null", "max_steps=16", "save_every=1", "keep_last=3",
            f"data=[{{path: {sample_data['chat']}, format: mmllm-chat}}]", *extra]


# grouped: 27 s more; tests/test_length_grouping.py resumes a grouped run in-process in the fast suite
@pytest.mark.parametrize("grouping", ["group_by_length=false",
                                      pytest.param("group_by_length=true", marks=pytest.mark.slow)])
def test_kill_9_at_a_random_step_then_resume_equals_an_uninterrupted_run(grouping, sample_data, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    full = subprocess.run(_cli(sample_data, tmp_path / "full", grouping), cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    # a checkpoint step; the kill lands up to 0.1 s later, often mid-write, always well before step 16
    kill_after = random.Random(os.getpid()).randint(2, 8)
    where = f"(kill -9 drawn after step-{kill_after})"  # drawn from the pid: named so a failure can be rerun
    proc = subprocess.Popen(_cli(sample_data, tmp_path / "cut", grouping), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "cut" / f"step-{kill_after}").exists():
        assert proc.poll() is None, f"the run ended before it could be killed {where}"
        assert time.time() < deadline, where
        time.sleep(0.01)
    time.sleep(random.Random(kill_after).uniform(0.0, 0.1))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "step-16").exists(), f"the run finished before the kill {where}"
    resumed = subprocess.run(_cli(sample_data, tmp_path / "cut", grouping, "--resume"), cwd=REPO, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, f"{where}\n{resumed.stderr[-2000:]}"
    assert "resumed from" in resumed.stderr, where
    a = tmp_path / "full" / "step-16"
    b = tmp_path / "cut" / "step-16"
    for name in ("learned.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=f"{k} {where}")
    la = json.loads((a / "training_state/progress.json").read_text())["losses"]
    lb = json.loads((b / "training_state/progress.json").read_text())["losses"]
    assert lb == pytest.approx(la, rel=1e-6), where


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tiny_model, tmp_path):
    target = tmp_path / "step-1"
    tiny_model.save_pretrained(target)
    before = (target / "learned.safetensors").read_bytes()

    def dies_halfway(tmp):
        (tmp / "learned.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_dir(target, dies_halfway)
    assert (target / "learned.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]  # no temp dir left behind
    AnyToAnyModel.from_pretrained(target)  # still verifies and loads


def test_incomplete_checkpoints_are_skipped_when_resuming(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "step-2")
    tiny_model.save_pretrained(tmp_path / "step-4")
    (tmp_path / "step-4" / "learned.safetensors").write_bytes(b"truncated")
    (tmp_path / ".step-6.tmp-1-2").mkdir()  # what a kill -9 during a write leaves
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-2"


def test_non_finite_steps_are_skipped_and_a_run_of_them_stops_training(sample_data, tmp_path, monkeypatch, caplog):
    real_forward = AnyToAnyModel.forward

    def poisoned(self, batch, losses=None, normalizers=None):
        out = real_forward(self, batch, losses, normalizers)
        if batch["step"] in poisoned.steps:
            out["loss"] = out["loss"] * float("nan")
        return out

    poisoned.steps = {1}
    monkeypatch.setattr(AnyToAnyModel, "forward", poisoned)
    result = train(stage_cfg("decode-align", sample_data, tmp_path / "a", max_steps=4, save_every=1, keep_last=0))
    assert "step 2: non-finite loss or gradient" in caplog.text
    assert "img-" in caplog.text or "vid-" in caplog.text  # the sample ids are named
    s1 = load_file(str(tmp_path / "a/step-1/learned.safetensors"))
    s2 = load_file(str(tmp_path / "a/step-2/learned.safetensors"))
    assert all(torch.equal(s1[k], s2[k]) for k in s1), "a non-finite step must not change the weights"
    assert torch.isfinite(torch.tensor(result.losses[-1]))

    poisoned.steps = set(range(100))
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        train(stage_cfg("decode-align", sample_data, tmp_path / "b", max_steps=10, max_nonfinite_steps=3))


def test_keep_last_and_keep_best_retention(sample_data, tmp_path):
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=6, save_every=1, keep_last=2, keep_best=True))
    best = json.loads((tmp_path / "best.json").read_text())["checkpoint"]
    kept = sorted(p.name for p in tmp_path.glob("step-*"))
    assert {"step-5", "step-6", best} == set(kept)
    metrics = {p.name: json.loads((p / "mmllm.json").read_text())["metric"] for p in tmp_path.glob("step-*")}
    assert metrics[best] == min(metrics.values())


def test_unwritable_output_dir_is_reported_before_training(sample_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot write to output_dir"):
        train(stage_cfg("decode-align", sample_data, blocker / "run"))


def test_an_output_dir_blocked_by_a_file_is_not_told_to_fix_permissions_or_free_space(tmp_path):
    """output_dir under a file (or a file itself) said "[Errno 20] Not a directory ...; fix permissions or free
    space", advice that fits neither."""
    from mmllm.training.loop import check_output_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for out_dir in (blocker / "run", blocker):
        with pytest.raises(OSError, match="cannot write to output_dir") as raised:
            check_output_dir(out_dir)
        assert "a file stands where a folder of that path goes" in str(raised.value), raised.value
        assert "free space" not in str(raised.value)


def test_stray_folders_and_bare_manifests_do_not_pass_for_checkpoints(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "step-3")
    (tmp_path / "step-final-backup").mkdir()
    (tmp_path / "step-9.bak").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-3"
    ckpt.prune_checkpoints(tmp_path, keep_last=1)  # must not trip over the strays
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text(json.dumps({"format_version": 1, "files": {}}))
    with pytest.raises(ckpt.CheckpointError, match="does not list mmllm.json"):
        ckpt.verify_manifest(bare)


def test_resume_past_max_steps_is_refused_and_at_max_steps_trains_nothing(sample_data, tmp_path, monkeypatch):
    done = train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=4, save_every=2))
    final = json.loads((tmp_path / "final.json").read_text())
    assert final == {"checkpoint": "step-4"}
    built = []
    monkeypatch.setattr("mmllm.training.loop.build_model", lambda *a, **k: built.append(1))
    with pytest.raises(ConfigError, match=r"step-4, past max_steps=3; set max_steps to more than 4"):
        train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=3), resume=True)
    assert not built  # refused before anything loads
    assert json.loads((tmp_path / "final.json").read_text()) == final
    monkeypatch.undo()
    again = train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=4), resume=True)
    assert again.final_checkpoint == tmp_path / "step-4" and again.losses == done.losses


def _lr_and_decay(checkpoint):
    groups = torch.load(checkpoint / "training_state/optimizer.pt", weights_only=True)["param_groups"]
    base = torch.load(checkpoint / "training_state/scheduler.pt", weights_only=True)["base_lrs"]
    return base, [(g["lr"], g["weight_decay"]) for g in groups]


def test_resume_uses_a_changed_lr_and_weight_decay_and_says_so(sample_data, tmp_path, caplog):
    """The restored optimizer state and scheduler hold the checkpoint's hyperparameters; a resumed run
    that sets others used to train on with the old ones silently (its checkpoints recording the new)."""
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=2, save_every=1))
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=4, **{"optim.lr": 0.5,
                    "optim.weight_decay": 0.1, "schedule.decay": "constant"}), resume=True)
    base, groups = _lr_and_decay(tmp_path / "step-4")
    assert base == [0.5] and groups == [(0.5, 0.1)]
    assert "optim.lr: 0.01 -> 0.5" in caplog.text and "optim.weight_decay: 0.0 -> 0.1" in caplog.text
    assert "the learning rate of step 3 is 0.5" in caplog.text


@pytest.mark.parametrize(("override", "named"), [("optim.name=sgd", "optim.name: adamw"),
                                                 ("trainable.input_projections=true", "trainable.input_projections"),
                                                 ("assembly.llm.seed=5", "llm.seed: 0"),
                                                 ("stage=encode-align", "stage: decode-align")])
def test_resume_refuses_what_the_saved_state_cannot_continue(override, named, sample_data, tmp_path, monkeypatch):
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=1))
    built = []
    monkeypatch.setattr("mmllm.training.loop.build_model", lambda *a, **k: built.append(1))
    key, value = override.split("=")
    cfg = (stage_cfg(value, sample_data, tmp_path, max_steps=2) if key == "stage"
           else stage_cfg("decode-align", sample_data, tmp_path, max_steps=2, **{key: value}))
    with pytest.raises(ConfigError, match=f"cannot continue this run: .*{named}"):
        train(cfg, resume=True)
    assert not built  # refused before anything loads


def _step_samples(sampler, step: int, batch: int, accum: int, world: int) -> list[tuple[int, int]]:
    """Every sample step ``step`` reads, on every process, sorted: what decides the step's update."""
    return sorted(s for micro in range(accum) for rank in range(world)
                  for s in sampler.micro_batch(step, micro, accum, rank, world, batch))


@pytest.mark.parametrize("grouped", [False, True])
def test_resume_warns_of_other_samples_exactly_when_the_sampler_draws_other_ones(grouped, sample_data, tmp_path,
                                                                                caplog):
    """batch_size 4 -> 2 with grad_accum 1 -> 2 was warned about as reading other samples, though an ungrouped
    step reads the same 4 draws of the seeded order however they are split into micro-batches. The warning now
    follows the sampler: each case is checked against the samples the stage's sampler gives the next step."""
    from mmllm.data.dataset import LengthGroupedSampler, MixtureSampler

    flag = {"group_by_length": "true"} if grouped else {}
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=1, **flag))
    sizes = ckpt.read_progress(tmp_path / "step-1")["samples"]
    base = MixtureSampler(sizes, [1.0], 0)
    sampler = LengthGroupedSampler(base, lambda d, i: (i * 7) % 5) if grouped else base
    saved = _step_samples(sampler, 1, 4, 1, 1)
    for batch, accum, world in [(2, 2, 1), (4, 2, 1), (2, 1, 1), (2, 1, 2), (1, 2, 2), (1, 4, 1)]:
        caplog.clear()
        caplog.set_level(logging.INFO)
        cfg = stage_cfg("decode-align", sample_data, tmp_path, max_steps=2, batch_size=batch, grad_accum=accum,
                        **flag)
        check_resume(cfg, tmp_path / "step-1", world, sizes)
        other = _step_samples(sampler, 1, batch, accum, world) != saved
        assert ("reads other samples" in caplog.text) == other, (batch, accum, world, caplog.text)
        assert ("each step reads the same samples" in caplog.text) == (not other)
    # ungrouped, only the samples per step decide; grouped, the sorted chunks' micro-batch size and the
    # micro-batches per step both do (checked here so that the loop above is not vacuous)
    assert (_step_samples(sampler, 1, 2, 2, 1) == saved) is not grouped
    assert _step_samples(sampler, 1, 2, 1, 2) == saved


def test_resume_warns_when_it_reads_other_samples_than_the_interrupted_run(sample_data, tmp_path, caplog):
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=1))
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=2), resume=True)
    assert "reads other samples" not in caplog.text and "learning rate of step" not in caplog.text
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=3, seed=4, batch_size=2), resume=True)
    assert "seed: 0 -> 4" in caplog.text and "4 x 1 x 1 -> 2 x 1 x 1" in caplog.text
    assert "from step 3 it reads other samples" in caplog.text
    assert "eval_data differs" not in caplog.text
    held_out = f"[{{path: {sample_data['pairs']}, format: mmllm-pairs}}]"
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=4, seed=4, batch_size=2, eval_data=held_out),
          resume=True)
    assert "eval_data differs from the interrupted run's: validation scores from step 4 on" in caplog.text


def test_resume_warns_when_the_lora_dropout_changed(sample_data, tmp_path, caplog):
    """Another LoRA dropout draws other masks from the restored generators: like other samples, the resumed
    run no longer ends where an uninterrupted one does, and says so."""
    train(stage_cfg("instruct", sample_data, tmp_path, max_steps=1))
    lora = tmp_path / "lora.yaml"
    lora.write_text((REPO / "configs/lora/tiny.yaml").read_text().replace("dropout: 0.0", "dropout: 0.2"))
    train(stage_cfg("instruct", sample_data, tmp_path, max_steps=2, lora=lora), resume=True)
    assert "LoRA dropout 0.0 (checkpoint) -> 0.2" in caplog.text and "from step 2 it draws other" in caplog.text


def test_a_run_without_resume_refuses_an_output_dir_holding_checkpoints(sample_data, tmp_path):
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=1))
    with pytest.raises(ConfigError, match=r"already holds checkpoints of a run \(step-1\); pass --resume"):
        train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=1))


def test_keep_last_keeps_the_checkpoint_just_saved_when_a_later_step_is_corrupt(sample_data, tmp_path):
    """A corrupt newest checkpoint makes --resume go back to an older one; the later step's folder must
    not count as 'newest' for keep_last, which used to delete each checkpoint the resumed run saved."""
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=4, save_every=1, keep_last=0))
    (tmp_path / "step-4" / "learned.safetensors").write_bytes(b"truncated")
    shutil.rmtree(tmp_path / "step-3")
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=3, keep_last=1), resume=True)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-3"
    assert not (tmp_path / "step-2").exists()


def test_best_json_takes_the_metric_of_a_checkpoint_saved_again_over_its_best(tmp_path):
    """A run resumed behind a corrupt newest checkpoint saves that step again: best.json's metric for it
    described the replaced folder, and a worse later one could never displace it."""
    for name in ("step-2", "step-3"):
        (tmp_path / name).mkdir()
    ckpt.record_best(tmp_path, tmp_path / "step-2", 1.0, enabled=True)
    ckpt.record_best(tmp_path, tmp_path / "step-3", 2.0, enabled=True)
    assert json.loads((tmp_path / "best.json").read_text())["checkpoint"] == "step-2"
    ckpt.record_best(tmp_path, tmp_path / "step-2", 5.0, enabled=True)  # step-2 written again
    assert json.loads((tmp_path / "best.json").read_text())["metric"] == 5.0
    ckpt.record_best(tmp_path, tmp_path / "step-3", 4.0, enabled=True)
    assert json.loads((tmp_path / "best.json").read_text())["checkpoint"] == "step-3"
    ckpt.record_best(tmp_path, tmp_path / "step-3", float("inf"), enabled=True)  # saved again, unscored
    assert not (tmp_path / "best.json").exists()


def test_ctrl_c_saves_the_step_under_way_and_the_resumed_run_ends_where_an_uninterrupted_one_does(
        sample_data, tmp_path, monkeypatch):
    """SIGINT (or SIGTERM) mid-step used to raise KeyboardInterrupt from wherever the step was, losing every
    step since the last checkpoint; now the step finishes, is saved, and the run stops saying how to go on."""
    full = train(stage_cfg("instruct", sample_data, tmp_path / "full", max_steps=5))
    sigint_during_step(monkeypatch, 2)
    cut = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGINT after step 3 of 5; saved .*step-3\. Continue "
                                                  r"with the same command and --resume") as stopped:
        train(stage_cfg("instruct", sample_data, cut, max_steps=5))
    assert stopped.value.exit_code == 130
    assert [p.name for p in ckpt.step_dirs(cut)] == ["step-3"]
    monkeypatch.undo()
    resumed = train(stage_cfg("instruct", sample_data, cut, max_steps=5), resume=True)
    assert resumed.losses == full.losses
    for name in ("learned.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = load_file(str(full.final_checkpoint / name)), load_file(str(resumed.final_checkpoint / name))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_a_second_signal_stops_at_once_and_one_before_training_too(monkeypatch):
    monkeypatch.setattr(interrupt, "REPEAT_S", 0.0)
    with interrupt.StopRequests() as stop:
        with pytest.raises(KeyboardInterrupt):  # the model still loading: nothing to save yet
            os.kill(os.getpid(), signal.SIGTERM)
        stop.armed = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_every_process_stops_with_the_signal_another_process_got():
    """A process that got no signal stopped as "a signal on another process" and exited 143 (SIGTERM's) even
    when the signal was SIGINT (130); with two different signals, all take the highest-numbered."""

    class TwoProcesses:  # what Accelerator.gather returns: each process's value, this one first
        num_processes, device = 2, torch.device("cpu")

        def __init__(self, other: int):
            self.other = other

        def gather(self, t):
            return torch.cat([t, torch.tensor([self.other])])

    stop = interrupt.StopRequests()
    assert stop.requested(TwoProcesses(0)) is None
    assert stop.requested(TwoProcesses(int(signal.SIGINT))) == "SIGINT"
    stop.name = "SIGINT"
    assert stop.requested(TwoProcesses(int(signal.SIGTERM))) == "SIGTERM"


def test_a_checkpoint_that_cannot_be_written_is_one_clear_error(sample_data, tmp_path):
    """A full disk (here: a file-size limit, which fails the write the same way) used to end training with
    a safetensors or torch traceback; now one line names the checkpoint, what is intact, and what to do."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # a tiny checkpoint's files are larger

    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited: the write fails instead of killing
    try:
        proc = subprocess.run(_cli(sample_data, tmp_path / "run", "max_steps=1"), cwd=REPO, capture_output=True,
                              text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), preexec_fn=limit_file_size)
    finally:
        signal.signal(signal.SIGXFSZ, previous)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not write the checkpoint" in proc.stderr and "then continue with --resume" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # no half-written folder left, nor the empty output_dir the run made


def test_resume_needs_no_init_from_any_more(sample_data, tmp_path, caplog):
    """A later stage's run continues from its own checkpoint, which records the assembly and adapter that
    init_from gave it; the previous stage's checkpoint may since have been pruned (keep_last) or moved.
    Resume used to refuse: 'init_from ...: checkpoint directory not found'."""
    first = train(stage_cfg("decode-align", sample_data, tmp_path / "decode", max_steps=1)).final_checkpoint
    cfg = stage_cfg("instruct", sample_data, tmp_path / "full", max_steps=3, save_every=1, keep_last=0,
                    init_from=first)
    full = train(cfg)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "step-3")
    shutil.rmtree(tmp_path / "decode")
    caplog.clear()  # the resumed run's log only (a CLI test earlier in the session leaves mmllm at INFO)
    with caplog.at_level("INFO", logger="mmllm"):
        resumed = train(dataclasses.replace(cfg, output_dir=str(cut)), resume=True)
    assert f"rebuilding the model from the checkpoint --resume continues, {cut / 'step-2'}" in caplog.text
    assert "initialising from" not in caplog.text  # the log named step-2 as if the stage started from it
    assert resumed.losses == full.losses
    for name in ("learned.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = load_file(str(full.final_checkpoint / name)), load_file(str(resumed.final_checkpoint / name))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_resume_removes_what_a_kill_during_a_checkpoint_write_left(sample_data, tmp_path):
    """kill -9 mid-write leaves atomic_dir's working folder (a partial checkpoint); nothing removed them,
    so every killed write of a large checkpoint stayed on disk."""
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=1))
    for name in (".step-2.tmp-4242-1796432531279301283", ".step-1.old-1796432531279301283"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "learned.safetensors").write_bytes(b"partial")
    train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=2), resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.json", "step-1", "step-2"]


def test_a_kill_between_atomic_dirs_renames_loses_no_checkpoint(sample_data, tmp_path, caplog):
    """Saving a step again over itself renames step-N aside, then its replacement in. A kill -9 between the two
    renames left step-N only as .step-N.old-* and .step-N.tmp-*, and --resume deleted both (and resumed from
    an older step)."""
    full = train(stage_cfg("decode-align", sample_data, tmp_path / "full", max_steps=3, save_every=1, keep_last=0))
    cut = tmp_path / "cut"
    train(stage_cfg("decode-align", sample_data, cut, max_steps=2, save_every=1, keep_last=0))
    (cut / "step-2").rename(cut / ".step-2.old-1796432531279301283")  # the first rename done ...
    shutil.copytree(cut / ".step-2.old-1796432531279301283", cut / ".step-2.tmp-4242-1796432531279301299")
    (cut / ".step-2.old-1796432531279301283" / "learned.safetensors").write_bytes(b"not the one to restore")
    (cut / ".step-2.tmp-4243-1796432531279301300").mkdir()  # ... and a later, half-written attempt
    caplog.clear()
    with caplog.at_level("INFO", logger="mmllm"):
        resumed = train(stage_cfg("decode-align", sample_data, cut, max_steps=3, save_every=1, keep_last=0), resume=True)
    assert "restored step-2" in caplog.text and f"resumed from {cut / 'step-2'} at step 2" in caplog.text
    assert sorted(p.name for p in cut.iterdir()) == ["final.json", "step-1", "step-2", "step-3"]
    assert resumed.losses == full.losses
    wa, wb = load_file(str(full.final_checkpoint / "learned.safetensors")), load_file(str(cut / "step-3/learned.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_recovery_puts_back_the_replaced_checkpoint_when_its_replacement_is_incomplete(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / ".step-4.old-17")
    (tmp_path / ".step-4.tmp-1-18").mkdir()  # killed while filling the replacement, before any rename
    with pytest.raises(ConfigError, match=r"killed while saving \(\.step-4\.old-17, complete\); pass --resume"):
        check_fresh_output_dir(tmp_path)  # a fresh run would not see it, and a later --resume would mix the two
    tiny_model.save_pretrained(tmp_path / "step-2")
    (tmp_path / ".step-2.old-16").mkdir()  # step-2 exists: an original its replacement already replaced
    restored, removed = ckpt.recover_partial_writes(tmp_path)
    assert restored == [tmp_path / "step-4"] and removed == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-4"]
    AnyToAnyModel.from_pretrained(tmp_path / "step-4")


def test_a_failed_rename_into_place_puts_the_replaced_checkpoint_back(tiny_model, tmp_path, monkeypatch):
    target = tmp_path / "step-1"
    tiny_model.save_pretrained(target)
    before = (target / "learned.safetensors").read_bytes()
    real_rename = type(target).rename

    def rename(self, to):
        if self.name.startswith(".step-1.tmp-"):
            raise OSError(28, "No space left on device")
        return real_rename(self, to)

    monkeypatch.setattr(type(target), "rename", rename)
    with pytest.raises(OSError, match="No space"):
        ckpt.atomic_dir(target, lambda tmp: (tmp / "learned.safetensors").write_bytes(b"the replacement"))
    assert (target / "learned.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]


def test_init_from_a_step_its_run_went_past_is_named(sample_data, tmp_path, caplog):
    """Stage chaining from a middle checkpoint (a typo, or the previous stage still training) was silent."""
    first = tmp_path / "decode"
    train(stage_cfg("decode-align", sample_data, first, max_steps=2, save_every=1, keep_last=0))
    train(stage_cfg("instruct", sample_data, tmp_path / "a", max_steps=1, init_from=first / "step-2"))
    assert not [r for r in caplog.records if r.levelname == "WARNING" and r.getMessage().startswith("init_from")]
    train(stage_cfg("instruct", sample_data, tmp_path / "b", max_steps=1, init_from=first / "step-1"))
    assert "its run went on and finished on step-2 (final.json)" in caplog.text
    (first / "final.json").unlink()  # as while that stage still trains
    train(stage_cfg("instruct", sample_data, tmp_path / "c", max_steps=1, init_from=first / "step-1"))
    assert "its run has not finished (no final.json beside it; newest checkpoint step-2)" in caplog.text


def test_the_fp16_loss_scale_is_saved_and_resumed(sample_data, tmp_path):
    """Under fp16 (GPUs) the gradient scaler settles on a loss scale over many steps; a resumed run must go on
    from it, not from the initial scale. Accelerate gives a scaler only on GPUs, so one is put in here: it
    scales the loss and unscales the gradients exactly as there (its scale doubles at every step here)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def fp16_scaled() -> Accelerator:
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
        return accelerator

    full = train(stage_cfg("decode-align", sample_data, tmp_path / "full", max_steps=4, save_every=2),
                 accelerator=fp16_scaled())
    scale = ckpt.read_progress(full.final_checkpoint)["grad_scaler"]["scale"]
    assert scale == 2.0**12  # four steps, none overflowed
    train(stage_cfg("decode-align", sample_data, tmp_path / "cut", max_steps=2, save_every=2),
          accelerator=fp16_scaled())
    resumed = train(stage_cfg("decode-align", sample_data, tmp_path / "cut", max_steps=4, save_every=2),
                    resume=True, accelerator=fp16_scaled())
    assert ckpt.read_progress(resumed.final_checkpoint)["grad_scaler"]["scale"] == scale
    assert resumed.losses == full.losses


def test_a_stop_request_during_a_save_stops_on_that_checkpoint(sample_data, tmp_path, monkeypatch):
    """SIGTERM while step 2's save_every checkpoint is written (a large model's save can take minutes):
    that checkpoint is the step under way, so training stops on it instead of training and saving step 3
    first, which a scheduler's grace period may not cover."""
    from mmllm.training import loop

    calls = signal_on_call(monkeypatch, loop, "save", 1, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(stage_cfg("encode-align", sample_data, tmp_path, max_steps=6, save_every=2))
    assert (stopped.value.step, stopped.value.exit_code, len(calls)) == (2, 143, 1)
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-2"]


def test_recovery_replaces_a_corrupt_step_with_its_complete_replacement(tiny_model, tmp_path):
    """A run resumed behind a corrupt step-N saves that step again; a kill after the replacement was complete
    but before atomic_dir's first rename left the corrupt step-N beside it, and --resume deleted the
    replacement (the only good copy) and went back behind step N once more."""
    tiny_model.save_pretrained(tmp_path / "step-1")
    tiny_model.save_pretrained(tmp_path / "step-3")
    (tmp_path / "step-3" / "learned.safetensors").write_bytes(b"bit rot")
    tiny_model.save_pretrained(tmp_path / ".step-3.tmp-7-19")
    good = (tmp_path / ".step-3.tmp-7-19" / "learned.safetensors").read_bytes()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-1"
    restored, removed = ckpt.recover_partial_writes(tmp_path)
    assert restored == [tmp_path / "step-3"] and removed == 1  # the corrupt one, set aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1", "step-3"]
    assert (tmp_path / "step-3" / "learned.safetensors").read_bytes() == good
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-3"
    tiny_model.save_pretrained(tmp_path / ".step-3.tmp-7-20")  # beside a complete step-N: the one there stays
    assert ckpt.recover_partial_writes(tmp_path) == ([], 1)
    assert (tmp_path / "step-3" / "learned.safetensors").read_bytes() == good


def test_resume_with_another_max_steps_warns_only_where_the_schedule_reads_it(sample_data, tmp_path, caplog):
    """max_steps spreads a decay; a constant schedule (with or without warmup) never reads it, yet a longer
    constant run resumed with a warning that its learning rate was recomputed."""
    constant = {"schedule.decay": "constant", "schedule.warmup_steps": 1}
    train(stage_cfg("decode-align", sample_data, tmp_path / "constant", max_steps=1, **constant))
    with caplog.at_level("INFO", logger="mmllm"):
        train(stage_cfg("decode-align", sample_data, tmp_path / "constant", max_steps=2, **constant), resume=True)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert not any("max_steps" in m for m in warned), warned
    assert "max_steps: 1 -> 2; the schedule is constant" in caplog.text
    caplog.clear()
    train(stage_cfg("decode-align", sample_data, tmp_path / "cosine", max_steps=1))
    train(stage_cfg("decode-align", sample_data, tmp_path / "cosine", max_steps=2), resume=True)
    assert "max_steps: 1 -> 2. The resumed run uses the new values" in caplog.text


def test_init_from_an_instruct_checkpoint_for_a_stage_without_lora_says_the_adapter_stays_frozen(
        sample_data, tmp_path, caplog):
    """decode-align from an instruct (LoRA) checkpoint trained on the adapted core without a word."""
    instruct = train(stage_cfg("instruct", sample_data, tmp_path / "instruct", max_steps=1)).final_checkpoint
    caplog.clear()
    train(stage_cfg("decode-align", sample_data, tmp_path / "plain", max_steps=1))
    train(stage_cfg("instruct", sample_data, tmp_path / "again", max_steps=1, init_from=instruct))
    assert "carries a LoRA adapter" not in caplog.text  # no adapter, or a stage that trains it
    realigned = train(stage_cfg("decode-align", sample_data, tmp_path / "realign", max_steps=1, init_from=instruct))
    assert (f"init_from {instruct} carries a LoRA adapter (trained by instruct), which stage decode-align does not "
            "train: it stays on, frozen") in caplog.text
    saved = load_file(str(realigned.final_checkpoint / "adapter/adapter_model.safetensors"))
    before = load_file(str(instruct / "adapter/adapter_model.safetensors"))
    assert all(torch.equal(saved[k], before[k]) for k in before)  # frozen, as the warning says


def test_a_non_finite_gradient_in_any_parameter_fails_the_finite_check():
    """The check reads every gradient in one reduction; a single inf or NaN anywhere, or a non-finite loss,
    fails it, and parameters without a gradient are passed over."""
    from accelerate import Accelerator

    from mmllm.training.loop import _all_finite

    accelerator = Accelerator(cpu=True)
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    for p in params[:3]:
        p.grad = torch.ones(3)
    assert _all_finite(accelerator, 1.0, params)
    assert not _all_finite(accelerator, float("nan"), params)
    for bad in (float("inf"), float("nan")):
        params[2].grad = torch.tensor([1.0, bad, 1.0])
        assert not _all_finite(accelerator, 1.0, params)
    assert _all_finite(accelerator, 1.0, [])


def _poison(path, name_part, value):
    """Write ``value`` into one entry of the first tensor of the safetensors file ``path`` whose name holds
    ``name_part``, as a diverged run would have saved it; returns that tensor's name and size."""
    from safetensors.torch import save_file

    state = load_file(str(path))
    name = next(k for k in state if name_part in k and state[k].is_floating_point())
    state[name].view(-1)[0] = value
    state[name].view(-1)[-1] = value
    save_file(state, str(path), metadata={"format": "pt"})
    return name, state[name].numel()


@pytest.mark.parametrize(("where", "value"), [("learned", float("nan")), ("adapter", float("inf"))])
def test_learned_weights_holding_nan_or_inf_are_refused_at_load(tiny_model, tmp_path, where, value):
    """They loaded without a word and every output of the model was garbage."""
    from mmllm.config import LoraConfig

    tiny_model.add_lora(LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    good = tiny_model.save_pretrained(tmp_path / "good")
    AnyToAnyModel.from_pretrained(good)  # the same checkpoint with finite weights loads
    bad = shutil.copytree(good, tmp_path / "run" / "step-2")
    path = bad / ("learned.safetensors" if where == "learned" else "adapter/adapter_model.safetensors")
    name, total = _poison(path, "output_projections" if where == "learned" else "lora_A", value)
    ckpt.write_manifest(bad)  # a checkpoint as written, not a corrupted file
    says = rf"{path}: 1 tensor\(s\) hold NaN or inf: {re.escape(name)} \(2 of {total} values\).*diverged.*earlier checkpoint"
    with pytest.raises(ckpt.CheckpointError, match=says):
        AnyToAnyModel.from_pretrained(bad)
    with pytest.raises(ckpt.CheckpointError, match=says):  # --resume's path: into the model training built
        ckpt.load_learned_into(tiny_model, bad)
    if where == "learned":  # the model's own loader, for a state dict from anywhere
        state = load_file(str(path))
        with pytest.raises(ckpt.CheckpointError, match=rf"somewhere: 1 tensor\(s\) hold NaN or inf: {re.escape(name)}"):
            tiny_model.load_learned_state_dict(state, "somewhere")


def test_weights_holding_nan_are_not_saved_and_leave_the_earlier_checkpoints(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "step-1")
    param = next(iter(tiny_model.output_projections.parameters()))
    with torch.no_grad():
        param.view(-1)[3] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to write the checkpoint .*step-2: the learned weights "
                       r"have diverged, 1 tensor\(s\) hold NaN or inf: output_projections\..* \(1 of \d+ values\); "
                       r"nothing of it was written and the checkpoints already there \(step-1\) are untouched"):
        tiny_model.save_pretrained(tmp_path / "step-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


def test_a_run_whose_weights_diverge_with_finite_gradients_writes_no_checkpoint_of_them(sample_data, tmp_path):
    """The non-finite-step guard reads the loss and gradients; the optimizer can still make weights NaN from finite
    ones (here AdamW with eps=0: a parameter whose gradient is 0 gets 0/0; an update past float32's range does
    too), and they were saved as the step's checkpoint, which inference then loaded."""
    cfg = stage_cfg("decode-align", sample_data, tmp_path / "run", max_steps=2, save_every=1, keep_last=0,
                    **{"optim.eps": 0.0})
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to write the checkpoint .*step-1: the learned weights "
                       r"have diverged, .* hold NaN or inf: .*Lower optim.lr"):
        train(cfg)
    assert ckpt.step_dirs(tmp_path / "run") == []


def test_an_export_to_float16_refuses_values_past_its_range(tiny_model, tmp_path):
    """float16 holds values up to 65504: the export cast larger ones to inf and wrote them."""
    param = next(iter(tiny_model.input_projections.parameters()))
    with torch.no_grad():
        param.view(-1)[0] = 1e6
    saved = tiny_model.save_pretrained(tmp_path / "step-1")
    with pytest.raises(ckpt.CheckpointError, match=r"learned.safetensors: --dtype float16 cannot hold its values: "
                       r"cast, 1 tensor\(s\) hold NaN or inf: input_projections\..* \(1 of \d+ values\); export with "
                       r"--dtype bfloat16 or float32"):
        ckpt.export_weights_only(saved, tmp_path / "ship", dtype="float16")
    assert not (tmp_path / "ship").exists()
    AnyToAnyModel.from_pretrained(ckpt.export_weights_only(saved, tmp_path / "ship", dtype="bfloat16"))


def _out_of_memory_in_step(monkeypatch, step: int) -> None:
    """Training step ``step``'s forward (0-based, as the loop counts) raises torch's out-of-memory error."""
    real_forward = AnyToAnyModel.forward

    def forward(self, batch, losses=None, normalizers=None):
        if self.training and batch.get("step") == step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.11 GiB\nIf reserved but unallocated memory is large ...")
        return real_forward(self, batch, losses, normalizers)

    monkeypatch.setattr(AnyToAnyModel, "forward", forward)


def _allocate_more_than_the_machine_has() -> None:
    """torch's CPU allocator failing: a plain RuntimeError ("[enforce fail at alloc_cpu.cpp:...] ...
    DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes. Error code 12"), raised by torch."""
    torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: beyond any machine's address space, refused at once


def test_the_cpu_allocator_running_out_in_a_step_is_out_of_memory_not_a_fault(sample_data, tmp_path, monkeypatch,
                                                                              capsys):
    """On CPU, torch's allocator raises a plain RuntimeError, not torch.OutOfMemoryError: `mmllm train` ended with
    exit code 70 and the traceback, blaming mmllm, where a GPU's out-of-memory error gives one line, exit code 2,
    the step, the checkpoint kept and the settings that need less."""
    real_forward = AnyToAnyModel.forward

    def forward(self, batch, losses=None, normalizers=None):
        if self.training and batch.get("step") == 1:
            _allocate_more_than_the_machine_has()
        return real_forward(self, batch, losses, normalizers)

    monkeypatch.setattr(AnyToAnyModel, "forward", forward)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["mmllm", "train", "--config", str(REPO / "configs/stages/tiny/encode_align.yaml"),
                                      "report_to=none", "max_steps=3", "save_every=1", "keep_last=0",
                                      f"output_dir={out}"])
    with pytest.raises(SystemExit) as done:
        entry()
    err = capsys.readouterr().err
    assert done.value.code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in err and "unexpected error" not in err, err[-3000:]
    assert re.search(r"stage encode-align ran out of memory at step 2 of 3, in the forward and backward \(.*"
                     r"DefaultCPUAllocator: can't allocate memory: you tried to allocate \d+ bytes.*\); the newest "
                     rf"checkpoint, {re.escape(str(out))}/step-1, is intact: the same command with --resume", errors[0])
    assert "grad_checkpointing=true" in errors[0]
    assert_no_gpu_remedy(errors[0])


# what an out-of-memory message may name only where a GPU's memory ran out: sharding among GPUs, another GPU, and
# CPU autocast (it holds bfloat16 copies of the weights beside them: docs/distributed.md, Measurements)
GPU_ONLY_REMEDIES = ("FSDP", "ZeRO", "GPU", "mixed_precision=bf16")


def assert_no_gpu_remedy(advice: str) -> None:
    found = [remedy for remedy in GPU_ONLY_REMEDIES if remedy in advice]
    assert not found, f"the machine's memory ran out, yet the advice names {found}: {advice}"


def test_the_cpu_allocator_running_out_while_the_model_is_built_advises_no_gpu(sample_data, tmp_path, monkeypatch,
                                                                               capsys):
    """Out of the machine's memory (torch's CPU allocator), training advised the remedies of a GPU's: FSDP over
    several GPUs, and, with nothing else left, a GPU with more memory."""
    def built(*args, **kwargs):
        _allocate_more_than_the_machine_has()

    monkeypatch.setattr(loop, "build_model", built)
    argv = ["train", "--config", str(REPO / "configs/stages/tiny/encode_align.yaml"), f"output_dir={tmp_path / 'run'}",
            "report_to=none", f"data=[{{path: {sample_data['pairs']}, format: mmllm-pairs}}]",
            f"cache.dir={tmp_path / 'c'}"]
    for require, advice in (("false", "cache.require=true"), ("true", "none left in this config: a machine with "
                                                                      "more memory")):
        assert main([*argv, f"cache.require={require}"]) == 2
        line = [ln for ln in capsys.readouterr().err.splitlines() if " ERROR " in ln][0]
        assert "ran out of memory before the first step, in building and placing the model (" in line
        assert "DefaultCPUAllocator: can't allocate memory" in line and advice in line
        assert_no_gpu_remedy(line)


def test_out_of_memory_advice_for_the_machines_memory_keeps_what_needs_less_of_it(sample_data, tmp_path):
    """Each setting advised for a GPU's memory that needs less of the machine's too is kept for it: a smaller
    batch, gradient checkpointing, the feature cache, a bfloat16 core; the GPU's wording is unchanged."""
    from mmllm.training.out_of_memory import STEP, RunShape, ways_to_need_less

    plain = stage_cfg("instruct", sample_data, tmp_path / "a", batch_size=6, grad_accum=2)
    for sharding in ("none", "zero", "fsdp"):
        shape = RunShape(2, "no", sharding, torch.float32)
        host = ways_to_need_less(plain, shape, STEP, host=True)
        assert host == [w for w in ways_to_need_less(plain, shape, STEP)
                        if not w.startswith(("mixed_precision=", "FSDP"))]
        assert len(host) == 4 and host[-1].startswith("llm.dtype: bfloat16 in the assembly")
        assert_no_gpu_remedy("; ".join(host))
    lean = stage_cfg("instruct", sample_data, tmp_path / "b", batch_size=1, grad_checkpointing="true",
                     **{"cache.dir": str(tmp_path / "c"), "cache.require": "true"})
    assert ways_to_need_less(lean, RunShape(1, "no", "none", torch.bfloat16), STEP, host=True) == [
        "none left in this config: a machine with more memory, or shorter samples (the assembly's max_length, in a "
        "new output_dir)"]


def _suggested_overrides(advice: str) -> list[str]:
    """The stage overrides an out-of-memory message suggests (``key=value``), ``llm.dtype: X`` as the assembly's."""
    found = re.findall(r"(?<![\w.-])([a-z_]+(?:\.[a-z_]+)*=[\w/]+)", advice)
    found += [f"assembly.llm.dtype={dtype}" for dtype in re.findall(r"llm\.dtype: (\w+)", advice)]
    return list(dict.fromkeys(found))


def test_out_of_memory_in_a_step_is_one_line_naming_the_step_the_checkpoint_kept_and_what_needs_less(
        sample_data, tmp_path, monkeypatch, capsys):
    """torch.OutOfMemoryError in a step used to end `mmllm train` with torch's traceback (exit code 1), saying
    neither which step nor what to change; now one line (exit code 2) names the stage, the step, the intact
    checkpoint, --resume, and this config's settings that need less memory; the resumed run, once memory fits,
    ends where an uninterrupted one does."""
    overrides = ["report_to=none", "init_from=null", "max_steps=5", "save_every=1", "keep_last=0",
                 f"data=[{{path: {sample_data['chat']}, format: mmllm-chat}}]"]
    config = str(REPO / "configs/stages/tiny/instruct.yaml")
    _out_of_memory_in_step(monkeypatch, 2)
    cut = tmp_path / "cut"
    assert main(["train", "--config", config, f"output_dir={cut}", *overrides]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    line = errors[0]
    assert f"stage instruct ran out of memory at step 3 of 5, in the forward and backward (CUDA out of memory. " \
           f"Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB); the newest checkpoint, " \
           f"{cut}/step-2, is intact: the same command with --resume goes on from it" in line
    for setting in ("batch_size=2 grad_accum=2 (the same 4 samples per optimizer step)", "grad_checkpointing=true",
                    "mixed_precision=bf16", "cache.require=true", "FSDP over several GPUs, which shards the frozen "
                    "core (accelerate launch --config_file configs/accelerate/fsdp.yaml)"):
        assert setting in line
    # the tiny core (tiny-llama) has no dtype option: `llm.dtype: bfloat16` was advised, and refused when given
    assert "llm.dtype" not in line
    suggested = _suggested_overrides(line)
    assert "batch_size=2" in suggested and "cache.require=true" in suggested
    assert main(["config", "--config", config, f"output_dir={cut}", *overrides, *suggested]) == 0  # each one taken
    assert "If reserved but unallocated" not in line  # torch's allocator advice stays in the traceback (-v)
    assert [p.name for p in ckpt.step_dirs(cut)] == ["step-1", "step-2"]
    for step_dir in ckpt.step_dirs(cut):
        ckpt.verify_manifest(step_dir)
    monkeypatch.undo()
    resumed = train(load_stage(config, [f"output_dir={cut}", *overrides]), resume=True)
    full = train(load_stage(config, [f"output_dir={tmp_path / 'full'}", *overrides]))
    assert resumed.losses == full.losses


@pytest.mark.parametrize("assembly, dtype_said", [(None, False), ("configs/assemblies/default.yaml", True)])
def test_out_of_memory_before_the_first_step_advises_what_this_stage_can_set(assembly, dtype_said, sample_data,
                                                                               tmp_path, monkeypatch, capsys):
    """Running out of memory while the model was built advised `llm.dtype: bfloat16` whatever the core, an option
    the tiny core (tiny-llama) does not have, and `cache.require=true` to a stage that had it on already. Now
    training's own advice (not the CLI's second reading of the config): settings that hold less of the model only."""
    def built(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB.")

    monkeypatch.setattr(loop, "build_model", built)
    config = str(REPO / "configs/stages/tiny/encode_align.yaml")
    argv = ["train", "--config", config, f"output_dir={tmp_path / 'run'}", "report_to=none",
            f"data=[{{path: {sample_data['pairs']}, format: mmllm-pairs}}]"]
    argv += [f"assembly={REPO / assembly}"] if assembly else []
    for require in ("false", "true"):
        assert main([*argv, f"cache.require={require}", f"cache.dir={tmp_path / 'c'}"]) == 2
        line = [ln for ln in capsys.readouterr().err.splitlines() if " ERROR " in ln][0]
        assert ("stage encode-align ran out of memory before the first step, in building and placing the model (CUDA "
                "out of memory. Tried to allocate 4.00 GiB.); no checkpoint was written yet in "
                f"{tmp_path / 'run'}: the same command starts the run again") in line
        assert ("llm.dtype: bfloat16" in line) == dtype_said
        assert ("cache.require=true" in line) == (require == "false")
        assert "FSDP over several GPUs, which shards the frozen core" in line
        for not_yet_held in ("batch_size=", "grad_checkpointing=", "mixed_precision="):  # no batch before the first step
            assert not_yet_held not in line


def test_out_of_memory_while_a_resumed_run_places_its_model_names_the_checkpoint_it_goes_on_from(
        sample_data, tmp_path, monkeypatch):
    """Before the first step `train` let torch.OutOfMemoryError through, and the CLI loaded the stage again to
    guess its advice; now `train` raises OutOfMemory there too, from what it was building: the checkpoint a
    --resume continues (and the core it records) named, nothing lost."""
    from accelerate import Accelerator

    from mmllm.training import out_of_memory as oom

    out = tmp_path / "run"
    train(stage_cfg("encode-align", sample_data, out, max_steps=2, save_every=1))

    def prepare(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")

    monkeypatch.setattr(Accelerator, "prepare", prepare)
    with pytest.raises(OutOfMemory) as stopped:
        train(stage_cfg("encode-align", sample_data, out, max_steps=4, save_every=1), resume=True)
    text = str(stopped.value)
    assert ("stage encode-align ran out of memory before the first step, in building and placing the model (CUDA out "
            f"of memory. Tried to allocate 1.00 GiB.); the newest checkpoint, {out}/step-2, is intact: the same "
            "command with --resume goes on from it, with settings that need less memory: cache.dir=DIR "
            "cache.require=true") in text
    assert "lost" not in text and "batch_size=" not in text and "llm.dtype" not in text  # tiny-llama: no dtype
    assert isinstance(stopped.value.__cause__, torch.OutOfMemoryError)
    assert [p.name for p in ckpt.step_dirs(out)] == ["step-1", "step-2"]
    # the core advised about is the one init_from's checkpoint records, not the stage's own assembly's
    other = stage_cfg("encode-align", sample_data, tmp_path / "b", assembly=REPO / "configs/assemblies/default.yaml")
    assert oom.planned_core(other).kind == "hf-causal-lm"
    assert oom.planned_core(dataclasses.replace(other, init_from=str(out / "step-2"))).kind == "tiny-llama"


@pytest.mark.parametrize("where", ["validation", "save"])
def test_out_of_memory_in_a_validation_or_a_save_names_it_and_keeps_the_earlier_checkpoints(
        where, sample_data, tmp_path, monkeypatch):
    if where == "validation":
        real_evaluate = loop.evaluate
        calls = []

        def evaluate(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB.")
            return real_evaluate(*args, **kwargs)

        monkeypatch.setattr(loop, "evaluate", evaluate)
        doing = "in the validation ("
    else:
        real_write = ckpt._write_model_files
        calls = []

        def write(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB.")
            return real_write(*args, **kwargs)

        monkeypatch.setattr(ckpt, "_write_model_files", write)
        doing = "in saving its checkpoint ("
    out = tmp_path / "run"
    cfg = stage_cfg("decode-align", sample_data, out, max_steps=5, save_every=1, keep_last=0, batch_size=3,
                    grad_checkpointing="true", eval_data=f"[{{path: {sample_data['pairs']}, format: mmllm-pairs}}]")
    with pytest.raises(OutOfMemory) as stopped:
        train(cfg)
    text = str(stopped.value)
    assert f"ran out of memory at step 3 of 5, {doing}CUDA out of memory. Tried to allocate 512.00 MiB.)" in text
    assert f"the newest checkpoint, {out}/step-2, is intact (the 1 step(s) after it are lost)" in text
    assert "batch_size=1 grad_accum=3 (the same 3 samples per optimizer step)" in text
    assert "grad_checkpointing" not in text  # already on
    assert isinstance(stopped.value.__cause__, torch.OutOfMemoryError)
    assert [p.name for p in ckpt.step_dirs(out)] == ["step-1", "step-2"]
    assert not [p for p in out.iterdir() if p.name.startswith(".step-")]  # no half-written folder left


def test_out_of_memory_advice_leaves_out_what_the_run_already_does(sample_data, tmp_path):
    from mmllm.training.out_of_memory import STEP, RunShape, ways_to_need_less

    plain = stage_cfg("instruct", sample_data, tmp_path / "a", batch_size=6, grad_accum=2)
    ways = ways_to_need_less(plain, RunShape(2, "no", "none", torch.float32), STEP)
    assert ways[0] == "batch_size=3 grad_accum=4 (the same 24 samples per optimizer step)"
    assert len(ways) == 6
    lean = stage_cfg("instruct", sample_data, tmp_path / "b", batch_size=1, grad_checkpointing="true",
                     **{"cache.dir": str(tmp_path / "c"), "cache.require": "true"})
    assert ways_to_need_less(lean, RunShape(4, "bf16", "fsdp", torch.bfloat16), STEP) == [
        "none left in this config: a GPU with more memory, or shorter samples (the assembly's max_length, in a new "
        "output_dir)"]


def test_out_of_memory_advice_under_zero_is_fsdp_and_llm_dtype_only_for_a_core_that_takes_it(sample_data, tmp_path):
    """Under DeepSpeed ZeRO-1/2 the advice left sharding out (ZeRO counted as sharded), though ZeRO partitions only
    the glue's gradients and optimizer state and FSDP is what shards the frozen core; and it advised
    `llm.dtype: bfloat16` for any float32 core, an option tiny-llama (and a kind of one's own) need not have."""
    from mmllm.config import ComponentSpec
    from mmllm.training.out_of_memory import STEP, RunShape, takes_dtype, ways_to_need_less

    cfg = stage_cfg("instruct", sample_data, tmp_path / "a", batch_size=1, grad_checkpointing="true",
                    **{"cache.dir": str(tmp_path / "c"), "cache.require": "true"})
    ways = ways_to_need_less(cfg, RunShape(8, "bf16", "zero", torch.float32, dtype_option=False), STEP)
    assert ways == ["FSDP instead of ZeRO (accelerate launch --config_file configs/accelerate/fsdp.yaml): ZeRO-1/2 "
                    "partitions only the learned glue's gradients and optimizer state, FSDP shards the frozen core "
                    "too"]
    assert takes_dtype(ComponentSpec("hf-causal-lm", {"name_or_path": "x"}))
    assert not takes_dtype(ComponentSpec("tiny-llama"))
    assert not takes_dtype(ComponentSpec("no.such.module:Core"))
    hf = ways_to_need_less(cfg, RunShape(1, "bf16", "none", torch.float32, dtype_option=True), STEP)
    assert hf[-1].startswith("llm.dtype: bfloat16 in the assembly") and "FSDP over several GPUs" in hf[0]


def test_out_of_memory_advice_asks_for_a_new_output_dir_only_when_one_holds_a_checkpoint(sample_data, tmp_path):
    """Another assembly (a bfloat16 core, a shorter max_length) was always advised "in a new output_dir (--resume
    refuses another assembly)", also when the run had written no checkpoint: the same command then starts again,
    in the same output_dir, with any assembly."""
    from mmllm.training.out_of_memory import STEP, RunShape, message, ways_to_need_less

    cfg = stage_cfg("instruct", sample_data, tmp_path / "fresh", batch_size=1, grad_checkpointing="true",
                    **{"cache.dir": str(tmp_path / "c"), "cache.require": "true"})
    hf = RunShape(1, "bf16", "fsdp", torch.float32, dtype_option=True)
    text = message(cfg, hf, STEP, 1, "CUDA out of memory")  # output_dir holds no checkpoint
    assert "no checkpoint was written yet" in text
    assert "new output_dir" not in text
    assert ("llm.dtype: bfloat16 in the assembly (no checkpoint yet: the same command starts the run again with "
            "it)" in text)
    assert ways_to_need_less(cfg, hf, STEP, checkpointed=True)[-1] == (
        "llm.dtype: bfloat16 in the assembly, in a new output_dir (--resume refuses another assembly)")
    lean = RunShape(1, "bf16", "fsdp", torch.bfloat16)
    assert ("(the assembly's max_length; no checkpoint yet: the same command starts the run again with it)"
            in message(cfg, lean, STEP, 1, "CUDA out of memory"))


@pytest.mark.parametrize("before", [2, 0, 3])  # 0: the first step (nothing to save), 3: the last of 4
def test_a_signal_while_a_drawn_sample_waits_for_its_read_again_stops_before_that_step_and_resumes_exactly(
        before, sample_data, tmp_path, monkeypatch):
    """A SIGTERM while a sample drawn for a step waited for its failed read to be tried again skipped that sample
    (counted as unreadable) and trained the step on the rest, then saved it: the checkpoint held an update no
    uninterrupted run makes (the read would have worked when tried again), and --resume did not end on its losses.
    Now the step stops before it runs, on every process, saving the steps before it, as a length's read does."""
    cfg = {"save_every": 0}
    full = train(stage_cfg("decode-align", sample_data, tmp_path / "full", max_steps=4, **cfg))
    real_read_step, failing = loop._read_step, []

    def read_step(cfg, sampler, datasets, step, *args):  # the first read of step before+1's samples fails, once
        if step == before and not failing:
            failing.append(time.monotonic())
        return real_read_step(cfg, sampler, datasets, step, *args)

    part = tmp_path / "part"
    with monkeypatch.context() as mp, sigterm_during_a_read_retry(failing):  # tried again, the read would work
        mp.setattr(loop, "_read_step", read_step)
        with pytest.raises(KeyboardInterrupt if before == 0 else TrainingInterrupted) as stopped:
            train(stage_cfg("decode-align", sample_data, part, max_steps=4, **cfg))
    assert len(failing) == 2, "no read failed"
    assert time.monotonic() - failing[1] < 10  # not the 30 s wait
    if before == 0:  # nothing trained: stopped at once, as a signal before the first step does; nothing saved
        assert stopped.value.args == ("SIGTERM",) and not ckpt.step_dirs(part)
        again = train(stage_cfg("decode-align", sample_data, part, max_steps=4, **cfg))  # the same command
        assert again.losses == full.losses
        return
    assert stopped.value.name == "SIGTERM" and stopped.value.step == before
    assert [p.name for p in ckpt.step_dirs(part)] == [f"step-{before}"]
    assert ckpt.read_progress(part / f"step-{before}")["skipped"] == 0  # the sample was not taken for unreadable
    resumed = train(stage_cfg("decode-align", sample_data, part, max_steps=4, **cfg), resume=True)
    assert resumed.losses == full.losses and resumed.skipped == full.skipped == 0


@pytest.mark.parametrize("text, ran_out", [
    ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported", True),  # a library's allocation
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),  # cuBLAS's workspace
    ("CUDA error: an illegal memory access was encountered", False),  # a fault, not memory running out
    ("mat1 and mat2 shapes cannot be multiplied (4x256 and 64x64)", False),
])
def test_a_gpu_running_out_outside_torchs_allocator_is_out_of_memory(text, ran_out):
    """cuBLAS or a library allocating on the GPU raises a plain RuntimeError, not torch.OutOfMemoryError: it was
    taken for a fault of mmllm (exit 70, a traceback) instead of memory running out (exit 2 and what needs less)."""
    from mmllm.memory import is_out_of_memory, ran_out_on_the_host

    assert is_out_of_memory(RuntimeError(text)) is ran_out
    assert not ran_out_on_the_host(RuntimeError(text))  # a GPU's memory: the GPU advice
