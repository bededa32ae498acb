"""The CUDA kernels of csrc/cuda, run on CPU tensors through the SIMT emulator (torch.ops.fastbn_simt, built
from csrc/cuda/*.cu minus register.cu, csrc/checks.cpp and tests/simt/emulated_ops.cpp), against the CPU path
(torch.ops.fastbn) and torch.

Paths are forced with FASTBN_CUDA_PATH (two_pass / persistent), read by the ops on every call. Shapes are small
(every emulated CUDA thread is a fiber) but chosen so that reductions span several blocks per channel, the
persistent kernels run with several channel rounds and splits, and both the 16-byte vector and the scalar
(misaligned / odd-length) code run.
"""
import glob
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import simt_build
from simt_helpers import assert_schedule_invariant

pytestmark = pytest.mark.simt

ROOT = simt_build.ROOT

# The one tolerance table and the input makers of the suite live in tests/bn_testing.py.
if os.path.join(ROOT, "tests") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
import bn_testing as support  # noqa: E402

assert_close = support.assert_close
DTYPE_CASES = support.DTYPE_CASES

PATHS = ["two_pass", "persistent"]

# (id, shape, memory format): planes with vector packs, planes with odd planes (scalar), channels_last 2d
# (vector rows, and odd C), channels_last_3d, (N, C) and (N, C, L).
LAYOUTS = [
    ("nchw-vec", (8, 3, 4, 8), "contiguous"),
    ("nchw-odd", (4, 3, 5, 5), "contiguous"),
    ("cl2d-vec", (4, 8, 4, 4), "channels_last"),
    ("cl2d-odd", (3, 5, 3, 5), "channels_last"),
    ("cl3d", (2, 8, 2, 3, 4), "channels_last"),
    ("2d", (48, 6), "contiguous"),
    ("3d", (3, 4, 7), "contiguous"),
]


def layout_params():
    return [pytest.param(shape, fmt, id=name) for name, shape, fmt in LAYOUTS]


def cuda_sources():
    sources = sorted(f for f in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) if not f.endswith("register.cu"))
    return sources + [os.path.join(ROOT, "csrc", "checks.cpp"), os.path.join(ROOT, "tests", "simt", "emulated_ops.cpp")]


@pytest.fixture(scope="session")
def emu():
    """torch.ops.fastbn_simt: the CUDA ops on the emulator (first use builds them; ninja caches the build)."""
    simt_build.build("fastbn_simt_cuda", cuda_sources())
    ops = torch.ops.fastbn_simt
    ops.set_schedule("forward")
    return ops


@pytest.fixture(scope="session")
def cpu():
    import fastbn  # noqa: F401  (registers torch.ops.fastbn, the CPU reference)

    return torch.ops.fastbn


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("FASTBN_CUDA_PATH", request.param)
    return request.param


def make(shape, dtype, fmt, scale=2.0, shift=0.5):
    return support.make_input(shape, dtype, fmt, scale, shift)


def params(C, pdtype, affine=True):
    return support.make_params(C, pdtype, affine)


def clone_opt(t):
    return None if t is None else t.clone()


def run_forward_train(ops, x, w, b, res, rm, rv, nbt, momentum, relu, eps=1e-5):
    rm, rv, nbt = clone_opt(rm), clone_opt(rv), clone_opt(nbt)
    y, mean, invstd = ops.forward_train(x, w, b, res, rm, rv, nbt, momentum, eps, relu)
    return y, mean, invstd, rm, rv, nbt


def assert_same_results(actual, expected, dtype, names):
    for a, e, name in zip(actual, expected, names):
        if e is None:
            assert a is None, name
            continue
        if not e.is_floating_point():
            assert torch.equal(a, e), f"{name}: {a} != {e}"
            continue
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        assert a.stride() == e.stride() or a.numel() <= 1, f"{name}: strides {a.stride()} != {e.stride()}"
        # Statistics are acc_t / param_t values: compared with the tolerance of their own dtype.
        assert_close(a, e, dtype=a.dtype if a.dim() <= 1 else dtype, msg=name)


FWD_NAMES = ["output", "save_mean", "save_invstd", "running_mean", "running_var", "num_batches_tracked"]
BWD_NAMES = ["grad_input", "grad_weight", "grad_bias", "grad_residual"]


