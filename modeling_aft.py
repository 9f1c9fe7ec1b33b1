"""Attention Free Transformer (Zhai et al. 2021) models for transformers.

The token mixer math lives in `ops_aft.py`; this file is plumbing: projections, blocks, the recurrent cache and
the transformers heads.
"""

import os

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, logging
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
    ImageClassifierOutput,
)

from .configuration_aft import AFTConfig, AFTPreTrainedConfig, AFTVisionConfig
from .ops_aft import (
    AFTState,
    aft_conv,
    aft_conv_2d,
    aft_full,
    aft_local,
    aft_local_2d,
    aft_simple,
    aft_step,
    conv_kernel,
    conv_kernel_2d,
)

logger = logging.get_logger(__name__)

QUERY_ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu}


class AFTCacheLayer:
    """One layer's decoding state (an `ops_aft.AFTState`): O(d) for simple, O(s*d) for local and conv, O(t*d)
    for full. Every tensor has the batch first, so beam search and batch edits are one indexing each."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self):
        self.state: AFTState | None = None

    def _map(self, fn):
        if self.state is not None:
            self.state = AFTState(*(None if x is None else fn(x) for x in self.state))

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map(lambda x: x[indices])

    def reset(self):
        self.state = None

    def crop(self, tokens_to_remove: int):
        if tokens_to_remove:
            raise ValueError(
                f"AFTCache cannot remove {tokens_to_remove} tokens: a recurrent state cannot be rolled back."
            )

    def offload(self):
        pass

    def prefetch(self):
        pass

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.m.shape[0]

    def nbytes(self) -> int:
        return 0 if self.state is None else sum(x.numel() * x.element_size() for x in self.state if x is not None)


class AFTCache(Cache):
    """The recurrent state of every layer of an AFT model, as a transformers `Cache`.

    `get_seq_length()` counts the positions seen (padding included), as `generate()` expects. Beam search,
    `num_return_sequences` and batch selection act on every layer's state.
    """

    def __init__(self, config: AFTConfig):
        super().__init__(layers=[AFTCacheLayer() for _ in range(config.num_hidden_layers)])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reset(self):
        super().reset()
        self.seen_tokens = 0

    def nbytes(self) -> int:
        """Bytes held by all layers' states."""
        return sum(layer.nbytes() for layer in self.layers)


