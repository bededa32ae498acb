"""Op-level benchmark: fastbn against torch's batch_norm and against torch.compile of the same torch code.

    python benchmarks/bench_ops.py              # default run: on the GPU when there is one, else the CPU
    python benchmarks/bench_ops.py --quick      # smoke test: a few shapes, short timings, no compile
    python benchmarks/bench_ops.py --markdown benchmarks/results/cpu.md
    python benchmarks/bench_ops.py --dtypes float32,float16,bfloat16 --ops all --compile all

Prints a markdown table, then a summary (geometric mean of fastbn's speed-up over torch per op, memory
format and dtype, checked against the project's targets), and writes benchmarks/results/ops-<device>.json
and .png (--out-dir to change the folder), <device> being "cpu" or a slug of the GPU's name
(ops-<device>-warm.json and .png with --warm-cache).

Ops, with the minimum memory traffic used for GB/s (E = bytes of one activation tensor):
  fwd_train     training forward, running statistics updated                         2E
  fwd_eval      inference forward with the running statistics                        2E
  bn_relu       relu(bn(x)), training; torch: F.batch_norm then in-place relu_        2E
  bn_add_relu   relu(bn(x) + r), training; torch: F.batch_norm, add_, relu_ (as       3E (x and r in, y out)
                torchvision's Bottleneck)
  bwd           BN backward: grads of input, weight and bias                         3E
  bwd_relu      backward of relu(bn(x)); torch: threshold_backward then BN backward  3E
  bwd_add_relu  backward of relu(bn(x) + r), grad of r included                      5E

Columns:
  torch    F.batch_norm (and add_/relu_) in eager mode: ATen's native kernels on CPU; cuDNN or native on GPU,
           as the "torch backend" column says (read from the autograd node torch records for that input).
           Backward calls that node directly, `y.grad_fn(dy)` after one forward with requires_grad, so the
           exact kernel autograd would run is timed, without the forward and without the autograd engine.
  fastbn   the raw ops torch.ops.fastbn.forward_train / forward_eval / backward; backward is given the
           save_mean/save_invstd of one forward_train per input set.
  compile  torch.compile(dynamic=False, fullgraph=True) of the torch code: the forward functions below, and
           aten.native_batch_norm_backward (after threshold_backward for the ReLU variants) for backward.
           Compile time is excluded (it is in the JSON); Dynamo is reset before each case. Compiling every
           case takes minutes, so by default only COMPILE_SUBSET is compiled (--compile all / none).
Timing: torch.utils.benchmark.Timer, in blocks of ~10 ms of back-to-back calls with a device synchronisation
(torch.cuda.synchronize on GPU) around each block (common.measure): after a warm-up call, blocks for
--min-time seconds and until 5+ blocks agree within 10% (IQR/median) or --max-time has passed; medians. A
case still spread over more than UNSETTLED_SPREAD at --max-time is timed once more (the steadier timing is kept).
torch, fastbn (and torch.compile) take their blocks in turn (common.measure_interleaved), so a slow phase
of the machine (a VM's memory bandwidth moved between 29 and 67 GB/s within minutes here) falls on all of
them alike instead of deciding a row by which side it caught. When one set of inputs would fit in the
last-level cache, each case rotates among k copies with k * bytes >= 3 * LLC (LLC from sysfs or the GPU's
properties, 64 MB when unknown). --warm-cache reuses one set instead, as a layer finds the input the previous
layer has just written: it times the kernels' work from cache, which the rotated default hides behind memory.
Every call allocates its outputs, as in real use. On CPU glibc is told to keep freed memory (see
common.tune_cpu_allocator): otherwise every output over 32 MB is page-faulted afresh, which costs several
times the kernel on a small VM; timing blocks that page-fault all the same (while the heap still grows) are left
out of the medians. --system-malloc keeps glibc's default, faults included. Copy bandwidth is dst.copy_(src) on
buffers twice the cache's size, measured at the start and the end of the run (the larger is used);
"% copy" is fastbn's GB/s over it. On a fast GPU the Python and launch overhead of one call (~10 us) can
exceed a small shape's kernel: --cuda-graphs times CUDA-graph replays instead (torch's kernels, fastbn's
ops and the compiled code are all capturable).
The check column compares fastbn's first output with torch's (a sanity check, not the test suite).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import common  # before torch: sets inductor's environment
import torch
import torch.nn.functional as F
from shapes import BN1D_SHAPE, SMALL_C_SHAPE, parse_shape, resnet50_bn_shapes, shape_str

MOMENTUM, EPS = 0.1, 1e-5
ATEN = torch.ops.aten
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
FORMATS = ("NCHW", "channels_last", "channel_slice")
DEFAULT_FORMATS = ("NCHW", "channels_last")
# Shapes (C, H) of ResNet-50 compiled by default (--compile subset), at every batch size: layer1's bn3 and
# downsample, a large activation present in every ResNet. One shape keeps the CPU default under 2 minutes
# (each case compiles in 1-5 s there).
COMPILE_SUBSET = ((256, 56),)
QUICK_RESNET = ((256, 56), (1024, 14), (2048, 7))

# The project's targets (issue 5). Geometric means over the ResNet-50 shapes of fastbn-over-torch
# speed-ups, keyed by (op, format) with None for any format; "min" bounds every shape.
TARGETS = {
    "cpu": {  # float32 only
        "dtypes": ("float32",),
        "geomean": {("fwd_train", "NCHW"): 2.0, ("fwd_train", "channels_last"): 1.2, ("bwd", "NCHW"): 1.5,
                    ("bwd", "channels_last"): 1.2, ("bn_relu", None): 1.5, ("fwd_eval", None): 1.0},
        "min": {(op, None): 0.9 for op in ("fwd_train", "fwd_eval", "bwd", "bn_relu")},
        "vs_compile": {},
        "pct_copy": {},
    },
    "cuda": {
        "dtypes": ("float32", "float16", "bfloat16"),
        "geomean": {("fwd_train", None): 1.5, ("bwd", None): 1.3, ("bn_add_relu", None): 2.0},
        "min": {("fwd_train", None): 1.0},
        "vs_compile": {("bn_add_relu", None): 1.2},
        "pct_copy": {("fwd_train", None): 85.0},  # best shape: the persistent (fits on chip) path
    },
}


# The torch code being compared (also what torch.compile compiles).

def torch_fwd_train(x, w, b, rm, rv):
    return F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS)


def torch_fwd_eval(x, w, b, rm, rv):
    return F.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS)


def torch_bn_relu(x, w, b, rm, rv):
    return torch.relu_(F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS))


def torch_bn_add_relu(x, r, w, b, rm, rv):
    return F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS).add_(r).relu_()


def torch_bwd(dy, x, w, rm, rv, save_mean, save_invstd):
    return ATEN.native_batch_norm_backward(dy, x, w, rm, rv, save_mean, save_invstd, True, EPS, [True] * 3)


def torch_bwd_relu(dy, y, x, w, rm, rv, save_mean, save_invstd):
    # y = relu(...) output: autograd's ReLU backward masks with it; the residual's grad is that mask's output.
    return torch_bwd(ATEN.threshold_backward(dy, y, 0), x, w, rm, rv, save_mean, save_invstd)


def node_bwd(node, dy):
    return node(dy)


def node_bwd_relu(node, dy, y):
    return node(ATEN.threshold_backward(dy, y, 0))


# fastbn's raw ops, with the same arguments as the torch functions above where they can be.

def fastbn_fwd_train(x, w, b, rm, rv, relu=False):
    return torch.ops.fastbn.forward_train(x, w, b, None, rm, rv, None, MOMENTUM, EPS, relu)


def fastbn_fwd_eval(x, w, b, rm, rv):
    return torch.ops.fastbn.forward_eval(x, w, b, None, rm, rv, EPS, False)


def fastbn_bn_relu(x, w, b, rm, rv):
    return fastbn_fwd_train(x, w, b, rm, rv, relu=True)


def fastbn_bn_add_relu(x, r, w, b, rm, rv):
    return torch.ops.fastbn.forward_train(x, w, b, r, rm, rv, None, MOMENTUM, EPS, True)


def fastbn_bwd(dy, x, w, b, y, mean, invstd, relu):
    # y: the forward's output after a residual add (the ReLU mask; the residual gets a gradient), else None.
    mask = [True, True, True, y is not None]
    return torch.ops.fastbn.backward(dy, x, w, b, y, mean, invstd, True, relu, mask)


class Inputs:
    """One case's tensors: k rotating copies of x, dy, r and whatever each implementation saves from a forward."""

    def __init__(self, shape, dtype, fmt, device, copies):
        self.copies = copies
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # torch's mixed mode for 16-bit
        channels = shape[1]
        gen = torch.Generator(device=device).manual_seed(0)

        def activation(view=False):
            # view: the input of a channel_slice case, channels [0, C) of 2C (what x.chunk(2, dim=1) gives); its
            # other tensors (dy, the residual) are contiguous, as a layer's own output and gradient are.
            full = (shape[0], 2 * channels) + tuple(shape[2:]) if view else shape
            t = torch.randn(full, generator=gen, device=device, dtype=dtype)
            if fmt == "channels_last":  # channels-last strides for any rank >= 3 (torch.channels_last at 4-D)
                t = t.movedim(1, -1).contiguous().movedim(-1, 1)
            # Copies of one random tensor: the values do not matter to the cache, and randn is slow on CPU.
            copies_ = [t] + [t.clone() for _ in range(copies - 1)]
            return [c[:, :channels] for c in copies_] if view else copies_

        self._activation = activation
        self._slice = fmt == "channel_slice"
        self.w = (torch.rand(channels, generator=gen, device=device) + 0.5).to(param_dtype)
        self.b = (0.1 * torch.randn(channels, generator=gen, device=device)).to(param_dtype)
        self.rm = torch.zeros(channels, device=device, dtype=param_dtype)
        self.rv = torch.ones(channels, device=device, dtype=param_dtype)
        self._cache = {}

    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def x(self):
        return self._get("x", lambda: self._activation(view=self._slice))

    @property
    def dy(self):
        return self._get("dy", self._activation)

    @property
    def r(self):
        return self._get("r", self._activation)

    def torch_nodes(self):
        """Per copy: the autograd node of torch's BN forward on x, which holds torch's saved tensors."""
        def make():
            nodes = []
            w, b = self.w.detach().requires_grad_(), self.b.detach().requires_grad_()
            for x in self.x:
                with torch.enable_grad():
                    y = F.batch_norm(x.detach().requires_grad_(), self.rm, self.rv, w, b, True, MOMENTUM, EPS)
                nodes.append(y.grad_fn)
            return nodes
        return self._get("nodes", make)

    def aten_stats(self):
        """Per copy: (save_mean, save_invstd) of aten.native_batch_norm, for the compiled backward."""
        return self._get("aten", lambda: [ATEN.native_batch_norm(x, self.w, self.b, self.rm, self.rv, True,
                                                                   MOMENTUM, EPS)[1:] for x in self.x])

    def fastbn_stats(self):
        """Per copy: (save_mean, save_invstd) of fastbn's forward_train."""
        return self._get("fastbn", lambda: [fastbn_fwd_train(x, self.w, self.b, self.rm, self.rv)[1:]
                                            for x in self.x])

    def relu_outputs(self, residual):
        """Per copy: relu(bn(x) [+ r]), the tensor torch's ReLU backward masks with."""
        def make():
            rs = self.r if residual else [None] * self.copies
            return [torch.relu(torch_fwd_train(x, self.w, self.b, self.rm.clone(), self.rv.clone())
                               + (0 if r is None else r)) for x, r in zip(self.x, rs)]
        return self._get(("y", residual), make)

    def relu_outputs_like_x(self, residual):
        """relu_outputs in x's memory layout, as fastbn's forward returns them (torch's CPU batch_norm makes a
        3-D input with channels-last strides contiguous)."""
        return self._get(("y_like_x", residual), lambda: [torch.empty_like(x).copy_(y) for x, y in
                                                           zip(self.x, self.relu_outputs(residual))])


