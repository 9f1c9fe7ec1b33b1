"""AFT model configurations: `AFTConfig` for sequences (causal LM), `AFTVisionConfig` for images."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from .ops_aft import AFT_VARIANTS, implementations

QUERY_ACTIVATIONS = ("sigmoid", "relu")
POSITION_EMBEDDING_TYPES = ("absolute", "none")

_MIXER_ARGS = r"""
        hidden_size (`int`, defaults to 256): width d of the residual stream.
        num_hidden_layers (`int`, defaults to 12): number of blocks.
        intermediate_size (`int`, *optional*): MLP hidden width; defaults to 4 * hidden_size.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation.
        layer_norm_eps (`float`, defaults to 1e-5), initializer_range (`float`, defaults to 0.02): the standard
            deviation of the normal initialisation of the linear and embedding weights (>= 0).
        hidden_dropout_prob (`float`, defaults to 0.0): dropout on embeddings and on each residual branch.
        aft_variant (`str`): the token mixer, a name of `ops_aft.AFT_VARIANTS`: `"simple"`, `"local"`, `"conv"` or
            `"full"`.
        local_window_size (`int`, defaults to 32): window s of `local`: the bias is learned for |t - t'| < s and
            exactly 0 outside.
        position_bias_rank (`int`, defaults to 128): rank d' of the factorised bias w = u v^T (`full`, `local`).
        conv_kernel_size (`int`, defaults to 11): kernel size s of `conv`.
        num_heads (`int`, defaults to 8): heads of `conv` (one key scalar and one kernel per head).
        query_activation (`str`, defaults to `"sigmoid"`): sigma_q, `"sigmoid"` or `"relu"`.
        aft_implementation (`str`, defaults to `"torch"`): the registered implementation of the operator
            (`ops_aft.register_operator`); `"torch"` is the default every other one is tested against, `"exact"`
            and `"naive"` are its twins (slower); `"native"` runs C kernels built on first use where no gradient is
            needed (CPU inference: `simple`'s causal forward; the decoding step of `simple`, `local` and `conv`)
            and the torch form everywhere else."""


@strict
class AFTPreTrainedConfig(PreTrainedConfig):
    """The fields every AFT model has: the pre-LN Transformer around the token mixer, and the mixer itself. Not a
    model type of its own: use `AFTConfig` (sequences) or `AFTVisionConfig` (images)."""

    hidden_size: int = 256
    num_hidden_layers: int = 12
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    hidden_dropout_prob: float | int = 0.0
    aft_variant: str = "local"
    local_window_size: int = 32
    position_bias_rank: int = 128
    conv_kernel_size: int = 11
    num_heads: int = 8
    query_activation: str = "sigmoid"
    aft_implementation: str = "torch"

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        super().__post_init__(**kwargs)

    def _need(self, ok: bool, field: str, allowed: str):
        if not ok:
            raise ValueError(f"{type(self).__name__}.{field}={getattr(self, field)!r} is not allowed: {allowed}.")

    def validate_architecture(self):
        """Every cross-field check of the config, each naming the field, the value and what is allowed."""
        need = self._need
        need(self.aft_variant in AFT_VARIANTS, "aft_variant", f"use one of {tuple(AFT_VARIANTS)}")
        need(
            self.aft_implementation in implementations(self.aft_variant),
            "aft_implementation",
            f"use one registered for aft_variant={self.aft_variant!r}: {implementations(self.aft_variant)}",
        )
        need(self.query_activation in QUERY_ACTIVATIONS, "query_activation", f"use one of {QUERY_ACTIVATIONS}")
        need(self.hidden_act in ACT2FN, "hidden_act", "use an activation name from transformers.activations.ACT2FN")
        for field in ("hidden_size", "num_hidden_layers", "intermediate_size"):
            need(getattr(self, field) >= 1, field, "it must be a positive integer")
        need(0 <= self.hidden_dropout_prob < 1, "hidden_dropout_prob", "it must be in [0, 1)")
        need(self.layer_norm_eps > 0, "layer_norm_eps", "it must be > 0")
        need(self.initializer_range >= 0, "initializer_range", "it is a standard deviation: it must be >= 0")
        for ok, field, allowed in AFT_VARIANTS[self.aft_variant].checks(self):
            need(ok, field, allowed)


@strict
class AFTConfig(AFTPreTrainedConfig):
    r"""
    Configuration of an Attention Free Transformer (Zhai et al. 2021) over sequences: a pre-LN Transformer whose
    attention is replaced by an AFT token mixer (`AFTModel`, `AFTForCausalLM`).

    Args:
        vocab_size (`int`, defaults to 256): tokens in the vocabulary (256: byte level).{mixer}
        max_position_embeddings (`int`, defaults to 1024): positions of the learned absolute embeddings and of
            the `full`/`local` position bias; inputs must not be longer.
        position_embedding_type (`str`, defaults to `"absolute"`): `"absolute"` (learned) or `"none"`.
        use_cache (`bool`, defaults to `True`): return an `AFTCache` from `forward` for fast decoding.
        tie_word_embeddings (`bool`, defaults to `True`), pad_token_id, bos_token_id, eos_token_id: as in every
            transformers causal LM.

    Example:

    ```python
    >>> from aft import AFTConfig, AFTForCausalLM
    >>> config = AFTConfig(aft_variant="simple", num_hidden_layers=2)
    >>> model = AFTForCausalLM(config)
    ```
    """

    model_type = "aft"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 256
    max_position_embeddings: int = 1024
    position_embedding_type: str = "absolute"
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def validate_architecture(self):
        super().validate_architecture()
        need = self._need
        need(
            self.position_embedding_type in POSITION_EMBEDDING_TYPES,
            "position_embedding_type",
            f"use one of {POSITION_EMBEDDING_TYPES}",
        )
        for field in ("vocab_size", "max_position_embeddings"):
            need(getattr(self, field) >= 1, field, "it must be a positive integer")

    @property
    def has_position_limit(self) -> bool:
        """Whether inputs are limited to `max_position_embeddings` positions (absolute embeddings or a bias learned
        per position)."""
        return self.position_embedding_type == "absolute" or AFT_VARIANTS[self.aft_variant].position_bias

    @property
    def layer_types(self) -> list[str]:
        """What each layer's decoding state is, in transformers' cache terms: a fixed-size recurrent state
        ("linear_attention") or every past position ("full_attention", AFT-full)."""
        variant = AFT_VARIANTS.get(self.aft_variant)  # read by transformers before validation: no error here
        if variant is None:
            return None
        return ["linear_attention" if variant.constant_state else "full_attention"] * self.num_hidden_layers


@strict
class AFTVisionConfig(AFTPreTrainedConfig):
    r"""
    Configuration of an AFT image encoder and classifier (`AFTVisionModel`, `AFTForImageClassification`): patch
    embeddings, pre-LN AFT blocks that mix the patch grid non-causally, global average pooling (no class token, no
    position embedding: the paper's AFT-conv).

    Args:{mixer}
        aft_variant (`str`, defaults to `"conv"`): `conv` and `simple` accept any image whose sides are multiples
            of `patch_size`; `full` and `local` learn one bias row per patch of the `image_size` grid
            ((image_size / patch_size)^2 rows) and accept only that size. The `conv` and `local` windows are
            `conv_kernel_size` x `conv_kernel_size` and `local_window_size` x `local_window_size` patches, centred
            on each patch.
        image_size (`int`, defaults to 224): side of the square images the model is built for; the saved image
            processor resizes to it.
        patch_size (`int`, defaults to 16): side of the square patches (the stride of the patch embedding).
        num_channels (`int`, defaults to 3): channels of the input images.

    Example:

    ```python
    >>> from aft import AFTForImageClassification, AFTVisionConfig
    >>> config = AFTVisionConfig(hidden_size=192, num_heads=192, image_size=224, num_labels=10)
    >>> model = AFTForImageClassification(config)
    ```
    """

    model_type = "aft_vision"

    aft_variant: str = "conv"
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3

    def validate_architecture(self):
        super().validate_architecture()
        for field in ("image_size", "patch_size", "num_channels"):
            self._need(getattr(self, field) >= 1, field, "it must be a positive integer")
        self._need(
            self.image_size % self.patch_size == 0,
            "image_size",
            f"it must be a multiple of patch_size={self.patch_size}",
        )

    @property
    def image_grid(self) -> tuple[int, int]:
        """(rows, columns) of patches of an `image_size` x `image_size` image."""
        side = self.image_size // self.patch_size
        return side, side


AFTConfig.__doc__ = AFTConfig.__doc__.replace("{mixer}", _MIXER_ARGS)
AFTVisionConfig.__doc__ = AFTVisionConfig.__doc__.replace("{mixer}", _MIXER_ARGS)

__all__ = ["AFTConfig", "AFTPreTrainedConfig", "AFTVisionConfig"]