class AFTMixer(nn.Module):
    """The AFT token mixer in place of attention: q, k, v projections, the AFT operator, output projection.

    `ndim=1` mixes a sequence (causal or not); `ndim=2` mixes a patch grid, non-causally: `conv` has s x s kernels,
    `local` an s x s window, and `full`/`local` one bias row per patch of the `config.image_size` grid.
    """

    def __init__(self, config: AFTPreTrainedConfig, layer_idx: int, causal: bool = True, ndim: int = 1):
        super().__init__()
        if ndim not in (1, 2) or (ndim == 2 and causal):
            raise ValueError(
                f"AFTMixer supports ndim=1 (causal or not) and ndim=2 (non-causal); got {ndim=}, {causal=}."
            )
        self.variant = config.aft_variant
        self.layer_idx = layer_idx
        self.causal = causal
        self.ndim = ndim
        self.num_heads = config.num_heads if self.variant == "conv" else 1
        D = config.hidden_size
        self.head_dim = D // self.num_heads
        self.key_dim = 1 if self.variant == "conv" else D  # conv: one key scalar per head and position
        self.query_act = QUERY_ACTIVATIONS[config.query_activation]
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, self.num_heads * self.key_dim)
        self.v_proj = nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D)
        if self.variant in ("full", "local"):
            # Factorised position bias w_{t,t'} = pos_u[t] . pos_v[t'].
            positions = config.max_position_embeddings if ndim == 1 else config.image_grid[0] * config.image_grid[1]
            self.pos_u = nn.Parameter(torch.empty(positions, config.position_bias_rank))
            self.pos_v = nn.Parameter(torch.empty(positions, config.position_bias_rank))
        if self.variant == "conv":
            kernel_shape = (config.conv_kernel_size,) * ndim
            self.conv_weight = nn.Parameter(torch.empty(self.num_heads, *kernel_shape))
            self.conv_gamma = nn.Parameter(torch.zeros(self.num_heads))
            self.conv_beta = nn.Parameter(torch.zeros(self.num_heads))
        self.window = {
            "simple": 0,
            "local": config.local_window_size,
            "conv": config.conv_kernel_size,
            "full": None,
        }[self.variant]

    def forward(
        self,
        hidden_states,
        position_ids,
        attention_mask=None,
        cache_layer: AFTCacheLayer | None = None,
        grid: tuple[int, int] | None = None,
    ):
        """hidden_states (B, T, D). For ndim=2, `grid` = (Gh, Gw) with Gh * Gw == T, patches row by row, and
        `position_ids` None (the bias covers the whole `image_size` grid)."""
        B, T, _ = hidden_states.shape
        if (grid is not None) != (self.ndim == 2) or (grid is not None and grid[0] * grid[1] != T):
            raise ValueError(f"An ndim={self.ndim} AFTMixer got grid={grid} for {T} positions.")
        H = self.num_heads
        # 1. projections: q, v (B, T, H, Dh); k (B, T, H, Dk)
        q = self.query_act(self.q_proj(hidden_states)).view(B, T, H, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, H, self.key_dim)
        v = self.v_proj(hidden_states).view(B, T, H, self.head_dim)
        # 2. what the variant's bias needs: position factors (B|1, T, R) or the per-head kernel (H, s)
        kw = {}
        if self.variant in ("full", "local"):
            kw = {"pos_u": self.pos_u[position_ids], "pos_v": self.pos_v[position_ids]}
        elif self.variant == "conv":
            make_kernel = conv_kernel_2d if self.ndim == 2 else conv_kernel
            kw = {"kernel": make_kernel(self.conv_weight, self.conv_gamma, self.conv_beta)}
        # 3. mixing: over the patch grid; else parallel form from an empty state (training, prefill), else one step
        # per token
        state = cache_layer.state if cache_layer is not None else None
        if grid is not None:
            y, new_state = self._grid(q, k, v, grid, **kw), None
        elif state is None:
            y, new_state = self._parallel(q, k, v, attention_mask, return_state=cache_layer is not None, **kw)
        else:
            ys = []
            for t in range(T):  # position factors are per token; the conv kernel is shared by all
                step_kw = {name: x if name == "kernel" else x[:, t] for name, x in kw.items()}
                mask_t = None if attention_mask is None else attention_mask[:, t]
                y_t, state = aft_step(q[:, t], k[:, t], v[:, t], state, window=self.window, mask=mask_t, **step_kw)
                ys.append(y_t)
            y, new_state = torch.stack(ys, dim=1), state
        if cache_layer is not None:
            cache_layer.state = new_state
        # 4. output projection
        return self.o_proj(y.reshape(B, T, -1))

    def _parallel(self, q, k, v, mask, return_state, **kw):
        common = {"causal": self.causal, "mask": mask, "return_state": return_state}
        if self.variant == "simple":
            return aft_simple(q, k, v, **common)
        if self.variant == "local":
            return aft_local(q, k, v, kw["pos_u"], kw["pos_v"], self.window, **common)
        if self.variant == "full":
            return aft_full(q, k, v, kw["pos_u"], kw["pos_v"], **common)
        return aft_conv(q, k, v, kw["kernel"], **common)

    def _grid(self, q, k, v, grid, **kw):
        if self.variant == "simple":
            return aft_simple(q, k, v, causal=False)[0]
        if self.variant == "local":
            return aft_local_2d(q, k, v, kw["pos_u"], kw["pos_v"], self.window, grid)
        if self.variant == "full":
            return aft_full(q, k, v, kw["pos_u"], kw["pos_v"], causal=False)[0]
        return aft_conv_2d(q, k, v, kw["kernel"], grid)


