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

