"""fastbn.functional.batch_norm against torch.nn.functional.batch_norm (plus the unfused residual/ReLU
composite) and the float64 reference: values, running statistics, gradients and output layouts."""
import pytest
import torch
import torch.nn.functional as F

import fastbn
from bn_testing import (DTYPE_CASES, TOLERANCES, assert_close, formats_for, leaf, make_input, make_like, make_params,
                      named_memory_format, reference_batch_norm, reference_with_grads, torch_composite,
                      assert_grads_close)

bn = fastbn.functional.batch_norm

SHAPES = {
    "NC-5x7": (5, 7),
    "NCL-4x6x9": (4, 6, 9),
    "NCHW-3x5x7x3": (3, 5, 7, 3),
    "NCHW-N1-1x6x3x5": (1, 6, 3, 5),
    "NCHW-1x1-6x3x1x1": (6, 3, 1, 1),
    "NCDHW-2x3x3x4x5": (2, 3, 3, 4, 5),
}
SHAPE_FORMATS = [pytest.param(shape, fmt, id=f"{name}-{fmt}")
                 for name, shape in SHAPES.items() for fmt in formats_for(shape)]
TRAINING = [pytest.param(True, id="train"), pytest.param(False, id="eval")]
AFFINE = [pytest.param(True, id="affine"), pytest.param(False, id="noaffine")]
EPILOGUES = [  # (residual, relu)
    pytest.param(False, False, id="bn"),
    pytest.param(False, True, id="relu"),
    pytest.param(True, False, id="add"),
    pytest.param(True, True, id="add-relu"),
]
SIXTEEN_BIT = (torch.float16, torch.bfloat16)
MOMENTUM, EPS = 0.1, 1e-5


def _activation(relu):
    return "relu" if relu else None


@pytest.mark.parametrize("use_residual,relu", EPILOGUES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_CASES)
@pytest.mark.parametrize("shape,fmt", SHAPE_FORMATS)
def test_forward(shape, fmt, dtype, param_dtype, training, affine, use_residual, relu):
    x = make_input(shape, dtype, fmt)
    x_before = x.clone()
    weight, bias, running_mean, running_var = make_params(shape[1], param_dtype, affine)
    residual = make_like(x) if use_residual else None
    rm, rv = running_mean.clone(), running_var.clone()
    # torch with float32 parameters for 16-bit inputs: its all-16-bit path rounds intermediates to 16 bits
    # (a few ulps off the float64 reference), while fastbn computes in float32 whatever the parameter dtype.
    torch_params = [None if t is None else t.to(torch.float32 if dtype in SIXTEEN_BIT else t.dtype, copy=True)
                    for t in (weight, bias, running_mean, running_var)]
    w_torch, b_torch, rm_torch, rv_torch = torch_params

    y = bn(x, rm, rv, weight, bias, training, MOMENTUM, EPS, residual=residual, activation=_activation(relu))
    y_torch, bn_torch = torch_composite(x, rm_torch, rv_torch, w_torch, b_torch, training, MOMENTUM, EPS, residual,
                                        relu)
    y_ref, rm_ref, rv_ref, _ = reference_batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM,
                                                    EPS, residual, relu)

    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(x, x_before), "the input was modified"
    assert_close(y, y_ref, msg="output vs float64 reference")
    # torch's composite rounds bn(x) before adding the residual: allow for that rounding.
    assert_close(y, y_torch, scale=bn_torch if use_residual else None, msg="output vs torch")
    assert rm.dtype == param_dtype and rv.dtype == param_dtype
    if training:
        assert_close(rm, rm_ref, msg="running_mean vs float64 reference")
        assert_close(rv, rv_ref, msg="running_var vs float64 reference")
        assert_close(rm, rm_torch.to(param_dtype), msg="running_mean vs torch")
        assert_close(rv, rv_torch.to(param_dtype), msg="running_var vs torch")
    else:
        assert torch.equal(rm, running_mean) and torch.equal(rv, running_var), "eval changed running stats"


