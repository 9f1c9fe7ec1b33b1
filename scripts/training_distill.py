"""Knowledge distillation for run_clm.py (Hinton et al., 2015): a frozen teacher causal LM, checked against the
student before training, and the loss

    (1 - a) * CE(student, next tokens) + a * T^2 * KL(softmax(teacher / T) || softmax(student / T))

over the predicted positions (every position of a block but the last), in float32. T^2 keeps the soft term's
gradients on the scale of the hard term's at any temperature.

    distillation = training_distill.check_args(args)        # at start-up: the options and the teacher's config
    training_distill.check_student(distillation, model.config, tokenizer)  # the vocabularies line up
    teacher = training_distill.load_teacher(distillation.teacher_model, accelerator)
    run.train(compute_loss=training_distill.DistillationLoss(teacher, distillation.temperature,
                                                             distillation.weight), ...)  # logs ce_loss, kl_loss
"""

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from training_args import InputError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

DEFAULT_TEMPERATURE = 2.0
DEFAULT_WEIGHT = 0.5
# The options a resumed run must share with the saved one (they change the losses).
PLAN_ARGS = ("teacher_model", "distill_temperature", "distill_weight")


def add_args(parser):
    group = parser.add_argument_group("distillation (from a teacher's logits)")
    group.add_argument(
        "--teacher_model",
        default=None,
        help="a causal LM folder or Hub id (AutoModelForCausalLM) with the student's vocabulary: train on "
        "(1 - a) * CE + a * T^2 * KL(teacher_T || student_T).",
    )
    group.add_argument("--distill_temperature", type=float, default=None, help=f"T (default {DEFAULT_TEMPERATURE}).")
    group.add_argument("--distill_weight", type=float, default=None, help=f"a in [0, 1] (default {DEFAULT_WEIGHT}).")


@dataclasses.dataclass(frozen=True)
class Distillation:
    """A run's distillation, as check_args settled it: the teacher, T and a (their defaults filled in), and the
    teacher's config."""

    teacher_model: str
    temperature: float
    weight: float
    teacher_config: object  # the teacher's PretrainedConfig

    def as_args(self) -> dict:
        """The settings under the names of their arguments (--teacher_model, --distill_temperature, ...)."""
        return {
            "teacher_model": self.teacher_model,
            "distill_temperature": self.temperature,
            "distill_weight": self.weight,
        }


def one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:400]


def check_args(args) -> Distillation | None:
    """The distillation options and the teacher's config, before any work (InputError): the Distillation, with the
    defaults filled in, or None without --teacher_model, where the two numbers must not be given (they would do
    nothing). `args` is left as it is."""
    if args.teacher_model is None:
        for name in ("distill_temperature", "distill_weight"):
            if getattr(args, name) is not None:
                raise InputError(f"--{name} needs --teacher_model (the model whose logits are distilled).")
        return None
    name = args.teacher_model
    if Path(name).exists() and not Path(name, "config.json").is_file():
        raise InputError(f"--teacher_model {name} has no config.json: pass a folder written by save_pretrained.")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"--teacher_model {name}: cannot load its config ({one_line(error)}).") from error
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:  # with the classes registered by `import aft`
        raise InputError(
            f"--teacher_model {name} has model_type {config.model_type!r}, which is not a causal LM "
            "(AutoModelForCausalLM does not load it): pass a causal LM with the student's vocabulary."
        )
    positions = getattr(config, "max_position_embeddings", None)  # GPT-2: n_positions
    if getattr(config, "has_position_limit", True) is False:  # an AFT model without a length limit
        positions = None
    if positions is not None and positions < args.block_size:
        raise InputError(
            f"--teacher_model {name} has {positions} positions, fewer than --block_size={args.block_size}: "
            f"lower --block_size to at most {positions}, or use a teacher with longer positions."
        )
    temperature = DEFAULT_TEMPERATURE if args.distill_temperature is None else args.distill_temperature
    weight = DEFAULT_WEIGHT if args.distill_weight is None else args.distill_weight
    return Distillation(name, temperature, weight, config)


# the files one of which every saved tokenizer has (fast: tokenizer.json; GPT-2's slow: vocab.json; sentencepiece)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json")


def check_student(distillation: Distillation | None, student_config, tokenizer):
    """The teacher's logits must line up with the student's index by index: the same number of logits and, when the
    teacher has a tokenizer, the same token for every id (InputError). Nothing to check without a teacher (None)."""
    if distillation is None:
        return
    name, teacher_vocab = distillation.teacher_model, distillation.teacher_config.vocab_size
    if teacher_vocab != student_config.vocab_size:
        raise InputError(
            f"--teacher_model {name} has vocab_size={teacher_vocab}, the student {student_config.vocab_size}: "
            "distillation compares their logits id by id, so both need the same vocabulary (train the student with "
            f"the teacher's tokenizer: --tokenizer_name {name})."
        )
    if Path(name).is_dir() and not any((Path(name) / file).is_file() for file in TOKENIZER_FILES):
        return  # no tokenizer saved with the teacher: the sizes are all there is to compare
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError):
        return
    # transformers builds an empty tokenizer of the config's type where the files are missing: nothing to compare
    if len(teacher_tokenizer.get_vocab()) > 1 and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise InputError(
            f"--teacher_model {name}: its tokenizer maps ids to other tokens than the student's (same size, "
            f"{teacher_vocab}, different vocabulary): train the student with --tokenizer_name {name}."
        )


def load_teacher(name: str, accelerator):
    """The teacher: every weight loaded (InputError otherwise), frozen, in eval mode, on the run's device."""
    try:
        teacher, info = AutoModelForCausalLM.from_pretrained(name, output_loading_info=True)
    except Exception as error:  # OSError, ValueError, safetensors' and torch's own errors for a damaged file, ...
        raise InputError(f"--teacher_model {name}: cannot load its weights ({one_line(error)}).") from error
    missing = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if missing:
        raise InputError(f"--teacher_model {name} lacks weights of its model class: {', '.join(missing)[:300]}.")
    teacher.requires_grad_(False).eval()
    return accelerator.prepare_model(teacher, evaluation_mode=True)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher / T) || softmax(student / T)), in float32. Logits (..., V)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)  # (N, V)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True)  # sum over (N, V) / N


class DistillationLoss:
    """`compute_loss` of the training loop: the combined loss of a batch of blocks, with its two terms (ce_loss,
    kl_loss), which the loop logs beside it."""

    def __init__(self, teacher, temperature: float, weight: float):
        self.teacher, self.temperature, self.weight = teacher, temperature, weight

    def __call__(self, model, batch):
        ids = batch["input_ids"]  # (B, T)
        output = model(input_ids=ids, labels=ids, use_cache=False)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits  # (B, T, V)
        ce = output.loss.float()
        # position t predicts token t + 1: the last position predicts nothing
        kl = kl_divergence(output.logits[:, :-1], teacher_logits[:, :-1], self.temperature)
        loss = (1 - self.weight) * ce + self.weight * self.temperature**2 * kl
        return loss, {"ce_loss": ce.detach(), "kl_loss": kl.detach()}
