"""Model-level benchmark: one ResNet-50 training step with torch's BatchNorm against fastbn's.

    python benchmarks/bench_model.py                 # CPU: batch 8 at 112x112; GPU: batch 64 at 224x224, bf16 autocast
    python benchmarks/bench_model.py --compile       # also torch.compile each model
    python benchmarks/bench_model.py --torchvision   # torchvision.models.resnet50 instead of benchmarks/resnet.py

Variants, all from the same initial weights:
  torch         ResNet-50 with torch.nn.BatchNorm2d
  fastbn        the same model after fastbn.convert(model)
  fastbn-fused  ResNet-50 built from fastbn.BatchNormReLU2d / BatchNormAddReLU2d, so the residual add and ReLU
                run inside the BN ops (not with --torchvision, whose blocks call ReLU and add themselves)
A step is zero_grad, forward, cross-entropy, backward and an SGD step (momentum 0.9); its median time comes
from torch.utils.benchmark.Timer (device synchronised around each block; 5+ blocks, until their IQR is within
10% of the median or --max-time) after warm-up steps, which for --compile include the compilation. The
variants of one mode and format take their blocks in turn (common.measure_interleaved): timed one after the
other, the same steps on the 2-core VM read 0.84x and 1.22x for fastbn in channels_last, as the machine's
memory bandwidth moved. Memory: the bytes autograd saves for backward during one step, counted by
torch.autograd.graph.saved_tensors_hooks as the sum of the distinct storages' sizes, parameters excluded;
under autocast that includes the low-precision copies of the weights, alike in every variant. On GPU also
the peak of torch.cuda.max_memory_allocated during one step over what was allocated when it started.
"loss" is the first step's loss, which should agree across variants (closely in float32; 16-bit autocast
with few values per channel drifts further).
Prints a markdown table and writes benchmarks/results/model-<device>.json (--out-dir to change the folder).
"""
import argparse
import contextlib
import json
import os
import sys
import time

import common  # before torch: sets inductor's environment
import torch
import torch.nn.functional as F

VARIANTS = ("torch", "fastbn", "fastbn-fused")
FORMATS = ("NCHW", "channels_last")
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(variant, state, args_, fastbn):
    if args_.torchvision:
        import torchvision

        model = torchvision.models.resnet50()
    else:
        from resnet import ResNet50

        model = ResNet50(fused=variant == "fastbn-fused")
    model.load_state_dict(state)
    if variant == "fastbn":
        fastbn.convert(model)
    return model


def saved_activation_bytes(step, model):
    """Bytes of the distinct storages autograd saves during step(), parameters (and their views) excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. subclasses)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def prepare_variant(variant, mode, fmt, state, args_, device, fastbn):
    """(row, step) for one variant: its model and optimizer built and a first step taken (the compilation under
    --compile); step is None when that first step failed (the row then says why)."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    model = build(variant, state, args_, fastbn).to(device=device, memory_format=memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args_.batch, 3, args_.image_size, args_.image_size, device=device, generator=gen)
    x = x.contiguous(memory_format=memory_format)
    target = torch.randint(0, 1000, (args_.batch,), device=device, generator=gen)
    forward = torch.compile(model) if mode == "compile" else model
    amp = AMP[args_.amp]
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(forward(x), target)
        loss.backward()
        opt.step()
        return loss

    row = {"variant": variant, "mode": mode, "format": fmt}
    start = time.perf_counter()
    try:
        row["loss"] = step().item()  # first step: compiles under --compile
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row, None
    row["first_step_s"] = time.perf_counter() - start
    try:
        row["saved_bytes"] = saved_activation_bytes(step, model)
    except Exception as exc:  # e.g. hooks a compiled graph does not support
        row["saved_bytes_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if device.type == "cuda":
        # Over the memory allocated when the step starts (this variant's weights and optimizer state, and the
        # other variants' models, which stay alive for the interleaved timing): what one step adds.
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        row["peak_cuda_over_start_bytes"] = torch.cuda.max_memory_allocated(device) - before
    return row, step


def time_variants(prepared, args_):
    """Times the steps of the variants that ran ({variant: (row, step)}) with their blocks taken in turn
    (common.measure_interleaved), so a slow phase of the machine falls on all of them alike."""
    steps = {variant: step for variant, (row, step) in prepared.items() if step is not None}
    timings = common.measure_interleaved(steps, args_.min_time, args_.max_time, warmup=args_.warmup)
    for variant, (seconds, m) in timings.items():
        row = prepared[variant][0]
        row["step_s"], row["step_iqr_s"] = seconds, m.iqr
        row["images_per_s"] = args_.batch / seconds


def table_markdown(rows, device):
    headers = ["variant", "mode", "format", "step ms", "images/s", "speed-up", "saved activations MB", "loss"]
    if device.type == "cuda":
        headers.insert(7, "step peak CUDA MB")
    base = {(r["mode"], r["format"]): r["step_s"] for r in rows if r["variant"] == "torch" and "step_s" in r}
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["variant"], r["mode"], r["format"], "error: " + r["error"].replace("|", "/")]
                         + ["—"] * (len(headers) - 4))
            continue
        ref = base.get((r["mode"], r["format"]))
        cell = [r["variant"], r["mode"], r["format"], f"{r['step_s'] * 1e3:.1f}", f"{r['images_per_s']:.1f}",
                common.fmt(ref / r["step_s"] if ref else None, ".2f") + ("x" if ref else ""),
                common.fmt(r.get("saved_bytes", float("nan")) / 2**20, ".1f"), f"{r['loss']:.5f}"]
        if device.type == "cuda":
            cell.insert(7, common.fmt(r.get("peak_cuda_over_start_bytes", float("nan")) / 2**20, ".0f"))
        cells.append(cell)
    return common.markdown_table(headers, cells)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 2 at 64x64, short timings")
    p.add_argument("--batch", type=int, help="images per step (default CPU: 8; GPU: 64)")
    p.add_argument("--image-size", type=int, help="square input size (default CPU: 112; GPU: 224)")
    p.add_argument("--formats", default="NCHW", help="comma list of NCHW, channels_last (default: NCHW)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model) of every variant")
    p.add_argument("--torchvision", action="store_true",
                   help="use torchvision.models.resnet50 (needs torchvision; drops fastbn-fused)")
    p.add_argument("--amp", choices=tuple(AMP), help="autocast dtype (default CPU: none; GPU: bf16)")
    p.add_argument("--min-time", type=float, help="least seconds of timed steps per variant (default 1; --quick 0.2)")
    p.add_argument("--max-time", type=float, default=10.0,
                   help="most seconds of timed steps per variant, when the spread stays above 10%% (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default 2)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out-dir", default=common.RESULTS_DIR, help="where model-<device>.json goes")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--system-malloc", action="store_true", help="CPU: keep glibc's default allocator behaviour")
    return p.parse_args(argv)


