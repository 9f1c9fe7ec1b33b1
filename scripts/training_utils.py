"""Plumbing shared by the training scripts: argument groups, model set-up, optimizer, checkpoints, results and
the model card. It holds no model logic: the model classes come from the `aft` package.

Run the scripts with the package installed (`pip install aft-transformers[train]`) or with its parent folder
on PYTHONPATH; launch them with `python` or `accelerate launch` (mixed precision and multi-process come from
`accelerate config` / `accelerate launch` flags, not from these scripts). Two CPU processes (gloo):

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 scripts/run_clm.py ...

(accelerate 1.15's `--cpu --num_processes 2` starts a single process: its CPU multi-process path wants MPI.)
"""

import argparse
import ast
import dataclasses
import json
import logging
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import StrictDataclassError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import SchedulerType, default_data_collator, get_scheduler

from aft import AFTConfig

logger = logging.getLogger(__name__)

MODEL_CARDS_DIR = Path(__file__).resolve().parent.parent / "model_cards"
CHECKPOINTS_DIR = "checkpoints"
RUN_STATE = "run_state.json"

# Architectures by name. A script adds the task's fields (vocab_size, image_size, ...); `--config_overrides`
# changes any field. "enwik8-paper" and "cifar10-paper" are the paper's 24x256 AFT-local models.
PRESETS = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "aft_variant": "local",
        "local_window_size": 8,
        "position_bias_rank": 16,
        "max_position_embeddings": 256,
    },
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "aft_variant": "local",
        "local_window_size": 32,
        "position_bias_rank": 64,
        "max_position_embeddings": 512,
    },
    "small-simple": {
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "aft_variant": "simple",
        "max_position_embeddings": 512,
    },
    "enwik8-paper": {
        "hidden_size": 256,
        "num_hidden_layers": 24,
        "aft_variant": "local",
        "local_window_size": 32,
        "position_bias_rank": 128,
        "max_position_embeddings": 1024,
    },
    "cifar10-paper": {
        "hidden_size": 256,
        "num_hidden_layers": 24,
        "aft_variant": "local",
        "local_window_size": 256,
        "position_bias_rank": 128,
        "max_position_embeddings": 3073,  # a start token + 32 * 32 * 3 sub-pixels
    },
}

LIMITATIONS = (
    "AFT is weaker than attention at long-range recall: AFT-conv reaches 28.2 perplexity on WikiText-103 at "
    "125M parameters, against 18.6 for a Transformer (Hyena paper, 2023). It is the right choice where speed, "
    "memory, long inputs or streaming (constant-size decoding state) matter more than exact recall over long "
    "contexts; it is not a drop-in replacement for attention on recall-heavy tasks."
)


class InputError(ValueError):
    """Bad input found before training: the message says what is wrong and what to do."""


def run_main(main):
    """Entry point: report an `InputError` as a one-line error (exit code 2) instead of a traceback."""
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# 1. arguments


def add_model_args(parser: argparse.ArgumentParser, default_preset: str = "small"):
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
    group.add_argument("--lr_scheduler_type", type=SchedulerType, default="cosine", choices=list(SchedulerType))
    group.add_argument("--num_warmup_steps", type=int, default=None, help="default: 5%% of the training steps.")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--logging_steps", type=int, default=10, help="log the mean train loss every N steps.")
    group.add_argument("--eval_steps", type=int, default=None, help="evaluate every N steps (default: each epoch).")
    group.add_argument("--max_train_samples", type=int, default=None, help="truncate the training set (debugging).")
    group.add_argument("--max_eval_samples", type=int, default=None, help="truncate the evaluation set.")
    group.add_argument("--dataloader_num_workers", type=int, default=0)


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