# ---------------------------------------------------------------------------------------------------------
# forward-train / backward on every layout, dtype and path, against the CPU path and torch.

@pytest.mark.parametrize("shape,fmt", layout_params())
@pytest.mark.parametrize("dtype,pdtype", DTYPE_CASES)
def test_forward_train(emu, cpu, path, shape, fmt, dtype, pdtype):
    x = make(shape, dtype, fmt)
    w, b, rm, rv = params(shape[1], pdtype)
    res = support.make_like(x)
    nbt = torch.tensor(3)
    got = run_forward_train(emu, x, w, b, res, rm, rv, nbt, 0.1, True)
    want = run_forward_train(cpu, x, w, b, res, rm, rv, nbt, 0.1, True)
    assert_same_results(got, want, dtype, FWD_NAMES)
    # and torch (no residual, no relu): F.batch_norm on the same input.
    rm_t, rv_t = rm.clone(), rv.clone()
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, True, 0.1, 1e-5)
    y, _, _, rm_e, rv_e, _ = run_forward_train(emu, x, w, b, None, rm, rv, nbt, 0.1, False)
    assert_close(y, y_t, msg="output vs torch")
    assert_close(rm_e, rm_t, msg="running_mean vs torch")
    assert_close(rv_e, rv_t, msg="running_var vs torch")


@pytest.mark.parametrize("shape,fmt", layout_params())
@pytest.mark.parametrize("dtype,pdtype", DTYPE_CASES)
def test_backward_train(emu, cpu, path, shape, fmt, dtype, pdtype):
    x = make(shape, dtype, fmt)
    w, b, _, _ = params(shape[1], pdtype)
    res = support.make_like(x)
    dy = support.make_like(x)
    y, mean, invstd = cpu.forward_train(x, w, b, res, None, None, None, 0.1, 1e-5, True)
    mask = [True, True, True, True]
    got = emu.backward(dy, x, w, b, y, mean, invstd, True, True, mask)
    want = cpu.backward(dy, x, w, b, y, mean, invstd, True, True, mask)
    assert_same_results(got, want, dtype, BWD_NAMES)
    assert got[0].stride() == x.stride() and got[3].stride() == x.stride()


def test_against_torch_autograd(emu):
    """Forward + backward of BN+ReLU against a float64 torch reference with autograd."""
    x = make((4, 6, 5, 5), torch.float32, "channels_last")
    w, b, _, _ = params(6, torch.float32)
    dy = support.make_like(x)
    y, mean, invstd = emu.forward_train(x, w, b, None, None, None, None, 0.1, 1e-5, True)
    dx, dw, db, _ = emu.backward(dy, x, w, b, None, mean, invstd, True, True, [True, True, True, False])
    ref = support.reference_with_grads(x, None, None, w, b, True, 0.1, 1e-5, dy, relu=True)
    assert_close(y, ref.y.float(), msg="y")
    support.assert_grads_close({"input": dx, "weight": dw, "bias": db}, ref, msg="vs float64 autograd")


# ---------------------------------------------------------------------------------------------------------
# Fused epilogues and running-stat variants.

@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom", "cma"])
def test_epilogues(emu, cpu, path, fmt, affine, residual, relu, momentum):
    x = make((4, 4, 4, 4), torch.float16, fmt)
    w, b, rm, rv = params(4, torch.float32, affine)
    res = support.make_like(x) if residual else None
    nbt = torch.tensor(5)
    got = run_forward_train(emu, x, w, b, res, rm, rv, nbt, momentum, relu)
    want = run_forward_train(cpu, x, w, b, res, rm, rv, nbt, momentum, relu)
    assert_same_results(got, want, torch.float16, FWD_NAMES)
    dy = support.make_like(x)
    mask = [True, affine, affine, residual]
    y = want[0] if residual and relu else None  # the mask of a residual add's ReLU
    got_b = emu.backward(dy, x, w, b, y, want[1], want[2], True, relu, mask)
    want_b = cpu.backward(dy, x, w, b, y, want[1], want[2], True, relu, mask)
    assert_same_results(got_b, want_b, torch.float16, BWD_NAMES)


