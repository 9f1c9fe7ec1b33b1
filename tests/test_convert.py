"""scripts/convert_to_aft.py: a tiny random GPT-2 (with a byte-level BPE tokenizer built here) converted into AFT
folders, checked tensor by tensor against the source, loaded installed and as remote code, and every bad input."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import logits_as_remote_code
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig

from aft import AFTForCausalLM

tokenizers = pytest.importorskip("tokenizers")
REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
D, LAYERS, POSITIONS = 16, 2, 24
SMALL = ["--local_window_size", "3", "--position_bias_rank", "4", "--conv_kernel_size", "3"]


@pytest.fixture(scope="module")
def convert_to_aft():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("convert_to_aft")
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(autouse=True)
def _restore_transformers_logging():
    """The script quiets transformers' logging and weight-loading bar; other tests' processes keep theirs."""
    verbosity, bar = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    yield
    transformers.logging.set_verbosity(verbosity)
    if bar:
        transformers.logging.enable_progress_bar()


def byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 8, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def save_gpt2(folder: Path, tied: bool = True, tokenizer: bool = True) -> GPT2LMHeadModel:
    """A random GPT-2 with tiny sizes; biases and norms randomised too, so a wrong map cannot pass by luck."""
    bpe = byte_level_bpe()
    config = GPT2Config(
        vocab_size=len(bpe) + 3,  # a padded vocabulary, as real checkpoints often have
        n_positions=POSITIONS,
        n_embd=D,
        n_layer=LAYERS,
        n_head=4,
        n_inner=40,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-6,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=bpe.bos_token_id,
        eos_token_id=bpe.eos_token_id,
        tie_word_embeddings=tied,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.normal_()
    model.save_pretrained(folder)
    if tokenizer:
        bpe.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2") / "tied"
    return save_gpt2(folder), folder


def run(convert_to_aft, capsys, *args) -> tuple[int, str]:
    """The script's entry point in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        convert_to_aft.run_main(lambda: convert_to_aft.main([str(a) for a in args]))
        code = 0
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def convert(convert_to_aft, capsys, src, dst, *args):
    code, err = run(convert_to_aft, capsys, src, dst, *SMALL, *args)
    assert code == 0, err
    return AutoModelForCausalLM.from_pretrained(dst).eval()


def expected_weights(source: GPT2LMHeadModel, variant: str, query_key: str, positions: int = POSITIONS) -> dict:
    """What every carried AFT tensor must equal, written out independently of the script's map."""
    gpt2 = source.transformer
    out = {
        "model.embed_tokens.weight": gpt2.wte.weight,
        "model.embed_positions.weight": gpt2.wpe.weight[:positions],
        "model.norm.weight": gpt2.ln_f.weight,
        "model.norm.bias": gpt2.ln_f.bias,
        "lm_head.weight": source.lm_head.weight,
    }
    for i, block in enumerate(gpt2.h):
        layer = f"model.layers.{i}"
        W, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # (D, 3D) = [q | k | v]
        out |= {
            f"{layer}.ln_1.weight": block.ln_1.weight,
            f"{layer}.ln_1.bias": block.ln_1.bias,
            f"{layer}.ln_2.weight": block.ln_2.weight,
            f"{layer}.ln_2.bias": block.ln_2.bias,
            f"{layer}.mixer.v_proj.weight": W[:, 2 * D :].T,
            f"{layer}.mixer.v_proj.bias": b[2 * D :],
            f"{layer}.mixer.o_proj.weight": block.attn.c_proj.weight.T,
            f"{layer}.mixer.o_proj.bias": block.attn.c_proj.bias,
            f"{layer}.mlp.up_proj.weight": block.mlp.c_fc.weight.T,
            f"{layer}.mlp.up_proj.bias": block.mlp.c_fc.bias,
            f"{layer}.mlp.down_proj.weight": block.mlp.c_proj.weight.T,
            f"{layer}.mlp.down_proj.bias": block.mlp.c_proj.bias,
        }
        if query_key == "copy":
            out[f"{layer}.mixer.q_proj.weight"], out[f"{layer}.mixer.q_proj.bias"] = W[:, :D].T, b[:D]
            if variant != "conv":
                out[f"{layer}.mixer.k_proj.weight"], out[f"{layer}.mixer.k_proj.bias"] = (
                    W[:, D : 2 * D].T,
                    b[D : 2 * D],
                )
    return out


