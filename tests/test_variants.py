"""The variant table and the implementation registry are the only places a variant or a backend is added: a new
entry is validated by the config, built and initialised by the model, decoded by the cache, and dispatched
explicitly (parallel form for prefill and continuation, recurrent form for one token)."""

import pytest
import torch
from conftest import tiny_config
from huggingface_hub.errors import StrictDataclassClassValidationError

import aft.ops_aft as ops
from aft import AFTConfig, AFTForCausalLM
from aft.modeling_aft import CACHE_NAME


def _offset_parallel(q, k, v, offset, **kw):
    return ops.aft_simple_chunk(q, k + offset.view(1, 1, *k.shape[2:]), v, **kw)


def _offset_recurrent(q, k, v, offset, **kw):
    return ops.aft_simple_recurrent(q, k + offset.view(1, 1, *k.shape[2:]), v, **kw)


# The README's contributor example: AFT-simple with a learned offset per key channel.
OFFSET = ops.AFTVariant(
    name="offset",
    summary="AFT-simple with a learned offset per key channel",
    decoding_state="O(d): constant",
    constant_state=True,
    key_per_head=False,
    position_bias=False,
    window_field=None,
    parameters=lambda config, ndim: {"key_offset": ((config.hidden_size,), ops.INIT_ZEROS)},
    operator_args=lambda params, positions, config, ndim: (params["key_offset"],),
    checks=lambda config: [(config.hidden_size <= 4096, "hidden_size", "the offset variant is for <= 4096")],
)


@pytest.fixture
def offset_variant():
    ops.AFT_VARIANTS["offset"] = OFFSET
    ops.register_operator("offset", "torch", ops.AFTOperator(_offset_parallel, _offset_recurrent, None))
    yield
    del ops.AFT_VARIANTS["offset"]
    ops._OPERATORS.pop(("offset", "torch"))


def test_a_new_variant_is_one_entry_and_one_registration(offset_variant):
    config = tiny_config("offset")
    model = AFTForCausalLM(config).eval().double()
    mixer = model.model.layers[0].mixer
    assert torch.equal(mixer.key_offset, torch.zeros(16))  # built and initialised from the table
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mixer.key_offset.normal_()
    ids = torch.randint(1, 37, (2, 6))
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert mixer.key_offset.grad.abs().sum() > 0
    with pytest.raises(StrictDataclassClassValidationError, match=r"hidden_size=5000 is not allowed: the offset"):
        tiny_config("offset", hidden_size=5000, intermediate_size=8)


def test_the_model_dispatches_parallel_and_recurrent_forms_explicitly():
    """A registered implementation (here a spy over "torch") is what the model runs: the parallel form for the
    prefill and for a several-token continuation, the recurrent form for one token on a cache."""
    calls = []
    torch_local = ops.get_operator("local")

    def spy(name, fn):
        return lambda q, *a, **kw: calls.append((name, q.shape[1])) or fn(q, *a, **kw)

    ops.register_operator(
        "local",
        "spy",
        ops.AFTOperator(spy("parallel", torch_local.parallel), spy("recurrent", torch_local.recurrent), None),
    )
    try:
        model = AFTForCausalLM(tiny_config("local", num_hidden_layers=1, aft_implementation="spy")).eval()
        reference = AFTForCausalLM(tiny_config("local", num_hidden_layers=1)).eval()
        reference.load_state_dict(model.state_dict())
        ids = torch.randint(1, 37, (1, 9))
        with torch.no_grad():
            cache = getattr(model(ids[:, :5]), CACHE_NAME)
            model(ids[:, 5:8], **{CACHE_NAME: cache})
            spied = model(ids[:, 8:], **{CACHE_NAME: cache}).logits
            expected = reference(ids).logits[:, -1:]
        assert calls == [("parallel", 5), ("parallel", 3), ("recurrent", 1)]
        torch.testing.assert_close(spied, expected)
    finally:
        ops._OPERATORS.pop(("local", "spy"))


def test_an_unregistered_implementation_is_refused_by_the_config():
    with pytest.raises(StrictDataclassClassValidationError, match=r"aft_implementation='triton' is not allowed"):
        AFTConfig(aft_variant="full", aft_implementation="triton")


@pytest.mark.parametrize("implementation", ["exact", "naive"])
def test_every_registered_implementation_runs_the_model_alike(implementation):
    """The twins of the default implementation give the same model outputs (float64)."""
    for variant in ops.AFT_VARIANTS:
        base = AFTForCausalLM(tiny_config(variant)).eval().double()
        other = AFTForCausalLM(tiny_config(variant, aft_implementation=implementation)).eval().double()
        other.load_state_dict(base.state_dict())
        ids = torch.randint(1, 37, (2, 11))
        with torch.no_grad():
            torch.testing.assert_close(other(ids).logits, base(ids).logits, atol=1e-10, rtol=1e-10)
