"""16-byte vector loads and stores with scalar heads and tails (fastbn::vec_split & co.)."""
import pytest
import torch

from simt_helpers import assert_schedule_invariant

pytestmark = pytest.mark.simt

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def split(t):
    """(head, packs, tail) that fastbn::vec_split gives for one tensor."""
    size = t.element_size()
    per_pack = 16 // size
    mis = t.data_ptr() % 16
    head = min(t.numel(), (16 - mis) // size if mis else 0)
    packs = (t.numel() - head) // per_pack
    return head, packs, t.numel() - head - packs * per_pack


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_pack_sums_visit_every_element_once(simt, dtype, offset, n):
    base = torch.randint(-8, 8, (n + offset,)).to(dtype)  # small integers: sums are exact
    x = base[offset:]
    sums, visits = assert_schedule_invariant(simt, lambda: simt.pack_sums(x, 3, 64))
    assert sums.sum().item() == x.double().sum().item()
    head, packs, tail = split(x)
    assert visits.tolist() == [packs, head + tail]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_offset,y_offset", [(0, 0), (1, 1), (2, 2), (0, 1)])
@pytest.mark.parametrize("n", [5, 130, 1003])
def test_axpby_with_heads_tails_and_mismatched_alignment(simt, dtype, x_offset, y_offset, n):
    # Small integers and a power-of-two-friendly a, b: every result is exact in every dtype, so the
    # comparison can be exact whatever the compiler contracts into FMAs.
    x = torch.randint(-8, 8, (n + x_offset,)).to(dtype)[x_offset:]
    y_storage = torch.randint(-8, 8, (n + y_offset,)).to(dtype)
    original = y_storage.clone()
    y = y_storage[y_offset:]
    expected = 2.0 * x.double() - 0.5 * y.double()
    simt.axpby_(x, y, 2.0, -0.5, 2, 64)
    assert torch.equal(y.double(), expected)
    assert torch.equal(y_storage[:y_offset], original[:y_offset]), "wrote before the start of y"
