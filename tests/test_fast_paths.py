"""Every fast path of the operator against its reference twin: outputs, gradients and final state.

The chunked causal form (`_causal_chunked`) against the exact log-space form (`_causal_reference`), the blocked
causal AFT-full (`_full_blocked`) against its tree (`_full_causal`), the banded matrix product against the loop
over the window, the guards that fall back on extreme inputs, and torch.compile of a training forward. Chunks
and blocks are made small so that a short sequence spans several of them.
"""

import pytest
import torch
from conftest import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

import aft.ops_aft as ops
from aft import AFTForCausalLM

B, T, R = 2, 29, 3


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(ops, "CHUNK", 8)  # T = 29: four chunks, the last one partial
    monkeypatch.setattr(ops, "FULL_BLOCK", 8)  # and four blocks of AFT-full


def _mask():
    mask = torch.ones(B, T)
    mask[1, :11] = 0  # left padding across a chunk boundary
    return mask


def _case(name, dtype, key_scale=3.0):
    """(leaves, band, left): inputs of the shared causal core for one variant. leaves = [k, v, *bias inputs], the
    tensors to differentiate; band(*bias inputs) builds the window bias from them."""
    H, Dk, Dv = (3, 1, 4) if name == "conv" else (1, 5, 5)
    k = (torch.randn(B, T, H, Dk, dtype=dtype) * key_scale).requires_grad_()
    v = torch.randn(B, T, H, Dv, dtype=dtype, requires_grad=True)
    if name == "simple":
        return [k, v], lambda: None, 0
    if name == "conv":
        kernel = torch.randn(H, 4, dtype=dtype, requires_grad=True)
        return [k, v, kernel], lambda kernel: kernel[None, None, :, None, :], 3
    window = int(name.removeprefix("local"))
    pu = torch.randn(1, T, R, dtype=dtype, requires_grad=True)
    pv = torch.randn(1, T, R, dtype=dtype, requires_grad=True)
    return [k, v, pu, pv], lambda pu, pv: ops.local_band(pu, pv, window - 1, 0), window - 1


VARIANT_CASES = ["simple", "local1", "local3", "local12", "conv"]


@pytest.mark.parametrize("name", VARIANT_CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_chunked_causal_equals_reference_twin(name, dtype, tol):
    """Outputs and gradients of every input on real rows (padding-only rows are exactly 0), against the exact
    twin in float64 on the same inputs."""
    mask = _mask()
    leaves, band, left = _case(name, dtype)
    k, v, *bias = leaves
    fast = ops._causal_chunked(ops._mask_keys(k, mask), v, band(*bias), left, mask)
    assert fast is not None, "the fast path must not fall back on ordinary keys"
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    k64, v64, *bias64 = leaves64
    ref = ops._causal_reference(ops._mask_keys(k64, mask), v64, band(*bias64), left)
    valid = mask.bool()
    torch.testing.assert_close(fast[valid].double(), ref[valid], atol=tol, rtol=tol)
    assert torch.equal(fast[~valid], torch.zeros_like(fast[~valid]))
    grad_out = torch.randn_like(ref) * valid[:, :, None, None]
    g_fast = torch.autograd.grad(fast, leaves, grad_out.to(dtype))
    g_ref = torch.autograd.grad(ref, leaves64, grad_out)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)


