"""The model a training script trains: an architecture by name (`PRESETS`), `--config_overrides`, or a saved model
(`--model_name_or_path`). No model logic: the classes come from the `aft` package.

    model = training_model.load_model(AFTForCausalLM, args, vocab_size=len(tokenizer))
    training_model.check_sequence_length(model.config, args.block_size, "--block_size")
"""

import argparse
import ast
import dataclasses
import json
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from training_args import InputError
from transformers import PreTrainedConfig
from transformers.utils import cached_file

from aft import AFTConfig

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


def check_model_name(name: str):
    """--model_name_or_path must be an AFT model (model_type "aft"): a model of another type would load as a new,
    randomly initialised AFT model with that folder's name. A GPT-2 is converted with convert_to_aft.py first."""
    if Path(name).exists() and not Path(name, "config.json").is_file():
        raise InputError(f"--model_name_or_path {name} has no config.json: pass a folder written by save_pretrained.")
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(name)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:300]
        raise InputError(f"--model_name_or_path {name}: cannot read its config ({reason}).") from error
    model_type = config_dict.get("model_type")
    if model_type != AFTConfig.model_type:
        convert = "scripts/convert_to_aft.py converts a GPT-2" if model_type == "gpt2" else "start from an AFT model"
        raise InputError(
            f"--model_name_or_path {name} is not an AFT model (model_type {model_type!r}, not "
            f"{AFTConfig.model_type!r}): {convert} into an AFT folder first, e.g. `python scripts/convert_to_aft.py "
            f"{name} outputs/aft-model --aft_variant local`, and pass that folder."
        )


# Written by convert_to_aft.py beside the weights: the parameters the conversion initialised rather than copied, by
# their state-dict names (as transformers' loading reports `missing_keys`). A file of its own, not a config field: it
# describes these weights, not the architecture, so a model saved after training (whose parameters have all been
# trained) carries no stale copy of it, and it travels to and from the Hub with the folder.
CONVERSION_RECORD = "conversion.json"


def save_conversion_record(folder: Path, new_parameters: list[str], **provenance):
    record = {"new_parameters": sorted(new_parameters), **provenance}
    (Path(folder) / CONVERSION_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def read_new_parameters(name: str) -> list[str] | None:
    """The new parameters that convert_to_aft.py recorded for the model folder or Hub id `name` (None: no record, a
    model that was not converted or was saved again since). InputError for a record that cannot be read."""
    try:
        path = cached_file(name, CONVERSION_RECORD, _raise_exceptions_for_missing_entries=False)
    except OSError as error:
        raise InputError(f"--model_name_or_path {name}: cannot look for its {CONVERSION_RECORD} ({error}).") from error
    if path is None:
        return None
    try:
        names = json.loads(Path(path).read_text())["new_parameters"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("not a list of names")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path} is not a record of convert_to_aft.py ({type(error).__name__}: {error}).") from error
    return names


# The schedules that can be split at the phase's end (training_loop.create_scheduler): a factor of the step.
UNSPLITTABLE_SCHEDULES = ("reduce_lr_on_plateau", "greedy")


def check_freeze_carried(args) -> list[str] | None:
    """The parameters --freeze_carried_steps N trains alone for the first N steps: the new ones of the converted
    model's record (None when N is 0). InputError, before any work, for a phase that cannot run."""
    steps = args.freeze_carried_steps
    if not steps:
        return None
    flag = f"--freeze_carried_steps={steps}"
    if not args.model_name_or_path:
        raise InputError(
            f"{flag} trains the parameters a conversion made new: pass --model_name_or_path with a folder written "
            "by scripts/convert_to_aft.py (a new model's parameters are all new)."
        )
    if args.max_train_steps is not None and steps >= args.max_train_steps:
        raise InputError(
            f"{flag} leaves no step of --max_train_steps={args.max_train_steps} to train every parameter: use "
            f"fewer than {args.max_train_steps}."
        )
    if args.lr_scheduler_type in UNSPLITTABLE_SCHEDULES:
        raise InputError(
            f"{flag}: --lr_scheduler_type {args.lr_scheduler_type} cannot restart after the phase; use one of "
            "linear, cosine, constant, constant_with_warmup, ... (a factor of the step)."
        )
    names = read_new_parameters(args.model_name_or_path)
    if names is None:
        raise InputError(
            f"{flag}: --model_name_or_path {args.model_name_or_path} has no {CONVERSION_RECORD}, the record of "
            "which parameters scripts/convert_to_aft.py made new: pass the folder the converter wrote (a model "
            "saved again since, e.g. by run_clm.py, has none: all its parameters were trained)."
        )
    if not names:
        raise InputError(
            f"{flag}: the conversion {args.model_name_or_path} made no parameter new (its {CONVERSION_RECORD} "
            "lists none): there is nothing to train alone; drop the flag."
        )
    return names


def carried_parameters(model, new_parameters: list[str]) -> list:
    """The parameters of `model` that are not in `new_parameters` (which must all be parameters of it)."""
    names = dict(model.named_parameters())
    unknown = sorted(set(new_parameters) - set(names))
    if unknown:
        raise InputError(
            f"{CONVERSION_RECORD} names parameters this model does not have: {', '.join(unknown)[:300]}: the record "
            "belongs to another model."
        )
    return [param for name, param in names.items() if name not in set(new_parameters)]


def load_model(model_class, args, **task_fields):
    """A new model from the preset, or a saved one from --model_name_or_path (whose config must fit the task)."""
    if not args.model_name_or_path:
        return model_class(build_config(args, model_class.config_class, **task_fields))
    model = model_class.from_pretrained(args.model_name_or_path)
    for name, value in task_fields.items():
        if name in ("id2label", "label2id", "max_position_embeddings"):
            continue
        if name == "vocab_size" and model.config.vocab_size >= value:  # a vocabulary padded beyond the tokenizer
            continue
        if getattr(model.config, name) != value:
            raise InputError(
                f"--model_name_or_path {args.model_name_or_path} has {name}={getattr(model.config, name)!r}, "
                f"but this data needs {name}={value!r}."
            )
    return model


def check_sequence_length(config: AFTConfig, length: int, what: str):
    """Refuse sequences longer than the model's positions (absolute embeddings or a `full`/`local` bias)."""
    if config.has_position_limit and length > config.max_position_embeddings:
        raise InputError(
            f"{what} is {length}, larger than the model's max_position_embeddings={config.max_position_embeddings}: "
            "lower it, or build the model with --config_overrides max_position_embeddings=N."
        )


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
