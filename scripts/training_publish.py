"""Publishing a run: the upload-ready output folder (weights, config and code, tokenizer or processor, results,
loss curve), the model card, and the Hub.

    card = CardInfo(task_type="text-generation", ..., usage=USAGE)      # what the script knows of its task
    save_outputs(run, tokenizer, results, card)                         # the folder, then --push_to_hub
"""

import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from accelerate.utils import DistributedType
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from training_args import InputError, RunError
from training_checkpoints import CHECKPOINTS_DIR, LOCK
from training_model import count_parameters

from aft.ops_aft import AFT_VARIANTS

logger = logging.getLogger(__name__)

MODEL_CARDS_DIR = Path(__file__).resolve().parent.parent / "model_cards"
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "gpt2", "openai-community/gpt2"
# What a card's usage code needs: the model's own code is saved next to its weights and loads as remote code.
CARD_REQUIREMENTS = ("transformers>=5.18", "torch")

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
    usage: str  # Python code using the saved folder; {model_id}, {prompt} and {prompts} become Python literals
    tags: list = dataclasses.field(default_factory=list)
    dataset_config: str | None = None
    example_prompts: list = dataclasses.field(default_factory=list)  # from the model's own data
    requirements: tuple = CARD_REQUIREMENTS  # what the usage code imports, as `pip install` arguments


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


def public_path(value: str) -> str:
    """A path as a card shows it: a relative path as given, an absolute one (or one climbing out with "..") by its
    name alone, so that no card names a folder of the machine it was written on."""
    path = Path(value)
    return path.name if path.is_absolute() or ".." in path.parts else value


def public_argv(argv: list, output_dir: str, script_dir: str = "scripts") -> list:
    """A command line as a card shows it: the script as `<script_dir>/<name>`, the output folder as the card's usage
    names it (card_folder) and any other absolute path by its name (public_path), in `--flag value` and
    `--flag=value` form alike."""
    output = Path(output_dir).resolve()

    def public(value: str) -> str:
        if value.startswith("-") and "=" in value:
            flag, _, path = value.partition("=")
            return f"{flag}={public(path)}"
        if not value or value.startswith("-"):
            return value
        return card_folder(value) if Path(value).resolve() == output else public_path(value)

    script = [f"{script_dir}/{Path(argv[0]).name}" if Path(argv[0]).is_absolute() else argv[0]] if argv else []
    return script + [public(value) for value in argv[1:]]


