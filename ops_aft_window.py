"""AFT-simple, AFT-local and AFT-conv: a pool of every position outside the window plus a window of positions that
keep a bias of their own (AFT.md, the exp(w) - 1 identity). `simple` has no window, `local` a learned bias
u_t . v_t' for |t - t'| < s, `conv` a per-head relative kernel of size s.

Every variant has three forms with one signature,

    (q, k, v, <variant parameters>, *, causal=True, mask=None, initial_state=None, output_final_state=False)
        -> (y, final_state)

`*_chunk` (the fast form: one matrix product per chunk of rows; it checks its own range and hands the rare input it
cannot represent exactly to `*_exact`), `*_exact` (log-space prefix sums, no chunk references: the twin the tests
hold it to) and `*_recurrent` (one step per token, causal only: decoding). A state is an `AFTState`: the pool and
the last s - 1 positions; a parallel form continues from one exactly (`prepend_state`).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ops_aft_core import (
    NEG,
    AFTState,
    causal_state,
    combine,
    empty_state,
    gate,
    is_real,
    keys_out_of_range,
    mask_keys,
    prefix_pool,
    prepend_state,
    reference_or_first_key,
    sums_underflow,
    unfold,
)

# Rows per chunk of the chunked forms: each chunk is one (C, C + W - 1) matrix product, so the work per position is
# O(C + W) multiply-adds in a matmul instead of O(W) passes over the tensors.
CHUNK = 64


def aft_simple_chunk(
    q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False, chunk_size=CHUNK
):
    """AFT-simple (no position bias), by chunks. q, k, v: (B, T, H, D)."""
    window = _Window(lambda pos_u, pos_v: None, 0, 0, None, None)
    return _parallel(_chunked(chunk_size), q, k, v, window, causal, mask, initial_state, output_final_state)


def aft_simple_exact(q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    window = _Window(lambda pos_u, pos_v: None, 0, 0, None, None)
    return _parallel(_exact, q, k, v, window, causal, mask, initial_state, output_final_state)


def aft_simple_recurrent(q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    bias = lambda t: torch.zeros(1, 1, 1, 1, dtype=torch.float64)  # noqa: E731  the one slot: the token itself
    return _recurrent(q, k, v, 0, bias, None, causal, mask, initial_state, output_final_state)


def aft_local_chunk(
    q, k, v, pos_u, pos_v, window, *, causal=True, mask=None, initial_state=None, output_final_state=False,
    chunk_size=CHUNK,
):  # fmt: skip
    """AFT-local: bias u_t . v_t' for |t - t'| < window, exactly 0 outside. pos_u, pos_v: (B|1, T, R)."""
    spec = _local(pos_u, pos_v, window, causal)
    return _parallel(_chunked(chunk_size), q, k, v, spec, causal, mask, initial_state, output_final_state)


def aft_local_exact(
    q, k, v, pos_u, pos_v, window, *, causal=True, mask=None, initial_state=None, output_final_state=False
):
    spec = _local(pos_u, pos_v, window, causal)
    return _parallel(_exact, q, k, v, spec, causal, mask, initial_state, output_final_state)


def aft_local_recurrent(
    q, k, v, pos_u, pos_v, window, *, causal=True, mask=None, initial_state=None, output_final_state=False
):
    def bias(t, state_pos):  # u_t . [v of the window slots, v_t]: (B, s, 1, 1)
        keys_pos = torch.cat([state_pos, pos_v[:, t, None].to(state_pos.dtype).expand(state_pos.shape[0], -1, -1)], 1)
        return torch.einsum("br,bsr->bs", pos_u[:, t].to(state_pos.dtype).expand(keys_pos.shape[0], -1), keys_pos)[
            :, :, None, None
        ]

    return _recurrent(q, k, v, window - 1, bias, pos_v, causal, mask, initial_state, output_final_state)


def aft_conv_chunk(
    q, k, v, kernel, *, causal=True, mask=None, initial_state=None, output_final_state=False, chunk_size=CHUNK
):
    """AFT-conv over a sequence: a per-head kernel (H, s) (see `conv_kernel`); k: (B, T, H, 1), one key per head."""
    spec = _conv(kernel, causal)
    return _parallel(_chunked(chunk_size), q, k, v, spec, causal, mask, initial_state, output_final_state)


def aft_conv_exact(q, k, v, kernel, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    spec = _conv(kernel, causal)
    return _parallel(_exact, q, k, v, spec, causal, mask, initial_state, output_final_state)


def aft_conv_recurrent(q, k, v, kernel, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    bias = lambda t: kernel.T[None, :, :, None]  # noqa: E731  slot j <-> position t - s + 1 + j: (1, s, H, 1)
    return _recurrent(q, k, v, kernel.shape[-1] - 1, bias, None, causal, mask, initial_state, output_final_state)


def conv_kernel(weight, gamma, beta, eps: float = 1e-5):
    """AFT-conv re-parameterisation w <- gamma * (w - mean(w)) / std(w) + beta, per head.

    weight: (H, s); gamma, beta: (H,). With gamma = beta = 0 (the initialisation) the kernel is 0 and the layer
    is per-head AFT-simple.
    """
    w = weight.float() if weight.dtype != torch.float64 else weight
    centred = w - w.mean(-1, keepdim=True)
    std = centred.pow(2).mean(-1, keepdim=True).sqrt()
    return gamma.to(w.dtype)[:, None] * centred / (std + eps) + beta.to(w.dtype)[:, None]


def local_band(pos_u, pos_v, left: int, right: int):
    """Window bias u_t . v_{t - left + j}: (B|1, T, R) x2 -> (B|1, T, 1, 1, W)."""
    v_win = unfold(pos_v[:, :, None], left, right, 0.0)[:, :, 0]  # (B|1, T, R, W)
    return torch.einsum("btr,btrw->btw", pos_u, v_win)[:, :, None, None]


# The parallel forms: one driver, a band per variant, and two solvers (chunked, exact).


class _Window(NamedTuple):
    """What the parallel driver needs of a variant: `band(pos_u, pos_v)` -> the bias of window entry j (position
    t - left + j), (B|1, T|1, H|1, 1, W), or None (no window); the window's extent; the position factors."""

    band: Callable
    left: int
    right: int
    pos_u: torch.Tensor | None
    pos_v: torch.Tensor | None


