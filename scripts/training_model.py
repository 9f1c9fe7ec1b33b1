"""The model a training script trains: an architecture by name (`PRESETS`), `--config_overrides`, or a saved model
(`--model_name_or_path`). No model logic: the classes come from the `aft` package.

    model = training_model.load_model(AFTForCausalLM, args, vocab_size=len(tokenizer))
    training_model.check_sequence_length(model.config, args.block_size, "--block_size")
"""

import argparse
import ast
import dataclasses
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from training_args import InputError
from transformers import PreTrainedConfig

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
