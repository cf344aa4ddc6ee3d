"""Two processes on CPU (gloo) with per-process batch b match one process with batch 2b: the same
losses and the same final trainable weights, for every stage. Checkpoints are written once."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.test_stages import STAGES

# Losses and weights agree to float32 reduction order (1e-5). The runs use SGD: Adam divides by
# sqrt(v), so a gradient that is zero in exact arithmetic (attention key biases) would turn
# reduction-order noise into steps of about lr and hide what this test checks -- that the two
# runs compute the same gradients.
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(stage, sample_data, out, nproc, batch):
    if stage == "instruct":
        # the text-only conversation again, weighted up, so that the retention KL (normalised over
        # the whole step's text-only tokens) is part of what the two runs must agree on
        chat = sample_data["chat"]
        plain = out.parent / "plain.jsonl"
        plain.write_text("".join(line + "\n" for line in chat.read_text().splitlines() if '"chat-plain"' in line))
        data = (f"data=[{{path: {chat}, format: mmllm-chat}}, "
                f"{{path: {plain}, format: mmllm-chat, weight: 8, allow_outside_root: true}}]")
        extra = ["losses.retain=1.0"]
    else:
        data, extra = f"data=[{{path: {sample_data['pairs']}, format: mmllm-pairs}}]", []
    args = ["-m", "mmllm.cli", "train", "--config", str(REPO / f"configs/stages/tiny/{STAGES[stage]}.yaml"),
            f"output_dir={out}", "report_to=none", "init_from=null", f"batch_size={batch}", "max_steps=4",
            "grad_accum=2", "optim.name=sgd", "optim.lr=0.05", data, *extra]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "step-4"


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_match_one_process_with_twice_the_batch(stage, sample_data, tmp_path):
    one = _run(stage, sample_data, tmp_path / "one", nproc=1, batch=4)
    two = _run(stage, sample_data, tmp_path / "two", nproc=2, batch=2)
    la = json.loads((one / "training_state/progress.json").read_text())["losses"]
    lb = json.loads((two / "training_state/progress.json").read_text())["losses"]
    assert lb == pytest.approx(la, rel=TOLERANCE)
    files = ["learned.safetensors"] + (["adapter/adapter_model.safetensors"] if stage == "instruct" else [])
    for name in files:
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=TOLERANCE, msg=k)
    # written once, by the main process: one complete checkpoint per save, no stray temp dirs
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith((".", "step-"))) == ["step-4"]


def test_a_process_whose_whole_micro_batch_is_unreadable_does_not_hang(sample_data, tmp_path):
    """batch_size=1 and a missing file: one rank's micro-batch is empty; it must still join the all-reduce."""
    data = tmp_path / "mixed.jsonl"
    good = json.loads(sample_data["pairs"].read_text().splitlines()[0])
    good["media"] = str(sample_data["pairs"].parent / good["media"])
    bad = dict(good, id="broken", media=str(tmp_path / "missing.png"))
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "mmllm.cli", "train", "--config", str(REPO / "configs/stages/tiny/encode_align.yaml"),
           f"output_dir={tmp_path / 'out'}", "report_to=none", "batch_size=1", "max_steps=3",
           f"data=[{{path: {data}, format: mmllm-pairs, allow_outside_root: true}}]"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "step-3" / "manifest.json").is_file()
    assert "skipping sample broken" in proc.stderr
