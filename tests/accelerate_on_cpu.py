"""`python -m tests.accelerate_on_cpu ARGS` = `python -m mmllm.cli ARGS`, with Accelerate willing to run
FSDP or DeepSpeed on CPU processes.

torch's FSDP2 (`fully_shard`) and DeepSpeed ZeRO-1/2 (its CPU accelerator) run on CPU over gloo, but
Accelerate turns `ACCELERATE_USE_FSDP` / `ACCELERATE_USE_DEEPSPEED` into FSDP / DeepSpeed only when the
processes have an accelerator device. This launcher lifts those gates, so that the training loop's FSDP
and ZeRO paths (sharded parameters or partitioned gradients and optimizer state, gathering before
saving, re-sharding on resume) run in CI on CPU. It changes nothing else: the settings come from the
same environment variables `accelerate launch --config_file configs/accelerate/{fsdp,deepspeed_zero2}.yaml`
sets, and the device stays CPU.
"""

import os
import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType

DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
_init, _backend = state.PartialState.__init__, state.PartialState._prepare_backend


def _init_claiming_a_device_type(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    # AcceleratorState switches to FSDP only from a multi-device type; the device itself stays CPU.
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.MULTI_GPU


def _gloo_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    # DeepSpeed is set up only for processes that are not told `cpu`; give them gloo, as CPU processes get.
    return _backend(self, True, sagemaker_dp, backend)


if DEEPSPEED:
    import importlib

    import mmllm.training.loop as loop

    # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce (C++, at first use) beside gloo;
    # gloo alone does the job, and CI then needs no compiler
    # (`deepspeed.comm.torch` as an attribute is torch itself, star-imported: go through importlib)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    loop._has_accelerator_device = lambda: True  # the loop then does not tell Accelerate `cpu`
    state.PartialState._prepare_backend = _gloo_backend
else:
    state.PartialState.__init__ = _init_claiming_a_device_type


def _nan_loss_on(rank: int, steps: set[int]) -> None:
    """Test fault: this process's loss is NaN at ``steps`` (0-based), as a bad sample would make it."""
    from mmllm.model import AnyToAnyModel

    forward = AnyToAnyModel.forward

    def poisoned(self, batch, *args, **kwargs):
        out = forward(self, batch, *args, **kwargs)
        if int(os.environ.get("RANK", "0")) == rank and batch.get("step") in steps:  # training steps only
            out["loss"] = out["loss"] * float("nan")
        return out

    AnyToAnyModel.forward = poisoned


def _signal_on(rank: int, step: int, signum: int) -> None:
    """Test fault: this process alone gets ``signum`` inside the forward of training step ``step`` (0-based)."""
    from mmllm.model import AnyToAnyModel

    forward, sent = AnyToAnyModel.forward, []

    def signalled(self, batch, *args, **kwargs):
        if int(os.environ.get("RANK", "0")) == rank and batch.get("step") == step and not sent:
            sent.append(step)
            os.kill(os.getpid(), signum)
        return forward(self, batch, *args, **kwargs)

    AnyToAnyModel.forward = signalled


def _read_stopped_on(rank: int, step: int) -> None:
    """Test fault: on this process alone, the first read of the data file after training step ``step``'s
    (0-based) forward fails, and a SIGTERM comes during its wait to be tried again (a read that would then work)."""
    import signal

    from mmllm.data import index
    from mmllm.model import AnyToAnyModel

    forward, pread, armed = AnyToAnyModel.forward, os.pread, []

    def arming(self, batch, *args, **kwargs):
        if int(os.environ.get("RANK", "0")) == rank and batch.get("step") == step and not armed:
            armed.append(step)
        return forward(self, batch, *args, **kwargs)

    def failing(fd, length, offset):
        if len(armed) == 1:
            armed.append("failed")
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by training's handler: the wait below sees it
            raise OSError(5, "Input/output error")
        return pread(fd, length, offset)

    AnyToAnyModel.forward = arming
    os.pread = failing
    index.READ_RETRY_DELAYS = (30.0, 30.0)


def _recovery_fails() -> None:
    """Test fault: tidying the output folder before --resume fails (on the main process, which does it)."""
    from mmllm.training import checkpoint

    def fail(out_dir):
        raise PermissionError(13, "Permission denied", str(out_dir / ".step-3.tmp-1-2"))

    checkpoint.recover_partial_writes = fail


def _save_fails() -> None:
    """Test fault: the disk is full when the main process writes a checkpoint."""
    import errno

    from mmllm.training import checkpoint

    def full(final, fill):
        raise OSError(errno.ENOSPC, "No space left on device", str(final))

    checkpoint.atomic_dir = full


def _final_link_fails() -> None:
    """Test fault: the disk is full when the main process writes final.json after the last checkpoint."""
    import errno

    from mmllm.training import loop

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    loop.atomic_write_text = full


if os.environ.get("MMLLM_TEST_FINAL_FAILS"):
    _final_link_fails()

if os.environ.get("MMLLM_TEST_RECOVERY_FAILS"):
    _recovery_fails()

if os.environ.get("MMLLM_TEST_SAVE_FAILS"):
    _save_fails()

if os.environ.get("MMLLM_TEST_SIGNAL"):  # "RANK:STEP:SIGNAME"
    import signal

    _rank, _step, _name = os.environ["MMLLM_TEST_SIGNAL"].split(":")
    _signal_on(int(_rank), int(_step), signal.Signals[_name])

if os.environ.get("MMLLM_TEST_READ_STOPPED"):  # "RANK:STEP"
    _rank, _step = os.environ["MMLLM_TEST_READ_STOPPED"].split(":")
    _read_stopped_on(int(_rank), int(_step))

if os.environ.get("MMLLM_TEST_NAN_LOSS"):  # "RANK:STEP,STEP,..."
    _rank, _steps = os.environ["MMLLM_TEST_NAN_LOSS"].split(":")
    _nan_loss_on(int(_rank), {int(x) for x in _steps.split(",")})

if __name__ == "__main__":
    sys.argv = ["mmllm.cli", *sys.argv[1:]]
    runpy.run_module("mmllm.cli", run_name="__main__")
