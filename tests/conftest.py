import contextlib
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread, as the suite is run by its developers (OMP_NUM_THREADS=1) and as tests/test_infer.py and the
# eval tests set it: without it, `make test` (CI) ran the tests before the first of those with the machine's core
# count and every later test with the 1 they leave set, so a test's thread count depended on which ran before it.
# Set before torch is imported (it reads the variable once); the command lines the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# transformers copies a trust_remote_code model's own Python into HF_MODULES_CACHE (read once, when it is first
# imported; by default ~/.cache/huggingface/modules): the suite wrote into the home folder of every machine that
# ran it, and two runs at once shared that folder. Each run gets its own, removed at its end. (This file is
# imported twice, as pytest's `conftest` and as the tests' `tests.conftest`: the second import keeps the folder.)
_MADE_HF_MODULES = "MMLLM_TESTS_HF_MODULES" not in os.environ
HF_MODULES = os.environ.get("MMLLM_TESTS_HF_MODULES") or tempfile.mkdtemp(prefix="mmllm-tests-hf-modules-")
os.environ["MMLLM_TESTS_HF_MODULES"] = os.environ["HF_MODULES_CACHE"] = HF_MODULES

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def pytest_unconfigure(config):
    if _MADE_HF_MODULES:
        shutil.rmtree(HF_MODULES, ignore_errors=True)


REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "assemblies" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _torch_threads_as_found():
    """A test that sets torch's thread count (a command run with --threads, the eval tests) leaves it as it
    found it: the next test runs on the suite's count, whichever ran before."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_assembly():
    from mmllm.config import load_assembly

    return load_assembly(TINY)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    from mmllm.data.samples import write_sample_dataset

    root = tmp_path_factory.mktemp("samples")
    return write_sample_dataset(root)


@pytest.fixture
def tiny_model(tiny_assembly):
    from mmllm.model import AnyToAnyModel

    return AnyToAnyModel.assemble(tiny_assembly)


def sigint_during_step(monkeypatch, step: int) -> None:
    """Send this process SIGINT once, from inside the forward of training step ``step`` (0-based, as the
    loop counts): the interrupt arrives mid-step, as a Ctrl-C would. ``monkeypatch.undo()`` removes it."""
    import signal

    from mmllm.model import AnyToAnyModel

    real_forward = AnyToAnyModel.forward
    sent = []

    def interrupted(self, batch, losses=None, normalizers=None):
        if batch.get("step") == step and not sent:  # training batches carry their step; validation's do not
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return real_forward(self, batch, losses, normalizers)

    monkeypatch.setattr(AnyToAnyModel, "forward", interrupted)


def signal_on_call(monkeypatch, owner, name: str, call: int, signum: int) -> list[int]:
    """Wrap ``owner.name`` so that its ``call``-th call (1-based) first sends this process ``signum``, as
    if the signal arrived while that call ran; returns the list of calls made so far."""
    real, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)
    return calls



@contextlib.contextmanager
def sigterm_during_a_read_retry(armed: list[float], keep_failing: bool = False) -> Iterator[None]:
    """While entered: once ``armed`` holds one entry (the test's own trigger appends the time it armed the fault),
    the next ``os.pread`` fails (EIO) and sets this process a SIGTERM 0.3 s later (SIGALRM), during that read's
    wait to be tried again (``READ_RETRY_DELAYS`` made 30 s); ``armed`` then gets the failure's time too.
    ``keep_failing``: every later read fails as well, else that one alone (tried again, the read would work).
    The timer and the SIGALRM handler are put back on leaving: a timer left running would SIGTERM the session."""
    import signal
    import time

    from mmllm.data import index as index_module

    real_pread = os.pread

    def pread(fd, length, offset):
        if len(armed) == 1:  # the first failure: the signal comes 0.3 s into its wait
            armed.append(time.monotonic())
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            raise OSError(5, "Input/output error")
        if keep_failing and armed:
            raise OSError(5, "Input/output error")
        return real_pread(fd, length, offset)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "pread", pread)
        mp.setattr(index_module, "READ_RETRY_DELAYS", (30.0, 30.0))
        previous = signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
