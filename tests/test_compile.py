"""torch.compile(fullgraph=True) of fastbn modules and of functional.batch_norm: no graph break, and the
compiled model's outputs, gradients, running statistics and num_batches_tracked match eager mode; the same for a
model exported with torch.export.

(torch.nn.BatchNorm2d(momentum=None) itself cannot be compiled with fullgraph=True: it computes the
factor 1/num_batches_tracked on the host. fastbn reads the counter inside the op.)"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbn
from bn_testing import assert_close, leaf, make_input, make_like, make_params


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn_relu = fastbn.BatchNormReLU2d(6)
        self.bn = fastbn.BatchNorm2d(6, momentum=None)
        self.bn_add_relu = fastbn.BatchNormAddReLU2d(6, momentum=0.2)
        self.head = fastbn.BatchNorm1d(6, affine=False)

    def forward(self, x):
        h = self.bn_relu(self.conv(x))
        h = self.bn_add_relu(self.bn(h), h)
        return self.head(h.mean((2, 3)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compare_state(model, eager, msg):
    state = model.state_dict()
    for key, value in eager.state_dict().items():
        if value.is_floating_point():
            assert_close(state[key], value, msg=f"{msg} {key}")
        else:
            assert torch.equal(state[key], value), f"{msg} {key}: {state[key]} != {value}"


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_compiled_model_matches_eager(fmt):
    # float64, so that the comparison is not dominated by float32 reassociation (inductor fuses and
    # reorders the surrounding ops) amplified through the network's gradients.
    model = Net().double()
    with torch.no_grad():
        for m in (model.bn_relu, model.bn, model.bn_add_relu):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.5)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for step in range(3):
        x = make_input((4, 3, 5, 5), torch.float64, fmt, shift=step)
        y, y_eager = compiled(x), eager(x)
        assert_close(y, y_eager, msg=f"train step {step} output")
        y.square().sum().backward()
        y_eager.square().sum().backward()
        params = dict(model.named_parameters())
        for name, p in eager.named_parameters():
            assert_close(params[name].grad, p.grad, msg=f"train step {step} grad {name}")
        model.zero_grad()
        eager.zero_grad()
        _compare_state(model, eager, f"train step {step}")
    assert int(model.bn.num_batches_tracked) == 3
    model.eval()
    eager.eval()
    x = make_input((2, 3, 5, 5), torch.float64, fmt)
    with torch.no_grad():
        assert_close(compiled(x), eager(x), msg="eval output")
    _compare_state(model, eager, "eval")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_functional_matches_eager(training):
    def f(x, running_mean, running_var, weight, bias, residual, count):
        return fastbn.functional.batch_norm(x, running_mean, running_var, weight, bias, training, None, 1e-5,
                                            residual=residual, activation="relu", num_batches_tracked=count)

    compiled = torch.compile(f, fullgraph=True)
    x0 = make_input((3, 4, 3, 5), torch.float32, "channels_last")
    w0, b0, running_mean, running_var = make_params(4)
    r0, dy = make_like(x0), make_like(x0)
    results = []
    for fn in (compiled, f):
        x, w, b, r = leaf(x0), leaf(w0), leaf(b0), leaf(r0)
        rm, rv, count = running_mean.clone(), running_var.clone(), torch.tensor(1)
        y = fn(x, rm, rv, w, b, r, count)
        y = fn(x, rm, rv, w, b, r, count)  # twice: the cumulative factor changes with the counter
        y.backward(dy)
        results.append((y, rm, rv, count, x.grad, w.grad, b.grad, r.grad))
    names = ("output", "running_mean", "running_var", "num_batches_tracked", "grad input", "grad weight",
             "grad bias", "grad residual")
    for name, got, expected in zip(names, *results):
        if got.dtype == torch.long:
            assert torch.equal(got, expected), name
        else:
            assert_close(got, expected, msg=name)
    assert results[0][0].stride() == results[1][0].stride(), "compiled output strides differ from eager"
    assert int(results[0][3]) == (3 if training else 1)


def test_compiled_16bit_channels_last_eval():
    model = nn.Sequential(fastbn.BatchNormReLU2d(5), fastbn.BatchNorm2d(5)).eval()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = make_input((2, 5, 4, 3), torch.bfloat16, "channels_last")
    with torch.no_grad():
        y = compiled(x)
        assert_close(y, eager(x))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, F.batch_norm(F.relu(F.batch_norm(x, model[0].running_mean, model[0].running_var)),
                                 model[1].running_mean, model[1].running_var))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_exported_model_matches_eager(training):
    """torch.export records fastbn's ops (through their fake implementations); the exported program's module gives
    eager mode's outputs, gradients and, in training, running statistics and counters."""
    model = Net().double().train(training)
    with torch.no_grad():
        for m in (model.bn_relu, model.bn, model.bn_add_relu, model.head):
            if m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    eager = copy.deepcopy(model)
    x = make_input((4, 3, 5, 5), torch.float64, "channels_last")
    program = torch.export.export(model, (x,))
    op = "forward_train" if training else "forward_eval"
    assert sum(node.target == getattr(torch.ops.fastbn, op).default for node in program.graph.nodes) == 4
    exported = program.module()
    x_exported, x_eager = leaf(x), leaf(x)
    y, y_eager = exported(x_exported), eager(x_eager)
    assert_close(y, y_eager, msg="output")
    y.square().sum().backward()
    y_eager.square().sum().backward()
    assert_close(x_exported.grad, x_eager.grad, msg="grad input")
    _compare_state(exported, eager, "after the call")
