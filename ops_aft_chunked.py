"""The causal chunked forms of AFT-simple and of the window variants (local, conv), by units of the sequence, with
their forward and backward written out as autograd Functions (`_SimpleChunked`, `_BandChunked`): the fast path of
`ops_aft_window`'s `*_chunk` forms. Pure tensor code; a unit that cannot represent its keys is retried with one
reference per chunk, and a chunk that cannot either is handed back (None) to the exact form.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ops_aft_core import (
    NEG,
    exp_,
    host_flags,
    is_real,
    keys_out_of_range,
    reference_or_first_key,
    sums_underflow,
)


def skew(coef):
    """(..., C, W) -> (..., C, C + W - 1) with coef[..., r, j] at column r + j, zeros elsewhere (pad and re-view)."""
    C, W = coef.shape[-2:]
    flat = F.pad(coef, (0, C)).flatten(-2)[..., : C * (C + W - 1)]
    return flat.unflatten(-1, (C, C + W - 1))


def unskew(m, W: int):
    """(..., c, c + W - 1) -> (..., c, W): entry [i, j] = m[i, i + j] (the inverse of `skew`)."""
    c = m.shape[-2]
    flat = F.pad(m.flatten(-2), (0, c))
    return flat.unflatten(-1, (c, m.shape[-1] + 1))[..., :W]


# The causal forms by units of the sequence: a unit is a run of rows small enough to stay in cache while it is worked
# on, with one reference per key channel; its rows are sums by chunks of C rows, started from the pool of every
# earlier row. Forward and backward are written out (`_SimpleChunked`, `_BandChunked`), so that a training step
# saves little beside q and v and makes a few passes over each unit.
UNIT_ELEMENTS = 2**19  # elements of a unit's [e v, e] buffer (2 MiB in float32)


class _Plan(NamedTuple):
    """How a chunked Function goes through its sequence: `padded` (some keys may be padding: rows that have seen
    none are 0), C rows per chunk, `rows` per unit (None: as many as UNIT_ELEMENTS allows)."""

    padded: bool
    C: int
    rows: int | None


def _units(T: int, row: int, plan: _Plan):
    """[(a, b, c)]: the units of a sequence of T rows, rows a .. b - 1 by chunks of c rows ((b - a) % c == 0).
    `row`: elements of one row of the buffer."""
    C, rows = min(plan.C, T), plan.rows
    full = T // C * C
    rows = rows or max(C, UNIT_ELEMENTS // max(row, 1) // C * C)
    units = [(a, min(a + rows, full), C) for a in range(0, full, rows)]
    if full < T:
        units.append((full, T, T - full))
    return units


def _references(kf, units, padded: bool):
    """The reference of each unit: the largest key at positions <= its first row, or while there is none the unit's
    first real key, or 0 when it has none either (then every e of the unit is 0). kf: (B, T, H * Dk).

    Returns r (U, B, H * Dk); the factors exp(r_{u-1} - r_u) <= 1 that carry a pool into unit u (0 into the first,
    or after units that have seen no real key); and `over` (0-d bool): does a key lie more than KEY_RANGE above its
    unit's reference, so that exp(k - r) could overflow?"""
    kmax = torch.stack([kf[:, a:b].amax(1) for a, b, _ in units])  # (U, B, HK)
    before = torch.cummax(F.pad(kmax[:-1], (0, 0, 0, 0, 1, 0), value=NEG), 0).values
    r = torch.maximum(before, kf[:, [a for a, _, _ in units]].transpose(0, 1))
    if padded:
        r = torch.stack([reference_or_first_key(r[u], kf[:, a:b], 1) for u, (a, b, _) in enumerate(units)])
        scale_ref = torch.where(is_real(r), r, NEG)  # NEG: the pool is still empty
        r = torch.where(is_real(r), r, 0.0)
    else:
        scale_ref = r
    carry = torch.exp(F.pad(scale_ref[:-1], (0, 0, 0, 0, 1, 0), value=NEG) - r)
    return r, carry, keys_out_of_range(kmax, r)


def _scan_(x, reverse: bool = False):
    """In place: prefix sums (suffix sums with `reverse`) along dim 2 of x (B, n, c, W), one row at a time."""
    rows = x.unbind(2)
    if reverse:
        for j in range(len(rows) - 2, -1, -1):
            rows[j].add_(rows[j + 1])
    else:
        for j in range(1, len(rows)):
            rows[j].add_(rows[j - 1])


