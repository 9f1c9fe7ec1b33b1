"""Benchmark AFT generation on transformers' cache machinery: continuation, generate() overhead, compiled decoding,
AFT-full decoding against GPT-2's KV cache, and constant state.

    python benchmarks/benchmark_generation.py --output outputs/benchmark-generation      # the README figures
    python benchmarks/benchmark_generation.py --quick --output /tmp/bench-generation      # smoke test, seconds

Models as in benchmark.py (harness.causal_lm: the same width, depth, MLP, vocabulary, float32, no dropout; GPT-2
with SDPA), at batch 1. Every ratio compares two things timed in turn (harness.in_turn), one repetition of each after
the other, so that what else the machine does slows both alike; each figure is a median.
  1. continuation: a `--new`-token input on a cache of `--context` tokens (the next chat turn) against a fresh
     prefill of the same `--new` tokens;
  2. generate() per token (the difference between two generate() lengths, so the prefill cancels) against the
     model's own forward step in a loop (argmax, next token, same cache);
  3. the decoding step compiled with torch.compile (fullgraph=True, inductor) against eager, on a cache of fixed
     shapes;
  4. AFT-full's per-token decoding at `--full-context` tokens against GPT-2 with its KV cache (DynamicCache);
  5. the state of simple/local/conv after 256 and after `--long-context` tokens: bytes and per-token time.
Per-token figures are medians of the individual steps (generate()'s from the intervals between the tokens it
streams). Writes results.json into --output and prints every target as met or not met.
"""

import argparse
import time
from pathlib import Path

import torch
from benchmark import build_model
from harness import in_turn, machine, medians, settings, status, write_json
from transformers.generation.streamers import BaseStreamer

from aft import AFTCache
from aft.modeling_aft import CACHE_NAME

CONSTANT = ("simple", "local", "conv")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("outputs/benchmark-generation"))
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--gpt2-heads", type=int, default=4)
    p.add_argument("--local-window", type=int, default=32)
    p.add_argument("--conv-kernel", type=int, default=11)
    p.add_argument("--conv-heads", type=int, default=8)
    p.add_argument("--context", type=int, default=1024, help="cached tokens before the continuation")
    p.add_argument("--new", type=int, default=512, help="tokens of the continuation")
    p.add_argument("--full-context", type=int, default=8192, help="context of the AFT-full vs GPT-2 decoding")
    p.add_argument("--long-context", type=int, default=8192, help="long context of the constant-state check")
    p.add_argument("--tokens", type=int, default=32, help="decoding steps timed per figure")
    p.add_argument("--reps", type=int, default=5, help="repetitions of each timed pair")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled decoding step (inductor)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.local_window, args.conv_kernel, args.conv_heads = 32, 2, 4, 3, 4
        args.context, args.new, args.full_context, args.long_context = 64, 32, 128, 512
        args.tokens, args.reps = 4, 2
    return args


def model_for(name, args):
    args.batch = 1
    positions = max(args.context + args.new, args.full_context, args.long_context) + args.tokens * (args.reps + 4)
    return build_model(name, args, positions).eval()


def ids(args, length, seed=0):
    return torch.randint(0, args.vocab, (1, length), generator=torch.Generator().manual_seed(args.seed + seed))


def cache_of(model, prompt, **cache_kwargs):
    cache = AFTCache(model.config, **cache_kwargs) if cache_kwargs else None
    out = model(prompt, use_cache=True, **({CACHE_NAME: cache} if cache is not None else {}))
    return getattr(out, CACHE_NAME)


def decode(model, cache, first, steps, position):
    """The model's own decoding loop: `steps` forward steps, each feeding the argmax of the last, as generate()
    does. -> the seconds of each step."""
    token, times = first, []
    for i in range(steps):
        start = time.perf_counter()
        out = model(token, position_ids=torch.tensor([[position + i]]), use_cache=True, **{CACHE_NAME: cache})
        token = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
    return times


