import os

import pytest
import torch

# tests choose their backend explicitly; an inherited forcing variable would
# change what the "auto" tests exercise
os.environ.pop("SPARSEKIT_BACKEND", None)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(4321)
