import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "assemblies" / "tiny.yaml"


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
