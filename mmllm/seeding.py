"""Random numbers under a fixed seed, inside a block only: the caller's generators are left as they were
(:func:`seeded` for random initialisation, :func:`global_generators_kept` for a training run)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def default_accelerator() -> torch.device | None:
    """The device new tensors go to when it is an accelerator (``torch.set_default_device("cuda")``, a
    ``with torch.device("cuda:1")`` block); ``None`` for the CPU and for meta, which draw no random numbers
    of their own (meta draws none at all)."""
    device = torch.get_default_device()
    return None if device.type in ("cpu", "meta") else device


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the generators that random initialisation in the block draws from -- the CPU's and the default
    device's when that is an accelerator -- and give every one its state back after the block.

    ``torch.manual_seed`` would also reseed every other device's generator (on a GPU machine whose CUDA is
    not initialised yet, at its initialisation) and ``fork_rng(devices=[])`` gives back the CPU's only: a
    caller's CUDA draws after building a part then depended on which part was built last.
    """
    accelerator = default_accelerator()
    if accelerator is None:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    index = accelerator.index if accelerator.index is not None else torch.accelerator.current_device_index()
    with torch.random.fork_rng(devices=[index], device_type=accelerator.type):
        torch.default_generator.manual_seed(seed)
        with torch.accelerator.device_index(index):  # the module's manual_seed seeds its current device
            torch.get_device_module(accelerator.type).manual_seed(seed)
        yield


@contextlib.contextmanager
def global_generators_kept() -> Iterator[None]:
    """Give Python's, NumPy's and torch's global generators -- the CPU's, and every CUDA device's where the caller
    has initialised CUDA -- the states they had before the block, whether it returns or raises. A training run
    seeds and draws from them; the library caller's own draws after it are then those they would have been
    without it. CUDA a caller has not started is left alone: reading its generators would start it here, and
    under a launcher every process would make a context on every GPU before Accelerate picks its own."""
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    devices = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if devices is not None:
            torch.cuda.set_rng_state_all(devices)
