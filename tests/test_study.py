"""The evidence study (benchmarks/study.py) end to end at its --quick size, as a user runs it, and its bad input.

One `--quick` run (a fresh process, OMP_NUM_THREADS=1, on small local text files so that tokenizing takes no time):
results.json holds every part, its numbers are finite and agree with each other, and the saved models load and
carry their row in their cards.
"""

import argparse
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import import_lab

pytest.importorskip("accelerate")
pytest.importorskip("datasets")
pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "study.py"


@pytest.fixture(scope="module")
def run_study():
    yield from (lab.study for lab in import_lab(study="study"))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """run(output_dir, *args) -> results.json of `run_study.py --quick` on small local text, in a fresh process."""
    root = tmp_path_factory.mktemp("study")
    package_root = root / "pkg"
    package_root.mkdir()
    (package_root / "aft").symlink_to(REPO, target_is_directory=True)
    # Real Python source, a few hundred KB: the embedded corpus's kind of text without its tokenizing time.
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    (root / "train.txt").write_text("".join(p.read_text(errors="replace") for p in sources[:20])[:200_000])
    (root / "valid.txt").write_text("".join(p.read_text(errors="replace") for p in sources[-10:])[:40_000])
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(package_root), env.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(root / "datasets-cache"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )

    def run(out, *args, returncode=0):
        command = [sys.executable, str(SCRIPT), "--quick", "--output_dir", str(out), *args]
        command += ["--train_file", str(root / "train.txt"), "--validation_file", str(root / "valid.txt")]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == returncode, result.stderr[-4000:]
        run.stderr = result.stderr
        return json.loads((Path(out) / "results.json").read_text())

    return run


@pytest.fixture(scope="module")
def study(quick, tmp_path_factory):
    out = tmp_path_factory.mktemp("study-out") / "out"
    return out, quick(out)


def numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


def all_runs(results):
    for part in ("equal_steps", "equal_time", "pixels", "classification"):
        for run in results[part]["runs"]:
            yield part, run
    for point in results["window_ablation"]["points"]:
        yield "window_ablation", point


def test_every_part_with_finite_numbers(study):
    _, results = study
    assert results["complete"]
    for part in ("equal_steps", "equal_time", "window_ablation", "pixels", "classification", "summary"):
        assert part in results, part
    assert all(math.isfinite(x) for x in numbers(results))
    assert results["machine"]["cpus"] >= 1 and results["load_average"]["samples"] >= 1
    # every part's own wall time, each within the whole run's
    assert set(results["part_seconds"]) == set(results["parts_done"])
    assert all(0 < t <= results["wall_seconds"] for t in results["part_seconds"].values())


def test_tokens_steps_and_clocks_agree(study):
    _, results = study
    batch, block = results["recipe"]["batch_size"], results["recipe"]["block_size"]
    for part, run in all_runs(results):
        if part in ("equal_steps", "equal_time", "window_ablation"):
            assert run["tokens_per_step"] == batch * block
        assert run["tokens_seen"] == run["steps"] * run["tokens_per_step"], (part, run["model"])
        assert run["tokens_per_second"] == pytest.approx(run["tokens_seen"] / run["train_seconds"])
        assert run["peak_step_memory_bytes"] > 0
        curve = run["curve"]
        assert [p["step"] for p in curve] == sorted({p["step"] for p in curve}) and curve[-1]["step"] == run["steps"]
        assert all(p["tokens"] == p["step"] * run["tokens_per_step"] for p in curve)
        assert curve[-1]["seconds"] == pytest.approx(run["train_seconds"])


