import pytest
import torch

from aft import AFTConfig
from aft.ops_aft import AFT_VARIANTS

VARIANTS = tuple(AFT_VARIANTS)  # every test over variants reads the variant table


def tiny_config(variant: str, **overrides) -> AFTConfig:
    """A model small enough for CPU tests in seconds, with every variant's knobs set small."""
    kwargs = {
        "aft_variant": variant,
        "vocab_size": 37,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 96,
        "local_window_size": 3,
        "position_bias_rank": 4,
        "conv_kernel_size": 3,
        "num_heads": 4,
        "pad_token_id": 0,
        "eos_token_id": None,
        "bos_token_id": None,
    }
    kwargs.update(overrides)
    return AFTConfig(**kwargs)


def enable_checkpointing(model):
    """Activation checkpointing under the name of the installed transformers (5.22 renamed the method)."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
