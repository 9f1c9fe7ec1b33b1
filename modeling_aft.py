"""Attention Free Transformer (Zhai et al. 2021) models for transformers.

The operator lives in `ops_aft*.py` (pure tensor code, looked up by variant and implementation); this file is
plumbing: projections, blocks, the decoding cache and the transformers heads.
"""

import os
import weakref

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, logging
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin
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
    AFT_VARIANTS,
    INIT_NORMAL,
    INIT_POSITION_BIAS,
    INIT_ZEROS,
    NEG,
    AFTState,
    FullState,
    get_operator,
)

logger = logging.get_logger(__name__)

QUERY_ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu}

# The one compatibility seam with the supported transformers releases (README, "Supported versions"): 5.24 renamed
# the cache argument of forward() and the cache field of the model outputs from `past_key_values` to `cache`. The
# models take either name and return the cache under the name this release's generate() reads.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` where it can change x (training, p > 0), else x itself: a decoding step skips the module call."""
    return module(x) if module.training and module.p > 0 else x


def _cache_argument(cache, past_key_values):
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the cache once, as `cache` or as `past_key_values`, not both.")
    if past_key_values is not None and CACHE_NAME == "cache":
        logger.warning_once("`past_key_values` is deprecated in this transformers release: pass the cache as `cache`.")
    return cache if cache is not None else past_key_values


class AFTCacheLayer(LinearAttentionCacheLayerMixin):
    """One layer's fixed-size decoding state (`simple`, `local`, `conv`), in the design of transformers' linear-
    attention layers: the pool (m, n, z) as `recurrent_states` 0-2 and the window (k, v, pos) as `conv_states` 0-2
    (`ops_aft.AFTState`). The tensors are allocated at the first write and then updated in place, so their
    addresses stay fixed for compiled decoding (and CUDA graphs)."""

    is_sliding = False
    appends = False

    def __init__(self):
        super().__init__(number_of_states=3)

    def read(self) -> AFTState | None:
        """The state, or None before the first write (or after `reset`)."""
        if not all(self.has_previous_state.values()):
            return None
        return AFTState(*(self.recurrent_states[i] for i in range(3)), *(self.conv_states[i] for i in range(3)))

    def write(self, state: AFTState):
        held = [*(self.recurrent_states[i] for i in range(3)), *(self.conv_states[i] for i in range(3))]
        if (
            all(self.has_previous_state.values())
            and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(held, state, strict=True))
            and not torch.compiler.is_compiling()
        ):  # a decoding step: the six in-place copies as one call
            torch._foreach_copy_(held, list(state))
            return
        for i in range(3):
            self.update_recurrent_state(state[i], i)
            self.update_conv_state(state[3 + i], i)

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0):
        for store, initialized, x in (
            (self.conv_states, self.is_conv_states_initialized, conv_states),
            (self.recurrent_states, self.is_recurrent_states_initialized, recurrent_states),
        ):
            if x is not None:
                self.dtype, self.device = x.dtype, x.device
                store[state_idx] = torch.zeros_like(x)
                if not torch.compiler.is_compiling():
                    torch._dynamo.mark_static_address(store[state_idx])
                initialized[state_idx] = True

    def update_conv_state(self, conv_states, state_idx: int = 0, **kwargs):
        return self._copy_in(self.conv_states, self.is_conv_states_initialized, conv_states, state_idx, "conv_states")

    def update_recurrent_state(self, recurrent_states, state_idx: int = 0, **kwargs):
        store, flags = self.recurrent_states, self.is_recurrent_states_initialized
        return self._copy_in(store, flags, recurrent_states, state_idx, "recurrent_states")

    def _copy_in(self, store, initialized, x, state_idx, kind):
        if not initialized[state_idx] or store[state_idx].shape != x.shape or store[state_idx].dtype != x.dtype:
            self.lazy_initialization(**{kind: x}, state_idx=state_idx)
        store[state_idx].copy_(x)  # in place: the address stays
        self.has_previous_state[state_idx] = True
        return store[state_idx]

    def _map(self, fn):
        for store, initialized in (
            (self.conv_states, self.is_conv_states_initialized),
            (self.recurrent_states, self.is_recurrent_states_initialized),
        ):
            for i in range(self.number_of_states):
                if initialized[i]:
                    store[i] = fn(store[i])

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map(lambda x: x[indices])

    def crop(self, tokens_to_remove: int):
        if tokens_to_remove:
            raise ValueError(
                f"AFTCache cannot remove {tokens_to_remove} tokens: a recurrent state cannot be rolled back."
            )

    def activate_past_recording(self):
        raise ValueError("AFTCache keeps no past states to roll back to: assisted decoding is not supported.")

    @property
    def batch_size(self) -> int:
        """The batch of the state held, -1 when none is (before the first write, after `reset`)."""
        return self.recurrent_states[0].shape[0] if all(self.has_previous_state.values()) else -1

    def nbytes(self) -> int:
        tensors = [*self.conv_states.values(), *self.recurrent_states.values()]
        return sum(x.numel() * x.element_size() for x in tensors if x is not None)