@pytest.mark.parametrize(
    "variant, query_key, tied",
    [("local", "copy", True), ("full", "fresh", True), ("conv", "copy", False), ("simple", "fresh", False)],
)
def test_every_carried_tensor_is_copied_exactly(convert_to_aft, capsys, gpt2, tmp_path, variant, query_key, tied):
    source, src = gpt2
    if not tied:
        src = tmp_path / "untied"
        source = save_gpt2(src, tied=False)
    model = convert(convert_to_aft, capsys, src, tmp_path / "aft", "--aft_variant", variant, "--query_key", query_key)
    assert type(model) is AFTForCausalLM  # the installed class
    expected = expected_weights(source, variant, query_key)
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    new = set(state) - set(expected)
    fresh = {"q_proj", "k_proj"} if query_key == "fresh" else {"k_proj"} if variant == "conv" else set()
    aft_only = {"full": {"pos_u", "pos_v"}, "local": {"pos_u", "pos_v"}, "simple": set()}
    aft_only = aft_only.get(variant, {"conv_weight", "conv_gamma", "conv_beta"})
    assert {name.split(".")[4] for name in new} == aft_only | fresh  # nothing else is left uncopied
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (D, LAYERS, 40)
    assert (config.hidden_act, config.layer_norm_eps, config.vocab_size) == (
        "gelu_new",
        1e-6,
        source.config.vocab_size,
    )
    assert (config.max_position_embeddings, config.tie_word_embeddings) == (POSITIONS, tied)
    assert (config.bos_token_id, config.eos_token_id) == (source.config.bos_token_id, source.config.eos_token_id)
    assert config.num_heads == 4 and config.aft_variant == variant


@pytest.mark.parametrize("variant", ["conv", "local"])
def test_new_parameters_get_the_models_own_initialisation(convert_to_aft, gpt2, variant):
    source, _ = gpt2
    args = convert_to_aft.parse_args(["src", "dst", "--aft_variant", variant, *SMALL])
    config = convert_to_aft.aft_config_from_gpt2(source.config, args)
    torch.manual_seed(1)
    reference = AFTForCausalLM(config).state_dict()
    torch.manual_seed(1)
    model, new = convert_to_aft.convert(source, config, "fresh")
    state = model.state_dict()
    assert new and all(torch.equal(state[name], reference[name]) for name in new)
    if variant == "conv":  # gamma = beta = 0: the kernel term vanishes, the layer starts as per-head AFT-simple
        assert not state["model.layers.0.mixer.conv_gamma"].any() and not state["model.layers.0.mixer.conv_beta"].any()
        assert model.config.num_heads == 4 and state["model.layers.0.mixer.k_proj.weight"].shape == (4, D)


@pytest.mark.parametrize(
    "variant, query_key", [("local", "copy"), ("conv", "copy"), ("simple", "copy"), ("local", "fresh")]
)
def test_the_new_parameters_are_recorded_beside_the_weights(
    convert_to_aft, capsys, gpt2, tmp_path, variant, query_key
):
    """conversion.json names exactly the parameters the conversion initialised (run_clm.py --freeze_carried_steps
    trains them alone); a model saved again has no record: its parameters are no longer the conversion's."""
    source, src = gpt2
    model = convert(convert_to_aft, capsys, src, tmp_path / "aft", "--aft_variant", variant, "--query_key", query_key)
    args = convert_to_aft.parse_args(["src", "dst", "--aft_variant", variant, *SMALL])
    _, new = convert_to_aft.convert(source, convert_to_aft.aft_config_from_gpt2(source.config, args), query_key)
    read_new_parameters = importlib.import_module("training_model").read_new_parameters  # run_clm.py reads it so
    recorded = read_new_parameters(str(tmp_path / "aft"))
    assert recorded == sorted(new) and set(recorded) <= dict(model.named_parameters()).keys()
    kinds = {name.split(".")[4] for name in recorded}
    assert (
        kinds
        == {
            ("local", "copy"): {"pos_u", "pos_v"},
            ("conv", "copy"): {"conv_weight", "conv_gamma", "conv_beta", "k_proj"},
            ("simple", "copy"): set(),
            ("local", "fresh"): {"pos_u", "pos_v", "q_proj", "k_proj"},
        }[variant, query_key]
    )
    assert json.loads((tmp_path / "aft" / "conversion.json").read_text())["query_key"] == query_key
    model.save_pretrained(tmp_path / "again")
    assert read_new_parameters(str(tmp_path / "again")) is None


