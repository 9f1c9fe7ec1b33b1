"""A run's identity and its folder: a resume compares what the run recorded when it started (its data files by
content, --block_size, the model config as built, before a forward pass set `problem_type`); `latest` never
resumes a checkpoint of the run an --overwrite_output_dir run replaced; a folder being written by a live run is
refused with one line naming it, and the lock of a killed run is taken over.

The runs are the scripts' main() in this process (tiny models, a few steps); the other run holding a lock is a
real process.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import import_scripts, tiny_clm_argv, write_code_text

pytest.importorskip("accelerate")
pytest.importorskip("datasets")

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def scripts():
    yield from import_scripts(
        run_clm="run_clm",
        classification="run_image_classification",
        args="training_args",
        checkpoints="training_checkpoints",
    )


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    return write_code_text(tmp_path_factory.mktemp("text"))


def clm_args(text_files, **flags):
    return tiny_clm_argv(text_files, **{"max_train_steps": 6, "checkpointing_steps": 3, **flags})


@pytest.fixture(scope="module")
def clm_run(scripts, text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "clm"
    scripts.run_clm.main([*clm_args(text_files), "--output_dir", str(out)])
    return out


def test_resume_with_another_block_size_or_train_file_is_refused(scripts, text_files, clm_run, tmp_path):
    checkpoint = clm_run / "checkpoints" / "step_3"

    def refusal(files=text_files, **changes):
        args = [*clm_args(files, **changes), "--resume_from_checkpoint", str(checkpoint)]
        with pytest.raises(scripts.args.InputError) as error:
            scripts.run_clm.main([*args, "--output_dir", str(tmp_path / "resumed")])
        assert not (tmp_path / "resumed" / "model.safetensors").exists()
        return str(error.value)

    # the same number of blocks and batches either way: only the recorded block size tells them apart
    assert "--block_size: checkpoint 32, this run 16" in refusal(block_size=16)
    other = tmp_path / "other-text"
    shutil.copytree(text_files, other)
    lines = (other / "train.txt").read_text().splitlines()
    (other / "train.txt").write_text("\n".join(reversed(lines)) + "\n")  # the same size, other content
    message = refusal(files=other)
    assert f"--train_file: checkpoint {text_files / 'train.txt'} (SHA-256" in message
    assert f"this run {other / 'train.txt'} (SHA-256" in message and "--validation_file" not in message


def test_latest_never_resumes_the_checkpoints_of_a_replaced_run(scripts, text_files, clm_run, tmp_path):
    out = tmp_path / "reused"
    shutil.copytree(clm_run, out)  # run A: step_3 and step_6
    # run B into the same folder, with the same plan; it checkpoints at step 4 only (as if killed after it)
    scripts.run_clm.main([*clm_args(text_files, checkpointing_steps=4), "--output_dir", str(out),
                          "--overwrite_output_dir"])  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_4", "step_6"]
    latest = Namespace(output_dir=str(out), resume_from_checkpoint="latest")
    assert scripts.checkpoints.find_checkpoint(latest) == out / "checkpoints" / "step_4"  # not A's newer step_6
    shutil.rmtree(out / "checkpoints" / "step_4")
    with pytest.raises(scripts.args.InputError, match="step_3, step_6 belong to an earlier run"):
        scripts.checkpoints.find_checkpoint(latest)
    # a checkpoint of run A named explicitly continues run A: then `latest` follows run A again
    scripts.run_clm.main([*clm_args(text_files), "--output_dir", str(out),
                          "--resume_from_checkpoint", str(out / "checkpoints" / "step_3")])  # fmt: skip
    assert scripts.checkpoints.find_checkpoint(latest) == out / "checkpoints" / "step_6"


HOLD_LOCK = """
import sys
sys.path.insert(0, {scripts!r})
import training_checkpoints
training_checkpoints.claim_output_dir({folder!r})
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_folder_being_written_is_refused_naming_the_run_and_a_dead_runs_lock_is_taken_over(
    scripts, text_files, tmp_path, capsys, caplog
):
    out = tmp_path / "shared"
    code = textwrap.dedent(HOLD_LOCK.format(scripts=str(SCRIPTS), folder=str(out)))
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "locked\n"
        for flags in ([], ["--overwrite_output_dir"], ["--resume_from_checkpoint", "latest"]):
            argv = [*clm_args(text_files), "--output_dir", str(out), *flags]
            with pytest.raises(SystemExit) as exit_code:
                scripts.args.run_main(lambda argv=argv: scripts.run_clm.main(argv))
            assert exit_code.value.code == 2
            stderr = capsys.readouterr().err
            assert stderr.count("\n") == 1 and f"is being written by another run (pid {other.pid} on " in stderr
        assert not (out / "model.safetensors").exists()
    finally:
        other.kill()  # a killed run: its lock file stays, naming it
        other.wait()
    assert json.loads((out / ".run.lock").read_text())["pid"] == other.pid
    scripts.run_clm.main([*clm_args(text_files, max_train_steps=2), "--output_dir", str(out)])
    assert f"taking over the lock {out / '.run.lock'} of a run that is gone (pid {other.pid}" in caplog.text
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / ".run.lock").read_text())["pid"] == os.getpid()


def test_image_classification_resumes_from_its_own_checkpoint(scripts, tmp_path):
    """The first forward pass sets config.problem_type; the checkpoint records the config as the run built it."""
    pytest.importorskip("sklearn")
    flags = ["--preset", "tiny", "--seed", "0", "--max_train_steps", "2", "--per_device_train_batch_size", "8",
             "--max_train_samples", "32", "--max_eval_samples", "16", "--checkpointing_steps", "1"]  # fmt: skip
    scripts.classification.main([*flags, "--output_dir", str(tmp_path / "whole")])
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_1"
    scripts.classification.main([*flags, "--output_dir", str(tmp_path / "resumed"),
                                 "--resume_from_checkpoint", str(checkpoint)])  # fmt: skip
    results = [json.loads((tmp_path / run / "all_results.json").read_text()) for run in ("whole", "resumed")]
    assert results[1]["eval_loss"] == results[0]["eval_loss"] and results[1]["train_steps"] == 2
