"""`python -m tests.faulty_rank ARGS` = `python -m mmllm.cli ARGS`, with one process of a run made to fail (or to
hang) where ``MMLLM_TEST_FAULT`` says, for the tests of tests/test_rank_faults.py.

``MMLLM_TEST_FAULT=RANK:STEP:KIND``: the process ``RANK`` (``RANK`` in its environment), in the forward of training
step ``STEP`` (0-based), or in the main process's write of ``final.json`` (``STEP`` ``final``), does ``KIND``:

- ``oom``: raises ``torch.OutOfMemoryError``, as a GPU whose memory ran out does;
- ``fault``: raises a ``RuntimeError`` (a fault of mmllm or of what it runs);
- ``stuck``: sleeps for 10 minutes, as a process waiting in an NCCL collective for a peer that will not come does
  (gloo fails a collective as soon as the peer's process exits, NCCL waits for its timeout).

Several faults: separated by ``;``.
"""

import os
import runpy
import sys
import time


def _do(kind: str) -> None:
    import torch

    if kind == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (a test's fault)")
    if kind == "fault":
        raise RuntimeError("a fault of mmllm (a test's)")
    if kind == "stuck":
        time.sleep(600)
        return
    raise ValueError(f"unknown test fault {kind!r}")


def _in_forward(step: int, kind: str) -> None:
    from mmllm.model import AnyToAnyModel

    forward = AnyToAnyModel.forward

    def faulty(self, batch, *args, **kwargs):
        if batch.get("step") == step:  # training steps only
            _do(kind)
        return forward(self, batch, *args, **kwargs)

    AnyToAnyModel.forward = faulty


def _in_final_link(kind: str) -> None:
    from mmllm.training import loop

    def faulty(path, text):
        _do(kind)

    loop.atomic_write_text = faulty


for _fault in filter(None, os.environ.get("MMLLM_TEST_FAULT", "").split(";")):
    _rank, _where, _kind = _fault.split(":")
    if int(os.environ.get("RANK", "0")) == int(_rank):
        _in_final_link(_kind) if _where == "final" else _in_forward(int(_where), _kind)

if __name__ == "__main__":
    sys.argv = ["mmllm.cli", *sys.argv[1:]]
    runpy.run_module("mmllm.cli", run_name="__main__")
