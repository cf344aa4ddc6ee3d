"""Running out of memory (:func:`is_out_of_memory`: ``torch.OutOfMemoryError``, a GPU's or an accelerator's, and
the ``RuntimeError`` torch's CPU allocator raises): the one-line error a command stops with, and freeing what a
failed attempt held before another one.

On CPU, torch 2.14's allocator raises a plain ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory
(you tried to allocate N bytes)"), told apart from other runtime errors by that text; Linux more often kills the
process (SIGKILL) than fails an allocation, which no code of the process sees.

Also here: :func:`peak_resident_mb`, the peak resident memory of this process alone, which training logs and the
benches report.
"""

from __future__ import annotations

import gc
import logging
import sys

log = logging.getLogger(__name__)


def peak_resident_mb() -> float | None:
    """This process's own peak resident memory in MB: on Linux its high-water mark (``VmHWM`` in
    ``/proc/self/status``), which starts afresh when the process is exec'd; None where neither it nor
    ``resource`` is available (Windows).

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: on exec Linux folds the resident size the process had just before
    (a fork's copy of its parent) into ``ru_maxrss``, so a process started by a large one (``subprocess`` from a
    bench holding a model, each rank from ``accelerate launch``'s launcher) reports at least its parent's
    resident memory. Elsewhere (macOS, BSD) ``ru_maxrss`` is the fallback, in bytes on macOS, KB on the others.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # "VmHWM:   123456 kB"
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


class OutOfMemory(Exception):
    """Memory ran out where the message says; the message names what is kept and the settings that need less.
    Raised from torch's error (its ``__cause__``, :func:`is_out_of_memory`); ``mmllm`` reports it as one line,
    exit code 2."""


# the start of the message of the RuntimeError torch's CPU allocator raises (c10/core/impl/alloc_cpu.cpp), which
# has no class of its own as the CUDA allocator's torch.OutOfMemoryError has
CPU_ALLOCATOR_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"
# a GPU's memory running out outside torch's caching allocator, which torch raises as a plain RuntimeError: the CUDA
# runtime's cudaErrorMemoryAllocation (an allocation by a library, NCCL's buffers) and cuBLAS failing to allocate its
# workspace
GPU_OUT_OF_MEMORY_TEXTS = ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch running out of memory: ``torch.OutOfMemoryError`` (a GPU's, an accelerator's), a
    GPU's running out outside the caching allocator (:data:`GPU_OUT_OF_MEMORY_TEXTS`), or the plain
    ``RuntimeError`` of its CPU allocator. torch is not imported for it: an error raised where torch was
    never imported is none of its."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError) and any(text in str(exc) for text in GPU_OUT_OF_MEMORY_TEXTS):
        return True
    return ran_out_on_the_host(exc)


def ran_out_on_the_host(exc: BaseException) -> bool:
    """Whether ``exc`` is the CPU allocator's out-of-memory error (the machine's memory, not a GPU's)."""
    return isinstance(exc, RuntimeError) and CPU_ALLOCATOR_OUT_OF_MEMORY in str(exc)


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
