"""Auto classes with the package installed, and a saved folder loaded as Hub remote code without it."""

import json
import os
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
