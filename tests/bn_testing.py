"""Shared test helpers: the one per-dtype tolerance table, input makers and the float64 reference.

Every comparison in the suite goes through `assert_close` (tolerances from TOLERANCES, keyed by the dtype
of the tensor being checked) so that there is exactly one place where precision is decided.
"""
import pytest
import torch
import torch.nn.functional as F

# One per-dtype tolerance table (rtol, atol), applied to the dtype of the tensor under test.
#  - float64: both sides are exact up to summation order; 1e-10 leaves room for m up to ~1e5 values.
#  - float32: a few float32 ulps of O(1) values, accumulated over the per-channel sums.
#  - float16 / bfloat16: outputs are rounded once from a float32 computation, so fastbn and torch (or the
#    float64 reference) differ by at most one output ulp: float16 has 2^-10 ~ 9.8e-4 relative spacing at
#    the bottom of a binade, bfloat16 2^-7 ~ 7.8e-3. rtol is one to two ulps, atol about one ulp of 1.0.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}

DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

# (input dtype, dtype of weight/bias/running stats): the input's own dtype, plus torch's mixed mode
# (16-bit input, float32 parameters) which is what torch.nn.BatchNorm2d(C)(x.half()) does.
DTYPE_CASES = [
    pytest.param(torch.float64, torch.float64, id="f64"),
    pytest.param(torch.float32, torch.float32, id="f32"),
    pytest.param(torch.float16, torch.float32, id="f16-f32params"),
    pytest.param(torch.float16, torch.float16, id="f16-f16params"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-f32params"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16-bf16params"),
]

# Input layouts. "channels_last" means channels_last for 4-D and channels_last_3d for 5-D inputs;
# "transposed" swaps the two last dimensions of a contiguous tensor (for 2-D and 3-D inputs this puts
# the channels innermost), "sliced" takes every other element of the last dimension (not dense).
FORMATS = ("contiguous", "channels_last", "transposed", "sliced")
# Views of a larger contiguous tensor, for the strided path's runs (csrc/cpu/strided_impl.h): "channel_slice"
# takes channels 1..C of C + 2 ("channels_last_slice": of a channels_last tensor), "sample_step" every other sample,
# "cropped" drops the border of the last two dims.
VIEW_FORMATS = ("channel_slice", "channels_last_slice", "sample_step", "cropped")


def formats_for(shape):
    return [f for f in FORMATS if f != "channels_last" or len(shape) in (4, 5)]


def named_memory_format(ndim):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim, torch.contiguous_format)


def tol(dtype):
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual, expected, dtype=None, scale=None, msg=""):
    """actual vs expected (compared in float64) with the tolerance of `dtype` (default: actual's dtype).

    `scale`, when given, is an elementwise magnitude that the relative tolerance also applies to: use it
    when the expected value was rounded at an intermediate of magnitude `scale` (torch's unfused
    composites round bn(x) before adding the residual), so that rounding is allowed for honestly.
    NaN must match NaN, and infinities must match exactly.
    """
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if scale is None:
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{msg} ({DTYPE_IDS[dtype]} tolerance)\n{m}")
        return
    s = scale.detach().double().cpu().abs()
    nan_a, nan_e = a.isnan(), e.isnan()
    assert torch.equal(nan_a, nan_e), f"{msg}: NaN positions differ"
    a, e, s = a[~nan_a], e[~nan_e], s[~nan_e]
    allowed = atol + rtol * torch.maximum(e.abs(), s)
    err = (a - e).abs()
    bad = err > allowed
    assert not bad.any(), (f"{msg}: {int(bad.sum())} of {a.numel()} elements differ beyond the "
                           f"{DTYPE_IDS[dtype]} tolerance; worst error {float(err.max()):.3g}")


def assert_same_state(before, after, msg=""):
    """Running statistics / counters bit-for-bit unchanged (NaN-aware)."""
    for name, b in before.items():
        a = after[name]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{msg}: {name} changed dtype/shape"
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), (
            f"{msg}: {name} changed from {b} to {a}")


