"""benchmarks/benchmark_decoding.py runs end to end on tiny sizes and reports a target per AFT model and setting."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "benchmark_decoding.py"


def test_decoding_benchmark_reports_every_target(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--output", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    assert {(r["prompt"], r["batch"]) for r in runs} == {(8, 1), (8, 2), (64, 1), (64, 2)}
    for run in runs:
        names = set(run["token_s"])
        assert {"gpt2", "simple/torch", "local/torch", "conv/torch"} <= names
        assert all(s > 0 for s in run["token_s"].values())
        assert results["native"] != "built" or {"simple/native", "local/native", "conv/native"} <= names
    assert len(results["targets"]) == sum(len(r["token_s"]) - 1 for r in runs)
    assert all(isinstance(t["met"], bool) for t in results["targets"])
    assert all(line.startswith(("MET", "NOT MET")) for line in result.stdout.splitlines() if "  " in line[:9])