def check_args(args):
    """Checks that need no data: output folder, checkpointing value, preset, Hub access (raises InputError)."""
    steps = args.checkpointing_steps
    if steps not in (None, "epoch") and not (str(steps).isdigit() and int(steps) > 0):
        raise InputError(f"--checkpointing_steps={args.checkpointing_steps!r}: use a positive integer or 'epoch'.")
    if args.model_name_or_path and (args.preset or args.config_overrides):
        raise InputError("--preset and --config_overrides build a new model: drop them with --model_name_or_path.")
    if args.preset is not None and args.preset not in PRESETS:
        raise InputError(f"unknown --preset {args.preset!r}: use one of {sorted(PRESETS)}.")
    if args.gradient_accumulation_steps < 1 or args.per_device_train_batch_size < 1:
        raise InputError("--gradient_accumulation_steps and --per_device_train_batch_size must be >= 1.")
    output_dir = Path(args.output_dir)
    if (
        output_dir.is_dir()
        and any(output_dir.iterdir())
        and not args.overwrite_output_dir
        and not args.resume_from_checkpoint
    ):
        raise InputError(
            f"--output_dir {output_dir} already holds files that this run would overwrite: choose another folder, "
            "pass --overwrite_output_dir, or --resume_from_checkpoint to continue a run saved there."
        )
    if args.resume_from_checkpoint:
        find_checkpoint(args)
    args.hub_repo_id = check_hub(args) if args.push_to_hub else None


# 2. model


def parse_config_overrides(text: str | None, config_class=AFTConfig) -> dict:
    """'a=1,b=local,c=0.1' -> {'a': 1, 'b': 'local', 'c': 0.1}, with the names checked against the config class."""
    if not text:
        return {}
    fields = {f.name for f in dataclasses.fields(config_class)}
    overrides = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise InputError(
                f"--config_overrides: {item!r} is not FIELD=VALUE with a field of {config_class.__name__} "
                f"({sorted(fields)})."
            )
        try:
            overrides[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key] = value.strip()
    return overrides


def build_config(args, config_class=AFTConfig, **task_fields):
    """A new model's config: the preset, then the task's fields, then --config_overrides (validated by the class)."""
    preset = args.preset or args.default_preset
    fields = {**PRESETS[preset], **task_fields, **parse_config_overrides(args.config_overrides, config_class)}
    names = {f.name for f in dataclasses.fields(config_class)}
    fields = {k: v for k, v in fields.items() if k in names or k in ("id2label", "label2id", "num_labels")}
    try:
        return config_class(**fields)
    except (ValueError, TypeError, StrictDataclassError) as error:
        cause = error.__cause__ or error
        raise InputError(f"invalid model configuration: {cause}") from error


def load_model(model_class, args, **task_fields):
    """A new model from the preset, or a saved one from --model_name_or_path (whose config must fit the task)."""
    if not args.model_name_or_path:
        return model_class(build_config(args, model_class.config_class, **task_fields))
    model = model_class.from_pretrained(args.model_name_or_path)
    for name, value in task_fields.items():
        if name in ("id2label", "label2id", "max_position_embeddings"):
            continue
        if getattr(model.config, name) != value:
            raise InputError(
                f"--model_name_or_path {args.model_name_or_path} has {name}={getattr(model.config, name)!r}, "
                f"but this data needs {name}={value!r}."
            )
    return model


def check_sequence_length(config: AFTConfig, length: int, what: str):
    if config.has_position_limit and length > config.max_position_embeddings:
        raise InputError(
            f"{what} is {length}, larger than the model's max_position_embeddings={config.max_position_embeddings}: "
            "lower it, or build the model with --config_overrides max_position_embeddings=N."
        )


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# 2b. image data (shared by the pixel-modelling and classification scripts)

DIGITS_TRAIN = 1500  # scikit-learn digits: the first 1,500 images train, the last 297 validate


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


