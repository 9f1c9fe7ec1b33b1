"""The core every AFT form shares: numerics, range checks, the decoding state and how a state joins a sequence.

Layout (every tensor has the batch first and the sequence second):

    q, v: (B, T, H, Dv)      k: (B, T, H, Dk) with Dk == Dv (one key per channel) or Dk == 1 (one per head)

`q` is the already-activated query gate sigma_q(Q). `mask` (B, T) marks real tokens (1) and padding (0); padding
contributes to neither sum of Eq. 2, and a row that has seen only padding is 0.

Numerics: everything is computed in float32 (float64 stays float64). Every exponential is taken against a
reference that is at least the largest logit it scales, so nothing overflows, and references are per position or
per chunk of positions, never one global max, so nothing underflows to 0/0. Padding keys are the finite `NEG`
rather than -inf, so that NEG - NEG == 0 instead of NaN.

Keys and values that are not finite, the same in every form (chunked, exact, naive, recurrent, with or without a
state): a key of -inf is a position of weight 0, exactly as padding (`mask_keys`), and a position of weight 0
contributes nothing whatever its value, NaN included (`mask_inputs`). A NaN or +inf key, or a NaN or infinite
value, at position t makes the outputs that read it (from t on, in the channels it enters) NaN or infinite, and
changes nothing before t, to the last bit: the fast forms detect such an input after their work and take the rows
before it from the same inputs with it replaced (`finite_inputs`, `finite_prefix`), the rows from it on from their
exact twin. Without causality (a grid, causal=False) every row reads every position.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

NEG = -1e30
# A fast form scales keys by exp(k - reference) with a reference from earlier positions: it represents keys up to
# this far above it (e^60 ~ 1e26 < float32's largest e^88), and hands anything else to its exact twin.
KEY_RANGE = 60.0
# ... and it trusts a sum only while it is this far above float32's smallest normal number: below, the terms it
# dropped (each < tiny) could exceed 2^-40 of it.
UNDERFLOW_MARGIN = 2.0**40
LOG2_E = 1.4426950408889634


def exp_(x: torch.Tensor) -> torch.Tensor:
    """e^x in place, as 2^(x log2 e): on CPU torch's exp2 is a cheaper kernel than its exp, for a relative error
    <= 1e-6 at x in [-20, 0] and <= 4e-6 down to -87 in float32 (the rounding of x log2 e), 1e-15 in float64.
    The fast forms' exponentials of a whole sequence."""
    return x.mul_(LOG2_E).exp2_()


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of every sum and exponential: float32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def is_real(keys: torch.Tensor) -> torch.Tensor:
    """Whether a key belongs to a real position (padding and empty slots are NEG)."""
    return keys > NEG / 2


def not_empty(reference: torch.Tensor) -> torch.Tensor:
    """Whether a running reference (a largest key so far) is not the empty one: True after a real key, and after a
    NaN, so that a NaN reaches the outputs from its position on rather than reading as "only padding so far"."""
    return ~(reference <= NEG / 2)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """A clear error, before any work, when q, k, v (and the mask) do not have the layout every form takes."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"`{name}` has shape {tuple(x.shape)}; expected 4 dimensions (batch, time, heads, dim).")
    B, T, H, Dv = v.shape
    if tuple(q.shape) != (B, T, H, Dv):
        raise ValueError(f"`q` has shape {tuple(q.shape)} and `v` {tuple(v.shape)}: they must be the same.")
    if tuple(k.shape[:3]) != (B, T, H) or k.shape[3] not in (Dv, 1):
        raise ValueError(
            f"`k` has shape {tuple(k.shape)}; with `v` of shape {tuple(v.shape)} it must be ({B}, {T}, {H}, {Dv}) "
            f"(a key per channel) or ({B}, {T}, {H}, 1) (a key per head)."
        )
    if mask is not None and tuple(mask.shape) != (B, T):
        raise ValueError(f"`mask` has shape {tuple(mask.shape)}; expected (batch, time) = ({B}, {T}).")


def mask_keys(k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """k in the accumulation dtype, with padding keys and -inf keys set to NEG: a key of -inf is a position of
    weight 0, as padding is (NaN and +inf stay as they are)."""
    k = k.to(acc_dtype(k)).clamp(min=NEG)
    if mask is None:
        return k
    return torch.where(mask.bool()[:, :, None, None], k, torch.full_like(k, NEG))


def mask_inputs(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """`mask_keys`, and v in the same dtype with 0 at every position of weight 0 (padding, a -inf key): such a
    position adds nothing to either sum whatever its value (0 * v would be NaN for a NaN or infinite value)."""
    k = mask_keys(k, mask)
    return k, torch.where(is_real(k), v.to(k.dtype), 0.0)


def finite_prefix(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, T, H, Dv) bool: the rows of each output channel before the first NaN or infinite key or value it reads."""
    finite = torch.isfinite(k) & torch.isfinite(v)
    return finite.to(torch.uint8).cummin(1).values.bool()


