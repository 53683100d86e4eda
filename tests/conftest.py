import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One thread per test process: on a shared 2-core runner two threads spin-wait and run several
    times slower (docs/training.md, "Threads")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