def _strict_tril(n: int, x: torch.Tensor, upper: bool = False):
    """(n, n) ones strictly below (above) the diagonal: chunk c sums the chunks before (after) it."""
    ones = torch.ones(n, n, dtype=x.dtype, device=x.device)
    return ones.triu(1) if upper else ones.tril(-1)


def _scale_pool(pool, factor, Dv: int):
    """pool (B, H, Dv + Dk) times factor (B, H * Dk), per key channel, in place."""
    factor = factor.view(*pool.shape[:2], -1)
    pool[..., :Dv].mul_(factor)
    pool[..., Dv:].mul_(factor)
    return pool


def _gate_into(out, ybar, q):
    """out = q * ybar, the product in the accumulation dtype (out in the dtype of q)."""
    torch.mul(ybar, q, out=out)


def _gate_grad(out, dy, q):
    """out = dy * q in the accumulation dtype of out."""
    if q.dtype == out.dtype:
        torch.mul(dy, q, out=out)
    else:
        out.copy_(dy).mul_(q)


def _simple_sums(E, v, pool, X=None):
    """The causal pool of one unit: X = [e v, e] (B, n, c, H, Dv + Dk) summed by chunks of c rows and started from
    `pool` (B, H, Dv + Dk), the pool of every earlier row in the unit's scale. E (B, n, c, H, Dk), v (B, n, c, H, Dv);
    `X`: the buffer, when E is already its e part (X[..., Dv:]). Returns X (the sums: [n, z] of every row)."""
    B, n, c, H, Dv = v.shape
    if X is None:
        X = E.new_empty(B, n, c, H, Dv + E.shape[-1])
        X[..., Dv:].copy_(E)
    torch.mul(E, v, out=X[..., :Dv])
    carry = torch.matmul(_strict_tril(n, X), X.sum(2).flatten(2)).view(B, n, H, -1).add_(pool[:, None])
    X[:, :, 0] += carry
    _scan_(X.view(B, n, c, -1))
    return X


def _simple_sums_grad(G, later):
    """The gradient of `_simple_sums`' columns [e v, e] from that of its sums G (B, n, c, H, Dv + Dk), in place:
    suffix sums by chunks of c rows, ended by `later`, the gradient of the pool after the unit. Returns G."""
    B, n, c, H = G.shape[:4]
    carry = torch.matmul(_strict_tril(n, G, upper=True), G.sum(2).flatten(2)).view(B, n, H, -1)
    G[:, :, -1] += carry.add_(later[:, None])
    _scan_(G.view(B, n, c, -1), reverse=True)
    return G


def _quotient_grad(dn, dz, dy, q, ybar, den):
    """The gradients of y = q n / z (ybar = n / z, den = z) with respect to n, dn = dy q / z, and with respect to z,
    negated: dz = dn ybar (summed over the value channels when a head has one key). Written into dn and dz."""
    _gate_grad(dn, dy, q)
    dn.div_(den)
    if dz.shape[-1] == dn.shape[-1]:
        torch.mul(dn, ybar, out=dz)
    else:
        torch.sum(dn * ybar, -1, keepdim=True, out=dz)


def _keys_values_grad(dvs, dks, e, v, dn, dz):
    """dv = e dn and dk = e (v dn - dz) = v dv - e dz: the gradients of v and of k (through e = exp(k - r)) from
    those of the columns [e v, e] they make, dn and dz (the latter negated). Written into dvs and dks."""
    torch.mul(e, dn, out=dvs)
    if dks.shape[-1] == dvs.shape[-1]:
        torch.mul(v, dvs, out=dks)
    else:  # one key per head
        torch.sum(v * dvs, -1, keepdim=True, out=dks)
    dks.addcmul_(e, dz, value=-1.0)


