"""Data of the training scripts: text (the embedded standard-library corpus, local files, the Hub, enwik8), the
byte-level and BPE tokenizers, images (scikit-learn's digits, image folders, the Hub), and the data loaders.

    training_data.check_text_files(args)                                         # before any work (InputError)
    tokenizer, blocks, ratios = training_data.text_datasets(args, accelerator)   # blocks["train"], ["validation"]
    training_data.check_image_folders(args)
    raw, image_column, eval_split = training_data.image_datasets(args)           # raw["train"], ["validation"]
    train_dataloader, eval_dataloader = training_data.make_dataloaders(args, train_dataset, eval_dataset)
"""

import codecs
import logging
import math
import sysconfig
from itertools import chain
from pathlib import Path

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, load_dataset
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader
from training_args import InputError
from transformers import AutoTokenizer, PreTrainedTokenizerFast, default_data_collator

logger = logging.getLogger(__name__)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DIGITS_TRAIN = 1500  # scikit-learn digits: the first 1,500 images train, the last 297 validate
# Local text files: extension -> datasets builder.
TEXT_BUILDERS = {"txt": "text", "text": "text", "raw": "text", "": "text", "json": "json", "jsonl": "json"}
TEXT_BUILDERS |= {"csv": "csv", "parquet": "parquet"}
# The byte tokenizer's special tokens (after the 256 bytes), as GPT-2's: one token ends a document and starts
# the next (bos = eos), plus a padding token.
END_OF_TEXT, PAD = "<|endoftext|>", "<|pad|>"


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


def check_utf8(path: Path, option: str):
    """InputError naming the file, the offset and the line of the first byte that is not UTF-8 text (or a NUL
    byte: binary data). Reads the file in 1 MiB chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            nul = chunk.find(b"\0")
            try:
                decoder.decode(chunk[:nul] if nul >= 0 else chunk)
            except UnicodeDecodeError as error:
                at = offset - pending + error.start
                line = lines + chunk[: max(0, error.start - pending)].count(b"\n")
                raise InputError(
                    f"{option} {path} is not UTF-8 text: byte {error.object[error.start]:#04x} at offset {at:,} "
                    f"(line {line:,}) cannot be decoded; convert the file to UTF-8."
                ) from error
            if nul >= 0:
                line = lines + chunk[:nul].count(b"\n")
                raise InputError(
                    f"{option} {path} holds binary data, not text: a NUL byte at offset {offset + nul:,} "
                    f"(line {line:,}). For raw bytes such as enwik8 use --enwik8_file."
                )
            offset += len(chunk)
            lines += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        raise InputError(f"{option} {path} is not UTF-8 text: it ends inside a character.") from error


def check_text_files(args):
    """--train_file / --validation_file: files that exist, are not empty, of a supported kind (both the same),
    and UTF-8 text; --enwik8_file exists. InputError before any work."""
    if args.enwik8_file:
        if not Path(args.enwik8_file).is_file():
            raise InputError(f"--enwik8_file {args.enwik8_file} does not exist.")
        return
    if args.dataset_name or not args.train_file:
        return
    kinds = set()
    for option, name in (("--train_file", args.train_file), ("--validation_file", args.validation_file)):
        if not name:
            continue
        path = Path(name)
        if not path.is_file():
            raise InputError(f"{option}: data file {path} does not exist.")
        if path.stat().st_size == 0:
            raise InputError(f"{option}: data file {path} is empty.")
        extension = path.suffix.lstrip(".").lower()
        if extension not in TEXT_BUILDERS:
            known = ", ".join(f".{e}" for e in TEXT_BUILDERS if e)
            raise InputError(
                f"{option} {path}: files ending in .{extension} are not supported: use {known} (or no extension) "
                "for text, or --enwik8_file for raw bytes."
            )
        kinds.add(TEXT_BUILDERS[extension])
        if TEXT_BUILDERS[extension] != "parquet":
            check_utf8(path, option)
    if len(kinds) > 1:
        raise InputError(f"--train_file and --validation_file are of different kinds ({sorted(kinds)}): use one.")


def check_texts(dataset, args, split: str):
    """InputError naming the source, the row and the column of the first text that is missing (null), not a
    string, or (in a file of records: .json, .jsonl, .csv, .parquet) empty or only whitespace; and when no text
    has any other character than whitespace. Lines of a text file and rows of a Hub dataset may be blank (the
    separators between paragraphs). Run on the table as loaded, so row numbers are the file's."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if args.text_column not in dataset.column_names:
        raise InputError(f"no column {args.text_column!r} in the data (columns: {dataset.column_names}).")
    if args.dataset_name:
        source = f"--dataset_name {args.dataset_name} ({split} split)"
    elif args.train_file:
        file = args.validation_file if split == "validation" else args.train_file
        source = f"--{'validation' if split == 'validation' else 'train'}_file {file}"
    else:
        source = f"the {split} split"
    column = dataset.data.column(args.text_column)
    where = f"{source}, column {args.text_column!r}"
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        raise InputError(f"{where} holds {column.type} values, not texts: choose a text column with --text_column.")
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise InputError(f"{where}: row {row + 1:,} has no text (null); fill it in or drop the row.")
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
    records = (
        args.train_file and not args.dataset_name and TEXT_BUILDERS[Path(file).suffix.lstrip(".").lower()] != "text"
    )
    if records and pc.any(blank).as_py():
        row = pc.index(blank, True).as_py()
        raise InputError(f"{where}: row {row + 1:,} holds no text (empty or only whitespace); drop the row.")
    if len(column) and pc.all(blank).as_py():
        raise InputError(f"{where} holds no text: only empty lines or whitespace.")


