"""``group_by_length``: micro-batches of samples of similar token length, drawn from the same mixture as
without it, deterministic from the seed, the same for W processes with batch b as for one with W*b, exact
on ``--resume``, recorded in the checkpoint and compared on resume."""

import collections
import json
import logging
import threading
from dataclasses import replace as dataclasses_replace

import numpy as np
import pytest
import torch

from mmllm.data import dataset as dataset_module
from mmllm.data.dataset import LengthGroupedSampler, MixtureSampler, StageDataset, load_stage_records
from mmllm.model import AnyToAnyModel
from mmllm.training import checkpoint as ckpt
from mmllm.training.loop import stage_sampler, token_spec, train
from mmllm.training.resume import check_resume
from tests.conftest import sigterm_during_a_read_retry
from tests.test_stages import stage_cfg

SIZES, WEIGHTS = [60, 30, 10], [1.0, 2.0, 1.5]  # 60 + 60 + 15 = 135 draws an epoch


def synthetic_length(dataset: int, index: int) -> int:
    """Lengths from 10 to 200 that follow neither the dataset nor the index order."""
    return 10 + (index * 37 + dataset * 101) % 191


def grouped(seed=0, group_batches=5, sizes=SIZES, weights=WEIGHTS):
    return LengthGroupedSampler(MixtureSampler(sizes, weights, seed), synthetic_length, group_batches)


def batches(sampler, steps, batch=4, world=1, rank=0, accum=1):
    return [sampler.micro_batch(s, m, accum, rank, world, batch) for s in range(steps) for m in range(accum)]


def padding_share(picks):
    lengths = [[synthetic_length(d, i) for d, i in b] for b in picks]
    return 1 - sum(map(sum, lengths)) / sum(max(x) * len(x) for x in lengths)


def test_grouped_batches_hold_similar_lengths_and_pad_far_less():
    def spread(sampler):  # the mean length range within a micro-batch
        return np.mean([np.ptp([synthetic_length(d, i) for d, i in b]) for b in batches(sampler, 200)])

    plain = MixtureSampler(SIZES, WEIGHTS, seed=0)
    assert spread(plain) > 100
    assert spread(grouped(group_batches=5)) < spread(plain) / 3  # 20 draws sorted at a time
    assert spread(grouped(group_batches=50)) < spread(plain) / 15  # the default: 200
    assert padding_share(batches(grouped(group_batches=50), 200)) < padding_share(batches(plain, 200)) / 10


def test_every_sample_is_drawn_as_often_as_without_grouping():
    # a chunk is 5 batches x 4 = 20 draws; 27 chunks = 4 epochs of 135 draws
    plain, s = MixtureSampler(SIZES, WEIGHTS, seed=3), grouped(seed=3)
    drawn = collections.Counter(p for b in batches(s, 135) for p in b)
    assert drawn == collections.Counter(plain.at(k) for k in range(4 * plain.epoch_size))
    # so the data sets mix by their weights: 4 epochs of 60, 30 x 2 and 10 x 1.5 draws
    per_dataset = collections.Counter(d for d, _ in drawn.elements())
    assert per_dataset == {0: 240, 1: 240, 2: 60}
    assert {drawn[(0, i)] for i in range(60)} == {4} and {drawn[(1, i)] for i in range(30)} == {8}
    assert {drawn[(2, i)] for i in range(10)} == {6}  # the fractional shares walk through the data set
    # any whole number of chunks draws what the plain sampler draws at the same positions
    first = collections.Counter(p for b in batches(s, 10) for p in b)
    assert first == collections.Counter(plain.at(k) for k in range(40))


def test_the_order_is_a_pure_function_of_the_seed_and_still_shuffled():
    a = batches(grouped(seed=5), 60)
    assert batches(grouped(seed=5), 60) == a
    assert batches(grouped(seed=6), 60) != a
    late_first = grouped(seed=5)  # stateless: any step, in any order, as a resumed run asks
    assert [late_first.micro_batch(s, 0, 1, 0, 1, 4) for s in reversed(range(60))] == a[::-1]
    # the batches of a chunk are not in length order, and the same lengths come in another order per seed
    means = [np.mean([synthetic_length(d, i) for d, i in b]) for b in a]
    chunks = [means[k:k + 5] for k in range(0, 60, 5)]
    assert any(c != sorted(c) and c != sorted(c, reverse=True) for c in chunks)


