"""Command line of the training scripts: the argument groups they share, the checks that need no data, and the
one-line error for bad input.

    parser = argparse.ArgumentParser()
    training_args.add_model_args(parser, default_preset="small")
    training_args.add_training_args(parser, learning_rate=1e-3, batch_size=16, epochs=1)
    training_args.add_output_args(parser)
    args = parser.parse_args()
    training_args.check_args(args)       # raises InputError; run_main turns it into one line and exit code 2
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

from transformers import SchedulerType


class InputError(ValueError):
    """Bad input found before training: the message says what is wrong and what to do."""


class RunError(RuntimeError):
    """A run that cannot go on (a checkpoint or the output folder could not be written): the message says what was
    kept and how to continue."""


def run_main(main):
    """Entry point: report an `InputError` (exit code 2) or a `RunError` (exit code 1) as one line instead of a
    traceback."""
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def add_model_args(parser: argparse.ArgumentParser, default_preset: str = "small"):
    from training_model import PRESETS

    group = parser.add_argument_group("model")
    group.add_argument(
        "--preset",
        default=None,
        help=f"architecture for a new model: one of {sorted(PRESETS)} (default {default_preset!r}).",
    )
    group.add_argument(
        "--config_overrides",
        default=None,
        help="comma-separated AFTConfig fields for a new model, e.g. 'num_hidden_layers=4,aft_variant=simple'.",
    )
    group.add_argument(
        "--model_name_or_path",
        default=None,
        help="start from this checkpoint (a saved folder or a Hub id) instead of a new model.",
    )
    parser.set_defaults(default_preset=default_preset)


def add_training_args(parser: argparse.ArgumentParser, *, learning_rate: float, batch_size: int, epochs: int):
    group = parser.add_argument_group("training")
    group.add_argument("--per_device_train_batch_size", type=int, default=batch_size)
    group.add_argument("--per_device_eval_batch_size", type=int, default=batch_size)
    group.add_argument("--learning_rate", type=float, default=learning_rate)
    group.add_argument("--weight_decay", type=float, default=0.01)
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.99)
    group.add_argument("--num_train_epochs", type=int, default=epochs)
    group.add_argument(
        "--max_train_steps", type=int, default=None, help="optimizer steps; overrides --num_train_epochs."
    )
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--lr_scheduler_type", default="cosine", choices=[s.value for s in SchedulerType])
    group.add_argument("--num_warmup_steps", type=int, default=None, help="default: 5%% of the training steps.")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--logging_steps", type=int, default=10, help="log the mean train loss every N steps.")
    group.add_argument("--eval_steps", type=int, default=None, help="evaluate every N steps (default: each epoch).")
    group.add_argument("--max_train_samples", type=int, default=None, help="truncate the training set (debugging).")
    group.add_argument("--max_eval_samples", type=int, default=None, help="truncate the evaluation set.")
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    group.add_argument(
        "--system_allocator",
        action="store_true",
        help="on a CPU, leave glibc's memory settings as they are (default: freed memory stays in the process, "
        "which makes long-sequence steps up to 26%% faster; scripts/allocator.py).",
    )


def add_output_args(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("output, checkpoints, tracking and Hub")
    group.add_argument("--output_dir", required=True, help="where the model folder (ready to upload) is written.")
    group.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="write into an output folder that already holds files.",
    )
    group.add_argument(
        "--checkpointing_steps",
        default=None,
        help="save a resumable checkpoint every N optimizer steps, or 'epoch' at the end of each epoch.",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="a checkpoint folder, or 'latest' for the newest complete one under OUTPUT_DIR/checkpoints.",
    )
    group.add_argument("--with_tracking", action="store_true", help="log to the trackers of --report_to.")
    group.add_argument(
        "--report_to",
        default="all",
        help="'tensorboard', 'wandb', 'comet_ml', 'clearml', ... or 'all' (the installed ones).",
    )
    group.add_argument("--push_to_hub", action="store_true", help="upload the output folder to the Hub.")
    group.add_argument("--hub_model_id", default=None, help="repository id (default: the output folder's name).")
    group.add_argument("--hub_token", default=None, help="default: the token of `hf auth login`.")
    group.add_argument("--hub_private_repo", action="store_true")
    group.add_argument("--license", default="apache-2.0", help="license in the model card's metadata.")


def add_image_data_args(parser: argparse.ArgumentParser):
    data = parser.add_argument_group("data (default: scikit-learn's digits, 8x8 grey images)")
    data.add_argument("--dataset_name", default=None, help="a dataset of the Hub, e.g. 'cifar10'.")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_dir", default=None, help="an image folder (one sub-folder per class).")
    data.add_argument("--validation_dir", default=None)
    data.add_argument("--image_column", default=None, help="default: 'image' or 'img', whichever exists.")
    data.add_argument("--label_column", default="label")
    data.add_argument(
        "--validation_split_percentage",
        type=int,
        default=10,
        help="percent of the training images held out when the data has no validation split.",
    )


POSITIVE = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_train_steps",
    "logging_steps",
    "eval_steps",
    "max_train_samples",
    "max_eval_samples",
)


def check_output_dir(args):
    """The output folder must be a folder (or not exist yet) that this process can write to, and hold no files
    this run would overwrite unless --overwrite_output_dir or --resume_from_checkpoint says so."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output_dir {output_dir} is a file, not a folder: choose a folder.")
    existing = output_dir
    while not existing.exists():  # the nearest folder that exists: the output folder is created in it
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--output_dir {output_dir}: {existing} is a file, not a folder.")
    if existing == output_dir:
        try:  # a probe, not os.access: root passes os.access on a read-only mount's folders
            with tempfile.TemporaryFile(dir=output_dir, prefix=".write-test-"):
                pass
            writable = True
        except OSError as error:
            writable, reason = False, error.strerror
    else:
        writable, reason = os.access(existing, os.W_OK | os.X_OK), "Permission denied"
    if not writable:
        raise InputError(f"--output_dir {output_dir}: cannot write in {existing} ({reason}): choose another folder.")
    from training_checkpoints import LOCK, check_output_lock

    check_output_lock(output_dir)  # another run writing the folder now is named, whatever else it holds
    if (
        output_dir.is_dir()
        and any(p.name != LOCK for p in output_dir.iterdir())  # the lock of a finished run is no one's file
        and not args.overwrite_output_dir
        and not args.resume_from_checkpoint
    ):
        raise InputError(
            f"--output_dir {output_dir} already holds files that this run would overwrite: choose another folder, "
            "pass --overwrite_output_dir, or --resume_from_checkpoint to continue a run saved there."
        )


def check_args(args):
    """Checks that need no data: numbers, output folder, checkpointing value, preset, the checkpoint to resume
    from, Hub access (raises InputError). Sets `args.checkpoint` (the checkpoint folder to resume from, or None)
    and `args.hub_repo_id` (None without --push_to_hub)."""
    from training_checkpoints import find_checkpoint
    from training_model import PRESETS
    from training_publish import check_hub

    for name in POSITIVE:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InputError(f"--{name}={value}: it must be a positive integer.")
    steps = args.checkpointing_steps
    if steps not in (None, "epoch") and not (str(steps).isdigit() and int(steps) > 0):
        raise InputError(f"--checkpointing_steps={args.checkpointing_steps!r}: use a positive integer or 'epoch'.")
    if args.model_name_or_path and (args.preset or args.config_overrides):
        raise InputError("--preset and --config_overrides build a new model: drop them with --model_name_or_path.")
    if args.preset is not None and args.preset not in PRESETS:
        raise InputError(f"unknown --preset {args.preset!r}: use one of {sorted(PRESETS)}.")
    check_output_dir(args)
    args.checkpoint = find_checkpoint(args) if args.resume_from_checkpoint else None
    args.hub_repo_id = check_hub(args) if args.push_to_hub else None
