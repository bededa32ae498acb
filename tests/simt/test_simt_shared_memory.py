"""Static and dynamic shared memory, per block."""
import pytest
import torch

from simt_helpers import assert_schedule_invariant

pytestmark = pytest.mark.simt


def reverse_tiles(x, tile):
    return torch.cat([chunk.flip(0) for chunk in x.split(tile)])


@pytest.mark.parametrize("n,threads", [(1000, 128), (64, 64), (33, 32)])
def test_dynamic_shared_memory(simt, n, threads):
    x = torch.randn(n)
    y = assert_schedule_invariant(simt, lambda: simt.reverse_dynamic(x, threads, threads * 4))
    assert torch.equal(y, reverse_tiles(x, threads))


def test_static_shared_memory(simt):
    x = torch.randn(1000)
    y = assert_schedule_invariant(simt, lambda: simt.reverse_static(x))
    assert torch.equal(y, reverse_tiles(x, 128))


def test_dynamic_shared_memory_of_two_types(simt):
    x = torch.randn(700, dtype=torch.float64)
    out = assert_schedule_invariant(simt, lambda: simt.dynamic_shared_mixed(x, 256))
    for b, chunk in enumerate(x.split(256)):
        torch.testing.assert_close(out[b, 0], chunk.sum(), rtol=1e-12, atol=1e-12)
        assert out[b, 1].item() == (chunk > 0).sum().item()


def test_dynamic_shared_memory_limit(simt):
    with pytest.raises(RuntimeError, match="227 KiB"):
        simt.reverse_dynamic(torch.randn(64), 64, 228 * 1024)
