import importlib
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest
import torch

# Triton wraps its standard library (tl.max, tl.sum, ...) for its interpreter or for the GPU compiler when triton is
# imported, which `import aft` does: the "triton" kernels run on the tests' CPU tensors only under the interpreter,
# so it is on before that import.
os.environ.setdefault("TRITON_INTERPRET", "1")

from aft import AFTConfig  # noqa: E402
from aft.ops_aft import AFT_VARIANTS  # noqa: E402

# the native kernel's builds go to a folder of this test session, not the user's cache (subprocesses inherit it)
os.environ.setdefault("AFT_NATIVE_CACHE", tempfile.mkdtemp(prefix="aft-native-tests-"))

VARIANTS = tuple(AFT_VARIANTS)  # every test over variants reads the variant table


def tiny_config(variant: str, **overrides) -> AFTConfig:
    """A model small enough for CPU tests in seconds, with every variant's knobs set small."""
    kwargs = {
        "aft_variant": variant,
        "vocab_size": 37,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 96,
        "local_window_size": 3,
        "position_bias_rank": 4,
        "conv_kernel_size": 3,
        "num_heads": 4,
        "pad_token_id": 0,
        "eos_token_id": None,
        "bos_token_id": None,
    }
    kwargs.update(overrides)
    return AFTConfig(**kwargs)


def enable_checkpointing(model):
    """Activation checkpointing under the name of the installed transformers (5.22 renamed the method)."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
BENCHMARKS = SCRIPTS.parent / "benchmarks"


def free_port() -> int:
    """A TCP port free on this machine now, for a test's process group (a fixed one collides with whatever else runs
    here)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def import_scripts(**modules):
    """A generator for a module-scoped fixture: the scripts' modules (name=module in scripts/) imported as the scripts
    import them, with no Hub and one thread, as the script processes of the tests (sums in another order differ in
    the last bits). Yields a Namespace of them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(SCRIPTS))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield Namespace(**{key: importlib.import_module(name) for key, name in modules.items()})
    torch.set_num_threads(threads)


def import_lab(**modules):
    """A generator for a module-scoped fixture: the lab's modules (name=module in benchmarks/) imported as its scripts
    import them (benchmarks/ and the scripts' plumbing in scripts/ on sys.path), with no Hub and one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(SCRIPTS))
        patch.syspath_prepend(str(BENCHMARKS))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield Namespace(**{key: importlib.import_module(name) for key, name in modules.items()})
    torch.set_num_threads(threads)


def logits_as_remote_code(folder, ids, tmp_path, then: str = "") -> torch.Tensor:
    """The logits of `folder`'s model on `ids`, loaded as Hub remote code in a fresh process where the package `aft`
    cannot be imported (and `then`, more lines run there with `model` and `ids`)."""
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["aft"] = None  # the package is not importable in this process
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        with torch.no_grad():
            torch.save(model(ids).logits, {str(tmp_path / "logits.pt")!r})
        """
    ) + textwrap.dedent(then)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return torch.load(tmp_path / "logits.pt")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator of a process (Trainer makes one):
    a test that trains in bf16 would leave every later in-process run of its worker in bf16. The test runs from no
    state and leaves none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def write_code_text(folder: Path) -> Path:
    """train.txt (500 lines) and valid.txt (100 lines) of tiny code in `folder`, for the scripts' test runs."""
    lines = [f"def f{i}(x):  # {'abcdefgh'[i % 8] * (i % 5)}" for i in range(600)]
    (folder / "train.txt").write_text("\n".join(lines[:500]) + "\n")
    (folder / "valid.txt").write_text("\n".join(lines[500:]) + "\n")
    return folder


def tiny_clm_argv(text_files: Path, **flags) -> list[str]:
    """run_clm.py's arguments for a tiny run on write_code_text's files: 32 training blocks of 32 tokens in batches
    of 4 (8 batches per epoch); `flags` add or replace options."""
    args = {
        "preset": "tiny",
        "seed": 0,
        "block_size": 32,
        "train_file": text_files / "train.txt",
        "validation_file": text_files / "valid.txt",
        "max_train_samples": 32,
        "max_eval_samples": 16,
        "per_device_train_batch_size": 4,
        **flags,
    }
    return [item for key, value in args.items() for item in (f"--{key}", str(value))]
