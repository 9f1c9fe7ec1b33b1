"""The Attention Free Transformer operator (Zhai et al. 2021, Eq. 2), as pure tensor functions.

    y_t = q_t * sum_{t'} exp(k_{t'} + w_{t,t'}) v_{t'} / sum_{t'} exp(k_{t'} + w_{t,t'})

`q` is the already-activated query gate sigma_q(Q). Every function here works on

    q, v: (B, T, H, Dv)      k: (B, T, H, Dk) with Dk == Dv (one key per channel) or Dk == 1 (one per head)

`full`, `local` and `simple` use H = 1 (the bias is shared by all channels); `conv` uses H heads, one key
scalar per head and position, and a kernel per head. `mask` (B, T) marks real tokens (1) and padding (0);
padding contributes to neither sum.

Numerics: everything is computed in float32 (float64 stays float64) and every exponential is taken against a
reference that is at least the largest logit it scales, so nothing overflows; references are per position
(a running log-sum-exp), never one global max, so nothing underflows to 0/0. Padding keys are set to the
finite NEG rather than -inf so that NEG - NEG == 0 instead of NaN.

Layout of this file: the literal reference formula; the shared core (prefix pool + window band) used by
`simple`, `local` and `conv`; the blocked form of `full`; the one-step recurrent form and its state.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

NEG = -1e30


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _mask_keys(k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    k = k.to(_acc_dtype(k))
    if mask is None:
        return k
    return torch.where(mask.bool()[:, :, None, None], k, torch.full_like(k, NEG))


# ---------------------------------------------------------------------------------------------------------------
# Reference: the literal formula, O(T^2 * D) memory. For tests and for reading.


def aft_reference(q, k, v, w=None, *, causal: bool, mask=None):
    """Literal Eq. 2. `w`: dense position bias (B|1, H|1, T, T) or None (AFT-simple)."""
    B, T, H, _ = k.shape
    dtype = _acc_dtype(k)
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
    y = (p * v.to(dtype)[:, None]).sum(2)  # (B, T, H, Dv)
    y = torch.where(empty[..., None], torch.zeros_like(y), y)
    return (q.to(dtype) * y).to(q.dtype)


def local_bias_dense(pos_u, pos_v, window: int, *, causal: bool):
    """AFT-local bias: u_t . v_t' inside |t - t'| < window, exactly 0 outside. -> (B|1, 1, T, T)."""
    w = pos_u @ pos_v.transpose(-1, -2)
    T = w.shape[-1]
    offset = torch.arange(T, device=w.device)[:, None] - torch.arange(T, device=w.device)[None, :]
    inside = offset.abs() < window
    return torch.where(inside, w, torch.zeros_like(w))[:, None]


def conv_bias_dense(kernel, T: int, *, causal: bool):
    """AFT-conv bias from a per-head kernel (H, s): kernel[h, j] weights position t - left + j. -> (1, H, T, T)."""
    H, s = kernel.shape
    left = s - 1 if causal else (s - 1) // 2
    j = torch.arange(T, device=kernel.device)[None, :] - torch.arange(T, device=kernel.device)[:, None] + left
    inside = (j >= 0) & (j < s)
    w = kernel[:, j.clamp(0, s - 1)]  # (H, T, T)
    return torch.where(inside, w, torch.zeros_like(w))[None]


def conv_kernel(weight, gamma, beta, eps: float = 1e-5):
    """AFT-conv re-parameterisation w <- gamma * (w - mean(w)) / std(w) + beta, per head.

    weight: (H, s); gamma, beta: (H,). With gamma = beta = 0 (the initialisation) the kernel is 0 and the layer
    is per-head AFT-simple.
    """
    w = weight.float() if weight.dtype != torch.float64 else weight
    centred = w - w.mean(-1, keepdim=True)
    std = centred.pow(2).mean(-1, keepdim=True).sqrt()
    return gamma.to(w.dtype)[:, None] * centred / (std + eps) + beta.to(w.dtype)[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Shared core of simple / local / conv: a pool over all positions outside the window (bias 0) plus a band of
# window terms with their own bias (AFT.md, the exp(w) - 1 identity).


def _prefix_pool(k, v):
    """Causal pool over t' <= t, as a log-normaliser m_t = log sum e^k and the weighted mean n_t (so z_t = 1).

    v = a - b with a = relu(v) + 1 >= 1 and b = a - v >= 1, so both weighted means come from a log-space cumulative
    sum with finite logs, nothing in it looks past t, and d(a - b)/dv = 1 exactly. -> m (B, T, H, Dk), n (B, T, H, Dv).
    """
    m = torch.logcumsumexp(k, dim=1)
    a = v.clamp(min=0) + 1
    b = a - v
    mean = lambda x: torch.exp(torch.logcumsumexp(k + torch.log(x), dim=1) - m)  # noqa: E731
    return m, mean(a) - mean(b)


def _unfold(x, left: int, right: int, fill: float):
    """(B, T, H, D) -> (B, T, H, D, W), W = left + right + 1: entry j is position t - left + j (a view)."""
    xp = F.pad(x, (0, 0, 0, 0, left, right), value=fill)
    return xp.unfold(1, left + right + 1, 1)


def _band_sum(coef, x_win):
    """sum_j coef[..., j] * x_win[..., j], looping over the window so only views are kept for backward."""
    out = coef[..., 0] * x_win[..., 0]
    for j in range(1, coef.shape[-1]):
        out = out + coef[..., j] * x_win[..., j]
    return out


def _windowed(
    k,
    v,
    band,
    left: int,
    right: int,
    *,
    causal: bool,
    mask=None,
    return_state: bool = False,
):
    """Pool (bias 0) + window band (bias `band`), exact in both causal and non-causal modes.

    k, v as in the module docstring; band: (B|1, T, H|1, 1, W) bias of window entry j (position t - left + j),
    or None for AFT-simple (no window). Returns y (B, T, H, Dv) in float32, and for causal `return_state` the
    decoding state after the last position.
    """
    k = _mask_keys(k, mask)
    v = v.to(k.dtype)
    B, T = k.shape[:2]
    if causal:
        m, n = _prefix_pool(k, v)
        if band is None:
            y = n
            state = AFTState(m[:, -1], n[:, -1], torch.ones_like(m[:, -1])) if return_state else None
            return y, state
        # Pool of the positions before the window: the prefix up to t - W (z = 0 where there is none).
        W = left + 1
        pad = lambda x, val: F.pad(x, (0, 0, 0, 0, W, 0), value=val)[:, :T]  # noqa: E731
        m_out, n_out = pad(m, NEG), pad(n, 0.0)
        z_out = pad(torch.ones_like(m), 0.0)
        logits = _unfold(k, left, 0, NEG) + band  # (B, T, H, Dk, W)
        ref = torch.maximum(m_out, logits.amax(-1))  # exact per-position max: no exponent is positive
        e = torch.exp(logits - ref[..., None])
        scale = torch.exp(m_out - ref)
        den = z_out * scale + e.sum(-1)
        num = n_out * scale + _band_sum(e, _unfold(v, left, 0, 0.0))
        y = num / den
        state = None
        if return_state:
            has_pool = T >= W
            pool = (
                AFTState(m[:, T - W], n[:, T - W], torch.ones_like(m[:, 0]))
                if has_pool
                else empty_state(
                    B,
                    k.shape[2],
                    k.shape[3],
                    v.shape[3],
                    0,
                    device=k.device,
                    dtype=k.dtype,
                )
            )
            k_buf = _unfold(k, left, 0, NEG)[:, -1, ..., 1:].permute(0, 3, 1, 2)  # last W - 1 keys
            v_buf = _unfold(v, left, 0, 0.0)[:, -1, ..., 1:].permute(0, 3, 1, 2)
            state = pool._replace(k=k_buf, v=v_buf)
        return y, state
    # Non-causal: global pool with one reference per channel (every row sees the max key), then the window
    # correction sum_j (e^w - 1) p v with p = e^{k - m} <= 1.
    m = torch.logsumexp(k, dim=1, keepdim=True)
    p = torch.exp(k - m)
    pv = p * v
    y = pv.sum(1, keepdim=True)
    if band is None:
        return y.expand_as(v), None
    coef = torch.expm1(band)
    num = y + _band_sum(coef, _unfold(pv, left, right, 0.0))
    den = 1 + _band_sum(coef, _unfold(p, left, right, 0.0))
    return num / den, None


def local_band(pos_u, pos_v, left: int, right: int):
    """Window bias u_t . v_{t - left + j}: (B|1, T, R) x2 -> (B|1, T, 1, 1, W)."""
    v_win = _unfold(pos_v[:, :, None], left, right, 0.0)[:, :, 0]  # (B|1, T, R, W)
    return torch.einsum("btr,btrw->btw", pos_u, v_win)[:, :, None, None]


def _conv_window(s: int, causal: bool):
    return (s - 1, 0) if causal else ((s - 1) // 2, s // 2)


def aft_simple(q, k, v, *, causal: bool, mask=None, return_state: bool = False):
    y, state = _windowed(k, v, None, 0, 0, causal=causal, mask=mask, return_state=return_state)
    return _gate(q, y), state


def aft_local(
    q,
    k,
    v,
    pos_u,
    pos_v,
    window: int,
    *,
    causal: bool,
    mask=None,
    return_state: bool = False,
):
    """AFT-local: bias u_t . v_t' for |t - t'| < window, 0 outside. pos_u, pos_v: (B|1, T, R)."""
    left, right = (window - 1, 0) if causal else (window - 1, window - 1)
    pos_u, pos_v = pos_u.to(_acc_dtype(k)), pos_v.to(_acc_dtype(k))
    band = local_band(pos_u, pos_v, left, right)
    y, state = _windowed(k, v, band, left, right, causal=causal, mask=mask, return_state=return_state)
    if state is not None:  # key-side factors of the last window - 1 positions: (B, window - 1, R)
        pos = _unfold(pos_v[:, :, None], left, 0, 0.0)[:, -1, 0, :, 1:].transpose(1, 2)
        state = state._replace(pos=pos.expand(k.shape[0], -1, -1))
    return _gate(q, y), state


def aft_conv(q, k, v, kernel, *, causal: bool, mask=None, return_state: bool = False):
    """AFT-conv over a sequence. kernel: (H, s) effective per-head kernel (see `conv_kernel`); k: (B, T, H, 1)."""
    left, right = _conv_window(kernel.shape[-1], causal)
    band = kernel.to(_acc_dtype(k))[None, None, :, None, :]  # (1, 1, H, 1, s)
    y, state = _windowed(k, v, band, left, right, causal=causal, mask=mask, return_state=return_state)
    return _gate(q, y), state


def _gate(q, y):
    return (q.to(y.dtype) * y).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# AFT-full: w = u v^T over all pairs. One T x T bias, shared by batch and channels; never B x T x T x D.


def _combine(m1, n1, z1, m2, n2, z2):
    """Merge two partial sums (n, z scaled by exp(-m)) into one, against the larger reference."""
    m = torch.maximum(m1, m2)
    a, b = torch.exp(m1 - m), torch.exp(m2 - m)
    return m, n1 * a + n2 * b, z1 * a + z2 * b


def _full_causal(k, v, w):
    """Causal AFT-full by a binary tree of key blocks.

    At level b (block size 2^l) each odd block of rows takes the even block of keys just before it: every key
    in it is visible to every row, so the reference rowmax(w) + blockmax(k) is attained up to the spread of w
    and never underflows (a single column max over the sequence can). The diagonal t' = t starts the sum.
    k: (B, T, H, Dk), v: (B, T, H, Dv), w: (B|1, T, T) with T a power of two.
    """
    B, T, H, Dk = k.shape
    Bw = w.shape[0]
    idx = torch.arange(T, device=k.device)
    M, N, Z = k + w[:, idx, idx][:, :, None, None], v, torch.ones_like(k)
    b = 1
    while b < T:
        P = T // (2 * b)
        kb = k.view(B, P, 2, b, H, Dk)[:, :, 0]  # keys: even blocks (B, P, b, H, Dk)
        vb = v.view(B, P, 2, b, H, -1)[:, :, 0]
        kmax = kb.amax(2, keepdim=True)
        ek = torch.exp(kb - kmax)
        wb = w.view(Bw, P, 2, b, P, 2, b).diagonal(dim1=1, dim2=4)[:, 1, :, 0]  # rows odd, keys even (Bw, b, b, P)
        wb = wb.permute(0, 3, 1, 2)  # (Bw, P, b_rows, b_keys)
        wmax = wb.amax(-1, keepdim=True)
        ew = torch.exp(wb - wmax)[:, :, None]  # (Bw, P, 1, b, b)
        num = ew @ (ek * vb).permute(0, 1, 3, 2, 4)  # (B, P, H, b, Dv)
        den = ew @ ek.permute(0, 1, 3, 2, 4)  # (B, P, H, b, Dk)
        ref = wmax[:, :, None] + kmax.permute(0, 1, 3, 2, 4)  # (B, P, H, b, Dk)

        # Scatter onto the odd row blocks; even rows get an empty part (NEG, 0, 0).
        def rows(x, fill):  # noqa: E306
            x = x.permute(0, 1, 3, 2, 4)  # (B, P, b, H, D)
            return torch.stack([torch.full_like(x, fill), x], dim=2).reshape(B, T, H, -1)

        M, N, Z = _combine(M, N, Z, rows(ref, NEG), rows(num, 0.0), rows(den, 0.0))
        b *= 2
    return N / Z


def full_bias(pos_u, pos_v):
    """w = u v^T: (B|1, T, R) x2 -> (B|1, T, T)."""
    return pos_u @ pos_v.transpose(-1, -2)


def aft_full(q, k, v, pos_u, pos_v, *, causal: bool, mask=None, return_state: bool = False):
    """AFT-full with the factorised bias w = u v^T. pos_u, pos_v: (B|1, T, R)."""
    k = _mask_keys(k, mask)
    v = v.to(k.dtype)
    w = full_bias(pos_u.to(k.dtype), pos_v.to(k.dtype))
    B, T = k.shape[:2]
    if causal:
        T2 = 1 << max(T - 1, 0).bit_length()  # the tree halves blocks: pad to a power of two with NEG keys
        pad = T2 - T
        kp = F.pad(k, (0, 0, 0, 0, 0, pad), value=NEG)
        vp = F.pad(v, (0, 0, 0, 0, 0, pad))
        wp = F.pad(w, (0, pad, 0, pad))
        y = _full_causal(kp, vp, wp)[:, :T]
    else:
        kmax = k.amax(1, keepdim=True)  # every row sees this key, so the reference is attained
        ek = torch.exp(k - kmax).permute(0, 2, 1, 3)  # (B, H, T, Dk)
        wmax = w.amax(-1, keepdim=True)
        ew = torch.exp(w - wmax)[:, None]  # (B|1, 1, T, T)
        num = ew @ (ek * v.permute(0, 2, 1, 3))
        den = ew @ ek
        y = (num / den).permute(0, 2, 1, 3)
    state = None
    if return_state:
        state = empty_state(B, k.shape[2], k.shape[3], v.shape[3], 0, device=k.device, dtype=k.dtype)
        state = state._replace(k=k, v=v, pos=pos_v.to(k.dtype).expand(B, -1, -1))
    return _gate(q, y), state


# ---------------------------------------------------------------------------------------------------------------
# Recurrent form: one token at a time against a state.


class AFTState(NamedTuple):
    """Decoding state of one layer, in float32.

    m, z: (B, H, Dk) and n: (B, H, Dv): the pool of positions outside the window, as n and z scaled by exp(-m)
    (AFT.md's (n, z, m) recurrence). k, v: (B, S, H, Dk|Dv) the positions inside the window, oldest first
    (S = window - 1 for local/conv, every past position for full, none for simple); pos: (B, S, R) their key-side
    position factors v_t' (local and full only).
    """

    m: torch.Tensor
    n: torch.Tensor
    z: torch.Tensor
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    pos: torch.Tensor | None = None


def empty_state(B, H, Dk, Dv, buffer: int, *, rank: int = 0, device=None, dtype=torch.float32):
    """The state before any token: an empty pool (z = 0) and a window buffer of `buffer` empty (NEG) slots."""
    kw = {"device": device, "dtype": dtype}
    state = AFTState(
        torch.full((B, H, Dk), NEG, **kw),
        torch.zeros(B, H, Dv, **kw),
        torch.zeros(B, H, Dk, **kw),
    )
    if buffer is None:
        return state
    return state._replace(
        k=torch.full((B, buffer, H, Dk), NEG, **kw),
        v=torch.zeros(B, buffer, H, Dv, **kw),
        pos=torch.zeros(B, buffer, rank, **kw) if rank else None,
    )


def aft_step(
    q,
    k,
    v,
    state: AFTState,
    *,
    window: int | None,
    kernel=None,
    pos_u=None,
    pos_v=None,
    mask=None,
):
    """Advance the state by one causal step; returns (y, new_state).

    q, v: (B, H, Dv); k: (B, H, Dk); mask: (B,) or None. window: 0 for simple, s for local/conv (the buffer keeps
    s - 1 positions), None for full (the buffer keeps all). The bias of the window is `kernel` (H, s) for conv, or
    pos_u (B|1, R) . [state.pos, pos_v (B|1, R)] for local and full.
    """
    dtype = _acc_dtype(k)
    k = k.to(dtype)
    if mask is not None:
        k = torch.where(mask.bool()[:, None, None], k, torch.full_like(k, NEG))
    v = v.to(dtype)
    if window == 0:  # simple: the pool is everything
        m, n, z = _combine(state.m, state.n, state.z, k, v, torch.ones_like(k))
        return _gate(q, n / z), AFTState(m, n, z)
    keys = torch.cat([state.k, k[:, None]], dim=1)  # (B, S + 1, H, Dk)
    values = torch.cat([state.v, v[:, None]], dim=1)
    pos = None
    if kernel is not None:
        bias = kernel.to(dtype).T[None, :, :, None]  # (1, s, H, 1)
    else:
        pos = torch.cat([state.pos, pos_v.to(dtype).expand(k.shape[0], -1)[:, None]], dim=1)  # (B, S + 1, R)
        bias = torch.einsum("br,bsr->bs", pos_u.to(dtype).expand(k.shape[0], -1), pos)[:, :, None, None]
    logits = keys + bias
    ref = torch.maximum(state.m, logits.amax(1))
    e = torch.exp(logits - ref[:, None])
    scale = torch.exp(state.m - ref)
    y = (state.n * scale + (e * values).sum(1)) / (state.z * scale + e.sum(1))
    if window is None:  # full: keep every position
        return _gate(q, y), state._replace(k=keys, v=values, pos=pos)
    # local/conv: the oldest position leaves the window and joins the pool (bias 0 from now on).
    m, n, z = _combine(state.m, state.n, state.z, keys[:, 0], values[:, 0], torch.ones_like(k))
    new = AFTState(m, n, z, keys[:, 1:], values[:, 1:], pos[:, 1:] if pos is not None else None)
    return _gate(q, y), new


# ---------------------------------------------------------------------------------------------------------------
# Images: the non-causal operator over an (Gh, Gw) patch grid, positions flattened row by row (t = y * Gw + x),
# so q, k, v keep the (B, T, H, D) layout above with T = Gh * Gw. `full` needs nothing new (its bias is absolute:
# `aft_full(..., causal=False)` over the T patches), nor does `simple` (`aft_simple(..., causal=False)`).
# `conv` and `local` have an s x s window: entry (i, j) of the window of (y, x) is the patch
# (y - (s - 1) // 2 + i, x - (s - 1) // 2 + j), as the 1-D non-causal conv kernel is centred. Both are a global pool
# plus a windowed correction with coefficient e^w - 1 (AFT.md); the grid is zero-padded, so windows that leave the
# grid add nothing.


def _grid_window_index(grid, s: int, device=None):
    """For every pair (t, t') of the flattened grid: the window entry (i, j) where t' lies seen from t, and whether
    t' is inside t's s x s window. -> i, j (T, T) long (clamped to [0, s)), inside (T, T) bool."""
    Gh, Gw = grid
    yy, xx = torch.meshgrid(torch.arange(Gh, device=device), torch.arange(Gw, device=device), indexing="ij")
    y, x = yy.flatten(), xx.flatten()
    i = y[None, :] - y[:, None] + (s - 1) // 2
    j = x[None, :] - x[:, None] + (s - 1) // 2
    inside = (i >= 0) & (i < s) & (j >= 0) & (j < s)
    return i.clamp(0, s - 1), j.clamp(0, s - 1), inside


def conv_bias_dense_2d(kernel, grid):
    """AFT-conv bias over a grid from per-head s x s kernels (H, s, s), 0 outside the window. -> (1, H, T, T)."""
    i, j, inside = _grid_window_index(grid, kernel.shape[-1], kernel.device)
    w = kernel[:, i, j]  # (H, T, T)
    return torch.where(inside, w, torch.zeros_like(w))[None]


def local_bias_dense_2d(pos_u, pos_v, window: int, grid):
    """AFT-local bias over a grid: u_t . v_t' inside the s x s window of t, exactly 0 outside. -> (B|1, 1, T, T)."""
    w = pos_u @ pos_v.transpose(-1, -2)
    _, _, inside = _grid_window_index(grid, window, w.device)
    return torch.where(inside, w, torch.zeros_like(w))[:, None]


def conv_kernel_2d(weight, gamma, beta, eps: float = 1e-5):
    """`conv_kernel` over the s * s entries of each head's 2-D kernel: weight (H, s, s) -> (H, s, s)."""
    return conv_kernel(weight.flatten(1), gamma, beta, eps).view(weight.shape)


def _grid_pool(k, v):
    """Non-causal pool with one reference per channel: p = e^{k - logsumexp_t k} <= 1 (sums to 1 over t).

    k: (B, T, H, Dk), v: (B, T, H, Dv) -> p (B, T, H, Dk), p * v (B, T, H, Dv), pooled sum_t p v (B, 1, H, Dv).
    """
    k = k.to(_acc_dtype(k))
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


def aft_conv_2d(q, k, v, kernel, grid):
    """AFT-conv over a patch grid (non-causal). q, v: (B, T, H, Dh); k: (B, T, H, 1); kernel: (H, s, s) effective
    per-head kernel (see `conv_kernel_2d`); grid: (Gh, Gw) with Gh * Gw == T. Works at any grid size.

    num_t = sum_t' p_t' v_t' + sum_window (e^w - 1) p v,   den_t = 1 + sum_window (e^w - 1) p   (sum_t' p_t' = 1)
    """
    p, pv, pooled = _grid_pool(k, v)
    coef = torch.expm1(kernel.to(p.dtype))
    y = (pooled + _depthwise_2d(pv, coef, grid)) / (1 + _depthwise_2d(p, coef, grid))
    return _gate(q, y)


def local_band_2d(pos_u, pos_v, window: int, grid):
    """Window bias u_t . v_{t'} of every window entry: (B|1, T, R) x2 -> (B|1, T, s, s)."""
    Bp, T, R = pos_v.shape
    vg = _pad_grid(pos_v, grid, window).permute(0, 3, 1, 2)  # (B|1, R, Gh + s - 1, Gw + s - 1)
    v_win = F.unfold(vg, window).view(Bp, R, window * window, T)
    return torch.einsum("btr,brjt->btj", pos_u, v_win).view(Bp, T, window, window)


def aft_local_2d(q, k, v, pos_u, pos_v, window: int, grid):
    """AFT-local over a patch grid (non-causal): bias u_t . v_t' inside the s x s window of t, 0 outside.

    q, k, v: (B, T, 1, D); pos_u, pos_v: (B|1, T, R) the factors of the T patches; grid: (Gh, Gw).
    """
    p, pv, pooled = _grid_pool(k, v)
    coef = torch.expm1(local_band_2d(pos_u.to(p.dtype), pos_v.to(p.dtype), window, grid))
    y = (pooled + _band_sum_2d(coef, pv, grid)) / (1 + _band_sum_2d(coef, p, grid))
    return _gate(q, y)
