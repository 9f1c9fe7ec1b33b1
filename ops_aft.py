"""The Attention Free Transformer operator (Zhai et al. 2021, Eq. 2), as pure tensor functions.

    y_t = q_t * sum_{t'} exp(k_{t'} + w_{t,t'}) v_{t'} / sum_{t'} exp(k_{t'} + w_{t,t'})

This file is the operator's public face: the variant table and the registry of implementations. The math is in
flat sibling modules (flat, so that a saved folder loads as Hub remote code), to be read in this order:

    ops_aft_core.py       layout, numerics, range checks, the decoding state and how a state joins a sequence
    ops_aft_window.py     simple, local, conv (a pool plus a window): *_chunk, *_exact, *_recurrent
    ops_aft_chunked.py    the causal *_chunk forms' autograd Functions, by units of the sequence
    ops_aft_full.py       full (a bias over every pair): aft_full_chunk, aft_full_exact, aft_full_recurrent
    ops_aft_2d.py         the image forms over a patch grid
    ops_aft_reference.py  the literal formula with dense biases, and the *_naive forms built on it
    ops_aft_native.py     "native": compiled CPU kernels, simple's causal forward and backward, and the
                          decoding step of simple, local and conv (where no gradient is needed)
    ops_aft_triton.py     "triton" (when triton is installed): Triton kernels for simple's causal forward and
                          backward, and the decoding step of simple, local and conv (also their causal forward)

Every sequence form has one signature,

    form(q, k, v, *variant_args, causal=True, mask=None, initial_state=None, output_final_state=False)
        -> (y, final_state)

so that training, prefill, a continuation and decoding are one call with a different T and state; every grid form
is `form(q, k, v, *variant_args, grid) -> y`. An implementation of a variant is a parallel form, a recurrent form
(decoding: one step per token) and a grid form, registered under a name (`register_operator`) and looked up by
the model's `config.aft_implementation` (`get_operator`), like transformers' attention-function registry.
"torch" is the default and the one every other implementation is tested against; "exact" (no chunk references)
and "naive" (the literal formula, O(T^2)) are its twins; "native" runs C kernels, built on first use (simple's
causal forward and backward; the decoding step of simple, local and conv, where no gradient is needed), and the
torch form everywhere else.

A variant is one entry of `AFT_VARIANTS`: what it learns (`parameters`), how its learned tensors become the
forms' arguments (`operator_args`), which config fields it needs and their checks, and what decoding keeps.
Adding a variant is one module of forms, one `AFTVariant` entry and its `register_operator` calls.
"""

from collections.abc import Callable
from dataclasses import dataclass

from .ops_aft_2d import aft_conv_2d, aft_local_2d, conv_kernel_2d
from .ops_aft_core import NEG, AFTState, empty_state, mask_inputs, mask_keys
from .ops_aft_full import (
    FullState,
    aft_full_chunk,
    aft_full_exact,
    aft_full_recurrent,
    full_bias,
    full_state,
    keys_and_values,
)
from .ops_aft_native import (
    aft_conv_native_recurrent,
    aft_local_native_recurrent,
    aft_simple_native,
    aft_simple_native_recurrent,
)
from .ops_aft_reference import (
    aft_conv_naive,
    aft_conv_naive_2d,
    aft_full_naive,
    aft_full_naive_2d,
    aft_local_naive,
    aft_local_naive_2d,
    aft_reference,
    aft_simple_naive,
    aft_simple_naive_2d,
    conv_bias_dense,
    conv_bias_dense_2d,
    local_bias_dense,
    local_bias_dense_2d,
)
from .ops_aft_window import (
    aft_conv_chunk,
    aft_conv_exact,
    aft_conv_recurrent,
    aft_local_chunk,
    aft_local_exact,
    aft_local_recurrent,
    aft_simple_chunk,
    aft_simple_exact,
    aft_simple_recurrent,
    conv_kernel,
)

# How a learned tensor is initialised: the paper's N(0, 0.01^2) for position-bias factors, the config's
# initializer_range for kernels, zeros for the conv re-parameterisation (a fresh conv layer is per-head simple).
INIT_POSITION_BIAS, INIT_NORMAL, INIT_ZEROS = "position_bias", "normal", "zeros"


@dataclass(frozen=True)
class AFTVariant:
    """One token mixer of the paper. `parameters(config, ndim)` -> {name: (shape, init)} of the tensors a layer
    learns beyond q, k, v, o; `operator_args(params, positions, config, ndim)` -> the forms' variant arguments
    from those tensors and the position ids (B|1, T) (None over a grid: every patch); `checks(config)` -> the
    (ok, field, allowed) of the config fields it needs."""

    name: str
    summary: str
    decoding_state: str
    constant_state: bool  # the decoding state has the same size at any context
    key_per_head: bool  # one key scalar per head (num_heads heads); else one key per channel and one head
    position_bias: bool  # a bias learned per absolute position: inputs are limited to the positions learned
    window_field: str | None  # the config field of the window size s
    parameters: Callable
    operator_args: Callable
    checks: Callable
    # The state of a call's positions, for a variant whose state is every past position (a cache appends it in
    # place rather than replacing the state): (k, v, variant_args, mask) -> state. None: the forms' final state.
    appended_state: Callable | None = None