class _SimpleChunked(torch.autograd.Function):
    """y = q * n / z of causal AFT-simple by units (`_units`): forward and backward written out.

    Unit u (rows a .. b - 1) scales its keys by e = exp(k - r_u) (`_references`): r never decreases and every row
    sees the key that attains its reference, so each row sum is >= 1, and no reference depends on a later position.
    The pool of the rows before a unit comes in times exp(r_{u-1} - r_u) <= 1. Backward goes through the units in
    reverse: with a = dy q / z and b = a y / q, the gradients of [e v, e] are the suffix sums A of a and -B of b,
    carried the other way by the same factors; dv = e A, dk = e (v A - B). `over` (a 0-d bool output): some key lies
    more than KEY_RANGE above its unit's reference (exp(k - r) could overflow); `finite` (another): the last row's
    sums, which hold every position, are finite, so no NaN or infinite key or value was met. Saved: e, q, v.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        B, T, H, Dk = k.shape
        Dv = v.shape[3]
        kf = k.reshape(B, T, H * Dk)
        keep = any(ctx.needs_input_grad[:3])
        E = torch.empty_like(k) if keep else None
        y = q.new_empty(B, T, H, Dv)
        units = _units(T, H * (Dv + Dk), plan)
        padded = plan.padded
        refs, carries, over = _references(kf, units, padded)
        pool, pools = kf.new_zeros(B, H, Dv + Dk), []
        for (a, b, c), r, carry in zip(units, refs, carries, strict=True):
            chunks = lambda x, a=a, b=b, c=c: x[:, a:b].unflatten(1, (-1, c))  # noqa: E731
            # without backward, e goes straight into the sums' buffer (one pass less)
            X = None if keep else k.new_empty(B, (b - a) // c, c, H, Dv + Dk)
            Es = chunks(E) if keep else X[..., Dv:]
            exp_(torch.sub(chunks(k), r.view(B, 1, 1, H, Dk), out=Es))
            pools.append(_scale_pool(pool, carry, Dv))
            X = _simple_sums(Es, chunks(v), pool, X)
            pool = X[:, -1, -1].clone()
            num, den = X[..., :Dv], X[..., Dv:]
            if padded:  # rows that have seen only padding: z = 0 and n = 0, so y = 0
                den.masked_fill_(den == 0, 1.0)
            _gate_into(chunks(y), num.div_(den), chunks(q))
        if keep:
            ctx.save_for_backward(q, v, E)
            ctx.units, ctx.carries, ctx.pools, ctx.padded = units, carries, pools, padded
        finite = torch.isfinite(pool).all()
        ctx.mark_non_differentiable(over, finite)
        return y, over, finite

    @staticmethod
    def backward(ctx, dy, *_):
        q, v, E = ctx.saved_tensors
        B, T, H, Dv = v.shape
        Dk = E.shape[-1]
        dq = torch.empty_like(q) if ctx.needs_input_grad[0] else None
        dk, dv = torch.empty_like(E), torch.empty_like(v)
        later = E.new_zeros(B, H, Dv + Dk)  # the gradient of the pool after the unit
        for u in range(len(ctx.units) - 1, -1, -1):
            a, b, c = ctx.units[u]
            chunks = lambda x, a=a, b=b, c=c: x[:, a:b].unflatten(1, (-1, c))  # noqa: E731
            Es, vs, qs, gs = chunks(E), chunks(v), chunks(q), chunks(dy)
            X = _simple_sums(Es, vs, ctx.pools[u])  # the forward's sums again
            num, den = X[..., :Dv], X[..., Dv:]
            if ctx.padded:
                den.masked_fill_(den == 0, 1.0)
            ybar = num.div_(den)
            if dq is not None:  # the gate's gradient: dq = dy ybar
                torch.mul(gs, ybar, out=chunks(dq))
            G = X.new_empty(X.shape)  # the sums' gradient [a, b], then the columns' [A, B]
            _quotient_grad(G[..., :Dv], G[..., Dv:], gs, qs, ybar, den)
            _simple_sums_grad(G, later)
            if u:  # into the unit before: the gradient of its pool, in its scale
                later = _scale_pool(G[:, 0, 0].clone(), ctx.carries[u], Dv)
            _keys_values_grad(chunks(dv), chunks(dk), Es, vs, G[..., :Dv], G[..., Dv:])
        return dq, dk, dv, None


def simple_chunked(q, k, v, mask, C: int):
    """Causal AFT-simple, gated by q: `_SimpleChunked` by units, retried with one reference per chunk when a key lies
    more than KEY_RANGE above its unit's reference; None when it lies that far above its chunk's (the caller then
    uses the exact `_causal_logspace`). Also returns whether every key and value was finite (if not, y is None).
    q: (B, T, H, Dv); k (masked): (B, T, H, Dk); v: (B, T, H, Dv)."""
    for rows in (None, C):
        y, over, finite = _SimpleChunked.apply(q, k, v, _Plan(mask is not None, C, rows))
        over, finite = host_flags(over, finite)  # one host synchronisation per attempt, after the work
        if not finite or not over:
            return (y if finite else None), finite
    return None, True


class _Layout(NamedTuple):
    """Where the band's matrix products keep their operands. A unit's buffer holds, for each of the B samples, m
    chunks of r rows with the columns [e v, e] (Dv + Dk per head) of each row; its canonical view is
    (B, m, r, H, Dv + Dk). The product for chunk i reads chunks i .. i + reach of the buffer's chunk axis
    (`piece(x, p, w, count)`: rows :w of chunks p .. p + count - 1, as the (P, w, Q) operand of one batched
    product). `kind`: "rows" (a bias row per position and sample: the samples' chunks follow each other on the
    products' batch, and the few products that straddle two samples are not used), "shared" (a bias row per
    position shared by the batch: the chunks are the batch, the samples in the columns) or "kernels" (one kernel
    per head, or for every head: the kernels are the batch, every chunk in the columns)."""

    kind: str
    shape: Callable  # (r, m) -> the buffer's shape
    canonical: Callable  # (buffer, m) -> (B, m, r, H, Dv + Dk)
    count: Callable  # (n, m) -> the products' batch for n chunks of rows


def _layout(band, B: int, H: int, Wc: int) -> _Layout:
    Bb, Tb, Hb = band.shape[:3]
    if Tb > 1 and Bb == 1:
        return _Layout("shared", lambda r, m: (m, r, B, H, Wc), lambda x, m: x.permute(2, 0, 1, 3, 4), lambda n, m: n)
    if Tb > 1:
        return _Layout(
            "rows",
            lambda r, m: (B * m, r, H, Wc),
            lambda x, m: x.view(B, m, *x.shape[1:]),
            lambda n, m: B * m - (m - n),
        )
    if Hb == H > 1:  # one kernel per head (conv)
        return _Layout(
            "kernels",
            lambda r, m: (H, r, B * m, Wc),
            lambda x, m: x.view(H, x.shape[1], B, m, Wc).permute(2, 3, 1, 0, 4),
            lambda n, m: B * m - (m - n),
        )
    return _Layout(  # one kernel for every head
        "kernels",
        lambda r, m: (1, r, B * m, H, Wc),
        lambda x, m: x[0].view(x.shape[1], B, m, H, Wc).permute(1, 2, 0, 3, 4),
        lambda n, m: B * m - (m - n),
    )


def _piece(lay: _Layout, x, p: int, w: int, count: int):
    if lay.kind == "kernels":
        return x[:, :w, p : p + count].flatten(2)
    return x[p : p + count, :w].flatten(2)


def _context(x, lo: int, b: int, fill: float = 0.0):
    """Rows lo .. b - 1 of x (B, T, ...), `fill` before the sequence (a view when lo >= 0)."""
    if lo >= 0:
        return x[:, lo:b]
    return F.pad(x[:, :b], (0,) * (2 * (x.dim() - 2)) + (-lo, 0), value=fill)


class _Span(NamedTuple):
    """What a unit of the band covers: rows a .. b - 1, n chunks of c rows; its columns, positions lo .. b - 1 (m
    chunks: the `reach` chunks before its rows and its own; lo < 0 before the sequence); `count` products."""

    a: int
    b: int
    c: int
    n: int
    m: int
    lo: int
    count: int

    def rows(self, x):
        """Rows a .. b - 1 of x (B, T, ...) by chunks: (B, n, c, ...)."""
        return x[:, self.a : self.b].unflatten(1, (self.n, self.c))

    def columns(self, x, fill: float = 0.0):
        """Positions lo .. b - 1 of x (B, T, ...) by chunks, `fill` before the sequence: (B, m, c, ...)."""
        return _context(x, self.lo, self.b, fill).unflatten(1, (self.m, self.c))


def _span(unit, reach: int, lay: _Layout) -> _Span:
    a, b, c = unit
    n = (b - a) // c
    m = n + reach
    return _Span(a, b, c, n, m, a - reach * c, lay.count(n, m))


def _band_rows(band, C: int):
    """The window bias of every row: (Bb, nC, C, W) for a bias row per position, else (Hb, C, W) per kernel."""
    if band.shape[1] == 1:
        return band[0, 0, :, 0, None, :].expand(-1, C, -1)
    return band[:, :, 0, 0].unflatten(1, (-1, C))


def _band_matrix(w, reach: int):
    """The coefficients of a chunk's c rows (w (..., c, W)) on the columns it reads: the `reach` chunks before it and
    its own, then the carry. Row i is column R + i (R = reach * c): exp(w - g) on its window (columns
    R + i - W + 1 .. R + i), exp(-g) before it (bias 0) and on the carry, 0 after it, with g = max(0, the row's
    largest w), so that no coefficient exceeds 1. Returns the pieces, one per chunk read, (..., c, c + 1) for the
    first (with the carry) and (..., c, c) for the others, exp(w - g) and the column of the window's first entry."""
    c, W = w.shape[-2:]
    L, off = (reach + 1) * c, reach * c - (W - 1)
    g = w.detach().amax(-1, keepdim=True).clamp(min=0)
    ew = torch.exp(w - g)
    before = torch.ones(c, L + 1, dtype=w.dtype, device=w.device).tril(off - 1)
    before[:, L] = 1.0
    G = F.pad(skew(ew), (off, 1)).addcmul_(before, torch.exp(-g))  # (..., c, L + 1)
    first = torch.cat([G[..., :c], G[..., L:]], -1)
    return [first] + [G[..., p * c : (p + 1) * c] for p in range(1, reach + 1)], ew, off


