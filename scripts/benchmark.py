"""Benchmark every AFT variant against transformers' GPT-2 (SDPA attention) of the same size, on one machine.

    python scripts/benchmark.py --output outputs/benchmark          # the README figures (7 min on 2 cores)
    python scripts/benchmark.py --quick --output /tmp/bench          # smaller lengths, a minute or two

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
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Memory setting for every model alike (`--system-allocator` leaves it alone): freed memory stays in the process
# (allocator.py says why). (PyTorch's THP_MEM_ALLOC_ENABLE=1 on top of this made an allocate-and-free loop of 128 MB
# tensors 6x slower in kernel time, so it is not used.)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocator import keep_freed_memory  # noqa: E402

TUNED_ALLOCATOR = "--system-allocator" not in sys.argv and keep_freed_memory()

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from aft import AFTConfig, AFTForCausalLM  # noqa: E402
from aft import ops_aft_native as native_kernel  # noqa: E402
from aft.modeling_aft import CACHE_NAME  # noqa: E402
from aft.ops_aft import AFT_VARIANTS, aft_simple_chunk  # noqa: E402

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
    """AFT of one variant (with a registered `implementation` of its operator), or GPT-2 with SDPA, at the same
    width, depth, MLP size and vocabulary; no dropout."""
    if name == "gpt2":
        config = GPT2Config(
            n_embd=args.hidden,
            n_layer=args.layers,
            n_head=args.gpt2_heads,
            n_inner=4 * args.hidden,
            vocab_size=args.vocab,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    else:
        config = AFTConfig(
            aft_variant=name,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            intermediate_size=4 * args.hidden,
            vocab_size=args.vocab,
            max_position_embeddings=max_positions,
            local_window_size=args.local_window,
            conv_kernel_size=args.conv_kernel,
            num_heads=args.conv_heads,
            aft_implementation=implementation,
        )
        model = AFTForCausalLM(config)
    return model.float()


def peak_bytes(fn):
    """Peak of the bytes allocated while fn() runs, above what was allocated before, from the profiler's record of
    every allocation and free (CPU). On CUDA: torch.cuda.max_memory_allocated."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def repeat(fn, reps, point_seconds):
    """Timed repetitions (at least one, at most `reps`, stopping once `point_seconds` are spent)."""
    times, start = [], time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < point_seconds):
        times.append(timed(fn))
    return times


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
        median = statistics.median(times)
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
            row.update(prefill_s=statistics.median(times), prefill_times_s=times)
            history.append((L, statistics.median(times)))
            cache = getattr(out["r"], CACHE_NAME)
            row["cache"] = "from the prefill"
        row["cache_bytes"] = cache_bytes(cache)
        token = torch.randint(0, args.vocab, (args.batch, 1), generator=gen)
        step_times = []
        for i in range(args.decode_tokens + 2):
            t = timed(lambda token=token, cache=cache: model(input_ids=token, use_cache=True, **{CACHE_NAME: cache}))
            if i >= 2:
                step_times.append(t)
        row.update(decode_token_s=statistics.median(step_times), decode_times_s=step_times)
        if keep_caches is not None and L in keep_caches:
            keep_caches[L] = cache
        rows.append(row)
        bar.update(1)
    return rows


@torch.no_grad()
def interleaved_decode(model, caches, args):
    """Per-token decode time from each cache, one step per cache in turn, so that whatever else the machine does
    slows every context length alike (timed one after the other, a few-millisecond step drifts by +-30%).
    -> {L: median seconds}"""
    token = torch.randint(0, args.vocab, (args.batch, 1), generator=torch.Generator().manual_seed(args.seed + 2))
    times = {L: [] for L in caches}
    for i in range(args.decode_tokens + 2):
        for L, cache in caches.items():
            t = timed(lambda cache=cache: model(input_ids=token, use_cache=True, **{CACHE_NAME: cache}))
            if i >= 2:
                times[L].append(t)
    return {L: statistics.median(ts) for L, ts in times.items()}


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
    times = {name: [] for name in runs}
    for fn in runs.values():  # warm-up (and the kernel's build, once)
        timed(fn)
    for _ in range(max(3, args.reps)):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    copy_t = statistics.median(times["copy"])
    out = {"shape": [B, T, 1, D], "elements": q.numel(), "copy_s": copy_t, "copy_GBps": copy_bytes / copy_t / 1e9}
    for name in ("op", "native"):
        if name not in times:
            out["native_unavailable"] = native_kernel.unavailable_reason()
            continue
        t = statistics.median(times[name])
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


