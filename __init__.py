"""Attention Free Transformer models for Hugging Face transformers.

Importing this package registers the `aft` model type with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

from .configuration_aft import AFTConfig
from .modeling_aft import (
    AFTCache,
    AFTForCausalLM,
    AFTForImageClassification,
    AFTModel,
    AFTPreTrainedModel,
    AFTVisionModel,
    aft_image_processor,
)

AutoConfig.register("aft", AFTConfig, exist_ok=True)
AutoModel.register(AFTConfig, AFTModel, exist_ok=True)
AutoModelForCausalLM.register(AFTConfig, AFTForCausalLM, exist_ok=True)
AutoModelForImageClassification.register(AFTConfig, AFTForImageClassification, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["AFTCache", "AFTConfig", "AFTForCausalLM", "AFTModel", "AFTPreTrainedModel"]
__all__ += ["AFTForImageClassification", "AFTVisionModel", "aft_image_processor"]
