"""Peak memory of a LoRA DPO step against a LoRA SFT step over the same sequences.

    python bench/bench_preference.py [--device cuda] [--pairs 8] [--prompt 256] [--completion 256]

One model (a Llama-shaped codelm Transformer: --layers, --width, --vocab), LoRA of rank 16 on
the attention projections, B pairs of prompt + completion rows (the chosen then the rejected,
2B rows of random ids). Each step is a forward and backward from the same resident state (the
model, the AdamW moments of the adapters), measured apart:
- SFT: the next-token loss of the 2B rows' completion tokens (the fused LM-head loss);
- DPO: codelm's preference step, the reference log-probs precomputed (the base with the
  adapters off, once: no second model in memory), the sequence log-probs through the chunked
  head (architecture.head_logps);
- DPO, whole logits: the same loss with the (2B, L, V) logits formed (the plain head), the
  way TRL's and GRPO's log-probs take them.
Peak = the device's peak allocation during the step (CUDA's allocator: the resident model and
moments included), or on the CPU the peak of the step's own allocations above what it started
with (the profiler's record of each allocation and free). Ratio = DPO's peak / SFT's (target
<= 1.05). The whole-logits row runs in a child process (it replaces the head's op).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import architecture  # noqa: E402
import lora  # noqa: E402
from architecture import PRESETS, Transformer  # noqa: E402
from codelm.kernels import IGNORE_INDEX  # noqa: E402
from codelm.models.adapter_config import LoRAConfig  # noqa: E402
from codelm.training import preference  # noqa: E402
from codelm.training.preference import PreferenceConfig  # noqa: E402

STEPS = ("sft", "dpo", "dpo-whole-logits")


def build(args) -> tuple[Transformer, dict]:
    """The LoRA model on the device, and one batch of pairs with its reference log-probs."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["llama-60m"], n_layer=args.layers, n_embd=args.width,
                              n_head=args.width // 64, n_kv_head=max(1, args.width // 256),
                              head_dim=None, rotary_dim=None,
                              mlp_hidden=args.width * 8 // 3 // 64 * 64,
                              vocab_size=args.vocab, block_size=args.prompt + args.completion,
                              tie_embeddings=False)
    model = Transformer(cfg).to(args.device)
    lora.apply_lora(model, LoRAConfig(r=16, alpha=32.0))
    length = args.prompt + args.completion
    ids = torch.randint(args.vocab, (2 * args.pairs, length), device=args.device)
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, args.prompt:] = 1
    batch = {"ids": ids, "attention_mask": attention, "completion_mask": completion}
    with torch.autocast(args.device.type, torch.bfloat16, enabled=args.bf16):
        batch["ref_logps"] = preference.reference_sequence_logps(model, ids, attention,
                                                                 completion)
    return model, batch


def step(name: str, model: Transformer, batch: dict, bf16: bool) -> None:
    """One forward and backward of ``name`` (STEPS) on the 2B rows."""
    device = batch["ids"].device
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        if name == "sft":
            labels = batch["ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0,
                                                     IGNORE_INDEX)
            loss = model(batch["ids"][:, :-1], labels)
        else:
            loss, _ = preference.batch_loss(model, batch, PreferenceConfig())
    loss.backward()


def measure(name: str, args) -> float:
    """Peak bytes of one ``name`` step after a warm-up step, the adapters' AdamW moments
    resident."""
    if name == "dpo-whole-logits":  # the plain head: log_softmax of the whole logits
        architecture.head_logps = architecture.head_logps.__wrapped__
    model, batch = build(args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step(name, model, batch, args.bf16)  # warm-up: the optimizer's moments, the allocator
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if args.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(name, model, batch, args.bf16)
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())
    return cpu_peak(lambda: step(name, model, batch, args.bf16))


def cpu_peak(run) -> float:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda where there is one)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs a step (default: 8)")
    parser.add_argument("--prompt", type=int, default=256,
                        help="prompt tokens a row (default: 256)")
    parser.add_argument("--completion", type=int, default=256,
                        help="completion tokens a row (default: 256)")
    parser.add_argument("--layers", type=int, default=8, help="blocks (default: 8)")
    parser.add_argument("--width", type=int, default=1024,
                        help="model width, a multiple of 256 (default: 1024)")
    parser.add_argument("--vocab", type=int, default=128256,
                        help="vocabulary (default: 128256, Llama-3's)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="fp32 instead of bf16 autocast (default: bf16)")
    parser.add_argument("--only", choices=STEPS, help=argparse.SUPPRESS)  # a CPU child's step
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return 0
    peaks = {}
    for name in STEPS:
        if name != "dpo-whole-logits":
            peaks[name] = measure(name, args)
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        child = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--only",
                                name], capture_output=True, text=True, check=True)
        peaks[name] = json.loads(child.stdout.splitlines()[-1])
    shape = (f"{args.pairs} pairs x 2 rows of {args.prompt}+{args.completion} tokens, "
             f"{args.layers}x{args.width}, vocab {args.vocab}, LoRA r16, "
             f"{'bf16' if args.bf16 else 'fp32'}, {args.device.type}")
    print(f"| step | peak memory (MiB) | / LoRA SFT |  ({shape})")
    print("|---|---|---|")
    for name in STEPS:
        print(f"| {name} | {peaks[name] / 2**20:,.1f} | {peaks[name] / peaks['sft']:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