def ratio(a, b):
    return None if a is None or b is None else a / b


def summarise(results, args):
    """Print the headline ratios and every target of issue 5 (and issue 2's cache/decode checks), met or not."""
    train, infer = results["training"], results["inference"]
    lines, targets = [], []

    def target(text, value, ok):
        targets.append({"target": text, "value": value, "met": ok})
        status = "n/a" if ok is None else ("MET" if ok else "NOT MET")
        shown = "n/a" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append(f"  [{status:>7}] {text}: {shown}")

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
    # issue 2: O(1) decoding state for simple, local, conv
    for name in ("simple", "local", "conv"):
        a, b = cache(name, 256), cache(name, 8192)
        target(f"issue 2: {name} cache bytes after 256 and 8192 prompt tokens equal", f"{a} vs {b}",
               None if a is None or b is None else a == b)  # fmt: skip
        steps = results["decode_interleaved"].get(name, {})
        r = ratio(steps.get(8192), steps.get(256))
        target(f"issue 2: {name} per-token decode 8192 vs 256 (interleaved) differs by < 20%", r,
               None if r is None else abs(r - 1) < 0.2)  # fmt: skip
    print("\nTargets:")
    print("\n".join(lines))
    return targets


def table(results):
    """Markdown table of the headline figures, one row per model."""
    train, infer = results["training"], results["inference"]

    def f(x, scale=1.0, fmt="{:.2f}"):
        return "skipped" if x is None else fmt.format(x * scale)

    out = [
        "| model | train step T=4096 (s) | peak mem T=4096 (MiB) | train step T=16384 (s) | prefill 16k (s) "
        "| decode 16k (ms/token) | cache 16k (MiB) |",
        "|" + "---|" * 7,
    ]
    for name in (m for m in MODELS if m in train or m in infer):
        t4, t16 = find(train.get(name, []), "T", 4096), find(train.get(name, []), "T", 16384)
        d16 = find(infer.get(name, []), "L", 16384)
        out.append(
            f"| {name} | {f(t4.get('step_s'))} | {f(t4.get('peak_bytes'), 2**-20, '{:.0f}')} | {f(t16.get('step_s'))} "
            f"| {f(d16.get('prefill_s'))} | {f(d16.get('decode_token_s'), 1e3, '{:.1f}')} "
            f"| {f(d16.get('cache_bytes'), 2**-20, '{:.2f}')} |"
        )
    return "\n".join(out)


def plot(results, folder):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plots written (results.json has every figure)")
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
    machine = results["machine"]
    fig.suptitle(f"AFT vs GPT-2 (SDPA) on {machine['processor'] or 'CPU'}, torch threads: {machine['torch_threads']}")
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
    # decode steps after the prefill: the per-length run, then the interleaved run (issue 2), each with 2 warm-ups
    max_positions = max(max(train_lengths), max(context_lengths) + 2 * (args.decode_tokens + 2) + 8)
    args.output.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "load_average_at_start": os.getloadavg(),
            "glibc_keeps_freed_memory": TUNED_ALLOCATOR,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
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
            # constant decode cost (issue 2: 8192 vs 256; issue 5: 16384 vs 256), timed in turn
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
    results["machine"]["load_average_at_end"] = os.getloadavg()
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
    (args.output / "results.json").write_text(json.dumps(results, indent=1))
    print(
        f"\nwrote {args.output / 'results.json'} and {len(results['plots'])} plots in {results['wall_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
