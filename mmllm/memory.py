"""Running out of memory (``torch.OutOfMemoryError``: a GPU's, or an accelerator's): the one-line error a command
stops with, and freeing what a failed attempt held before another one.

Only ``torch.OutOfMemoryError`` is treated as running out of memory. On CPU, torch 2.14's allocator raises a
plain ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory"), and Linux more often kills the process
(SIGKILL) than fails an allocation: neither is told apart from other errors here.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


class OutOfMemory(Exception):
    """Memory ran out where the message says; the message names what is kept and the settings that need less.
    Raised from the ``torch.OutOfMemoryError`` (its ``__cause__``); ``mmllm`` reports it as one line, exit code 2."""


def first_line(exc: BaseException) -> str:
    """The first line of torch's message ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ..."): the
    rest is its advice about ``PYTORCH_CUDA_ALLOC_CONF``, which the traceback (``-v``) keeps."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def release_memory() -> None:
    """Free what a failed attempt left: Python's unreachable objects (tensors held by reference cycles), then
    the CUDA caching allocator's unused blocks, so that a retry starts from the memory the model itself holds.
    Call it after the exception's frames are gone (outside the ``except`` block): a traceback keeps the failed
    attempt's tensors alive."""
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
