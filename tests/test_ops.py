"""Values of the torch.ops.fastbn ops called directly (semantics from csrc/ops.h): forward_train's saved
statistics, backward's outputs and output_mask, and the SyncBatchNorm pieces (local_stats, normalize,
backward_reduce, backward_elementwise) composing to the float64 reference on a single process."""
import pytest
import torch

import fastbn  # noqa: F401  (registers torch.ops.fastbn)
from bn_testing import (assert_close, assert_grads_close, channel_view, make_input, make_like, make_params, reduce_dims,
                      reference_with_grads)

ops = torch.ops.fastbn
LAYOUTS = [
    pytest.param(torch.float64, torch.float64, "contiguous", id="f64"),
    pytest.param(torch.float32, torch.float32, "channels_last", id="f32-channels_last"),
    pytest.param(torch.bfloat16, torch.float32, "sliced", id="bf16-sliced"),
]
SHAPE = (4, 5, 3, 3)
EPS = 1e-5


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _batch_stats(x):
    var, mean = torch.var_mean(x.double(), reduce_dims(x), correction=0)
    return mean, var


@pytest.mark.parametrize("dtype,param_dtype,fmt", LAYOUTS)
def test_forward_train_saves_batch_mean_and_invstd(dtype, param_dtype, fmt):
    x = make_input(SHAPE, dtype, fmt)
    weight, bias, running_mean, running_var = make_params(SHAPE[1], param_dtype)
    y, save_mean, save_invstd = ops.forward_train(x, weight, bias, None, running_mean, running_var, None, 0.1, EPS,
                                                  False)
    mean, var = _batch_stats(x)
    assert save_mean.dtype == _acc(dtype) and save_invstd.dtype == _acc(dtype)
    assert_close(save_mean, mean, msg="save_mean")
    assert_close(save_invstd, (var + EPS).rsqrt(), msg="save_invstd")


# (residual, relu) of the forward, and where the backward's ReLU mask comes from: "add" has none, "relu" recomputes
# the pre-activation from the input, "add-relu" reads the forward's output (the output argument).
EPILOGUES = [pytest.param(True, False, id="add"), pytest.param(False, True, id="relu"),
             pytest.param(True, True, id="add-relu")]


def _epilogue(x, mean, invstd, weight, bias, has_residual, relu):
    """(residual, output argument of the backward ops) for an epilogue; the output is the forward's."""
    residual = make_like(x) if has_residual else None
    if not (has_residual and relu):
        return residual, None
    return residual, ops.normalize(x, mean, invstd, weight, bias, residual, True)


