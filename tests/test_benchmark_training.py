"""scripts/benchmark_training.py runs end to end on tiny sizes, with both allocators, and evaluates every target of
its issue (nothing here depends on timing)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark_training.py"
MODELS = {"floor", "simple", "local", "conv", "full", "gpt2"}


def test_training_benchmark_reports_every_target(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--output", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["runs"]) == {"default", "tuned"}
    assert results["runs"]["default"]["glibc_keeps_freed_memory"] is False  # the allocator a user gets
    assert results["runs"]["tuned"]["glibc_keeps_freed_memory"] is (platform.libc_ver()[0] == "glibc")
    for run in results["runs"].values():
        assert set(run["long"]["models"]) == set(run["short"]["models"]) == MODELS
        assert set(run["longest"]["models"]) == {"floor", "simple", "conv", "gpt2"}
        for section in ("long", "short"):
            assert all(row["step_s"] > 0 and row["tokens_per_s"] > 0 for row in run[section]["models"].values())
        longest = run["longest"]["models"]
        assert longest["floor"]["peak_bytes"] > 0 and longest["simple"]["peak_bytes"] > 0
        assert run["operator"]["op_GBps"] > 0 and run["operator"]["copy_GBps"] > 0
    for targets in results["targets"].values():
        texts = " | ".join(t["target"] for t in targets)
        assert len(targets) == 12
        assert all(name in texts for name in ("floor", "GPT-2", "peak training memory", "copy bandwidth"))
        assert all(isinstance(t["met"], bool) for t in targets)  # every target evaluated, none left unmeasured
    shown = [line for line in result.stdout.splitlines() if line.startswith("  [")]
    assert len(shown) == 24 and all(line.split("]")[0].strip(" [") in ("MET", "NOT MET") for line in shown)
