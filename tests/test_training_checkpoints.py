"""Checkpoints under faults: a resumed run logs exactly what the uninterrupted run logs at odd logging,
checkpointing and accumulation intervals; a corrupt newest checkpoint, a run killed while saving, a full disk
and a read-only folder never lose a good checkpoint; a resume with other settings is refused.

The runs are run_clm.py's main() in this process (tiny model, a small local text file, a few steps); the kill
is a real SIGKILL of a script process in the middle of a save.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import import_scripts, tiny_clm_argv, write_code_text

pytest.importorskip("accelerate")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


@pytest.fixture(scope="module")
def scripts():
    yield from import_scripts(run_clm="run_clm", args="training_args", checkpoints="training_checkpoints")


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    return write_code_text(tmp_path_factory.mktemp("text"))


base_args = tiny_clm_argv


def history(folder: Path) -> list:
    return json.loads((folder / "log_history.json").read_text())


def final_loss(folder: Path) -> dict:
    results = json.loads((folder / "all_results.json").read_text())
    return {k: results[k] for k in ("train_loss", "eval_loss", "train_steps")}


# Flag sets; steps per epoch are 8 / --gradient_accumulation_steps, rounded up.
FLAGS = {
    "log4-ckpt3": {"logging_steps": 4, "checkpointing_steps": 3, "max_train_steps": 10},
    "log3-epoch-acc3": {
        "logging_steps": 3,
        "checkpointing_steps": "epoch",
        "gradient_accumulation_steps": 3,
        "max_train_steps": 7,
        "eval_steps": 2,
    },
    "log5-ckpt4-acc2": {
        "logging_steps": 5,
        "checkpointing_steps": 4,
        "gradient_accumulation_steps": 2,
        "max_train_steps": 10,
    },
}
CHECKPOINTS = {
    "log4-ckpt3": ["step_3", "step_6", "step_9"],
    "log3-epoch-acc3": ["epoch_0", "epoch_1"],  # 3 steps per epoch; the run stops inside epoch 2
    "log5-ckpt4-acc2": ["step_4", "step_8"],  # epochs end at steps 4 and 8: no epoch_0 / epoch_1 copies
}


@pytest.fixture(scope="module")
def uninterrupted(scripts, text_files, tmp_path_factory):
    """One uninterrupted run per flag set, with its checkpoints."""
    runs = {}
    for name, flags in FLAGS.items():
        out = tmp_path_factory.mktemp("runs") / name
        scripts.run_clm.main([*base_args(text_files, **flags), "--output_dir", str(out)])
        runs[name] = out
    return runs


@pytest.mark.parametrize("name", FLAGS)
def test_resumed_runs_log_what_the_uninterrupted_run_logs(scripts, text_files, uninterrupted, name, tmp_path):
    folder = uninterrupted[name]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == sorted(CHECKPOINTS[name])
    for checkpoint in CHECKPOINTS[name]:
        out = tmp_path / checkpoint
        resume = ["--resume_from_checkpoint", str(folder / "checkpoints" / checkpoint), "--output_dir", str(out)]
        scripts.run_clm.main([*base_args(text_files, **FLAGS[name]), *resume])
        assert history(out) == history(folder), checkpoint  # every train loss, learning rate and evaluation
        assert final_loss(out) == final_loss(folder)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    scripts, text_files, uninterrupted, tmp_path, caplog
):
    flags = FLAGS["log4-ckpt3"]
    out = tmp_path / "run"
    shutil.copytree(uninterrupted["log4-ckpt3"] / "checkpoints", out / "checkpoints")
    weights = out / "checkpoints" / "step_9" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    # named: one line at start-up that names the file
    with pytest.raises(scripts.args.InputError) as error:
        scripts.run_clm.parse_args([*base_args(text_files, **flags), "--resume_from_checkpoint",
                                    str(out / "checkpoints" / "step_9"), "--output_dir", str(out)])  # fmt: skip
    assert str(error.value).count("\n") == 0 and str(weights) in str(error.value)
    assert "is damaged" in str(error.value) and "1,000 bytes" in str(error.value)
    # latest: a warning, then the run continues from step_6 exactly
    caplog.set_level("WARNING")
    scripts.run_clm.main(
        [*base_args(text_files, **flags), "--resume_from_checkpoint", "latest", "--output_dir", str(out)]
    )
    assert any("step_9" in r.getMessage() and "previous good checkpoint" in r.getMessage() for r in caplog.records)
    assert history(out) == history(uninterrupted["log4-ckpt3"])
    # a changed byte of the same size is found too
    optimizer = out / "checkpoints" / "step_6" / "optimizer.bin"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    with pytest.raises(scripts.args.InputError, match="content of .*optimizer.bin is not what was written"):
        scripts.checkpoints.find_checkpoint(Namespace(resume_from_checkpoint=str(optimizer.parent), output_dir=out))


@pytest.mark.parametrize("content", [b"\xff\xfe", b'{"plan": 5, "files": "x"}'], ids=["undecodable", "wrong types"])
def test_a_damaged_run_state_of_this_run_is_a_warning_not_an_earlier_run(
    scripts, uninterrupted, tmp_path, caplog, content
):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted["log4-ckpt3"], out)  # with its lock: the run id its checkpoints carry
    assert (out / scripts.args.LOCK).is_file()
    (out / "checkpoints" / "step_9" / "run_state.json").write_bytes(content)
    caplog.set_level("WARNING")
    found = scripts.checkpoints.find_checkpoint(Namespace(resume_from_checkpoint="latest", output_dir=str(out)))
    assert found.name == "step_6"
    assert any("step_9" in r.getMessage() and "previous good checkpoint" in r.getMessage() for r in caplog.records)


KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import training_checkpoints
real_manifest = training_checkpoints.file_manifest

def manifest_then_die(folder):
    if folder.name == ".tmp-step_6":  # accelerate has written the state: die before run_state.json and the rename
        os.kill(os.getpid(), signal.SIGKILL)
    return real_manifest(folder)

training_checkpoints.file_manifest = manifest_then_die
import run_clm
run_clm.main(sys.argv[2:])
"""


