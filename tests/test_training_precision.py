"""The scripts' --gradient_checkpointing (the same losses: the backward recomputes the same activations) and
--mixed_precision bf16 (autocast, on a CPU too: the losses of a float32 run within bf16's precision, not equal to
them). Tiny runs of run_clm.py's main() in this process."""

import json

import pytest
from conftest import import_scripts

pytest.importorskip("accelerate")
pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def scripts():
    yield from import_scripts(run_clm="run_clm")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("".join(f"def f{i}(x):  # {'abcdefgh'[i % 8] * (i % 5)}\n" for i in range(400)))
    return path


def losses(scripts, train_file, folder, *flags) -> list[float]:
    """A run from a fresh accelerate state: accelerate keeps one process-wide state, fixed by the first Accelerator
    (a script makes one per process; here runs share a process, and an earlier test's may have been bf16)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    scripts.run_clm.main([
        "--preset", "tiny", "--seed", "0", "--block_size", "32", "--train_file", str(train_file),
        "--max_train_samples", "32", "--max_eval_samples", "8", "--per_device_train_batch_size", "4",
        "--max_train_steps", "6", "--logging_steps", "1", "--output_dir", str(folder), *flags,
    ])  # fmt: skip
    AcceleratorState._reset_state(True)  # the next test's runs start from no state either
    history = json.loads((folder / "log_history.json").read_text())
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def float32_losses(scripts, train_file, tmp_path_factory):
    return losses(scripts, train_file, tmp_path_factory.mktemp("runs") / "float32")


def test_gradient_checkpointing_trains_with_the_same_losses(scripts, train_file, float32_losses, tmp_path):
    checkpointed = losses(scripts, train_file, tmp_path / "checkpointed", "--gradient_checkpointing")
    assert len(checkpointed) == len(float32_losses) == 6
    assert checkpointed == pytest.approx(float32_losses, rel=1e-5)


def test_bf16_mixed_precision_trains_within_its_precision(scripts, train_file, float32_losses, tmp_path):
    bf16 = losses(scripts, train_file, tmp_path / "bf16", "--mixed_precision", "bf16")
    assert len(bf16) == 6 and bf16 != float32_losses  # autocast ran
    assert bf16 == pytest.approx(float32_losses, rel=3e-2)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "float32"  # autocast computes in bf16; the weights stay float32
