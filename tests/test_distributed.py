"""Two processes on CPU (gloo) with per-process batch b match one process with batch 2b: the same
losses and the same final trainable weights, for every stage, under DDP and under FSDP (the shipped
configs/accelerate/ddp.yaml and fsdp.yaml; see tests.accelerate_on_cpu.py). Checkpoints are written once, and an FSDP
run resumes with its sharded optimizer state restored."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.test_folder_lock import held_by_another_process
from tests.test_stages import STAGES

# Losses and weights agree to float32 reduction order (1e-5). The runs use SGD: Adam divides by
# sqrt(v), so a gradient that is zero in exact arithmetic (attention key biases) would turn
# reduction-order noise into steps of about lr and hide what this test checks -- that the two
# runs compute the same gradients.
TOLERANCE = 1e-5
BF16_REL = 1e-2  # bf16 keeps 8 significant bits (~0.4% a rounding); measured: 0.04%


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, launcher: str) -> list[str]:
    """The command that runs `mmllm.cli ...` in ``nproc`` processes."""
    if nproc == 1:
        return [sys.executable, "-m", "mmllm.cli"]
    # the shipped config as users launch it, on CPU processes without mixed precision (DDP on CPU is
    # Accelerate's MULTI_CPU; torchrun is exercised by the unreadable-micro-batch test below)
    module = "mmllm.cli" if launcher == "ddp" else "tests.accelerate_on_cpu"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / f"configs/accelerate/{launcher}.yaml"), f"--num_processes={nproc}", "--mixed_precision=no",
            f"--main_process_port={_free_port()}", *_per_process_logs(), "-m", module]


PER_RUN_LOG_DIR = "--log_dir=(a new folder per run)"  # what _run puts in its place


def _per_process_logs() -> list[str]:
    """Launcher flags that keep each process's stdout and stderr in its own file as well as on the console
    (torchrun's --tee under --log_dir): when a launch fails, :func:`_run` names what each process said,
    which the launcher's ChildFailedError summary at the end of the combined stderr would otherwise bury.
    The folder is :func:`_run`'s, made for each run and removed after it: a command built and not run (or run
    twice) makes none of its own."""
    return [PER_RUN_LOG_DIR, "--tee=3"]


def _what_each_process_said(log_dir: Path, chars: int = 3000) -> str:
    """The end of each process's own stderr (and its exit-time crash, if any) from the files
    :func:`_per_process_logs` asked for, in ``log_dir``."""
    said = []
    for log in sorted(log_dir.glob("*/attempt_*/*/stderr.log")):
        text = log.read_text(errors="replace")
        said.append(f"\n--- process {log.parent.name} ({log.parent.parent.name}), the end of its stderr:\n"
                    f"{text[-chars:] or '(nothing)'}")
    return "".join(said)


def _stage_args(stage, sample_data, out, batch, *extra):
    if stage == "instruct":
        # the text-only conversation again, weighted up, so that the retention KL (normalised over
        # the whole step's text-only tokens) is part of what the two runs must agree on
        chat = sample_data["chat"]
        plain = out.parent / f"{out.name}-plain.jsonl"
        plain.write_text("".join(line + "\n" for line in chat.read_text().splitlines() if '"chat-plain"' in line))
        data = (f"data=[{{path: {chat}, format: mmllm-chat}}, "
                f"{{path: {plain}, format: mmllm-chat, weight: 8, allow_outside_root: true}}]")
        extra = ("losses.retain=1.0", *extra)
        held_out = f"eval_data=[{{path: {chat}, format: mmllm-chat}}]"
    else:
        data = f"data=[{{path: {sample_data['pairs']}, format: mmllm-pairs}}]"
        held_out = f"eval_data=[{{path: {sample_data['pairs']}, format: mmllm-pairs}}]"
    # scored at steps 2 and 4, each process its share (uneven: padded batches join the collectives)
    return ["train", "--config", str(REPO / f"configs/stages/tiny/{STAGES[stage]}.yaml"),
            f"output_dir={out}", "report_to=none", "init_from=null", f"batch_size={batch}", "max_steps=4",
            "grad_accum=2", data, held_out, "eval_every=2", *extra]


def _run(cmd: list[str], expect: int = 0, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    with tempfile.TemporaryDirectory(prefix="mmllm-ranks-") as log_dir:  # this run's per-process logs
        cmd = [f"--log_dir={log_dir}" if c == PER_RUN_LOG_DIR else c for c in cmd]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after 600 s: {cmd}{_what_each_process_said(Path(log_dir))}")
        each = _what_each_process_said(Path(log_dir))
    assert proc.returncode == expect, \
        f"exit code {proc.returncode}, not {expect}; the end of its stderr:\n{proc.stderr[-3000:]}{each}"
    return proc


def _assert_same_weights(a, b, stage, atol):
    files = ["learned.safetensors"] + (["adapter/adapter_model.safetensors"] if stage == "instruct" else [])
    for name in files:
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=atol, msg=k)


def _losses(checkpoint):
    return json.loads((checkpoint / "training_state/progress.json").read_text())["losses"]


def _per_step(stderr: str) -> tuple[float, float]:
    """(samples, tokens) per step of the run, from its one report line (at step 4): rate x seconds per step."""
    found = re.findall(r"step 4/4: .*?, ([\d.e+-]+) s/step, ([\d.e+-]+) samples/s, ([\d.e+-]+) tokens/s", stderr)
    assert len(found) == 1, stderr[-3000:]  # the main process's alone
    step_s, samples, tokens = map(float, found[0])
    return samples * step_s, tokens * step_s


def _validation(checkpoint):
    return json.loads((checkpoint / "training_state/progress.json").read_text())["validation"]


@pytest.fixture(scope="module")
def one_process_runs(sample_data, tmp_path_factory):
    """Per stage, the 1-process batch-4 reference run (made once, shared by the DDP and FSDP tests)."""
    root, done = tmp_path_factory.mktemp("one"), {}

    def get(stage):
        if stage not in done:
            out = root / stage
            proc = _run(_launch(1, "") + _stage_args(stage, sample_data, out, 4, "optim.name=sgd", "optim.lr=0.05"))
            (out / "stderr.txt").write_text(proc.stderr)
            done[stage] = out / "step-4"
        return done[stage]

    return get


# ZeRO-2's other two stages take 30 s each and add nothing the instruct stage does not exercise
_SLOW_ZERO = [pytest.param(s, "deepspeed_zero2", marks=pytest.mark.slow) for s in STAGES if s != "instruct"]


@pytest.mark.parametrize(("stage", "launcher"), [(s, launch) for s in STAGES for launch in ("ddp", "fsdp")]
                         + [("instruct", "deepspeed_zero2")] + _SLOW_ZERO)
def test_two_processes_match_one_process_with_twice_the_batch(stage, launcher, sample_data, one_process_runs,
                                                              tmp_path):
    one = one_process_runs(stage)
    proc = _run(_launch(2, launcher) + _stage_args(stage, sample_data, tmp_path / "two", 2,
                                                   "optim.name=sgd", "optim.lr=0.05"))
    kind = {"ddp": "MULTI_", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}[launcher]
    assert f"2 process(es), {kind}" in proc.stderr
    assert proc.stderr.count("process(es)") == 1  # the other process logs warnings only
    held, total = map(float, re.search(r"holds ([\d.]+) of the model's ([\d.]+) MB", proc.stderr).groups())
    assert held < 0.9 * total if launcher == "fsdp" else held == total  # FSDP shards; DDP, ZeRO-2 replicate
    two = tmp_path / "two" / "step-4"
    # the report counts the samples and real tokens of every process: the same per step as one process's
    # (the line gives 4 significant digits)
    samples, tokens = _per_step(proc.stderr)
    assert samples == pytest.approx(8, rel=1e-2)  # 2 processes x batch 2 x grad_accum 2
    assert tokens == pytest.approx(_per_step((one.parent / "stderr.txt").read_text())[1], rel=1e-2)
    assert _losses(two) == pytest.approx(_losses(one), rel=TOLERANCE)
    _assert_same_weights(one, two, stage, TOLERANCE)
    assert [v["step"] for v in _validation(one)] == [2, 4]
    for a, b in zip(_validation(one), _validation(two), strict=True):
        assert b == pytest.approx(a, rel=TOLERANCE)
    # written once, by the main process: one complete checkpoint per save, no stray temp dirs
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith((".", "step-"))) == ["step-4"]


@pytest.mark.slow  # 45 s: three runs; the sampler's shares are checked in tests/test_length_grouping.py
def test_two_processes_grouped_by_length_read_their_share_of_one_process_with_twice_the_batch(
        sample_data, one_process_runs, tmp_path):
    """group_by_length sorts each global micro-batch (batch x processes samples); each process takes its
    contiguous share, so 2 processes with batch 2 train what 1 process with batch 4 does."""
    args = ("optim.name=sgd", "optim.lr=0.05", "group_by_length=true")
    _run(_launch(1, "") + _stage_args("instruct", sample_data, tmp_path / "one", 4, *args))
    _run(_launch(2, "ddp") + _stage_args("instruct", sample_data, tmp_path / "two", 2, *args))
    one, two = tmp_path / "one" / "step-4", tmp_path / "two" / "step-4"
    assert _losses(one) != pytest.approx(_losses(one_process_runs("instruct")), rel=1e-3)  # grouping is on
    assert _losses(two) == pytest.approx(_losses(one), rel=TOLERANCE)
    _assert_same_weights(one, two, "instruct", TOLERANCE)
    assert json.loads((two / "mmllm.json").read_text())["stage"]["group_by_length"] is True


def test_fsdp_and_zero2_with_the_shipped_configs_bf16_compute_what_ddp_computes(sample_data, one_process_runs, tmp_path):
    """bf16 under FSDP and DeepSpeed is autocast, as under DDP: each parameter keeps its dtype (FSDP
    leaves the frozen encoders and decoders out altogether; DeepSpeed's own bf16, which casts the whole
    module, is replaced), so the three agree to reduction order and stay near fp32."""
    args = ("optim.name=sgd", "optim.lr=0.05")
    runs = {}
    for launcher in ("fsdp", "ddp", "deepspeed_zero2"):  # the shipped configs say bf16
        cmd = [c for c in _launch(2, launcher) if c != "--mixed_precision=no"]
        proc = _run(cmd + _stage_args("instruct", sample_data, tmp_path / launcher, 2, *args))
        assert re.search(r"mixed precision bf16|mixed precision bfloat16 \(autocast\)", proc.stderr)
        runs[launcher] = _losses(tmp_path / launcher / "step-4")
    assert runs["fsdp"] == pytest.approx(runs["ddp"], rel=1e-6)  # measured: equal
    assert runs["deepspeed_zero2"] == pytest.approx(runs["ddp"], rel=1e-6)
    assert runs["ddp"] == pytest.approx(_losses(one_process_runs("instruct")), rel=BF16_REL)


@pytest.mark.parametrize("launcher", ["torchrun", "fsdp", pytest.param("deepspeed_zero2", marks=pytest.mark.slow)])
def test_a_process_whose_whole_micro_batch_is_unreadable_does_not_hang(launcher, sample_data, tmp_path):
    """batch_size=1 and a missing file: one rank's micro-batch is empty; it must still join the
    collectives (DDP's all-reduce; FSDP's all-gathers and reduce-scatters)."""
    data = tmp_path / "mixed.jsonl"
    good = json.loads(sample_data["pairs"].read_text().splitlines()[0])
    good["media"] = str(sample_data["pairs"].parent / good["media"])
    bad = dict(good, id="broken", media=str(tmp_path / "missing.png"))
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "mmllm.cli"] if launcher == "torchrun" else _launch(2, launcher))
    proc = _run(launch + ["train", "--config", str(REPO / "configs/stages/tiny/encode_align.yaml"),
                          f"output_dir={tmp_path / 'out'}", "report_to=none", "batch_size=1", "max_steps=3",
                          f"data=[{{path: {data}, format: mmllm-pairs, allow_outside_root: true}}]"])
    assert (tmp_path / "out" / "step-3" / "manifest.json").is_file()
    assert "skipping sample broken" in proc.stderr


def test_a_run_saved_by_two_fsdp_processes_resumes_in_one(sample_data, tmp_path):
    """The optimizer state is saved whole and by parameter name, and the sampler reads the same samples
    for W processes x batch b as for one with W*b: a 2-process FSDP run continues in one process."""
    args = ("optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "save_every=2")
    _run(_launch(1, "") + _stage_args("instruct", sample_data, tmp_path / "one", 4, *args))
    _run(_launch(2, "fsdp") + _stage_args("instruct", sample_data, tmp_path / "cut", 2, *args))
    shutil.rmtree(tmp_path / "cut" / "step-4")
    proc = _run(_launch(1, "") + _stage_args("instruct", sample_data, tmp_path / "cut", 4, *args) + ["--resume"])
    assert "resumed from" in proc.stderr
    one, resumed = tmp_path / "one" / "step-4", tmp_path / "cut" / "step-4"
    assert _losses(resumed) == pytest.approx(_losses(one), rel=TOLERANCE)
    _assert_same_weights(one, resumed, "instruct", TOLERANCE)


def test_fsdp_version_1_is_refused_and_version_2_gets_autocast():
    from types import SimpleNamespace

    from mmllm.config import ConfigError
    from mmllm.training.loop import _autocast_under_fsdp

    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        _autocast_under_fsdp(SimpleNamespace(fsdp_version=1, mixed_precision_policy=None))
    plugin = SimpleNamespace(fsdp_version=2, mixed_precision_policy="bf16 for everything")
    _autocast_under_fsdp(plugin)
    assert plugin.mixed_precision_policy.param_dtype is None
    assert plugin.mixed_precision_policy.reduce_dtype == torch.float32


@pytest.mark.parametrize(("launcher", "optim"), [("fsdp", "adamw"), ("deepspeed_zero2", "adamw"),
                                                  pytest.param("deepspeed_zero2", "sgd", marks=pytest.mark.slow)])
def test_a_sharded_run_resumes_with_its_optimizer_state(launcher, optim, sample_data, tmp_path):
    """FSDP shards AdamW's moments like the parameters, ZeRO-2 partitions them across the processes:
    saved whole and by name, re-sharded on resume, so the resumed run ends where the uninterrupted one
    does (without the moments the resumed steps would differ by about lr). SGD without momentum keeps
    no state, yet its learning rate at the step the run stopped must still come back."""
    args = ("save_every=2", f"optim.name={optim}", "optim.momentum=0")
    _run(_launch(2, launcher) + _stage_args("instruct", sample_data, tmp_path / "full", 2, *args))
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "step-4")  # as if killed after step 2's checkpoint
    (cut / "final.json").unlink()
    proc = _run(_launch(2, launcher) + _stage_args("instruct", sample_data, cut, 2, *args) + ["--resume"])
    assert "resumed from" in proc.stderr
    full, resumed = tmp_path / "full" / "step-4", cut / "step-4"
    assert _losses(resumed) == pytest.approx(_losses(full), rel=1e-6)
    _assert_same_weights(full, resumed, "instruct", 1e-6)


@pytest.mark.parametrize("momentum", [0.9, pytest.param(0.0, marks=pytest.mark.slow)])
def test_optimizer_state_moves_between_one_process_and_zero2(momentum, sample_data, tmp_path):
    """One layout for the optimizer state (torch's, by parameter name, whole): a run saved by one process
    continues under ZeRO-2, which partitions it, and what ZeRO-2 saves continues in one process again --
    both ending where an uninterrupted one-process run ends. Without momentum SGD keeps no state, and
    only the groups' hyperparameters (the learning rate reached) travel."""
    args = ("optim.name=sgd", "optim.lr=0.05", f"optim.momentum={momentum}", "save_every=1", "keep_last=0")
    whole = _run(_launch(1, "") + _stage_args("instruct", sample_data, tmp_path / "one", 4, *args))
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(tmp_path / "one" / "step-1", cut / "step-1")
    part = _run(_launch(2, "deepspeed_zero2") + _stage_args("instruct", sample_data, cut, 2, *args) + ["--resume"])
    held = [float(re.search(r"holds ([\d.]+) MB of optimizer state", p.stderr).group(1)) for p in (whole, part)]
    if momentum:
        assert 0.4 * held[0] < held[1] < 0.6 * held[0]  # ZeRO: each of 2 processes holds half the momentum
    one, zero2 = tmp_path / "one" / "step-4", cut / "step-4"
    assert _losses(zero2) == pytest.approx(_losses(one), rel=TOLERANCE)
    _assert_same_weights(one, zero2, "instruct", TOLERANCE)
    for later in ("step-3", "step-4"):  # back to ZeRO-2's step 2, in one process
        shutil.rmtree(cut / later)
    _run(_launch(1, "") + _stage_args("instruct", sample_data, cut, 4, *args) + ["--resume"])
    assert _losses(cut / "step-4") == pytest.approx(_losses(one), rel=TOLERANCE)
    _assert_same_weights(one, cut / "step-4", "instruct", TOLERANCE)


def test_a_non_finite_loss_on_one_zero2_process_skips_the_step_on_all(sample_data, tmp_path):
    """Under ZeRO-2 the engine steps; a NaN loss on process 1 alone still skips the update everywhere
    (the weights after step 2 equal those after step 1), names the samples, and a run of them stops."""
    launch = _launch(2, "deepspeed_zero2")
    args = _stage_args("decode-align", sample_data, tmp_path / "a", 2, "save_every=1", "keep_last=0")
    proc = _run(launch + args, MMLLM_TEST_NAN_LOSS="1:1")
    assert "step 2: non-finite loss or gradient" in proc.stderr
    s1, s2, s3 = (load_file(str(tmp_path / f"a/step-{i}/learned.safetensors")) for i in (1, 2, 3))
    assert all(torch.equal(s1[k], s2[k]) for k in s1), "a skipped step must not change the weights"
    assert not all(torch.equal(s2[k], s3[k]) for k in s2)
    args = _stage_args("decode-align", sample_data, tmp_path / "b", 2, "max_nonfinite_steps=2")
    proc = _run(launch + args, expect=1, MMLLM_TEST_NAN_LOSS="0:0,1,2,3")
    assert "2 steps in a row had a non-finite loss or gradient" in proc.stderr


def test_a_signal_on_one_process_stops_all_after_the_same_step_with_its_exit_code(sample_data, tmp_path):
    """SIGINT reaching process 1 alone (mid step 2): both processes finish step 2, save it once and stop with
    130; the main process says so once. Process 0 exited 143 (it did not know which signal), and both printed
    the stop message. (The launcher kills whichever process is still exiting when the first has gone, so
    one of them may show -15.)"""
    args = _stage_args("decode-align", sample_data, tmp_path / "a", 2, "max_steps=6", "eval_data=[]", "eval_every=0")
    proc = _run(_launch(2, "fsdp") + args, expect=1, MMLLM_TEST_SIGNAL="1:1:SIGINT")  # the launcher: a child failed
    assert sorted(p.name for p in (tmp_path / "a").glob("step-*")) == ["step-2"]
    assert proc.stderr.count("stopped by SIGINT after step 2 of 6") == 1
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert "130" in codes and set(codes) <= {"130", "-15"}, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("grouped", [False, True])
def test_a_read_given_up_on_a_stop_on_one_process_stops_all_before_that_step_and_resumes_exactly(
        grouped, sample_data, tmp_path):
    """A SIGTERM on process 1 while a sample it drew for step 3 waited for its failed read to be tried again: that
    sample was skipped and step 3 trained without it (the other process knew nothing of it until the step's end),
    then saved, so --resume did not end on the uninterrupted run's losses. Now both processes stop before step 3
    (told in the step's count reduction; grouped, the chunk's lengths are still exchanged: no process waits
    alone in a collective), save step 2, and the resumed run ends where the uninterrupted one does."""
    launch = _launch(2, "fsdp")
    extra = ("eval_data=[]", "eval_every=0", "save_every=0", *(["group_by_length=true"] if grouped else []))
    full = tmp_path / "full"
    _run(launch + _stage_args("decode-align", sample_data, full, 2, *extra))
    part = tmp_path / "part"
    proc = _run(launch + _stage_args("decode-align", sample_data, part, 2, *extra), expect=1,
                MMLLM_TEST_READ_STOPPED="1:1")
    assert sorted(p.name for p in part.glob("step-*")) == ["step-2"], proc.stderr[-3000:]
    assert proc.stderr.count("stopped by SIGTERM after step 2 of 4") == 1
    assert "stopped before step 3, whose samples were being read" in proc.stderr
    _run(launch + _stage_args("decode-align", sample_data, part, 2, *extra, "--resume"))
    assert _losses(part / "step-4") == pytest.approx(_losses(full / "step-4"), rel=TOLERANCE)


def test_zero2_takes_the_stage_settings_and_refuses_what_it_cannot_run():
    from types import SimpleNamespace

    from mmllm.config import ConfigError
    from mmllm.training import zero

    cfg = SimpleNamespace(batch_size=2, grad_accum=3, optim=SimpleNamespace(max_grad_norm=1.0))
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": True}}
    assert zero.configure(SimpleNamespace(deepspeed_config=ds), cfg, world=4) == "bfloat16 (autocast)"
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (2, 3, 24, 1.0)
    assert ds["bf16"] == {"enabled": False} and ds["torch_autocast"]["lower_precision_safe_modules"] == []
    for bad, match in (({"zero_optimization": {"stage": 3}}, "stage 3"),
                       ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": "true"}}, "fp16"),
                       ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload"),
                       ({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}, "round_robin")):
        with pytest.raises(ConfigError, match=match):
            zero.configure(SimpleNamespace(deepspeed_config=bad), cfg, world=2)


def test_the_shipped_cpu_config_starts_two_processes(sample_data, tmp_path):
    """docs/distributed.md: `accelerate launch --config_file configs/accelerate/cpu_2proc.yaml ...` as written, no flags
    added (a MULTI_CPU config started one process)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate/cpu_2proc.yaml"), f"--main_process_port={_free_port()}", "-m", "mmllm.cli"]
    proc = _run(cmd + _stage_args("decode-align", sample_data, tmp_path / "run", 2))
    assert "2 process(es)" in proc.stderr


def test_the_shipped_cpu_config_hides_the_gpus_from_both_processes(tmp_path):
    """cpu_2proc.yaml on a machine with one GPU gave process 1 cuda:1: it hid no GPU. Its processes see
    CUDA_VISIBLE_DEVICES naming no device, as torch reads the variable (CUDA's rule: up to the first invalid
    index)."""
    script = tmp_path / "devices.py"
    script.write_text("import os, torch\n"
                      "print('visible', os.environ['RANK'], torch.cuda._parse_visible_devices(), flush=True)\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs/accelerate/cpu_2proc.yaml"), f"--main_process_port={_free_port()}", str(script)]
    seen = sorted(line for line in _run(cmd).stdout.splitlines() if line.startswith("visible"))
    assert seen == ["visible 0 []", "visible 1 []"]


@pytest.mark.slow
def test_two_processes_resume_with_their_own_lora_dropout_masks(sample_data, tmp_path):
    """Each process draws its own dropout masks (its sequences differ in length, so its generator moves
    on differently): every process's RNG state is saved and each gets its own back. Only the main
    process's used to be saved, and a resumed 2-process run with LoRA dropout drifted from step 7."""
    lora = tmp_path / "lora.yaml"
    lora.write_text("r: 4\nalpha: 8\ndropout: 0.3\ntarget_modules: [q_proj, v_proj]\n")
    args = ("save_every=2", "keep_last=0", f"lora={lora}")
    _run(_launch(2, "ddp") + _stage_args("instruct", sample_data, tmp_path / "full", 2, *args))
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "step-4")
    (cut / "final.json").unlink()
    _run(_launch(2, "ddp") + _stage_args("instruct", sample_data, cut, 2, *args) + ["--resume"])
    full, resumed = tmp_path / "full" / "step-4", cut / "step-4"
    assert _losses(resumed) == _losses(full)
    _assert_same_weights(full, resumed, "instruct", 0)


