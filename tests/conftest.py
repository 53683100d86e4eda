import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tiny model trains several times faster on one thread than two on this 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