def apply_defaults(args_, device):
    gpu = device.type == "cuda"
    args_.batch = args_.batch or (2 if args_.quick else 64 if gpu else 8)
    args_.image_size = args_.image_size or (64 if args_.quick else 224 if gpu else 112)
    args_.amp = args_.amp or ("bf16" if gpu else "none")
    args_.min_time = args_.min_time or (0.2 if args_.quick else 1.0)
    args_.formats = [f.strip() for f in args_.formats.split(",") if f.strip()]
    args_.variants = [v.strip() for v in args_.variants.split(",") if v.strip()]
    for name, chosen, allowed in (("format", args_.formats, FORMATS), ("variant", args_.variants, VARIANTS)):
        bad = [c for c in chosen if c not in allowed]
        if bad:
            sys.exit(f"error: unknown {name} {bad}; choose from {', '.join(allowed)}")
    if args_.torchvision and "fastbn-fused" in args_.variants:
        args_.variants.remove("fastbn-fused")


def main(argv=None):
    args_ = parse_args(argv)
    device, allocator, fastbn = common.start(args_, apply_defaults)
    started = time.perf_counter()
    info = common.device_info(device, fastbn)

    torch.manual_seed(0)  # one set of initial weights, loaded into every variant
    if args_.torchvision:
        import torchvision

        state = torchvision.models.resnet50().state_dict()
    else:
        from resnet import ResNet50

        state = ResNet50().state_dict()

    rows = []
    modes = ["eager"] + (["compile"] if args_.compile else [])
    for mode in modes:
        for fmt in args_.formats:
            prepared = {variant: prepare_variant(variant, mode, fmt, state, args_, device, fastbn)
                        for variant in args_.variants}
            time_variants(prepared, args_)
            for variant, (row, _) in prepared.items():
                rows.append(row)
                print(f"  {variant:<13}{mode:<8}{fmt:<14}" + (f"{row['step_s'] * 1e3:9.1f} ms/step  "
                      f"{row['images_per_s']:7.1f} images/s" if "step_s" in row else "ERROR " + row["error"]),
                      file=sys.stderr, flush=True)
            del prepared
            torch._dynamo.reset()

    slug = common.device_slug(device)
    where = info.get("gpu") or f"{info['cpu']}, {info['threads']} threads"
    text = "\n".join([
        f"# fastbn model benchmark: ResNet-50 training step, {slug}",
        "",
        f"{where}; torch {info['torch']}; fastbn {info['fastbn']} (git {info['git']}); "
        f"{'torchvision' if args_.torchvision else 'benchmarks/resnet.py'} ResNet-50, batch {args_.batch}, "
        f"{args_.image_size}x{args_.image_size}, autocast {args_.amp}; allocator: {allocator}.",
        "",
        table_markdown(rows, device),
        "",
    ])
    print(text)
    meta = {"device": slug, "device_info": info, "allocator": allocator, "wall_s": time.perf_counter() - started,
            "config": {k: v for k, v in vars(args_).items() if k not in ("out_dir", "markdown")}}
    os.makedirs(args_.out_dir, exist_ok=True)
    json_path = os.path.join(args_.out_dir, f"model-{slug}.json")
    with open(json_path, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    written = [json_path]
    if args_.markdown:
        with open(args_.markdown, "w") as f:
            f.write(text)
        written.append(args_.markdown)
    print(f"wrote {', '.join(os.path.relpath(p) for p in written)} ({meta['wall_s']:.0f} s)", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