def digits_dataset():
    """scikit-learn's digits (1,797 scans of handwritten digits, 8x8, 17 grey levels 0..16) as 8-bit grey images:
    level v becomes round(v * 255 / 16), so 0 stays black and 16 becomes 255."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise InputError(
            "the default image data is scikit-learn's digits: pip install scikit-learn, or pass --dataset_name or "
            "--train_dir."
        ) from error
    digits = load_digits()
    pixels = np.rint(digits.images * 255 / 16).astype(np.uint8)  # (N, 8, 8)
    images = [PILImage.fromarray(p, mode="L") for p in pixels]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(rows):
        return Dataset.from_dict({"image": [images[i] for i in rows], "label": digits.target[rows].tolist()}, features)

    n = len(images)
    return DatasetDict({"train": split(range(DIGITS_TRAIN)), "validation": split(range(DIGITS_TRAIN, n))})


def image_mode(image) -> str:
    """The PIL mode the images are converted to: 'L' (one channel) for grey images, 'RGB' for all others."""
    return "L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB"


def load_image_datasets(args):
    """DatasetDict with 'train' and 'validation' splits, plus the name of the image column."""
    from datasets import DatasetDict, load_dataset

    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
    elif args.train_dir:
        for folder in (args.train_dir, args.validation_dir):
            if folder and not Path(folder).is_dir():
                raise InputError(f"image folder {folder} does not exist.")
        raw = DatasetDict({"train": load_dataset("imagefolder", data_dir=args.train_dir, split="train")})
        if args.validation_dir:
            raw["validation"] = load_dataset("imagefolder", data_dir=args.validation_dir, split="train")
    else:
        raw = digits_dataset()
    args.eval_split = "validation" if "validation" in raw else "test" if "test" in raw else "validation"
    if "validation" not in raw:
        held_out = "test" if "test" in raw else None
        if held_out:
            raw["validation"] = raw.pop(held_out)
        else:
            split = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
            raw = DatasetDict({"train": split["train"], "validation": split["test"]})
    columns = raw["train"].column_names
    image_column = args.image_column or next((c for c in ("image", "img") if c in columns), None)
    if image_column not in columns:
        raise InputError(f"no image column {image_column!r} in the data (columns: {columns}); use --image_column.")
    for split in ("train", "validation"):
        if len(raw[split]) == 0:
            raise InputError(f"the {split} split of the image data is empty.")
    return raw, image_column


# 3. optimization


def create_optimizer(model, args) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, embeddings and position-bias factors (1-d or lookup tables)."""
    no_decay_modules = (torch.nn.LayerNorm, torch.nn.Embedding)
    no_decay = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.ndim < 2 or isinstance(module, no_decay_modules) or name.startswith("pos_"):
                no_decay.add(f"{module_name}.{name}" if module_name else name)
    decay_params, no_decay_params = [], []
    for name, param in model.named_parameters():  # tied weights appear once
        (no_decay_params if name in no_decay else decay_params).append(param)
    groups = [
        {"params": decay_params, "weight_decay": args.weight_decay},
        {"params": no_decay_params, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))


def plan_steps(args, batches_per_epoch: int) -> int:
    """Sets args.max_train_steps, args.num_train_epochs and args.num_warmup_steps; returns steps per epoch."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if args.num_warmup_steps is None:
        args.num_warmup_steps = math.ceil(0.05 * args.max_train_steps)
    return steps_per_epoch


def create_scheduler(optimizer, args, num_processes: int):
    # Accelerate's prepared scheduler advances once per process at each optimizer step: scale the step counts.
    return get_scheduler(
        name=args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
    )


def init_tracking(accelerator, args, project_name: str):
    if args.with_tracking:
        hyperparameters = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)}
        hyperparameters.pop("hub_token", None)
        accelerator.init_trackers(project_name, hyperparameters)


# 4. checkpoints


@dataclasses.dataclass
class RunState:
    """What a checkpoint stores besides accelerate's state: progress and the log so far."""

    completed_steps: int = 0
    log_history: list = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.time)
    elapsed_before: float = 0.0

    def log(self, accelerator, values: dict):
        values = {"step": self.completed_steps, **values}
        self.log_history.append(values)
        if accelerator.is_main_process:
            logger.info(json.dumps(values))
        accelerator.log({k: v for k, v in values.items() if k != "step"}, step=self.completed_steps)

    def train_runtime(self) -> float:
        return self.elapsed_before + time.time() - self.started