@pytest.mark.parametrize("use_residual,relu", EPILOGUES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("shape,fmt", SHAPE_FORMATS)
def test_backward(shape, fmt, dtype, training, affine, use_residual, relu):
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x0 = make_input(shape, dtype, fmt)
    w0, b0, running_mean, running_var = make_params(shape[1], param_dtype, affine)
    r0 = make_like(x0) if use_residual else None
    dy = make_like(x0)
    x, weight, bias, residual = leaf(x0), leaf(w0), leaf(b0), leaf(r0)

    y = bn(x, running_mean.clone(), running_var.clone(), weight, bias, training, MOMENTUM, EPS, residual=residual,
           activation=_activation(relu))
    y.backward(dy)
    ref = reference_with_grads(x0, running_mean, running_var, w0, b0, training, MOMENTUM, EPS, dy, r0, relu)
    got = {"input": x.grad, "weight": None if weight is None else weight.grad,
           "bias": None if bias is None else bias.grad, "residual": None if residual is None else residual.grad}
    for name in ref.grads:
        assert got[name] is not None and got[name].dtype == (dtype if name in ("input", "residual") else param_dtype)
    assert_grads_close(got, ref, msg="vs float64 reference:")

    # torch's unfused composite takes the ReLU mask from a rounded bn(x) + residual: for 16-bit inputs that
    # rounding can flip the mask of a near-zero element, so 16-bit add-relu is checked against the
    # reference only.
    if dtype in SIXTEEN_BIT and use_residual and relu:
        return
    xt, wt, bt, rt = leaf(x0), leaf(w0), leaf(b0), leaf(r0)
    yt, _ = torch_composite(xt, running_mean.clone(), running_var.clone(), wt, bt, training, MOMENTUM, EPS, rt,
                            relu)
    yt.backward(dy)
    # torch's 16-bit CPU paths for strided inputs round intermediates (even the parameter-gradient sums)
    # to 16 bits: compare with the input dtype's tolerance.
    for name, t in (("input", xt), ("weight", wt), ("bias", bt), ("residual", rt)):
        if t is not None:
            assert_close(got[name], t.grad, dtype=dtype, msg=f"grad {name} vs torch")


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("wanted", [("input",), ("weight",), ("bias",), ("residual",), ("weight", "residual"),
                                    ("input", "bias")], ids=lambda w: "+".join(w))
@pytest.mark.parametrize("relu", [False, True], ids=["add", "add-relu"])
def test_gradient_subsets(wanted, training, relu):
    """Only the tensors that require grad get gradients, and those equal the reference's."""
    x0 = make_input((4, 3, 3, 5))
    w0, b0, running_mean, running_var = make_params(3)
    r0 = make_like(x0)
    dy = make_like(x0)
    tensors = {name: leaf(t, name in wanted) for name, t in
               [("input", x0), ("weight", w0), ("bias", b0), ("residual", r0)]}
    y = bn(tensors["input"], running_mean.clone(), running_var.clone(), tensors["weight"], tensors["bias"],
           training, residual=tensors["residual"], activation=_activation(relu))
    y.backward(dy)
    ref = reference_with_grads(x0, running_mean, running_var, w0, b0, training, MOMENTUM, EPS, dy, r0, relu)
    for name, t in tensors.items():
        if name in wanted:
            assert_close(t.grad, ref.grads[name], scale=ref.scales.get(name), msg=f"grad {name}")
        else:
            assert t.grad is None


@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype,param_dtype", [DTYPE_CASES[1], DTYPE_CASES[4]])
def test_weight_or_bias_alone(which, training, dtype, param_dtype):
    x0 = make_input((3, 4, 5, 2), dtype)
    w0, b0, running_mean, running_var = make_params(4, param_dtype)
    w0, b0 = (w0, None) if which == "weight" else (None, b0)
    dy = make_like(x0)
    x, weight, bias = leaf(x0), leaf(w0), leaf(b0)
    rm, rv = running_mean.clone(), running_var.clone()
    y = bn(x, rm, rv, weight, bias, training)
    y.backward(dy)
    ref = reference_with_grads(x0, running_mean, running_var, w0, b0, training, MOMENTUM, EPS, dy)
    y_ref, rm_ref, rv_ref = ref.y, ref.running_mean, ref.running_var
    xt, wt, bt = leaf(x0), leaf(w0), leaf(b0)
    yt = F.batch_norm(xt, running_mean.clone(), running_var.clone(), wt, bt, training)
    yt.backward(dy)
    assert_close(y, y_ref, msg="output vs reference")
    assert_close(y, yt, msg="output vs torch")
    param, param_t = (weight, wt) if which == "weight" else (bias, bt)
    assert_grads_close({"input": x.grad, which: param.grad}, ref, msg="vs reference:")
    assert_close(x.grad, xt.grad, msg="grad input vs torch")
    assert_close(param.grad, param_t.grad, dtype=dtype, msg=f"grad {which} vs torch")
    if training:
        assert_close(rm, rm_ref, msg="running_mean")
        assert_close(rv, rv_ref, msg="running_var")


@pytest.mark.parametrize("dtype,param_dtype", [DTYPE_CASES[0], DTYPE_CASES[1], DTYPE_CASES[2], DTYPE_CASES[5]])
@pytest.mark.parametrize("momentum", [None, 0.1, 1.0], ids=["cumulative", "m0.1", "m1"])
def test_running_stats_and_counter_over_steps(momentum, dtype, param_dtype):
    """num_batches_tracked counts training steps; momentum=None averages every batch so far equally."""
    _, _, running_mean, running_var = make_params(5, param_dtype)
    count = torch.tensor(0, dtype=torch.long)
    rm, rv = running_mean.clone(), running_var.clone()
    ref_mean, ref_var, ref_count = running_mean.double(), running_var.double(), 0
    for step in range(1, 5):
        x = make_input((3, 5, 4), dtype, scale=step, shift=step - 2.0)
        bn(x, rm, rv, None, None, True, momentum, EPS, num_batches_tracked=count)
        _, ref_mean, ref_var, ref_count = reference_batch_norm(x, ref_mean, ref_var, None, None, True, momentum, EPS,
                                                               num_batches_tracked=ref_count)
        assert count.dtype == torch.long and count.dim() == 0
        assert int(count) == step == ref_count
        assert_close(rm, ref_mean.to(param_dtype), dtype=param_dtype, msg=f"running_mean after step {step}")
        assert_close(rv, ref_var.to(param_dtype), dtype=param_dtype, msg=f"running_var after step {step}")
    # Eval reads the statistics and leaves the counter alone.
    bn(x, rm, rv, None, None, False, momentum, EPS, num_batches_tracked=count)
    assert int(count) == 4


def test_momentum_none_matches_torch_module():
    """The cumulative average agrees with torch.nn.BatchNorm2d(momentum=None) step by step."""
    torch_bn = torch.nn.BatchNorm2d(3, momentum=None)
    rm, rv = torch_bn.running_mean.clone(), torch_bn.running_var.clone()
    count = torch_bn.num_batches_tracked.clone()
    for step in range(3):
        x = make_input((2, 3, 4, 4), shift=step)
        y = bn(x, rm, rv, torch_bn.weight, torch_bn.bias, True, None, torch_bn.eps, num_batches_tracked=count)
        assert_close(y, torch_bn(x), msg=f"output at step {step}")
        assert_close(rm, torch_bn.running_mean, msg=f"running_mean at step {step}")
        assert_close(rv, torch_bn.running_var, msg=f"running_var at step {step}")
        assert torch.equal(count, torch_bn.num_batches_tracked)


def test_counter_untouched_without_running_stats():
    count = torch.tensor(7)
    x = make_input((4, 3))
    y = bn(x, None, None, None, None, True, 0.1, EPS, num_batches_tracked=count)
    assert int(count) == 7
    assert_close(y, F.batch_norm(x, None, None, None, None, True), msg="batch statistics")


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "relu"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_large_mean_matches_float64_reference(dtype, fmt, relu):
    """Data with a large mean (1e4 + randn) needs a stable reduction (Welford or shifted sums).

    The float64 reference sees the same (rounded) input. The statistics are accurate to eps * condition
    number, where the condition number is |mean| / std = 1e4: float32 gives ~1e-3 relative error, while the
    naive E[x^2] - E[x]^2 in float32 is off by ~1e8 * eps ~ 10 (a wrong sign or NaN variance).
    """
    shift = 1e4
    x = make_input((4, 6, 5, 7), dtype, fmt, scale=1.0, shift=shift)
    weight, bias, running_mean, running_var = make_params(6, dtype)
    rm, rv = running_mean.clone(), running_var.clone()
    y = bn(x, rm, rv, weight, bias, True, 1.0, EPS, activation=_activation(relu))
    y_ref, rm_ref, rv_ref, _ = reference_batch_norm(x, running_mean, running_var, weight, bias, True, 1.0, EPS,
                                                    relu=relu)
    conditioned = torch.finfo(dtype).eps * shift  # relative error allowed by the problem's conditioning
    # y = (x - mean) * invstd * weight, and the mean itself is only representable to about eps * shift.
    invstd = (rv_ref * (x.numel() // 6 - 1) / (x.numel() // 6) + EPS).rsqrt()
    bound = TOLERANCES[dtype][1] + conditioned * float(weight.abs().max() * invstd.max())
    err = float((y.double() - y_ref).abs().max())
    assert err <= bound, f"output error {err:.3g} > {bound:.3g}"
    assert_close(rm, rm_ref, msg="running_mean")
    rv_err = float(((rv.double() - rv_ref) / rv_ref).abs().max())
    assert rv_err <= max(conditioned, TOLERANCES[dtype][0]), f"running_var relative error {rv_err:.3g}"


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "relu"])
@pytest.mark.parametrize("training", TRAINING)
def test_nan_and_inf_propagate_like_torch(training, relu):
    x = make_input((4, 3, 2, 3))
    x[1, 0, 1, 1] = float("nan")
    x[2, 1, 0, 2] = float("inf")
    x[3, 2, 1, 0] = -float("inf") if not training else x[3, 2, 1, 0]
    weight, bias, running_mean, running_var = make_params(3)
    rm, rv = running_mean.clone(), running_var.clone()
    rm_t, rv_t = running_mean.clone(), running_var.clone()
    y = bn(x, rm, rv, weight, bias, training, activation=_activation(relu))
    y_torch, _ = torch_composite(x, rm_t, rv_t, weight, bias, training, MOMENTUM, EPS, relu=relu)
    assert y.isnan().any(), "the test data should produce NaN"
    assert_close(y, y_torch, msg="output (NaN/Inf positions and values)")
    assert_close(rm, rm_t, msg="running_mean")
    assert_close(rv, rv_t, msg="running_var")


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,fmt", SHAPE_FORMATS)
def test_output_layout(shape, fmt, dtype, training):
    """Outputs keep the input's memory format: the strides torch.empty_like(input) has (which is what the
    ops' fake implementations promise torch.compile), and for named formats the same as torch's output."""
    x = leaf(make_input(shape, dtype, fmt))
    weight, bias, running_mean, running_var = make_params(shape[1])
    residual = make_like(x)
    y = bn(x, running_mean, running_var, weight, bias, training, residual=residual, activation="relu")
    expected = torch.empty_like(x).stride()
    assert y.stride() == expected
    (dx,) = torch.autograd.grad(y, x, make_like(x))
    assert dx.stride() == expected, "grad_input layout"
    if fmt in ("contiguous", "channels_last"):
        memory_format = named_memory_format(x.dim()) if fmt == "channels_last" else torch.contiguous_format
        assert y.is_contiguous(memory_format=memory_format)
        assert dx.is_contiguous(memory_format=memory_format)
        assert y.stride() == F.batch_norm(x, running_mean, running_var, weight, bias, training).stride()


def check_step(shape, dtype, fmt, use_residual, relu, param_dtype=torch.float32, training=True, other_fmt=None):
    """One forward and backward with the given epilogue match torch: output, running statistics, grads. The
    residual and the output's gradient are laid out like the input, or as other_fmt."""
    x0 = make_input(shape, dtype, fmt)
    w0, b0, running_mean, running_var = make_params(shape[1], param_dtype)
    like_x = (lambda: make_like(x0)) if other_fmt is None else (lambda: make_input(shape, dtype, other_fmt, 1.0, 0.0))
    r0 = like_x() if use_residual else None
    dy = like_x()
    x, weight, bias, residual = leaf(x0), leaf(w0), leaf(b0), leaf(r0)
    rm, rv = running_mean.clone(), running_var.clone()
    y = bn(x, rm, rv, weight, bias, training, residual=residual, activation=_activation(relu))
    y.backward(dy)
    ref = reference_with_grads(x0, running_mean, running_var, w0, b0, training, MOMENTUM, EPS, dy, r0, relu)
    assert_close(y, ref.y, msg="output")
    if training:
        assert_close(rm, ref.running_mean, msg="running_mean")
        assert_close(rv, ref.running_var, msg="running_var")
    else:
        assert torch.equal(rm, running_mean) and torch.equal(rv, running_var)
    assert_grads_close({"input": x.grad, "weight": weight.grad, "bias": bias.grad,
                        "residual": None if residual is None else residual.grad}, ref)


@pytest.mark.parametrize("use_residual,relu", EPILOGUES)
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(8, 37, 15, 17), (2, 67, 9, 8)], ids=["8x37x15x17", "2x67x9x8"])
def test_larger_shapes(shape, dtype, fmt, training, use_residual, relu):
    """Sizes past one SIMD vector and past a parallel grain, channel counts not a multiple of the width."""
    check_step(shape, dtype, fmt, use_residual, relu, training=training)


