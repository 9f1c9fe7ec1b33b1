"""What a user of the training scripts reaches for: one-line errors for bad input before any work, a tokenizer
that batches and stops at eos, the image-classification pipeline on the default output, model cards without
local paths, evaluate metrics offline. The runs are the scripts' main() in this process (tiny models, few steps).
"""

import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from conftest import import_scripts

pytest.importorskip("accelerate")
pytest.importorskip("datasets")

TINY = ["--preset", "tiny", "--seed", "0", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def scripts():
    yield from import_scripts(
        clm="run_clm",
        classification="run_image_classification",
        pixels="run_pixel_modeling",
        args="training_args",
        metrics="training_metrics",
    )


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "code.txt"
    path.write_text("".join(f"def add_{i}(a, b):  return a + b + {i}\n" for i in range(400)))
    return path


def run(module, argv, monkeypatch=None):
    """main(argv) as `python scripts/<module>.py argv` would run it (sys.argv is what the model card records)."""
    if monkeypatch:
        monkeypatch.setattr(sys, "argv", [f"scripts/{module.__name__}.py", *argv])
    module.main(argv)


@pytest.fixture(scope="module")
def folders(scripts, text_file, tmp_path_factory):
    """A language model trained on code lines, one fine-tuned from it, and a digits classifier (default data)."""
    root = tmp_path_factory.mktemp("runs")
    clm = [*TINY, "--train_file", str(text_file), "--block_size", "32", "--max_train_steps", "3"]
    with pytest.MonkeyPatch.context() as patch:
        run(scripts.clm, [*clm, "--output_dir", str(root / "code-lm")], patch)
        run(scripts.clm, [*clm[2:], "--model_name_or_path", str(root / "code-lm"), "--output_dir",
                          str(root / "tuned")], patch)  # fmt: skip
        pytest.importorskip("sklearn")
        images = [*TINY, "--max_train_steps", "2", "--per_device_train_batch_size", "8", "--max_eval_samples", "40"]
        run(scripts.classification, [*images, "--output_dir", str(root / "digits")], patch)
    return Namespace(clm=root / "code-lm", tuned=root / "tuned", digits=root / "digits")


# Bad input: one line on stderr, exit code 2, before any work


def one_line_error(scripts, module, argv, capsys, monkeypatch) -> str:
    def no_work(*args, **kwargs):
        raise AssertionError("the run started before the input was checked")

    monkeypatch.setattr(module, "create_accelerator", no_work)
    with pytest.raises(SystemExit) as exit_code:
        scripts.args.run_main(lambda: module.main([*map(str, argv)]))
    assert exit_code.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    return stderr


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    # root writes through permission bits: a read-only mount
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip("root cannot mount a read-only tmpfs here")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_bad_files_and_folders_are_one_line_errors(
    scripts, text_file, tmp_path, capsys, monkeypatch, read_only_folder
):
    from PIL import Image

    clm = [*TINY, "--output_dir", tmp_path / "out"]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    message = one_line_error(scripts, scripts.clm, [*TINY, "--output_dir", a_file], capsys, monkeypatch)
    assert f"--output_dir {a_file} is a file, not a folder" in message
    message = one_line_error(scripts, scripts.clm, [*TINY, "--output_dir", read_only_folder / "out"], capsys,
                             monkeypatch)  # fmt: skip
    assert f"cannot write in {read_only_folder}" in message
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))
    message = one_line_error(scripts, scripts.clm, [*clm, "--train_file", latin1], capsys, monkeypatch)
    assert f"--train_file {latin1} is not UTF-8 text: byte 0xe9 at offset 14 (line 2)" in message
    binary = tmp_path / "data.txt"
    binary.write_bytes(b"text\n\x00\x01\x02")
    message = one_line_error(scripts, scripts.clm, [*clm, "--train_file", binary], capsys, monkeypatch)
    assert "holds binary data, not text: a NUL byte at offset 5 (line 2)" in message
    bin_file = tmp_path / "train.bin"
    bin_file.write_bytes(b"\x00" * 64)
    message = one_line_error(scripts, scripts.clm, [*clm, "--train_file", bin_file], capsys, monkeypatch)
    assert "files ending in .bin are not supported" in message and "--enwik8_file" in message
    message = one_line_error(scripts, scripts.clm, [*clm, "--logging_steps", "0"], capsys, monkeypatch)
    assert "--logging_steps=0: allowed: >= 1" in message
    # image folders: empty, with other files, with a file that is not the image its name says
    images = [*TINY, "--output_dir", tmp_path / "out"]
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    message = one_line_error(scripts, scripts.classification, [*images, "--train_dir", empty], capsys, monkeypatch)
    assert f"--train_dir {empty} holds no images" in message
    mixed = tmp_path / "mixed"
    (mixed / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(mixed / "cat" / "0.png")
    (mixed / "cat" / "notes.txt").write_text("not an image")
    message = one_line_error(scripts, scripts.pixels, [*images, "--train_dir", mixed], capsys, monkeypatch)
    assert f"holds 1 files that are not images, e.g. {mixed / 'cat' / 'notes.txt'}" in message
    (mixed / "cat" / "notes.txt").unlink()
    (mixed / "cat" / "1.png").write_text("not a png")
    message = one_line_error(scripts, scripts.classification, [*images, "--train_dir", mixed], capsys, monkeypatch)
    assert f"{mixed / 'cat' / '1.png'} is not a readable image" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "script, flag, value, allowed",
    [
        ("clm", "--max_grad_norm", "nan", "any number but NaN; <= 0: no clipping"),
        ("clm", "--weight_decay", "-0.1", ">= 0"),
        ("clm", "--num_warmup_steps", "-1", ">= 0"),
        ("clm", "--learning_rate", "-1", "> 0"),
        ("clm", "--learning_rate", "nan", "> 0"),
        ("clm", "--learning_rate", "0", "> 0"),
        ("clm", "--seed", "-1", "[0, 4.29497e+09]"),
        ("clm", "--dataloader_num_workers", "-1", ">= 0; 0: load in the main process"),
        ("clm", "--adam_beta2", "1", "[0, 1)"),
        ("clm", "--block_size", "1", ">= 2"),
        ("clm", "--validation_split_percentage", "0", "(0, 100)"),
        ("clm", "--validation_split_percentage", "100", "(0, 100)"),
        ("clm", "--validation_split_percentage", "-5", "(0, 100)"),
        ("classification", "--image_size", "0", ">= 1"),
        ("classification", "--patch_size", "0", ">= 1"),
        ("classification", "--top_k_accuracy", "-1", ">= 0; 0: no top-k accuracy"),
        ("pixels", "--image_size", "0", ">= 1"),
        ("pixels", "--num_samples", "-2", ">= 0; 0: no samples"),
    ],
)
def test_numeric_flags_out_of_range_are_one_line_errors(scripts, capsys, monkeypatch, tmp_path, script, flag, value,
                                                        allowed):  # fmt: skip
    argv = [*TINY, "--output_dir", tmp_path / "out", flag, value]
    message = one_line_error(scripts, getattr(scripts, script), argv, capsys, monkeypatch)
    shown = value if script != "clm" or flag in ("--seed", "--block_size") or "percentage" in flag else "[-.0-9na]+"
    assert re.search(f"{re.escape(flag)}={shown}: allowed: {re.escape(allowed)}\\.$", message.strip()), message
    assert not (tmp_path / "out").exists()