def should_checkpoint(args, completed_steps: int, end_of_epoch: bool) -> bool:
    if args.checkpointing_steps == "epoch":
        return end_of_epoch
    return args.checkpointing_steps is not None and completed_steps % int(args.checkpointing_steps) == 0


def save_checkpoint(accelerator, args, name: str, run_state: RunState, model_config):
    """Write OUTPUT_DIR/checkpoints/NAME completely or not at all: everything goes to a hidden temporary folder
    that is renamed into place only when complete (a run killed while saving leaves the last good one)."""
    root = Path(args.output_dir) / CHECKPOINTS_DIR
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


def load_checkpoint(accelerator, args, model_config) -> RunState:
    """Restore model, optimizer, scheduler, sampler and RNG states; refuse a checkpoint of another architecture."""
    path = find_checkpoint(args)
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


def resume_position(completed_steps: int, steps_per_epoch: int, gradient_accumulation_steps: int):
    """(epoch, batches of that epoch already consumed) after `completed_steps` optimizer steps."""
    epoch, steps_in_epoch = divmod(completed_steps, steps_per_epoch)
    return epoch, steps_in_epoch * gradient_accumulation_steps


# 5. the training loop


def create_accelerator(args) -> Accelerator:
    """The Accelerator (processes and mixed precision come from `accelerate launch` / `accelerate config`)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # one shuffle order per epoch
    )
    setup_logging(accelerator)
    set_seed(args.seed)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return accelerator


def make_dataloaders(args, train_dataset, eval_dataset, collate_fn=default_data_collator):
    """The training loader (shuffled, whole batches only) and the evaluation loader, from the batch-size args."""
    train = DataLoader(
        train_dataset,
        shuffle=True,
        drop_last=True,
        batch_size=args.per_device_train_batch_size,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
    )
    return train, DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collate_fn)


def prepare_training(accelerator, args, model, train_dataloader, eval_dataloader, project_name: str):
    """Optimizer, scheduler, prepared objects, tracking, and the state of a resumed run."""
    if len(train_dataloader) == 0:
        raise InputError(
            f"{len(train_dataloader.dataset)} training examples make no full batch of "
            f"{args.per_device_train_batch_size}: lower --per_device_train_batch_size or add data."
        )
    optimizer = create_optimizer(model, args)
    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )
    steps_per_epoch = plan_steps(args, len(train_dataloader))
    lr_scheduler = accelerator.prepare(create_scheduler(optimizer, args, accelerator.num_processes))
    init_tracking(accelerator, args, project_name)
    run_state = RunState()
    if args.resume_from_checkpoint:
        run_state = load_checkpoint(accelerator, args, accelerator.unwrap_model(model).config)
    return model, optimizer, train_dataloader, eval_dataloader, lr_scheduler, run_state, steps_per_epoch


def train(
    accelerator,
    args,
    model,
    optimizer,
    lr_scheduler,
    train_dataloader,
    run_state,
    steps_per_epoch,
    *,
    compute_loss,
    evaluate,
):
    """The training loop. `compute_loss(model, batch)` gives the mean loss of a batch; `evaluate()` a dict of
    metrics, logged every --eval_steps or at the end of each epoch but the last (the script evaluates after)."""
    start_epoch, skip_batches = resume_position(
        run_state.completed_steps, steps_per_epoch, args.gradient_accumulation_steps
    )
    progress = tqdm(
        total=args.max_train_steps, initial=run_state.completed_steps, disable=not accelerator.is_local_main_process
    )
    window_losses = []
    for epoch in range(start_epoch, args.num_train_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == start_epoch and skip_batches:  # a resumed run: the batches this epoch already used
            batches = accelerator.skip_first_batches(train_dataloader, skip_batches)
        step_loss = 0.0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = compute_loss(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step_loss += loss.detach() / args.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            run_state.completed_steps += 1
            progress.update(1)
            window_losses.append(accelerator.gather(step_loss).mean().item())
            step_loss = 0.0
            step = run_state.completed_steps
            if step % args.logging_steps == 0:
                lr = lr_scheduler.get_last_lr()[0]
                run_state.log(
                    accelerator, {"loss": float(np.mean(window_losses)), "learning_rate": lr, "epoch": epoch}
                )
                progress.set_postfix(loss=f"{np.mean(window_losses):.3f}")
                window_losses = []
            if args.eval_steps and step % args.eval_steps == 0 and step < args.max_train_steps:
                run_state.log(accelerator, evaluate())
                model.train()
            if should_checkpoint(args, step, end_of_epoch=False):
                save_checkpoint(accelerator, args, f"step_{step}", run_state, accelerator.unwrap_model(model).config)
            if step >= args.max_train_steps:
                break
        if not args.eval_steps and run_state.completed_steps < args.max_train_steps:
            run_state.log(accelerator, evaluate())
            model.train()
        if should_checkpoint(args, run_state.completed_steps, end_of_epoch=True):
            save_checkpoint(accelerator, args, f"epoch_{epoch}", run_state, accelerator.unwrap_model(model).config)
        if run_state.completed_steps >= args.max_train_steps:
            break
    progress.close()


def train_results(run_state: RunState, model, num_train: int, num_eval: int) -> dict:
    train_losses = [e["loss"] for e in run_state.log_history if "loss" in e]
    return {
        "train_loss": train_losses[-1] if train_losses else float("nan"),
        "train_steps": run_state.completed_steps,
        "train_runtime": run_state.train_runtime(),
        "train_samples": num_train,
        "eval_samples": num_eval,
        "num_parameters": count_parameters(model),
    }


# 6. output folder


def hyperparameter_table(args, accelerator, num_parameters: int) -> str:
    keys = [
        "preset",
        "config_overrides",
        "model_name_or_path",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "lr_scheduler_type",
        "num_warmup_steps",
        "max_train_steps",
        "num_train_epochs",
        "max_grad_norm",
        "seed",
        "block_size",
    ]
    rows = [(k, getattr(args, k)) for k in keys if getattr(args, k, None) is not None]
    rows = [(k, v.value if isinstance(v, SchedulerType) else v) for k, v in rows]
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    rows += [
        ("processes", accelerator.num_processes),
        ("global batch size", global_batch),
        ("mixed precision", accelerator.mixed_precision),
        ("parameters", f"{num_parameters:,}"),
    ]
    return "\n".join(["| hyper-parameter | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def training_command(accelerator) -> str:
    """The command line of this run (launcher, script and arguments), with a Hub token masked."""
    argv = list(sys.argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--hub_token":
            argv[i + 1] = "<token>"
    argv = [a if not a.startswith("--hub_token=") else "--hub_token=<token>" for a in argv]
    launcher = ["python"]
    if accelerator.num_processes > 1 or accelerator.mixed_precision != "no":
        launcher = ["accelerate", "launch", "--num_processes", str(accelerator.num_processes)]
        if accelerator.mixed_precision != "no":
            launcher += ["--mixed_precision", accelerator.mixed_precision]
    return shlex.join(launcher + argv)


def plot_losses(log_history: list, path: Path, eval_key: str = "eval_loss") -> bool:
    """Train and eval loss against steps as a PNG; skipped with a message when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(f"matplotlib is not installed: no {path.name} (pip install matplotlib to get the plot).")
        return False
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e[eval_key]) for e in log_history if eval_key in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label=eval_key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


