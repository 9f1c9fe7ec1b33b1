"""Command line of the training scripts: the argument groups they share, the checks that need no data, and the
one-line error for bad input.

    parser = argparse.ArgumentParser()
    training_model.add_model_args(parser, default_preset="small")
    training_args.add_training_args(parser, learning_rate=1e-3, batch_size=16, epochs=1)
    training_args.add_output_args(parser)
    args = parser.parse_args()
    run_plan = training_checks.check_args(args)  # raises InputError; run_main turns it into one line and exit code 2

It imports no other module of the scripts (they all import it, for InputError).
"""

import argparse
import dataclasses
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

from transformers import SchedulerType

logger = logging.getLogger(__name__)


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
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="autocast the forward passes (bf16 also on a CPU); default: what `accelerate launch` or its config sets.",
    )
    group.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute each block's activations in the backward pass instead of keeping them (less memory).",
    )
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


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric flag allows: `low <= value <= high` (a bound of None: none on that side; `open`: the
    bound itself excluded). NaN is in no range."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    meaning: str = ""  # what a value at the edge means, for the error (e.g. "<= 0: no clipping")

    def __contains__(self, value) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            interval = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            interval = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            interval = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            interval = "any number but NaN"
        return f"{interval}; {self.meaning}" if self.meaning else interval


POSITIVE = Range(low=1)
NON_NEGATIVE = Range(low=0)
PROBABILITY = Range(low=0, high=1)
# Every numeric flag of the training scripts, convert_to_aft.py and generate.py: checked before any work by
# check_ranges, so that no value (0 included) silently means another one. A flag a script lacks is skipped, and
# so is an unset optional one (None: the documented default). The meanings are HF Trainer's where it has one.
RANGES = {
    "per_device_train_batch_size": POSITIVE,
    "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE,
    "num_train_epochs": POSITIVE,
    "max_train_steps": POSITIVE,
    "logging_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "max_train_samples": POSITIVE,
    "max_eval_samples": POSITIVE,
    "learning_rate": Range(low=0, low_open=True),
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": Range(low=0, high=1, high_open=True),
    "adam_beta2": Range(low=0, high=1, high_open=True),
    "max_grad_norm": Range(meaning="<= 0: no clipping"),
    "num_warmup_steps": NON_NEGATIVE,
    "freeze_carried_steps": Range(low=0, meaning="0: every parameter trains from the start"),
    "seed": Range(low=0, high=2**32 - 1),  # numpy's seeds, which transformers.set_seed sets
    "dataloader_num_workers": Range(low=0, meaning="0: load in the main process"),
    "validation_split_percentage": Range(low=0, high=100, low_open=True, high_open=True),
    "block_size": Range(low=2),  # a block's first token predicts its second
    "tokenizer_vocab_size": Range(low=259),  # the 256 bytes, the two special tokens and at least one merge
    "image_size": POSITIVE,
    "patch_size": POSITIVE,
    "num_samples": Range(low=0, meaning="0: no samples"),
    "top_k_accuracy": Range(low=0, meaning="0: no top-k accuracy"),
    "distill_temperature": Range(low=0, low_open=True),
    "distill_weight": Range(low=0, high=1, meaning="0: cross-entropy only"),
    "local_window_size": POSITIVE,
    "position_bias_rank": POSITIVE,
    "conv_kernel_size": POSITIVE,
    "num_heads": POSITIVE,
    "max_position_embeddings": POSITIVE,
    "hidden_dropout_prob": PROBABILITY,
    "max_new_tokens": POSITIVE,
    "top_k": Range(low=0, meaning="0: no top-k filtering"),
    "temperature": Range(low=0, low_open=True),
    "num_beams": POSITIVE,
}


def check_ranges(args):
    """Every numeric flag of `args` in its range (RANGES), else an InputError naming the flag, the value and the
    range. Logs what an edge value means where it changes the run (--max_grad_norm <= 0: no clipping)."""
    for name, allowed in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and value not in allowed:
            raise InputError(f"--{name}={value}: allowed: {allowed}.")
    if getattr(args, "max_grad_norm", None) is not None and args.max_grad_norm <= 0:
        logger.info(f"--max_grad_norm={args.max_grad_norm:g}: gradients are not clipped")


LOCK = ".run.lock"  # held by the run writing an output folder (training_checkpoints.claim_output_dir)


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
