"""benchmarks/conversion_study.py --quick on a tiny GPT-2 and a results.json in the study's format: every row trained
(scripts/run_clm.py in a process of its own), evaluated on both halves and timed; the targets, the table and the plot
written; --plot_only redraws from results.json alone."""

import json
import runpy
import sys

import pytest
import torch
from conftest import SCRIPTS, import_lab

pytest.importorskip("accelerate")
pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def lab():
    yield from import_lab(conversion="conversion_study", data="training_data", args="training_args")


def save_gpt2(folder, lab):
    """A random tiny GPT-2 with run_clm.py's byte tokenizer (256 bytes, eos 256, pad 257)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=258, n_positions=32, n_embd=16, n_layer=2, n_head=2, n_inner=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=256, eos_token_id=256, pad_token_id=257,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    lab.data.byte_tokenizer().save_pretrained(folder)
    return folder


def run_in_this_process(script, argv, monkeypatch):
    """`python scripts/<script> ARGV` as the study runs it, in this process: the scripts' own start-up (imports,
    accelerate) is what the study's separate processes cost, and it is the same code either way."""
    path = str(SCRIPTS / script)
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", [path, *argv])
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as stop:
            assert stop.code in (None, 0), f"{script} {argv} exited with {stop.code}"


def test_conversion_study_quick(lab, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(
        lab.conversion, "run_script", lambda script, argv: run_in_this_process(script, argv, monkeypatch)
    )
    text = tmp_path / "code.txt"
    text.write_text("".join(f"def add_{i}(a, b):\n    return a + b * {i}\n" for i in range(40)))
    source = save_gpt2(tmp_path / "gpt2", lab)
    curve = [{"step": 5, "value": 7.0}, {"step": 10, "value": 6.5}]
    study = {
        "command": "python benchmarks/study.py --quick",
        "recipe": {"learning_rate": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.99], "max_grad_norm": 1.0,
                   "batch_size": 4, "block_size": 32, "seeds": [0, 1]},
        "architecture": {"window": 4, "bias_rank": 4},
        "lr_sweep": {"chosen": {"gpt2": 1e-3, "aft-local": 2e-3}},
        "equal_steps": {"runs": [{"model": "gpt2", "steps": 10, "curve": curve, "validation_bits_per_byte": 6.5,
                                  "test_bits_per_byte": 6.4, "tokens_per_second": 1000.0}]},
    }  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(study))
    out = tmp_path / "conversion"
    conversion = lab.conversion
    conversion.main(
        ["--quick", "--source", str(source), "--study_results", str(tmp_path / "results.json"), "--output_dir",
         str(out), "--steps", "2", "--train_file", str(text), "--learning_rate", "5e-4"]
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    # the converted rows at --learning_rate; from scratch at the rate the study's sweep chose for AFT-local
    assert results["learning_rates"] == {"converted": 5e-4, "scratch": 2e-3}
    for record in [*results["runs"], results["scratch_total"]]:
        rate = 2e-3 if record["row"] == "scratch" else 5e-4
        assert record["learning_rate"] == rate and f"--learning_rate {rate}" in record["command"]
    assert sorted(r["row"] for r in results["runs"]) == sorted(conversion.ROWS)
    assert results["scratch_total"]["steps"] == 12  # the source's 10 + the largest K
    for record in [*results["runs"], results["scratch_total"], results["source"]]:
        assert 0 < record["validation_bits_per_byte"] < 20 and 0 < record["test_bits_per_byte"] < 20
    assert all(r["curve"][-1]["step"] == 2 for r in results["runs"])
    distilled = next(r for r in results["runs"] if r["row"] == "copy+distill")
    assert distilled["final_kl_loss"] >= 0 and "--teacher_model" in distilled["command"]
    assert set(results["targets"]) == {"copy", "copy+distill", "fresh", "fresh+distill"}
    assert set(results["training_speed"]) == {"gpt2", "aft-local", "aft-local+distill"}
    assert all(v["seconds_per_token"] > 0 for v in results["decoding"].values())
    assert results["table"].count("\n") == 2 + 1 + 2 + 5 + 1 - 1  # header, GPT-2, untrained x2, rows, total
    assert sorted(p.name for p in out.iterdir()) == ["conversion.png", "results.json"]
    (out / "conversion.png").unlink()
    conversion.main(["--plot_only", "--output_dir", str(out)])  # redrawn from results.json alone
    assert (out / "conversion.png").is_file()
    with pytest.raises(lab.args.InputError, match=r"--learning_rate=0.0: it must be a positive number"):
        conversion.main(["--source", str(source), "--study_results", str(tmp_path / "results.json"),
                         "--output_dir", str(tmp_path / "unused"), "--learning_rate", "0"])  # fmt: skip
    assert not (tmp_path / "unused").exists()
    with pytest.raises(lab.args.InputError, match="already holds files"):
        conversion.main(["--source", str(source), "--study_results", str(tmp_path / "results.json"),
                         "--output_dir", str(out)])  # fmt: skip


def test_conversion_study_passes_the_phase_to_the_converted_rows(lab, tmp_path, monkeypatch):
    """--freeze_carried_steps reaches run_clm.py for the converted rows only, and must leave steps after it."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    calls = []

    def run_script(script, argv):
        calls.append((script, argv))
        run_in_this_process(script, argv, monkeypatch)

    monkeypatch.setattr(lab.conversion, "run_script", run_script)
    text = tmp_path / "code.txt"
    text.write_text("".join(f"def add_{i}(a, b):\n    return a + b * {i}\n" for i in range(40)))
    source = save_gpt2(tmp_path / "gpt2", lab)
    curve = [{"step": 10, "value": 6.5}]
    study = {
        "command": "python benchmarks/study.py --quick",
        "recipe": {"learning_rate": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.99], "max_grad_norm": 1.0,
                   "batch_size": 4, "block_size": 32, "seeds": [0]},
        "architecture": {"window": 4, "bias_rank": 4},
        "equal_steps": {"runs": [{"model": "gpt2", "steps": 10, "curve": curve, "validation_bits_per_byte": 6.5,
                                  "test_bits_per_byte": 6.4, "tokens_per_second": 1000.0}]},
    }  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(study))
    base = ["--source", str(source), "--study_results", str(tmp_path / "results.json"), "--train_file", str(text)]
    with pytest.raises(lab.args.InputError, match=r"--freeze_carried_steps=3: .* below every K of --steps \[5, 3\]"):
        lab.conversion.main([*base, "--output_dir", str(tmp_path / "unused"), "--steps", "5", "3",
                             "--freeze_carried_steps", "3"])  # fmt: skip
    assert not (tmp_path / "unused").exists() and not calls
    out = tmp_path / "conversion"
    lab.conversion.main([*base, "--quick", "--output_dir", str(out), "--steps", "3", "--rows", "copy+distill",
                         "scratch", "--no_total_row", "--freeze_carried_steps", "2"])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["freeze_carried_steps"] == 2
    commands = {r["row"]: r["command"] for r in results["runs"]}
    assert (
        "--freeze_carried_steps 2" in commands["copy+distill"] and "--freeze_carried_steps" not in commands["scratch"]
    )
    assert "converted, copy+distill, first 2 steps new parameters only" in results["table"]
    trained = [argv for script, argv in calls if script == "run_clm.py" and "--freeze_carried_steps" in argv]
    assert len(trained) == 1 and "--teacher_model" in trained[0]