def load_text_datasets(args) -> DatasetDict:
    """'train' and 'validation' text splits from --dataset_name, --train_file/--validation_file or the corpus."""
    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
    elif args.train_file:  # checked by check_text_files at start-up
        files = {"train": args.train_file, **({"validation": args.validation_file} if args.validation_file else {})}
        builder = TEXT_BUILDERS[Path(args.train_file).suffix.lstrip(".").lower()]
        try:
            raw = load_dataset(builder, data_files=files)
        except (datasets.exceptions.DatasetGenerationError, ValueError) as error:  # pyarrow's errors are ValueErrors
            cause = error.__cause__ or error
            names = " or ".join(str(path) for path in files.values())
            raise InputError(f"{names} cannot be read as {builder}: {str(cause).splitlines()[0]}") from error
    else:
        raw = stdlib_corpus()
    for split in raw:
        check_texts(raw[split], args, split)
    if "validation" not in raw:
        share = args.validation_split_percentage / 100
        if math.ceil(len(raw["train"]) * share) >= len(raw["train"]):  # datasets holds out the ceiling
            raise InputError(
                f"the training data has {len(raw['train']):,} record(s), too few to hold out "
                f"--validation_split_percentage {args.validation_split_percentage:g} for validation and train on the "
                "rest: give more text, or a --validation_file."
            )
        split = raw["train"].train_test_split(test_size=share, seed=args.seed)
        raw = DatasetDict({"train": split["train"], "validation": split["test"]})
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


# Each message is "role: content" ended by eos, as every training document ends; a generation prompt opens the
# assistant's turn, so generate() stops at the eos that closes it. It uses only the tokenizer's own special tokens;
# the `{% generation %}` markers are what TRL's assistant-only loss counts (the answer and its eos).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ 'assistant: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['role'] + ': ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def causal_lm_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer of a causal LM: <|endoftext|> is bos and eos, <|pad|> pads, on the left (the
    padding generate() needs for a batch of prompts); with a chat template (CHAT_TEMPLATE) for apply_chat_template
    and TRL's SFTTrainer."""
    causal_lm = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=PAD,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    causal_lm.chat_template = CHAT_TEMPLATE
    return causal_lm


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Token id = byte value of the UTF-8 text (0..255), and decoding returns exactly those bytes; then the
    special tokens <|endoftext|> (256: bos and eos) and <|pad|> (257)."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # no merges, so no need for GPT-2's word-splitting regex: the same ids, twice as fast
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True), AddedToken(PAD, special=True)])
    return causal_lm_tokenizer(tokenizer)


