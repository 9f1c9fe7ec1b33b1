"""Distillation in run_clm.py (--teacher_model, --distill_temperature, --distill_weight): the loss and its terms,
a weight of 0 as a plain run, a tiny GPT-2 converted to AFT and distilled from itself end to end (with an exact
resume), and the teachers that do not fit, refused before training with one line."""

import importlib
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

pytest.importorskip("accelerate")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
# 25 blocks of 32 bytes; batches of 4: 6 steps per epoch
RUN = ["--preset", "tiny", "--block_size", "32", "--per_device_train_batch_size", "4", "--max_train_samples", "24",
       "--max_eval_samples", "8", "--max_train_steps", "4", "--logging_steps", "1", "--seed", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(SCRIPTS))
    try:
        names = ("run_clm", "convert_to_aft", "training_args", "training_data", "training_distill")
        yield Namespace(**{name.removeprefix("training_"): importlib.import_module(name) for name in names})
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "code.txt"
    path.write_text("".join(f"def add_{i}(a, b):\n    return a + b * {i}\n" for i in range(40)))
    return path


def save_gpt2(folder: Path, scripts, vocab_size=258, positions=64, tokenizer="bytes"):
    """A random tiny GPT-2 with run_clm.py's byte tokenizer (256 bytes, eos 256, pad 257)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=positions, n_embd=16, n_layer=2, n_head=2, n_inner=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=256, eos_token_id=256, pad_token_id=257,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    if tokenizer == "bytes":
        scripts.data.byte_tokenizer().save_pretrained(folder)
    elif tokenizer == "bpe":  # 258 tokens too, in another order: the special tokens first
        scripts.data.bpe_tokenizer(["abc"], vocab_size=258).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(scripts, tmp_path_factory):
    return save_gpt2(tmp_path_factory.mktemp("teacher") / "gpt2", scripts)


def history(folder: Path) -> list:
    return json.loads((folder / "log_history.json").read_text())


def train_log(folder: Path) -> list:
    return [e for e in history(folder) if "loss" in e]


# The loss


def test_kl_term(scripts):
    kl = scripts.distill.kl_divergence
    logits = torch.randn(2, 5, 7)
    assert kl(logits, logits.clone(), 2.0).item() == 0.0  # exactly, at any temperature
    assert kl(logits, logits + 3.0, 0.5).item() == pytest.approx(0.0, abs=1e-6)  # a shift is the same softmax
    other = torch.randn(2, 5, 7)
    for temperature in (1.0, 2.0):
        p = torch.softmax(other.double() / temperature, -1)  # the teacher's
        q = torch.softmax(logits.double() / temperature, -1)
        expected = (p * (p.log() - q.log())).sum(-1).mean()  # KL(p || q) per position, averaged
        assert kl(logits, other, temperature).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl(logits.bfloat16(), other.bfloat16(), 1.0).dtype == torch.float32


def test_loss_combines_the_terms_over_the_predicted_positions(scripts):
    from aft import AFTConfig, AFTForCausalLM

    model = AFTForCausalLM(AFTConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, aft_variant="simple"))
    ids = torch.randint(0, 11, (2, 6))
    teacher_logits = torch.randn(2, 6, 11)

    def loss_with(logits, temperature=2.0, weight=0.25):
        teacher = lambda input_ids, use_cache: Namespace(logits=logits)
        return scripts.distill.DistillationLoss(teacher, temperature, weight)(model, {"input_ids": ids})

    loss, terms = loss_with(teacher_logits)
    ce = model(input_ids=ids, labels=ids).loss
    kl = scripts.distill.kl_divergence(model(input_ids=ids).logits[:, :-1], teacher_logits[:, :-1], 2.0)
    assert terms["ce_loss"].item() == ce.item() and terms["kl_loss"].item() == kl.item()
    assert loss.item() == pytest.approx(0.75 * ce.item() + 0.25 * 4 * kl.item(), rel=1e-6)
    assert loss.requires_grad and not terms["kl_loss"].requires_grad
    last_changed = teacher_logits.clone()
    last_changed[:, -1] += torch.randn(2, 11)  # the last position predicts no token: not part of the loss
    assert loss_with(last_changed)[0].item() == loss.item()
    first_changed = teacher_logits.clone()
    first_changed[:, 0] += torch.randn(2, 11)
    assert loss_with(first_changed)[0].item() != loss.item()


# Runs


def test_weight_zero_is_a_plain_run_and_a_positive_weight_is_not(scripts, text, teacher, tmp_path):
    data = ["--train_file", text, "--validation_file", text]
    runs = {
        "plain": [],
        "zero": ["--teacher_model", teacher, "--distill_weight", "0"],
        "half": ["--teacher_model", teacher, "--distill_temperature", "1.5"],
    }
    for name, extra in runs.items():
        scripts.run_clm.main([*map(str, [*RUN, *data, *extra]), "--output_dir", str(tmp_path / name)])
    plain, zero, half = (train_log(tmp_path / name) for name in runs)
    assert [e["loss"] for e in zero] == [e["loss"] for e in plain]  # exactly: the same weights at every step
    assert [e["ce_loss"] for e in zero] == [e["loss"] for e in plain]
    results = {name: json.loads((tmp_path / name / "all_results.json").read_text()) for name in runs}
    assert results["zero"]["eval_loss"] == results["plain"]["eval_loss"]
    # the teacher changes the training: its term is in the loss, with the default weight 0.5
    assert half[0]["ce_loss"] == plain[0]["loss"]  # the same first batch and weights
    for entry in half:
        assert entry["kl_loss"] > 0
        assert entry["loss"] == pytest.approx(0.5 * entry["ce_loss"] + 0.5 * 1.5**2 * entry["kl_loss"], rel=1e-6)
    assert results["half"]["eval_loss"] != results["plain"]["eval_loss"]


def test_a_converted_gpt2_distilled_from_its_source(scripts, text, tmp_path, capsys):
    """A tiny GPT-2 -> convert_to_aft.py -> run_clm.py --teacher_model GPT-2, resumed exactly from a checkpoint;
    the result loads with AutoModelForCausalLM and generates, and its card names the teacher and the base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = save_gpt2(tmp_path / "gpt2", scripts)
    converted = tmp_path / "aft"
    scripts.convert_to_aft.main(
        [str(source), str(converted), "--aft_variant", "local", "--local_window_size", "4",
         "--position_bias_rank", "4", "--base_model", "me/tiny-gpt2"]
    )  # fmt: skip
    common = [*RUN[2:], "--train_file", text, "--validation_file", text, "--model_name_or_path", converted,
              "--teacher_model", source, "--logging_steps", "3"]  # fmt: skip
    out = tmp_path / "distilled"
    scripts.run_clm.main([*map(str, common), "--checkpointing_steps", "2", "--output_dir", str(out)])
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    generated = model.generate(**tokenizer("def ", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert type(model).__name__ == "AFTForCausalLM" and generated.shape == (1, 9)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "me/tiny-gpt2"  # the converted folder's own base model
    assert "distillation" in card.data.tags
    assert "Distilled from `gpt2`" in card.text and "T = 2, a = 0.5" in card.text
    assert "| teacher_model |" in card.text and "| distill_weight | 0.5 |" in card.text
    logged = train_log(out)
    assert [e["step"] for e in logged] == [3, 4] and all({"ce_loss", "kl_loss"} <= set(e) for e in logged)

    # resumed from step 2 (inside the logging window of step 3): the same log, terms included
    resumed = tmp_path / "resumed"
    checkpoint = ["--resume_from_checkpoint", str(out / "checkpoints" / "step_2")]
    scripts.run_clm.main([*map(str, common), *checkpoint, "--output_dir", str(resumed)])
    for again, first in zip(train_log(resumed), logged, strict=True):
        assert again.keys() == first.keys() and all(again[k] == pytest.approx(first[k], rel=1e-6) for k in first)
    # a resume with another distillation plan is refused
    with pytest.raises(scripts.args.InputError, match="--distill_weight: checkpoint 0.5, this run 0.2"):
        scripts.run_clm.main(
            [*map(str, common), *checkpoint, "--distill_weight", "0.2", "--output_dir", str(tmp_path / "other")]
        )


def test_the_checks_and_the_plan_leave_the_parsed_arguments_unchanged(scripts, text, teacher, tmp_path, monkeypatch):
    """run_clm.py resumed with distillation options: what the checks settle (the checkpoint, T's default) and what
    the step plan completes (the epochs, the warm-up) go to the run's plan and run_state.json, never onto the
    arguments argparse parsed."""
    import argparse
    import copy

    parsed = []
    original = argparse.ArgumentParser.parse_args

    def parse_and_keep(self, *args, **kwargs):
        namespace = original(self, *args, **kwargs)
        parsed.append((namespace, copy.deepcopy(vars(namespace))))
        return namespace

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_keep)
    # 6 steps per epoch: 8 steps take 2 epochs (the default is 1), warm-up 5%
    common = [*map(str, [*RUN, "--train_file", text, "--validation_file", text]), "--max_train_steps", "8"]
    common += ["--teacher_model", str(teacher), "--distill_weight", "0.3", "--output_dir", str(tmp_path / "out")]
    scripts.run_clm.main([*common, "--checkpointing_steps", "4"])
    checkpoint = tmp_path / "out" / "checkpoints" / "step_4"
    scripts.run_clm.main([*common, "--resume_from_checkpoint", str(checkpoint)])  # the plans match: 4 more steps
    assert [e["step"] for e in train_log(tmp_path / "out")][-1] == 8
    assert len(parsed) == 2
    for namespace, before in parsed:
        assert vars(namespace) == before
    resumed = parsed[1][1]
    assert resumed["resume_from_checkpoint"] == str(checkpoint) and resumed["distill_temperature"] is None
    assert resumed["num_train_epochs"] == 1 and resumed["num_warmup_steps"] is None
    plan = json.loads((tmp_path / "out" / "checkpoints" / "step_8" / "run_state.json").read_text())["plan"]
    assert plan["max_train_steps"] == 8 and plan["num_warmup_steps"] == 1
    assert (plan["teacher_model"], plan["distill_temperature"], plan["distill_weight"]) == (str(teacher), 2.0, 0.3)


def test_a_teacher_saved_without_a_tokenizer_is_compared_by_size_alone(scripts, text, tmp_path):
    """A model saved with save_pretrained alone has no tokenizer: nothing says its ids are other tokens."""
    teacher = save_gpt2(tmp_path / "weights-only", scripts, tokenizer=None)
    out = tmp_path / "out"
    scripts.run_clm.main([*map(str, [*RUN, "--train_file", text, "--validation_file", text]),
                          "--teacher_model", str(teacher), "--output_dir", str(out)])  # fmt: skip
    assert (out / "model.safetensors").is_file()


# Bad input: one line before training


def test_teachers_that_do_not_fit_are_refused_before_training(scripts, text, teacher, tmp_path):
    base = [*RUN, "--train_file", text, "--validation_file", text]

    def error(*args) -> str:
        out = tmp_path / "out"
        with pytest.raises(scripts.args.InputError) as caught:
            scripts.run_clm.main([*map(str, [*base, *args]), "--output_dir", str(out)])
        # nothing but the lock of the run that was refused (a later run takes it over)
        assert not out.exists() or [p.name for p in out.iterdir()] in ([], [scripts.args.LOCK])
        return str(caught.value)

    wide = save_gpt2(tmp_path / "wide", scripts, vocab_size=300)
    message = error("--teacher_model", wide)
    assert f"--teacher_model {wide} has vocab_size=300, the student 258" in message
    assert "--tokenizer_name" in message
    other_tokens = save_gpt2(tmp_path / "bpe", scripts, tokenizer="bpe")
    assert "its tokenizer maps ids to other tokens" in error("--teacher_model", other_tokens)
    short = save_gpt2(tmp_path / "short", scripts, positions=16)
    message = error("--teacher_model", short)
    assert f"--teacher_model {short} has 16 positions, fewer than --block_size=32" in message
    assert "cannot load its config" in error("--teacher_model", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in error("--teacher_model", tmp_path / "empty")
    broken = save_gpt2(tmp_path / "broken", scripts)
    (broken / "model.safetensors").write_bytes(b"not weights")
    assert f"--teacher_model {broken}: cannot load its weights" in error("--teacher_model", broken)
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    assert "model_type 'vit', which is not a causal LM" in error("--teacher_model", tmp_path / "vit")
    assert "--distill_weight=1.5: allowed: [0, 1]" in error("--teacher_model", teacher, "--distill_weight", "1.5")
    assert "--distill_temperature=0.0: allowed: > 0" in error("--teacher_model", teacher, "--distill_temperature", "0")
    assert "--distill_weight needs --teacher_model" in error("--distill_weight", "0.3")


def test_bad_teacher_is_one_line_with_exit_code_2(scripts, text, teacher, tmp_path):
    package_root = tmp_path / "pkg"
    package_root.mkdir()
    (package_root / "aft").symlink_to(REPO, target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=str(package_root), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    short = save_gpt2(tmp_path / "short", scripts, positions=16)
    args = [*RUN, "--train_file", text, "--teacher_model", short, "--output_dir", tmp_path / "out"]
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "run_clm.py"), *map(str, args)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --teacher_model {short} has 16 positions, fewer than --block_size=32: lower --block_size to at "
        "most 16, or use a teacher with longer positions."
    ]
    assert not (tmp_path / "out").exists()
