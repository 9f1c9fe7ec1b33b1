"""generate() with the recurrent AFTCache returns exactly what full forward passes would."""

import itertools
import re

import pytest
import torch
from conftest import VARIANTS, tiny_config
from transformers.generation.streamers import BaseStreamer

from aft import AFTCache, AFTForCausalLM
from aft.modeling_aft import CACHE_NAME


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
            cache = getattr(model(prompt, use_cache=True), CACHE_NAME)
            if edit is not None:
                edit(cache)
            return model(token, **{CACHE_NAME: cache}).logits

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
    assert isinstance(getattr(first, CACHE_NAME), AFTCache)
    extra = torch.randint(1, 37, (1, 3))  # the user appends text, then continues from the cache
    prompt = torch.cat([first.sequences, extra], dim=1)
    continued = _greedy(model, prompt, 7, **{CACHE_NAME: getattr(first, CACHE_NAME)})
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
        sizes.append(getattr(out, CACHE_NAME).nbytes())
    assert sizes[0] == sizes[1] > 0


def test_full_cache_grows_linearly():
    model = _model("full")
    sizes = [getattr(model(torch.randint(1, 37, (1, n)), use_cache=True), CACHE_NAME).nbytes() for n in (10, 20, 40)]
    assert sizes[2] - sizes[1] == 2 * (sizes[1] - sizes[0]) > 0


@pytest.mark.parametrize("variant", ["local", "full", "simple"])
def test_generation_past_the_positions_fails_before_the_first_step(variant):
    """max_new_tokens (or max_length) past max_position_embeddings is refused before any forward pass (the tokens
    would otherwise be generated and then lost); positions count the real tokens of a row, so a left-padded prompt
    that fits with its new tokens is generated to the last position."""
    model = _model(variant, max_position_embeddings=12, position_embedding_type="absolute")
    calls = []
    model.model.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.randint(1, 37, (2, 8))
    with pytest.raises(ValueError, match=r"takes 8 positions and max_new_tokens=5 more would reach position 12, but "
                       r"this model has max_position_embeddings=12 .*pass max_new_tokens <= 4"):  # fmt: skip
        _greedy(model, ids, 5)
    with pytest.raises(ValueError, match="max_new_tokens=6 more would reach position 13"):
        model.generate(ids, max_length=14, do_sample=False, pad_token_id=0)
    assert not calls
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[:, :2] = 0
    assert _greedy(model, ids, 6, attention_mask=mask).shape == (2, 14)
    assert _greedy(model, ids, 4).shape == (2, 12)


def test_an_empty_prompt_is_refused_clearly():
    model = _model("simple")
    with pytest.raises(ValueError, match=r"`input_ids` has shape \(2, 0\): a prompt needs at least one token"):
        _greedy(model, torch.zeros(2, 0, dtype=torch.long), 3)


