"""The "triton" implementation: Triton kernels for AFT-simple's causal forward and backward, and for the decoding step
of simple, local and conv (which is also local's and conv's causal forward).

    aft_simple_triton(q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False)
        -> (y, final_state)

has the signature, layouts, padding and state semantics of `aft_simple_chunk`. The kernel runs one program per
(batch, head, block of channels) and takes the positions by blocks of ROWS rows: each row a pool of one position,
a parallel prefix over the block (tl.associative_scan) with the pools' combination (`ops_aft_core.combine`)

    m = max(m1, m2),  n = n1 e^(m1 - m) + n2 e^(m2 - m),  z = z1 e^(m1 - m) + z2 e^(m2 - m),  y_t = q_t n / z

after the pool of the blocks before, in float32, so every exponential is against a reference at least as large as
its logit (no global max), a padded position (key NEG) adds nothing and does not advance the state, a row that has
seen only padding is 0, and the state (m, n, z) it starts from and ends with is `AFTState`'s pool. Inputs may be
float32, bfloat16 or float16; sums are float32 and y has the dtype of q.

Gradients: `_SimpleTriton.backward` is a Triton kernel too (`_simple_backward_kernel`): it runs the recurrence again
to keep each row's weighted mean and log-normaliser, then walks the rows backwards carrying the two sums the
gradients of k and v need (see the kernel), every exponent <= 0; gradients of q, k, v, the initial state and through
the final state.

    aft_simple_triton_recurrent, aft_local_triton_recurrent, aft_conv_triton_recurrent

are the recurrent forms (`ops_aft_window._recurrent`, the decoding step) by one kernel, `_window_step_kernel`, with
the variant's window bias as an argument (none for simple, u_t . the slots' position factors for local, the
per-head kernel for conv): op for op the torch form's step in float32, from the state's pool and window slots,
returning the state as that form does. They take no gradient.

    aft_local_triton, aft_conv_triton

are local's and conv's causal forward: the same kernel over the whole sequence, the final pool made canonical as
the parallel forms leave it. Their gradients are not Triton: `_TorchFormGradients` recomputes the torch form
(`aft_local_chunk`, `aft_conv_chunk`) on the saved inputs in backward and returns its gradients.

What the kernels do not cover runs the torch form instead, with one warning per reason and process: a non-causal
call, float64 inputs, an empty batch or sequence, CPU tensors unless Triton's interpreter is on (TRITON_INTERPRET=1,
read at the call: it is how the tests run the kernels on CPU), and a decoding step asked for gradients.
"""

import warnings

import torch

# Inside `try:` so that transformers' check of a remote-code folder's imports does not demand triton: without it
# this module does not import, and ops_aft.py registers no "triton" implementation.
try:
    import triton
    import triton.language as tl
    from triton import knobs
except ImportError as error:
    raise ImportError("ops_aft_triton needs triton (pip install triton)") from error

from .ops_aft_core import NEG, AFTState, check_inputs, check_state, empty_state, mask_inputs, pool_as_position
from .ops_aft_window import (
    aft_conv_chunk,
    aft_conv_recurrent,
    aft_local_chunk,
    aft_local_recurrent,
    aft_simple_chunk,
    aft_simple_recurrent,
)

# Channels per program: a power of two (tl.arange), small enough that a head of width 64 is a handful of programs.
BLOCK_D = 32
# Rows simple's forward takes at once (a power of two): a parallel prefix over them, the pool carried between blocks.
ROWS = 64
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_WARNED: set[str] = set()
_KERNELS: dict[tuple[str, bool], object] = {}


def _combine_pools(m1, n1, z1, m2, n2, z2):
    """Two pools (n, z scaled by e^-m) as one, against the larger reference: `ops_aft_core.combine` in Triton."""
    m = tl.maximum(m1, m2)
    a = tl.exp(m1 - m)  # NEG - NEG = 0 where both are empty: an empty pool stays empty
    b = tl.exp(m2 - m)
    return m, n1 * a + n2 * b, z1 * a + z2 * b


