"""Convert a trained GPT-2 (transformers' `GPT2LMHeadModel`) into an AFT causal LM folder, the starting point for
fine-tuning with `run_clm.py --model_name_or_path DST`.

    python scripts/convert_to_aft.py openai-community/gpt2 outputs/aft-gpt2 --aft_variant local
    python scripts/convert_to_aft.py outputs/gpt2-stdlib outputs/aft-conv --aft_variant conv --query_key fresh

Carried over exactly: token and position embeddings, every LayerNorm, the MLPs, the value and output projections
(GPT-2's Conv1D weights transposed into nn.Linear layout), the LM head (tied or not) and, unless `--query_key
fresh`, the query and key projections (`conv`: the query). New, initialised by `AFTForCausalLM` itself as the
paper does: the position-bias factors of `full`/`local` (N(0, 0.01^2): the bias starts near 0), the kernels of
`conv` (gamma = beta = 0: the kernel term starts at exactly 0), `conv`'s per-head key and, with `--query_key
fresh`, the query and key projections. The README's "From a Transformer to AFT" says why. The output folder
holds safetensors weights, the config with `auto_map` and the model code, the source's tokenizer and generation
config, a model card with `base_model`, and conversion.json: the names of the new parameters, which `run_clm.py
--freeze_carried_steps N` trains alone for its first N steps.
"""

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import StrictDataclassError
from training_args import InputError, check_ranges, run_main
from training_model import count_parameters, save_conversion_record
from training_publish import CARD_REQUIREMENTS, HUB_ID, LIMITATIONS, card_folder, public_argv, public_path
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedConfig

from aft import AFTConfig, AFTForCausalLM
from aft.configuration_aft import AFT_VARIANTS, POSITION_EMBEDDING_TYPES, QUERY_ACTIVATIONS

SUPPORTED = "GPT-2 (model_type 'gpt2', GPT2LMHeadModel)"
# Decoder families with RMSNorm, rotary positions and a gated (3-matrix) MLP: AFT has LayerNorm, learned absolute
# positions and a 2-matrix MLP, so only the embeddings and the value and output projections would carry over.
LLAMA_FAMILY = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2"}
LLAMA_FAMILY |= {"gemma3_text", "phi3", "olmo", "olmo2", "granite", "cohere", "starcoder2", "smollm3"}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # a GPT-2 tokenizer has one of them (vocab.json with merges.txt)
NO_TOKENIZER = (
    "{src} has no tokenizer (none of " + ", ".join(TOKENIZER_FILES) + "), so this folder holds none: use the "
    "tokenizer it was trained with (convert_to_aft.py --tokenizer_name copies one in)."
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC", help="a GPT-2 folder written by save_pretrained, or a Hub id.")
    parser.add_argument("dst", metavar="DST", help="the AFT folder to write (refused if it holds files).")
    parser.add_argument("--aft_variant", required=True, choices=AFT_VARIANTS, help="the AFT token mixer.")
    parser.add_argument(
        "--query_key",
        choices=("copy", "fresh"),
        default="copy",
        help="'copy' (default; measured better, see the README): GPT-2's query and key weights become AFT's "
        "sigmoid gate and key (conv: the query only, its key is one scalar per head); 'fresh': AFT's own "
        "initialisation, as in the paper's DeiT fine-tuning.",
    )
    parser.add_argument("--seed", type=int, default=42, help="seeds the initialisation of the new parameters "
                        "(the training scripts' default): a conversion gives the same folder every time.")  # fmt: skip
    new = parser.add_argument_group("AFT fields (default: AFTConfig's; num_heads: GPT-2's n_head)")
    new.add_argument("--local_window_size", type=int, default=None, help="window s of `local`.")
    new.add_argument("--position_bias_rank", type=int, default=None, help="rank of the bias of `full`/`local`.")
    new.add_argument("--conv_kernel_size", type=int, default=None, help="kernel size of `conv`.")
    new.add_argument("--num_heads", type=int, default=None, help="heads of `conv`.")
    new.add_argument("--query_activation", choices=QUERY_ACTIVATIONS, default=None)
    carried = parser.add_argument_group("fields carried from GPT-2 that may be changed")
    carried.add_argument(
        "--max_position_embeddings",
        type=int,
        default=None,
        help="positions of the AFT model (default: GPT-2's n_positions); with absolute position embeddings at "
        "most n_positions (the first ones are copied).",
    )
    carried.add_argument(
        "--position_embedding_type",
        choices=POSITION_EMBEDDING_TYPES,
        default="absolute",
        help="'absolute' copies GPT-2's position embeddings; 'none' drops them (simple/conv: no length limit).",
    )
    carried.add_argument(
        "--hidden_dropout_prob", type=float, default=None, help="dropout (default: GPT-2's resid_pdrop)."
    )
    source = parser.add_argument_group("source and output")
    source.add_argument("--revision", default=None, help="the Hub revision of SRC (branch, tag or commit).")
    source.add_argument("--tokenizer_name", default=None, help="take the tokenizer from here instead of SRC.")
    source.add_argument(
        "--base_model",
        default=None,
        help="the Hub id written as the card's base_model (default: SRC; for a local folder, pass its Hub id).",
    )
    source.add_argument("--license", default=None, help="the card's license (default: the source card's, if any).")
    source.add_argument("--overwrite", action="store_true", help="replace DST when it already holds files.")
    args = parser.parse_args(argv)
    check_ranges(args)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the card
    if args.base_model is not None and not HUB_ID.fullmatch(args.base_model):
        raise InputError(f"--base_model {args.base_model!r} is not a Hub id: give owner/name or name (the card's).")
    return args


# 1. checks that need no weights


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:400]


