"""fastbn.convert: swapping torch.nn.BatchNorm1d/2d/3d for fastbn's classes and back, in place, sharing
parameters and buffers, on a small CNN and on bare modules."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbn
from bn_testing import assert_close, make_input

TORCH_TO_FASTBN = {nn.BatchNorm1d: fastbn.BatchNorm1d, nn.BatchNorm2d: fastbn.BatchNorm2d,
                   nn.BatchNorm3d: fastbn.BatchNorm3d}
STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class Block(nn.Module):
    """conv-bn-relu, conv-bn, + identity, relu (a ResNet basic block)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, momentum=None)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.block = Block(6)
        self.volume = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2, affine=False))
        self.head = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10, eps=1e-3), nn.ReLU(), nn.Linear(10, 4))

    def forward(self, x):
        h = self.block(self.stem(x))
        v = self.volume(h.unsqueeze(1)).mean(1)
        return self.head((h + v).mean((2, 3)))


def batchnorms(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def randomize(model):
    with torch.no_grad():
        for m in batchnorms(model).values():
            if m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
    return model


def train_and_compare(model, reference, steps=2, dtype=torch.float64):
    """Forward/backward both models on the same inputs; outputs, gradients and all state must agree.

    In float64 by default: through a network, float32 rounding differences between two correct BN
    implementations are amplified in the gradients beyond what a per-op tolerance describes."""
    model.to(dtype)
    reference.to(dtype)
    for step in range(steps):
        x = make_input((4, 3, 5, 6), dtype, shift=step)
        y, y_ref = model(x), reference(x)
        assert_close(y, y_ref, msg=f"output at step {step}")
        y.square().sum().backward()
        y_ref.square().sum().backward()
        params = dict(model.named_parameters())
        for name, p in reference.named_parameters():
            assert_close(params[name].grad, p.grad, msg=f"grad {name} at step {step}")
        model.zero_grad()
        reference.zero_grad()
        state = model.state_dict()
        for key, value in reference.state_dict().items():
            if value.is_floating_point():
                assert_close(state[key], value, msg=f"{key} at step {step}")
            else:
                assert torch.equal(state[key], value), key


def test_small_cnn_outputs_and_gradients_match():
    model = randomize(SmallCNN())
    reference = copy.deepcopy(model)
    assert fastbn.convert(model) is model
    kinds = {name: type(m) for name, m in batchnorms(model).items()}
    assert kinds == {"stem.1": fastbn.BatchNorm2d, "block.bn1": fastbn.BatchNorm2d,
                     "block.bn2": fastbn.BatchNorm2d, "volume.1": fastbn.BatchNorm3d,
                     "head.1": fastbn.BatchNorm1d}
    train_and_compare(model, reference)
    model.eval()
    reference.eval()
    x = make_input((2, 3, 5, 6), torch.float64)
    assert_close(model(x), reference(x), msg="eval output")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_small_cnn_float32_outputs_match(training):
    model = randomize(SmallCNN()).train(training)
    reference = copy.deepcopy(model)
    fastbn.convert(model)
    x = make_input((4, 3, 5, 6))
    assert_close(model(x), reference(x), msg="float32 output")


def test_convert_shares_parameters_buffers_and_attributes():
    model = randomize(SmallCNN())
    before = batchnorms(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    fastbn.convert(model)
    after = batchnorms(model)
    assert list(after) == list(before)
    for name, old in before.items():
        new = after[name]
        assert new is not old and type(new) is TORCH_TO_FASTBN[type(old)]
        for attr in STATE:
            assert getattr(new, attr) is getattr(old, attr), f"{name}.{attr} is not the same object"
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(new, attr) == getattr(old, attr), f"{name}.{attr}"
    # The optimizer built before the conversion still drives the converted model's parameters.
    weight = model.stem[1].weight.detach().clone()
    model(make_input((4, 3, 5, 6))).sum().backward()
    optimizer.step()
    assert not torch.equal(model.stem[1].weight.detach(), weight)
    assert model.stem[1].weight is before["stem.1"].weight


def test_convert_keeps_training_flags():
    model = SmallCNN().train()
    model.block.bn2.eval()
    model.head.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    fastbn.convert(model)
    assert {name: m.training for name, m in model.named_modules()} == flags
    fastbn.convert(model, to="torch")
    assert {name: m.training for name, m in model.named_modules()} == flags


def test_round_trip_to_torch():
    original = randomize(SmallCNN())
    reference = copy.deepcopy(original)
    before = batchnorms(original)
    model = fastbn.convert(fastbn.convert(original), to="torch")
    assert model is original
    after = batchnorms(model)
    for name, old in before.items():
        assert type(after[name]) is type(old), name
        for attr in STATE:
            assert getattr(after[name], attr) is getattr(old, attr)
    train_and_compare(model, reference, steps=1)


@pytest.mark.parametrize("torch_cls,shape", [(nn.BatchNorm1d, (4, 3)), (nn.BatchNorm2d, (4, 3, 2, 2)),
                                             (nn.BatchNorm3d, (4, 3, 2, 2, 2))], ids=["1d", "2d", "3d"])
def test_convert_bare_module(torch_cls, shape):
    module = torch_cls(3, momentum=0.2)
    module.eval()
    converted = fastbn.convert(module)
    assert type(converted) is TORCH_TO_FASTBN[torch_cls]
    assert not converted.training and converted.momentum == 0.2
    for attr in STATE:
        assert getattr(converted, attr) is getattr(module, attr)
    x = make_input(shape)
    assert_close(converted(x), module(x))
    back = fastbn.convert(converted, to="torch")
    assert type(back) is torch_cls and back.weight is module.weight


class UserBatchNorm(nn.BatchNorm2d):
    pass


@pytest.mark.parametrize("make", [lambda: nn.SyncBatchNorm(3), lambda: UserBatchNorm(3),
                                  lambda: nn.LazyBatchNorm2d()], ids=["SyncBatchNorm", "user-subclass", "lazy"])
def test_other_batchnorm_subclasses_left_alone_with_warning(make):
    odd = make()
    model = nn.Sequential(nn.BatchNorm2d(3), odd)
    with pytest.warns(UserWarning):
        fastbn.convert(model)
    assert model[1] is odd and type(model[1]) is type(odd)
    assert type(model[0]) is fastbn.BatchNorm2d
    with pytest.warns(UserWarning):
        assert fastbn.convert(odd) is odd


@pytest.mark.parametrize("fused", [fastbn.BatchNormReLU2d, fastbn.BatchNormAddReLU2d, fastbn.BatchNormReLU1d],
                         ids=lambda c: c.__name__)
def test_fused_modules_left_alone_when_converting_to_torch(fused):
    module = fused(3)
    model = nn.Sequential(fastbn.BatchNorm2d(3), module)
    with pytest.warns(UserWarning):
        fastbn.convert(model, to="torch")
    assert model[1] is module and type(model[0]) is nn.BatchNorm2d


def test_convert_of_fastbn_model_is_a_quiet_no_op():
    model = nn.Sequential(fastbn.BatchNorm2d(3), fastbn.BatchNormReLU2d(3), nn.Conv2d(3, 3, 1))
    modules = list(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastbn.convert(model)
        fastbn.convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)), to="torch")
    assert list(model) == modules


def test_converted_state_dict_loads_into_the_original_architecture():
    model = fastbn.convert(randomize(SmallCNN()))
    train_and_compare(model, fastbn.convert(copy.deepcopy(model), to="torch"), steps=1)
    fresh = SmallCNN().double()
    fresh.load_state_dict(model.state_dict())
    model.eval()
    fresh.eval()
    x = make_input((2, 3, 5, 6), torch.float64)
    assert_close(model(x), fresh(x))