def _per_entry(G, lay: _Layout, B: int, s: _Span):
    """A unit's coefficients in the order of the products' batch: per bias row (Bb, nC, c, K) -> chunks j0 ..
    j0 + n - 1 (j0 = a / c), for "rows" entry b m + j for chunk j0 + j of sample b (zeros where the product is not
    used)."""
    j0, n, m = s.a // s.c, s.n, s.m
    if lay.kind == "kernels":
        return G
    if lay.kind == "shared":
        return [g[0, j0 : j0 + n] for g in G]
    return [F.pad(g[:, j0 : j0 + n], (0, 0, 0, 0, 0, m - n)).expand(B, -1, -1, -1).flatten(0, 1)[: s.count] for g in G]


def _add_per_row(dG, dGu, lay: _Layout, B: int, s: _Span):
    """dG (the coefficients' gradient per bias row, as `_band_matrix`'s w) += a unit's dGu, in the order of the
    products' batch: the inverse of `_per_entry`."""
    j0, j1 = s.a // s.c, s.b // s.c
    if lay.kind == "rows":  # per sample and chunk -> per bias row
        dGu = F.pad(dGu, (0, 0, 0, 0, 0, B * s.m - s.count)).view(B, s.m, s.c, -1)[:, : s.n]
        dG[:, j0:j1] += dGu.sum(0, keepdim=True) if dG.shape[0] < B else dGu
    elif lay.kind == "shared":
        dG[0, j0:j1] += dGu
    else:
        dG += dGu


