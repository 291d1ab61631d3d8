"""LoRA training-step throughput against PEFT + transformers, and the quantized base's memory.

    python bench/bench_lora.py [--families gpt_bigcode codegen phi llama] [--threads 1]

Speed: for each family, one random transformers model at bench size (saved and loaded into codelm,
so both hold the same weights) trains with its seed's LoRA setting: forward, loss, backward,
AdamW step, in train mode (LoRA dropout on). Steps alternate between codelm and PEFT, so machine
load hits both alike; the figure is the fastest step (the one least disturbed by other load), by
wall clock and by this process's CPU time.
Ratio = codelm tokens/s / PEFT's (> 1: codelm is faster).

Memory: int8 and NF4 bases of Phi-1.5's real widths (2 of its 24 blocks, bf16), the quantized
Linear weights against the same weights in bf16, the whole 24-block model extrapolated from them,
and the logits' relative error of a quantized bench-size model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tiny_hf import tiny_hf_model  # noqa: E402

from architecture import PRESETS, Transformer  # noqa: E402
from codelm.models import pretrained  # noqa: E402
from codelm.models.adapter_config import LoRAConfig  # noqa: E402
from codelm.models.quantize import quantize_base, quantized_parameters  # noqa: E402
from lora import apply_lora  # noqa: E402

# Each family with the LoRA setting of the seed project built on it (seed 002's Phi recipe is
# QLoRA; its speed is measured here on a full-precision base, which PEFT can also run on CPU).
SEEDS = {
    "gpt_bigcode": dict(r=16, alpha=32, dropout=0.08, target_modules=["c_proj", "c_attn"]),
    "codegen": dict(r=8, alpha=32, dropout=0.0,
                    target_modules=["wte", "qkv_proj", "out_proj", "fc_in", "fc_out"]),
    "phi": dict(r=16, alpha=32, dropout=0.05,  # configs/kotlin_phi.json (PEFT's Phi default)
                target_modules=["q_proj", "v_proj", "fc1", "fc2"]),
    "llama": dict(r=16, alpha=32, dropout=0.05,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
}


def bench_config(family: str, layers: int, width: int, vocab: int) -> dict:
    """Overrides for tests/tiny_hf.py: bench width, no base-model dropout (only LoRA's)."""
    common = dict(vocab_size=vocab)
    if family in ("gpt_bigcode", "codegen"):
        return dict(common, n_embd=width, n_layer=layers, n_head=width // 64, n_positions=1024,
                    n_ctx=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    **({"rotary_dim": 32} if family == "codegen" else {}))
    return dict(common, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=width // 64, max_position_embeddings=1024,
                **({"num_key_value_heads": width // 128} if family == "llama" else
                   {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0}))


def make_step(model, params, ids):
    """A step with each library's own loss: codelm's model takes its own loss (the head fused with
    the cross-entropy); PEFT's model gives logits, and transformers takes their cross-entropy."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, y = ids[:, :-1], ids[:, 1:]

    def loss_of() -> torch.Tensor:
        if isinstance(model, Transformer):
            return model(x, y)
        return F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())

    def step():
        loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the
    steadier measure of the work a step costs."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_speed(family: str, args, tmp: Path) -> tuple[list[float], list[float], int, int]:
    """[wall, CPU] tokens/s of codelm and of PEFT, and both trainable-parameter counts."""
    hf = tiny_hf_model(family, **bench_config(family, args.layers, args.width, args.vocab))
    hf.save_pretrained(tmp / family)
    ours = pretrained.load(tmp / family).train()
    setting = SEEDS[family]
    report = apply_lora(ours, LoRAConfig(**setting))
    peft = get_peft_model(copy.deepcopy(hf), LoraConfig(
        r=setting["r"], lora_alpha=setting["alpha"], lora_dropout=setting["dropout"],
        target_modules=setting["target_modules"], task_type="CAUSAL_LM")).train()
    n_peft = peft.get_nb_trainable_parameters()[0]
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1),
                        generator=torch.Generator().manual_seed(0))
    steps = {
        "codelm": make_step(ours, [p for p in ours.parameters() if p.requires_grad], ids),
        "peft": make_step(peft, [p for p in peft.parameters() if p.requires_grad], ids),
    }
    times = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(timed(step))
    tokens = args.batch * args.seq
    rates = {name: [tokens / min(t[i] for t in ts) for i in (0, 1)] for name, ts in times.items()}
    return rates["codelm"], rates["peft"], report.trainable_params, n_peft


def bench_memory(args) -> None:
    cfg = dataclasses.replace(PRESETS["phi-1_5"], n_layer=2)
    full_layers = PRESETS["phi-1_5"].n_layer
    print(f"\nquantized base, Phi-1.5 widths (2 of {full_layers} blocks, bf16):")
    print(f"{'base':>10} {'Linear MiB':>11} {'bf16 MiB':>9} {'ratio':>6} {'24-block model ratio':>21}")
    for bits, skip in ((8, ("lm_head",)), (4, ("lm_head",)), (4, ())):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = Transformer(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
        report = quantize_base(model, bits=bits, skip=skip)
        # Extrapolate to all blocks: what is outside the blocks (embeddings, head) stays as is.
        quantized = {id(p) for p in quantized_parameters(model)}
        block_rest = 2 * sum(p.numel() for p in model.blocks.parameters()  # norms, biases
                             if id(p) not in quantized)
        outside = report.model_bytes - report.quantized_bytes - block_rest
        per_block = (block_rest + report.quantized_bytes) / cfg.n_layer
        per_block_bf16 = (block_rest + report.bf16_bytes) / cfg.n_layer
        full_ratio = (outside + full_layers * per_block) / (outside + full_layers * per_block_bf16)
        name = ("int8" if bits == 8 else "nf4") + ("" if skip else " +head")
        print(f"{name:>10} {report.quantized_bytes / 2**20:>11.1f} {report.bf16_bytes / 2**20:>9.1f}"
              f" {report.ratio_to_bf16:>6.3f} {full_ratio:>21.3f}")
        del model
    print("\nrelative error (fp32 reference) of a quantized base, bench-size random llama; and its "
          "LoRA step (seed 004 setting) against the same step on the fp32 base:")
    print(f"{'base':>5} {'weights':>8} {'logits':>7} {'step tok/s':>11} {'vs fp32 base':>13}")
    hf = tiny_hf_model("llama", **bench_config("llama", args.layers, args.width, args.vocab))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1),
                        generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        models = {bits: pretrained.load(tmp) for bits in (0, 8, 4)}
        with torch.no_grad():
            ref = models[0](ids)
            w_ref = models[0].blocks[0].attn.qkv.weight.flatten()
            errors = {}
            for bits in (8, 4):
                quantize_base(models[bits], bits=bits)
                deq = models[bits].blocks[0].attn.qkv.dequantize().flatten()
                w_err = ((deq - w_ref).norm() / w_ref.norm()).item()
                errors[bits] = (w_err, ((models[bits](ids) - ref).norm() / ref.norm()).item())
        steps = {}
        for bits, model in models.items():
            apply_lora(model.train(), LoRAConfig(**SEEDS["llama"]))
            steps[bits] = make_step(model, [p for p in model.parameters() if p.requires_grad], ids)
            steps[bits]()
        times = {bits: [] for bits in steps}
        for _ in range(args.steps):
            for bits, step in steps.items():
                times[bits].append(timed(step)[0])
        rate = {b: args.batch * args.seq / min(t) for b, t in times.items()}
        for bits in (8, 4):
            print(f"{'int8' if bits == 8 else 'nf4':>5} {errors[bits][0]:>8.4f} "
                  f"{errors[bits][1]:>7.4f} {rate[bits]:>11.0f} {rate[bits] / rate[0]:>13.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(SEEDS), choices=list(SEEDS),
                        help="families timed (default: all four)")
    parser.add_argument("--layers", type=int, default=4, help="blocks (default: 4)")
    parser.add_argument("--width", type=int, default=512,
                        help="model width, a multiple of 128 (of 256 with codegen) "
                        "(default: 512)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary (default: 8192)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default: 128)")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps per side (default: 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady "
                        "figures on a shared machine; 0: all) (default: 1)")
    parser.add_argument("--skip-memory", action="store_true",
                        help="skip the quantized-base memory figures")
    args = parser.parse_args(argv)
    if args.width <= 0 or args.width % 128:
        parser.error(f"--width {args.width}: must be a positive multiple of 128 (64-wide "
                     "attention heads, two per key/value head in Llama's grouped-query attention)")
    if "codegen" in args.families and args.width % 256:
        parser.error(f"--width {args.width}: codegen needs a multiple of 256 (its heads, width / "
                     "64, are laid out in 4 chunks)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU, {torch.get_num_threads()} threads; {args.layers} layers x {args.width} wide, "
          f"vocab {args.vocab}; batch {args.batch} x {args.seq} tokens; best of {args.steps} "
          "alternating steps")
    print(f"{'family':>12} {'trainable':>10} {'codelm tok/s':>13} {'PEFT tok/s':>11} "
          f"{'ratio':>6} {'ratio (CPU time)':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            ours, theirs, n_ours, n_peft = bench_speed(family, args, Path(tmp))
            assert n_ours == n_peft, (family, n_ours, n_peft)
            print(f"{family:>12} {n_ours:>10,} {ours[0]:>13.0f} {theirs[0]:>11.0f} "
                  f"{ours[0] / theirs[0]:>6.2f} {ours[1] / theirs[1]:>17.2f}")
    if not args.skip_memory:
        bench_memory(args)


if __name__ == "__main__":
    main()
