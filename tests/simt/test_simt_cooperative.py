"""Cooperative launches: all blocks resident, grid barriers."""
import pytest
import torch

from simt_helpers import assert_schedule_invariant

pytestmark = pytest.mark.simt


@pytest.mark.parametrize("blocks,threads", [(1, 64), (5, 128), (16, 64)])
def test_persistent_reduce_then_normalize(simt, blocks, threads):
    x = torch.randn(7001) + 3
    y, total = assert_schedule_invariant(simt, lambda: simt.center_cooperative(x, blocks, threads))
    torch.testing.assert_close(total, x.double().sum().float(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(y, x - total / x.numel(), rtol=0, atol=0)


def test_grid_barrier_holds_every_block_back(simt):
    phases, blocks = 3, 6
    out = assert_schedule_invariant(simt, lambda: simt.count_phases(phases, blocks, 64))
    assert out[:phases].tolist() == [blocks] * phases
    assert out[phases:].tolist() == [blocks] * (phases * blocks)


def test_grid_barrier_outside_cooperative_launch_is_an_error(simt):
    with pytest.raises(RuntimeError, match="not launched with fastbn::launch_cooperative"):
        simt.grid_sync_in_ordinary_launch()


def test_too_many_blocks_for_a_cooperative_launch(simt):
    before = simt.resident_blocks()
    simt.set_resident_blocks(4)
    try:
        with pytest.raises(RuntimeError, match="cudaErrorCooperativeLaunchTooLarge"):
            simt.count_phases(1, 5, 32)
        simt.count_phases(1, 4, 32)
    finally:
        simt.set_resident_blocks(before)
