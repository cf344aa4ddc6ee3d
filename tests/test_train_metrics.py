"""The training report every ``log_every`` steps: one log line on the main process and the same numbers to the
tracker (mmllm.training.metrics)."""

import logging
import math
import re

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mmllm.data.dataset import collate
from mmllm.training import loop
from mmllm.training.loop import train
from mmllm.training.metrics import Interval, batch_size_counts
from tests.test_stages import stage_cfg

LINE = re.compile(r"step (\d+)/(\d+): loss ([\d.]+) \((ce [\d.]+(?:, \w+ [\d.]+)*)\), lr ([\d.e+-]+), grad_norm ([\d.e+-]+), "
                  r"([\d.e+-]+) s/step, ([\d.e+-]+) samples/s, ([\d.e+-]+) tokens/s")


def recording_accelerator():
    """A CPU Accelerator whose tracker values are kept: {step: {key: value}}."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    accelerator.logged = {}
    accelerator.log = lambda values, step=None, **_: accelerator.logged.setdefault(step, {}).update(values)
    return accelerator


@pytest.fixture
def counted_samples(monkeypatch):
    """The real tokens of every collated training micro-batch, counted from the samples (not the mask)."""
    seen = []

    def counting(samples, pad_id):
        seen.append(sum(len(s["input_ids"]) for s in samples if isinstance(s, dict)))
        return collate(samples, pad_id)

    monkeypatch.setattr(loop, "collate", counting)
    return seen


def test_a_line_every_log_every_steps_with_the_interval_means(sample_data, tmp_path, caplog, counted_samples):
    caplog.set_level(logging.INFO, logger="mmllm.training.loop")
    accelerator = recording_accelerator()
    result = train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=5, log_every=2, grad_accum=2),
                   accelerator=accelerator)
    lines = [m for m in map(LINE.search, caplog.messages) if m]
    assert [(int(m[1]), int(m[2])) for m in lines] == [(2, 5), (4, 5), (5, 5)]  # and the last step
    assert sorted(accelerator.logged) == [2, 4, 5]
    per_step_tokens = [sum(counted_samples[i:i + 2]) for i in range(0, 10, 2)]
    for (first, last), m in zip([(0, 2), (2, 4), (4, 5)], lines, strict=True):
        logged = accelerator.logged[last]
        steps = last - first
        # the mean loss of the steps since the last line, in the line and to the tracker
        assert logged["train/loss"] == pytest.approx(sum(result.losses[first:last]) / steps, rel=1e-12)
        assert float(m[3]) == pytest.approx(logged["train/loss"], abs=5e-5)
        assert float(m[6]) == pytest.approx(logged["train/grad_norm"], rel=1e-3) and logged["train/grad_norm"] > 0
        assert {"ce", "mse_image"} <= {part.split()[0] for part in m[4].split(", ")}
        assert {"train/ce", "train/mse_image", "train/lr", "train/skipped", "train/step_s"} <= logged.keys()
        assert float(m[5]) == pytest.approx(logged["train/lr"], rel=1e-2)
        # samples and real tokens per step: batch_size x grad_accum samples, their unpadded lengths
        assert logged["train/samples_per_s"] * logged["train/step_s"] == pytest.approx(4 * 2, rel=1e-9)
        assert logged["train/tokens_per_s"] * logged["train/step_s"] == pytest.approx(
            sum(per_step_tokens[first:last]) / steps, rel=1e-9)
        assert float(m[8]) == pytest.approx(logged["train/samples_per_s"], rel=1e-3)
        assert float(m[7]) == pytest.approx(logged["train/step_s"], rel=1e-3)


def test_a_non_finite_step_is_left_out_of_the_line_s_means(sample_data, tmp_path, monkeypatch, caplog):
    """As keep_best's mean train loss: a skipped step with a NaN loss is not part of the loss or norm means."""
    real_forward = loop.AnyToAnyModel.forward

    def poisoned(self, batch, losses=None, normalizers=None):
        out = real_forward(self, batch, losses, normalizers)
        return out | {"loss": out["loss"] * float("nan")} if batch["step"] == 1 else out

    monkeypatch.setattr(loop.AnyToAnyModel, "forward", poisoned)
    caplog.set_level(logging.INFO, logger="mmllm.training.loop")
    accelerator = recording_accelerator()
    result = train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=3, log_every=3), accelerator=accelerator)
    assert math.isnan(result.losses[1])
    logged = accelerator.logged[3]
    assert logged["train/loss"] == pytest.approx((result.losses[0] + result.losses[2]) / 2, rel=1e-12)
    assert math.isfinite(logged["train/grad_norm"])
    assert "1 of 3 steps skipped" in caplog.text


