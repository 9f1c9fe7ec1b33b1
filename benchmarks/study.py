"""The evidence study: AFT against a Transformer of the same size (transformers' GPT-2), trained here, side by side.

    python benchmarks/study.py                                   # the README's Results (about 1.5 hours, 2 CPU cores)
    python benchmarks/study.py --quick --output_dir /tmp/study   # every part at a toy size (seconds)
    python benchmarks/study.py --size medium                     # wider, deeper, longer: for a GPU
    python benchmarks/study.py --enwik8_file enwik8 --size large --parts steps seeds time

Every model gets one recipe: the training scripts' AdamW (decay/no-decay groups), warm-up and cosine schedule and
gradient clipping, one learning rate, batch size, block size, seed and data order (the same batches, in the same
order), and the byte tokenizer of run_clm.py on its data (by default the Python standard library's sources; also
--train_file, --dataset_name or --enwik8_file). The parts (`--parts`):
  sweep     a learning rate per model: every text model at each of --sweep_rates for --sweep_steps steps (the same
            short budget for each), the rate of the lowest final validation bits per byte chosen and recorded; the
            text parts after it train each model at its own chosen rate;
  steps     equal optimizer steps: GPT-2 (SDPA attention) and AFT full/local/simple/conv at the same width, depth
            and MLP;
  seeds     GPT-2 and AFT-local again with the other --seeds (mean and spread);
  time      equal wall-clock time: the same models, each until its own training clock reaches one budget (default:
            GPT-2's time in `steps`), its cosine schedule planned from its step time in `steps`;
  ablation  the paper's window ablation: AFT-local with s in 0 (= AFT-simple), 1, 2, 4, ..., 128;
  pixels    pixel modelling of scikit-learn's digits (bits per dim): AFT-local against GPT-2;
  classify  digits classification accuracy: AFT-conv against transformers' ViT of the same width and depth.
The models of one comparison train in turn, one optimizer step each (with a time budget, always the model whose
clock is behind), and each model's steps are timed on their own, so the machine's drift and other processes' load
fall on every model alike; the machine and its load average are recorded.

Writes OUTPUT_DIR/results.json (learning curves against steps and seconds, final validation and test bits per byte,
tokens seen, tokens/s, peak step memory, parameter counts, the answers to the study's two questions), the plots
curves.png, final.png, window_ablation.png and images.png, and the models of the `steps` comparison as complete
folders (OUTPUT_DIR/gpt2, OUTPUT_DIR/aft-local, ...: weights, config, tokenizer, and a model card carrying the
model's row of the table and the comparison). While a part trains, OUTPUT_DIR/checkpoints/ holds its training
state, written every --checkpoint_every seconds; `--resume` continues a stopped study from the parts done and the
stopped part's last checkpoint.
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel, set_seed
from transformers.utils import logging as hf_logging

# The training scripts' data, tokenizer, optimizer, scheduler, metrics and evaluation code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from allocator import keep_freed_memory
from harness import (
    Load,
    causal_lm,
    image_classifier,
    machine,
    markdown_table,
    peak_bytes,
    pyplot,
    synchronize,
    write_json,
)
from training_args import InputError, add_training_args, run_main
from training_data import digits_dataset, text_datasets
from training_loop import create_optimizer, create_scheduler, plan_steps
from training_metrics import evaluate_classifier, load_metric, next_token_cross_entropy
from training_model import count_parameters
from training_pixels import START, image_processor, to_sequences
from training_publish import CARD_REQUIREMENTS, LIMITATIONS, card_folder, public_argv

from aft import aft_image_processor

logger = logging.getLogger("study")

PARTS = ("sweep", "steps", "seeds", "time", "ablation", "pixels", "classify")
PART_KEYS = {"steps": "equal_steps", "seeds": "equal_steps", "time": "equal_time", "ablation": "window_ablation"}
PART_KEYS |= {"pixels": "pixels", "classify": "classification", "sweep": "lr_sweep"}
LM_MODELS = ("gpt2", "aft-local", "aft-simple", "aft-conv", "aft-full")
SEED_MODELS = ("gpt2", "aft-local")  # trained with every seed
WINDOWS = (0, 1, 2, 4, 8, 16, 32, 64, 128)  # the ablation's s; 0 is AFT-simple
# The paper's window ablation (24 x 256 AFT-local, enwik8, T = 1024, test bits per character) and its Transformer.
PAPER_WINDOWS = {0: 1.209, 1: 1.205, 2: 1.176, 4: 1.165, 8: 1.162, 32: 1.154, 64: 1.160, 128: 1.165, 256: 1.164}
PAPER_WINDOWS |= {512: 1.171, 1024: 1.173}
PAPER_TRANSFORMER = 1.130
TOLERANCE = 0.03  # the study's question: is AFT-local within this many bits per byte of GPT-2 at equal steps?
SCHEDULE_TICKS = 1000  # a time-budget run's schedule advances in steps of 1/1000 of the budget
CALIBRATION_STEPS = 20  # steps per model, in turn, that measure the step times of the `time` part
SWEEP_RATES = (5e-4, 1e-3, 2e-3, 4e-3)  # the sweep's learning rates: the shared 1e-3, halved, doubled, quadrupled
# --settle: training stops once the validation gap between GPT-2 and AFT-local changes by less than SETTLE_TOLERANCE
# bits per byte over the last SETTLE_FRACTION of the steps (at least SETTLE_POINTS curve points there), or at the cap
SETTLE_TOLERANCE, SETTLE_FRACTION, SETTLE_POINTS = 0.01, 0.2, 3
SETTLE_CAP = 10  # with --settle and no --steps, the cap is this many times the size's steps (30,000 at small)
CHECKPOINT_SECONDS = 600  # a stop loses at most this much of a part's training (--checkpoint_every)
DIGITS_SIDE, DIGITS_PATCH = 8, 2  # scikit-learn's digits are 8 x 8; patches of 2 x 2 make a 4 x 4 grid


@dataclasses.dataclass(frozen=True)
class Size:
    """One scale of the study: the architecture every model shares, the recipe's sizes, and the evaluation sets."""

    hidden: int
    layers: int
    head_size: int  # GPT-2's and ViT's attention heads: hidden / head_size
    window: int  # AFT-local's s (the paper's best, 32)
    bias_rank: int  # d' of AFT's factorised position bias
    conv_kernel: int
    conv_heads: int
    block: int
    batch: int
    steps: int
    learning_rate: float
    eval_points: int  # learning-curve points per run
    curve_blocks: int  # validation blocks of each learning-curve point (the final figures use every block)
    image_steps: int
    image_batch: int
    max_eval_blocks: int | None = None  # cap on the final validation/test blocks (None: all)
    max_images: int | None = None  # cap on the digits used (None: all 1,797)
    sweep_steps: int | None = None  # steps of each learning-rate sweep run (None: a third of `steps`)


SIZES = {
    "quick": Size(32, 2, 16, 8, 8, 5, 4, 64, 4, 16, 1e-3, 2, 8, 8, 16, max_eval_blocks=16, max_images=200),
    "small": Size(64, 4, 16, 32, 16, 11, 4, 256, 8, 3000, 1e-3, 24, 128, 600, 32),
    "small128": Size(128, 4, 32, 32, 16, 11, 4, 256, 8, 3000, 1e-3, 24, 128, 600, 32),  # the second size: 2x wide
    "medium": Size(256, 6, 64, 32, 64, 11, 8, 512, 16, 10000, 1e-3, 25, 256, 2000, 64),
    "large": Size(512, 12, 64, 32, 128, 11, 16, 1024, 16, 20000, 6e-4, 40, 512, 4000, 64),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/study", help="results.json, the plots and the models.")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="write into a folder that holds files.")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the study in --output_dir: the parts that "
        "its results.json holds are kept, the others run (same size, recipe, seeds and models).",
    )
    parser.add_argument(
        "--size",
        default="small",
        choices=["small", "small128", "medium", "large"],
        help="default: small (64 wide, 4 layers); small128: 128 wide, 4 layers, the same recipe.",
    )
    parser.add_argument("--quick", action="store_true", help="every part at a toy size: a smoke test (seconds).")
    parser.add_argument("--plot_only", action="store_true", help="only redraw the plots and the saved models' cards "
                        "from OUTPUT_DIR/results.json (nothing is trained).")  # fmt: skip
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="default: all of them.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the first seeds every part; the others "
                        f"retrain {' and '.join(SEED_MODELS)} (and the image models).")  # fmt: skip
    parser.add_argument("--models", nargs="+", default=list(LM_MODELS), choices=LM_MODELS,
                        help="the text models of steps, seeds and time (default: all five).")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of the text models (the size's).")
    parser.add_argument("--batch_size", type=int, default=None, help="blocks per optimizer step (the size's).")
    parser.add_argument("--block_size", type=int, default=None, help="tokens per block (the size's).")
    parser.add_argument("--learning_rate", type=float, default=None, help="for every model without a rate chosen "
                        "by the sweep (the size's).")  # fmt: skip
    parser.add_argument(
        "--sweep_rates",
        type=float,
        nargs="+",
        default=list(SWEEP_RATES),
        help=f"the sweep's learning rates (default: {' '.join(map(str, SWEEP_RATES))}).",
    )
    parser.add_argument("--sweep_steps", type=int, default=None, help="steps of each sweep run (default: a third of "
                        "the size's steps).")  # fmt: skip
    parser.add_argument("--settle", action="store_true", help="train steps and seeds until the validation gap between "
                        f"GPT-2 and AFT-local changes by less than {SETTLE_TOLERANCE} bits per byte over the last "
                        f"{SETTLE_FRACTION * 100:.0f}%% of the steps, or to --steps, the cap (default {SETTLE_CAP} x "
                        "the size's steps); the schedule is planned over the cap.")  # fmt: skip
    parser.add_argument("--settle_min_steps", type=int, default=None, help="with --settle, train at least this many "
                        "steps before the gap may count as settled (default: the size's steps; 0: none).")  # fmt: skip
    parser.add_argument("--checkpoint_every", type=float, default=CHECKPOINT_SECONDS, help="seconds between the "
                        "checkpoints of a part's training, which --resume continues from (default "
                        f"{CHECKPOINT_SECONDS:g}; 0: after every optimizer step).")  # fmt: skip
    parser.add_argument("--exit_after_steps", type=int, default=None, help=argparse.SUPPRESS)  # a kill, for tests
    parser.add_argument("--eval_every", type=int, default=None, help="steps between learning-curve points (default: "
                        "the size's points over the steps).")  # fmt: skip
    parser.add_argument("--time_budget", type=float, default=None, help="seconds of training per model in `time` "
                        "(default: GPT-2's training time in `steps`).")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--system_allocator", action="store_true", help="leave glibc's memory settings as they are "
                        "(default: freed memory stays in the process, as in the training scripts).")  # fmt: skip
    data = parser.add_argument_group("text data, as run_clm.py reads it (default: the Python standard library)")
    data.add_argument("--dataset_name", default=None)
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_file", default=None)
    data.add_argument("--validation_file", default=None)
    data.add_argument("--text_column", default="text")
    data.add_argument("--validation_split_percentage", type=int, default=5)
    data.add_argument("--enwik8_file", default=None)
    return parser.parse_args(argv)


