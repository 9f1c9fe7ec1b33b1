"""AFT over images: the 2-D operators against the literal formula, the image classifier, saving, loading as
installed and as remote code, the image processor and the pipeline. Tiny configs, CPU."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import enable_checkpointing
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

from aft import AFTConfig, AFTForImageClassification, AFTVisionConfig, AFTVisionModel
from aft.ops_aft import (
    aft_conv_2d,
    aft_full_chunk,
    aft_local_2d,
    aft_reference,
    aft_simple_chunk,
    conv_bias_dense_2d,
    conv_kernel_2d,
    local_bias_dense_2d,
)

F64 = torch.float64
LABELS = {0: "cat", 1: "dog", 2: "fox"}


def tiny_config(variant="conv", **kw):
    base = {
        "aft_variant": variant,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_heads": 4,
        "conv_kernel_size": 3,
        "local_window_size": 3,
        "position_bias_rank": 8,
        "image_size": 32,
        "patch_size": 8,
        "num_labels": 3,
        "id2label": LABELS,
        "label2id": {v: k for k, v in LABELS.items()},
    }
    return AFTVisionConfig(**{**base, **kw})


def window_bias(grid, s, value):
    """The literal (T, T) bias over a grid: value(t, t', i, j) where t' is entry (i, j) of t's s x s window,
    centred at ((s - 1) // 2, (s - 1) // 2); exactly 0 outside. Built pair by pair, independently of ops_aft."""
    Gh, Gw = grid
    T = Gh * Gw
    rows = []
    for t in range(T):
        y, x = divmod(t, Gw)
        row = []
        for t2 in range(T):
            y2, x2 = divmod(t2, Gw)
            i, j = y2 - y + (s - 1) // 2, x2 - x + (s - 1) // 2
            row.append(value(t, t2, i, j) if 0 <= i < s and 0 <= j < s else torch.zeros((), dtype=F64))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


def assert_same(fast, ref, inputs):
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10)
    for g_fast, g_ref in zip(grads(fast, inputs), grads(ref, inputs), strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-10)


def qkv(B, T, H, Dk, Dv, key_scale=3.0):
    g = torch.Generator().manual_seed(1)
    q = torch.rand(B, T, H, Dv, generator=g, dtype=F64).requires_grad_()
    k = (key_scale * torch.randn(B, T, H, Dk, generator=g, dtype=F64)).requires_grad_()
    v = torch.randn(B, T, H, Dv, generator=g, dtype=F64).requires_grad_()
    return q, k, v


# ---------------------------------------------------------------------------------------------------------------
# Operators: fp64, outputs and gradients, against aft_reference with a dense bias built for the grid.


@pytest.mark.parametrize("grid", [(3, 5), (4, 4), (1, 6)])
@pytest.mark.parametrize("s", [1, 2, 3, 4, 7])
def test_conv_2d_equals_reference(grid, s):
    T, H = grid[0] * grid[1], 3
    q, k, v = qkv(2, T, H, 1, 4)
    kernel = (2 * torch.randn(H, s, s, generator=torch.Generator().manual_seed(2), dtype=F64)).requires_grad_()
    fast = aft_conv_2d(q, k, v, kernel, grid)
    w = torch.stack([window_bias(grid, s, lambda t, t2, i, j, h=h: kernel[h, i, j]) for h in range(H)])[None]
    ref = aft_reference(q, k, v, w, causal=False)
    assert_same(fast, ref, (q, k, v, kernel))


@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_dense_grid_biases_of_ops_match_the_literal_window(s):
    grid, T, H = (3, 5), 15, 2
    g = torch.Generator().manual_seed(5)
    kernel = torch.randn(H, s, s, generator=g, dtype=F64)
    literal = torch.stack([window_bias(grid, s, lambda t, t2, i, j, h=h: kernel[h, i, j]) for h in range(H)])
    torch.testing.assert_close(conv_bias_dense_2d(kernel, grid), literal[None], rtol=0, atol=0)
    pos_u, pos_v = torch.randn(1, T, 3, generator=g, dtype=F64), torch.randn(1, T, 3, generator=g, dtype=F64)
    literal = window_bias(grid, s, lambda t, t2, i, j: pos_u[0, t] @ pos_v[0, t2])
    torch.testing.assert_close(local_bias_dense_2d(pos_u, pos_v, s, grid), literal[None, None], rtol=0, atol=1e-15)


@pytest.mark.parametrize("grid", [(3, 5), (4, 4)])
@pytest.mark.parametrize("s", [1, 2, 3, 5])
def test_local_2d_equals_reference(grid, s):
    T, R = grid[0] * grid[1], 4
    q, k, v = qkv(2, T, 1, 6, 6)
    g = torch.Generator().manual_seed(3)
    pos_u = torch.randn(1, T, R, generator=g, dtype=F64).requires_grad_()
    pos_v = torch.randn(1, T, R, generator=g, dtype=F64).requires_grad_()
    fast = aft_local_2d(q, k, v, pos_u, pos_v, s, grid)
    w = window_bias(grid, s, lambda t, t2, i, j: pos_u[0, t] @ pos_v[0, t2])[None, None]
    ref = aft_reference(q, k, v, w, causal=False)
    assert_same(fast, ref, (q, k, v, pos_u, pos_v))


def test_local_2d_is_zero_outside_window_not_masked():
    """Far patches still contribute with bias 0 (not -inf): with a 1 x 1 window and zero bias it is AFT-simple."""
    grid, T = (3, 4), 12
    q, k, v = qkv(1, T, 1, 5, 5)
    zeros = torch.zeros(1, T, 2, dtype=F64)
    torch.testing.assert_close(
        aft_local_2d(q, k, v, zeros, zeros, 1, grid), aft_simple_chunk(q, k, v, causal=False)[0], rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("variant", ["full", "simple"])
def test_full_and_simple_over_grid_equal_reference(variant):
    T, R = 12, 4
    q, k, v = qkv(2, T, 1, 6, 6)
    g = torch.Generator().manual_seed(4)
    pos_u = torch.randn(1, T, R, generator=g, dtype=F64).requires_grad_()
    pos_v = torch.randn(1, T, R, generator=g, dtype=F64).requires_grad_()
    if variant == "full":
        fast = aft_full_chunk(q, k, v, pos_u, pos_v, causal=False)[0]
        ref = aft_reference(q, k, v, (pos_u @ pos_v.transpose(1, 2))[:, None], causal=False)
        assert_same(fast, ref, (q, k, v, pos_u, pos_v))
    else:
        assert_same(aft_simple_chunk(q, k, v, causal=False)[0], aft_reference(q, k, v, None, causal=False), (q, k, v))


def mixer_reference(mixer, x, grid):
    """The mixer's output from its own parameters, through the literal formula with a dense grid bias."""
    B, T, _ = x.shape
    H, Dh = mixer.num_heads, mixer.head_dim
    q = mixer.query_act(mixer.q_proj(x)).view(B, T, H, Dh)
    k = mixer.k_proj(x).view(B, T, H, mixer.key_dim)
    v = mixer.v_proj(x).view(B, T, H, Dh)
    w = None
    window = getattr(mixer.config, mixer.variant.window_field or "local_window_size")
    if mixer.variant.name == "full":
        w = (mixer.pos_u @ mixer.pos_v.T)[None, None]
    elif mixer.variant.name == "local":
        w = window_bias(grid, window, lambda t, t2, i, j: mixer.pos_u[t] @ mixer.pos_v[t2])[None, None]
    elif mixer.variant.name == "conv":
        kernel = conv_kernel_2d(mixer.conv_weight, mixer.conv_gamma, mixer.conv_beta)
        w = torch.stack([window_bias(grid, window, lambda t, t2, i, j, h=h: kernel[h, i, j]) for h in range(H)])
        w = w[None]
    return mixer.o_proj(aft_reference(q, k, v, w, causal=False).reshape(B, T, -1))


@pytest.mark.parametrize("variant", ["conv", "full", "local", "simple"])
def test_mixer_over_grid_equals_reference(variant):
    """The module plumbing (heads, kernel orientation, bias rows) in fp64, outputs and parameter gradients."""
    config = tiny_config(variant, image_size=24, patch_size=6)  # a 4 x 4 grid
    grid = config.image_grid
    model = AFTVisionModel(config).double()
    mixer = model.layers[0].mixer
    with torch.no_grad():  # a trained-looking conv kernel, not the zero one of a fresh layer
        for name in ("conv_gamma", "conv_beta"):
            if hasattr(mixer, name):
                getattr(mixer, name).normal_()
    x = torch.randn(2, grid[0] * grid[1], config.hidden_size, dtype=F64)
    params = list(mixer.parameters())
    assert_same(mixer(x, None, grid=grid), mixer_reference(mixer, x, grid), params)


def test_fresh_conv_layer_equals_per_head_simple():
    config = tiny_config("conv", conv_kernel_size=3)
    mixer = AFTVisionModel(config).double().layers[0].mixer
    assert mixer.conv_weight.abs().sum() > 0  # the raw kernel is random; gamma = beta = 0 makes it vanish
    grid = (3, 4)
    x = torch.randn(2, 12, config.hidden_size, dtype=F64)
    B, T, H, Dh = 2, 12, mixer.num_heads, mixer.head_dim
    q = mixer.query_act(mixer.q_proj(x)).view(B, T, H, Dh)
    k = mixer.k_proj(x).view(B, T, H, 1)
    v = mixer.v_proj(x).view(B, T, H, Dh)
    simple = mixer.o_proj(aft_simple_chunk(q, k, v, causal=False)[0].reshape(B, T, -1))
    torch.testing.assert_close(mixer(x, None, grid=grid), simple, rtol=0, atol=1e-12)
    with torch.no_grad():
        mixer.conv_gamma.fill_(1.0)
    assert (mixer(x, None, grid=grid) - simple).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# The classifier


def test_conv_trained_at_32_runs_at_48_and_64():
    torch.manual_seed(0)
    model = AFTForImageClassification(tiny_config("conv"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        loss = model(x, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert model.model.layers[0].mixer.conv_gamma.abs().sum() > 0  # the kernel is no longer zero
    model.eval()
    for side in (48, 64):
        out = model(torch.randn(2, 3, side, side), output_hidden_states=True)
        assert out.logits.shape == (2, 3) and torch.isfinite(out.logits).all()
        assert out.hidden_states[-1].shape == (2, (side // 8) ** 2, 16)
    assert model(torch.randn(1, 3, 40, 24)).logits.shape == (1, 3)  # not square either


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = AFTForImageClassification(tiny_config("local")).train()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    model(x, labels=labels).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable_checkpointing(model)
    assert model.model.layers[0].gradient_checkpointing
    model(x, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], msg=name)


@pytest.mark.parametrize("variant", ["full", "local"])
def test_absolute_bias_variants_reject_another_size_before_any_work(variant):
    model = AFTForImageClassification(tiny_config(variant)).eval()
    assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3)
    calls = []
    model.model.patch_embeddings.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=rf"48x48 pixels, but aft_variant='{variant}'.*image_size=32"):
        model(torch.randn(1, 3, 48, 48))
    assert not calls


def test_bad_inputs_have_clear_errors():
    model = AFTForImageClassification(tiny_config("conv")).eval()
    with pytest.raises(ValueError, match="has 1 channels .* config.num_channels=3"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"36x32 pixels; .* multiples of config.patch_size=8"):
        model(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match="expected 4 dimensions"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="`pixel_values` is required"):
        model()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"image_size": 30, "patch_size": 8},
            "AFTVisionConfig.image_size=30 is not allowed: it must be a multiple of",
        ),
        ({"patch_size": 0}, "AFTVisionConfig.patch_size=0 is not allowed"),
        ({"num_channels": 0}, "AFTVisionConfig.num_channels=0 is not allowed"),
    ],
)
def test_config_checks_image_fields(kw, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**kw)


