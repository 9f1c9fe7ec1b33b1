"""TRL's `SFTTrainer` on an AFT causal LM with the scripts' byte tokenizer and a chat template: the chats are
tokenized by the template, the loss covers only the assistant's turns, training learns the answers, and the saved
folder answers a chat prompt through generate(); under TRL's defaults (bf16 autocast, gradient checkpointing). A
tiny model and chats made here, CPU."""

import pytest
import torch
from conftest import import_scripts, tiny_config
from datasets import Dataset

from aft import AFTForCausalLM

pytest.importorskip("trl", reason='the [tools] extra: pip install -e ".[tools]"')

from trl import SFTConfig, SFTTrainer  # noqa: E402

# A ChatML-like template over bytes (the roles are plain text, the turn ends with the tokenizer's eos), with the
# `{% generation %}` markers that TRL's assistant-only loss reads. Used where the scripts' tokenizer has none.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
CHATS = [("ping", "pong"), ("hello", "world"), ("one", "two"), ("red", "blue")]


@pytest.fixture(scope="module")
def tokenizer():
    """The byte tokenizer as the training scripts build it, with a chat template (the scripts' own, if it has one)."""
    for scripts in import_scripts(data="training_data"):
        tokenizer = scripts.data.byte_tokenizer()
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _chat(question, answer=None):
    return [{"role": "user", "content": question}] + ([{"role": "assistant", "content": answer}] if answer else [])


def test_sft_trainer_learns_the_assistant_turns(tokenizer, tmp_path, fresh_accelerate_state):
    config = tiny_config(
        "local",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    data = Dataset.from_dict({"messages": [_chat(q, a) for q, a in CHATS] * 4})
    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=60,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_length=64,
        assistant_only_loss=True,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        # TRL's defaults, set here so that the test keeps them if TRL changes its own
        bf16=True,
        gradient_checkpointing=True,
    )
    trainer = SFTTrainer(model=AFTForCausalLM(config), args=args, train_dataset=data, processing_class=tokenizer)

    # the chats are tokenized by the template, and only the assistant's turns (answer and eos) count in the loss
    row = trainer.train_dataset[0]
    ids = tokenizer.apply_chat_template(_chat(*CHATS[0]), tokenize=True, return_dict=True)["input_ids"]
    assert row["input_ids"] == ids
    counted = [t for t in row["labels"] if t != -100]
    assert counted == tokenizer("pong").input_ids + [tokenizer.eos_token_id]

    trainer.train()
    assert trainer.model.is_gradient_checkpointing
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] / 4, losses

    # the saved folder answers each chat prompt with the trained answer and stops at eos
    trainer.save_model(str(tmp_path / "final"))
    model = AFTForCausalLM.from_pretrained(tmp_path / "final").eval()
    for question, answer in CHATS:
        prompt = tokenizer.apply_chat_template(
            _chat(question), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        reply = out[0, prompt["input_ids"].shape[1] :].tolist()
        assert tokenizer.eos_token_id in reply, tokenizer.decode(reply)
        assert tokenizer.decode(reply[: reply.index(tokenizer.eos_token_id)]) == answer