# Wrapped when this module is imported, in the mode Triton is in then, as triton wraps tl.max and tl.sum: the kernels
# call it, and pass it to tl.associative_scan and tl.reduce.
_combine = triton.jit(_combine_pools)


def _simple_forward_kernel(
    q, k, v, y, m0, n0, z0, m1, n1, z1, T, H, D,
    sqb, sqt, sqh, skb, skt, skh, skd, svb, svt, svh, syb, syt, syh,
    NEG_KEY: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = d < D
    s = bh * D + d  # the states are contiguous (B, H, D)
    m = tl.load(m0 + s, mask=live, other=NEG_KEY)
    n = tl.load(n0 + s, mask=live, other=0.0)
    z = tl.load(z0 + s, mask=live, other=0.0)
    for start in range(0, T, ROWS):
        t = start + tl.arange(0, ROWS)[:, None]
        tile = (t < T) & live[None, :]
        kt = tl.load(k + b * skb + t * skt + h * skh + d[None, :] * skd, mask=tile, other=NEG_KEY).to(tl.float32)
        vt = tl.load(v + b * svb + t * svt + h * svh + d[None, :], mask=tile, other=0.0).to(tl.float32)
        qt = tl.load(q + b * sqb + t * sqt + h * sqh + d[None, :], mask=tile, other=0.0).to(tl.float32)
        # each row is a pool of one position (padding: the empty pool); their prefix pools along the rows, then
        # the pool before the block in front of each
        real = kt > NEG_KEY / 2
        rows = (kt, tl.where(real, vt, 0.0), tl.where(real, 1.0, 0.0))
        pm, pn, pz = tl.associative_scan(rows, 0, _combine)
        _, pn, pz = _combine(m[None, :], n[None, :], z[None, :], pm, pn, pz)
        seen = pz > 0
        yt = tl.where(seen, pn / tl.where(seen, pz, 1.0), 0.0) * qt
        tl.store(y + b * syb + t * syt + h * syh + d[None, :], yt.to(y.dtype.element_ty), mask=tile)
        bm, bn, bz = tl.reduce(rows, 0, _combine)  # the block's pool, carried to the next block
        m, n, z = _combine(m, n, z, bm, bn, bz)
    tl.store(m1 + s, m, mask=live)
    tl.store(n1 + s, n, mask=live)
    tl.store(z1 + s, z, mask=live)


def _kernel(fn):
    """`fn` jitted for the mode Triton is in now: its interpreter when TRITON_INTERPRET=1 (CPU tensors), else
    compiled for the GPU. Triton picks the mode when it wraps a function, so this wraps it at the first call in
    each mode rather than at import."""
    key = (fn.__name__, bool(knobs.runtime.interpret))
    if key not in _KERNELS:
        _KERNELS[key] = triton.jit(fn)
    return _KERNELS[key]


def _fallback(reason: str):
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"aft_implementation='triton': {reason}; running the torch form instead.", stacklevel=3)


def _uncovered(q, k, v, causal) -> str | None:
    """Why the kernel cannot take this call, or None when it can."""
    if not causal:
        return "the Triton kernel is causal only (causal=False)"
    if any(x.dtype not in KERNEL_DTYPES for x in (q, k, v)):
        return f"the Triton kernel takes {[str(d) for d in KERNEL_DTYPES]}, not {q.dtype}/{k.dtype}/{v.dtype}"
    if q.numel() == 0:
        return "an empty batch or sequence"
    if q.device.type == "cpu" and not knobs.runtime.interpret:
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"
    return None


