"""Random initialisation under a fixed seed draws from seeded generators and gives the caller's back."""

import pytest
import torch

from mmllm.model import seeded


def test_cpu_draws_are_those_of_the_seed_and_the_cpu_generator_is_given_back():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with seeded(7, "llm"):
        inside = torch.randn(16)
    with seeded(7, "llm"):
        again = torch.randn(16)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(inside, again)
    with seeded(7, "encoders.image"):
        assert not torch.equal(torch.randn(16), inside)  # each part its own stream


def test_seeding_on_the_cpu_reseeds_no_other_device(monkeypatch):
    """``torch.manual_seed`` also reseeds every CUDA device (queued until CUDA starts, where it has not yet):
    a caller's GPU draws after assembly depended on the part built last."""
    calls = []
    for name in ("manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, lambda seed, name=name: calls.append(name))
    with seeded(7, "llm"):
        torch.nn.Linear(4, 4)
    assert calls == []


def test_under_the_meta_device_the_cpu_generator_is_still_given_back():
    before = torch.get_rng_state()
    with torch.device("meta"), seeded(7, "llm"):
        torch.nn.Linear(4, 4)
        torch.randn(4, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parts_built_on_the_gpu_draw_from_a_seeded_generator_given_back_after():
    torch.cuda.manual_seed(123)
    before = torch.cuda.get_rng_state()
    try:
        torch.set_default_device("cuda")
        with seeded(7, "llm"):
            first = torch.nn.Linear(8, 8).weight.detach().clone()
        after = torch.cuda.get_rng_state()
        torch.randn(8)  # the caller's own draw in between
        with seeded(7, "llm"):
            second = torch.nn.Linear(8, 8).weight.detach().clone()
    finally:
        torch.set_default_device(None)
    assert torch.equal(after, before)
    assert first.device.type == "cuda" and torch.equal(first, second)


def _draws():
    import random

    import numpy as np

    return torch.rand(4), random.random(), float(np.random.rand())


@pytest.mark.parametrize("ends", ["returns", "raises"])
def test_train_gives_the_callers_global_generators_back(ends, sample_data, tmp_path, monkeypatch):
    """``train`` seeds Python's, NumPy's and torch's generators for its run: a library caller's own draws after
    it were the run's, whatever they had seeded."""
    import random

    import numpy as np

    from mmllm.model import AnyToAnyModel
    from mmllm.training.loop import train
    from tests.test_stages import stage_cfg

    def seed_all():
        torch.manual_seed(1234)
        random.seed(1234)
        np.random.seed(1234)

    seed_all()
    torch.rand(3)  # the caller's draws so far: the state train() finds is not a freshly seeded one
    expected = _draws()
    seed_all()
    torch.rand(3)
    if ends == "raises":
        def fails(*args, **kwargs):
            raise RuntimeError("out of memory in the first step")

        monkeypatch.setattr(AnyToAnyModel, "forward", fails)
        with pytest.raises(RuntimeError, match="out of memory"):
            train(stage_cfg("decode-align", sample_data, tmp_path / "run", max_steps=1))
    else:
        train(stage_cfg("decode-align", sample_data, tmp_path / "run", max_steps=1))
    got = _draws()
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_cuda_generators_are_given_back_where_cuda_is_initialised(monkeypatch):
    """On a machine whose CUDA the caller started, every device's generator state is read before and set after."""
    from mmllm.seeding import global_generators_kept

    saved, restored = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(saved))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    with pytest.raises(KeyError), global_generators_kept():
        raise KeyError("the run failed")
    assert restored == saved
