"""benchmarks/bench_ops.py and bench_model.py run end to end on tiny cases and write the JSON and markdown they
promise, with fastbn's outputs checked against torch's. Timings are not asserted: speed lives in the benchmarks'
own tables."""
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_ops  # noqa: E402
import common  # noqa: E402


def test_bench_ops_writes_checked_rows(tmp_path):
    markdown = tmp_path / "table.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ops.py"), "--device", "cpu",
                    "--shapes", "4x8x6x6", "--compile", "none", "--min-time", "0.001", "--max-time", "0.1", "--no-plot",
                    "--out-dir", str(tmp_path), "--markdown", str(markdown)],
                   check=True, capture_output=True, cwd=ROOT)
    rows = json.loads((tmp_path / "ops-cpu.json").read_text())["rows"]
    assert {(row["op"], row["format"]) for row in rows} == {
        (op, fmt) for op in ("fwd_train", "fwd_eval", "bwd", "bn_relu", "bn_add_relu")
        for fmt in ("NCHW", "channels_last")}
    for row in rows:
        assert "error" not in row, row
        assert row["check_ok"], row
        assert row["torch_s"] > 0 and row["fastbn_s"] > 0 and row["fastbn_samples"] >= 5
    assert "| op | shape |" in markdown.read_text()


def test_bench_ops_warm_cache_reuses_one_input_set(tmp_path):
    markdown = tmp_path / "table.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ops.py"), "--device", "cpu", "--warm-cache",
                    "--shapes", "4x8x6x6", "--ops", "fwd_eval,bwd", "--formats", "NCHW", "--compile", "none",
                    "--min-time", "0.001", "--max-time", "0.1", "--no-plot", "--out-dir", str(tmp_path),
                    "--markdown", str(markdown)],
                   check=True, capture_output=True, cwd=ROOT)
    rows = json.loads((tmp_path / "ops-cpu-warm.json").read_text())["rows"]
    assert [(row["op"], row["copies"], row["check_ok"]) for row in rows] == [("fwd_eval", 1, True), ("bwd", 1, True)]
    assert "--warm-cache" in markdown.read_text()


def test_unsettled_case_is_timed_again_and_the_steadier_timing_kept(monkeypatch):
    timings = iter([{"torch": (6e-3, 1e-4), "fastbn": (86e-3, 43e-3)},   # one side stalled throughout
                    {"torch": (6e-3, 1e-4), "fastbn": (2.5e-3, 1e-4)}])
    calls = []

    def fake_measure(runs, args_, row, device):
        calls.append(row)
        for name, (seconds, iqr) in next(timings).items():
            row[name + "_s"], row[name + "_iqr_s"], row[name + "_samples"] = seconds, iqr, 5

    monkeypatch.setattr(bench_ops, "measure_together", fake_measure)
    row = {}
    bench_ops.time_case({"torch": None, "fastbn": None}, None, row, torch.device("cpu"))
    assert len(calls) == 2 and row["retimed"]
    assert row["fastbn_s"] == 2.5e-3 and row["fastbn_iqr_s"] == 1e-4


def test_settled_case_is_timed_once(monkeypatch):
    calls = []

    def fake_measure(runs, args_, row, device):
        calls.append(row)
        row.update(torch_s=6e-3, torch_iqr_s=3e-4, fastbn_s=3e-3, fastbn_iqr_s=6e-4)

    monkeypatch.setattr(bench_ops, "measure_together", fake_measure)
    row = {}
    bench_ops.time_case({"torch": None, "fastbn": None}, None, row, torch.device("cpu"))
    assert len(calls) == 1 and "retimed" not in row


def test_blocks_that_page_faulted_are_left_out(monkeypatch):
    """The first calls fault (a growing heap) and are slow; the median comes from the calls after them."""
    faults = [0]
    calls = [0]

    def run():
        calls[0] += 1
        if calls[0] <= 6:
            faults[0] += 1
            time.sleep(0.05)
        else:
            time.sleep(0.001)

    monkeypatch.setattr(common, "_page_faults", lambda: faults[0])
    seconds, _ = common.measure_interleaved({"run": run}, 0.01, 0.05, warmup=0, skip_faulted=True)["run"]
    assert seconds < 0.02  # the faulted blocks' 50 ms calls are not in the median


def test_bench_model_times_every_variant_with_matching_losses(tmp_path):
    markdown = tmp_path / "model.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--device", "cpu", "--quick",
                    "--min-time", "0.05", "--max-time", "0.5", "--out-dir", str(tmp_path), "--markdown", str(markdown)],
                   check=True, capture_output=True, cwd=ROOT)
    rows = json.loads((tmp_path / "model-cpu.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == ["torch", "fastbn", "fastbn-fused"]
    for row in rows:
        assert "error" not in row, row
        assert row["step_s"] > 0 and row["saved_bytes"] > 0
        assert abs(row["loss"] - rows[0]["loss"]) < 1e-3
    assert "| variant | mode |" in markdown.read_text()


def test_results_files_do_not_mark_the_revision_dirty(tmp_path):
    """Tables record the commit measured; a results file rewritten by an earlier run leaves it clean."""
    import common

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "fastbn").mkdir()
    (tmp_path / "fastbn" / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "cpu.md").write_text("old\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "c")
    clean = common.git_revision(tmp_path / "fastbn")
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "benchmarks" / "results" / "cpu.md").write_text("new\n")
    assert common.git_revision(tmp_path / "fastbn") == clean
    (tmp_path / "fastbn" / "code.py").write_text("x = 2\n")
    assert common.git_revision(tmp_path / "fastbn") == clean + "-dirty"