def finite_inputs(k: torch.Tensor, v: torch.Tensor):
    """k and v with every NaN or infinite entry replaced by 0."""
    return tuple(torch.where(torch.isfinite(x), x, 0.0) for x in (k, v))


def host_flags(*flags: torch.Tensor) -> list[bool]:
    """0-d bool tensors read on the host with one synchronisation: the fast forms' only data-dependent branches
    (whether they could represent their input), taken after the work."""
    return [bool(x) for x in torch.stack(flags).tolist()]


class CallOptions(NamedTuple):
    """The options every form takes after its inputs (`causal`, `mask`, `initial_state`, `output_final_state`),
    as the public form was called: built once by it and handed to the code it shares with the other forms."""

    causal: bool
    mask: torch.Tensor | None
    initial_state: tuple | None  # the form's state: AFTState, or FullState for full
    output_final_state: bool


def gate(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sigma_q(Q) * y, returned in the dtype of q."""
    return (q.to(y.dtype) * y).to(q.dtype)


def keys_out_of_range(keys_max: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: does any key lie more than KEY_RANGE above the reference that scales it?"""
    return (keys_max - reference > KEY_RANGE).any()


def sums_underflow(den: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """A 0-d bool tensor: is any denominator of a row that has seen a real key too small to trust?"""
    low = den < torch.finfo(den.dtype).tiny * UNDERFLOW_MARGIN
    return (low & seen if seen is not None else low).any()


def reference_or_first_key(ref: torch.Tensor, keys: torch.Tensor, dim: int) -> torch.Tensor:
    """`ref` where it is a real key, else the first real key of `keys` along `dim` (the positions before that key
    see only padding). `ref` has the shape of `keys` without `dim`."""
    first = is_real(keys).to(torch.uint8).argmax(dim, keepdim=True)
    return torch.where(is_real(ref), ref, keys.gather(dim, first).squeeze(dim))


def combine(m1, n1, z1, m2, n2, z2):
    """Merge two partial sums (n, z scaled by exp(-m)) into one, against the larger reference."""
    m = torch.maximum(m1, m2)
    a, b = torch.exp(m1 - m), torch.exp(m2 - m)
    return m, n1 * a + n2 * b, z1 * a + z2 * b


def prefix_pool(k, v):
    """Causal pool over t' <= t, as a log-normaliser m_t = log sum e^k and the weighted mean n_t (so z_t = 1).

    v = a - b with a = relu(v) + 1 >= 1 and b = a - v >= 1, so both weighted means come from a log-space cumulative
    sum with finite logs, nothing in it looks past t, and d(a - b)/dv = 1 exactly. -> m (B, T, H, Dk), n (B, T, H, Dv).
    """
    m = torch.logcumsumexp(k, dim=1)
    a = v.clamp(min=0) + 1
    b = a - v
    mean = lambda x: torch.exp(torch.logcumsumexp(k + torch.log(x), dim=1) - m)  # noqa: E731
    return m, mean(a) - mean(b)


def unfold(x, left: int, right: int, fill: float):
    """(B, T, H, D) -> (B, T, H, D, W), W = left + right + 1: entry j is position t - left + j (a view)."""
    xp = F.pad(x, (0, 0, 0, 0, left, right), value=fill)
    return xp.unfold(1, left + right + 1, 1)


class AFTState(NamedTuple):
    """The decoding state of one layer after some positions, in float32 (float64 for float64 inputs).

    The pool (m, n, z) sums the positions that no longer have a bias of their own (n and z scaled by exp(-m), the
    running-max recurrence of docs/operator.md, section 4; section 7 says how a state joins a sequence):
    m, z (B, H, Dk), n (B, H, Dv); empty: m = NEG, n = z = 0. The window holds the last S positions that still do,
    oldest first: k (B, S, H, Dk), v (B, S, H, Dv) and their key-side position factors pos (B, S, R) (R = 0 when the
    bias has none). Empty slots have the key NEG. S is 0 for `simple`, s - 1 for `local` and `conv`, and every past
    position for `full` (whose pool stays empty).
    """

    m: torch.Tensor
    n: torch.Tensor
    z: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor


def empty_state(B, H, Dk, Dv, *, slots: int = 0, rank: int = 0, device=None, dtype=torch.float32) -> AFTState:
    """The state before any position: an empty pool and `slots` empty window slots."""
    kw = {"device": device, "dtype": dtype}
    return AFTState(
        m=torch.full((B, H, Dk), NEG, **kw),
        n=torch.zeros(B, H, Dv, **kw),
        z=torch.zeros(B, H, Dk, **kw),
        k=torch.full((B, slots, H, Dk), NEG, **kw),
        v=torch.zeros(B, slots, H, Dv, **kw),
        pos=torch.zeros(B, slots, rank, **kw),
    )


def check_state(state: AFTState, k: torch.Tensor, v: torch.Tensor):
    """A clear error when a state does not belong to these inputs (another batch, heads or width)."""
    B, _, H, Dk = k.shape
    expected = {"m": (B, H, Dk), "n": (B, H, v.shape[3]), "z": (B, H, Dk)}
    for name, shape in expected.items():
        got = tuple(getattr(state, name).shape)
        if got != shape:
            raise ValueError(
                f"initial_state.{name} has shape {got}, but these inputs need {shape} (batch {B}, {H} heads): the "
                "state belongs to another batch or model."
            )


def pool_as_position(m, n, z):
    """A pool (n, z scaled by exp(-m)) as one position: its key m + log z (NEG for an empty pool) and its value n / z,
    the weighted mean (0 for an empty pool). m, z (B, H, Dk), n (B, H, Dv); z broadcasts when Dk == 1."""
    real = z > 0
    one = torch.where(real, z, 1.0)
    return torch.where(real, m + torch.log(one), NEG), n / one


def join_past(past_k, past_v, past_pos, k, v, mask, pos_v):
    """Positions before the sequence, then the sequence: the one way a state joins a sequence (the window forms'
    pool and slots, full's past positions). past_k, past_v (B, S, H, D) with NEG keys where a past position is
    empty, past_pos (B, S, R) or None; k (masked), v (B, T, H, D); mask (B, T) or None; pos_v (B|1, T, R) or None.
    Returns k, v, mask (B, S + T: the past's real positions, then the sequence's), pos_v (B, S + T, R) or None."""
    B, T = k.shape[:2]
    real = torch.ones(B, T, dtype=torch.bool, device=k.device) if mask is None else mask.bool()
    mask = torch.cat([is_real(past_k[:, :, 0, 0]), real], 1)
    k = torch.cat([past_k.to(k.dtype), k], 1)
    v = torch.cat([past_v.to(v.dtype), v], 1)
    if pos_v is not None:
        pos_v = torch.cat([past_pos.to(pos_v.dtype), pos_v.expand(B, -1, -1)], 1)
    return k, v, mask, pos_v


def prepend_state(state: AFTState, k, v, mask, pos_v=None):
    """A state as positions before the sequence: the pool as one position with key m + log z and value n / z, then
    the window slots. Every later position is at least S + 1 = s positions past the pool, so it is outside every
    window and keeps bias 0, as the pool's positions would. Exact: AFT's sums over the pool's positions factor
    through (m, n, z).

    k (masked), v: (B, T, H, D); mask (B, T) or None; pos_v (B|1, T, R) or None. Returns k, v, mask over 1 + S + T
    positions, pos_v (B, 1 + S + T, R) or None, and the number 1 + S of positions put before the sequence.
    """
    check_state(state, k, v)
    pool_k, pool_v = pool_as_position(state.m, state.n, state.z)
    past_k = torch.cat([pool_k[:, None].to(k.dtype), state.k.to(k.dtype)], 1)
    past_v = torch.cat([pool_v[:, None].to(v.dtype), state.v.to(v.dtype)], 1)
    past_pos = None
    if pos_v is not None:  # the pool's position has bias 0 (see above)
        past_pos = torch.cat([state.pos.new_zeros(k.shape[0], 1, state.pos.shape[-1]), state.pos], 1)
    k, v, mask, pos_v = join_past(past_k, past_v, past_pos, k, v, mask, pos_v)
    return k, v, mask, pos_v, past_k.shape[1]


def causal_state(k, v, slots: int, pos_v=None) -> AFTState:
    """The state after the last position: the pool of positions 0 .. T - 1 - slots (one sum, against its own
    largest key) and the last `slots` positions as the window (empty slots where the sequence is shorter).

    k (masked), v: (B, T, H, D); pos_v (B|1, T, R) or None.
    """
    B, T, H, Dk = k.shape
    Dv = v.shape[3]
    rank = pos_v.shape[-1] if pos_v is not None else 0
    state = empty_state(B, H, Dk, Dv, slots=slots, rank=rank, device=k.device, dtype=k.dtype)
    if slots < T:
        kk = k[:, : T - slots]
        m = kk.detach().amax(1)
        e = torch.exp(kk - m[:, None])
        z = e.sum(1)
        real = is_real(m)
        state = state._replace(
            m=torch.where(real, m + torch.log(z), NEG),
            n=torch.where(real[..., :1] if Dk < Dv else real, (e * v[:, : T - slots]).sum(1) / z, 0.0),
            z=real.to(k.dtype),
        )
    if slots:
        keep = min(slots, T)
        state = state._replace(
            k=torch.cat([state.k[:, keep:], k[:, T - keep :]], 1),
            v=torch.cat([state.v[:, keep:], v[:, T - keep :]], 1),
            pos=torch.cat([state.pos[:, keep:], pos_v.expand(B, -1, -1)[:, T - keep :]], 1) if rank else state.pos,
        )
    return state
