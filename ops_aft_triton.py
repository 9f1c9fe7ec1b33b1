"""AFT-simple's causal forward as a Triton kernel: the "triton" implementation of `simple`.

    aft_simple_triton(q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False)
        -> (y, final_state)

has the signature, layouts, padding and state semantics of `aft_simple_chunk`. The kernel runs one program per
(batch, head, block of channels) and walks the positions in order with the running-max recurrence of
`aft_simple_recurrent` in float32:

    m' = max(m, k_t),  n' = n e^(m - m') + e^(k_t - m') v_t,  z' = z e^(m - m') + e^(k_t - m'),  y_t = q_t n' / z'

so every exponential is against a reference at least as large as its logit (no global max), a padded position
(key NEG) adds nothing and does not advance the state, a row that has seen only padding is 0, and the state
(m, n, z) it starts from and ends with is `AFTState`'s pool. Inputs may be float32, bfloat16 or float16; sums are
float32 and y has the dtype of q.

Gradients: `_SimpleTriton.backward` is not a Triton kernel. It recomputes the torch form (`aft_simple_chunk`) on the
saved inputs and returns that form's gradients of q, k, v and the initial state, so training with this
implementation gets the torch form's gradients and pays one torch forward more per backward.

What the kernel does not cover runs the torch form instead, with one warning per reason and process: a non-causal
call, float64 inputs, an empty batch or sequence, CPU tensors unless Triton's interpreter is on (TRITON_INTERPRET=1,
read at the call: it is how the tests run the kernel on CPU), and the one-token decoding step (no Triton kernel).
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

from .ops_aft_core import NEG, AFTState, check_inputs, check_state, mask_inputs
from .ops_aft_window import aft_simple_chunk, aft_simple_recurrent

# Channels per program: a power of two (tl.arange), small enough that a head of width 64 is a handful of programs.
BLOCK_D = 32
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_WARNED: set[str] = set()
_KERNELS: dict[bool, object] = {}


def _simple_forward_kernel(
    q, k, v, y, m0, n0, z0, m1, n1, z1, T, H, D,
    sqb, sqt, sqh, skb, skt, skh, skd, svb, svt, svh, syb, syt, syh,
    NEG_KEY: tl.constexpr, BLOCK: tl.constexpr,
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
    for t in range(T):
        kt = tl.load(k + b * skb + t * skt + h * skh + d * skd, mask=live, other=NEG_KEY).to(tl.float32)
        vt = tl.load(v + b * svb + t * svt + h * svh + d, mask=live, other=0.0).to(tl.float32)
        qt = tl.load(q + b * sqb + t * sqt + h * sqh + d, mask=live, other=0.0).to(tl.float32)
        top = tl.maximum(m, kt)
        old = tl.exp(m - top)  # NEG - NEG = 0 before any real key: the empty pool stays empty
        e = tl.where(kt > NEG_KEY / 2, tl.exp(kt - top), 0.0)
        n = n * old + e * vt
        z = z * old + e
        m = top
        seen = z > 0
        yt = tl.where(seen, n / tl.where(seen, z, 1.0), 0.0) * qt
        tl.store(y + b * syb + t * syt + h * syh + d, yt.to(y.dtype.element_ty), mask=live)
    tl.store(m1 + s, m, mask=live)
    tl.store(n1 + s, n, mask=live)
    tl.store(z1 + s, z, mask=live)


def _kernel():
    """The kernel, jitted for the mode Triton is in now: its interpreter when TRITON_INTERPRET=1 (CPU tensors),
    else compiled for the GPU. Triton picks the mode when it wraps a function, so this wraps it at the first call
    in each mode rather than at import."""
    interpret = bool(knobs.runtime.interpret)
    if interpret not in _KERNELS:
        _KERNELS[interpret] = triton.jit(_simple_forward_kernel)
    return _KERNELS[interpret]


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
    _kernel()[grid](
        q, k, v, y, m0, n0, z0, m1, n1, z1, T, H, D,
        *q.stride()[:3], *k.stride()[:3], skd, *v.stride()[:3], *y.stride()[:3],
        NEG_KEY=NEG, BLOCK=BLOCK_D,
    )  # fmt: skip
    return y, m1, n1, z1


def _start(initial_state, B, H, Dk, D, like):
    """The pool to start from, each (B, H, D) contiguous float32 (a key per head broadcast over the channels)."""
    if initial_state is None:
        m = torch.full((B, H, D), NEG, dtype=torch.float32, device=like.device)
        return m, torch.zeros_like(m), torch.zeros_like(m)
    return tuple(x.to(torch.float32).expand(B, H, D).contiguous() for x in initial_state[:3])


class _SimpleTriton(torch.autograd.Function):
    """The kernel forward; the torch form's gradients (recomputed in backward: see the module's text).
    Inputs: q (B, T, H, D), k (masked, float32), v (masked, float32), mask, the initial pool (m0, n0, z0) (Dk
    wide) or None. Outputs: y and the final pool, canonical as `causal_state` makes it (z = 1 after a real key,
    m = NEG, n = z = 0 before any)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, m0, n0, z0):
        B, _, H, Dk = k.shape
        D = v.shape[3]
        state = None if m0 is None else (m0, n0, z0)
        y, m, n, z = _launch(q, k, v, *_start(state, B, H, Dk, D, q))
        real = z > 0
        m = torch.where(real, m + torch.log(torch.where(real, z, 1.0)), NEG)[..., :Dk]
        n = torch.where(real, n / torch.where(real, z, 1.0), 0.0)
        z = real.to(torch.float32)[..., :Dk]
        ctx.save_for_backward(q, k, v, mask, m0, n0, z0)
        return y, m, n, z

    @staticmethod
    def backward(ctx, dy, dm, dn, dz):
        q, k, v, mask, m0, n0, z0 = ctx.saved_tensors
        inputs = [None if x is None else x.detach().requires_grad_(need) for x, need in zip(
            (q, k, v, None, m0, n0, z0), ctx.needs_input_grad, strict=True)]  # fmt: skip
        qq, kk, vv, _, mm, nn, zz = inputs
        state = None
        if mm is not None:
            B, _, H, Dk = k.shape
            empty = k.new_empty(B, 0, H, Dk)
            state = AFTState(mm, nn, zz, empty, v.new_empty(B, 0, H, v.shape[3]), k.new_empty(B, 0, 0))
        with torch.enable_grad():
            y, final = aft_simple_chunk(qq, kk, vv, mask=mask, initial_state=state, output_final_state=True)
            pairs = [(o, g) for o, g in zip((y, final.m, final.n, final.z), (dy, dm, dn, dz), strict=True)]
            pairs = [(o, g) for o, g in pairs if g is not None and o.requires_grad]
            wanted = [x for x in inputs if x is not None and x.requires_grad]
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return tuple(next(grads) if x is not None and x.requires_grad else None for x in inputs)


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


def aft_simple_triton_recurrent(q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    """The decoding step: `aft_simple_recurrent` (no Triton kernel for it yet), said once."""
    _fallback("the decoding step has no Triton kernel")
    return aft_simple_recurrent(
        q, k, v, causal=causal, mask=mask, initial_state=initial_state, output_final_state=output_final_state
    )