def _launch(q, k, v, m0, n0, z0):
    """y (dtype of q) and the kernel's final (m, n, z), each (B, H, Dv) float32. k (masked, float32) may be
    (B, T, H, 1): its channel stride is then 0."""
    B, T, H, D = v.shape
    y = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    m1, n1, z1 = (torch.empty(B, H, D, dtype=torch.float32, device=q.device) for _ in range(3))
    skd = k.stride(3) if k.shape[3] > 1 else 0
    grid = (B * H, triton.cdiv(D, BLOCK_D))
    _kernel(_simple_forward_kernel)[grid](
        q, k, v, y, m0, n0, z0, m1, n1, z1, T, H, D,
        *q.stride()[:3], *k.stride()[:3], skd, *v.stride()[:3], *y.stride()[:3],
        NEG_KEY=NEG, BLOCK=BLOCK_D, ROWS=min(ROWS, triton.next_power_of_2(T)),
    )  # fmt: skip
    return y, m1, n1, z1


def _start(initial_state, B, H, Dk, D, like):
    """The pool to start from, each (B, H, D) contiguous float32 (a key per head broadcast over the channels)."""
    if initial_state is None:
        m = torch.full((B, H, D), NEG, dtype=torch.float32, device=like.device)
        return m, torch.zeros_like(m), torch.zeros_like(m)
    return tuple(x.to(torch.float32).expand(B, H, D).contiguous() for x in initial_state[:3])


