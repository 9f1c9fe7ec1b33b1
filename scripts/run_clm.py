"""Causal language modelling with an AFT model, reported in bits per byte (and per character) and perplexity.

Data, in order of precedence: `--enwik8_file` (the standard 90M/5M/5M split), `--dataset_name` (Hub),
`--train_file`/`--validation_file` (local text), and by default an embedded corpus that needs no download:
the Python standard library's own top-level modules (every 10th file, in name order, is the validation set).
Tokenization is byte level by default (ids 0-255 are the bytes, so bits per byte compare with the paper's enwik8
numbers; then <|endoftext|>, which ends every document and is bos and eos, and <|pad|>). With `--teacher_model` the
model also learns from a teacher's logits (training_distill.py), e.g. an AFT folder written by convert_to_aft.py
from the GPT-2 it was converted from.

    python scripts/run_clm.py --preset tiny --block_size 128 --per_device_train_batch_size 16 \
        --learning_rate 3e-3 --max_train_steps 300 --eval_steps 100 --max_eval_samples 256 --eval_at_start \
        --output_dir outputs/aft-stdlib
    python scripts/run_clm.py --model_name_or_path outputs/aft-gpt2 --teacher_model outputs/gpt2 \
        --distill_temperature 2 --distill_weight 0.5 --block_size 256 --output_dir outputs/aft-gpt2-distilled
    accelerate launch --config_file scripts/accelerate_configs/ddp.yaml --num_processes 2 scripts/run_clm.py \
        --enwik8_file enwik8 --preset enwik8-paper --block_size 1024 --output_dir outputs/aft-enwik8
"""

import argparse
import dataclasses
import logging
import sysconfig
from pathlib import Path

import training_args
import training_checks
import training_data
import training_distill
import training_model
from torch.utils.data import DataLoader
from training_loop import Run, create_accelerator
from training_metrics import load_metric, next_token_cross_entropy
from training_publish import CardInfo, model_reference, save_outputs, tokens_to_generate
from transformers import default_data_collator

from aft import AFTForCausalLM

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    """The command line, checked, and what the checks settled (training_checks.RunPlan): bad input stops here with
    an InputError, before any work."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (default: the Python standard library's sources)")
    data.add_argument("--dataset_name", default=None, help="a dataset of the Hub, e.g. 'wikitext'.")
    data.add_argument("--dataset_config_name", default=None, help="e.g. 'wikitext-2-raw-v1'.")
    data.add_argument(
        "--train_file", default=None, help="a local UTF-8 .txt (one document per line), .json, .jsonl or .csv."
    )
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
    tok = parser.add_argument_group("tokenizer (default: bytes, 256 ids and 2 special tokens)")
    tok.add_argument("--tokenizer_name", default=None, help="load this tokenizer (a folder or a Hub id).")
    tok.add_argument("--train_tokenizer", action="store_true", help="train a byte-level BPE on the training data.")
    tok.add_argument("--tokenizer_vocab_size", type=int, default=4096)
    parser.add_argument("--eval_at_start", action="store_true", help="also evaluate the untrained model.")
    training_model.add_model_args(parser, default_preset="small")
    parser.add_argument(
        "--freeze_carried_steps",
        type=int,
        default=0,
        help="for the first N optimizer steps train only the parameters that convert_to_aft.py made new (its "
        "conversion.json beside --model_name_or_path), the carried ones frozen; then every parameter, the "
        "schedule restarted (its warm-up included) over the remaining steps. 0 (default): all from the start.",
    )
    training_distill.add_args(parser)
    training_args.add_training_args(parser, learning_rate=1e-3, batch_size=16, epochs=1)
    training_args.add_output_args(parser)
    args = parser.parse_args(argv)
    run_plan = training_checks.check_args(args)
    training_data.check_text_files(args)
    return args, dataclasses.replace(
        run_plan,
        distillation=training_distill.check_args(args),
        new_parameters=training_model.check_freeze_carried(args),
    )


def evaluate(model, dataloader, accelerator, metric, ratio: dict | None, prefix: str) -> dict:
    """Loss (nats per token), perplexity, bits per byte (and per character) of the next-token predictions."""
    # enwik8's tokens are its bytes: "bits per character" there are bits per byte
    values = next_token_cross_entropy(
        model,
        dataloader,
        accelerator,
        metric,
        tokens_per_byte=ratio["bytes"] if ratio else 1.0,
        tokens_per_char=ratio["chars"] if ratio else None,
    )
    names = ("loss", "perplexity", "bits_per_byte", "bits_per_char")
    return {f"{prefix}_{name}": values[name] for name in names if name in values}


CLM_USAGE = """from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