def test_without_running_stats_and_counter(emu, cpu, path):
    x = make((4, 3, 4, 4), torch.float32, "contiguous")
    got = run_forward_train(emu, x, None, None, None, None, None, None, 0.1, False)
    want = run_forward_train(cpu, x, None, None, None, None, None, None, 0.1, False)
    assert_same_results(got, want, torch.float32, FWD_NAMES)
    # num_batches_tracked alone is still incremented.
    nbt = torch.tensor(7)
    emu.forward_train(x, None, None, None, None, None, nbt, 0.1, 1e-5, False)
    assert nbt.item() == 8


def test_relu_nan_propagates_and_masks(emu, cpu):
    x = make((4, 3, 4, 4), torch.float32, "contiguous")
    x[1, 2, 1, 1] = float("nan")  # channel 2 statistics become NaN: everything in it is NaN
    w, b, _, _ = params(3, torch.float32)
    y, mean, invstd = emu.forward_train(x, w, b, None, None, None, None, 0.1, 1e-5, True)
    assert y[:, 2].isnan().all() and not y[:, :2].isnan().any()
    dy = support.make_like(x)
    got = emu.backward(dy, x, w, b, None, mean, invstd, True, True, [True, True, True, False])
    want = cpu.backward(dy, x, w, b, None, mean, invstd, True, True, [True, True, True, False])
    assert_same_results(got, want, torch.float32, BWD_NAMES)


def test_large_mean_matches_float64(emu, path):
    x = (torch.randn(8, 3, 8, 8) + 1e4).float()
    _, mean, invstd = emu.forward_train(x, None, None, None, None, None, None, 0.1, 1e-5, False)
    var64, mean64 = torch.var_mean(x.double(), [0, 2, 3], correction=0)
    assert_close(mean, mean64.float(), msg="mean")
    assert_close(invstd, (1 / torch.sqrt(var64 + 1e-5)).float(), msg="invstd")


# ---------------------------------------------------------------------------------------------------------
# Eval forward / backward, output masks.

@pytest.mark.parametrize("shape,fmt", layout_params())
@pytest.mark.parametrize("dtype,pdtype", DTYPE_CASES)
def test_forward_eval(emu, cpu, shape, fmt, dtype, pdtype):
    x = make(shape, dtype, fmt)
    w, b, rm, rv = params(shape[1], pdtype)
    res = support.make_like(x)
    got = emu.forward_eval(x, w, b, res, rm, rv, 1e-5, True)
    want = cpu.forward_eval(x, w, b, res, rm, rv, 1e-5, True)
    assert_same_results([got], [want], dtype, ["output"])
    assert_close(emu.forward_eval(x, w, b, None, rm, rv, 1e-5, False), F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5),
                 msg="vs torch")


@pytest.mark.parametrize("shape,fmt", layout_params())
@pytest.mark.parametrize("dtype,pdtype", DTYPE_CASES)
@pytest.mark.parametrize("relu_from", [None, "x", "y"], ids=["norelu", "relu-x", "relu-y"])
def test_backward_eval(emu, cpu, shape, fmt, dtype, pdtype, relu_from):
    """Eval backward in one launch: the reduction writes dx (and grad_residual) when dw or db is asked."""
    x = make(shape, dtype, fmt)
    w, b, rm, rv = params(shape[1], pdtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, invstd = rm.to(acc), torch.rsqrt(rv.to(acc) + 1e-5)
    relu = relu_from is not None
    y = cpu.forward_eval(x, w, b, support.make_like(x), rm, rv, 1e-5, True) if relu_from == "y" else None
    dy = support.make_like(x)
    masks = [[True, True, True, True], [True, False, True, False], [False, True, False, True],
             [True, False, False, True]]  # the last: no sums wanted, the elementwise kernel alone
    for mask in masks:
        got, launched, _ = launches(emu, lambda: emu.backward(dy, x, w, b, y, mean, invstd, False, relu, mask))
        want = cpu.backward(dy, x, w, b, y, mean, invstd, False, relu, mask)
        assert launched == 1, f"mask {mask}: expected one launch, got {launched}"
        for g, wn, name, selected in zip(got, want, BWD_NAMES, mask):
            if selected:
                assert_same_results([g], [wn], dtype, [name])


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mask", [[True, True, True, True], [True, False, False, False], [False, True, True, False],
                                  [False, False, False, True], [False, True, False, False]],
                         ids=lambda m: "".join("x" if v else "-" for v in m))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_masks(emu, cpu, path, fmt, mask, training):
    x = make((4, 8, 3, 4), torch.float32, fmt)
    w, b, rm, rv = params(8, torch.float32)
    y, dy = support.make_like(x), support.make_like(x)  # y: a forward output for the ReLU mask
    mean = rm.float()
    invstd = (1 / torch.sqrt(rv + 1e-5)).float()
    got = emu.backward(dy, x, w, b, y, mean, invstd, training, True, mask)
    want = cpu.backward(dy, x, w, b, y, mean, invstd, training, True, mask)
    for g, wn, name, selected in zip(got, want, BWD_NAMES, mask):
        if selected:
            assert_same_results([g], [wn], torch.float32, [name])
        else:
            assert g.numel() == 0, f"{name} should be empty when not selected"