def _simple_backward_kernel(
    dy, q, k, v, m0, n0, z0, dm1, dn1, A, L, dq, dk, dv, dm0, dn0, dz0, T, H, D,
    sqb, sqt, sqh, skb, skt, skh, skd, svb, svt, svh, syb, syt, syh, sab, sat, sah,
    NEG_KEY: tl.constexpr, BLOCK: tl.constexpr, HAS_STATE: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = d < D
    s = bh * D + d  # the states are contiguous (B, H, D)
    m = tl.load(m0 + s, mask=live, other=NEG_KEY)
    n = tl.load(n0 + s, mask=live, other=0.0)
    z = tl.load(z0 + s, mask=live, other=0.0)
    # 1. the forward again, keeping each row's weighted mean A_t = n / z and log-normaliser L_t = m + log z
    for t in range(T):
        kt = tl.load(k + b * skb + t * skt + h * skh + d * skd, mask=live, other=NEG_KEY).to(tl.float32)
        vt = tl.load(v + b * svb + t * svt + h * svh + d, mask=live, other=0.0).to(tl.float32)
        top = tl.maximum(m, kt)
        old = tl.exp(m - top)
        e = tl.where(kt > NEG_KEY / 2, tl.exp(kt - top), 0.0)
        n = n * old + e * vt
        z = z * old + e
        m = top
        seen = z > 0
        one = tl.where(seen, z, 1.0)
        row = b * sab + t * sat + h * sah + d
        tl.store(A + row, tl.where(seen, n / one, 0.0), mask=live)
        tl.store(L + row, tl.where(seen, m + tl.log(one), NEG_KEY), mask=live)
    # 2. backwards over the rows. With g_t = dy_t q_t (0 for a row that has seen only padding), key s receives
    # dv_s = e^(k_s - L_s) acc1_s and dk_s = e^(k_s - L_s) (v_s acc1_s - acc2_s), where
    # acc1_s = sum_{t >= s} g_t e^(L_s - L_t) and acc2_s = the same sum of g_t A_t: carried as
    # acc_s = g_s + e^(L_s - L_{s+1}) acc_{s+1}, every exponent <= 0 (L only grows with t). The final state's
    # n = A_{T-1} adds its gradient to row T - 1's g; its m = L_{T-1} gives key s dm e^(k_s - L_{T-1}).
    last = b * sab + (T - 1) * sat + h * sah + d
    l_end = tl.load(L + last, mask=live, other=NEG_KEY)
    real_end = l_end > NEG_KEY / 2
    dm_end = tl.where(real_end, tl.load(dm1 + s, mask=live, other=0.0), 0.0)
    dn_end = tl.where(real_end, tl.load(dn1 + s, mask=live, other=0.0), 0.0)
    acc1 = dn_end
    acc2 = dn_end * tl.load(A + last, mask=live, other=0.0)
    l_next = l_end
    for i in range(T):
        t = T - 1 - i
        row = b * sab + t * sat + h * sah + d
        lt = tl.load(L + row, mask=live, other=NEG_KEY)
        at = tl.load(A + row, mask=live, other=0.0)
        dyt = tl.load(dy + b * syb + t * syt + h * syh + d, mask=live, other=0.0).to(tl.float32)
        qt = tl.load(q + b * sqb + t * sqt + h * sqh + d, mask=live, other=0.0).to(tl.float32)
        g = tl.where(lt > NEG_KEY / 2, dyt * qt, 0.0)
        f = tl.exp(lt - l_next)
        acc1 = g + f * acc1
        acc2 = g * at + f * acc2
        l_next = lt
        kt = tl.load(k + b * skb + t * skt + h * skh + d * skd, mask=live, other=NEG_KEY).to(tl.float32)
        vt = tl.load(v + b * svb + t * svt + h * svh + d, mask=live, other=0.0).to(tl.float32)
        real = kt > NEG_KEY / 2
        w = tl.where(real, tl.exp(kt - lt), 0.0)
        tl.store(dq + row, dyt * at, mask=live)
        tl.store(dv + row, w * acc1, mask=live)
        tl.store(dk + row, w * (vt * acc1 - acc2) + tl.where(real, dm_end * tl.exp(kt - l_end), 0.0), mask=live)
    if HAS_STATE:
        # the initial pool enters every sum as n0 e^m0 and z0 e^m0 (row -1 of the scan above)
        m = tl.load(m0 + s, mask=live, other=NEG_KEY)
        n = tl.load(n0 + s, mask=live, other=0.0)
        z = tl.load(z0 + s, mask=live, other=0.0)
        real = m > NEG_KEY / 2
        p = tl.where(real, tl.exp(m - l_next), 0.0)
        dn = p * acc1
        dz = tl.where(real, dm_end * tl.exp(m - l_end), 0.0) - p * acc2
        tl.store(dn0 + s, dn, mask=live)
        tl.store(dz0 + s, dz, mask=live)
        tl.store(dm0 + s, n * dn + z * dz, mask=live)


def _canonical_pool(m, n, z):
    """A pool as `causal_state` leaves it, against its own log-normaliser: m + log z, n / z and z = 1 after a real
    key (m = NEG, n = z = 0 before any)."""
    m, n = pool_as_position(m, n, z)
    return m, n, (z > 0).to(z.dtype)


class _SimpleTriton(torch.autograd.Function):
    """The kernel forward and the kernel backward (`_simple_backward_kernel`, which recomputes the forward's
    per-row sums rather than keeping them). Inputs: q (B, T, H, D), k (masked, float32), v (masked, float32), mask,
    the initial pool (m0, n0, z0) (Dk wide) or None. Outputs: y and the final pool, canonical as `causal_state`
    makes it (z = 1 after a real key, m = NEG, n = z = 0 before any)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, m0, n0, z0):
        B, _, H, Dk = k.shape
        D = v.shape[3]
        state = None if m0 is None else (m0, n0, z0)
        y, m, n, z = _launch(q, k, v, *_start(state, B, H, Dk, D, q))
        m, n, z = _canonical_pool(m, n, z)
        m, z = m[..., :Dk], z[..., :Dk]
        ctx.save_for_backward(q, k, v, m0, n0, z0)
        return y, m, n, z

    @staticmethod
    def backward(ctx, dy, dm, dn, dz):
        q, k, v, m0, n0, z0 = ctx.saved_tensors
        B, T, H, Dk = k.shape
        D = v.shape[3]
        state = None if m0 is None else (m0, n0, z0)
        start = _start(state, B, H, Dk, D, q)
        dm_end = torch.zeros(B, H, D, dtype=torch.float32, device=q.device)
        dm_end[..., :Dk] = dm  # a key per head: its m is one value, counted on channel 0 of the sums below
        scratch = [torch.empty(B, T, H, D, dtype=torch.float32, device=q.device) for _ in range(5)]
        A, L, dq, dk, dv = scratch
        dm0, dn0, dz0 = (torch.empty(B, H, D, dtype=torch.float32, device=q.device) for _ in range(3))
        skd = k.stride(3) if Dk > 1 else 0
        grid = (B * H, triton.cdiv(D, BLOCK_D))
        _kernel(_simple_backward_kernel)[grid](
            dy, q, k, v, *start, dm_end, dn.to(torch.float32).contiguous(), A, L, dq, dk, dv, dm0, dn0, dz0, T, H, D,
            *q.stride()[:3], *k.stride()[:3], skd, *v.stride()[:3], *dy.stride()[:3], *A.stride()[:3],
            NEG_KEY=NEG, BLOCK=BLOCK_D, HAS_STATE=state is not None,
        )  # fmt: skip
        if Dk < D:  # one key per head: its gradient sums over the head's channels
            dk, dm0, dz0 = (x.sum(-1, keepdim=True) for x in (dk, dm0, dz0))
        grads = [dq.to(q.dtype), dk, dv, None]
        if state is None:
            return (*grads, None, None, None)
        return (*grads, *(g.to(x.dtype) for g, x in zip((dm0, dn0, dz0), state, strict=True)))


def aft_simple_triton(q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    """Causal AFT-simple by the Triton kernel where it applies (see the module's text), else `aft_simple_chunk`.
    q, k, v: (B, T, H, D)."""
    reason = _uncovered(q, k, v, causal)
    if reason is not None:
        _fallback(reason)
        return aft_simple_chunk(
            q, k, v, causal=causal, mask=mask, initial_state=initial_state, output_final_state=output_final_state
        )
    check_inputs(q, k, v, mask)
    if initial_state is not None:
        check_state(initial_state, k, v)
    km, vm = mask_inputs(k, v, mask)
    state = (None, None, None) if initial_state is None else tuple(initial_state[:3])
    y, m, n, z = _SimpleTriton.apply(q, km, vm, mask, *state)
    if not output_final_state:
        return y, None
    B, _, H, Dk = k.shape
    empty = km.new_empty(B, 0, H, Dk)
    return y, AFTState(m, n, z, empty, vm.new_empty(B, 0, H, v.shape[3]), km.new_empty(B, 0, 0))


# The decoding step of simple, local and conv: the recurrent forms' step (`ops_aft_window._recurrent`) as one
# kernel, the variant's window bias an argument of it.


def _window_step_kernel(
    q, k, v, w, y, m0, n0, z0, m1, n1, z1, T, H, D, S,
    sqb, sqt, sqh, skb, skt, skh, skd, svb, svt, svh, swb, swt, swh, syb, syt, syh,
    NEG_KEY: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = d < D
    j = tl.arange(0, SLOTS)
    slot = j <= S  # the S window slots and the token itself; SLOTS is a power of two >= S + 1
    tile = slot[:, None] & live[None, :]
    s = bh * D + d
    m = tl.load(m0 + s, mask=live, other=NEG_KEY)
    n = tl.load(n0 + s, mask=live, other=0.0)
    z = tl.load(z0 + s, mask=live, other=0.0)
    for t in range(T):
        # token t's window is positions t .. t + S of k and v, the state's slots followed by the tokens
        at = t + j[:, None]
        keys = tl.load(k + b * skb + at * skt + h * skh + d[None, :] * skd, mask=tile, other=NEG_KEY)
        values = tl.load(v + b * svb + at * svt + h * svh + d[None, :], mask=tile, other=0.0)
        logits = keys
        if HAS_BIAS:
            logits = keys + tl.load(w + b * swb + t * swt + h * swh + j, mask=slot, other=0.0)[:, None]
        logits = tl.where(tile, logits, NEG_KEY)
        ref = tl.maximum(m, tl.max(logits, axis=0))  # every exponent below is <= 0
        e = tl.where(tile, tl.exp(logits - ref[None, :]), 0.0)
        scale = tl.exp(m - ref)
        den = z * scale + tl.sum(e, axis=0)
        seen = ref > NEG_KEY / 2  # False only while the row has seen nothing but padding (then y = 0)
        yt = tl.where(seen, (n * scale + tl.sum(e * values, axis=0)) / tl.where(seen, den, 1.0), 0.0)
        qt = tl.load(q + b * sqb + t * sqt + h * sqh + d, mask=live, other=0.0).to(tl.float32)
        tl.store(y + b * syb + t * syt + h * syh + d, (qt * yt).to(y.dtype.element_ty), mask=live)
        # the oldest slot (the token itself when S = 0) joins the pool; an empty slot or padding adds nothing
        k0 = tl.load(k + b * skb + t * skt + h * skh + d * skd, mask=live, other=NEG_KEY)
        v0 = tl.load(v + b * svb + t * svt + h * svh + d, mask=live, other=0.0)
        real = k0 > NEG_KEY / 2
        top = tl.maximum(m, k0)
        old = tl.exp(m - top)
        new = tl.exp(k0 - top)
        n = n * old + tl.where(real, v0, 0.0) * new
        z = z * old + tl.where(real, 1.0, 0.0) * new
        m = top
    tl.store(m1 + s, m, mask=live)
    tl.store(n1 + s, n, mask=live)
    tl.store(z1 + s, z, mask=live)


def _strides(x, dims: int):
    """x's first `dims` strides, 0 along a dimension of size 1 (broadcast)."""
    return [x.stride(i) if x.shape[i] > 1 else 0 for i in range(dims)]


def _window_step(q, k, v, slots: int, bias, pos_v, mask, initial_state, output_final_state):
    """The kernel's steps over the T tokens of q, k, v (B, T, H, D) from `initial_state`. `bias(positions)` -> the
    window bias of token t's s = slots + 1 slots, (B|1, T|1, H|1, s) float32, from the key-side position factors
    of the slots and tokens (B, slots + T, R) (None: no bias). -> y (dtype of q) and the state as
    `ops_aft_window._recurrent` leaves it (the pool (m, n, z) unnormalised, in float32)."""
    check_inputs(q, k, v, mask)
    km, vm = mask_inputs(k, v, mask)
    B, T, H, Dk = k.shape
    D = v.shape[3]
    rank = pos_v.shape[-1] if pos_v is not None else 0
    state = initial_state
    if state is None:
        state = empty_state(B, H, Dk, D, slots=slots, rank=rank, device=k.device)
    check_state(state, k, v)
    if tuple(state.k.shape) != (B, slots, H, Dk) or tuple(state.pos.shape) != (B, slots, rank):
        raise ValueError(
            f"initial_state has {state.k.shape[1]} window slots and position factors {tuple(state.pos.shape)}, "
            f"but this window needs ({B}, {slots}, {rank}): the state belongs to another model."
        )
    keys = torch.cat([state.k.to(torch.float32), km], 1)  # (B, S + T, H, Dk)
    values = torch.cat([state.v.to(torch.float32), vm], 1)
    positions = state.pos.to(torch.float32)
    if rank:
        positions = torch.cat([positions, pos_v.to(torch.float32).expand(B, -1, -1)], 1)
    w = None if bias is None else bias(positions).to(torch.float32).contiguous()
    y = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    m1, n1, z1 = (torch.empty(B, H, D, dtype=torch.float32, device=q.device) for _ in range(3))
    skd = keys.stride(3) if Dk > 1 else 0
    sw = (0, 0, 0) if w is None else _strides(w, 3)
    grid = (B * H, triton.cdiv(D, BLOCK_D))
    _kernel(_window_step_kernel)[grid](
        q, keys, values, keys if w is None else w, y, *_start(state, B, H, Dk, D, q), m1, n1, z1, T, H, D, slots,
        *q.stride()[:3], *keys.stride()[:3], skd, *values.stride()[:3], *sw,
        *y.stride()[:3], NEG_KEY=NEG, BLOCK=BLOCK_D, SLOTS=triton.next_power_of_2(slots + 1), HAS_BIAS=w is not None,
    )  # fmt: skip
    if not output_final_state:
        return y, None
    window_pos = positions[:, T:] if rank else positions.clone()  # never an input itself (an autograd output)
    return y, AFTState(m1[..., :Dk], n1, z1[..., :Dk], keys[:, T:], values[:, T:], window_pos)


def _step_or_torch_form(torch_form, q, k, v, causal, extra, step):
    """The kernel's step where it applies, else the torch recurrent form (with one warning per reason)."""
    if not causal:  # the torch form says why not
        return torch_form()
    reason = _uncovered(q, k, v, causal)
    if reason is None and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, *extra)):
        reason = "the Triton decoding step has no backward (an input requires grad)"
    if reason is not None:
        _fallback(reason)
        return torch_form()
    return step()


