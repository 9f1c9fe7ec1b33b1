"""The "triton" implementation of simple against the torch form, the kernel run by Triton's CPU interpreter.

Triton reads TRITON_INTERPRET when a kernel is wrapped, and ops_aft_triton wraps it at its first call in each mode,
so setting the variable in a test (the `interpreter` fixture) is enough, whatever was imported before.
"""

import warnings

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from conftest import tiny_config  # noqa: E402

import aft.ops_aft_triton as tri  # noqa: E402
from aft import AFTForCausalLM  # noqa: E402
from aft.ops_aft import get_operator  # noqa: E402
from aft.ops_aft_window import aft_simple_chunk  # noqa: E402


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


@pytest.mark.parametrize("key_per_head", [False, True])
def test_outputs_states_and_gradients_equal_the_torch_form(interpreter, key_per_head):
    (q, k, v), mask = inputs(Dk=1 if key_per_head else None)
    got, want = run(tri.aft_simple_triton, q, k, v, mask), run(aft_simple_chunk, q, k, v, mask)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)


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


def test_keys_at_plus_minus_60_stay_finite(interpreter):
    (q, k, v), mask = inputs(T=8)
    with torch.no_grad():
        k = torch.where(torch.arange(8)[None, :, None, None] % 2 == 0, 60.0, -60.0).expand_as(k) + k * 0.1
        y = tri.aft_simple_triton(q, k, v, mask=mask)[0]
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, aft_simple_chunk(q, k, v, mask=mask)[0], atol=1e-5, rtol=1e-5)


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
    with torch.no_grad(), pytest.warns(UserWarning, match="decoding step has no Triton kernel"):
        tokens = fast.eval().generate(ids, **kw)
    assert torch.equal(tokens, base.eval().generate(ids, **kw))