@pytest.mark.parametrize("use_residual", [False, True], ids=["bn", "add"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_streamed_outputs(fmt, use_residual):
    """Outputs past streaming_store_bytes() (half the last-level cache, at most 16 MiB; 20.5 MB here) are streamed
    once their pages are in memory: glibc maps the first 20.5 MB block afresh and reuses freed ones from then on (a
    block over 32 MB would be mapped afresh every time, and take plain stores), so the second step streams.

    No ReLU: among 5M values some pre-activation lies within rounding of 0, where torch's mask and ours may differ.
    """
    for _ in range(2):
        check_step((4, 32, 200, 200), torch.float32, fmt, use_residual, False)


# Shapes that cut the CPU reductions (csrc/cpu/kernels_impl.h, RunTiles and FusedBlocks) into each kind of tile:
# planes longer than a run (chunked; with 16+ channels also in the per-thread fused forward and backward, with
# planes longer than one fused tile too, and with fewer channels in the channel-major backward), short planes
# packed many to a run with several channel blocks and sample groups (more samples than one tile sums, and few
# channels: channel-major; or 16 channels and more samples than fused blocks take: eval writes dx tile by tile),
# a few samples of short planes, one channel to a fused backward block (float32, float64; bfloat16's 7x7 planes, more
# than an eighth of them past whole vectors, keep blocks of several channels: FusedBlocks' few_runs),
# rows wider than a run, a tall (N, C) split into row groups with its sums in registers, and channels_last with few
# channels (sums in registers: 4, 6 and 8 AVX-512 vectors) or many (per-position sums). Eval's backward writes dx
# from each tile of the reduction on every kRows shape.
TILINGS = [((3, 2, 70, 70), "contiguous"), ((2, 16, 70, 70), "contiguous"), ((2, 16, 130, 130), "contiguous"),
           ((70, 300, 3, 3), "contiguous"),
           ((1100, 3, 5, 5), "contiguous"), ((1100, 16, 5, 5), "contiguous"), ((40, 5, 7, 7), "contiguous"),
           ((8, 32, 7, 7), "contiguous"),
           ((1100, 2100), "contiguous"),
           ((5000, 16), "contiguous"), ((16, 64, 12, 12), "channels_last"), ((24, 96, 6, 6), "channels_last"),
           ((20, 128, 5, 5), "channels_last"), ((40, 200, 5, 5), "channels_last")]


@pytest.mark.parametrize("use_residual,relu", [(False, False), (True, True)], ids=["bn", "add_relu"])
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("shape,fmt", TILINGS, ids=[f"{'x'.join(map(str, s))}-{f}" for s, f in TILINGS])
def test_reduction_tilings(shape, fmt, dtype, training, use_residual, relu):
    """Statistics and backward sums over many tiles, merged in a fixed order, match torch; eval's backward takes
    the same fused blocks for its weight and bias gradients."""
    check_step(shape, dtype, fmt, use_residual, relu,
               param_dtype=torch.float64 if dtype == torch.float64 else torch.float32, training=training)


# Views the CPU's strided path walks in runs of contiguous values (csrc/cpu/strided_impl.h): planes of a channel
# slice or of every other sample (runs of H·W), cropped rows (runs of W: 35 values, and 5, shorter than a vector
# but for float64 on AVX2), planes longer than one piece of a run (130x130 > kChunk); and in rows of contiguous
# channels:
# channel slices of an (N, C) matrix (one reduction item, then two, 37 channels: a partial vector per row) and of a
# channels_last tensor; and every other value of the last dim, runs the reductions gather (Staging) in one stage,
# and in three (2100 values > kStage).
VIEWS = [((4, 6, 9, 7), "channel_slice"), ((3, 5, 8, 8), "sample_step"), ((2, 4, 11, 35), "cropped"),
         ((2, 3, 4, 5), "cropped"), ((2, 2, 130, 130), "channel_slice"), ((9, 5), "channel_slice"),
         ((300, 37), "channel_slice"), ((3, 20, 5, 7), "channels_last_slice"), ((2, 3, 5, 40), "sliced"),
         ((1, 2, 2, 2100), "sliced")]


# Rows whose channel count is not a multiple of the vector width: the CPU kernels take runs of several rows
# (rows_per_run in csrc/cpu/kernels_impl.h), then the rows left over as one shorter run; fewer rows than one run;
# a tall (N, C) with enough rows for several reduction tiles and a leftover.
ROW_RUNS = [((4, 6, 9, 7), "channels_last"), ((3, 24, 5, 7), "channels_last"), ((2, 3, 11, 13), "channels_last"),
            ((1, 6, 1, 5), "channels_last"), ((2, 40, 13, 17), "channels_last"), ((70003, 6), "contiguous")]


@pytest.mark.parametrize("use_residual,relu", EPILOGUES)
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["f32", "f16", "bf16", "f64"])
@pytest.mark.parametrize("shape,fmt", ROW_RUNS + VIEWS,
                         ids=[f"{'x'.join(map(str, s))}-{f}" for s, f in ROW_RUNS + VIEWS])
def test_runs_of_rows_and_views(shape, fmt, dtype, training, use_residual, relu):
    """ROW_RUNS and VIEWS, in every dtype and epilogue."""
    check_step(shape, dtype, fmt, use_residual, relu, training=training,
               param_dtype=torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("use_residual,relu", [(False, False), (True, True)], ids=["bn", "add_relu"])
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt,other_fmt", [("channels_last", "contiguous"), ("contiguous", "channels_last"),
                                           ("channel_slice", "channels_last")], ids=lambda f: f)
