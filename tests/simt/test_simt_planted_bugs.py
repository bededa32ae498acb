"""Bugs a GPU tends to hide, planted on purpose: the emulator must catch every one of them, and must
pass the correct twin of each."""
import textwrap

import pytest
import torch

import simt_build
from simt_helpers import SCHEDULES, assert_schedule_invariant, run_under_schedules

pytestmark = pytest.mark.simt


def test_missing_syncthreads_is_caught(simt):
    x = torch.randn(1024)
    # With the barrier: the same bits under every schedule, and the right sum.
    good = assert_schedule_invariant(simt, lambda: simt.tree_sum(x, True))
    torch.testing.assert_close(good, x.double().sum().float(), rtol=1e-5, atol=1e-4)
    # Without it: running the kernel under different schedules gives different bits ...
    with pytest.raises(AssertionError, match="differ between schedules"):
        assert_schedule_invariant(simt, lambda: simt.tree_sum(x, False))
    # ... and some schedule gives a wrong sum.
    results = run_under_schedules(simt, lambda: simt.tree_sum(x, False))
    assert any(not torch.allclose(r, good, rtol=1e-5, atol=1e-4) for r in results.values())


def test_missing_syncwarp_is_caught(simt):
    x = torch.randn(32)
    good = assert_schedule_invariant(simt, lambda: simt.warp_tree_sum(x, True))
    torch.testing.assert_close(good, x.double().sum().float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="differ between schedules"):
        assert_schedule_invariant(simt, lambda: simt.warp_tree_sum(x, False))


def test_return_before_a_barrier_is_caught(simt):
    with pytest.raises(RuntimeError, match="returned while 16 thread.*__syncthreads at .*planted.cu"):
        simt.early_return(64)


def test_divergent_barriers_are_caught(simt):
    with pytest.raises(RuntimeError, match="divergent barriers"):
        simt.divergent_barriers(64)


def test_the_emulator_recovers_after_an_error(simt):
    with pytest.raises(RuntimeError):
        simt.divergent_barriers(64)
    x = torch.randn(1024)
    torch.testing.assert_close(simt.tree_sum(x, True), x.double().sum().float(), rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def asan():
    if simt_build.asan_runtime() is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime")


def _under_asan(body):
    script = "import torch, simt_build\nops = simt_build.load_asan_test_extension()\n" + textwrap.dedent(body)
    return simt_build.run_under_asan(script + "\nprint('finished')\n")


def test_in_bounds_kernels_run_clean_under_asan(asan, simt):
    # No false positives from the fibers' stack switching, the pooled stacks or the block threads.
    result = _under_asan(
        """
        y = torch.zeros(1000)
        ops.write_range_(y, 0, 64)
        assert y[999].item() == 999.0
        out = torch.zeros(64)
        ops.shared_write_(out, 0)
        assert out.tolist() == list(range(64))
        """
    )
    assert result.returncode == 0 and "finished" in result.stdout, result.stderr[-4000:]
    # The same in-bounds shared-memory kernel in the ordinary build.
    assert simt.shared_write(64, 0).tolist() == list(range(64))


def test_out_of_bounds_global_write_is_caught_by_asan(asan):
    # One float past the end of a 1000-float tensor: a GPU writes it silently.
    result = _under_asan("ops.write_range_(torch.zeros(1000), 1, 64)")
    assert result.returncode != 0 and "finished" not in result.stdout
    assert "heap-buffer-overflow" in result.stderr and "WRITE of size 4" in result.stderr, result.stderr[-4000:]
    assert "write_range_kernel" in result.stderr, "the report's stack names the kernel"


def test_out_of_bounds_shared_write_is_caught_by_asan(asan):
    # tile[threadIdx.x + 1] of a blockDim.x-float dynamic shared tile: the last thread writes past it.
    result = _under_asan("ops.shared_write_(torch.zeros(64), 1)")
    assert result.returncode != 0 and "finished" not in result.stdout
    assert "heap-buffer-overflow" in result.stderr and "shared_write_kernel" in result.stderr, result.stderr[-4000:]
    assert "block (0,0,0), thread (63,0,0)" in result.stderr, "the emulator names the CUDA thread"
