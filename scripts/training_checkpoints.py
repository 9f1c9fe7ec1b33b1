"""Resumable checkpoints. OUTPUT_DIR/checkpoints/NAME holds accelerate's state (model, optimizer, scheduler,
sampler, RNG), the model config, and `run_state.json`: the progress, the log so far, the losses of the logging
window not yet logged, the settings the run's losses depend on, and the size and SHA-256 of every other file.
`run_state.json` is written last and the folder is renamed into place only when complete.

A run's identity (`run_id`, the plan, the data and the model config) is recorded when it starts, before any
forward pass: a resumed run must match it. OUTPUT_DIR/.run.lock is held (flock) by the run writing the folder and
names it (pid, host, start, run_id): a second run into the folder is refused, a lock left by a killed run is taken
over, and `latest` resumes only checkpoints of the run the lock names (an --overwrite_output_dir run fences off
the checkpoints of the run before it).

    save_checkpoint(accelerator, args.output_dir, "step_100", run_state, model_config)
    claim_output_dir(args.output_dir, run_plan.checkpoint)   # at start-up: lock the folder, record this run's id
    path = find_checkpoint(args)                      # --resume_from_checkpoint PATH | latest, verified
    run_state = load_checkpoint(accelerator, path, model_config, plan)
"""

import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

from training_args import LOCK, InputError, RunError

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
RUN_STATE = "run_state.json"
# Model config fields that say nothing about the architecture or that transformers sets itself.
CONFIG_IGNORED = {"transformers_version", "architectures", "auto_map", "dtype"}


@dataclasses.dataclass
class RunState:
    """What a checkpoint stores besides accelerate's state: progress, the log so far, the train losses of the
    current logging window and their terms (logged at the next multiple of --logging_steps), and the run's plan
    (the settings its losses depend on; a resumed run must have the same)."""

    completed_steps: int = 0
    log_history: list = dataclasses.field(default_factory=list)
    window_losses: list = dataclasses.field(default_factory=list)
    window_terms: list = dataclasses.field(default_factory=list)  # per step: {name: term} of a combined loss
    plan: dict = dataclasses.field(default_factory=dict)
    run_id: str = ""
    model_config: dict = dataclasses.field(default_factory=dict)  # as the run built it, before any forward pass
    started: float = dataclasses.field(default_factory=time.time)
    elapsed_before: float = 0.0

    def train_runtime(self) -> float:
        return self.elapsed_before + time.time() - self.started


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(folder: Path) -> dict:
    """{relative path: {"bytes": size, "sha256": digest}} of every file under `folder` but run_state.json."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != RUN_STATE)
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}


def model_identity(model_config) -> dict:
    """The config fields a resumed run must share, as the run built them (recorded before a forward pass sets
    e.g. `problem_type`), in their JSON form (as run_state.json holds them: id2label keys are strings)."""
    return json.loads(json.dumps({k: v for k, v in model_config.to_diff_dict().items() if k not in CONFIG_IGNORED}))


def folder_digest(folder: Path) -> str:
    """SHA-256 over the relative paths and contents of every file under `folder`."""
    digest = hashlib.sha256()
    for name, entry in file_manifest(folder).items():
        digest.update(f"{name}\0{entry['sha256']}\0".encode())
    return digest.hexdigest()


# The data settings a resumed run must share (with the content of the data files and folders below).
DATA_ARGS = (
    "dataset_name",
    "dataset_config_name",
    "text_column",
    "image_column",
    "label_column",
    "validation_split_percentage",
    "max_train_samples",
    "block_size",
    "image_size",
    "tokenizer_name",
    "train_tokenizer",
    "tokenizer_vocab_size",
)
DATA_PATHS = ("train_file", "validation_file", "enwik8_file", "train_dir", "validation_dir")


def data_identity(args) -> dict:
    """{argument: value} of the data a run reads: DATA_ARGS as given, and each data file or folder as
    {"path": ..., "sha256": content digest}, so that a resume with other data is refused even under the same
    name."""
    identity = {name: getattr(args, name) for name in DATA_ARGS if hasattr(args, name)}
    for name in DATA_PATHS:
        value = getattr(args, name, None)
        if value:
            path = Path(value)
            digest = folder_digest(path) if path.is_dir() else sha256(path) if path.is_file() else None
            identity[name] = {"path": str(value), "sha256": digest}
    return identity


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell a reused pid from the run."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def read_lock(output_dir) -> dict:
    """What OUTPUT_DIR/.run.lock says of the run that last wrote the folder ({} when none or unreadable)."""
    try:
        holder = json.loads((Path(output_dir) / LOCK).read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_run(holder: dict) -> str:
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}, "
        f"command: {holder.get('command', '?')}"
    )


_held_locks = {}  # resolved output folder -> open file descriptor holding its flock (released when the process ends)


def check_output_lock(output_dir):
    """InputError naming the run that holds OUTPUT_DIR/.run.lock now (another live process); nothing is taken."""
    path = Path(output_dir) / LOCK
    if Path(output_dir).resolve() in _held_locks or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(
            f"--output_dir {output_dir} is being written by another run ({describe_run(read_lock(output_dir))}): "
            "wait for it to finish or choose another folder."
        ) from None
    finally:
        os.close(fd)  # closing drops the probe's lock


def claim_output_dir(output_dir, checkpoint: Path | None = None) -> str:
    """Lock OUTPUT_DIR for this process (an flock the kernel drops when the process ends, so a killed run's lock
    is stale by itself) and record this run in OUTPUT_DIR/.run.lock: pid, host, start and run_id (the
    checkpoint's when resuming one, else a new one, which fences off the checkpoints of earlier runs from
    `latest`). Returns the run_id. InputError naming the holder when another live run writes the folder."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = _held_locks.get(folder.resolve())
    if fd is None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            check_output_lock(output_dir)  # names the holder
            raise InputError(f"--output_dir {output_dir} is being written by another run.") from None
        previous = read_lock(folder)
        if previous.get("pid") not in (None, os.getpid()):
            logger.warning(f"taking over the lock {path} of a run that is gone ({describe_run(previous)})")
        _held_locks[folder.resolve()] = fd
    # a resumed run goes on as the checkpoint's run (a checkpoint of aft 0.1 has no run_id: a new one)
    run_id = (checkpoint_run_id(Path(checkpoint)) if checkpoint is not None else None) or uuid.uuid4().hex
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": process_start(os.getpid()),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "run_id": run_id,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return run_id


