"""The operator: every parallel form against the literal formula, the recurrent form against the parallel form."""

import pytest
import torch

import aft.ops_aft as ops

B, T, R = 2, 13, 4


def _inputs(H, Dk, Dv, dtype, key_scale=2.0):
    q = torch.rand(B, T, H, Dv, dtype=dtype)
    k = (torch.randn(B, T, H, Dk, dtype=dtype) * key_scale).requires_grad_()
    v = torch.randn(B, T, H, Dv, dtype=dtype, requires_grad=True)
    return q, k, v


def _mask():
    mask = torch.ones(B, T)
    mask[1, :4] = 0  # left padding
    return mask


def _cases(dtype):
    """(name, parallel(q, k, v, mask, causal), dense bias for the reference, heads, key dim, value dim)."""
    pu, pv = torch.randn(1, T, R, dtype=dtype), torch.randn(1, T, R, dtype=dtype)
    kernel = torch.randn(3, 4, dtype=dtype)
    return [
        ("simple", lambda q, k, v, m, c: ops.aft_simple(q, k, v, causal=c, mask=m)[0], lambda c: None, 1, 6, 6),
        *[
            (
                f"local{s}",
                lambda q, k, v, m, c, s=s: ops.aft_local(q, k, v, pu, pv, s, causal=c, mask=m)[0],
                lambda c, s=s: ops.local_bias_dense(pu, pv, s, causal=c),
                1,
                6,
                6,
            )
            for s in (1, 3, 20)
        ],
        ("full", lambda q, k, v, m, c: ops.aft_full(q, k, v, pu, pv, causal=c, mask=m)[0],
         lambda c: ops.full_bias(pu, pv)[:, None], 1, 6, 6),
        ("conv", lambda q, k, v, m, c: ops.aft_conv(q, k, v, kernel, causal=c, mask=m)[0],
         lambda c: ops.conv_bias_dense(kernel, T, causal=c), 3, 1, 5),
    ]  # fmt: skip


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("causal", [True, False])
def test_parallel_equals_reference(dtype, tol, causal):
    mask = _mask()
    valid = mask.bool()
    for name, parallel, bias, H, Dk, Dv in _cases(dtype):
        q, k, v = _inputs(H, Dk, Dv, dtype)
        y = parallel(q, k, v, mask, causal)
        ref = ops.aft_reference(q, k, v, bias(causal), causal=causal, mask=mask)
        torch.testing.assert_close(y[valid], ref[valid], atol=tol, rtol=tol, msg=name)
        grad_out = torch.randn_like(y) * valid[:, :, None, None]
        g = torch.autograd.grad(y, (k, v), grad_out)
        g_ref = torch.autograd.grad(ref, (k, v), grad_out.masked_fill(~valid[:, :, None, None], 0))
        for a, b in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=f"{name} gradient")


def _step_all(q, k, v, mask, state, start, **kw):
    """Run aft_step over positions start..T-1; kw holds the window and the bias inputs per variant."""
    pos_u, pos_v = kw.pop("pos_u", None), kw.pop("pos_v", None)
    ys = []
    for t in range(start, T):
        extra = {"pos_u": pos_u[:, t], "pos_v": pos_v[:, t]} if pos_u is not None else {}
        y, state = ops.aft_step(q[:, t], k[:, t], v[:, t], state, mask=mask[:, t], **kw, **extra)
        ys.append(y)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("variant", ["simple", "local", "conv", "full"])
@pytest.mark.parametrize("prefill", [0, 5, T - 1])
def test_recurrent_equals_parallel(variant, prefill):
    """Prefill `prefill` tokens in parallel, then one step per token: the same outputs as one parallel pass."""
    dtype = torch.float64
    mask = _mask()
    pu, pv = torch.randn(1, T, R, dtype=dtype), torch.randn(1, T, R, dtype=dtype)
    kernel = torch.randn(3, 4, dtype=dtype)
    H, Dk, Dv = (3, 1, 5) if variant == "conv" else (1, 6, 6)
    q, k, v = _inputs(H, Dk, Dv, dtype, key_scale=3.0)
    window, parallel, step_kw, rank = {
        "simple": (0, lambda *a, **kw: ops.aft_simple(*a, **kw), {}, 0),
        "local": (4, lambda *a, **kw: ops.aft_local(*a[:3], pu[:, : a[0].shape[1]], pv[:, : a[0].shape[1]], 4, **kw),
                  {"pos_u": pu, "pos_v": pv}, R),
        "conv": (4, lambda *a, **kw: ops.aft_conv(*a, kernel, **kw), {"kernel": kernel}, 0),
        "full": (None, lambda *a, **kw: ops.aft_full(*a[:3], pu[:, : a[0].shape[1]], pv[:, : a[0].shape[1]], **kw),
                 {"pos_u": pu, "pos_v": pv}, R),
    }[variant]  # fmt: skip
    with torch.no_grad():
        full_y, _ = parallel(q, k, v, causal=True, mask=mask)
        if prefill:
            head, state = parallel(
                q[:, :prefill], k[:, :prefill], v[:, :prefill], causal=True, mask=mask[:, :prefill], return_state=True
            )
        else:
            buffer = None if window == 0 else (0 if window is None else window - 1)
            state = ops.empty_state(B, H, Dk, Dv, buffer, rank=rank, dtype=dtype)
            head = full_y[:, :0]
        tail, _ = _step_all(q, k, v, mask, state, prefill, window=window, **step_kw)
    y = torch.cat([head, tail], 1)
    valid = mask.bool()
    torch.testing.assert_close(y[valid], full_y[valid], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_large_keys_stay_finite(dtype, causal):
    """Keys at +-60 (exp overflows fp16 at 11 and fp32 at 88): no inf or NaN, and fp32 still matches fp64."""
    mask = _mask()
    for name, parallel, bias, H, Dk, Dv in _cases(torch.float32):
        q, k, v = _inputs(H, Dk, Dv, torch.float32)
        k = (torch.sign(k) * 60).detach()
        k[:, ::3] = -60  # jumps of 120 between neighbours
        y = parallel(q.to(dtype), k.to(dtype), v.detach().to(dtype), mask, causal)
        assert torch.isfinite(y).all(), (name, dtype)
        if dtype == torch.float32:
            ref = ops.aft_reference(q.double(), k.double(), v.detach().double(), bias(causal) if bias(causal) is None
                                    else bias(causal).double(), causal=causal, mask=mask)  # fmt: skip
            torch.testing.assert_close(y[mask.bool()].double(), ref[mask.bool()], atol=1e-5, rtol=1e-5, msg=name)


def test_conv_kernel_starts_at_zero():
    """gamma = beta = 0 gives a zero kernel: a fresh AFT-conv layer is per-head AFT-simple."""
    kernel = ops.conv_kernel(torch.randn(4, 5), torch.zeros(4), torch.zeros(4))
    assert torch.equal(kernel, torch.zeros(4, 5))
    q, k, v = _inputs(4, 1, 3, torch.float64)
    y_conv = ops.aft_conv(q, k, v, kernel, causal=True)[0]
    y_simple = ops.aft_simple(q, k, v, causal=True)[0]
    torch.testing.assert_close(y_conv, y_simple, atol=1e-12, rtol=1e-12)
