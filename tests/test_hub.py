"""Auto classes with the package installed, and a saved folder loaded as Hub remote code without it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import logits_as_remote_code, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import aft
from aft import AFTConfig, AFTForCausalLM, AFTModel


@pytest.fixture
def saved(tmp_path):
    model = AFTForCausalLM(tiny_config("local")).eval()
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def test_save_writes_code_and_auto_map(saved):
    _, folder = saved
    files = set(os.listdir(folder))
    code = {"configuration_aft.py", "modeling_aft.py"} | {
        p.name for p in Path(aft.__file__).parent.glob("ops_aft*.py")
    }
    assert len(code) >= 7 and {"config.json", "model.safetensors"} | code <= files  # the operator's flat siblings too
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_aft.AFTConfig",
        "AutoModel": "modeling_aft.AFTModel",
        "AutoModelForCausalLM": "modeling_aft.AFTForCausalLM",
    }


def test_auto_classes_with_the_package_installed(saved):
    model, folder = saved
    assert isinstance(AutoConfig.from_pretrained(folder), AFTConfig)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert type(loaded) is AFTForCausalLM  # the installed class, not remote code
    assert type(AutoModel.from_pretrained(folder)) is AFTModel
    ids = torch.randint(1, 37, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_remote_code_in_a_fresh_process_without_the_package(saved, tmp_path):
    model, folder = saved
    ids = torch.randint(1, 37, (2, 9))
    then = """
        with torch.no_grad():
            out = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 13)
        """
    logits = logits_as_remote_code(folder, ids, tmp_path, then)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits)


def test_the_byte_tokenizer_loads_without_the_package_and_without_running_code(saved, tmp_path):
    """The tokenizer needs no code, but `AutoTokenizer` reads config.json (whose `auto_map` is remote code) before
    the tokenizer's files: `trust_remote_code=False` says no code is wanted, so nothing is asked or run."""
    from conftest import SCRIPTS

    sys.path.insert(0, str(SCRIPTS))
    try:
        from training_data import byte_tokenizer
    finally:
        sys.path.remove(str(SCRIPTS))
    _, folder = saved
    tokenizer = byte_tokenizer()
    tokenizer.save_pretrained(folder)
    text = "def f(x): return 'é'\n"
    script = f"""
import sys
sys.modules["aft"] = None  # the package is not importable in this process
from transformers import AutoTokenizer, PreTrainedTokenizerFast
for tokenizer in (AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=False),
                  PreTrainedTokenizerFast.from_pretrained({str(folder)!r})):
    assert not type(tokenizer).__module__.startswith("transformers_modules"), type(tokenizer)
    print(tokenizer({text!r}).input_ids, tokenizer.padding_side, tokenizer.pad_token_id)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "custom code" not in result.stdout + result.stderr  # no trust_remote_code question
    expected = f"{tokenizer(text).input_ids} left {tokenizer.pad_token_id}"
    assert result.stdout.split("\n")[:2] == [expected, expected]
    assert not (tmp_path / "modules").exists()  # no remote code was copied, let alone run