def test_problem_types_use_the_transformers_losses():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)

    model = AFTForImageClassification(tiny_config())
    labels = torch.tensor([0, 2, 1, 1])
    out = model(x, labels=labels)
    assert model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))

    model = AFTForImageClassification(tiny_config())
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = model(x, labels=labels)
    assert model.config.problem_type == "multi_label_classification"
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, labels))

    model = AFTForImageClassification(tiny_config(num_labels=1, id2label=None, label2id=None))
    labels = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out = model(x, labels=labels)
    assert model.config.problem_type == "regression" and out.logits.shape == (4, 1)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), labels))

    out.loss.backward()
    assert model.classifier.weight.grad is not None
    assert model.model.patch_embeddings.projection.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Saving, loading, preprocessing


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("aft-image")
    model = AFTForImageClassification(tiny_config("conv")).eval()
    with torch.no_grad():
        model.model.layers[0].mixer.conv_gamma.fill_(0.7)  # a non-zero kernel must survive the round trip
    model.save_pretrained(folder)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x).logits
    return folder, x, logits


def test_saved_folder_loads_through_installed_auto_classes(saved):
    folder, x, logits = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "aft_vision"
    assert config["auto_map"]["AutoConfig"] == "configuration_aft.AFTVisionConfig"
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_aft.AFTForImageClassification"
    assert config["auto_map"]["AutoModel"] == "modeling_aft.AFTVisionModel"
    assert isinstance(AutoConfig.from_pretrained(folder), AFTVisionConfig)
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert isinstance(model, AFTForImageClassification)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, logits, rtol=0, atol=0)
    encoder = AutoModel.from_pretrained(folder).eval()  # the image encoder, not the text decoder
    assert isinstance(encoder, AFTVisionModel)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x).pooler_output, model.model(x).pooler_output, rtol=0, atol=0)


