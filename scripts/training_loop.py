"""The training run: the Accelerator, AdamW and the schedule, and `Run`, which holds the prepared objects, trains,
logs and checkpoints. Processes and mixed precision come from `accelerate launch` / `accelerate config`.

    args, run_plan = parse_args()                           # run_plan: training_checks.RunPlan
    accelerator = create_accelerator(args, run_plan)
    ...                                                     # data, model, data loaders
    run = Run.prepare(accelerator, args, run_plan, model, train_dataloader, eval_dataloader, project_name="aft_clm")
    run.train(compute_loss=lambda model, batch: model(**batch).loss, evaluate=validation_metrics)
    results = validation_metrics() | run.results(len(train_dataset), len(eval_dataset))
"""

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from allocator import keep_freed_memory
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from training_args import InputError
from training_checkpoints import (
    RunState,
    claim_output_dir,
    data_identity,
    find_checkpoint,
    load_checkpoint,
    model_identity,
    read_lock,
    save_checkpoint,
)
from training_model import carried_parameters, count_parameters
from transformers import get_scheduler

logger = logging.getLogger(__name__)


def is_tied_weight_notice(record: logging.LogRecord) -> bool:
    """accelerate's "Removed shared tensor {'lm_head.weight'} while saving ... check by verifying that you don't
    receive any warning while reloading": lm_head is tied to embed_tokens, so saving it once is right, and the
    resume tests check the reload."""
    return "Removed shared tensor" in record.getMessage()


def setup_logging(accelerator):
    """INFO from the scripts on the main process; warnings only from datasets, transformers and accelerate (whose
    INFO lines name every file of every checkpoint)."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
    )
    for name in ("datasets", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").addFilter(lambda record: not is_tied_weight_notice(record))


def create_accelerator(args, run_plan) -> Accelerator:
    """The Accelerator (processes and mixed precision come from `accelerate launch` / `accelerate config`), after
    the main process has locked --output_dir for this run (InputError naming the run writing it, if any), as the
    run resuming `run_plan.checkpoint` (training_checks.RunPlan) when there is one."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=getattr(args, "mixed_precision", None),
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # one shuffle order per epoch
    )
    setup_logging(accelerator)
    if accelerator.is_main_process:
        claim_output_dir(args.output_dir, run_plan.checkpoint)
    accelerator.wait_for_everyone()
    if accelerator.device.type == "cpu" and not args.system_allocator and keep_freed_memory():
        logger.info("glibc keeps freed memory in the process (--system_allocator leaves it alone)")
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        and accelerator.distributed_type != DistributedType.FSDP
    ):
        logger.warning(
            f"accelerate applies FSDP only on accelerators: these processes run {accelerator.distributed_type.value}."
        )
    set_seed(args.seed)
    return accelerator


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


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """How long a run trains (plan_steps): its optimizer steps, the epochs they take, the warm-up steps, and the
    optimizer steps of one epoch; with a first phase (--freeze_carried_steps) its steps and its own warm-up, the
    warm-up steps then being those of the steps after it."""

    max_train_steps: int
    num_train_epochs: int
    num_warmup_steps: int
    steps_per_epoch: int
    phase_steps: int = 0
    phase_warmup_steps: int = 0

    def as_args(self) -> dict:
        """The planned values under the names of the arguments they complete (--max_train_steps, ...)."""
        names = ("max_train_steps", "num_train_epochs", "num_warmup_steps")
        return {name: getattr(self, name) for name in names}


