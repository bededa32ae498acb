"""Warp shuffles and votes, block votes, atomics, intrinsics: results against CUDA's documented semantics."""
import random

import pytest
import torch

from simt_helpers import assert_schedule_invariant, run_under_schedules

pytestmark = pytest.mark.simt

OPS = {"shfl": 0, "up": 1, "down": 2, "xor": 3}


def expected_source(op, lane, operand, width):
    """Source lane of each __shfl*_sync, as the CUDA Programming Guide describes them. Offsets and
    lane numbers past 31 keep their low 5 bits (PTX ISA, shfl.sync: bval = b[4:0])."""
    segment = lane // width * width
    if op == "shfl":  # srcLane modulo width, within the caller's segment
        return segment + operand % width
    if op == "up":  # shifted up by delta within the segment; the lowest delta lanes keep their value
        delta = operand & 31
        return lane - delta if lane - segment >= delta else lane
    if op == "down":  # shifted down within the segment; the highest delta lanes keep their value
        delta = operand & 31
        return lane + delta if lane - segment + delta < width else lane
    # xor: a partner in an earlier segment is read; one in a later segment gives the caller's own value
    partner = lane ^ (operand & 31)
    return lane if partner >= segment + width else partner


OPERANDS = {
    "zero": lambda w: [0] * 32,
    "one": lambda w: [1] * 32,
    "three": lambda w: [3] * 32,
    "width-1": lambda w: [w - 1] * 32,
    "width": lambda w: [w] * 32,
    "31": lambda w: [31] * 32,
    "32": lambda w: [32] * 32,
    "33": lambda w: [33] * 32,
    "minus-one": lambda w: [-1] * 32,
    "per-lane": lambda w: [random.Random(w).randint(-40, 40) for _ in range(32)],
}


@pytest.mark.parametrize("width", [32, 16, 8, 4, 2, 1])
@pytest.mark.parametrize("op", list(OPS))
def test_shuffles_follow_cuda_semantics(simt, op, width):
    values = torch.arange(64, dtype=torch.float64) * 1.5 + 1000  # two warps, distinct values
    for name, make in OPERANDS.items():
        if op in ("up", "down") and make(width)[0] < 0:
            continue  # delta is unsigned: a negative one is a different (huge) number, not tested
        operands = torch.tensor(make(width) * 2, dtype=torch.int32)
        out = simt.warp_shuffle(values, operands, OPS[op], width)
        expected = [
            values[warp * 32 + expected_source(op, lane, operands[warp * 32 + lane].item(), width)].item()
            for warp in range(2)
            for lane in range(32)
        ]
        assert out.tolist() == expected, f"{op} width={width} operand={name}"


def test_shuffle_in_a_partial_warp(simt):
    # 48 threads: the second warp has lanes 0..15 only. Exchanges within them work ...
    values = torch.arange(48, dtype=torch.float64)
    out = simt.warp_shuffle(values, torch.ones(48, dtype=torch.int32), OPS["xor"], 32)
    assert out.tolist() == [float(i ^ 1) for i in range(48)]
    # ... and reading a lane that does not exist is reported, not made up.
    with pytest.raises(RuntimeError, match="does not exist"):
        simt.warp_shuffle(values, torch.full((48,), 16, dtype=torch.int32), OPS["xor"], 32)


def test_partial_mask_is_an_error(simt):
    with pytest.raises(RuntimeError, match="mask 0x0000ffff.*full-mask"):
        simt.partial_mask()


def test_width_must_be_a_power_of_two(simt):
    with pytest.raises(RuntimeError, match="width 12"):
        simt.bad_width()


@pytest.mark.parametrize("threads", [64, 80])
def test_warp_votes(simt, threads):
    predicates = torch.tensor([int(i % 3 == 0) for i in range(threads)], dtype=torch.int32)
    predicates[32:64] = 1  # the second warp votes unanimously
    out = assert_schedule_invariant(simt, lambda: simt.warp_votes(predicates))
    for warp in range(out.shape[0]):
        lanes = predicates[warp * 32 : warp * 32 + 32].tolist()
        ballot = sum(1 << lane for lane, p in enumerate(lanes) if p)
        assert out[warp, 0].item() & 0xFFFFFFFF == ballot
        assert out[warp, 1].item() == int(any(lanes))
        assert out[warp, 2].item() == int(all(lanes))


@pytest.mark.parametrize("pattern", ["some", "none", "all"])
def test_syncthreads_count_and_or(simt, pattern):
    threads = 160
    p = {"some": [int(i % 7 == 2) for i in range(threads)], "none": [0] * threads, "all": [5] * threads}[pattern]
    out = assert_schedule_invariant(simt, lambda: simt.block_votes(torch.tensor(p, dtype=torch.int32)))
    count = sum(1 for v in p if v)
    assert out.tolist() == [[count, int(count == threads), int(count > 0)]] * threads


def test_atomics(simt):
    blocks, threads = 3, 64
    n = blocks * threads
    results = run_under_schedules(simt, lambda: simt.atomics(blocks, threads))
    for name, (ints, uints, ulls, floats, doubles) in results.items():
        assert ints[:5].tolist() == [n, n - 1, -(n - 1), -2 * n, 7]
        assert [u & 0xFFFFFFFF for u in uints.tolist()] == [3 * n, n - 1, n % 10, 0xFFFFFFFF]
        assert ulls.tolist() == [n << 33, 5]
        assert floats.tolist() == [0.5 * n, 2.5]
        assert doubles.tolist() == [0.25 * n]
    # atomicCAS(0 -> t + 1): only the thread that gets there first swaps, and which one that is is
    # exactly what the schedule decides.
    assert results["forward"][0][5].item() == 1
    assert results["reverse"][0][5].item() == n


def test_intrinsics(simt):
    x = torch.rand(100) * 3 + 0.1
    out = simt.intrinsics(x)
    bits = x.view(torch.int32)
    popcount = torch.tensor([bin(b & 0xFFFFFFFF).count("1") for b in bits.tolist()], dtype=torch.float32)
    expected = torch.stack(
        [
            x.rsqrt(),
            x / 3,
            x * 2 + 1,
            torch.exp(-x),
            (x - 1).clamp(0, 1),
            popcount,
            x,
            torch.maximum(x, torch.tensor(1.5)) + torch.minimum(x, torch.tensor(1.5)),
            x.double().rsqrt().float(),
            x + 1 / x,
        ],
        1,
    )
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-6)
