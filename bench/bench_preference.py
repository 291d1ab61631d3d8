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
Peak: lora_peak.step_peak (CUDA's peak allocation, or on the CPU the step's own peak above
what it started with, from the profiler's record of each allocation and free). Ratio = DPO's peak / SFT's (target
<= 1.05). The whole-logits row runs in a child process (it replaces the head's op).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from lora_peak import add_model_flags, lora_model, print_peaks, step_peak  # noqa: E402

import architecture  # noqa: E402
from codelm.kernels import IGNORE_INDEX  # noqa: E402
from codelm.training import preference  # noqa: E402
from codelm.training.preference import PreferenceConfig  # noqa: E402

STEPS = ("sft", "dpo", "dpo-whole-logits")


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The LoRA model on the device, and one batch of pairs with its reference log-probs."""
    model = lora_model(args)
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


def step(name: str, model: torch.nn.Module, batch: dict, bf16: bool) -> None:
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


def measure(name: str, args: argparse.Namespace) -> float:
    """Peak bytes of one ``name`` step (lora_peak.step_peak)."""
    if name == "dpo-whole-logits":  # the plain head: log_softmax of the whole logits
        architecture.head_logps = architecture.head_logps.__wrapped__
    model, batch = build(args)
    return step_peak(model, functools.partial(step, name, model, batch, args.bf16), args.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs a step (default: 8)")
    add_model_flags(parser)
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
    print_peaks(peaks, f"{args.pairs} pairs x 2 rows", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
