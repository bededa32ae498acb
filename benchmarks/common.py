"""What bench_ops.py and bench_model.py share: imports from the checkout, device facts, allocator set-up, timing.

Import this module before torch: it sets environment variables that torch reads when it is imported.
"""
import collections
import ctypes
import itertools
import math
import os
import platform
import re
import subprocess
import sys
import warnings

try:
    import resource
except ImportError:  # not on Windows
    resource = None

# Inductor compiles in a pool of worker processes by default; on a machine with few cores those workers
# compete with the kernels being timed (OpenMP threads that lose their core stall the whole parallel
# region), so there the benchmarks compile in-process.
if (os.cpu_count() or 1) <= 4:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
# `python benchmarks/bench_ops.py` puts benchmarks/ on sys.path, not the root: add it so `import fastbn`
# finds the checkout (which JIT-builds the extension on first import) when fastbn is not installed. Added last,
# so a PYTHONPATH naming another build of fastbn (an A/B of two checkouts) and an installed fastbn come first.
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

import torch  # noqa: E402
from torch.utils.benchmark import Measurement, Timer  # noqa: E402

FALLBACK_CACHE_BYTES = 64 << 20


def import_fastbn():
    """Imports fastbn from the checkout (or the installed package); exits with the build error if it fails."""
    try:
        import fastbn
    except Exception as exc:  # the JIT build raises several kinds of errors
        sys.exit(f"error: `import fastbn` failed, so there is nothing to benchmark:\n  {type(exc).__name__}: {exc}")
    return fastbn


def start(args_, apply_defaults):
    """The setup both benchmarks begin with: (device, allocator description, fastbn module).

    Picks the device, fills the device-dependent defaults (apply_defaults(args_, device)), sets the thread count,
    tunes the CPU allocator (unless --system-malloc) and imports fastbn.
    """
    device = pick_device(args_.device)
    apply_defaults(args_, device)
    if args_.threads:
        torch.set_num_threads(args_.threads)
    allocator = "caching allocator" if device.type == "cuda" else (
        "system allocator" if args_.system_malloc else tune_cpu_allocator())
    return device, allocator, import_fastbn()


def pick_device(requested):
    """torch.device from --device, or cuda when a GPU is visible, else cpu."""
    if requested:
        device = torch.device(requested)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda, but torch sees no GPU")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        sys.exit(f"error: unsupported device {device}")
    return device


def device_slug(device):
    """'cpu', or the GPU's name in lower case with runs of other characters as '-' (e.g. nvidia-h100-80gb-hbm3)."""
    if device.type == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def tune_cpu_allocator():
    """Keeps freed memory in glibc's heap instead of returning it to the OS; returns what it did.

    glibc serves blocks over 32 MB with mmap and unmaps them on free, so every large output tensor is
    page-faulted afresh: on the 2-core VM this costs ~10x a copy of the same bytes and swamps the kernels
    being compared. M_MMAP_MAX=0 and M_TRIM_THRESHOLD=-1 (never trim) make freed blocks reusable, as CUDA's
    caching allocator (or jemalloc) does. Both torch and fastbn benefit alike. (With a 2 GB trim threshold,
    bench_ops on three ResNet-50 shapes with torch.compile took 11.4M page faults and 111 s on the 2-vCPU Xeon
    guest, against 2.8M and 64 s without trimming.)
    """
    if not sys.platform.startswith("linux"):
        return "system allocator (not Linux)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, -1) != 1:
            return "system allocator (mallopt refused)"
    except (OSError, AttributeError):
        return "system allocator (no glibc)"
    return "glibc malloc without mmap/trim (freed blocks are reused, like a caching allocator)"


