"""Benchmark every AFT variant against transformers' GPT-2 (SDPA attention) of the same size, on one machine.

    python benchmarks/benchmark.py --output outputs/benchmark          # the README figures (7 min on 2 cores)
    python benchmarks/benchmark.py --quick --output /tmp/bench          # smaller lengths, a minute or two

Both models get the same width, depth, MLP size (4 x hidden), vocabulary, batch, dtype (float32), thread count and
no dropout. Four measurements, each the median of several repetitions after a warm-up:
  1. training step (forward + backward of the LM loss) time and peak memory against sequence length;
  2. prefill time, per-token decode time and cache bytes against context length;
  3. the causal `simple` operator alone over 2^24 elements (B * T * D), as bandwidth (reading q, k, v and writing
     y) next to a large tensor copy measured in the same run.
Unless `--system-allocator`, the script tells glibc (Linux) to keep freed memory in the process instead of handing
large blocks back to the kernel after every step, for every model alike (results.json records it). A model whose
projected step (the last measured one scaled by the growth of its cost) exceeds `--max-seconds` is
recorded as skipped rather than run. Writes results.json and PNG plots (when matplotlib is importable).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the training scripts' plumbing
from allocator import keep_freed_memory
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
    repeat,
    settings,
    status,
    timed,
    write_json,
)

from aft import ops_aft_native as native_kernel
from aft.modeling_aft import CACHE_NAME
from aft.ops_aft import AFT_VARIANTS, aft_simple_chunk

VARIANTS = tuple(AFT_VARIANTS)
MODELS = (*VARIANTS, "gpt2")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("outputs/benchmark"), help="folder for results.json and plots")
    p.add_argument("--quick", action="store_true", help="short lengths only (smoke test, about a minute)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--gpt2-heads", type=int, default=4, help="GPT-2 attention heads (head size hidden / heads)")
    p.add_argument("--local-window", type=int, default=32)
    p.add_argument("--conv-kernel", type=int, default=11)
    p.add_argument("--conv-heads", type=int, default=8)
    p.add_argument("--train-lengths", type=int, nargs="+", default=None, help="default 512 .. 16384")
    p.add_argument("--context-lengths", type=int, nargs="+", default=None, help="default 256 .. 32768")
    p.add_argument("--decode-tokens", type=int, default=16, help="timed decode steps per context (after 2 warm-up)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per point (after one warm-up)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="skip a point whose projected time exceeds this")
    p.add_argument("--point-seconds", type=float, default=12.0, help="stop repeating a point after this much time")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every model (default: torch's)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--system-allocator",
        action="store_true",
        help="leave glibc's memory settings alone (default: large blocks from the heap, freed memory kept)",
    )
    return p.parse_args()


def build_model(name, args, max_positions, implementation="torch"):
    """The model `name` (an AFT variant or "gpt2") at the benchmark's size (harness.causal_lm: the same width,
    depth, MLP and vocabulary for every model)."""
    return causal_lm(name, hidden=args.hidden, layers=args.layers, heads=args.gpt2_heads, vocab=args.vocab,
                     positions=max_positions, window=args.local_window, conv_kernel=args.conv_kernel,
                     conv_heads=args.conv_heads, implementation=implementation)  # fmt: skip


def projected(history, length, power):
    """The last measured time scaled by (length / last length)^power: the cost growth of the model."""
    if not history:
        return 0.0
    last_len, last_time = history[-1]
    return last_time * (length / last_len) ** power


def bench_training(model, name, lengths, args, bar):
    rows, history = [], []
    gen = torch.Generator().manual_seed(args.seed)
    power = 2.0 if name == "gpt2" or not AFT_VARIANTS[name].constant_state else 1.0  # cost growth with length
    model.train()
    for T in lengths:
        bar.set_postfix_str(f"train {name} T={T}")
        guess = projected(history, T, power)
        if guess > args.max_seconds:
            rows.append({"T": T, "skipped": f"projected {guess:.0f} s per step > --max-seconds {args.max_seconds}"})
            bar.update(1)
            continue
        ids = torch.randint(0, args.vocab, (args.batch, T), generator=gen)

        def step(ids=ids):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        try:
            peak = peak_bytes(step)  # the warm-up run, under the memory profiler (not timed)
            times = repeat(step, args.reps, args.point_seconds)
        except (RuntimeError, MemoryError) as err:  # out of memory: record, do not crash
            rows.append({"T": T, "skipped": f"{type(err).__name__}: {str(err)[:200]}"})
            bar.update(1)
            continue
        model.zero_grad(set_to_none=True)
        median = medians({"t": times})["t"]
        history.append((T, median))
        rows.append({"T": T, "step_s": median, "times_s": times, "peak_bytes": peak})
        bar.update(1)
    return rows


def cache_bytes(cache):
    if hasattr(cache, "nbytes") and callable(cache.nbytes):  # AFTCache
        return cache.nbytes()
    total = 0
    for layer in cache.layers:  # DynamicCache: keys and values per layer
        for x in (layer.keys, layer.values):
            total += x.numel() * x.element_size()
    return total


def synthetic_kv_cache(model, batch, length):
    """A GPT-2 KV cache of `length` positions filled with random keys and values: its decode cost does not depend
    on the values, and building it skips a prefill that would exceed the time budget."""
    config = model.config
    head_dim = config.n_embd // config.n_head
    cache = DynamicCache(config=config)
    for layer in range(config.n_layer):
        keys = torch.randn(batch, config.n_head, length, head_dim)
        cache.update(keys, torch.randn_like(keys), layer)
    return cache


@torch.no_grad()
def bench_inference(model, name, lengths, args, bar, keep_caches=None):
    """Prefill, per-token decode and cache bytes for each context length. The caches of the lengths named in
    `keep_caches` (a dict) are stored there for `interleaved_decode`."""
    rows, history = [], []
    gen = torch.Generator().manual_seed(args.seed + 1)
    power = 2.0 if name == "gpt2" or not AFT_VARIANTS[name].constant_state else 1.0  # cost growth with length
    model.eval()
    for L in lengths:
        bar.set_postfix_str(f"prefill/decode {name} L={L}")
        row = {"L": L}
        ids = torch.randint(0, args.vocab, (args.batch, L), generator=gen)
        guess = projected(history, L, power)
        if guess > args.max_seconds:
            row["prefill_skipped"] = f"projected {guess:.0f} s > --max-seconds {args.max_seconds}"
            if name != "gpt2":
                rows.append(row)
                bar.update(1)
                continue
            cache = synthetic_kv_cache(model, args.batch, L)
            row["cache"] = "synthetic (random keys and values of the prefill's shape)"
        else:
            out = {}

            def prefill(ids=ids, out=out):
                out["r"] = model(input_ids=ids, use_cache=True)

            if guess < args.point_seconds / 4:  # a long prefill is its own warm-up: no extra run
                timed(prefill)
            times = repeat(prefill, args.reps, args.point_seconds)
            row.update(prefill_s=medians({"t": times})["t"], prefill_times_s=times)
            history.append((L, row["prefill_s"]))
            cache = getattr(out["r"], CACHE_NAME)
            row["cache"] = "from the prefill"
        row["cache_bytes"] = cache_bytes(cache)
        token = torch.randint(0, args.vocab, (args.batch, 1), generator=gen)
        step_times = []
        for i in range(args.decode_tokens + 2):
            t = timed(lambda token=token, cache=cache: model(input_ids=token, use_cache=True, **{CACHE_NAME: cache}))
            if i >= 2:
                step_times.append(t)
        row.update(decode_token_s=medians({"t": step_times})["t"], decode_times_s=step_times)
        if keep_caches is not None and L in keep_caches:
            keep_caches[L] = cache
        rows.append(row)
        bar.update(1)
    return rows


@torch.no_grad()
def interleaved_decode(model, caches, args):
    """Per-token decode time from each cache, one step per cache in turn (harness.in_turn), after two warm-up
    rounds. -> {L: median seconds}"""
    token = torch.randint(0, args.vocab, (args.batch, 1), generator=torch.Generator().manual_seed(args.seed + 2))

    def step(cache):
        return lambda: model(input_ids=token, use_cache=True, **{CACHE_NAME: cache})

    return medians(in_turn({L: step(cache) for L, cache in caches.items()}, args.decode_tokens, warm_up=2))


@torch.no_grad()
def bench_operator(args, elements=2**24):
    """Causal AFT-simple forward over `elements` (B * T * D) vs a copy of 4 * elements floats, both in bytes moved
    per second: the torch form and, where its kernel can be built here, the "native" one (`ops_aft_native`), each
    a fresh output as a model's forward makes it; the three timed in turn, round by round."""
    B, D = 2, 256
    T = elements // (B * D)
    gen = torch.Generator().manual_seed(args.seed)
    q = torch.rand(B, T, 1, D, generator=gen)
    k = torch.randn(B, T, 1, D, generator=gen)
    v = torch.randn(B, T, 1, D, generator=gen)
    op_bytes = 4 * q.numel() * q.element_size()  # read q, k, v, write y
    src = torch.randn(4 * q.numel(), generator=gen)
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * src.element_size()  # read + write
    runs = {"copy": lambda: dst.copy_(src), "op": lambda: aft_simple_chunk(q, k, v, causal=True)}
    if native_kernel.is_native_ready():
        runs["native"] = lambda: native_kernel.aft_simple_native(q, k, v, causal=True)
    times = in_turn(runs, max(3, args.reps))  # the warm-up round builds the native kernel, once
    copy_t = medians(times)["copy"]
    out = {"shape": [B, T, 1, D], "elements": q.numel(), "copy_s": copy_t, "copy_GBps": copy_bytes / copy_t / 1e9}
    for name in ("op", "native"):
        if name not in times:
            out["native_unavailable"] = native_kernel.unavailable_reason()
            continue
        t = medians(times)[name]
        prefix = "" if name == "op" else "native_"
        out |= {
            f"{prefix}op_s": t,
            f"{prefix}op_times_s": times[name],
            f"{prefix}op_GBps": op_bytes / t / 1e9,
            f"{prefix}fraction_of_copy": (op_bytes / t) / (copy_bytes / copy_t),
        }
    return out


