"""torch.export and ONNX of an AFT causal LM: the prefill forward, and the one-token decoding step with the cache's
state as explicit inputs and outputs (a small wrapper here, over the public `AFTCache` and `AFTState`). The exported
programs, and the ONNX models run by onnxruntime, give the eager model's logits and next state. Tiny models, CPU."""

import pytest
import torch
from conftest import VARIANTS, tiny_config

from aft import AFTCache, AFTForCausalLM
from aft.ops_aft import AFTState, FullState

FIXED_STATE = tuple(v for v in VARIANTS if v != "full")  # the variants whose decoding state has a fixed size


class Prefill(torch.nn.Module):
    """input_ids (B, T) -> logits (B, T, V), no cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


class DecodeStep(torch.nn.Module):
    """One token on the state of every layer: (input_ids (B, 1), position_ids (B, 1), *state) -> (logits (B, 1, V),
    *next state), the state as the six `AFTState` tensors of each layer in turn (`AFTCacheLayer.read()`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, *state):
        cache = AFTCache(self.model.config)
        for i, layer in enumerate(cache.layers):
            layer.write(AFTState(*state[6 * i : 6 * i + 6]))
        logits = self.model(input_ids=input_ids, position_ids=position_ids, cache=cache).logits
        return logits, *(x for layer in cache.layers for x in layer.read())


class FullDecodeStep(torch.nn.Module):
    """AFT-full's step on fixed buffers (`AFTCache(config, max_cache_len=...)`): (input_ids (B, 1), position_ids
    (B, 1), filled (), *buffers) -> (logits (B, 1, V), *next buffers), the three `FullState` buffers of each layer
    in turn; the step writes its key at slot `filled` (the caller adds 1 for the next)."""

    def __init__(self, model, max_cache_len):
        super().__init__()
        self.model, self.max_cache_len = model, max_cache_len

    def forward(self, input_ids, position_ids, filled, *buffers):
        cache = AFTCache(self.model.config, max_cache_len=self.max_cache_len)
        for i, layer in enumerate(cache.layers):  # copies: the step writes into its buffers in place
            layer.buffers = FullState(*(x.clone() for x in buffers[3 * i : 3 * i + 3]))
            layer.filled = filled.clone()
        logits = self.model(input_ids=input_ids, position_ids=position_ids, cache=cache).logits
        return logits, *(x for layer in cache.layers for x in layer.buffers)


def _model(variant, **overrides):
    torch.manual_seed(0)
    return AFTForCausalLM(tiny_config(variant, hidden_dropout_prob=0.0, **overrides)).eval()


def _prefilled_state(model, prompt):
    """The flat state after `prompt` (cloned: the cache updates its tensors in place) and the next position ids."""
    cache = AFTCache(model.config)
    with torch.no_grad():
        model(input_ids=prompt, cache=cache)
    state = [x.clone() for layer in cache.layers for x in layer.read()]
    return state, torch.full((prompt.shape[0], 1), prompt.shape[1])


def _eager_step(model, prompt, token):
    """The logits of `token` after `prompt` and the state after it, by the model's own cache."""
    cache = AFTCache(model.config)
    with torch.no_grad():
        model(input_ids=prompt, cache=cache)
        logits = model(input_ids=token, cache=cache).logits
    return logits, [x for layer in cache.layers for x in layer.read()]


# the other variants' exact forms size their windows or position factors by the length: torch.export specialises it
DYNAMIC_LENGTH = ("simple",)


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_exports_with_the_exact_form(variant):
    """With `aft_implementation="exact"` (no data-dependent branch) the prefill exports with a dynamic batch (and a
    dynamic length for `simple`) and gives the eager logits at other shapes than those it was traced with; the
    other variants are exported for the traced length, and another length is a clear error."""
    model = _model(variant, aft_implementation="exact")
    shapes = {0: torch.export.Dim("batch", max=8)}
    if variant in DYNAMIC_LENGTH:
        shapes[1] = torch.export.Dim("length", max=64)
    program = torch.export.export(Prefill(model).eval(), (torch.randint(0, 37, (2, 7)),), dynamic_shapes=(shapes,))
    for shape in ((2, 7), (3, 7), (3, 11)):
        ids = torch.randint(0, 37, shape)
        if shape[1] != 7 and variant not in DYNAMIC_LENGTH:
            with pytest.raises(AssertionError, match=r"input_ids.size\(\)\[1\] == 7|equal to 7"):
                program.module()(ids)
            continue
        with torch.no_grad():
            torch.testing.assert_close(program.module()(ids), model(ids, use_cache=False).logits)


