"""The "triton" implementation against the torch forms, the kernels run by Triton's CPU interpreter.

Triton's standard library (tl.max, tl.sum) is wrapped for the interpreter only if TRITON_INTERPRET is set when triton
is imported: conftest.py sets it before anything imports aft. ops_aft_triton reads the variable at each call (and
wraps its own kernels at their first call in each mode), so the `no_interpreter` fixture can turn it off.
"""

import warnings

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from conftest import tiny_config  # noqa: E402

import aft.ops_aft_triton as tri  # noqa: E402
from aft import AFTForCausalLM  # noqa: E402
from aft.ops_aft import get_operator  # noqa: E402
from aft.ops_aft_window import (  # noqa: E402
    aft_conv_chunk,
    aft_conv_recurrent,
    aft_local_chunk,
    aft_local_recurrent,
    aft_simple_chunk,
    aft_simple_recurrent,
)


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tri._WARNED.clear()
    yield
    tri._WARNED.clear()


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tri._WARNED.clear()
    yield
    tri._WARNED.clear()


def inputs(B=2, T=6, H=2, D=5, Dk=None, scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, T, H, D, generator=g)
    k = torch.randn(B, T, H, Dk or D, generator=g) * scale
    v = torch.randn(B, T, H, D, generator=g)
    mask = torch.ones(B, T)
    mask[0, :2] = 0  # left padding
    mask[-1, 3] = 0  # a hole (in the last sequence)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)], mask


def run(form, q, k, v, mask):
    """Prefill, then a continuation from its state; a loss over both outputs and the final state."""
    half = q.shape[1] // 2
    y1, s1 = form(q[:, :half], k[:, :half], v[:, :half], mask=mask[:, :half], output_final_state=True)
    y2, s2 = form(
        q[:, half:], k[:, half:], v[:, half:], mask=mask[:, half:], initial_state=s1, output_final_state=True
    )
    loss = (y1.float() ** 2).sum() + y2.float().sin().sum() + s2.n.sum() + s2.m.sum()
    return [y1, y2, *s2[:3], *torch.autograd.grad(loss, (q, k, v))]


@pytest.mark.parametrize(("key_per_head", "rows"), [(False, tri.ROWS), (True, tri.ROWS), (False, 2)])
def test_outputs_states_and_gradients_equal_the_torch_form(interpreter, monkeypatch, key_per_head, rows):
    """rows = 2: the forward's blocks of rows are shorter than the calls, so the pool is carried between them."""
    monkeypatch.setattr(tri, "ROWS", rows)
    (q, k, v), mask = inputs(Dk=1 if key_per_head else None)
    got, want = run(tri.aft_simple_triton, q, k, v, mask), run(aft_simple_chunk, q, k, v, mask)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("key_per_head", [False, True])
def test_the_backward_kernel_gives_the_torch_forms_gradients_of_inputs_and_states(
    interpreter, monkeypatch, key_per_head
):
    """Gradients of q, k, v and of a leaf initial state (one sequence's pool empty, so its first rows see only
    padding), through the outputs and the final state, by the kernels alone."""
    (q, k, v), mask = inputs(T=5, Dk=1 if key_per_head else None)
    with torch.no_grad():
        prefix_mask = torch.ones(2, 3)
        prefix_mask[0] = 0  # sequence 0's state is the empty pool
        _, state = aft_simple_chunk(q[:, :3] + 1, k[:, :3] - 1, v[:, :3], mask=prefix_mask, output_final_state=True)
    pool = [x.detach().clone().requires_grad_() for x in state[:3]]

    def grads(form):
        y, final = form(q, k, v, mask=mask, initial_state=state._replace(m=pool[0], n=pool[1], z=pool[2]),
                        output_final_state=True)  # fmt: skip
        loss = (y**2).sum() + (final.n * torch.arange(5.0)).sum() + final.m.sum() * 0.5
        return torch.autograd.grad(loss, (q, k, v, *pool))

    want = grads(aft_simple_chunk)

    def no_torch_form(*args, **kwargs):
        raise AssertionError("the torch form ran")

    monkeypatch.setattr(tri, "aft_simple_chunk", no_torch_form)
    for name, a, b in zip(("q", "k", "v", "m0", "n0", "z0"), grads(tri.aft_simple_triton), want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5, msg=name)


