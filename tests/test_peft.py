"""PEFT LoRA on AFT: the mixer's and the MLP's projections take adapters under their transformers names, the adapter
trains, saves, reloads on a fresh base with the same logits, merges into the base with the same logits, and the
adapted model generates with the cache. Tiny models, CPU."""

import pytest
import torch
from conftest import VARIANTS, tiny_config
from transformers import AutoModelForCausalLM

from aft import AFTForCausalLM

pytest.importorskip("peft", reason='the [tools] extra: pip install -e ".[tools]"')

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

# The linear layers of every AFT block: the mixer's q, k, v, o and the MLP's up and down projections (the names
# Llama-style models use, so LoRA recipes written for them apply as they are).
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _lora(**kw):
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGET_MODULES, **kw)


def _train(model, ids, steps=4):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


@pytest.mark.parametrize("variant", VARIANTS)
def test_target_modules_are_in_every_block(variant):
    """Each target name is an nn.Linear in every block, and nothing else in the model is one (but the tied head)."""
    model = AFTForCausalLM(tiny_config(variant))
    linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    expected = {f"model.layers.{i}.{part}.{name}" for i in range(2) for part, names in
                (("mixer", TARGET_MODULES[:4]), ("mlp", TARGET_MODULES[4:])) for name in names}  # fmt: skip
    assert linear == expected | {"lm_head"}
    adapted = get_peft_model(model, _lora())
    wrapped = {name.removeprefix("base_model.model.") for name, m in adapted.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == expected


@pytest.mark.parametrize("variant", ["local", "conv", "full"])
def test_lora_trains_saves_reloads_merges_and_generates(variant, tmp_path):
    base = AFTForCausalLM(tiny_config(variant)).eval()
    base.save_pretrained(tmp_path / "base")
    ids = (torch.randint(0, 36, (4, 1)) + torch.arange(14)) % 36 + 1
    with torch.no_grad():
        base_logits = base(ids).logits

    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), _lora())
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)  # only the adapters train
    adapted, losses = _train(adapted, ids)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        adapted_logits = adapted(ids).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)  # the adapter changed the model

    adapted.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted_logits)

        # generate() on the adapted model: the cache is AFT's, and the tokens are those of full forward passes
        prompt = ids[:2, :5]
        kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        out = reloaded.generate(input_ids=prompt, **kw, return_dict_in_generate=True)
        tokens = out.sequences
        assert type(getattr(out, "cache", None) or out.past_key_values).__name__ == "AFTCache"
        stepwise = prompt
        for _ in range(6):
            stepwise = torch.cat([stepwise, reloaded(stepwise).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(tokens, stepwise)

        merged = reloaded.merge_and_unload()
        assert type(merged) is AFTForCausalLM and not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids).logits, adapted_logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(merged.generate(prompt, **kw), tokens)
    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    torch.testing.assert_close(again, adapted_logits, atol=1e-5, rtol=1e-5)


def test_lora_needs_target_modules_named():
    """PEFT has no default targets for the model type "aft": it asks for them instead of guessing."""
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(AFTForCausalLM(tiny_config("simple")), LoraConfig(task_type="CAUSAL_LM", r=4))
