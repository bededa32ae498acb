"""torch.autograd.gradcheck and gradgradcheck of fastbn.functional.batch_norm in float64.

With a ReLU, finite differences are only valid away from the kink: the inputs are drawn until every
pre-activation is at least RELU_MARGIN from 0 (the gradcheck perturbation is 1e-6)."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fastbn
from bn_testing import make_input, make_like, make_params, reference_batch_norm

RELU_MARGIN = 1e-2
CASES = [  # (shape, memory format)
    pytest.param((3, 4, 3, 2), "contiguous", id="NCHW"),
    pytest.param((3, 4, 3, 2), "channels_last", id="NHWC"),
]
EXTRA_SHAPES = [
    pytest.param((6, 3), "contiguous", id="NC"),
    pytest.param((2, 3, 4), "transposed", id="NCL-transposed"),
    pytest.param((2, 3, 2, 2, 2), "channels_last", id="NCDHW-channels_last"),
]
EPILOGUES = [pytest.param(False, False, id="bn"), pytest.param(False, True, id="relu"),
             pytest.param(True, False, id="add"), pytest.param(True, True, id="add-relu")]


def _inputs(shape, fmt, training, affine, use_residual, relu):
    """float64 leaves requiring grad, with pre-activations kept away from the ReLU kink."""
    for attempt in range(100):
        x = make_input(shape, torch.float64, fmt)
        weight, bias, running_mean, running_var = make_params(shape[1], torch.float64, affine)
        residual = make_like(x) if use_residual else None
        if not relu:
            break
        pre, *_ = reference_batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5, residual)
        if pre.abs().min() > RELU_MARGIN and (pre > 0).any() and (pre < 0).any():
            break
    else:
        raise AssertionError("no ReLU-safe inputs found")
    tensors = [t.requires_grad_() if t is not None else None for t in (x, weight, bias, residual)]
    return tensors, running_mean, running_var


def _function(training, relu, running_mean, running_var):
    def f(x, weight, bias, residual):
        return fastbn.functional.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5,
                                            residual=residual, activation="relu" if relu else None)
    return f


@pytest.mark.parametrize("use_residual,relu", EPILOGUES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,fmt", CASES)
def test_gradcheck(shape, fmt, training, affine, use_residual, relu):
    tensors, running_mean, running_var = _inputs(shape, fmt, training, affine, use_residual, relu)
    assert gradcheck(_function(training, relu, running_mean, running_var), tensors)


@pytest.mark.parametrize("use_residual,relu", EPILOGUES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,fmt", CASES)
def test_gradgradcheck(shape, fmt, training, affine, use_residual, relu):
    tensors, running_mean, running_var = _inputs(shape, fmt, training, affine, use_residual, relu)
    assert gradgradcheck(_function(training, relu, running_mean, running_var), tensors)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,fmt", EXTRA_SHAPES)
def test_gradcheck_other_ranks(shape, fmt, training):
    tensors, running_mean, running_var = _inputs(shape, fmt, training, True, True, True)
    f = _function(training, True, running_mean, running_var)
    assert gradcheck(f, tensors)
    assert gradgradcheck(f, tensors)


def test_gradcheck_without_running_stats():
    """Training with batch statistics only (track_running_stats=False)."""
    tensors, _, _ = _inputs((4, 3, 2, 2), "contiguous", True, True, False, False)
    f = _function(True, False, None, None)
    assert gradcheck(f, tensors)
    assert gradgradcheck(f, tensors)
