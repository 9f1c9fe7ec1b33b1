"""The measured comparison of conversion: the study's trained GPT-2, converted to AFT-local and fine-tuned
for K steps (with and without distillation from the GPT-2), against AFT-local trained from scratch for K steps
and for the GPT-2's steps + K, and against the GPT-2 itself.

    python benchmarks/conversion_study.py --source outputs/study/gpt2 --study_results outputs/study/results.json \
        --output_dir benchmarks/conversion_results --steps 150 300 600
    python benchmarks/conversion_study.py --quick --source GPT2 --study_results RESULTS --output_dir /tmp/conv \
        --train_file code.txt                                        # a smoke test, seconds

Every run uses the study's recipe, read from its results.json: the data (run_clm.py's, by default the Python
standard library's sources, through the GPT-2's own byte tokenizer), the block and batch sizes, AdamW with its
learning rate, betas, weight decay and clipping, the cosine schedule with 5% warm-up, and the seed; the held-out
blocks split as the study splits them (the first half validates, the second half is the test split). The runs
are `scripts/run_clm.py` itself (a process each, one after the other); this script converts with
`scripts/convert_to_aft.py` (a process),
evaluates the saved folders on both halves, times training and decoding (every model in turn), and writes
OUTPUT_DIR/results.json, OUTPUT_DIR/conversion.png and the rows of the README's table. The training batches come
in run_clm.py's order (seeded), not the study's: the data and the recipe are the same, the order is not.
"""

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, default_data_collator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the training scripts' plumbing
import training_data
from harness import in_turn, load_average, machine, markdown_table, medians, pyplot, write_json
from training_args import InputError, run_main
from training_distill import DistillationLoss
from training_loop import as_loss_and_terms, create_optimizer
from training_metrics import load_metric, next_token_cross_entropy

from aft import AFTConfig

logger = logging.getLogger("conversion_study")

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