def find(rows, key, value):
    return next((r for r in rows if r.get(key) == value), {})


def summarise(results, args):
    """Print the headline ratios and every target (training, memory, decoding, the constant state), met or not."""
    train, infer = results["training"], results["inference"]
    lines, targets = [], []

    def target(text, value, ok):
        targets.append({"target": text, "value": value, "met": ok})
        shown = "n/a" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append(f"  [{status(ok):>7}] {text}: {shown}")

    def step(name, T):
        return find(train.get(name, []), "T", T).get("step_s")

    def mem(name, T):
        return find(train.get(name, []), "T", T).get("peak_bytes")

    def decode(name, L):
        return find(infer.get(name, []), "L", L).get("decode_token_s")

    def cache(name, L):
        return find(infer.get(name, []), "L", L).get("cache_bytes")

    def check(text, value, threshold, above=True):
        target(text, value, None if value is None else (value >= threshold if above else value <= threshold))

    T0 = 4096
    for name, need in (("simple", 10), ("local", 5), ("conv", 5), ("full", 1.5)):
        check(f"train T={T0}: GPT-2 / {name} step time >= {need}", ratio(step("gpt2", T0), step(name, T0)), need)
    check(f"train T={T0}: simple peak memory / GPT-2 <= 0.25", ratio(mem("simple", T0), mem("gpt2", T0)), 0.25, False)
    for name in ("simple", "local", "conv"):
        check(
            f"decode L=16384: GPT-2 / {name} per-token time >= 5", ratio(decode("gpt2", 16384), decode(name, 16384)), 5
        )
        steps = results["decode_interleaved"].get(name, {})  # steps taken in turn: the machine's drift cancels
        check(
            f"decode: {name} time at 16384 / at 256 (interleaved) <= 1.2",
            ratio(steps.get(16384), steps.get(256)),
            1.2,
            False,
        )
        check(f"train: {name} step at 16384 / at 4096 <= 4.5", ratio(step(name, 16384), step(name, 4096)), 4.5, False)
    op = results.get("operator")
    check("operator: simple bandwidth / copy bandwidth >= 0.10", op and op["fraction_of_copy"], 0.10)
    # O(1) decoding state for simple, local, conv
    for name in ("simple", "local", "conv"):
        a, b = cache(name, 256), cache(name, 8192)
        target(f"constant state: {name} cache bytes after 256 and 8192 prompt tokens equal", f"{a} vs {b}",
               None if a is None or b is None else a == b)  # fmt: skip
        steps = results["decode_interleaved"].get(name, {})
        r = ratio(steps.get(8192), steps.get(256))
        target(f"constant state: {name} per-token decode 8192 vs 256 (interleaved) differs by < 20%", r,
               None if r is None else abs(r - 1) < 0.2)  # fmt: skip
    print("\nTargets:")
    print("\n".join(lines))
    return targets