def test_the_kernel_runs_under_the_interpreter_and_says_nothing(interpreter, monkeypatch):
    (q, k, v), mask = inputs()
    want = aft_simple_chunk(q, k, v, mask=mask)[0]

    def no_torch_form(*args, **kwargs):
        raise AssertionError("the torch form ran")

    monkeypatch.setattr(tri, "aft_simple_chunk", no_torch_form)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            y, _ = tri.aft_simple_triton(q, k, v, mask=mask)
    torch.testing.assert_close(y, want)


def test_padding_does_not_advance_the_state(interpreter):
    (q, k, v), _ = inputs(B=1, T=4)
    with torch.no_grad():
        _, short = tri.aft_simple_triton(q[:, :3], k[:, :3], v[:, :3], output_final_state=True)
        y, padded = tri.aft_simple_triton(q, k, v, mask=torch.tensor([[1, 1, 1, 0]]), output_final_state=True)
        _, only_padding = tri.aft_simple_triton(q, k, v, mask=torch.zeros(1, 4), output_final_state=True)
    for a, b in zip(short[:3], padded[:3], strict=True):
        torch.testing.assert_close(a, b)
    assert torch.equal(only_padding.z, torch.zeros_like(only_padding.z)) and (only_padding.m < -1e29).all()
    assert torch.equal(tri.aft_simple_triton(q, k, v, mask=torch.zeros(1, 4))[0], torch.zeros_like(q))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_outputs_in_their_dtype(interpreter, dtype):
    (q, k, v), mask = inputs(dtype=dtype)
    with torch.no_grad():
        y, state = tri.aft_simple_triton(q, k, v, mask=mask, output_final_state=True)
        want, want_state = aft_simple_chunk(q, k, v, mask=mask, output_final_state=True)
    assert y.dtype == dtype and state.m.dtype == torch.float32
    torch.testing.assert_close(y, want, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(state.n, want_state.n, atol=1e-5, rtol=1e-5)
    for a, b in zip(*(torch.autograd.grad((form(q, k, v, mask=mask)[0].float() ** 2).sum(), (q, k, v))
                      for form in (tri.aft_simple_triton, aft_simple_chunk)), strict=True):  # fmt: skip
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_keys_at_plus_minus_60_stay_finite(interpreter):
    (q, k, v), mask = inputs(T=8)
    with torch.no_grad():
        k = torch.where(torch.arange(8)[None, :, None, None] % 2 == 0, 60.0, -60.0).expand_as(k) + k * 0.1
    k.requires_grad_()
    got, want = (form(q, k, v, mask=mask)[0] for form in (tri.aft_simple_triton, aft_simple_chunk))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(*(torch.autograd.grad(y.sin().sum(), (q, k, v)) for y in (got, want)), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_what_the_kernel_does_not_cover_runs_the_torch_form_with_one_warning(interpreter):
    (q, k, v), mask = inputs()
    with torch.no_grad():
        for call in (
            lambda: tri.aft_simple_triton(q, k, v, causal=False),
            lambda: tri.aft_simple_triton(q.double(), k.double(), v.double(), mask=mask),
        ):
            with pytest.warns(UserWarning, match="running the torch form instead") as caught:
                call(), call()
            assert len([w for w in caught if "triton" in str(w.message)]) == 1  # once, not per call
        torch.testing.assert_close(
            tri.aft_simple_triton(q, k, v, causal=False)[0], aft_simple_chunk(q, k, v, causal=False)[0]
        )


def test_cpu_tensors_without_the_interpreter_run_the_torch_form_and_say_so(no_interpreter):
    (q, k, v), mask = inputs()
    with pytest.warns(UserWarning, match="TRITON_INTERPRET=1"):
        y, _ = tri.aft_simple_triton(q, k, v, mask=mask)
    assert torch.equal(y, aft_simple_chunk(q, k, v, mask=mask)[0])


@pytest.mark.parametrize("variant", ["simple", "local", "conv"])
def test_without_the_interpreter_every_form_runs_the_torch_one_and_says_so(no_interpreter, variant):
    bind, _, Dk = binder(variant, 4, 2, 5)
    (q, k, v), mask = inputs(T=4, Dk=Dk)
    forms = [(getattr(tri, f"aft_{variant}_triton"), chunk_forms[variant]),
             (getattr(tri, f"aft_{variant}_triton_recurrent"), recurrent_forms[variant])]  # fmt: skip
    with torch.no_grad():
        for fast, torch_form in forms:
            tri._WARNED.clear()
            with pytest.warns(UserWarning, match="TRITON_INTERPRET=1"):
                y, state = bind(fast)(q, k, v, mask=mask, output_final_state=True)
            want, want_state = bind(torch_form)(q, k, v, mask=mask, output_final_state=True)
            assert torch.equal(y, want) and all(torch.equal(a, b) for a, b in zip(state, want_state, strict=True))


def test_a_model_trains_and_generates_like_the_torch_one(interpreter):
    assert get_operator("simple", "triton").parallel is tri.aft_simple_triton
    torch.manual_seed(0)
    base = AFTForCausalLM(tiny_config("simple", num_hidden_layers=1))
    fast = AFTForCausalLM(tiny_config("simple", num_hidden_layers=1, aft_implementation="triton"))
    fast.load_state_dict(base.state_dict())
    ids = torch.randint(1, 37, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    losses = [m(ids, attention_mask=mask, labels=ids) for m in (fast, base)]
    torch.testing.assert_close(losses[0].logits, losses[1].logits, atol=1e-5, rtol=1e-5)
    for out in losses:
        out.loss.backward()
    for (name, p), b in zip(fast.named_parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(p.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    kw = {"attention_mask": mask, "max_new_tokens": 3, "do_sample": False}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # prefill and decoding both by kernels
        tokens = fast.eval().generate(ids, **kw)
    assert torch.equal(tokens, base.eval().generate(ids, **kw))


def binder(variant, T, H, D, seed=0):
    """bind(form) -> form(q, k, v, at=0, **kw) with the variant's tensors for positions at .. at + len(q) - 1 (a
    window of 3 for local, a kernel of 4 for conv), the tensors (requiring grad), and the key width."""
    g = torch.Generator().manual_seed(seed)
    if variant == "simple":
        return (lambda form: lambda q, k, v, at=0, **kw: form(q, k, v, **kw)), (), D
    if variant == "local":
        pos_u, pos_v = (torch.randn(1, T, 3, generator=g).requires_grad_() for _ in range(2))

        def bind(form):
            def call(q, k, v, at=0, **kw):
                return form(q, k, v, pos_u[:, at : at + q.shape[1]], pos_v[:, at : at + q.shape[1]], 3, **kw)

            return call

        return bind, (pos_u, pos_v), D
    kernel = torch.randn(H, 4, generator=g).requires_grad_()
    return (lambda form: lambda q, k, v, at=0, **kw: form(q, k, v, kernel, **kw)), (kernel,), 1


def step_forms(variant, T, H, D, seed=0):
    """(the Triton step, the torch recurrent form, the torch prefill form) of a variant, bound, and the key width."""
    bind, _, Dk = binder(variant, T, H, D, seed)
    forms = [getattr(tri, f"aft_{variant}_triton_recurrent"), recurrent_forms[variant], chunk_forms[variant]]
    return (*(bind(f) for f in forms), Dk)


recurrent_forms = {"simple": aft_simple_recurrent, "local": aft_local_recurrent, "conv": aft_conv_recurrent}
chunk_forms = {"simple": aft_simple_chunk, "local": aft_local_chunk, "conv": aft_conv_chunk}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["simple", "local", "conv"])
def test_the_decoding_step_equals_the_torch_recurrent_form(interpreter, monkeypatch, variant, dtype):
    """A prefill's state, then steps one token at a time (some padded) and a call of three tokens: every output
    and every state equal the torch recurrent form's, by the kernel alone."""
    B, T, H, D = 2, 9, 2, 5
    step, torch_step, prefill, Dk = step_forms(variant, T, H, D)
    (q, k, v), mask = inputs(B=B, T=T, H=H, D=D, Dk=Dk, dtype=dtype)
    mask[1, 5] = 0  # a padded decoding step
    mask[0, :4] = 0  # a row that has seen only padding when decoding starts
    with torch.no_grad():
        _, state = prefill(q[:, :3], k[:, :3], v[:, :3], mask=mask[:, :3], output_final_state=True)
        mine = theirs = state
        monkeypatch.setattr(tri, f"aft_{variant}_recurrent", None)  # the torch form would fail if it ran
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for t, n in ((3, 1), (4, 1), (5, 1), (6, 3)):
                piece = [x[:, t : t + n] for x in (q, k, v)]
                y, mine = step(*piece, at=t, mask=mask[:, t : t + n], initial_state=mine, output_final_state=True)
                want, theirs = torch_step(
                    *piece, at=t, mask=mask[:, t : t + n], initial_state=theirs, output_final_state=True
                )
                assert y.dtype == dtype and mine.m.dtype == torch.float32
                tol = {"atol": 1e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else {"atol": 1e-6, "rtol": 1e-5}
                torch.testing.assert_close(y, want, **tol)
                for a, b in zip(mine, theirs, strict=True):
                    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert torch.equal(step(q[:, 3:4], k[:, 3:4], v[:, 3:4], at=3, mask=mask[:, 3:4], initial_state=state)[0][0],
                           torch.zeros_like(q[0, 3:4]))  # fmt: skip


def test_the_decoding_step_from_no_state_and_without_the_kernel(interpreter):
    """No initial state is the empty one; gradients, float64 and causal=False are the torch form's (the first two
    said once each)."""
    (q, k, v), mask = inputs(T=4)
    with torch.no_grad():
        y, state = tri.aft_simple_triton_recurrent(q, k, v, mask=mask, output_final_state=True)
        want, want_state = aft_simple_recurrent(q, k, v, mask=mask, output_final_state=True)
    torch.testing.assert_close(y, want)
    for a, b in zip(state, want_state, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.warns(UserWarning, match="no backward") as caught:
        y, _ = tri.aft_simple_triton_recurrent(q, k, v, mask=mask)
        tri.aft_simple_triton_recurrent(q, k, v, mask=mask)
    assert len(caught) == 1 and y.requires_grad
    with pytest.warns(UserWarning, match="float64"):
        tri.aft_simple_triton_recurrent(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="causal"):
        tri.aft_simple_triton_recurrent(q, k, v, causal=False)


def test_a_state_of_another_window_is_refused(interpreter):
    step, _, _, _ = step_forms("local", 4, 2, 5)
    (q, k, v), _ = inputs(T=4)
    _, state = aft_simple_chunk(q, k, v, output_final_state=True)  # no window slots
    with torch.no_grad(), pytest.raises(ValueError, match="window slots"):
        step(q, k, v, initial_state=state)


@pytest.mark.parametrize("variant", ["local", "conv"])
def test_local_and_conv_forwards_equal_the_torch_forms(interpreter, monkeypatch, variant):
    """A prefill and a continuation from its state, with padding: outputs and final states by the window kernel
    alone (the torch form replaced by a function that fails), then gradients of q, k, v and the variant's tensors
    through both calls and the final state (the torch form's, recomputed in backward)."""
    bind, params, Dk = binder(variant, 8, 2, 5)
    (q, k, v), mask = inputs(B=2, T=8, H=2, D=5, Dk=Dk)
    mask[0, :5] = 0  # a sequence that has seen only padding when the continuation starts

    def run(form):
        y1, s1 = form(q[:, :5], k[:, :5], v[:, :5], mask=mask[:, :5], output_final_state=True)
        y2, s2 = form(q[:, 5:], k[:, 5:], v[:, 5:], at=5, mask=mask[:, 5:], initial_state=s1, output_final_state=True)
        loss = (y1**2).sum() + y2.sin().sum() + s2.m.sum() + (s2.n * torch.arange(5.0)).sum() + s2.v.sum()
        return [y1, y2, *s2], loss

    want, loss = run(bind(chunk_forms[variant]))
    want_grads = torch.autograd.grad(loss, (q, k, v, *params))
    fast = bind(getattr(tri, f"aft_{variant}_triton"))
    with torch.no_grad(), monkeypatch.context() as patch, warnings.catch_warnings():
        patch.setattr(tri, f"aft_{variant}_chunk", None)  # the torch form would fail if it ran
        warnings.simplefilter("error")
        got, _ = run(fast)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)
    got, loss = run(fast)
    for a, b in zip(torch.autograd.grad(loss, (q, k, v, *params)), want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)


def test_what_the_window_kernel_does_not_cover_runs_the_torch_form(interpreter):
    bind, _, _ = binder("local", 6, 2, 5)
    (q, k, v), mask = inputs()
    with torch.no_grad(), pytest.warns(UserWarning, match="causal only"):
        y, _ = bind(tri.aft_local_triton)(q, k, v, causal=False, mask=mask)
    assert torch.equal(y, bind(aft_local_chunk)(q, k, v, causal=False, mask=mask)[0])
    with pytest.raises(ValueError, match="`pos_u` has shape"):
        tri.aft_local_triton(q, k, v, torch.zeros(1, 5, 3), torch.zeros(1, 5, 3), 3)


@pytest.mark.parametrize("variant", ["local", "conv"])
def test_local_and_conv_models_train_and_decode_like_the_torch_ones(interpreter, variant):
    torch.manual_seed(0)
    base = AFTForCausalLM(tiny_config(variant, num_hidden_layers=1, num_heads=2))
    with torch.no_grad():  # a nonzero conv kernel
        for name, p in base.named_parameters():
            if "conv_gamma" in name or "conv_beta" in name:
                p.normal_()
    fast = AFTForCausalLM(tiny_config(variant, num_hidden_layers=1, num_heads=2, aft_implementation="triton"))
    fast.load_state_dict(base.state_dict())
    operator = get_operator(variant, "triton")
    assert (operator.parallel, operator.recurrent) == (
        getattr(tri, f"aft_{variant}_triton"), getattr(tri, f"aft_{variant}_triton_recurrent"))  # fmt: skip
    ids = torch.randint(1, 37, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prefill and decoding both by kernels
        outs = [m(ids, attention_mask=mask, labels=ids) for m in (fast, base)]
        torch.testing.assert_close(outs[0].logits, outs[1].logits, atol=1e-5, rtol=1e-5)
        for out in outs:
            out.loss.backward()
        for (name, p), b in zip(fast.named_parameters(), base.parameters(), strict=True):
            torch.testing.assert_close(p.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
        kw = {"attention_mask": mask, "max_new_tokens": 3, "do_sample": False, "output_logits": True,
              "return_dict_in_generate": True}  # fmt: skip
        with torch.no_grad():
            got = fast.eval().generate(ids, **kw)
    want = base.eval().generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