def test_equal_steps_and_equal_time(study, run_study):
    _, results = study
    steps = results["equal_steps"]
    models = {(r["model"], r["seed"]) for r in steps["runs"]}
    seeds = results["recipe"]["seeds"]
    assert {m for m, _ in models} == set(run_study.LM_MODELS)
    assert {(m, s) for m in run_study.SEED_MODELS for s in seeds} <= models
    assert all(r["steps"] == steps["steps"] for r in steps["runs"])
    timed = results["equal_time"]
    budget = timed["budget_seconds"]
    assert budget == pytest.approx(timed["measured_step_seconds"]["gpt2"] * steps["steps"])
    for run in timed["runs"]:  # each trains until its own clock reaches the budget, and no step longer
        assert budget <= run["train_seconds"] < budget + 10 * run["seconds_per_step"]
        assert run["curve"][-1]["seconds"] == run["train_seconds"]

    summary = results["summary"]
    mean = {m: v["mean"] for m, v in summary["equal_steps"]["test_bits_per_byte"].items()}
    for model in ("gpt2", "aft-local"):
        values = [r["test_bits_per_byte"] for r in steps["runs"] if r["model"] == model]
        assert len(values) == len(seeds) and mean[model] == pytest.approx(sum(values) / len(values))
    answer = summary["question_equal_steps"]
    assert answer["aft_local_minus_gpt2"] == pytest.approx(mean["aft-local"] - mean["gpt2"])
    assert answer["holds"] == (answer["aft_local_minus_gpt2"] <= run_study.TOLERANCE)
    timed_answer = summary["question_equal_time"]
    test = {r["model"]: r["test_bits_per_byte"] for r in timed["runs"]}
    assert timed_answer["ahead"] == min(("gpt2", "aft-local"), key=test.get)
    assert timed_answer["by"] == pytest.approx(abs(test["aft-local"] - test["gpt2"]))


def test_window_ablation_reuses_the_main_runs(study, run_study):
    _, results = study
    points = {p["window"]: p for p in results["window_ablation"]["points"]}
    assert list(points) == list(run_study.WINDOWS)
    main = {r["model"]: r for r in results["equal_steps"]["runs"] if r["seed"] == results["recipe"]["seeds"][0]}
    window = results["architecture"]["window"]
    assert (
        points[0]["reused_from_equal_steps"]
        and points[0]["test_bits_per_byte"] == main["aft-simple"]["test_bits_per_byte"]
    )
    assert points[window]["test_bits_per_byte"] == main["aft-local"]["test_bits_per_byte"]
    assert sum(p["reused_from_equal_steps"] for p in points.values()) == 2
    trained = [p for p in points.values() if not p["reused_from_equal_steps"]]
    assert all(p["steps"] == results["equal_steps"]["steps"] for p in trained)


def test_images(study):
    _, results = study
    assert {r["model"] for r in results["pixels"]["runs"]} == {"gpt2", "aft-local"}
    assert all(0 < r["validation_bits_per_dim"] < 9 for r in results["pixels"]["runs"])
    assert {r["model"] for r in results["classification"]["runs"]} == {"vit", "aft-conv"}
    assert all(0 <= r["validation_accuracy"] <= 1 for r in results["classification"]["runs"])