def test_prefill_with_the_default_form_is_a_clear_export_error():
    """The default `torch` form checks on the host, after the work, whether its chunked sums could represent the
    input (and falls back to the exact form if not): a data-dependent branch that torch.export refuses."""
    model = _model("simple")
    with pytest.raises(torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode, match="data-dependent"):
        torch.export.export(Prefill(model).eval(), (torch.randint(0, 37, (2, 7)),))


@pytest.mark.parametrize("variant", FIXED_STATE)
def test_decode_step_exports_with_the_state_as_inputs_and_outputs(variant):
    model = _model(variant)
    prompt, token = torch.randint(0, 37, (2, 7)), torch.randint(0, 37, (2, 1))
    state, position = _prefilled_state(model, prompt)
    program = torch.export.export(DecodeStep(model).eval(), (token, position, *state))
    logits, *next_state = program.module()(token, position, *state)
    want_logits, want_state = _eager_step(model, prompt, token)
    torch.testing.assert_close(logits, want_logits)
    for got, want in zip(next_state, want_state, strict=True):
        torch.testing.assert_close(got, want)
    # the exported step continues from its own output as the model does from its cache
    logits, *_ = program.module()(token, position + 1, *next_state)
    cache = AFTCache(model.config)
    with torch.no_grad():
        model(input_ids=torch.cat([prompt, token], 1), cache=cache)
        torch.testing.assert_close(logits, model(input_ids=token, cache=cache).logits)


def test_full_decode_step_exports_on_fixed_buffers():
    """AFT-full's state grows with every token; with `max_cache_len` its buffers have a fixed size, and the step on
    them exports, continues from its own output, and gives the eager logits."""
    model = _model("full")
    prompt, tokens = torch.randint(0, 37, (2, 7)), torch.randint(0, 37, (2, 3))
    cache = AFTCache(model.config, max_cache_len=16)
    with torch.no_grad():
        model(input_ids=prompt, cache=cache)
    buffers = [x.clone() for layer in cache.layers for x in layer.buffers]
    filled, position = cache.layers[0].filled.clone(), torch.full((2, 1), 7)
    program = torch.export.export(FullDecodeStep(model, 16).eval(), (tokens[:, :1], position, filled, *buffers))
    # three steps: the third reads the first's key from the slot the first wrote
    for i in range(3):
        logits, *buffers = program.module()(tokens[:, i : i + 1], position + i, filled + i, *buffers)
        with torch.no_grad():
            torch.testing.assert_close(logits, model(input_ids=tokens[:, i : i + 1], cache=cache).logits)


@pytest.fixture(scope="module")
def onnxruntime():
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def _run_onnx(onnxruntime, path, inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [x.name for x in session.get_inputs()]
    return session.run(None, {name: x.numpy() for name, x in zip(names, inputs, strict=True)})


@pytest.mark.parametrize("variant", FIXED_STATE)
def test_onnx_prefill_gives_the_eager_logits(variant, onnxruntime, tmp_path):
    model = _model(variant, aft_implementation="exact")
    ids = torch.randint(0, 37, (2, 7))
    path = tmp_path / "prefill.onnx"
    torch.onnx.export(Prefill(model).eval(), (ids,), str(path), dynamo=True, verbose=False)
    (logits,) = _run_onnx(onnxruntime, path, [ids])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_onnx_prefill_of_full_is_a_clear_conversion_error(onnxruntime, tmp_path):
    """AFT-full's exact form takes a running maximum over positions (`torch.cummax`), which torch's ONNX exporter
    has no function for: the export names the operator (torch.export of the same form works, above)."""
    model = _model("full", aft_implementation="exact")
    with pytest.raises(torch.onnx.OnnxExporterError, match="aten.cummax"):
        torch.onnx.export(
            Prefill(model).eval(), (torch.randint(0, 37, (2, 7)),), str(tmp_path / "p.onnx"), dynamo=True
        )


@pytest.mark.parametrize("variant", FIXED_STATE)
def test_onnx_decode_step_gives_the_eager_logits_and_state(variant, onnxruntime, tmp_path):
    model = _model(variant)
    prompt, token = torch.randint(0, 37, (2, 7)), torch.randint(0, 37, (2, 1))
    state, position = _prefilled_state(model, prompt)
    path = tmp_path / "step.onnx"
    torch.onnx.export(DecodeStep(model).eval(), (token, position, *state), str(path), dynamo=True, verbose=False)
    logits, *next_state = _run_onnx(onnxruntime, path, [token, position, *state])
    want_logits, want_state = _eager_step(model, prompt, token)
    torch.testing.assert_close(torch.from_numpy(logits), want_logits, rtol=1e-4, atol=1e-4)
    for got, want in zip(next_state, want_state, strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