def _band_columns(e, v, pool, lay: _Layout, n: int, negate: bool = False):
    """A unit's columns: [e v, e] at positions lo .. b - 1 (e (B, m, c, H, Dk), v alike with Dv: the `reach`
    chunks before the unit and its n own), and in row c of own-chunk j the carry: `pool` (the positions before lo)
    plus chunks 0 .. j - 1 (other carry rows are 0). With `negate`, the columns of e (and the pool's) carry a minus
    sign, so that one product gives the gradient of both sums. Returns the buffer and the pool after the unit
    (B, H, Dv + Dk): the positions before the next unit's columns."""
    B, m, c, H, Dv = v.shape
    X = e.new_empty(lay.shape(c + 1, m))
    Xc = lay.canonical(X, m)  # (B, m, c + 1, H, Wc)
    torch.mul(e, v, out=Xc[:, :, :c, :, :Dv])
    if negate:
        torch.neg(e, out=Xc[:, :, :c, :, Dv:])
        pool = torch.cat([pool[..., :Dv], -pool[..., Dv:]], -1)
    else:
        Xc[:, :, :c, :, Dv:].copy_(e)
    tot = Xc[:, :n, :c].sum(2)  # (B, n, H, Wc)
    carry = torch.matmul(_strict_tril(n, tot), tot.flatten(2)).view_as(tot).add_(pool[:, None])
    Xc[:, :n, c].copy_(carry)
    Xc[:, n:, c].zero_()
    return X, carry[:, -1] + tot[:, -1]


