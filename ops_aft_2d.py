"""AFT over images: the non-causal operator over an (Gh, Gw) patch grid, positions flattened row by row
(t = y * Gw + x), so q, k, v keep the (B, T, H, D) layout of every AFT form with T = Gh * Gw.

`full` and `simple` need nothing new (their bias is absolute or none: `aft_full_chunk` / `aft_simple_chunk` with
causal=False over the T patches). `conv` and `local` have an s x s window: entry (i, j) of the window of (y, x) is the
patch (y - (s - 1) // 2 + i, x - (s - 1) // 2 + j), as the 1-D non-causal conv kernel is centred. Both are a global
pool plus a windowed correction with coefficient e^w - 1 (docs/operator.md, section 5); the grid is zero-padded, so
windows that leave the grid add nothing. Every form here is `(q, k, v, <variant parameters>, grid) -> y`.
"""

import torch
import torch.nn.functional as F

from .ops_aft_core import acc_dtype, gate
from .ops_aft_window import conv_kernel


def aft_conv_2d(q, k, v, kernel, grid):
    """AFT-conv over a patch grid (non-causal). q, v: (B, T, H, Dh); k: (B, T, H, 1); kernel: (H, s, s) effective
    per-head kernel (see `conv_kernel_2d`); grid: (Gh, Gw) with Gh * Gw == T. Works at any grid size.

    num_t = sum_t' p_t' v_t' + sum_window (e^w - 1) p v,   den_t = 1 + sum_window (e^w - 1) p   (sum_t' p_t' = 1)
    """
    p, pv, pooled = _grid_pool(k, v)
    coef = torch.expm1(kernel.to(p.dtype))
    y = (pooled + _depthwise_2d(pv, coef, grid)) / (1 + _depthwise_2d(p, coef, grid))
    return gate(q, y)


def aft_local_2d(q, k, v, pos_u, pos_v, window: int, grid):
    """AFT-local over a patch grid (non-causal): bias u_t . v_t' inside the s x s window of t, 0 outside.

    q, k, v: (B, T, 1, D); pos_u, pos_v: (B|1, T, R) the factors of the T patches; grid: (Gh, Gw).
    """
    p, pv, pooled = _grid_pool(k, v)
    coef = torch.expm1(local_band_2d(pos_u.to(p.dtype), pos_v.to(p.dtype), window, grid))
    y = (pooled + _band_sum_2d(coef, pv, grid)) / (1 + _band_sum_2d(coef, p, grid))
    return gate(q, y)


def conv_kernel_2d(weight, gamma, beta, eps: float = 1e-5):
    """`conv_kernel` over the s * s entries of each head's 2-D kernel: weight (H, s, s) -> (H, s, s)."""
    return conv_kernel(weight.flatten(1), gamma, beta, eps).view(weight.shape)


def local_band_2d(pos_u, pos_v, window: int, grid):
    """Window bias u_t . v_{t'} of every window entry: (B|1, T, R) x2 -> (B|1, T, s, s)."""
    Bp, T, R = pos_v.shape
    vg = _pad_grid(pos_v, grid, window).permute(0, 3, 1, 2)  # (B|1, R, Gh + s - 1, Gw + s - 1)
    v_win = F.unfold(vg, window).view(Bp, R, window * window, T)
    return torch.einsum("btr,brjt->btj", pos_u, v_win).view(Bp, T, window, window)


def grid_window_index(grid, s: int, device=None):
    """For every pair (t, t') of the flattened grid: the window entry (i, j) where t' lies seen from t, and whether
    t' is inside t's s x s window. -> i, j (T, T) long (clamped to [0, s)), inside (T, T) bool."""
    Gh, Gw = grid
    yy, xx = torch.meshgrid(torch.arange(Gh, device=device), torch.arange(Gw, device=device), indexing="ij")
    y, x = yy.flatten(), xx.flatten()
    i = y[None, :] - y[:, None] + (s - 1) // 2
    j = x[None, :] - x[:, None] + (s - 1) // 2
    inside = (i >= 0) & (i < s) & (j >= 0) & (j < s)
    return i.clamp(0, s - 1), j.clamp(0, s - 1), inside


def _grid_pool(k, v):
    """Non-causal pool with one reference per channel: p = e^{k - logsumexp_t k} <= 1 (sums to 1 over t).

    k: (B, T, H, Dk), v: (B, T, H, Dv) -> p (B, T, H, Dk), p * v (B, T, H, Dv), pooled sum_t p v (B, 1, H, Dv).
    """
    k = k.to(acc_dtype(k))
    p = torch.exp(k - torch.logsumexp(k, dim=1, keepdim=True))
    pv = p * v.to(k.dtype)
    return p, pv, pv.sum(1, keepdim=True)


def _pad_grid(x, grid, s: int):
    """(B, T, ...) -> (B, Gh + s - 1, Gw + s - 1, ...) zero-padded so that window entry (i, j) of (y, x) is at
    (y + i, x + j)."""
    lo, hi = (s - 1) // 2, s // 2
    x = x.reshape(x.shape[0], *grid, *x.shape[2:])
    pad = [0, 0] * (x.dim() - 3) + [lo, hi, lo, hi]
    return F.pad(x, pad)


def _depthwise_2d(x, coef, grid):
    """sum_{i,j} coef[h, i, j] x[window entry (i, j)] as a depth-wise conv2d (cross-correlation).

    x: (B, T, H, C), coef: (H, s, s) shared by the C channels of head h -> (B, T, H, C). The (B, T, H * C) memory
    is already channels-last, so the conv2d runs on a permuted view and its output permutes back without a copy.
    """
    B, T, H, C = x.shape
    s = coef.shape[-1]
    lo, hi = (s - 1) // 2, s // 2
    xg = x.reshape(B, *grid, H * C).permute(0, 3, 1, 2)  # (B, H * C, Gh, Gw) view
    if lo != hi:  # an even kernel: one more patch after than before
        xg = F.pad(xg, (lo, hi, lo, hi))
    weight = coef.to(x.dtype).repeat_interleave(C, dim=0)[:, None]  # (H * C, 1, s, s)
    y = F.conv2d(xg, weight, padding=lo if lo == hi else 0, groups=H * C)  # (B, H * C, Gh, Gw)
    return y.permute(0, 2, 3, 1).reshape(B, T, H, C)


def _band_sum_2d(coef, x, grid):
    """sum_{i,j} coef[b, t, i, j] x[window entry (i, j) of t], one shifted view per entry.

    coef: (B|1, T, s, s) absolute per-position bias coefficients; x: (B, T, H, C) -> (B, T, H, C).
    """
    Gh, Gw = grid
    s = coef.shape[-1]
    xg = _pad_grid(x, grid, s)
    coef = coef.reshape(coef.shape[0], Gh, Gw, s, s, 1, 1)
    out = torch.zeros_like(xg[:, :Gh, :Gw])
    for i in range(s):
        for j in range(s):
            out = out + coef[:, :, :, i, j] * xg[:, i : i + Gh, j : j + Gw]
    return out.reshape(x.shape)
