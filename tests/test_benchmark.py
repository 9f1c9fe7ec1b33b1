"""benchmarks/benchmark.py end to end on a tiny model, and the harness every benchmark and study of the lab measures
with (nothing here depends on timing)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import import_lab

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "benchmark.py"


@pytest.fixture(scope="module")
def lab():
    yield from import_lab(harness="harness", benchmark="benchmark")


def test_benchmark_writes_every_figure_and_target(tmp_path):
    """Every model has its training and inference rows, the operator its bandwidth next to the copy, every
    target a line (met, not met or n/a), the plots exist; the memory setting it applies is recorded."""
    out = tmp_path / "bench"
    cmd = [
        sys.executable, str(SCRIPT), "--models", "simple", "full", "gpt2", "--hidden", "32", "--layers", "1",
        "--gpt2-heads", "2", "--conv-heads", "2", "--train-lengths", "64", "128", "--context-lengths", "32", "64",
        "--decode-tokens", "2", "--reps", "1", "--threads", "1", "--output", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for name in ("simple", "full", "gpt2"):
        assert [r["T"] for r in results["training"][name]] == [64, 128]
        assert all(r["step_s"] > 0 and r["peak_bytes"] > 0 for r in results["training"][name])
        assert all(r["decode_token_s"] > 0 and r["cache_bytes"] > 0 for r in results["inference"][name])
    assert results["inference"]["simple"][0]["cache_bytes"] == results["inference"]["simple"][1]["cache_bytes"]
    assert results["inference"]["gpt2"][0]["cache_bytes"] < results["inference"]["gpt2"][1]["cache_bytes"]
    assert results["operator"]["elements"] == 2**24 and results["operator"]["fraction_of_copy"] > 0
    assert len(results["targets"]) == 21 and {t["met"] for t in results["targets"]} <= {True, False, None}
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert results["machine"]["glibc_keeps_freed_memory"] is glibc
    assert sorted(p.name for p in out.glob("*.png")) == sorted(results["plots"]) and len(results["plots"]) == 6


def test_importing_the_lab_changes_nothing(tmp_path):
    """Importing a benchmark or a study sets no allocator and registers no operator: main() does, explicitly."""
    code = f"""
import sys
sys.path[:0] = [{str(SCRIPT.parent)!r}, {str(SCRIPT.parent.parent / "scripts")!r}]
import allocator
calls = []
allocator.keep_freed_memory = lambda: calls.append("keep_freed_memory")
import benchmark, benchmark_training, benchmark_generation, benchmark_vision, study, conversion_study
from aft.ops_aft import _OPERATORS
assert not calls, "importing the lab changed the allocator"
assert ("simple", "floor") not in _OPERATORS, "importing benchmark_training registered its operator"
print("ok")
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"


def test_in_turn_calls_each_function_once_per_round(lab):
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    samples = lab.harness.in_turn(fns, 3, warm_up=2, cold=("b",), once=("c",))
    # two warm-up rounds of a alone (b is cold, c runs once), then three timed rounds, c in the first only
    assert calls == ["a", "a", "a", "b", "c", "a", "b", "a", "b"]
    assert {name: len(s) for name, s in samples.items()} == {"a": 3, "b": 3, "c": 1}
    per_step = lab.harness.in_turn({"x": lambda: [0.5, 0.25]}, 2, warm_up=0)
    assert per_step == {"x": [0.5, 0.25, 0.5, 0.25]}  # a function that returns its steps' seconds
    assert lab.harness.medians(per_step) == {"x": 0.375}


def test_peak_bytes_counts_what_a_call_allocates(lab):
    keep = torch.zeros(1 << 20)  # allocated before: not counted

    def fn():
        a = torch.ones(1 << 22)  # 16 MiB, freed when fn returns
        b = torch.ones(1 << 21)  # 8 MiB while a is alive
        return (a.sum() + b.sum()).item()

    peak = lab.harness.peak_bytes(fn, torch.device("cpu"))
    assert 24 * 2**20 <= peak < 25 * 2**20
    assert keep.numel()


def test_write_json_replaces_whole_or_not_at_all(lab, tmp_path):
    path = tmp_path / "results.json"
    lab.harness.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        lab.harness.write_json(path, {"a": object()})  # not JSON: the file keeps its last whole content
    assert json.loads(path.read_text()) == {"a": 1}


def test_the_compared_models_share_their_size(lab):
    size = {"hidden": 32, "layers": 2, "heads": 2, "vocab": 50, "positions": 64}
    gpt2 = lab.harness.causal_lm("gpt2", **size)
    local = lab.harness.causal_lm("aft-local", window=4, bias_rank=4, **size)
    assert local.config.aft_variant == "local" and local.config.local_window_size == 4
    assert gpt2.config.n_embd == local.config.hidden_size == 32 and gpt2.config.n_inner == 4 * 32
    assert gpt2.config.activation_function == "gelu" and local.config.intermediate_size == 4 * 32
    assert lab.benchmark.build_model("simple", _benchmark_args(), 64).config.aft_variant == "simple"


def _benchmark_args():
    from argparse import Namespace

    return Namespace(hidden=32, layers=1, gpt2_heads=2, vocab=50, local_window=4, conv_kernel=3, conv_heads=2)


def test_markdown_table(lab):
    table = lab.harness.markdown_table(
        ["model", "s"], [["gpt2", lab.harness.fmt(0.123)], ["x", lab.harness.fmt(None)]]
    )
    assert table.splitlines() == ["| model | s |", "|---|---|", "| gpt2 | 0.12 |", "| x | - |"]
