"""Training cost of every AFT variant against the floor (the same model whose mixer does no mixing) and GPT-2.

    python benchmarks/benchmark_training.py --threads 1           # every target (under 10 min, 2 cores)
    python benchmarks/benchmark_training.py --quick --output /tmp/bt   # tiny sizes: a smoke test (seconds)

The floor is an AFT-simple model with `aft_implementation="floor"`, an operator registered here through the
backend seam (`ops_aft.register_operator`): y = sigmoid(q) * v, with k's gradient 0, so that every projection, the
MLP, the norms, the head and the loss cost what they cost in every AFT model, and only the mixing is gone. No AFT
model of that size can train faster. GPT-2 (SDPA attention) has the same width, depth, MLP, vocabulary and batch
(`harness.causal_lm`). Every training step is forward + backward of the LM loss without a cache.

Four measurements, each with the allocator a user gets by default (glibc as is) and with the tuned one
(`scripts/allocator.py`: large blocks from the heap, freed memory kept), each in a subprocess of its own:
  1. long: T = 4096, hidden 256, 4 layers, MLP 1024, vocabulary 256, batch 2: every model's step, in turn;
  2. short: hidden 128, T = 256, batch 16: tokens per second of every model, in turn;
  3. T = 16384: floor, simple, conv and GPT-2 in turn, and the peak training memory of floor and simple;
  4. the causal `simple` forward over 2^24 elements, the torch form and aft_implementation="native", as bandwidth
     next to a copy (`benchmark.bench_operator`).
Models are timed in turn (one step of each, then the next round), after a warm-up round, and each figure is the
median, so that whatever else the machine does falls on every model alike. Writes results.json (every time, the
machine, its load and every target as met or not met) and overview.png into --output.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the training scripts' plumbing
from allocator import keep_freed_memory
from benchmark import bench_operator
from harness import (
    causal_lm,
    describe,
    fmt,
    in_turn,
    load_average,
    machine,
    markdown_table,
    medians,
    peak_bytes,
    pyplot,
    ratio,
    settings,
    status,
    write_json,
)

from aft.ops_aft import AFTOperator, register_operator

ALLOCATORS = ("default", "tuned")
VARIANTS = ("simple", "local", "conv", "full")
MODELS = ("floor", *VARIANTS, "gpt2")
# T = 4096: the most a variant's step may take over the floor's (the window's band costs local more)
FLOOR_TARGETS = {"simple": 1.05, "local": 1.10, "conv": 1.05}
LONG_MODELS = ("floor", "simple", "conv", "gpt2")  # at T = 16384


class _NoMixing(torch.autograd.Function):
    """y = q * v; k gets a zero gradient, so that its projection's backward runs as in every AFT model."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, v)
        ctx.k_shape = k.shape
        return q * v

    @staticmethod
    def backward(ctx, dy):
        q, v = ctx.saved_tensors
        return dy * v, dy.new_zeros(ctx.k_shape), dy * q


def floor_operator(q, k, v, *, causal=True, mask=None, initial_state=None, output_final_state=False):
    """The floor's mixer (benchmark only): no mixing at all. q (already sigmoid(Q)), k, v: (B, T, H, D)."""
    if initial_state is not None or output_final_state:
        raise ValueError("The floor operator keeps no state: call the model with use_cache=False.")
    return _NoMixing.apply(q, k, v), None


