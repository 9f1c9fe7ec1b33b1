"""AFT-simple, AFT-local and AFT-conv: a pool of every position outside the window plus a window of positions that
keep a bias of their own (the exp(w) - 1 identity: docs/operator.md, section 5). `simple` has no window, `local`
a learned bias u_t . v_t' for |t - t'| < s, `conv` a per-head relative kernel of size s.

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

from .ops_aft_chunked import band_chunked, simple_chunked, skew, unskew
from .ops_aft_core import (
    NEG,
    AFTState,
    CallOptions,
    causal_state,
    check_inputs,
    combine,
    empty_state,
    finite_inputs,
    finite_prefix,
    gate,
    is_real,
    mask_inputs,
    not_empty,
    prefix_pool,
    prepend_state,
    unfold,
)

# Rows per chunk of the chunked forms: each chunk is one (C, C + W - 1) matrix product, so the work per position is
# O(C + W) multiply-adds in a matmul instead of O(W) passes over the tensors.
CHUNK = 64
# ... and of the causal forms with a window (`band_chunk`): the least power of two that holds the window's past
# (so a row reads its own chunk and one before: ~2C + 1 columns for W), at least this many rows. A chunk much wider
# than the window makes every row read columns that are outside its window (at C = 64 a row of s = 11 reads 129
# columns for its 11); below this many rows, smaller chunks cost more per row (one more product and pool carry per
# chunk) than they save.
MIN_BAND_CHUNK = 16
# Rows per chunk of the local band u v^T (`local_band`).
BAND_CHUNK = 64


# The window as matrix products by chunks of rows: the band of u v^T (`local_band`) and the window sums of the
# non-causal forms.


def _fold(x, n: int, c: int, L: int):
    """Columns (B, n, L, ...) of chunks that start c apart -> positions (B, (n - 1) c + L, ...), overlaps added."""
    pieces = -(-L // c)
    out = x.new_zeros(x.shape[0], (n + pieces) * c, *x.shape[3:])
    for p in range(pieces):
        width = min(c, L - p * c)
        out[:, p * c : (p + n) * c].unflatten(1, (n, c))[:, :, :width] += x[:, :, p * c : p * c + width]
    return out[:, : (n - 1) * c + L]


def _band_sum(coef, x_win):
    """sum_j coef[..., j] * x_win[..., j], looping over the window so only views are kept for backward."""
    out = coef[..., 0] * x_win[..., 0]
    for j in range(1, coef.shape[-1]):
        out = out + coef[..., j] * x_win[..., j]
    return out


def _band_chunks(band, T: int, C: int):
    """Window bias (B|1, T|1, H|1, 1, W) -> (B|1, nC|1, H|1, C, W): one row of W entries per position, by chunk."""
    b = band[..., 0, :]
    if b.shape[1] == 1:  # position-independent (conv): one chunk serves all
        return b.expand(-1, C, -1, -1).unflatten(1, (1, C)).transpose(2, 3)
    nC = -(-T // C)
    b = F.pad(b, (0, 0, 0, 0, 0, nC * C - T))
    return b.unflatten(1, (nC, C)).transpose(2, 3)


def _chunk_columns(x, left: int, right: int, C: int, fill: float):
    """(B, T, H, D) -> (B, nC, H, C + left + right, D): the columns that chunk c of C rows reads (a strided view)."""
    T = x.shape[1]
    nC = -(-T // C)
    xp = F.pad(x, (0, 0, 0, 0, left, nC * C - T + right), value=fill)
    return xp.unfold(1, C + left + right, C).transpose(-1, -2)


def _from_chunks(y, T: int):
    """(B, nC, H, C, D) -> (B, T, H, D)."""
    return y.permute(0, 1, 3, 2, 4).flatten(1, 2)[:, :T]


def _band_matmul(coef, x, left: int, right: int, C: int):
    """sum_j coef[t, j] * x[t - left + j] as one banded matrix product per chunk of C rows.

    coef: (B|1, T|1, H|1, 1, W) with W = left + right + 1; x: (B, T, H, D) -> (B, T, H, D).
    """
    T = x.shape[1]
    C = min(C, T)
    G = skew(_band_chunks(coef, T, C))  # (B|1, nC|1, H|1, C, C + W - 1)
    return _from_chunks(G @ _chunk_columns(x, left, right, C, 0.0), T)


class _LocalBand(torch.autograd.Function):
    """The band of u v^T by chunks of BAND_CHUNK rows: each chunk is one product with the columns it reads,
    (C, R) @ (R, C + W - 1), of which row i keeps W entries from column i; backward is the two transposed
    products (no (T, R, W) tensor of the window's factors, which the unfolded form builds in backward)."""

    @staticmethod
    def forward(ctx, pos_u, pos_v, left: int, right: int):
        Bb, T, R = pos_u.shape
        C = min(BAND_CHUNK, T)
        n = -(-T // C)
        W = left + right + 1
        u = F.pad(pos_u, (0, 0, 0, n * C - T)).unflatten(1, (n, C))  # (Bb, n, C, R)
        cols = F.pad(pos_v, (0, 0, left, n * C - T + right)).unfold(1, C + W - 1, C)  # (Bb', n, R, C + W - 1)
        ctx.save_for_backward(pos_u, pos_v)
        ctx.left, ctx.right = left, right
        return unskew(u @ cols, W).flatten(1, 2)[:, :T]

    @staticmethod
    def backward(ctx, dband):
        pos_u, pos_v = ctx.saved_tensors
        # under autocast the band came out of a lower-precision matmul, but backward runs outside autocast: the
        # gradient takes the factors' dtype so that the products below have one dtype
        dband = dband.to(pos_u.dtype)
        left, right = ctx.left, ctx.right
        Bb, T, R = pos_u.shape
        C = min(BAND_CHUNK, T)
        n = -(-T // C)
        W = left + right + 1
        u = F.pad(pos_u, (0, 0, 0, n * C - T)).unflatten(1, (n, C))
        cols = F.pad(pos_v, (0, 0, left, n * C - T + right)).unfold(1, C + W - 1, C)
        dP = skew(F.pad(dband, (0, 0, 0, n * C - T)).unflatten(1, (n, C)))  # (B', n, C, C + W - 1)
        du = (dP @ cols.transpose(-1, -2)).flatten(1, 2)[:, :T]
        dcols = (u.transpose(-1, -2) @ dP).transpose(-1, -2)  # (B', n, C + W - 1, R)
        dv = _fold(dcols, n, C, C + W - 1)[:, left : left + T]
        return (
            du.sum(0, keepdim=True) if Bb < du.shape[0] else du,
            (dv.sum(0, keepdim=True) if pos_v.shape[0] < dv.shape[0] else dv),
            None,
            None,
        )


def local_band(pos_u, pos_v, left: int, right: int):
    """Window bias u_t . v_{t - left + j}: (B|1, T, R) x2 -> (B|1, T, 1, 1, W)."""
    return _LocalBand.apply(pos_u, pos_v, left, right)[:, :, None, None]


# The parallel forms: a band per variant, two solvers (exact, chunked) and the driver they share.


class _Window(NamedTuple):
    """What the parallel driver needs of a variant: `band(pos_u, pos_v)` -> the bias of window entry j (position
    t - left + j), (B|1, T|1, H|1, 1, W), or None (no window); the window's extent; the position factors."""

    band: Callable
    left: int
    right: int
    pos_u: torch.Tensor | None
    pos_v: torch.Tensor | None


_NO_WINDOW = _Window(lambda pos_u, pos_v: None, 0, 0, None, None)  # simple


def _local(pos_u, pos_v, window: int, causal: bool) -> _Window:
    if window < 1:
        raise ValueError(f"AFT-local needs window >= 1, got window={window}.")
    left, right = (window - 1, 0) if causal else (window - 1, window - 1)
    return _Window(lambda u, w: local_band(u, w, left, right), left, right, pos_u, pos_v)


def _conv(kernel, causal: bool) -> _Window:
    s = kernel.shape[-1]
    left, right = (s - 1, 0) if causal else ((s - 1) // 2, s // 2)
    return _Window(lambda u, w: kernel[None, None, :, None, :], left, right, None, None)


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
    """Exact causal pool + window band from per-position log-space prefix sums (the twin of `_SimpleChunked` and
    `_BandChunked`).

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


def _exact(q, k, v, band, window: _Window, causal: bool, mask):
    if not causal:
        return gate(q, _noncausal(k, v, band, window.left, window.right, None))
    return gate(q, _causal_logspace(k, v, band, window.left, mask))


def band_chunk(left: int) -> int:
    """Rows per chunk of a causal form whose window reaches `left` positions back (see MIN_BAND_CHUNK)."""
    return min(CHUNK, max(MIN_BAND_CHUNK, 1 << max(left - 1, 0).bit_length()))


def _chunked(chunk_size: int | None):
    def causal_solve(q, k, v, band, left, mask):
        """The chunked form, or the exact one where a key jumps far above everything before it inside one chunk;
        and whether every key and value was finite."""
        if band is None:
            y, finite = simple_chunked(q, k, v, mask, chunk_size or CHUNK)
        else:
            y, finite = band_chunked(q, k, v, band, left, mask, chunk_size or band_chunk(left))
        if y is None:
            y = gate(q, _causal_logspace(k, v, band, left, mask))
        return y, finite

    def solve(q, k, v, band, window: _Window, causal: bool, mask):
        if not causal:
            return gate(q, _noncausal(k, v, band, window.left, window.right, chunk_size or CHUNK))
        left = window.left
        y, finite = causal_solve(q, k, v, band, left, mask)
        if finite:
            return y
        # A NaN or infinite key or value would reach the earlier rows of its chunk as 0 * NaN in the products:
        # the rows before it come from the inputs with it replaced (nothing before a position depends on it),
        # the rows from it on from the exact form, whose sums only ever look back.
        y, _ = causal_solve(q, *finite_inputs(k, v), band, left, mask)
        return torch.where(finite_prefix(k, v), y, gate(q, _causal_logspace(k, v, band, left, mask)))

    return solve


def _parallel(solve, q, k, v, window: _Window, options: CallOptions):
    """Mask the keys, put a state before the sequence, solve, and cut the state's positions off again.
    `solve(q, k, v, band, window, causal, mask)` -> y of every row, the state's positions (then in k, v and mask)
    included."""
    causal, mask, initial_state, output_final_state = options
    if output_final_state and not causal:
        raise ValueError("output_final_state is the state after a causal sequence: pass causal=True.")
    check_inputs(q, k, v, mask)
    k, v = mask_inputs(k, v, mask)
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
        q = F.pad(q, (0, 0, 0, 0, before, 0))
    if k.shape[1] == 0 or k.shape[0] == 0:
        y = q.new_zeros(q.shape)
    else:
        band = window.band(pos_u, pos_v)
        y = solve(q, k, v, band if band is None else band.to(k.dtype), window, causal, mask)
    state = causal_state(k, v, window.left, pos_v) if output_final_state else None
    return y[:, before:], state


# The recurrent form: one token at a time against the state. The window holds the last S = s - 1 positions; the
# token's own window is those plus itself (s slots), then the oldest slot leaves the window and joins the pool.


def _recurrent(q, k, v, slots: int, bias, pos_v, options: CallOptions):
    """q, v: (B, T, H, Dv); k: (B, T, H, Dk). `bias(t[, state.pos])` -> the bias of the s = slots + 1 window slots
    of token t, (B|1, s, H|1, 1); None: no bias (simple: the one slot is the token itself). Loops over the T
    tokens (one step when decoding)."""
    causal, mask, initial_state, output_final_state = options
    if not causal:
        raise ValueError("The recurrent form is causal: pass causal=True.")
    check_inputs(q, k, v, mask)
    k, v = mask_inputs(k, v, mask)
    B, T, H, Dk = k.shape
    rank = pos_v.shape[-1] if pos_v is not None else 0
    state = initial_state
    if state is None:
        state = empty_state(B, H, Dk, v.shape[3], slots=slots, rank=rank, device=k.device, dtype=k.dtype)
    state = AFTState(*(x.to(k.dtype) for x in state))
    ys = []
    for t in range(T):
        w = None if bias is None else bias(t, state.pos) if rank else bias(t)
        keys = torch.cat([state.k, k[:, t, None]], 1)  # (B, s, H, Dk)
        values = torch.cat([state.v, v[:, t, None]], 1)
        logits = keys if w is None else keys + w.to(k.dtype)
        ref = torch.maximum(state.m, logits.amax(1))  # every exponent below is <= 0
        e = torch.exp(logits - ref[:, None])
        scale = torch.exp(state.m - ref)
        den = state.z * scale + e.sum(1)
        seen = not_empty(ref)  # (B, H, Dk): False only while the row has seen nothing but padding (then y = 0)
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


# The forms of each variant, on the drivers above.


def aft_simple_chunk(
    q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False, chunk_size=None
):
    """AFT-simple (no position bias), by chunks (of `chunk_size` rows; None: CHUNK). q, k, v: (B, T, H, D)."""
    options = CallOptions(causal, mask, initial_state, output_final_state)
    return _parallel(_chunked(chunk_size), q, k, v, _NO_WINDOW, options)


def aft_simple_exact(q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    options = CallOptions(causal, mask, initial_state, output_final_state)
    return _parallel(_exact, q, k, v, _NO_WINDOW, options)


def aft_simple_recurrent(q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    return _recurrent(q, k, v, 0, None, None, CallOptions(causal, mask, initial_state, output_final_state))


def aft_local_chunk(
    q, k, v, pos_u, pos_v, window, *, causal=True, mask=None, initial_state=None, output_final_state=False,
    chunk_size=None,
):  # fmt: skip
    """AFT-local: bias u_t . v_t' for |t - t'| < window, exactly 0 outside. pos_u, pos_v: (B|1, T, R). `chunk_size`
    None: `band_chunk` rows when causal, else CHUNK."""
    options = CallOptions(causal, mask, initial_state, output_final_state)
    return _parallel(_chunked(chunk_size), q, k, v, _local(pos_u, pos_v, window, causal), options)


def aft_local_exact(
    q, k, v, pos_u, pos_v, window, *, causal=True, mask=None, initial_state=None, output_final_state=False
):
    options = CallOptions(causal, mask, initial_state, output_final_state)
    return _parallel(_exact, q, k, v, _local(pos_u, pos_v, window, causal), options)


def aft_local_recurrent(
    q, k, v, pos_u, pos_v, window, *, causal=True, mask=None, initial_state=None, output_final_state=False
):
    def bias(t, state_pos):  # u_t . [v of the window slots, v_t]: (B, s, 1, 1)
        keys_pos = torch.cat([state_pos, pos_v[:, t, None].to(state_pos.dtype).expand(state_pos.shape[0], -1, -1)], 1)
        return torch.einsum("br,bsr->bs", pos_u[:, t].to(state_pos.dtype).expand(keys_pos.shape[0], -1), keys_pos)[
            :, :, None, None
        ]

    options = CallOptions(causal, mask, initial_state, output_final_state)
    return _recurrent(q, k, v, window - 1, bias, pos_v, options)


def conv_kernel(weight, gamma, beta, eps: float = 1e-5):
    """AFT-conv re-parameterisation w <- gamma * (w - mean(w)) / std(w) + beta, per head.

    weight: (H, s); gamma, beta: (H,). With gamma = beta = 0 (the initialisation) the kernel is 0 and the layer
    is per-head AFT-simple.
    """
    w = weight.float() if weight.dtype != torch.float64 else weight
    centred = w - w.mean(-1, keepdim=True)
    std = centred.pow(2).mean(-1, keepdim=True).sqrt()
    return gamma.to(w.dtype)[:, None] * centred / (std + eps) + beta.to(w.dtype)[:, None]


def aft_conv_chunk(
    q, k, v, kernel, *, causal=True, mask=None, initial_state=None, output_final_state=False, chunk_size=None
):
    """AFT-conv over a sequence: a per-head kernel (H, s) (see `conv_kernel`); k: (B, T, H, 1), one key per head."""
    options = CallOptions(causal, mask, initial_state, output_final_state)
    return _parallel(_chunked(chunk_size), q, k, v, _conv(kernel, causal), options)


def aft_conv_exact(q, k, v, kernel, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    options = CallOptions(causal, mask, initial_state, output_final_state)
    return _parallel(_exact, q, k, v, _conv(kernel, causal), options)


def aft_conv_recurrent(q, k, v, kernel, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    bias = lambda t: kernel.T[None, :, :, None]  # noqa: E731  slot j <-> position t - s + 1 + j: (1, s, H, 1)
    options = CallOptions(causal, mask, initial_state, output_final_state)
    return _recurrent(q, k, v, kernel.shape[-1] - 1, bias, None, options)
