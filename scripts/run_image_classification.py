"""Image classification with an AFT image model (AFTForImageClassification), reported in accuracy and top-k
accuracy (through evaluate modules: the shipped ones by default, `--metric` for another).

Data: `--dataset_name` (e.g. cifar10 from the Hub), `--train_dir`/`--validation_dir` (image folders, one
sub-folder per class), and by default scikit-learn's digits, which needs no download (8x8 grey images of the
digits 0-9; the first 1,500 train, the last 297 validate). Classes are matched by name between the splits. Every
image is converted to 8-bit RGB (grey ones too, as the image-classification pipeline does; 16-bit grey is scaled,
not clipped), resized to `image_size`, scaled to [0, 1] and normalised by the saved image processor (transformers'
ViT processor, PIL based); no augmentation.

    python scripts/run_image_classification.py --preset tiny --output_dir outputs/aft-digits
    accelerate launch --config_file scripts/accelerate_configs/ddp.yaml --num_processes 2 \
        scripts/run_image_classification.py --dataset_name cifar10 --image_size 32 --patch_size 4 \
        --preset small --config_overrides aft_variant=conv,num_heads=64 --output_dir outputs/aft-cifar10
"""

import argparse
import logging

import torch
import training_args
import training_checks
import training_data
import training_model
from datasets import ClassLabel
from training_loop import Run, create_accelerator
from training_metrics import evaluate_classifier, load_metric
from training_publish import CARD_REQUIREMENTS, CardInfo, save_outputs

from aft import AFTForImageClassification, aft_image_processor

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    """The command line, checked, and what the checks settled (training_checks.RunPlan): bad input stops here with
    an InputError, before any work."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training_args.add_image_data_args(parser)
    parser.add_argument("--image_size", type=int, default=None, help="square side (default: the first image's).")
    parser.add_argument("--patch_size", type=int, default=None, help="default: image_size / 4, at least 1.")
    training_model.add_model_args(parser, default_preset="small")
    training_args.add_training_args(parser, learning_rate=1e-3, batch_size=32, epochs=10)
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument(
        "--metric",
        default="accuracy",
        help="an evaluate module given (predictions, references) label ids: a shipped one (default 'accuracy', "
        "offline), a local module folder, or a Hub module such as 'evaluate-metric/accuracy' (online).",
    )
    metrics.add_argument(
        "--top_k_accuracy", type=int, default=5, help="also report top-K accuracy when there are more classes (0: no)."
    )
    training_args.add_output_args(parser)
    args = parser.parse_args(argv)
    run_plan = training_checks.check_args(args)
    training_data.check_image_folders(args)
    return args, run_plan


CLASSIFICATION_USAGE = """from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

image = Image.new("L", (32, 32))  # your image here: Image.open(path), colour or grey, any size
classify = pipeline("image-classification", model={model_id}, trust_remote_code=True)
print(classify(image))  # also a file path or a URL: [{'label': ..., 'score': ...}, ...]

processor = AutoImageProcessor.from_pretrained({model_id}, trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained({model_id}, trust_remote_code=True)
inputs = processor(image.convert("RGB"), return_tensors="pt")  # the model takes RGB
print(model.config.id2label[model(**inputs).logits.argmax(-1).item()])"""


def main(argv=None):
    args, run_plan = parse_args(argv)
    accelerator = create_accelerator(args, run_plan)

    # 1. data
    raw, image_column, eval_split = training_data.image_datasets(args)
    raw, names = training_data.class_names(raw, args.label_column)  # validation classes matched to train's by name
    image_size = args.image_size or raw["train"][0][image_column].size[0]
    top_k = args.top_k_accuracy if args.top_k_accuracy < len(names) else 0  # top-k of k classes is always 1
    with accelerator.main_process_first():
        metrics = {"loss": load_metric("cross_entropy"), "metric": load_metric(args.metric)}
        if top_k:
            metrics["top_k"] = load_metric("top_k_accuracy")

    # 2. model and its image processor
    task_fields = {
        "image_size": image_size,
        "patch_size": args.patch_size or max(1, image_size // 4),
        "num_channels": 3,  # RGB, grey images too: the image-classification pipeline gives RGB
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }
    if args.model_name_or_path and args.patch_size is None:
        del task_fields["patch_size"]  # the checkpoint's own
    model = training_model.load_model(AFTForImageClassification, args, **task_fields)
    patch_size = model.config.patch_size
    processor = aft_image_processor(model.config)
    label_ids = {name: i for i, name in enumerate(names)}
    is_class_label = isinstance(raw["train"].features[args.label_column], ClassLabel)

    def transform(batch):
        images = [training_data.as_8bit(image, "RGB") for image in batch[image_column]]
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
        accelerator, args, run_plan, model, train_dataloader, eval_dataloader, project_name="aft_image_classification"
    )
    logger.info(
        f"{len(train_dataset)} training and {len(eval_dataset)} validation images, {len(names)} classes, "
        f"{image_size}x{image_size} in patches of {patch_size}; "
        f"{training_model.count_parameters(model):,} parameters; {run.steps.max_train_steps} steps"
    )

    # 4. training
    run.train(
        compute_loss=lambda model, batch: model(**batch).loss,
        evaluate=lambda: evaluate_classifier(run.model, run.eval_dataloader, accelerator, metrics, top_k),
    )

    # 5. final evaluation
    results = evaluate_classifier(run.model, run.eval_dataloader, accelerator, metrics, top_k)
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
        dataset_split=eval_split,
        metrics={k: k.removeprefix("eval_") for k in results if k.startswith("eval_") and k != "eval_samples"},
        description=(
            f"image classification into {len(names)} classes, trained on {dataset_id} at "
            f"{image_size}x{image_size} in patches of {patch_size}."
        ),
        usage=CLASSIFICATION_USAGE,
        requirements=(*CARD_REQUIREMENTS, "pillow"),
        tags=["image-classification", "vision"],
    )
    save_outputs(run, processor, results, card)


if __name__ == "__main__":
    training_args.run_main(main)