def test_outputs_never_alias_inputs(emu):
    x = make((4, 3, 4, 4), torch.float32, "contiguous")
    dy = support.make_like(x)
    mean, invstd = torch.zeros(3), torch.ones(3)
    _, _, _, dr = emu.backward(dy, x, None, None, None, mean, invstd, True, False, [False, False, False, True])
    assert dr.data_ptr() != dy.data_ptr() and torch.equal(dr, dy)


# ---------------------------------------------------------------------------------------------------------
# SyncBatchNorm pieces.

@pytest.mark.parametrize("shape,fmt", layout_params())
@pytest.mark.parametrize("dtype,pdtype", DTYPE_CASES)
def test_sync_pieces(emu, cpu, shape, fmt, dtype, pdtype):
    x = make(shape, dtype, fmt)
    w, b, _, _ = params(shape[1], pdtype)
    res, dy = support.make_like(x), support.make_like(x)
    got = emu.local_stats(x)
    want = cpu.local_stats(x)
    assert_same_results(got, want, dtype, ["mean", "var", "count"])
    assert got[2].dim() == 0 and got[2].item() == want[2].item()
    mean, var = want[0], want[1]
    invstd = 1 / torch.sqrt(var + 1e-5)
    y = cpu.normalize(x, mean, invstd, w, b, res, True)
    assert_same_results([emu.normalize(x, mean, invstd, w, b, res, True)], [y], dtype, ["normalize"])
    got_r = emu.backward_reduce(dy, x, mean, invstd, w, b, y, True)
    want_r = cpu.backward_reduce(dy, x, mean, invstd, w, b, y, True)
    assert_same_results(got_r, want_r, dtype, ["sum_dy", "sum_dy_xhat"])
    m = x.numel() // x.shape[1]
    mdy, mdyx = want_r[0] / m, want_r[1] / m
    assert_same_results([emu.backward_elementwise(dy, x, mean, invstd, w, b, y, mdy, mdyx, True)],
                        [cpu.backward_elementwise(dy, x, mean, invstd, w, b, y, mdy, mdyx, True)], dtype, ["dx"])


# ---------------------------------------------------------------------------------------------------------
# Memory traffic: the bytes the kernels move through load_pack / store_pack, counted by the emulator, in units of
# E (one activation tensor), as the kernels' comments and the design's floors state.

def traffic_in_e(emu, x, fn):
    emu.reset_stats()
    fn()
    loaded, stored = emu.traffic()
    e = x.numel() * x.element_size()
    assert loaded % e == 0 and stored % e == 0, f"traffic of {loaded} / {stored} bytes is not a multiple of E = {e}"
    return loaded // e, stored // e


