"""AFT-full: the factorised bias w = u v^T over every pair of positions. One T x T bias, shared by the batch and
every channel; never B x T x T x D.

Three forms with the signature of every AFT form,

    (q, k, v, pos_u, pos_v, *, causal=True, mask=None, initial_state=None, output_final_state=False)
        -> (y, final_state)

`aft_full_chunk` (causal: one matrix product per block of query rows over every key up to the block's end; it
checks its own range and hands the rare input it cannot represent to the tree), `aft_full_exact` (causal: a
binary tree of key blocks whose references are always attained: the twin the tests hold the blocked form to) and
`aft_full_recurrent` (one step per token: decoding). The state keeps every past position, like a KV cache of half
the size (`FullState`): each key as e = exp(k - r) against its own position's largest key r, stored with e v, so
that a decoding step takes no exponential per channel (one product of the S bias weights with [e v, e]).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ops_aft_core import (
    NEG,
    CallOptions,
    check_inputs,
    combine,
    finite_inputs,
    finite_prefix,
    gate,
    host_flags,
    is_real,
    join_past,
    keys_out_of_range,
    mask_inputs,
    not_empty,
    reference_or_first_key,
    sums_underflow,
)

# Query rows per block of the blocked form: each block is one (Bs, s + Bs) x (s + Bs, 2 B D) matrix product, so a
# larger block means fewer passes over the keys before it, at the price of a larger masked triangle.
FULL_BLOCK = 512


def aft_full_chunk(
    q, k, v, pos_u, pos_v, *, causal=True, mask=None, initial_state=None, output_final_state=False,
    block_size=FULL_BLOCK,
):  # fmt: skip
    """AFT-full with w_{t,t'} = pos_u[t] . pos_v[t']; pos_u, pos_v: (B|1, T, R). Causal: blocks of `block_size` rows;
    non-causal: one matrix product (every row sees the largest key and its own row max, so nothing underflows)."""
    options = CallOptions(causal, mask, initial_state, output_final_state)
    k, v, pos_u, pos_v, keys_pos, before = _inputs(q, k, v, pos_u, pos_v, options)
    if k.shape[1] == before or k.shape[0] == 0:  # nothing to compute
        y = v.new_zeros(v[:, before:].shape)
    elif not causal:
        y = _noncausal(k, v, pos_u, pos_v)
    else:
        y, finite = _full_blocked(k, v, pos_u, keys_pos, before, block_size)
        if not finite:
            # A NaN or infinite key or value would reach the earlier rows of its block as 0 * NaN in the product:
            # the rows before it come from the inputs with it replaced (nothing before a position depends on it),
            # the rows from it on from the tree, whose sums only ever look back.
            clean, _ = _full_blocked(*finite_inputs(k, v), pos_u, keys_pos, before, block_size)
            tree = _full_tree(k, v, pos_u, keys_pos, before)
            if clean is None:
                clean = _full_tree(*finite_inputs(k, v), pos_u, keys_pos, before)
            y = torch.where(finite_prefix(k, v)[:, before:], clean, tree)
        elif y is None:  # a key far above those before it, or w and the keys both spread far: the tree
            y = _full_tree(k, v, pos_u, keys_pos, before)
    return _finish(q, y, k, v, keys_pos, before, options)


def aft_full_exact(q, k, v, pos_u, pos_v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    options = CallOptions(causal, mask, initial_state, output_final_state)
    k, v, pos_u, pos_v, keys_pos, before = _inputs(q, k, v, pos_u, pos_v, options)
    if k.shape[1] == before or k.shape[0] == 0:  # nothing to compute
        y = v.new_zeros(v[:, before:].shape)
    else:
        y = _full_tree(k, v, pos_u, keys_pos, before) if causal else _noncausal(k, v, pos_u, pos_v)
    return _finish(q, y, k, v, keys_pos, before, options)


def aft_full_recurrent(q, k, v, pos_u, pos_v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    """One token at a time: token t sees the state's positions and the tokens of this call up to t. The state is
    not concatenated to compute y (a cache appends the new positions in place: `full_state` of them); with
    `output_final_state` the new positions are appended to it.

    Per step: w_s = u_t . pos_s + r_s over the S past positions, p = exp(w - max w) (S exponentials, the largest
    is 1), and [sum p e v, sum p e] in one product: no exponent is positive, and a denominator is at least the e
    of the dominant position. Exact while every key lies within ~87 of its own position's largest key (float32's
    normal range of e); a key further below counts as 0, where in the parallel forms it is still exact.
    """
    if not causal:
        raise ValueError("The recurrent form is causal: pass causal=True.")
    check_inputs(q, k, v, mask)
    k, v = mask_inputs(k, v, mask)
    B, T = k.shape[:2]
    pos_u, pos_v = pos_u.to(k.dtype).expand(B, -1, -1), pos_v.to(k.dtype).expand(B, -1, -1)
    past = full_state(k[:, :0], v[:, :0], pos_v[:, :0]) if initial_state is None else initial_state
    _check_state(past, k, v)
    past = FullState(*(x.to(k.dtype) for x in past))
    new = full_state(k, v, pos_v)
    ys = []
    for t in range(T):
        parts = [_pool(past, pos_u[:, t]), _pool(FullState(*(x[:, : t + 1] for x in new)), pos_u[:, t])]
        m, n, z = combine(*parts[0], *parts[1])
        seen = not_empty(m) & (z != 0)  # z = 0: only padding so far (or a channel too far below: it counts as 0)
        ys.append(torch.where(seen, n / torch.where(seen, z, 1.0), 0.0))
    y = torch.stack(ys, 1) if ys else v.new_zeros(v.shape)
    state = FullState(*(torch.cat([a, b], 1) for a, b in zip(past, new, strict=True))) if output_final_state else None
    return gate(q, y), state


class FullState(NamedTuple):
    """AFT-full's decoding state: every past position, oldest first. r (B, S, H, 1): each position's largest key
    (NEG for padding and empty slots); ev (B, S, H, Dv + Dk): [e v, e] with e = exp(k - r) <= 1 (0 for padding);
    pos (B, S, R): the key-side position factors."""

    r: torch.Tensor
    ev: torch.Tensor
    pos: torch.Tensor


def full_state(k, v, pos_v) -> FullState:
    """The state of positions with (masked) keys k (B, S, H, Dk), values v (B, S, H, Dv), factors pos_v (B, S, R)."""
    r = k.detach().amax(-1, keepdim=True)
    real = is_real(r)
    e = torch.where(real, torch.exp(k - torch.where(real, r, 0.0)), 0.0)
    return FullState(r, torch.cat([e * v, e], -1), pos_v)


def keys_and_values(state: FullState):
    """The state's masked keys and values (B, S, H, D), back from [e v, e] and r (padding: NEG and 0)."""
    Dk = state.ev.shape[-1] // 2
    ev, e = state.ev[..., :Dk], state.ev[..., Dk:]
    kept = e > 0
    k = torch.where(kept, state.r + torch.log(torch.where(kept, e, 1.0)), NEG)
    return k, ev / torch.where(kept, e, 1.0)