def hyperparameter_table(settings: dict, accelerator, num_parameters: int) -> str:
    """The card's table of the arguments as the run used them (`settings`, Run.settings) and of its processes."""
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
        "teacher_model",
        "distill_temperature",
        "distill_weight",
    ]
    paths = ("model_name_or_path", "teacher_model")
    rows = [(k, public_path(settings[k]) if k in paths else settings[k]) for k in keys if settings.get(k) is not None]
    global_batch = (
        settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"] * accelerator.num_processes
    )
    rows += [
        ("processes", accelerator.num_processes),
        ("distributed", accelerator.distributed_type.value),
        ("global batch size", global_batch),
        ("mixed precision", accelerator.mixed_precision),
        ("parameters", f"{num_parameters:,}"),
    ]
    return "\n".join(["| hyper-parameter | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


# The shipped Accelerate config of each distributed type (scripts/accelerate_configs/).
ACCELERATE_CONFIGS = {
    DistributedType.MULTI_GPU: "ddp.yaml",
    DistributedType.MULTI_CPU: "ddp.yaml",
    DistributedType.FSDP: "fsdp.yaml",
    DistributedType.DEEPSPEED: "deepspeed_zero{stage}.yaml",
}


def training_command(accelerator, output_dir: str) -> str:
    """The command line of this run (launcher, script and arguments) without the machine's absolute paths
    (public_argv), with a Hub token masked. Several processes are started with the shipped Accelerate config of
    the run's distributed type (on CPU with ACCELERATE_USE_CPU=true, which makes them gloo processes)."""
    argv = public_argv(list(sys.argv), output_dir)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--hub_token":
            argv[i + 1] = "<token>"
    argv = [a if not a.startswith("--hub_token=") else "--hub_token=<token>" for a in argv]
    launcher = ["python"]
    if accelerator.num_processes > 1:
        config = ACCELERATE_CONFIGS.get(accelerator.distributed_type, "ddp.yaml")
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            config = config.format(stage=accelerator.state.deepspeed_plugin.zero_stage)
        config_path = Path(argv[0]).parent / "accelerate_configs" / config
        launcher = ["accelerate", "launch", "--config_file", str(config_path)]
        launcher += ["--num_processes", str(accelerator.num_processes)]
        if accelerator.device.type == "cpu":
            launcher = ["ACCELERATE_USE_CPU=true", *launcher]
    elif accelerator.mixed_precision != "no":
        launcher = ["accelerate", "launch", "--num_processes", "1"]
    if accelerator.mixed_precision != "no":
        launcher += ["--mixed_precision", accelerator.mixed_precision]
    return shlex.join(launcher + argv)


def card_folder(output_dir: str) -> str:
    """A local model folder as a card's code names it: relative, as given (its name alone when given as an
    absolute path), and starting with "./", so that transformers reads the folder and never a Hub model of the
    same name (a folder "gpt2" is not OpenAI's GPT-2)."""
    return "./" + Path(public_path(str(output_dir))).as_posix().removeprefix("./")


def card_model_id(args, hub_repo_id: str | None) -> str:
    """What the card's usage code passes to from_pretrained: the Hub id when known (the repository uploaded to,
    else --hub_model_id), else the output folder (card_folder): never an absolute local path."""
    return hub_repo_id or args.hub_model_id or card_folder(args.output_dir)


def base_model_id(model_name_or_path: str | None) -> str | None:
    """The `base_model` of a fine-tuned model's card, which the Hub reads as a Hub id: the id the model was loaded
    from, or for a local folder the Hub id its own card names (`model_name` with an owner), else the Hub id of the
    model that folder came from (its card's `base_model`, e.g. the GPT-2 of a folder written by convert_to_aft.py);
    None when there is none (base_model_note says so on the card)."""
    if not model_name_or_path:
        return None
    path = Path(model_name_or_path)
    if not path.is_dir():
        return model_name_or_path if HUB_ID.fullmatch(model_name_or_path) else None
    if (path / "README.md").is_file():
        data = ModelCard.load(path / "README.md").data.to_dict()
        name, base = data.get("model_name"), data.get("base_model")
        if name and "/" in name and HUB_ID.fullmatch(name):
            return name
        if isinstance(base, str) and HUB_ID.fullmatch(base) and not Path(base).exists():  # not a local path
            return base
    return None


def model_reference(model_name_or_path: str) -> str:
    """A model as a card's prose names it: its Hub id (base_model_id), else its folder's name."""
    return base_model_id(model_name_or_path) or Path(model_name_or_path).resolve().name


def base_model_note(model_name_or_path: str | None) -> str:
    """The card's line saying why a model that started from another one has no `base_model`."""
    if not model_name_or_path or base_model_id(model_name_or_path):
        return ""
    return (
        f"\nThe card has no `base_model`: the run started from the local folder `{public_path(model_name_or_path)}`, "
        "which names no Hub id (in its card's `model_name` or `base_model`).\n"
    )


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


def tokens_to_generate(config, tokenizer, prompts: list, wanted: int) -> int:
    """At most `wanted` new tokens for the card's usage code, and no more than the model's positions leave after
    the longest of `prompts`."""
    if not config.has_position_limit:
        return wanted
    longest = max(len(tokenizer(prompt)["input_ids"]) for prompt in prompts or [""])
    return max(1, min(wanted, config.max_position_embeddings - longest))


def usage_code(info: CardInfo, model_id: str) -> str:
    """The card's usage code: the script's template with the model id and the example prompts filled in as Python
    literals (repr), so that no quote in a folder name or a prompt can break the code."""
    prompts = info.example_prompts or [""]
    code = info.usage.replace("{model_id}", repr(model_id)).replace("{prompts}", repr(prompts))
    return code.replace("{prompt}", repr(prompts[0]))


def write_model_card(output_dir: Path, run, results: dict, info: CardInfo):
    """README.md of `run` from model_cards/aft_model_card.md.jinja: metadata with a model-index of `info.metrics`,
    usage, the training command, hyper-parameters, results, limitations and citation."""
    args, accelerator, model = run.args, run.accelerator, run.unwrapped_model
    config = model.config
    hub_repo_id = run.run_plan.hub_repo_id
    model_id = card_model_id(args, hub_repo_id)
    name = hub_repo_id or args.hub_model_id or Path(args.output_dir).resolve().name
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
        base_model=base_model_id(args.model_name_or_path),
        eval_results=eval_results,
    )
    variant = AFT_VARIANTS[config.aft_variant]  # what the card says of the mixer comes from the variant table
    window = f", {variant.window_field}={getattr(config, variant.window_field)}" if variant.window_field else ""
    heads = f", {config.num_heads} heads" if variant.key_per_head else ""
    architecture = (
        f"{config.num_hidden_layers} layers x {config.hidden_size} wide, AFT-{variant.name}{window}{heads}: "
        f"{variant.summary}; decoding state {variant.decoding_state}"
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
        install=shlex.join(info.requirements),
        usage=usage_code(info, model_id),
        training_command=training_command(accelerator, args.output_dir),
        base_model_note=base_model_note(args.model_name_or_path),
        hyperparameters=hyperparameter_table(run.settings, accelerator, count_parameters(model)),
        results_table=results_table,
        limitations=LIMITATIONS,
    )
    card.save(output_dir / "README.md")


def save_outputs(run, processor, results: dict, info: CardInfo, images: dict | None = None):
    """The upload-ready folder: weights, config and code, processor, generation config, results, plot, card, and
    `images` ({file name: PIL image}, e.g. samples); then
    the upload with --push_to_hub, and the end of tracking and of the process group. Everything is written to a
    hidden folder inside OUTPUT_DIR first and moved into place file by file (os.replace) once all is written, so
    a failed write (disk full) changes nothing a previous run saved there (RunError)."""
    accelerator, args = run.accelerator, run.args
    output_dir = Path(args.output_dir)
    staging = output_dir / ".tmp-output"
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(run.model)  # the full weights, also when FSDP shards them
    unwrapped = run.unwrapped_model
    try:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            processor.save_pretrained(staging)
        accelerator.wait_for_everyone()
        unwrapped.save_pretrained(
            staging, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=state_dict
        )
        if accelerator.is_main_process:
            results = {k: round(v, 6) if isinstance(v, float) else v for k, v in results.items()}
            (staging / "all_results.json").write_text(json.dumps(results, indent=2))
            (staging / "log_history.json").write_text(json.dumps(run.state.log_history, indent=1))
            plot_losses(run.state.log_history, staging / "loss_curve.png")
            for name, image in (images or {}).items():
                image.save(staging / name)
            write_model_card(staging, run, results, info)
            for path in sorted(staging.iterdir()):
                os.replace(path, output_dir / path.name)
            staging.rmdir()
    except Exception as error:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise RunError(
            f"could not write the model folder {output_dir} ({reason}): the files of a previous run there are "
            "unchanged; the checkpoints under it (--checkpointing_steps) can be resumed once the problem is fixed."
        ) from error
    if accelerator.is_main_process:
        logger.info(f"saved the model folder {output_dir}: {json.dumps(results)}")
        if run.run_plan.hub_repo_id:
            HfApi(token=args.hub_token).upload_folder(
                repo_id=run.run_plan.hub_repo_id,
                folder_path=output_dir,
                commit_message="Upload AFT model trained with the aft scripts",
                ignore_patterns=[f"{CHECKPOINTS_DIR}/*", "runs/*", ".tmp-*", LOCK],
            )
            logger.info(f"uploaded to https://huggingface.co/{run.run_plan.hub_repo_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