ROWS = ("copy", "copy+distill", "fresh", "fresh+distill", "scratch")
TOLERANCE = 0.05  # the target: within this many bits per byte of the source
STEP_FRACTION = 0.2  # ... in at most this fraction of the source's training steps
# AFTConfig fields a from-scratch model takes from the converted one (the same architecture, its own init)
ARCHITECTURE = (
    "aft_variant", "hidden_size", "num_hidden_layers", "intermediate_size", "hidden_act", "layer_norm_eps",
    "initializer_range", "hidden_dropout_prob", "max_position_embeddings", "position_embedding_type",
    "local_window_size", "position_bias_rank", "tie_word_embeddings",
)  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="the study's GPT-2 folder (OUTPUT_DIR/gpt2 of study.py).")
    parser.add_argument("--study_results", help="the study's results.json (its recipe and figures).")
    parser.add_argument("--output_dir", required=True, help="results.json, conversion.png, and the runs under runs/.")
    parser.add_argument("--overwrite_output_dir", action="store_true")
    parser.add_argument("--steps", type=int, nargs="+", default=[150, 300, 600], help="the fine-tuning steps K.")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="default: all of them.")
    parser.add_argument(
        "--no_total_row", action="store_true", help="skip AFT from scratch for the source's steps + the largest K."
    )
    parser.add_argument("--learning_rate", type=float, default=None, help="the converted models' fine-tuning rate "
                        "(default: the study's recipe rate).")  # fmt: skip
    parser.add_argument("--scratch_learning_rate", type=float, default=None, help="AFT-local from scratch's rate "
                        "(default: the study's sweep's choice for AFT-local, else its recipe rate).")  # fmt: skip
    parser.add_argument(
        "--freeze_carried_steps",
        type=int,
        default=0,
        help="the converted rows train only the parameters the conversion made new for their first N of K steps "
        "(run_clm.py's flag; the schedule restarts after them); from scratch is unchanged. Every K must exceed N.",
    )
    parser.add_argument("--distill_temperature", type=float, default=2.0)
    parser.add_argument("--distill_weight", type=float, default=0.5)
    parser.add_argument("--curve_points", type=int, default=6, help="validation points per fine-tuning run.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the study's: 1).")
    parser.add_argument("--timing_steps", type=int, default=10, help="training steps timed per model, in turn.")
    parser.add_argument("--decode_tokens", type=int, default=64, help="decoding steps timed per model.")
    parser.add_argument("--keep_runs", action="store_true", help="keep the run folders (weights, cards, logs).")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke test of every part.")
    parser.add_argument(
        "--plot_only",
        action="store_true",
        help="only redraw OUTPUT_DIR/conversion.png and the table from its results.",
    )
    data = parser.add_argument_group("text data instead of the study's (tests)")
    data.add_argument("--train_file", default=None)
    data.add_argument("--validation_file", default=None)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def check_args(args) -> dict:
    """Everything that can be checked before any work; returns the study's record."""
    for name in ("source", "study_results"):
        if not getattr(args, name):
            raise InputError(f"--{name} is required (it is not needed with --plot_only alone).")
    source = Path(args.source)
    if not (source / "config.json").is_file() or not (source / "model.safetensors").is_file():
        raise InputError(f"--source {source} is not a complete model folder (config.json, model.safetensors).")
    try:
        study = json.loads(Path(args.study_results).read_text())
        gpt2 = next(r for r in study["equal_steps"]["runs"] if r["model"] == "gpt2")
        study["recipe"], study["architecture"]  # noqa: B018
    except (OSError, ValueError, KeyError, StopIteration) as error:
        raise InputError(
            f"--study_results {args.study_results}: not a results.json of study.py with its GPT-2 run ({error})."
        ) from error
    if any(k < 1 for k in args.steps) or len(set(args.steps)) != len(args.steps):
        raise InputError(f"--steps {args.steps}: give each number of steps once, each positive.")
    phase = args.freeze_carried_steps
    if phase < 0 or (phase and min(args.steps) <= phase):
        raise InputError(
            f"--freeze_carried_steps={phase}: it must be >= 0 and below every K of --steps {args.steps} (the steps "
            "after the phase train every parameter)."
        )
    for name in ("curve_points", "threads", "timing_steps", "decode_tokens"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name}={getattr(args, name)}: it must be a positive integer.")
    for name in ("learning_rate", "scratch_learning_rate", "distill_temperature"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"--{name}={value}: it must be a positive number.")
    out = Path(args.output_dir)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise InputError(f"--output_dir {out} already holds files: choose another folder or --overwrite_output_dir.")
    study["gpt2"] = gpt2
    swept = study.get("lr_sweep", {}).get("chosen", {}).get("aft-local")
    study["learning_rates"] = {
        "converted": args.learning_rate or study["recipe"]["learning_rate"],
        "scratch": args.scratch_learning_rate or swept or study["recipe"]["learning_rate"],
    }
    return study


# 1. the recipe and the data, as the study has them


def recipe_args(study: dict, learning_rate: float) -> list[str]:
    """run_clm.py's arguments for the study's recipe (its schedule: cosine with 5% warm-up, run_clm's default) at
    `learning_rate`."""
    r = study["recipe"]
    return [
        "--block_size", r["block_size"], "--per_device_train_batch_size", r["batch_size"],
        "--per_device_eval_batch_size", 32, "--learning_rate", learning_rate, "--weight_decay", r["weight_decay"],
        "--adam_beta1", r["betas"][0], "--adam_beta2", r["betas"][1], "--max_grad_norm", r["max_grad_norm"],
        "--lr_scheduler_type", "cosine", "--seed", r["seeds"][0],
    ]  # fmt: skip


