"""transformers' `Trainer` on AFT models: it trains, evaluates with the model's own loss, saves a folder that loads
and generates, and resumes from a checkpoint with the losses of an uninterrupted run (causal LM and image
classifier). Tiny models and data made here, on CPU."""

import copy

import pytest
import torch
from conftest import VARIANTS, tiny_config
from datasets import Dataset
from test_image import tiny_config as tiny_vision_config
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from aft import AFTForCausalLM, AFTForImageClassification

STEPS, SAVE_AT = 6, 3


def _text_data(n=24, T=12):
    """Counting sequences (each token the previous plus one): learnable in a few steps."""
    starts = torch.randint(0, 36, (n, 1), generator=torch.Generator().manual_seed(1))
    ids = (starts + torch.arange(T)) % 36 + 1
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")


def _image_data(n=24):
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.tolist()}).with_format("torch")


def _args(out, **kw):
    defaults = {
        "output_dir": str(out),
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "save_steps": SAVE_AT,
        "save_strategy": "steps",
        "report_to": "none",
        "use_cpu": True,
        "seed": 7,
        "data_seed": 7,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**defaults, **kw})


class _Losses(TrainerCallback):
    """The training loss logged at each step of this run (a resumed run's log history also holds the checkpoint's)."""

    def __init__(self):
        self.by_step = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.by_step[state.global_step] = logs["loss"]


def _train_interrupted_and_resumed(make_model, data, tmp_path):
    """An uninterrupted run, its model before training, its losses per step, and those of a fresh model resumed from
    that run's mid-way checkpoint."""
    full_losses, resumed_losses = _Losses(), _Losses()
    model = make_model()
    untrained = copy.deepcopy(model).eval()
    full = Trainer(model=model, args=_args(tmp_path / "full"), train_dataset=data, callbacks=[full_losses])
    full.train()
    assert sorted(full_losses.by_step) == list(range(1, STEPS + 1))
    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    assert checkpoint.is_dir()
    torch.manual_seed(123)  # the resumed model starts from other weights: the checkpoint must restore them
    resumed = Trainer(
        model=make_model(), args=_args(tmp_path / "resumed"), train_dataset=data, callbacks=[resumed_losses]
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    return full, untrained, full_losses.by_step, resumed_losses.by_step


@pytest.mark.parametrize("variant", ["local", "full"])
def test_causal_lm_trains_resumes_evaluates_and_saves(variant, tmp_path):
    data = _text_data()
    make_model = lambda: AFTForCausalLM(tiny_config(variant, hidden_dropout_prob=0.0))
    trainer, untrained, full, resumed = _train_interrupted_and_resumed(make_model, data, tmp_path)
    # the resumed run saw the same batches in the same order and started from the checkpoint's weights and optimizer
    assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), (step, resumed, full)

    # evaluation: the mean of the model's own loss over the evaluation batches (equal batches of 8, so the mean of
    # the batch means), lower than before training
    model = trainer.model.eval()
    metrics = trainer.evaluate(eval_dataset=data)
    ids = data[:]["input_ids"]
    with torch.no_grad():
        by_hand = torch.stack([model(input_ids=b, labels=b).loss for b in ids.split(8)]).mean()
        assert metrics["eval_loss"] == pytest.approx(by_hand.item(), rel=1e-5)
        assert metrics["eval_loss"] < untrained(input_ids=ids, labels=ids).loss.item()

    # the saved folder loads through the Auto class and generates what the trained model generates
    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert type(loaded) is AFTForCausalLM
    prompt = ids[:2, :5]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(loaded.generate(prompt, **kw), model.generate(prompt, **kw))


def test_image_classifier_trains_resumes_evaluates_and_saves(tmp_path):
    data = _image_data()
    make_model = lambda: AFTForImageClassification(tiny_vision_config("conv", hidden_dropout_prob=0.0))
    trainer, untrained, full, resumed = _train_interrupted_and_resumed(make_model, data, tmp_path)
    assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), (step, resumed, full)

    model = trainer.model.eval()
    metrics = trainer.evaluate(eval_dataset=data)
    pixels, labels = data[:]["pixel_values"], data[:]["labels"]
    with torch.no_grad():
        by_hand = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)
        assert metrics["eval_loss"] == pytest.approx(by_hand.item(), rel=1e-5)
        assert metrics["eval_loss"] < untrained(pixel_values=pixels, labels=labels).loss.item()

    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "final").eval()
    assert type(loaded) is AFTForImageClassification
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels[:4]).logits, model(pixel_values=pixels[:4]).logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_precision_training_with_bf16(variant, tmp_path, fresh_accelerate_state):
    """`bf16=True` (autocast: matmuls in bfloat16, the model's weights in float32) trains every variant with finite
    losses and gradients: the operator's own backward passes take the bfloat16 gradients autocast hands them."""
    data = _text_data(n=8)
    model = AFTForCausalLM(tiny_config(variant))
    args = _args(tmp_path, bf16=True, max_steps=2, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert model.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
