"""generate() with the recurrent AFTCache returns exactly what full forward passes would."""

import pytest
import torch
from conftest import VARIANTS, tiny_config
from transformers.generation.streamers import BaseStreamer

from aft import AFTCache, AFTForCausalLM


def _model(variant, **overrides):
    # float64 keeps the cached and uncached paths far closer than any gap between two candidate tokens, while the
    # default initialisation keeps every input (positions, padding, beam order) able to change the choice.
    return AFTForCausalLM(tiny_config(variant, **overrides)).eval().double()


def _greedy(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_equals_no_cache_greedy(variant):
    model = _model(variant)
    ids = torch.randint(1, 37, (2, 7))
    with_cache = _greedy(model, ids, 32, use_cache=True)
    without = _greedy(model, ids, 32, use_cache=False)
    assert with_cache.shape == (2, 39)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_equals_each_prompt_alone(variant):
    model = _model(variant)
    prompts = [torch.randint(1, 37, (n,)) for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    batch = _greedy(model, ids, 12, attention_mask=mask)[:, width:]
    for i, p in enumerate(prompts):
        alone = _greedy(model, p[None], 12)[:, len(p) :]
        assert torch.equal(batch[i], alone[0]), f"prompt {i}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_search_cache_equals_no_cache(variant):
    model = _model(variant)
    ids = torch.randint(1, 37, (2, 5))
    kw = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_forward_equals_unpadded(variant):
    """Without generate() in between: positions follow the attention mask, padding contributes nothing."""
    model = _model(variant)
    ids = torch.randint(1, 37, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], dim=1).long()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], model(ids).logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_batch_operations(variant):
    """Reordering, repeating and selecting the cache's batch equal running the reordered batch from scratch."""
    model = _model(variant)
    ids, nxt = torch.randint(1, 37, (3, 7)), torch.randint(1, 37, (3, 1))

    def step(prompt, token, edit=None):
        with torch.no_grad():
            cache = model(prompt, use_cache=True).past_key_values
            if edit is not None:
                edit(cache)
            return model(token, past_key_values=cache).logits

    order = torch.tensor([2, 0, 1])
    torch.testing.assert_close(step(ids, nxt[order], lambda c: c.reorder_cache(order)), step(ids[order], nxt[order]))
    twice = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(
        step(ids, nxt[twice], lambda c: c.batch_repeat_interleave(2)), step(ids[twice], nxt[twice])
    )
    keep = torch.tensor([1, 2])
    torch.testing.assert_close(
        step(ids, nxt[keep], lambda c: c.batch_select_indices(keep)), step(ids[keep], nxt[keep])
    )


@pytest.mark.parametrize("variant", ["simple", "local"])
def test_sampling_cache_equals_no_cache(variant):
    model = _model(variant)
    ids = torch.randint(1, 37, (2, 5))
    kw = {"do_sample": True, "top_k": 10, "max_new_tokens": 12, "num_return_sequences": 3, "pad_token_id": 0}
    torch.manual_seed(1)
    a = model.generate(ids, use_cache=True, **kw)
    torch.manual_seed(1)
    b = model.generate(ids, use_cache=False, **kw)
    assert a.shape == (6, 17) and torch.equal(a, b)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generation_continues_from_returned_cache(variant):
    model = _model(variant)
    ids = torch.randint(1, 37, (1, 6))
    first = _greedy(model, ids, 5, return_dict_in_generate=True)
    assert isinstance(first.past_key_values, AFTCache)
    extra = torch.randint(1, 37, (1, 3))  # the user appends text, then continues from the cache
    prompt = torch.cat([first.sequences, extra], dim=1)
    continued = _greedy(model, prompt, 7, past_key_values=first.past_key_values)
    from_scratch = _greedy(model, prompt, 7)
    assert torch.equal(continued, from_scratch)


def test_streamer_receives_every_token():
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    model = _model("conv")
    ids = torch.randint(1, 37, (1, 4))
    streamer = Collect()
    out = _greedy(model, ids, 6, streamer=streamer)
    assert streamer.chunks[-1] is None
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[:-1]])
    assert torch.equal(streamed, out[0])


@pytest.mark.parametrize("variant", ["simple", "local", "conv"])
def test_cache_size_does_not_grow_with_context(variant):
    model = _model(variant, position_embedding_type="none" if variant != "local" else "absolute")
    sizes = []
    for length in (8, 80):
        with torch.no_grad():
            out = model(torch.randint(1, 37, (1, length)), use_cache=True)
        sizes.append(out.past_key_values.nbytes())
    assert sizes[0] == sizes[1] > 0


def test_full_cache_grows_linearly():
    model = _model("full")
    sizes = [model(torch.randint(1, 37, (1, n)), use_cache=True).past_key_values.nbytes() for n in (10, 20, 40)]
    assert sizes[2] - sizes[1] == 2 * (sizes[1] - sizes[0]) > 0


def test_generation_past_the_positions_fails_clearly():
    model = _model("local", max_position_embeddings=12)
    with pytest.raises(ValueError, match="reaches position 12.*max_position_embeddings=12"):
        _greedy(model, torch.randint(1, 37, (1, 8)), 10)
