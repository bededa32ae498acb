"""The emulator's controls: schedules, counters, limits, error reporting."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.simt

HERE = os.path.dirname(os.path.abspath(__file__))


def test_schedule_round_trip(simt):
    before = simt.schedule()
    try:
        for name in ["reverse", "shuffle:0", "shuffle:12345", "forward"]:
            simt.set_schedule(name)
            assert simt.schedule() == name
        simt.set_schedule("shuffle")
        assert simt.schedule() == "shuffle:0"
    finally:
        simt.set_schedule(before)


@pytest.mark.parametrize("bad", ["", "backwards", "shuffle:", "shuffle:x1", "Forward"])
def test_bad_schedule_is_refused(simt, bad):
    with pytest.raises(Exception, match="schedule|seed"):
        simt.set_schedule(bad)
    assert simt.schedule() == "forward"


def test_schedule_from_the_environment():
    # A fresh process reads FASTBN_SIMT_SCHEDULE at its first launch.
    script = textwrap.dedent(
        """
        import simt_build
        ops = simt_build.load_test_extension()
        print(ops.schedule())
        """
    )
    env = dict(os.environ, FASTBN_SIMT_SCHEDULE="shuffle:77", PYTHONPATH=HERE)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "shuffle:77"


def test_stats_count_the_emulated_work(simt):
    simt.reset_stats()
    simt.block_sums(torch.randn(1000, dtype=torch.float64), 3, 64, 1)
    launches, blocks, threads, switches = simt.stats()
    assert (launches, blocks, threads) == (1, 3, 192)
    # block_reduce: 2 barriers and 2 x 5 shuffles per thread, plus each thread's final switch out.
    assert switches >= 192 * 12


def test_errors_name_the_kernel_and_the_thread(simt):
    with pytest.raises(RuntimeError) as info:
        simt.divergent_barriers(64)
    message = str(info.value)
    assert "divergent_barriers_kernel" in message
    assert "block (0,0,0)" in message and "thread (32,0,0)" in message


def test_invalid_launch_configuration(simt):
    with pytest.raises(RuntimeError, match="more than 1024 threads"):
        simt.block_stats(torch.randn(10), 2048)