@pytest.mark.parametrize(("world", "accum"), [(1, 1), (2, 1), (4, 2)])
def test_the_first_batch_is_the_longest_of_the_first_chunk_on_every_process(world, accum):
    # as HF's LengthGroupedSampler: a batch too big for memory fails the first step, not a late one
    chunk_steps = 5 // accum  # group_batches=5 micro-batches per chunk
    for seed in range(8):  # the shuffle alone puts the longest first 1 time in 5
        for rank in range(world):
            picks = batches(grouped(seed=seed), chunk_steps, batch=2, world=world, rank=rank, accum=accum)
            lengths = [[synthetic_length(d, i) for d, i in b] for b in picks]
            assert max(lengths[0]) == max(map(max, lengths)), (seed, rank)
            assert sum(lengths[0]) == max(map(sum, lengths)), (seed, rank)
    # later chunks keep their shuffled order: their longest batch comes anywhere
    later = [batches(grouped(seed=seed), 10)[5:] for seed in range(8)]
    means = [[np.mean([synthetic_length(d, i) for d, i in b]) for b in chunk] for chunk in later]
    assert any(m[0] != max(m) for m in means)


@pytest.mark.parametrize(("world", "accum"), [(2, 1), (4, 2)])
def test_processes_share_what_one_process_with_their_batch_reads(world, accum):
    s = grouped()
    one = batches(s, 20, batch=2 * world, accum=accum)
    shares = [batches(grouped(), 20, batch=2, world=world, rank=r, accum=accum) for r in range(world)]
    assert [sum((share[k] for share in shares), []) for k in range(len(one))] == one