class _TokenClock(BaseStreamer):
    """Records when generate() hands over each new token: the intervals are its per-token cost."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass

    def intervals(self):
        return [b - a for a, b in zip(self.stamps[1:], self.stamps[2:], strict=False)]  # [0]: the prompt


@torch.no_grad()
def bench_continuation(model, args):
    context, new = ids(args, args.context), ids(args, args.new, 1)

    def continuation():  # the continuation alone is timed; its cache is rebuilt outside the timed part
        cache = cache_of(model, context)
        start = time.perf_counter()
        model(new, use_cache=True, **{CACHE_NAME: cache})
        return [time.perf_counter() - start]

    def prefill():
        model(new, use_cache=True)

    t = medians(in_turn({"continuation": continuation, "prefill": prefill}, args.reps))
    return {"continuation_s": t["continuation"], "prefill_s": t["prefill"], "ratio": t["continuation"] / t["prefill"]}


@torch.no_grad()
def bench_generate(model, args):
    """Per-token time of greedy generate() (the intervals between the tokens it streams) against the model's own
    forward step in a loop, both after the same 16-token prompt."""
    prompt = ids(args, 16, 2)
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}

    def generate():
        clock = _TokenClock()
        model.generate(prompt, max_new_tokens=args.tokens, min_new_tokens=args.tokens, streamer=clock, **kw)
        return clock.intervals()

    def forward_loop():
        return decode(model, cache_of(model, prompt), prompt[:, -1:], args.tokens, prompt.shape[1])

    t = medians(in_turn({"generate": generate, "forward": forward_loop}, args.reps))
    return {"generate_token_s": t["generate"], "forward_token_s": t["forward"], "ratio": t["generate"] / t["forward"]}


@torch.no_grad()
def bench_compiled(model, args):
    prompt = ids(args, 64, 3)
    fixed = {"max_cache_len": 64 + args.tokens * (args.reps + 4)} if model.config.aft_variant == "full" else {}
    caches = {"eager": cache_of(model, prompt, **fixed), "compiled": cache_of(model, prompt, **fixed)}
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    positions = {"eager": 64, "compiled": 64}
    first = prompt[:, -1:].clone()

    def steps(name, fn):
        def run():
            times = decode(fn, caches[name], first, args.tokens, positions[name])
            positions[name] += args.tokens
            return times

        return run

    start = time.perf_counter()
    steps("compiled", compiled)()  # compiles
    compile_s = time.perf_counter() - start
    t = medians(in_turn({"eager": steps("eager", model), "compiled": steps("compiled", compiled)}, args.reps))
    return {
        "eager_token_s": t["eager"],
        "compiled_token_s": t["compiled"],
        "speedup": t["eager"] / t["compiled"],
        "compile_s": compile_s,
    }


@torch.no_grad()
def bench_full_vs_gpt2(args):
    L = args.full_context
    models = {"full": model_for("full", args), "gpt2": model_for("gpt2", args)}
    prompt = ids(args, L, 4)
    caches, prefill_s = {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        caches[name] = getattr(model(prompt, use_cache=True), CACHE_NAME)
        prefill_s[name] = time.perf_counter() - start
    first = prompt[:, -1:].clone()
    positions = dict.fromkeys(models, L)

    def steps(name):
        def run():
            times = decode(models[name], caches[name], first, args.tokens, positions[name])
            positions[name] += args.tokens
            return times

        return run

    t = medians(in_turn({name: steps(name) for name in models}, args.reps))
    row = {f"{name}_token_s": t[name] for name in models}
    row.update(context=L, prefill_s=prefill_s, ratio=row["full_token_s"] / row["gpt2_token_s"])
    row["cache_bytes"] = {"full": caches["full"].nbytes(), "gpt2": _kv_bytes(caches["gpt2"])}
    return row


def _kv_bytes(cache):
    return sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in cache.layers)


@torch.no_grad()
def bench_constant_state(model, args):
    short, long = 256, args.long_context
    caches = {L: cache_of(model, ids(args, L, 5)) for L in (short, long)}
    first = ids(args, 1, 6)
    positions = {L: L for L in caches}

    def steps(L):
        def run():
            times = decode(model, caches[L], first, args.tokens, positions[L])
            positions[L] += args.tokens
            return times

        return run

    t = medians(in_turn({L: steps(L) for L in caches}, args.reps))
    return {
        "bytes": {L: c.nbytes() for L, c in caches.items()},
        "token_s": {L: t[L] for L in caches},
        "time_ratio": t[long] / t[short],
        "same_bytes": caches[short].nbytes() == caches[long].nbytes(),
    }


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    results = {"machine": machine(), "args": settings(args)}
    results.update(continuation={}, generate={}, compiled={}, constant_state={})
    for name in (*CONSTANT, "full"):
        model = model_for(name, args)
        print(f"[{name}] continuation ...", flush=True)
        results["continuation"][name] = bench_continuation(model, args)
        print(f"[{name}] generate() vs forward ...", flush=True)
        results["generate"][name] = bench_generate(model, args)
        if not args.no_compile:
            print(f"[{name}] compiled decoding step ...", flush=True)
            results["compiled"][name] = bench_compiled(model, args)
        if name in CONSTANT:
            print(f"[{name}] state at 256 and {args.long_context} tokens ...", flush=True)
            results["constant_state"][name] = bench_constant_state(model, args)
    print(f"[full vs gpt2] decoding at {args.full_context} tokens ...", flush=True)
    results["full_vs_gpt2"] = bench_full_vs_gpt2(args)
    results["targets"] = targets(results, args)
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", results)
    for line in results["targets"]:
        print(f"{status(line['met']):<7}  {line['target']}: {line['value']}")
    print(f"results: {args.output / 'results.json'}")


def targets(results, args):
    out = []

    def target(text, value, ok):
        out.append({"target": text, "value": value, "met": bool(ok)})

    for name, row in results["continuation"].items():
        if name in CONSTANT:
            text = f"{name}: {args.new} new tokens on a {args.context}-token cache <= 1.3x a {args.new}-token prefill"
            target(text, f"{row['ratio']:.2f}x", row["ratio"] <= 1.3)
    for name, row in results["generate"].items():
        target(f"{name}: generate() per token <= 1.15x the forward step", f"{row['ratio']:.2f}x", row["ratio"] <= 1.15)
    for name, row in results["compiled"].items():
        target(
            f"{name}: compiled decoding step >= 2x faster than eager", f"{row['speedup']:.2f}x", row["speedup"] >= 2
        )
    row = results["full_vs_gpt2"]
    ms = f"{1e3 * row['full_token_s']:.1f} vs {1e3 * row['gpt2_token_s']:.1f} ms"
    target(f"full: decoding at {row['context']} tokens no slower than GPT-2 with its KV cache", ms, row["ratio"] <= 1)
    for name, row in results["constant_state"].items():
        text = f"{name}: the same state bytes at 256 and {args.long_context} tokens, per-token time within 1.2x"
        target(
            text,
            f"{row['time_ratio']:.2f}x, bytes equal: {row['same_bytes']}",
            row["same_bytes"] and row["time_ratio"] <= 1.2,
        )
    return out


if __name__ == "__main__":
    main()