def test_folder_of_the_previous_release_still_loads(saved, tmp_path):
    """aft 0.1 saved image models with the text config (model_type "aft"): they load as image classifiers, and
    AutoModel says what to do instead of building the text decoder."""
    folder, x, logits = saved
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    config = json.loads((old / "config.json").read_text())
    config["model_type"] = "aft"
    config["auto_map"]["AutoConfig"] = "configuration_aft.AFTConfig"
    (old / "config.json").write_text(json.dumps(config))
    model = AutoModelForImageClassification.from_pretrained(old).eval()
    assert isinstance(model.config, AFTVisionConfig)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="AFT image model.*AutoModelForImageClassification"):
        AutoModel.from_pretrained(old)
    model.save_pretrained(tmp_path / "updated")
    assert json.loads((tmp_path / "updated" / "config.json").read_text())["model_type"] == "aft_vision"


def test_saved_folder_loads_as_remote_code_in_a_fresh_process(saved, tmp_path):
    folder, x, logits = saved
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["aft"] = None  # the package is not importable: only the folder's own code can load it
        import torch
        from transformers import AutoModel, AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        encoder = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(encoder).__name__ == "AFTVisionModel", type(encoder).__name__
        from PIL import Image
        from transformers import pipeline
        classify = pipeline("image-classification", model={str(folder)!r}, trust_remote_code=True)
        assert len(classify(Image.new("RGB", (40, 30)), top_k=2)) == 2
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits, rtol=0, atol=0)


