"""The training scripts read data as it is: image classes matched by name between the splits (other validation
classes: one line naming the difference), 16-bit and float grey images scaled to 8 bits (not clipped), every image
of a folder decoded at start-up (a truncated PNG is a one-line error), and texts that are null, empty or blank
refused by row and column. Tiny data written by the tests; the runs are the scripts' main() in this process.
"""

import json

import numpy as np
import pytest
from conftest import import_scripts

pytest.importorskip("accelerate")
pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def scripts():
    yield from import_scripts(
        clm="run_clm",
        classification="run_image_classification",
        pixels="training_pixels",
        args="training_args",
        data="training_data",
    )


def one_line_error(scripts, main, capsys) -> str:
    with pytest.raises(SystemExit) as exit_code:
        scripts.args.run_main(main)
    assert exit_code.value.code == 2
    stderr = capsys.readouterr().err  # datasets' bars may come first, when the data had to be read
    error = stderr[stderr.rindex("error: ") :]
    assert error.count("\n") == 1 and error.endswith("\n"), stderr
    return error


def image_folder(root, classes, count=4):
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (8, 8), 40 + i if label.lower() == "dark" else 220 - i).save(root / label / f"{i}.png")
    return root


def test_validation_class_folders_that_are_not_trains_are_one_line_errors_at_start_up(scripts, tmp_path, capsys):
    train = image_folder(tmp_path / "train", ["dark", "light"])
    flags = ["--preset", "tiny", "--max_train_steps", "1", "--per_device_train_batch_size", "4"]
    for classes, expected in (
        (["Dark", "light"], "not in train: ['Dark']; missing from validation: ['dark']"),
        (["dark"], "missing from validation: ['light']"),
        (["dark", "light", "medium"], "not in train: ['medium']"),
    ):
        validation = image_folder(tmp_path / "-".join(classes), classes)
        out = tmp_path / f"out-{'-'.join(classes)}"
        argv = [*flags, "--train_dir", str(train), "--validation_dir", str(validation), "--output_dir", str(out)]
        stderr = one_line_error(scripts, lambda argv=argv: scripts.classification.parse_args(argv), capsys)
        assert "the validation classes are not the training classes (" + expected in stderr
        assert not (out / "model.safetensors").exists()


def test_the_split_the_validation_images_come_from_is_returned(scripts, tmp_path):
    """A dataset with a test split and no validation split is evaluated on its test split, which the card names;
    nothing is written onto the arguments."""
    image_folder(tmp_path / "data" / "train", ["dark", "light"])
    image_folder(tmp_path / "data" / "test", ["dark", "light"], count=2)
    for folder, expected in ((tmp_path / "data", "test"), (tmp_path / "data" / "train", "validation")):
        args, _ = scripts.classification.parse_args(
            ["--dataset_name", str(folder), "--output_dir", str(tmp_path / "o")]
        )
        before = dict(vars(args))
        raw, image_column, eval_split = scripts.data.image_datasets(args)
        assert (eval_split, image_column, vars(args)) == (expected, "image", before)
        assert len(raw["validation"]) == (4 if expected == "test" else 1)


def test_classes_are_matched_by_name_not_by_id(scripts):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    def split(names, labels):
        features = Features({"x": Value("int64"), "label": ClassLabel(names=names)})
        return Dataset.from_dict({"x": list(range(len(labels))), "label": labels}, features)

    raw = DatasetDict({"train": split(["cat", "dog"], [0, 1]), "validation": split(["dog", "cat"], [0, 0, 1])})
    raw, names = scripts.data.class_names(raw, "label")
    assert names == ["cat", "dog"]
    assert raw["validation"]["label"] == [1, 1, 0]  # dog, dog, cat in train's ids
    assert raw["validation"].features["label"].names == ["cat", "dog"]
    raw["validation"] = split(["cat", "Dog"], [0, 1])
    with pytest.raises(scripts.args.InputError, match=r"not in train: \['Dog'\]; missing from validation: \['dog'\]"):
        scripts.data.class_names(raw, "label")


