"""fastbn.BatchNorm1d/2d/3d and the fused modules against torch.nn's modules: several training steps
(outputs, gradients, running statistics, num_batches_tracked), eval, N=0 and N=1 batches, state_dict
compatibility both ways, and optimizer steps."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbn
from bn_testing import assert_close, leaf, make_input, make_like

MODULES = [  # (fastbn class, torch class, input shape)
    pytest.param(fastbn.BatchNorm1d, nn.BatchNorm1d, (6, 5), id="1d-NC"),
    pytest.param(fastbn.BatchNorm1d, nn.BatchNorm1d, (4, 5, 7), id="1d-NCL"),
    pytest.param(fastbn.BatchNorm2d, nn.BatchNorm2d, (3, 5, 4, 3), id="2d"),
    pytest.param(fastbn.BatchNorm3d, nn.BatchNorm3d, (2, 3, 3, 2, 4), id="3d"),
]
FUSED = [  # (fastbn class, torch class, input shape)
    pytest.param(fastbn.BatchNormReLU1d, nn.BatchNorm1d, (4, 5, 7), id="relu1d"),
    pytest.param(fastbn.BatchNormReLU2d, nn.BatchNorm2d, (3, 5, 4, 3), id="relu2d"),
    pytest.param(fastbn.BatchNormReLU3d, nn.BatchNorm3d, (2, 3, 3, 2, 4), id="relu3d"),
]
# Module dtype cases: (input dtype, parameter dtype). 16-bit inputs with float32 parameters is what
# torch.nn.BatchNorm2d(C)(x.half()) does.
MODULE_DTYPES = [
    pytest.param(torch.float64, torch.float64, id="f64"),
    pytest.param(torch.float32, torch.float32, id="f32"),
    pytest.param(torch.float16, torch.float32, id="f16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16"),
]


def make_pair(fast_cls, torch_cls, channels, param_dtype=torch.float32, **kwargs):
    """A torch module with non-trivial parameters and buffers, and a fastbn module with the same state."""
    reference = torch_cls(channels, **kwargs).to(param_dtype)
    with torch.no_grad():
        if reference.affine:
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.normal_()
        if reference.track_running_stats:
            reference.running_mean.normal_(0, 0.3)
            reference.running_var.uniform_(0.5, 1.5)
    module = fast_cls(channels, **kwargs).to(param_dtype)
    module.load_state_dict(reference.state_dict())
    return module, reference


def check_step(module, reference, x, dy, forward=None, msg=""):
    """One forward/backward of both modules on the same input; compares outputs, grads and state."""
    forward = forward or (lambda m, x: m(x))
    xf, xt = leaf(x), leaf(x)
    y = forward(module, xf)
    yt = forward(reference, xt)
    assert type(y) is torch.Tensor and y.dtype == yt.dtype
    assert_close(y, yt, msg=f"{msg} output")
    y.backward(dy)
    yt.backward(dy)
    assert_close(xf.grad, xt.grad, msg=f"{msg} grad input")
    check_state(module, reference, msg)
    if reference.affine:
        assert_close(module.weight.grad, reference.weight.grad, msg=f"{msg} grad weight")
        assert_close(module.bias.grad, reference.bias.grad, msg=f"{msg} grad bias")
        module.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
    return y


def check_state(module, reference, msg=""):
    for name in ("running_mean", "running_var"):
        a, b = getattr(module, name), getattr(reference, name)
        assert (a is None) == (b is None), f"{msg} {name} presence"
        if a is not None:
            assert a.dtype == b.dtype
            assert_close(a, b, msg=f"{msg} {name}")
    a, b = module.num_batches_tracked, reference.num_batches_tracked
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == torch.long and torch.equal(a, b), f"{msg} num_batches_tracked {a} != {b}"


# (momentum, affine, track_running_stats): every combination for float32 (momentum is unused untracked),
# the default flags with both momentum kinds for the other dtypes.
FLAG_CASES = [
    pytest.param(0.1, True, True, id="m0.1-affine-tracked"),
    pytest.param(None, True, True, id="cumulative-affine-tracked"),
    pytest.param(0.1, False, True, id="m0.1-noaffine-tracked"),
    pytest.param(None, False, True, id="cumulative-noaffine-tracked"),
    pytest.param(0.1, True, False, id="affine-untracked"),
    pytest.param(0.1, False, False, id="noaffine-untracked"),
]
STEP_CASES = [pytest.param(*dtypes.values, *flags.values, id=f"{dtypes.id}-{flags.id}")
              for dtypes in MODULE_DTYPES for flags in FLAG_CASES
              if dtypes.id == "f32" or (flags.values[1] and flags.values[2])]


@pytest.mark.parametrize("dtype,param_dtype,momentum,affine,track", STEP_CASES)
@pytest.mark.parametrize("fast_cls,torch_cls,shape", MODULES)
def test_training_steps_then_eval(fast_cls, torch_cls, shape, dtype, param_dtype, momentum, affine, track):
    module, reference = make_pair(fast_cls, torch_cls, shape[1], param_dtype, momentum=momentum, affine=affine,
                                  track_running_stats=track)
    for step in range(3):
        x = make_input(shape, dtype, scale=step + 1.0, shift=step - 1.0)
        check_step(module, reference, x, make_like(x), msg=f"train step {step}:")
    module.eval()
    reference.eval()
    x = make_input(shape, dtype)
    check_step(module, reference, x, make_like(x), msg="eval:")
    if track:
        assert int(module.num_batches_tracked) == 3


@pytest.mark.parametrize("dtype,param_dtype", [MODULE_DTYPES[1], MODULE_DTYPES[3]])
@pytest.mark.parametrize("fast_cls,torch_cls,shape", FUSED)
def test_fused_relu_modules_match_torch_composite(fast_cls, torch_cls, shape, dtype, param_dtype):
    module, reference = make_pair(fast_cls, torch_cls, shape[1], param_dtype)
    forward = lambda m, x: m(x) if m is module else F.relu(m(x))  # noqa: E731
    for step in range(2):
        x = make_input(shape, dtype, shift=step)
        check_step(module, reference, x, make_like(x), forward, msg=f"train step {step}:")
    module.eval()
    reference.eval()
    x = make_input(shape, dtype)
    y = check_step(module, reference, x, make_like(x), forward, msg="eval:")
    assert (y >= 0).all()


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_add_relu_module_matches_torch_composite(dtype, fmt, momentum):
    module, reference = make_pair(fastbn.BatchNormAddReLU2d, nn.BatchNorm2d, 6, dtype, momentum=momentum)
    for step in range(3):
        training = step < 2
        module.train(training)
        reference.train(training)
        x = make_input((3, 6, 4, 5), dtype, fmt, shift=step)
        r0 = make_like(x)
        rf, rt = leaf(r0), leaf(r0)
        dy = make_like(x)

        def forward(m, x):
            return m(x, rf) if m is module else F.relu(m(x) + rt)

        check_step(module, reference, x, dy, forward, msg=f"step {step} training={training}:")
        assert_close(rf.grad, rt.grad, msg="grad residual")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fast_cls,torch_cls,shape", MODULES + FUSED)
def test_empty_batch(fast_cls, torch_cls, shape, training):
    """N=0: an empty output, running statistics untouched; the counter and grads as torch has them."""
    module, reference = make_pair(fast_cls, torch_cls, shape[1])
    module.train(training)
    reference.train(training)
    x = make_input((0,) + shape[1:])
    relu = fast_cls in (fastbn.BatchNormReLU1d, fastbn.BatchNormReLU2d, fastbn.BatchNormReLU3d)
    forward = (lambda m, x: m(x) if m is module else F.relu(m(x))) if relu else None
    running_mean, running_var = module.running_mean.clone(), module.running_var.clone()
    y = check_step(module, reference, x, torch.empty(x.shape), forward, msg="N=0:")
    assert y.shape == x.shape
    assert torch.equal(module.running_mean, running_mean) and torch.equal(module.running_var, running_var)


@pytest.mark.parametrize("shape", [(1, 5), (1, 5, 1), (1, 5, 3)], ids=["1x5", "1x5x1", "1x5x3"])
def test_single_sample_in_eval(shape):
    """N=1 (one value per channel) is fine in eval mode, where the running statistics are used."""
    module, reference = make_pair(fastbn.BatchNorm1d, nn.BatchNorm1d, 5)
    module.eval()
    reference.eval()
    x = make_input(shape)
    check_step(module, reference, x, make_like(x), msg="N=1 eval:")


@pytest.mark.parametrize("fast_cls,torch_cls,shape", MODULES)
def test_eval_without_running_stats_uses_batch_stats(fast_cls, torch_cls, shape):
    module, reference = make_pair(fast_cls, torch_cls, shape[1], track_running_stats=False)
    module.eval()
    reference.eval()
    assert module.running_mean is None and module.num_batches_tracked is None
    x = make_input(shape)
    y = check_step(module, reference, x, make_like(x), msg="eval untracked:")
    # batch statistics: every channel is normalized to mean bias
    dims = [0] + list(range(2, len(shape)))
    assert_close(y.mean(dims), module.bias.detach(), dtype=torch.float32)


@pytest.mark.parametrize("fast_cls", [fastbn.BatchNorm1d, fastbn.BatchNorm2d, fastbn.BatchNorm3d,
                                      fastbn.BatchNormReLU1d, fastbn.BatchNormReLU2d, fastbn.BatchNormReLU3d,
                                      fastbn.BatchNormAddReLU2d], ids=lambda c: c.__name__)
def test_subclass_of_torch_batchnorm(fast_cls):
    torch_cls = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}[fast_cls.__name__[-2:]]
    assert issubclass(fast_cls, torch_cls)
    assert isinstance(fast_cls(3), nn.modules.batchnorm._BatchNorm)


CONSTRUCTOR_KWARGS = [
    pytest.param({}, id="defaults"),
    pytest.param({"eps": 1e-3, "momentum": 0.3}, id="eps-momentum"),
    pytest.param({"momentum": None}, id="cumulative"),
    pytest.param({"affine": False}, id="noaffine"),
    pytest.param({"track_running_stats": False}, id="untracked"),
    pytest.param({"affine": False, "track_running_stats": False}, id="bare"),
    pytest.param({"dtype": torch.float64}, id="f64"),
]


@pytest.mark.parametrize("kwargs", CONSTRUCTOR_KWARGS)
@pytest.mark.parametrize("fast_cls,torch_cls,shape", MODULES[1:] + FUSED)
def test_constructor_parameters_buffers_and_state_dict_keys(fast_cls, torch_cls, shape, kwargs):
    module, reference = fast_cls(7, **kwargs), torch_cls(7, **kwargs)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
        assert getattr(module, attr) == getattr(reference, attr), attr
    assert module.extra_repr() == reference.extra_repr()
    params = dict(module.named_parameters())
    assert list(params) == list(dict(reference.named_parameters()))
    for name, p in reference.named_parameters():
        assert params[name].dtype == p.dtype and torch.equal(params[name], p), name
    buffers = dict(module.named_buffers())
    assert list(buffers) == list(dict(reference.named_buffers()))
    for name, b in reference.named_buffers():
        assert buffers[name].dtype == b.dtype and torch.equal(buffers[name], b), name
    state, state_t = module.state_dict(), reference.state_dict()
    assert list(state) == list(state_t)
    assert module._version == reference._version
    assert state._metadata[""]["version"] == state_t._metadata[""]["version"]


def _trained_pair(fast_cls, torch_cls, shape, **kwargs):
    module, reference = make_pair(fast_cls, torch_cls, shape[1], **kwargs)
    for step in range(2):
        x = make_input(shape, shift=step)
        module(x)
        reference(x)
    return module, reference


@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"momentum": None}, {"track_running_stats": False}],
                         ids=["defaults", "noaffine", "cumulative", "untracked"])
@pytest.mark.parametrize("direction", ["fastbn-to-torch", "torch-to-fastbn"])
@pytest.mark.parametrize("fast_cls,torch_cls,shape", MODULES[1:])
def test_state_dict_round_trip(fast_cls, torch_cls, shape, direction, kwargs):
    """A state_dict saved by one class loads (strict) into the other and gives the same eval outputs."""
    module, reference = _trained_pair(fast_cls, torch_cls, shape, **kwargs)
    source, target = (module, torch_cls(shape[1], **kwargs)) if direction == "fastbn-to-torch" else (
        reference, fast_cls(shape[1], **kwargs))
    state = source.state_dict()
    target.load_state_dict(state)
    loaded = target.state_dict()
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    source.eval()
    target.eval()
    x = make_input(shape)
    assert_close(target(x), source(x), msg="eval output after loading")


@pytest.mark.parametrize("fast_cls,torch_cls,shape", MODULES[1:])
def test_load_old_state_dict_without_counter(fast_cls, torch_cls, shape):
    """A version-1 state_dict (before num_batches_tracked existed) loads as into torch's module."""
    module, reference = make_pair(fast_cls, torch_cls, shape[1])
    state = reference.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    module.num_batches_tracked.fill_(5)
    reference.num_batches_tracked.fill_(5)
    module.load_state_dict(state)
    reference.load_state_dict(state)
    assert torch.equal(module.num_batches_tracked, reference.num_batches_tracked)
    assert torch.equal(module.running_mean, reference.running_mean)


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "sgd-momentum"])
def test_optimizer_updates_parameters_like_torch(momentum):
    module, reference = make_pair(fastbn.BatchNorm2d, nn.BatchNorm2d, 4)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=momentum)
    opt_t = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=momentum)
    assert len(opt.param_groups[0]["params"]) == 2
    weight_before = module.weight.detach().clone()
    for step in range(3):
        x = make_input((3, 4, 3, 3), shift=step)
        target = make_like(x)
        for m, o in ((module, opt), (reference, opt_t)):
            o.zero_grad()
            F.mse_loss(m(x), target).backward()
            o.step()
        assert_close(module.weight, reference.weight, msg=f"weight after step {step}")
        assert_close(module.bias, reference.bias, msg=f"bias after step {step}")
        check_state(module, reference, msg=f"step {step}")
    assert not torch.equal(module.weight.detach(), weight_before), "the optimizer did not change the weight"


def test_deepcopy_and_double():
    module, reference = _trained_pair(fastbn.BatchNorm2d, nn.BatchNorm2d, (3, 4, 2, 2))
    clone = copy.deepcopy(module)
    assert type(clone) is fastbn.BatchNorm2d and clone.weight is not module.weight
    x = make_input((3, 4, 2, 2))
    assert_close(clone(x), module(x))
    reference(x)  # the same training step as module's
    module.double()
    reference.double()
    module.load_state_dict(reference.state_dict())  # drop the float32 rounding history before comparing at f64
    x = make_input((3, 4, 2, 2), torch.float64)
    check_step(module, reference, x, make_like(x), msg="after .double():")