@dataclass
class Op:
    bytes_e: int  # minimum memory traffic, in E
    training: bool  # which torch path (train or eval) its backend column reports
    torch_fn: Callable
    fastbn_fn: Callable
    compile_fn: Callable  # the torch code torch.compile is given
    args: Callable  # (Inputs, impl) -> list of argument tuples, one per copy


def forward_args(inp, impl):
    return [(x, inp.w, inp.b, inp.rm, inp.rv) for x in inp.x]


def residual_args(inp, impl):
    return [(x, r, inp.w, inp.b, inp.rm, inp.rv) for x, r in zip(inp.x, inp.r)]


def backward_args(relu, residual):
    def args(inp, impl):
        ys = inp.relu_outputs(residual) if relu else [None] * inp.copies
        if impl == "torch":
            return [(node, dy) + ((y,) if relu else ()) for node, dy, y in zip(inp.torch_nodes(), inp.dy, ys)]
        if impl == "fastbn":
            # Without a residual, fastbn recomputes the mask from x.
            masks = inp.relu_outputs_like_x(residual) if residual else [None] * inp.copies
            return [(dy, x, inp.w, inp.b, y, mean, invstd, relu)
                    for dy, x, y, (mean, invstd) in zip(inp.dy, inp.x, masks, inp.fastbn_stats())]
        return [(dy,) + ((y,) if relu else ()) + (x, inp.w, inp.rm, inp.rv, sm, si)
                for dy, y, x, (sm, si) in zip(inp.dy, ys, inp.x, inp.aten_stats())]
    return args


