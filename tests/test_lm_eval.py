"""lm-evaluation-harness on a saved AFT folder: its `HFLM` wrapper (in process, with the package) and its command
line (`lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True,backend=causal`, as remote code) score
two tasks defined here from local files, one by loglikelihood (multiple choice) and one by generate_until, and every
score and response equals what the model's own logits and greedy decoding give. A tiny model, CPU, offline."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import import_scripts, tiny_config

from aft import AFTForCausalLM

pytest.importorskip("lm_eval", reason='the [tools] extra: pip install -e ".[tools]"')

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

QUESTIONS = ["Sky?", "Grass is", "A rose:", "Sea", "Snow, at night", "Fire"]
CHOICES = ["red", "blue", "green", "a"]
MAX_GEN = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved folder (model and the scripts' byte tokenizer), the two tasks' folder, the model and tokenizer."""
    for scripts in import_scripts(data="training_data"):
        tokenizer = scripts.data.byte_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(
        "local",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AFTForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    tasks = tmp_path_factory.mktemp("tasks")
    mc = [{"question": q, "choices": CHOICES, "label": i % len(CHOICES)} for i, q in enumerate(QUESTIONS)]
    # every other target is the model's own greedy answer, the rest a string it does not produce: exact match 1/2
    gen = [
        {"question": q, "answer": _greedy(model, tokenizer, q) if i % 2 else "\u2603"} for i, q in enumerate(QUESTIONS)
    ]
    for name, docs in (("mc", mc), ("gen", gen)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks}/{{name}}.jsonl\ntest_split: test\n"
    )
    (tasks / "aft_mc.yaml").write_text(
        "task: aft_mc\n" + common.format(name="mc") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tasks / "aft_gen.yaml").write_text(
        "task: aft_gen\n" + common.format(name="gen") + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        f'generation_kwargs:\n  until: ["\\n"]\n  do_sample: false\n  max_gen_toks: {MAX_GEN}\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder, tasks, model, tokenizer


def _greedy(model, tokenizer, context):
    """The greedy continuation of `context` alone (no batch, no padding), cut where the task's `until` cuts it."""
    ids = torch.tensor([tokenizer(context).input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_GEN, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


def _loglikelihood(model, tokenizer, context, continuation):
    """log p(continuation | context) summed over its tokens, and whether each is the argmax, from one forward pass."""
    ctx, cont = tokenizer(context).input_ids, tokenizer(continuation).input_ids
    with torch.no_grad():
        logprobs = model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1].float().log_softmax(-1)
    picked = logprobs[torch.arange(len(cont)), cont]
    return picked.sum().item(), bool((logprobs.argmax(-1) == torch.tensor(cont)).all())


def _check(results, model, tokenizer):
    """Each sample's responses and each task's score equal those computed from the model by hand."""
    hits = []
    for sample in results["samples"]["aft_mc"]:
        doc = sample["doc"]
        by_hand = [_loglikelihood(model, tokenizer, doc["question"], " " + choice) for choice in doc["choices"]]
        for (ll, greedy), (ll_hand, greedy_hand) in zip(sample["filtered_resps"], by_hand, strict=True):
            # the command line's sample files hold them as text
            assert float(ll) == pytest.approx(ll_hand, abs=1e-4) and str(greedy) == str(greedy_hand)
        hits.append(max(range(len(by_hand)), key=lambda i: by_hand[i][0]) == doc["label"])
    assert len(hits) == len(QUESTIONS)
    assert results["results"]["aft_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))

    matches = []
    for sample in results["samples"]["aft_gen"]:
        doc = sample["doc"]
        assert sample["filtered_resps"][0] == _greedy(model, tokenizer, doc["question"])
        matches.append(sample["filtered_resps"][0] == doc["answer"])
    assert sum(matches) == len(QUESTIONS) // 2  # the score is not a trivial 0 or 1
    assert results["results"]["aft_gen"]["exact_match,none"] == pytest.approx(0.5)


def test_hflm_scores_equal_the_models_own(setup):
    """`HFLM` batches the requests (right-padded for loglikelihood, left-padded with an attention mask for
    generation): the scores are those of each request alone."""
    folder, tasks, model, tokenizer = setup
    lm = HFLM(pretrained=str(folder), backend="causal", device="cpu", batch_size=4)
    assert type(lm.model) is AFTForCausalLM
    results = simple_evaluate(
        model=lm,
        tasks=["aft_mc", "aft_gen"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
    )
    _check(results, model, tokenizer)


def test_the_lm_eval_command_as_remote_code(setup, tmp_path):
    """The command line documented for real task lists, in a process where the package cannot be imported."""
    folder, tasks, model, tokenizer = setup
    argv = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True,backend=causal"]
    argv += ["--tasks", "aft_mc,aft_gen", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4"]
    argv += ["--output_path", str(tmp_path / "out"), "--log_samples"]
    script = (
        "import sys\n"
        "sys.modules['aft'] = None  # the package is not importable in this process\n"
        f"sys.argv = {argv!r}\n"
        "from lm_eval.__main__ import cli_evaluate\n"
        "cli_evaluate()\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    (scores,) = (tmp_path / "out").rglob("results_*.json")
    results = {"results": json.loads(scores.read_text())["results"], "samples": {}}
    for task in ("aft_mc", "aft_gen"):
        (samples,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        results["samples"][task] = [json.loads(line) for line in samples.read_text().splitlines()]
    _check(results, model, tokenizer)
