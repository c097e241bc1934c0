import pytest
import torch


@pytest.fixture
def no_onednn():
    """oneDNN compiles a kernel for every new tensor shape, seconds each on the tiny, ever-changing
    workloads of the training tests; the plain CPU kernels are much faster there. Restored after."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = before
