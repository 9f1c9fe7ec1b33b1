"""Images/s and peak memory of AFT-conv and AFT-full image classifiers against transformers' ViT.

All three have the same width, depth, patch size and MLP; ViT uses transformers' default attention (SDPA),
AFT-conv the paper's tiny recipe (one head per channel, an 11 x 11 kernel). Each model runs at 224^2 and 384^2.

    python benchmarks/benchmark_vision.py                 # CPU: width 192, depth 4, batch 8 (minutes on 2 cores)
    python benchmarks/benchmark_vision.py --quick         # a smoke run: one timed step per model and size
    python benchmarks/benchmark_vision.py --device cuda   # width 192, depth 12 (DeiT-tiny), batch 64

Peak memory is what one step allocates above what was live before it (weights and the input batch are
excluded and reported apart), in a separate untimed step (harness.peak_bytes: on CUDA the allocator's counter, on CPU
the allocation events that `torch.profiler` records). Speed is the median
of the timed steps (robust to other processes sharing the CPU); every step's time is saved in the JSON.
"""

import argparse
from pathlib import Path

import torch
from harness import image_classifier, in_turn, machine, medians, peak_bytes, pyplot, settings, write_json
from tqdm import tqdm

MODELS = ("aft-conv", "aft-full", "vit")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384], help="image sides in pixels")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--hidden-size", type=int, default=192, help="width (default: DeiT-tiny's 192)")
    parser.add_argument("--num-layers", type=int, help="depth (default: 12 on CUDA, as DeiT-tiny; 4 on CPU)")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--conv-heads", type=int, help="AFT-conv heads (default: one per channel, as the paper)")
    parser.add_argument("--conv-kernel-size", type=int, default=11)
    parser.add_argument("--vit-head-dim", type=int, default=64, help="ViT heads = width / this (DeiT: 64)")
    parser.add_argument("--num-labels", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, help="default: 64 on CUDA, 8 on CPU")
    parser.add_argument("--mode", choices=("inference", "train"), default="inference", help="train: fwd + bwd")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and size")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="batch 2, 1 warm-up and 1 timed step")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmark_vision.json"))
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.num_layers = args.num_layers or (12 if cuda else 4)
    args.conv_heads = args.conv_heads or args.hidden_size
    args.batch_size = args.batch_size or (64 if cuda else 8)
    if args.quick:
        args.batch_size, args.warmup, args.steps = 2, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def build_model(name, image_size, args):
    """ViT, AFT-conv or AFT-full at the benchmark's width, depth and patch size (harness.image_classifier)."""
    return image_classifier(name, hidden=args.hidden_size, layers=args.num_layers, head_size=args.vit_head_dim,
                            image_size=image_size, patch_size=args.patch_size, num_labels=args.num_labels,
                            conv_heads=args.conv_heads, conv_kernel=args.conv_kernel_size)  # fmt: skip


def make_step(model, pixel_values, labels, mode):
    if mode == "inference":
        model.eval()

        def step():
            with torch.inference_mode():
                model(pixel_values)

    else:
        model.train()

        def step():
            model(pixel_values, labels=labels).loss.backward()
            model.zero_grad(set_to_none=True)

    return step


def measure(image_size, args, device, progress):
    """Every model at one size. Timed steps take the models in turn, so that other processes sharing the machine
    slow them alike instead of whichever model happens to run at the time."""
    steps, models = {}, {}
    for name in args.models:
        torch.manual_seed(0)
        models[name] = build_model(name, image_size, args).to(device)
        pixel_values = torch.randn(args.batch_size, 3, image_size, image_size, device=device)
        labels = torch.randint(0, args.num_labels, (args.batch_size,), device=device)
        steps[name] = make_step(models[name], pixel_values, labels, args.mode)
    times = in_turn(steps, args.steps, warm_up=args.warmup, device=device)
    progress.update(args.steps)
    results = []
    for name in args.models:
        seconds = medians(times)[name]
        results.append(
            {
                "model": name,
                "image_size": image_size,
                "parameters": sum(p.numel() for p in models[name].parameters()),
                "parameter_mb": sum(p.numel() * p.element_size() for p in models[name].parameters()) / 2**20,
                "ms_per_batch": 1e3 * seconds,
                "ms_per_batch_best": 1e3 * min(times[name]),
                "ms_per_batch_each_step": [1e3 * t for t in times[name]],
                "images_per_s": args.batch_size / seconds,
                "peak_step_mb": peak_bytes(steps[name], device) / 2**20,
            }
        )
    return results


def ratios(results):
    """Throughput and memory of each AFT model relative to ViT at the same size."""
    vit = {r["image_size"]: r for r in results if r["model"] == "vit"}
    out = []
    for r in results:
        if r["model"] != "vit" and r["image_size"] in vit:
            ref = vit[r["image_size"]]
            out.append(
                {
                    "model": r["model"],
                    "image_size": r["image_size"],
                    "speed_vs_vit": r["images_per_s"] / ref["images_per_s"],
                    "memory_vs_vit": r["peak_step_mb"] / ref["peak_step_mb"],
                }
            )
    return out


def plot(results, path, title):
    plt = pyplot()
    if plt is None:
        return None
    sizes = sorted({r["image_size"] for r in results})
    models = [m for m in MODELS if any(r["model"] == m for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(
        axes, ("images_per_s", "peak_step_mb"), ("images/s", "peak step memory (MiB)"), strict=True
    ):
        width = 0.8 / len(models)
        for i, m in enumerate(models):
            values = [next((r[key] for r in results if r["model"] == m and r["image_size"] == s), 0) for s in sizes]
            ax.bar([j + i * width for j in range(len(sizes))], values, width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"{s}²" for s in sizes])
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main():
    args = parse_args()
    device = torch.device(args.device)
    results = []
    with tqdm(total=len(args.sizes) * args.steps, desc="benchmark", unit="step") as progress:
        for size in args.sizes:
            progress.set_postfix(size=size)
            results += measure(size, args, device, progress)

    print(
        f"\n{args.mode}, batch {args.batch_size}, width {args.hidden_size}, depth {args.num_layers}, "
        f"patch {args.patch_size}, median of {args.steps} timed steps (models in turn), "
        f"device {device} ({torch.get_num_threads()} threads)"
    )
    print(f"{'model':<10}{'size':>6}{'params':>12}{'images/s':>12}{'ms/batch':>12}{'best ms':>10}{'peak MiB':>10}")
    for r in results:
        print(
            f"{r['model']:<10}{r['image_size']:>6}{r['parameters']:>12,}{r['images_per_s']:>12.1f}"
            f"{r['ms_per_batch']:>12.1f}{r['ms_per_batch_best']:>10.1f}{r['peak_step_mb']:>10.1f}"
        )
    for r in ratios(results):
        print(
            f"{r['model']} at {r['image_size']}²: {r['speed_vs_vit']:.2f}x ViT's images/s, "
            f"{r['memory_vs_vit']:.2f}x its peak step memory"
        )

    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"settings": settings(args), "machine": machine(device), "results": results, "ratios": ratios(results)}
    write_json(args.output, report)
    print(f"saved {args.output}")
    title = f"{args.mode}, batch {args.batch_size}, width {args.hidden_size}, depth {args.num_layers}, {device}"
    png = plot(results, args.output.with_suffix(".png"), title)
    if png:
        print(f"saved {png}")


if __name__ == "__main__":
    main()