def _local(pos_u, pos_v, window: int, causal: bool) -> _Window:
    if window < 1:
        raise ValueError(f"AFT-local needs window >= 1, got window={window}.")
    left, right = (window - 1, 0) if causal else (window - 1, window - 1)
    return _Window(lambda u, w: local_band(u, w, left, right), left, right, pos_u, pos_v)


def _conv(kernel, causal: bool) -> _Window:
    s = kernel.shape[-1]
    left, right = (s - 1, 0) if causal else ((s - 1) // 2, s // 2)
    return _Window(lambda u, w: kernel[None, None, :, None, :], left, right, None, None)


def _parallel(solve, q, k, v, window: _Window, causal, mask, initial_state, output_final_state):
    """Mask the keys, put a state before the sequence, solve, and cut the state's positions off again."""
    if output_final_state and not causal:
        raise ValueError("output_final_state is the state after a causal sequence: pass causal=True.")
    k = mask_keys(k, mask)
    v = v.to(k.dtype)
    pos_u, pos_v = window.pos_u, window.pos_v
    if pos_u is not None:
        pos_u, pos_v = pos_u.to(k.dtype), pos_v.to(k.dtype)
    before = 0
    if initial_state is not None:
        if not causal:
            raise ValueError("initial_state continues a causal sequence: pass causal=True.")
        k, v, mask, pos_v, before = prepend_state(initial_state, k, v, mask, pos_v)
        if pos_u is not None:
            pos_u = F.pad(pos_u.expand(k.shape[0], -1, -1), (0, 0, before, 0))
    if k.shape[1] == 0 or k.shape[0] == 0:
        y = v.new_zeros(v.shape)
    else:
        band = window.band(pos_u, pos_v)
        y = solve(k, v, band if band is None else band.to(k.dtype), window.left, window.right, causal, mask)
    state = causal_state(k, v, window.left, pos_v) if output_final_state else None
    return gate(q, y[:, before:]), state


def _chunked(chunk_size: int):
    def solve(k, v, band, left, right, causal, mask):
        if not causal:
            return _noncausal(k, v, band, left, right, chunk_size)
        y = _causal_chunked(k, v, band, left, mask, chunk_size)
        if y is None:  # a key jumps far above everything before it inside one chunk: the exact log-space form
            y = _causal_logspace(k, v, band, left, mask)
        return y

    return solve


def _exact(k, v, band, left, right, causal, mask):
    if not causal:
        return _noncausal(k, v, band, left, right, None)
    return _causal_logspace(k, v, band, left, mask)


def _noncausal(k, v, band, left: int, right: int, chunk_size: int | None):
    """Global pool with one reference per channel (every row sees the largest key), then the window correction
    sum_j (e^w - 1) p v with p = e^{k - m} <= 1: a banded matrix product by chunks, or (chunk_size None) the loop
    over window entries."""
    m = torch.logsumexp(k, dim=1, keepdim=True)
    p = torch.exp(k - m)
    pv = p * v
    y = pv.sum(1, keepdim=True)
    if band is None:
        return y.expand_as(v)
    coef = torch.expm1(band)
    if chunk_size is None:
        band_sum = lambda x: _band_sum(coef, unfold(x, left, right, 0.0))  # noqa: E731
    else:
        band_sum = lambda x: _band_matmul(coef, x, left, right, chunk_size)  # noqa: E731
    return (y + band_sum(pv)) / (1 + band_sum(p))


def _causal_logspace(k, v, band, left: int, mask=None):
    """Exact causal pool + window band from per-position log-space prefix sums (the twin of `_causal_chunked`).

    Slower (two logcumsumexp and one pass per window entry) but it needs no chunk reference at all.
    """
    T = k.shape[1]
    m, n = prefix_pool(k, v)
    if band is None:
        y = n
    else:
        # Pool of the positions before the window: the prefix up to t - W (z = 0 where there is none).
        W = left + 1
        shift = lambda x, val: F.pad(x, (0, 0, 0, 0, W, 0), value=val)[:, :T]  # noqa: E731
        m_out, n_out = shift(m, NEG), shift(n, 0.0)
        z_out = shift(torch.ones_like(m), 0.0)
        logits = unfold(k, left, 0, NEG) + band  # (B, T, H, Dk, W)
        ref = torch.maximum(m_out, logits.amax(-1))  # exact per-position max: no exponent is positive
        e = torch.exp(logits - ref[..., None])
        scale = torch.exp(m_out - ref)
        den = z_out * scale + e.sum(-1)
        y = (n_out * scale + _band_sum(e, unfold(v, left, 0, 0.0))) / den
    if mask is not None:  # rows that have seen only padding are 0
        y = torch.where((mask.cumsum(1) > 0)[:, :, None, None], y, torch.zeros_like(y))
    return y


def _causal_chunked(k, v, band, left: int, mask, C: int):
    """Causal pool + window band by chunks of C rows: one matmul per chunk and a scan over chunk totals.

    Row t of chunk c reads the columns cC - left .. cC + C - 1 with coefficient exp(w_{t,j}) inside its window
    and 1 (bias 0) before it; everything before cC - left comes in as the chunk's carry, an exact prefix over
    chunks. Every reference looks only at positions <= cC, so no output depends on a later token, not even in
    its last bit: columns are scaled by exp(k - b) with b the largest key up to the chunk's first row, rows by
    exp(b + max log-coefficient - ref) with ref >= both parts. Two things can go wrong, and both are detected:
    a key more than KEY_RANGE above b inside the chunk (exp(k - b) could overflow), and a row sum too close to
    underflow. Then this returns None and the caller uses the exact `_causal_logspace`. Otherwise y (B, T, H, Dv).
    """
    if band is None:  # AFT-simple: no window, a leaner form
        return _simple_chunked(k, v, mask, C)
    B, T, H, Dk = k.shape
    C = min(C, T)
    nC = -(-T // C)
    kp = F.pad(k, (0, 0, 0, 0, left, nC * C - T), value=NEG)  # (B, left + nC * C, H, Dk)
    vp = F.pad(v, (0, 0, 0, 0, left, nC * C - T))
    # 1. carry: segment c = the first C columns of chunk c; chunk c sees every segment before it in full
    seg_k, seg_v = kp[:, : nC * C].unflatten(1, (nC, C)), vp[:, : nC * C].unflatten(1, (nC, C))
    a_seg = seg_k.detach().amax(2)  # (B, nC, H, Dk)
    e = torch.exp(seg_k - a_seg[:, :, None])  # (B, nC, C, H, Dk), its max is 1
    z_seg = e.sum(2)
    m_seg, n_seg = _pool_of_chunks(a_seg + torch.log(z_seg), (e * seg_v).sum(2) / z_seg, mask is not None, C)
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
        b = reference_or_first_key(b.squeeze(-2), kd, -2).unsqueeze(-2)
    overflow = keys_out_of_range(kd.amax(-2, keepdim=True), b)  # checked with the underflow, at the end
    x = torch.exp(kw - b)
    rows = torch.arange(C, device=k.device)
    outside = (torch.arange(C + left, device=k.device)[None, :] < rows[:, None]).to(k.dtype)  # bias 0
    w = _band_chunks(band, T, C)
    gmax = w.detach().amax(-1, keepdim=True).clamp(min=0)  # (B|1, nC|1, H|1, C, 1); outside: log 1 = 0
    G = _skew(torch.exp(w - gmax)) + outside * torch.exp(-gmax)
    num, den = G @ (x * vw), G @ x  # (B, nC, H, C, Dv), (B, nC, H, C, Dk)
    # 3. rows: both parts against the larger of their references
    inner = b + gmax
    ref = torch.maximum(carry_m.detach(), inner)
    s_in, s_carry = torch.exp(inner - ref), torch.exp(carry_m - ref) * carry_z
    num = s_carry * carry_n + s_in * num
    den = s_carry + s_in * den
    seen = None
    if mask is not None:  # rows that have seen only padding are empty: 0 by definition, not an underflow
        seen = F.pad(mask.cumsum(1) > 0, (0, nC * C - T)).view(B, nC, 1, C, 1)
    if bool(overflow | sums_underflow(den, seen)):  # one data-dependent branch, after all the work
        return None
    y = num / torch.where(den > 0, den, torch.ones_like(den))
    if seen is not None:
        y = torch.where(seen, y, torch.zeros_like(y))
    return _from_chunks(y, T)


def _simple_chunked(k, v, mask, C: int, *, padded: bool = False, normaliser: bool = False):
    """`_causal_chunked` without a window (AFT-simple): the fewest passes over the tensors.

    Chunk c of C rows is scaled by exp(k - r_c) with r_c the largest key at positions <= cC (so r never decreases
    and every row sees the key that attains its reference: each row sum is >= 1, nothing underflows). The rows'
    prefix sums inside a chunk are one matrix product with a lower-triangular matrix of ones, started from the
    carry of every earlier chunk (`baddbmm`). The carry is this same pool one level up, over the chunk totals
    (log-normaliser r_c + log sum, mean of v): T / C positions, then T / C^2, ...; a level that cannot represent
    its input falls back to the log-space `prefix_pool` for that level only. Returns y (B, T, H, Dv), with
    `normaliser` also the log-normaliser (B, T, H, Dk) of every row, or None (the caller uses the exact
    `_causal_logspace`) when a key lies more than KEY_RANGE above its chunk's reference. `padded`: keys may be NEG
    (padding; implied by `mask`).
    """
    padded = padded or mask is not None
    B, T, H, Dk = k.shape
    Dv = v.shape[3]
    C = min(C, T)
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
        r = reference_or_first_key(r, kd, 2)
    overflow = keys_out_of_range(cmax, r)
    e = torch.sub(kc, r[:, :, None]).exp_()  # (B, nC, C, H, Dk), in place: one buffer
    ev = e * v.reshape(B, nC, C, H, Dv)
    # carry into chunk c: the pool of chunks 0 .. c - 1 (log-normaliser m, mean n), rescaled to r_c
    tot = e.sum(2).clamp(min=torch.finfo(e.dtype).tiny)  # a padding-only chunk adds exp(NEG) = 0
    kk, mean = r + torch.log(tot), ev.sum(2) / tot
    m, n = _pool_of_chunks(kk, mean, padded, C)
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


def _pool_of_chunks(k, v, padded: bool, C: int):
    """`prefix_pool` over a sequence of chunk totals (log-normaliser k, mean v): by `_simple_chunked` one level up,
    or in log space when that level declines. -> m, n as `prefix_pool`."""
    if k.shape[1] == 1:  # the pool of one chunk is the chunk
        return k, v
    pooled = _simple_chunked(k, v, None, C, padded=padded, normaliser=True)
    return prefix_pool(k, v) if pooled is None else pooled[::-1]


def _band_sum(coef, x_win):
    """sum_j coef[..., j] * x_win[..., j], looping over the window so only views are kept for backward."""
    out = coef[..., 0] * x_win[..., 0]
    for j in range(1, coef.shape[-1]):
        out = out + coef[..., j] * x_win[..., j]
    return out


def _band_matmul(coef, x, left: int, right: int, C: int):
    """sum_j coef[t, j] * x[t - left + j] as one banded matrix product per chunk of C rows.

    coef: (B|1, T|1, H|1, 1, W) with W = left + right + 1; x: (B, T, H, D) -> (B, T, H, D).
    """
    T = x.shape[1]
    C = min(C, T)
    G = _skew(_band_chunks(coef, T, C))  # (B|1, nC|1, H|1, C, C + W - 1)
    return _from_chunks(G @ _chunk_columns(x, left, right, C, 0.0), T)


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


# The recurrent form: one token at a time against the state. The window holds the last S = s - 1 positions; the
# token's own window is those plus itself (s slots), then the oldest slot leaves the window and joins the pool.


def _recurrent(q, k, v, slots: int, bias, pos_v, causal, mask, initial_state, output_final_state):
    """q, v: (B, T, H, Dv); k: (B, T, H, Dk). `bias(t[, state.pos])` -> the bias of the s = slots + 1 window slots
    of token t, (B|1, s, H|1, 1). Loops over the T tokens (one step when decoding)."""
    if not causal:
        raise ValueError("The recurrent form is causal: pass causal=True.")
    k = mask_keys(k, mask)
    v = v.to(k.dtype)
    B, T, H, Dk = k.shape
    rank = pos_v.shape[-1] if pos_v is not None else 0
    state = initial_state
    if state is None:
        state = empty_state(B, H, Dk, v.shape[3], slots=slots, rank=rank, device=k.device, dtype=k.dtype)
    state = AFTState(*(x.to(k.dtype) for x in state))
    ys = []
    for t in range(T):
        w = bias(t, state.pos) if rank else bias(t)
        keys = torch.cat([state.k, k[:, t, None]], 1)  # (B, s, H, Dk)
        values = torch.cat([state.v, v[:, t, None]], 1)
        logits = keys + w.to(k.dtype)
        ref = torch.maximum(state.m, logits.amax(1))  # every exponent below is <= 0
        e = torch.exp(logits - ref[:, None])
        scale = torch.exp(state.m - ref)
        den = state.z * scale + e.sum(1)
        seen = is_real(ref)  # (B, H, Dk): False only while the row has seen nothing but padding (then y = 0)
        y = (state.n * scale + (e * values).sum(1)) / torch.where(seen, den, 1.0)
        ys.append(torch.where(seen, y, 0.0))
        # the oldest slot joins the pool (bias 0 from now on); an empty slot adds nothing
        real = is_real(keys[:, 0])
        m, n, z = combine(
            state.m, state.n, state.z, keys[:, 0], torch.where(real, values[:, 0], 0.0), real.to(k.dtype)
        )
        pos = state.pos
        if rank:
            pos = torch.cat([state.pos, pos_v[:, t, None].to(k.dtype).expand(B, -1, -1)], 1)[:, 1:]
        state = AFTState(m, n, z, keys[:, 1:], values[:, 1:], pos)
    y = torch.stack(ys, 1) if ys else v.new_zeros(v.shape)
    return gate(q, y), (state if output_final_state else None)
