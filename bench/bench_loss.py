"""The LM-head loss at Llama-3's vocabulary: codelm's fused head + cross-entropy against the
unfused reference (logits, then F.cross_entropy), forward + backward, each in a fresh process.

Figures: wall time, and peak RSS above the inputs (hidden states, head weight, labels), which
is the memory the loss itself needs: for the unfused loss the (N, V) logits, their log-softmax
and their gradient; for the fused one a chunk of them. With a trainable head both also hold the
weight's gradient (V x C), which autograd keeps as ``.grad``; under LoRA the head is frozen.

With --precision bf16 or fp16 both run under autocast; fp16 backs a fixed loss scale through
both, handed to the fused loss as its grad_scale, as the Trainer hands it the GradScaler's. This
CPU has no fp16 matmul kernel (a 512 x 2048 x 8192 product takes ~50 s), so fp16 is measured at
a small width: the (N, V) tensors, the memory in question, do not depend on it.

    python bench/bench_loss.py [--tokens 1024] [--width 2048] [--vocab 128256] [--threads 2]
                               [--precision fp32|bf16|fp16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from load_child import _status_mib  # noqa: E402  (bench/, the script folder, is on sys.path)

from codelm.kernels import head_cross_entropy  # noqa: E402

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_SCALE = 1024.0  # fp16's: what a GradScaler multiplies the loss by


def child(mode: str, head_mode: str, tokens: int, width: int, vocab: int, threads: int,
          precision: str) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    head = torch.nn.Linear(width, vocab, bias=False).requires_grad_(head_mode == "trainable")
    hidden = torch.randn(tokens, width, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    dtype = AUTOCAST[precision]
    scale = LOSS_SCALE if dtype == torch.float16 else 1.0
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
        if mode == "fused":
            loss = head_cross_entropy(hidden, head, labels, grad_scale=scale)[0]
        else:
            loss = F.cross_entropy(head(hidden).float(), labels, reduction="sum")
    (loss * scale).backward()
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "extra_mib": _status_mib("VmHWM") - base,
                      "loss": float(loss)}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="rows of hidden states "
                        "(default: 1024)")
    parser.add_argument("--width", type=int, default=2048,
                        help="hidden width (default: 2048, Llama-3.2-1B's)")
    parser.add_argument("--vocab", type=int, default=128256,
                        help="vocabulary (default: 128256, Llama-3's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--precision", choices=tuple(AUTOCAST), default="fp32",
                        help="fp32, or autocast to bf16 / fp16 (fp16 with a loss scale) "
                        "(default: fp32)")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.tokens, args.width, args.vocab, args.threads, args.precision)
    if args._child:
        child(*args._child, *shape)
        return 0
    print(f"LM-head loss, {args.precision}, {args.tokens} tokens x width {args.width} x vocab "
          f"{args.vocab}, {args.threads} threads, forward + backward")
    for head_mode in ("trainable", "frozen"):
        res = {}
        for mode in ("unfused", "fused"):
            out = subprocess.run([sys.executable, __file__, "--_child", mode, head_mode,
                                  *(f"--{k}={v}" for k, v in zip(
                                      ("tokens", "width", "vocab", "threads", "precision"),
                                      shape))],
                                 capture_output=True, text=True, check=True)
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        for mode, r in res.items():
            print(f"  {head_mode:9s} head, {mode:8s} {r['seconds']:6.2f} s   peak RSS above the "
                  f"inputs {r['extra_mib']:7.0f} MiB   loss {r['loss']:.4f}")
        u, f = res["unfused"], res["fused"]
        print(f"  {head_mode:9s} head, fused / unfused: time {f['seconds'] / u['seconds']:.2f}, "
              f"memory {f['extra_mib'] / u['extra_mib']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
