"""Publishing a run: the upload-ready output folder (weights, config and code, tokenizer or processor, results,
loss curve), the model card, and the Hub.

    card = CardInfo(task_type="text-generation", ..., usage=USAGE)      # what the script knows of its task
    save_outputs(run, tokenizer, results, card)                         # the folder, then --push_to_hub
"""

import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from training_args import InputError
from training_checkpoints import CHECKPOINTS_DIR
from training_model import count_parameters
from transformers import SchedulerType

logger = logging.getLogger(__name__)

MODEL_CARDS_DIR = Path(__file__).resolve().parent.parent / "model_cards"

LIMITATIONS = (
    "AFT is weaker than attention at long-range recall: AFT-conv reaches 28.2 perplexity on WikiText-103 at "
    "125M parameters, against 18.6 for a Transformer (Hyena paper, 2023). It is the right choice where speed, "
    "memory, long inputs or streaming (constant-size decoding state) matter more than exact recall over long "
    "contexts; it is not a drop-in replacement for attention on recall-heavy tasks."
)


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


def write_model_card(output_dir: Path, args, accelerator, model, results: dict, info: CardInfo):
    """README.md from model_cards/aft_model_card.md.jinja: metadata with a model-index of `info.metrics`, usage,
    the training command, hyper-parameters, results, limitations and citation."""
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


def save_outputs(run, processor, results: dict, info: CardInfo):
    """The upload-ready folder: weights, config and code, processor, generation config, results, plot, card; then
    the upload with --push_to_hub, and the end of tracking and of the process group."""
    accelerator, args = run.accelerator, run.args
    accelerator.wait_for_everyone()
    unwrapped = run.unwrapped_model
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        processor.save_pretrained(output_dir)
    unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if accelerator.is_main_process:
        results = {k: round(v, 6) if isinstance(v, float) else v for k, v in results.items()}
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2))
        (output_dir / "log_history.json").write_text(json.dumps(run.state.log_history, indent=1))
        plot_losses(run.state.log_history, output_dir / "loss_curve.png")
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
