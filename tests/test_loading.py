"""Loading a saved folder the ways users load models: `device_map="auto"` (Accelerate's placement) and
`dtype="auto"` (the saved dtype), with the package installed and as Hub remote code. The loaded model gives the
saved model's logits in the saved dtype."""

import pytest
import torch
from conftest import logits_as_remote_code, tiny_config
from test_image import tiny_config as tiny_vision_config
from transformers import AutoModelForCausalLM, AutoModelForImageClassification

from aft import AFTForCausalLM, AFTForImageClassification


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16])
def saved(request, tmp_path_factory):
    """A causal LM saved in float32 or bfloat16, and its logits on `ids` in that dtype."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("saved")
    model = AFTForCausalLM(tiny_config("local")).to(request.param).eval()
    model.save_pretrained(folder)
    ids = torch.randint(1, 37, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
    return folder, ids, logits


@pytest.mark.parametrize(
    "kwargs", [{"dtype": "auto"}, {"device_map": "auto"}, {"dtype": "auto", "device_map": "auto"}]
)
def test_auto_dtype_and_device_map_with_the_package(saved, kwargs):
    folder, ids, logits = saved
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    assert type(model) is AFTForCausalLM
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # this machine has only the CPU to place it on
    if "dtype" in kwargs:
        assert model.dtype == logits.dtype
    with torch.no_grad():
        torch.testing.assert_close(model.to(logits.dtype)(ids).logits, logits, atol=0, rtol=0)


def test_device_map_auto_offloads_whole_blocks_to_disk(saved, tmp_path):
    """With too little memory for the whole model, Accelerate puts what does not fit on disk, never splitting an
    AFTBlock (`_no_split_modules`), and hooks the offloaded modules: the same logits and generated tokens."""
    folder, ids, logits = saved
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype="auto", device_map="auto", max_memory={"cpu": 15_000}, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert "disk" in model.hf_device_map.values() and "cpu" in model.hf_device_map.values(), model.hf_device_map
    assert not any(".mixer" in name or ".mlp" in name for name in model.hf_device_map)  # blocks stay whole
    reference = AFTForCausalLM.from_pretrained(folder, dtype="auto").eval()
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, atol=0, rtol=0)
        assert torch.equal(model.generate(ids[:1, :4], **kw), reference.generate(ids[:1, :4], **kw))


def test_a_dtype_given_wins_over_the_saved_one(saved):
    folder, ids, logits = saved
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    assert model.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.to(logits.dtype), logits, atol=2e-2, rtol=2e-2)


def test_auto_dtype_and_device_map_as_remote_code(saved, tmp_path):
    folder, ids, logits = saved
    then = f"""
        model = AutoModelForCausalLM.from_pretrained(
            {str(folder)!r}, trust_remote_code=True, dtype="auto", device_map="auto"
        ).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert {{p.device.type for p in model.parameters()}} == {{"cpu"}}
        with torch.no_grad():
            torch.save(model(ids).logits, {str(tmp_path / "auto.pt")!r})
        """
    logits_as_remote_code(folder, ids, tmp_path, then)
    loaded = torch.load(tmp_path / "auto.pt")
    assert loaded.dtype == logits.dtype
    # another process, whose thread count may differ: sums in another order differ in the last bits
    torch.testing.assert_close(loaded, logits)


def test_image_classifier_with_auto_dtype_and_device_map(tmp_path):
    model = AFTForImageClassification(tiny_vision_config("conv")).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path, dtype="auto", device_map="auto").eval()
    assert type(loaded) is AFTForImageClassification and loaded.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits, atol=0, rtol=0
        )
