"""benchmarks/benchmark_generation.py runs end to end on tiny sizes and reports every target."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "benchmark_generation.py"


def test_generation_benchmark_reports_every_target(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--no-compile", "--threads", "1", "--output", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["continuation"]) == {"simple", "local", "conv", "full"}
    for row in results["continuation"].values():
        assert row["continuation_s"] > 0 and row["prefill_s"] > 0
    assert set(results["constant_state"]) == {"simple", "local", "conv"}
    assert all(row["same_bytes"] for row in results["constant_state"].values())  # constant state, measured
    assert results["full_vs_gpt2"]["full_token_s"] > 0 and results["full_vs_gpt2"]["gpt2_token_s"] > 0
    texts = [t["target"] for t in results["targets"]]
    assert sum("continuation" in t or "new tokens" in t for t in texts) == 3
    assert sum("generate()" in t for t in texts) == 4 and any("GPT-2" in t for t in texts)
    assert all(line.startswith(("MET", "NOT MET")) for line in result.stdout.splitlines() if "  " in line[:9])
