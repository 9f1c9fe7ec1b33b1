"""torch.compile: the training forward, the decoding step with fullgraph=True and one graph for every token, and
generate() with a compiled decoding step. The "eager" and "aot_eager" backends keep it fast on CPU; the benchmark
measures inductor."""

import pytest
import torch
from conftest import VARIANTS, tiny_config
from transformers import CompileConfig

from aft import AFTCache, AFTForCausalLM
from aft.modeling_aft import CACHE_NAME


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


def _cache(model):
    """A cache of fixed shapes: every variant's but full's is; full's gets a fixed number of slots."""
    return AFTCache(model.config, max_cache_len=48 if model.config.aft_variant == "full" else None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_forward_compiles_and_matches_eager(variant):
    """dynamo + AOT autograd over a sequence of several chunks: loss and every gradient match eager."""
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


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoding_step_is_one_full_graph(variant):
    """After an eager prefill, the one-token step compiles with fullgraph=True (no graph break: no host value is
    read on the hot path), is traced once for every later token (the cache keeps its shapes and addresses), and
    gives the eager logits."""
    model = AFTForCausalLM(tiny_config(variant)).eval()
    ids = torch.randint(1, 37, (2, 7))
    step = torch.compile(model, fullgraph=True, backend="eager")
    ones = torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad():
        caches = [getattr(model(ids, **{CACHE_NAME: _cache(model)}), CACHE_NAME) for _ in range(2)]
        token, position = ids[:, -1:].clone(), torch.full((2, 1), 7)
        for t in range(5):
            kw = {"position_ids": position + t, "attention_mask": ones}
            compiled = step(token, **kw, **{CACHE_NAME: caches[0]}).logits
            eager = model(token, **kw, **{CACHE_NAME: caches[1]}).logits
            torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
            token = eager[:, -1:].argmax(-1)
            torch._dynamo.config.error_on_recompile = True  # every later token: the same graph
    assert caches[0].get_seq_length() == caches[1].get_seq_length() == 12


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_a_compiled_decoding_step(variant):
    """generate() compiles the decoding step when its cache has fixed shapes (a cache passed in; on CPU only when
    asked to): the same tokens as eager generation, left padding included."""
    model = AFTForCausalLM(tiny_config(variant)).eval().double()
    ids = torch.randint(1, 37, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    kw = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    eager = model.generate(ids, **kw)
    config = CompileConfig(fullgraph=True, backend="eager")
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told so
    compiled = model.generate(ids, compile_config=config, **kw, **{CACHE_NAME: _cache(model)})
    assert torch.equal(compiled, eager)
    assert model._compiled_call is not None  # the compiled call was made, not skipped
