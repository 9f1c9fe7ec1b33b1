"""The start-up checks of the training scripts that need the other plumbing modules (the checkpoint to resume
from, the model to start from, Hub access), after the ones training_args makes on its own (ranges, output folder).

    args = parser.parse_args(argv)
    run_plan = training_checks.check_args(args)     # raises InputError before any work
"""

import dataclasses
from pathlib import Path

from training_args import InputError, check_output_dir, check_ranges
from training_checkpoints import check_output_lock, find_checkpoint
from training_model import PRESETS, check_model_name
from training_publish import check_hub


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What the start-up checks settled, which the run uses beside its arguments: the checkpoint folder to resume
    from (None without --resume_from_checkpoint), the Hub repository to upload to (None without --push_to_hub),
    run_clm.py's distillation (training_distill.Distillation; None without --teacher_model) and the parameters its
    --freeze_carried_steps phase trains alone (training_model.check_freeze_carried; None without the phase)."""

    checkpoint: Path | None = None
    hub_repo_id: str | None = None
    distillation: object = None
    new_parameters: list | None = None

    def as_args(self) -> dict:
        """The settled values under the names the run's settings give them (training_loop.run_settings)."""
        settled = {"checkpoint": self.checkpoint, "hub_repo_id": self.hub_repo_id}
        return settled | (self.distillation.as_args() if self.distillation is not None else {})


def check_args(args) -> RunPlan:
    """Checks that need no data: numbers, output folder, checkpointing value, preset, the checkpoint to resume
    from, Hub access (raises InputError). Returns the checkpoint and Hub repository found (RunPlan); `args` is left
    as it is."""
    check_ranges(args)
    steps = args.checkpointing_steps
    if steps not in (None, "epoch") and not (str(steps).isdigit() and int(steps) > 0):
        raise InputError(f"--checkpointing_steps={args.checkpointing_steps!r}: use a positive integer or 'epoch'.")
    if args.model_name_or_path and (args.preset or args.config_overrides):
        raise InputError("--preset and --config_overrides build a new model: drop them with --model_name_or_path.")
    if args.model_name_or_path:
        check_model_name(args.model_name_or_path)
    if args.preset is not None and args.preset not in PRESETS:
        raise InputError(f"unknown --preset {args.preset!r}: use one of {sorted(PRESETS)}.")
    check_output_lock(args.output_dir)  # another run writing the folder now is named, whatever else it holds
    check_output_dir(args)
    return RunPlan(
        checkpoint=find_checkpoint(args) if args.resume_from_checkpoint else None,
        hub_repo_id=check_hub(args) if args.push_to_hub else None,
    )