@pytest.mark.parametrize("variant", ["simple", "local", "conv"])
def test_final_state_equals_stepping(variant):
    """The state returned by the parallel form equals the state reached one token at a time with aft_step."""
    dtype = torch.float64
    mask = _mask()
    H, Dk, Dv = (3, 1, 4) if variant == "conv" else (1, 5, 5)
    q = torch.rand(B, T, H, Dv, dtype=dtype)
    k, v = torch.randn(B, T, H, Dk, dtype=dtype) * 3, torch.randn(B, T, H, Dv, dtype=dtype)
    pu, pv = torch.randn(1, T, R, dtype=dtype), torch.randn(1, T, R, dtype=dtype)
    kernel = torch.randn(H, 4, dtype=dtype)
    window, rank, step_kw = {"simple": (0, 0, {}), "local": (5, R, {}), "conv": (4, 0, {"kernel": kernel})}[variant]
    if variant == "simple":
        _, state = ops.aft_simple(q, k, v, causal=True, mask=mask, return_state=True)
    elif variant == "local":
        _, state = ops.aft_local(q, k, v, pu, pv, window, causal=True, mask=mask, return_state=True)
    else:
        _, state = ops.aft_conv(q, k, v, kernel, causal=True, mask=mask, return_state=True)
    stepped = ops.empty_state(B, H, Dk, Dv, None if window == 0 else window - 1, rank=rank, dtype=dtype)
    for t in range(T):
        extra = {"pos_u": pu[:, t], "pos_v": pv[:, t]} if variant == "local" else {}
        _, stepped = ops.aft_step(
            q[:, t], k[:, t], v[:, t], stepped, window=window, mask=mask[:, t], **step_kw, **extra
        )
    # Same pool, whatever the scaling: log-normaliser m + log z and mean n / z.
    torch.testing.assert_close(state.m + state.z.log(), stepped.m + stepped.z.log(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(state.n / state.z, stepped.n / stepped.z, atol=1e-10, rtol=1e-10)
    for name in ("k", "v", "pos"):
        a, b = getattr(state, name), getattr(stepped, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", VARIANT_CASES)
def test_chunked_causal_is_bitwise_causal(name):
    """Changing the key and value at one position leaves every earlier output unchanged, to the last bit."""
    (k, v, *bias), band, left = _case(name, torch.float32)
    with torch.no_grad():
        a = ops._causal_chunked(k, v, band(*bias), left)
        k2, v2 = k.clone(), v.clone()
        k2[:, 13] += 5.0
        v2[:, 13] -= 1.0
        b = ops._causal_chunked(k2, v2, band(*bias), left)
    assert torch.equal(a[:, :13], b[:, :13])
    assert not torch.equal(a[:, 13:], b[:, 13:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_key_jumps_fall_back_and_stay_exact(dtype):
    """Keys jumping between -60 and +60 inside a chunk: the fast path declines, the result stays finite and exact."""
    for name in VARIANT_CASES:
        (k, v, *bias), band, left = _case(name, torch.float32)
        k = (torch.sign(k) * 60).detach()
        k[:, ::3] = -60
        v = v.detach()
        with torch.no_grad():
            assert ops._causal_chunked(ops._mask_keys(k, None), v, band(*bias), left) is None, name
            y, _ = ops._windowed(k.to(dtype), v.to(dtype), band(*bias), left, 0, causal=True)
            ref, _ = ops._windowed(k.double(), v.double(), band(*(x.double() for x in bias)), left, 0, causal=True)
        assert torch.isfinite(y).all(), name
        if dtype == torch.float32:
            torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5, msg=name)


def _full_case(dtype, per_batch: bool, key_scale=3.0):
    """q, k, v (B, T, 1, D) and position factors (B|1, T, R), all leaves."""
    D = 5
    q = torch.rand(B, T, 1, D, dtype=dtype, requires_grad=True)
    k = (torch.randn(B, T, 1, D, dtype=dtype) * key_scale).requires_grad_()
    v = torch.randn(B, T, 1, D, dtype=dtype, requires_grad=True)
    pu = torch.randn(B if per_batch else 1, T, R, dtype=dtype, requires_grad=True)
    pv = torch.randn(B if per_batch else 1, T, R, dtype=dtype, requires_grad=True)
    return [q, k, v, pu, pv]


def _full_tree_twin(q, k, v, pu, pv, mask):
    """The tree over the whole sequence, with aft_full's conventions (masked keys NEG, padding-only rows 0)."""
    k = ops._mask_keys(k, mask)
    y = ops._full_tree(k, v.to(k.dtype), ops.full_bias(pu.to(k.dtype), pv.to(k.dtype)))
    if mask is not None:
        y = y * (mask.cumsum(1) > 0)[:, :, None, None]
    return q * y


@pytest.mark.parametrize("per_batch", [False, True], ids=["shared_w", "per_batch_w"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "left_padding"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_blocked_full_equals_tree_and_reference(per_batch, masked, dtype, tol):
    """Blocked causal AFT-full, its tree twin and the literal formula agree on outputs and on the gradients of q, k,
    v and both position factors, over several blocks (the last one partial), padding-only rows included (0)."""
    mask = _mask() if masked else None
    leaves = _full_case(dtype, per_batch)
    q, k, v, pu, pv = leaves
    assert ops._full_blocked(ops._mask_keys(k, mask), v, pu, pv) is not None, "ordinary inputs take the fast path"
    fast = ops.aft_full(q, k, v, pu, pv, causal=True, mask=mask)[0]
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    tree = _full_tree_twin(*leaves64, mask)
    ref = ops.aft_reference(*leaves64[:3], ops.full_bias(*leaves64[3:])[:, None], causal=True, mask=mask)
    torch.testing.assert_close(tree, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fast.double(), ref, atol=tol, rtol=tol)
    grad_out = torch.randn_like(ref)
    g_fast = torch.autograd.grad(fast, leaves, grad_out.to(dtype))
    g_tree = torch.autograd.grad(tree, leaves64, grad_out, retain_graph=True)
    g_ref = torch.autograd.grad(ref, leaves64, grad_out)
    for name, a, b, c in zip(["q", "k", "v", "pos_u", "pos_v"], g_fast, g_tree, g_ref, strict=True):
        torch.testing.assert_close(b, c, atol=1e-10, rtol=1e-10, msg=f"tree {name}")
        torch.testing.assert_close(a.double(), c, atol=tol, rtol=tol, msg=f"blocked {name}")


def test_blocked_full_falls_back_when_w_spreads_far(monkeypatch):
    """w = -100 t' (every row prefers the first key) with keys rising 4 per position: a block's references (row max
    of w, largest key so far) are both attained, but at different keys, so its denominator underflows in float32.
    The blocked form must decline and the tree (smaller blocks) give the exact result."""
    calls = []
    tree = ops._full_tree
    monkeypatch.setattr(ops, "_full_tree", lambda *a: calls.append(1) or tree(*a))
    D = 5
    q = torch.rand(B, T, 1, D)
    k = (4.0 * torch.arange(T)[None, :, None, None] + 0.1 * torch.randn(B, T, 1, D)).requires_grad_()
    v = torch.randn(B, T, 1, D, requires_grad=True)
    pu = torch.full((1, T, 1), 10.0)
    pv = (-10.0 * torch.arange(T, dtype=torch.float32))[None, :, None]
    with torch.no_grad():
        assert ops._full_blocked(k, v, pu, pv) is None
    y = ops.aft_full(q, k, v, pu, pv, causal=True)[0]
    assert calls == [1], "the fallback must run, once"
    k64, v64 = k.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    ref = ops.aft_reference(q.double(), k64, v64, ops.full_bias(pu.double(), pv.double())[:, None], causal=True)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(ref)
    g, g_ref = torch.autograd.grad(y, (k, v), grad_out.float()), torch.autograd.grad(ref, (k64, v64), grad_out)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_batch", [False, True], ids=["shared_w", "per_batch_w"])
def test_blocked_full_keys_at_60_stay_finite_and_exact(per_batch):
    """Keys at +-60 (jumps of 120; e^88 overflows float32) with each block opening on a +60 key, so the blocked form
    keeps them: finite, and equal to the float64 formula, with and without left padding."""
    for mask in (None, _mask()):
        q, k, v, pu, pv = (x.detach() for x in _full_case(torch.float32, per_batch))
        k = torch.sign(k) * 60
        k[:, ::3] = -60
        k[:, ::8] = 60  # the first key of every block of 8
        if mask is not None:
            k[1, 11] = 60  # the first real key after the padding
        with torch.no_grad():
            assert ops._full_blocked(ops._mask_keys(k, mask), v, pu, pv) is not None
            y = ops.aft_full(q, k, v, pu, pv, causal=True, mask=mask)[0]
        ref = ops.aft_reference(
            q.double(),
            k.double(),
            v.double(),
            ops.full_bias(pu.double(), pv.double())[:, None],
            causal=True,
            mask=mask,
        )
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_batch", [False, True], ids=["shared_w", "per_batch_w"])
@pytest.mark.parametrize("position", [13, 16])  # inside a block; a block's first row (its key sets the reference)
def test_blocked_full_is_bitwise_causal(per_batch, position):
    """Changing the key and value at one position leaves every earlier output of the blocked form unchanged, to the
    last bit."""
    q, k, v, pu, pv = (x.detach() for x in _full_case(torch.float32, per_batch))
    k2, v2 = k.clone(), v.clone()
    k2[:, position] += 5.0
    v2[:, position] -= 1.0
    a = ops._full_blocked(k, v, pu, pv)
    b = ops._full_blocked(k2, v2, pu, pv)
    assert torch.equal(a[:, :position], b[:, :position])
    assert not torch.equal(a[:, position:], b[:, position:])


@pytest.mark.parametrize("left,right", [(0, 0), (2, 0), (3, 3), (12, 5)])
def test_band_matmul_equals_window_loop(left, right):
    """The banded matrix product by chunks equals the loop over window entries, forward and backward."""
    W = left + right + 1
    coef = torch.randn(1, T, 1, 1, W, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, T, 2, 5, dtype=torch.float64, requires_grad=True)
    fast = ops._band_matmul(coef, x, left, right)
    loop = ops._band_sum(coef, ops._unfold(x, left, right, 0.0))
    torch.testing.assert_close(fast, loop, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, (coef, x), g), torch.autograd.grad(loop, (coef, x), g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_tensor(variant, length):
    D = 8
    H, Dk, Dv = (2, 1, 4) if variant == "conv" else (1, D, D)
    q, k, v = (
        torch.rand(1, length, H, Dv),
        torch.randn(1, length, H, Dk, requires_grad=True),
        torch.randn(1, length, H, Dv),
    )
    pu, pv = torch.randn(1, length, R), torch.randn(1, length, R)
    call = {
        "simple": lambda: ops.aft_simple(q, k, v, causal=True),
        "local": lambda: ops.aft_local(q, k, v, pu, pv, 4, causal=True),
        "conv": lambda: ops.aft_conv(q, k, v, torch.randn(H, 4), causal=True),
        "full": lambda: ops.aft_full(q, k, v, pu, pv, causal=True),
    }[variant]
    with _LargestTensor() as mode:
        y, _ = call()
        y.sum().backward()
    return mode.largest


@pytest.mark.parametrize("variant", ["simple", "local", "conv"])
def test_memory_is_linear_in_length(variant):
    """No tensor of the forward or backward grows faster than T (no T x T tensor)."""
    small, large = _largest_tensor(variant, 64), _largest_tensor(variant, 256)
    assert large <= 4.5 * small, (small, large)


def test_full_never_builds_batch_by_pairs_by_channels():
    """AFT-full keeps one T x T bias (shared by batch and channels), never T x T x D."""
    length = 64
    assert _largest_tensor("full", length) < length * length * 8


@pytest.mark.parametrize("variant", ["simple", "local", "conv", "full"])
def test_torch_compile_training_forward_matches_eager(variant):
    """torch.compile (dynamo + AOT autograd) of the training forward of a tiny model, sequence over several chunks:
    loss and every gradient match eager on CPU."""
    torch._dynamo.reset()
    model = AFTForCausalLM(tiny_config(variant, num_hidden_layers=1)).train()
    ids = torch.randint(1, 37, (2, 21))

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager_loss, eager_grads = loss_and_grads(model)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, backend="aot_eager"))
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert len(compiled_grads) == len(eager_grads)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_simple_carry_is_the_same_pool_one_level_up(monkeypatch, masked):
    """Chunks of 4 over 29 positions: the carry of the 8 chunks is itself chunked (2 chunks, then 1), float64
    outputs and gradients equal the exact twin, with and without left padding."""
    monkeypatch.setattr(ops, "CHUNK", 4)
    levels = []
    inner = ops._simple_chunked
    monkeypatch.setattr(ops, "_simple_chunked", lambda k, *a, **kw: levels.append(k.shape[1]) or inner(k, *a, **kw))
    mask = _mask() if masked else None
    (k, v), _, _ = _case("simple", torch.float64)
    fast = ops._causal_chunked(ops._mask_keys(k, mask), v, None, 0, mask)
    ref = ops._causal_reference(ops._mask_keys(k, mask), v, None, 0)
    assert levels == [29, 8, 2]
    valid = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(fast[valid], ref[valid], atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(ref) * valid[:, :, None, None]
    for a, b in zip(
        torch.autograd.grad(fast, (k, v), grad_out), torch.autograd.grad(ref, (k, v), grad_out), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_simple_carry_level_falls_back_alone(monkeypatch):
    """Keys flat inside each chunk but rising by 30 per chunk: the first level is representable, the levels of
    chunk totals above it are not (rises of 90 and 120 inside one of their chunks), so those levels take the
    log-space pool, and the result is still exact."""
    monkeypatch.setattr(ops, "CHUNK", 4)
    pools = []
    inner = ops._prefix_pool
    monkeypatch.setattr(ops, "_prefix_pool", lambda k, v: pools.append(k.shape[1]) or inner(k, v))
    k = (30.0 * (torch.arange(T) // 4)).double().view(1, T, 1, 1).expand(B, T, 1, 5).contiguous()
    v = torch.randn(B, T, 1, 5, dtype=torch.float64)
    fast = ops._causal_chunked(k, v, None, 0)
    assert fast is not None
    assert pools == [2, 8]  # the level of 2 totals declined, then the level of 8: each pooled in log space
    torch.testing.assert_close(fast, ops._causal_reference(k, v, None, 0), atol=1e-10, rtol=1e-10)