def bpe_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`: every byte is in the alphabet, so any text round-trips. Its special
    tokens <|endoftext|> (0) and <|pad|> (1) are as the byte tokenizer's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[END_OF_TEXT, PAD],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return causal_lm_tokenizer(tokenizer)


def get_tokenizer(args, train_texts) -> PreTrainedTokenizerFast:
    """--tokenizer_name, else the tokenizer saved with --model_name_or_path, else a trained BPE
    (--train_tokenizer), else bytes."""
    if args.tokenizer_name:
        try:
            return AutoTokenizer.from_pretrained(args.tokenizer_name)
        except (OSError, ValueError) as error:  # a missing folder, an unknown Hub id, files of no tokenizer
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise InputError(f"--tokenizer_name {args.tokenizer_name}: cannot load a tokenizer ({reason}).") from error
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
    Each document ends with the tokenizer's eos token (so the model learns where a text ends), then the documents
    are concatenated and cut into blocks. The evaluation ratios turn nats per token into bits per byte; enwik8's
    tokens are its bytes."""
    if args.enwik8_file:
        if args.train_tokenizer or args.tokenizer_name:
            raise InputError("--enwik8_file uses bytes as tokens: drop --train_tokenizer / --tokenizer_name.")
        # enwik8's "bits per character" are bits per byte: the measure is over the raw bytes.
        return byte_tokenizer(), enwik8_datasets(args.enwik8_file, args.block_size), {}
    raw = load_text_datasets(args)
    tokenizer = get_tokenizer(args, raw["train"][args.text_column])
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        # verbose=False: whole documents are longer than model_max_length, which is the model's block, not theirs
        ids = tokenizer(batch[args.text_column], return_attention_mask=False, verbose=False)["input_ids"]
        return {"input_ids": [x + [eos] if eos is not None and x[-1:] != [eos] else x for x in ids]}

    sizes = ", ".join(f"{len(raw[split]):,} {split}" for split in raw)
    logger.info(f"tokenizing {sizes} documents, in blocks of {args.block_size} tokens")
    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one log line per stage instead of two bars per split and process
    try:
        with accelerator.main_process_first():
            tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)
            ratios = {}
            for split in tokenized:
                if split == "train":
                    continue
                texts = raw[split][args.text_column]
                tokens = sum(len(ids) for ids in tokenized[split]["input_ids"])
                n_bytes = sum(len(t.encode("utf-8")) for t in texts)
                ratios[split] = {"bytes": tokens / n_bytes, "chars": tokens / sum(len(t) for t in texts)}
            blocks = tokenized.map(lambda b: group_texts(b, args.block_size), batched=True)
    finally:
        if bars:
            datasets.enable_progress_bars()
    return tokenizer, blocks, ratios


def example_prompts(tokenizer, blocks, n: int = 2, max_chars: int = 40) -> list[str]:
    """`n` prompts from the model's own data, for the model card: the first non-empty line of each of the first
    blocks (a line already taken is skipped), at most `max_chars` characters, cut after a word."""
    prompts = []
    for i in range(len(blocks)):
        text = tokenizer.decode(blocks[i]["input_ids"][:256], skip_special_tokens=True)
        for line in (line.strip() for line in text.splitlines()):
            if len(line) > max_chars:
                cut = line.rfind(" ", 0, max_chars)
                line = line[: cut if cut > 0 else max_chars].rstrip()
            if line and line not in prompts:
                prompts.append(line)
                break
        if len(prompts) == n:
            break
    return prompts or [""]


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
    return "L" if image.mode in ("1", "L", "I", "F") or image.mode.startswith("I;16") else "RGB"


def as_8bit(image, mode: str):
    """`image` as 8-bit PIL mode `mode` ('L' or 'RGB'), its values scaled from their own range: PIL's `convert`
    clips 16-bit grey (I;16, and 'I', as PIL opens some 16-bit files) at 255 instead of scaling it, and rounds
    float grey ('F', read as 0..1) to 0 or 1. 16-bit values v become round(v * 255 / 65535), floats
    round(v * 255); other modes (palette, alpha, CMYK, 1-bit, ...) are PIL's own conversions."""
    from PIL import Image

    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64).clip(0, 65535) * 255 / 65535
        image = Image.fromarray(np.rint(values).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64).clip(0, 1) * 255
        image = Image.fromarray(np.rint(values).astype(np.uint8), mode="L")
    return image.convert(mode)


def check_image_folder(folder: str, option: str) -> set[str]:
    """InputError unless `folder` is a folder of images (by datasets' imagefolder extensions, each decoded whole
    by PIL: a truncated file is found here, not in the middle of training), with no other files but imagefolder's
    metadata files; hidden files are skipped."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{option}: image folder {folder} does not exist.")
    files = [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    images = [p for p in files if p.suffix.lower() in ImageFolder.EXTENSIONS]
    others = [p for p in files if p.suffix.lower() not in ImageFolder.EXTENSIONS and p.stem != "metadata"]
    layout = "an image folder holds one sub-folder of images per class"
    if not images:
        found = f" ({len(others)} other files, e.g. {others[0]})" if others else ""
        raise InputError(f"{option} {folder} holds no images{found}: {layout}.")
    if others:
        raise InputError(
            f"{option} {folder} holds {len(others)} files that are not images, e.g. {others[0]}: move them out "
            f"({layout})."
        )
    for path in images:
        try:
            with Image.open(path) as image:
                image.load()  # every pixel: a file cut short after a sound header fails here
        except Exception as error:
            reason = " ".join(f"{type(error).__name__}: {error}".split())
            raise InputError(f"{option} {folder}: {path} is not a readable image ({reason}).") from error
    return {path.parent.name for path in images}  # imagefolder's class names: the folder of each image


def check_class_names(names: list[str] | set[str], validation_names: list[str] | set[str]):
    """InputError naming the classes of one split that the other lacks (classes are matched by name)."""
    missing, extra = sorted(set(names) - set(validation_names)), sorted(set(validation_names) - set(names))
    if missing or extra:
        parts = [f"not in train: {extra}" if extra else "", f"missing from validation: {missing}" if missing else ""]
        raise InputError(
            f"the validation classes are not the training classes ({'; '.join(p for p in parts if p)}; classes "
            "are matched by name, e.g. folder names, case included): rename them to match."
        )


def check_image_folders(args):
    """--train_dir / --validation_dir (when given, without --dataset_name): see `check_image_folder`; the class
    folders of both must have the same names."""
    if args.dataset_name:
        return
    classes = [
        check_image_folder(folder, option)
        for option, folder in (("--train_dir", args.train_dir), ("--validation_dir", args.validation_dir))
        if folder
    ]
    if args.train_dir and args.validation_dir:
        check_class_names(*classes)


def class_names(raw: DatasetDict, label_column: str) -> tuple[DatasetDict, list[str]]:
    """(raw with the validation labels as train's ids, the class names by train's id). Classes are matched by
    name: image folders number their classes in the sorted order of each split's own folder names, so the same
    id can name another class in each split. InputError when the validation classes are not train's."""
    for split in ("train", "validation"):
        if label_column not in raw[split].column_names:
            raise InputError(
                f"no label column {label_column!r} in the {split} data (columns: {raw[split].column_names}); use "
                "--label_column."
            )

    def names_of(split):
        feature = raw[split].features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            return feature.names
        return [str(label) for label in sorted(set(raw[split][label_column]))]

    names = names_of("train")
    check_class_names(names, names_of("validation"))
    feature = raw["validation"].features[label_column]
    if isinstance(feature, datasets.ClassLabel) and feature.names != names:
        to_train_id = [names.index(name) for name in feature.names]
        features = raw["validation"].features.copy()
        features[label_column] = raw["train"].features[label_column]
        raw["validation"] = raw["validation"].map(
            lambda labels: {label_column: [to_train_id[x] for x in labels]},
            input_columns=[label_column],
            batched=True,
            features=features,
        )
    return raw, names


def image_datasets(args):
    """DatasetDict with 'train' and 'validation' splits, the name of the image column, and the name of the split
    the validation images come from (for the model card)."""
    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
    elif args.train_dir:  # checked by check_image_folders at start-up
        raw = DatasetDict({"train": load_dataset("imagefolder", data_dir=args.train_dir, split="train")})
        if args.validation_dir:
            raw["validation"] = load_dataset("imagefolder", data_dir=args.validation_dir, split="train")
    else:
        raw = digits_dataset()
    eval_split = "validation" if "validation" in raw else "test" if "test" in raw else "validation"
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
    return raw, image_column, eval_split
