"""benchmarks/bench_ops.py runs end to end on a tiny case and writes the JSON and markdown it promises, with
fastbn's outputs checked against torch's. Timings are not asserted: speed lives in the benchmark's own table."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