def held_out(args, study, source_tokenizer: str):
    """(training blocks, validation blocks, test blocks, tokens per byte): run_clm.py's training blocks and the study's
    halves of its held-out blocks."""
    from accelerate import Accelerator

    data_args = argparse.Namespace(
        enwik8_file=None, dataset_name=None, dataset_config_name=None, train_file=args.train_file,
        validation_file=args.validation_file, text_column="text", validation_split_percentage=5,
        tokenizer_name=source_tokenizer, model_name_or_path=None, train_tokenizer=False,
        block_size=study["recipe"]["block_size"], seed=study["recipe"]["seeds"][0],
    )  # fmt: skip
    _, blocks, ratios = training_data.text_datasets(data_args, Accelerator())
    validation = blocks["validation"]
    half = len(validation) // 2
    if half == 0:
        raise InputError("the held-out data makes fewer than 2 blocks: nothing to validate and test on.")
    halves = validation.select(range(half)), validation.select(range(half, len(validation)))
    return blocks["train"], *halves, ratios["validation"]["bytes"]


class Evaluator:
    """Bits per byte of a saved folder (or a model) on the validation and test halves."""

    def __init__(self, validation, test, tokens_per_byte):
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        self.metric = load_metric("cross_entropy")
        self.splits = {"validation": validation, "test": test}
        self.tokens_per_byte = tokens_per_byte

    def __call__(self, model_or_folder) -> dict:
        model = model_or_folder
        if isinstance(model, str | Path):
            model = AutoModelForCausalLM.from_pretrained(model)
        out = {}
        for split, blocks in self.splits.items():
            loader = DataLoader(blocks.with_format("torch"), batch_size=32, collate_fn=default_data_collator)
            values = next_token_cross_entropy(
                model, loader, self.accelerator, self.metric, tokens_per_byte=self.tokens_per_byte
            )
            out[f"{split}_bits_per_byte"] = values["bits_per_byte"]
        return out


# 2. the runs


def run_script(script: str, argv: list[str]):
    """`python scripts/<script> ARGV` in a process of its own, as a user runs it (one torch thread, as this one)."""
    command = [sys.executable, str(SCRIPTS / script), *argv]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if done.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed (exit {done.returncode}): see its error above")


def convert(args, study, dst: Path, query_key: str) -> Path:
    architecture = study["architecture"]
    run_script("convert_to_aft.py", [
        args.source, str(dst), "--aft_variant", "local", "--query_key", query_key,
        "--local_window_size", str(architecture["window"]), "--position_bias_rank", str(architecture["bias_rank"]),
        "--seed", str(study["recipe"]["seeds"][0]),
    ])  # fmt: skip
    return dst


def scratch_overrides(converted: Path) -> str:
    """--config_overrides that build the converted model's architecture from scratch."""
    config = AFTConfig.from_pretrained(converted)
    return ",".join(f"{name}={getattr(config, name)}" for name in ARCHITECTURE)


def same_architecture(a: Path, b: Path) -> bool:
    ca, cb = AFTConfig.from_pretrained(a), AFTConfig.from_pretrained(b)
    return all(getattr(ca, name) == getattr(cb, name) for name in (*ARCHITECTURE, "vocab_size"))