def save_checkpoint(accelerator, output_dir, name: str, run_state: RunState, model_config):
    """Write OUTPUT_DIR/checkpoints/NAME completely or not at all: everything goes to a hidden temporary folder
    that is renamed into place only when complete, so a run killed while saving leaves the last good one. A
    failed write (disk full, a folder made read-only) removes the partial copy and stops the run (RunError)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final, tmp = root / name, root / f".tmp-{name}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            model_config.to_json_file(tmp / "config.json")
            state = dataclasses.asdict(run_state)
            state["elapsed_before"] = run_state.train_runtime()
            del state["started"]
            state["files"] = file_manifest(tmp)
            (tmp / RUN_STATE).write_text(json.dumps(state, indent=1))  # written last: marks a complete checkpoint
            if final.exists():  # the same name again (a resumed run): swap, so one complete copy always exists
                old = root / f".old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            logger.info(f"saved checkpoint {final}")
    except Exception as error:  # disk full, a folder made read-only, ...: torch and safetensors raise their own types
        shutil.rmtree(tmp, ignore_errors=True)
        is_os_error = isinstance(error, OSError) and error.strerror
        reason = error.strerror if is_os_error else f"{type(error).__name__}: {error}"
        reason = " ".join(str(reason).split())  # one line
        free = shutil.disk_usage(root if root.exists() else output_dir).free
        complete = complete_checkpoints(root)
        kept = f"the newest complete checkpoint is {complete[0][0]}" if complete else "no complete checkpoint exists"
        raise RunError(
            f"could not write checkpoint {final} ({reason}; {free:,} bytes free on that disk): the partial copy was "
            f"removed and {kept}; free space or fix the folder, then resume with --resume_from_checkpoint latest."
        ) from error
    accelerator.wait_for_everyone()


def read_run_state(path: Path, verify_content: bool = True) -> dict:
    """The checkpoint's run_state.json, after checking every file against its recorded size and (unless
    `verify_content` is False) SHA-256: InputError naming the first file that differs, or an unreadable
    run_state.json."""
    try:
        state = json.loads((path / RUN_STATE).read_text())
        state["completed_steps"]  # noqa: B018  (a KeyError for a foreign file)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"checkpoint {path} is damaged: {path / RUN_STATE} cannot be read ({error}).") from error
    for name, recorded in state.get("files", {}).items():  # checkpoints of aft 0.1 have no list of files
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size != recorded["bytes"]:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise InputError(f"checkpoint {path} is damaged: {file} {found}, {recorded['bytes']:,} were written.")
        if verify_content and sha256(file) != recorded["sha256"]:
            raise InputError(f"checkpoint {path} is damaged: the content of {file} is not what was written.")
    return state


def complete_checkpoints(root: Path) -> list[tuple[Path, int]]:
    """(folder, completed steps) of the checkpoints under `root` that have a run_state.json, newest first. A
    `.old-NAME` copy counts when NAME is missing (a run killed between the two renames of a re-save)."""
    found = []
    for path in root.glob("*") if root.is_dir() else []:
        if path.name.startswith(".tmp-") or not (path / RUN_STATE).is_file():
            continue
        if path.name.startswith(".old-") and (root / path.name.removeprefix(".old-")).exists():
            continue
        try:
            steps = int(json.loads((path / RUN_STATE).read_text())["completed_steps"])
        except (OSError, ValueError, KeyError, TypeError):
            # unreadable, so its step is unknown: examined first, so that it is reported as damaged (it may well
            # be the newest) rather than passed over in silence
            steps = sys.maxsize
        found.append((path, steps))
    return sorted(found, key=lambda item: item[1], reverse=True)


def checkpoint_run_id(path: Path) -> str | None:
    try:
        return json.loads((path / RUN_STATE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def find_checkpoint(args) -> Path:
    """The folder named by --resume_from_checkpoint, verified; with 'latest' the newest checkpoint under
    OUTPUT_DIR/checkpoints whose files are intact, with a warning for each newer one that is damaged."""
    if args.resume_from_checkpoint == "latest":
        root = Path(args.output_dir) / CHECKPOINTS_DIR
        run_id = read_lock(args.output_dir).get("run_id")
        damaged, fenced = [], []
        for path, _ in complete_checkpoints(root):
            try:  # first: a damaged run_state.json names no run, and must not pass for an earlier run's
                read_run_state(path)
            except InputError as error:
                damaged.append(str(error))
                continue
            if run_id and checkpoint_run_id(path) != run_id:
                fenced.append(path.name)  # written by an earlier run, before an --overwrite_output_dir run
                continue
            for message in damaged:
                logger.warning(f"{message} Resuming from the previous good checkpoint, {path}.")
            return path
        detail = f" ({'; '.join(damaged)})" if damaged else ""
        if fenced:
            detail += (
                f"; {', '.join(sorted(fenced))} belong to an earlier run that a later one replaced "
                "(--overwrite_output_dir): name one with --resume_from_checkpoint PATH to continue that run"
            )
        raise InputError(f"--resume_from_checkpoint latest: no complete, intact checkpoint under {root}{detail}.")
    path = Path(args.resume_from_checkpoint)
    if not (path / RUN_STATE).is_file():
        raise InputError(f"--resume_from_checkpoint {path} is not a complete checkpoint of these scripts.")
    read_run_state(path)
    return path


# What a resumed run must share with the run that saved the checkpoint, so that it continues it exactly.
PLAN_NAMES = {
    "per_device_train_batch_size": "--per_device_train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "num_processes": "the number of processes",
    "batches_per_epoch": "training batches per process and epoch (the training data)",
    "max_train_steps": "--max_train_steps",
    "num_warmup_steps": "--num_warmup_steps",
    "lr_scheduler_type": "--lr_scheduler_type",
    "learning_rate": "--learning_rate",
    "weight_decay": "--weight_decay",
    "adam_beta1": "--adam_beta1",
    "adam_beta2": "--adam_beta2",
    "max_grad_norm": "--max_grad_norm",
    "seed": "--seed",
    "teacher_model": "--teacher_model",
    "distill_temperature": "--distill_temperature",
    "distill_weight": "--distill_weight",
    "freeze_carried_steps": "--freeze_carried_steps",
    "phase_parameters": "the parameters --freeze_carried_steps trains alone (the model's conversion.json)",
}


def plan_value(value):
    """A plan entry as compared and shown: a data file or folder by its content digest, named with its path."""
    if isinstance(value, dict) and "sha256" in value:
        digest = value["sha256"]
        return f"{value['path']} (SHA-256 {digest[:12] if digest else 'missing'})"
    return repr(value)


def check_plan(path: Path, saved: dict, current: dict):
    """Refuse to resume with settings or data that change the losses (InputError listing every difference)."""

    def same(a, b):
        if isinstance(a, dict) and isinstance(b, dict) and "sha256" in a:
            return a["sha256"] == b.get("sha256")
        return a == b

    diff = [k for k in saved if not same(saved[k], current.get(k))]
    if diff:
        details = "; ".join(
            f"{PLAN_NAMES.get(k, '--' + k)}: checkpoint {plan_value(saved[k])}, this run {plan_value(current.get(k))}"
            for k in diff
        )
        raise InputError(
            f"checkpoint {path} was saved by a run with other settings ({details}). A resumed run continues the "
            f"saved one exactly: resume with the checkpoint's values, or start a new run from its weights with "
            f"--model_name_or_path {path}."
        )


def load_checkpoint(accelerator, path: Path, model_config, plan: dict) -> RunState:
    """Restore model, optimizer, scheduler, sampler and RNG states; refuse a checkpoint of another architecture
    (compared with `model_config` as this run built it, before any forward pass) or of another plan (batch size,
    accumulation, processes, data, schedule, seed)."""
    state = read_run_state(path, verify_content=False)  # find_checkpoint read every byte already
    # the config as the saved run built it (checkpoints of aft 0.1 have only config.json, as it was at the save)
    saved = state.get("model_config") or model_identity(type(model_config).from_json_file(path / "config.json"))
    current = model_identity(model_config)
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}" for k in diff)
        raise InputError(f"checkpoint {path} is from another model configuration ({details}).")
    check_plan(path, state.get("plan", {}), plan)
    try:
        accelerator.load_state(str(path))
    except Exception as error:  # e.g. a checkpoint of aft 0.1 (no list of files to verify) with a damaged file
        raise InputError(f"checkpoint {path} cannot be loaded ({type(error).__name__}: {error}).") from error
    logger.info(f"resumed from {path} at step {state['completed_steps']}")
    return RunState(
        completed_steps=state["completed_steps"],
        log_history=state["log_history"],
        window_losses=state.get("window_losses", []),
        window_terms=state.get("window_terms", []),
        plan=plan,
        run_id=state.get("run_id", ""),
        model_config=current,
        elapsed_before=state["elapsed_before"],
    )
