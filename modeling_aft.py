"""Attention Free Transformer (Zhai et al. 2021) models for transformers.

The token mixer math lives in `ops_aft.py`; this file is plumbing: projections, blocks, the recurrent cache and
the transformers heads.
"""

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)

from .configuration_aft import AFTConfig
from .ops_aft import (
    AFTState,
    aft_conv,
    aft_full,
    aft_local,
    aft_simple,
    aft_step,
    conv_kernel,
)

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
    """The AFT token mixer in place of attention: q, k, v projections, the AFT operator, output projection."""

    def __init__(self, config: AFTConfig, layer_idx: int, causal: bool = True):
        super().__init__()
        self.variant = config.aft_variant
        self.layer_idx = layer_idx
        self.causal = causal
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
            self.pos_u = nn.Parameter(torch.empty(config.max_position_embeddings, config.position_bias_rank))
            self.pos_v = nn.Parameter(torch.empty(config.max_position_embeddings, config.position_bias_rank))
        if self.variant == "conv":
            self.conv_weight = nn.Parameter(torch.empty(self.num_heads, config.conv_kernel_size))
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
    ):
        B, T, _ = hidden_states.shape
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
            kw = {"kernel": conv_kernel(self.conv_weight, self.conv_gamma, self.conv_beta)}
        # 3. mixing: parallel form from an empty state (training, prefill); otherwise one step per token
        state = cache_layer.state if cache_layer is not None else None
        if state is None:
            y, new_state = self._parallel(q, k, v, attention_mask, return_state=cache_layer is not None, **kw)
        else:
            ys = []
            for t in range(T):
                step_kw = {name: x[:, t] for name, x in kw.items() if name.startswith("pos")}
                if "kernel" in kw:
                    step_kw["kernel"] = kw["kernel"]
                mask_t = attention_mask[:, t] if attention_mask is not None else None
                y_t, state = aft_step(
                    q[:, t],
                    k[:, t],
                    v[:, t],
                    state,
                    window=self.window,
                    mask=mask_t,
                    **step_kw,
                )
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


class AFTMLP(nn.Module):
    def __init__(self, config: AFTConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.down_proj(self.act(self.up_proj(hidden_states)))


class AFTBlock(GradientCheckpointingLayer):
    """Pre-LN block: x + mixer(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: AFTConfig, layer_idx: int, causal: bool = True):
        super().__init__()
        self.layer_idx = layer_idx
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mixer = AFTMixer(config, layer_idx, causal=causal)
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
    ):
        cache_layer = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        mixed = self.mixer(self.ln_1(hidden_states), position_ids, attention_mask, cache_layer)
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
        # One saved folder serves AutoModel as well as the head's own Auto class.
        self.config.auto_map = {
            "AutoModel": "modeling_aft.AFTModel",
            **(getattr(self.config, "auto_map", None) or {}),
        }
        return super().save_pretrained(save_directory, *args, **kwargs)


class AFTModel(AFTPreTrainedModel):
    """The bare causal AFT decoder: token (and optional absolute position) embeddings, AFT blocks, final norm."""

    def __init__(self, config: AFTConfig):
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


AFTConfig.register_for_auto_class()
AFTModel.register_for_auto_class("AutoModel")
AFTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "AFTCache",
    "AFTCacheLayer",
    "AFTMixer",
    "AFTPreTrainedModel",
    "AFTModel",
    "AFTForCausalLM",
]