def check_args(args) -> Size:
    """Every check that needs no data, before any work; returns the study's size with the overrides applied."""
    if args.quick:
        args.size = "quick"
    if "time" in args.parts and "gpt2" not in args.models and args.time_budget is None:
        raise InputError("--parts time takes GPT-2's training time as its budget: add gpt2 to --models or pass "
                         "--time_budget.")  # fmt: skip
    if len(set(args.seeds)) != len(args.seeds):
        raise InputError(f"--seeds {args.seeds}: give each seed once.")
    if len(set(args.models)) != len(args.models):
        raise InputError(f"--models {' '.join(args.models)}: give each model once.")
    if len(set(args.sweep_rates)) != len(args.sweep_rates):
        raise InputError(f"--sweep_rates {' '.join(map(str, args.sweep_rates))}: give each rate once.")
    for value in args.sweep_rates:
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"--sweep_rates {value}: every rate must be a positive number.")
    for name in ("steps", "batch_size", "block_size", "threads", "sweep_steps", "eval_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name}={value}: it must be a positive integer.")
    if args.settle_min_steps is not None and (args.settle_min_steps < 0 or not args.settle):
        raise InputError(f"--settle_min_steps={args.settle_min_steps}: it is a number of steps >= 0 for --settle.")
    for name in ("learning_rate", "time_budget"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"--{name}={value}: it must be a positive number.")
    if not (math.isfinite(args.checkpoint_every) and args.checkpoint_every >= 0):
        raise InputError(f"--checkpoint_every={args.checkpoint_every}: it is a number of seconds >= 0.")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output_dir {output_dir} is a file: choose a folder.")
    if args.resume and not (output_dir / "results.json").is_file():
        raise InputError(f"--resume: {output_dir / 'results.json'} does not exist: there is no study to continue.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (args.overwrite_output_dir or args.resume):
        raise InputError(
            f"--output_dir {output_dir} already holds files that this study would overwrite: choose another "
            "folder, pass --resume to continue the study in it, or --overwrite_output_dir."
        )
    steps = args.steps if args.steps or not args.settle else SETTLE_CAP * SIZES[args.size].steps
    sweep_steps = args.sweep_steps or max(1, SIZES[args.size].steps // 3)
    overrides = {"steps": steps, "batch": args.batch_size, "block": args.block_size, "sweep_steps": sweep_steps}
    overrides["learning_rate"] = args.learning_rate
    return dataclasses.replace(SIZES[args.size], **{k: v for k, v in overrides.items() if v is not None})


# 1. models: the same width, depth and MLP (4 x hidden) for every model; no dropout anywhere


def build_lm(name: str, size: Size, vocab_size: int, positions: int, seed: int, window: int | None = None):
    """GPT-2 with SDPA attention, or AFTForCausalLM of one variant ("aft-local", ...; `window` overrides s), at the
    study's size (harness.causal_lm)."""
    set_seed(seed)
    return causal_lm(name, hidden=size.hidden, layers=size.layers, heads=size.hidden // size.head_size,
                     vocab=vocab_size, positions=positions, window=window or size.window, bias_rank=size.bias_rank,
                     conv_kernel=size.conv_kernel, conv_heads=size.conv_heads)  # fmt: skip


def build_classifier(name: str, size: Size, seed: int):
    """transformers' ViT (SDPA; class token, position embeddings) or the paper's AFT-conv image classifier (global
    average pooling, no class token, no position embedding; as many heads as channels, a 3 x 3 window), on 8 x 8
    grey digits (harness.image_classifier)."""
    set_seed(seed)
    labels = {"id2label": {i: str(i) for i in range(10)}, "label2id": {str(i): i for i in range(10)}}
    return image_classifier(name, hidden=size.hidden, layers=size.layers, head_size=size.head_size,
                            image_size=DIGITS_SIDE, patch_size=DIGITS_PATCH, num_channels=1, conv_kernel=3,
                            labels=labels)  # fmt: skip


# 2. data


def text_data(args, size: Size, accelerator):
    """(tokenizer, {split: (N, block) int32 blocks}, tokens per byte of the held-out text, where test comes from):
    run_clm.py's data and byte tokenizer. A corpus without a test split (the embedded one, local files) gives the
    second half of its validation blocks to test: the embedded corpus's held-out files are in name order, so the
    halves are different files (but for the one file that straddles them)."""
    data_args = argparse.Namespace(
        **{k: getattr(args, k) for k in ("dataset_name", "dataset_config_name", "train_file", "validation_file")},
        text_column=args.text_column,
        validation_split_percentage=args.validation_split_percentage,
        enwik8_file=args.enwik8_file,
        block_size=size.block,
        seed=args.seeds[0],
        train_tokenizer=False,
        tokenizer_name=None,
        model_name_or_path=None,
    )
    tokenizer, blocks, ratios = text_datasets(data_args, accelerator)
    splits = {name: blocks[name].with_format("numpy")[:]["input_ids"].astype(np.int32) for name in blocks}
    test_split = "the corpus's own test split"
    if "test" not in splits:
        held_out = splits.pop("validation")
        half = len(held_out) // 2
        splits["validation"], splits["test"] = held_out[:half], held_out[half:]
        ratios["test"] = ratios.get("validation")
        test_split = "the second half of the held-out validation blocks (the first half is the validation split)"
    for name in ("train", "validation", "test"):
        if len(splits.get(name, ())) == 0:
            raise InputError(
                f"the {name} split holds no block of {size.block} tokens: add data or lower --block_size."
            )
    return tokenizer, {name: torch.from_numpy(blocks) for name, blocks in splits.items()}, ratios, test_split


def digits(size: Size):
    """scikit-learn's digits as the training scripts read them: (train, validation) PIL images and labels."""
    data = digits_dataset()
    out = {}
    for split in ("train", "validation"):
        rows = data[split] if size.max_images is None else data[split].select(range(size.max_images // 2))
        out[split] = ([image.convert("L") for image in rows["image"]], torch.tensor(rows["label"]))
    return out


class Batches:
    """The i-th training batch of a seeded order (a fresh permutation each epoch, whole batches only): every model
    of a comparison gets the same batches in the same order, whatever order the models step in."""

    def __init__(self, tensors: dict, batch_size: int, seed: int, device):
        self.tensors, self.batch_size, self.seed, self.device = tensors, batch_size, seed, device
        self.count = len(next(iter(tensors.values())))
        self.per_epoch = self.count // batch_size
        if self.per_epoch == 0:
            raise InputError(f"{self.count} training examples make no batch of {batch_size}: lower --batch_size.")
        self._orders = {}

    def order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders[epoch] = torch.randperm(self.count, generator=generator)
        return self._orders[epoch]

    def __call__(self, i: int) -> dict:
        epoch, j = divmod(i, self.per_epoch)
        rows = self.order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        return {k: to_model_input(v[rows], self.device) for k, v in self.tensors.items()}


def to_model_input(tensor, device):
    return tensor.to(device, torch.long if not tensor.is_floating_point() else tensor.dtype)


def eval_batches(tensors: dict, device, limit: int | None = None, batch_size: int = 32) -> list:
    count = len(next(iter(tensors.values())))
    count = count if limit is None else min(limit, count)
    return [
        {k: to_model_input(v[i : i + batch_size], device) for k, v in tensors.items()}
        for i in range(0, count, batch_size)
    ]


# 3. training in turn


@dataclasses.dataclass
class Run:
    """One model's training in a comparison: its optimizer and schedule, its own clock, and what was measured."""

    name: str
    seed: int
    model: PreTrainedModel
    steps: int  # planned optimizer steps (the cosine schedule's length)
    tokens_per_step: int
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    done: int = 0
    seconds: float = 0.0  # wall time of this model's own training steps
    cpu_seconds: float = 0.0  # process CPU time during them (all threads)
    losses: list = dataclasses.field(default_factory=list)
    curve: list = dataclasses.field(default_factory=list)
    eval_at: set = dataclasses.field(default_factory=set)  # steps (or, with a budget, seconds) of the curve
    budget: float | None = None  # seconds: the run trains until its clock reaches them, on a schedule in time
    learning_rate: float | None = None
    last: int | None = None  # the step it stops at (None: `steps`); the schedule still runs over `steps`
    peak_bytes: int = 0
    extra: dict = dataclasses.field(default_factory=dict)


def new_run(name, seed, model, steps, tokens_per_step, recipe, batches_per_epoch, eval_points, device, budget=None,
            learning_rate=None, eval_every=None):  # fmt: skip
    """The model on the device with the training scripts' optimizer and schedule (at `learning_rate`, default the
    recipe's), planned for `steps` steps; with a `budget` (seconds) the schedule runs over SCHEDULE_TICKS equal parts
    of the budget instead, and `steps` is only the estimate of the steps that fit. The learning curve has
    `eval_points` points, or one every `eval_every` steps."""
    recipe = copy.copy(recipe)
    recipe.learning_rate = learning_rate or recipe.learning_rate
    recipe.max_train_steps = steps if budget is None else SCHEDULE_TICKS
    planned = plan_steps(recipe, batches_per_epoch)  # the warm-up: 5% of the steps (of the budget)
    model = model.to(device).train()
    optimizer = create_optimizer(model, recipe)
    scheduler = create_scheduler(optimizer, recipe, planned, 1)
    if eval_every and budget is None:
        eval_at = set(range(eval_every, steps + 1, eval_every))
    elif budget is None:
        eval_at = {math.ceil(k * steps / eval_points) for k in range(1, eval_points + 1)}
    else:
        eval_at = {k * budget / eval_points for k in range(1, eval_points + 1)}
    return Run(
        name,
        seed,
        model,
        steps,
        tokens_per_step,
        optimizer,
        scheduler,
        eval_at=eval_at,
        budget=budget,
        learning_rate=recipe.learning_rate,
    )


def train_step(run: Run, batch: dict, compute_loss, max_grad_norm: float, device):
    """One optimizer step (forward, backward, clipping, AdamW, schedule), timed on this model's clock."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = compute_loss(run.model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_grad_norm)
    run.optimizer.step()
    if run.budget is None:
        run.scheduler.step()
    else:  # the schedule at the fraction of the budget spent (the clock includes this step up to here)
        spent = run.seconds + time.perf_counter() - start
        while run.scheduler.last_epoch < min(SCHEDULE_TICKS, int(spent / run.budget * SCHEDULE_TICKS)):
            run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss = loss.item()
    synchronize(device)
    run.seconds += time.perf_counter() - start
    run.cpu_seconds += time.process_time() - cpu_start
    run.done += 1
    run.losses.append(loss)


def peak_step_bytes(model, compute_loss, batch, device) -> int:
    """Peak bytes allocated by one forward and backward pass above what was allocated before (the weights and the
    optimizer's state): benchmark.py's measure (CUDA's counter, or on CPU the profiler's allocation record)."""
    model.zero_grad(set_to_none=True)
    peak = peak_bytes(lambda: compute_loss(model, batch).backward())
    model.zero_grad(set_to_none=True)
    return int(peak)


def finished(run: Run) -> bool:
    """Whether the run has trained all it will: its planned (or stopped-at) steps, or its time budget."""
    return run.done >= (run.last or run.steps) if run.budget is None else run.seconds >= run.budget


def train_in_turn(runs, batch_at, compute_loss, evaluate, *, max_grad_norm, device, load, budget=None, desc="",
                  stop=None, on_step=None, checkpoint=None):  # fmt: skip
    """Train every run one optimizer step at a time, always stepping the run that is behind: in steps (round-robin),
    or with a time budget in its own training seconds. A run stops at its planned steps or, with a budget, when its
    clock reaches it. `evaluate(model)` gives the learning-curve value at the run's `eval_at` steps (with a budget:
    the first step at or past each of its `eval_at` seconds) and at its last step. `stop(runs)`, asked after every
    evaluation, ends every run's training when it is true. After every step `checkpoint(runs)` (a
    `TrainingCheckpoint`) saves them when one is due, and then `on_step()` is called; at the end `checkpoint(runs,
    final=True)` saves them whole. Runs restored from a checkpoint continue where they were."""
    for run in runs:
        if run.done == 0:  # a restored run keeps the peak measured before its first step
            run.peak_bytes = peak_step_bytes(run.model, compute_loss, batch_at(0), device)
    active = [run for run in runs if not finished(run)]
    bar = tqdm(total=sum(r.steps for r in runs), initial=sum(r.done for r in runs), desc=desc, mininterval=5,
               disable=None)  # fmt: skip
    while active:
        run = min(active, key=(lambda r: r.seconds) if budget else (lambda r: r.done))
        train_step(run, batch_at(run.done), compute_loss, max_grad_norm, device)
        bar.update(1)
        done = finished(run)
        due = run.done in run.eval_at if budget is None else any(run.seconds >= t for t in run.eval_at)
        run.eval_at -= set() if budget is None else {t for t in run.eval_at if run.seconds >= t}
        if due or done:
            value = evaluate(run.model)
            run.curve.append({"step": run.done, "seconds": run.seconds, "tokens": run.done * run.tokens_per_step})
            run.curve[-1]["value"] = value
            load.sample()
            logger.info(f"{desc} {run.name} seed {run.seed}: step {run.done}, {run.seconds:.1f} s, {value:.4f}")
            if stop is not None and stop(runs):  # every run stops at the furthest step any has done
                last = max(r.done for r in runs)
                for other in runs:
                    other.last = last
                active = [r for r in active if r.done < last or r is run]
        if finished(run) and run in active:
            active.remove(run)
        if checkpoint is not None:
            checkpoint(runs)
        if on_step is not None:
            on_step()
    if checkpoint is not None:
        checkpoint(runs, final=True)
    bar.close()


def checkpoint_name(desc: str) -> str:
    """The checkpoint file's name of a train_in_turn call: its description in lower case, words joined by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", desc.lower()).strip("-")


class TrainingCheckpoint:
    """One train_in_turn call's runs in FOLDER/<name>.pt, written whole (a temporary file renamed into place) every
    `every` seconds and at the call's end: every model's weights, AdamW state, schedule, clock, losses and curve so
    far, and torch's random state. The batches are a function of the step, so a run restored from it continues
    with the steps, batches and figures of the run that was not stopped. `context` is what the part measured
    before training (the time part's step times), kept so that a continued part trains to the same plan;
    `elapsed()` the part's wall seconds so far, kept so that a continued part's time counts the stopped process's."""

    VERSION = 1
    FIELDS = ("done", "seconds", "cpu_seconds", "losses", "curve", "last", "peak_bytes")

    def __init__(self, folder: Path, name: str, runs: list, every: float, context: dict | None = None, elapsed=None):
        self.path = Path(folder) / f"{name}.pt"
        self.every, self.context, self.elapsed = every, context or {}, elapsed or (lambda: 0.0)
        self.part_seconds = 0.0  # the part's wall seconds when the restored checkpoint was written
        self.plan = [self.plan_of(run) for run in runs]
        self.saved = time.monotonic()

    @staticmethod
    def plan_of(run: Run) -> dict:
        return {"name": run.name, "seed": run.seed, "steps": run.steps, "budget": run.budget,
                "learning_rate": run.learning_rate}  # fmt: skip

    @staticmethod
    def saved_context(folder: Path, name: str) -> dict | None:
        """The `context` of the checkpoint FOLDER/<name>.pt, or None where there is none."""
        path = Path(folder) / f"{name}.pt"
        return TrainingCheckpoint.read(path)["context"] if path.is_file() else None

    @staticmethod
    def read(path: Path) -> dict:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("version") != TrainingCheckpoint.VERSION:
                raise ValueError("not a checkpoint of this script's version")
        except Exception as error:  # a truncated or foreign file: torch raises many kinds, some over many lines
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise InputError(f"--resume: the checkpoint {path} cannot be read ({reason}): delete it to train its part "
                             "from the part's start.") from None  # fmt: skip
        return state

    def restore(self, runs: list) -> bool:
        """Load the saved state into `runs` (built as the call builds them); False where nothing was saved."""
        if not self.path.is_file():
            return False
        state = self.read(self.path)
        if state["plan"] != self.plan:
            raise InputError(f"--resume: the checkpoint {self.path} holds other runs ({state['plan']}) than this part "
                             f"trains ({self.plan}): delete it to train the part from its start.")  # fmt: skip
        for run, saved in zip(runs, state["runs"], strict=True):
            run.model.load_state_dict(saved["model"])
            run.optimizer.load_state_dict(saved["optimizer"])
            run.scheduler.load_state_dict(saved["scheduler"])
            for field in self.FIELDS:
                setattr(run, field, saved[field])
            run.eval_at = set(saved["eval_at"])
        torch.set_rng_state(state["rng"])
        self.part_seconds = state["part_seconds"]
        logger.info(f"continuing from {self.path}: step {', '.join(f'{r.name} {r.done}' for r in runs)}")
        return True

    def __call__(self, runs: list, final: bool = False):
        if not final and time.monotonic() - self.saved < self.every:
            return
        state = {"version": self.VERSION, "plan": self.plan, "context": self.context, "rng": torch.get_rng_state()}
        state["part_seconds"] = self.elapsed()
        state["runs"] = [
            {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "eval_at": sorted(run.eval_at),
             **{field: getattr(run, field) for field in self.FIELDS}}
            for run in runs
        ]  # fmt: skip
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except OSError as error:  # a full disk or a read-only folder: training goes on, the last checkpoint stays
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            logger.warning(f"the checkpoint {self.path} could not be written ({error}); the part trains on, and a "
                           "stop now loses its progress since the last checkpoint written.")  # fmt: skip
        self.saved = time.monotonic()


def run_record(run: Run, metric: str, **final) -> dict:
    """What results.json keeps of a run."""
    return {
        "model": run.name,
        "seed": run.seed,
        "parameters": count_parameters(run.model),
        "steps": run.done,
        "planned_steps": run.steps,
        "learning_rate": run.learning_rate,
        "tokens_per_step": run.tokens_per_step,
        "tokens_seen": run.done * run.tokens_per_step,
        "train_seconds": run.seconds,
        "seconds_per_step": run.seconds / run.done,
        "tokens_per_second": run.done * run.tokens_per_step / run.seconds,
        "cpu_utilisation": run.cpu_seconds / run.seconds,  # process CPU seconds per second of its steps
        "peak_step_memory_bytes": run.peak_bytes,
        "final_train_loss": statistics.fmean(run.losses[-max(1, len(run.losses) // 20) :]),
        "curve_metric": metric,
        "curve": run.curve,
        **run.extra,
        **final,
    }


def settled(gpt2_curve: list, local_curve: list, tolerance=SETTLE_TOLERANCE, fraction=SETTLE_FRACTION,
            points=SETTLE_POINTS) -> bool:  # fmt: skip
    """Whether the validation gap (AFT-local minus GPT-2, at the steps both curves hold) changed by less than
    `tolerance` over the last `fraction` of the steps, seen at `points` curve points there at least."""
    local = {p["step"]: p["value"] for p in local_curve}
    gaps = [(p["step"], local[p["step"]] - p["value"]) for p in gpt2_curve if p["step"] in local]
    if not gaps:
        return False
    tail = [gap for step, gap in gaps if step >= (1 - fraction) * gaps[-1][0]]
    return len(tail) >= points and max(tail) - min(tail) < tolerance


def settle_stop(runs, min_steps: int = 0) -> bool:
    """train_in_turn's `stop` for --settle: true once GPT-2's and AFT-local's curves end at the same step, at
    `min_steps` or later, settled. The floor keeps an early stretch where both curves fall in step (the gap steady
    while neither model has converged) from counting as settled."""
    by_name = {run.name: run for run in runs}
    gpt2, local = by_name.get("gpt2"), by_name.get("aft-local")
    if gpt2 is None or local is None or not gpt2.curve or not local.curve:
        return False
    last = gpt2.curve[-1]["step"]
    return last == local.curve[-1]["step"] and last >= min_steps and settled(gpt2.curve, local.curve)


def ahead_from(gap_curve: list):
    """The first step from which GPT-2 stays ahead (gap = AFT-local minus GPT-2 > 0) to the curve's end, or None
    where it is not ahead at the end."""
    step = None
    for point in gap_curve:
        step = (point["step"] if step is None else step) if point["gap"] > 0 else None
    return step


def best_rate(points: list) -> dict:
    """{model: the learning rate of its lowest final validation bits per byte} (a diverged, non-finite run loses)."""
    chosen = {}
    for point in points:
        value = point["validation_bits_per_byte"]
        value = value if math.isfinite(value) else math.inf
        if point["model"] not in chosen or value < chosen[point["model"]][1]:
            chosen[point["model"]] = (point["learning_rate"], value)
    return {model: rate for model, (rate, _) in chosen.items()}


# 4. the parts


class Study:
    """The study's shared state: arguments, size, recipe, device, data, the load record and the results so far."""

    def __init__(self, args, size: Size, tuned_allocator: bool):
        self.args, self.size, self.tuned_allocator = args, size, tuned_allocator
        floor = SIZES[args.size].steps if args.settle_min_steps is None else args.settle_min_steps
        self.settle_min_steps = min(floor, size.steps)
        self.output_dir = Path(args.output_dir)
        self.accelerator = Accelerator()
        self.metric = load_metric("cross_entropy")  # the scripts' evaluate module: nats per token, bits per byte
        self.device = self.accelerator.device
        recipe_parser = argparse.ArgumentParser(add_help=False)
        add_training_args(recipe_parser, learning_rate=size.learning_rate, batch_size=size.batch, epochs=1)
        self.recipe = recipe_parser.parse_args([])  # the training scripts' defaults: AdamW, cosine, warm-up, ...
        self.load = Load()
        self.started = time.time()
        self.results = {
            "complete": False,
            "command": shlex.join(["python", *sys.argv]),
            "size": args.size,
            "architecture": dataclasses.asdict(size),
            "recipe": self.recipe_record(),
            "procedure": {"sweep_rates": args.sweep_rates, "settle": args.settle, "eval_every": args.eval_every},
            "machine": {**machine(self.device), "glibc_keeps_freed_memory": self.tuned_allocator},
        }
        if args.settle:
            self.results["procedure"]["settle_min_steps"] = self.settle_min_steps
        self.text = None
        self.checkpoints = self.output_dir / "checkpoints"  # the running part's training, while it runs
        self.part_checkpoints = []  # the running part's checkpoint files
        self.part_started = time.time()  # the running part's start (for a continued part, the stopped process's)
        self.main_runs = {}  # the equal-steps runs of the first seed trained by this process
        self.done = []  # the parts in results.json
        self.steps_trained = 0  # optimizer steps of text models trained by this process

    def recipe_record(self) -> dict:
        r = self.recipe
        return {
            "optimizer": "AdamW (training_loop.create_optimizer: no decay on biases, norms, embeddings, pos_*)",
            "learning_rate": r.learning_rate,
            "learning_rates": "each text model's own where the sweep ran (lr_sweep.chosen), else learning_rate",
            "weight_decay": r.weight_decay,
            "betas": [r.adam_beta1, r.adam_beta2],
            "schedule": f"{r.lr_scheduler_type}, 5% linear warm-up (training_loop.plan_steps)",
            "max_grad_norm": r.max_grad_norm,
            "batch_size": self.size.batch,
            "block_size": self.size.block,
            "seeds": self.args.seeds,
            "dropout": 0.0,
            "dtype": "float32",
        }

    def resume(self):
        """Continue the study in --output_dir: keep its results and the parts they hold, if they are of this study."""
        path = self.output_dir / "results.json"
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"--resume: {path} cannot be read ({error}).") from None
        for key in ("size", "architecture", "recipe", "procedure"):
            # a results.json written before the procedure was recorded ran the one the defaults give
            if (key in old or key != "procedure") and old.get(key) != self.results[key]:
                raise InputError(
                    f"--resume: {path} holds another study ({key} {old.get(key)!r}, this one's {self.results[key]!r})."
                )
        if old.get("models", list(LM_MODELS)) != self.args.models:
            raise InputError(f"--resume: {path} was run with --models {' '.join(old.get('models', LM_MODELS))}.")
        if "parts_done" in old:
            self.done = list(old["parts_done"])
        else:  # a file written before parts_done was recorded: the parts whose results it holds
            self.done = [p for p in PARTS if p != "seeds" and PART_KEYS[p] in old]
            seeds = {r["seed"] for r in old.get("equal_steps", {}).get("runs", [])}
            if "steps" in self.done and set(self.args.seeds) <= seeds:
                self.done.insert(1, "seeds")
        runs = dict(old.get("resumed_runs", {}))
        runs[str(len(runs))] = {
            "command": old["command"],
            "machine": old["machine"],
            "parts": list(self.done),
            "load_average": old.get("load_average"),
            "wall_seconds": old.get("wall_seconds"),
        }
        self.results = {**old, **{k: self.results[k] for k in ("command", "machine")}, "resumed_runs": runs}
        self.started -= old.get("wall_seconds", 0.0)
        logger.info(f"resuming {path}: its parts {' '.join(self.done) or '(none)'} are kept")

    def main_records(self) -> dict:
        """{model: results.json record} of the equal-steps runs of the first seed."""
        runs = self.results.get("equal_steps", {}).get("runs", [])
        return {r["model"]: r for r in runs if r["seed"] == self.args.seeds[0]}

    def save_results(self):
        """results.json, written whole (a temporary file renamed into place) after every part."""
        self.results["parts_done"] = self.done
        self.results["models"] = self.args.models
        self.results["load_average"] = self.load.summary()
        self.results["wall_seconds"] = time.time() - self.started
        write_json(self.output_dir / "results.json", self.results)

    # text

    def load_text(self):
        if self.text is None:
            tokenizer, splits, ratios, test_split = text_data(self.args, self.size, self.accelerator)
            self.text = tokenizer, splits, ratios
            resumed = self.results.get("data")
            self.results["data"] = {
                "corpus": corpus_name(self.args),
                "tokenizer": f"bytes ({len(tokenizer)} ids, training_data.byte_tokenizer), documents end in eos",
                "blocks": {name: len(blocks) for name, blocks in splits.items()},
                "block_size": self.size.block,
                "train_tokens": len(splits["train"]) * self.size.block,
                "curve_eval_blocks": min(self.size.curve_blocks, len(splits["validation"])),
                "final_eval_blocks": {
                    name: len(splits[name]) if self.size.max_eval_blocks is None else self.size.max_eval_blocks
                    for name in ("validation", "test")
                },
                "test_split": test_split,
            }
            if resumed is not None and resumed != self.results["data"]:
                differ = sorted(k for k in resumed.keys() | self.results["data"].keys()
                                if resumed.get(k) != self.results["data"].get(k))  # fmt: skip
                raise InputError(
                    f"--resume: the study in {self.output_dir} was run on other data ({', '.join(differ)} differ): "
                    "continue it with the data and the script version it was run with."
                )
        return self.text

    def checkpoint(self, desc: str, runs: list, context: dict | None = None) -> TrainingCheckpoint:
        """The checkpoint of one train_in_turn call (named after its `desc`), the runs restored from it if this
        process continues a study that saved one."""
        checkpoint = TrainingCheckpoint(
            self.checkpoints, checkpoint_name(desc), runs, self.args.checkpoint_every, context, self.part_elapsed
        )
        self.part_checkpoints.append(checkpoint.path)
        if self.args.resume and checkpoint.restore(runs):
            last = self.results["resumed_runs"][str(len(self.results["resumed_runs"]) - 1)]
            last.setdefault("checkpointed_steps", {})[desc] = {run.name: run.done for run in runs}
            # the part's time counts the stopped process's up to its last checkpoint
            self.part_started = min(self.part_started, time.time() - checkpoint.part_seconds)
        return checkpoint

    def part_elapsed(self) -> float:
        return time.time() - self.part_started

    def saved_context(self, desc: str) -> dict | None:
        """What the part measured before the training that the checkpoint named after `desc` holds, if continued."""
        return TrainingCheckpoint.saved_context(self.checkpoints, checkpoint_name(desc)) if self.args.resume else None

    def count_step(self):
        """The hidden --exit_after_steps: the process ends at once, as a killed one does (no cleanup, no save)."""
        self.steps_trained += 1
        if self.args.exit_after_steps is not None and self.steps_trained >= self.args.exit_after_steps:
            os._exit(137)

    def rate(self, model: str) -> float:
        """The model's learning rate: the sweep's choice where it ran, else the recipe's."""
        return self.results.get("lr_sweep", {}).get("chosen", {}).get(model, self.size.learning_rate)

    def main_steps(self) -> int:
        """The steps of the equal-steps comparison (with --settle, where it settled), which later parts train for."""
        return self.results.get("equal_steps", {}).get("steps", self.size.steps)

    def text_comparison(self, names, seed, *, budget=None, step_times=None, windows=None, rates=None, steps=None,
                        last=None, stop=None, desc="", context=None):  # fmt: skip
        """Train text models in turn on the same batches, each at its rate (`rates`, else `rate(model)`), planned
        for `steps` (the size's) and stopped at `last` or by `stop`, checkpointed as `desc` (with `context`);
        returns {name: Run}, the final metrics in run.extra."""
        tokenizer, splits, ratios = self.load_text()
        size = self.size
        batches = Batches({"input_ids": splits["train"]}, size.batch, seed, self.device)
        curve_set = eval_batches({"input_ids": splits["validation"]}, self.device, size.curve_blocks)
        windows = windows or {}
        runs = []
        for name in names:
            planned = (steps or size.steps) if budget is None else max(1, int(budget / step_times[name]))
            model = build_lm(name.split("/")[0], size, len(tokenizer), size.block, seed, windows.get(name))
            rate = (rates or {}).get(name) or self.rate(name.split("/")[0])
            run = new_run(name, seed, model, planned, size.batch * size.block, self.recipe, batches.per_epoch,
                          size.eval_points, self.device, budget, learning_rate=rate,
                          eval_every=self.args.eval_every)  # fmt: skip
            run.last = last
            runs.append(run)

        def bits(model, batch_list, split):
            ratio = ratios.get(split)
            values = next_token_cross_entropy(model, batch_list, self.accelerator, self.metric,
                                              tokens_per_byte=ratio["bytes"] if ratio else 1.0)  # fmt: skip
            return values["bits_per_byte"]

        train_in_turn(
            runs,
            batches,
            lm_loss,
            lambda model: bits(model, curve_set, "validation"),
            max_grad_norm=self.recipe.max_grad_norm,
            device=self.device,
            load=self.load,
            budget=budget,
            desc=desc,
            stop=stop,
            on_step=self.count_step,
            checkpoint=self.checkpoint(desc, runs, context),
        )
        for run in runs:
            for split in ("validation", "test"):
                held_out = eval_batches({"input_ids": splits[split]}, self.device, size.max_eval_blocks)
                run.extra[f"{split}_bits_per_byte"] = bits(run.model, held_out, split)
            logger.info(f"{desc} {run.name} seed {seed}: test {run.extra['test_bits_per_byte']:.4f} bits per byte")
        return {run.name: run for run in runs}

    def part_sweep(self):
        seed, steps = self.args.seeds[0], self.size.sweep_steps
        names = {f"{m}/lr={r:g}": (m, r) for m in self.args.models for r in self.args.sweep_rates}
        rates = {name: rate for name, (_, rate) in names.items()}
        runs = self.text_comparison(list(names), seed, rates=rates, steps=steps, desc="learning-rate sweep")
        points = [{**run_record(run, "validation_bits_per_byte"), "model": names[name][0], "run": name}
                  for name, run in runs.items()]  # fmt: skip
        self.results["lr_sweep"] = {
            "steps": steps,
            "seed": seed,
            "rates": self.args.sweep_rates,
            "criterion": "each model's rate of the lowest final validation bits per byte (the validation split, "
            "not test), every rate with the same steps, schedule, seed and batches",
            "points": points,
            "chosen": best_rate(points),
        }

    def part_steps(self):
        seed, settle = self.args.seeds[0], self.args.settle
        stop = functools.partial(settle_stop, min_steps=self.settle_min_steps) if settle else None
        self.main_runs = self.text_comparison(self.args.models, seed, stop=stop, desc="equal steps")
        done = max(r.done for r in self.main_runs.values())
        self.results["equal_steps"] = {
            "steps": done,
            "planned_steps": self.size.steps,
            "runs": [run_record(r, "validation_bits_per_byte") for r in self.main_runs.values()],
        }
        if settle:
            curves = {name: run.curve for name, run in self.main_runs.items()}
            self.results["equal_steps"]["settle"] = {
                "criterion": f"the validation gap AFT-local minus GPT-2 changes by less than {SETTLE_TOLERANCE} bits "
                f"per byte over the last {SETTLE_FRACTION:.0%} of the steps ({SETTLE_POINTS} curve points at "
                "least), or the cap; the schedule is planned over the cap",
                "cap": self.size.steps,
                "min_steps": self.settle_min_steps,
                "stopped_at": done,
                "settled": "gpt2" in curves and "aft-local" in curves and settled(curves["gpt2"], curves["aft-local"]),
            }
        self.save_models()

    def part_seeds(self):
        records = self.results.setdefault("equal_steps", {"steps": self.size.steps, "runs": []})["runs"]
        last = self.main_steps()
        seeds = self.args.seeds if "steps" not in self.args.parts else self.args.seeds[1:]
        for seed in seeds:
            models = [m for m in SEED_MODELS if m in self.args.models]
            runs = self.text_comparison(models, seed, last=last, desc=f"equal steps, seed {seed}")
            records += [run_record(r, "validation_bits_per_byte") for r in runs.values()]

    def step_seconds(self, names, seed) -> dict:
        """{model: median seconds of its optimizer steps}, measured now with the models stepping in turn (throwaway
        models), so that the time budget and its schedules are of this machine as it is while the part runs."""
        tokenizer, splits, _ = self.load_text()
        size = self.size
        batches = Batches({"input_ids": splits["train"]}, size.batch, seed, self.device)
        runs = [
            new_run(name, seed, build_lm(name, size, len(tokenizer), size.block, seed), size.steps,
                    size.batch * size.block, self.recipe, batches.per_epoch, 1, self.device)
            for name in names
        ]  # fmt: skip
        times = {name: [] for name in names}
        for i in range(CALIBRATION_STEPS):
            for run in runs:
                before = run.seconds
                train_step(run, batches(i), lm_loss, self.recipe.max_grad_norm, self.device)
                if i >= CALIBRATION_STEPS // 4:  # the first steps warm the allocator and caches
                    times[run.name].append(run.seconds - before)
        return {name: statistics.median(t) for name, t in times.items()}

    def part_time(self):
        seed = self.args.seeds[0]
        # a continued part keeps the step times measured when it started: its runs were planned from them
        step_times = (self.saved_context("equal time") or {}).get("step_times")
        step_times = step_times or self.step_seconds(self.args.models, seed)
        budget = self.args.time_budget or step_times["gpt2"] * self.main_steps()
        runs = self.text_comparison(self.args.models, seed, budget=budget, step_times=step_times,
                                    desc="equal time", context={"step_times": step_times})  # fmt: skip
        self.results["equal_time"] = {
            "budget_seconds": budget,
            "budget_from": "--time_budget"
            if self.args.time_budget
            else (f"GPT-2's median step time (measured at the start of this part) x {self.main_steps()} steps"),
            "schedule": "the recipe's (5% warm-up, cosine) over the budget's seconds: each step's learning rate is "
            "the schedule at the fraction of the budget the model's own clock has spent",
            "planned_from": f"planned_steps: the budget over each model's median step time ({CALIBRATION_STEPS} "
            "steps in turn at the start), an estimate",
            "measured_step_seconds": step_times,
            "runs": [run_record(r, "validation_bits_per_byte") for r in runs.values()],
        }

    def part_ablation(self):
        seed, size = self.args.seeds[0], self.size
        names = {s: "aft-simple" if s == 0 else f"aft-local/s={s}" for s in WINDOWS}
        reused, main = {}, self.main_records()
        for s in WINDOWS:  # the equal-steps runs that are points of the ablation (same recipe and seed)
            main_name = "aft-simple" if s == 0 else "aft-local" if s == size.window else None
            if main_name in main:
                reused[s] = main[main_name]
        to_train = [names[s] for s in WINDOWS if s not in reused]
        windows = {names[s]: s for s in WINDOWS if s}
        runs = {}
        if to_train:
            runs = self.text_comparison(
                to_train, seed, windows=windows, last=self.main_steps(), desc="window ablation"
            )
        points = []
        for s in WINDOWS:
            if s in reused:
                points.append({**reused[s], "window": s, "reused_from_equal_steps": True})
            else:
                run = runs[names[s]]
                points.append(run_record(run, "validation_bits_per_byte", window=s, reused_from_equal_steps=False))
        self.results["window_ablation"] = {
            "steps": self.main_steps(),
            "block_size": size.block,
            "points": points,
            "paper": {"windows": PAPER_WINDOWS, "transformer": PAPER_TRANSFORMER, "setting": PAPER_SETTING},
        }

    # images

    def part_pixels(self):
        """AFT-local against GPT-2 on digits as sub-pixel sequences (run_pixel_modeling.py's)."""
        data = digits(self.size)
        processor = image_processor(data["train"][0][:1], None)
        seqs = {s: torch.from_numpy(to_sequences(data[s][0], processor)) for s in ("train", "validation")}
        length = seqs["train"].shape[1]
        records = []
        for seed in self.args.seeds:
            batches = Batches({"input_ids": seqs["train"]}, self.size.image_batch, seed, self.device)
            held_out = eval_batches({"input_ids": seqs["validation"]}, self.device)
            runs = []
            for name in SEED_MODELS:
                model = build_lm(name, self.size, START + 1, length, seed)
                runs.append(new_run(name, seed, model, self.size.image_steps, self.size.image_batch * length,
                                    self.recipe, batches.per_epoch, self.size.eval_points, self.device))  # fmt: skip

            def bits_per_dim(model, held_out=held_out):  # the mean negative log2-likelihood of every sub-pixel
                return next_token_cross_entropy(model, held_out, self.accelerator, self.metric)["bits_per_token"]

            desc = f"pixels, seed {seed}"
            train_in_turn(runs, batches, lm_loss, bits_per_dim, max_grad_norm=self.recipe.max_grad_norm,
                          device=self.device, load=self.load, desc=desc, on_step=self.count_step,
                          checkpoint=self.checkpoint(desc, runs))  # fmt: skip
            records += [run_record(r, "validation_bits_per_dim", validation_bits_per_dim=r.curve[-1]["value"])
                        for r in runs]  # fmt: skip
        self.results["pixels"] = {
            "data": f"scikit-learn digits, {DIGITS_SIDE}x{DIGITS_SIDE} grey: a start token then 64 sub-pixels "
            "(training_pixels.to_sequences)",
            "images": {s: len(seqs[s]) for s in seqs},
            "sequence_length": length,
            "steps": self.size.image_steps,
            "batch_size": self.size.image_batch,
            "runs": records,
        }

    def part_classify(self):
        """AFT-conv against ViT on digits classification, on the same normalised pixels."""
        data = digits(self.size)
        processor = aft_image_processor(build_classifier("aft-conv", self.size, 0).config)
        processor.image_mean, processor.image_std = [0.5], [0.5]  # one grey channel
        tensors = {
            s: {"pixel_values": processor(data[s][0], return_tensors="pt")["pixel_values"], "labels": data[s][1]}
            for s in ("train", "validation")
        }
        records = []
        metrics = {"loss": self.metric, "metric": load_metric("accuracy")}
        for seed in self.args.seeds:
            batches = Batches(tensors["train"], self.size.image_batch, seed, self.device)
            held_out = eval_batches(tensors["validation"], self.device)
            runs = [
                new_run(name, seed, build_classifier(name, self.size, seed), self.size.image_steps,
                        self.size.image_batch, self.recipe, batches.per_epoch, self.size.eval_points, self.device)
                for name in ("vit", "aft-conv")
            ]  # fmt: skip

            def accuracy(model, held_out=held_out):
                return evaluate_classifier(model, held_out, self.accelerator, metrics, 0)["eval_accuracy"]

            desc = f"classification, seed {seed}"
            train_in_turn(runs, batches, lambda model, batch: model(**batch).loss, accuracy,
                          max_grad_norm=self.recipe.max_grad_norm, device=self.device, load=self.load, desc=desc,
                          on_step=self.count_step, checkpoint=self.checkpoint(desc, runs))  # fmt: skip
            records += [run_record(r, "validation_accuracy", validation_accuracy=r.curve[-1]["value"]) for r in runs]
        self.results["classification"] = {
            "data": f"scikit-learn digits, {DIGITS_SIDE}x{DIGITS_SIDE} grey, patches of {DIGITS_PATCH}x{DIGITS_PATCH}",
            "images": {s: len(tensors[s]["labels"]) for s in tensors},
            "steps": self.size.image_steps,
            "batch_size": self.size.image_batch,
            "aft_conv": "3x3 kernel, one head per channel; global average pooling, no class token or position "
            "embedding",
            "runs": records,
        }

    # models of the main comparison

    def save_models(self):
        """The equal-steps models as complete folders (weights, config, tokenizer); their cards come at the end."""
        tokenizer = self.load_text()[0]
        # the tokenizer's special tokens, which training never reads: generate() stops at eos, and run_clm.py and
        # convert_to_aft.py accept the folder as a model for this tokenizer
        special = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
        for name, run in self.main_runs.items():
            final = self.output_dir / name
            tmp = self.output_dir / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            for config in (run.model.config, run.model.generation_config):
                for key, value in special.items():
                    setattr(config, key, value)
            run.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)

    def write_cards(self):
        for name, record in self.main_records().items():
            if (self.output_dir / name / "config.json").is_file():
                write_card(self.output_dir / name, name, record["seed"], self.results)

    def run(self):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.args.resume:
            self.resume()
        else:  # an overwritten folder's checkpoints are of another study
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            self.save_results()  # before the first part: a study stopped in it can be continued with --resume
        for part in PARTS:
            if part in self.args.parts and part not in self.done:
                logger.info(f"part {part}")
                self.part_started, self.part_checkpoints = time.time(), []
                getattr(self, f"part_{part}")()
                self.done.append(part)
                # what each part took here, so that its cost can be read off the kept results (a part run again
                # from its start counts its last run; a continued one the stopped process's up to its checkpoint)
                self.results.setdefault("part_seconds", {})[part] = time.time() - self.part_started
                self.results["summary"] = summarize(self.results)
                self.save_results()
                for path in self.part_checkpoints:  # the part's figures are in results.json now
                    path.unlink(missing_ok=True)
        if self.checkpoints.is_dir() and not any(self.checkpoints.iterdir()):
            self.checkpoints.rmdir()
        self.write_cards()
        self.results["complete"] = True
        self.save_results()
        write_plots(self.results, self.output_dir)
        print(json.dumps(self.results["summary"], indent=1))


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss


def corpus_name(args) -> str:
    if args.enwik8_file:
        return "enwik8 (90M/5M/5M split)"
    if args.dataset_name:
        return f"{args.dataset_name} {args.dataset_config_name or ''}".strip()
    if args.train_file:
        return f"local text ({Path(args.train_file).name})"
    return (
        f"the Python {platform.python_version()} standard library's top-level .py files (training_data.stdlib_corpus)"
    )


PAPER_SETTING = "24 layers x 256 wide AFT-local, enwik8, T = 1024, test bits per character (Zhai et al. 2021)"


# 5. summary: the table and the answers


def spread(values: list) -> float:
    """Half the range of the seeds' values (0 for one seed)."""
    return (max(values) - min(values)) / 2


def by_model(runs: list, key: str) -> dict:
    """{model: {"mean", "spread", "values", "seeds"}} of `key` over each model's runs."""
    out = {}
    for run in runs:
        out.setdefault(run["model"], {"values": [], "seeds": []})
        out[run["model"]]["values"].append(run[key])
        out[run["model"]]["seeds"].append(run["seed"])
    for entry in out.values():
        entry["mean"], entry["spread"] = statistics.fmean(entry["values"]), spread(entry["values"])
    return out


def ranking_history(runs: list) -> list:
    """The models ordered by their learning-curve value at each shared evaluation point (lower is better)."""
    points = []
    for i in range(min(len(r["curve"]) for r in runs)):
        values = {r["model"]: r["curve"][i]["value"] for r in runs}
        points.append({"step": runs[0]["curve"][i]["step"], "ranking": sorted(values, key=values.get)})
    return points


def summarize(results: dict) -> dict:
    summary = {}
    steps = results.get("equal_steps")
    if steps and steps["runs"]:
        summary["equal_steps"] = {
            "test_bits_per_byte": by_model(steps["runs"], "test_bits_per_byte"),
            "tokens_per_second": by_model(steps["runs"], "tokens_per_second"),
        }
        first = [r for r in steps["runs"] if r["seed"] == steps["runs"][0]["seed"]]
        if len({len(r["curve"]) for r in first}) == 1:
            history = ranking_history(first)
            settled = next(i for i in range(len(history)) if all(
                h["ranking"] == history[-1]["ranking"] for h in history[i:]))  # fmt: skip
            summary["equal_steps"]["ranking"] = {"history": history, "unchanged_since_step": history[settled]["step"]}
        test = summary["equal_steps"]["test_bits_per_byte"]
        if "gpt2" in test and "aft-local" in test:
            gap = test["aft-local"]["mean"] - test["gpt2"]["mean"]
            gpt2 = {r["seed"]: r for r in steps["runs"] if r["model"] == "gpt2"}
            local = {r["seed"]: r for r in steps["runs"] if r["model"] == "aft-local"}
            gap_curves = {
                seed: [
                    {"step": a["step"], "gap": b["value"] - a["value"]}
                    for a, b in zip(gpt2[seed]["curve"], local[seed]["curve"], strict=False)
                ]
                for seed in gpt2
                if seed in local
            }
            summary["question_equal_steps"] = {
                "question": f"at equal steps, is AFT-local within {TOLERANCE} bits per byte of GPT-2 (test)?",
                "aft_local_minus_gpt2": gap,
                "seeds": len(test["aft-local"]["values"]),
                "holds": gap <= TOLERANCE,
                "validation_gap_curve": gap_curves,
                "gpt2_ahead_from_step": {seed: ahead_from(curve) for seed, curve in gap_curves.items()},
            }
    timed = results.get("equal_time")
    test = {r["model"]: r["test_bits_per_byte"] for r in timed["runs"]} if timed else {}
    if "gpt2" in test and "aft-local" in test:
        best = min(test, key=test.get)
        gap = test["aft-local"] - test["gpt2"]
        summary["question_equal_time"] = {
            "question": "at equal wall-clock time on this machine, which is ahead (test bits per byte), by how much?",
            "budget_seconds": timed["budget_seconds"],
            "test_bits_per_byte": test,
            "steps": {r["model"]: r["steps"] for r in timed["runs"]},
            "aft_local_minus_gpt2": gap,
            "ahead": "aft-local" if gap < 0 else "gpt2",
            "by": abs(gap),
            "best_model": best,
        }
    sweep = results.get("lr_sweep")
    if sweep:
        summary["lr_sweep"] = {
            "chosen": sweep["chosen"],
            "validation_bits_per_byte": {
                m: {str(p["learning_rate"]): p["validation_bits_per_byte"] for p in sweep["points"] if p["model"] == m}
                for m in sweep["chosen"]
            },
        }
    ablation = results.get("window_ablation")
    if ablation:
        values = {p["window"]: p["test_bits_per_byte"] for p in ablation["points"]}
        summary["window_ablation"] = {"test_bits_per_byte": values, "best_window": min(values, key=values.get)}
    for part, key in (("pixels", "validation_bits_per_dim"), ("classification", "validation_accuracy")):
        if part in results:
            summary[part] = by_model(results[part]["runs"], key)
    return summary


# 6. model cards


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

{{ kind }}, trained by the evidence study of the `aft` project (`benchmarks/study.py`) side by side with
{{ others }}: the same data ({{ corpus }}), {{ tokenizer }}, blocks of {{ block }} tokens, recipe, seed,
batches and {{ steps }} optimizer steps.

**Scale**: a tiny model ({{ parameters }} parameters) trained on {{ device }}, not the paper's 8-GPU runs. The
figures compare the models with each other; they say nothing about large models.

## This model

{{ row }}

## The comparison

Equal optimizer steps (test bits per byte; mean and half-range over the seeds where there are several):

{{ table }}
{{ time_table }}
Every figure, the learning curves and the machine's load are in the study's `results.json`.

## Usage

{{ code_note }}

```bash
pip install {{ install }}
```

```python
{{ usage }}
```

## Training

```bash
{{ command }}
```

{{ recipe }}

## Limitations

{{ limitations }}
"""

RUN_TABLE_HEADER = ["model", "parameters", "steps", "tokens seen", "validation bpb", "test bpb", "train tokens/s",
                    "peak step MiB"]  # fmt: skip


def run_table(runs: list) -> str:
    """One row per run: its size, steps, final figures, speed and memory."""
    rows = [
        [f"{run['model']} (seed {run['seed']})", f"{run['parameters']:,}", f"{run['steps']:,}",
         f"{run['tokens_seen']:,}", f"{run['validation_bits_per_byte']:.4f}", f"{run['test_bits_per_byte']:.4f}",
         f"{run['tokens_per_second']:,.0f}", f"{run['peak_step_memory_bytes'] / 2**20:.1f}"]
        for run in runs
    ]  # fmt: skip
    return markdown_table(RUN_TABLE_HEADER, rows)


def comparison_table(results: dict) -> str:
    test = results["summary"]["equal_steps"]["test_bits_per_byte"]
    rows = [[m, len(v["values"]), f"{v['mean']:.4f} +- {v['spread']:.4f}"] for m, v in test.items()]
    return markdown_table(["model", "seeds", "test bits per byte"], rows)


def write_card(folder: Path, name: str, seed: int, results: dict):
    """The model card of a saved model of the equal-steps comparison, from the study's results alone."""
    row = next(r for r in results["equal_steps"]["runs"] if r["model"] == name and r["seed"] == seed)
    time_table = ""
    if "equal_time" in results:
        timed = results["equal_time"]
        time_table = (
            f"\nEqual wall-clock time ({timed['budget_seconds']:.4g} s of training per model, same machine, models "
            "trained in turn):\n\n" + run_table(timed["runs"]) + "\n"
        )
    is_aft = name != "gpt2"
    kind = f"An Attention Free Transformer (AFT-{name.removeprefix('aft-')})" if is_aft else "A GPT-2 (SDPA)"
    others = "GPT-2 and the other AFT variants" if is_aft else "the four AFT variants (full, local, simple, conv)"
    data = results["data"]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license="apache-2.0",
        tags=["aft", "attention-free-transformer", "evidence-study"] if is_aft else ["gpt2", "evidence-study"],
        model_name=name,
        eval_results=[
            EvalResult(
                task_type="text-generation",
                dataset_type="aft-study-corpus",
                dataset_name=data["corpus"],
                dataset_split=split,
                metric_type="bits_per_byte",
                metric_name=f"{split} bits per byte",
                metric_value=round(row[f"{split}_bits_per_byte"], 4),
            )
            for split in ("validation", "test")
        ],
    )
    recipe = results["recipe"]
    recipe_table = "\n".join(
        ["| hyper-parameter | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in recipe.items()]]
    )
    # the folder itself ("./gpt2", not the Hub's GPT-2), as remote code for AFT; as many new tokens as the
    # model's positions leave after the prompt
    model_id, remote = card_folder(folder.name), ", trust_remote_code=True" if is_aft else ""
    prompt = "def fibonacci(n):"
    config = json.loads((folder / "config.json").read_text())
    positions = config.get("max_position_embeddings") or config["n_positions"]
    new_tokens = max(1, min(100, positions - len(AutoTokenizer.from_pretrained(folder)(prompt)["input_ids"])))
    usage = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"tokenizer = AutoTokenizer.from_pretrained({model_id!r}{remote})\n"
        f"model = AutoModelForCausalLM.from_pretrained({model_id!r}{remote})\n"
        f'ids = tokenizer("{prompt}", return_tensors="pt").input_ids\n'
        f"print(tokenizer.decode(model.generate(ids, max_new_tokens={new_tokens}, do_sample=True, top_k=20)[0]))"
    )
    code_note = (
        "The model's code is saved next to its weights and loads as remote code (`trust_remote_code=True`), so no "
        "package but these is needed:"
        if is_aft
        else "A plain transformers GPT-2, in this folder (not the Hub's `gpt2`):"
    )
    command = shlex.split(results["command"])
    command = shlex.join(command[:1] + public_argv(command[1:], str(folder.parent), "benchmarks"))
    threads = results["machine"]["torch_threads"]
    card = ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        name=name,
        kind=kind,
        others=others,
        corpus=data["corpus"],
        tokenizer=data["tokenizer"],
        block=data["block_size"],
        steps=row["steps"],
        parameters=f"{row['parameters']:,}",
        device=results["machine"].get("gpu")
        or f"{results['machine']['cpus']} CPU cores ({threads} torch thread{'s' if threads != 1 else ''})",
        row=run_table([row]),
        table=comparison_table(results),
        time_table=time_table,
        code_note=code_note,
        install=shlex.join(CARD_REQUIREMENTS),
        usage=usage,
        command=command,
        recipe=recipe_table,
        limitations=(
            LIMITATIONS
            if is_aft
            else "A tiny baseline trained for the comparison, not a general-purpose language model."
        ),
    )
    card.save(folder / "README.md")


# 7. plots


COLORS = {"gpt2": "black", "aft-local": "tab:blue", "aft-simple": "tab:orange", "aft-conv": "tab:green"}
COLORS |= {"aft-full": "tab:red", "vit": "black", "aft-conv-vision": "tab:green"}


def write_plots(results: dict, folder: Path):
    """curves.png, final.png, window_ablation.png and images.png from a results dict (skipped without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return
    if "equal_steps" in results:
        plot_curves(plt, results, folder / "curves.png")
        plot_final(plt, results, folder / "final.png")
    if "window_ablation" in results:
        plot_ablation(plt, results, folder / "window_ablation.png")
    if "pixels" in results or "classification" in results:
        plot_images(plt, results, folder / "images.png")


def plot_curves(plt, results, path):
    panels = [("equal steps", "step", "optimizer step"), ("equal steps", "seconds", "training seconds (own clock)")]
    if "equal_time" in results:
        budget = results["equal_time"]["budget_seconds"]
        panels.append(("equal time", "seconds", f"training seconds (budget {budget:.4g} s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    first_seed = results["recipe"]["seeds"][0]
    for ax, (which, x, label) in zip(axes[0], panels, strict=True):
        runs = results["equal_steps" if which == "equal steps" else "equal_time"]["runs"]
        for run in runs:
            xs = [p[x] for p in run["curve"]]
            ys = [p["value"] for p in run["curve"]]
            style = "-" if run["seed"] == first_seed else ":"
            name = run["model"] + ("" if run["seed"] == first_seed else f" (seed {run['seed']})")
            ax.plot(xs, ys, style, color=COLORS.get(run["model"]), label=name, marker="." if style == "-" else None)
        ax.set_title(which)
        ax.set_xlabel(label)
        ax.set_ylabel("validation bits per byte")
        ax.grid(alpha=0.3)
        tail = [p["value"] for r in runs for p in r["curve"][len(r["curve"]) // 4 :]]
        if tail:
            ax.set_ylim(min(tail) - 0.05, max(tail) + 0.05)  # the untrained start would flatten the end
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{results['data']['corpus']}: validation bits per byte (lower is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_final(plt, results, path):
    summary = results["summary"]
    steps = summary["equal_steps"]["test_bits_per_byte"]
    models = list(steps)
    timed = {r["model"]: r["test_bits_per_byte"] for r in results.get("equal_time", {}).get("runs", [])}
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.38 if timed else 0.6
    xs = np.arange(len(models))
    means = [steps[m]["mean"] for m in models]
    ax.bar(xs - (width / 2 if timed else 0), means, width, yerr=[steps[m]["spread"] for m in models],
           label=f"equal steps ({results['equal_steps']['steps']})", color="tab:blue", capsize=3)  # fmt: skip
    if timed:
        ax.bar(xs + width / 2, [timed.get(m, np.nan) for m in models], width, color="tab:orange",
               label=f"equal time ({results['equal_time']['budget_seconds']:.4g} s)")  # fmt: skip
    values = means + list(timed.values())
    ax.set_ylim(min(values) - 0.1, max(values) + 0.05)
    ax.set_xticks(xs, models)
    ax.set_ylabel("test bits per byte (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("final test bits per byte; error bars: half-range over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def window_position(s: int) -> float:
    return 0.0 if s == 0 else 1 + math.log2(s)


def plot_ablation(plt, results, path):
    ablation = results["window_ablation"]
    fig, (ours, paper) = plt.subplots(1, 2, figsize=(11, 4))
    points = ablation["points"]
    ours.plot([window_position(p["window"]) for p in points], [p["test_bits_per_byte"] for p in points], "o-")
    gpt2 = [r for r in results.get("equal_steps", {}).get("runs", []) if r["model"] == "gpt2"]
    if gpt2:
        ours.axhline(gpt2[0]["test_bits_per_byte"], color="black", ls="--", label=f"GPT-2 (seed {gpt2[0]['seed']})")
        ours.legend(fontsize=8)
    ours.set_title(f"this study: AFT-local, block {ablation['block_size']}, {ablation['steps']} steps", fontsize=9)
    ours.set_ylabel("test bits per byte")
    paper_windows = {int(s): v for s, v in ablation["paper"]["windows"].items()}
    paper.plot([window_position(s) for s in paper_windows], list(paper_windows.values()), "s-", color="tab:gray")
    paper.axhline(ablation["paper"]["transformer"], color="black", ls="--", label="Transformer 24x256")
    paper.set_title("the paper: 24x256 AFT-local on enwik8, T = 1024", fontsize=9)
    paper.set_ylabel("test bits per character")
    paper.legend(fontsize=8)
    for ax, windows in ((ours, [p["window"] for p in points]), (paper, list(paper_windows))):
        ax.set_xticks([window_position(s) for s in windows], [str(s) for s in windows], fontsize=8)
        ax.set_xlabel("window s (0 = AFT-simple)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_images(plt, results, path):
    labels = {
        "pixels": "validation bits per dim (lower is better)",
        "classification": "validation accuracy (higher is better)",
    }
    parts = [(part, label) for part, label in labels.items() if part in results]
    fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 4), squeeze=False)
    first_seed = results["recipe"]["seeds"][0]
    for ax, (part, label) in zip(axes[0], parts, strict=True):
        for run in results[part]["runs"]:
            steps, values = [p["step"] for p in run["curve"]], [p["value"] for p in run["curve"]]
            style = "-" if run["seed"] == first_seed else ":"
            ax.plot(steps, values, style, color=COLORS.get(run["model"]), label=f"{run['model']} (seed {run['seed']})")
        ax.set_title(f"digits, {part}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(folder: Path):
    """--plot_only: the plots and the cards of the saved equal-steps models, from results.json alone."""
    try:
        results = json.loads((folder / "results.json").read_text())
        first, done = results["recipe"]["seeds"][0], results.get("parts_done")
        main_runs = [r for r in results.get("equal_steps", {"runs": []})["runs"] if r["seed"] == first]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"--plot_only: {folder / 'results.json'} is not a results.json of this study ({error})."
        ) from None
    if "equal_steps" not in results:  # a sweep alone, or a study stopped before its steps part
        raise InputError(
            f"--plot_only: {folder / 'results.json'} holds no equal-steps runs to plot (parts done: "
            f"{', '.join(done or []) or 'none'}; a stopped study continues with --resume)."
        )
    for record in main_runs:
        if (folder / record["model"] / "config.json").is_file():
            write_card(folder / record["model"], record["model"], first, results)
    write_plots(results, folder)


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        report(Path(args.output_dir))
        return
    size = check_args(args)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    # freed memory stays in the process for every model alike (allocator.py says why), unless --system_allocator
    tuned_allocator = not args.system_allocator and keep_freed_memory()
    Study(args, size, tuned_allocator).run()


if __name__ == "__main__":
    run_main(main)
