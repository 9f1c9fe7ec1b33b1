"""The "native" implementation of AFT-simple: its compiled kernel against the torch form (outputs, states, padding,
extreme keys, dtypes, strides), its gradients against the torch form's and a float64 reference, the torch form
wherever the kernel does not apply (a state that needs a gradient, compile), the model, its training and generation
through it, and how the build copes with a corrupt, read-only or missing cache and no compiler."""

import os
import shutil
import stat
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import tiny_config

import aft.ops_aft as ops
import aft.ops_aft_native as native
from aft import AFTForCausalLM

HAS_COMPILER = native._compiler() is not None and os.name == "posix"
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A cache folder of the test's own and no library loaded yet (as in a new process)."""
    monkeypatch.setenv("AFT_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_library", None)
    return tmp_path / "cache"


def _inputs(B=2, T=45, H=2, D=24, key_scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, T, H, D, generator=g)
    k = torch.randn(B, T, H, D, generator=g) * key_scale
    v = torch.randn(B, T, H, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _state_values(state):
    """What a pool state means, whatever its scale: the log of its sum and its mean value."""
    real = state.z > 0
    return torch.where(real, state.m + torch.log(torch.where(real, state.z, 1.0)), ops.NEG), state.n / torch.where(
        real, state.z, 1.0
    )


@needs_compiler
def test_the_kernel_builds_and_is_used_where_a_compiler_is(fresh, monkeypatch):
    assert native.is_native_ready(), native.unavailable_reason()
    assert any(fresh.glob("aft_native_*.so"))
    calls, original = [], native._forward
    monkeypatch.setattr(native, "_forward", lambda *a: calls.append(1) or original(*a))
    native.aft_simple_native(*_inputs())
    assert calls == [1]


@needs_compiler
@pytest.mark.parametrize("key_scale", [0.0, 3.0, 60.0])
def test_the_kernel_equals_the_torch_form_with_padding_and_a_final_state(fresh, key_scale):
    q, k, v = _inputs(key_scale=key_scale)
    mask = torch.ones(2, 45)
    mask[1, :13] = 0  # left padding
    mask[0, 20:23] = 0  # and padding inside the sequence
    y, state = native.aft_simple_native(q, k, v, mask=mask, output_final_state=True)
    want, want_state = ops.aft_simple_exact(q.double(), k.double(), v.double(), mask=mask, output_final_state=True)
    torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=1e-4)
    assert (y[1, :13] == 0).all()  # rows that have seen only padding
    for got, exp in zip(_state_values(state), _state_values(want_state), strict=True):
        torch.testing.assert_close(got.double(), exp, atol=2e-5, rtol=1e-5)
    assert state.k.shape == (2, 0, 2, 24) and state.m.dtype == torch.float32


@needs_compiler
def test_a_nan_key_is_not_hidden(fresh):
    q, k, v = _inputs()
    k[0, 10, 1, 3] = float("nan")
    y, _ = native.aft_simple_native(q, k, v)
    assert torch.isnan(y[0, 10:, 1, 3]).all()
    assert torch.isfinite(y[0, :10]).all() and torch.isfinite(y[1]).all()


@needs_compiler
def test_a_continuation_from_any_state_equals_one_pass(fresh):
    q, k, v = _inputs(T=50)
    whole, _ = ops.aft_simple_chunk(q, k, v)
    head, state = native.aft_simple_native(q[:, :17], k[:, :17], v[:, :17], output_final_state=True)
    tail, _ = native.aft_simple_native(q[:, 17:], k[:, 17:], v[:, 17:], initial_state=state)
    torch.testing.assert_close(torch.cat([head, tail], 1), whole, atol=1e-5, rtol=1e-5)
    # a state written by the torch form (another scale) continues the same way, and is not changed
    _, torch_state = ops.aft_simple_chunk(q[:, :17], k[:, :17], v[:, :17], output_final_state=True)
    before = [x.clone() for x in torch_state]
    tail2, _ = native.aft_simple_native(q[:, 17:], k[:, 17:], v[:, 17:], initial_state=torch_state)
    torch.testing.assert_close(tail2, tail, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, torch_state, strict=True))
    # an empty state is no state
    empty = ops.empty_state(2, 2, 24, 24)
    torch.testing.assert_close(native.aft_simple_native(q, k, v, initial_state=empty)[0], whole, atol=1e-5, rtol=1e-5)