def register_floor():
    """Make aft_implementation="floor" available to AFT-simple models (in the process that measures them)."""
    grid = lambda q, k, v, grid: floor_operator(q, k, v)[0]  # noqa: E731
    register_operator("simple", "floor", AFTOperator(floor_operator, floor_operator, grid))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("outputs/benchmark-training"))
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke test")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds at T = 4096 (after one warm-up round)")
    p.add_argument("--short-reps", type=int, default=6, help="timed rounds of the short-sequence steps")
    p.add_argument(
        "--long-reps",
        type=int,
        default=1,
        help="timed rounds of the AFT models at T = 16384 (GPT-2 gets one step there in any case; 2 took the whole "
        "run from 521-552 s to 565-659 s on 2 cores)",
    )
    p.add_argument(
        "--gpt2-long-seconds",
        type=float,
        default=150.0,
        help="skip GPT-2 at T = 16384 when its step, projected from T = 4096 as quadratic, exceeds this",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=ALLOCATORS, help=argparse.SUPPRESS)  # one allocator's run, in a subprocess
    p.add_argument("--system-allocator", action="store_true", help=argparse.SUPPRESS)  # the worker's allocator
    args = p.parse_args(argv)
    for name in ("reps", "short_reps", "long_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.system_allocator and not args.worker:
        p.error("--system-allocator is set per run by the script itself: every run measures both allocators")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def sizes(args):
    """The sizes of the four measurements (the targets' sizes, or tiny ones with --quick)."""
    if args.quick:  # one timed round of everything
        args.reps = args.short_reps = args.long_reps = 1
        long = {"hidden": 32, "layers": 2, "vocab": 64, "batch": 2, "T": 256}
        return {
            "long": long,
            "short": {**long, "batch": 4, "T": 64},
            "longest": {**long, "T": 512},
            "operator_elements": 2**16,
        }
    long = {"hidden": 256, "layers": 4, "vocab": 256, "batch": 2, "T": 4096}
    return {
        "long": long,
        "short": {**long, "hidden": 128, "batch": 16, "T": 256},
        "longest": {**long, "T": 16384},
        "operator_elements": 2**24,
    }


def build(name, size, args):
    """The model `name` at `size` (harness.causal_lm); "floor" is AFT-simple with the floor operator."""
    variant, implementation = ("simple", "floor") if name == "floor" else (name, "torch")
    return causal_lm(variant, hidden=size["hidden"], layers=size["layers"], heads=4, vocab=size["vocab"],
                     positions=size["T"], window=32, conv_kernel=11, conv_heads=8,
                     implementation=implementation)  # fmt: skip


def training_step(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    return step


def measure(name_of_section, size, models, reps, args, profile=(), cold=(), once=()):
    """Every model's training step at `size`, timed in turn (harness.in_turn), `reps` rounds after a warm-up round;
    the models in `profile` warm up under the memory profiler (their peak bytes), those in `cold` get no warm-up,
    those in `once` one timed round and no warm-up."""
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, size["vocab"], (size["batch"], size["T"]), generator=gen)
    built = {name: build(name, size, args).train() for name in models}
    steps = {name: training_step(m, ids) for name, m in built.items()}
    load_before = load_average()
    start = time.perf_counter()
    peaks = {name: peak_bytes(steps[name]) for name in profile}  # their warm-up, under the memory profiler
    times = in_turn(steps, reps, cold=(*profile, *cold), once=once)
    section = {
        "size": size,
        "seconds": time.perf_counter() - start,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "models": {},
    }
    for name in models:
        row = {"times_s": times[name]}
        if times[name]:
            row["step_s"] = medians(times)[name]
            row["tokens_per_s"] = size["batch"] * size["T"] / row["step_s"]
        if name in peaks:
            row["peak_bytes"] = peaks[name]
        section["models"][name] = row
    print(f"  {name_of_section}: {section['seconds']:.0f} s", file=sys.stderr, flush=True)
    return section


def worker(args):
    """One allocator's measurements (this process's glibc settings are the allocator's)."""
    hf_logging.set_verbosity_error()
    tuned = not args.system_allocator and keep_freed_memory()
    register_floor()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = sizes(args)
    run = {"allocator": args.worker, "glibc_keeps_freed_memory": tuned, "torch_threads": torch.get_num_threads()}
    run["long"] = measure("long", s["long"], MODELS, args.reps, args)
    run["short"] = measure("short", s["short"], MODELS, args.short_reps, args)
    # GPT-2 is quadratic: at T = 16384 one timed step (its own warm-up), when it fits the budget. conv runs after
    # floor and simple at that size, whose steps warm up the kernels and the heap for it (a step of its own would
    # cost 10-15 s of the 10 minutes)
    gpt2_4k = run["long"]["models"]["gpt2"]["step_s"]
    projected = gpt2_4k * (s["longest"]["T"] / s["long"]["T"]) ** 2
    models = [m for m in LONG_MODELS if m != "gpt2" or projected <= args.gpt2_long_seconds]
    run["longest"] = measure(
        "longest",
        s["longest"],
        models,
        args.long_reps,
        args,
        profile=("floor", "simple"),
        once=("gpt2",),
        cold=("conv",),
    )
    if "gpt2" not in models:
        run["longest"]["models"]["gpt2"] = {
            "skipped": f"projected {projected:.0f} s per step > --gpt2-long-seconds {args.gpt2_long_seconds}"
        }
    run["operator"] = bench_operator(argparse.Namespace(seed=args.seed, reps=3), s["operator_elements"])
    return run


def step_of(run, section, name):
    return run[section]["models"].get(name, {}).get("step_s")


def round_ratios(run, section, a, b):
    """a's step over b's, round by round (steps timed in turn: each pair shares its round's machine state). A model
    timed in fewer rounds (GPT-2 at T = 16384: one) is paired with the other's first ones."""
    times_a, times_b = (run[section]["models"].get(name, {}).get("times_s", []) for name in (a, b))
    return [x / y for x, y in zip(times_a, times_b, strict=False)]


def evaluate(run):
    """Every target on one allocator's run: [{target, value, threshold, met, rounds, resolved}] (met
    None: not measured). `value` is the ratio of the medians. For the ratios of two models' steps timed in two
    rounds or more, `rounds` are the ratios round by round, and `resolved` says whether all of them fall on the
    same side of the threshold as `value` (False: the machine's noise decides this target's status)."""
    targets = []

    def check(text, value, threshold, above, rounds=None):
        met = None if value is None else (value >= threshold if above else value <= threshold)
        target = {"target": text, "value": value, "threshold": threshold, "met": met}
        if rounds and len(rounds) > 1:
            target["rounds"] = rounds
            target["resolved"] = met is not None and all((r >= threshold if above else r <= threshold) == met
                                                         for r in rounds)  # fmt: skip
        targets.append(target)

    def steps(section, a, b, text, threshold, above):
        check(text, ratio(step_of(run, section, a), step_of(run, section, b)), threshold, above,
              round_ratios(run, section, a, b))  # fmt: skip

    T, Ts, Tl = (run[s]["size"]["T"] for s in ("long", "short", "longest"))
    for name, threshold in FLOOR_TARGETS.items():
        steps("long", name, "floor", f"T={T}: {name} step / floor step <= {threshold:.2f}", threshold, False)
    steps("long", "gpt2", "full", f"T={T}: GPT-2 step / full step >= 1.15", 1.15, True)
    for name in VARIANTS:  # tokens/s against GPT-2's: GPT-2's step over the variant's
        steps("short", "gpt2", name, f"T={Ts}: {name} tokens/s / GPT-2 tokens/s >= 1.0", 1.0, True)
    # at the longest length GPT-2 is itself only several times the floor on a CPU, so these variants are held to
    # the floor there rather than to a multiple of GPT-2's speed
    for name in ("simple", "conv"):
        steps("longest", name, "floor", f"T={Tl}: {name} step / floor step <= 1.10", 1.10, False)
    models = run["longest"]["models"]
    check(f"T={Tl}: simple peak training memory / floor's <= 1.1",
          ratio(models["simple"].get("peak_bytes"), models["floor"].get("peak_bytes")), 1.1, False)  # fmt: skip
    op = run["operator"]
    check("causal simple forward (torch): bandwidth / copy bandwidth >= 0.25", op["fraction_of_copy"], 0.25, True)
    check('causal simple forward (aft_implementation="native"): bandwidth / copy bandwidth >= 0.25',
          op.get("native_fraction_of_copy"), 0.25, True)  # fmt: skip
    return targets


def table(results):
    """Markdown: one row per model, both allocators side by side."""
    runs = results["runs"]
    d, t = runs["default"], runs["tuned"]
    T, Ts, Tl = (d[s]["size"]["T"] for s in ("long", "short", "longest"))
    header = ["model", f"step T={T} (s)", "/ floor", "GPT-2 / model", "tuned: step (s)", "/ floor", f"tokens/s T={Ts}",
              "tuned: tokens/s", f"step T={Tl} (s)", "tuned: step (s)", f"peak MiB T={Tl}"]  # fmt: skip
    rows = []
    for name in MODELS:
        row = [name]
        for run, full in ((d, True), (t, False)):
            step = step_of(run, "long", name)
            row += [fmt(step), fmt(ratio(step, step_of(run, "long", "floor")))]
            if full:
                row.append(fmt(ratio(step_of(run, "long", "gpt2"), step)))
        for run in (d, t):
            row.append(fmt(run["short"]["models"][name].get("tokens_per_s"), ".0f"))
        for run in (d, t):
            row.append(fmt(step_of(run, "longest", name)))
        row.append(fmt(d["longest"]["models"].get(name, {}).get("peak_bytes"), ".0f", 2**-20))
        rows.append(row)
    return markdown_table(header, rows)


def plot(results, folder):
    plt = pyplot()
    if plt is None:
        return []
    runs = results["runs"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    panels = [
        ("long", "step_s", "step / floor step", True),
        ("short", "tokens_per_s", "tokens per second", False),
        ("longest", "step_s", "step (s)", False),
    ]
    width = 0.38
    for ax, (section, key, label, relative) in zip(axes, panels, strict=False):
        names = [n for n in MODELS if any(runs[a][section]["models"].get(n, {}).get(key) for a in ALLOCATORS)]
        for i, allocator in enumerate(ALLOCATORS):
            models = runs[allocator][section]["models"]
            values = [models.get(n, {}).get(key) or 0.0 for n in names]
            if relative:
                values = [x / models["floor"][key] for x in values]
            ax.bar([j + (i - 0.5) * width for j in range(len(names))], values, width, label=allocator)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(label)
        ax.set_title(f"T = {runs['default'][section]['size']['T']}", fontsize="medium")
        ax.legend(fontsize="small", title="allocator")
        if relative:
            for threshold in sorted(set(FLOOR_TARGETS.values())):
                ax.axhline(threshold, color="0.4", linestyle="--", linewidth=1)
        if section == "longest":
            ax.set_yscale("log")
    ax = axes[3]
    for i, allocator in enumerate(ALLOCATORS):
        op = runs[allocator]["operator"]
        values = [op["copy_GBps"], op["op_GBps"], op.get("native_op_GBps") or 0.0]
        ax.bar([j + (i - 0.5) * width for j in range(3)], values, width, label=allocator)
    ax.set_xticks(range(3), ["copy", "causal simple", "native"])
    ax.set_ylabel("GB/s (bytes read + written)")
    ax.set_title("operator forward vs copy", fontsize="medium")
    ax.legend(fontsize="small", title="allocator")
    m = {**results["machine"], "torch_threads": results["runs"]["default"]["torch_threads"]}
    fig.suptitle(f"AFT training against the floor and GPT-2 (SDPA): {describe(m)}")
    fig.tight_layout()
    fig.savefig(folder / "overview.png", dpi=100)
    plt.close(fig)
    return ["overview.png"]


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))  # the last line of stdout: the parent reads it
        return
    args.output.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "settings": settings(args, drop=("worker",)), "runs": {}}
    start = time.perf_counter()
    for allocator in ALLOCATORS:
        print(f"allocator {allocator}:", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", allocator]
        if allocator == "default":
            cmd.append("--system-allocator")  # the worker leaves glibc alone
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            print(f"the {allocator}-allocator run failed (exit {done.returncode}): see its error above")
            sys.exit(1)
        results["runs"][allocator] = json.loads(done.stdout.strip().splitlines()[-1])
    results["machine"]["load_average_at_end"] = load_average()
    results["wall_seconds"] = time.perf_counter() - start
    results["targets"] = {a: evaluate(results["runs"][a]) for a in ALLOCATORS}
    print("\n" + table(results))
    for allocator in ALLOCATORS:
        op = results["runs"][allocator]["operator"]
        print(f"\noperator ({allocator} allocator): causal simple {op['op_GBps']:.2f} GB/s, copy "
              f"{op['copy_GBps']:.2f} GB/s, {op['fraction_of_copy']:.1%}")  # fmt: skip
        if "native_op_GBps" in op:
            print(f"  native kernel {op['native_op_GBps']:.2f} GB/s, {op['native_fraction_of_copy']:.1%}")
        else:
            print(f"  native kernel: not available ({op.get('native_unavailable')})")
    for allocator in ALLOCATORS:
        print(f"\nTargets ({allocator} allocator):")
        for t in results["targets"][allocator]:
            value = "not measured" if t["value"] is None else f"{t['value']:.3g}"
            if "rounds" in t:
                spread = f"rounds {min(t['rounds']):.3g}-{max(t['rounds']):.3g}"
                value += f" ({spread})" if t["resolved"] else f" ({spread}: not resolved)"
            print(f"  [{status(t['met']):>7}] {t['target']}: {value}")
    results["plots"] = plot(results, args.output)
    write_json(args.output / "results.json", results)
    load = results["machine"]["load_average"], results["machine"]["load_average_at_end"]
    print(f"\nwrote {args.output / 'results.json'} in {results['wall_seconds']:.0f} s (load {load[0]:.2f} -> "
          f"{load[1]:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