def prepend_full_state(state: FullState, k, v, mask, pos_v):
    """A FullState as the positions before the sequence (`join_past`): every past position itself with its own
    key-side factors, since each keeps a bias of its own (nothing is pooled, unlike `prepend_state`), read in the
    inputs' dtype. Arguments and results as `prepend_state`'s, with S the state's positions."""
    _check_state(state, k, v)
    state = FullState(*(x.to(k.dtype) for x in state))
    past_k, past_v = keys_and_values(state)
    return *join_past(past_k, past_v, state.pos, k, v, mask, pos_v), past_k.shape[1]


def full_bias(pos_u, pos_v):
    """w = u v^T: (B|1, T, R) x (B|1, T', R) -> (B|1, T, T')."""
    return pos_u @ pos_v.transpose(-1, -2)


def _check_state(state, k, v):
    B, _, H, Dk = k.shape
    if (
        not isinstance(state, FullState)
        or tuple(state.ev.shape[::2]) != (B, H)
        or state.ev.shape[-1] != Dk + v.shape[3]
    ):
        shape = tuple(state.ev.shape) if isinstance(state, FullState) else type(state).__name__
        raise ValueError(
            f"initial_state.ev has shape {shape}, but these inputs need (batch {B}, positions, heads {H}, "
            f"{Dk + v.shape[3]}): the state belongs to another batch or model."
        )