def aft_simple_triton_recurrent(q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    """`aft_simple_recurrent` by the Triton step where it applies (see the module's text), else that torch form."""
    state = () if initial_state is None else initial_state
    return _step_or_torch_form(
        lambda: aft_simple_recurrent(
            q, k, v, causal=causal, mask=mask, initial_state=initial_state, output_final_state=output_final_state
        ),
        q, k, v, causal, state,
        lambda: _window_step(q, k, v, 0, None, None, mask, initial_state, output_final_state),
    )  # fmt: skip


def _check_factors(pos_u, pos_v, k):
    """A clear error when local's position factors are not (B|1, T, R) for these inputs."""
    B, T = k.shape[:2]
    for name, x in (("pos_u", pos_u), ("pos_v", pos_v)):
        if x.dim() != 3 or x.shape[0] not in (1, B) or x.shape[1] != T or x.shape[2] != pos_u.shape[-1]:
            raise ValueError(
                f"`{name}` has shape {tuple(x.shape)}; with `k` of shape {tuple(k.shape)} it must be "
                f"(1 or {B}, {T}, R) with the R of `pos_u`: one row of factors per position."
            )


def _local_bias(pos_u, window: int):
    """Local's window bias for `_window_step`: u_t . the key-side factors of token t's s slots, (B, T, 1, s)."""
    if window < 1:
        raise ValueError(f"AFT-local needs window >= 1, got window={window}.")

    def bias(positions):  # positions (B, S + T, R)
        B, T = positions.shape[0], positions.shape[1] - window + 1
        slots = positions.unfold(1, window, 1)  # (B, T, R, s)
        return torch.einsum("btr,btrs->bts", pos_u.to(torch.float32).expand(B, T, -1), slots)[:, :, None]

    return bias


def _conv_bias(kernel):
    """Conv's window bias for `_window_step`: the per-head kernel (H, s), the same for every token."""
    return lambda positions: kernel[None, None]


def aft_local_triton_recurrent(
    q, k, v, pos_u, pos_v, window, *, causal=True, mask=None, initial_state=None, output_final_state=False
):
    """`aft_local_recurrent` by the Triton step where it applies, else that torch form."""
    _check_factors(pos_u, pos_v, k)
    bias = _local_bias(pos_u, window)
    state = () if initial_state is None else initial_state
    return _step_or_torch_form(
        lambda: aft_local_recurrent(
            q, k, v, pos_u, pos_v, window, causal=causal, mask=mask, initial_state=initial_state,
            output_final_state=output_final_state,
        ),
        q, k, v, causal, (pos_u, pos_v, *state),
        lambda: _window_step(q, k, v, window - 1, bias, pos_v, mask, initial_state, output_final_state),
    )  # fmt: skip


def aft_conv_triton_recurrent(
    q, k, v, kernel, *, causal=True, mask=None, initial_state=None, output_final_state=False
):
    """`aft_conv_recurrent` by the Triton step where it applies, else that torch form. kernel: (H, s)."""
    state = () if initial_state is None else initial_state
    return _step_or_torch_form(
        lambda: aft_conv_recurrent(
            q, k, v, kernel, causal=causal, mask=mask, initial_state=initial_state,
            output_final_state=output_final_state,
        ),
        q, k, v, causal, (kernel, *state),
        lambda: _window_step(
            q, k, v, kernel.shape[-1] - 1, _conv_bias(kernel), None, mask, initial_state, output_final_state
        ),
    )  # fmt: skip


# The causal forward of local and conv: the same window kernel over the whole sequence (one token after another),
# its final pool made canonical as the parallel forms leave it; gradients by the torch form.


class _TorchFormGradients(torch.autograd.Function):
    """Outputs by `run(*inputs)` (a kernel), gradients of `torch_form(*inputs)`, recomputed in backward on the
    saved inputs: both return the same tuple of tensors (y and the final state's six)."""

    @staticmethod
    def forward(ctx, run, torch_form, *inputs):
        ctx.torch_form = torch_form
        ctx.save_for_backward(*inputs)
        return run(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [None if x is None else x.detach().requires_grad_(need) for x, need in zip(
            ctx.saved_tensors, ctx.needs_input_grad[2:], strict=True)]  # fmt: skip
        wanted = [x for x in inputs if x is not None and x.requires_grad]
        with torch.enable_grad():
            outputs = ctx.torch_form(*inputs)
            pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None and o.requires_grad]
            found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
        found = iter(found)
        return None, None, *(next(found) if x is not None and x.requires_grad else None for x in inputs)


def _window_parallel(torch_form, params, slots, window, q, k, v, causal, mask, initial_state, output_final_state):
    """`torch_form(q, k, v, *params, causal, mask, initial_state, output_final_state)` by the window kernel where it
    applies, with that form's gradients; else that form, with one warning per reason. params: the variant's
    tensors; window(*params) -> `_window_step`'s bias function and key-side position factors (or None)."""
    reason = _uncovered(q, k, v, causal)
    if reason is not None:
        _fallback(reason)
        return torch_form(
            q, k, v, *params, causal=causal, mask=mask, initial_state=initial_state,
            output_final_state=output_final_state,
        )  # fmt: skip
    if initial_state is not None:
        check_state(initial_state, k, v)
    n = len(params)

    def run(q, k, v, mask, *rest):
        state = None if rest[n] is None else AFTState(*rest[n:])
        y, final = _window_step(q, k, v, slots, *window(*rest[:n]), mask, state, True)
        return y, *_canonical_pool(*final[:3]), *final[3:]

    def torch_run(q, k, v, mask, *rest):
        state = None if rest[n] is None else AFTState(*rest[n:])
        y, final = torch_form(q, k, v, *rest[:n], mask=mask, initial_state=state, output_final_state=True)
        return y, *final

    state = (None,) * 6 if initial_state is None else tuple(initial_state)
    y, *final = _TorchFormGradients.apply(run, torch_run, q, k, v, mask, *params, *state)
    return y, (AFTState(*final) if output_final_state else None)


def aft_local_triton(
    q, k, v, pos_u, pos_v, window, *, causal=True, mask=None, initial_state=None, output_final_state=False
):
    """Causal AFT-local by the window kernel where it applies (gradients by `aft_local_chunk`), else that form."""

    _check_factors(pos_u, pos_v, k)

    def torch_form(q, k, v, pos_u, pos_v, **kw):
        return aft_local_chunk(q, k, v, pos_u, pos_v, window, **kw)

    return _window_parallel(
        torch_form, (pos_u, pos_v), window - 1, lambda pos_u, pos_v: (_local_bias(pos_u, window), pos_v), q, k, v,
        causal, mask, initial_state, output_final_state,
    )  # fmt: skip


def aft_conv_triton(q, k, v, kernel, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    """Causal AFT-conv by the window kernel where it applies (gradients by `aft_conv_chunk`), else that form.
    kernel: (H, s); k: (B, T, H, 1)."""

    def torch_form(q, k, v, kernel, **kw):
        return aft_conv_chunk(q, k, v, kernel, **kw)

    return _window_parallel(
        torch_form, (kernel,), kernel.shape[-1] - 1, lambda kernel: (_conv_bias(kernel), None), q, k, v, causal,
        mask, initial_state, output_final_state,
    )  # fmt: skip