@dataclasses.dataclass
class CardInfo:
    """What a script tells the model card about its task."""

    task_type: str  # model-index task, e.g. "text-generation"
    task_name: str
    pipeline_tag: str
    dataset_id: str
    dataset_name: str
    dataset_split: str
    metrics: dict  # all_results.json key -> metric type, e.g. {"eval_bits_per_byte": "bits_per_byte"}
    description: str
    usage: str  # Python code using the saved folder; "{model_id}" is replaced
    tags: list = dataclasses.field(default_factory=list)
    dataset_config: str | None = None


def write_model_card(output_dir: Path, args, accelerator, model, results: dict, info: CardInfo):
    config = model.config
    model_id = args.hub_repo_id or args.output_dir  # what from_pretrained takes: the Hub id or the folder
    name = args.hub_repo_id or Path(args.output_dir).resolve().name
    eval_results = [
        EvalResult(
            task_type=info.task_type,
            task_name=info.task_name,
            dataset_type=info.dataset_id,
            dataset_name=info.dataset_name,
            dataset_config=info.dataset_config,
            dataset_split=info.dataset_split,
            metric_type=metric_type,
            metric_name=key,
            metric_value=results[key],
        )
        for key, metric_type in info.metrics.items()
    ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=info.pipeline_tag,
        license=args.license,
        tags=["aft", "attention-free-transformer", *info.tags],
        datasets=[info.dataset_id],
        metrics=sorted(set(info.metrics.values())),
        model_name=name,
        eval_results=eval_results,
    )
    architecture = (
        f"{config.num_hidden_layers} layers x {config.hidden_size} wide, AFT-{config.aft_variant}"
        + (f" (window {config.local_window_size})" if config.aft_variant == "local" else "")
        + (f" (kernel {config.conv_kernel_size}, {config.num_heads} heads)" if config.aft_variant == "conv" else "")
    )
    results_table = "\n".join(
        ["| metric | split | value |", "|---|---|---|"]
        + [f"| {key} | {info.dataset_split} | {results[key]:.4f} |" for key in info.metrics]
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARDS_DIR / "aft_model_card.md.jinja"),
        repo_id=name,
        model_class=type(model).__name__,
        architecture=architecture,
        num_parameters=f"{count_parameters(model):,}",
        description=info.description,
        usage=info.usage.replace("{model_id}", model_id),
        training_command=training_command(accelerator),
        hyperparameters=hyperparameter_table(args, accelerator, count_parameters(model)),
        results_table=results_table,
        limitations=LIMITATIONS,
    )
    card.save(output_dir / "README.md")