class Processes:
    """``world`` processes of one run, as threads, each with its own sampler and its own count of the lengths
    it measured; ``exchange`` is an all-gather among them (each thread's part, in process order)."""

    def __init__(self, world, **sampler_kwargs):
        self.world, self.barrier = world, threading.Barrier(world)
        self.parts = [None] * world
        self.measured = [collections.Counter() for _ in range(world)]
        self.samplers = [self._sampler(r, **sampler_kwargs) for r in range(world)]

    def _sampler(self, rank, seed=0, group_batches=5, sizes=SIZES, weights=WEIGHTS):
        def counted(d, i):
            self.measured[rank][(d, i)] += 1
            return synthetic_length(d, i)

        return LengthGroupedSampler(MixtureSampler(sizes, weights, seed), counted, group_batches)

    def exchange(self, rank):
        def gather(work):
            self.parts[rank] = work()
            self.barrier.wait()
            every = list(self.parts)
            self.barrier.wait()  # every process has read them before the next exchange writes
            return every

        return gather

    def batches(self, steps, batch, accum=1, first_step=0):
        """Each process's micro-batches of ``steps`` steps, as the training loop asks for them."""
        out = [None] * self.world

        def run(rank):
            sampler, mine = self.samplers[rank], []
            for step in range(first_step, first_step + steps):
                for micro in range(accum):
                    sampler.share_lengths(step, micro, accum, rank, self.world, batch, self.exchange(rank))
                    mine.append(sampler.micro_batch(step, micro, accum, rank, self.world, batch))
            out[rank] = mine

        threads = [threading.Thread(target=run, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(b is not None for b in out), "a process did not finish (an exchange not reached by all)"
        return out


@pytest.mark.parametrize(("world", "accum"), [(2, 1), (4, 2), (3, 3)])
def test_processes_share_the_tokenizing_of_a_chunk_and_still_read_the_same_batches(world, accum):
    """Each process measured every length of each chunk (8 processes x batch 32: 12,800 encodes per chunk on
    each); now each measures about 1/world of them, and the batches are exactly those it found alone."""
    run = Processes(world)
    shared = run.batches(40, batch=2, accum=accum)  # 40 x accum micro-batches of 2 x world: past one epoch
    for rank in range(world):
        assert shared[rank] == batches(grouped(), 40, batch=2, world=world, rank=rank, accum=accum)
    every = sum(run.measured, collections.Counter())
    assert set(every.values()) == {1}  # each sample measured once, by one process, across epochs
    drawn = {p for b in shared[0] for p in b}
    assert set(every) == {p for share in shared for b in share for p in b} and len(drawn) > 0
    for counted in run.measured:
        assert len(counted) <= -(-len(every) // world) + 5  # a share: ~1/world (rounding per chunk)


def test_a_resumed_process_shares_from_its_first_step_and_reads_what_an_uninterrupted_one_does():
    whole = Processes(2).batches(30, batch=3)
    resumed = Processes(2).batches(18, batch=3, first_step=12)  # mid-chunk: group_batches=5
    assert [share[12:] for share in whole] == resumed


def test_later_epochs_measure_nothing_again():
    run = Processes(2, sizes=[20], weights=[1.0])  # an epoch is 20 draws: 2 chunks of 5 batches x 1 x 2 processes
    run.batches(10, batch=1)
    first = [sum(c.values()) for c in run.measured]
    assert sum(first) == 20 and first == [10, 10]
    run.batches(50, batch=1, first_step=10)  # 5 more epochs
    assert [sum(c.values()) for c in run.measured] == first


def test_the_default_sampler_is_the_mixture_itself(tiny_model, sample_data, tmp_path):
    cfg = stage_cfg("instruct", sample_data, tmp_path)
    assert cfg.group_by_length is False
    per, weights, _ = load_stage_records(cfg.data, cfg.stage)
    datasets = [StageDataset(c, tiny_model.llm.tokenizer, token_spec(tiny_model), {}) for c in per]
    assert type(stage_sampler(datasets, weights, cfg)) is MixtureSampler
    on = stage_cfg("instruct", sample_data, tmp_path, group_by_length="true")
    assert isinstance(stage_sampler(datasets, weights, on), LengthGroupedSampler)


def test_a_samples_length_is_its_batch_row_counted_without_reading_media(tiny_model, sample_data, tmp_path,
                                                                         monkeypatch):
    cfg = stage_cfg("instruct", sample_data, tmp_path)
    per, _, _ = load_stage_records(cfg.data, cfg.stage)
    pre = {m: e.preprocess for m, e in tiny_model.encoders.items()}
    ds = StageDataset(per[0], tiny_model.llm.tokenizer, token_spec(tiny_model), pre)
    rows = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert len(set(rows)) > 2  # the sample data holds conversations of several lengths

    def no_media(*args, **kwargs):
        raise AssertionError("a length was counted by reading media")

    monkeypatch.setattr(dataset_module, "load_media", no_media)
    assert [ds.length(i) for i in range(len(ds))] == rows


def _lengths_of_steps(tiny_model, cfg, steps):
    per, weights, _ = load_stage_records(cfg.data, cfg.stage)
    datasets = [StageDataset(c, tiny_model.llm.tokenizer, token_spec(tiny_model), {}) for c in per]
    sampler = stage_sampler(datasets, weights, cfg)
    return [[datasets[d].length(i) for d, i in sampler.micro_batch(s, 0, 1, 0, 1, cfg.batch_size)]
            for s in range(steps)]


def test_grouping_the_sample_data_cuts_its_padding(tiny_model, sample_data, tmp_path):
    def padding(rows):
        return 1 - sum(map(sum, rows)) / sum(max(r) * len(r) for r in rows)

    plain = _lengths_of_steps(tiny_model, stage_cfg("instruct", sample_data, tmp_path), 50)
    on = _lengths_of_steps(tiny_model, stage_cfg("instruct", sample_data, tmp_path, group_by_length="true"), 50)
    assert sorted(map(sum, plain)) != sorted(map(sum, on))  # other batches ...
    assert sorted(x for r in plain for x in r) == sorted(x for r in on for x in r)  # ... of the same draws
    assert padding(on) < padding(plain) / 2


def test_a_grouped_run_resumes_exactly_and_its_checkpoint_records_the_setting(sample_data, tmp_path, caplog):
    grouped_cfg = {"group_by_length": "true", "save_every": 3}
    full = train(stage_cfg("instruct", sample_data, tmp_path / "full", max_steps=6, **grouped_cfg))
    plain = train(stage_cfg("instruct", sample_data, tmp_path / "plain", max_steps=6, save_every=3))
    assert full.losses != plain.losses  # the grouping changed what the steps read
    train(stage_cfg("instruct", sample_data, tmp_path / "part", max_steps=3, **grouped_cfg))
    resumed = train(stage_cfg("instruct", sample_data, tmp_path / "part", max_steps=6, **grouped_cfg), resume=True)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    a = AnyToAnyModel.from_pretrained(full.final_checkpoint)
    b = AnyToAnyModel.from_pretrained(resumed.final_checkpoint)
    for k, v in {**a.learned_state_dict(), **a.lora_parameters()}.items():
        torch.testing.assert_close({**b.learned_state_dict(), **b.lora_parameters()}[k], v, rtol=0, atol=1e-6)

    step3 = tmp_path / "part" / "step-3"
    assert json.loads((step3 / "mmllm.json").read_text())["stage"]["group_by_length"] is True
    caplog.clear()
    caplog.set_level(logging.WARNING)
    check_resume(stage_cfg("instruct", sample_data, tmp_path / "part", max_steps=6), step3, 1, [23])
    assert "group_by_length: True -> False" in caplog.text and "reads other samples" in caplog.text


def test_a_checkpoint_from_before_the_setting_resumes_ungrouped_without_a_warning(sample_data, tmp_path, caplog,
                                                                                 monkeypatch):
    train(stage_cfg("instruct", sample_data, tmp_path, max_steps=1))
    real = ckpt.read_meta

    def older(path):  # what a checkpoint written before group_by_length existed records
        meta = real(path)
        del meta["stage"]["group_by_length"]
        return meta

    monkeypatch.setattr(ckpt, "read_meta", older)
    caplog.clear()
    caplog.set_level(logging.WARNING)
    check_resume(stage_cfg("instruct", sample_data, tmp_path, max_steps=2), tmp_path / "step-1", 1, [23])
    assert "reads other samples" not in caplog.text
    check_resume(stage_cfg("instruct", sample_data, tmp_path, max_steps=2, group_by_length="true"),
                 tmp_path / "step-1", 1, [23])
    assert "group_by_length: False -> True" in caplog.text


def test_a_grouped_checkpoint_of_an_older_batch_order_is_warned_about_on_resume(sample_data, tmp_path, caplog,
                                                                               monkeypatch):
    """A grouped run checkpointed within its first chunk by an mmllm before the longest-batch-first order resumed
    into another batch order without a word: the checkpoint now records its order's version, compared on resume."""
    grouped_cfg = stage_cfg("instruct", sample_data, tmp_path, max_steps=2, group_by_length="true")
    train(stage_cfg("instruct", sample_data, tmp_path, max_steps=1, group_by_length="true"))
    caplog.set_level(logging.WARNING)
    check_resume(grouped_cfg, tmp_path / "step-1", 1, [23])
    assert "reads other samples" not in caplog.text  # this version's checkpoint: the same order
    real = ckpt.read_progress

    def older(path, step=None):  # what a checkpoint of an mmllm before the version was recorded holds
        progress = real(path)
        progress.pop("length_order", None)
        return progress | ({"step": step} if step is not None else {})

    monkeypatch.setattr(ckpt, "read_progress", older)
    check_resume(grouped_cfg, tmp_path / "step-1", 1, [23])
    assert "group_by_length's batch order" in caplog.text and "reads other samples" in caplog.text
    caplog.clear()
    beyond = dataset_module.GROUP_BATCHES  # past the first chunk: later chunks are ordered as they were
    monkeypatch.setattr(ckpt, "read_progress", lambda path: older(path, step=beyond))
    check_resume(dataclasses_replace(grouped_cfg, max_steps=beyond + 1), tmp_path / "step-1", 1, [23])
    assert "reads other samples" not in caplog.text
    caplog.clear()
    check_resume(stage_cfg("instruct", sample_data, tmp_path, max_steps=2), tmp_path / "step-1", 1, [23])
    assert "batch order" not in caplog.text  # not grouped now: the group_by_length change is what is said


def test_a_signal_while_a_length_read_waits_to_be_tried_again_stops_before_that_step_and_resumes_exactly(
        sample_data, tmp_path, monkeypatch):
    """group_by_length measures a chunk's samples when its first step draws it. A SIGTERM while one of those reads
    failed and waited to be tried again (up to 36 s) was acted on only after the wait; now the wait ends at once
    and the run stops before that step (nothing of it ran), saving the steps before it: the resumed run ends on
    the uninterrupted run's losses (the length was not taken for 0)."""
    import time

    from mmllm.training.interrupt import TrainingInterrupted

    monkeypatch.setattr(LengthGroupedSampler.__init__, "__defaults__", (2,))  # chunks of 2 steps: step 2 starts one
    grouped_cfg = {"group_by_length": "true", "save_every": 0}
    full = train(stage_cfg("decode-align", sample_data, tmp_path / "full", max_steps=5, **grouped_cfg))
    real_forward, failing = AnyToAnyModel.forward, []

    def forward(self, batch, losses=None, normalizers=None):  # reads fail from step 2 (0-based) on
        if batch.get("step") == 1 and not failing:
            failing.append(time.monotonic())
        return real_forward(self, batch, losses, normalizers)

    part = tmp_path / "part"
    with monkeypatch.context() as mp, sigterm_during_a_read_retry(failing, keep_failing=True):
        mp.setattr(AnyToAnyModel, "forward", forward)
        with pytest.raises(TrainingInterrupted) as stopped:
            train(stage_cfg("decode-align", sample_data, part, max_steps=5, **grouped_cfg))
    assert len(failing) == 2, "no read failed"
    assert time.monotonic() - failing[1] < 10  # not the 30 s wait
    assert stopped.value.name == "SIGTERM" and stopped.value.step == 2
    assert [p.name for p in ckpt.step_dirs(part)] == ["step-2"]
    resumed = train(stage_cfg("decode-align", sample_data, part, max_steps=5, **grouped_cfg), resume=True)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)


def test_a_stop_while_one_process_measures_a_chunk_is_raised_on_every_process_at_the_same_step():
    """A stop asked for while one process's length read waited for its retry (ReadStopped) must stop every process
    at the same call: the one process leaving alone would leave the others waiting in their next collective."""
    from mmllm.data.index import ReadStopped

    world, steps = 2, 10
    run = Processes(world)

    def stopping(d, i):  # process 1 is stopped measuring a sample of the chunk of step 5 (chunks of 5 steps)
        if asked[0]:
            raise ReadStopped("stopped", f"data:{i}")
        return synthetic_length(d, i)

    asked = [False]
    run.samplers[1]._length = stopping
    stopped_at = [None] * world

    def process(rank):
        sampler = run.samplers[rank]
        for step in range(steps):
            if step == 5 and rank == 1:
                asked[0] = True
            try:
                sampler.share_lengths(step, 0, 1, rank, world, 2, run.exchange(rank))
            except ReadStopped as exc:
                stopped_at[rank] = (step, exc.where)
                return
            sampler.micro_batch(step, 0, 1, rank, world, 2)

    threads = [threading.Thread(target=process, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert stopped_at[0] == stopped_at[1] and stopped_at[0][0] == 5


def test_a_process_that_gave_up_a_drawn_read_still_shares_the_steps_next_chunk_lengths():
    """A read given up on a stop while a sample was drawn (ReadStopped from the data set) is this process's alone:
    the others go on through the step, and a later micro-batch of it can start a chunk whose lengths every process
    exchanges. The process that gave up must take part in that exchange (leaving the step's reads at once left
    the others waiting in it for ever), then say it gave up; the others read their micro-batches as usual."""
    from types import SimpleNamespace

    from mmllm.data.dataset import SampleError
    from mmllm.data.index import ReadStopped
    from mmllm.training.loop import _read_step

    world, accum, batch, step = 2, 3, 2, 1  # chunks of 5 micro-batches: step 1's third starts chunk 1
    run = Processes(world)
    run.barrier = threading.Barrier(world, timeout=30)
    cfg = SimpleNamespace(grad_accum=accum, batch_size=batch)

    class Drawn:  # every sample unreadable (no model needed); process 1's first draw is given up on a stop
        def __init__(self, rank):
            self.rank, self.reads = rank, 0

        def __getitem__(self, i):
            self.reads += 1
            if self.rank == 1 and self.reads == 1:
                raise ReadStopped("data:1: a stop was asked for", "data:1")
            return SampleError(f"s{i}", "unreadable")

    got = [None] * world

    def process(rank):
        datasets = [Drawn(rank) for _ in SIZES]
        got[rank] = _read_step(cfg, run.samplers[rank], datasets, step, rank, world, run.exchange(rank), 0,
                               SimpleNamespace(name="SIGTERM"))

    threads = [threading.Thread(target=process, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and all(got), "a process was left waiting in an exchange"
    (mine, given_up), (theirs, none) = got[1], got[0]
    assert isinstance(given_up, ReadStopped) and given_up.where == "data:1" and none is None
    assert len(theirs) == accum and not mine  # process 1 read nothing more of the step once it gave up
    assert all(run.samplers[r]._shared == (1, world * batch) for r in range(world))  # chunk 1 shared by both