@dataclass(frozen=True)
class AFTOperator:
    """One implementation of a variant: the parallel form (training, prefill, continuation), the recurrent form
    (decoding, one step per token) and the grid form (images)."""

    parallel: Callable
    recurrent: Callable
    grid: Callable


def _positions(config, ndim: int) -> int:
    return config.max_position_embeddings if ndim == 1 else config.image_grid[0] * config.image_grid[1]


def _factors(config, ndim):
    shape = (_positions(config, ndim), config.position_bias_rank)
    return {"pos_u": (shape, INIT_POSITION_BIAS), "pos_v": (shape, INIT_POSITION_BIAS)}


def _factor_args(params, positions):
    if positions is None:  # a grid: every patch, shared by the batch
        return params["pos_u"][None], params["pos_v"][None]
    return params["pos_u"][positions], params["pos_v"][positions]


def _rank_check(config):
    return [(config.position_bias_rank >= 1, "position_bias_rank", "the bias rank must be >= 1")]


AFT_VARIANTS = {
    "simple": AFTVariant(
        name="simple",
        summary="no position bias: a key-weighted running average of the values",
        decoding_state="O(d): constant",
        constant_state=True,
        key_per_head=False,
        position_bias=False,
        window_field=None,
        parameters=lambda config, ndim: {},
        operator_args=lambda params, positions, config, ndim: (),
        checks=lambda config: [],
    ),
    "local": AFTVariant(
        name="local",
        summary="a learned bias u_t . v_t' for |t - t'| < local_window_size, exactly 0 outside",
        decoding_state="O(s d): constant",
        constant_state=True,
        key_per_head=False,
        position_bias=True,
        window_field="local_window_size",
        parameters=_factors,
        operator_args=lambda params, positions, config, ndim: (
            *_factor_args(params, positions),
            config.local_window_size,
        ),
        checks=lambda config: [
            (config.local_window_size >= 1, "local_window_size", "the window must be >= 1"),
            *_rank_check(config),
        ],
    ),
    "conv": AFTVariant(
        name="conv",
        summary="a per-head relative kernel of conv_kernel_size, num_heads heads, one key scalar per head",
        decoding_state="O(s d): constant",
        constant_state=True,
        key_per_head=True,
        position_bias=False,
        window_field="conv_kernel_size",
        parameters=lambda config, ndim: {
            "conv_weight": ((config.num_heads, *(config.conv_kernel_size,) * ndim), INIT_NORMAL),
            "conv_gamma": ((config.num_heads,), INIT_ZEROS),
            "conv_beta": ((config.num_heads,), INIT_ZEROS),
        },
        operator_args=lambda params, positions, config, ndim: (
            (conv_kernel if ndim == 1 else conv_kernel_2d)(
                params["conv_weight"], params["conv_gamma"], params["conv_beta"]
            ),
        ),
        checks=lambda config: [
            (config.conv_kernel_size >= 1, "conv_kernel_size", "the kernel size must be >= 1"),
            (config.num_heads >= 1, "num_heads", "it must be >= 1"),
            (
                config.num_heads >= 1 and config.hidden_size % config.num_heads == 0,
                "num_heads",
                f"hidden_size={config.hidden_size} must be divisible by num_heads",
            ),
        ],
    ),
    "full": AFTVariant(
        name="full",
        summary="a learned bias u_t . v_t' over all pairs of positions (rank position_bias_rank)",
        decoding_state="O(t d): every past key and value",
        constant_state=False,
        key_per_head=False,
        position_bias=True,
        window_field=None,
        parameters=_factors,
        operator_args=lambda params, positions, config, ndim: _factor_args(params, positions),
        checks=_rank_check,
        appended_state=lambda k, v, args, mask: _appended_full_state(k, v, args[1], mask),
    ),
}


def _appended_full_state(k, v, pos_v, mask):
    k, v = mask_inputs(k, v, mask)
    return full_state(k, v, pos_v.to(k.dtype).expand(k.shape[0], -1, -1))


_OPERATORS: dict[tuple[str, str], AFTOperator] = {}


def register_operator(variant: str, implementation: str, operator: AFTOperator):
    """Make `implementation` available to models of `variant` (`config.aft_implementation`)."""
    if variant not in AFT_VARIANTS:
        raise ValueError(f"Unknown AFT variant {variant!r}: the variants are {tuple(AFT_VARIANTS)}.")
    _OPERATORS[(variant, implementation)] = operator