def test_saved_models_load_and_carry_their_row(study):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    import aft

    out, results = study
    if importlib.util.find_spec("matplotlib"):
        assert {"curves.png", "final.png", "window_ablation.png", "images.png"} <= {p.name for p in out.iterdir()}
    main = [r for r in results["equal_steps"]["runs"] if r["seed"] == results["recipe"]["seeds"][0]]
    for run in main:
        folder = out / run["model"]
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert isinstance(model, GPT2LMHeadModel if run["model"] == "gpt2" else aft.AFTForCausalLM)
        assert sum(p.numel() for p in model.parameters()) == run["parameters"]
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.decode(tokenizer("def f(x):\n")["input_ids"]) == "def f(x):\n"
        # the tokenizer's special tokens in the model's config and generation config (generate() stops at eos;
        # run_clm.py and convert_to_aft.py refuse a model whose pad id is not the data's)
        for config in (model.config, model.generation_config):
            assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
                tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            )  # fmt: skip
        card = (folder / "README.md").read_text()
        assert f"| {run['model']} (seed {run['seed']}) | {run['parameters']:,} |" in card
        assert f"{run['test_bits_per_byte']:.4f}" in card and "| aft-local | 2 |" in card


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resume"], "there is no study to continue"),
        (["--time_budget", "-5"], "--time_budget=-5.0"),
        (["--seeds", "1", "1"], "give each seed once"),
        (["--models", "gpt2", "gpt2"], "give each model once"),
        (["--models", "aft-local", "aft-conv"], "add gpt2 to --models or pass --time_budget"),
        (["--settle_min_steps", "100"], "--settle_min_steps=100: it is a number of steps >= 0 for --settle"),
        (["--settle", "--settle_min_steps", "-1"], "--settle_min_steps=-1"),
        (["--checkpoint_every", "-1"], "--checkpoint_every=-1.0: it is a number of seconds >= 0"),
    ],
)
def test_bad_input_is_one_line_before_any_work(run_study, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_study.run_main(lambda: run_study.main(["--quick", "--output_dir", str(out), *argv]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_folder_with_files_is_not_overwritten(run_study, tmp_path, capsys):
    (tmp_path / "results.json").write_text("mine")
    with pytest.raises(SystemExit):
        run_study.run_main(lambda: run_study.main(["--quick", "--output_dir", str(tmp_path)]))
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "mine"


def test_resume_keeps_the_parts_done_and_runs_the_others(study, quick, tmp_path):
    out, results = study
    kept = {k: v for k, v in results.items() if k not in ("equal_time", "window_ablation", "pixels", "classification")}
    kept["parts_done"] = ["steps", "seeds"]
    folder = tmp_path / "out"
    shutil.copytree(out, folder)
    (folder / "results.json").write_text(json.dumps(kept))
    resumed = quick(folder, "--resume", "--parts", "steps", "seeds", "time", "ablation")
    assert resumed["equal_steps"] == results["equal_steps"]  # kept as it was, not trained again
    assert resumed["parts_done"] == ["steps", "seeds", "time", "ablation"]
    assert {r["model"] for r in resumed["equal_time"]["runs"]} == {r["model"] for r in results["equal_time"]["runs"]}
    assert sum(p["reused_from_equal_steps"] for p in resumed["window_ablation"]["points"]) == 2
    assert resumed["resumed_runs"]["0"]["parts"] == ["steps", "seeds"]
    assert resumed["part_seconds"]["steps"] == results["part_seconds"]["steps"]  # a kept part keeps its time
    assert resumed["part_seconds"]["time"] > 0
    assert "pixels" not in resumed
    assert "| aft-local (seed 0) |" in (folder / "aft-local" / "README.md").read_text()


def test_resume_refuses_another_study(study, run_study, tmp_path, capsys):
    out, results = study
    (tmp_path / "results.json").write_text(json.dumps({**results, "recipe": {**results["recipe"], "batch_size": 99}}))
    with pytest.raises(SystemExit):
        run_study.run_main(lambda: run_study.main(["--quick", "--output_dir", str(tmp_path), "--resume"]))
    assert "holds another study (recipe" in capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit):
        run_study.run_main(
            lambda: run_study.main(["--quick", "--output_dir", str(tmp_path), "--resume", "--eval_every", "3"])
        )
    assert "holds another study (procedure" in capsys.readouterr().err


def test_plot_only_redraws_cards_and_plots_from_results(study, run_study, tmp_path):
    out, results = study
    folder = tmp_path / "out"
    shutil.copytree(out, folder)
    for name in ("curves.png", "final.png", "window_ablation.png", "images.png", "aft-local/README.md"):
        (folder / name).unlink()
    changed = {**results, "command": "python benchmarks/study.py --the-command-of-record"}
    (folder / "results.json").write_text(json.dumps(changed))
    run_study.main(["--plot_only", "--output_dir", str(folder)])
    assert all((folder / name).is_file() for name in ("curves.png", "final.png", "window_ablation.png", "images.png"))
    card = (folder / "aft-local" / "README.md").read_text()
    assert "--the-command-of-record" in card and "| aft-local (seed 0) |" in card
    assert json.loads((folder / "results.json").read_text()) == changed  # read, never written


def test_plot_only_needs_a_results_json(run_study, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_study.run_main(lambda: run_study.main(["--plot_only", "--output_dir", str(tmp_path)]))
    assert exit_info.value.code == 2 and "--plot_only" in capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps({"recipe": {"seeds": [0]}, "parts_done": []}))  # just begun
    with pytest.raises(SystemExit):
        run_study.run_main(lambda: run_study.main(["--plot_only", "--output_dir", str(tmp_path)]))
    assert "holds no equal-steps runs to plot (parts done: none; a stopped study continues with --resume)" in (
        capsys.readouterr().err
    )


# The procedure: a learning rate per model, training until the ranking settles, runs that survive a kill


def _curve(gaps, every=10):
    """GPT-2's and AFT-local's curves whose gap (AFT-local minus GPT-2) at step (i + 1) * every is gaps[i]."""
    gpt2 = [{"step": (i + 1) * every, "value": 3.0} for i in range(len(gaps))]
    return gpt2, [{"step": p["step"], "value": 3.0 + g} for p, g in zip(gpt2, gaps, strict=True)]


def test_settled_needs_a_gap_steady_over_the_last_fifth(run_study):
    # steps 10..100: the last fifth (80..100) holds 3 points
    assert run_study.settled(*_curve([0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.025, 0.03]))
    assert not run_study.settled(*_curve([0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.005]))  # moved 0.025
    assert not run_study.settled(*_curve([0.1, 0.1, 0.1, 0.1]))  # 40: the last fifth (32..40) holds one point
    assert not run_study.settled([], [])


def test_best_rate_and_where_gpt2_stays_ahead(run_study):
    points = [{"model": "gpt2", "learning_rate": r, "validation_bits_per_byte": v}
              for r, v in ((1e-3, 2.5), (2e-3, 2.4), (4e-3, float("nan")))]  # fmt: skip
    points += [{"model": "aft-local", "learning_rate": 1e-3, "validation_bits_per_byte": 2.2}]
    assert run_study.best_rate(points) == {"gpt2": 2e-3, "aft-local": 1e-3}  # the diverged 4e-3 loses
    gaps = [{"step": s, "gap": g} for s, g in ((10, -0.2), (20, 0.01), (30, -0.01), (40, 0.02), (50, 0.03))]
    assert run_study.ahead_from(gaps) == 40
    assert run_study.ahead_from(gaps[:3]) is None


def test_settle_waits_for_its_floor_of_steps(run_study):
    gpt2, local = _curve([0.5, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3])  # steady from step 20 of 100
    runs = [SimpleNamespace(name="gpt2", curve=gpt2), SimpleNamespace(name="aft-local", curve=local)]
    assert run_study.settled(gpt2, local) and run_study.settle_stop(runs)
    assert not run_study.settle_stop(runs, min_steps=101) and run_study.settle_stop(runs, min_steps=100)


def test_sweep_chooses_each_models_rate_and_settle_stops_at_the_first_settled_point(quick, run_study, tmp_path):
    results = quick(tmp_path / "out", "--parts", "sweep", "steps", "--models", "gpt2", "aft-local", "--settle",
                    "--settle_min_steps", "0", "--steps", "60", "--eval_every", "2", "--sweep_steps", "4")  # fmt: skip
    sweep = results["lr_sweep"]
    assert sorted((p["model"], p["learning_rate"]) for p in sweep["points"]) == sorted(
        (m, r) for m in ("gpt2", "aft-local") for r in run_study.SWEEP_RATES
    )
    assert all(p["steps"] == 4 and math.isfinite(p["validation_bits_per_byte"]) for p in sweep["points"])
    for model, rate in sweep["chosen"].items():
        best = min((p for p in sweep["points"] if p["model"] == model), key=lambda p: p["validation_bits_per_byte"])
        assert rate == best["learning_rate"]
    runs = {r["model"]: r for r in results["equal_steps"]["runs"]}
    assert all(runs[m]["learning_rate"] == sweep["chosen"][m] for m in runs)  # the main runs at their own rate
    settle, steps = results["equal_steps"]["settle"], results["equal_steps"]["steps"]
    assert settle["cap"] == 60 and all(r["steps"] == steps == settle["stopped_at"] for r in runs.values())
    gpt2, local = runs["gpt2"]["curve"], runs["aft-local"]["curve"]
    assert settle["settled"] == run_study.settled(gpt2, local) and (settle["settled"] or steps == 60)
    assert not any(run_study.settled(gpt2[:i], local[:i]) for i in range(1, len(gpt2)))  # not before


def test_a_killed_run_resumed_gives_the_uninterrupted_runs_figures(quick, tmp_path):
    """Killed 10 steps into its main part, before its first checkpoint (the part trains again from its start) and
    with a checkpoint after every step (it continues from the step it was killed at), and 6 steps into its first
    part: the uninterrupted run's figures every time. A checkpoint that cannot be read is refused with its path."""
    argv = ["--parts", "sweep", "steps", "--models", "gpt2", "aft-local", "--sweep_rates", "1e-3", "2e-3",
            "--sweep_steps", "4"]  # fmt: skip
    whole = quick(tmp_path / "whole", *argv)

    def figures(results):
        runs = results["lr_sweep"]["points"] + results["equal_steps"]["runs"]
        return [(r["model"], r["learning_rate"], r["steps"], r["validation_bits_per_byte"], r["test_bits_per_byte"],
                 [p["value"] for p in r["curve"]], r["final_train_loss"]) for r in runs]  # fmt: skip

    # 2 x 2 sweep runs of 4 steps, then 16 steps each of the main two: killed 10 steps into the main part, or 6
    # into the sweep (the first process's only part)
    for every, kill in (("600", 26), ("0", 26), ("0", 6)):
        folder = tmp_path / f"killed-{every}-{kill}"
        argv_kill = ["--checkpoint_every", every, "--exit_after_steps", str(kill)]
        killed = quick(folder, *argv, *argv_kill, returncode=137)
        assert killed["parts_done"] == ([] if kill == 6 else ["sweep"]) and "equal_steps" not in killed
        checkpoints = sorted(p.name for p in (folder / "checkpoints").glob("*")) if every == "0" else []
        expected = {"600": [], "0": ["learning-rate-sweep.pt" if kill == 6 else "equal-steps.pt"]}[every]
        assert checkpoints == expected  # the sweep's went with its part
        if kill == 6:
            resumed = quick(folder, *argv, "--resume")
            assert figures(resumed) == figures(whole) and not (folder / "checkpoints").exists()
            assert resumed["resumed_runs"]["0"]["checkpointed_steps"] == {
                "learning-rate sweep": {f"{m}/lr={r}": 2 if m == "gpt2" else 1  # in turn: 4 x 1, then 2 more
                                        for m in ("gpt2", "aft-local") for r in ("0.001", "0.002")}
            }  # fmt: skip
            continue
        if every == "0":
            corrupt = tmp_path / "corrupt"
            shutil.copytree(folder, corrupt)
            (corrupt / "checkpoints" / "equal-steps.pt").write_bytes(b"not a checkpoint")
            quick(corrupt, *argv, "--resume", returncode=2)
            error = quick.stderr.strip().splitlines()[-1]
            assert "equal-steps.pt cannot be read" in error and error.endswith("from the part's start.")
        resumed = quick(folder, *argv, "--resume")
        assert figures(resumed) == figures(whole) and resumed["lr_sweep"]["chosen"] == whole["lr_sweep"]["chosen"]
        continued = resumed["resumed_runs"]["0"].get("checkpointed_steps")
        assert continued == ({"equal steps": {"gpt2": 5, "aft-local": 5}} if every == "0" else None)
        assert not (folder / "checkpoints").exists()  # removed with the part that finished


def tiny_run(run_study, learning_rate=1e-3):
    parser = argparse.ArgumentParser(add_help=False)
    run_study.add_training_args(parser, learning_rate=1e-3, batch_size=4, epochs=1)
    size = run_study.SIZES["quick"]
    model = run_study.build_lm("aft-local", size, 16, size.block, 0)
    return run_study.new_run("aft-local", 0, model, 4, 4 * size.block, parser.parse_args([]), 10, 2,
                             torch.device("cpu"), learning_rate=learning_rate)  # fmt: skip


def test_a_checkpoint_is_restored_only_into_the_runs_it_holds(run_study, tmp_path):
    run = tiny_run(run_study)
    batch = {"input_ids": torch.randint(0, 16, (4, run_study.SIZES["quick"].block))}
    run_study.train_step(run, batch, run_study.lm_loss, 1.0, torch.device("cpu"))
    run_study.TrainingCheckpoint(tmp_path, "equal-steps", [run], 600, elapsed=lambda: 12.5)([run], final=True)
    again = tiny_run(run_study)
    checkpoint = run_study.TrainingCheckpoint(tmp_path, "equal-steps", [again], 600)
    assert checkpoint.restore([again]) and checkpoint.part_seconds == 12.5  # the stopped process's part time
    assert again.done == 1 and again.losses == run.losses and again.scheduler.last_epoch == 1
    weights, restored = run.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(weights[k], restored[k]) for k in weights)
    other = tiny_run(run_study, learning_rate=2e-3)
    with pytest.raises(run_study.InputError, match="holds other runs"):
        run_study.TrainingCheckpoint(tmp_path, "equal-steps", [other], 600).restore([other])
    assert not run_study.TrainingCheckpoint(tmp_path, "equal-time", [other], 600).restore([other])


def test_a_checkpoint_that_cannot_be_written_leaves_training_going(run_study, tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("in the way of the checkpoints folder")
    run = tiny_run(run_study)
    with caplog.at_level(logging.WARNING, logger="study"):
        run_study.TrainingCheckpoint(blocked / "checkpoints", "equal-steps", [run], 0)([run], final=True)
    assert "equal-steps.pt could not be written" in caplog.text and "the part trains on" in caplog.text
    assert list(tmp_path.iterdir()) == [blocked] and blocked.read_text().startswith("in the way")