def make_input(shape, dtype=torch.float32, fmt="contiguous", scale=2.0, shift=0.5):
    """A tensor of `shape` and `dtype` laid out as `fmt` (see FORMATS), values scale*randn + shift.

    Values are drawn in float32 and rounded to `dtype`, so every comparison sees the same rounded input.
    """
    shape = tuple(shape)
    ndim = len(shape)

    def randn(s):
        return (torch.randn(s) * scale + shift).to(dtype)

    if fmt == "contiguous":
        x = randn(shape)
    elif fmt == "channels_last":
        assert ndim in (4, 5), "channels_last needs a 4-D or 5-D shape"
        x = randn(shape).contiguous(memory_format=named_memory_format(ndim))
    elif fmt == "transposed":
        x = randn(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    elif fmt == "sliced":
        x = randn(shape[:-1] + (2 * shape[-1],))[..., ::2]
    elif fmt == "channel_slice":
        x = randn((shape[0], shape[1] + 2) + shape[2:])[:, 1:-1]
    elif fmt == "channels_last_slice":
        x = randn((shape[0], shape[1] + 2) + shape[2:]).contiguous(memory_format=named_memory_format(ndim))[:, 1:-1]
    elif fmt == "sample_step":
        x = randn((2 * shape[0],) + shape[1:])[::2]
    elif fmt == "cropped":
        x = randn(shape[:-2] + (shape[-2] + 2, shape[-1] + 2))[..., 1:-1, 1:-1]
    else:
        raise ValueError(fmt)
    assert x.shape == shape
    if fmt != "contiguous" and x.numel() > 1 and min(shape[-2:]) > 1:
        assert not x.is_contiguous(), f"{fmt} input of shape {shape} is unexpectedly contiguous"
    return x


def make_like(x, scale=1.0, shift=0.0):
    """A random tensor with x's shape, dtype and strides (for residuals and output gradients)."""
    out = torch.empty_like(x)
    out.copy_((torch.randn(x.shape) * scale + shift).to(x.dtype))
    return out


def make_params(channels, dtype=torch.float32, affine=True):
    """weight, bias, running_mean, running_var with non-trivial values (weight/bias None if not affine)."""
    weight = (torch.rand(channels) + 0.5).to(dtype) if affine else None
    if weight is not None:
        weight[::2] *= -1  # negative scales flip which side the ReLU keeps
    bias = (torch.randn(channels) * 0.5).to(dtype) if affine else None
    running_mean = (torch.randn(channels) * 0.3).to(dtype)
    running_var = (torch.rand(channels) + 0.5).to(dtype)
    return weight, bias, running_mean, running_var


def leaf(t, requires_grad=True):
    """A detached copy of t (same strides) that is a leaf, optionally requiring grad."""
    if t is None:
        return None
    out = torch.empty_like(t)
    out.copy_(t)
    return out.requires_grad_(requires_grad)


def reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def channel_view(t, ndim):
    return t.view([1, -1] + [1] * (ndim - 2))


def reference_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                         residual=None, relu=False, num_batches_tracked=None):
    """Float64 BN(+residual)(+ReLU) from torch ops, differentiable by autograd.

    x, weight, bias, residual are used as given (pass float64 leaves for reference gradients); running
    statistics are read and *returned* updated in float64 (never mutated). Returns
    (y, new_running_mean, new_running_var, new_num_batches_tracked); the last three are None when there
    is nothing to update.
    """
    x64 = x.double()
    ndim = x.dim()
    if training or running_mean is None:
        var, mean = torch.var_mean(x64, reduce_dims(x), correction=0)
    else:
        mean, var = running_mean.double(), running_var.double()
    y = (x64 - channel_view(mean, ndim)) / torch.sqrt(channel_view(var, ndim) + eps)
    if weight is not None:
        y = y * channel_view(weight.double(), ndim)
    if bias is not None:
        y = y + channel_view(bias.double(), ndim)
    if residual is not None:
        y = y + residual.double()
    if relu:
        y = torch.relu(y)
    new_mean = new_var = new_count = None
    if training and running_mean is not None:
        new_count = None if num_batches_tracked is None else num_batches_tracked + 1
        factor = momentum if momentum is not None else 1.0 / float(new_count)
        m = x.numel() // x.shape[1]
        if m > 0:
            new_mean = (1 - factor) * running_mean.double() + factor * mean.detach()
            new_var = (1 - factor) * running_var.double() + factor * var.detach() * m / (m - 1)
        else:  # torch leaves running statistics alone on an empty batch
            new_mean, new_var = running_mean.double(), running_var.double()
    return y, new_mean, new_var, new_count


class Reference:
    """Float64 results of reference_with_grads: y, running_mean, running_var, count (see
    reference_batch_norm), grads ("input"/"weight"/"bias"/"residual", for the tensors that were given) and
    scales: per-channel L2 norms of the terms that grad weight and grad bias sum (g * x_hat and g, with g
    the ReLU-masked dy). A sum of m float32 terms is accurate to a few eps times that norm, not times the
    (possibly much smaller, after cancellation) sum itself: pass them as assert_close(..., scale=...)."""

    def __init__(self, y, running_mean, running_var, count, grads, scales):
        self.y, self.running_mean, self.running_var, self.count = y, running_mean, running_var, count
        self.grads, self.scales = grads, scales


def reference_with_grads(x, running_mean, running_var, weight, bias, training, momentum, eps, dy,
                         residual=None, relu=False, num_batches_tracked=None):
    """reference_batch_norm on float64 copies, plus the gradients for dy: a Reference."""
    tensors = {"input": x, "weight": weight, "bias": bias, "residual": residual}
    leaves = {k: None if v is None else v.detach().double().requires_grad_() for k, v in tensors.items()}
    y, rm, rv, count = reference_batch_norm(leaves["input"], running_mean, running_var, leaves["weight"],
                                            leaves["bias"], training, momentum, eps, leaves["residual"], relu,
                                            num_batches_tracked)
    given = {k: v for k, v in leaves.items() if v is not None}
    grads = torch.autograd.grad(y, list(given.values()), dy.double(), allow_unused=True)
    grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(given.items(), grads)}
    # x_hat and the masked dy, for the scales of the per-channel sums
    x_hat, *_ = reference_batch_norm(x.detach(), running_mean, running_var, None, None, training, momentum, eps)
    g = dy.double() * (y.detach() > 0) if relu else dy.double()
    dims = reduce_dims(x)
    scales = {"weight": (g * x_hat).square().sum(dims).sqrt(), "bias": g.square().sum(dims).sqrt()}
    return Reference(y.detach(), rm, rv, count, grads, scales)


def assert_grads_close(got, ref, msg=""):
    """got: {"input"/"weight"/"bias"/"residual": gradient}; compared with the Reference's gradients for
    every tensor the reference was given (weight and bias with their summation scales)."""
    for name, expected in ref.grads.items():
        assert got.get(name) is not None, f"{msg} no gradient for {name}"
        assert_close(got[name], expected, scale=ref.scales.get(name), msg=f"{msg} grad {name}")


def torch_composite(x, running_mean, running_var, weight, bias, training, momentum, eps, residual=None,
                    relu=False):
    """What a torch user writes for the fused variants: relu(F.batch_norm(x) + residual).

    Returns (y, bn) where bn is the intermediate batch_norm output (its rounding is the composite's)."""
    bn = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    y = bn
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    return y, bn
