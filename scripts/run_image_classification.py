"""Image classification with an AFT image model (AFTForImageClassification), reported in accuracy.

Data: `--dataset_name` (e.g. cifar10 from the Hub), `--train_dir`/`--validation_dir` (image folders, one
sub-folder per class), and by default scikit-learn's digits, which needs no download (8x8 grey images of the
digits 0-9; the first 1,500 train, the last 297 validate). Images are resized to `image_size`, scaled to [0, 1]
and normalised by the saved image processor (transformers' ViT processor, PIL based); no augmentation.

    python scripts/run_image_classification.py --preset tiny --output_dir outputs/aft-digits
    accelerate launch scripts/run_image_classification.py --dataset_name cifar10 --image_size 32 --patch_size 4 \
        --preset small --config_overrides aft_variant=conv,num_heads=64 --output_dir outputs/aft-cifar10
"""

import argparse
import logging

import torch
import training_args
import training_data
import training_model
from datasets import ClassLabel
from training_loop import Run, create_accelerator
from training_publish import CardInfo, save_outputs

from aft import AFTForImageClassification, aft_image_processor

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training_args.add_image_data_args(parser)
    parser.add_argument("--image_size", type=int, default=None, help="square side (default: the first image's).")
    parser.add_argument("--patch_size", type=int, default=None, help="default: image_size / 4, at least 1.")
    training_args.add_model_args(parser, default_preset="small")
    training_args.add_training_args(parser, learning_rate=1e-3, batch_size=32, epochs=10)
    training_args.add_output_args(parser)
    return parser.parse_args(argv)


def label_names(dataset, label_column: str) -> list[str]:
    if label_column not in dataset.column_names:
        raise training_args.InputError(
            f"no label column {label_column!r} (columns: {dataset.column_names}); use --label_column."
        )
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return feature.names
    return [str(label) for label in sorted(set(dataset[label_column]))]


def evaluate(model, dataloader, accelerator) -> dict:
    """Accuracy and mean cross-entropy over the whole evaluation set, gathered over processes."""
    model.eval()
    correct, losses = [], []
    for batch in dataloader:
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"]).logits
        losses.append(
            accelerator.gather_for_metrics(
                torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
            )
        )
        correct.append(accelerator.gather_for_metrics(logits.argmax(-1) == batch["labels"]))
    model.train()
    return {"eval_loss": torch.cat(losses).mean().item(), "eval_accuracy": torch.cat(correct).float().mean().item()}


CLASSIFICATION_USAGE = """from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{model_id}")
model = AutoModelForImageClassification.from_pretrained("{model_id}")
image = Image.open("digit.png")  # any image; it is resized and converted like the training images
inputs = processor(image.convert("L" if len(processor.image_mean) == 1 else "RGB"), return_tensors="pt")
print(model.config.id2label[model(**inputs).logits.argmax(-1).item()])"""


def main(argv=None):
    args = parse_args(argv)
    training_args.check_args(args)
    accelerator = create_accelerator(args)

    # 1. data
    raw, image_column = training_data.image_datasets(args)
    names = label_names(raw["train"], args.label_column)
    first = raw["train"][0][image_column]
    image_size = args.image_size or first.size[0]
    mode = training_data.image_mode(first)

    # 2. model and its image processor
    task_fields = {
        "image_size": image_size,
        "patch_size": args.patch_size or max(1, image_size // 4),
        "num_channels": 1 if mode == "L" else 3,
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }
    if args.model_name_or_path and args.patch_size is None:
        del task_fields["patch_size"]  # the checkpoint's own
    model = training_model.load_model(AFTForImageClassification, args, **task_fields)
    patch_size = model.config.patch_size
    processor = aft_image_processor(model.config)
    if mode == "L":  # one grey channel: one mean and std
        processor.image_mean, processor.image_std = [0.5], [0.5]
    label_ids = {name: i for i, name in enumerate(names)}
    is_class_label = isinstance(raw["train"].features[args.label_column], ClassLabel)

    def transform(batch):
        images = [image.convert(mode) for image in batch[image_column]]
        labels = batch[args.label_column] if is_class_label else [label_ids[str(x)] for x in batch[args.label_column]]
        return {
            "pixel_values": processor(images, return_tensors="pt")["pixel_values"],
            "labels": torch.tensor(labels),
        }

    def collate(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.stack([e["labels"] for e in examples]),
        }

    train_dataset = training_data.take(raw["train"], args.max_train_samples)
    eval_dataset = training_data.take(raw["validation"], args.max_eval_samples)

    # 3. data loaders, optimizer, schedule, accelerate, and the state of a resumed run
    train_dataloader, eval_dataloader = training_data.make_dataloaders(
        args, train_dataset.with_transform(transform), eval_dataset.with_transform(transform), collate
    )
    run = Run.prepare(
        accelerator, args, model, train_dataloader, eval_dataloader, project_name="aft_image_classification"
    )
    logger.info(
        f"{len(train_dataset)} training and {len(eval_dataset)} validation images, {len(names)} classes, "
        f"{image_size}x{image_size} in patches of {patch_size}; "
        f"{training_model.count_parameters(model):,} parameters; {args.max_train_steps} steps"
    )

    # 4. training
    run.train(
        compute_loss=lambda model, batch: model(**batch).loss,
        evaluate=lambda: evaluate(run.model, run.eval_dataloader, accelerator),
    )

    # 5. final evaluation
    results = evaluate(run.model, run.eval_dataloader, accelerator)
    run.log(results.copy())
    results |= run.results(len(train_dataset), len(eval_dataset))

    # 6. the output folder: model, processor, results, model card
    dataset_id = args.dataset_name or ("local-images" if args.train_dir else "sklearn-digits")
    card = CardInfo(
        task_type="image-classification",
        task_name="Image classification",
        pipeline_tag="image-classification",
        dataset_id=dataset_id,
        dataset_name=dataset_id if args.dataset_name or args.train_dir else "scikit-learn digits (8x8, 10 classes)",
        dataset_config=args.dataset_config_name,
        dataset_split=args.eval_split,
        metrics={"eval_accuracy": "accuracy", "eval_loss": "loss"},
        description=(
            f"image classification into {len(names)} classes, trained on {dataset_id} at "
            f"{image_size}x{image_size} in patches of {patch_size}."
        ),
        usage=CLASSIFICATION_USAGE,
        tags=["image-classification", "vision"],
    )
    save_outputs(run, processor, results, card)


if __name__ == "__main__":
    training_args.run_main(main)