def _padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_multi_token_continuation_equals_one_forward(variant):
    """The next turn on a filled cache (several tokens, left-padded batch) gives the logits of one forward pass over
    the whole sequence, and the cache it leaves decodes on like the full forward."""
    model = _model(variant)
    ids, mask = _padded([torch.randint(1, 37, (n,)) for n in (9, 4)])
    more = torch.randint(1, 37, (2, 6))
    whole, whole_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        expected = model(whole, attention_mask=whole_mask).logits
        cache = getattr(model(ids, attention_mask=mask), CACHE_NAME)
        turn = model(more, attention_mask=whole_mask, **{CACHE_NAME: cache}).logits
        nxt = torch.randint(1, 37, (2, 1))
        step = model(nxt, attention_mask=torch.cat([whole_mask, torch.ones(2, 1, dtype=torch.long)], 1),
                     **{CACHE_NAME: cache}).logits  # fmt: skip
        full_step = model(
            torch.cat([whole, nxt], 1), attention_mask=torch.cat([whole_mask, torch.ones(2, 1)], 1)
        ).logits
    torch.testing.assert_close(turn, expected[:, -6:], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(step[:, -1], full_step[:, -1], atol=1e-10, rtol=1e-10)
    assert cache.get_seq_length() == whole.shape[1] + 1


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("padding", ["left", "inside"])
def test_forward_on_a_cache_follows_the_mask(variant, padding):
    """Chunks, then token by token, then several tokens on the filled cache, with the mask so far: padding never
    advances a row's positions, so the real tokens get the logits of one forward pass over the whole sequence. Left
    padding fills row 1's first chunk; padding inside fills a whole chunk of row 0 and one token step of row 1."""
    model = _model(variant)
    ids = torch.randint(1, 37, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    if padding == "left":
        mask[1, :5] = 0
    else:
        mask[0, 4:8] = 0
        mask[1, 9] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        cache, pieces = AFTCache(model.config), []
        for a, b in itertools.pairwise([0, 4, 8, 9, 10, 11, 14]):
            pieces.append(model(ids[:, a:b], attention_mask=mask[:, :b], **{CACHE_NAME: cache}).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[real], expected[real], atol=1e-10, rtol=1e-10)
    assert cache.next_position.tolist() == mask.sum(1).tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_padding_inside_the_prompt_equals_no_cache(variant):
    model = _model(variant)
    ids = torch.randint(1, 37, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 3:5] = 0
    mask[1, :2] = 0
    mask[1, 6] = 0
    with_cache = _greedy(model, ids, 10, attention_mask=mask)
    assert torch.equal(with_cache, _greedy(model, ids, 10, attention_mask=mask, use_cache=False))


@pytest.mark.parametrize("variant", VARIANTS)
def test_use_cache_false_reads_the_cache_as_context_and_leaves_it(variant):
    model = _model(variant)
    ids, more = torch.randint(1, 37, (2, 7)), torch.randint(1, 37, (2, 3))
    with torch.no_grad():
        cache = getattr(model(ids), CACHE_NAME)
        before = (cache.get_seq_length(), cache.nbytes())
        out = model(more, use_cache=False, **{CACHE_NAME: cache})
        expected = model(torch.cat([ids, more], 1)).logits[:, -3:]
        again = model(more, **{CACHE_NAME: cache}).logits  # the cache was not advanced by the first call
    assert getattr(out, CACHE_NAME) is None
    torch.testing.assert_close(out.logits, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(again, expected, atol=1e-10, rtol=1e-10)
    assert before[0] == 7 and cache.get_seq_length() == 10


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_cache_of_another_batch_is_refused(variant):
    model = _model(variant)
    with torch.no_grad():
        cache = getattr(model(torch.randint(1, 37, (3, 5))), CACHE_NAME)
        for batch in (1, 4):
            with pytest.raises(ValueError, match=f"a batch of 3, but the input has a batch of {batch}"):
                model(torch.randint(1, 37, (batch, 1)), **{CACHE_NAME: cache})


OTHER_MODELS = [
    ("simple", {"num_hidden_layers": 3}, "its num_hidden_layers=3, this model's 2"),
    ("simple", {"aft_variant": "local"}, "its aft_variant='local', this model's 'simple'"),
    ("local", {"aft_variant": "simple"}, "its aft_variant='simple', this model's 'local'"),
    ("local", {"hidden_size": 32}, "its hidden_size=32, this model's 16"),
    ("local", {"local_window_size": 5}, "its local_window_size=5, this model's 3"),
    ("local", {"position_bias_rank": 2}, "its position_bias_rank=2, this model's 4"),
    ("conv", {"num_heads": 2}, "its num_heads=2, this model's 4"),
    ("conv", {"conv_kernel_size": 5}, "its conv_kernel_size=5, this model's 3"),
    ("conv", {"aft_variant": "full"}, "its aft_variant='full', this model's 'conv'"),
    ("full", {"num_hidden_layers": 1}, "its num_hidden_layers=1, this model's 2"),
    ("full", {"position_bias_rank": 2}, "its position_bias_rank=2, this model's 4"),
]


@pytest.mark.parametrize("variant,other,match", OTHER_MODELS)
@pytest.mark.parametrize("filled", [False, True], ids=["new_cache", "filled_cache"])
def test_a_cache_of_another_model_is_refused(variant, other, match, filled):
    """A cache made for (or filled by) a model whose state differs in layers, variant, width, heads or window is
    refused with one error naming what differs, by forward and by generate(); nothing is written to it."""
    model, donor = _model(variant), _model(other.get("aft_variant", variant), **other)
    ids = torch.randint(1, 37, (2, 5))
    with torch.no_grad():
        cache = getattr(donor(ids), CACHE_NAME) if filled else AFTCache(donor.config)
        seen = cache.get_seq_length()
        with pytest.raises(ValueError, match="The cache was made for another model: " + re.escape(match)):
            model(ids, **{CACHE_NAME: cache})
        with pytest.raises(ValueError, match=re.escape(match)):
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, **{CACHE_NAME: cache})
    assert cache.get_seq_length() == seen


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_inputs_give_empty_results(variant):
    model = _model(variant)
    with torch.no_grad():
        empty = model(torch.zeros(2, 0, dtype=torch.long))
        assert empty.logits.shape == (2, 0, 37)
        cache = getattr(model(torch.randint(1, 37, (2, 5))), CACHE_NAME)
        size = cache.nbytes()
        assert model(torch.zeros(2, 0, dtype=torch.long), **{CACHE_NAME: cache}).logits.shape == (2, 0, 37)
        assert (cache.get_seq_length(), cache.nbytes()) == (5, size)
        assert model(torch.zeros(0, 4, dtype=torch.long)).logits.shape == (0, 4, 37)


@pytest.mark.parametrize("variant,embedding", [("local", "absolute"), ("full", "none"), ("simple", "none")])
def test_negative_positions_are_refused(variant, embedding):
    model = _model(variant, position_embedding_type=embedding)
    with pytest.raises(ValueError, match=r"`position_ids` contains -2: positions must be >= 0"):
        model(torch.randint(1, 37, (1, 4)), position_ids=torch.tensor([[-2, -1, 0, 1]]))


def test_the_cache_goes_under_the_name_of_this_transformers_release():
    """One seam: transformers 5.24 renamed `past_key_values` to `cache` (argument and output field)."""
    model = _model("simple")
    out = model(torch.randint(1, 37, (1, 4)))
    assert isinstance(getattr(out, CACHE_NAME), AFTCache)
    cache = getattr(out, CACHE_NAME)
    with pytest.raises(ValueError, match="Pass the cache once"):
        model(torch.randint(1, 37, (1, 1)), cache=cache, past_key_values=cache)
    for name in ("cache", "past_key_values"):  # both names are accepted
        assert getattr(model(torch.randint(1, 37, (1, 1)), **{name: cache}), CACHE_NAME) is cache


def test_full_decoding_appends_in_place():
    """AFT-full's state grows geometrically: decoding 40 tokens reallocates its buffers a few times, not per token;
    a fixed-size cache (max_cache_len) keeps one set of buffers and refuses what does not fit."""
    model = _model("full")
    ids = torch.randint(1, 37, (1, 3))
    out = _greedy(model, ids, 40, return_dict_in_generate=True)
    cache = getattr(out, CACHE_NAME)
    assert cache.layers[0].buffers.r.shape[1] >= 43 and cache.layers[0].length == 42
    addresses = set()
    with torch.no_grad():
        cache = getattr(model(ids), CACHE_NAME)
        for _ in range(40):
            model(torch.randint(1, 37, (1, 1)), **{CACHE_NAME: cache})
            addresses.add(cache.layers[0].buffers.ev.data_ptr())
    assert len(addresses) <= 2  # 64 slots, then 128
    fixed = AFTCache(model.config, max_cache_len=50)
    greedy_fixed = _greedy(model, ids, 40, **{CACHE_NAME: fixed})
    assert torch.equal(greedy_fixed, out.sequences)
    assert fixed.layers[0].buffers.r.shape[1] == 50 and fixed.nbytes() == getattr(out, CACHE_NAME).nbytes()
    too_many = r"max_cache_len=50 positions; 42 are filled and 9 more do not fit"
    with pytest.raises(ValueError, match=too_many), torch.no_grad():
        model(torch.randint(1, 37, (1, 9)), **{CACHE_NAME: fixed})


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_reset_cache_serves_a_new_batch(variant):
    model = _model(variant)
    with torch.no_grad():
        cache = getattr(model(torch.randint(1, 37, (3, 5))), CACHE_NAME)
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.batch_size == -1
        ids = torch.randint(1, 37, (2, 4))
        torch.testing.assert_close(model(ids, **{CACHE_NAME: cache}).logits, model(ids).logits)


@pytest.mark.parametrize("variant", ["simple", "local", "conv"])
def test_constant_state_is_written_in_place(variant):
    """Each decoding step writes the fixed-size state into the tensors of the first write (their addresses stay,
    for compiled decoding), and every step's logits are those of one forward over all the tokens so far."""
    model = _model(variant)
    ids = torch.randint(1, 37, (2, 12))
    with torch.no_grad():
        whole = model(ids).logits
        cache = getattr(model(ids[:, :4]), CACHE_NAME)
        addresses = [[x.data_ptr() for x in layer.read()] for layer in cache.layers]
        for t in range(4, 12):
            step = model(ids[:, t : t + 1], **{CACHE_NAME: cache}).logits
            assert [[x.data_ptr() for x in layer.read()] for layer in cache.layers] == addresses
            torch.testing.assert_close(step[:, 0], whole[:, t], rtol=1e-10, atol=1e-10)
