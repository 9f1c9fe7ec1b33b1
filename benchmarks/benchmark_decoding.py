"""Benchmark greedy generate() per token of AFT-simple, -local and -conv against GPT-2 (SDPA, its own KV cache), at
each width, prompt length and batch, for AFT's "torch" implementation and its "native" one (the compiled decoding
step of ops_aft_native, where a C compiler is).

    python benchmarks/benchmark_decoding.py --output outputs/benchmark-decoding        # the README figures
    python benchmarks/benchmark_decoding.py --quick --output /tmp/bench-decoding        # smoke test, seconds

Models as in benchmark.py (harness.causal_lm: the same width, depth, MLP, vocabulary, float32, no dropout). For each
(width, prompt, batch) every model runs generate() once per round, in turn (harness.in_turn), so that what else the
machine does slows all of them alike; a figure is the median of the intervals between the tokens generate() hands
its streamer (the prefill is not in them). Eager only: under torch.compile the native step is not traced (the torch
form is) and benchmark_generation.py times the compiled step. Targets, per width and batch: each AFT variant no
slower than GPT-2 after a `--short`-token prompt and at least 2x faster after a `--long`-token one. Writes
results.json into --output and prints every target as met or not met.
"""

import argparse
from pathlib import Path

import torch
from benchmark_generation import _TokenClock
from harness import causal_lm, in_turn, machine, medians, settings, status, write_json

import aft.ops_aft_native as native

VARIANTS = ("simple", "local", "conv")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("outputs/benchmark-decoding"))
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    p.add_argument("--short", type=int, default=64, help="the short prompt (tokens)")
    p.add_argument("--long", type=int, default=4096, help="the long prompt (tokens)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--gpt2-heads", type=int, default=4)
    p.add_argument("--local-window", type=int, default=32)
    p.add_argument("--conv-kernel", type=int, default=11)
    p.add_argument("--conv-heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16, help="tokens generated per call (all but the first timed)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.widths, args.short, args.long, args.batches = [32], 8, 64, [1, 2]
        args.layers, args.local_window, args.conv_kernel, args.conv_heads = 2, 4, 3, 4
        args.tokens, args.rounds = 4, 1
    return args


def models_at(width, args):
    """GPT-2 and, per variant, AFT on the torch and on the native implementation (the same weights)."""
    common = {"hidden": width, "layers": args.layers, "heads": args.gpt2_heads, "vocab": args.vocab,
              "positions": args.long + args.tokens + 8, "window": args.local_window, "conv_kernel": args.conv_kernel,
              "conv_heads": args.conv_heads}  # fmt: skip
    models = {"gpt2": causal_lm("gpt2", **common).eval()}
    for variant in VARIANTS:
        torch.manual_seed(args.seed)
        base = causal_lm(variant, **common).eval()
        models[f"{variant}/torch"] = base
        if native.is_native_ready():
            fast = causal_lm(variant, **common, implementation="native").eval()
            fast.load_state_dict(base.state_dict())
            models[f"{variant}/native"] = fast
    return models


def per_token(model, prompt, args):
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}

    def generate():
        clock = _TokenClock()
        model.generate(prompt, max_new_tokens=args.tokens, min_new_tokens=args.tokens, streamer=clock, **kw)
        return clock.intervals()

    return generate


@torch.no_grad()
def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    results = {"settings": settings(args), "machine": machine(), "native": native.unavailable_reason() or "built"}
    rows = []
    for width in args.widths:
        models = models_at(width, args)
        for prompt_len in (args.short, args.long):
            for batch in args.batches:
                gen = torch.Generator().manual_seed(args.seed)
                prompt = torch.randint(1, args.vocab, (batch, prompt_len), generator=gen)
                fns = {name: per_token(model, prompt, args) for name, model in models.items()}
                token_s = medians(in_turn(fns, args.rounds))
                rows.append({"width": width, "prompt": prompt_len, "batch": batch, "token_s": token_s,
                             "load_average": machine()["load_average"]})  # fmt: skip
                line = "  ".join(f"{name} {1e3 * s:.2f}" for name, s in token_s.items())
                print(f"width {width} prompt {prompt_len} batch {batch}: ms/token  {line}", flush=True)
    results["runs"] = rows
    results["targets"] = targets(rows, args)
    write_json(args.output / "results.json", results)
    for t in results["targets"]:
        print(f"{status(t['met']):8} {t['target']}: {t['value']}")


def targets(rows, args):
    out = []
    for row in rows:
        gpt2 = row["token_s"]["gpt2"]
        short = row["prompt"] == args.short
        for name, seconds in row["token_s"].items():
            if name == "gpt2":
                continue
            speedup = gpt2 / seconds
            want = 1.0 if short else 2.0
            where = f"width {row['width']}, batch {row['batch']}, after a {row['prompt']}-token prompt"
            out.append({
                "target": f"generate() per token, AFT-{name} at least {want:g}x GPT-2's speed ({where})",
                "value": f"{speedup:.2f}x ({1e3 * seconds:.2f} vs {1e3 * gpt2:.2f} ms)",
                "met": speedup >= want,
            })  # fmt: skip
    return out


if __name__ == "__main__":
    main()