@pytest.mark.parametrize("has_residual,relu", EPILOGUES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,param_dtype,fmt", LAYOUTS)
def test_backward_op(dtype, param_dtype, fmt, training, has_residual, relu):
    x = make_input(SHAPE, dtype, fmt)
    weight, bias, running_mean, running_var = make_params(SHAPE[1], param_dtype)
    if training:
        mean, var = _batch_stats(x)
    else:
        mean, var = running_mean.double(), running_var.double()
    acc = _acc(dtype)
    mean, invstd = mean.to(acc), (var + EPS).rsqrt().to(acc)
    residual, output = _epilogue(x, mean, invstd, weight, bias, has_residual, relu)
    dy = make_like(x)
    grads = ops.backward(dy, x, weight, bias, output, mean, invstd, training, relu, [True, True, True, True])
    ref = reference_with_grads(x, running_mean, running_var, weight, bias, training, 0.1, EPS, dy, residual, relu)
    assert_grads_close(dict(zip(("input", "weight", "bias", "residual"), grads)), ref)
    # output_mask: unselected outputs are empty, selected ones unchanged
    partial = ops.backward(dy, x, weight, bias, output, mean, invstd, training, relu, [False, True, False, False])
    assert partial[0].numel() == 0 and partial[2].numel() == 0 and partial[3].numel() == 0
    assert_close(partial[1], ref.grads["weight"], scale=ref.scales["weight"], msg="grad weight alone")


def test_backward_masks_relu_by_the_output_when_given():
    """With relu, a given output decides the mask (output > 0) whatever the input says."""
    x = make_input(SHAPE, torch.float32, "contiguous")
    mean, invstd = torch.zeros(SHAPE[1]), torch.ones(SHAPE[1])
    dy = make_like(x)
    output = torch.randn_like(x)
    got = ops.backward(dy, x, None, None, output, mean, invstd, False, True, [True, False, False, True])
    assert torch.equal(got[3], torch.where(output > 0, dy, 0))
    assert torch.equal(got[0], got[3])  # eval, unit scale: dx = g
    recomputed = ops.backward(dy, x, None, None, None, mean, invstd, False, True, [True, False, False, False])
    assert torch.equal(recomputed[0], torch.where(x > 0, dy, 0))


@pytest.mark.parametrize("dtype,param_dtype,fmt", LAYOUTS)
def test_local_stats(dtype, param_dtype, fmt):
    x = make_input(SHAPE, dtype, fmt)
    mean, var, count = ops.local_stats(x)
    ref_mean, ref_var = _batch_stats(x)
    assert mean.dtype == var.dtype == count.dtype == _acc(dtype)
    assert count.dim() == 0 and float(count) == x.numel() / x.shape[1]
    assert_close(mean, ref_mean, msg="mean")
    assert_close(var, ref_var, msg="var (biased, as used to normalize)")


@pytest.mark.parametrize("has_residual,relu", EPILOGUES)
@pytest.mark.parametrize("dtype,param_dtype,fmt", LAYOUTS)
def test_sync_pieces_compose_to_the_reference(dtype, param_dtype, fmt, has_residual, relu):
    """local_stats -> normalize -> backward_reduce -> backward_elementwise, as a one-process SyncBatchNorm."""
    x = make_input(SHAPE, dtype, fmt)
    weight, bias, running_mean, running_var = make_params(SHAPE[1], param_dtype)
    mean, var, count = ops.local_stats(x)
    invstd = torch.rsqrt(var + EPS)
    residual = make_like(x) if has_residual else None
    dy = make_like(x)
    y = ops.normalize(x, mean, invstd, weight, bias, residual, relu)
    output = y if has_residual and relu else None
    sum_dy, sum_dy_xhat = ops.backward_reduce(dy, x, mean, invstd, weight, bias, output, relu)
    dx = ops.backward_elementwise(dy, x, mean, invstd, weight, bias, output, sum_dy / count, sum_dy_xhat / count,
                                  relu)
    ref = reference_with_grads(x, running_mean, running_var, weight, bias, True, 0.1, EPS, dy, residual, relu)
    assert y.stride() == torch.empty_like(x).stride() and dx.stride() == torch.empty_like(x).stride()
    assert_close(y, ref.y, msg="normalize")
    assert_close(sum_dy, ref.grads["bias"], scale=ref.scales["bias"], dtype=param_dtype, msg="sum_dy")
    assert_close(sum_dy_xhat, ref.grads["weight"], scale=ref.scales["weight"], dtype=param_dtype, msg="sum_dy_xhat")
    assert_close(dx, ref.grads["input"], msg="backward_elementwise")


def test_normalize_subtracts_the_mean_before_scaling():
    """y = (x - mean) * (invstd * weight) + bias keeps the precision of data with a large mean."""
    x = make_input((4, 3, 8), torch.float32, scale=1.0, shift=1e4)
    mean, var = _batch_stats(x)
    invstd = (var + EPS).rsqrt()
    y = ops.normalize(x, mean.float(), invstd.float(), None, None, None, False)
    expected = (x.double() - channel_view(mean.float().double(), 3)) * channel_view(invstd.float().double(), 3)
    # (x - mean) of two float32 numbers near 1e4 is exact (Sterbenz): only the scaling rounds.
    assert_close(y, expected)