def test_every_numeric_flag_of_the_scripts_has_a_range(scripts):
    import argparse

    import convert_to_aft
    import generate

    parsers = []
    for module in (scripts.clm, scripts.classification, scripts.pixels, convert_to_aft, generate):
        seen = []
        original = argparse.ArgumentParser.parse_args

        def capture(self, *args, _seen=seen, **kwargs):
            _seen.append(self)
            raise SystemExit(0)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(argparse.ArgumentParser, "parse_args", capture)
            patch.setattr(sys, "argv", ["x"])
            with pytest.raises(SystemExit):
                module.parse_args()
        assert seen and argparse.ArgumentParser.parse_args is original
        parsers += seen
    numeric = {a.dest for p in parsers for a in p._actions if a.type in (int, float)}
    assert numeric and numeric <= set(scripts.args.RANGES), numeric - set(scripts.args.RANGES)


def test_a_model_that_is_not_aft_is_refused_with_the_way_to_convert_it(scripts, capsys, monkeypatch, tmp_path):
    """A GPT-2 folder used to load as a new, random AFT model named after it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=300, n_positions=64)).save_pretrained(gpt2)
    capsys.readouterr()  # the saving's progress bar
    out = tmp_path / "out"
    for module in (scripts.clm, scripts.classification, scripts.pixels):
        argv = ["--model_name_or_path", gpt2, "--output_dir", out]
        message = one_line_error(scripts, module, argv, capsys, monkeypatch)
        assert f"--model_name_or_path {gpt2} is not an AFT model (model_type 'gpt2', not 'aft')" in message
        assert "scripts/convert_to_aft.py" in message
    assert not out.exists()


def test_max_grad_norm_zero_means_no_clipping_as_in_hf_trainer(scripts, text_file, tmp_path, monkeypatch, caplog):
    """0 (and any value <= 0) trains as without clipping, and says so; it used to zero every gradient."""
    common = [*TINY, "--train_file", text_file, "--block_size", "32", "--max_train_steps", "2", "--weight_decay", "0"]
    caplog.set_level("INFO")
    for name, norm in (("zero", "0"), ("huge", "1e30")):
        run(
            scripts.clm,
            [*map(str, common), "--max_grad_norm", norm, "--output_dir", str(tmp_path / name)],
            monkeypatch,
        )
    assert "--max_grad_norm=0: gradients are not clipped" in caplog.text
    from safetensors.torch import load_file

    zero, huge = (load_file(tmp_path / name / "model.safetensors") for name in ("zero", "huge"))
    assert all(torch.equal(zero[k], huge[k]) for k in huge)


def test_help_lists_the_scheduler_names_the_parser_accepts(scripts, capsys):
    with pytest.raises(SystemExit):
        scripts.clm.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "SchedulerType." not in text and "cosine" in text and "constant_with_warmup" in text
    args, _ = scripts.clm.parse_args(["--lr_scheduler_type", "linear", "--output_dir", "x"])
    assert args.lr_scheduler_type == "linear"


# The tokenizer: special tokens, left padding, batched pipelines, generation that stops at eos


def test_byte_tokenizer_batches_like_a_causal_lm_tokenizer(folders):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(folders.clm)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>",) * 2 + ("<|pad|>",)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (256, 257, 258)
    assert tokenizer.model_max_length == 256  # the tiny preset's max_position_embeddings
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch["input_ids"] == [[257, 257, 97, 98], [97, 98, 99, 100]]  # left padding, as generate() needs
    assert batch["attention_mask"] == [[0, 0, 1, 1], [1, 1, 1, 1]]
    generator = pipeline("text-generation", model=str(folders.clm), batch_size=2)
    prompts = ["def add_", "def add_1(a, b):  return"]
    batched = generator(prompts, max_new_tokens=6, do_sample=False)
    assert batched == [generator(p, max_new_tokens=6, do_sample=False) for p in prompts]
    model = AutoModelForCausalLM.from_pretrained(folders.clm)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (256, 257)
    inputs = tokenizer("def ", return_tensors="pt")
    # once eos is generated, generation stops (here it is made the most likely token)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False, sequence_bias={(256,): 50.0})
    assert out[0].tolist() == [*inputs["input_ids"][0].tolist(), 256]


# The image-classification pipeline on the script's default output


def test_saved_tokenizers_have_a_chat_template(scripts, folders, text_file, tmp_path, monkeypatch):
    """apply_chat_template works on a trained folder (byte tokenizer and trained BPE), with the tokenizer's own
    eos closing each turn."""
    from transformers import AutoTokenizer

    bpe = tmp_path / "bpe"
    argv = [*TINY, "--train_file", text_file, "--block_size", "32", "--max_train_steps", "1", "--train_tokenizer",
            "--tokenizer_vocab_size", "300", "--output_dir", bpe]  # fmt: skip
    run(scripts.clm, [*map(str, argv)], monkeypatch)
    chat = [{"role": "user", "content": "add 1 and 2"}, {"role": "assistant", "content": "3"}]
    for folder in (folders.clm, bpe):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
        assert text == "user: add 1 and 2<|endoftext|>assistant: 3<|endoftext|>"
        prompt = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
        assert prompt == "user: add 1 and 2<|endoftext|>assistant: "
        ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        assert tokenizer.decode(ids) == text and ids.count(tokenizer.eos_token_id) == 2


def test_image_classification_pipeline_on_the_default_digits_output(folders, tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(folders.digits))
    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    grey.save(tmp_path / "digit.png")
    labels = {str(d) for d in range(10)}
    by_input = [classify(grey.convert("RGB")), classify(grey), classify(str(tmp_path / "digit.png"))]
    for result in by_input:
        assert len(result) == 5 and {r["label"] for r in result} <= labels
    assert by_input[0] == by_input[1] == by_input[2]  # grey images are converted to RGB, as in training
    assert json.loads((folders.digits / "config.json").read_text())["num_channels"] == 3


# Model cards


def usage_section(folder: Path) -> str:
    text = (folder / "README.md").read_text()
    return text.split("## Usage", 1)[1].split("## Training", 1)[0]


def test_model_cards_use_no_local_path_and_name_the_base_model(folders):
    from huggingface_hub import ModelCard

    for folder in (folders.clm, folders.tuned, folders.digits):
        usage = usage_section(folder)
        assert (
            str(folder.parent) not in usage and f"from_pretrained('./{folder.name}', trust_remote_code=True)" in usage
        )
    assert ModelCard.load(folders.tuned / "README.md").data.base_model is None  # a local folder is no Hub id
    assert ModelCard.load(folders.clm / "README.md").data.base_model is None
    # the example prompts come from the model's own data, not a fixed "def fibonacci"
    usage = usage_section(folders.clm)
    assert "fibonacci" not in usage and "tokenizer('def add_" in usage and "batch_size=2" in usage


def test_model_card_usage_takes_the_hub_id(scripts, text_file, tmp_path):
    out = tmp_path / "local-name"
    args = [*TINY, "--train_file", str(text_file), "--block_size", "32", "--max_train_steps", "1"]
    scripts.clm.main([*args, "--hub_model_id", "someone/aft-code", "--output_dir", str(out)])
    usage = usage_section(out)
    assert "from_pretrained('someone/aft-code', trust_remote_code=True)" in usage and "local-name" not in usage


# Metrics through evaluate modules, offline


def test_shipped_metric_modules_load_offline_and_agree_with_numpy(scripts):
    import numpy as np

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 7))
    labels = rng.integers(0, 7, size=50)
    ranked = np.argsort(-scores, axis=1)
    accuracy = scripts.metrics.load_metric("accuracy").compute(predictions=ranked[:, 0], references=labels)
    assert accuracy == {"accuracy": float((ranked[:, 0] == labels).mean())}
    top = scripts.metrics.load_metric("top_k_accuracy").compute(predictions=ranked, references=labels, k=[1, 3])
    expected = [float(np.mean([labels[i] in ranked[i, :k] for i in range(50)])) for k in (1, 3)]
    assert [top["top_1_accuracy"], top["top_3_accuracy"]] == expected
    nats, tokens = rng.uniform(1, 10, size=20), rng.integers(1, 5, size=20)
    values = scripts.metrics.load_metric("cross_entropy").compute(nats=nats, tokens=tokens, tokens_per_byte=0.5)
    loss = nats.sum() / tokens.sum()
    assert values["loss"] == pytest.approx(loss) and values["perplexity"] == pytest.approx(np.exp(loss))
    assert values["bits_per_byte"] == pytest.approx(loss / np.log(2) * 0.5)
    with pytest.raises(scripts.args.InputError, match="cannot load this evaluate module"):
        scripts.metrics.load_metric("no-such-metric-anywhere")


ERROR_RATE = """
import datasets
import evaluate


class ErrorRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="", citation="", features=datasets.Features(
            {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        return {"error_rate": sum(p != r for p, r in zip(predictions, references)) / len(references)}
"""


def test_classification_reports_accuracy_top_k_and_a_metric_of_choice(scripts, folders, tmp_path):
    results = json.loads((folders.digits / "all_results.json").read_text())
    assert 0 <= results["eval_accuracy"] <= results["eval_top_5_accuracy"] <= 1
    from huggingface_hub import ModelCard

    metrics = {r.metric_name for r in ModelCard.load(folders.digits / "README.md").data.eval_results}
    assert {"eval_accuracy", "eval_top_5_accuracy", "eval_loss"} <= metrics
    module = tmp_path / "error_rate"
    module.mkdir()
    (module / "error_rate.py").write_text(ERROR_RATE)
    out = tmp_path / "with-metric"
    images = [*TINY, "--max_train_steps", "2", "--per_device_train_batch_size", "8", "--max_eval_samples", "40"]
    scripts.classification.main([*images, "--metric", str(module), "--output_dir", str(out)])
    mine = json.loads((out / "all_results.json").read_text())
    assert mine["eval_error_rate"] == pytest.approx(1 - results["eval_accuracy"])  # the same run, another metric
    assert mine["eval_top_5_accuracy"] == results["eval_top_5_accuracy"] and "eval_accuracy" not in mine


# Progress bars


def test_a_run_that_fails_while_training_leaves_no_progress_bar_open(scripts, text_file, tmp_path, monkeypatch):
    """A bar left open prints its line whenever it is garbage-collected: in a test session, after the summary."""
    from tqdm import tqdm

    loop = sys.modules["training_loop"]
    steps = []

    def fails_at_the_second_step(value):
        steps.append(value)
        if len(steps) == 2:
            raise RuntimeError("a step fails")
        return loop_as_loss_and_terms(value)

    loop_as_loss_and_terms = loop.as_loss_and_terms
    monkeypatch.setattr(loop, "as_loss_and_terms", fails_at_the_second_step)
    argv = [*TINY, "--train_file", text_file, "--block_size", "32", "--max_train_steps", "3"]
    with pytest.raises(RuntimeError, match="a step fails") as failure:
        scripts.clm.main([*map(str, argv), "--output_dir", str(tmp_path / "out")])
    # the traceback keeps the loop's frame alive, as a test report or a debugger does
    assert failure.value.__traceback__ is not None
    assert not [bar for bar in tqdm._instances if bar.total == 3 and not bar.disable]
