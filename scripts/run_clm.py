"""Causal language modelling with an AFT model, reported in bits per byte (and per character) and perplexity.

Data, in order of precedence: `--enwik8_file` (the standard 90M/5M/5M split), `--dataset_name` (Hub),
`--train_file`/`--validation_file` (local text), and by default an embedded corpus that needs no download:
the Python standard library's own top-level modules (every 10th file, in name order, is the validation set).
Tokenization is byte level by default (256 ids, so bits per byte compare with the paper's enwik8 numbers).

    python scripts/run_clm.py --preset tiny --block_size 128 --per_device_train_batch_size 16 \
        --learning_rate 3e-3 --max_train_steps 300 --eval_steps 100 --max_eval_samples 256 --eval_at_start \
        --output_dir outputs/aft-stdlib
    accelerate launch scripts/run_clm.py --enwik8_file enwik8 --preset enwik8-paper --block_size 1024 \
        --output_dir outputs/aft-enwik8
"""

import argparse
import logging
import math
import sysconfig
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import training_utils as tu
from datasets import Dataset, DatasetDict, load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerFast, default_data_collator

from aft import AFTForCausalLM

logger = logging.getLogger(__name__)

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (default: the Python standard library's sources)")
    data.add_argument("--dataset_name", default=None, help="a dataset of the Hub, e.g. 'wikitext'.")
    data.add_argument("--dataset_config_name", default=None, help="e.g. 'wikitext-2-raw-v1'.")
    data.add_argument("--train_file", default=None, help="a local .txt (one document per line), .json or .csv.")
    data.add_argument("--validation_file", default=None)
    data.add_argument("--text_column", default="text")
    data.add_argument(
        "--validation_split_percentage",
        type=int,
        default=5,
        help="percent of the training data held out when the dataset has no validation split.",
    )
    data.add_argument("--enwik8_file", default=None, help="a local enwik8 file: 90%%/5%%/5%% byte split.")
    data.add_argument("--block_size", type=int, default=256, help="tokens per training sequence.")
    tok = parser.add_argument_group("tokenizer (default: bytes, 256 ids)")
    tok.add_argument("--tokenizer_name", default=None, help="load this tokenizer (a folder or a Hub id).")
    tok.add_argument("--train_tokenizer", action="store_true", help="train a byte-level BPE on the training data.")
    tok.add_argument("--tokenizer_vocab_size", type=int, default=4096)
    parser.add_argument("--eval_at_start", action="store_true", help="also evaluate the untrained model.")
    tu.add_model_args(parser, default_preset="small")
    tu.add_training_args(parser, learning_rate=1e-3, batch_size=16, epochs=1)
    tu.add_output_args(parser)
    return parser.parse_args(argv)


# 1. data


def stdlib_corpus() -> DatasetDict:
    """The standard library's top-level .py files, sorted by name; every 10th file is held out for validation."""
    files = sorted(STDLIB.glob("*.py"))
    texts = {"train": [], "validation": []}
    for i, path in enumerate(files):
        texts["validation" if i % 10 == 9 else "train"].append(path.read_text(encoding="utf-8", errors="replace"))
    return DatasetDict({split: Dataset.from_dict({"text": t}) for split, t in texts.items()})


def load_text_datasets(args) -> DatasetDict:
    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
    elif args.train_file:
        for path in (args.train_file, args.validation_file):
            if path and not Path(path).is_file():
                raise tu.InputError(f"data file {path} does not exist.")
            if path and Path(path).stat().st_size == 0:
                raise tu.InputError(f"data file {path} is empty.")
        files = {"train": args.train_file, **({"validation": args.validation_file} if args.validation_file else {})}
        extension = Path(args.train_file).suffix.lstrip(".")
        extension = "text" if extension in ("txt", "raw", "") else extension
        raw = load_dataset(extension, data_files=files)
    else:
        raw = stdlib_corpus()
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        raw = DatasetDict({"train": split["train"], "validation": split["test"]})
    if args.text_column not in raw["train"].column_names:
        raise tu.InputError(f"no column {args.text_column!r} in the data (columns: {raw['train'].column_names}).")
    for split in ("train", "validation"):
        if len(raw[split]) == 0:
            raise tu.InputError(f"the {split} split of the text data is empty.")
    return raw


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (the ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Token id = byte value of the UTF-8 text (0..255), and decoding returns exactly those bytes."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_input_names=["input_ids", "attention_mask"])


def bpe_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`: every byte is in the alphabet, so any text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_input_names=["input_ids", "attention_mask"])


def get_tokenizer(args, train_texts) -> PreTrainedTokenizerFast:
    if args.tokenizer_name:
        return AutoTokenizer.from_pretrained(args.tokenizer_name)
    if args.model_name_or_path and Path(args.model_name_or_path, "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(args.model_name_or_path)
    if args.train_tokenizer:
        return bpe_tokenizer(train_texts, args.tokenizer_vocab_size)
    return byte_tokenizer()


def group_texts(examples, block_size: int):
    """Concatenate the tokenized documents and cut them into blocks of `block_size` (the remainder is dropped)."""
    ids = list(chain.from_iterable(examples["input_ids"]))
    total = len(ids) // block_size * block_size
    return {"input_ids": [ids[i : i + block_size] for i in range(0, total, block_size)]}


def enwik8_datasets(path: str, block_size: int) -> DatasetDict:
    """enwik8's standard split, first 90M / next 5M / last 5M bytes (90%/5%/5% of a shorter file); ids = bytes."""
    if not Path(path).is_file():
        raise tu.InputError(f"--enwik8_file {path} does not exist.")
    data = np.fromfile(path, dtype=np.uint8)
    n_train, n_valid = int(len(data) * 0.9), int(len(data) * 0.05)
    splits = {
        "train": data[:n_train],
        "validation": data[n_train : n_train + n_valid],
        "test": data[n_train + n_valid :],
    }
    blocks = {}
    for split, ids in splits.items():
        usable = len(ids) // block_size * block_size
        blocks[split] = Dataset.from_dict({"input_ids": ids[:usable].reshape(-1, block_size).astype(np.int16)})
    return DatasetDict(blocks)


def get_datasets(args, accelerator):
    """(tokenizer, block datasets, tokens per byte and per character of the evaluation splits)."""
    if args.enwik8_file:
        if args.train_tokenizer or args.tokenizer_name:
            raise tu.InputError("--enwik8_file uses bytes as tokens: drop --train_tokenizer / --tokenizer_name.")
        # enwik8's "bits per character" are bits per byte: the measure is over the raw bytes.
        return byte_tokenizer(), enwik8_datasets(args.enwik8_file, args.block_size), {}
    raw = load_text_datasets(args)
    tokenizer = get_tokenizer(args, raw["train"][args.text_column])
    with accelerator.main_process_first():
        tokenized = raw.map(
            lambda batch: tokenizer(batch[args.text_column], return_attention_mask=False),
            batched=True,
            remove_columns=raw["train"].column_names,
            desc="tokenizing",
        )
        # Tokens per byte and per character of each evaluation split, to turn nats per token into bits per byte.
        ratios = {}
        for split in tokenized:
            if split == "train":
                continue
            texts = raw[split][args.text_column]
            tokens = sum(len(ids) for ids in tokenized[split]["input_ids"])
            n_bytes = sum(len(t.encode("utf-8")) for t in texts)
            ratios[split] = {"bytes": tokens / n_bytes, "chars": tokens / sum(len(t) for t in texts)}
        blocks = tokenized.map(lambda b: group_texts(b, args.block_size), batched=True, desc="grouping")
    return tokenizer, blocks, ratios


# 2. evaluation


def evaluate(model, dataloader, accelerator) -> float:
    """Mean next-token loss (nats) over every predicted position of every block, gathered over processes."""
    model.eval()
    losses = []
    for batch in dataloader:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        token_nats = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), batch["input_ids"][:, 1:], reduction="none"
        )  # (B, T-1)
        losses.append(accelerator.gather_for_metrics(token_nats.mean(dim=1)))
    model.train()
    return torch.cat(losses).mean().item()


def text_metrics(loss: float, ratio: dict | None, prefix: str) -> dict:
    metrics = {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 50.0))}
    metrics[f"{prefix}_bits_per_byte"] = loss / math.log(2) * (ratio["bytes"] if ratio else 1.0)
    if ratio:
        metrics[f"{prefix}_bits_per_char"] = loss / math.log(2) * ratio["chars"]
    return metrics


# 3. training


def main(argv=None):
    args = parse_args(argv)
    tu.check_args(args)
    accelerator = tu.create_accelerator(args)

    # 1. data and model
    tokenizer, datasets, ratios = get_datasets(args, accelerator)
    train_dataset, eval_dataset = datasets["train"], datasets["validation"]
    if args.max_train_samples:
        train_dataset = train_dataset.select(range(min(args.max_train_samples, len(train_dataset))))
    if args.max_eval_samples:
        eval_dataset = eval_dataset.select(range(min(args.max_eval_samples, len(eval_dataset))))
    model = tu.load_model(AFTForCausalLM, args, vocab_size=len(tokenizer))
    tu.check_sequence_length(model.config, args.block_size, "--block_size")
    for name, dataset in (("training", train_dataset), ("validation", eval_dataset)):
        if len(dataset) == 0:
            raise tu.InputError(f"the {name} data holds fewer than --block_size={args.block_size} tokens.")
    train_dataloader, eval_dataloader = tu.make_dataloaders(
        args, train_dataset.with_format("torch"), eval_dataset.with_format("torch")
    )

    # 2. training
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler, run_state, steps_per_epoch = (
        tu.prepare_training(accelerator, args, model, train_dataloader, eval_dataloader, "aft_clm")
    )
    logger.info(
        f"{len(train_dataset)} training blocks of {args.block_size} tokens, {len(eval_dataset)} validation blocks; "
        f"{tu.count_parameters(model):,} parameters; {args.max_train_steps} steps of "
        f"{args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes} blocks"
    )

    def validation_metrics():
        return text_metrics(evaluate(model, eval_dataloader, accelerator), ratios.get("validation"), "eval")

    if args.eval_at_start and run_state.completed_steps == 0:
        run_state.log(accelerator, validation_metrics())
    tu.train(
        accelerator,
        args,
        model,
        optimizer,
        lr_scheduler,
        train_dataloader,
        run_state,
        steps_per_epoch,
        compute_loss=lambda model, batch: (
            model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss
        ),
        evaluate=validation_metrics,
    )

    # 3. final evaluation and the output folder
    results = validation_metrics()
    if "test" in datasets:
        test_dataloader = accelerator.prepare(
            DataLoader(
                datasets["test"].with_format("torch"),
                batch_size=args.per_device_eval_batch_size,
                collate_fn=default_data_collator,
            )
        )
        results |= text_metrics(evaluate(model, test_dataloader, accelerator), ratios.get("test"), "test")
    run_state.log(accelerator, results.copy())
    results |= tu.train_results(run_state, model, len(train_dataset), len(eval_dataset))

    dataset_id, dataset_name = dataset_names(args)
    metrics = {k: k.split("_", 1)[1] for k in results if k.startswith(("eval_", "test_")) and "samples" not in k}
    card = tu.CardInfo(
        task_type="text-generation",
        task_name="Causal language modelling",
        pipeline_tag="text-generation",
        dataset_id=dataset_id,
        dataset_name=dataset_name,
        dataset_config=args.dataset_config_name,
        dataset_split="validation",
        metrics=metrics,
        description=(
            f"causal language modelling, trained on {dataset_name} with "
            f"{'byte-level tokens (256 ids)' if len(tokenizer) == 256 else f'a {len(tokenizer)}-token vocabulary'} "
            f"in blocks of {args.block_size} tokens."
        ),
        usage=CLM_USAGE,
        tags=["text-generation", "causal-lm"],
    )
    tu.save_outputs(accelerator, args, model, tokenizer, run_state, results, card)


CLM_USAGE = """from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{model_id}")
model = AutoModelForCausalLM.from_pretrained("{model_id}")
inputs = tokenizer("def fibonacci(n):", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=200, do_sample=True, top_k=20)
print(tokenizer.decode(output[0]))"""


def dataset_names(args) -> tuple[str, str]:
    """(metadata id, human name) of the training data."""
    if args.enwik8_file:
        return "enwik8", "enwik8 (90M/5M/5M split)"
    if args.dataset_name:
        return args.dataset_name, args.dataset_name + (
            f" ({args.dataset_config_name})" if args.dataset_config_name else ""
        )
    if args.train_file:
        return "local-text", f"local text files ({Path(args.train_file).name})"
    version = sysconfig.get_python_version()
    return f"python-{version}-stdlib", f"the Python {version} standard library's top-level modules"


if __name__ == "__main__":
    tu.run_main(main)
