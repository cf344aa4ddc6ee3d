"""Every random draw of a stage comes from its config's `seed`: the same seed gives the same run, another
seed another run."""

import os

import pytest
import torch

from mmllm.model import AnyToAnyModel
from mmllm.training.loop import train
from tests.test_stages import stage_cfg


@pytest.fixture
def noise_seeds(monkeypatch):
    """The denoising-noise seed of every training forward, in call order."""
    seen, forward = [], AnyToAnyModel.forward

    def recording(self, batch, *args, **kwargs):
        seen.append(batch.get("noise_seed"))
        return forward(self, batch, *args, **kwargs)

    monkeypatch.setattr(AnyToAnyModel, "forward", recording)
    return seen


def test_the_denoising_noise_follows_the_stage_seed(sample_data, tmp_path, noise_seeds):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        noise_seeds.clear()
        result = train(stage_cfg("instruct", sample_data, tmp_path / name, max_steps=2, seed=seed,
                                 **{"losses.denoise": 1.0}))
        runs[name] = (list(noise_seeds), result.losses)
    assert runs["a"] == runs["b"]  # the same seed: the same draws and losses
    assert len(runs["a"][0]) == 2 and len(set(runs["a"][0])) == 2  # one draw per step
    assert not set(runs["a"][0]) & set(runs["c"][0])  # another seed draws other noise (it drew the same before)


def test_the_suite_runs_torch_on_the_thread_count_it_is_given_whatever_ran_before():
    """`make test` sets no OMP_NUM_THREADS: the tests before the first that set one torch thread ran on the
    machine's core count, every later one on 1, so a test's arithmetic and time depended on which ran before
    it. tests/conftest.py sets OMP_NUM_THREADS=1 unless the environment says otherwise, and each test leaves the
    count as it found it."""
    assert torch.get_num_threads() == int(os.environ.get("OMP_NUM_THREADS", "0"))