def check_destination(src: str, dst: Path, overwrite: bool):
    if dst.exists() and not dst.is_dir():
        raise InputError(f"DST {dst} is a file, not a folder: choose a folder to write the AFT model to.")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise InputError(f"DST {dst} already holds files: choose another folder or pass --overwrite.")
    if Path(src).exists() and Path(src).resolve().is_relative_to(dst.resolve()):
        raise InputError(f"DST {dst} holds SRC {src}: writing DST would delete the source; choose another DST.")
    existing = next(folder for folder in (dst.resolve(), *dst.resolve().parents) if folder.exists())
    if not os.access(existing, os.W_OK):
        raise InputError(f"DST {dst} cannot be written: {existing} is not writable.")


def read_source_config(args) -> GPT2Config:
    """The source's config, after checking that it is a GPT-2 this script converts."""
    if Path(args.src).exists() and not Path(args.src, "config.json").is_file():
        raise InputError(f"SRC {args.src} has no config.json: pass a folder written by save_pretrained.")
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(args.src, revision=args.revision)
    except OSError as error:
        raise InputError(f"cannot read the config of SRC {args.src!r}: {one_line(error)}") from error
    model_type = config_dict.get("model_type")
    if model_type in LLAMA_FAMILY:
        raise InputError(
            f"SRC {args.src} has model_type {model_type!r} (Llama family): its RMSNorm, rotary positions and gated "
            "MLP have no AFT counterpart (LayerNorm, learned positions, a 2-matrix MLP), so most of it would not "
            f"carry over. Supported: {SUPPORTED}."
        )
    if model_type != "gpt2":
        raise InputError(f"SRC {args.src} has model_type {model_type!r}; supported: {SUPPORTED}.")
    config = GPT2Config.from_dict(config_dict)
    if config.add_cross_attention:
        raise InputError(
            f"SRC {args.src} has cross-attention (add_cross_attention=True), which AFT does not have: "
            f"supported: {SUPPORTED} without cross-attention."
        )
    return config


