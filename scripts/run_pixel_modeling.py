"""Autoregressive image modelling with an AFT model (the paper's headline task), reported in bits per dimension.

Each image becomes one sequence: a start token (id 256) then its H x W x C sub-pixels in raster order (row,
column, channel), each one of 256 intensity classes; AFTForCausalLM predicts every sub-pixel from those before
it, and bits/dim is the mean negative log2-likelihood per sub-pixel (8.0 for a uniform guess).

Data: `--dataset_name` (e.g. cifar10 from the Hub), `--train_dir`/`--validation_dir` (image folders), and by
default scikit-learn's digits, which needs no download (8x8 grey, 17 levels mapped to round(v * 255 / 16)).

    python scripts/run_pixel_modeling.py --preset tiny --output_dir outputs/aft-pixels-digits
    accelerate launch --config_file scripts/accelerate_configs/ddp.yaml --num_processes 2 \
        scripts/run_pixel_modeling.py --dataset_name cifar10 --preset cifar10-paper --output_dir outputs/aft-cifar10
"""

import argparse
import logging
import math

import numpy as np
import torch
import training_args
import training_checks
import training_data
import training_model
from PIL import Image
from training_loop import Run, create_accelerator
from training_metrics import load_metric, next_token_cross_entropy
from training_pixels import START, image_processor, to_sequences
from training_publish import CardInfo, save_outputs

from aft import AFTForCausalLM

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    """The command line, checked, and what the checks settled (training_checks.RunPlan): bad input stops here with
    an InputError, before any work."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training_args.add_image_data_args(parser)
    parser.add_argument("--image_size", type=int, default=None, help="resize to this square side (default: as is).")
    parser.add_argument("--num_samples", type=int, default=16, help="images to generate into samples.png (0: none).")
    training_model.add_model_args(parser, default_preset="small")
    training_args.add_training_args(parser, learning_rate=1e-3, batch_size=32, epochs=10)
    training_args.add_output_args(parser)
    args = parser.parse_args(argv)
    run_plan = training_checks.check_args(args)
    training_data.check_image_folders(args)
    return args, run_plan


def evaluate(model, dataloader, accelerator, metric) -> dict:
    """Bits per dimension: the mean negative log2-likelihood of every sub-pixel (each image has H*W*C)."""
    values = next_token_cross_entropy(model, dataloader, accelerator, metric)
    return {"eval_loss": values["loss"], "eval_bits_per_dim": values["bits_per_token"]}


def sample_grid(model, processor, num_samples: int, seed: int) -> Image.Image:
    """Sample `num_samples` images from the start token (recurrent decoding), as one grid. Every process samples
    (the same images: under FSDP each forward pass needs all processes)."""
    height, width = processor.size["height"], processor.size["width"]
    channels = len(processor.image_mean)
    torch.manual_seed(seed)
    start = torch.full((num_samples, 1), START, device=model.device)
    with torch.no_grad():
        ids = model.generate(input_ids=start, max_new_tokens=height * width * channels, do_sample=True)
    pixels = ids[:, 1:].clamp(0, 255).to(torch.uint8).view(num_samples, height, width, channels).cpu().numpy()
    columns = min(num_samples, 8)
    rows = math.ceil(num_samples / columns)
    grid = np.zeros((rows * (height + 1), columns * (width + 1), channels), np.uint8)
    for i, image in enumerate(pixels):
        r, c = divmod(i, columns)
        grid[r * (height + 1) : r * (height + 1) + height, c * (width + 1) : c * (width + 1) + width] = image
    scale = max(1, 256 // max(grid.shape[:2]))  # small images: enlarge for viewing
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    return Image.fromarray(grid[..., 0] if channels == 1 else grid)


PIXEL_USAGE = """import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained({model_id}, trust_remote_code=True)
start = torch.full((4, 1), model.config.bos_token_id)  # 4 images, each from the start token
ids = model.generate(input_ids=start, max_new_tokens={length}, do_sample=True)
images = ids[:, 1:].view(4, {shape}).to(torch.uint8)  # (N, H, W, C) sub-pixel values 0..255"""