class AFTMLP(nn.Module):
    def __init__(self, config: AFTPreTrainedConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.down_proj(self.act(self.up_proj(hidden_states)))


class AFTBlock(GradientCheckpointingLayer):
    """Pre-LN block: x + mixer(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: AFTPreTrainedConfig, layer_idx: int, causal: bool = True, ndim: int = 1):
        super().__init__()
        self.layer_idx = layer_idx
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mixer = AFTMixer(config, layer_idx, causal=causal, ndim=ndim)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = AFTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states,
        position_ids=None,
        attention_mask=None,
        past_key_values=None,
        use_cache=False,
        grid=None,
    ):
        cache_layer = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        mixed = self.mixer(self.ln_1(hidden_states), position_ids, attention_mask, cache_layer, grid=grid)
        hidden_states = hidden_states + self.dropout(mixed)
        return hidden_states + self.dropout(self.mlp(self.ln_2(hidden_states)))


class AFTPreTrainedModel(PreTrainedModel):
    config_class = AFTConfig
    config: AFTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AFTBlock"]
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AFTMixer):
            if hasattr(module, "pos_u"):  # the paper: u, v ~ N(0, 0.01^2)
                init.normal_(module.pos_u, mean=0.0, std=0.01)
                init.normal_(module.pos_v, mean=0.0, std=0.01)
            if hasattr(module, "conv_weight"):  # gamma = beta = 0: a fresh conv layer is per-head AFT-simple
                init.normal_(module.conv_weight, mean=0.0, std=self.config.initializer_range)
                init.zeros_(module.conv_gamma)
                init.zeros_(module.conv_beta)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # One saved folder serves AutoModel (the backbone of its kind) as well as the head's own Auto class.
        backbone = "AFTVisionModel" if self.config.model_type == AFTVisionConfig.model_type else "AFTModel"
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoModel": f"modeling_aft.{backbone}",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)


_IMAGE_ARCHITECTURES = {"AFTForImageClassification", "AFTVisionModel"}


def _vision_config(config: AFTPreTrainedConfig) -> AFTVisionConfig:
    """The config of an image model. A folder saved by aft 0.1 has an `AFTConfig` (model_type "aft") with the image
    fields; it is read into an `AFTVisionConfig` with the same values (re-save it to update the folder)."""
    # model_type, not isinstance: remote code can load the config module more than once (one class per copy).
    if config.model_type == AFTVisionConfig.model_type:
        return config
    if config.model_type != AFTConfig.model_type:
        raise TypeError(f"An AFT image model takes an AFTVisionConfig, got {type(config).__name__}.")
    logger.warning_once(
        "This image model's config has model_type 'aft' (saved by aft 0.1); reading it as an AFTVisionConfig "
        "(model_type 'aft_vision'). Save the model again to update the folder."
    )
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "auto_map", "transformers_version")}
    return AFTVisionConfig(**fields)


class AFTModel(AFTPreTrainedModel):
    """The bare causal AFT decoder: token (and optional absolute position) embeddings, AFT blocks, final norm."""

    def __init__(self, config: AFTConfig):
        if _IMAGE_ARCHITECTURES & set(getattr(config, "architectures", None) or ()):
            raise ValueError(
                f"This config describes an AFT image model (architectures={config.architectures}), not a sequence "
                "model. Load the folder with AutoModelForImageClassification or AFTVisionModel; a folder saved by aft "
                "0.1 (model_type 'aft') is converted by AFTForImageClassification.from_pretrained(folder)"
                ".save_pretrained(new_folder)."
            )
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        if config.position_embedding_type == "absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList([AFTBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: AFTCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if self.gradient_checkpointing and self.training:
            use_cache = False

        # 1. check the inputs before any work
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if past_key_values is not None and not isinstance(past_key_values, AFTCache):
            raise TypeError(f"`past_key_values` must be an AFTCache, got {type(past_key_values).__name__}.")
        B, T = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if (
            input_ids is not None
            and input_ids.numel()
            and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size)
        ):
            bad = input_ids.max() if input_ids.max() >= self.config.vocab_size else input_ids.min()
            raise ValueError(
                f"`input_ids` contains the id {int(bad)}, outside the vocabulary: ids must be in "
                f"[0, {self.config.vocab_size - 1}] (config.vocab_size={self.config.vocab_size})."
            )
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) not in {
            (B, T),
            (B, past + T),
        }:
            allowed = f"({B}, {T})" + (f" or ({B}, {past + T}) with the {past} cached positions" if past else "")
            raise ValueError(f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected {allowed}.")
        if position_ids is None:
            if attention_mask is not None and attention_mask.shape[1] == past + T:
                # Left padding must not shift positions: count real tokens.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=self.device)[None]
        if self.config.has_position_limit and T and int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"The input reaches position {int(position_ids.max())}, but this model has "
                f"max_position_embeddings={self.config.max_position_embeddings} positions (position_embedding_type="
                f"{self.config.position_embedding_type!r}, aft_variant={self.config.aft_variant!r}). Shorten the "
                "input or max_new_tokens; `simple` and `conv` with position_embedding_type='none' are unlimited."
            )
        mask = attention_mask[:, -T:] if attention_mask is not None else None
        if use_cache and past_key_values is None:
            past_key_values = AFTCache(self.config)
        if not use_cache:
            past_key_values = None

        # 2. embeddings
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        if self.config.position_embedding_type == "absolute":
            hidden_states = hidden_states + self.embed_positions(position_ids)
        hidden_states = self.dropout(hidden_states)

        # 3. blocks
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                position_ids=position_ids,
                attention_mask=mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if past_key_values is not None:
            past_key_values.seen_tokens += T

        if not return_dict:
            return tuple(x for x in (hidden_states, past_key_values, all_hidden_states) if x is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
            hidden_states=all_hidden_states,
        )


class AFTForCausalLM(AFTPreTrainedModel, GenerationMixin):
    """AFT decoder with a language-modelling head tied to the input embeddings."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AFTConfig):
        super().__init__(config)
        self.model = AFTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own AFTCache

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: AFTCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                **kwargs,
            )
        if not return_dict:
            out = (logits, outputs.past_key_values, outputs.hidden_states)
            out = tuple(x for x in out if x is not None)
            return ((loss,) + out) if loss is not None else out
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )


def aft_image_processor(config: AFTVisionConfig):
    """The image processor an AFT image model expects: resize to `image_size`, scale to [0, 1], normalise with the
    ImageNet mean and std (the DeiT recipe). The slow, PIL-based ViT processor: it needs no torchvision."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": config.image_size, "width": config.image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )


class AFTPatchEmbeddings(nn.Module):
    """Non-overlapping patches by a strided convolution: (B, C, H, W) -> (B, Gh * Gw, D), patches row by row."""

    def __init__(self, config: AFTVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values):
        x = self.projection(pixel_values.to(self.projection.weight.dtype))  # (B, D, Gh, Gw)
        return x.flatten(2).transpose(1, 2), tuple(x.shape[2:])


class AFTVisionModel(AFTPreTrainedModel):
    """The AFT image encoder: patch embeddings, pre-LN AFT blocks mixing the patch grid non-causally, final norm,
    and a global average over patches as `pooler_output` (no class token, no position embedding)."""

    config_class = AFTVisionConfig
    config: AFTVisionConfig
    main_input_name = "pixel_values"
    _is_stateful = False

    def __init__(self, config: AFTVisionConfig):
        super().__init__(_vision_config(config))
        config = self.config
        self.patch_embeddings = AFTPatchEmbeddings(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(
            [AFTBlock(config, i, causal=False, ndim=2) for i in range(config.num_hidden_layers)]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.patch_embeddings

    def _check_pixel_values(self, pixel_values):
        config = self.config
        if pixel_values is None:
            raise ValueError("`pixel_values` is required: a (batch, channels, height, width) tensor.")
        if pixel_values.dim() != 4:
            raise ValueError(
                f"`pixel_values` has shape {tuple(pixel_values.shape)}; expected 4 dimensions "
                "(batch, channels, height, width)."
            )
        _, channels, height, width = pixel_values.shape
        if channels != config.num_channels:
            raise ValueError(
                f"`pixel_values` has {channels} channels (shape {tuple(pixel_values.shape)}), but this model takes "
                f"config.num_channels={config.num_channels}."
            )
        if height % config.patch_size or width % config.patch_size or not height or not width:
            raise ValueError(
                f"The image is {height}x{width} pixels; height and width must be positive multiples of "
                f"config.patch_size={config.patch_size}."
            )
        if config.aft_variant in ("full", "local") and not height == width == config.image_size:
            raise ValueError(
                f"The image is {height}x{width} pixels, but aft_variant={config.aft_variant!r} learns a position "
                f"bias for config.image_size={config.image_size} ({config.image_size}x{config.image_size}) only. "
                "Resize the input to that size (the saved image processor does); `conv` and `simple` accept any "
                "multiple of patch_size."
            )

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        # 1. check the inputs before any work
        self._check_pixel_values(pixel_values)

        # 2. patch embeddings: (B, T, D) over a (Gh, Gw) grid
        hidden_states, grid = self.patch_embeddings(pixel_values)
        hidden_states = self.dropout(hidden_states)

        # 3. blocks, non-causal over the grid
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(hidden_states, grid=grid)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        # 4. global average pooling over patches: (B, D)
        pooled = hidden_states.mean(dim=1)
        if not return_dict:
            return tuple(x for x in (hidden_states, pooled, all_hidden_states) if x is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden_states,
            pooler_output=pooled,
            hidden_states=all_hidden_states,
        )


class AFTForImageClassification(AFTPreTrainedModel):
    """AFT image encoder with a linear classifier on the average of the patches.

    The loss follows `config.problem_type` as in every transformers classifier: `"single_label_classification"`
    (cross-entropy), `"multi_label_classification"` (BCE with logits) or `"regression"` (MSE), inferred from
    `num_labels` and the labels' dtype when unset. `save_pretrained` also saves the matching image processor
    (`aft_image_processor`) unless the folder already holds one, so `pipeline("image-classification", folder)`
    works on the saved folder.
    """

    config_class = AFTVisionConfig
    config: AFTVisionConfig
    main_input_name = "pixel_values"
    _is_stateful = False

    def __init__(self, config: AFTVisionConfig):
        super().__init__(_vision_config(config))
        config = self.config
        self.num_labels = config.num_labels
        self.model = AFTVisionModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def get_input_embeddings(self):
        return self.model.patch_embeddings

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        if not return_dict:
            out = tuple(x for x in (logits, outputs.hidden_states) if x is not None)
            return ((loss,) + out) if loss is not None else out
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    def save_pretrained(self, save_directory, *args, **kwargs):
        is_main = kwargs.get("is_main_process", True)
        if is_main and not os.path.exists(os.path.join(save_directory, "preprocessor_config.json")):
            aft_image_processor(self.config).save_pretrained(save_directory)
        return super().save_pretrained(save_directory, *args, **kwargs)


class AFTForImageClassificationFromAFTConfig(AFTForImageClassification):
    """What the installed package's `AutoModelForImageClassification` maps `AFTConfig` to: image folders saved by
    aft 0.1 (model_type "aft"). `from_pretrained` reads the config as an `AFTVisionConfig` and returns an
    `AFTForImageClassification`."""

    config_class = AFTConfig

    @classmethod
    def from_pretrained(cls, *args, config=None, **kwargs):
        return AFTForImageClassification.from_pretrained(
            *args, config=None if config is None else _vision_config(config), **kwargs
        )


AFTConfig.register_for_auto_class()
AFTVisionConfig.register_for_auto_class()
AFTModel.register_for_auto_class("AutoModel")
AFTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AFTVisionModel.register_for_auto_class("AutoModel")
AFTForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "AFTCache",
    "AFTCacheLayer",
    "AFTMixer",
    "AFTPreTrainedModel",
    "AFTModel",
    "AFTForCausalLM",
    "AFTPatchEmbeddings",
    "AFTVisionModel",
    "AFTForImageClassification",
    "aft_image_processor",
]