OPS = {
    "fwd_train": Op(2, True, torch_fwd_train, fastbn_fwd_train, torch_fwd_train, forward_args),
    "fwd_eval": Op(2, False, torch_fwd_eval, fastbn_fwd_eval, torch_fwd_eval, forward_args),
    "bn_relu": Op(2, True, torch_bn_relu, fastbn_bn_relu, torch_bn_relu, forward_args),
    "bn_add_relu": Op(3, True, torch_bn_add_relu, fastbn_bn_add_relu, torch_bn_add_relu, residual_args),
    "bwd": Op(3, True, node_bwd, fastbn_bwd, torch_bwd, backward_args(False, False)),
    "bwd_relu": Op(3, True, node_bwd_relu, fastbn_bwd, torch_bwd_relu, backward_args(True, False)),
    "bwd_add_relu": Op(5, True, node_bwd_relu, fastbn_bwd, torch_bwd_relu, backward_args(True, True)),
}
# The issue's five; the fused backward variants on request (--ops all), keeping the GPU default to minutes.
DEFAULT_OPS = ("fwd_train", "fwd_eval", "bwd", "bn_relu", "bn_add_relu")
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 1e-2, torch.bfloat16: 6e-2}
CHECK_MAX_FRACTION = 2e-3


def torch_backend(inp, training):
    """'cuDNN', 'MIOpen' or 'native': the kernel family torch's batch_norm picked for these inputs."""
    with torch.enable_grad():
        y = F.batch_norm(inp.x[0].detach().requires_grad_(), inp.rm.clone(), inp.rv.clone(), inp.w, inp.b,
                         training, MOMENTUM, EPS)
    name = type(y.grad_fn).__name__.lower()
    return "cuDNN" if "cudnn" in name else "MIOpen" if "miopen" in name else "native"


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def check(fastbn_out, torch_out, dtype):
    """(largest |difference|, fraction of elements off, ok) of fastbn's first output against torch's.

    A sanity check that the kernel being timed computes the right thing, not the test suite: with 16-bit
    inputs a ReLU mask legitimately flips where bn(x) + r rounds to 0 differently in torch's separate ops
    and fastbn's fused float32 arithmetic, so a few elements (CHECK_MAX_FRACTION) may differ by |dy|.
    """
    a, b = first(fastbn_out), first(torch_out)
    if a.dtype != torch.float64:  # float32 differences are exact enough here, and cheaper on big tensors
        a, b = a.float(), b.float()
    tol = CHECK_TOLERANCE[dtype]
    off = (~torch.isclose(a, b, rtol=tol, atol=tol)).sum().item() / max(a.numel(), 1)
    return (a - b).abs_().max().item(), off, off <= CHECK_MAX_FRACTION


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_calls(args_, copies):
    """Calls per CUDA graph under --cuda-graphs: a multiple of the copies, so every replay rotates alike."""
    return copies * math.ceil(16 / copies) if args_.cuda_graphs else 0