def main(argv=None):
    args, run_plan = parse_args(argv)
    accelerator = create_accelerator(args, run_plan)
    with accelerator.main_process_first():
        metric = load_metric("cross_entropy")

    # 1. data: images -> sequences of sub-pixel classes
    raw, image_column, eval_split = training_data.image_datasets(args)
    processor = image_processor(raw["train"][:1][image_column], args.image_size)
    with accelerator.main_process_first():
        sequences = raw.map(
            lambda batch: {"input_ids": to_sequences(batch[image_column], processor)},
            batched=True,
            remove_columns=raw["train"].column_names,
            desc="images to sequences",
        )
    train_dataset = training_data.take(sequences["train"], args.max_train_samples)
    eval_dataset = training_data.take(sequences["validation"], args.max_eval_samples)
    height, width, channels = processor.size["height"], processor.size["width"], len(processor.image_mean)
    sequence_length = 1 + height * width * channels

    # 2. model: 256 intensity classes + the start token
    model = training_model.load_model(AFTForCausalLM, args, vocab_size=START + 1, bos_token_id=START)
    training_model.check_sequence_length(
        model.config, sequence_length, f"the sequence length 1 + {height}x{width}x{channels}"
    )
    model.generation_config.bos_token_id = START
    model.generation_config.suppress_tokens = [START]  # the start token never appears inside an image
    model.generation_config.max_new_tokens = sequence_length - 1
    model.generation_config.do_sample = True

    # 3. data loaders, optimizer, schedule, accelerate, and the state of a resumed run
    train_dataloader, eval_dataloader = training_data.make_dataloaders(
        args, train_dataset.with_format("torch"), eval_dataset.with_format("torch")
    )
    run = Run.prepare(
        accelerator, args, run_plan, model, train_dataloader, eval_dataloader, project_name="aft_pixel_modeling"
    )
    logger.info(
        f"{len(train_dataset)} training and {len(eval_dataset)} validation images of {height}x{width}x{channels} "
        f"sub-pixels; {training_model.count_parameters(model):,} parameters; {run.steps.max_train_steps} steps"
    )

    # 4. training
    run.train(
        compute_loss=lambda model, batch: (
            model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss
        ),
        evaluate=lambda: evaluate(run.model, run.eval_dataloader, accelerator, metric),
    )

    # 5. final evaluation and samples
    results = evaluate(run.model, run.eval_dataloader, accelerator, metric)
    run.log(results.copy())
    results |= run.results(len(train_dataset), len(eval_dataset))
    samples = sample_grid(run.unwrapped_model, processor, args.num_samples, args.seed) if args.num_samples else None

    # 6. the output folder: model, processor, results, model card
    dataset_id = args.dataset_name or ("local-images" if args.train_dir else "sklearn-digits")
    card = CardInfo(
        task_type="image-generation",
        task_name="Autoregressive image modelling",
        pipeline_tag="unconditional-image-generation",
        dataset_id=dataset_id,
        dataset_name=dataset_id if args.dataset_name or args.train_dir else "scikit-learn digits (8x8, 17 levels)",
        dataset_config=args.dataset_config_name,
        dataset_split=eval_split,
        metrics={"eval_bits_per_dim": "bits_per_dim", "eval_loss": "loss"},
        description=(
            f"autoregressive image modelling: each {height}x{width}x{channels} image is a sequence of "
            f"{height * width * channels} sub-pixels with 256 classes after a start token (id {START}), "
            "reported in bits per dimension. Samples: `samples.png`."
        ),
        usage=PIXEL_USAGE.replace("{length}", str(height * width * channels)).replace(
            "{shape}", f"{height}, {width}, {channels}"
        ),
        tags=["image-generation", "pixel-modeling"],
    )
    save_outputs(run, processor, results, card, images={"samples.png": samples} if samples else None)


if __name__ == "__main__":
    training_args.run_main(main)
