"""Attention Free Transformer models for Hugging Face transformers.

Importing this package registers the `aft` model type with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_aft import AFTConfig
from .modeling_aft import AFTCache, AFTForCausalLM, AFTModel, AFTPreTrainedModel

AutoConfig.register("aft", AFTConfig, exist_ok=True)
AutoModel.register(AFTConfig, AFTModel, exist_ok=True)
AutoModelForCausalLM.register(AFTConfig, AFTForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["AFTCache", "AFTConfig", "AFTForCausalLM", "AFTModel", "AFTPreTrainedModel"]