class AFTFullCacheLayer:
    """AFT-full's decoding state: every past position (`ops_aft.FullState`: each key as exp(k - r) with e v, and the
    key-side position factors), like a KV cache of half the size. The buffers grow geometrically, so a token costs
    a copy of its own entries and not of the whole past; with `max_cache_len` they have that fixed size (empty
    slots have r = NEG and e = 0, and count for nothing), so that a compiled decoding step sees the same shapes
    and addresses at every token."""

    is_sliding = False
    is_croppable = False
    supports_early_init = False
    appends = True

    def __init__(self, max_cache_len: int | None = None):
        self.max_cache_len = max_cache_len
        self.is_compileable = max_cache_len is not None
        self.buffers: FullState | None = None
        self.length = 0  # filled slots (growing buffers)
        self.filled = None  # the same as a tensor (fixed buffers: written at a position known only on the device)

    def read(self) -> FullState | None:
        if self.buffers is None:
            return None
        if self.max_cache_len is not None:
            return self.buffers
        return FullState(*(x[:, : self.length] for x in self.buffers))

    def append(self, new: FullState):
        """Add the positions of `new` (an `ops_aft.full_state`) after the filled slots."""
        B, T = new.r.shape[:2]
        if self.buffers is None or self.buffers.r.shape[0] != B:
            self._allocate(new, self.max_cache_len or max(T, 64))
        if self.max_cache_len is not None:  # fixed buffers: the filled count lives on the device only
            if not torch.compiler.is_compiling() and int(self.filled) + T > self.max_cache_len:
                raise ValueError(
                    f"The AFT-full cache holds max_cache_len={self.max_cache_len} positions; {int(self.filled)} are "
                    f"filled and {T} more do not fit. Create the AFTCache with a larger max_cache_len."
                )
            index = torch.arange(T, device=self.filled.device) + self.filled
            for buffer, x in zip(self.buffers, new, strict=True):
                buffer.index_copy_(1, index, x.to(buffer.dtype))
            self.filled.add_(T)
        else:
            if self.length + T > self.buffers.r.shape[1]:
                self._allocate(new, max(2 * self.buffers.r.shape[1], self.length + T))
            for buffer, x in zip(self.buffers, new, strict=True):
                buffer[:, self.length : self.length + T] = x
            self.length += T

    def _allocate(self, new: FullState, capacity: int):
        """Buffers of `capacity` slots, with what is filled copied over."""
        B = new.r.shape[0]
        kw = {"dtype": new.r.dtype, "device": new.r.device}
        old = self.buffers if self.buffers is not None and self.buffers.r.shape[0] == B else None
        self.buffers = FullState(
            torch.full((B, capacity, *new.r.shape[2:]), NEG, **kw),
            torch.zeros(B, capacity, *new.ev.shape[2:], **kw),
            torch.zeros(B, capacity, *new.pos.shape[2:], **kw),
        )
        if old is not None:
            for buffer, x in zip(self.buffers, old, strict=True):
                buffer[:, : self.length] = x[:, : self.length]
        else:
            self.length = 0
        self.filled = torch.tensor(self.length, device=new.r.device)
        if self.max_cache_len is not None and not torch.compiler.is_compiling():
            for buffer in (*self.buffers, self.filled):
                torch._dynamo.mark_static_address(buffer)

    def _map(self, fn):
        if self.buffers is not None:
            self.buffers = FullState(*(fn(x) for x in self.buffers))

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map(lambda x: x[indices])

    def reset(self):
        self.buffers = self.filled = None
        self.length = 0

    crop = AFTCacheLayer.crop
    activate_past_recording = AFTCacheLayer.activate_past_recording

    def offload(self):
        self._map(lambda x: x.to("cpu", non_blocking=True))

    def prefetch(self):
        pass

    @property
    def batch_size(self) -> int:
        return -1 if self.buffers is None else self.buffers.r.shape[0]

    def nbytes(self) -> int:
        """Bytes of the filled slots (what the state holds, not the spare capacity)."""
        if self.buffers is None:
            return 0
        filled = self.length if self.max_cache_len is None else int(self.filled)
        return sum(x[:, :filled].numel() * x.element_size() for x in self.buffers)