def test_mixed_layouts(fmt, other_fmt, dtype, training, use_residual, relu):
    """The output's gradient and the residual in another layout than the input: the strided path walks each
    operand through its own strides, the channels innermost in some of them and not in others."""
    check_step((3, 21, 4, 6), dtype, fmt, use_residual, relu, training=training, other_fmt=other_fmt)


def test_no_grad_and_inference_mode():
    x = make_input((3, 4, 2, 2))
    weight, bias, running_mean, running_var = make_params(4)
    expected, *_ = reference_batch_norm(x, running_mean, running_var, weight, bias, False, MOMENTUM, EPS)
    with torch.no_grad():
        assert_close(bn(x, running_mean, running_var, weight.requires_grad_(), bias, False), expected)
    with torch.inference_mode():
        assert_close(bn(x, running_mean, running_var, weight, bias, False), expected)


@pytest.mark.parametrize("use_residual,relu", EPILOGUES)
@pytest.mark.parametrize("training", TRAINING)
def test_saves_no_tensor_torch_would_not(training, use_residual, relu):
    """Activations saved for backward: the input, and the output only where torch's ReLU would save it (after a
    residual add; after BN alone the mask is recomputed from the input). Never the residual."""
    x = leaf(make_input((3, 4, 5, 5)))
    weight, bias, running_mean, running_var = make_params(4)
    weight, bias = leaf(weight), leaf(bias)
    residual = leaf(make_like(x)) if use_residual else None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = bn(x, running_mean, running_var, weight, bias, training, residual=residual,
               activation="relu" if relu else None)
    big = {t.data_ptr() for t in saved if t.shape == x.shape}
    expected = {x.data_ptr()} | ({y.data_ptr()} if use_residual and relu else set())
    assert big == expected
    y.backward(torch.ones_like(y))
    if use_residual:
        assert torch.equal(residual.grad, (y > 0).to(y.dtype) if relu else torch.ones_like(y))


def test_output_changed_in_place_fails_the_backward_like_torch_relu():
    x = leaf(make_input((3, 4, 5, 5)))
    residual = make_like(x)
    _, _, running_mean, running_var = make_params(4)
    y = bn(x, running_mean, running_var, None, None, True, residual=residual, activation="relu")
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("use_residual,relu", [(False, False), (False, True), (True, True)],
                         ids=["bn", "relu", "add-relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("shape", [(8, 130, 7, 7), (3, 70, 14, 14), (4, 33, 5, 5), (3, 20, 1, 17)],
                         ids=["8x130x7x7", "3x70x14x14", "4x33x5x5", "3x20x1x17"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_planes_not_a_whole_number_of_vectors(shape, dtype, use_residual, relu, training):
    """NCHW planes whose length is not a whole number of vectors, forward and backward, against the float64
    reference: each plane ends in a whole vector overlapping the one before (a masked one where the plane is shorter
    than a vector: 5x5 and 1x17 in 16-bit types), in the elementwise passes (eval) and the fused blocks (training),
    and the backward's sums take each plane's last vector masked (plane_by_plane_sums), the ReLU mask read from the
    output or recomputed."""
    check_step(shape, dtype, "contiguous", use_residual, relu, training=training)
