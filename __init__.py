"""Attention Free Transformer models for Hugging Face transformers.

Importing this package registers the `aft` model type with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

from .configuration_aft import AFTConfig, AFTPreTrainedConfig, AFTVisionConfig
from .modeling_aft import (
    AFTCache,
    AFTForCausalLM,
    AFTForImageClassification,
    AFTForImageClassificationFromAFTConfig,
    AFTModel,
    AFTPreTrainedModel,
    AFTVisionModel,
    aft_image_processor,
)

AutoConfig.register("aft", AFTConfig, exist_ok=True)
AutoConfig.register("aft_vision", AFTVisionConfig, exist_ok=True)
AutoModel.register(AFTConfig, AFTModel, exist_ok=True)
AutoModel.register(AFTVisionConfig, AFTVisionModel, exist_ok=True)
AutoModelForCausalLM.register(AFTConfig, AFTForCausalLM, exist_ok=True)
AutoModelForImageClassification.register(AFTVisionConfig, AFTForImageClassification, exist_ok=True)
# Image folders saved by aft 0.1 have model_type "aft": AFTForImageClassification reads them as AFTVisionConfig.
AutoModelForImageClassification.register(AFTConfig, AFTForImageClassificationFromAFTConfig, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["AFTCache", "AFTConfig", "AFTPreTrainedConfig", "AFTVisionConfig", "AFTForCausalLM", "AFTModel"]
__all__ += ["AFTPreTrainedModel"]
__all__ += ["AFTForImageClassification", "AFTVisionModel", "aft_image_processor"]