# (case, {path: (E loaded, E stored)}): forward-train reads x once on the persistent path (2E in all), twice in two
# passes; eval is one pass; the persistent training backward reads dy and x once (3E), two passes read them twice
# (5E); eval's backward with dw / db writes dx in the reduction's pass; dx alone in eval needs no x.
TRAFFIC = [
    ("forward_train", {"persistent": (1, 1), "two_pass": (2, 1)}),
    ("forward_train_residual", {"persistent": (2, 1), "two_pass": (3, 1)}),
    ("forward_eval_residual", {"persistent": (2, 1), "two_pass": (2, 1)}),
    ("local_stats", {"persistent": (1, 0), "two_pass": (1, 0)}),
    ("backward_train", {"persistent": (2, 1), "two_pass": (4, 1)}),
    ("backward_train_relu_residual", {"persistent": (3, 2), "two_pass": (6, 2)}),
    ("backward_eval", {"persistent": (2, 1), "two_pass": (2, 1)}),
    ("backward_eval_dx_only", {"persistent": (1, 1), "two_pass": (1, 1)}),
]


@pytest.mark.parametrize("case,expected", TRAFFIC, ids=[c for c, _ in TRAFFIC])
@pytest.mark.parametrize("shape,fmt", [((8, 4, 4, 8), "contiguous"), ((3, 5, 3, 5), "channels_last"),
                                       ((4, 6, 4, 4), "channel_slice"), ((48, 8), "contiguous")],
                         ids=["nchw-vec", "cl2d-odd", "channel-slice", "2d"])
def test_memory_traffic(emu, cpu, path, case, expected, shape, fmt):
    x = make(shape, torch.float32, fmt)
    C = shape[1]
    w, b, rm, rv = params(C, torch.float32)
    res, dy = support.make_like(x), support.make_like(x)
    y, mean, invstd = cpu.forward_train(x, w, b, res, None, None, None, 0.1, 1e-5, True)
    calls = {
        "forward_train": lambda: emu.forward_train(x, w, b, None, rm, rv, None, 0.1, 1e-5, False),
        "forward_train_residual": lambda: emu.forward_train(x, w, b, res, rm, rv, None, 0.1, 1e-5, True),
        "forward_eval_residual": lambda: emu.forward_eval(x, w, b, res, rm, rv, 1e-5, True),
        "local_stats": lambda: emu.local_stats(x),
        "backward_train": lambda: emu.backward(dy, x, w, b, None, mean, invstd, True, False, [True, True, True, False]),
        "backward_train_relu_residual": lambda: emu.backward(dy, x, w, b, y, mean, invstd, True, True, [True] * 4),
        "backward_eval": lambda: emu.backward(dy, x, w, b, None, mean, invstd, False, False, [True, True, True, False]),
        "backward_eval_dx_only": lambda: emu.backward(dy, x, w, b, None, mean, invstd, False, False,
                                                      [True, False, False, False]),
    }
    assert traffic_in_e(emu, x, calls[case]) == expected[path]


# ---------------------------------------------------------------------------------------------------------
# Launch shapes: multi-block reductions, the persistent kernels (rounds and splits), vector and scalar code.

def launches(emu, fn):
    emu.reset_stats()
    out = fn()
    launched, blocks, threads, _ = emu.stats()
    return out, launched, blocks


@pytest.mark.parametrize("shape,fmt", [((8, 3, 16, 16), "contiguous"), ((32, 8, 4, 4), "channels_last")],
                         ids=["nchw", "cl"])
def test_multi_block_reductions(emu, cpu, monkeypatch, shape, fmt):
    monkeypatch.setenv("FASTBN_CUDA_PATH", "two_pass")
    x = make(shape, torch.float32, fmt)
    w, b, rm, rv = params(shape[1], torch.float32)
    got, launched, blocks = launches(emu, lambda: run_forward_train(emu, x, w, b, None, rm, rv, torch.tensor(0), None, True))
    assert launched == 2
    # more than one block per channel (planes) / per channel tile (rows) in each of the two launches
    assert blocks > 2 * (shape[1] if fmt == "contiguous" else 1), "expected several blocks per channel / tile"
    want = run_forward_train(cpu, x, w, b, None, rm, rv, torch.tensor(0), None, True)
    assert_same_results(got, want, torch.float32, FWD_NAMES)
    dy = support.make_like(x)
    got_b, launched_b, _ = launches(emu, lambda: emu.backward(dy, x, w, b, None, want[1], want[2], True, True, [True] * 4))
    assert launched_b == 2
    assert_same_results(got_b, cpu.backward(dy, x, w, b, None, want[1], want[2], True, True, [True] * 4), torch.float32,
                        BWD_NAMES)
    # eval: the reduction writes dx and grad_residual from every block of a channel, in its one launch
    mean, invstd = rm.float(), torch.rsqrt(rv.float() + 1e-5)
    got_e, launched_e, _ = launches(emu, lambda: emu.backward(dy, x, w, b, None, mean, invstd, False, True, [True] * 4))
    assert launched_e == 1
    assert_same_results(got_e, cpu.backward(dy, x, w, b, None, mean, invstd, False, True, [True] * 4), torch.float32,
                        BWD_NAMES)