def test_16_bit_and_float_grey_images_are_scaled_to_8_bits(scripts, tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16)  # 0, 1, 128 and 255 in 8 bits
    Image.fromarray(values).save(tmp_path / "deep.png")
    deep = Image.open(tmp_path / "deep.png")
    assert deep.mode.startswith("I;16")
    processor = scripts.pixels.image_processor([deep], None)
    assert scripts.pixels.to_sequences([deep], processor)[0, 1:].tolist() == [0, 1, 128, 255]
    assert np.asarray(scripts.data.as_8bit(deep.convert("I"), "RGB"))[0, 2].tolist() == [128, 128, 128]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F")
    assert np.asarray(scripts.data.as_8bit(floats, "L")).tolist() == [[0, 128, 255]]


def test_a_truncated_png_is_a_one_line_error_at_start_up(scripts, tmp_path, capsys):
    train = image_folder(tmp_path / "train", ["dark", "light"])
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    broken = train / "light" / "broken.png"
    Image.fromarray(noise).save(broken)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # the header is intact
    with Image.open(broken) as image:
        assert image.size == (32, 32)
    argv = ["--preset", "tiny", "--train_dir", str(train), "--output_dir", str(tmp_path / "out")]
    stderr = one_line_error(scripts, lambda: scripts.classification.parse_args(argv), capsys)
    assert f"--train_dir {train}: {broken} is not a readable image" in stderr


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("nulls.jsonl", '{"text": "def f(): pass"}\n{"text": null}\n', "column 'text': row 2 has no text (null)"),
        ("blank.jsonl", '{"text": "def f(): pass"}\n{"text": "  \\n "}\n', "row 2 holds no text (empty or only"),
        ("blank.csv", 'text\ndef f(): pass\n"  "\n', "row 2 holds no text (empty or only whitespace)"),
        ("empty.csv", 'text\ndef f(): pass\n""\n', "row 2 has no text (null)"),  # pandas reads "" as missing
        ("numbers.jsonl", '{"text": 1}\n{"text": 2}\n', "holds int64 values, not texts"),
        ("newlines.txt", "\n\n  \n", "holds no text: only empty lines or whitespace"),
    ],
)
def test_null_empty_and_blank_texts_are_refused_by_row(scripts, tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    out = tmp_path / "out"
    argv = ["--preset", "tiny", "--train_file", str(path), "--block_size", "8", "--output_dir", str(out)]
    stderr = one_line_error(scripts, lambda: scripts.clm.main(argv), capsys)
    assert f"--train_file {path}" in stderr and expected in stderr
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    "name, content, expected",
    [
        # pyarrow's own words end the line ("JSON parse error: ..."), after the file's name
        ("broken.json", b'{"text": "abc"}\n{broken', "Missing a name for object member. in row 1"),
        ("broken.parquet", b"PAR1 not a parquet file", "cannot be read as parquet: "),
        ("one-line.txt", b"def f(): pass\n", "has 1 record(s), too few to hold out --validation_split_percentage 5"),
    ],
)
def test_unreadable_or_too_small_text_data_is_one_line(scripts, tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out"
    argv = ["--preset", "tiny", "--train_file", str(path), "--block_size", "8", "--output_dir", str(out)]
    stderr = one_line_error(scripts, lambda: scripts.clm.main(argv), capsys)
    assert expected in stderr, stderr
    assert not (out / "model.safetensors").exists()


def test_a_tokenizer_that_cannot_be_loaded_is_one_line(scripts, tmp_path, capsys):
    path = tmp_path / "code.txt"
    path.write_text("".join(f"def add_{i}(a, b):\n    return a + b\n" for i in range(100)))
    missing = tmp_path / "no-such-tokenizer"
    argv = ["--preset", "tiny", "--train_file", str(path), "--tokenizer_name", str(missing),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    stderr = one_line_error(scripts, lambda: scripts.clm.main(argv), capsys)
    assert f"--tokenizer_name {missing}: cannot load a tokenizer" in stderr


def test_blank_lines_between_texts_of_a_text_file_are_kept(scripts, tmp_path):
    path = tmp_path / "paragraphs.txt"
    path.write_text("".join(f"def add_{i}(a, b):\n    return a + b\n\n" for i in range(300)))
    out = tmp_path / "out"
    scripts.clm.main(["--preset", "tiny", "--train_file", str(path), "--block_size", "16", "--max_train_steps", "1",
                      "--output_dir", str(out)])  # fmt: skip
    assert json.loads((out / "all_results.json").read_text())["train_steps"] == 1
