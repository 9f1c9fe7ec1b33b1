"""The operator through its public names, for every variant of the table and every registered implementation.

Every parallel form against the literal formula, the fast forms (small chunks and blocks, so that a short sequence
spans several) against their exact twins in outputs and gradients, a parallel form continued from a state against
one pass over the whole sequence, the recurrent form against the parallel one, bitwise causality, extreme keys,
linear memory, and the registry (the backend seam).
"""

import pytest
import torch
from conftest import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

import aft.ops_aft as ops
import aft.ops_aft_chunked as ops_aft_chunked

VARIANTS = list(ops.AFT_VARIANTS)
B, T = 2, 29
F64 = torch.float64


def _mask(T=T, pad=11):
    mask = torch.ones(B, T)
    mask[1, :pad] = 0  # left padding across a chunk boundary
    return mask


class Case:
    """Random inputs of a variant at its tiny config: q, k, v and the variant's own tensors (the leaves), with
    `args(a, b)` the forms' variant arguments for positions a .. b - 1, built by the variant table."""

    def __init__(self, variant, dtype=F64, key_scale=3.0, T=T, **config):
        self.config = tiny_config(variant, **{"max_position_embeddings": 64, **config})
        self.variant = ops.AFT_VARIANTS[variant]
        H = self.config.num_heads if self.variant.key_per_head else 1
        D = self.config.hidden_size // H
        Dk = 1 if self.variant.key_per_head else D
        g = torch.Generator().manual_seed(0)
        self.q = torch.rand(B, T, H, D, generator=g, dtype=dtype)
        self.k = (torch.randn(B, T, H, Dk, generator=g, dtype=dtype) * key_scale).requires_grad_()
        self.v = torch.randn(B, T, H, D, generator=g, dtype=dtype, requires_grad=True)
        self.params = {
            name: torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
            for name, (shape, _) in self.variant.parameters(self.config, 1).items()
        }
        self.leaves = [self.k, self.v, *self.params.values()]

    def args(self, a=0, b=T):
        return self.variant.operator_args(self.params, torch.arange(a, b)[None], self.config, 1)

    def run(self, implementation="torch", a=0, b=T, mask=None, form="parallel", **kw):
        op = getattr(ops.get_operator(self.variant.name, implementation), form)
        m = None if mask is None else mask[:, a:b]
        return op(self.q[:, a:b], self.k[:, a:b], self.v[:, a:b], *self.args(a, b), mask=m, **kw)

    def detached(self, dtype):
        """The same inputs as new leaves in another dtype."""
        other = Case.__new__(Case)
        other.config, other.variant = self.config, self.variant
        other.q = self.q.detach().to(dtype)
        other.k, other.v = (x.detach().to(dtype).requires_grad_() for x in (self.k, self.v))
        other.params = {n: p.detach().to(dtype).requires_grad_() for n, p in self.params.items()}
        other.leaves = [other.k, other.v, *other.params.values()]
        return other


SMALL = {"chunk_size": 8}  # T = 29: four chunks, the last one partial
CASES = [("simple", {}), ("local", {"local_window_size": 1}), ("local", {"local_window_size": 3})]
CASES += [("local", {"local_window_size": 12}), ("conv", {"conv_kernel_size": 4}), ("full", {})]
IDS = ["simple", "local1", "local3", "local12", "conv4", "full"]


def _small(variant):
    return {"block_size": 8} if variant == "full" else SMALL


def _grads(y, leaves, grad_out):
    return torch.autograd.grad(y, leaves, grad_out.to(y.dtype), allow_unused=True)