@pytest.mark.parametrize("resident", [16, 2], ids=["one-round", "rounds"])
@pytest.mark.parametrize("shape,fmt,dtype", [
    ((8, 3, 16, 16), "contiguous", torch.float32),
    ((4, 3, 5, 5), "contiguous", torch.bfloat16),
    ((64, 8, 2, 2), "channels_last", torch.float32),
    ((16, 5, 2, 3), "channels_last", torch.float16),
], ids=["nchw-vec", "nchw-odd", "cl-vec", "cl-odd"])
def test_persistent_path(emu, cpu, monkeypatch, resident, shape, fmt, dtype):
    monkeypatch.setenv("FASTBN_CUDA_PATH", "persistent")
    before = emu.resident_blocks()
    emu.set_resident_blocks(resident)
    try:
        x = make(shape, dtype, fmt)
        w, b, rm, rv = params(shape[1], torch.float32)
        res = support.make_like(x)
        got, launched, blocks = launches(emu, lambda: run_forward_train(emu, x, w, b, res, rm, rv, torch.tensor(1), None, True))
        want = run_forward_train(cpu, x, w, b, res, rm, rv, torch.tensor(1), None, True)
        assert_same_results(got, want, dtype, FWD_NAMES)
        dy = support.make_like(x)
        y = want[0]
        got_b, launched_b, _ = launches(emu, lambda: emu.backward(dy, x, w, b, y, want[1], want[2], True, True, [True] * 4))
        assert_same_results(got_b, cpu.backward(dy, x, w, b, y, want[1], want[2], True, True, [True] * 4), dtype,
                            BWD_NAMES)
    finally:
        emu.set_resident_blocks(before)
    if resident == 16 or fmt == "contiguous":
        assert launched == 1 and launched_b == 1, "expected the single-launch persistent kernels"
    if resident == 16 and fmt == "contiguous" and dtype == torch.float32:
        assert blocks > shape[1], "expected several splits per channel"
    if resident == 16 and fmt == "channels_last" and dtype == torch.float32:
        assert blocks > 1, "expected several splits of the rows"


def test_persistent_falls_back_when_too_big(emu, cpu, monkeypatch):
    monkeypatch.setenv("FASTBN_CUDA_PATH", "persistent")
    before = emu.resident_blocks()
    emu.set_resident_blocks(1)
    try:
        # 9 channels on one resident block: more channel rounds than register slots
        x = make((4, 9, 2, 2), torch.float32, "contiguous")
        got, launched, _ = launches(emu, lambda: run_forward_train(emu, x, None, None, None, None, None, None, 0.1, False))
    finally:
        emu.set_resident_blocks(before)
    assert launched == 2
    assert_same_results(got, run_forward_train(cpu, x, None, None, None, None, None, None, 0.1, False), torch.float32,
                        FWD_NAMES)


def test_bad_path_setting_is_an_error(emu, monkeypatch):
    monkeypatch.setenv("FASTBN_CUDA_PATH", "fastest")
    with pytest.raises(RuntimeError, match="FASTBN_CUDA_PATH"):
        emu.forward_train(torch.randn(4, 3, 2, 2), None, None, None, None, None, None, 0.1, 1e-5, False)


# ---------------------------------------------------------------------------------------------------------
# Views: misaligned (no 16-byte packs possible), general strided, mixed layouts.

