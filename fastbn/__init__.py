"""fastbn: fused Batch Normalization for PyTorch.

Drop-in replacements for torch.nn.BatchNorm1d/2d/3d whose fused kernels compute the statistics, normalize,
apply the affine transform (optionally a residual add and ReLU) and update the running statistics in as
few passes over memory as possible.
"""
from . import functional, ops
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAddReLU2d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
    convert,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "BatchNormAddReLU2d",
    "convert",
    "functional",
    "ops",
]