@needs_compiler
def test_a_state_of_another_batch_is_refused_by_name(fresh):
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"initial_state\.m has shape"):
        native.aft_simple_native(q, k, v, initial_state=ops.empty_state(3, 2, 24, 24))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_the_torch_forms_output_in_their_dtype(fresh, dtype):
    q, k, v = _inputs(dtype=dtype, key_scale=8.0)
    y, _ = native.aft_simple_native(q, k, v)
    want, _ = ops.aft_simple_chunk(q, k, v)
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), want.float(), atol=1e-2, rtol=1e-2)


@needs_compiler
def test_float32_inputs_under_a_float64_default_dtype(fresh):
    q, k, v = _inputs()
    want, _ = ops.aft_simple_chunk(q, k, v)
    assert native.is_native_ready()  # built and checked under float32, then the default changes
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y, state = native.aft_simple_native(q, k, v, output_final_state=True)
    finally:
        torch.set_default_dtype(default)
    assert y.dtype == torch.float32 and state.m.dtype == torch.float32
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@needs_compiler
def test_strided_inputs_and_many_threads(fresh):
    qkv = torch.randn(3, 2, 300, 2, 32).unbind(0)  # views with a batch stride of their own
    q, k, v = torch.sigmoid(qkv[0]), qkv[1], qkv[2]
    fused = torch.randn(2, 300, 3 * 64)  # q, k, v side by side in one projection: a row stride of 192
    fq, fk, fv = (x.unflatten(-1, (2, 32)) for x in fused.split(64, -1))
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for a, b, c in ((q, k, v), (fq, fk, fv), (k.transpose(2, 3), q.transpose(2, 3), v.transpose(2, 3))):
            torch.testing.assert_close(
                native.aft_simple_native(a, b, c)[0], ops.aft_simple_chunk(a, b, c)[0], atol=1e-5, rtol=1e-5
            )
    finally:
        torch.set_num_threads(threads)


def test_where_the_kernel_does_not_apply_it_is_the_torch_form(fresh):
    q, k, v = _inputs(T=20)
    with torch.no_grad():  # non-causal, float64, one key per head: the torch form's results
        torch.testing.assert_close(
            native.aft_simple_native(q, k, v, causal=False)[0], ops.aft_simple_chunk(q, k, v, causal=False)[0]
        )
        d = [x.double() for x in (q, k, v)]
        torch.testing.assert_close(native.aft_simple_native(*d)[0], ops.aft_simple_chunk(*d)[0])
        k1 = k[..., :1]
        torch.testing.assert_close(native.aft_simple_native(q, k1, v)[0], ops.aft_simple_chunk(q, k1, v)[0])
        assert native.aft_simple_native(q[:, :0], k[:, :0], v[:, :0])[0].shape == (2, 0, 2, 24)


def test_compiled_code_gives_the_same_output(fresh):
    q, k, v = _inputs(T=16)  # dynamo traces the torch form (a C call is no graph)
    compiled = torch.compile(lambda q, k, v: native.aft_simple_native(q, k, v)[0], backend="eager")
    torch.testing.assert_close(compiled(q, k, v), ops.aft_simple_chunk(q, k, v)[0])


@needs_compiler
def test_the_model_and_generate_run_alike_on_native_and_torch(fresh, tmp_path):
    base = AFTForCausalLM(tiny_config("simple")).eval()
    fast = AFTForCausalLM(tiny_config("simple", aft_implementation="native")).eval()
    fast.load_state_dict(base.state_dict())
    ids = torch.randint(1, 37, (2, 23))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
        kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False}
        assert torch.equal(fast.generate(ids, **kw), base.generate(ids, **kw))
    fast.save_pretrained(tmp_path / "saved")
    assert AFTForCausalLM.from_pretrained(tmp_path / "saved").config.aft_implementation == "native"


@needs_compiler
def test_a_corrupt_cached_library_is_built_again(fresh, tmp_path):
    assert _ready_in_a_new_process(fresh, tmp_path / "marker")[0]  # built and recorded (not loaded in this process)
    (built,) = fresh.glob("aft_native_*.so")
    built.unlink()
    built.write_bytes(b"not a shared library")  # as a disk fault or a run killed by an older version would leave it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: it is simply built again
        assert native.is_native_ready()
    assert built.read_bytes()[:4] == b"\x7fELF"
    q, k, v = _inputs()
    torch.testing.assert_close(native.aft_simple_native(q, k, v)[0], ops.aft_simple_chunk(q, k, v)[0],
                               atol=1e-5, rtol=1e-5)  # fmt: skip


