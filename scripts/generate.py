"""Generate text from a saved AFT causal LM folder (one written by run_clm.py, or any save_pretrained folder with a
tokenizer), with the recurrent AFTCache.

    python scripts/generate.py outputs/aft-stdlib --prompt "def fibonacci(n):" --max_new_tokens 200
    python scripts/generate.py outputs/aft-stdlib --trust_remote_code    # the folder's own code, without `aft`
"""

import argparse
import time
from pathlib import Path

import torch
from training_args import InputError, check_ranges
from transformers import AutoModelForCausalLM, AutoTokenizer


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a folder written by save_pretrained (with its tokenizer), or a Hub id")
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--top_k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust_remote_code", action="store_true", help="use the code saved in the folder")
    args = parser.parse_args()
    try:
        check_ranges(args)
    except InputError as error:
        parser.error(str(error))
    if Path(args.model).exists() and not (Path(args.model) / "config.json").is_file():
        parser.error(f"{args.model} has no config.json: pass a folder written by save_pretrained")
    return args


def main():
    args = parse_args()
    if not args.trust_remote_code:
        import aft  # noqa: F401  (registers AFT with the Auto classes)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).eval()
    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    start = time.perf_counter()
    out = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        top_k=args.top_k,
        temperature=args.temperature,
        num_beams=args.num_beams,
        return_dict_in_generate=True,
    )
    seconds = time.perf_counter() - start
    new_tokens = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    print(tokenizer.decode(out.sequences[0], skip_special_tokens=True))  # generation stops early at eos
    cache = next(v for v in out.values() if callable(getattr(v, "nbytes", None)))  # the AFTCache generate() gives
    state_kib = cache.nbytes() / 1024
    print(
        f"\n[{model.config.aft_variant}, {model.num_parameters() / 1e6:.2f}M parameters] {new_tokens} tokens in "
        f"{seconds:.2f} s ({new_tokens / seconds:.0f} tokens/s); decoding state {state_kib:.1f} KiB"
    )


if __name__ == "__main__":
    main()
