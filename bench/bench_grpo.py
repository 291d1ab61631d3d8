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
Peak: lora_peak.step_peak (CUDA's peak allocation, or on the CPU the step's own peak above
what it started with, from the profiler's record of each allocation and free).
Ratio = GRPO's peak / SFT's (the target: at most 1.1).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from lora_peak import add_model_flags, lora_model, print_peaks, step_peak  # noqa: E402

from codelm.kernels import IGNORE_INDEX  # noqa: E402
from codelm.training import grpo  # noqa: E402

STEPS = {"sft": None, "grpo": 0.0, "grpo-beta": 0.04}  # name: the KL term's beta


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The LoRA model on the device, and one batch of rows with their masks and advantages."""
    model = lora_model(args)
    ids = torch.randint(args.vocab, (args.rows, args.prompt + args.completion),
                        device=args.device)
    batch = {"ids": ids,
             "prompt_mask": torch.ones(args.rows, args.prompt, dtype=torch.long,
                                       device=args.device),
             "completion_mask": torch.ones(args.rows, args.completion, dtype=torch.long,
                                           device=args.device),
             "advantages": torch.randn(args.rows, device=args.device)}
    return model, batch


def step(name: str, model: torch.nn.Module, batch: dict, bf16: bool) -> None:
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
            ref = None
            if beta:  # first, while the policy's forward holds nothing
                ref = grpo.reference_logps(model, ids, completion, batch["prompt_mask"])
            logps, entropy = grpo.completion_logps(model, ids, completion, batch["prompt_mask"])
            loss, _ = grpo.policy_loss(logps, None, ref, batch["advantages"], completion, cfg,
                                       entropy=entropy)
    loss.backward()


def measure(name: str, args: argparse.Namespace) -> float:
    """Peak bytes of one ``name`` step (lora_peak.step_peak)."""
    model, batch = build(args)
    return step_peak(model, functools.partial(step, name, model, batch, args.bf16), args.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16,
                        help="completions a step (default: 16)")
    add_model_flags(parser)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    peaks = {}
    for name in STEPS:
        peaks[name] = measure(name, args)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    print_peaks(peaks, f"{args.rows} rows", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