def _state_fields(config: AFTConfig) -> dict:
    """The config fields that decide the shape and meaning of a model's decoding state: a cache made for other
    values belongs to another model."""
    variant = AFT_VARIANTS[config.aft_variant]
    fields = {"num_hidden_layers": config.num_hidden_layers, "aft_variant": config.aft_variant}
    fields["hidden_size"] = config.hidden_size
    if variant.key_per_head:
        fields["num_heads"] = config.num_heads
    if variant.window_field is not None:
        fields[variant.window_field] = getattr(config, variant.window_field)
    if variant.position_bias:
        fields["position_bias_rank"] = config.position_bias_rank
    return fields


class AFTCache(Cache):
    """The decoding state of every layer of an AFT model, as a transformers `Cache` (what generate() creates,
    reorders for beam search, selects and continues).

    `simple`, `local` and `conv` keep a fixed-size state per layer (`AFTCacheLayer`: constant memory at any
    context); `full` keeps every past position (`AFTFullCacheLayer`; `max_cache_len` fixes its size for compiled
    decoding). `get_seq_length()` counts the positions seen (padding included), as generate() expects.
    """

    def __init__(self, config: AFTConfig, max_cache_len: int | None = None):
        appends = AFT_VARIANTS[config.aft_variant].appended_state is not None
        layers = [
            AFTFullCacheLayer(max_cache_len) if appends else AFTCacheLayer() for _ in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self.state_fields = _state_fields(config)
        # Tensors, so that a compiled step advances them in place: the positions seen (padding included) and, per
        # row, the position id of the next token (the real tokens seen: left padding does not shift positions).
        self.seen = torch.zeros((), dtype=torch.long)
        self.next_position = None  # (B,) long, from the first forward

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.seen)

    def on_device(self, device) -> "AFTCache":
        if self.seen.device != device:
            self.seen = self.seen.to(device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.seen)
        return self

    def advance(self, tokens: int, next_position: torch.Tensor):
        """Count `tokens` more positions; `next_position` (B,): each row's next position id."""
        self.seen.add_(tokens)
        if self.next_position is None or self.next_position.shape != next_position.shape:
            self.next_position = next_position.clone()
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.next_position)
        else:
            self.next_position.copy_(next_position)

    def _map_rows(self, fn):
        if self.next_position is not None:
            self.next_position = fn(self.next_position)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._map_rows(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_rows(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._map_rows(lambda x: x[indices])

    def reset(self):
        super().reset()
        self.seen.zero_()
        self.next_position = None

    def nbytes(self) -> int:
        """Bytes held by all layers' states."""
        return sum(layer.nbytes() for layer in self.layers)


class AFTMixer(nn.Module):
    """The AFT token mixer in place of attention: q, k, v projections, the AFT operator, output projection.

    The variant (`config.aft_variant`, an entry of `ops_aft.AFT_VARIANTS`) says what the layer learns beyond the
    projections and how it becomes the operator's arguments; the implementation (`config.aft_implementation`) is
    looked up in the operator registry. `ndim=1` mixes a sequence (causal or not): the parallel form for training,
    prefill and continuation, the recurrent form for one token on a state. `ndim=2` mixes a patch grid,
    non-causally (`conv` has s x s kernels, `local` an s x s window, `full`/`local` one bias row per patch).
    """

    def __init__(self, config: AFTPreTrainedConfig, layer_idx: int, causal: bool = True, ndim: int = 1):
        super().__init__()
        if ndim not in (1, 2) or (ndim == 2 and causal):
            raise ValueError(
                f"AFTMixer supports ndim=1 (causal or not) and ndim=2 (non-causal); got {ndim=}, {causal=}."
            )
        self.config = config
        self.variant = AFT_VARIANTS[config.aft_variant]
        self.operator = get_operator(config.aft_variant, config.aft_implementation)
        self.layer_idx = layer_idx
        self.causal = causal
        self.ndim = ndim
        self.num_heads = config.num_heads if self.variant.key_per_head else 1
        D = config.hidden_size
        self.head_dim = D // self.num_heads
        self.key_dim = 1 if self.variant.key_per_head else self.head_dim
        self.query_act = QUERY_ACTIVATIONS[config.query_activation]
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, self.num_heads * self.key_dim)
        self.v_proj = nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D)
        self.variant_inits = {}
        for name, (shape, how) in self.variant.parameters(config, ndim).items():
            setattr(self, name, nn.Parameter(torch.empty(shape)))
            self.variant_inits[name] = how
        self._derived = {}  # name -> (the sources, their keys, what was made from them): see `_from_weights`

    def __getstate__(self):
        # the variant's record and the operator hold functions defined inline, which pickle cannot name: a pickled
        # mixer (torch.save of a whole model, deepcopy through pickle) carries its config and looks them up again
        state = dict(super().__getstate__())
        for name in ("variant", "operator"):
            state.pop(name, None)
        state["_derived"] = {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.variant = AFT_VARIANTS[self.config.aft_variant]
        self.operator = get_operator(self.config.aft_variant, self.config.aft_implementation)

    def _inference(self) -> bool:
        """Whether what is made from the weights may be kept across calls: no gradient to record, none to train, not
        traced by torch.compile."""
        return not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling())

    def _from_weights(self, name: str, sources, build):
        """`build(*sources)`, kept under `name` while every source is the same tensor with the same data: the same
        object (held weakly), in-place version (`load_state_dict`, `copy_`), storage (`.to`, `.half()` move and
        cast a parameter's data in place), dtype and shape. None for sources that count no versions (tensors
        made under torch.inference_mode): nothing is kept for them."""
        try:
            key = [(t._version, t.data_ptr(), t.dtype, t.shape) for t in sources]
        except RuntimeError:
            return None
        hit = self._derived.get(name)
        if hit is not None and hit[1] == key and all(ref() is t for ref, t in zip(hit[0], sources, strict=True)):
            return hit[2]
        value = build(*sources)
        self._derived[name] = ([weakref.ref(t) for t in sources], key, value)
        return value

    def forward(self, hidden_states, position_ids=None, attention_mask=None, cache_layer=None, grid=None, update=True):
        """hidden_states (B, T, D). For ndim=2, `grid` = (Gh, Gw) with Gh * Gw == T, patches row by row, and no
        `position_ids` (the bias covers the whole `image_size` grid). `cache_layer`: the layer's decoding state,
        continued from and (with `update`) written back."""
        B, T, _ = hidden_states.shape
        if (grid is not None) != (self.ndim == 2) or (grid is not None and grid[0] * grid[1] != T):
            raise ValueError(f"An ndim={self.ndim} AFTMixer got grid={grid} for {T} positions.")
        H = self.num_heads
        # 1. projections: q, v (B, T, H, Dh); k (B, T, H, Dk)
        q = self.query_act(self.q_proj(hidden_states)).view(B, T, H, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, H, self.key_dim)
        v = self.v_proj(hidden_states).view(B, T, H, self.head_dim)
        # 2. the variant's arguments: position factors (B|1, T, R), a kernel (H, s), ...; a variant without a
        # position bias makes them from its parameters alone (conv's kernel), kept across inference calls
        params = {name: getattr(self, name) for name in self.variant_inits}
        args = None
        if self._inference() and not self.variant.position_bias:
            make = lambda *_: self.variant.operator_args(params, None, self.config, self.ndim)  # noqa: E731
            args = self._from_weights(f"args{self.ndim}", list(params.values()), make)
        if args is None:
            args = self.variant.operator_args(params, position_ids, self.config, self.ndim)
        # 3. mixing: over the patch grid; else one step per token on a state (decoding), else in parallel from the
        # state (training and prefill from none, a continuation from the cache's)
        if grid is not None:
            y = self.operator.grid(q, k, v, *args, grid)
        else:
            state = cache_layer.read() if cache_layer is not None else None
            form = self.operator.recurrent if state is not None and T == 1 else self.operator.parallel
            keep = cache_layer is not None and update and not cache_layer.appends
            y, final = form(
                q, k, v, *args, causal=self.causal, mask=attention_mask, initial_state=state, output_final_state=keep
            )
            if cache_layer is not None and update:
                if cache_layer.appends:  # the state is every past position: add this call's in place
                    cache_layer.append(self.variant.appended_state(k, v, args, attention_mask))
                else:
                    cache_layer.write(final)
        # 4. output projection
        return self.o_proj(y.reshape(B, T, H * self.head_dim))


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

    def forward(self, hidden_states, position_ids=None, attention_mask=None, cache=None, update_cache=True, grid=None):
        cache_layer = cache.layers[self.layer_idx] if cache is not None else None
        mixed = self.mixer(
            self.ln_1(hidden_states), position_ids, attention_mask, cache_layer, grid=grid, update=update_cache
        )
        hidden_states = hidden_states + _dropout(self.dropout, mixed)
        return hidden_states + _dropout(self.dropout, self.mlp(self.ln_2(hidden_states)))


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
        if isinstance(module, AFTMixer):  # the variant's own tensors, as the variant table says
            for name, how in module.variant_inits.items():
                param = getattr(module, name)
                if how == INIT_POSITION_BIAS:  # the paper: u, v ~ N(0, 0.01^2)
                    init.normal_(param, mean=0.0, std=0.01)
                elif how == INIT_NORMAL:
                    init.normal_(param, mean=0.0, std=self.config.initializer_range)
                elif how == INIT_ZEROS:  # conv gamma = beta = 0: a fresh conv layer is per-head AFT-simple
                    init.zeros_(param)

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


