"""Training of AFT-simple on the native kernel (`aft_implementation="native"`) against the torch form and the floor.

1. The operator alone: causal simple, forward + backward of y . dy, at the training benchmark's shapes (batch 2,
   T = 4096, 4 heads of 64), the torch form (`aft_simple_chunk`) and native timed in turn.
2. One training step (forward + backward of the LM loss, no cache) of `benchmark_training.py`'s simple model
   (width 256, 4 layers, batch 2, T = 4096) with aft_implementation native, torch and floor, timed in turn; the
   floor and the models are `benchmark_training`'s own (`register_floor`, `build`, `training_step`).

Medians of --rounds rounds after a warm-up round, --threads torch threads (the kernel uses as many). Prints a table
and writes results.json into --output.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from benchmark_training import build, register_floor, sizes, training_step
from harness import in_turn, load_average, machine, medians, write_json

from aft import ops_aft_native
from aft.ops_aft import aft_simple_chunk, aft_simple_native


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("outputs/benchmark-native-training"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of each part (after a warm-up round)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def operator_step(form, q, k, v, dy):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def step():
        y, _ = form(*leaves)
        torch.autograd.grad(y, leaves, dy)

    return step


def main(argv=None):
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if not ops_aft_native.is_native_ready():
        sys.exit(f"the native kernel is not available: {ops_aft_native.unavailable_reason()}")
    register_floor()
    args.output.mkdir(parents=True, exist_ok=True)
    size = sizes(argparse.Namespace(quick=args.quick))["long"]
    rounds = 1 if args.quick else args.rounds
    gen = torch.Generator().manual_seed(args.seed)
    B, T, H = size["batch"], size["T"], 4
    shape = (B, T, H, size["hidden"] // H)
    q, k, v, dy = torch.rand(shape, generator=gen), *(torch.randn(shape, generator=gen) for _ in range(3))
    result = {"machine": machine(), "torch_threads": args.threads, "size": size, "rounds": rounds}

    load = load_average()
    start = time.perf_counter()
    ops = {
        "torch": operator_step(aft_simple_chunk, q, k, v, dy),
        "native": operator_step(aft_simple_native, q, k, v, dy),
    }
    times = in_turn(ops, rounds)
    result["operator"] = {"shape": list(shape), "times_s": times, "load_average": [load, load_average()]}
    print(f"operator: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    load = load_average()
    start = time.perf_counter()
    ids = torch.randint(0, size["vocab"], (B, T), generator=gen)
    models = {"floor": build("floor", size, args), "torch": build("simple", size, args)}
    config = copy.deepcopy(models["torch"].config)
    config.aft_implementation = "native"
    models["native"] = type(models["torch"])(config)  # the torch model's weights on the native kernel
    models["native"].load_state_dict(models["torch"].state_dict())
    steps = {name: training_step(model.train(), ids) for name, model in models.items()}
    times = in_turn(steps, rounds)
    result["step"] = {"times_s": times, "load_average": [load, load_average()]}
    print(f"training step: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    op, st = medians(result["operator"]["times_s"]), medians(result["step"]["times_s"])
    print(f"operator forward + backward {tuple(shape)}, median of {rounds} (s): torch {op['torch']:.4f}, "
          f"native {op['native']:.4f}, torch / native {op['torch'] / op['native']:.2f}")  # fmt: skip
    print(f"training step, median of {rounds} (s): floor {st['floor']:.3f}, torch {st['torch']:.3f} "
          f"({st['torch'] / st['floor']:.3f} of the floor), native {st['native']:.3f} "
          f"({st['native'] / st['floor']:.3f} of the floor)")  # fmt: skip
    print(f"load average: operator {result['operator']['load_average']}, step {result['step']['load_average']}")
    write_json(args.output / "results.json", result)


if __name__ == "__main__":
    main()
