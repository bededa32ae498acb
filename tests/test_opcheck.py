"""torch.library.opcheck on every torch.ops.fastbn op: schema (including the mutated running statistics
and counter of forward_train), fake-tensor implementations (shapes, dtypes, strides) and AOT dispatch.

forward_train and forward_eval are differentiable through their C++ Autograd kernels (csrc/autograd.cpp):
test_forward_ops_with_gradients runs every check, the autograd registration and AOT dispatch of the backward
included, on inputs that require grad; the other tests pass inputs that do not."""
import pytest
import torch

import fastbn  # noqa: F401  (registers torch.ops.fastbn)
from bn_testing import make_input, make_like, make_params

ops = torch.ops.fastbn
TEST_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")

# (input dtype, parameter dtype, memory format)
LAYOUTS = {
    "f32-contiguous": (torch.float32, torch.float32, "contiguous"),
    "f32-channels_last": (torch.float32, torch.float32, "channels_last"),
    "f64-sliced": (torch.float64, torch.float64, "sliced"),
    "bf16-f32params-channels_last": (torch.bfloat16, torch.float32, "channels_last"),
    "f16-contiguous": (torch.float16, torch.float16, "contiguous"),
}
SHAPE = (3, 5, 4, 3)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tensors(layout, affine=True, residual=True):
    dtype, param_dtype, fmt = LAYOUTS[layout]
    x = make_input(SHAPE, dtype, fmt)
    weight, bias, running_mean, running_var = make_params(SHAPE[1], param_dtype, affine)
    r = make_like(x) if residual else None
    dims = [0, 2, 3]
    var, mean = torch.var_mean(x.to(_acc(dtype)), dims, correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    return x, weight, bias, r, running_mean, running_var, mean, invstd


def _opcheck(op, args, test_utils=TEST_UTILS):
    result = torch.library.opcheck(op, args, test_utils=test_utils)
    failures = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not failures, failures


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
@pytest.mark.parametrize("relu,affine,residual", [(False, True, False), (True, True, True), (False, False, True)],
                         ids=["bn", "add-relu", "noaffine-add"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_train(layout, relu, affine, residual, momentum):
    x, weight, bias, r, running_mean, running_var, _, _ = _tensors(layout, affine, residual)
    count = torch.tensor(4, dtype=torch.long)
    _opcheck(ops.forward_train.default, (x, weight, bias, r, running_mean, running_var, count, momentum, 1e-5, relu))


@pytest.mark.parametrize("layout", ["f32-contiguous", "bf16-f32params-channels_last"])
def test_forward_train_without_running_stats(layout):
    x, weight, bias, *_ = _tensors(layout)
    _opcheck(ops.forward_train.default, (x, weight, bias, None, None, None, None, 0.1, 1e-5, False))


@pytest.mark.parametrize("relu,residual", [(False, False), (True, True)], ids=["bn", "add-relu"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_eval(layout, relu, residual):
    x, weight, bias, r, running_mean, running_var, _, _ = _tensors(layout, residual=residual)
    _opcheck(ops.forward_eval.default, (x, weight, bias, r, running_mean, running_var, 1e-5, relu))


@pytest.mark.parametrize("relu,residual", [(False, False), (True, True)], ids=["bn", "add-relu"])
@pytest.mark.parametrize("layout", ["f32-contiguous", "bf16-f32params-channels_last"])
def test_forward_ops_with_gradients(layout, relu, residual):
    x, weight, bias, r, running_mean, running_var, _, _ = _tensors(layout, residual=residual)
    for t in (x, weight, bias, r):
        if t is not None:
            t.requires_grad_()
    every_check = TEST_UTILS + ("test_autograd_registration",)
    count = torch.tensor(4, dtype=torch.long)
    _opcheck(ops.forward_train.default, (x, weight, bias, r, running_mean, running_var, count, 0.1, 1e-5, relu),
             every_check)
    _opcheck(ops.forward_eval.default, (x, weight, bias, r, running_mean, running_var, 1e-5, relu), every_check)


MASKS = {
    "all": [True, True, True, True],
    "input-only": [True, False, False, False],
    "params-only": [False, True, True, False],
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward(layout, training, mask):
    # With an output argument: the ReLU mask of a residual add (its values do not matter here).
    x, weight, bias, output, _, _, mean, invstd = _tensors(layout, residual=True)
    dy = make_like(x)
    _opcheck(ops.backward.default, (dy, x, weight, bias, output, mean, invstd, training, True, MASKS[mask]))


def test_backward_without_affine():
    x, _, _, _, _, _, mean, invstd = _tensors("f32-contiguous", affine=False)
    dy = make_like(x)
    _opcheck(ops.backward.default, (dy, x, None, None, None, mean, invstd, True, False, [True, False, False, False]))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_local_stats(layout):
    x, *_ = _tensors(layout)
    _opcheck(ops.local_stats.default, (x,))


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "add-relu"])
@pytest.mark.parametrize("layout", ["f32-channels_last", "f64-sliced", "bf16-f32params-channels_last"])
def test_sync_pieces(layout, relu):
    x, weight, bias, r, _, _, mean, invstd = _tensors(layout, residual=relu)
    dy = make_like(x)
    _opcheck(ops.normalize.default, (x, mean, invstd, weight, bias, r, relu))
    y = ops.normalize(x, mean, invstd, weight, bias, r, relu) if relu else None  # the backward's ReLU mask
    _opcheck(ops.backward_reduce.default, (dy, x, mean, invstd, weight, bias, y, relu))
    mean_dy, mean_dy_xhat = torch.randn_like(mean), torch.randn_like(mean)
    _opcheck(ops.backward_elementwise.default, (dy, x, mean, invstd, weight, bias, y, mean_dy, mean_dy_xhat, relu))
