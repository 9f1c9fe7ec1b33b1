"""Every form of every variant, and the model's prefill and decoding step with a cache, on a device that is not the
CPU: the `meta` device, whose tensors hold no data and refuse to meet a CPU tensor of more than 0 dimensions. So a
tensor that the library creates without the device of the inputs it meets raises here, as it would on a GPU.
(FakeTensorMode's fake `cuda` tensors would say the same, but on a CPU-only build of torch they cannot be indexed.)

Meta tensors have no values to read on the host, so the few host reads are replaced: the fast forms' flags
(`host_flags`: whether they could represent their input) by each of the answers they can give, so that the fast
path, the exact fallback and the non-finite path all run; the model's value checks (vocabulary, positions) by
nothing. Everything else runs as it does on any device.
"""

import pytest
import torch
from conftest import VARIANTS, tiny_config

import aft.ops_aft as ops
import aft.ops_aft_chunked as ops_aft_chunked
import aft.ops_aft_full as ops_aft_full
from aft import AFTCache, AFTForCausalLM, AFTModel, AFTVisionConfig
from aft.modeling_aft import CACHE_NAME

DEVICE = torch.device("meta")
# the answers of host_flags: (the fast form declined its input, every key and value was finite)
ANSWERS = {"fast": [False, True], "declined": [True, True], "not_finite": [False, False]}
B, T = 2, 21


@pytest.fixture(params=ANSWERS)
def flags(request, monkeypatch):
    for module in (ops_aft_chunked, ops_aft_full):
        monkeypatch.setattr(module, "host_flags", lambda *_: ANSWERS[request.param])
    return request.param


def _inputs(variant, ndim=1, length=T):
    config = tiny_config(variant)
    if ndim == 2:  # a 4 x 4 grid of patches
        fields = ("hidden_size", "num_heads", "conv_kernel_size", "local_window_size", "position_bias_rank")
        kw = {name: getattr(config, name) for name in fields}
        config = AFTVisionConfig(aft_variant=variant, image_size=16, patch_size=4, **kw)
    spec = ops.AFT_VARIANTS[variant]
    H = config.num_heads if spec.key_per_head else 1
    D = config.hidden_size // H
    q = torch.rand(B, length, H, D, device=DEVICE)
    k = torch.randn(B, length, H, 1 if spec.key_per_head else D, device=DEVICE)
    v = torch.randn(B, length, H, D, device=DEVICE)
    params = {name: torch.randn(shape, device=DEVICE) for name, (shape, _) in spec.parameters(config, ndim).items()}
    positions = torch.arange(length, device=DEVICE)[None] if ndim == 1 else None
    return config, q, k, v, spec.operator_args(params, positions, config, ndim)


def _on_device(*results):
    for x in results:
        for t in x if isinstance(x, tuple) else (x,):
            assert t.device == DEVICE


def _at(args, a, b):
    """The variant arguments of positions a .. b - 1: the position factors (B|1, T, R) sliced, the rest as it is."""
    return tuple(x[:, a:b] if isinstance(x, torch.Tensor) and x.dim() == 3 else x for x in args)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("implementation", ["torch", "exact", "naive"])
def test_every_form_runs_on_the_device_of_its_inputs(variant, implementation, flags):
    """Parallel (causal with padding and a final state, continued from that state with and without a mask,
    bidirectional), recurrent from a state and from none, and the grid form."""
    _, q, k, v, args = _inputs(variant)
    op = ops.get_operator(variant, implementation)
    mask = torch.ones(B, T, device=DEVICE)
    kw = {"chunk_size": 4} if implementation == "torch" and variant != "full" else {}

    def run(form, a, b, **kwargs):
        return form(q[:, a:b], k[:, a:b], v[:, a:b], *_at(args, a, b), **kwargs)

    head, state = run(op.parallel, 0, 9, mask=mask[:, :9], output_final_state=True, **kw)
    tail, final = run(op.parallel, 9, T, mask=mask[:, 9:], initial_state=state, output_final_state=True, **kw)
    unmasked, _ = run(op.parallel, 9, T, initial_state=state, **kw)
    both, _ = run(op.parallel, 0, T, causal=False, **kw)
    step, stepped = run(op.recurrent, 9, 11, mask=mask[:, 9:11], initial_state=state, output_final_state=True)
    first, _ = run(op.recurrent, 0, 2)
    _on_device(head, state, tail, final, unmasked, both, step, stepped, first)
    config, q2, k2, v2, args2 = _inputs(variant, ndim=2, length=16)
    _on_device(op.grid(q2, k2, v2, *args2, config.image_grid))


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_model_prefills_and_decodes_on_the_device_of_its_inputs(variant, flags, monkeypatch):
    monkeypatch.setattr(AFTModel, "_check_values", lambda *args: None)
    model = AFTForCausalLM(tiny_config(variant)).eval().to(DEVICE)
    ids = torch.randint(1, 37, (B, 7), device=DEVICE)
    mask = torch.ones(B, 7, dtype=torch.long, device=DEVICE)
    with torch.no_grad():
        cache = AFTCache(model.config)
        prefill = model(ids, attention_mask=mask, **{CACHE_NAME: cache})
        step = model(ids[:, -1:], attention_mask=torch.ones(B, 8, device=DEVICE), **{CACHE_NAME: cache})
        more = model(ids[:, :3], **{CACHE_NAME: cache})
    _on_device(prefill.logits, step.logits, more.logits, cache.next_position, cache.seen)
    for layer in cache.layers:
        _on_device(*(layer.read()))