def test_a_run_killed_while_saving_resumes_from_the_last_good_checkpoint(scripts, text_files, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    package_root = tmp_path / "pkg"
    package_root.mkdir()
    (package_root / "aft").symlink_to(REPO, target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=str(package_root), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    argv = [*base_args(text_files, **FLAGS["log4-ckpt3"]), "--output_dir", str(out)]
    result = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, str(SCRIPTS), *argv], env=env, capture_output=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left == [".tmp-step_6", "step_3"] and (out / "checkpoints" / ".tmp-step_6" / "model.safetensors").exists()
    resume = [*base_args(text_files, **FLAGS["log4-ckpt3"]), "--resume_from_checkpoint", "latest"]
    scripts.run_clm.main([*resume, "--output_dir", str(out)])
    assert history(out) == history(uninterrupted["log4-ckpt3"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6", "step_9"]


@pytest.fixture(params=["tmpfs", "patched write"])
def full_disk(request, tmp_path, monkeypatch):
    """A folder whose disk fills up at the second checkpoint: a 3 MiB tmpfs (where this process may mount one), or
    torch.save failing with ENOSPC after writing part of its file. Yields (folder, a function that makes room)."""
    folder = tmp_path / "full"
    folder.mkdir()
    if request.param == "tmpfs":
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True)
        if mount.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        yield folder, lambda: None  # the resumed run writes elsewhere
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a failed write may hold a file open
        return
    import torch

    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        if "step_6" in str(f):
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    yield folder, monkeypatch.undo


def test_a_full_disk_keeps_the_last_good_checkpoint(scripts, text_files, uninterrupted, full_disk, tmp_path):
    flags = FLAGS["log4-ckpt3"]
    folder, make_room = full_disk
    out = folder / "run"
    with pytest.raises(scripts.args.RunError) as error:
        scripts.run_clm.main([*base_args(text_files, **flags), "--output_dir", str(out)])
    message = str(error.value)
    assert "could not write checkpoint" in message and "step_6" in message and message.count("\n") == 0
    assert f"the newest complete checkpoint is {out / 'checkpoints' / 'step_3'}" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3"]  # the partial copy is gone
    checkpoint = scripts.checkpoints.find_checkpoint(Namespace(resume_from_checkpoint="latest", output_dir=out))
    assert checkpoint.name == "step_3"  # intact: every file has its recorded size and digest
    make_room()
    resumed = tmp_path / "resumed"  # once there is room, the run continues exactly
    scripts.run_clm.main([*base_args(text_files, **flags), "--resume_from_checkpoint", str(checkpoint),
                          "--output_dir", str(resumed)])  # fmt: skip
    assert history(resumed) == history(uninterrupted["log4-ckpt3"])


def test_resuming_with_other_settings_is_refused(scripts, text_files, uninterrupted, tmp_path):
    checkpoint = uninterrupted["log4-ckpt3"] / "checkpoints" / "step_6"
    flags = FLAGS["log4-ckpt3"]

    def refusal(**changes):
        args = base_args(text_files, **{**flags, **changes})
        with pytest.raises(scripts.args.InputError) as error:
            scripts.run_clm.main([*args, "--resume_from_checkpoint", str(checkpoint), "--output_dir", str(tmp_path)])
        assert not (tmp_path / "model.safetensors").exists()
        return str(error.value)

    assert "--per_device_train_batch_size: checkpoint 4, this run 2" in refusal(per_device_train_batch_size=2)
    assert "--gradient_accumulation_steps: checkpoint 1, this run 2" in refusal(gradient_accumulation_steps=2)
    assert "--max_train_steps: checkpoint 10, this run 20" in refusal(max_train_steps=20)
    # another number of processes: the checkpoint of a 2-process run, resumed by one process
    two = tmp_path / "two-processes"
    shutil.copytree(checkpoint, two)
    state = json.loads((two / "run_state.json").read_text())
    state["plan"]["num_processes"] = 2
    (two / "run_state.json").write_text(json.dumps(state))
    checkpoint = two
    message = refusal()
    assert "the number of processes: checkpoint 2, this run 1" in message and "--model_name_or_path" in message
    # what may change: logging, evaluation and checkpoint intervals
    out = tmp_path / "other-intervals"
    resume = ["--resume_from_checkpoint", str(uninterrupted["log4-ckpt3"] / "checkpoints" / "step_6")]
    scripts.run_clm.main([*base_args(text_files, **{**flags, "logging_steps": 2, "checkpointing_steps": 5}),
                          *resume, "--output_dir", str(out)])  # fmt: skip
    assert final_loss(out)["eval_loss"] == final_loss(uninterrupted["log4-ckpt3"])["eval_loss"]


def test_latest_skips_unfinished_saves_and_finds_a_swapped_one(scripts, tmp_path):
    """`latest` ignores a save killed before its rename (.tmp-) and folders without run_state.json; a run killed
    between the two renames of a re-save leaves its complete copy as .old-NAME, which counts."""
    root = tmp_path / "checkpoints"
    for name, steps in (("step_5", 5), (".old-step_10", 10)):
        (root / name).mkdir(parents=True)
        (root / name / "run_state.json").write_text(json.dumps({"completed_steps": steps, "files": {}}))
    (root / ".tmp-step_15").mkdir()
    (root / ".tmp-step_15" / "model.safetensors").write_bytes(b"partial")
    (root / "step_20").mkdir()  # no run_state.json: not complete
    args = Namespace(output_dir=str(tmp_path), resume_from_checkpoint="latest")
    assert scripts.checkpoints.find_checkpoint(args) == root / ".old-step_10"
    (root / "step_10").mkdir()  # the rename finished: the .old- copy is the stale one
    (root / "step_10" / "run_state.json").write_text(json.dumps({"completed_steps": 10, "files": {}}))
    assert scripts.checkpoints.find_checkpoint(args) == root / "step_10"