@pytest.mark.parametrize("variant,config", CASES, ids=IDS)
@pytest.mark.parametrize("implementation", ["torch", "exact"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_parallel_forms_equal_the_literal_formula(variant, config, implementation, causal):
    """float64, left padding: outputs and the gradients of k, v and the variant's tensors, 1e-10."""
    case, mask = Case(variant, **config), _mask()
    kw = _small(variant) if implementation == "torch" else {}
    y, _ = case.run(implementation, mask=mask, causal=causal, **kw)
    ref, _ = case.run("naive", mask=mask, causal=causal)
    valid = mask.bool()
    torch.testing.assert_close(y[valid], ref[valid], atol=1e-10, rtol=1e-10)
    if causal:  # rows that have seen only padding are exactly 0
        assert torch.equal(y[~valid], torch.zeros_like(y[~valid]))
    grad_out = torch.randn_like(y) * valid[:, :, None, None]
    for a, b in zip(_grads(y, case.leaves, grad_out), _grads(ref, case.leaves, grad_out), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("variant,config", CASES, ids=IDS)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "left_padding"])
def test_fast_form_in_float32_equals_float64_twin(variant, config, masked):
    """The fast form in float32 against the exact twin in float64: outputs and gradients, 1e-5."""
    case, mask = Case(variant, dtype=torch.float32, **config), _mask() if masked else None
    y, _ = case.run("torch", mask=mask, **_small(variant))
    twin = case.detached(F64)
    ref, _ = twin.run("exact", mask=mask)
    valid = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(y[valid].double(), ref[valid], atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(ref) * valid[:, :, None, None]
    for a, b in zip(_grads(y, case.leaves, grad_out), _grads(ref, twin.leaves, grad_out), strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,config", CASES, ids=IDS)
@pytest.mark.parametrize("split", [0, 5, 16, T])
@pytest.mark.parametrize("implementation", ["torch", "exact", "naive"])
def test_continuing_from_a_state_equals_one_pass(variant, config, split, implementation):
    """Prefix in parallel -> state -> the rest in parallel from that state: the outputs of one pass over the whole
    sequence, and the same final state (pool and window) as the recurrent form."""
    case, mask = Case(variant, **config), _mask()
    kw = _small(variant) if implementation == "torch" else {}
    whole, _ = case.run(implementation, mask=mask, **kw)
    head, state = case.run(implementation, 0, split, mask=mask, output_final_state=True, **kw)
    tail, final = case.run(implementation, split, T, mask=mask, initial_state=state, output_final_state=True, **kw)
    valid = mask.bool()
    torch.testing.assert_close(torch.cat([head, tail], 1)[valid], whole[valid], atol=1e-10, rtol=1e-10)
    stepped, stepped_final = case.run(
        implementation, split, T, mask=mask, initial_state=state, output_final_state=True, form="recurrent"
    )
    torch.testing.assert_close(torch.cat([head, stepped], 1)[valid], whole[valid], atol=1e-10, rtol=1e-10)
    _assert_same_state(final, stepped_final)
    # and a state left by the recurrent form (its pool is not normalised) continues in parallel just as well
    mid = (split + T) // 2
    middle, state = case.run(implementation, split, mid, mask=mask, initial_state=state, output_final_state=True,
                             form="recurrent")  # fmt: skip
    rest, _ = case.run(implementation, mid, T, mask=mask, initial_state=state, **kw)
    torch.testing.assert_close(torch.cat([head, middle, rest], 1)[valid], whole[valid], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("variant,config", CASES, ids=IDS)
def test_every_form_reads_a_float32_state_in_the_inputs_dtype(variant, config):
    """float64 inputs continuing from a float32 state (a cache kept in float32): every form joins the state to the
    sequence the same way, so the literal formula and the fast form agree to float64 precision."""
    case, mask = Case(variant, **config), _mask()
    _, state = case.run("naive", 0, 16, mask=mask, output_final_state=True)
    state = type(state)(*(x.detach().float() for x in state))
    kw = _small(variant)
    fast, fast_final = case.run("torch", 16, T, mask=mask, initial_state=state, output_final_state=True, **kw)
    naive, naive_final = case.run("naive", 16, T, mask=mask, initial_state=state, output_final_state=True)
    torch.testing.assert_close(fast, naive, atol=1e-12, rtol=1e-12)
    _assert_same_state(fast_final, naive_final)


def _assert_same_state(a, b):
    """Same pool whatever its scaling (log-normaliser m + log z, mean n / z), same window slots; for AFT-full, the
    same positions."""
    if isinstance(a, ops.FullState):
        for x, y in zip((*ops.keys_and_values(a), a.pos), (*ops.keys_and_values(b), b.pos), strict=True):
            torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)
        return
    real = a.z > 0
    assert torch.equal(real, b.z > 0)
    log_a, log_b = a.m + torch.log(torch.where(real, a.z, 1)), b.m + torch.log(torch.where(real, b.z, 1))
    torch.testing.assert_close(log_a[real], log_b[real], atol=1e-10, rtol=1e-10)
    mean = lambda s: s.n / torch.where(s.z > 0, s.z, 1)  # noqa: E731
    torch.testing.assert_close(mean(a), mean(b), atol=1e-10, rtol=1e-10)
    for name in ("k", "v", "pos"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-12, rtol=0, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_states_have_the_documented_size(variant):
    """simple: no window slots; local/conv: s - 1; full: every position. Empty inputs leave a state as it was."""
    case = Case(variant)
    _, state = case.run(mask=_mask(), output_final_state=True)
    slots = {"simple": 0, "local": case.config.local_window_size - 1, "conv": case.config.conv_kernel_size - 1}
    positions = state.r.shape[1] if isinstance(state, ops.FullState) else state.k.shape[1]
    assert positions == slots.get(variant, T)
    y, again = case.run(a=T, b=T, initial_state=state, output_final_state=True)
    assert y.shape[1] == 0
    _assert_same_state(state, again)


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_batch_and_empty_sequence(variant):
    case = Case(variant)
    for form in ("parallel", "recurrent"):
        y, state = case.run(a=0, b=0, form=form, output_final_state=True)
        assert y.shape == (B, 0, *case.q.shape[2:]) and state is not None
    op = ops.get_operator(variant).parallel
    y, _ = op(case.q[:0], case.k[:0], case.v[:0], *case.args(), causal=True)
    assert y.shape == (0, T, *case.q.shape[2:])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("implementation", ["torch", "exact", "naive"])
@pytest.mark.parametrize("form", ["parallel", "recurrent"])
def test_inputs_of_another_shape_are_refused(variant, implementation, form):
    """v with another length than q and k, k of another length, a mask of another length: a clear error from every
    form, before any work."""
    case = Case(variant)
    op = getattr(ops.get_operator(variant, implementation), form)
    q, k, v, args = case.q, case.k.detach(), case.v.detach(), case.args()
    with pytest.raises(ValueError, match=r"`q` has shape \(2, 29, .*\) and `v` \(2, 30, .*\): they must be the same"):
        op(q, k, torch.cat([v, v[:, :1]], 1), *args)
    with pytest.raises(ValueError, match=r"`k` has shape \(2, 28, .*\); with `v` of shape \(2, 29"):
        op(q, k[:, 1:], v, *args)
    with pytest.raises(ValueError, match=r"`mask` has shape \(2, 28\); expected \(batch, time\) = \(2, 29\)"):
        op(q, k, v, *args, mask=torch.ones(2, 28))


def test_a_state_of_another_batch_is_refused():
    case = Case("local")
    _, state = case.run(b=5, output_final_state=True)
    op = ops.get_operator("local").parallel
    with pytest.raises(
        ValueError, match=r"initial_state.m has shape \(2, 1, 16\), but these inputs need \(1, 1, 16\)"
    ):
        op(case.q[:1, 5:], case.k[:1, 5:], case.v[:1, 5:], *case.args(5), initial_state=state)


@pytest.mark.parametrize("variant,config", [c for c in CASES if c[0] != "full"], ids=IDS[:-1])
@pytest.mark.parametrize("unit_elements", [64, 17 * 64], ids=["unit_per_chunk", "units_of_4_chunks"])
@pytest.mark.parametrize("key_scale", [3.0, 20.0], ids=["keys3", "keys20"])
def test_causal_units_equal_the_exact_twin(variant, config, unit_elements, key_scale, monkeypatch):
    """The causal fast forms work through the sequence in units that each scale keys by their own reference; with
    small units (a real model's sequence spans many), float64, left padding: outputs, gradients and the final
    state equal the exact twin's, 1e-10 (a pool carried into the next unit, and its gradient carried back)."""
    monkeypatch.setattr(ops_aft_chunked, "UNIT_ELEMENTS", unit_elements)
    case, mask = Case(variant, key_scale=key_scale, **config), _mask()
    y, state = case.run("torch", mask=mask, output_final_state=True, chunk_size=4)
    ref, ref_state = case.run("exact", mask=mask, output_final_state=True)
    valid = mask.bool()
    torch.testing.assert_close(y[valid], ref[valid], atol=1e-10, rtol=1e-10)
    _assert_same_state(state, ref_state)
    grad_out = torch.randn_like(y) * valid[:, :, None, None]
    for a, b in zip(_grads(y, case.leaves, grad_out), _grads(ref, case.leaves, grad_out), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("variant,config", CASES, ids=IDS)
@pytest.mark.parametrize("position", [13, 16])  # inside a chunk; a chunk's first row (its key sets a reference)
def test_fast_form_is_bitwise_causal(variant, config, position):
    """Changing the key and value at one position leaves every earlier output unchanged, to the last bit."""
    case = Case(variant, dtype=torch.float32, **config)
    with torch.no_grad():
        a, _ = case.run(**_small(variant))
        case.k[:, position] += 5.0
        case.v[:, position] -= 1.0
        b, _ = case.run(**_small(variant))
    assert torch.equal(a[:, :position], b[:, :position])
    assert not torch.equal(a[:, position:], b[:, position:])


NONFINITE = {"nan_key": ("k", float("nan")), "inf_key": ("k", float("inf"))}
NONFINITE |= {"nan_value": ("v", float("nan")), "inf_value": ("v", float("inf"))}


@pytest.mark.parametrize("variant,config", CASES, ids=IDS)
@pytest.mark.parametrize("implementation", ["torch", "exact", "naive"])
@pytest.mark.parametrize("form", ["parallel", "recurrent"])
@pytest.mark.parametrize("position", [13, 16])
@pytest.mark.parametrize("nonfinite", NONFINITE)
def test_a_nonfinite_input_changes_nothing_before_it(variant, config, implementation, form, position, nonfinite):
    """A NaN or +inf key, or a NaN or infinite value, at one position: every earlier output is what it was, to the
    last bit, also when the earlier part comes from a state; from that position on the output is not finite."""
    case, mask = Case(variant, dtype=torch.float32, **config), _mask()
    kw = _small(variant) if implementation == "torch" and form == "parallel" else {}
    with torch.no_grad():
        clean, _ = case.run(implementation, mask=mask, form=form, **kw)
        _, state = case.run(implementation, 0, 5, mask=mask, output_final_state=True, **kw)
        clean_tail, _ = case.run(implementation, 5, T, mask=mask, form=form, initial_state=state, **kw)
        name, value = NONFINITE[nonfinite]
        getattr(case, name)[:, position] = value
        y, _ = case.run(implementation, mask=mask, form=form, **kw)
        tail, _ = case.run(implementation, 5, T, mask=mask, form=form, initial_state=state, **kw)
    assert torch.equal(y[:, :position], clean[:, :position])
    assert torch.equal(tail[:, : position - 5], clean_tail[:, : position - 5])
    assert not torch.isfinite(y[:, position]).any()


@pytest.mark.parametrize("variant,config", CASES, ids=IDS)
@pytest.mark.parametrize("implementation", ["torch", "exact", "naive"])
@pytest.mark.parametrize("form", ["parallel", "recurrent"])
def test_a_minus_inf_key_is_a_position_of_weight_zero(variant, config, implementation, form):
    """A key of -inf (with any value, NaN included) counts as padding: the outputs and the final state of the
    sequence with that position masked out."""
    case = Case(variant, dtype=torch.float32, **config)
    mask = torch.ones(B, T)
    mask[:, 13] = 0
    mask[1, 0] = 0  # a row whose first key is -inf: it has seen nothing so far
    kw = _small(variant) if implementation == "torch" and form == "parallel" else {}
    with torch.no_grad():
        padded, padded_state = case.run(implementation, mask=mask, form=form, output_final_state=True, **kw)
        case.k[~mask.bool()] = float("-inf")
        case.v[~mask.bool()] = float("nan")
        y, state = case.run(implementation, form=form, output_final_state=True, **kw)
    torch.testing.assert_close(y, padded, atol=1e-6, rtol=1e-6)
    for a, b in zip(state, padded_state, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant,config", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_keys_at_60_stay_finite_and_exact(variant, config, dtype, causal):
    """Keys jumping between -60 and +60 (e^88 overflows float32, e^11 float16): the fast form declines what it
    cannot represent and hands it to its exact twin, so the result is finite in every dtype and, in float32,
    equal to the float64 formula."""
    case, mask = Case(variant, dtype=torch.float32, **config), _mask()
    with torch.no_grad():
        case.k.copy_(torch.sign(case.k) * 60)
        case.k[:, ::3] = -60
    low = case.detached(dtype)
    y, _ = low.run("torch", mask=mask, causal=causal, **_small(variant))
    assert torch.isfinite(y).all()
    if dtype == torch.float32:
        ref, _ = case.detached(F64).run("naive", mask=mask, causal=causal)
        torch.testing.assert_close(y[mask.bool()].double(), ref[mask.bool()], atol=1e-5, rtol=1e-5)


def test_simple_carry_levels_stay_exact():
    """Chunks of 4 over 29 positions: the carry of 8 chunk totals is itself chunked (2 chunks, then 1); with keys
    flat inside each chunk but rising 30 per chunk, the upper levels cannot be represented and pool in log space.
    Both stay exact, with and without left padding."""
    for rising in (False, True):
        case = Case("simple")
        if rising:
            with torch.no_grad():
                case.k.copy_(30.0 * (torch.arange(T) // 4).double()[None, :, None, None].expand_as(case.k))
        for mask in (None, _mask()):
            y, _ = case.run("torch", mask=mask, chunk_size=4)
            ref, _ = case.run("exact", mask=mask)
            valid = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
            torch.testing.assert_close(y[valid], ref[valid], atol=1e-10, rtol=1e-10)


def test_blocked_full_stays_exact_when_w_spreads_far():
    """w = -100 t' (every row prefers the first key) with keys rising 4 per position: a block's references (row max
    of w, largest key so far) are both attained, but at different keys, so its denominator underflows in float32.
    The blocked form must decline and the tree give the exact result."""
    case = Case("full", dtype=torch.float32, position_bias_rank=1)
    with torch.no_grad():
        case.k.copy_(4.0 * torch.arange(T)[None, :, None, None] + 0.1 * case.k)
        case.params["pos_u"].fill_(10.0)
        case.params["pos_v"].copy_(-10.0 * torch.arange(64, dtype=torch.float32)[:, None])
    y, _ = case.run("torch", block_size=8)
    twin = case.detached(F64)
    ref, _ = twin.run("naive")
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(ref)
    for a, b in zip(_grads(y, case.leaves[:2], grad_out), _grads(ref, twin.leaves[:2], grad_out), strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


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
    case = Case(variant, dtype=torch.float32, T=length, max_position_embeddings=length)
    with _LargestTensor() as mode:
        y, _ = case.run(b=length)
        y.sum().backward()
    return mode.largest


@pytest.mark.parametrize("variant", [v for v in VARIANTS if ops.AFT_VARIANTS[v].constant_state])
def test_memory_is_linear_in_length(variant):
    """No tensor of the forward or backward grows faster than T (no T x T tensor)."""
    small, large = _largest_tensor(variant, 64), _largest_tensor(variant, 256)
    assert large <= 4.5 * small, (small, large)


def test_full_never_builds_batch_by_pairs_by_channels():
    """AFT-full keeps one T x T bias (shared by batch and channels), never T x T x D."""
    assert _largest_tensor("full", 64) < 64 * 64 * 8


def test_conv_kernel_starts_at_zero():
    """gamma = beta = 0 gives a zero kernel: a fresh AFT-conv layer is per-head AFT-simple."""
    kernel = ops.conv_kernel(torch.randn(4, 5), torch.zeros(4), torch.zeros(4))
    assert torch.equal(kernel, torch.zeros(4, 5))
    case = Case("conv")
    y_conv, _ = ops.aft_conv_chunk(case.q, case.k, case.v, kernel.double())
    y_simple, _ = ops.aft_simple_chunk(case.q, case.k, case.v)
    torch.testing.assert_close(y_conv, y_simple, atol=1e-12, rtol=1e-12)


def test_registry_lists_and_refuses_clearly():
    assert {"torch", "exact", "naive"} <= set(ops.implementations("local"))
    with pytest.raises(ValueError, match=r"No AFT implementation 'triton' for variant 'full': registered ones are"):
        ops.get_operator("full", "triton")
    with pytest.raises(ValueError, match="Unknown AFT variant 'sparse'"):
        ops.register_operator("sparse", "torch", ops.get_operator("local"))


def test_full_decoding_keys_far_below_their_position_stay_finite():
    """AFT-full's decoding state scales each key by its own position's largest key: exact while the channels of a
    position lie within ~87 of each other (80 here), and finite beyond (120: that channel counts as 0)."""
    for spread, exact in ((80.0, True), (120.0, False)):
        case = Case("full", dtype=torch.float32)
        with torch.no_grad():
            case.k.copy_(case.k.clamp(-1, 1))
            case.k[..., 0] -= spread  # channel 0 lies `spread` below every position's largest key
        _, state = case.run(b=T - 1, output_final_state=True)
        y, _ = case.run(a=T - 1, initial_state=state, form="recurrent")
        assert torch.isfinite(y).all()
        if exact:
            ref, _ = case.detached(F64).run("naive")
            torch.testing.assert_close(y[:, 0].double(), ref[:, -1], atol=1e-5, rtol=1e-5)
