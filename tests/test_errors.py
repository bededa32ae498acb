"""Bad inputs: the exception type torch raises (for the cases torch has) and a message in torch's wording,
with running_mean, running_var and num_batches_tracked left exactly as they were (through the modules and
through functional.batch_norm). torch's own modules bump num_batches_tracked before some of these errors;
fastbn must not."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbn
from bn_testing import assert_same_state, make_input

DEVICES = r"(cpu.*meta|meta.*cpu)"


def _module_state(module):
    return {name: getattr(module, name).clone() for name in ("running_mean", "running_var", "num_batches_tracked")}


def _meta_weight(module):
    module.weight = nn.Parameter(torch.ones(module.num_features, device="meta"))


# (fastbn class, torch class, channels, constructor kwargs, training, input, module setup, error, message)
MODULE_CASES = {
    "2d-got-3d-input": (fastbn.BatchNorm2d, nn.BatchNorm2d, 3, {}, True, lambda: make_input((4, 3, 5)), None,
                        ValueError, "expected 4D input (got 3D input)"),
    "2d-got-3d-input-eval": (fastbn.BatchNorm2d, nn.BatchNorm2d, 3, {}, False, lambda: make_input((4, 3, 5)), None,
                             ValueError, "expected 4D input (got 3D input)"),
    "1d-got-4d-input": (fastbn.BatchNorm1d, nn.BatchNorm1d, 3, {}, True, lambda: make_input((2, 3, 4, 4)), None,
                        ValueError, "expected 2D or 3D input (got 4D input)"),
    "3d-got-4d-input": (fastbn.BatchNorm3d, nn.BatchNorm3d, 3, {}, True, lambda: make_input((2, 3, 4, 4)), None,
                        ValueError, "expected 5D input (got 4D input)"),
    "relu2d-got-5d-input": (fastbn.BatchNormReLU2d, nn.BatchNorm2d, 3, {}, True,
                            lambda: make_input((2, 3, 2, 2, 2)), None, ValueError, "expected 4D input (got 5D input)"),
    "channels-4-vs-3": (fastbn.BatchNorm2d, nn.BatchNorm2d, 4, {}, True, lambda: make_input((2, 3, 4, 4)), None,
                        RuntimeError, "should contain 3 elements not 4"),
    "channels-4-vs-3-eval": (fastbn.BatchNorm2d, nn.BatchNorm2d, 4, {}, False, lambda: make_input((2, 3, 4, 4)),
                             None, RuntimeError, "should contain 3 elements not 4"),
    "long-input": (fastbn.BatchNorm2d, nn.BatchNorm2d, 3, {}, True, lambda: torch.ones(2, 3, 2, 2, dtype=torch.long),
                   None, NotImplementedError, "\"batch_norm\" not implemented for 'Long'"),
    "int-input-eval": (fastbn.BatchNorm1d, nn.BatchNorm1d, 3, {}, False, lambda: torch.ones(2, 3, dtype=torch.int32),
                       None, NotImplementedError, "\"batch_norm\" not implemented for 'Int'"),
    "weight-on-meta": (fastbn.BatchNorm2d, nn.BatchNorm2d, 3, {}, True, lambda: make_input((2, 3, 2, 2)),
                       _meta_weight, RuntimeError, None),
    "eps-0-train": (fastbn.BatchNorm2d, nn.BatchNorm2d, 3, {"eps": 0.0}, True, lambda: make_input((2, 3, 2, 2)), None,
                    ValueError, "batch_norm eps must be positive during training, but got 0.0"),
    "eps-negative-train": (fastbn.BatchNorm1d, nn.BatchNorm1d, 3, {"eps": -1e-5}, True, lambda: make_input((4, 3)),
                           None, ValueError, "batch_norm eps must be positive during training, but got -1e-05"),
    "eps-negative-eval": (fastbn.BatchNorm1d, nn.BatchNorm1d, 3, {"eps": -1.0}, False, lambda: make_input((4, 3)),
                          None, ValueError, "batch_norm eps must be non-negative, but got -1.0"),
    "one-value-1d": (fastbn.BatchNorm1d, nn.BatchNorm1d, 3, {}, True, lambda: make_input((1, 3)), None, ValueError,
                     "Expected more than 1 value per channel when training, got input size torch.Size([1, 3])"),
    "one-value-2d": (fastbn.BatchNorm2d, nn.BatchNorm2d, 3, {}, True, lambda: make_input((1, 3, 1, 1)), None,
                     ValueError,
                     "Expected more than 1 value per channel when training, got input size torch.Size([1, 3, 1, 1])"),
    "one-value-relu1d-cumulative": (fastbn.BatchNormReLU1d, nn.BatchNorm1d, 3, {"momentum": None}, True,
                                    lambda: make_input((1, 3, 1)), None, ValueError,
                                    "Expected more than 1 value per channel when training"),
}


def _check_raises(call, error, message):
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is error, f"raised {type(info.value).__name__}: {info.value}"
    if message is None:
        assert re.search(DEVICES, str(info.value)), f"the message does not name the devices: {info.value}"
    else:
        assert message in str(info.value)
    return info.value


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_module_bad_input(case):
    fast_cls, torch_cls, channels, kwargs, training, make_x, setup, error, message = MODULE_CASES[case]
    module = fast_cls(channels, **kwargs).train(training)
    if setup:
        setup(module)
    module.num_batches_tracked.fill_(3)
    with torch.no_grad():
        module.running_mean.normal_()
    before = _module_state(module)
    x = make_x()
    _check_raises(lambda: module(x), error, message)
    assert_same_state(before, _module_state(module), case)
    # torch raises the same kind of error
    reference = torch_cls(channels, **kwargs).train(training)
    if setup:
        setup(reference)
    with pytest.raises(error):
        reference(x)


@pytest.mark.parametrize("problem", ["shape", "dtype", "device"])
def test_add_relu_module_bad_residual(problem):
    module = fastbn.BatchNormAddReLU2d(3)
    before = _module_state(module)
    x = make_input((2, 3, 4, 4))
    residual = {"shape": make_input((2, 3, 4, 3)), "dtype": make_input((2, 3, 4, 4), torch.float64),
                "device": torch.empty((2, 3, 4, 4), device="meta")}[problem]
    with pytest.raises(RuntimeError):
        module(x, residual)
    assert_same_state(before, _module_state(module), problem)


def _functional_args(**overrides):
    """Arguments of a valid training call on a (4, 3, 5, 5) float32 input, with overrides applied."""
    args = {"input": make_input((4, 3, 5, 5)), "running_mean": torch.randn(3), "running_var": torch.rand(3) + 0.5,
            "weight": torch.rand(3) + 0.5, "bias": torch.randn(3), "training": True, "momentum": 0.1, "eps": 1e-5}
    args.update(overrides)
    return args


# (overrides of the valid call, extra fastbn keyword arguments, error, message fragment or None for devices,
#  whether torch.nn.functional.batch_norm takes the same call)
FUNCTIONAL_CASES = {
    "weight-4-vs-3": ({"weight": torch.ones(4)}, {}, RuntimeError, "weight should contain 3 elements not 4", True),
    "bias-4-vs-3": ({"bias": torch.ones(4)}, {}, RuntimeError, "bias should contain 3 elements not 4", True),
    "running-mean-4-vs-3": ({"running_mean": torch.zeros(4)}, {}, RuntimeError,
                            "running_mean should contain 3 elements not 4", True),
    "running-var-4-vs-3-eval": ({"running_var": torch.ones(4), "training": False}, {}, RuntimeError,
                                "running_var should contain 3 elements not 4", True),
    "long-input": ({"input": torch.ones(4, 3, 2, dtype=torch.long)}, {}, NotImplementedError,
                   "\"batch_norm\" not implemented for 'Long'", True),
    "bool-input-eval": ({"input": torch.ones(4, 3, dtype=torch.bool), "training": False}, {}, NotImplementedError,
                        "\"batch_norm\" not implemented for 'Bool'", True),
    # torch's type for a 1-D input depends on the other arguments (with running statistics its size check
    # fires first): without them it is IndexError.
    "1d-input": ({"input": make_input((3,)), "running_mean": None, "running_var": None, "weight": None,
                  "bias": None}, {}, IndexError, "Dimension out of range", True),
    "weight-on-meta": ({"weight": torch.ones(3, device="meta")}, {}, RuntimeError, None, True),
    "bias-on-meta-eval": ({"bias": torch.ones(3, device="meta"), "training": False}, {}, RuntimeError, None, True),
    "residual-on-meta": ({}, {"residual": torch.empty(4, 3, 5, 5, device="meta")}, RuntimeError, None, False),
    "eps-0-train": ({"eps": 0.0}, {}, ValueError, "batch_norm eps must be positive during training, but got 0.0",
                    True),
    "eps-negative-eval": ({"eps": -0.5, "training": False}, {}, ValueError,
                          "batch_norm eps must be non-negative, but got -0.5", True),
    "one-value-per-channel": ({"input": make_input((1, 3))}, {}, ValueError,
                              "Expected more than 1 value per channel when training, got input size "
                              "torch.Size([1, 3])", True),
    "residual-shape": ({}, {"residual": make_input((4, 3, 5, 4))}, RuntimeError, "", False),
    "residual-broadcastable-shape": ({}, {"residual": make_input((1, 3, 1, 1))}, RuntimeError, "", False),
    "residual-dtype": ({}, {"residual": make_input((4, 3, 5, 5), torch.float64)}, RuntimeError, "", False),
    "residual-dtype-eval": ({"training": False}, {"residual": make_input((4, 3, 5, 5), torch.float16)}, RuntimeError,
                           "", False),
    "f64-input-f32-weight": ({"input": make_input((4, 3, 2), torch.float64), "running_mean": None,
                              "running_var": None}, {}, RuntimeError, "", True),
    "f16-input-f64-stats": ({"input": make_input((4, 3, 2), torch.float16), "running_mean": torch.zeros(3).double(),
                             "running_var": torch.ones(3).double(), "weight": None, "bias": None}, {}, RuntimeError,
                            "", True),
    "running-mean-without-running-var": ({"running_var": None}, {}, None, "", True),
    "eval-without-running-stats": ({"running_mean": None, "running_var": None, "training": False}, {}, RuntimeError,
                                   "running_mean must be defined in evaluation mode", True),
    "cumulative-momentum-without-counter": ({"momentum": None}, {"num_batches_tracked": None}, RuntimeError,
                                            "num_batches_tracked", False),
    "counter-not-long": ({}, {"num_batches_tracked": torch.tensor(2.0)}, RuntimeError, "", False),
    "unknown-activation": ({}, {"activation": "gelu"}, ValueError, "", False),
}


@pytest.mark.parametrize("case", list(FUNCTIONAL_CASES))
def test_functional_bad_input(case):
    overrides, extra, error, message, torch_has_it = FUNCTIONAL_CASES[case]
    args = _functional_args(**overrides)
    kwargs = {"num_batches_tracked": torch.tensor(5)}
    kwargs.update(extra)
    torch_error = None
    if torch_has_it:
        with pytest.raises(Exception) as info:
            F.batch_norm(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
        torch_error = type(info.value)
        error = error or torch_error  # where torch's type depends on the call, follow torch
        assert torch_error is error, f"the test expects {error.__name__}, torch raises {torch_error.__name__}"
    state = {k: args[k] for k in ("running_mean", "running_var") if isinstance(args[k], torch.Tensor)
             and args[k].device.type == "cpu"}
    if kwargs["num_batches_tracked"] is not None:
        state["num_batches_tracked"] = kwargs["num_batches_tracked"]
    before = {k: v.clone() for k, v in state.items()}
    _check_raises(lambda: fastbn.functional.batch_norm(*args.values(), **kwargs), error, message)
    assert_same_state(before, state, case)
