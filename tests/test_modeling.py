"""AFTConfig, AFTModel and AFTForCausalLM: the transformers API surface, errors, causality and numerics."""

import pytest
import torch
from conftest import VARIANTS, enable_checkpointing, tiny_config
from huggingface_hub.errors import StrictDataclassClassValidationError

from aft import AFTCache, AFTConfig, AFTForCausalLM, AFTModel
from aft.modeling_aft import CACHE_NAME


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"aft_variant": "sparse"}, r"aft_variant='sparse' is not allowed.*'simple', 'local', 'conv', 'full'"),
        (
            {"aft_variant": "local", "local_window_size": 0},
            r"local_window_size=0 is not allowed: the window must be >= 1",
        ),
        ({"aft_variant": "conv", "hidden_size": 30, "num_heads": 4}, r"num_heads=4 is not allowed: hidden_size=30"),
        ({"query_activation": "tanh"}, r"query_activation='tanh' is not allowed"),
        ({"position_embedding_type": "rotary"}, r"position_embedding_type='rotary' is not allowed"),
        ({"aft_variant": "full", "position_bias_rank": 0}, r"position_bias_rank=0 is not allowed"),
        ({"initializer_range": -1.0}, r"initializer_range=-1.0 is not allowed: it is a standard deviation"),
    ],
)
def test_config_errors_name_field_value_and_allowed(kwargs, match):
    with pytest.raises(StrictDataclassClassValidationError, match=match):
        AFTConfig(**kwargs)


def test_config_roundtrip(tmp_path):
    config = tiny_config("conv", query_activation="relu", position_embedding_type="none")
    config.save_pretrained(tmp_path)
    loaded = AFTConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert AFTConfig().intermediate_size == 4 * AFTConfig().hidden_size


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_is_causal(variant):
    """Changing token t+1 changes no logit at positions <= t."""
    model = AFTForCausalLM(tiny_config(variant)).eval()
    ids = torch.randint(1, 37, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (ids[:, 7] + 5) % 37
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_nonfinite_input_embedding_changes_no_earlier_logit(variant, value):
    """A NaN or infinite input embedding at position t (a sequence longer than a chunk of the fast form): the
    logits before t are what they were, to the last bit."""
    model = AFTForCausalLM(tiny_config(variant, max_position_embeddings=160)).eval()
    embeds = torch.randn(2, 150, 16)
    with torch.no_grad():
        clean = model(inputs_embeds=embeds).logits
        embeds[:, 100] = value
        y = model(inputs_embeds=embeds).logits
    assert torch.equal(y[:, :100], clean[:, :100])
    assert not torch.isfinite(y[:, 100]).any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_outputs_loss_and_backward(variant):
    config = tiny_config(variant)
    model = AFTForCausalLM(config)
    ids = torch.randint(1, 37, (2, 10))
    out = model(ids, labels=ids, output_hidden_states=True)
    assert out.logits.shape == (2, 10, 37)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    cache = getattr(out, CACHE_NAME)
    assert isinstance(cache, AFTCache) and cache.get_seq_length() == 10
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 37), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if variant in ("local", "full"):
        assert model.model.layers[0].mixer.pos_u.grad.abs().sum() > 0
    if variant == "conv":  # gamma receives gradient even while the kernel is zero
        assert model.model.layers[0].mixer.conv_gamma.grad.abs().sum() > 0