def misaligned(shape, dtype, fmt):
    base = make(shape, dtype, fmt)
    storage = torch.empty(base.numel() + 1, dtype=dtype)
    view = storage[1:].as_strided(base.shape, base.stride())
    view.copy_(base)
    assert view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_misaligned_views(emu, cpu, path, fmt, dtype):
    shape = (4, 8, 4, 4)
    x = misaligned(shape, dtype, fmt)
    res = misaligned(shape, dtype, fmt)
    dy = misaligned(shape, dtype, fmt)
    w, b, rm, rv = params(8, torch.float32)
    got = run_forward_train(emu, x, w, b, res, rm, rv, None, 0.1, True)
    want = run_forward_train(cpu, x, w, b, res, rm, rv, None, 0.1, True)
    assert_same_results(got, want, dtype, FWD_NAMES)
    y = misaligned(shape, dtype, fmt).copy_(want[0])  # the forward's output, for the mask, misaligned too
    got_b = emu.backward(dy, x, w, b, y, want[1], want[2], True, True, [True] * 4)
    want_b = cpu.backward(dy, x, w, b, y, want[1], want[2], True, True, [True] * 4)
    assert_same_results(got_b, want_b, dtype, BWD_NAMES)


def randn_view(base_shape, index, memory_format=torch.contiguous_format):
    return (torch.randn(base_shape) * 2 + 0.5).contiguous(memory_format=memory_format)[index]


# Input views the kernels take in place, with an outer stride (between samples, planes; between rows, rows) of
# their own: the first of each pair lines up for 16-byte packs, the second does not.
IN_PLACE_VIEWS = {
    "channel_slice": lambda: randn_view((4, 12, 4, 4), (slice(None), slice(2, 10))),
    "channel_slice_odd": lambda: make((4, 3, 5, 6), torch.float32, "channel_slice"),
    "sample_step": lambda: make((4, 8, 4, 4), torch.float32, "sample_step"),
    "cl_channel_slice": lambda: randn_view((4, 12, 3, 3), (slice(None), slice(4, 12)), torch.channels_last),
    "cl_channel_slice_odd": lambda: make((3, 5, 3, 5), torch.float32, "channels_last_slice"),
    "columns": lambda: randn_view((48, 16), (slice(None), slice(4, 12))),
    "columns_odd": lambda: randn_view((48, 9), (slice(None), slice(1, 7))),
    "expanded": lambda: randn_view((1, 8, 4, 4), slice(None)).expand(4, 8, 4, 4),
}
# Views that run on a contiguous copy.
COPIED_VIEWS = {
    "transposed": lambda: make((4, 3, 5, 6), torch.float32, "transposed"),
    "sliced": lambda: make((4, 3, 5, 6), torch.float32, "sliced"),
    "cropped": lambda: make((4, 3, 5, 6), torch.float32, "cropped"),
}


