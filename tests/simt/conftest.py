"""Fixtures of the emulated (SIMT) tests."""
import pytest

import simt_build


@pytest.fixture(scope="session")
def simt():
    """torch.ops.fastbn_simt_test; the first use builds it (cached by ninja afterwards)."""
    ops = simt_build.load_test_extension()
    ops.set_schedule("forward")
    return ops
