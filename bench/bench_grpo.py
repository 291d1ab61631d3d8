"""Peak memory of a LoRA GRPO step against a LoRA SFT step over the same sequences.

    python bench/bench_grpo.py [--device cuda] [--rows 16] [--prompt 256] [--completion 256]

One model (a Llama-shaped codelm Transformer: --layers, --width, --vocab), LoRA of rank 16 on
the attention projections, N rows of prompt + completion (random ids: a step's G completions of
its problems after their prompts). Each step is a forward and backward from the same resident
state (the model, the AdamW moments of the adapters), measured apart:
- SFT: the next-token loss of the rows' completion tokens (the fused LM-head loss);
- GRPO: codelm's policy step (codelm.training.grpo: the completions' log-probs and entropies
  under the model, TRL's dapo loss of random advantages), on-policy, no KL term;
- GRPO, beta 0.04: the same with the KL term, the reference the base with the adapters off.
Peak = the device's peak allocation during the step (CUDA's allocator: the resident model and
moments included), or on the CPU the peak of the step's own allocations above what it started
with (the profiler's record of each allocation and free, as bench_preference.py measures).
Ratio = GRPO's peak / SFT's (issue 66's target: <= 1.1).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lora  # noqa: E402
from architecture import PRESETS, Transformer  # noqa: E402
from bench.bench_preference import cpu_peak  # noqa: E402
from codelm.kernels import IGNORE_INDEX  # noqa: E402
from codelm.models.adapter_config import LoRAConfig  # noqa: E402
from codelm.training import grpo  # noqa: E402

STEPS = {"sft": None, "grpo": 0.0, "grpo-beta": 0.04}  # name: the KL term's beta


def build(args) -> tuple[Transformer, dict]:
    """The LoRA model on the device, and one batch of rows with their masks and advantages."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["llama-60m"], n_layer=args.layers, n_embd=args.width,
                              n_head=args.width // 64, n_kv_head=max(1, args.width // 256),
                              head_dim=None, rotary_dim=None,
                              mlp_hidden=args.width * 8 // 3 // 64 * 64,
                              vocab_size=args.vocab, block_size=args.prompt + args.completion,
                              tie_embeddings=False)
    model = Transformer(cfg).to(args.device)
    lora.apply_lora(model, LoRAConfig(r=16, alpha=32.0))
    ids = torch.randint(args.vocab, (args.rows, args.prompt + args.completion),
                        device=args.device)
    batch = {"ids": ids,
             "prompt_mask": torch.ones(args.rows, args.prompt, dtype=torch.long,
                                       device=args.device),
             "completion_mask": torch.ones(args.rows, args.completion, dtype=torch.long,
                                           device=args.device),
             "advantages": torch.randn(args.rows, device=args.device)}
    return model, batch


def step(name: str, model: Transformer, batch: dict, bf16: bool) -> None:
    """One forward and backward of ``name`` (STEPS) on the rows."""
    ids, completion = batch["ids"], batch["completion_mask"]
    device = ids.device
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        if name == "sft":
            labels = ids[:, 1:].clone()
            labels[:, : batch["prompt_mask"].shape[1] - 1] = IGNORE_INDEX
            loss = model(ids[:, :-1], labels)
        else:
            beta = STEPS[name]
            cfg = grpo.GRPOConfig(beta=beta)
            logps, entropy = grpo.completion_logps(model, ids, completion, batch["prompt_mask"])
            ref = None
            if beta:
                ref = grpo.reference_logps(model, ids, completion, batch["prompt_mask"])
            loss, _ = grpo.policy_loss(logps, None, ref, batch["advantages"], completion, cfg,
                                       entropy=entropy)
    loss.backward()


def measure(name: str, args) -> float:
    """Peak bytes of one ``name`` step after a warm-up step, the adapters' AdamW moments
    resident."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda where there is one)")
    parser.add_argument("--rows", type=int, default=16,
                        help="completions a step (default: 16)")
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
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    peaks = {}
    for name in STEPS:
        peaks[name] = measure(name, args)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    shape = (f"{args.rows} rows of {args.prompt}+{args.completion} tokens, "
             f"{args.layers}x{args.width}, vocab {args.vocab}, LoRA r16, "
             f"{'bf16' if args.bf16 else 'fp32'}, {args.device.type}")
    print(f"| step | peak memory (MiB) | / LoRA SFT |  ({shape})")
    print("|---|---|---|")
    for name in STEPS:
        print(f"| {name} | {peaks[name] / 2**20:,.1f} | {peaks[name] / peaks['sft']:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
