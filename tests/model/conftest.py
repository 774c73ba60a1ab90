"""Model tests run torch on one thread: the models are tiny, and on a busy 2-core box OpenMP's
spinning threads cost far more CPU than they save (hf generate: 0.13 s vs 2.6 s of CPU)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
