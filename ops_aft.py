"""The Attention Free Transformer operator (Zhai et al. 2021, Eq. 2), as pure tensor functions.

    y_t = q_t * sum_{t'} exp(k_{t'} + w_{t,t'}) v_{t'} / sum_{t'} exp(k_{t'} + w_{t,t'})

`q` is the already-activated query gate sigma_q(Q). Every function here works on

    q, v: (B, T, H, Dv)      k: (B, T, H, Dk) with Dk == Dv (one key per channel) or Dk == 1 (one per head)

`full`, `local` and `simple` use H = 1 (the bias is shared by all channels); `conv` uses H heads, one key
scalar per head and position, and a kernel per head. `mask` (B, T) marks real tokens (1) and padding (0);
padding contributes to neither sum.

Numerics: everything is computed in float32 (float64 stays float64) and every exponential is taken against a
reference that is at least the largest logit it scales, so nothing overflows; references are per position
(a running log-sum-exp) or per chunk of positions, never one global max, so nothing underflows to 0/0. The
chunked causal form (`_causal_chunked`, matrix products per chunk) checks its own range and hands the rare input
it cannot represent exactly (keys jumping by more than ~60 inside a chunk) to its exact twin `_causal_reference`;
the blocked causal AFT-full (`_full_blocked`) does the same with its tree `_full_causal`.
Padding keys are set to the finite NEG rather than -inf so that NEG - NEG == 0 instead of NaN.

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


def _pool_of_chunks(k, v, padded: bool):
    """`_prefix_pool` over a sequence of chunk totals (log-normaliser k, mean v): by `_simple_chunked` one level up,
    or in log space when that level declines. -> m, n as `_prefix_pool`."""
    if k.shape[1] == 1:  # the pool of one chunk is the chunk
        return k, v
    pooled = _simple_chunked(k, v, padded=padded, normaliser=True)
    return _prefix_pool(k, v) if pooled is None else pooled[::-1]


def _reference_or_first_key(ref, keys, dim: int):
    """`ref` where it is a real key, else the first real key of `keys` along `dim` (the positions before that key
    see only padding). `ref` has the shape of `keys` without `dim`."""
    first = (keys > NEG / 2).to(torch.uint8).argmax(dim, keepdim=True)
    return torch.where(ref > NEG / 2, ref, keys.gather(dim, first).squeeze(dim))


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


# Rows per chunk of the chunked forms below: each chunk is one (C, C + W - 1) matrix product, so the work per
# position is O(C + W) multiply-adds in a matmul instead of O(W) passes over the tensors.
CHUNK = 64


def _band_chunks(band, T: int, C: int):
    """Window bias (B|1, T|1, H|1, 1, W) -> (B|1, nC|1, H|1, C, W): one row of W entries per position, by chunk."""
    b = band[..., 0, :]
    if b.shape[1] == 1:  # position-independent (conv): one chunk serves all
        return b.expand(-1, C, -1, -1).unflatten(1, (1, C)).transpose(2, 3)
    nC = -(-T // C)
    b = F.pad(b, (0, 0, 0, 0, 0, nC * C - T))
    return b.unflatten(1, (nC, C)).transpose(2, 3)


def _skew(coef):
    """(..., C, W) -> (..., C, C + W - 1) with coef[..., r, j] at column r + j, zeros elsewhere (pad and re-view)."""
    C, W = coef.shape[-2:]
    flat = F.pad(coef, (0, C)).flatten(-2)[..., : C * (C + W - 1)]
    return flat.unflatten(-1, (C, C + W - 1))


def _chunk_columns(x, left: int, right: int, C: int, fill: float):
    """(B, T, H, D) -> (B, nC, H, C + left + right, D): the columns that chunk c of C rows reads (a strided view)."""
    T = x.shape[1]
    nC = -(-T // C)
    xp = F.pad(x, (0, 0, 0, 0, left, nC * C - T + right), value=fill)
    return xp.unfold(1, C + left + right, C).transpose(-1, -2)


def _from_chunks(y, T: int):
    """(B, nC, H, C, D) -> (B, T, H, D)."""
    return y.permute(0, 1, 3, 2, 4).flatten(1, 2)[:, :T]


def _band_matmul(coef, x, left: int, right: int):
    """sum_j coef[t, j] * x[t - left + j] as one banded matrix product per chunk of rows.

    coef: (B|1, T|1, H|1, 1, W) with W = left + right + 1; x: (B, T, H, D) -> (B, T, H, D).
    """
    T = x.shape[1]
    C = min(CHUNK, T)
    G = _skew(_band_chunks(coef, T, C))  # (B|1, nC|1, H|1, C, C + W - 1)
    return _from_chunks(G @ _chunk_columns(x, left, right, C, 0.0), T)


def _causal_chunked(k, v, band, left: int, mask=None):
    """Causal pool + window band by chunks of C rows: one matmul per chunk and a scan over chunk totals.

    Row t of chunk c reads the columns cC - left .. cC + C - 1 with coefficient exp(w_{t,j}) inside its window
    and 1 (bias 0) before it; everything before cC - left comes in as the chunk's carry, an exact prefix over
    chunks. Every reference looks only at positions <= cC, so no output depends on a later token, not even in
    its last bit: columns are scaled by exp(k - b) with b the largest key up to the chunk's first row, rows by
    exp(b + max log-coefficient - ref) with ref >= both parts. Two things can go wrong, and both are detected:
    a key more than 60 above b inside the chunk (exp(k - b) could overflow), and a row sum below tiny * 2^40
    (its underflowed terms would no longer be below 2^-40 of it). Then this returns None and the caller uses the
    exact `_causal_reference`. Otherwise returns y (B, T, H, Dv).
    """
    if band is None:  # AFT-simple: no window, a leaner form
        return _simple_chunked(k, v, mask)
    B, T, H, Dk = k.shape
    C = min(CHUNK, T)
    nC = -(-T // C)
    kp = F.pad(k, (0, 0, 0, 0, left, nC * C - T), value=NEG)  # (B, left + nC * C, H, Dk)
    vp = F.pad(v, (0, 0, 0, 0, left, nC * C - T))
    # 1. carry: segment c = the first C columns of chunk c; chunk c sees every segment before it in full
    seg_k, seg_v = kp[:, : nC * C].unflatten(1, (nC, C)), vp[:, : nC * C].unflatten(1, (nC, C))
    a_seg = seg_k.detach().amax(2)  # (B, nC, H, Dk)
    e = torch.exp(seg_k - a_seg[:, :, None])  # (B, nC, C, H, Dk), its max is 1
    z_seg = e.sum(2)
    m_seg, n_seg = _pool_of_chunks(a_seg + torch.log(z_seg), (e * seg_v).sum(2) / z_seg, mask is not None)
    carry_m = F.pad(m_seg[:, :-1], (0, 0, 0, 0, 1, 0), value=NEG).unsqueeze(3)  # (B, nC, H, 1, Dk), exclusive
    carry_n = F.pad(n_seg[:, :-1], (0, 0, 0, 0, 1, 0)).unsqueeze(3)
    carry_z = (torch.arange(nC, device=k.device) > 0).to(k.dtype)[None, :, None, None, None]  # chunk 0: empty
    # 2. in-chunk part: G (B|1, nC|1, H|1, C, L) @ columns (B, nC, H, L, D), L = C + left
    kw = kp.unfold(1, C + left, C).transpose(-1, -2)  # (B, nC, H, L, Dk)
    vw = vp.unfold(1, C + left, C).transpose(-1, -2)
    kd = kw.detach()
    before = torch.cummax(F.pad(a_seg[:, :-1], (0, 0, 0, 0, 1, 0), value=NEG), dim=1).values
    b = torch.maximum(before.unsqueeze(3), kd[..., : left + 1, :].amax(-2, keepdim=True))  # positions <= cC
    if mask is not None:  # only padding so far: the chunk's first real key
        b = _reference_or_first_key(b.squeeze(-2), kd, -2).unsqueeze(-2)
    overflow = (kd.amax(-2, keepdim=True) - b > 60).any()  # checked with the underflow, at the end
    x = torch.exp(kw - b)
    rows = torch.arange(C, device=k.device)
    outside = (torch.arange(C + left, device=k.device)[None, :] < rows[:, None]).to(k.dtype)  # bias 0
    w = _band_chunks(band.to(k.dtype), T, C)
    gmax = w.detach().amax(-1, keepdim=True).clamp(min=0)  # (B|1, nC|1, H|1, C, 1); outside: log 1 = 0
    G = _skew(torch.exp(w - gmax)) + outside * torch.exp(-gmax)
    num, den = G @ (x * vw), G @ x  # (B, nC, H, C, Dv), (B, nC, H, C, Dk)
    # 3. rows: both parts against the larger of their references
    inner = b + gmax
    ref = torch.maximum(carry_m.detach(), inner)
    s_in, s_carry = torch.exp(inner - ref), torch.exp(carry_m - ref) * carry_z
    num = s_carry * carry_n + s_in * num
    den = s_carry + s_in * den
    underflow = den < torch.finfo(den.dtype).tiny * 2.0**40
    seen = None
    if mask is not None:  # rows that have seen only padding are empty: 0 by definition, not an underflow
        seen = F.pad(mask.cumsum(1) > 0, (0, nC * C - T)).view(B, nC, 1, C, 1)
        underflow = underflow & seen
    if bool(overflow | underflow.any()):  # one data-dependent branch, after all the work (one graph under compile)
        return None
    y = num / torch.where(den > 0, den, torch.ones_like(den))
    if seen is not None:
        y = torch.where(seen, y, torch.zeros_like(y))
    return _from_chunks(y, T)


def _simple_chunked(k, v, mask=None, *, padded: bool = False, normaliser: bool = False):
    """`_causal_chunked` without a window (AFT-simple): the fewest passes over the tensors.

    Chunk c of C rows is scaled by exp(k - r_c) with r_c the largest key at positions <= cC (so r never decreases
    and every row sees the key that attains its reference: each row sum is >= 1, nothing underflows). The rows'
    prefix sums inside a chunk are one matrix product with a lower-triangular matrix of ones, started from the
    carry of every earlier chunk (`baddbmm`). The carry is this same pool one level up, over the chunk totals
    (log-normaliser r_c + log sum, mean of v): T / C positions, then T / C^2, ...; a level that cannot represent
    its input falls back to the log-space `_prefix_pool` for that level only. Returns y (B, T, H, Dv), with
    `normaliser` also the log-normaliser (B, T, H, Dk) of every row, or None (the caller uses the exact
    `_causal_reference`) when a key lies more than 60 above its chunk's reference. `padded`: keys may be NEG
    (padding; implied by `mask`).
    """
    padded = padded or mask is not None
    B, T, H, Dk = k.shape
    Dv = v.shape[3]
    C = min(CHUNK, T)
    nC = -(-T // C)
    pad = nC * C - T
    if pad:
        k = F.pad(k, (0, 0, 0, 0, 0, pad), value=NEG)
        v = F.pad(v, (0, 0, 0, 0, 0, pad))
    kc = k.reshape(B, nC, C, H, Dk)
    kd = kc.detach()
    cmax = kd.amax(2)  # (B, nC, H, Dk)
    before = torch.cummax(F.pad(cmax[:, :-1], (0, 0, 0, 0, 1, 0), value=NEG), dim=1).values
    r = torch.maximum(before, kd[:, :, 0])  # largest key at positions <= cC
    if padded:  # only padding so far: the chunk's first real key
        r = _reference_or_first_key(r, kd, 2)
    overflow = (cmax - r > 60).any()
    e = torch.sub(kc, r[:, :, None]).exp_()  # (B, nC, C, H, Dk), in place: one buffer
    ev = e * v.reshape(B, nC, C, H, Dv)
    # carry into chunk c: the pool of chunks 0 .. c - 1 (log-normaliser m, mean n), rescaled to r_c
    tot = e.sum(2).clamp(min=torch.finfo(e.dtype).tiny)  # a padding-only chunk adds exp(NEG) = 0
    kk, mean = r + torch.log(tot), ev.sum(2) / tot
    m, n = _pool_of_chunks(kk, mean, padded)
    carry_z = torch.exp(F.pad(m[:, :-1], (0, 0, 0, 0, 1, 0), value=NEG) - r)  # (B, nC, H, Dk), <= T
    carry_n = F.pad(n[:, :-1], (0, 0, 0, 0, 1, 0)) * carry_z
    ones = torch.ones(C, C, dtype=k.dtype, device=k.device).tril().expand(B * nC, C, C)
    num = torch.baddbmm(carry_n.reshape(B * nC, 1, -1), ones, ev.view(B * nC, C, -1))
    den = torch.baddbmm(carry_z.reshape(B * nC, 1, -1), ones, e.view(B * nC, C, -1))
    if bool(overflow):  # one data-dependent branch, after all the work (one graph under compile)
        return None
    num, den = num.view(B, nC * C, H, Dv), den.view(B, nC * C, H, Dk)
    empty = None
    if padded:  # rows that have seen only padding: den = 0, y = 0 (and no 0/0 in backward)
        empty = den == 0
        den = torch.where(empty, torch.ones_like(den), den)
    y = num / den
    if mask is not None:  # rows of an all-padding prefix (r = NEG, every e = 1) are empty by definition
        seen = F.pad(mask.cumsum(1) > 0, (0, pad))[:, :, None, None]
        y = torch.where(seen, y, torch.zeros_like(y))
    if not normaliser:
        return y[:, :T]
    m = r.repeat_interleave(C, dim=1) + torch.log(den)
    if empty is not None:  # an empty row has no normaliser: NEG, so that it adds nothing one level down
        m = torch.where(empty, torch.full_like(m, NEG), m)
    return y[:, :T], m[:, :T]


def _causal_reference(k, v, band, left: int):
    """Exact causal pool + window band from per-position log-space prefix sums (the twin of `_causal_chunked`).

    Slower (two logcumsumexp and one pass per window entry) but it needs no chunk reference at all.
    """
    T = k.shape[1]
    m, n = _prefix_pool(k, v)
    if band is None:
        return n
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
    return num / den


def _causal_state(k, v, left: int):
    """Decoding state after the last position: the pool of positions 0 .. T - 1 - left (one sum, against its own
    largest key) and, for a window, its last `left` keys and values."""
    B, T, H, Dk = k.shape
    if left < T:
        kk = k[:, : T - left]
        m = kk.detach().amax(1)
        e = torch.exp(kk - m[:, None])
        z = e.sum(1)
        state = AFTState(m + torch.log(z), (e * v[:, : T - left]).sum(1) / z, torch.ones_like(m))
    else:
        state = empty_state(B, H, Dk, v.shape[3], 0, device=k.device, dtype=k.dtype)
    if left == 0:
        return AFTState(state.m, state.n, state.z)
    k_buf = _unfold(k, left, 0, NEG)[:, -1, ..., 1:].permute(0, 3, 1, 2)  # last W - 1 keys: (B, W - 1, H, Dk)
    v_buf = _unfold(v, left, 0, 0.0)[:, -1, ..., 1:].permute(0, 3, 1, 2)
    return state._replace(k=k_buf, v=v_buf)


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

    k, v as in the module docstring; band: (B|1, T|1, H|1, 1, W) bias of window entry j (position t - left + j),
    or None for AFT-simple (no window). Returns y (B, T, H, Dv) in float32, and for causal `return_state` the
    decoding state after the last position.
    """
    k = _mask_keys(k, mask)
    v = v.to(k.dtype)
    if causal:
        y = _causal_chunked(k, v, band, left, mask)
        if y is None:  # a key jumps far above everything before it inside one chunk: the exact log-space form
            y = _causal_reference(k, v, band, left)
        return y, (_causal_state(k, v, left) if return_state else None)
    # Non-causal: global pool with one reference per channel (every row sees the max key), then the window
    # correction sum_j (e^w - 1) p v with p = e^{k - m} <= 1, as a banded matrix product.
    m = torch.logsumexp(k, dim=1, keepdim=True)
    p = torch.exp(k - m)
    pv = p * v
    y = pv.sum(1, keepdim=True)
    if band is None:
        return y.expand_as(v), None
    coef = torch.expm1(band)
    num = y + _band_matmul(coef, pv, left, right)
    den = 1 + _band_matmul(coef, p, left, right)
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
    """Causal AFT-full by a binary tree of key blocks: the twin of `_full_blocked`, and its fallback.

    At level b (block size 2^l) each odd block of rows takes the even block of keys just before it: every key
    in it is visible to every row, so the reference rowmax(w) + blockmax(k) is attained up to the spread of w
    over that block of keys: a block's sum underflows only if w spreads over more than ~80 inside one row of it
    (a single column max over the sequence would underflow far sooner). The diagonal t' = t starts the sum.
    k: (B, T, H, Dk), v: (B, T, H, Dv), w: (B|1, T, T) with T a power of two.
    """
    B, T, H, Dk = k.shape
    Bw = w.shape[0]
    idx = torch.arange(T, device=k.device)
    # References carry no gradient (the result does not depend on them): the diagonal term e^{logit - M} = 1 is
    # written out so that its gradient flows, and no max of a reference is differentiated.
    logit = k + w[:, idx, idx][:, :, None, None]
    M = logit.detach()
    Z = torch.exp(logit - M)
    N = v * Z
    b = 1
    while b < T:
        P = T // (2 * b)
        kb = k.view(B, P, 2, b, H, Dk)[:, :, 0]  # keys: even blocks (B, P, b, H, Dk)
        vb = v.view(B, P, 2, b, H, -1)[:, :, 0]
        kmax = kb.detach().amax(2, keepdim=True)
        ek = torch.exp(kb - kmax)
        wb = w.view(Bw, P, 2, b, P, 2, b).diagonal(dim1=1, dim2=4)[:, 1, :, 0]  # rows odd, keys even (Bw, b, b, P)
        wb = wb.permute(0, 3, 1, 2)  # (Bw, P, b_rows, b_keys)
        wmax = wb.detach().amax(-1, keepdim=True)
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