# A case whose blocks for one implementation still spread over more than this fraction of their median when
# --max-time ran out is timed once more, and the timing with the smaller spread is kept ("retimed" in the JSON).
# On the 2-core VM, one case in a default run could catch a stall for one side only: fastbn's eval on NCHW
# 32x256x56x56 read 86 ms (IQR 43 ms) between torch blocks of 6 ms, and 2.5 ms when run again.
UNSETTLED_SPREAD = 0.25


def spread(row, names):
    """The largest IQR / median among the implementations timed into row."""
    return max(row[name + "_iqr_s"] / row[name + "_s"] for name in names)


def measure_together(runs, args_, row, device):
    """Times each of runs ({name: (fn, arg_sets)}) into row[name + "_s"] (and its IQR and sample count), their
    timing blocks taken in turn (common.measure_interleaved), on CPU with the tuned allocator leaving out blocks
    that page-faulted."""
    calls = {name: common.rotating(fn, arg_sets) for name, (fn, arg_sets) in runs.items()}
    copies = len(next(iter(runs.values()))[1])
    results = common.measure_interleaved(calls, args_.min_time, args_.max_time, warmup=0,
                                         graph_calls=graph_calls(args_, copies),
                                         skip_faulted=device.type == "cpu" and not args_.system_malloc)
    for name, (seconds, m) in results.items():
        row[name + "_s"], row[name + "_iqr_s"], row[name + "_samples"] = seconds, m.iqr, len(m.times)


def time_case(runs, args_, row, device):
    """measure_together, and once more when an implementation's blocks are unsettled (UNSETTLED_SPREAD)."""
    measure_together(runs, args_, row, device)
    if spread(row, runs) > UNSETTLED_SPREAD:
        again = {}
        measure_together(runs, args_, again, device)
        if spread(again, runs) < spread(row, runs):
            row.update(again)
        row["retimed"] = True


