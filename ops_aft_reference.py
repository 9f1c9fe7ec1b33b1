"""The literal formula (Eq. 2 of the paper; docs/operator.md, section 1) with dense T x T biases: O(T^2 D)
memory, for tests and for reading.

    y_t = q_t * sum_{t'} exp(k_{t'} + w_{t,t'}) v_{t'} / sum_{t'} exp(k_{t'} + w_{t,t'})

`aft_reference` is the formula itself; the dense biases build w for each variant; the `*_naive` forms wrap them
with the signature of every AFT form (a state is put before the sequence as `ops_aft_core.prepend_state` does),
and the `*_naive_2d` forms are the image forms over a patch grid.
"""

import torch

from .ops_aft_2d import grid_window_index
from .ops_aft_core import acc_dtype, causal_state, check_inputs, join_past, mask_inputs, prepend_state
from .ops_aft_full import full_bias, full_state, keys_and_values


def aft_reference(q, k, v, w=None, *, causal: bool, mask=None):
    """Literal Eq. 2. `w`: dense position bias (B|1, H|1, T, T) or None (AFT-simple)."""
    B, T, H, _ = k.shape
    dtype = acc_dtype(k)
    logits = k.to(dtype)[:, None]  # (B, 1, T', H, Dk)
    if w is not None:
        logits = logits + w.to(dtype).permute(0, 2, 3, 1)[..., None]  # (B|1, T, T', H|1, 1)
    allowed = torch.ones(T, T, dtype=torch.bool, device=k.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(B, T, T)
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, :]
    empty = ~allowed.any(-1, keepdim=True)  # rows that see only padding: defined as 0
    logits = logits.expand(B, T, T, H, k.shape[-1]).masked_fill(~(allowed | empty)[..., None, None], float("-inf"))
    p = torch.softmax(logits, dim=2)  # over t'
    # only the allowed terms: a NaN or infinite value at a position a row may not see never reaches it as 0 * v
    y = torch.where(allowed[..., None, None], p * v.to(dtype)[:, None], 0.0).sum(2)  # (B, T, H, Dv)
    y = torch.where(empty[..., None], torch.zeros_like(y), y)
    return (q.to(dtype) * y).to(q.dtype)


def local_bias_dense(pos_u, pos_v, window: int, *, causal: bool = True):
    """AFT-local bias: u_t . v_t' inside |t - t'| < window, exactly 0 outside. -> (B|1, 1, T, T')."""
    w = pos_u @ pos_v.transpose(-1, -2)
    T, T2 = w.shape[-2:]
    offset = torch.arange(T, device=w.device)[:, None] + (T2 - T) - torch.arange(T2, device=w.device)[None, :]
    return torch.where(offset.abs() < window, w, torch.zeros_like(w))[:, None]


def conv_bias_dense(kernel, T: int, *, causal: bool):
    """AFT-conv bias from a per-head kernel (H, s): kernel[h, j] weights position t - left + j. -> (1, H, T, T)."""
    H, s = kernel.shape
    left = s - 1 if causal else (s - 1) // 2
    j = torch.arange(T, device=kernel.device)[None, :] - torch.arange(T, device=kernel.device)[:, None] + left
    inside = (j >= 0) & (j < s)
    w = kernel[:, j.clamp(0, s - 1)]  # (H, T, T)
    return torch.where(inside, w, torch.zeros_like(w))[None]


def conv_bias_dense_2d(kernel, grid):
    """AFT-conv bias over a grid from per-head s x s kernels (H, s, s), 0 outside the window. -> (1, H, T, T)."""
    i, j, inside = grid_window_index(grid, kernel.shape[-1], kernel.device)
    w = kernel[:, i, j]  # (H, T, T)
    return torch.where(inside, w, torch.zeros_like(w))[None]


def local_bias_dense_2d(pos_u, pos_v, window: int, grid):
    """AFT-local bias over a grid: u_t . v_t' inside the s x s window of t, exactly 0 outside. -> (B|1, 1, T, T)."""
    w = pos_u @ pos_v.transpose(-1, -2)
    _, _, inside = grid_window_index(grid, window, w.device)
    return torch.where(inside, w, torch.zeros_like(w))[:, None]


def aft_simple_naive(q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    return _naive(q, k, v, lambda pu, pv, T: None, 0, None, None, causal, mask, initial_state, output_final_state)


def aft_local_naive(
    q, k, v, pos_u, pos_v, window, *, causal=True, mask=None, initial_state=None, output_final_state=False
):
    bias = lambda pu, pv, T: local_bias_dense(pu, pv, window, causal=causal)  # noqa: E731
    return _naive(q, k, v, bias, window - 1, pos_u, pos_v, causal, mask, initial_state, output_final_state)


def aft_conv_naive(q, k, v, kernel, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    bias = lambda pu, pv, T: conv_bias_dense(kernel, T, causal=causal)  # noqa: E731
    return _naive(q, k, v, bias, kernel.shape[-1] - 1, None, None, causal, mask, initial_state, output_final_state)


def aft_full_naive(q, k, v, pos_u, pos_v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    bias = lambda pu, pv, T: full_bias(pu, pv)[:, None]  # noqa: E731
    return _naive(q, k, v, bias, None, pos_u, pos_v, causal, mask, initial_state, output_final_state)


def aft_simple_naive_2d(q, k, v, grid):
    return aft_reference(q, k, v, None, causal=False)


def aft_local_naive_2d(q, k, v, pos_u, pos_v, window, grid):
    return aft_reference(q, k, v, local_bias_dense_2d(pos_u, pos_v, window, grid), causal=False)


def aft_conv_naive_2d(q, k, v, kernel, grid):
    return aft_reference(q, k, v, conv_bias_dense_2d(kernel, grid), causal=False)


def aft_full_naive_2d(q, k, v, pos_u, pos_v, grid):
    return aft_reference(q, k, v, full_bias(pos_u, pos_v)[:, None], causal=False)


def _naive(q, k, v, bias, slots, pos_u, pos_v, causal, mask, initial_state, output_final_state):
    """The formula over the state's positions and the sequence. `slots`: window slots of the state, None for
    `full` (every position)."""
    if (initial_state is not None or output_final_state) and not causal:
        raise ValueError("States belong to causal sequences: pass causal=True.")
    check_inputs(q, k, v, mask)
    k, v = mask_inputs(k, v, mask)
    if pos_u is not None:
        pos_u, pos_v = pos_u.to(k.dtype), pos_v.to(k.dtype)
    before = 0
    if initial_state is not None and slots is None:  # full: the past positions themselves
        past_k, past_v = keys_and_values(initial_state)
        before = past_k.shape[1]
        k, v, mask, pos_v = join_past(past_k, past_v, initial_state.pos, k, v, mask, pos_v)
    elif initial_state is not None:
        k, v, mask, pos_v, before = prepend_state(initial_state, k, v, mask, pos_v)
    if before and pos_u is not None:
        pos_u = torch.nn.functional.pad(pos_u.expand(k.shape[0], -1, -1), (0, 0, before, 0))
    q = torch.nn.functional.pad(q, (0, 0, 0, 0, before, 0))
    y = aft_reference(q, k, v, bias(pos_u, pos_v, k.shape[1]), causal=causal, mask=mask)[:, before:]
    state = None
    if output_final_state:
        if slots is None:  # full: every position
            state = full_state(k, v, pos_v.expand(k.shape[0], -1, -1))
        else:
            state = causal_state(k, v, slots, pos_v)
    return y, state