def aft_config_from_gpt2(source: GPT2Config, args) -> AFTConfig:
    """GPT-2's architecture in AFTConfig's fields, with the AFT-only fields from the command line."""
    positions = args.max_position_embeddings or source.n_positions
    if args.position_embedding_type == "absolute" and positions > source.n_positions:
        raise InputError(
            f"--max_position_embeddings={positions} is longer than the n_positions={source.n_positions} positions "
            f"that SRC learned: with absolute position embeddings use at most {source.n_positions}, or pass "
            "--position_embedding_type none (GPT-2's position embeddings are then dropped; simple and conv have "
            "no length limit)."
        )
    optional = {
        "local_window_size": args.local_window_size,
        "position_bias_rank": args.position_bias_rank,
        "conv_kernel_size": args.conv_kernel_size,
        "query_activation": args.query_activation,
    }
    try:
        return AFTConfig(
            aft_variant=args.aft_variant,
            vocab_size=source.vocab_size,
            hidden_size=source.n_embd,
            num_hidden_layers=source.n_layer,
            intermediate_size=source.n_inner or 4 * source.n_embd,
            hidden_act=source.activation_function,
            layer_norm_eps=source.layer_norm_epsilon,
            initializer_range=source.initializer_range,
            hidden_dropout_prob=source.resid_pdrop if args.hidden_dropout_prob is None else args.hidden_dropout_prob,
            max_position_embeddings=positions,
            position_embedding_type=args.position_embedding_type,
            num_heads=args.num_heads or source.n_head,
            tie_word_embeddings=source.tie_word_embeddings,
            bos_token_id=source.bos_token_id,
            eos_token_id=source.eos_token_id,
            pad_token_id=source.pad_token_id,
            **{name: value for name, value in optional.items() if value is not None},
        )
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise InputError(f"invalid AFT configuration: {one_line(error.__cause__ or error)}") from error


def has_file(repo: str, filename: str, revision: str | None) -> bool:
    if Path(repo).exists():
        return Path(repo, filename).is_file()
    from huggingface_hub import file_exists

    try:
        return file_exists(repo, filename, revision=revision)
    except Exception as error:  # the Hub cannot be reached, or the repository is not there
        raise InputError(f"cannot look for the tokenizer of {repo!r} on the Hub: {one_line(error)}") from error


