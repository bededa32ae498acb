"""Warp, block and multi-block grid reductions of csrc/cuda/device_utils.cuh, run by the emulator."""
import pytest
import torch

from simt_helpers import assert_schedule_invariant

pytestmark = pytest.mark.simt


def test_warp_reduce_sums_each_warp(simt):
    x = torch.randn(32 * 6)
    out = assert_schedule_invariant(simt, lambda: simt.warp_sums(x))
    torch.testing.assert_close(out, x.view(-1, 32).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [32, 96, 256, 1024])
def test_block_reduce_every_thread_gets_the_total(simt, threads):
    # 3 blocks, 3 back-to-back block_reduce calls on one scratch buffer, written by a different thread
    # each time: correct only if all threads agree and the scratch reuse is fenced by a barrier.
    x = torch.randn(5000, dtype=torch.float64)
    out = assert_schedule_invariant(simt, lambda: simt.block_sums(x, 3, threads, 3))
    blocks = torch.stack([x[torch.arange(5000) // threads % 3 == b].sum() for b in range(3)])
    expected = blocks[:, None] * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_block_welford_matches_two_pass(simt):
    x = 1e4 + torch.randn(3000)  # large mean: a naive sum of squares loses everything in float32
    out = assert_schedule_invariant(simt, lambda: simt.block_stats(x, 256))
    assert torch.equal(out, out[:1].expand_as(out)), "threads disagree on the block's statistics"
    mean, m2, count = out[0].tolist()
    xd = x.double()
    assert count == 3000
    assert mean == pytest.approx(xd.mean().item(), rel=1e-6)
    assert m2 / count == pytest.approx(xd.var(unbiased=False).item(), rel=1e-3)


def test_block_welford_merge_of_unequal_counts(simt):
    # Random (mean, m2, count) triples per thread: the merge tree must give every thread the same bits
    # and match the exact pooled statistics. Widely spread means and counts make the merge's rounding
    # depend on operand order, so a tree that lets partners combine in different orders shows here.
    g = torch.Generator().manual_seed(1)
    threads = 1024
    counts = torch.randint(1, 100, (threads,), generator=g).double()
    means = 10 * torch.randn(threads, generator=g, dtype=torch.float64)
    m2s = torch.rand(threads, generator=g, dtype=torch.float64) * counts
    triples = torch.stack([means, m2s, counts], 1).float()
    out = assert_schedule_invariant(simt, lambda: simt.block_merge(triples))
    assert torch.equal(out, out[:1].expand_as(out)), "threads disagree on the merged statistics"
    t = triples.double()
    n = t[:, 2].sum()
    mean = (t[:, 0] * t[:, 2]).sum() / n
    m2 = t[:, 1].sum() + (t[:, 2] * (t[:, 0] - mean) ** 2).sum()
    assert out[0, 2].item() == n.item()
    assert out[0, 0].item() == pytest.approx(mean.item(), rel=1e-6)
    assert out[0, 1].item() == pytest.approx(m2.item(), rel=1e-4)


@pytest.mark.parametrize("blocks", [1, 3, 16])
def test_grid_reduce_last_block(simt, blocks):
    x = torch.randint(-50, 50, (20000,)).float()  # integers: every summation order is exact
    counter = torch.zeros(1, dtype=torch.int32)
    out = assert_schedule_invariant(simt, lambda: simt.grid_sum(x, blocks, 128, counter))
    assert out.item() == x.sum().item()
    assert counter.item() == 0, "the last block resets the counter for the next launch"


def test_grid_reduce_result_does_not_depend_on_the_last_block(simt):
    # Non-integer data: the total is bitwise the same whichever block happens to finish last.
    x = torch.randn(50000)
    counter = torch.zeros(1, dtype=torch.int32)
    out = assert_schedule_invariant(simt, lambda: simt.grid_sum(x, 12, 64, counter))
    torch.testing.assert_close(out, x.double().sum().float(), rtol=1e-5, atol=1e-4)


def test_grid_welford_per_row(simt):
    # Per-row statistics with several blocks per row and rows looped over gridDim.y: the shape of
    # per-channel BatchNorm statistics. Large mean, float64: must match a float64 two-pass reference.
    x = 1e4 + torch.randn(6, 3001, dtype=torch.float64)
    counters = torch.zeros(6, dtype=torch.int32)
    out = assert_schedule_invariant(simt, lambda: simt.grid_stats(x, 5, 64, counters))
    torch.testing.assert_close(out[:, 0], x.mean(1), rtol=1e-14, atol=0)
    torch.testing.assert_close(out[:, 1] / 3001, x.var(1, unbiased=False), rtol=1e-10, atol=0)
    assert out[:, 2].tolist() == [3001.0] * 6
    assert counters.tolist() == [0] * 6