def run_case(name, inp, args_, device, want_compile):
    """Times one op on one case: a result row (without the case's labels; % copy is added at the end)."""
    op = OPS[name]
    nbytes = op.bytes_e * inp.x[0].numel() * inp.x[0].element_size()
    row = {"bytes": nbytes}
    runs = {"torch": (op.torch_fn, op.args(inp, "torch")), "fastbn": (op.fastbn_fn, op.args(inp, "fastbn"))}
    outputs = {}
    try:
        for impl, (fn, arg_sets) in runs.items():
            # The first call gives the output to check and is the warm-up, with Timer's block-size search.
            outputs[impl] = fn(*arg_sets[0])
    except Exception as exc:  # one failing op (e.g. an unimplemented dtype) must not end the run
        row["error"] = f"{impl}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row
    if not args_.no_check:
        row["max_abs_diff"], row["fraction_off"], row["check_ok"] = check(outputs["fastbn"], outputs["torch"],
                                                                          inp.x[0].dtype)
    del outputs
    if want_compile:
        try:
            torch._dynamo.reset()
            compiled = torch.compile(op.compile_fn, dynamic=False, fullgraph=True)
            arg_sets = op.args(inp, "compile")
            start = time.perf_counter()
            compiled(*arg_sets[0])
            sync(device)
            row["compile_build_s"] = time.perf_counter() - start
            runs["compile"] = (compiled, arg_sets)
        except Exception as exc:
            row["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    try:
        time_case(runs, args_, row, device)
    except Exception as exc:
        row["error"] = f"timing: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row
    row["speedup"] = row["torch_s"] / row["fastbn_s"]
    if "compile_s" in row:
        row["speedup_vs_compile"] = row["compile_s"] / row["fastbn_s"]
    row["fastbn_GBps"] = nbytes / row["fastbn_s"] / 1e9
    row["torch_GBps"] = nbytes / row["torch_s"] / 1e9
    return row


def case_list(args_):
    """(shape, set name, whether torch.compile is timed on it) for every requested shape."""
    cases = []
    for item in args_.shapes:
        if item == "resnet50":
            for batch in args_.batch:
                for shape in resnet50_bn_shapes(batch):
                    if args_.quick and shape[1:3] not in QUICK_RESNET:
                        continue
                    in_subset = shape[1:3] in COMPILE_SUBSET
                    cases.append((shape, "resnet50", args_.compile == "all" or
                                  (args_.compile == "subset" and in_subset)))
        elif item in ("bn1d", "smallc"):
            cases.append((BN1D_SHAPE if item == "bn1d" else SMALL_C_SHAPE, item, args_.compile == "all"))
        else:
            cases.append((parse_shape(item), "custom", args_.compile != "none"))
    return cases


def run_all(args_, device, cache_bytes):
    rows = []
    for shape, set_name, want_compile in case_list(args_):
        numel = math.prod(shape)
        for dtype_name in args_.dtypes:
            dtype = DTYPES[dtype_name]
            for fmt in args_.formats:
                if fmt == "channels_last" and len(shape) < 3:
                    continue  # (N, C) has one layout
                element = torch.empty((), dtype=dtype).element_size()
                # Rotate enough copies for the op that moves the fewest bytes.
                least_bytes = min(OPS[o].bytes_e for o in args_.ops) * numel * element
                copies = 1 if args_.warm_cache else common.copies_needed(least_bytes, cache_bytes)
                inp = Inputs(shape, dtype, fmt, device, copies)
                backends = {t: torch_backend(inp, t) for t in {OPS[o].training for o in args_.ops}}
                for name in args_.ops:
                    with torch.no_grad():
                        row = run_case(name, inp, args_, device, want_compile)
                    row = {"op": name, "shape": shape_str(shape), "set": set_name, "dtype": dtype_name,
                           "format": fmt, "torch_backend": backends[OPS[name].training], "copies": copies, **row}
                    rows.append(row)
                    print(progress_line(row), file=sys.stderr, flush=True)
                del inp
    return rows


def progress_line(row):
    head = f"  {row['op']:<13}{row['shape']:<18}{row['dtype']:<9}{row['format']:<14}"
    if "error" in row:
        return head + "ERROR " + row["error"]
    return head + (f"torch {row['torch_s'] * 1e3:8.3f} ms  fastbn {row['fastbn_s'] * 1e3:8.3f} ms  "
                   f"x{row['speedup']:.2f}" + (f"  compile x{row['speedup_vs_compile']:.2f}"
                                               if "speedup_vs_compile" in row else "")
                   + (f"  compile ERROR {row['compile_error']}" if "compile_error" in row else ""))


def table_markdown(rows):
    headers = ["op", "shape", "dtype", "format", "torch backend", "torch ms", "fastbn ms", "speed-up",
               "compile ms", "vs compile", "fastbn GB/s", "% copy", "check"]
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["op"], r["shape"], r["dtype"], r["format"], r["torch_backend"]] + ["—"] * 7 +
                         ["error: " + r["error"].replace("|", "/")])
            continue
        check_cell = ("—" if "check_ok" not in r else "ok" if r["check_ok"] else
                      f"DIFF {100 * r['fraction_off']:.2g}% off, max {r['max_abs_diff']:.2g}")
        cells.append([r["op"], r["shape"], r["dtype"], r["format"], r["torch_backend"],
                      common.fmt(r["torch_s"] * 1e3, ".3f"), common.fmt(r["fastbn_s"] * 1e3, ".3f"),
                      common.fmt(r["speedup"], ".2f") + "x",
                      common.fmt(r.get("compile_s", math.nan) * 1e3, ".3f"),
                      common.fmt(r.get("speedup_vs_compile"), ".2f", "—")
                      + ("x" if "speedup_vs_compile" in r else ""),
                      common.fmt(r["fastbn_GBps"], ".1f"), common.fmt(r["pct_copy"], ".0f"), check_cell])
    return common.markdown_table(headers, cells)