# Query rows per block of `_full_blocked`: each block is one (Bs, s + Bs) x (s + Bs, 2 B D) matrix product, so a
# larger block means fewer passes over the keys before it, at the price of a larger masked triangle.
FULL_BLOCK = 512


def _full_blocked(k, v, pos_u, pos_v):
    """Causal AFT-full by blocks of Bs query rows, one matrix product per block over every key up to its end.

    Block i (rows s .. s + Bs - 1) computes E @ [e^{k - c} v, e^{k - c}] with E[t, t'] = e^{w[t, t'] - a_t} for
    t' <= t and 0 above the diagonal, a_t = max_{t' <= t} w[t, t'] and c the largest key at positions <= s (the
    block's first real key when there is none before), which every row of the block sees. So no output depends on
    a later token, not even in its last bit, and the row's terms include one of at least e^{-spread of w}. Two
    things can go wrong, and both are detected after all the work: a key more than 60 above c inside the block
    (e^{k - c} could overflow), and a denominator below tiny * 2^40 on a row that has seen a real key (w and the
    keys both spread over more than ~60). Then this returns None and the caller uses the tree `_full_causal`.
    k, v: (B, T, H, D) with masked keys NEG; pos_u, pos_v: (B|1, T, R). Returns y (B, T, H, D) or None; rows that
    have seen only padding are 0.
    """
    B, T, H, D = k.shape
    Bs = min(FULL_BLOCK, T)
    nb = -(-T // Bs)
    pad = nb * Bs - T
    k = F.pad(k, (0, 0, 0, 0, 0, pad), value=NEG)
    v = F.pad(v, (0, 0, 0, 0, 0, pad))
    pos_u, pos_v = F.pad(pos_u, (0, 0, 0, pad)), F.pad(pos_v, (0, 0, 0, pad))
    # 1. column references c (B, nb, H, D) and the two checks' inputs
    kd = k.detach()
    running = torch.cummax(kd, dim=1).values  # (B, nb * Bs, H, D)
    seen = running > NEG / 2  # a real key at or before t
    kb = kd.unflatten(1, (nb, Bs))
    c = _reference_or_first_key(running[:, ::Bs], kb, 2)  # only padding so far: the block's first real key
    overflow = (kb.amax(2) - c > 60).any()
    # 2. one product per block: E (B|1, Bs, s + Bs) @ x (s + Bs, B * H * 2D) when w is shared (time first, the batch
    # in the columns), else batched (B, s + Bs, H * 2D)
    shared = pos_u.shape[0] == 1
    kt, vt = (k.transpose(0, 1), v.transpose(0, 1)) if shared else (k, v)
    tdim = 0 if shared else 1
    diag = torch.ones(Bs, Bs, dtype=torch.bool, device=k.device).triu(1)  # t' > t inside the block
    out = []
    for i in range(nb):
        s = (i + 1) * Bs  # keys 0 .. s - 1
        ci = c[:, i] if shared else c[:, i, None]  # (B, H, D) or (B, 1, H, D)
        ek = torch.exp(kt.narrow(tdim, 0, s) - ci)
        x = torch.cat([ek * vt.narrow(tdim, 0, s), ek], -1)  # (s, B, H, 2D) or (B, s, H, 2D)
        w = pos_u[:, s - Bs : s] @ pos_v[:, :s].transpose(-1, -2)  # (B|1, Bs, s)
        w = torch.cat([w[..., : s - Bs], w[..., s - Bs :].masked_fill(diag, -torch.inf)], -1)
        e = torch.exp(w - w.detach().amax(-1, keepdim=True))
        if shared:
            out.append((e[0] @ x.flatten(1)).view(Bs, B, H, 2 * D))
        else:
            out.append((e @ x.flatten(2)).view(B, Bs, H, 2 * D))
    out = torch.cat(out, tdim)
    num, den = (out.transpose(0, 1) if shared else out).split(D, -1)  # (B, nb * Bs, H, D)
    # 3. the checks, then n / z (rows that have seen only padding have z = 0 and n = 0)
    underflow = (den < torch.finfo(den.dtype).tiny * 2.0**40) & seen
    if bool(overflow | underflow.any()):  # one data-dependent branch, after all the work
        return None
    y = num / torch.where(seen, den, torch.ones_like(den))
    return y[:, :T]


def full_bias(pos_u, pos_v):
    """w = u v^T: (B|1, T, R) x2 -> (B|1, T, T)."""
    return pos_u @ pos_v.transpose(-1, -2)


def _full_tree(k, v, w):
    """The tree over the whole sequence, padded to a power of two with NEG keys. k, v: (B, T, H, D); w: (B|1, T, T)."""
    T = k.shape[1]
    pad = (1 << max(T - 1, 0).bit_length()) - T
    kp = F.pad(k, (0, 0, 0, 0, 0, pad), value=NEG)
    vp = F.pad(v, (0, 0, 0, 0, 0, pad))
    return _full_causal(kp, vp, F.pad(w, (0, pad, 0, pad)))[:, :T]


def aft_full(q, k, v, pos_u, pos_v, *, causal: bool, mask=None, return_state: bool = False):
    """AFT-full with the factorised bias w = u v^T. pos_u, pos_v: (B|1, T, R)."""
    k = _mask_keys(k, mask)
    v = v.to(k.dtype)
    pos_u, pos_v = pos_u.to(k.dtype), pos_v.to(k.dtype)
    B, T = k.shape[:2]
    if causal:
        y = _full_blocked(k, v, pos_u, pos_v)
        if y is None:  # a key far above those before it, or w and the keys both spread far: the tree
            y = _full_tree(k, v, full_bias(pos_u, pos_v))
        if mask is not None:  # rows that have seen only padding are empty: 0 by definition
            y = torch.where((mask.cumsum(1) > 0)[:, :, None, None], y, torch.zeros_like(y))
    else:
        w = full_bias(pos_u, pos_v)
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
        state = state._replace(k=k, v=v, pos=pos_v.expand(B, -1, -1))
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
