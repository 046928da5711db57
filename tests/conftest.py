"""Test-session setup: without a GPU, Triton kernels run under Triton's CPU interpreter; tests run on one CPU thread."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported, so that @triton.jit builds interpreter kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# AOTAutograd's on-disk cache keys a compiled graph on its forward only (pytorch/pytorch#144344): a changed backward
# of a custom op (`register_autograd`) would be served stale from an earlier run, hiding the change from the tests.
import torch._functorch.config  # noqa: E402

torch._functorch.config.enable_autograd_cache = False


@pytest.fixture(autouse=True)
def one_thread():
    """The tests' tensors are tiny: intra-op threads only add synchronisation (many times slower on a busy host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