def load_tokenizer(args, config: AFTConfig):
    """The source's tokenizer (or --tokenizer_name's), or None when SRC has none (a model saved with save_pretrained
    alone: the weights convert all the same). transformers builds an empty GPT-2 tokenizer from a folder without
    tokenizer files, so their presence is checked first."""
    name = args.tokenizer_name or args.src
    revision = None if args.tokenizer_name else args.revision
    if not any(has_file(name, filename, revision) for filename in TOKENIZER_FILES):
        if not args.tokenizer_name:
            return None
        raise InputError(
            f"{name} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): pass --tokenizer_name with the "
            "folder or Hub id of the tokenizer SRC was trained with."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load the tokenizer of {name}: {one_line(error)}") from error
    if len(tokenizer) > config.vocab_size:
        raise InputError(
            f"the tokenizer of {name} has {len(tokenizer)} tokens, more than SRC's vocab_size={config.vocab_size}: "
            "pass --tokenizer_name with the tokenizer SRC was trained with."
        )
    return tokenizer


def load_source_model(args) -> GPT2LMHeadModel:
    """The GPT-2 in float32 (fp16/bf16 checkpoints are upcast exactly), every weight present in the shape its
    config gives (a tensor of another shape is reported with the missing ones, not raised by transformers)."""
    try:
        source, info = GPT2LMHeadModel.from_pretrained(
            args.src,
            revision=args.revision,
            dtype=torch.float32,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load the weights of SRC {args.src}: {one_line(error)}") from error
    if info["missing_keys"] or info["mismatched_keys"]:
        missing = sorted(info["missing_keys"]) + [
            f"{name} (shape {tuple(saved)}, the config gives {tuple(expected)})"
            for name, saved, expected in sorted(info["mismatched_keys"])
        ]
        raise InputError(f"SRC {args.src} lacks weights of a GPT2LMHeadModel: {', '.join(missing)[:300]}.")
    if info["unexpected_keys"]:
        print(
            f"note: weights of SRC that a GPT2LMHeadModel does not use: {', '.join(sorted(info['unexpected_keys']))}"
        )
    return source.eval()


# 2. the conversion


def carried_weights(source: GPT2LMHeadModel, config: AFTConfig, query_key: str) -> dict[str, torch.Tensor]:
    """AFT parameter name -> the GPT-2 tensor it takes, in AFT's layout. GPT-2's Conv1D computes x @ W + b with W
    (in, out): nn.Linear's weight is W transposed. c_attn is the fused [query | key | value] projection."""
    gpt2, D = source.transformer, config.hidden_size
    out = {"model.embed_tokens.weight": gpt2.wte.weight}
    if config.position_embedding_type == "absolute":
        out["model.embed_positions.weight"] = gpt2.wpe.weight[: config.max_position_embeddings]
    for i, block in enumerate(gpt2.h):
        layer = f"model.layers.{i}"
        for norm in ("ln_1", "ln_2"):
            out[f"{layer}.{norm}.weight"] = getattr(block, norm).weight
            out[f"{layer}.{norm}.bias"] = getattr(block, norm).bias
        W_q, W_k, W_v = block.attn.c_attn.weight.split(D, dim=1)  # (D, 3D) -> 3 x (D, D)
        b_q, b_k, b_v = block.attn.c_attn.bias.split(D)
        linears = {
            "mixer.v_proj": (W_v, b_v),
            "mixer.o_proj": (block.attn.c_proj.weight, block.attn.c_proj.bias),
            "mlp.up_proj": (block.mlp.c_fc.weight, block.mlp.c_fc.bias),
            "mlp.down_proj": (block.mlp.c_proj.weight, block.mlp.c_proj.bias),
        }
        if query_key == "copy":
            linears["mixer.q_proj"] = (W_q, b_q)
            if config.aft_variant != "conv":  # conv's key is one scalar per head: nothing of GPT-2's matches
                linears["mixer.k_proj"] = (W_k, b_k)
        for target, (weight, bias) in linears.items():
            out[f"{layer}.{target}.weight"] = weight.t()  # Conv1D (in, out) -> nn.Linear (out, in)
            out[f"{layer}.{target}.bias"] = bias
    out["model.norm.weight"], out["model.norm.bias"] = gpt2.ln_f.weight, gpt2.ln_f.bias
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = source.lm_head.weight
    return {name: tensor.detach().contiguous().clone() for name, tensor in out.items()}


def convert(source: GPT2LMHeadModel, config: AFTConfig, query_key: str = "copy"):
    """(AFT model, names of its new parameters): a fresh `AFTForCausalLM` (its own initialisation for every
    AFT-only parameter) with every carried tensor loaded over it."""
    model = AFTForCausalLM(config)
    carried = carried_weights(source, config, query_key)
    missing, unexpected = model.load_state_dict(carried, strict=False)
    if config.tie_word_embeddings:  # lm_head.weight is the same tensor as model.embed_tokens.weight
        missing = [name for name in missing if name != "lm_head.weight"]
    # Every parameter of the AFT model is either carried or one of the AFT-only ones the model initialised.
    aft_only = ["pos_u", "pos_v", "conv_weight", "conv_gamma", "conv_beta"]
    if query_key == "fresh":
        aft_only += ["q_proj", "k_proj"]
    elif config.aft_variant == "conv":
        aft_only += ["k_proj"]
    unexplained = [n for n in missing if not any(f".{part}" in n for part in aft_only)]
    if unexpected or unexplained:
        raise RuntimeError(f"the GPT-2 -> AFT map is incomplete: unexpected {unexpected}, missing {unexplained}")
    return model.eval(), sorted(missing)


# 3. the output folder


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

An **Attention Free Transformer** (AFT-{{ variant }}; Zhai et al., 2021) causal language model converted from the
GPT-2 checkpoint `{{ source }}` ({{ architecture }}, {{ num_parameters }} parameters) by the `aft` package's
`scripts/convert_to_aft.py`. It has not been trained since: AFT's token mixer computes something other than
attention, so this checkpoint is a starting point for fine-tuning, not a finished model.

## How it was converted

```bash
{{ command }}
```
{{ base_model_note }}
| | parameters |
|---|---|
| carried over exactly from GPT-2 | {{ carried }} |
| new, initialised by `AFTForCausalLM` (seed {{ seed }}) | {{ new }} |
| not used | {{ dropped }} |

GPT-2's Conv1D weights (`x @ W + b`) are stored transposed, in `nn.Linear` layout; `c_attn` is split into its
query, key and value parts. {{ query_key_note }} `conversion.json` beside the weights names every new parameter
(`run_clm.py --freeze_carried_steps N` trains them alone for the first N steps), the source and the seed.

## Fine-tuning and usage

{{ tokenizer_note }}

Fine-tuning, with the `aft` repository's training scripts:

```bash
python scripts/run_clm.py --model_name_or_path {{ folder }} --block_size {{ block_size }} --output_dir aft-finetuned
```

The model's code is saved next to its weights and loads as remote code (`trust_remote_code=True`), so no
package but these is needed to use it:

```bash
pip install {{ install }}
```

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

tokenizer = AutoTokenizer.from_pretrained({{ model_id }}, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained({{ model_id }}, trust_remote_code=True)
generator = pipeline("text-generation", model={{ model_id }}, trust_remote_code=True)
print(generator("The", max_new_tokens={{ max_new_tokens }}, do_sample=False))  # untrained mixer: not yet fluent
```

## Limitations

{{ limitations }}

## Citation

```bibtex
@article{zhai2021attention,
  title   = {An Attention Free Transformer},
  author  = {Zhai, Shuangfei and Talbott, Walter and Srivastava, Nitish and Huang, Chen and Goh, Hanlin and
             Zhang, Ruixiang and Susskind, Josh},
  journal = {arXiv preprint arXiv:2105.14103},
  year    = {2021}
}
```
"""


def source_license(args) -> str | None:
    card = Path(args.src, "README.md") if Path(args.src).exists() else args.src
    try:
        return ModelCard.load(card).data.license
    except Exception:  # no card, or no metadata: the license is then --license's or none
        return None


def card_base_model(args) -> tuple[str | None, str]:
    """The card's `base_model`, which the Hub reads as a Hub id (--base_model, else SRC when it is one, not a
    local folder), and the card's line saying why there is none."""
    if args.base_model:
        return args.base_model, ""
    if HUB_ID.fullmatch(args.src) and not Path(args.src).exists():
        return args.src, ""
    return None, (
        f"\nThe card has no `base_model`: the source is the local folder `{public_path(args.src)}` and no "
        "`--base_model` named its Hub id.\n"
    )


def model_card(args, model: AFTForCausalLM, new: list[str], has_tokenizer: bool = True) -> ModelCard:
    config = model.config
    base_model, base_model_note = card_base_model(args)
    new_kinds = sorted({n.split(".")[-2] if n.endswith((".weight", ".bias")) else n.split(".")[-1] for n in new})
    copied_query_key = sorted({"q_proj", "k_proj"} - set(new_kinds))
    carried = ["token embeddings"] + (["position embeddings"] if config.position_embedding_type == "absolute" else [])
    carried += ["LayerNorms (ln_1, ln_2, ln_f)", "MLPs", "value and output projections"]
    carried += [] if config.tie_word_embeddings else ["the (untied) LM head"]
    carried += [f"`{name}`" for name in copied_query_key]
    dropped = [] if config.position_embedding_type == "absolute" else ["position embeddings (`wpe`)"]
    dropped += [f"the {part} part of `c_attn`" for part in ("query", "key") if f"{part[0]}_proj" in new_kinds]
    dropped += ["the attention dropout"]
    if args.query_key == "copy":
        query_key_note = f"`--query_key copy`: {' and '.join(copied_query_key)} copied from GPT-2."
    else:
        query_key_note = (
            "`--query_key fresh`: the query and key projections are new (GPT-2's are trained for dot products "
            "between positions, which AFT does not compute)."
        )
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=args.license or source_license(args),
        tags=["aft", "attention-free-transformer", "text-generation", "causal-lm", "converted-from-gpt2"],
        model_name=Path(args.dst).resolve().name,
    )
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        name=Path(args.dst).resolve().name,
        variant=config.aft_variant,
        source=base_model or public_path(args.src),
        base_model_note=base_model_note,
        architecture=f"{config.num_hidden_layers} layers x {config.hidden_size} wide, vocabulary {config.vocab_size}",
        num_parameters=f"{count_parameters(model):,}",
        command=shlex.join(["python", *public_argv(["scripts/convert_to_aft.py", *args.argv], args.dst)]),
        carried=", ".join(carried),
        new=", ".join(f"`{kind}`" for kind in new_kinds) or "none",
        dropped=", ".join(dropped),
        query_key_note=query_key_note,
        seed=args.seed,
        model_id=repr(card_folder(args.dst)),
        folder=shlex.quote(card_folder(args.dst)),
        install=shlex.join(CARD_REQUIREMENTS),
        # "The" is at most 3 byte-level tokens, and a start token
        max_new_tokens=min(20, max(1, config.max_position_embeddings - 4)) if config.has_position_limit else 20,
        block_size=min(256, config.max_position_embeddings) if config.has_position_limit else 256,
        limitations=LIMITATIONS,
        tokenizer_note=""
        if has_tokenizer
        else "\n" + NO_TOKENIZER.format(src=f"The source `{public_path(args.src)}`") + "\n",
    )


def write_folder(dst: Path, write, overwrite: bool):
    """Write the folder under a temporary name beside DST and rename it into place: a failure leaves DST as it
    was. With --overwrite the old DST is moved aside first and deleted only once the new one is in place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; DST gets the user's usual permissions
    try:
        write(tmp)
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        if dst.exists() and overwrite:
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
            os.replace(dst, old / dst.name)
            try:
                os.replace(tmp, dst)
            except OSError:
                os.replace(old / dst.name, dst)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    args = parse_args(argv)
    dst = Path(args.dst)
    # The script reports what it loads itself (missing weights are an error, unused ones a note): transformers'
    # load report and weight-loading bar would only repeat it.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    # 1. everything that can be checked before loading weights or writing a file
    check_destination(args.src, dst, args.overwrite)
    source_config = read_source_config(args)
    config = aft_config_from_gpt2(source_config, args)
    tokenizer = load_tokenizer(args, config)

    # 2. the conversion
    source = load_source_model(args)
    transformers.set_seed(args.seed)  # the new parameters' initialisation
    model, new = convert(source, config, args.query_key)
    model.generation_config = source.generation_config  # the source's decoding defaults (special tokens, ...)
    if tokenizer is not None and config.has_position_limit:
        tokenizer.model_max_length = min(tokenizer.model_max_length, config.max_position_embeddings)

    # 3. the folder
    card = model_card(args, model, new, has_tokenizer=tokenizer is not None)

    def write(folder: Path):
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        card.save(folder / "README.md")
        source = card_base_model(args)[0] or public_path(args.src)
        save_conversion_record(folder, new, source=source, query_key=args.query_key, seed=args.seed)

    write_folder(dst.resolve(), write, args.overwrite)
    carried = count_parameters(model) - sum(p.numel() for n, p in model.named_parameters() if n in new)
    print(
        f"wrote {dst}: AFT-{config.aft_variant}, {config.num_hidden_layers} x {config.hidden_size}, "
        f"{'tied' if config.tie_word_embeddings else 'untied'} head, {carried:,} of {count_parameters(model):,} "
        f"parameters carried over from {args.src}; new: "
        f"{', '.join(sorted({n.split('.', 3)[-1] for n in new})) or 'none'}"
    )
    if tokenizer is None:
        print(f"note: {NO_TOKENIZER.format(src=args.src)}")
    if card_base_model(args)[0] is None:
        print(f"note: the card has no base_model: {args.src} is a local folder; pass --base_model with its Hub id.")


if __name__ == "__main__":
    run_main(main)