def copies_made(fn):
    """How many aten::copy_ calls fn() makes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::copy_")


@pytest.mark.parametrize("view", [*IN_PLACE_VIEWS, *COPIED_VIEWS])
def test_strided_views(emu, cpu, path, view):
    """Every op on a view input, with grad_output and residual dense: the in-place views make no copy, and the
    outputs have the strides of torch.empty_like(x) either way."""
    x = {**IN_PLACE_VIEWS, **COPIED_VIEWS}[view]()
    C = x.shape[1]
    res, dy = support.make_like(x), support.make_like(x)
    assert view in COPIED_VIEWS or res.stride() != x.stride()
    w, b, rm, rv = params(C, torch.float32)
    nbt = torch.tensor(0)
    got = run_forward_train(emu, x, w, b, res, rm, rv, nbt, 0.1, True)
    want = run_forward_train(cpu, x, w, b, res, rm, rv, nbt, 0.1, True)
    assert_same_results(got, want, torch.float32, FWD_NAMES)
    assert got[0].stride() == torch.empty_like(x).stride()
    y, mean, invstd = want[:3]
    for training in (True, False):
        got_b = emu.backward(dy, x, w, b, y, mean, invstd, training, True, [True] * 4)
        want_b = cpu.backward(dy, x, w, b, y, mean, invstd, training, True, [True] * 4)
        assert_same_results(got_b, want_b, torch.float32, BWD_NAMES)
    assert_close(emu.forward_eval(x, w, b, res, rm, rv, 1e-5, True), cpu.forward_eval(x, w, b, res, rm, rv, 1e-5, True))
    for a, e in zip(emu.local_stats(x), cpu.local_stats(x)):
        assert_close(a, e)
    sums = cpu.backward_reduce(dy, x, mean, invstd, w, b, y, True)
    for a, e in zip(emu.backward_reduce(dy, x, mean, invstd, w, b, y, True), sums):
        assert_close(a, e)
    means = [s / (x.numel() // C) for s in sums]
    assert_close(emu.normalize(x, mean, invstd, w, b, res, True), cpu.normalize(x, mean, invstd, w, b, res, True))
    assert_close(emu.backward_elementwise(dy, x, mean, invstd, w, b, y, *means, True),
                 cpu.backward_elementwise(dy, x, mean, invstd, w, b, y, *means, True))

    def every_op():
        emu.forward_train(x, w, b, res, rm, rv, nbt, 0.1, 1e-5, True)
        emu.forward_eval(x, w, b, res, rm, rv, 1e-5, True)
        emu.backward(dy, x, w, b, y, mean, invstd, True, True, [True] * 4)
        emu.backward(dy, x, w, b, y, mean, invstd, False, True, [True] * 4)
        emu.local_stats(x)

    if view in IN_PLACE_VIEWS:
        assert copies_made(every_op) == 0
    else:
        assert copies_made(every_op) > 0


def test_grad_output_in_another_layout(emu, cpu, path):
    x = make((4, 8, 3, 3), torch.float32, "channels_last")
    dy = make((4, 8, 3, 3), torch.float32, "contiguous", 1.0, 0.0)
    res = make((4, 8, 3, 3), torch.float32, "contiguous", 1.0, 0.0)
    w, b, _, _ = params(8, torch.float32)
    y, mean, invstd = cpu.forward_train(x, w, b, res, None, None, None, 0.1, 1e-5, True)
    y = y.contiguous()  # the forward's output, in another layout than x too
    got = emu.backward(dy, x, w, b, y, mean, invstd, True, True, [True] * 4)
    want = cpu.backward(dy, x, w, b, y, mean, invstd, True, True, [True] * 4)
    assert_same_results(got, want, torch.float32, BWD_NAMES)
    assert got[0].is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------------------
# Determinism and edge cases.

@pytest.mark.parametrize("shape,fmt", [((8, 3, 16, 16), "contiguous"), ((32, 8, 4, 4), "channels_last")],
                         ids=["nchw", "cl"])
def test_bitwise_identical_under_every_schedule(emu, path, shape, fmt):
    x = make(shape, torch.float32, fmt)
    w, b, rm, rv = params(shape[1], torch.float32)
    dy = support.make_like(x)

    def run():
        y, mean, invstd, rm2, rv2, _ = run_forward_train(emu, x, w, b, None, rm, rv, None, 0.1, True)
        grads = emu.backward(dy, x, w, b, None, mean, invstd, True, True, [True, True, True, False])
        return [t.contiguous() for t in [y, mean, invstd, rm2, rv2] + list(grads[:3])]

    assert_schedule_invariant(emu, run, ["forward", "reverse", "shuffle:1", "shuffle:7"])


def test_empty_input(emu, cpu, path):
    x = torch.empty(0, 3, 4, 4)
    w, b, rm, rv = params(3, torch.float32)
    nbt = torch.tensor(2)
    y, mean, invstd, rm2, rv2, nbt2 = run_forward_train(emu, x, w, b, None, rm, rv, nbt, 0.1, False)
    assert y.shape == x.shape and torch.equal(mean, torch.zeros(3)) and torch.equal(invstd, torch.zeros(3))
    assert torch.equal(rm2, rm) and torch.equal(rv2, rv) and nbt2.item() == 3
    dx, dw, db, dr = emu.backward(x, x, w, b, None, mean, invstd, True, False, [True] * 4)
    assert dx.shape == x.shape and dr.shape == x.shape and torch.equal(dw, torch.zeros(3)) and torch.equal(db, torch.zeros(3))
    mean_l, var_l, count = emu.local_stats(x)
    assert count.item() == 0 and torch.equal(mean_l, torch.zeros(3))
    assert emu.forward_eval(x, w, b, None, rm, rv, 1e-5, False).shape == x.shape


def test_argument_checks_are_shared(emu):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        emu.forward_train(torch.randn(1, 3), None, None, None, None, None, None, 0.1, 1e-5, False)
