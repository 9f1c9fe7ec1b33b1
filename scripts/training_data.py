"""Data of the training scripts: text (the embedded standard-library corpus, local files, the Hub, enwik8), the
byte-level and BPE tokenizers, images (scikit-learn's digits, image folders, the Hub), and the data loaders.

    tokenizer, blocks, ratios = training_data.text_datasets(args, accelerator)   # blocks["train"], ["validation"]
    raw, image_column = training_data.image_datasets(args)                       # raw["train"], ["validation"]
    train_dataloader, eval_dataloader = training_data.make_dataloaders(args, train_dataset, eval_dataset)
"""

import sysconfig
from itertools import chain
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader
from training_args import InputError
from transformers import AutoTokenizer, PreTrainedTokenizerFast, default_data_collator

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DIGITS_TRAIN = 1500  # scikit-learn digits: the first 1,500 images train, the last 297 validate


def take(dataset, n: int | None):
    """The first `n` examples (all of them when n is None): --max_train_samples, --max_eval_samples."""
    return dataset.select(range(min(n, len(dataset)))) if n else dataset


def make_dataloaders(args, train_dataset, eval_dataset, collate_fn=default_data_collator):
    """The training loader (shuffled, whole batches only) and the evaluation loader, from the batch-size args."""
    train = DataLoader(
        train_dataset,
        shuffle=True,
        drop_last=True,
        batch_size=args.per_device_train_batch_size,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
    )
    return train, DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collate_fn)


# Text


def stdlib_corpus() -> DatasetDict:
    """The standard library's top-level .py files, sorted by name; every 10th file is held out for validation."""
    files = sorted(STDLIB.glob("*.py"))
    texts = {"train": [], "validation": []}
    for i, path in enumerate(files):
        texts["validation" if i % 10 == 9 else "train"].append(path.read_text(encoding="utf-8", errors="replace"))
    return DatasetDict({split: Dataset.from_dict({"text": t}) for split, t in texts.items()})


def load_text_datasets(args) -> DatasetDict:
    """'train' and 'validation' text splits from --dataset_name, --train_file/--validation_file or the corpus."""
    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
    elif args.train_file:
        for path in (args.train_file, args.validation_file):
            if path and not Path(path).is_file():
                raise InputError(f"data file {path} does not exist.")
            if path and Path(path).stat().st_size == 0:
                raise InputError(f"data file {path} is empty.")
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
        raise InputError(f"no column {args.text_column!r} in the data (columns: {raw['train'].column_names}).")
    for split in ("train", "validation"):
        if len(raw[split]) == 0:
            raise InputError(f"the {split} split of the text data is empty.")
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
    """--tokenizer_name, else the tokenizer saved with --model_name_or_path, else a trained BPE
    (--train_tokenizer), else bytes."""
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
        raise InputError(f"--enwik8_file {path} does not exist.")
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


def text_datasets(args, accelerator):
    """(tokenizer, datasets of `--block_size` blocks, tokens per byte and per character of the evaluation splits).
    The evaluation ratios turn nats per token into bits per byte; enwik8's tokens are its bytes."""
    if args.enwik8_file:
        if args.train_tokenizer or args.tokenizer_name:
            raise InputError("--enwik8_file uses bytes as tokens: drop --train_tokenizer / --tokenizer_name.")
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


# Images


def digits_dataset():
    """scikit-learn's digits (1,797 scans of handwritten digits, 8x8, 17 grey levels 0..16) as 8-bit grey images:
    level v becomes round(v * 255 / 16), so 0 stays black and 16 becomes 255."""
    from datasets import ClassLabel, Features, Image
    from PIL import Image as PILImage

    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise InputError(
            "the default image data is scikit-learn's digits: pip install scikit-learn, or pass --dataset_name or "
            "--train_dir."
        ) from error
    digits = load_digits()
    pixels = np.rint(digits.images * 255 / 16).astype(np.uint8)  # (N, 8, 8)
    images = [PILImage.fromarray(p, mode="L") for p in pixels]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(rows):
        return Dataset.from_dict({"image": [images[i] for i in rows], "label": digits.target[rows].tolist()}, features)

    n = len(images)
    return DatasetDict({"train": split(range(DIGITS_TRAIN)), "validation": split(range(DIGITS_TRAIN, n))})


def image_mode(image) -> str:
    """The PIL mode the images are converted to: 'L' (one channel) for grey images, 'RGB' for all others."""
    return "L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB"


def image_datasets(args):
    """DatasetDict with 'train' and 'validation' splits, plus the name of the image column. Sets
    `args.eval_split`, the name of the split the validation images come from (for the model card)."""
    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
    elif args.train_dir:
        for folder in (args.train_dir, args.validation_dir):
            if folder and not Path(folder).is_dir():
                raise InputError(f"image folder {folder} does not exist.")
        raw = DatasetDict({"train": load_dataset("imagefolder", data_dir=args.train_dir, split="train")})
        if args.validation_dir:
            raw["validation"] = load_dataset("imagefolder", data_dir=args.validation_dir, split="train")
    else:
        raw = digits_dataset()
    args.eval_split = "validation" if "validation" in raw else "test" if "test" in raw else "validation"
    if "validation" not in raw:
        held_out = "test" if "test" in raw else None
        if held_out:
            raw["validation"] = raw.pop(held_out)
        else:
            split = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
            raw = DatasetDict({"train": split["train"], "validation": split["test"]})
    columns = raw["train"].column_names
    image_column = args.image_column or next((c for c in ("image", "img") if c in columns), None)
    if image_column not in columns:
        raise InputError(f"no image column {image_column!r} in the data (columns: {columns}); use --image_column.")
    for split in ("train", "validation"):
        if len(raw[split]) == 0:
            raise InputError(f"the {split} split of the image data is empty.")
    return raw, image_column
