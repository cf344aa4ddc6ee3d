"""`python -m tests.fsdp_on_cpu ARGS` = `python -m mmllm.cli ARGS`, with Accelerate willing to use FSDP on CPU.

torch's FSDP2 (`fully_shard`) runs on CPU over gloo, but Accelerate only turns `ACCELERATE_USE_FSDP`
into FSDP when the processes have an accelerator device. This launcher lifts that one gate, so that
the training loop's FSDP path (sharded parameters, per-parameter reduce-scatter, gathering before
saving, sharded optimizer state) runs in CI on CPU. It changes nothing else: the FSDP settings come
from the same FSDP_* environment variables `accelerate launch --config_file configs/accelerate/fsdp.yaml`
sets.
"""

import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType

_init = state.PartialState.__init__


def _init_claiming_a_device_type(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    # AcceleratorState switches to FSDP only from a multi-device type; the device itself stays CPU.
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.MULTI_GPU


state.PartialState.__init__ = _init_claiming_a_device_type

if __name__ == "__main__":
    sys.argv = ["mmllm.cli", *sys.argv[1:]]
    runpy.run_module("mmllm.cli", run_name="__main__")