def plan_steps(args, batches_per_epoch: int) -> StepPlan:
    """The run's steps from --max_train_steps (default: --num_train_epochs epochs), --num_train_epochs (the epochs
    the steps take), --num_warmup_steps (default: 5% of the steps) and --freeze_carried_steps (the phase's steps;
    the phase and the steps after it each warm up, by --num_warmup_steps or 5% of their own steps); `args` is left
    as it is."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps
    if max_train_steps is None:
        max_train_steps = args.num_train_epochs * steps_per_epoch
    phase_steps = getattr(args, "freeze_carried_steps", 0)
    if phase_steps >= max_train_steps:
        raise InputError(
            f"--freeze_carried_steps={phase_steps} leaves no step of the run's {max_train_steps} to train every "
            f"parameter: use fewer than {max_train_steps}."
        )

    def warmup(steps: int) -> int:
        return math.ceil(0.05 * steps) if args.num_warmup_steps is None else args.num_warmup_steps

    return StepPlan(
        max_train_steps,
        math.ceil(max_train_steps / steps_per_epoch),
        warmup(max_train_steps - phase_steps),
        steps_per_epoch,
        phase_steps,
        warmup(phase_steps) if phase_steps else 0,
    )


def create_scheduler(optimizer, args, steps: StepPlan, num_processes: int):
    """--lr_scheduler_type over the run's steps; with a first phase, over the phase's steps and then again, warm-up
    included, over the steps after it: the carried parameters join with fresh AdamW moments, whose first updates
    are a full learning rate per weight, so they get a warm-up of their own, as a run started from the phase's
    weights would."""

    def schedule(num_warmup_steps: int, num_training_steps: int):
        # Accelerate's prepared scheduler advances once per process at each optimizer step: scale the step counts.
        return get_scheduler(
            name=args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=num_warmup_steps * num_processes,
            num_training_steps=num_training_steps * num_processes,
        )

    if not steps.phase_steps:
        return schedule(steps.num_warmup_steps, steps.max_train_steps)
    phase = schedule(steps.phase_warmup_steps, steps.phase_steps)
    rest = schedule(steps.num_warmup_steps, steps.max_train_steps - steps.phase_steps)
    end = steps.phase_steps * num_processes

    # plain functions: LambdaLR's state (a checkpoint's) is then its step alone, rebuilt from the arguments on resume
    def factor(step, phase_factor, rest_factor):
        return phase_factor(step) if step < end else rest_factor(step - end)

    factors = [
        lambda step, a=a, b=b: factor(step, a, b) for a, b in zip(phase.lr_lambdas, rest.lr_lambdas, strict=True)
    ]
    return LambdaLR(optimizer, factors)


def run_settings(args, run_plan, steps: StepPlan) -> dict:
    """The arguments as the run uses them: the parsed ones, with the values the start-up checks settled
    (training_checks.RunPlan) and those the step plan completes."""
    return vars(args) | run_plan.as_args() | steps.as_args()


def init_tracking(accelerator, settings: dict, project_name: str):
    if settings["with_tracking"]:
        hyperparameters = {k: v for k, v in settings.items() if isinstance(v, int | float | str | bool)}
        hyperparameters.pop("hub_token", None)
        accelerator.init_trackers(project_name, hyperparameters)


def resume_position(completed_steps: int, steps_per_epoch: int, gradient_accumulation_steps: int):
    """(epoch, batches of that epoch already consumed) after `completed_steps` optimizer steps."""
    epoch, steps_in_epoch = divmod(completed_steps, steps_per_epoch)
    return epoch, steps_in_epoch * gradient_accumulation_steps


def checkpoint_name(args, step: int, epoch: int, end_of_epoch: bool) -> str | None:
    """The checkpoint to write after optimizer step `step`, if any: `step_N` every --checkpointing_steps N, or
    `epoch_K` at the end of each epoch with --checkpointing_steps epoch (never both, never a partial epoch)."""
    if args.checkpointing_steps == "epoch":
        return f"epoch_{epoch}" if end_of_epoch else None
    if args.checkpointing_steps is not None and step % int(args.checkpointing_steps) == 0:
        return f"step_{step}"
    return None


# The arguments a resumed run must share with the saved one (with the batch size, accumulation, processes and
# the number of batches per epoch): together they fix the data order, the schedule and so the losses.
PLAN_ARGS = (
    "max_train_steps",
    "num_warmup_steps",
    "lr_scheduler_type",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "seed",
)


def as_loss_and_terms(output) -> tuple[torch.Tensor, dict]:
    """What `compute_loss` returns, as (loss, {name: term}): a bare loss has no terms."""
    return output if isinstance(output, tuple) else (output, {})


@dataclasses.dataclass
class Run:
    """One training run: the prepared model, optimizer, schedule and data loaders, and its progress (`state`).
    Build it with `Run.prepare`; `train` runs the loop, `log` records metrics, `results` sums the run up."""

    accelerator: Accelerator
    args: object
    run_plan: object  # training_checks.RunPlan: the checkpoint resumed, the Hub repository
    model: object  # the prepared (wrapped) model; `unwrapped_model` is the PreTrainedModel
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    train_dataloader: object
    eval_dataloader: object
    steps: StepPlan
    state: RunState
    frozen_during_phase: list = dataclasses.field(
        default_factory=list
    )  # the carried parameters (--freeze_carried_steps)

    @classmethod
    def prepare(
        cls, accelerator, args, run_plan, model, train_dataloader, eval_dataloader, project_name: str, plan_args=()
    ) -> "Run":
        """Optimizer, scheduler, prepared objects, tracking, and the state of a resumed run
        (--resume_from_checkpoint); the run's steps (`steps`, plan_steps). `plan_args`: the script's own arguments
        that a resumed run must share with the saved one (besides PLAN_ARGS)."""
        if len(train_dataloader) == 0:
            raise InputError(
                f"{len(train_dataloader.dataset)} training examples make no full batch of "
                f"{args.per_device_train_batch_size}: lower --per_device_train_batch_size or add data."
            )
        model_config = model_identity(model.config)  # as built: a forward pass may still set fields
        if getattr(args, "gradient_checkpointing", False):
            # transformers 5.22 renamed the method; the floor has only the old name
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        # The phase drops the carried parameters' gradients before clipping and AdamW (`train`), rather than
        # setting requires_grad=False: DDP registers the parameters that need gradients when it wraps the model,
        # so a parameter frozen then would never be all-reduced after the phase, and one frozen later needs
        # find_unused_parameters=True (a search of the graph at every step of the run). A parameter without a
        # gradient gets no AdamW step at all (no moments, no weight decay) and no part in the clipping norm.
        frozen = (
            carried_parameters(model, run_plan.new_parameters) if getattr(run_plan, "new_parameters", None) else []
        )
        if frozen and accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise InputError(
                f"--freeze_carried_steps runs on one process or under DDP; under {accelerator.distributed_type.value} "
                "the gradients belong to the engine's shards, not to the parameters: launch with DDP."
            )
        optimizer = create_optimizer(model, args)
        model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
            model, optimizer, train_dataloader, eval_dataloader
        )
        steps = plan_steps(args, len(train_dataloader))
        lr_scheduler = accelerator.prepare(create_scheduler(optimizer, args, steps, accelerator.num_processes))
        settings = run_settings(args, run_plan, steps)
        init_tracking(accelerator, settings, project_name)
        plan = {
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_processes": accelerator.num_processes,
            "batches_per_epoch": len(train_dataloader),
            **{name: settings[name] for name in (*PLAN_ARGS, *plan_args)},
            **data_identity(args),
        }
        if steps.phase_steps:
            plan["phase_parameters"] = sorted(run_plan.new_parameters)
        run_id = read_lock(args.output_dir).get("run_id", "")  # recorded by create_accelerator
        state = RunState(plan=plan, run_id=run_id, model_config=model_config)
        if args.resume_from_checkpoint:
            checkpoint = run_plan.checkpoint or find_checkpoint(args)
            state = load_checkpoint(accelerator, checkpoint, accelerator.unwrap_model(model).config, plan)
        return cls(
            accelerator,
            args,
            run_plan,
            model,
            optimizer,
            lr_scheduler,
            train_dataloader,
            eval_dataloader,
            steps,
            state,
            frozen,
        )

    @property
    def settings(self) -> dict:
        """The arguments as the run uses them (run_settings)."""
        return run_settings(self.args, self.run_plan, self.steps)

    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def global_batch_size(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * self.accelerator.num_processes

    def log(self, values: dict):
        """Append `values` at the current step to the log history, the console and the trackers."""
        values = {"step": self.state.completed_steps, **values}
        self.state.log_history.append(values)
        if self.accelerator.is_main_process:
            logger.info(json.dumps(values))
        self.accelerator.log({k: v for k, v in values.items() if k != "step"}, step=self.state.completed_steps)

    def save_checkpoint(self, name: str):
        save_checkpoint(self.accelerator, self.args.output_dir, name, self.state, self.unwrapped_model.config)

    def train(self, *, compute_loss: Callable, evaluate: Callable[[], dict]):
        """The training loop. `compute_loss(model, batch)` gives the mean loss of a batch, or (loss, {name: term})
        whose terms (e.g. the parts of a combined loss) are logged beside the loss, as their window means;
        `evaluate()` a dict of metrics, logged every --eval_steps, or without it at the end of each epoch but the
        last (the script evaluates after training). After each optimizer step, in this order: log the mean train
        loss of the window every --logging_steps and at the last step, evaluate, checkpoint; so a checkpoint holds
        everything logged up to its step, and the losses of the window not yet logged."""
        accelerator, args, model, state = self.accelerator, self.args, self.model, self.state
        optimizer, lr_scheduler = self.optimizer, self.lr_scheduler
        start_epoch, skip_batches = resume_position(
            state.completed_steps, self.steps.steps_per_epoch, args.gradient_accumulation_steps
        )
        # closed also when a step raises: a bar left open prints when it is garbage-collected, wherever
        # that is (a test runner's output after its summary)
        with tqdm(
            total=self.steps.max_train_steps,
            initial=state.completed_steps,
            disable=not accelerator.is_local_main_process,
        ) as progress:
            for epoch in range(start_epoch, self.steps.num_train_epochs):
                if state.completed_steps >= self.steps.max_train_steps:
                    break
                model.train()
                self.train_dataloader.set_epoch(epoch)
                batches = self.train_dataloader
                if epoch == start_epoch and skip_batches:  # a resumed run: the batches this epoch already used
                    batches = accelerator.skip_first_batches(self.train_dataloader, skip_batches)
                step_loss, step_terms = 0.0, {}
                for batch in batches:
                    with accelerator.accumulate(model):
                        loss, terms = as_loss_and_terms(compute_loss(model, batch))
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and state.completed_steps < self.steps.phase_steps:
                            for param in self.frozen_during_phase:  # the phase: no step for them (Run.prepare)
                                param.grad = None
                        if accelerator.sync_gradients and args.max_grad_norm > 0:  # HF Trainer's: <= 0 does not clip
                            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad()
                    step_loss += loss.detach() / args.gradient_accumulation_steps
                    for name, term in terms.items():
                        step_terms[name] = step_terms.get(name, 0.0) + term.detach() / args.gradient_accumulation_steps
                    if not accelerator.sync_gradients:
                        continue
                    state.completed_steps += 1
                    step = state.completed_steps
                    progress.update(1)
                    values = accelerator.gather(torch.stack([step_loss, *step_terms.values()])[None]).mean(0).tolist()
                    state.window_losses.append(values[0])
                    if step_terms:
                        state.window_terms.append(dict(zip(step_terms, values[1:], strict=True)))
                    step_loss, step_terms = 0.0, {}
                    end_of_epoch = step % self.steps.steps_per_epoch == 0
                    finished = step >= self.steps.max_train_steps
                    if step % args.logging_steps == 0 or finished:
                        window = float(np.mean(state.window_losses))
                        names = state.window_terms[0] if state.window_terms else {}
                        terms = {name: float(np.mean([t[name] for t in state.window_terms])) for name in names}
                        lr = lr_scheduler.get_last_lr()[0]
                        self.log({"loss": window, **terms, "learning_rate": lr, "epoch": epoch})
                        progress.set_postfix(loss=f"{window:.3f}")
                        state.window_losses, state.window_terms = [], []
                    due = step % args.eval_steps == 0 if args.eval_steps else end_of_epoch
                    if due and not finished:
                        self.log(evaluate())
                        model.train()
                    name = checkpoint_name(args, step, epoch, end_of_epoch)
                    if name:
                        self.save_checkpoint(name)
                    if finished:
                        break

    def results(self, num_train: int, num_eval: int) -> dict:
        """The run's summary for all_results.json: last logged train loss, steps, runtime, sizes."""
        train_losses = [e["loss"] for e in self.state.log_history if "loss" in e]
        return {
            "train_loss": train_losses[-1] if train_losses else float("nan"),
            "train_steps": self.state.completed_steps,
            "train_runtime": self.state.train_runtime(),
            "train_samples": num_train,
            "eval_samples": num_eval,
            "num_parameters": count_parameters(self.model),
        }