def check_hub(args) -> str:
    """Fail at start-up, not after training, when the Hub cannot be reached or the token is missing."""
    api = HfApi(token=args.hub_token)
    try:
        user = api.whoami()
    except Exception as error:
        raise InputError(
            f"--push_to_hub: cannot use the Hugging Face Hub ({type(error).__name__}: {error}). Check the network "
            "and the token (--hub_token or `hf auth login`), or drop --push_to_hub. Nothing was trained."
        ) from error
    repo_id = args.hub_model_id or f"{user['name']}/{Path(args.output_dir).resolve().name}"
    try:
        api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
    except Exception as error:
        raise InputError(f"--push_to_hub: cannot create the repository {repo_id} ({error}).") from error
    return repo_id


def save_outputs(accelerator, args, model, processor, run_state: RunState, results: dict, info: CardInfo):
    """The upload-ready folder: weights, config and code, processor, generation config, results, plot, card; then
    the upload with --push_to_hub, and the end of tracking and of the process group."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        processor.save_pretrained(output_dir)
    unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if accelerator.is_main_process:
        results = {k: round(v, 6) if isinstance(v, float) else v for k, v in results.items()}
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2))
        (output_dir / "log_history.json").write_text(json.dumps(run_state.log_history, indent=1))
        plot_losses(run_state.log_history, output_dir / "loss_curve.png")
        write_model_card(output_dir, args, accelerator, unwrapped, results, info)
        logger.info(f"saved the model folder {output_dir}: {json.dumps(results)}")
        if args.hub_repo_id:
            HfApi(token=args.hub_token).upload_folder(
                repo_id=args.hub_repo_id,
                folder_path=output_dir,
                commit_message="Upload AFT model trained with the aft scripts",
                ignore_patterns=[f"{CHECKPOINTS_DIR}/*", "runs/*"],
            )
            logger.info(f"uploaded to https://huggingface.co/{args.hub_repo_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def setup_logging(accelerator):
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
    )
    for name in ("datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
