"""The model cards as a reader of the Hub meets them: for a tiny folder of each kind the scripts write (causal LM,
fine-tuned LM, image classifier, pixel model, converted GPT-2) and the study's cards (AFT and GPT-2), the card's
Python usage runs as written in a fresh process where the package `aft` cannot be imported (the card's model id
replaced by the folder's path), its install line names only packages that exist, and nothing in it names a path
of the machine it was written on."""

import ast
import os
import re
import shlex
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import SCRIPTS, import_lab, import_scripts
from huggingface_hub import ModelCard

pytest.importorskip("accelerate")
pytest.importorskip("datasets")

TINY = ["--preset", "tiny", "--seed", "0", "--logging_steps", "1"]
QUOTED = 'lm "quoted" it\'s'  # an --output_dir that would break code written with '...' or "..." around it


@pytest.fixture(scope="module")
def scripts():
    yield from import_scripts(
        clm="run_clm", classification="run_image_classification", pixels="run_pixel_modeling", convert="convert_to_aft"
    )


def run(module, argv):
    """main(argv) as `python /abs/path/scripts/<module>.py argv` runs it (sys.argv is what the card records)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [str(SCRIPTS / f"{module.__name__}.py"), *map(str, argv)])
        module.main([*map(str, argv)])


@pytest.fixture(scope="module")
def folders(scripts, tmp_path_factory):
    """One tiny folder of each kind, every path given to the scripts absolute (as a user's shell may give them)."""
    from test_convert import save_gpt2

    root = tmp_path_factory.mktemp("cards")
    text = root / "code.txt"
    text.write_text("".join(f"def add_{i}(a, b):  return a + b + {i}\n" for i in range(400)))
    # 48 positions: the prompts (about 37 bytes) leave fewer than the usage's 50 new tokens
    clm = [*TINY, "--train_file", text, "--block_size", "32", "--max_train_steps", "2"]
    run(scripts.clm, [*clm, "--config_overrides", "max_position_embeddings=48", "--output_dir", root / QUOTED])
    run(scripts.clm, [*clm[2:], "--model_name_or_path", root / QUOTED, "--output_dir", root / "tuned"])
    pytest.importorskip("sklearn")
    images = [*TINY, "--max_train_steps", "1", "--per_device_train_batch_size", "8", "--max_eval_samples", "16"]
    run(scripts.classification, [*images, "--output_dir", root / "digits"])
    run(scripts.pixels, [*images, "--num_samples", "0", "--output_dir", root / "pixels"])
    save_gpt2(root / "source")
    small = ["--local_window_size", "3", "--position_bias_rank", "4", "--conv_kernel_size", "3"]
    scripts.convert.main([str(root / "source"), str(root / "gpt2"), "--aft_variant", "local", *small])
    return Namespace(
        root=root,
        kinds={"clm": root / QUOTED, "tuned": root / "tuned", "digits": root / "digits", "pixels": root / "pixels",
               "converted": root / "gpt2"},
    )  # fmt: skip


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def run_without_aft(code: str, tmp_path: Path):
    """`code` in a fresh process where `import aft` fails, offline, in an empty folder."""
    script = tmp_path / "usage.py"
    script.write_text(code)
    wrapper = f'import sys\nsys.modules["aft"] = None\nexec(compile(open({str(script)!r}).read(), "usage.py", "exec"))'
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-c", wrapper], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("kind", ["clm", "tuned", "digits", "pixels", "converted"])
def test_card_usage_runs_as_written_without_the_package(folders, kind, tmp_path):
    folder = folders.kinds[kind]
    card = (folder / "README.md").read_text()
    blocks = python_blocks(card)
    assert blocks and all(ast.parse(block) for block in blocks)  # an --output_dir with quotes breaks no code
    usage = "\n".join(blocks)
    assert "import aft" not in usage and "pip install aft" not in card and "aft-transformers" not in card
    model_id = f"./{folder.name}"  # its own folder, never a Hub model of that name (a folder "gpt2")
    calls = re.findall(r"from_pretrained\(([^,)]*)|pipeline\([^)]*model=([^,)]*)", usage)
    assert calls and {ast.literal_eval(a or b) for a, b in calls} == {model_id}
    assert usage.count("trust_remote_code=True") == len(calls)
    if kind != "converted":
        assert "pipeline(" in usage or kind == "pixels"
    install = re.search(r"```bash\npip install (.*)\n```", card).group(1)
    packages = {re.split(r"[<>=]", p)[0] for p in shlex.split(install)}
    assert packages == {"transformers", "torch", *({"pillow"} if kind == "digits" else set())}
    result = run_without_aft(usage.replace(repr(model_id), repr(str(folder))), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("kind", ["clm", "tuned", "digits", "pixels", "converted"])
def test_card_names_no_path_of_the_machine(folders, kind):
    card = (folders.kinds[kind] / "README.md").read_text()
    for path in (folders.root, SCRIPTS.parent, Path.home()):
        assert str(path) not in card, path
    commands = re.findall(r"```bash\n(.*?)```", card, flags=re.S)
    assert not [arg for command in commands for arg in shlex.split(command) if arg.startswith("/")]


def test_card_command_shows_the_script_and_the_output_folder_as_its_usage_does(folders):
    card = (folders.kinds["clm"] / "README.md").read_text()
    command = re.search(r"## Training.*?```bash\n(.*?)\n```", card, flags=re.S).group(1)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "scripts/run_clm.py"] and argv[-2:] == ["--output_dir", f"./{QUOTED}"]
    assert argv[argv.index("--train_file") + 1] == "code.txt"


def test_base_model_is_a_hub_id_or_left_out_with_the_reason(folders):
    tuned = ModelCard.load(folders.kinds["tuned"] / "README.md")
    assert tuned.data.base_model is None
    assert f"no `base_model`: the run started from the local folder `{QUOTED}`" in tuned.text
    assert f"| model_name_or_path | {QUOTED} |" in tuned.text
    converted = ModelCard.load(folders.kinds["converted"] / "README.md")
    assert converted.data.base_model is None and "no `base_model`" in converted.text
    clm = ModelCard.load(folders.kinds["clm"] / "README.md")
    assert clm.data.base_model is None and "no `base_model`" not in clm.text  # trained from scratch


def test_card_generation_stays_within_the_positions(folders):
    usage = "\n".join(python_blocks((folders.kinds["clm"] / "README.md").read_text()))
    prompts = ast.literal_eval(re.search(r"generator\((\[.*?\]),", usage).group(1))
    longest = max(len(p.encode()) for p in prompts) + 1  # bytes and the start token at most
    budgets = [int(n) for n in re.findall(r"max_new_tokens=(\d+)", usage)]
    assert budgets and all(0 < n <= 48 - longest + 1 for n in budgets) and max(budgets) < 50


# The study's cards (benchmarks/study.py), from a results.json of its form and two tiny saved models


@pytest.fixture(scope="module")
def lab():
    yield from import_lab(study="study", harness="harness", data="training_data")


@pytest.fixture(scope="module")
def study_cards(lab, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    tokenizer = lab.data.byte_tokenizer()
    row = {"steps": 2, "tokens_seen": 64, "validation_bits_per_byte": 7.9, "test_bits_per_byte": 7.8,
           "tokens_per_second": 100.0, "peak_step_memory_bytes": 2**20}  # fmt: skip
    runs = []
    for name in ("gpt2", "aft-local"):
        model = lab.harness.causal_lm(name, hidden=16, layers=1, heads=2, vocab=len(tokenizer), positions=24, window=4)
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        runs.append({**row, "model": name, "seed": 0, "parameters": sum(p.numel() for p in model.parameters())})
    summary = {r["model"]: {"values": [7.8], "mean": 7.8, "spread": 0.0} for r in runs}
    results = {
        "equal_steps": {"runs": runs},
        "summary": {"equal_steps": {"test_bits_per_byte": summary}},
        "data": {"corpus": "local text", "tokenizer": "bytes", "block_size": 24},
        "recipe": {"learning_rate": 0.001},
        "machine": {"cpus": 2, "torch_threads": 1},
        "command": f"python {SCRIPTS.parent / 'benchmarks' / 'study.py'} --quick --output_dir {out}",
    }
    for name in ("gpt2", "aft-local"):
        lab.study.write_card(out / name, name, 0, results)
    return out


@pytest.mark.parametrize("name", ["gpt2", "aft-local"])
def test_study_card_usage_loads_its_own_folder_and_runs_without_the_package(study_cards, name, tmp_path):
    card = (study_cards / name / "README.md").read_text()
    usage = "\n".join(python_blocks(card))
    assert "import aft" not in usage and "aft-transformers" not in card
    assert f"from_pretrained('./{name}'" in usage  # never from_pretrained("gpt2"), OpenAI's GPT-2 on the Hub
    assert ("trust_remote_code=True" in usage) == (name != "gpt2")
    new_tokens = int(re.search(r"max_new_tokens=(\d+)", usage).group(1))
    assert new_tokens + len(b"def fibonacci(n):") <= 24  # within the model's 24 positions
    assert "(1 torch thread)" in card and str(study_cards.parent) not in card and str(SCRIPTS.parent) not in card
    assert "python benchmarks/study.py --quick --output_dir ./out" in card
    result = run_without_aft(usage.replace(repr(f"./{name}"), repr(str(study_cards / name))), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_run_pushed_to_the_hub_names_and_uploads_to_the_repository_found_at_start_up(scripts, tmp_path):
    """--push_to_hub with the Hub faked: the repository check_hub settled at start-up is the card's model id and
    name, and the one the folder is uploaded to."""
    uploads = []

    class Hub:
        def __init__(self, token=None):
            self.token = token

        def upload_folder(self, **kwargs):
            uploads.append(kwargs)

    text = tmp_path / "code.txt"
    text.write_text("".join(f"def add_{i}(a, b):  return a + b + {i}\n" for i in range(400)))
    out = tmp_path / "pushed"
    argv = [*TINY, "--train_file", text, "--block_size", "32", "--max_train_steps", "1", "--push_to_hub"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys.modules["training_checks"], "check_hub", lambda args: "someone/aft-pushed")
        patch.setattr(sys.modules["training_publish"], "HfApi", Hub)
        run(scripts.clm, [*argv, "--output_dir", out])
    card = ModelCard.load(out / "README.md")
    assert card.data.model_name == "someone/aft-pushed"
    assert "from_pretrained('someone/aft-pushed'" in card.text  # the usage code's model id
    assert [(upload["repo_id"], Path(upload["folder_path"])) for upload in uploads] == [("someone/aft-pushed", out)]
