"""Resumable checkpoints: OUTPUT_DIR/checkpoints/NAME holds accelerate's state (model, optimizer, scheduler,
sampler, RNG), the model config, and `run_state.json` (progress and the log so far), written last.

    save_checkpoint(accelerator, args.output_dir, "step_100", run_state, model_config)
    path = find_checkpoint(args)                      # --resume_from_checkpoint PATH | latest
    run_state = load_checkpoint(accelerator, path, model_config)
"""

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from training_args import InputError

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
RUN_STATE = "run_state.json"


@dataclasses.dataclass
class RunState:
    """What a checkpoint stores besides accelerate's state: progress and the log so far."""

    completed_steps: int = 0
    log_history: list = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.time)
    elapsed_before: float = 0.0

    def train_runtime(self) -> float:
        return self.elapsed_before + time.time() - self.started


def save_checkpoint(accelerator, output_dir, name: str, run_state: RunState, model_config):
    """Write OUTPUT_DIR/checkpoints/NAME completely or not at all: everything goes to a hidden temporary folder
    that is renamed into place only when complete (a run killed while saving leaves the last good one)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final, tmp = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        model_config.to_json_file(tmp / "config.json")
        state = dataclasses.asdict(run_state)
        state["elapsed_before"] = run_state.train_runtime()
        (tmp / RUN_STATE).write_text(json.dumps(state, indent=1))  # written last: marks a complete checkpoint
        if final.exists():
            old = root / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        logger.info(f"saved checkpoint {final}")
    accelerator.wait_for_everyone()


def find_checkpoint(args) -> Path:
    """The folder named by --resume_from_checkpoint, or with 'latest' the complete checkpoint with most steps."""
    if args.resume_from_checkpoint == "latest":
        root = Path(args.output_dir) / CHECKPOINTS_DIR
        complete = [p for p in root.glob("*") if not p.name.startswith(".") and (p / RUN_STATE).is_file()]
        if not complete:
            raise InputError(f"--resume_from_checkpoint latest: no complete checkpoint under {root}.")
        return max(complete, key=lambda p: json.loads((p / RUN_STATE).read_text())["completed_steps"])
    path = Path(args.resume_from_checkpoint)
    if not (path / RUN_STATE).is_file():
        raise InputError(f"--resume_from_checkpoint {path} is not a complete checkpoint of these scripts.")
    return path


def load_checkpoint(accelerator, path: Path, model_config) -> RunState:
    """Restore model, optimizer, scheduler, sampler and RNG states; refuse a checkpoint of another architecture."""
    saved = type(model_config).from_json_file(path / "config.json").to_diff_dict()
    current = model_config.to_diff_dict()
    ignore = {"transformers_version", "architectures", "auto_map", "dtype"}
    diff = sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}" for k in diff)
        raise InputError(f"checkpoint {path} is from another model configuration ({details}).")
    accelerator.load_state(str(path))
    state = json.loads((path / RUN_STATE).read_text())
    logger.info(f"resumed from {path} at step {state['completed_steps']}")
    return RunState(
        completed_steps=state["completed_steps"],
        log_history=state["log_history"],
        elapsed_before=state["elapsed_before"],
    )
