"""batch_norm() with torch.nn.functional.batch_norm's signature, plus fused residual add and ReLU."""
from typing import Optional

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

    Computes ``activation(batch_norm(input) + residual)`` in one pass over the output, differentiable through the
    ops' Autograd kernels (csrc/autograd.cpp), twice with create_graph=True. Keyword-only extras:

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