def table(results):
    """Markdown table of the headline figures, one row per model."""
    train, infer = results["training"], results["inference"]
    header = ["model", "train step T=4096 (s)", "peak mem T=4096 (MiB)", "train step T=16384 (s)", "prefill 16k (s)",
              "decode 16k (ms/token)", "cache 16k (MiB)"]  # fmt: skip
    rows = []
    for name in (m for m in MODELS if m in train or m in infer):
        t4, t16 = find(train.get(name, []), "T", 4096), find(train.get(name, []), "T", 16384)
        d16 = find(infer.get(name, []), "L", 16384)
        rows.append([name, fmt(t4.get("step_s"), missing="skipped"),
                     fmt(t4.get("peak_bytes"), ".0f", 2**-20, "skipped"), fmt(t16.get("step_s"), missing="skipped"),
                     fmt(d16.get("prefill_s"), missing="skipped"),
                     fmt(d16.get("decode_token_s"), ".1f", 1e3, "skipped"),
                     fmt(d16.get("cache_bytes"), ".2f", 2**-20, "skipped")])  # fmt: skip
    return markdown_table(header, rows)


def plot(results, folder):
    plt = pyplot()
    if plt is None:
        return []
    panels = [
        ("training", "T", "step_s", "training step (s)", "train_time.png"),
        ("training", "T", "peak_bytes", "peak memory of a training step (bytes)", "train_memory.png"),
        ("inference", "L", "prefill_s", "prefill (s)", "prefill_time.png"),
        ("inference", "L", "decode_token_s", "decode, per token (s)", "decode_time.png"),
        ("inference", "L", "cache_bytes", "cache (bytes)", "cache_bytes.png"),
    ]

    def draw(ax, section, x_key, y_key, label):
        for name, rows in results[section].items():
            pts = [(r[x_key], r[y_key]) for r in rows if r.get(y_key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length" if x_key == "T" else "context length")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")

    written = []
    for section, x_key, y_key, label, filename in panels:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        draw(ax, section, x_key, y_key, label)
        fig.tight_layout()
        fig.savefig(folder / filename, dpi=120)
        plt.close(fig)
        written.append(filename)
    # all five on one page, with the operator's bandwidth next to the copy in the sixth panel
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (section, x_key, y_key, label, _) in zip(axes.flat, panels, strict=False):
        draw(ax, section, x_key, y_key, label)
    op, ax = results.get("operator"), axes.flat[5]
    if op:
        names, values = ["copy", "causal simple"], [op["copy_GBps"], op["op_GBps"]]
        if "native_op_GBps" in op:
            names, values = [*names, "native"], [*values, op["native_op_GBps"]]
        ax.bar(names, values, color=["0.6", "C0", "C1"][: len(names)])
        ax.set_ylabel("GB/s (bytes read + written)")
        ax.set_title(f"operator over 2^24 elements: {op['fraction_of_copy']:.1%} of the copy", fontsize="medium")
    fig.suptitle(f"AFT vs GPT-2 (SDPA) on {describe(results['machine'])}")
    fig.tight_layout()
    fig.savefig(folder / "overview.png", dpi=100)
    plt.close(fig)
    return [*written, "overview.png"]


def main():
    args = parse_args()
    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_lengths = args.train_lengths or ([256, 512, 1024] if args.quick else [512, 1024, 2048, 4096, 8192, 16384])
    context_lengths = args.context_lengths or (
        [256, 1024, 2048] if args.quick else [256, 1024, 4096, 8192, 16384, 32768]
    )
    # decode steps after the prefill: the per-length run, then the interleaved run, each with 2 warm-ups
    max_positions = max(max(train_lengths), max(context_lengths) + 2 * (args.decode_tokens + 2) + 8)
    args.output.mkdir(parents=True, exist_ok=True)
    # freed memory stays in the process for every model alike (allocator.py says why), unless --system-allocator
    tuned = not args.system_allocator and keep_freed_memory()
    results = {
        "machine": {**machine(), "glibc_keeps_freed_memory": tuned},
        "settings": settings(args),
        "training": {},
        "inference": {},
        "decode_interleaved": {},
    }
    start = time.perf_counter()
    total = len(args.models) * (len(train_lengths) + len(context_lengths)) + 1
    with tqdm(total=total, desc="benchmark", unit="point") as bar:
        for name in args.models:
            model = build_model(name, args, max_positions)
            results["training"][name] = bench_training(model, name, train_lengths, args, bar)
            # constant decode cost (8192 and 16384 against 256), timed in turn
            kept = dict.fromkeys(L for L in (256, 8192, 16384) if L in context_lengths)
            kept = kept if name in ("simple", "local", "conv") else None
            results["inference"][name] = bench_inference(model, name, context_lengths, args, bar, kept)
            kept = {L: c for L, c in (kept or {}).items() if c is not None}
            if 256 in kept and len(kept) > 1:
                results["decode_interleaved"][name] = interleaved_decode(model, kept, args)
            del model
        bar.set_postfix_str("operator")
        results["operator"] = bench_operator(args)
        bar.update(1)
    results["machine"]["load_average_at_end"] = load_average()
    results["wall_seconds"] = time.perf_counter() - start
    results["targets"] = summarise(results, args)
    op = results["operator"]
    print(
        f"\nOperator (causal simple, {op['elements']} elements): {op['op_s'] * 1e3:.1f} ms, {op['op_GBps']:.2f} GB/s; "
        f"copy {op['copy_GBps']:.2f} GB/s; fraction {op['fraction_of_copy']:.1%}"
    )
    if "native_op_s" in op:
        print(f"  native kernel: {op['native_op_s'] * 1e3:.1f} ms, {op['native_op_GBps']:.2f} GB/s; fraction "
              f"{op['native_fraction_of_copy']:.1%}")  # fmt: skip
    print("\n" + table(results))
    results["plots"] = plot(results, args.output)
    write_json(args.output / "results.json", results)
    print(
        f"\nwrote {args.output / 'results.json'} and {len(results['plots'])} plots in {results['wall_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