def test_a_conversion_is_the_same_every_time_for_its_seed(convert_to_aft, capsys, gpt2, tmp_path):
    """The new parameters (here a fresh query and key and the position factors) come from --seed: the same seed
    gives the same folder whatever ran before in the process, another seed other new parameters and the same
    carried ones; conversion.json records it."""
    _, src = gpt2
    argv = ["--aft_variant", "local", "--query_key", "fresh"]
    first = convert(convert_to_aft, capsys, src, tmp_path / "a", *argv)
    torch.rand(100)  # the global random state moves on
    again = convert(convert_to_aft, capsys, src, tmp_path / "b", *argv)
    other = convert(convert_to_aft, capsys, src, tmp_path / "c", *argv, "--seed", "7")
    weights = [dict(m.named_parameters()) for m in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    new = set(json.loads((tmp_path / "c" / "conversion.json").read_text())["new_parameters"])
    random = {k for k in new if weights[0][k].any()}  # the biases start at zero whatever the seed
    assert random and all(torch.equal(weights[0][k], weights[2][k]) != (k in random) for k in weights[0])
    assert json.loads((tmp_path / "c" / "conversion.json").read_text())["seed"] == 7


@pytest.mark.parametrize("variant, query_key", [("simple", "fresh"), ("full", "fresh"), ("local", "copy")])
def test_converted_model_runs_and_generates(convert_to_aft, capsys, gpt2, tmp_path, variant, query_key):
    """simple and a fresh full start with no position bias; with fresh q/k the mixer is near a gated causal mean."""
    _, src = gpt2
    model = convert(convert_to_aft, capsys, src, tmp_path / "aft", "--aft_variant", variant, "--query_key", query_key)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "aft")
    tokenizer.pad_token = tokenizer.eos_token  # GPT-2's tokenizer has none
    inputs = tokenizer(["the quick brown", "fox"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.isfinite(logits).all()
    assert out.shape == (2, inputs["input_ids"].shape[1] + 5)


def test_folder_is_complete_and_loads_as_remote_code(convert_to_aft, capsys, gpt2, tmp_path):
    source, src = gpt2
    dst = tmp_path / "aft"
    model = convert(
        convert_to_aft, capsys, src, dst, "--aft_variant", "local", "--base_model", "me/tiny-gpt2", "--license", "mit"
    )
    names = set(os.listdir(dst))
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", "tokenizer.json"} <= names
    assert {"configuration_aft.py", "modeling_aft.py", "ops_aft.py"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert json.loads((dst / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_aft.AFTForCausalLM"
    )
    card = ModelCard.load(dst / "README.md")
    assert (card.data.base_model, card.data.license, card.data.pipeline_tag) == (
        "me/tiny-gpt2",
        "mit",
        "text-generation",
    )
    assert "convert_to_aft.py" in card.text and "pos_u" in card.text
    assert "(seed 42)" in card.text and "`conversion.json`" in card.text  # what a user needs to repeat it
    text = "the lazy dog"
    assert (
        AutoTokenizer.from_pretrained(dst)(text)["input_ids"] == AutoTokenizer.from_pretrained(src)(text)["input_ids"]
    )

    ids = torch.randint(0, source.config.vocab_size, (2, 7))
    logits = logits_as_remote_code(dst, ids, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits)


def test_context_length(convert_to_aft, capsys, gpt2, tmp_path):
    source, src = gpt2
    code, err = run(
        convert_to_aft, capsys, src, tmp_path / "long", "--aft_variant", "local", "--max_position_embeddings", 48
    )
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --max_position_embeddings=48 is longer than the n_positions=24") and "none" in err
    assert not (tmp_path / "long").exists()
    # Shorter: the first positions are copied, and the tokenizer is told the new limit.
    model = convert(
        convert_to_aft, capsys, src, tmp_path / "short", "--aft_variant", "local", "--max_position_embeddings", 16
    )
    assert torch.equal(model.model.embed_positions.weight, source.transformer.wpe.weight[:16])
    assert AutoTokenizer.from_pretrained(tmp_path / "short").model_max_length == 16
    # No position embeddings: simple has no length limit at all.
    args = ("--aft_variant", "simple", "--position_embedding_type", "none", "--max_position_embeddings", 48)
    model = convert(convert_to_aft, capsys, src, tmp_path / "none", *args)
    assert not hasattr(model.model, "embed_positions") and not model.config.has_position_limit
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 2 * POSITIONS, dtype=torch.long)).logits).all()


def one_line_error(convert_to_aft, capsys, src, dst, *args) -> str:
    code, err = run(convert_to_aft, capsys, src, dst, "--aft_variant", "simple", *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err


def test_other_architectures_are_refused_before_anything_is_written(convert_to_aft, capsys, tmp_path):
    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "bert"
    )
    err = one_line_error(convert_to_aft, capsys, tmp_path / "bert", tmp_path / "out")
    assert "model_type 'bert'" in err and "supported: GPT-2 (model_type 'gpt2'" in err
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "llama"
    )
    err = one_line_error(convert_to_aft, capsys, tmp_path / "llama", tmp_path / "out")
    assert "model_type 'llama' (Llama family)" in err and "RMSNorm" in err and "Supported: GPT-2" in err
    err = one_line_error(convert_to_aft, capsys, tmp_path / "nothing-here", tmp_path / "out")
    assert "cannot read the config of SRC" in err
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in one_line_error(convert_to_aft, capsys, tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer(convert_to_aft, capsys, gpt2, tmp_path):
    """A GPT-2 saved with save_pretrained alone converts: the weights, a one-line note and the card say that the
    folder has no tokenizer. A --tokenizer_name without one is an error."""
    source, with_tokenizer = gpt2
    src = tmp_path / "no-tokenizer"
    save_gpt2(src, tokenizer=False)
    capsys.readouterr()
    convert_to_aft.main([str(src), str(tmp_path / "out"), *SMALL, "--aft_variant", "simple"])
    out = capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert f"note: {src} has no tokenizer (none of tokenizer.json, vocab.json), so this folder holds none" in out
    assert not any((tmp_path / "out").glob("tokenizer*")) and not (tmp_path / "out" / "vocab.json").exists()
    assert "has no tokenizer" in (tmp_path / "out" / "README.md").read_text()
    assert model.config.vocab_size == source.config.vocab_size
    err = one_line_error(convert_to_aft, capsys, with_tokenizer, tmp_path / "out2", "--tokenizer_name", src)
    assert f"{src} has no tokenizer" in err and "--tokenizer_name" in err
    assert not (tmp_path / "out2").exists()
    convert(
        convert_to_aft, capsys, src, tmp_path / "out3", "--aft_variant", "simple", "--tokenizer_name", with_tokenizer
    )
    assert (tmp_path / "out3" / "tokenizer.json").is_file()
    assert "has no tokenizer" not in (tmp_path / "out3" / "README.md").read_text()


def test_a_tensor_of_the_wrong_shape_is_one_line(convert_to_aft, capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "gpt2"
    save_gpt2(src)
    weights = load_file(src / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(D, 3)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    err = one_line_error(convert_to_aft, capsys, src, tmp_path / "out")
    assert f"SRC {src} lacks weights of a GPT2LMHeadModel: transformer.h.0.mlp.c_fc.weight (shape ({D}, 3)" in err
    assert not (tmp_path / "out").exists()


def test_gpt2_folders_that_do_not_fit(convert_to_aft, capsys, gpt2, tmp_path):
    _, src = gpt2
    small = 50  # a vocabulary smaller than the tokenizer's 280 tokens
    GPT2LMHeadModel(GPT2Config(vocab_size=small, n_positions=8, n_embd=8, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "small-vocab"
    )
    err = one_line_error(convert_to_aft, capsys, tmp_path / "small-vocab", tmp_path / "out", "--tokenizer_name", src)
    assert f"more than SRC's vocab_size={small}" in err
    GPT2Config(add_cross_attention=True).save_pretrained(tmp_path / "cross")
    assert "cross-attention" in one_line_error(convert_to_aft, capsys, tmp_path / "cross", tmp_path / "out")
    # An untied config over a checkpoint that has no separate LM head.
    untied = tmp_path / "no-head"
    save_gpt2(untied)
    config = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    err = one_line_error(convert_to_aft, capsys, untied, tmp_path / "out")
    assert "lacks weights of a GPT2LMHeadModel: lm_head.weight" in err
    assert not (tmp_path / "out").exists()


def test_destination_is_never_lost_or_half_written(convert_to_aft, capsys, gpt2, tmp_path, monkeypatch):
    _, src = gpt2
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    err = one_line_error(convert_to_aft, capsys, src, dst)
    assert "already holds files" in err and "--overwrite" in err
    assert os.listdir(dst) == ["mine.txt"]
    err = one_line_error(convert_to_aft, capsys, src, src.parent, "--overwrite")
    assert "would delete the source" in err

    # A failure while writing leaves DST as it was, and no temporary folder.
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(AFTForCausalLM, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_to_aft.main([str(src), str(dst), "--aft_variant", "simple", "--overwrite"])
    assert os.listdir(dst) == ["mine.txt"] and sorted(os.listdir(tmp_path)) == ["dst"]
    monkeypatch.undo()

    convert(convert_to_aft, capsys, src, dst, "--aft_variant", "simple", "--overwrite")
    assert "mine.txt" not in os.listdir(dst) and sorted(os.listdir(tmp_path)) == ["dst"]


def test_command_line_bad_input_is_one_line_with_exit_code_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(SCRIPTS / "convert_to_aft.py"),
        "nobody/gpt2",
        tmp_path / "out",
        "--aft_variant",
        "local",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.startswith("error: cannot read the config of SRC 'nobody/gpt2'")
        and result.stderr.count("\n") == 1
    )
    assert not (tmp_path / "out").exists()