@needs_compiler
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_builds_elsewhere(fresh):
    fresh.mkdir()
    fresh.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert native.is_native_ready()
        assert not any(fresh.iterdir())
    finally:
        fresh.chmod(stat.S_IRWXU)


@needs_compiler
def test_a_cache_path_that_is_a_file_builds_elsewhere(fresh):
    fresh.parent.mkdir(exist_ok=True)
    fresh.write_text("a file where the cache folder would be")
    assert native.is_native_ready()
    assert fresh.read_text() == "a file where the cache folder would be"


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_without_a_working_compiler_the_torch_form_runs_and_says_why_once(fresh, monkeypatch, compiler):
    if compiler == "missing":
        monkeypatch.setenv("PATH", "")
        monkeypatch.delenv("CC", raising=False)
        reason = "no C compiler found"
    else:
        monkeypatch.setenv("CC", "false")  # a compiler that fails every build
        reason = "failed"
    q, k, v = _inputs()
    with pytest.warns(RuntimeWarning, match=rf'aft_implementation="native".*{reason}.*torch form'):
        y, _ = native.aft_simple_native(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        y2, _ = native.aft_simple_native(q, k, v)
    want, _ = ops.aft_simple_chunk(q, k, v)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(y2, want)
    assert reason in native.unavailable_reason()
    assert not any(fresh.glob("*.so")) and not any(fresh.glob(".*"))  # nothing half-built is left


@needs_compiler
def test_a_library_that_fails_its_check_is_not_used(fresh, monkeypatch):
    def wrong(lib):
        raise RuntimeError("the built kernel's output differs from the torch form's by 1")

    monkeypatch.setattr(native, "_self_check", wrong)
    q, k, v = _inputs()
    with pytest.warns(RuntimeWarning, match="differs from the torch form"):
        y, _ = native.aft_simple_native(q, k, v)
    torch.testing.assert_close(y, ops.aft_simple_chunk(q, k, v)[0])


@needs_compiler
def test_a_full_cache_disk_builds_elsewhere_and_leaves_nothing_there(fresh):
    fresh.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", str(fresh)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:  # room for the probe and the source, not for the library
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.is_native_ready()
        assert list(fresh.iterdir()) == []
    finally:
        subprocess.run(["umount", "--lazy", str(fresh)], check=True)


@needs_compiler
def test_what_a_build_killed_half_way_leaves_is_never_loaded(fresh):
    fresh.mkdir(mode=0o700)
    key = native._machine_key(native._compiler())
    (fresh / f".aft_native_{key}-x1y2z3.so").write_bytes(b"\x7fELF half a library")  # a killed build's temporary
    assert native.is_native_ready()
    q, k, v = _inputs()
    torch.testing.assert_close(native.aft_simple_native(q, k, v)[0], ops.aft_simple_chunk(q, k, v)[0],
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    (built,) = fresh.glob("aft_native_*.so")
    assert built.read_bytes()[:4] == b"\x7fELF"


# The loader loads only what it built: a private cache, the recorded hash, a fresh load of a rebuilt library, a
# compiler that hangs or does not exist.

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("AFT_TEST_MARKER"), "w");
    if (f) fclose(f);
}
int aft_native_version(void) { return %d; }
"""


def _plant(path, tmp_path):
    """Compile a library that, when loaded, creates the file named by $AFT_TEST_MARKER, at `path`."""
    src = tmp_path / "planted.c"
    src.write_text(PLANTED % native.KERNEL_VERSION)
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(path), str(src)], check=True)


def _ready_in_a_new_process(cache, marker):
    """is_native_ready() in a fresh process on `cache` (dlopen in this one would hand back what it loaded before):
    -> (its result, its warnings)."""
    code = (
        "import warnings, aft.ops_aft_native as n\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    ok = n.is_native_ready()\n"
        "print(ok, *(str(x.message) for x in w), sep='\\n')\n"
    )
    env = {**os.environ, "AFT_NATIVE_CACHE": str(cache), "AFT_TEST_MARKER": str(marker), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout.startswith("True"), done.stdout


@needs_compiler
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722], ids=oct)
def test_a_cache_folder_others_can_write_is_refused_and_nothing_in_it_runs(fresh, tmp_path, mode):
    fresh.mkdir()
    fresh.chmod(mode)
    key = native._machine_key(native._compiler())
    for name in (f"aft_native_{key}.so", "aft_native.so"):
        _plant(fresh / name, tmp_path)
    marker = tmp_path / "planted-code-ran"
    ready, said = _ready_in_a_new_process(fresh, marker)
    assert not marker.exists()
    assert not ready and "is not this user's own" in said and f"{mode:04o}" in said
    with pytest.warns(RuntimeWarning, match="is not this user's own"):
        y, _ = native.aft_simple_native(*_inputs())
    torch.testing.assert_close(y, ops.aft_simple_chunk(*_inputs())[0])


@needs_compiler
def test_the_cache_folder_is_created_private_under_any_umask(fresh):
    old = os.umask(0)
    try:
        assert native.is_native_ready()
    finally:
        os.umask(old)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


@needs_compiler
def test_a_library_whose_hash_differs_from_the_record_is_not_loaded(fresh, tmp_path):
    assert _ready_in_a_new_process(fresh, tmp_path / "marker")[0]  # built and recorded
    (built,) = fresh.glob("aft_native_*.so")
    built.unlink()
    _plant(built, tmp_path)  # another library under the recorded name
    marker = tmp_path / "planted-code-ran"
    ready, said = _ready_in_a_new_process(fresh, marker)
    assert ready, said
    assert not marker.exists()  # refused before dlopen, and built again
    assert built.read_bytes()[:4] == b"\x7fELF"


@needs_compiler
def test_a_rebuilt_library_is_loaded_afresh_in_the_same_process(fresh, monkeypatch):
    key = native._machine_key(native._compiler())
    monkeypatch.setattr(native, "_machine_key", lambda cc: key)  # the same cache entry for both sources
    right = native._SOURCE
    wrong = right.replace("yr[c] = qr[c] * nn", "yr[c] = 2.0f * qr[c] * nn")
    assert wrong != right
    monkeypatch.setattr(native, "_SOURCE", wrong)  # a miscompiled library, loaded in this process
    with pytest.warns(RuntimeWarning, match="differs from the torch form"):
        assert not native.is_native_ready()
    monkeypatch.setattr(native, "_SOURCE", right)
    monkeypatch.setattr(native, "_library", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.is_native_ready()  # the right one is built again and loaded, not the one dlopen holds
    q, k, v = _inputs()
    torch.testing.assert_close(native.aft_simple_native(q, k, v)[0], ops.aft_simple_chunk(q, k, v)[0],
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_a_compiler_that_hangs_is_given_up_on(fresh, tmp_path, monkeypatch):
    hangs = tmp_path / "hanging-cc"
    hangs.write_text("#!/bin/sh\nsleep 600\n")  # a child of the wrapper: the whole group must go
    hangs.chmod(0o755)
    monkeypatch.setenv("CC", str(hangs))
    monkeypatch.setattr(native, "VERSION_TIMEOUT", 0.5)
    monkeypatch.setattr(native, "BUILD_TIMEOUT", 0.5)
    with pytest.warns(RuntimeWarning, match="did not finish within 0.5 s.*torch form"):
        y, _ = native.aft_simple_native(*_inputs())
    torch.testing.assert_close(y, ops.aft_simple_chunk(*_inputs())[0])


def test_a_CC_that_does_not_exist_is_said_and_no_other_compiler_is_used(fresh, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/bin/my-cc -O2")
    with pytest.warns(RuntimeWarning, match=r"CC='/nonexistent/bin/my-cc -O2' is not a command.*torch form"):
        y, _ = native.aft_simple_native(*_inputs())
    torch.testing.assert_close(y, ops.aft_simple_chunk(*_inputs())[0])
    assert not fresh.exists() or not any(fresh.iterdir())


@needs_compiler
def test_a_CC_with_arguments_is_used(fresh, monkeypatch):
    monkeypatch.setenv("CC", f"{native._compiler()[0]} -DAFT_UNUSED=1")
    assert native.is_native_ready(), native.unavailable_reason()


@needs_compiler
def test_a_padding_positions_value_is_never_read_as_in_the_torch_form(fresh):
    q, k, v = _inputs()
    mask = torch.ones(2, 45)
    mask[1, :13] = 0
    v[1, :13] = float("nan")  # whatever a padded position holds, it weighs nothing
    k[0, 4, 1] = -torch.inf
    v[0, 4, 1] = float("nan")
    y, state = native.aft_simple_native(q, k, v, mask=mask, output_final_state=True)
    want, want_state = ops.aft_simple_chunk(q, k, v, mask=mask, output_final_state=True)
    assert torch.isfinite(want).all() and torch.isfinite(y).all()
    torch.testing.assert_close(y, want, atol=2e-5, rtol=1e-4)
    for got, exp in zip(_state_values(state), _state_values(want_state), strict=True):
        torch.testing.assert_close(got, exp, atol=2e-5, rtol=1e-5)


@needs_compiler
def test_keys_of_minus_infinity_weigh_nothing_as_in_the_torch_form(fresh):
    q, k, v = _inputs()
    k[0, 3:9, 1, 5] = -torch.inf  # a run of positions of weight 0 in one channel
    k[1, :4, 0] = -torch.inf  # a row's first keys: nothing real seen yet in those channels
    y, state = native.aft_simple_native(q, k, v, output_final_state=True)
    assert torch.isfinite(y).all()
    padded = torch.where(k == -torch.inf, ops.NEG, k)  # weight 0: what the torch forms give a padding key
    want, want_state = ops.aft_simple_exact(q.double(), padded.double(), v.double(), output_final_state=True)
    torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=1e-4)
    assert (y[1, :4, 0] == 0).all()
    for got, exp in zip(_state_values(state), _state_values(want_state), strict=True):
        torch.testing.assert_close(got.double(), exp, atol=2e-5, rtol=1e-5)


# The decoding step of simple, local and conv: the recurrent forms' step in one compiled call per layer.

STEP_FORMS = {
    "simple": (native.aft_simple_native_recurrent, ops.aft_simple_recurrent, ops.aft_simple_chunk),
    "local": (native.aft_local_native_recurrent, ops.aft_local_recurrent, ops.aft_local_chunk),
    "conv": (native.aft_conv_native_recurrent, ops.aft_conv_recurrent, ops.aft_conv_chunk),
}


def _step_case(variant, B=3, T=30, H=2, D=8, prefix=20, seed=0):
    """Inputs, the variant's arguments, a padding mask (left, inside, and a padded decoding token), and the state of
    the first `prefix` positions by the parallel torch form."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, T, H, D, generator=g)
    k = torch.randn(B, T, H, 1 if variant == "conv" else D, generator=g) * 4
    v = torch.randn(B, T, H, D, generator=g)
    args = {
        "simple": (),
        "local": (torch.randn(1, T, 3, generator=g), torch.randn(1, T, 3, generator=g), 6),
        "conv": (torch.randn(H, 5, generator=g),),
    }[variant]
    mask = torch.ones(B, T)
    mask[1, :24] = 0  # left padding into the decoded tokens
    mask[2, 10:12] = 0
    mask[2, 25] = 0
    per_token = [torch.is_tensor(x) and x.dim() == 3 for x in args]  # local's factors: one row per position
    head = [x[:, :prefix] if cut else x for x, cut in zip(args, per_token, strict=True)]
    tail = [x[:, prefix:] if cut else x for x, cut in zip(args, per_token, strict=True)]
    cut = (slice(None), slice(None, prefix))
    _, state = STEP_FORMS[variant][2](q[cut], k[cut], v[cut], *head, mask=mask[cut], output_final_state=True)
    rest = (slice(None), slice(prefix, None))
    return (q[rest], k[rest], v[rest], *tail), mask[rest], state