def _target(table, op, fmt):
    return table.get((op, fmt), table.get((op, None)))


def summarize(rows, device):
    """Per (op, format, dtype): geometric means and worst case of the speed-ups, against the targets."""
    targets = TARGETS[device.type]
    groups = {}
    for r in rows:
        if "speedup" in r:
            groups.setdefault((r["op"], r["format"], r["dtype"]), []).append(r)
    summary = []
    for (op, fmt, dtype), group in groups.items():
        resnet = [r for r in group if r["set"] == "resnet50"] or group
        worst = min(group, key=lambda r: r["speedup"])
        compiled = [r["speedup_vs_compile"] for r in resnet if "speedup_vs_compile" in r]
        pct = [r["pct_copy"] for r in group]
        s = {"op": op, "format": fmt, "dtype": dtype, "shapes": len(resnet),
             "geomean": common.geomean([r["speedup"] for r in resnet]),
             "min": worst["speedup"], "min_shape": worst["shape"],
             "geomean_vs_compile": common.geomean(compiled) if compiled else None, "compiled_shapes": len(compiled),
             "pct_copy_median": statistics.median(pct), "pct_copy_max": max(pct)}
        checks = []
        if dtype in targets["dtypes"]:
            for key, value, actual in (("geomean", "geomean", s["geomean"]), ("min", "min", s["min"]),
                                       ("vs_compile", "geomean_vs_compile", s["geomean_vs_compile"]),
                                       ("pct_copy", "pct_copy_max", s["pct_copy_max"])):
                goal = _target(targets[key], op, fmt)
                if goal is not None and actual is not None:
                    s["target_" + key] = goal
                    checks.append(actual >= goal)
        s["met"] = None if not checks else all(checks)
        summary.append(s)
    return summary


def summary_markdown(summary):
    headers = ["op", "format", "dtype", "ResNet-50 shapes", "geomean speed-up", "target", "worst shape",
               "geomean vs compile (shapes)", "% copy median / max", "targets met"]
    cells = []
    for s in summary:
        goals = [f"{'>=' if k != 'min' else 'min >='} {s['target_' + k]:g}{'%' if k == 'pct_copy' else 'x'}"
                 + {"geomean": "", "min": "", "vs_compile": " vs compile", "pct_copy": " copy"}[k]
                 for k in ("geomean", "min", "vs_compile", "pct_copy") if "target_" + k in s]
        vs_compile = (f"{s['geomean_vs_compile']:.2f}x ({s['compiled_shapes']})"
                      if s["geomean_vs_compile"] is not None else "—")
        cells.append([s["op"], s["format"], s["dtype"], s["shapes"], f"{s['geomean']:.2f}x",
                      "; ".join(goals) or "—", f"{s['min']:.2f}x {s['min_shape']}", vs_compile,
                      f"{s['pct_copy_median']:.0f} / {s['pct_copy_max']:.0f}",
                      {None: "—", True: "yes", False: "NO"}[s["met"]]])
    return common.markdown_table(headers, cells)


