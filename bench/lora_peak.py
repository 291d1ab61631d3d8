"""What bench_preference.py and bench_grpo.py share: the flags that shape their model and rows,
the model (a Llama-shaped codelm Transformer, LoRA of rank 16 on the attention projections), and
the peak memory of one training step from the same resident state (the model, the AdamW moments
of the adapters).

Peak = the device's peak allocation during the step (CUDA's allocator: the resident model and
moments included), or on the CPU the peak of the step's own allocations above what it started
with (the profiler's record of each allocation and free).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lora  # noqa: E402
from architecture import PRESETS, Transformer  # noqa: E402
from codelm.models.adapter_config import LoRAConfig  # noqa: E402


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    """--device: cpu or cuda, cuda where there is one."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda where there is one)")


# The flags of the rows' and the model's shape: (flag, default, meaning).
SHAPE_FLAGS = (("--prompt", 256, "prompt tokens a row"),
               ("--completion", 256, "completion tokens a row"),
               ("--layers", 8, "blocks"),
               ("--width", 1024, "model width, a multiple of 256"),
               ("--vocab", 128256, "vocabulary, Llama-3's"))


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--device, SHAPE_FLAGS (the rows' --prompt and --completion tokens, the model's --layers,
    --width and --vocab), and --no-bf16."""
    add_device_flag(parser)
    for flag, default, meaning in SHAPE_FLAGS:
        parser.add_argument(flag, type=int, default=default,
                            help=f"{meaning} (default: {default})")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="fp32 instead of bf16 autocast (default: bf16)")


def lora_model(args: argparse.Namespace) -> Transformer:
    """The model add_model_flags' flags shape, seeded, LoRA applied, on args.device."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["llama-60m"], n_layer=args.layers, n_embd=args.width,
                              n_head=args.width // 64, n_kv_head=max(1, args.width // 256),
                              head_dim=None, rotary_dim=None,
                              mlp_hidden=args.width * 8 // 3 // 64 * 64,
                              vocab_size=args.vocab, block_size=args.prompt + args.completion,
                              tie_embeddings=False)
    model = Transformer(cfg).to(args.device)
    lora.apply_lora(model, LoRAConfig(r=16, alpha=32.0))
    return model


def step_peak(model: Transformer, step: Callable[[], None], device: torch.device) -> float:
    """Peak bytes of one ``step`` (a forward and backward of ``model``) after a warm-up step
    and an AdamW step, the adapters' moments resident."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step()  # warm-up: the optimizer's moments, the allocator
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type != "cuda":
        return cpu_peak(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated())


def cpu_peak(run: Callable[[], None]) -> float:
    """The peak of the bytes ``run`` holds allocated at once on the CPU above what it started
    with: its allocations and frees in order, as the profiler records them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                     if e.self_cpu_memory_usage)
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return float(peak)


def print_peaks(peaks: dict[str, float], rows: str, args: argparse.Namespace) -> None:
    """The peaks as a markdown table, each against the "sft" step's; ``rows``: what a step
    runs on ("16 rows"), the rest of the shape from the flags."""
    shape = (f"{rows} of {args.prompt}+{args.completion} tokens, {args.layers}x{args.width}, "
             f"vocab {args.vocab}, LoRA r16, {'bf16' if args.bf16 else 'fp32'}, "
             f"{args.device.type}")
    print(f"| step | peak memory (MiB) | / LoRA SFT |  ({shape})")
    print("|---|---|---|")
    for name, peak in peaks.items():
        print(f"| {name} | {peak / 2**20:,.1f} | {peak / peaks['sft']:.3f}x |")
