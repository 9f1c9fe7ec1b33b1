"""Build a small AFT causal LM of each requested variant and generate from a byte-level prompt.

The weights are random (training arrives with the training scripts), so the text is noise; what the demo shows is
the API: AFTConfig -> AFTForCausalLM -> generate() with the recurrent AFTCache, its constant size for the
`simple`, `local` and `conv` mixers, and the same tokens with and without the cache.

    python scripts/demo.py --variants simple local conv full --max_new_tokens 64
"""

import argparse
import time

import torch

from aft import AFTConfig, AFTForCausalLM


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["simple", "local", "conv", "full"],
                        choices=["simple", "local", "conv", "full"])  # fmt: skip
    parser.add_argument("--prompt", default="The Attention Free Transformer ")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    return args


def main():
    args = parse_args()
    prompt = torch.tensor([list(args.prompt.encode("utf-8"))])  # byte-level: ids 0..255
    for variant in args.variants:
        torch.manual_seed(args.seed)
        config = AFTConfig(
            aft_variant=variant,
            vocab_size=256,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            max_position_embeddings=prompt.shape[1] + args.max_new_tokens,
            local_window_size=16,
            position_bias_rank=32,
            conv_kernel_size=7,
            num_heads=8,
        )
        model = AFTForCausalLM(config).eval()
        kwargs = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": False}
        start = time.perf_counter()
        out = model.generate(prompt, return_dict_in_generate=True, **kwargs)
        seconds = time.perf_counter() - start
        same = torch.equal(out.sequences, model.generate(prompt, use_cache=False, **kwargs))
        text = bytes(out.sequences[0, prompt.shape[1] :].tolist()).decode("utf-8", errors="replace")
        print(
            f"[{variant:>6}] {model.num_parameters() / 1e6:.2f}M parameters | "
            f"{args.max_new_tokens / seconds:.0f} tokens/s | cache {out.past_key_values.nbytes() / 1024:.1f} KiB | "
            f"same tokens without the cache: {same}"
        )
        print(f"         {args.prompt!r} -> {text!r}")


if __name__ == "__main__":
    main()
