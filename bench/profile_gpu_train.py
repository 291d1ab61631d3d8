"""Where a compiled pretraining step's time goes on a GPU: bench_gpu.py's ~124M Llama shape,
bf16 autocast, fused AdamW, codelm against the nanoGPT-style model (and codelm with its fused
head's softmax passes run eagerly): the step's time, the GPU's busy time, and its kernels' time
grouped (matmuls, attention, fused Triton kernels, optimizer, the rest), with the top kernels,
and the peak GPU memory of the warm-up and timed steps.

    python bench/profile_gpu_train.py [--batch 32] [--rows 15]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gpu as bench  # noqa: E402

from architecture import Transformer  # noqa: E402
from codelm import kernels  # noqa: E402

GROUPS = {  # group: substrings of kernel names, first match wins
    "matmul": ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk"),
    "attention": ("flash", "fmha", "cudnn", "attn", "sdpa"),
    "optimizer": ("multi_tensor", "adam"),
    "fused (triton)": ("triton",),
}


def group_of(kernel: str) -> str:
    name = kernel.lower()
    for group, needles in GROUPS.items():
        if any(needle in name for needle in needles):
            return group
    return "other"


def profile_model(label: str, model: torch.nn.Module, loss_fn, steps: int, rows: int) -> float:
    """Warm up (compiling), time ``steps`` steps, profile one; print the breakdown. Returns the
    step's seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    bench.reset_peak()
    bench.timed_steps(model, opt, loss_fn, 3)
    seconds = bench.timed_steps(model, opt, loss_fn, steps)
    peak = bench.peak_gib()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bench.timed_steps(model, opt, loss_fn, 1)
    kernels_ms: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" and event.self_device_time_total > 0:
            kernels_ms[event.key] += event.self_device_time_total / 1e3
    busy = sum(kernels_ms.values())
    by_group: dict[str, float] = defaultdict(float)
    for kernel, ms in kernels_ms.items():
        by_group[group_of(kernel)] += ms
    print(f"\n== {label}: {seconds * 1e3:.1f} ms a step, GPU busy {busy:.1f} ms, peak memory "
          f"{peak:.1f} GiB")
    for group, ms in sorted(by_group.items(), key=lambda item: -item[1]):
        print(f"  {group:16s} {ms:7.2f} ms  {100 * ms / busy:5.1f}%")
    for kernel, ms in sorted(kernels_ms.items(), key=lambda item: -item[1])[:rows]:
        print(f"    {ms:7.2f} ms  {group_of(kernel):14s} {kernel[:110]}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="sequences a step (default: 32)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    parser.add_argument("--rows", type=int, default=15, help="top kernels listed (default: 15)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated labels of the variants to run (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU at toy sizes")
    args = parser.parse_args(argv)
    cfg = bench.GPU_CFG
    if args.dry_run:
        bench.DEV = "cpu"
        cfg = bench.DRY_CFG
        args.batch = 2
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), device=bench.DEV)
    y = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), device=bench.DEV)
    fused_loss = lambda m: m(x, y)  # noqa: E731
    plain_loss = lambda m: F.cross_entropy(m(x).flatten(0, 1).float(), y.flatten())  # noqa: E731
    compiled_chunk = kernels._chunk_loss_on
    eager_chunk = lambda device: kernels._chunk_loss  # noqa: E731
    variants = {  # label: (build, loss, the fused head's chunk softmax)
        "codelm compiled": (lambda: Transformer(cfg), fused_loss, compiled_chunk),
        "codelm compiled, head softmax eager": (lambda: Transformer(cfg), fused_loss,
                                                eager_chunk),
        "nanoGPT-style compiled": (lambda: bench.NanoLlama(cfg), plain_loss, compiled_chunk),
    }
    if args.variants:
        variants = {label: variants[label] for label in args.variants.split(",")}
    print(f"profile: {bench.DEV}, batch {args.batch}x{cfg.block_size}, bf16 autocast")
    seconds = {}
    for label, (build, loss_fn, chunk_loss_on) in variants.items():
        kernels._chunk_loss_on = chunk_loss_on
        try:
            torch.manual_seed(0)
            model = torch.compile(build().to(bench.DEV).train())
            seconds[label] = profile_model(label, model, loss_fn, args.steps, args.rows)
        finally:
            kernels._chunk_loss_on = compiled_chunk
        model = None
        torch._dynamo.reset()
    base = seconds.get("nanoGPT-style compiled")
    for label, s in seconds.items():
        ratio = f"{base / s:.3f}x nanoGPT-style's speed" if base else ""
        print(f"  {label:40s} {s * 1e3:7.1f} ms  {ratio}")


if __name__ == "__main__":
    main()