def test_the_logged_gradient_norm_is_the_total_norm_before_clipping(sample_data, tmp_path, monkeypatch):
    """One step of the tiny stage, without clipping (its gradients as the optimiser sees them) and with
    clipping at a tenth of their norm: the logged norm is the whole gradient's norm before clipping."""
    def one_step(out, max_grad_norm):
        grads = []

        def record(optimizer, args, kwargs):
            grads.extend(p.grad.detach().double().clone() for g in optimizer.param_groups for p in g["params"]
                         if p.grad is not None)

        handle = register_optimizer_step_pre_hook(record)
        try:
            accelerator = recording_accelerator()
            train(stage_cfg("decode-align", sample_data, tmp_path / out, max_steps=1, log_every=1,
                            **{"optim.max_grad_norm": max_grad_norm}), accelerator=accelerator)
        finally:
            handle.remove()
        return accelerator.logged[1]["train/grad_norm"], torch.cat([g.flatten() for g in grads]).norm().item()

    logged, unclipped = one_step("free", 0)
    assert logged == pytest.approx(unclipped, rel=1e-6)
    logged_clipped, clipped = one_step("clipped", unclipped / 10)
    assert clipped == pytest.approx(unclipped / 10, rel=1e-4)  # clipping was on: the optimiser saw a tenth
    assert logged_clipped == pytest.approx(unclipped, rel=1e-6)  # and the log the norm before it


def test_samples_and_tokens_count_readable_samples_and_their_unpadded_tokens():
    batch = {"ids": ["a", "b"], "input_ids": torch.zeros(2, 7, dtype=torch.long),
             "attention_mask": torch.tensor([[1] * 3 + [0] * 4, [1] * 7])}  # 3 and 7 tokens, padded to 7
    unreadable = {"ids": [], "skipped": [("c", "bad")]}  # a micro-batch whose every sample failed: no input_ids
    assert batch_size_counts([batch, unreadable]) == (2.0, 10.0)


def test_the_interval_means_leave_out_what_did_not_happen():
    class OneProcess:
        device = torch.device("cpu")

        def reduce(self, tensor, op):
            return tensor

    interval = Interval(["ce", "retain", "mse_image"])
    ce = torch.tensor(2.0)
    interval.add(1.0, 8, 100, 3.0, {"ce": ce, "loss": ce}, {"ce": 5, "mse_image": 1}, 4.0, updated=True)
    interval.add(3.0, 8, 300, float("nan"), {}, {}, None, updated=False)
    interval.add(2.0, 8, 200, 5.0, {"ce": ce * 2, "mse_image": ce}, {"ce": 5, "mse_image": 2}, float("inf"),
                 updated=False)
    out = interval.summary(OneProcess())
    assert out["loss"] == 4.0 and out["ce"] == 3.0 and out["mse_image"] == 1.0  # image: 2.0 over its 2 steps
    assert "retain" not in out  # never computed
    assert out["grad_norm"] == 4.0  # the updated steps' norms
    assert (out["step_s"], out["samples_per_s"], out["tokens_per_s"]) == (2.0, 4.0, 100.0)
    assert interval.skipped_updates == 2


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_the_norm_is_the_finite_check_and_an_overflowing_norm_alone_still_steps(max_grad_norm):
    """A finite total norm means finite gradients; one that is not is checked gradient by gradient: finite
    gradients whose sum of squares passes float32's range step as before the norm was the check."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from mmllm.training.loop import _clip_and_step

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    optimizer = torch.optim.SGD(params, lr=1.0)

    def step(grads, loss=1.0):
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.tensor(g)
        return _clip_and_step(accelerator, optimizer, params, max_grad_norm, loss)

    assert step([[3.0, 0.0], [0.0, 4.0]]) == ("stepped", 5.0)
    before = params[0].detach().clone()
    assert step([[1e30, 0.0], [0.0, 1.0]]) == ("stepped", float("inf"))  # finite gradients, an overflowing norm
    moved = (before - params[0].detach())[0].item()
    assert moved == (0.0 if max_grad_norm else pytest.approx(1e30))  # clipping by an infinite norm scales to 0, as it did
    outcome, norm = step([[1.0, float("nan")], [0.0, 1.0]])
    assert outcome == "nonfinite" and math.isnan(norm)
    assert step([[1.0, 0.0], [0.0, 1.0]], loss=float("nan")) == ("nonfinite", None)
