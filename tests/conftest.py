"""Fixtures shared by every test; the helpers themselves live in bn_testing.py."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _fresh_compile_cache():
    """An empty torch.compile cache for the session (also for the benchmarks' subprocesses, through the environment).

    The on-disk cache keys a graph on torch's version and the traced model code, not on the fastbn ops' autograd
    kernels, which run below tracing: a cache written by another checkout would replay that checkout's backward.
    """
    from torch._inductor.utils import fresh_cache

    with fresh_cache():
        yield