def _band_products(Gu, X, lay: _Layout, s: _Span):
    """The unit's row sums Y = [n, z] (in the layout's buffer, c rows per chunk): per chunk, its coefficients on
    each chunk it reads (Gu, `_per_entry`) times that chunk's columns X (`_band_columns`), the first with the
    carry row."""
    Yb = X.new_empty(lay.shape(s.c, s.m))
    Yg = _piece(lay, Yb, 0, s.c, s.count)
    torch.bmm(Gu[0], _piece(lay, X, 0, s.c + 1, s.count), out=Yg)
    for p in range(1, len(Gu)):
        Yg.baddbmm_(Gu[p], _piece(lay, X, p, s.c, s.count))
    return Yb


def _transposed_pieces(G, C: int):
    """`_band_matrix`'s pieces transposed, for the gradient of the columns (`_band_products_grad`): piece 0 without
    its carry column and with a column of ones (the gradient of a chunk's carry row goes to every column of the
    chunk, which the carries of the chunks after it sum), the others as they are; and apart, the carry column's."""
    Gt = [torch.cat([G[0][..., :C].transpose(-1, -2), torch.ones_like(G[0][..., :1])], -1)]
    return Gt + [g.transpose(-1, -2) for g in G[1:]], G[0][..., C:].transpose(-1, -2)


def _carry_grad(dYb, Gc, lay: _Layout, s: _Span, later):
    """The gradient of `_band_columns`' carries (each chunk's pool of the positions before its columns) from that of
    the row sums (dYb, rows :c), through the carry's coefficients Gc (`_transposed_pieces`, per entry); and into
    each chunk's carry row of dYb (row c), the gradient of the chunk's column totals: the carries of the chunks
    after it and `later`, the gradient of the pool after the unit. Returns the carries' gradient (B, n, H, Wc)."""
    dcarry = dYb.new_empty(lay.shape(1, s.m))
    torch.bmm(Gc, _piece(lay, dYb, 0, s.c, s.count), out=_piece(lay, dcarry, 0, 1, s.count))
    dcarry = lay.canonical(dcarry, s.m)[:, : s.n, 0]  # (B, n, H, Wc)
    dtot = torch.matmul(_strict_tril(s.n, dcarry, upper=True), dcarry.flatten(2)).view_as(dcarry)
    lay.canonical(dYb, s.m)[:, : s.n, s.c].copy_(dtot.add_(later[:, None]))
    return dcarry


def _band_products_grad(Gtu, dYb, X, lay: _Layout, s: _Span):
    """The gradient of `_band_products` from that of its row sums and carry rows dYb (B, m, c + 1, H, Wc in the
    layout's buffer): of the columns X (the buffer of `_band_columns`, without the carry row) through the transposed
    pieces Gtu (`_transposed_pieces`, per entry), and of the coefficients on each chunk read (the pieces side by
    side, in the order of the products' batch)."""
    c, count = s.c, s.count
    dYg = _piece(lay, dYb, 0, c, count)
    dXb = X.new_empty(lay.shape(c, s.m))
    torch.bmm(Gtu[0], _piece(lay, dYb, 0, c + 1, count), out=_piece(lay, dXb, 0, c, count))
    _piece(lay, dXb, count, c, len(Gtu) - 1).zero_()
    dGu = [torch.bmm(dYg, _piece(lay, X, 0, c, count).transpose(1, 2))]
    for p in range(1, len(Gtu)):
        _piece(lay, dXb, p, c, count).baddbmm_(Gtu[p], dYg)
        dGu.append(torch.bmm(dYg, _piece(lay, X, p, c, count).transpose(1, 2)))
    return dXb, torch.cat(dGu, -1)