def _first(inputs):
    """The first token of `_step_case`'s inputs: one decoding step."""
    return [x[:, :1] if torch.is_tensor(x) and x.dim() >= 3 else x for x in inputs]


def _assert_same_step(got, want, **tol):
    (y, state), (want_y, want_state) = got, want
    torch.testing.assert_close(y, want_y, equal_nan=True, **tol)
    for a, b in zip(state, want_state, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)


@needs_compiler
@pytest.mark.parametrize("variant", list(STEP_FORMS))
def test_the_decoding_step_equals_the_torch_forms_step_with_padding(fresh, variant, monkeypatch):
    fast, twin, _ = STEP_FORMS[variant]
    inputs, mask, state = _step_case(variant)
    before = [x.clone() for x in state]
    assert native.is_native_ready()  # built and checked (the check runs a step of its own)
    calls, original = [], native._step
    monkeypatch.setattr(native, "_step", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    want = twin(*inputs, mask=mask, initial_state=state, output_final_state=True)
    got = fast(*inputs, mask=mask, initial_state=state, output_final_state=True)
    _assert_same_step(got, want, atol=1e-5, rtol=1e-5)
    assert (got[0][1, :4] == 0).all() and (got[0][1, 4:] != 0).any()  # rows that have seen only padding give 0
    assert all(torch.equal(a, b) for a, b in zip(before, state, strict=True))  # the state given is not changed
    one = fast(*_first(inputs), mask=mask[:, :1], initial_state=state, output_final_state=True)
    _assert_same_step(one, twin(*_first(inputs), mask=mask[:, :1], initial_state=state, output_final_state=True),
                      atol=1e-5, rtol=1e-5)  # fmt: skip
    assert calls == [1, 1]


@needs_compiler
@pytest.mark.parametrize(("variant", "size"), [("local", 1), ("local", 2), ("conv", 1), ("conv", 2)])
def test_the_decoding_step_with_the_smallest_windows_and_factors_per_row(fresh, variant, size, monkeypatch):
    """Windows of no slot and of one (the step moves the window within the state it writes, token after token), and
    local's factors one row per sample (as the model gathers them by each row's position ids)."""
    fast, twin, chunk = STEP_FORMS[variant]
    assert native.is_native_ready()
    calls, original = [], native._step
    monkeypatch.setattr(native, "_step", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    g = torch.Generator().manual_seed(1)
    B, T, H, D, prefix = 3, 12, 2, 8, 7
    q = torch.rand(B, T, H, D, generator=g)
    k = torch.randn(B, T, H, 1 if variant == "conv" else D, generator=g) * 4
    v = torch.randn(B, T, H, D, generator=g)
    if variant == "local":
        pos_u, pos_v = (torch.randn(B, T, 3, generator=g) for _ in range(2))
        head, tail = (pos_u[:, :prefix], pos_v[:, :prefix], size), (pos_u[:, prefix:], pos_v[:, prefix:], size)
    else:
        head = tail = (torch.randn(H, size, generator=g),)
    mask = torch.ones(B, T)
    mask[1, :9] = 0  # left padding into the decoded tokens
    mask[2, 8] = 0
    _, state = chunk(
        q[:, :prefix], k[:, :prefix], v[:, :prefix], *head, mask=mask[:, :prefix], output_final_state=True
    )
    rest = (q[:, prefix:], k[:, prefix:], v[:, prefix:], *tail)
    want = twin(*rest, mask=mask[:, prefix:], initial_state=state, output_final_state=True)
    got = fast(*rest, mask=mask[:, prefix:], initial_state=state, output_final_state=True)
    _assert_same_step(got, want, atol=1e-5, rtol=1e-5)
    assert calls == [1]


@needs_compiler
@pytest.mark.parametrize("variant", list(STEP_FORMS))
def test_the_decoding_step_keeps_nan_and_weighs_minus_infinity_as_the_torch_form(fresh, variant):
    fast, twin, _ = STEP_FORMS[variant]
    inputs, mask, state = _step_case(variant)
    q, k, v, *args = inputs
    k = k.clone()
    k[0, 2, 1, 0] = float("nan")
    k[1, 6, 0] = -torch.inf
    k[2, :3, 1] = -torch.inf
    got = fast(q, k, v, *args, mask=mask, initial_state=state, output_final_state=True)
    want = twin(q, k, v, *args, mask=mask, initial_state=state, output_final_state=True)
    _assert_same_step(got, want, atol=1e-5, rtol=1e-5)
    assert torch.isnan(got[1].n[0]).any() and torch.isfinite(got[0][1:]).all()


@needs_compiler
@pytest.mark.parametrize("variant", list(STEP_FORMS))
def test_where_the_decoding_step_does_not_apply_it_is_the_torch_form(fresh, variant, monkeypatch):
    fast, twin, _ = STEP_FORMS[variant]
    inputs, mask, state = _step_case(variant)
    assert native.is_native_ready()
    monkeypatch.setattr(native, "_step", None)  # any use of the kernel fails
    q, k, v, *args = inputs
    # gradients, a float64 state, no state, torch.compile's tracing
    vg = v.clone().requires_grad_()
    y, _ = fast(q, k, vg, *args, mask=mask, initial_state=state)
    assert y.grad_fn is not None
    wide = ops.AFTState(*(x.double() for x in state))
    torch.testing.assert_close(
        fast(q, k, v, *args, mask=mask, initial_state=wide)[0], twin(q, k, v, *args, mask=mask, initial_state=wide)[0]
    )
    torch.testing.assert_close(fast(q, k, v, *args)[0], twin(q, k, v, *args)[0])
    with pytest.raises(ValueError, match="`k`"):  # keys of another length: the torch form's error, nothing read
        fast(q, k[:, :-1], v, *args, initial_state=state)
    compiled = torch.compile(lambda *x: fast(*x, mask=mask, initial_state=state)[0], backend="eager")
    torch.testing.assert_close(compiled(q, k, v, *args), twin(q, k, v, *args, mask=mask, initial_state=state)[0])


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_decoding_step_on_half_precision_inputs(fresh, dtype):
    inputs, mask, state = _step_case("local")
    half = [x.to(dtype) if torch.is_tensor(x) and x.dim() == 4 else x for x in inputs]
    got = native.aft_local_native_recurrent(*half, mask=mask, initial_state=state, output_final_state=True)
    want = ops.aft_local_recurrent(*half, mask=mask, initial_state=state, output_final_state=True)
    assert got[0].dtype == dtype and got[1].m.dtype == torch.float32
    _assert_same_step(got, want, atol=1e-2, rtol=1e-2)


def _perturbed(model, seed=0):
    """Nonzero variant parameters (the initialisation zeroes conv's kernel): every bias term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@needs_compiler
@pytest.mark.parametrize("variant", ["simple", "local", "conv"])
def test_generate_on_native_decoding_equals_the_torch_form(fresh, variant, monkeypatch):
    base = _perturbed(AFTForCausalLM(tiny_config(variant)).eval())
    fast = AFTForCausalLM(tiny_config(variant, aft_implementation="native")).eval()
    fast.load_state_dict(base.state_dict())
    ids = torch.randint(1, 37, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "output_scores": True,
          "return_dict_in_generate": True}  # fmt: skip
    assert native.is_native_ready()
    calls, original = [], native._step
    monkeypatch.setattr(native, "_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        got, want = fast.generate(ids, **kw), base.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert len(calls) == 7 * 2  # every decoding step after the prefill, in both layers


def test_without_a_compiler_native_decoding_is_the_torch_form(fresh, monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CC", raising=False)
    inputs, mask, state = _step_case("conv")
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        got = native.aft_conv_native_recurrent(*inputs, mask=mask, initial_state=state, output_final_state=True)
    _assert_same_step(got, ops.aft_conv_recurrent(*inputs, mask=mask, initial_state=state, output_final_state=True))


def _native_backward(y) -> bool:
    return type(y.grad_fn).__name__ == "_NativeSimpleBackward"


def _outputs_and_grads(form, inputs, mask, cotangents, dtype):
    """form's y, final state (key, mean) and the gradients of q, k, v for the cotangents of (y, key, mean)."""
    leaves = [x.to(dtype).requires_grad_() for x in inputs]
    y, state = form(*leaves, mask=mask, output_final_state=True)
    outs = (y, state.m, state.n)
    grads = torch.autograd.grad(outs, leaves, [c.to(o.dtype) for c, o in zip(cotangents, outs, strict=True)])
    return y, [*outs, *grads]


@needs_compiler
@pytest.mark.parametrize("key_scale", [1.0, 60.0])
def test_training_gradients_equal_the_torch_forms_with_padding_and_a_final_state(fresh, key_scale):
    B, T, H, D = 3, 203, 2, 8
    q, k, v = _inputs(B, T, H, D, key_scale=key_scale, seed=1)
    k = k.clamp(-60, 60)  # keys at +-60
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    mask[2, 50:60] = 0  # a gap
    g = torch.Generator().manual_seed(2)
    cot = [torch.randn(B, T, H, D, generator=g), torch.randn(B, H, D, generator=g), torch.randn(B, H, D, generator=g)]
    y, got = _outputs_and_grads(native.aft_simple_native, (q, k, v), mask, cot, torch.float32)
    assert _native_backward(y)
    _, torch_form = _outputs_and_grads(ops.aft_simple_chunk, (q, k, v), mask, cot, torch.float32)
    _, exact = _outputs_and_grads(ops.aft_simple_exact, (q, k, v), mask, cot, torch.float64)
    for name, a, b, want in zip(("y", "key", "mean", "dq", "dk", "dv"), got, torch_form, exact, strict=True):
        scale = want.abs().max().item()
        gap, torch_gap = ((x.double() - want).abs().max().item() for x in (a, b))
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert gap <= max(4 * torch_gap, 1e-6 * scale), (
            f"{name}: {gap:.3g} from float64, the torch form {torch_gap:.3g}"
        )
    for dv, dk in ((got[5], got[4]), (torch_form[5], torch_form[4])):  # padding takes no gradient
        assert (dv[1, :7] == 0).all() and (dk[2, 50:60] == 0).all()


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_gives_the_torch_forms_gradients_in_their_dtype(fresh, dtype):
    B, T, H, D = 2, 77, 2, 16
    q, k, v = _inputs(B, T, H, D, key_scale=8.0, seed=3)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :5] = 0
    g = torch.Generator().manual_seed(4)
    cot = [torch.randn(B, T, H, D, generator=g), torch.randn(B, H, D, generator=g), torch.randn(B, H, D, generator=g)]
    y, got = _outputs_and_grads(native.aft_simple_native, (q, k, v), mask, cot, dtype)
    assert _native_backward(y)
    _, want = _outputs_and_grads(ops.aft_simple_chunk, (q, k, v), mask, cot, dtype)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)  # both accumulate in float32: they differ by the output's rounding