def _next_positions(position_ids, mask, previous, B: int) -> torch.Tensor:
    """Each row's position id after this call: one past its last real token, or `previous` (None: 0) for a row
    whose tokens here are all padding, so that padding never advances a row's positions. position_ids (B|1, T),
    mask (B, T) or None -> (B,) long. No host value is read (a compiled decoding step runs it too)."""
    if previous is None:
        previous = torch.zeros(B, dtype=torch.long, device=position_ids.device)
    if position_ids.shape[-1] == 0:
        return previous
    if mask is None:
        return (position_ids[:, -1] + 1).expand(B)
    real = mask.bool()
    last = torch.where(real, position_ids + 1, 0).amax(-1)
    return torch.where(real.any(-1), last, previous)


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
        cache: AFTCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: AFTCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """`cache` (or `past_key_values`): an `AFTCache` to continue from. With `use_cache` (the default) it is
        advanced past the input and returned; with `use_cache=False` its state is the input's context and it is
        left as it was. `attention_mask` is (B, T) or (B, cached + T) (left padding); position ids follow it."""
        cache = _cache_argument(cache, past_key_values)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if self.gradient_checkpointing and self.training:
            use_cache = False

        # 1. the inputs: checked before any work
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if cache is not None and not isinstance(cache, AFTCache):
            raise TypeError(f"The cache must be an AFTCache, got {type(cache).__name__}.")
        if cache is not None and cache.state_fields != _state_fields(self.config):
            ours = _state_fields(self.config)
            differ = [k for k in {**ours, **cache.state_fields} if cache.state_fields.get(k) != ours.get(k)]
            raise ValueError(
                "The cache was made for another model: "
                + ", ".join(f"its {k}={cache.state_fields.get(k)!r}, this model's {ours.get(k)!r}" for k in differ)
                + ". Pass AFTCache(model.config) of this model, or no cache."
            )
        B, T = input_ids.shape[:2] if input_ids is not None else inputs_embeds.shape[:2]
        if cache is not None and cache.batch_size not in (-1, B):
            raise ValueError(
                f"The cache holds the state of a batch of {cache.batch_size}, but the input has a batch of {B}: "
                "pass inputs of the cache's batch, or a new cache (or none)."
            )
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        if cache is not None:
            cache.on_device(device)
        mask = attention_mask[:, -T:] if attention_mask is not None else None  # the new tokens' padding
        if position_ids is None:  # positions count real tokens, after those the cache has seen
            start = cache.next_position[:, None] if cache is not None and cache.next_position is not None else 0
            if mask is not None:
                position_ids = start + (mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = start + torch.arange(T, device=device)[None]
        if not torch.compiler.is_compiling():  # host values: checked in eager calls, once per call
            self._check_values(input_ids, attention_mask, position_ids, cache, B, T)
        if use_cache and cache is None:
            cache = AFTCache(self.config).on_device(device)

        # 2. embeddings
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        if self.config.position_embedding_type == "absolute":
            hidden_states = hidden_states + self.embed_positions(position_ids)
        hidden_states = _dropout(self.dropout, hidden_states)

        # 3. blocks
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states, position_ids=position_ids, attention_mask=mask, cache=cache, update_cache=use_cache
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if cache is not None and use_cache:
            cache.advance(T, _next_positions(position_ids, mask, cache.next_position, B))
        cache = cache if use_cache else None

        if not return_dict:
            return tuple(x for x in (hidden_states, cache, all_hidden_states) if x is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_NAME: cache}
        )

    def _check_values(self, input_ids, attention_mask, position_ids, cache, B, T):
        """The checks that need values from the tensors, read with one host synchronisation."""
        config = self.config
        zero = torch.zeros((), dtype=torch.long, device=position_ids.device)
        probes = [cache.seen if cache is not None else zero]
        for x in (input_ids, position_ids):
            probes += [x.min(), x.max()] if x is not None and x.numel() else [zero, zero]
        past, id_min, id_max, pos_min, pos_max = torch.stack([p.long() for p in probes]).tolist()
        if input_ids is not None and input_ids.numel() and (id_min < 0 or id_max >= config.vocab_size):
            bad = id_max if id_max >= config.vocab_size else id_min
            raise ValueError(
                f"`input_ids` contains the id {bad}, outside the vocabulary: ids must be in "
                f"[0, {config.vocab_size - 1}] (config.vocab_size={config.vocab_size})."
            )
        if attention_mask is not None and tuple(attention_mask.shape) not in {(B, T), (B, past + T)}:
            allowed = f"({B}, {T})" + (f" or ({B}, {past + T}) with the {past} cached positions" if past else "")
            raise ValueError(f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected {allowed}.")
        if position_ids.numel() and pos_min < 0:
            raise ValueError(f"`position_ids` contains {pos_min}: positions must be >= 0.")
        if config.has_position_limit and position_ids.numel() and pos_max >= config.max_position_embeddings:
            raise ValueError(
                f"The input reaches position {pos_max}, but this model has "
                f"max_position_embeddings={config.max_position_embeddings} positions (position_embedding_type="
                f"{config.position_embedding_type!r}, aft_variant={config.aft_variant!r}). Shorten the input or "
                "max_new_tokens; `simple` and `conv` with position_embedding_type='none' are unlimited."
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
        return False  # the model builds its own AFTCache, on every supported transformers release

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=None, attention_mask=None, inputs_embeds=None, is_first_iteration=False,
        **kwargs,
    ):  # fmt: skip
        """The inputs of one generate() step. AFT's own rather than GenerationMixin's: a step needs only the new
        tokens, their positions and mask, and the cache (under the name of this transformers release), so it costs
        a few slices per token (GenerationMixin's general version does more work per step than a decoding step can
        afford) and does not depend on how the releases' versions of it differ."""
        cache = kwargs.pop(CACHE_NAME, None)
        for name in ("labels", "past_key_values", "cache"):  # never forwarded (the cache is set below)
            kwargs.pop(name, None)
        if isinstance(cache, AFTCache) and next_sequence_length is None and inputs_embeds is None:
            # A continuation passes the whole sequence: feed only what the cache has not seen.
            seen = cache.get_seq_length()
            if 0 < seen < input_ids.shape[1] and (
                attention_mask is None or attention_mask.shape[-1] == input_ids.shape[1]
            ):
                next_sequence_length = input_ids.shape[1] - seen
        if inputs_embeds is not None and is_first_iteration:
            embeds = inputs_embeds[:, -next_sequence_length:] if next_sequence_length else inputs_embeds
            inputs = {"input_ids": None, "inputs_embeds": embeds.contiguous()}
            T = embeds.shape[1]
        else:
            ids = input_ids[:, -next_sequence_length:] if next_sequence_length is not None else input_ids
            inputs = {"input_ids": ids.contiguous()}  # the same strides at every step (one compiled graph)
            T = ids.shape[1]
        if cache is not None:
            inputs[CACHE_NAME] = cache
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is not None:
            inputs["position_ids"] = position_ids[..., -T:].contiguous()
        if attention_mask is not None:
            # with positions given, the new tokens' mask is all the model needs, and its shape stays the same
            keep = position_ids is not None and isinstance(cache, AFTCache) and cache.batch_size != -1
            inputs["attention_mask"] = attention_mask[:, -T:].contiguous() if keep else attention_mask
        inputs.update((k, v) for k, v in kwargs.items() if k != "next_sequence_length")
        return inputs

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """GenerationMixin.generate, with two checks first: a prompt of no tokens (which generate() would meet as an
        IndexError), and, for a model with a position limit, a prompt plus max_new_tokens (or max_length) that
        would pass it (which forward would meet only after every token before it was generated)."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None and isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == 0:
            raise ValueError(
                f"`input_ids` has shape {tuple(ids.shape)}: a prompt needs at least one token per row (pass no "
                "input_ids to start from config.bos_token_id, where the model has one)."
            )
        prompt = embeds if embeds is not None else ids
        if self.config.has_position_limit and isinstance(prompt, torch.Tensor) and prompt.dim() >= 2:
            config = generation_config if generation_config is not None else self.generation_config
            new = kwargs.get("max_new_tokens", config.max_new_tokens)
            if new is None:
                new = kwargs.get("max_length", config.max_length) - prompt.shape[1]
            mask = kwargs.get("attention_mask")
            positions = int(mask.sum(-1).max()) if mask is not None else prompt.shape[1]  # real tokens of a row
            limit = self.config.max_position_embeddings
            if new > 0 and positions + new > limit:
                raise ValueError(
                    f"The prompt takes {positions} positions and max_new_tokens={new} more would reach position "
                    f"{positions + new - 1}, but this model has max_position_embeddings={limit} positions "
                    f"(position_embedding_type={self.config.position_embedding_type!r}, aft_variant="
                    f"{self.config.aft_variant!r}): pass max_new_tokens <= {max(limit - positions, 0)}."
                )
        return super().generate(inputs, generation_config, **kwargs)

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """AFT reads the 2-D padding mask itself: generate() builds no 4-D attention masks for it."""
        return attention_mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: AFTCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: AFTCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_cache_argument(cache, past_key_values),
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
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        cache = getattr(outputs, CACHE_NAME)
        if not return_dict:
            out = tuple(x for x in (logits, cache, outputs.hidden_states) if x is not None)
            return ((loss,) + out) if loss is not None else out
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_NAME: cache}
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
        if AFT_VARIANTS[config.aft_variant].position_bias and not height == width == config.image_size:
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
        hidden_states = _dropout(self.dropout, hidden_states)

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
    aft 0.1 (model_type "aft"). Building one (`from_config`, the constructor) or loading one (`from_pretrained`)
    reads the config as an `AFTVisionConfig` and returns an `AFTForImageClassification`, so that what is saved
    names that class and loads as remote code (this class's config_class would not match the saved config)."""

    config_class = AFTConfig

    def __new__(cls, config, *args, **kwargs):
        return AFTForImageClassification(config, *args, **kwargs)

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