def _pool(state: FullState, u):
    """sum_s exp(k_s + u . pos_s) [v_s, 1] for one query row u (B, R): (m (B, H, 1), n (B, H, Dv), z (B, H, Dk)),
    n and z scaled by exp(-m). One pass over the S positions: S exponentials and one product."""
    B, S, H, _ = state.r.shape
    Dk = state.ev.shape[-1] // 2
    if S == 0:
        return state.r.new_full((B, H, 1), NEG), state.ev.new_zeros(B, H, Dk), state.ev.new_zeros(B, H, Dk)
    w = torch.einsum("br,bsr->bs", u, state.pos)[:, :, None] + state.r[..., 0]  # (B, S, H)
    m = w.amax(1)  # (B, H)
    p = torch.exp(w - m[:, None])
    out = torch.einsum("bsh,bshd->bhd", p, state.ev)  # (B, H, Dv + Dk)
    return m[..., None], out[..., :Dk], out[..., Dk:]


def _inputs(q, k, v, pos_u, pos_v, options: CallOptions):
    """Mask the keys and put the state's positions before the sequence. Returns k, v over S + T positions, the
    rows' pos_u (B|1, T, R), pos_v of the sequence, the keys' pos_v (B|1, S + T, R) and S."""
    causal, mask, initial_state, output_final_state = options
    if output_final_state and not causal:
        raise ValueError("output_final_state is the state after a causal sequence: pass causal=True.")
    check_inputs(q, k, v, mask)
    k, v = mask_inputs(k, v, mask)
    pos_u, pos_v = pos_u.to(k.dtype), pos_v.to(k.dtype)
    keys_pos, before = pos_v, 0
    if initial_state is not None:
        if not causal:
            raise ValueError("initial_state continues a causal sequence: pass causal=True.")
        # the mask is not needed: the past's empty positions and the sequence's padding are NEG keys already
        k, v, _, keys_pos, before = prepend_full_state(initial_state, k, v, None, pos_v)
    return k, v, pos_u, pos_v, keys_pos, before


def _finish(q, y, k, v, keys_pos, before, options: CallOptions):
    """Causal rows that have seen only padding are 0; the state is every position."""
    if options.causal:
        seen = not_empty(torch.cummax(k[..., :1, :1], 1).values[:, before:])  # (B, T, 1, 1)
        y = torch.where(seen, y, torch.zeros_like(y))
    state = full_state(k, v, keys_pos.expand(k.shape[0], -1, -1)) if options.output_final_state else None
    return gate(q, y), state


def _noncausal(k, v, pos_u, pos_v):
    w = full_bias(pos_u, pos_v)
    kmax = k.amax(1, keepdim=True)  # every row sees this key, so the reference is attained
    ek = torch.exp(k - kmax).permute(0, 2, 1, 3)  # (B, H, T, Dk)
    wmax = w.amax(-1, keepdim=True)
    ew = torch.exp(w - wmax)[:, None]  # (B|1, 1, T, T)
    num = ew @ (ek * v.permute(0, 2, 1, 3))
    den = ew @ ek
    return (num / den).permute(0, 2, 1, 3)