def test_a_model_built_from_the_text_config_saves_a_folder_that_loads_as_remote_code(tmp_path):
    """AutoModelForImageClassification.from_config(AFTConfig(...)) (the path kept for aft 0.1's configs) gives an
    AFTForImageClassification: its folder names that class, so it loads as remote code in a fresh process."""
    fields = tiny_config("conv").to_dict()
    text = AFTConfig(**{k: v for k, v in fields.items() if k not in ("model_type", "transformers_version")})
    model = AutoModelForImageClassification.from_config(text).eval()
    assert type(model) is AFTForImageClassification
    model.save_pretrained(tmp_path / "folder")
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["aft"] = None  # the package is not importable: only the folder's own code can load it
        import torch
        from transformers import AutoModelForImageClassification
        folder = {str(tmp_path / "folder")!r}
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(x).logits, rtol=0, atol=0)


def test_image_processor_is_saved_with_the_model(saved):
    folder, _, _ = saved
    processor = AutoImageProcessor.from_pretrained(folder)
    assert processor.size == {"height": 32, "width": 32}
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    image = Image.fromarray(np.full((50, 70, 3), 255, dtype=np.uint8))
    pixels = processor(image, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)
    white = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(pixels[0, :, 5, 7], white, rtol=0, atol=1e-5)


def test_pipeline_returns_id2label_labels(saved):
    folder, _, _ = saved
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    classify = pipeline("image-classification", model=str(folder))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8))
    predictions = classify(image, top_k=3)
    assert {p["label"] for p in predictions} == set(LABELS.values())
    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        probs = model(**processor(image, return_tensors="pt")).logits.softmax(-1)[0]
    assert predictions[0]["label"] == LABELS[int(probs.argmax())]
    assert predictions[0]["score"] == pytest.approx(float(probs.max()), abs=1e-6)