def report_markdown(rows, summary, meta):
    info = meta["device_info"]
    where = info.get("gpu") or f"{info['cpu']}, {info['threads']} threads"
    lines = [
        f"# fastbn op benchmark: {meta['device']}",
        "",
        f"{where}; torch {info['torch']}; fastbn {info['fastbn']} (git {info['git']}); "
        f"copy bandwidth {meta['copy_GBps']:.1f} GB/s; last-level cache {info['last_level_cache_MB']} MB; "
        f"allocator: {meta['allocator']}.",
        "",
        "Medians of torch.utils.benchmark.Timer; speed-up = torch time / fastbn time. GB/s count the minimum "
        "traffic (2E forward, 3E backward, 3E for BN+add+ReLU forward, 5E for its backward); % copy is "
        "fastbn's GB/s over the copy bandwidth. " + meta["compile_note"]
        + (" Inputs reused every call (--warm-cache): data in cache where it fits." if meta["config"].get("warm_cache")
           else ""),
        "",
        table_markdown(rows),
        "",
        "## Summary",
        "",
        "Geometric mean of the speed-ups over the ResNet-50 shapes (all shapes when there are none); "
        "worst shape over every shape.",
        "",
        summary_markdown(summary),
        "",
    ]
    return "\n".join(lines)


def plot(rows, path, title):
    """Speed-up over torch per shape, one panel per op, one bar per (dtype, format); triangles: vs compile."""
    plt = common.load_matplotlib()
    if plt is None:
        return False
    from matplotlib import ticker

    rows = [r for r in rows if "speedup" in r]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    if not ops:
        return False
    series = list(dict.fromkeys((r["dtype"], r["format"]) for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8, 0.6 * len(shapes) + 3), 2.6 * len(ops)),
                             squeeze=False, sharex=True)
    width = 0.8 / len(series)
    for ax, op in zip(axes[:, 0], ops):
        for i, key in enumerate(series):
            pts = [(shapes.index(r["shape"]), r["speedup"]) for r in rows if r["op"] == op and
                   (r["dtype"], r["format"]) == key]
            if pts:
                xs, ys = zip(*pts)
                # Bars grow from 1x, up for speed-ups and down for slow-downs.
                ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], [y - 1 for y in ys], width, bottom=1,
                       label=f"{key[0]} {key[1]}")
            pts = [(shapes.index(r["shape"]), r["speedup_vs_compile"]) for r in rows if r["op"] == op and
                   (r["dtype"], r["format"]) == key and "speedup_vs_compile" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot([x - 0.4 + width * (i + 0.5) for x in xs], ys, "kv", markersize=5,
                        label="vs torch.compile" if i == 0 else None)
        # Log scale: a 2x slow-down is as far below 1 as a 2x speed-up is above it.
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("fastbn speed-up")
        ax.set_title(op, fontsize=10)
    legend = {}
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), fontsize=8, ncol=min(len(legend), 4), loc="upper center",
               bbox_to_anchor=(0.5, 0.965))
    axes[-1, 0].set_xticks(range(len(shapes)))
    axes[-1, 0].set_xticklabels(shapes, rotation=60, ha="right", fontsize=8)
    fig.suptitle(title, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def comma_list(choices=None):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if choices is not None:
            if items == ["all"]:
                return list(choices)
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)} or all")
        return items
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 3 ResNet-50 shapes at a small batch, float32, short timings, no compile")
    p.add_argument("--ops", type=comma_list(OPS),
                   help=f"comma list of {', '.join(OPS)}, or all (default: {','.join(DEFAULT_OPS)})")
    p.add_argument("--dtypes", type=comma_list(DTYPES), help="default CPU: float32; GPU: float32,float16,bfloat16")
    p.add_argument("--formats", type=comma_list(FORMATS), default=list(DEFAULT_FORMATS),
                   help="comma list of NCHW, channels_last, channel_slice (NCHW input that is channels [0, C) of "
                        "2C, as x.chunk(2, dim=1) gives: a view fastbn reads in place; dy and residual contiguous) "
                        "(default: NCHW,channels_last)")
    p.add_argument("--shapes", type=comma_list(), default=["resnet50", "bn1d", "smallc"],
                   help="comma list of resnet50 (its 12 BN shapes), bn1d (%s), smallc (%s) or NxCxHxW "
                        "(default: resnet50,bn1d,smallc)" % (shape_str(BN1D_SHAPE), shape_str(SMALL_C_SHAPE)))
    p.add_argument("--batch", type=comma_list(), help="ResNet-50 batch sizes (default CPU: 32; GPU: 64,256)")
    p.add_argument("--compile", choices=("none", "subset", "all"),
                   help="which cases also time torch.compile: subset = ResNet-50's %s shape(s) and custom shapes "
                        "(default: subset; --quick: none)" % ", ".join(f"Nx{c}x{h}x{h}" for c, h in COMPILE_SUBSET))
    p.add_argument("--min-time", type=float, default=0.05,
                   help="least seconds of timing per measurement (default 0.05)")
    p.add_argument("--max-time", type=float, help="most seconds per measurement, when the spread stays above 10%% "
                                                  "of the median (default 0.3; --quick 0.2)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out-dir", default=common.RESULTS_DIR, help="where ops-<device>.json and .png go")
    p.add_argument("--markdown", help="also write the table and summary to this file, e.g. benchmarks/results/cpu.md")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="GPU: time replays of CUDA graphs of 16+ calls, without Python and launch overhead")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    p.add_argument("--no-check", action="store_true", help="skip comparing fastbn's outputs with torch's")
    p.add_argument("--system-malloc", action="store_true", help="CPU: keep glibc's default allocator behaviour")
    p.add_argument("--warm-cache", action="store_true",
                   help="reuse one set of inputs every call instead of rotating copies out of the cache; "
                        "writes ops-<device>-warm.json and .png")
    return p.parse_args(argv)


