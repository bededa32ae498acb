"""fastbn's CUDA kernels on a real GPU, against torch on the same device (skipped without one).

Every op, both memory formats, 16-bit inputs with float32 parameters, misaligned views, large N*H*W, numel
> 2^31 (slow), CUDA-graph capture and replay, bitwise run-to-run equality, and a short training run of a small
CNN matching torch.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bn_testing import DTYPE_CASES, assert_close, make_params, reference_with_grads, assert_grads_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"


@pytest.fixture(scope="module")
def ops():
    import fastbn  # noqa: F401

    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastbn::forward_train", "CUDA"):
        pytest.skip("fastbn was built without CUDA (FASTBN_CUDA=1)")
    return torch.ops.fastbn


@pytest.fixture(params=["auto", "two_pass", "persistent"])
def path(request, monkeypatch):
    monkeypatch.setenv("FASTBN_CUDA_PATH", request.param)
    return request.param


def gpu_input(shape, dtype, fmt="contiguous", shift=0.5):
    x = (torch.randn(shape, device=DEV) * 2 + shift).to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def like(x):
    out = torch.empty_like(x)
    out.copy_(torch.randn(x.shape, device=DEV).to(x.dtype))
    return out


def gpu_params(C, pdtype, affine=True):
    return [None if t is None else t.to(DEV) for t in make_params(C, pdtype, affine)]


SHAPES = [
    ((8, 16, 14, 14), "contiguous"),
    ((8, 16, 14, 14), "channels_last"),
    ((4, 24, 7, 7), "contiguous"),
    ((4, 24, 7, 7), "channels_last"),
    ((2, 8, 4, 6, 6), "channels_last"),
    ((256, 40), "contiguous"),
    ((4, 12, 33), "contiguous"),
]


@pytest.mark.parametrize("shape,fmt", SHAPES, ids=[f"{s}-{f}" for s, f in SHAPES])
@pytest.mark.parametrize("dtype,pdtype", DTYPE_CASES)
def test_forward_backward_vs_torch(ops, path, shape, fmt, dtype, pdtype):
    x = gpu_input(shape, dtype, fmt)
    w, b, rm, rv = gpu_params(shape[1], pdtype)
    rm_f, rv_f, rm_t, rv_t = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    nbt = torch.zeros((), dtype=torch.long, device=DEV)
    y, mean, invstd = ops.forward_train(x, w, b, None, rm_f, rv_f, nbt, 0.1, 1e-5, False)
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, True, 0.1, 1e-5)
    assert_close(y, y_t, msg="output")
    assert y.stride() == x.stride()
    assert_close(rm_f, rm_t, msg="running_mean")
    assert_close(rv_f, rv_t, msg="running_var")
    assert nbt.item() == 1
    dy = like(x)
    dx, dw, db, _ = ops.backward(dy, x, w, b, None, mean, invstd, True, False, [True, True, True, False])
    ref = reference_with_grads(x, None, None, w, b, True, 0.1, 1e-5, dy)
    assert_grads_close({"input": dx, "weight": dw, "bias": db}, ref, msg="backward")
    # eval forward and backward
    y_e = ops.forward_eval(x, w, b, None, rm, rv, 1e-5, False)
    assert_close(y_e, F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5), msg="eval")


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_residual_relu_vs_cpu(ops, path, fmt, dtype):
    x = gpu_input((8, 32, 10, 10), dtype, fmt)
    res, dy = like(x), like(x)
    w, b, rm, rv = gpu_params(32, torch.float32)
    got = ops.forward_train(x, w, b, res, rm.clone(), rv.clone(), None, 0.1, 1e-5, True)
    want = ops.forward_train(x.cpu(), w.cpu(), b.cpu(), res.cpu(), rm.cpu(), rv.cpu(), None, 0.1, 1e-5, True)
    for a, e in zip(got, want):
        assert_close(a, e, dtype=a.dtype if a.dim() <= 1 else dtype)
    mask = [True, True, True, True]
    # The ReLU mask of a residual add comes from the forward's output: the same one on both devices.
    g = ops.backward(dy, x, w, b, want[0].to(DEV), want[1].to(DEV), want[2].to(DEV), True, True, mask)
    gc = ops.backward(dy.cpu(), x.cpu(), w.cpu(), b.cpu(), want[0], want[1], want[2], True, True, mask)
    for a, e in zip(g, gc):
        assert_close(a, e, dtype=a.dtype if a.dim() <= 1 else dtype)


def test_sync_pieces_vs_cpu(ops):
    x = gpu_input((6, 20, 9, 9), torch.float16, "channels_last")
    dy, res = like(x), like(x)
    w, b, _, _ = gpu_params(20, torch.float32)
    for a, e in zip(ops.local_stats(x), ops.local_stats(x.cpu())):
        assert_close(a, e)
    mean, var, _ = ops.local_stats(x.cpu())
    invstd = 1 / torch.sqrt(var + 1e-5)
    m, i = mean.to(DEV), invstd.to(DEV)
    y = ops.normalize(x.cpu(), mean, invstd, w.cpu(), b.cpu(), res.cpu(), True)
    assert_close(ops.normalize(x, m, i, w, b, res, True), y)
    sr = ops.backward_reduce(dy, x, m, i, w, b, y.to(DEV), True)
    sc = ops.backward_reduce(dy.cpu(), x.cpu(), mean, invstd, w.cpu(), b.cpu(), y, True)
    for a, e in zip(sr, sc):
        assert_close(a, e, dtype=torch.float16, scale=a.abs().max().expand_as(a))
    n = x.numel() // x.shape[1]
    assert_close(ops.backward_elementwise(dy, x, m, i, w, b, y.to(DEV), sc[0].to(DEV) / n, sc[1].to(DEV) / n, True),
                 ops.backward_elementwise(dy.cpu(), x.cpu(), mean, invstd, w.cpu(), b.cpu(), y, sc[0] / n, sc[1] / n,
                                          True))


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_misaligned_views(ops, path, fmt):
    base = gpu_input((8, 16, 6, 6), torch.float16, fmt)
    storage = torch.empty(base.numel() + 1, dtype=base.dtype, device=DEV)
    x = storage[1:].as_strided(base.shape, base.stride())
    x.copy_(base)
    assert x.data_ptr() % 16 != 0
    w, b, rm, rv = gpu_params(16, torch.float32)
    y, _, _ = ops.forward_train(x, w, b, None, rm.clone(), rv.clone(), None, 0.1, 1e-5, False)
    assert_close(y, F.batch_norm(base, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5))


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_large_spatial(ops, path, fmt):
    x = gpu_input((2, 4, 512, 512), torch.float32, fmt, shift=1e4 / 2)
    y, mean, invstd = ops.forward_train(x, None, None, None, None, None, None, 0.1, 1e-5, False)
    var64, mean64 = torch.var_mean(x.double(), [0, 2, 3], correction=0)
    assert_close(mean, mean64.float())
    assert_close(invstd, (1 / torch.sqrt(var64 + 1e-5)).float())
    assert_close(y, F.batch_norm(x, None, None, None, None, True, 0.1, 1e-5))


@pytest.mark.slow
def test_numel_above_2_pow_31(ops):
    free, _ = torch.cuda.mem_get_info()
    numel = 2**31 + 2**20
    if free < numel * 2 * 4 + (1 << 30):
        pytest.skip("not enough GPU memory")
    x = torch.randn(numel // 2**20, 2, 2**19, device=DEV, dtype=torch.float16)
    y, mean, invstd = ops.forward_train(x, None, None, None, None, None, None, 0.1, 1e-5, False)
    var, m = torch.var_mean(x.float(), [0, 2], correction=0)
    torch.testing.assert_close(mean, m, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(invstd, 1 / torch.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y[-1, :, -1000:].float(), ((x[-1, :, -1000:].float() - m[:, None]) * invstd[:, None]),
                               rtol=1e-2, atol=1e-2)
    del y
    dx, _, _, _ = ops.backward(x, x, None, None, None, mean, invstd, True, False, [True, False, False, False])
    assert torch.isfinite(dx[-1, :, -1000:]).all()


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_cuda_graph_capture_and_replay(ops, path, fmt):
    x = gpu_input((8, 16, 8, 8), torch.float32, fmt)
    dy = like(x)
    w, b, rm, rv = gpu_params(16, torch.float32)
    nbt = torch.zeros((), dtype=torch.long, device=DEV)
    rm_g, rv_g = rm.clone(), rv.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (allocations) outside the capture
        ops.forward_train(x, w, b, None, rm.clone(), rv.clone(), None, 0.1, 1e-5, True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, mean, invstd = ops.forward_train(x, w, b, None, rm_g, rv_g, nbt, None, 1e-5, True)
        dx, dw, db, _ = ops.backward(dy, x, w, b, None, mean, invstd, True, True, [True, True, True, False])
    rm_t, rv_t = rm.clone(), rv.clone()
    for step in range(3):
        x.copy_(gpu_input(x.shape, x.dtype, fmt))
        graph.replay()
        torch.cuda.synchronize()
        assert nbt.item() == step + 1
        y_t = F.relu(F.batch_norm(x, rm_t, rv_t, w, b, True, 1.0 / (step + 1), 1e-5))
        assert_close(y, y_t, msg=f"replay {step}")
        assert_close(rm_g, rm_t, msg="running_mean")
        assert_close(rv_g, rv_t, msg="running_var")


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_bitwise_run_to_run(ops, path, fmt):
    x = gpu_input((32, 64, 28, 28), torch.float16, fmt)
    dy = like(x)
    w, b, _, _ = gpu_params(64, torch.float32)

    def run():
        y, m, i = ops.forward_train(x, w, b, None, None, None, None, 0.1, 1e-5, True)
        return [y, m, i, *ops.backward(dy, x, w, b, None, m, i, True, True, [True, True, True, False])[:3]]

    first = run()
    for _ in range(3):
        for a, e in zip(run(), first):
            assert torch.equal(a, e)


def test_short_cnn_training_matches_torch(ops):
    import fastbn

    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    ref = net().to(DEV).to(memory_format=torch.channels_last)
    fast = fastbn.convert(net().to(DEV).to(memory_format=torch.channels_last))
    fast.load_state_dict(ref.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, fast)]
    for step in range(10):
        x = torch.randn(16, 3, 16, 16, device=DEV).to(memory_format=torch.channels_last)
        target = torch.randint(0, 10, (16,), device=DEV)
        losses = []
        for model, opt in zip((ref, fast), opts):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-3 * max(1.0, abs(losses[0])), f"step {step}: {losses}"
    for (name, a), (_, b) in zip(ref.state_dict().items(), fast.state_dict().items()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=name)