def train(args, study, row: str, steps: int, folders: dict, out: Path, evaluator) -> dict:
    """One run_clm.py run of `row` for `steps` steps; its validation curve and final figures."""
    rate = study["learning_rates"]["scratch" if row == "scratch" else "converted"]
    argv = [*recipe_args(study, rate), "--max_train_steps", steps, "--logging_steps", max(1, steps // 20)]
    argv += ["--eval_steps", max(1, math.ceil(steps / args.curve_points)), "--max_eval_samples", folders["n_val"]]
    if args.train_file:
        argv += [
            "--train_file",
            args.train_file,
            *(["--validation_file", args.validation_file] * bool(args.validation_file)),
        ]
    if row == "scratch":
        argv += ["--tokenizer_name", args.source, "--config_overrides", scratch_overrides(folders["copy"])]
    else:
        argv += ["--model_name_or_path", folders[row.removesuffix("+distill")]]
        if args.freeze_carried_steps:
            argv += ["--freeze_carried_steps", args.freeze_carried_steps]
    if row.endswith("+distill"):
        argv += ["--teacher_model", args.source, "--distill_temperature", args.distill_temperature]
        argv += ["--distill_weight", args.distill_weight]
    argv += ["--output_dir", out, "--overwrite_output_dir"]
    argv = [str(a) for a in argv]
    logger.info(f"{row}, {steps} steps: python scripts/run_clm.py {shlex.join(argv)}")
    start = time.perf_counter()
    run_script("run_clm.py", argv)
    wall = time.perf_counter() - start
    if row == "scratch" and not same_architecture(out, folders["copy"]):
        raise RuntimeError(f"the from-scratch model {out} does not have the converted model's architecture")
    history = json.loads((out / "log_history.json").read_text())
    curve = [{"step": e["step"], "value": e["eval_bits_per_byte"]} for e in history if "eval_bits_per_byte" in e]
    curve = list({point["step"]: point for point in curve}.values())  # the final evaluation repeats the last step
    record = {
        "row": row,
        "steps": steps,
        "learning_rate": rate,
        "curve": curve,
        "wall_seconds": wall,
        **evaluator(out),
    }
    terms = [e for e in history if "kl_loss" in e]
    if terms:
        record["final_ce_loss"], record["final_kl_loss"] = terms[-1]["ce_loss"], terms[-1]["kl_loss"]
    record["command"] = "python scripts/run_clm.py " + shlex.join(argv)
    if not args.keep_runs:
        shutil.rmtree(out)
    logger.info(f"{row}, {steps} steps: {json.dumps({k: v for k, v in record.items() if k.endswith('byte')})}")
    return record


# 3. timings: every model in turn


def time_training(args, study, folders: dict, blocks) -> dict:
    """Median seconds of one optimizer step (forward, backward, clipping, AdamW) of the GPT-2, AFT-local and
    AFT-local with the GPT-2 as teacher, timed in turn on the same batch of `blocks`; training tokens per second."""
    recipe = argparse.Namespace(
        learning_rate=study["recipe"]["learning_rate"], weight_decay=study["recipe"]["weight_decay"],
        adam_beta1=study["recipe"]["betas"][0], adam_beta2=study["recipe"]["betas"][1],
    )  # fmt: skip
    batch_size, block = study["recipe"]["batch_size"], study["recipe"]["block_size"]
    ids = torch.as_tensor(blocks.select(range(batch_size))["input_ids"]).long()  # (B, T)
    teacher = AutoModelForCausalLM.from_pretrained(args.source).eval().requires_grad_(False)

    def cross_entropy(model, batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss

    def step_fn(folder, compute_loss):
        model = AutoModelForCausalLM.from_pretrained(folder).train()
        optimizer = create_optimizer(model, recipe)

        def step():
            loss, _ = as_loss_and_terms(compute_loss(model, {"input_ids": ids}))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), study["recipe"]["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    fns = {
        "gpt2": step_fn(args.source, cross_entropy),
        "aft-local": step_fn(folders["copy"], cross_entropy),
        "aft-local+distill": step_fn(
            folders["copy"], DistillationLoss(teacher, args.distill_temperature, args.distill_weight)
        ),
    }
    seconds = medians(in_turn(fns, args.timing_steps))
    return {name: {"seconds_per_step": s, "tokens_per_second": batch_size * block / s} for name, s in seconds.items()}


@torch.no_grad()
def time_decoding(args, folders: dict, prompt_ids: torch.Tensor) -> dict:
    """Seconds per generated token (greedy generate(), the difference between n and 2n new tokens, so that the
    prefill cancels) of the GPT-2 (KV cache) and the converted AFT-local (constant state), timed in turn."""
    models = {"gpt2": args.source, "aft-local": folders["copy"]}
    models = {name: AutoModelForCausalLM.from_pretrained(folder).eval() for name, folder in models.items()}
    n = args.decode_tokens
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}

    def generate(model, tokens):
        def call():  # one sample per call (in_turn takes a returned value for per-step times)
            model.generate(prompt_ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)

        return call

    fns = {f"{name}/{tokens}": generate(model, tokens) for name, model in models.items() for tokens in (n, 2 * n)}
    seconds = medians(in_turn(fns, 5))
    context = prompt_ids.shape[1]
    return {
        name: {
            "seconds_per_token": (seconds[f"{name}/{2 * n}"] - seconds[f"{name}/{n}"]) / n,
            "context": f"{context + n}..{context + 2 * n} tokens",
        }
        for name in models
    }


# 4. results


def summarize(results: dict) -> dict:
    """The two targets (within TOLERANCE of the source; better than AFT from scratch), for each converted row."""
    source = results["source"]["validation_bits_per_byte"]
    budget = STEP_FRACTION * results["source"]["steps"]
    scratch = {r["steps"]: r for r in results["runs"] if r["row"] == "scratch"}
    total = results.get("scratch_total")
    out = {}
    for row in sorted({r["row"] for r in results["runs"]} - {"scratch"}):
        runs = sorted((r for r in results["runs"] if r["row"] == row), key=lambda r: r["steps"])
        within = [
            r["steps"] for r in runs if r["steps"] <= budget and r["validation_bits_per_byte"] <= source + TOLERANCE
        ]
        out[row] = {
            "within_tolerance_at_steps": within,
            "target_within_tolerance": bool(within),
            "gap_to_source": {r["steps"]: r["validation_bits_per_byte"] - source for r in runs},
            "beats_scratch_at_equal_steps": {
                r["steps"]: r["validation_bits_per_byte"] < scratch[r["steps"]]["validation_bits_per_byte"]
                for r in runs
                if r["steps"] in scratch
            },
        }
        if total is not None:
            largest = runs[-1]
            out[row]["beats_scratch_at_equal_total_steps"] = (
                largest["validation_bits_per_byte"] < total["validation_bits_per_byte"]
            )
    return out


def table(results: dict) -> str:
    """The README's table: one line per model and steps."""
    source = results["source"]
    rows = []

    def line(name, steps, r):
        gap = r["validation_bits_per_byte"] - source["validation_bits_per_byte"]
        rows.append(
            [name, steps, f"{r['validation_bits_per_byte']:.3f}", f"{r['test_bits_per_byte']:.3f}", f"{gap:+.3f}"]
        )

    line(f"GPT-2 (the study's, {source['steps']} steps)", "-", source)
    if "study_scratch" in results:
        line(
            f"AFT-local from scratch (the study's, {results['study_scratch']['steps']} steps)",
            "-",
            results["study_scratch"],
        )
    for name, r in results["converted_untrained"].items():
        line(f"converted, `--query_key {name}`", 0, r)
    for r in sorted(results["runs"], key=lambda r: (ROWS.index(r["row"]), r["steps"])):
        phase = results.get("freeze_carried_steps", 0)
        name = f"converted, {r['row']}" + (f", first {phase} steps new parameters only" if phase else "")
        name = "AFT-local from scratch" if r["row"] == "scratch" else name
        line(name, r["steps"], r)
    if results.get("scratch_total"):
        r = results["scratch_total"]
        line(f"AFT-local from scratch ({r['steps']} steps = the GPT-2's + {r['steps'] - source['steps']})", "-", r)
    header = ["model", "fine-tuning steps", "validation bits/byte", "test bits/byte", "vs GPT-2 (validation)"]
    return markdown_table(header, rows)


def plot(results: dict, path: Path):
    """conversion.png, validation bits per byte (every validation block) against optimizer steps. Left: the
    fine-tuning runs from step 0 (the model as converted) and AFT-local from scratch for the same K; right: the
    longest of each against total steps (the GPT-2's, then fine-tuning), with AFT-local from scratch over as many."""
    plt = pyplot()
    if plt is None:
        return
    source = results["source"]
    gpt2, offset = source["validation_bits_per_byte"], source["steps"]
    colors = dict(zip(ROWS, ("C0", "C1", "C2", "C3", "C7"), strict=True))
    fig, (ax, ax_total) = plt.subplots(1, 2, figsize=(12, 4.5))
    longest = {}
    for row in ROWS:
        runs = sorted((r for r in results["runs"] if r["row"] == row), key=lambda r: r["steps"])
        for i, r in enumerate(runs):
            points = r["curve"]
            if row != "scratch":
                untrained = results["converted_untrained"][row.split("+")[0]]["validation_bits_per_byte"]
                points = [{"step": 0, "value": untrained}, *points]
            last = i == len(runs) - 1
            steps, values = [p["step"] for p in points], [p["value"] for p in points]
            ax.plot(steps, values, "-" if last else ":", color=colors[row], alpha=1 if last else 0.6,
                    label=row if last else None)  # fmt: skip
            if last:
                longest[row] = (steps, values)
        if runs:
            ax.plot([r["steps"] for r in runs], [r["validation_bits_per_byte"] for r in runs], "o", color=colors[row])
    ax.axhline(gpt2, color="k", label=f"GPT-2 after its {offset} steps")
    ax.axhspan(gpt2, gpt2 + TOLERANCE, color="k", alpha=0.1, label=f"within {TOLERANCE} of GPT-2")
    ax.axvline(STEP_FRACTION * offset, color="k", ls="--", lw=0.8, label=f"{STEP_FRACTION:.0%} of GPT-2's steps")
    measured = [p["value"] for r in results["runs"] for p in r["curve"]] + [gpt2]
    ax.set_ylim(min(measured) - 0.1, min(max(measured), gpt2 + 1.5) + 0.1)
    ax.set_xlabel("optimizer steps (fine-tuning, or from scratch)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("converted, then K steps (dotted: shorter K; dots: ends of runs)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax_total.axhline(gpt2, color="k", lw=0.8)
    ax_total.plot([offset], [gpt2], "k*", ms=12, label=f"GPT-2 after its {offset} steps")
    if "study_scratch" in results:
        r = results["study_scratch"]
        ax_total.plot([r["steps"]], [r["validation_bits_per_byte"]], "s", color="C8",
                      label=f"AFT-local from scratch, {r['steps']} steps (the study's)")  # fmt: skip
    if results.get("scratch_total"):
        r = results["scratch_total"]
        ax_total.plot([p["step"] for p in r["curve"]], [p["value"] for p in r["curve"]], "-", color=colors["scratch"],
                      label=f"AFT-local from scratch, {r['steps']} steps")  # fmt: skip
    for row, (steps, values) in longest.items():
        if row != "scratch":
            ax_total.plot([offset + step for step in steps], values, "-", color=colors[row],
                          label=f"GPT-2, converted, {row} for {steps[-1]} steps")  # fmt: skip
    references = [results[k]["validation_bits_per_byte"] for k in ("study_scratch", "scratch_total") if results.get(k)]
    ax_total.set_ylim(min(measured + references) - 0.1, gpt2 + 0.6)
    ax_total.set_xlabel("total optimizer steps (the GPT-2's, then fine-tuning)")
    ax_total.set_ylabel("validation bits per byte")
    ax_total.set_title("against total steps", fontsize=10)
    ax_total.grid(alpha=0.3)
    ax_total.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        path = Path(args.output_dir, "results.json")
        if not path.is_file():
            raise InputError(f"--plot_only: {path} does not exist.")
        results = json.loads(path.read_text())
        results["table"] = table(results)
        write_json(path, results)
        plot(results, path.parent / "conversion.png")
        print(results["table"])
        return
    study = check_args(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level="INFO")
    if args.quick:
        args.steps, args.curve_points, args.timing_steps, args.decode_tokens = args.steps[:1], 2, 2, 4
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    if out.is_dir() and args.overwrite_output_dir:
        for name in ("runs", "converted"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {
        "command": shlex.join(["python", "benchmarks/conversion_study.py", *args.argv]),
        "machine": machine(),
        "study": {"command": study["command"], "recipe": study["recipe"], "architecture": study["architecture"]},
        "distillation": {"temperature": args.distill_temperature, "weight": args.distill_weight},
        "freeze_carried_steps": args.freeze_carried_steps,
        "learning_rates": study["learning_rates"],
        "tolerance_bits_per_byte": TOLERANCE,
        "step_budget": STEP_FRACTION * study["gpt2"]["steps"],
    }
    # 1. the data's held-out halves, the source and the study's own AFT-local on them
    train_blocks, validation, test, tokens_per_byte = held_out(args, study, args.source)
    evaluator = Evaluator(validation, test, tokens_per_byte)
    results["data"] = {
        "train_blocks": len(train_blocks),
        "validation_blocks": len(validation),
        "test_blocks": len(test),
        "tokens_per_byte": tokens_per_byte,
        "study_data": study.get("data"),
    }
    gpt2 = study["gpt2"]
    results["source"] = {
        "steps": gpt2["steps"],
        **evaluator(args.source),
        "as_recorded": {k: gpt2[k] for k in ("validation_bits_per_byte", "test_bits_per_byte", "tokens_per_second")},
        "curve": gpt2["curve"],
    }
    scratch_study = next((r for r in study["equal_steps"]["runs"] if r["model"] == "aft-local"), None)
    if scratch_study is not None:
        keys = ("validation_bits_per_byte", "test_bits_per_byte", "steps", "curve", "tokens_per_second")
        results["study_scratch"] = {k: scratch_study[k] for k in keys}
    logger.info(f"the source on the study's halves: {json.dumps(results['source'])[:300]}")

    # 2. conversions, and the converted models before any training
    folders = {"n_val": len(validation)}
    for query_key in ("copy", "fresh"):
        folders[query_key] = convert(args, study, out / "converted" / f"aft-local-{query_key}", query_key)
    results["converted_untrained"] = {key: evaluator(folders[key]) for key in ("copy", "fresh")}

    # 3. the runs: every row for every K, then from scratch for the source's steps + the largest K
    results["runs"] = []
    for steps in sorted(args.steps):
        for row in args.rows:
            run_dir = out / "runs" / f"{row}-{steps}"
            results["runs"].append(train(args, study, row, steps, folders, run_dir, evaluator))
            write_json(out / "results.json", results)  # progress, rewritten after each run
    if not args.no_total_row:
        total = gpt2["steps"] + max(args.steps)
        args.curve_points = 12 if not args.quick else 2
        results["scratch_total"] = train(
            args, study, "scratch", total, folders, out / "runs" / "scratch-total", evaluator
        )

    # 4. timings, in turn
    results["training_speed"] = time_training(args, study, folders, train_blocks)
    prompt = torch.as_tensor(validation[0]["input_ids"][:16])[None].long()
    results["decoding"] = time_decoding(args, folders, prompt)

    results["targets"] = summarize(results)
    results["machine"]["load_average_end"] = load_average()
    results["wall_seconds"] = time.time() - started
    results["table"] = table(results)
    write_json(out / "results.json", results)
    plot(results, out / "conversion.png")
    shutil.rmtree(out / "converted")
    if not args.keep_runs:
        shutil.rmtree(out / "runs", ignore_errors=True)
    print(results["table"])
    print(json.dumps(results["targets"], indent=1))


if __name__ == "__main__":
    run_main(main)