def apply_defaults(args_, device):
    kind = device.type
    args_.ops = args_.ops or list(DEFAULT_OPS)
    args_.dtypes = args_.dtypes or (["float32"] if kind == "cpu" or args_.quick else
                                    ["float32", "float16", "bfloat16"])
    default_batch = ([8] if kind == "cpu" else [64]) if args_.quick else ([32] if kind == "cpu" else [64, 256])
    args_.batch = [int(b) for b in args_.batch] if args_.batch else default_batch
    args_.compile = args_.compile or ("none" if args_.quick else "subset")
    args_.max_time = args_.max_time or (0.2 if args_.quick else 0.3)
    if args_.cuda_graphs and kind != "cuda":
        sys.exit("error: --cuda-graphs needs a CUDA device")
    if args_.quick and args_.shapes == ["resnet50", "bn1d", "smallc"]:
        args_.shapes = ["resnet50", "bn1d"]


def compile_note(args_):
    if args_.compile == "none":
        return "torch.compile not timed (--compile none)."
    if args_.compile == "all":
        return "torch.compile timed on every case."
    subset = ", ".join(f"Nx{c}x{h}x{h}" for c, h in COMPILE_SUBSET)
    return f"torch.compile timed on a subset ({subset} and custom shapes; --compile all for every case)."


def main(argv=None):
    args_ = parse_args(argv)
    device, allocator, fastbn = common.start(args_, apply_defaults)
    started = time.perf_counter()
    cache_bytes = common.last_level_cache_bytes(device)
    copy_bw_start = common.copy_bandwidth(device, cache_bytes, 0.3)
    info = common.device_info(device, fastbn)
    print(f"fastbn bench_ops on {info.get('gpu') or info['cpu']} ({info['threads']} threads): "
          f"copy {copy_bw_start / 1e9:.1f} GB/s; ops {','.join(args_.ops)}; dtypes {','.join(args_.dtypes)}; "
          f"formats {','.join(args_.formats)}; compile {args_.compile}", file=sys.stderr, flush=True)

    rows = run_all(args_, device, cache_bytes)
    # Measured again at the end; the larger (less disturbed) figure is the reference for every row.
    copy_bw_end = common.copy_bandwidth(device, cache_bytes, 0.3)
    copy_bw = max(copy_bw_start, copy_bw_end)
    for row in rows:
        if "fastbn_s" in row:
            row["pct_copy"] = 100 * row["bytes"] / row["fastbn_s"] / copy_bw
    summary = summarize(rows, device)
    slug = common.device_slug(device)
    meta = {"device": slug, "device_info": info, "copy_GBps": copy_bw / 1e9,
            "copy_GBps_start_end": [copy_bw_start / 1e9, copy_bw_end / 1e9], "allocator": allocator,
            "compile_note": compile_note(args_), "wall_s": time.perf_counter() - started,
            "config": {k: v for k, v in vars(args_).items() if k not in ("out_dir", "markdown")},
            "min_bytes_E": {name: op.bytes_e for name, op in OPS.items()}}
    text = report_markdown(rows, summary, meta)
    print(text)

    os.makedirs(args_.out_dir, exist_ok=True)
    stem = f"ops-{slug}" + ("-warm" if args_.warm_cache else "")
    json_path = os.path.join(args_.out_dir, f"{stem}.json")
    with open(json_path, "w") as f:
        json.dump({**meta, "rows": rows, "summary": summary}, f, indent=1)
    written = [json_path]
    png_path = os.path.join(args_.out_dir, f"{stem}.png")
    if not args_.no_plot and plot(rows, png_path, f"fastbn speed-up over torch, {info.get('gpu') or info['cpu']}"):
        written.append(png_path)
    if args_.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args_.markdown)), exist_ok=True)
        with open(args_.markdown, "w") as f:
            f.write(text)
        written.append(args_.markdown)
    print(f"wrote {', '.join(os.path.relpath(p) for p in written)} ({meta['wall_s']:.0f} s)", file=sys.stderr)
    failed = [r for r in rows if "error" in r or r.get("check_ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