def test_a_failed_recovery_before_resume_stops_every_process_with_its_error(sample_data, tmp_path):
    """The main process tidies the output folder before --resume; when that failed, the others waited at the
    barrier after it until the launcher killed them, saying nothing."""
    args = _stage_args("decode-align", sample_data, tmp_path / "a", 2, "max_steps=2", "eval_data=[]", "eval_every=0")
    _run(_launch(2, "fsdp") + args + ["max_steps=1"])
    proc = _run(_launch(2, "fsdp") + args + ["--resume"], expect=1, MMLLM_TEST_RECOVERY_FAILS="1")
    said = "--resume: could not tidy what a killed checkpoint write left in"
    assert proc.stderr.count(said) == 2, proc.stderr[-3000:]  # once per process
    assert sorted(p.name for p in (tmp_path / "a").glob("step-*")) == ["step-1"]


def test_a_failed_checkpoint_write_stops_every_process_with_its_error(sample_data, tmp_path):
    """The main process writes checkpoints; when a write failed (a full disk) the others waited at the barrier
    after it until the launcher killed them."""
    args = _stage_args("decode-align", sample_data, tmp_path / "a", 2, "max_steps=1", "eval_data=[]", "eval_every=0")
    proc = _run(_launch(2, "fsdp") + args, expect=1, MMLLM_TEST_SAVE_FAILS="1")
    assert proc.stderr.count("could not write the checkpoint") == 2, proc.stderr[-3000:]  # once per process


