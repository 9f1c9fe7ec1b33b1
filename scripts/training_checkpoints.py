"""Resumable checkpoints. OUTPUT_DIR/checkpoints/NAME holds accelerate's state (model, optimizer, scheduler,
sampler, RNG), the model config, and `run_state.json`: the progress, the log so far, the losses of the logging
window not yet logged, the settings the run's losses depend on, and the size and SHA-256 of every other file.
`run_state.json` is written last and the folder is renamed into place only when complete.

    save_checkpoint(accelerator, args.output_dir, "step_100", run_state, model_config)
    path = find_checkpoint(args)                      # --resume_from_checkpoint PATH | latest, verified
    run_state = load_checkpoint(accelerator, path, model_config, plan)
"""

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from training_args import InputError, RunError

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
RUN_STATE = "run_state.json"


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
            steps = json.loads((path / RUN_STATE).read_text())["completed_steps"]
        except (OSError, ValueError, KeyError):
            steps = -1  # unreadable: verified (and reported) in turn like the others
        found.append((path, steps))
    return sorted(found, key=lambda item: item[1], reverse=True)


def find_checkpoint(args) -> Path:
    """The folder named by --resume_from_checkpoint, verified; with 'latest' the newest checkpoint under
    OUTPUT_DIR/checkpoints whose files are intact, with a warning for each newer one that is damaged."""
    if args.resume_from_checkpoint == "latest":
        root = Path(args.output_dir) / CHECKPOINTS_DIR
        damaged = []
        for path, _ in complete_checkpoints(root):
            try:
                read_run_state(path)
            except InputError as error:
                damaged.append(str(error))
                continue
            for message in damaged:
                logger.warning(f"{message} Resuming from the previous good checkpoint, {path}.")
            return path
        detail = f" ({'; '.join(damaged)})" if damaged else ""
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
}


def check_plan(path: Path, saved: dict, current: dict):
    """Refuse to resume with settings that change the losses (InputError listing every difference)."""
    diff = [k for k in PLAN_NAMES if k in saved and saved[k] != current.get(k)]
    if diff:
        details = "; ".join(f"{PLAN_NAMES[k]}: checkpoint {saved[k]!r}, this run {current.get(k)!r}" for k in diff)
        raise InputError(
            f"checkpoint {path} was saved by a run with other settings ({details}). A resumed run continues the "
            f"saved one exactly: resume with the checkpoint's values, or start a new run from its weights with "
            f"--model_name_or_path {path}."
        )


def load_checkpoint(accelerator, path: Path, model_config, plan: dict) -> RunState:
    """Restore model, optimizer, scheduler, sampler and RNG states; refuse a checkpoint of another architecture
    or of another plan (batch size, accumulation, processes, data, schedule, seed)."""
    saved = type(model_config).from_json_file(path / "config.json").to_diff_dict()
    current = model_config.to_diff_dict()
    ignore = {"transformers_version", "architectures", "auto_map", "dtype"}
    diff = sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}" for k in diff)
        raise InputError(f"checkpoint {path} is from another model configuration ({details}).")
    state = read_run_state(path, verify_content=False)  # find_checkpoint read every byte already
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
        elapsed_before=state["elapsed_before"],
    )