tokenizer = AutoTokenizer.from_pretrained({model_id}, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained({model_id}, trust_remote_code=True)
inputs = tokenizer({prompt}, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens={long}, do_sample=True, top_k=20)  # or until end of text
print(tokenizer.decode(output[0], skip_special_tokens=True))

# several prompts at once: the tokenizer pads them on the left, as generate() needs
generator = pipeline("text-generation", model={model_id}, trust_remote_code=True, batch_size=2)
print(generator({prompts}, max_new_tokens={short}, do_sample=False))"""


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


def main(argv=None):
    args, run_plan = parse_args(argv)
    accelerator = create_accelerator(args, run_plan)
    with accelerator.main_process_first():
        metric = load_metric("cross_entropy")

    # 1. data: tokenized documents, each ended by eos, concatenated and cut into blocks of --block_size
    tokenizer, datasets, ratios = training_data.text_datasets(args, accelerator)
    train_dataset = training_data.take(datasets["train"], args.max_train_samples)
    eval_dataset = training_data.take(datasets["validation"], args.max_eval_samples)

    # 2. model, with the tokenizer's special tokens; the tokenizer gets the model's length
    special_tokens = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    model = training_model.load_model(AFTForCausalLM, args, vocab_size=len(tokenizer), **special_tokens)
    training_model.check_sequence_length(model.config, args.block_size, "--block_size")
    if model.config.has_position_limit:
        tokenizer.model_max_length = model.config.max_position_embeddings
    for name, dataset in (("training", train_dataset), ("validation", eval_dataset)):
        if len(dataset) == 0:
            raise training_args.InputError(f"the {name} data holds fewer than --block_size={args.block_size} tokens.")
    distillation = run_plan.distillation
    training_distill.check_student(distillation, model.config, tokenizer)
    teacher = training_distill.load_teacher(distillation.teacher_model, accelerator) if distillation else None

    # 3. data loaders, optimizer, schedule, accelerate, and the state of a resumed run
    train_dataloader, eval_dataloader = training_data.make_dataloaders(
        args, train_dataset.with_format("torch"), eval_dataset.with_format("torch")
    )
    run = Run.prepare(
        accelerator,
        args,
        run_plan,
        model,
        train_dataloader,
        eval_dataloader,
        "aft_clm",
        plan_args=(*training_distill.PLAN_ARGS, "freeze_carried_steps"),
    )
    logger.info(
        f"{len(train_dataset)} training blocks of {args.block_size} tokens, {len(eval_dataset)} validation blocks; "
        f"{training_model.count_parameters(model):,} parameters; {run.steps.max_train_steps} steps of "
        f"{run.global_batch_size} blocks"
    )

    # 4. training
    def validation_metrics():
        return evaluate(run.model, run.eval_dataloader, accelerator, metric, ratios.get("validation"), "eval")

    def cross_entropy(model, batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss

    if args.eval_at_start and run.state.completed_steps == 0:
        run.log(validation_metrics())
    run.train(
        compute_loss=(
            training_distill.DistillationLoss(teacher, distillation.temperature, distillation.weight)
            if teacher is not None
            else cross_entropy
        ),
        evaluate=validation_metrics,
    )

    # 5. final evaluation (and enwik8's test split)
    results = validation_metrics()
    if "test" in datasets:
        test_dataloader = accelerator.prepare(
            DataLoader(
                datasets["test"].with_format("torch"),
                batch_size=args.per_device_eval_batch_size,
                collate_fn=default_data_collator,
            )
        )
        results |= evaluate(run.model, test_dataloader, accelerator, metric, ratios.get("test"), "test")
    run.log(results.copy())
    results |= run.results(len(train_dataset), len(eval_dataset))

    # 6. the output folder: model, tokenizer, results, model card
    dataset_id, dataset_name = dataset_names(args)
    metrics = {k: k.split("_", 1)[1] for k in results if k.startswith(("eval_", "test_")) and "samples" not in k}
    vocabulary = {258: "byte-level tokens (256 bytes, <|endoftext|> and <|pad|>)", 256: "byte-level tokens"}.get(
        len(tokenizer), f"a {len(tokenizer)}-token vocabulary"
    )
    description = (
        f"causal language modelling, trained on {dataset_name} with {vocabulary} in blocks of {args.block_size} "
        "tokens."
    )
    if teacher is not None:
        description += (
            f" Distilled from `{model_reference(distillation.teacher_model)}`: the loss is (1 - a) * CE + "
            f"a * T^2 * KL(teacher_T || student_T) with T = {distillation.temperature:g}, a = "
            f"{distillation.weight:g}."
        )
    prompts = training_data.example_prompts(tokenizer, eval_dataset)
    card = CardInfo(
        task_type="text-generation",
        task_name="Causal language modelling",
        pipeline_tag="text-generation",
        dataset_id=dataset_id,
        dataset_name=dataset_name,
        dataset_config=args.dataset_config_name,
        dataset_split="validation",
        metrics=metrics,
        description=description,
        usage=CLM_USAGE.replace("{long}", str(tokens_to_generate(model.config, tokenizer, prompts[:1], 200))).replace(
            "{short}", str(tokens_to_generate(model.config, tokenizer, prompts, 50))
        ),
        tags=["text-generation", "causal-lm", *(["distillation"] if teacher is not None else [])],
        example_prompts=prompts,
    )
    save_outputs(run, tokenizer, results, card)


if __name__ == "__main__":
    training_args.run_main(main)
