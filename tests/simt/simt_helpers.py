"""Running an emulated kernel under the emulator's schedules, and checking it gives the same bits."""
import contextlib

import torch

# Orders the emulator can start threads in (see csrc/simt/runtime.h). Two shuffles with different
# seeds besides the two fixed orders: a race that one order hides, another shows.
SCHEDULES = ["forward", "reverse", "shuffle:1", "shuffle:2"]


@contextlib.contextmanager
def schedule(ops, name):
    previous = ops.schedule()
    ops.set_schedule(name)
    try:
        yield
    finally:
        ops.set_schedule(previous)


def run_under_schedules(ops, fn, schedules=SCHEDULES):
    """fn() under each schedule: {schedule: result}."""
    results = {}
    for name in schedules:
        with schedule(ops, name):
            results[name] = fn()
    return results


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for r in result for t in _flat(r)]


def assert_schedule_invariant(ops, fn, schedules=SCHEDULES):
    """Runs fn() under every schedule and checks that all results are bitwise equal: what a kernel with
    all its barriers gives. Returns the (common) result."""
    results = run_under_schedules(ops, fn, schedules)
    first_name = schedules[0]
    first = _flat(results[first_name])
    for name in schedules[1:]:
        for a, b in zip(first, _flat(results[name])):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(-1).view(torch.uint8) if a.is_floating_point() else a,
                               b.view(-1).view(torch.uint8) if b.is_floating_point() else b), (
                f"results differ between schedules {first_name} and {name}: the kernel races"
            )
    return results[first_name]