def _positions_grad(dk, dv, dX, e, v, s: _Span, last: bool):
    """The gradient of the unit's columns dX (B, m, c, H, Wc) back to dk and dv at its positions lo .. b - 1
    (`_keys_values_grad`; e, v: the columns' (B, m, c, H, D)). Units go in reverse: the positions of the first n
    chunks are met here first (written), those of the last `reach` chunks were also read by the unit after this
    one (added); positions before the sequence are dropped."""
    B, m, c, H, Dv = v.shape
    Dk = e.shape[-1]
    for c0, c1 in ((0, m),) if last else ((0, s.n), (s.n, m)):
        p0, p1 = s.lo + c0 * c, s.lo + c1 * c
        if p1 <= 0:  # before the sequence
            continue
        direct = p0 >= 0 and (last or c0 == 0)
        if direct:
            dvs, dks = dv[:, p0:p1].unflatten(1, (-1, c)), dk[:, p0:p1].unflatten(1, (-1, c))
        else:
            dvs, dks = e.new_empty(B, c1 - c0, c, H, Dv), e.new_empty(B, c1 - c0, c, H, Dk)
        _keys_values_grad(dvs, dks, e[:, c0:c1], v[:, c0:c1], dX[:, c0:c1, :, :, :Dv], dX[:, c0:c1, :, :, Dv:])
        if not direct:
            start = max(p0, 0)
            for grad, x in ((dv, dvs), (dk, dks)):
                x = x.flatten(1, 2)[:, start - p0 :]
                if c0 == 0:
                    grad[:, start:p1].copy_(x)
                else:
                    grad[:, start:p1] += x


def _band_grad(dG, ew, off: int, left: int, per_position: bool):
    """The band's gradient (B|1, T, 1, 1, W) per position, else (1, 1, H|1, 1, W), from dG, the coefficients'
    gradient on the columns read: `_band_matrix`'s exp(w - g) times its window entries (g carries no gradient)."""
    dw = unskew(dG[..., off:], left + 1).mul_(ew)  # (Bb, nC, C, W) or (Hb, C, W)
    return dw.flatten(1, 2)[:, :, None, None] if per_position else dw.sum(1)[None, None, :, None]