def last_level_cache_bytes(device):
    """Size of the last-level cache (L3 on CPU, L2 on GPU); FALLBACK_CACHE_BYTES when it cannot be read."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return size or FALLBACK_CACHE_BYTES
    best_level, best_size = 0, 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(base, entry, "level")) as f:
                level = int(f.read())
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            size = int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            if level > best_level:
                best_level, best_size = level, size
    except (OSError, ValueError):
        pass
    return best_size or FALLBACK_CACHE_BYTES


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision(folder):
    """The checkout's short commit, with -dirty when tracked files other than benchmarks/results/ have changed (a
    results file rewritten by an earlier run says nothing about the code measured)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)benchmarks/results"], cwd=folder,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(device, fastbn_module=None):
    """Facts that make a result file comparable with another one."""
    info = {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fastbn": getattr(fastbn_module, "__version__", None),
        "fastbn_path": getattr(fastbn_module, "__file__", None),
        # The revision of the checkout that fastbn was imported from (None for an installed package).
        "git": git_revision(os.path.dirname(os.path.abspath(fastbn_module.__file__))) if fastbn_module else None,
        "last_level_cache_MB": round(last_level_cache_bytes(device) / 2**20, 1),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_GB=round(props.total_memory / 1e9, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    return info


def copies_needed(working_set_bytes, cache_bytes, max_copies=64):
    """How many input sets to rotate among so that each call finds its data out of the last-level cache.

    With k sets, k-1 other calls' data passes through the cache between two uses of one set; asking for
    k * working set >= 3 * cache leaves little of it behind. Large shapes get k = 1.
    """
    return max(1, min(max_copies, math.ceil(3 * cache_bytes / max(working_set_bytes, 1))))


def rotating(fn, arg_sets):
    """A no-argument callable that calls fn on the next argument tuple of arg_sets each time.

    It keeps the last len(arg_sets) results alive, so the outputs rotate through as many buffers as the
    inputs do: otherwise the allocator hands every call the block the previous output just freed, which is
    still in the cache, and small shapes write at cache speed.
    """
    cycle = itertools.cycle(arg_sets)
    outputs = collections.deque(maxlen=len(arg_sets))

    def run():
        outputs.append(fn(*next(cycle)))

    return run


BLOCK_SECONDS = 0.01  # one timed block: long enough that the synchronisation around it is noise
MIN_BLOCKS = 5
SPREAD = 0.1  # stop once the blocks' IQR is within 10% of their median
FAULTED_TIME_FACTOR = 4  # skip_faulted: the most time spent, faulted blocks included, in units of max_run_time


def measure(run, min_run_time, max_run_time, warmup=3, graph_calls=0):
    """Median seconds per call of run() and the torch.utils.benchmark Measurement of its blocks.

    Each block is Timer.timeit(number): `number` back-to-back calls between two device synchronisations
    (torch.cuda.synchronize on GPU), with `number` chosen so a block lasts about BLOCK_SECONDS (one call
    when a call is longer). Blocks are taken for at least min_run_time and MIN_BLOCKS, until their IQR is
    within SPREAD of their median or max_run_time has passed. (Timer's own autorange methods size blocks
    so that the timer costs under 0.01% of one, which on a GPU means blocks of 0.05-0.5 s and minutes per
    table.) warmup extra calls come first. Timer would default to one thread: pass ours.
    graph_calls > 0 (CUDA only): time replays of a CUDA graph holding that many calls, which removes the
    Python and launch overhead that can exceed a small kernel's time on a fast GPU.
    """
    return measure_interleaved({"run": run}, min_run_time, max_run_time, warmup, graph_calls)["run"]


def measure_interleaved(runs, min_run_time, max_run_time, warmup=3, graph_calls=0, skip_faulted=False):
    """measure() of several callables ({name: run}) at once: {name: (median seconds per call, Measurement)}.

    Their blocks are taken in turn (A B, then B A, ...) until every one of them meets measure()'s stopping
    rule, each with its own min_run_time and max_run_time. A slow phase of the machine (a VM losing memory
    bandwidth for a fraction of a second) then falls on the blocks of all of them alike, and the medians
    compare the implementations rather than the moments at which each was timed.
    skip_faulted (CPU): blocks during which the process took a page fault are left out, and do not count towards
    the run times, as long as MIN_BLOCKS others are taken within FAULTED_TIME_FACTOR * max_run_time: they time the
    kernel handing the allocator fresh pages (the heap grows while freed output blocks are split by small
    allocations), not the op. On the 2-vCPU Xeon guest such faults, at times 7 us per page, made a 19 ms
    backward read 170-280 ms for torch and fastbn alike in about one run of three.
    """
    timers, numbers, per_replay = {}, {}, {}
    for name, run in runs.items():
        for _ in range(warmup):
            run()
        per_replay[name] = 1
        if graph_calls:
            run, per_replay[name] = cuda_graph(run, graph_calls), graph_calls
        timers[name] = Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
        numbers[name] = _block_size(timers[name])
    blocks = {name: [] for name in runs}
    faulted = {name: [] for name in runs}
    timed = dict.fromkeys(runs, 0.0)  # seconds in the blocks kept
    spent = dict.fromkeys(runs, 0.0)  # and in the faulted ones too
    done = {}
    names = list(runs)
    while len(done) < len(names):
        for name in names:
            if name in done:
                continue
            faults_before = _page_faults() if skip_faulted else 0
            block = timers[name].timeit(numbers[name])
            clean = not skip_faulted or _page_faults() == faults_before
            (blocks if clean else faulted)[name].append(block)
            spent[name] += block.raw_times[0]
            timed[name] += block.raw_times[0] if clean else 0.0
            out_of_time = timed[name] >= max_run_time or spent[name] >= FAULTED_TIME_FACTOR * max_run_time
            if len(blocks[name]) < MIN_BLOCKS and not out_of_time:
                continue
            kept = blocks[name] if len(blocks[name]) >= MIN_BLOCKS else blocks[name] + faulted[name]
            m = Measurement.merge(kept)[0]
            if out_of_time or (timed[name] >= min_run_time and m.iqr <= SPREAD * m.median):
                done[name] = (m.median / per_replay[name], m)
        names.reverse()
    return done


def _page_faults():
    """Page faults the process has taken so far (minor and major; 0 where getrusage is unavailable)."""
    if resource is None:
        return 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def _block_size(timer):
    """Calls per block so that a block lasts about BLOCK_SECONDS, from a block of at least BLOCK_SECONDS / 10."""
    number = 1
    while True:
        seconds = timer.timeit(number).raw_times[0]
        if seconds >= BLOCK_SECONDS / 10 or number >= 10**6:
            return max(1, round(BLOCK_SECONDS * number / seconds))
        number *= 10


def cuda_graph(run, calls):
    """graph.replay of a CUDA graph capturing `calls` calls of run() (warmed up on a side stream first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            run()
    return graph.replay


def copy_bandwidth(device, cache_bytes, min_run_time):
    """Bytes per second of dst.copy_(src) on buffers larger than the cache, counting read + write.

    src and dst are each twice the cache's size, so no call finds the last one's data there. (Buffers of 8x
    the cache took 17 s to make and time where a VM's sysfs reports a 480 MB L3.)
    """
    nbytes = max(2 * cache_bytes, 256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds, _ = measure(lambda: dst.copy_(src), min_run_time, 4 * min_run_time)
    return 2 * nbytes / seconds


def geomean(values):
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    if not values:
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def markdown_table(headers, rows):
    """rows: lists of already formatted cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, spec, missing="—"):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def load_matplotlib():
    """matplotlib with the Agg backend (no display needed), or None with a warning when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install matplotlib, or the `bench` extra): no chart")
        return None
    return plt
