"""run_clm.py --freeze_carried_steps N: for the first N optimizer steps only the parameters a conversion made new
(the record convert_to_aft.py writes, conversion.json) train, then every parameter, the schedule restarted. A tiny
AFT-local folder with a record naming its position factors stands for a converted model; the runs are run_clm.py's
main() in this process, a few steps each."""

import json
from pathlib import Path

import pytest
import torch
from conftest import import_scripts, tiny_clm_argv, write_code_text
from safetensors.torch import load_file

from aft import AFTConfig, AFTForCausalLM

pytest.importorskip("accelerate")
pytest.importorskip("datasets")

PHASE, STEPS = 3, 6


@pytest.fixture(scope="module")
def scripts():
    yield from import_scripts(run_clm="run_clm", args="training_args", model="training_model")


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    return write_code_text(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def converted(scripts, tmp_path_factory) -> Path:
    """A tiny AFT-local folder (bytes' vocabulary and special tokens) whose record names its position factors."""
    folder = tmp_path_factory.mktemp("converted") / "aft"
    config = AFTConfig(**scripts.model.PRESETS["tiny"], vocab_size=258, pad_token_id=257, bos_token_id=256,
                       eos_token_id=256)  # fmt: skip
    torch.manual_seed(0)
    model = AFTForCausalLM(config)
    model.save_pretrained(folder)
    new = [name for name, _ in model.named_parameters() if name.endswith(("pos_u", "pos_v"))]
    assert new
    scripts.model.save_conversion_record(folder, new, source="test", query_key="copy")
    return folder


def argv(text_files, converted, out, **flags) -> list[str]:
    flags = {"freeze_carried_steps": PHASE, "max_train_steps": STEPS, "logging_steps": 1, **flags}
    args = tiny_clm_argv(text_files, model_name_or_path=converted, **flags)
    return [item for item in args if item != "--preset" and item != "tiny"] + ["--output_dir", str(out)]


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def unbroken(scripts, text_files, converted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "unbroken"
    scripts.run_clm.main(argv(text_files, converted, out, checkpointing_steps=1))
    return out


def test_the_phase_trains_only_the_new_parameters_then_all(converted, unbroken):
    new = set(json.loads((converted / "conversion.json").read_text())["new_parameters"])
    start = weights(converted)
    end_of_phase = weights(unbroken / "checkpoints" / f"step_{PHASE}")
    end = weights(unbroken / "checkpoints" / f"step_{STEPS}")
    assert start.keys() == end_of_phase.keys() == end.keys() and new < start.keys()
    for name in start:
        if name in new:
            assert not torch.equal(end_of_phase[name], start[name]), name
        else:  # no AdamW step at all: no update and no weight decay
            assert torch.equal(end_of_phase[name], start[name]), name
        assert not torch.equal(end[name], end_of_phase[name]), name  # after the phase every parameter trains


def test_the_schedule_restarts_after_the_phase(unbroken):
    """Cosine with a 1-step warm-up (5% of 3 steps, rounded up) over the phase, then again over the 3 steps after it:
    the rate logged after step k is the one step k + 1 uses."""
    history = json.loads((unbroken / "log_history.json").read_text())
    rates = {e["step"]: e["learning_rate"] for e in history if "learning_rate" in e}
    assert rates[PHASE] == 0.0 and rates[STEPS] == 0.0  # the rest's warm-up starts at 0; the cosine ends at 0
    assert rates[1] == rates[PHASE + 1] > rates[2] == rates[PHASE + 2] > 0


@pytest.mark.parametrize("step", [2, PHASE, PHASE + 1], ids=["inside", "at the end", "after"])
def test_resume_across_the_phase_boundary_gives_the_unbroken_run(scripts, text_files, converted, unbroken, step,
                                                                  tmp_path):  # fmt: skip
    out = tmp_path / "resumed"
    checkpoint = unbroken / "checkpoints" / f"step_{step}"
    scripts.run_clm.main(argv(text_files, converted, out, resume_from_checkpoint=checkpoint))
    resumed, reference = weights(out), weights(unbroken)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)
    assert json.loads((out / "log_history.json").read_text()) == json.loads(
        (unbroken / "log_history.json").read_text()
    )


def test_resume_with_another_phase_is_refused(scripts, text_files, converted, unbroken, tmp_path):
    checkpoint = unbroken / "checkpoints" / "step_2"
    with pytest.raises(scripts.args.InputError, match="--freeze_carried_steps: checkpoint 3, this run 2"):
        scripts.run_clm.main(
            argv(text_files, converted, tmp_path / "r", resume_from_checkpoint=checkpoint, freeze_carried_steps=2)
        )


def test_bad_input_is_refused_before_any_work(scripts, text_files, converted, tmp_path):
    out = tmp_path / "out"

    def error(args) -> str:
        with pytest.raises(scripts.args.InputError) as raised:
            scripts.run_clm.parse_args(args)
        assert not out.exists()  # nothing written
        return str(raised.value)

    assert "--freeze_carried_steps=-1: allowed: >= 0" in error(
        argv(text_files, converted, out, freeze_carried_steps=-1)
    )
    assert "leaves no step of --max_train_steps=6" in error(argv(text_files, converted, out, freeze_carried_steps=6))
    message = error([*tiny_clm_argv(text_files, freeze_carried_steps=2), "--output_dir", str(out)])
    assert "--freeze_carried_steps=2" in message and "pass --model_name_or_path" in message
    message = error(argv(text_files, converted, out, lr_scheduler_type="reduce_lr_on_plateau"))
    assert "--lr_scheduler_type reduce_lr_on_plateau cannot restart" in message

    unrecorded = tmp_path / "saved-again"
    AFTForCausalLM.from_pretrained(converted).save_pretrained(unrecorded)
    message = error(argv(text_files, unrecorded, out))
    assert f"--model_name_or_path {unrecorded} has no conversion.json" in message
    (unrecorded / "conversion.json").write_text('{"new_parameters": []}')
    assert "made no parameter new" in error(argv(text_files, unrecorded, out))
    (unrecorded / "conversion.json").write_text('{"new_parameters": "pos_u"}')
    assert "is not a record of convert_to_aft.py" in error(argv(text_files, unrecorded, out))

    # a record of another model: refused once the model is loaded, before any step
    (unrecorded / "conversion.json").write_text('{"new_parameters": ["model.layers.9.mixer.pos_u"]}')
    with pytest.raises(scripts.args.InputError, match="names parameters this model does not have: model.layers.9"):
        scripts.run_clm.main(argv(text_files, unrecorded, out))
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()
