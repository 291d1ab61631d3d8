"""Where a LoRA step's time goes on a GPU, codelm against transformers + PEFT: one profiled
fwd+bwd of the seeds' row (batch 1 x 1,024) after warm-up, per library: wall time, the GPU's busy
time, host syncs, and the top kernels and host ops. With --compiled, codelm under torch.compile
too (as ``--compile`` trains).

    python bench/profile_gpu_lora.py --families gpt_bigcode llama --setting bf16 --compiled
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gpu_lora as bench  # noqa: E402

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync",
              "cudaEventSynchronize", "cudaMemcpy")


def step(loss_of, ids: torch.Tensor, dtype: torch.dtype) -> None:
    with torch.autocast(bench.DEV, dtype):
        loss = loss_of(ids)
    loss.backward()


def profile_library(name: str, load, setting: bench.Setting, vocab: int, rows: int) -> None:
    model, loss_of = load()
    model.train()
    ids = torch.randint(3, vocab, (1, setting.seq), device=bench.DEV)
    for _ in range(3):
        step(loss_of, ids, setting.compute_dtype)
    bench.sync()
    start = time.perf_counter()
    for _ in range(5):
        step(loss_of, ids, setting.compute_dtype)
    bench.sync()
    wall = (time.perf_counter() - start) / 5
    activities = [ProfilerActivity.CPU]
    if bench.DEV == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step(loss_of, ids, setting.compute_dtype)
        bench.sync()
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3
    syncs = {e.key: e.count for e in events if e.key in SYNC_CALLS}
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                        "cudaLaunchKernelExC"))
    print(f"\n== {name} {setting.name}: {wall * 1e3:.1f} ms a fwd+bwd, GPU busy {gpu:.1f} ms, "
          f"kernel launches {launches}, sync-like calls {syncs}")
    print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70))
    model = None
    loss_of = None
    bench.free_memory()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["gpt_bigcode"],
                        choices=list(bench.MODELS))
    parser.add_argument("--setting", choices=("fp16", "bf16"), default="bf16")
    parser.add_argument("--compiled", action="store_true",
                        help="also codelm under torch.compile, in the same setting")
    parser.add_argument("--rows", type=int, default=18, help="rows of each table")
    parser.add_argument("--dry-run", action="store_true", help="the CPU, 1 block, 32 tokens")
    args = parser.parse_args(argv)
    setting = bench.FP16 if args.setting == "fp16" else bench.BF16
    layers = None
    if args.dry_run:
        bench.DEV = "cpu"
        layers = 1
        setting = bench.Setting(setting.name, setting.base_dtype, torch.bfloat16, seq=32)
    for family in args.families:
        vocab = bench.MODELS[family][1]["vocab_size"]
        with tempfile.TemporaryDirectory() as tmp:
            bench.make_checkpoint(family, Path(tmp), layers)
            profile_library(f"{family} transformers+PEFT",
                            functools.partial(bench.load_hf, Path(tmp), setting),
                            setting, vocab, args.rows)
            profile_library(f"{family} codelm",
                            functools.partial(bench.load_codelm, Path(tmp), setting),
                            setting, vocab, args.rows)
            if args.compiled:
                compiled = dataclasses.replace(setting, compiled=True)
                profile_library(f"{family} codelm compiled",
                                functools.partial(bench.load_codelm, Path(tmp), compiled),
                                compiled, vocab, args.rows)


if __name__ == "__main__":
    main()
