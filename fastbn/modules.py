"""Drop-in BatchNorm modules, their fused variants, and convert() between fastbn and torch classes."""
import warnings
from typing import Optional

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as F


class _FastBatchNorm:
    """forward() of every fastbn BatchNorm: torch's _BatchNorm.forward, fused and with no host sync.

    Unlike torch's module, num_batches_tracked is incremented inside the op, after the arguments are
    checked, so a bad input leaves it untouched; and momentum=None reads the counter on the device.
    """

    _activation: Optional[str] = None

    def _batch_norm(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        if self.training:
            use_batch_stats = True
        else:
            use_batch_stats = self.running_mean is None and self.running_var is None
        # Buffers are passed when they are updated (training and tracked) or used (eval with buffers).
        pass_buffers = not self.training or self.track_running_stats
        count = self.num_batches_tracked if self.training and self.track_running_stats else None
        return F.batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            residual=residual,
            activation=self._activation,
            num_batches_tracked=count,
        )

    def forward(self, input: Tensor) -> Tensor:
        return self._batch_norm(input)


class BatchNorm1d(_FastBatchNorm, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by fastbn's fused kernels."""


class BatchNorm2d(_FastBatchNorm, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by fastbn's fused kernels."""


class BatchNorm3d(_FastBatchNorm, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by fastbn's fused kernels."""


class BatchNormReLU1d(BatchNorm1d):
    """relu(BatchNorm1d(x)) in one pass; the ReLU mask is recomputed in backward, not stored."""

    _activation = "relu"


class BatchNormReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(x)) in one pass; the ReLU mask is recomputed in backward, not stored."""

    _activation = "relu"


class BatchNormReLU3d(BatchNorm3d):
    """relu(BatchNorm3d(x)) in one pass; the ReLU mask is recomputed in backward, not stored."""

    _activation = "relu"


class BatchNormAddReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(x) + residual) in one pass: the tail of a ResNet block.

    Like torch's ReLU, it keeps its output for the ReLU mask of the backward (not the residual), so changing the
    output in place before the backward is an error, as it is after ``torch.relu``.
    """

    _activation = "relu"

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return self._batch_norm(input, residual)


_TORCH_TO_FASTBN = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_FASTBN_TO_TORCH = {fast: torch_cls for torch_cls, fast in _TORCH_TO_FASTBN.items()}
_FASTBN_CLASSES = (_FastBatchNorm,)


def convert(module: nn.Module, to: str = "fastbn") -> nn.Module:
    """Swaps every BatchNorm1d/2d/3d in `module` between torch's and fastbn's classes, in place.

    to="fastbn" replaces torch.nn.BatchNorm1d/2d/3d with fastbn.BatchNorm1d/2d/3d; to="torch" does the
    reverse. The new modules share the old ones' Parameter and buffer objects (optimizers and state_dicts
    keep working), hooks and training flags. Other BatchNorm subclasses (SyncBatchNorm, lazy or user
    subclasses; fastbn's fused modules when converting to torch) are left alone with a warning.
    Returns `module`, or its replacement when `module` itself is a BatchNorm.
    """
    if to not in ("fastbn", "torch"):
        raise ValueError(f"convert: `to` must be 'fastbn' or 'torch', but got {to!r}")
    table = _TORCH_TO_FASTBN if to == "fastbn" else _FASTBN_TO_TORCH
    return _convert(module, table, to, name=type(module).__name__)


def _convert(module: nn.Module, table: dict, to: str, name: str) -> nn.Module:
    for child_name, child in list(module.named_children()):
        converted = _convert(child, table, to, f"{name}.{child_name}")
        if converted is not child:
            module._modules[child_name] = converted
    target = table.get(type(module))
    if target is not None:
        return _retype(module, target)
    if isinstance(module, _BatchNorm) and not _already_target(module, to):
        warnings.warn(
            f"fastbn.convert: left {name} ({type(module).__qualname__}) as it is: only "
            f"{', '.join(cls.__qualname__ for cls in table)} are converted to {to}",
            UserWarning,
            stacklevel=3,
        )
    return module


def _already_target(module: nn.Module, to: str) -> bool:
    if to == "fastbn":
        return isinstance(module, _FASTBN_CLASSES)
    return type(module) in _TORCH_TO_FASTBN


def _retype(module: nn.Module, cls: type) -> nn.Module:
    """A `cls` instance with `module`'s state: the same Parameter and buffer objects, hooks and flags.

    The containers of parameters, buffers and children are copied so the two modules can diverge; hook
    dicts are shared so handles taken on the old module still remove their hooks.
    """
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in module.__dict__:
            new.__dict__[key] = module.__dict__[key].copy()
    return new