def test_a_failed_final_link_stops_every_process_with_its_error(sample_data, tmp_path):
    """final.json is the main process's last write; when it failed the others waited at the barrier after it."""
    args = _stage_args("decode-align", sample_data, tmp_path / "a", 2, "max_steps=1", "eval_data=[]", "eval_every=0")
    proc = _run(_launch(2, "fsdp") + args, expect=1, MMLLM_TEST_FINAL_FAILS="1")
    assert proc.stderr.count("final.json (No space left on device); the stage's checkpoints are written") == 2, \
        proc.stderr[-3000:]
    assert (tmp_path / "a" / "step-1").is_dir() and not (tmp_path / "a" / "final.json").exists()


@pytest.mark.slow  # 24 s; the lock itself is tested in tests/test_folder_lock.py
def test_a_launch_into_an_output_dir_another_run_holds_stops_every_process_with_the_holder_named(
        sample_data, tmp_path):
    """Only the main process takes output_dir's lock; refused, it tells the others, which would otherwise wait
    at the next collective until the launcher killed them."""
    out = tmp_path / "a"
    args = _stage_args("decode-align", sample_data, out, 2, "max_steps=1", "eval_data=[]", "eval_every=0")
    with held_by_another_process(out) as first:
        proc = _run(_launch(2, "ddp") + args, expect=1)
    said = f"{out} is in use by another mmllm process (pid {first.pid} on host"
    assert proc.stderr.count(said) == 2, proc.stderr[-3000:]  # once per process
    assert not list(out.glob("step-*"))


