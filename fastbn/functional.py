"""batch_norm() with torch.nn.functional.batch_norm's signature, plus fused residual add and ReLU."""
from typing import Optional

import torch
from torch import Tensor

from . import ops

_ACTIVATIONS = (None, "relu")


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """Batch Normalization as torch.nn.functional.batch_norm, fused with an optional epilogue.

    Computes ``activation(batch_norm(input) + residual)`` in one pass over the output. Keyword-only extras:

    * ``residual``: a tensor of the input's shape and dtype, added after the affine transform.
    * ``activation``: ``None`` or ``"relu"``.
    * ``num_batches_tracked``: an int64 tensor of one element, incremented in place when training with
      running statistics (left alone without them); with ``momentum=None`` the running statistics then take the cumulative average
      (factor ``1 / num_batches_tracked``), read on the device with no host synchronisation.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, but got {activation!r}")
    relu = activation == "relu"
    if training:
        # The counter counts updates of the running statistics, as torch's modules do.
        if running_mean is None:
            num_batches_tracked = None
        return ops.forward_train(input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                 momentum, eps, relu)[0]
    if running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if running_var is None:
        raise RuntimeError("running_var must be defined in evaluation mode")
    return ops.forward_eval(input, weight, bias, residual, running_mean, running_var, eps, relu)


def _grad_mask(ctx, weight, bias, relu):
    """Which of (input, weight, bias, residual) gradients the backward op must compute."""
    needs = ctx.needs_input_grad
    # Without ReLU the residual's gradient is grad_output itself: no kernel work.
    return [needs[0], needs[1] and weight is not None, needs[2] and bias is not None, needs[3] and relu]


def _gradients(ctx, grad_output, input, weight, bias, output, mean, invstd, training, relu):
    """(grad_input, grad_weight, grad_bias, grad_residual), None where not needed.

    output is the forward's output where the ReLU follows a residual add (its mask is output > 0), else None.
    """
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():
        # create_graph=True: a composite of torch ops that autograd can differentiate again.
        return _composite_gradients(needs, grad_output, input, weight, bias, output, mean, invstd, training,
                                    relu, ctx.eps)
    mask = _grad_mask(ctx, weight, bias, relu)
    grads = ops.backward(grad_output, input, weight, bias, output, mean, invstd, training, relu, mask)
    grads = [g if wanted else None for g, wanted in zip(grads, mask)]
    if needs[3] and not relu:
        grads[3] = grad_output
    return grads


def _reference_forward(input, weight, bias, mean, invstd, relu, eps):
    """BN forward (and ReLU) in torch ops; batch statistics when mean/invstd are None (training)."""
    shape = [1, -1] + [1] * (input.dim() - 2)
    x = input.to(ops.acc_dtype(input))
    if mean is None:
        dims = [0] + list(range(2, input.dim()))
        var, mean = torch.var_mean(x, dims, correction=0)
        invstd = torch.rsqrt(var + eps)
    y = (x - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        y = y * weight.to(y.dtype).view(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).view(shape)
    if relu:
        y = torch.relu(y)
    return y.to(input.dtype)


def _composite_gradients(needs, grad_output, input, weight, bias, output, mean, invstd, training, relu, eps):
    """Gradients by autograd through _reference_forward."""
    if output is not None:
        # ReLU after a residual add: its gradient is grad_output where the output is > 0 (threshold_backward's
        # mask, a constant to autograd), which is also the residual's gradient and what BN's backward receives.
        grad_output = torch.where(output > 0, grad_output, 0)
        relu = False
    inputs = (input, weight, bias)
    wanted = [t for t, n in zip(inputs, needs) if n and t is not None]
    found = iter(())
    if wanted:
        with torch.enable_grad():
            stats = (None, None) if training else (mean.detach(), invstd.detach())
            y = _reference_forward(input, weight, bias, *stats, relu, eps)
            found = iter(torch.autograd.grad(y, wanted, grad_output, create_graph=True, allow_unused=True))
    grads = [next(found) if n and t is not None else None for t, n in zip(inputs, needs)]
    return grads + [grad_output if needs[3] else None]


# One forward-context setup and one backward per op, used by the autograd.Function classes below. Those
# classes are also registered as the ops' Autograd kernels, so torch.ops.fastbn.forward_train/forward_eval
# are differentiable when called directly, and batch_norm() simply calls the ops.

def _mask_output(residual, output, relu):
    """What the backward masks the ReLU with: the output after a residual add, None where the kernels recompute it.

    Keeping the output costs no memory the next layer does not keep anyway (and matches torch's relu, which saves
    its result); keeping the residual instead would hold a tensor nothing else may need (a downsample branch's).
    """
    return output if relu and residual is not None else None


def _setup_train(ctx, inputs, output):
    input, weight, bias, residual, _, _, _, _, eps, relu = inputs
    y, mean, invstd = output
    ctx.save_for_backward(input, weight, bias, _mask_output(residual, y, relu), mean, invstd)
    ctx.relu, ctx.eps = relu, eps


def _backward_train(ctx, grad_output, *_stats_grads):
    input, weight, bias, output, mean, invstd = ctx.saved_tensors
    grads = _gradients(ctx, grad_output, input, weight, bias, output, mean, invstd, True, ctx.relu)
    return (*grads, None, None, None, None, None, None)


def _setup_eval(ctx, inputs, output):
    input, weight, bias, residual, running_mean, running_var, eps, relu = inputs
    mean = invstd = None
    if any(ctx.needs_input_grad[:4]):
        # Saved as values, not as the buffers, so a later in-place update of the running statistics
        # cannot invalidate this graph.
        acc = ops.acc_dtype(input)
        mean = running_mean.detach().to(acc, copy=True)
        # sqrt then reciprocal, both correctly rounded, as the kernels compute it: the backward's
        # recomputed ReLU mask must match the forward's bit for bit (rsqrt may be approximate on GPUs).
        invstd = torch.sqrt(running_var.detach().to(acc) + eps).reciprocal()
    ctx.save_for_backward(input, weight, bias, _mask_output(residual, output, relu), mean, invstd)
    ctx.relu, ctx.eps = relu, eps


def _backward_eval(ctx, grad_output):
    input, weight, bias, output, mean, invstd = ctx.saved_tensors
    grads = _gradients(ctx, grad_output, input, weight, bias, output, mean, invstd, False, ctx.relu)
    return (*grads, None, None, None, None)


class _TrainingBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = ops.forward_train(*inputs)
        _setup_train(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1], output[2])
        return output

    backward = staticmethod(_backward_train)


class _EvalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = ops.forward_eval(*inputs)
        _setup_eval(ctx, inputs, output)
        return output

    backward = staticmethod(_backward_eval)


def _autograd_kernel(function, op):
    """The Autograd kernel of op: function.apply when a gradient can flow, else straight to the op below autograd.

    autograd.Function.apply costs ~30 us of Python per call even when nothing requires grad (inference, or the
    running statistics' update under no_grad); skipping it then gives the same result.
    """
    def kernel(*inputs):
        if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs[:4]):
            return function.apply(*inputs)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*inputs)
    return kernel


_autograd_kernels = torch.library.Library("fastbn", "IMPL")
_autograd_kernels.impl("forward_train", _autograd_kernel(_TrainingBatchNorm, ops.forward_train), "Autograd")
_autograd_kernels.impl("forward_eval", _autograd_kernel(_EvalBatchNorm, ops.forward_eval), "Autograd")
