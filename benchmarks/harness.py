"""What the lab's benchmarks and studies share: the compared models, timing in turn, peak memory, the machine's
facts, tables, plots and results files. One definition of each, so that every figure of the lab is measured alike.

    fns = {"gpt2": step_of(gpt2), "aft-local": step_of(local)}
    seconds = in_turn(fns, rounds=5)              # {name: [seconds]}: one call of each per round, after a warm-up
    write_json(out / "results.json", {"machine": machine(), "median_s": medians(seconds)})
"""

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

from aft import AFTConfig, AFTForCausalLM, AFTForImageClassification, AFTVisionConfig

# 1. the compared models: the same width, depth, MLP (4 x hidden) and vocabulary; no dropout anywhere


def causal_lm(name: str, *, hidden: int, layers: int, heads: int, vocab: int, positions: int, window: int = 32,
              bias_rank: int | None = None, conv_kernel: int = 11, conv_heads: int = 8,
              implementation: str = "torch"):  # fmt: skip
    """GPT-2 with SDPA attention (`name` "gpt2", `heads` attention heads, GELU as AFT's MLP), or AFTForCausalLM of
    one variant (`name` "local" or "aft-local", ...; its operator's registered `implementation`), in float32."""
    if name == "gpt2":
        config = GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=4 * hidden,
            activation_function="gelu",
            vocab_size=vocab,
            n_positions=positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
        return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").float()
    config = AFTConfig(
        aft_variant=name.removeprefix("aft-"),
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=4 * hidden,
        vocab_size=vocab,
        max_position_embeddings=positions,
        local_window_size=window,
        conv_kernel_size=conv_kernel,
        num_heads=conv_heads,
        aft_implementation=implementation,
        **({} if bias_rank is None else {"position_bias_rank": bias_rank}),
    )
    return AFTForCausalLM(config).float()


def image_classifier(name: str, *, hidden: int, layers: int, head_size: int, image_size: int, patch_size: int,
                     num_channels: int = 3, num_labels: int = 10, conv_heads: int | None = None, conv_kernel: int = 11,
                     labels: dict | None = None):  # fmt: skip
    """transformers' ViT (SDPA; class token, position embeddings; hidden / head_size heads), or an AFT image
    classifier ("aft-conv": the paper's recipe, global average pooling, no class token or position embedding,
    `conv_heads` heads (default one per channel) and a conv_kernel x conv_kernel window; "aft-full")."""
    common = {"image_size": image_size, "patch_size": patch_size, "num_channels": num_channels, **(labels or {})}
    common.setdefault("num_labels", num_labels)
    if name == "vit":
        config = ViTConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // head_size),
            intermediate_size=4 * hidden,
            hidden_act="gelu",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **common,
        )
        return ViTForImageClassification._from_config(config, attn_implementation="sdpa")
    variant = name.removeprefix("aft-")
    config = AFTVisionConfig(
        aft_variant=variant,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=4 * hidden,
        num_heads=(conv_heads or hidden) if variant == "conv" else 1,
        conv_kernel_size=conv_kernel,
        **common,
    )
    return AFTForImageClassification(config)


# 2. timing and memory


def synchronize(device=None):
    """Wait for the accelerator's queued work (device None: CUDA's, where there is one), so a clock reads it."""
    device = torch.device("cuda" if device is None and torch.cuda.is_available() else device or "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device=None) -> float:
    """Seconds of one call of fn, with the accelerator's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def repeat(fn, reps: int, max_seconds: float, device=None) -> list[float]:
    """Timed calls of fn, one after the other: at least one, at most `reps`, none begun after `max_seconds`."""
    times, start = [], time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < max_seconds):
        times.append(timed(fn, device))
    return times


def in_turn(fns: dict, rounds: int, *, warm_up: int = 1, cold=(), once=(), device=None) -> dict:
    """Each function once per round, in turn, for `rounds` rounds after `warm_up` untimed rounds, so that whatever
    else the machine does falls on every function alike (timed one after the other, a few-millisecond step drifts by
    +-30%). A function returns the seconds of each of its steps (a list), or anything else: its call is one sample.
    The names
    in `cold` get no warm-up; those in `once` no warm-up and only the first round (a long call is its own warm-up).
    -> {name: [seconds]}"""
    for _ in range(warm_up):
        for name, fn in fns.items():
            if name not in cold and name not in once:
                fn()
    samples = {name: [] for name in fns}
    for i in range(rounds):
        for name, fn in fns.items():
            if name in once and i > 0:
                continue
            synchronize(device)
            start = time.perf_counter()
            steps = fn()
            synchronize(device)
            samples[name] += steps if isinstance(steps, list) else [time.perf_counter() - start]
    return samples


def medians(samples: dict) -> dict:
    """{name: median} of {name: [seconds]} (None where a name has no sample)."""
    return {name: statistics.median(values) if values else None for name, values in samples.items()}


def peak_bytes(fn, device=None) -> int:
    """Peak of the bytes allocated while fn() runs, above what was allocated before: on CUDA from its allocator's
    counter, on CPU by replaying every allocation and free that the profiler records (profile_memory=True)."""
    device = torch.device("cuda" if device is None and torch.cuda.is_available() else device or "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))  # a free is a negative size
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


# 3. the machine


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the system has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


class Load:
    """The 1-minute load average, sampled at the start and whenever `sample()` is called (e.g. every evaluation)."""

    def __init__(self):
        self.samples = []
        self.sample()

    def sample(self):
        value = load_average()
        if value is not None:
            self.samples.append(value)

    def summary(self) -> dict:
        if not self.samples:
            return {}
        values = self.samples
        return {"min": min(values), "mean": statistics.fmean(values), "max": max(values), "samples": len(values)}


def machine(device=None) -> dict:
    """The facts a timing depends on: system, CPU, cores, torch threads, versions, device (and GPU), load."""
    import transformers

    device = torch.device("cuda" if device is None and torch.cuda.is_available() else device or "cpu")
    info = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "load_average": load_average(),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        info["cpu"] = names[0] if names else info["cpu"]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(info: dict) -> str:
    """One line for a plot's title: the device, or the CPU with its cores and torch threads."""
    return info.get("gpu") or f"{info['cpu']}, {info['cpus']} CPUs, {info['torch_threads']} torch threads"


# 4. results: files, tables, plots


def settings(args, drop=()) -> dict:
    """The command line's values as JSON values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in drop}


def write_json(path: Path, data: dict):
    """Write `data` whole or not at all: into a temporary file renamed over `path`, so that a stop mid-write never
    leaves a half-written results file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def ratio(a, b):
    """a / b, or None where either is missing."""
    return None if a is None or b is None else a / b


def fmt(value, spec: str = ".2f", scale: float = 1.0, missing: str = "-") -> str:
    """A table cell: `value` x `scale` formatted, or `missing` for None."""
    return missing if value is None else format(value * scale, spec)


def status(met) -> str:
    """A target's status: MET, NOT MET, or n/a (None: not measured)."""
    return "n/a" if met is None else ("MET" if met else "NOT MET")


def markdown_table(header: list, rows: list) -> str:
    """A Markdown table of `header` and `rows` (lists of cells, str()'d)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is not installed (said once)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plots written (the results file has every figure)")
        return None
    return plt