def test_a_launch_built_and_not_run_makes_no_folder(tmp_path, monkeypatch):
    """Its per-process log folder was made when the command was built: one never run left it behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cmd = _launch(2, "ddp")
    assert "--tee=3" in cmd and list(tmp_path.iterdir()) == []


def test_a_failed_launch_names_what_each_process_said(tmp_path, monkeypatch):
    """A child's own error used to be lost: the assertion kept the end of the combined stderr, where the
    launcher's ChildFailedError summary (exit code, no traceback) and the other process's output bury it."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the run's log folder goes
    script = tmp_path / "fails_on_1.py"
    script.write_text("import os, sys\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    sys.exit('process 1 gave up: the reason it gave')\n"
                      "print('noise ' * 2000, file=sys.stderr)\n")
    cmd = [*_launch(2, "ddp")[:-2], str(script)]  # the launcher and its flags, this script instead of mmllm
    with pytest.raises(AssertionError) as failed:
        _run(cmd)
    said = str(failed.value)  # (pytest indents the lines of an assertion's message)
    assert re.search(r"--- process 1 \(attempt_0\), the end of its stderr:\s+process 1 gave up: the reason it gave",
                     said), said
    assert "--- process 0 (attempt_0)" in said
    assert list(temp.iterdir()) == []  # the run's log folder is removed