@needs_compiler
def test_gradients_of_some_inputs_and_a_state_that_needs_none(fresh):
    q, k, v = _inputs(T=61, seed=5)
    with torch.no_grad():
        _, state = ops.aft_simple_chunk(q[:, :30], k[:, :30], v[:, :30], output_final_state=True)
    tail = [x[:, 30:].clone() for x in (q, k, v)]
    tail[1].requires_grad_()  # only the keys
    gy = torch.randn(tail[0].shape)
    y, _ = native.aft_simple_native(*tail, initial_state=state)
    assert _native_backward(y)
    want, _ = ops.aft_simple_chunk(*tail, initial_state=state)
    torch.testing.assert_close(y, want)
    (dk,) = torch.autograd.grad(y, tail[1], gy)
    torch.testing.assert_close(dk, torch.autograd.grad(want, tail[1], gy)[0])


@needs_compiler
def test_where_the_training_kernel_does_not_apply_it_is_the_torch_form(fresh):
    q, k, v = _inputs(T=40, seed=6)
    gy = torch.randn(q.shape)

    def check(call, *tensors, equal_nan=False):
        leaves = [x.clone().requires_grad_() for x in tensors]
        y, _ = call(native.aft_simple_native, leaves)
        assert not _native_backward(y)
        twin = [x.clone().requires_grad_() for x in tensors]
        want, _ = call(ops.aft_simple_chunk, twin)
        torch.testing.assert_close(y, want, equal_nan=equal_nan)
        for a, b in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(want, twin, gy), strict=True):
            torch.testing.assert_close(a, b, equal_nan=equal_nan)

    with torch.no_grad():
        _, state = ops.aft_simple_chunk(q, k, v, output_final_state=True)
    # an initial state that needs a gradient
    check(lambda f, x: f(*x[:3], initial_state=ops.AFTState(x[3], *state[1:])), q, k, v, state.m)
    check(lambda f, x: f(*x, causal=False), q, k, v)  # not causal
    bad = k.clone()
    bad[0, 10, 1, 3] = float("nan")
    check(lambda f, x: f(*x), q, bad, v, equal_nan=True)  # a NaN key: the torch form's NaN and gradients


@needs_compiler
def test_a_model_trains_alike_on_native_and_torch(fresh):
    torch.manual_seed(0)
    base = AFTForCausalLM(tiny_config("simple"))
    fast = AFTForCausalLM(tiny_config("simple", aft_implementation="native"))
    fast.load_state_dict(base.state_dict())
    ids = torch.randint(1, 37, (2, 29))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (base, fast)]
    for step in range(2):
        losses = []
        for model, opt in zip((base, fast), optimizers, strict=True):
            opt.zero_grad()
            loss = model(ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
            opt.step()
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        for (name, a), b in zip(fast.named_parameters(), base.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=f"step {step}: {name}")