def _full_blocked(k, v, pos_u, keys_pos, before: int, Bs: int):
    """Causal AFT-full by blocks of Bs query rows, one matrix product per block over every key up to its end.

    The rows are positions before .. S + T - 1 of the keys k, v (B, S + T, H, D) (masked keys NEG); pos_u (B|1, T, R)
    are the rows' factors, keys_pos (B|1, S + T, R) the keys'. Block i computes E @ [e^{k - c} v, e^{k - c}] with
    E[t, t'] = e^{w[t, t'] - a_t} for t' <= t and 0 above the diagonal, a_t = max_{t' <= t} w[t, t'] and c the
    largest key at positions <= the block's first row (the block's first real key when there is none before),
    which every row of the block sees. So no output depends on a later token, not even in its last bit, and the
    row's terms include one of at least e^{-spread of w}. Two things can go wrong, and both are detected after all
    the work: a key more than KEY_RANGE above c inside the block (e^{k - c} could overflow), and a denominator too
    close to underflow on a row that has seen a real key (w and the keys both spread over more than ~60). Then this
    returns None and the caller uses the tree. Returns y (B, T, H, D) or None, and whether every key and value
    was finite (if not, y is None).
    """
    B, N, H, D = k.shape
    T = N - before
    Bs = min(Bs, T)
    nb = -(-T // Bs)
    pad = nb * Bs - T
    k = F.pad(k, (0, 0, 0, 0, 0, pad), value=NEG)
    v = F.pad(v, (0, 0, 0, 0, 0, pad))
    pos_u, keys_pos = F.pad(pos_u, (0, 0, 0, pad)), F.pad(keys_pos, (0, 0, 0, pad))
    # 1. column references c (B, nb, H, D) and the two checks' inputs
    kd = k.detach()
    running = torch.cummax(kd, dim=1).values  # (B, S + nb * Bs, H, D)
    seen = is_real(running[:, before:])  # a real key at or before each row
    kb = kd[:, before:].unflatten(1, (nb, Bs))
    c = reference_or_first_key(running[:, before::Bs], kb, 2)  # only padding so far: the block's first real key
    overflow = keys_out_of_range(kb.amax(2), c)
    # 2. one product per block: E (B|1, Bs, s) @ x (s, B * H * 2D) when w is shared (time first, the batch in the
    # columns), else batched (B, s, H * 2D)
    shared = pos_u.shape[0] == 1 and keys_pos.shape[0] == 1
    kt, vt = (k.transpose(0, 1), v.transpose(0, 1)) if shared else (k, v)
    tdim = 0 if shared else 1
    diag = torch.ones(Bs, Bs, dtype=torch.bool, device=k.device).triu(1)  # t' > t inside the block
    out = []
    for i in range(nb):
        s = before + (i + 1) * Bs  # keys 0 .. s - 1
        ci = c[:, i] if shared else c[:, i, None]  # (B, H, D) or (B, 1, H, D)
        ek = torch.exp(kt.narrow(tdim, 0, s) - ci)
        x = torch.cat([ek * vt.narrow(tdim, 0, s), ek], -1)  # (s, B, H, 2D) or (B, s, H, 2D)
        w = pos_u[:, i * Bs : (i + 1) * Bs] @ keys_pos[:, :s].transpose(-1, -2)  # (B|1, Bs, s)
        w = torch.cat([w[..., : s - Bs], w[..., s - Bs :].masked_fill(diag, -torch.inf)], -1)
        e = torch.exp(w - w.detach().amax(-1, keepdim=True))
        if shared:
            out.append((e[0] @ x.flatten(1)).view(Bs, B, H, 2 * D))
        else:
            out.append((e @ x.flatten(2)).view(B, Bs, H, 2 * D))
    out = torch.cat(out, tdim)
    num, den = (out.transpose(0, 1) if shared else out).split(D, -1)  # (B, nb * Bs, H, D)
    # 3. the checks, then n / z (rows that have seen only padding have z = 0 and n = 0). The last block's columns
    # hold every key and value: they sum to a finite number only if all of them are finite.
    finite = torch.isfinite(x.sum(tdim)).all()
    declined, finite = host_flags(overflow | sums_underflow(den, seen), finite)  # one host synchronisation
    if declined or not finite:
        return None, finite
    y = num / torch.where(seen, den, torch.ones_like(den))
    return y[:, :T], True


def _full_tree(k, v, pos_u, keys_pos, before: int):
    """The tree over the whole sequence (the state's positions as rows too), padded to a power of two with NEG
    keys; returns the rows of the sequence."""
    N = k.shape[1]
    pos_u = F.pad(pos_u.expand(keys_pos.shape[0], -1, -1) if before else pos_u, (0, 0, before, 0))
    w = full_bias(pos_u, keys_pos)
    pad = (1 << max(N - 1, 0).bit_length()) - N
    kp = F.pad(k, (0, 0, 0, 0, 0, pad), value=NEG)
    vp = F.pad(v, (0, 0, 0, 0, 0, pad))
    return _full_causal(kp, vp, F.pad(w, (0, pad, 0, pad)))[:, before:N]


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

        M, N, Z = combine(M, N, Z, rows(ref, NEG), rows(num, 0.0), rows(den, 0.0))
        b *= 2
    return N / Z
