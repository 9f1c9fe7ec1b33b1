"""The training scripts end to end, as a user runs them: tiny presets, a few steps, CPU, embedded default data.

Every run is a fresh `python scripts/...` process that imports this repository as `aft`; the saved folders are
loaded in fresh processes, installed and as remote code. About 2.5 minutes on two cores.
"""

import importlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import free_port

pytest.importorskip("accelerate")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
TINY = ["--preset", "tiny", "--logging_steps", "1", "--seed", "0"]
# Language runs: 32 blocks of 32 bytes, batches of 4 with 2 accumulation steps: 4 optimizer steps per epoch, so
# 7 steps cross an epoch boundary, and a checkpoint at step 5 sits inside the second epoch.
CLM = [
    *TINY,
    "--block_size", "32",
    "--max_train_samples", "32",
    "--max_eval_samples", "16",
    "--gradient_accumulation_steps", "2",
    "--max_train_steps", "7",
]  # fmt: skip
IMAGES = [*TINY, "--per_device_train_batch_size", "8", "--max_train_steps", "4", "--max_eval_samples", "32"]


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Environment of a user's process: this repository importable as `aft`, no Hub."""
    package_root = tmp_path_factory.mktemp("pkg")
    (package_root / "aft").symlink_to(REPO, target_is_directory=True)
    environment = dict(os.environ)
    environment.update(
        PYTHONPATH=os.pathsep.join([str(package_root), environment.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_MODULES_CACHE=str(tmp_path_factory.mktemp("modules")),
        # One thread per process: on a shared two-core machine, two spinning OpenMP threads per process made
        # tiny-model steps up to ~50x slower (the numbers do not depend on it).
        OMP_NUM_THREADS="1",
    )
    environment.pop("ACCELERATE_USE_CPU", None)
    return environment


def run_script(env, script: str, *args, launcher=(sys.executable,), expect_ok=True):
    result = subprocess.run(
        [*launcher, str(SCRIPTS / script), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if expect_ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(folder: Path) -> dict:
    """step -> logged train loss."""
    history = json.loads((folder / "log_history.json").read_text())
    return {e["step"]: e["loss"] for e in history if "loss" in e}


@pytest.fixture(scope="session")
def clm_folder(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "clm"
    result = run_script(
        env, "run_clm.py", *CLM, "--per_device_train_batch_size", "4", "--checkpointing_steps", "5",
        "--eval_at_start", "--output_dir", out,
    )  # fmt: skip
    (out.parent / "clm.stderr").write_text(result.stderr)
    return out


@pytest.fixture(scope="session")
def pixel_folder(env, tmp_path_factory):
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("runs") / "pixels"
    run_script(env, "run_pixel_modeling.py", *IMAGES, "--num_samples", "2", "--output_dir", out)
    return out


@pytest.fixture(scope="session")
def classification_folder(env, tmp_path_factory):
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("runs") / "classification"
    run_script(env, "run_image_classification.py", *IMAGES, "--output_dir", out)
    return out


FOLDERS = ["clm_folder", "pixel_folder", "classification_folder"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_output_folder_is_ready_to_upload(folder, request):
    folder = request.getfixturevalue(folder)
    names = {p.name for p in folder.iterdir()}
    expected = {"model.safetensors", "config.json", "README.md", "all_results.json", "log_history.json"}
    expected |= {"configuration_aft.py", "modeling_aft.py", "ops_aft.py"}  # remote code
    assert expected <= names
    assert ("tokenizer.json" in names) or ("preprocessor_config.json" in names)
    if importlib.util.find_spec("matplotlib"):
        assert "loss_curve.png" in names
    config = json.loads((folder / "config.json").read_text())
    kind = "AFTVisionConfig" if folder.name.startswith("classification") else "AFTConfig"
    assert config["auto_map"]["AutoConfig"] == f"configuration_aft.{kind}"
    assert "AutoModel" in config["auto_map"]
    results = json.loads((folder / "all_results.json").read_text())
    assert results["train_steps"] > 0 and all(math.isfinite(v) for v in results.values())


@pytest.mark.parametrize("folder", FOLDERS)
def test_model_card_metadata_parses_and_equals_all_results(folder, request):
    from huggingface_hub import ModelCard

    folder = request.getfixturevalue(folder)
    card = ModelCard.load(folder / "README.md")
    results = json.loads((folder / "all_results.json").read_text())
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag and card.data.license and card.data.datasets and "aft" in card.data.tags
    assert card.data.eval_results
    for result in card.data.eval_results:
        assert result.metric_value == results[result.metric_name]
    text = card.text
    for section in ("## Usage", "trust_remote_code=True", "## Training", "## Results", "## Limitations"):
        assert section in text
    assert "## Citation" in text and "2105.14103" in text
    assert f"--output_dir ./{folder.name}" in text  # the training command, without the machine's folders


def test_language_run_learns(clm_folder):
    history = json.loads((clm_folder / "log_history.json").read_text())
    first_eval = next(e for e in history if "eval_bits_per_byte" in e)
    assert first_eval["step"] == 0 and 7.0 < first_eval["eval_bits_per_byte"] < 8.5  # untrained: about 8
    results = json.loads((clm_folder / "all_results.json").read_text())
    assert results["eval_bits_per_byte"] < first_eval["eval_bits_per_byte"]
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-5)


LOAD = """
import json, sys
{block}
import torch
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageClassification, AutoTokenizer
kw = {kw}
clm, pixels, classification = sys.argv[1:4]
out = {{}}
tokenizer = AutoTokenizer.from_pretrained(clm)
model = AutoModelForCausalLM.from_pretrained(clm, **kw)
ids = model.generate(**tokenizer("def ", return_tensors="pt"), max_new_tokens=12, do_sample=False)
out["text"] = tokenizer.decode(ids[0])
model = AutoModelForCausalLM.from_pretrained(pixels, **kw)
start = torch.full((1, 1), model.config.bos_token_id)
out["pixels"] = model.generate(input_ids=start, max_new_tokens=64, do_sample=False)[0].tolist()
processor = AutoImageProcessor.from_pretrained(classification)
model = AutoModelForImageClassification.from_pretrained(classification, **kw)
from PIL import Image
mode = "L" if model.config.num_channels == 1 else "RGB"
image = Image.new(mode, (model.config.image_size, model.config.image_size), 128)
pixel_values = processor(image, return_tensors="pt")["pixel_values"]
out["logits"] = model(pixel_values=pixel_values).logits[0].tolist()
out["modules"] = sorted(type(m).__module__ for m in [model])
print("RESULT" + json.dumps(out))
"""


def load_in_fresh_process(env, folders, remote: bool) -> dict:
    block = "sys.modules['aft'] = None  # not installed" if remote else "import aft"
    code = LOAD.format(block=block, kw="{'trust_remote_code': True}" if remote else "{}")
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, folders)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.split("RESULT", 1)[1])


def test_folders_load_installed_and_as_remote_code(env, clm_folder, pixel_folder, classification_folder):
    folders = (clm_folder, pixel_folder, classification_folder)
    installed = load_in_fresh_process(env, folders, remote=False)
    remote = load_in_fresh_process(env, folders, remote=True)
    assert installed["modules"] == ["aft.modeling_aft"]
    assert remote["modules"][0].startswith("transformers_modules.")
    assert installed["text"].startswith("def ") and len(installed["text"]) > 4
    assert installed["text"] == remote["text"]
    assert installed["pixels"][0] == 256 and all(0 <= p < 256 for p in installed["pixels"][1:])
    assert len(installed["pixels"]) == 65 and installed["pixels"] == remote["pixels"]
    assert installed["logits"] == pytest.approx(remote["logits"], abs=1e-6)


@pytest.fixture
def utils():
    """The scripts' shared modules by job, imported as the scripts import them (scripts/ first on sys.path)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        names = ("args", "model", "data", "loop", "checkpoints", "publish")
        yield Namespace(**{name: importlib.import_module(f"training_{name}") for name in names})
    finally:
        sys.path.remove(str(SCRIPTS))


def test_plan_steps_returns_the_plan_and_leaves_the_arguments_alone(utils):
    args = Namespace(gradient_accumulation_steps=2, max_train_steps=None, num_train_epochs=3, num_warmup_steps=None)
    before = dict(vars(args))
    planned = utils.loop.plan_steps(args, 9)  # 9 batches, 2 per optimizer step: 5 steps per epoch
    assert planned == utils.loop.StepPlan(
        max_train_steps=15, num_train_epochs=3, num_warmup_steps=1, steps_per_epoch=5
    )
    assert vars(args) == before
    args = Namespace(gradient_accumulation_steps=1, max_train_steps=7, num_train_epochs=1, num_warmup_steps=0)
    assert utils.loop.plan_steps(args, 5).as_args() == {
        "max_train_steps": 7,
        "num_train_epochs": 2,
        "num_warmup_steps": 0,
    }
    assert args.num_train_epochs == 1


def test_checkpoints_are_written_by_rename(utils, clm_folder):
    names = sorted(p.name for p in (clm_folder / "checkpoints").iterdir())
    assert names == ["step_5"]  # no temporary folder left behind
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "run_state.json", "config.json"} <= {
        p.name for p in (clm_folder / "checkpoints" / "step_5").iterdir()
    }


def test_bad_input_is_a_one_line_error_with_exit_code_2(env, tmp_path):
    result = run_script(env, "run_clm.py", "--preset", "huge", "--output_dir", tmp_path / "out", expect_ok=False)
    assert result.returncode == 2
    presets = "['cifar10-paper', 'enwik8-paper', 'small', 'small-simple', 'tiny']"
    assert result.stderr.strip() == f"error: unknown --preset 'huge': use one of {presets}."
    assert not (tmp_path / "out").exists()


@pytest.fixture
def scripts(utils):
    return {
        name: importlib.import_module(name) for name in ("run_clm", "run_pixel_modeling", "run_image_classification")
    }


def fails_before_training(utils, main, tmp_path, *args, out=None):
    """Run a script's main() in this process; return the InputError message (and check nothing was trained)."""
    out = out or tmp_path / "out"
    with pytest.raises(utils.args.InputError) as error:
        main([*map(str, args), "--output_dir", str(out)])
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()
    return str(error.value)


def test_bad_inputs_fail_before_training(utils, scripts, tmp_path, clm_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clm = scripts["run_clm"].main
    text = tmp_path / "text.txt"
    text.write_text("a short text\n" * 400)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = [*TINY, "--max_train_steps", "2", "--train_file", text, "--validation_file", text]
    message = fails_before_training(utils, clm, tmp_path, *TINY, "--train_file", tmp_path / "missing.txt")
    assert "does not exist" in message
    message = fails_before_training(utils, clm, tmp_path, *TINY, "--train_file", empty)
    assert "empty" in message or "fewer than" in message
    message = fails_before_training(utils, clm, tmp_path, *base, "--block_size", "512")
    assert "--block_size is 512, larger than the model's max_position_embeddings=256" in message
    message = fails_before_training(utils, clm, tmp_path, *base, "--config_overrides", "layers=3")
    assert "not FIELD=VALUE with a field of AFTConfig" in message
    message = fails_before_training(utils, clm, tmp_path, *base, "--config_overrides", "aft_variant=fancy")
    assert "aft_variant='fancy' is not allowed" in message
    # the checkpoint of the 2-layer tiny model cannot continue a 3-layer model
    message = fails_before_training(
        utils, clm, tmp_path, *base, "--config_overrides", "num_hidden_layers=3",
        "--resume_from_checkpoint", clm_folder / "checkpoints" / "step_5",
    )  # fmt: skip
    assert "from another model configuration (num_hidden_layers: checkpoint 2 vs this run 3)" in message
    # a folder with a user's files
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    message = fails_before_training(utils, clm, tmp_path, *base, out=mine)
    assert "already holds files" in message and (mine / "notes.txt").read_text() == "keep me"
    # no Hub here: --push_to_hub stops at start-up, not after training
    message = fails_before_training(utils, clm, tmp_path, *base, "--push_to_hub", "--hub_token", "hf_none")
    assert "--push_to_hub: cannot use the Hugging Face Hub" in message and "Nothing was trained" in message
    # images: a missing folder, a sequence longer than the model's positions
    pixels = scripts["run_pixel_modeling"].main
    message = fails_before_training(utils, pixels, tmp_path, *TINY, "--train_dir", tmp_path / "no-images")
    assert "does not exist" in message
    pytest.importorskip("sklearn")
    message = fails_before_training(utils, pixels, tmp_path, *TINY, "--config_overrides", "max_position_embeddings=32")
    assert "the sequence length 1 + 8x8x1 is 65, larger than the model's max_position_embeddings=32" in message


def test_two_processes_with_the_shipped_ddp_config_reach_the_losses_of_one(env, clm_folder, tmp_path):
    """The multi-process command of the README and of the model card: two gloo DDP processes through
    scripts/accelerate_configs/ddp.yaml (accelerate 1.15's `--cpu --num_processes 2` starts one process)."""
    out = tmp_path / "two"
    two = dict(env, ACCELERATE_USE_CPU="true")
    config = SCRIPTS / "accelerate_configs" / "ddp.yaml"
    launch = ["--config_file", str(config), "--num_processes", "2"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", str(free_port())]
    # the same global batch: 2 processes x 2 blocks x 2 accumulation steps = 1 process x 4 x 2
    args = [*CLM, "--per_device_train_batch_size", "2", "--output_dir", out]
    run_script(two, "run_clm.py", *args, launcher=launcher)
    one, both = (json.loads((d / "all_results.json").read_text()) for d in (clm_folder, out))
    card = (out / "README.md").read_text()
    assert "| processes | 2 |" in card and "| distributed | MULTI_CPU |" in card
    # the card's command is the one run here, with the shipped config, the script and the folder as the card names
    # them (no path of this machine)
    launch = ["--config_file", "scripts/accelerate_configs/ddp.yaml", "--num_processes", "2"]
    command = shlex.join(["ACCELERATE_USE_CPU=true", "accelerate", "launch", *launch, "scripts/run_clm.py"])
    assert f"{command} {shlex.join([*args[:-1], './two'])}" in card
    assert both["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    for step, loss in losses(out).items():
        assert loss == pytest.approx(losses(clm_folder)[step], rel=1e-5)


def test_logs_hold_no_noise(clm_folder):
    """No accelerate INFO line per checkpoint file, no tied-weight warning, one tokenizing line."""
    stderr = (clm_folder.parent / "clm.stderr").read_text()
    assert "saved checkpoint" in stderr  # the scripts' own line
    for noise in ("accelerate.checkpointing", "Saving current state", "Removed shared tensor", "Traceback"):
        assert noise not in stderr
    assert stderr.count("tokenizing") == 1


def test_scripts_import_no_model_code():
    """Scripts hold no model logic: every nn.Module they use comes from `aft`."""
    for script in [*SCRIPTS.glob("run_*.py"), *SCRIPTS.glob("training_*.py")]:
        source = script.read_text()
        assert "nn.Module" not in source and "class AFT" not in source, script.name


def test_byte_tokenizer_round_trips_bytes(utils, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = utils.data.byte_tokenizer()
    text = "héllo\n\twörld ✓ \x00\x7f end"
    assert tokenizer(text)["input_ids"] == list(text.encode("utf-8"))  # id = byte value
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == 258 and loaded(text)["input_ids"] == list(text.encode("utf-8"))


def test_local_text_with_a_trained_bpe_tokenizer(utils, scripts, tmp_path):
    from transformers import AutoTokenizer

    text = tmp_path / "train.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(300)))
    out = tmp_path / "bpe"
    args = [*TINY, "--train_file", text, "--train_tokenizer", "--tokenizer_vocab_size", "300", "--block_size", "16"]
    scripts["run_clm"].main([*map(str, args), "--max_train_steps", "2", "--output_dir", str(out)])
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (
        len(tokenizer) == 300 and tokenizer.decode(tokenizer("over the lazy dog")["input_ids"]) == "over the lazy dog"
    )
    results = json.loads((out / "all_results.json").read_text())
    bits_per_token = results["eval_loss"] / math.log(2)
    assert results["eval_bits_per_byte"] < bits_per_token / 2  # BPE tokens span several bytes each


def test_enwik8_split_from_a_local_file(utils, scripts, tmp_path):
    data = tmp_path / "enwik8"
    data.write_bytes(("<page><title>AFT</title><text>attention free</text></page>\n" * 400).encode())
    n = data.stat().st_size
    splits = utils.data.enwik8_datasets(str(data), block_size=32)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [
        int(n * 0.9) // 32,
        int(n * 0.05) // 32,
        (n - int(n * 0.9) - int(n * 0.05)) // 32,
    ]
    out = tmp_path / "enwik8-run"
    scripts["run_clm"].main([*TINY, "--enwik8_file", str(data), "--block_size", "32", "--max_train_steps", "2",
                             "--output_dir", str(out)])  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    assert results["test_bits_per_byte"] == pytest.approx(results["test_loss"] / math.log(2), rel=1e-5)


def test_classification_from_an_image_folder(scripts, tmp_path):
    from PIL import Image

    for split, count in (("train", 12), ("validation", 4)):
        for label in ("dark", "light"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (20 + i, 20, 20) if label == "dark" else (230 - i, 230, 230)).save(
                    folder / f"{i}.png"
                )
    out = tmp_path / "folder-run"
    scripts["run_image_classification"].main([
        *TINY, "--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "validation"),
        "--per_device_train_batch_size", "4", "--max_train_steps", "2", "--output_dir", str(out),
    ])  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "dark", "1": "light"} and config["num_channels"] == 3
    assert json.loads((out / "all_results.json").read_text())["eval_samples"] == 8


def test_fine_tune_from_a_saved_folder(utils, scripts, clm_folder, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 200)
    out = tmp_path / "fine-tuned"
    base = ["--train_file", str(text), "--block_size", "32", "--max_train_steps", "2", "--seed", "0"]
    with pytest.raises(utils.args.InputError, match="drop them with --model_name_or_path"):
        scripts["run_clm"].main([*base, "--model_name_or_path", str(clm_folder), "--preset", "tiny",
                                 "--output_dir", str(out)])  # fmt: skip
    scripts["run_clm"].main(
        [*base, "--model_name_or_path", str(clm_folder), "--with_tracking", "--output_dir", str(out)]
    )
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert (out / "tokenizer.json").read_text() == (clm_folder / "tokenizer.json").read_text()
    assert "| model_name_or_path | " in (out / "README.md").read_text()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_cpu_training_keeps_freed_memory(clm_folder):
    """On a CPU the training scripts apply the allocator setting the training benchmark measured faster."""
    stderr = (clm_folder.parent / "clm.stderr").read_text()
    assert stderr.count("glibc keeps freed memory in the process") == 1
