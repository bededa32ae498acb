"""Typed wrappers over torch.ops.fastbn and the ops' fake (meta) implementations.

The fake implementations describe each op's outputs (shape, dtype, memory format) so that
torch.compile and FakeTensor tracing can run the ops without data.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._load import load_extension

load_extension()
_ops = torch.ops.fastbn


def acc_dtype(input: Tensor) -> torch.dtype:
    """dtype of statistics and accumulation: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def forward_train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
                  relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _ops.forward_train.default(input, weight, bias, residual, running_mean, running_var,
                                      num_batches_tracked, momentum, eps, relu)


def forward_eval(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                 running_mean: Tensor, running_var: Tensor, eps: float, relu: bool) -> Tensor:
    return _ops.forward_eval.default(input, weight, bias, residual, running_mean, running_var, eps, relu)


def backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             residual: Optional[Tensor], mean: Tensor, invstd: Tensor, training: bool, relu: bool,
             output_mask: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _ops.backward.default(grad_output, input, weight, bias, residual, mean, invstd, training, relu,
                                 list(output_mask))


def local_stats(input: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return _ops.local_stats.default(input)


def normalize(input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
              residual: Optional[Tensor], relu: bool) -> Tensor:
    return _ops.normalize.default(input, mean, invstd, weight, bias, residual, relu)


def backward_reduce(grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], residual: Optional[Tensor], relu: bool) -> Tuple[Tensor, Tensor]:
    return _ops.backward_reduce.default(grad_output, input, mean, invstd, weight, bias, residual, relu)


def backward_elementwise(grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor,
                         weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                         mean_dy: Tensor, mean_dy_xhat: Tensor, relu: bool) -> Tensor:
    return _ops.backward_elementwise.default(grad_output, input, mean, invstd, weight, bias, residual, mean_dy,
                                             mean_dy_xhat, relu)


# Fake implementations. Outputs follow the kernels: same sizes and memory format as the input
# (torch.empty_like preserves it), per-channel statistics of the accumulation dtype.

def _stats(input: Tensor) -> Tensor:
    return input.new_empty((input.shape[1],), dtype=acc_dtype(input))


def _check_same_device(*tensors: Optional[Tensor]) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        a, b = sorted(devices, key=str)[:2]
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, {a} and {b}!")


@torch.library.register_fake("fastbn::forward_train")
def _(input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps, relu):
    _check_same_device(input, weight, bias, residual, running_mean, running_var, num_batches_tracked)
    return torch.empty_like(input), _stats(input), _stats(input)


@torch.library.register_fake("fastbn::forward_eval")
def _(input, weight, bias, residual, running_mean, running_var, eps, relu):
    _check_same_device(input, weight, bias, residual, running_mean, running_var)
    return torch.empty_like(input)


@torch.library.register_fake("fastbn::backward")
def _(grad_output, input, weight, bias, residual, mean, invstd, training, relu, output_mask):
    _check_same_device(grad_output, input, weight, bias, residual, mean, invstd)
    param_dtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else acc_dtype(input))
    channels = input.shape[1]

    def grad_like_input(wanted):
        return torch.empty_like(input) if wanted else input.new_empty((0,))

    def grad_param(wanted):
        return input.new_empty((channels,), dtype=param_dtype) if wanted else input.new_empty((0,))

    return (grad_like_input(output_mask[0]), grad_param(output_mask[1]), grad_param(output_mask[2]),
            grad_like_input(output_mask[3]))


@torch.library.register_fake("fastbn::local_stats")
def _(input):
    return _stats(input), _stats(input), input.new_empty((), dtype=acc_dtype(input))


@torch.library.register_fake("fastbn::normalize")
def _(input, mean, invstd, weight, bias, residual, relu):
    _check_same_device(input, mean, invstd, weight, bias, residual)
    return torch.empty_like(input)


@torch.library.register_fake("fastbn::backward_reduce")
def _(grad_output, input, mean, invstd, weight, bias, residual, relu):
    _check_same_device(grad_output, input, mean, invstd, weight, bias, residual)
    return _stats(input), _stats(input)


@torch.library.register_fake("fastbn::backward_elementwise")
def _(grad_output, input, mean, invstd, weight, bias, residual, mean_dy, mean_dy_xhat, relu):
    _check_same_device(grad_output, input, mean, invstd, weight, bias, residual, mean_dy, mean_dy_xhat)
    return torch.empty_like(input)