def test_tied_embeddings_inputs_embeds_and_logits_to_keep():
    model = AFTForCausalLM(tiny_config("local")).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(1, 37, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
        last = model(ids, logits_to_keep=1).logits
    torch.testing.assert_close(from_embeds, logits)
    assert last.shape == (2, 1, 37)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_paper_initialisation():
    model = AFTForCausalLM(tiny_config("full", position_bias_rank=64, max_position_embeddings=512))
    pos_u = model.model.layers[0].mixer.pos_u
    assert abs(pos_u.std().item() - 0.01) < 0.002
    conv = AFTForCausalLM(tiny_config("conv")).model.layers[1].mixer
    assert torch.equal(conv.conv_gamma, torch.zeros_like(conv.conv_gamma))
    assert torch.equal(conv.conv_beta, torch.zeros_like(conv.conv_beta))


@pytest.mark.parametrize("variant", ["simple", "full"])
def test_gradient_checkpointing_matches(variant):
    model = AFTForCausalLM(tiny_config(variant))
    ids = torch.randint(1, 37, (2, 10))
    loss = model(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    enable_checkpointing(model)
    model.train()
    out = model(ids, labels=ids, use_cache=True)
    assert getattr(out, CACHE_NAME) is None  # checkpointed training keeps no cache
    grads_ckpt = torch.autograd.grad(out.loss, list(model.parameters()))
    for a, b in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(a, b)


def test_clear_errors_before_any_work():
    model = AFTForCausalLM(tiny_config("local")).eval()
    ids = torch.randint(1, 37, (2, 8))
    with pytest.raises(ValueError, match=r"`input_ids` contains the id 37.*\[0, 36\].*vocab_size=37"):
        model(torch.full((1, 4), 37))
    with pytest.raises(ValueError, match=r"`input_ids` contains the id -1"):
        model(torch.full((1, 4), -1))
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(2, 7\); expected \(2, 8\)"):
        model(ids, attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match=r"reaches position 96.*max_position_embeddings=96"):
        model(torch.randint(1, 37, (1, 97)))
    with pytest.raises(ValueError, match="exactly one of `input_ids` and `inputs_embeds`"):
        model()


def test_no_length_limit_without_positions():
    """simple and conv without absolute positions run past max_position_embeddings."""
    for variant in ("simple", "conv"):
        model = AFTModel(tiny_config(variant, position_embedding_type="none", max_position_embeddings=8)).eval()
        with torch.no_grad():
            out = model(torch.randint(1, 37, (1, 40)))
        assert out.last_hidden_state.shape == (1, 40, 16)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_keys_finite_in_every_dtype(variant, dtype):
    """Scale the key projections so keys reach +-60: logits stay finite in fp32, bf16 and fp16."""
    model = AFTForCausalLM(tiny_config(variant)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mixer.k_proj.weight.mul_(800)
        probe = model.model.layers[0]
        ids = torch.randint(1, 37, (2, 24))
        hidden = probe.ln_1(model.model.embed_tokens(ids) + model.model.embed_positions(torch.arange(24)))
        assert probe.mixer.k_proj(hidden).abs().max() > 60
        model.to(dtype)
        logits = model(ids, attention_mask=torch.ones(2, 24, dtype=torch.long)).logits
    assert torch.isfinite(logits).all()


def _logits_both_ways(model, ids):
    """The logits with gradients recorded (every argument made afresh) and without (where the mixer keeps what it
    made from its weights)."""
    with torch.enable_grad():
        reference = model(ids).logits.detach()
    with torch.no_grad():
        fast = model(ids).logits
    return reference, fast


def test_conv_kernel_kept_without_gradients_follows_every_change():
    """Out of training and without gradients the mixer keeps conv's kernel between calls: the logits equal those
    of a call that makes it afresh after every way a user changes the weights."""
    torch.manual_seed(0)
    model = AFTForCausalLM(tiny_config("conv")).eval()
    ids = torch.randint(1, 37, (2, 6))
    mixer = model.model.layers[0].mixer

    def check(dtype=torch.float32, tol=1e-6):
        reference, fast = _logits_both_ways(model, ids)
        assert fast.dtype == dtype
        torch.testing.assert_close(fast, reference, rtol=tol, atol=tol)
        return fast

    with torch.no_grad():  # a kernel that is not 0 (gamma = beta = 0 at initialisation)
        for layer in model.model.layers:
            layer.mixer.conv_gamma.fill_(1.0)
    before = check()
    assert "args1" in mixer._derived  # the kept kernel was used
    other = AFTForCausalLM(tiny_config("conv")).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.load_state_dict(other.state_dict())  # in place: the same tensors, new values
    assert not torch.allclose(check(), before)
    with torch.no_grad():
        mixer.conv_gamma.mul_(3.0)
    check()
    mixer.conv_weight = torch.nn.Parameter(torch.randn_like(mixer.conv_weight))  # a new tensor
    check()
    model.double()  # cast in place: the same parameters, new storage and dtype
    check(torch.float64, 1e-12)
    model.to(torch.bfloat16)
    check(torch.bfloat16, 0)
    model.float()
    with torch.inference_mode():  # tensors made here count no versions: nothing is kept for them
        inference_model = AFTForCausalLM(tiny_config("conv")).eval()
        inference_model(ids)
    assert not inference_model.model.layers[0].mixer._derived
    model.train()
    mixer._derived.clear()
    with torch.no_grad():
        model(ids)
    assert not mixer._derived  # training: every call makes its arguments afresh


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_applies_in_training_only(variant):
    torch.manual_seed(0)
    model = AFTForCausalLM(tiny_config(variant, hidden_dropout_prob=0.5))
    ids = torch.randint(1, 37, (2, 6))
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)
    model.eval()
    plain = AFTForCausalLM(tiny_config(variant, hidden_dropout_prob=0.0)).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_whole_model_pickles(variant, tmp_path):
    """torch.save of the whole model (not its state dict) and torch.load give the same model, generate() included;
    the mixer's variant record and operator hold inline functions that pickle cannot name."""
    import copy

    torch.manual_seed(0)
    model = AFTForCausalLM(tiny_config(variant)).eval()
    ids = torch.randint(1, 37, (2, 6))
    with torch.no_grad():
        logits = model(ids).logits  # after an inference call: the mixer may keep what it made from its weights
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for other in (loaded, copy.deepcopy(model)):
        with torch.no_grad():
            torch.testing.assert_close(other(ids).logits, logits, rtol=0, atol=0)
        assert torch.equal(
            other.generate(ids, max_new_tokens=3, do_sample=False),
            model.generate(ids, max_new_tokens=3, do_sample=False),
        )