class _BandChunked(torch.autograd.Function):
    """Causal AFT with a window band (local, conv) by units (`_units`), forward and backward written out.

    Unit u (rows a .. b - 1, whole chunks of C rows) scales keys by e = exp(k - r_u) as `_SimpleChunked` does. Row t
    of chunk j reads [e v, e] of the `reach` = ceil((W - 1) / C) chunks before it and of its own, with coefficient
    exp(w_{t,t'}) inside its window and 1 before it, and the pool of every position before those chunks as one more
    column (the carry): per chunk read, one batched matrix product for the pool, the window and the rows before it.
    Each row's coefficients are scaled by exp(-max(0, its largest w)) <= 1. Checked (`over`): a key more than
    KEY_RANGE above its unit's reference, and a row sum too close to underflow (the window's bias far below 0 on
    the keys that set the reference); `finite`: the pool after the last unit, which holds every position, is
    finite. Saved for backward: e of each unit's positions, its rows' y / q and z.
    """

    @staticmethod
    def forward(ctx, q, k, v, band, left: int, plan: _Plan):
        B, T, H, Dk = k.shape
        Dv = v.shape[3]
        kf = k.reshape(B, T, H * Dk)
        keep = any(ctx.needs_input_grad[:4])
        y = q.new_empty(B, T, H, Dv)
        lay = _layout(band, B, H, Dv + Dk)
        padded, C = plan.padded, plan.C
        reach = -(-left // C)
        units = _units(T, B * H * (Dv + Dk), plan)
        refs, carries, over = _references(kf, units, padded)
        G, _, _ = _band_matrix(_band_rows(band, C), reach)
        seen = is_real(torch.cummax(kf[:, :, 0], 1).values) if padded else None  # (B, T): a real key so far
        pool, saved, lows = kf.new_zeros(B, H, Dv + Dk), [], []
        for unit, r, carry in zip(units, refs, carries, strict=True):
            s = _span(unit, reach, lay)
            e = exp_(torch.sub(s.columns(k, NEG), r.view(B, 1, 1, H, Dk)))
            X, pool_next = _band_columns(e, s.columns(v), _scale_pool(pool, carry, Dv), lay, s.n)
            Yb = _band_products(_per_entry(G, lay, B, s), X, lay, s)
            Y = lay.canonical(Yb, s.m)[:, : s.n]  # (B, n, c, H, Wc)
            num, den = Y[..., :Dv], Y[..., Dv:]
            if padded:  # rows that have seen only padding: z = 0 and n = 0, so y = 0
                lows.append(den.masked_fill(~s.rows(seen)[..., None, None], torch.inf).amin())
                den.masked_fill_(den == 0, 1.0)
            else:
                lows.append(den.amin())
            _gate_into(s.rows(y), num.div_(den), s.rows(q))
            if keep:
                saved.append((e, Yb, pool))
            pool = pool_next
        over = over | sums_underflow(torch.stack(lows))
        if keep:
            ctx.save_for_backward(q, v, band)
            ctx.units, ctx.saved, ctx.carries, ctx.left = units, saved, carries, left
        finite = torch.isfinite(pool).all()
        ctx.mark_non_differentiable(over, finite)
        return y, over, finite

    @staticmethod
    def backward(ctx, dy, *_):
        q, v, band = ctx.saved_tensors
        B, T, H, Dv = v.shape
        Dk = ctx.saved[0][0].shape[-1]
        lay = _layout(band, B, H, Dv + Dk)
        C = ctx.units[0][2]
        reach = -(-ctx.left // C)
        G, ew, off = _band_matrix(_band_rows(band, C), reach)
        Gt, Gc = _transposed_pieces(G, C)
        dG = ew.new_zeros(*ew.shape[:-1], (reach + 1) * C)  # the coefficients' gradient on the columns read
        dq = torch.empty_like(q) if ctx.needs_input_grad[0] else None
        dk = v.new_empty(B, T, H, Dk)
        dv = torch.empty_like(v)
        later = v.new_zeros(B, H, Dv + Dk)  # the gradient of the pool after the unit (of its e part: negated)
        for u in range(len(ctx.units) - 1, -1, -1):
            s, (e, Yb, pool) = _span(ctx.units[u], reach, lay), ctx.saved[u]
            v_ctx = s.columns(v)
            X, _ = _band_columns(e, v_ctx, pool, lay, s.n, negate=True)
            Y = lay.canonical(Yb, s.m)[:, : s.n]
            ybar, den = Y[..., :Dv], Y[..., Dv:]
            gs = s.rows(dy)
            if dq is not None:  # the gate's gradient: dq = dy ybar
                torch.mul(gs, ybar, out=s.rows(dq))
            # the row sums' gradient [a, b] (b negated, like X's e part), then the carry rows'
            dYb = Yb.new_empty(lay.shape(s.c + 1, s.m))
            dY = lay.canonical(dYb, s.m)  # (B, m, c + 1, H, Wc)
            _quotient_grad(dY[:, : s.n, : s.c, :, :Dv], dY[:, : s.n, : s.c, :, Dv:], gs, s.rows(q), ybar, den)
            dY[:, s.n :].zero_()  # the products that straddle two samples
            dcarry = _carry_grad(dYb, _per_entry([Gc], lay, B, s)[0], lay, s, later)
            if u:  # into the unit before: the gradient of its pool, in its scale
                later = _scale_pool(dcarry.sum(1).add_(later), ctx.carries[u], Dv)
            dXb, dGu = _band_products_grad(_per_entry(Gt, lay, B, s), dYb, X, lay, s)
            _add_per_row(dG, dGu, lay, B, s)
            _positions_grad(dk, dv, lay.canonical(dXb, s.m), e, v_ctx, s, u == len(ctx.units) - 1)
        dband = _band_grad(dG, ew, off, ctx.left, band.shape[1] > 1)
        return dq, dk, dv, dband, None, None


def band_chunked(q, k, v, band, left: int, mask, C: int):
    """Causal AFT with a window band, gated by q: `_BandChunked` by units, retried with one reference per chunk
    when a unit cannot represent its keys; None when a chunk cannot either (the caller then uses the exact
    `_causal_logspace`). Also returns whether every key and value was finite (if not, y is None).
    band: (B|1, T, 1, 1, W) (local) or (1, 1, H|1, 1, W) (conv), W = left + 1."""
    T = k.shape[1]
    C = min(C, T)
    pad = -T % C  # whole chunks only: the sequence is padded at its end (keys NEG: nothing sees them)
    if pad:
        q, v = F.pad(q, (0, 0, 0, 0, 0, pad)), F.pad(v, (0, 0, 0, 0, 0, pad))
        k = F.pad(k, (0, 0, 0, 0, 0, pad), value=NEG)
        band = F.pad(band, (0, 0, 0, 0, 0, 0, 0, pad)) if band.shape[1] > 1 else band
    for rows in (None, C):
        y, over, finite = _BandChunked.apply(q, k, v, band, left, _Plan(mask is not None or pad > 0, C, rows))
        over, finite = host_flags(over, finite)  # one host synchronisation per attempt, after the work
        if not finite or not over:
            return (y[:, :T] if finite else None), finite
    return None, True
