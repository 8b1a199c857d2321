import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests use tiny models: on 2 shared cores their matmuls spend their time in OpenMP barriers, and one thread
    is up to ~100× faster. (Real runs keep torch's default.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