def get_operator(variant: str, implementation: str = "torch") -> AFTOperator:
    """The registered implementation of a variant, or a clear error listing the ones there are."""
    if (variant, implementation) not in _OPERATORS:
        raise ValueError(
            f"No AFT implementation {implementation!r} for variant {variant!r}: registered ones are "
            f"{implementations(variant)}."
        )
    return _OPERATORS[(variant, implementation)]


def implementations(variant: str | None = None) -> list[str]:
    """The names registered for a variant (for all variants when None)."""
    return sorted({impl for v, impl in _OPERATORS if variant is None or v == variant})


def _simple_grid(q, k, v, grid):
    return aft_simple_chunk(q, k, v, causal=False)[0]


def _full_grid(q, k, v, pos_u, pos_v, grid):
    return aft_full_chunk(q, k, v, pos_u, pos_v, causal=False)[0]


def _full_exact_grid(q, k, v, pos_u, pos_v, grid):
    return aft_full_exact(q, k, v, pos_u, pos_v, causal=False)[0]


register_operator("simple", "torch", AFTOperator(aft_simple_chunk, aft_simple_recurrent, _simple_grid))
register_operator("simple", "exact", AFTOperator(aft_simple_exact, aft_simple_recurrent, _simple_grid))
register_operator("simple", "native", AFTOperator(aft_simple_native, aft_simple_native_recurrent, _simple_grid))
register_operator("simple", "naive", AFTOperator(aft_simple_naive, aft_simple_recurrent, aft_simple_naive_2d))
register_operator("local", "torch", AFTOperator(aft_local_chunk, aft_local_recurrent, aft_local_2d))
register_operator("local", "exact", AFTOperator(aft_local_exact, aft_local_recurrent, aft_local_2d))
register_operator("local", "native", AFTOperator(aft_local_chunk, aft_local_native_recurrent, aft_local_2d))
register_operator("local", "naive", AFTOperator(aft_local_naive, aft_local_recurrent, aft_local_naive_2d))
register_operator("conv", "torch", AFTOperator(aft_conv_chunk, aft_conv_recurrent, aft_conv_2d))
register_operator("conv", "exact", AFTOperator(aft_conv_exact, aft_conv_recurrent, aft_conv_2d))
register_operator("conv", "native", AFTOperator(aft_conv_chunk, aft_conv_native_recurrent, aft_conv_2d))
register_operator("conv", "naive", AFTOperator(aft_conv_naive, aft_conv_recurrent, aft_conv_naive_2d))
register_operator("full", "torch", AFTOperator(aft_full_chunk, aft_full_recurrent, _full_grid))
register_operator("full", "exact", AFTOperator(aft_full_exact, aft_full_recurrent, _full_exact_grid))
register_operator("full", "naive", AFTOperator(aft_full_naive, aft_full_recurrent, aft_full_naive_2d))

try:  # an optional dependency: without triton there is no "triton" implementation, and the model loads as ever
    from .ops_aft_triton import (
        aft_conv_triton,
        aft_conv_triton_recurrent,
        aft_local_triton,
        aft_local_triton_recurrent,
        aft_simple_triton,
        aft_simple_triton_recurrent,
    )
except ImportError:
    pass
else:
    register_operator("simple", "triton", AFTOperator(aft_simple_triton, aft_simple_triton_recurrent, _simple_grid))
    register_operator("local", "triton", AFTOperator(aft_local_triton, aft_local_triton_recurrent, aft_local_2d))
    register_operator("conv", "triton", AFTOperator(aft_conv_triton, aft_conv_triton_recurrent, aft_conv_2d))

__all__ = [
    "AFT_VARIANTS",
    "INIT_NORMAL",
    "INIT_POSITION_BIAS",
    "INIT_ZEROS",
    "mask_inputs",
    "mask_keys",
    "NEG",
    "AFTOperator",
    "AFTState",
    "AFTVariant",
    "FullState",
    "keys_and_values",
    "aft_conv_2d",
    "aft_conv_chunk",
    "aft_conv_exact",
    "aft_conv_naive",
    "aft_conv_recurrent",
    "aft_full_chunk",
    "aft_full_exact",
    "aft_full_naive",
    "aft_full_recurrent",
    "aft_local_2d",
    "aft_local_chunk",
    "aft_local_exact",
    "aft_local_naive",
    "aft_local_recurrent",
    "aft_reference",
    "aft_simple_chunk",
    "aft_simple_exact",
    "aft_simple_naive",
    "aft_simple_native",
    "aft_simple_recurrent",
    "conv_bias_dense",
    "conv_bias_dense_2d",
    "conv_kernel",
    "conv_kernel_2d",
    "empty_state",
    "full_bias",
    "full_state",
    "get_operator",
    "implementations",
    "local_bias_dense",
    "local_bias_dense_2d",
    "register_operator",
]
