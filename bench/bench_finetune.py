"""The LoRA fine-tuning step on the seeds' 1B-class shapes, codelm against transformers + PEFT:
its memory and speed on full rows, and its real tokens per second on examples of real lengths.

    python bench/bench_finetune.py [--part memory packing] [--families ...] [--layers N]

Each family is its seed model's real config (StarCoderBase-1B, CodeGen-350M-mono, Phi-1.5,
Llama-3.2-1B) with random weights, saved once as an HF checkpoint, with one PEFT adapter of the
seed's LoRA setting (B random, so the update counts) that both libraries load: the same weights,
the same adapter, the same batch. The step is the seeds': batch 1, 1,024 tokens, gradient
checkpointing (non-reentrant), train mode (LoRA dropout on), forward, each library's own loss
(codelm's fused head; transformers' ``labels`` loss on its logits), backward, AdamW.

memory (the seeds' step): each library's step on one row of --seq random tokens.

packing: examples of the standard library's functions' lengths (bench/bench_packing.py), one
row of codelm's packer (batches.PackedExamples: first fit into rows of --seq tokens, each
example attending to itself) a step, against the same examples right-padded to the longest
(transformers + PEFT, attention mask) and flattened into one row by transformers'
DataCollatorWithFlattening (position ids; its SDPA mask keeps the examples apart). The three
count the same predictions, so their eval-mode losses are equal. Real tokens per second of the
median step; --packing-layers blocks of each shape (default 2: the padded step at 1B would take
minutes).

Each library runs in its own process. Memory is the step's peak above the loaded model: on CPU
the process's peak resident set (VmHWM, reset after loading) minus its resident set after
loading, over one step with glibc told to hand every freed block over 64 KiB straight back (so
the peak is what was alive, not what the allocator kept for reuse); on CUDA max_memory_allocated
minus memory_allocated after loading. Speed, from another process with the allocator as it
comes (handing blocks back costs both libraries page faults), the libraries' processes taking
turns for --rounds rounds: the fastest timed step of any round (each process's first step is a
warm-up). Before the steps each library computes the batch's loss in eval
mode (no dropout), which also reads every weight in: the two are equal when the weights and the
adapter agree. The losses of every step are printed; dropout masks differ between libraries.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from lora_peak import add_device_flag  # noqa: E402

# The seeds' models: each real config's structural fields (base-model dropout off in both
# libraries: only LoRA's dropout runs).
SHAPES = {
    "gpt_bigcode": ("StarCoderBase-1B", dict(
        vocab_size=49152, n_positions=8192, n_embd=2048, n_inner=8192, n_layer=24, n_head=16,
        multi_query=True, activation_function="gelu_pytorch_tanh", resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0)),
    "codegen": ("CodeGen-350M-mono", dict(
        vocab_size=51200, n_positions=2048, n_ctx=2048, n_embd=1024, n_layer=20, n_head=16,
        rotary_dim=32, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)),
    "phi": ("Phi-1.5", dict(
        vocab_size=51200, max_position_embeddings=2048, hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        partial_rotary_factor=0.5, hidden_act="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attention_dropout=0.0)),
    "llama": ("Llama-3.2-1B", dict(
        vocab_size=128256, max_position_embeddings=131072, hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
}
LAYER_KEY = {"gpt_bigcode": "n_layer", "codegen": "n_layer", "phi": "num_hidden_layers",
             "llama": "num_hidden_layers"}
# Each seed's LoRA setting (as bench/bench_lora.py).
SEED_LORA = {
    "gpt_bigcode": dict(r=16, lora_alpha=32, lora_dropout=0.08, target_modules=["c_proj", "c_attn"]),
    "codegen": dict(r=8, lora_alpha=32, lora_dropout=0.0,
                    target_modules=["wte", "qkv_proj", "out_proj", "fc_in", "fc_out"]),
    "phi": dict(r=16, lora_alpha=32, lora_dropout=0.05,
                target_modules=["q_proj", "v_proj", "fc1", "fc2"]),
    "llama": dict(r=16, lora_alpha=32, lora_dropout=0.05,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
}


def make_checkpoint(family: str, layers: int | None, out: Path) -> None:
    """The family's random HF checkpoint and a PEFT adapter of its seed's setting, in ``out``."""
    from tiny_hf import tiny_hf_model

    _, shape = SHAPES[family]
    if layers:
        shape = {**shape, LAYER_KEY[family]: layers}
    model = tiny_hf_model(family, seed=0, **shape)
    model.save_pretrained(out / "model")
    save_random_adapter(model, SEED_LORA[family], out / "adapter")


def save_random_adapter(model, lora_settings: dict, out: Path) -> None:
    """A PEFT adapter of ``lora_settings`` on ``model`` with B random too (so the update
    counts), saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(**lora_settings))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(out)


def memory_mib() -> tuple[float, float]:
    """(current, peak) resident set of this process in MiB."""
    status = Path("/proc/self/status").read_text()
    rss, hwm = (int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM"))
    return rss / 1024, hwm / 1024


def reset_peak(device: torch.device) -> float:
    """Hand freed memory back, reset the peak; return the memory now (MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return memory_mib()[0]


def peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return memory_mib()[1]


def load_codelm(ckpt: Path, device: torch.device, offload: bool = False):
    """codelm's model with the adapter and checkpointing on; its loss of a batch."""
    import lora
    from codelm.models import pretrained

    model = pretrained.load(ckpt / "model").to(device)
    lora.load_adapter(model, ckpt / "adapter")
    model.gradient_checkpointing = True
    model.offload_activations = offload
    model.train()

    def loss_of(batch: dict) -> torch.Tensor:
        return model(batch["input_ids"], batch["labels"], document_ids=batch.get("document_ids"))

    return model, loss_of


def load_hf(ckpt: Path, device: torch.device, offload: bool = False):
    """transformers + PEFT with the adapter and checkpointing on; its labels loss of a batch."""
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt / "model", dtype=torch.float32, attn_implementation="sdpa").to(device)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                         offload=offload)
    model = PeftModel.from_pretrained(base, ckpt / "adapter", is_trainable=True)
    model.train()

    def loss_of(batch: dict) -> torch.Tensor:
        return model(**batch).loss

    return model, loss_of


class Example(NamedTuple):
    ids: torch.Tensor  # the example's tokens


def full_rows(args, vocab: int) -> list[list[Example]]:
    """The memory part's steps: one example of --seq tokens, the same each step."""
    ids = torch.randint(0, vocab, (args.seq,), generator=torch.Generator().manual_seed(0))
    return [[Example(ids)]] * args.steps


def packed_rows(args, vocab: int) -> list[list[Example]]:
    """The packing part's steps: the examples of one of codelm's packed rows each."""
    from bench_packing import function_lengths

    from codelm.training.batches import first_fit_rows

    lengths = function_lengths(args.seq)
    generator = torch.Generator().manual_seed(0)
    rows = first_fit_rows(lengths, args.seq, seed=0)[:args.steps]
    return [[Example(torch.randint(0, vocab, (lengths[i],), generator=generator)) for i in row]
            for row in rows]


def codelm_batch(examples: list[Example]) -> dict:
    """The examples as one packed row: each its own document, labels its next tokens."""
    from codelm.kernels import IGNORE_INDEX

    labels = [torch.cat([e.ids[1:], torch.tensor([IGNORE_INDEX])]) for e in examples]
    documents = [torch.full_like(e.ids, k) for k, e in enumerate(examples)]
    batch = {"input_ids": torch.cat([e.ids for e in examples])[None],
             "labels": torch.cat(labels)[None]}
    if len(examples) > 1:
        batch["document_ids"] = torch.cat(documents)[None]
    return batch


def hf_batch(examples: list[Example], flatten: bool) -> dict:
    """The examples right-padded to the longest (attention mask, -100 labels), or flattened by
    DataCollatorWithFlattening; transformers shifts the labels itself."""
    from transformers import DataCollatorWithFlattening

    if flatten:
        features = [{"input_ids": e.ids.tolist(), "labels": e.ids.tolist()} for e in examples]
        return dict(DataCollatorWithFlattening(return_tensors="pt")(features))
    longest = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    labels = torch.full((len(examples), longest), -100)
    mask = torch.zeros(len(examples), longest, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.ids)] = e.ids
        labels[row, :len(e.ids)] = e.ids
        mask[row, :len(e.ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def run_child(lib: str, ckpt: Path, args) -> dict:
    """One library's steps in this process: peak memory above the loaded model, step times."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, loss_of = (load_codelm if lib == "codelm" else load_hf)(ckpt, device, args.offload)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    vocab = model.config.vocab_size if lib != "codelm" else model.cfg.vocab_size
    steps = (full_rows if args.part == "memory" else packed_rows)(args, vocab)
    batches = []
    for examples in steps:
        batch = codelm_batch(examples) if lib == "codelm" else hf_batch(examples, lib == "flat")
        batches.append({k: v.to(device) for k, v in batch.items()})
    model.eval()
    with torch.no_grad():  # reads every weight in (a checkpoint may be mapped in lazily)
        eval_loss = loss_of(batches[0]).item()
    model.train()
    torch.manual_seed(0)
    loaded = reset_peak(device)
    losses, seconds = [], []
    for batch in batches:
        start = time.perf_counter()
        loss = loss_of(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seconds.append(time.perf_counter() - start)
    real = [sum(len(e.ids) for e in examples) for examples in steps]
    return dict(trainable=sum(p.numel() for p in params), eval_loss=eval_loss, loaded_mib=loaded,
                above_mib=peak(device) - loaded, losses=losses, seconds=seconds,
                real_tokens=real)


def spawn_child(lib: str, ckpt: Path, args, steps: int, eager_free: bool) -> dict:
    """One library's ``steps`` in a process of its own; ``eager_free``: glibc hands every freed
    block over 64 KiB back to the system at once."""
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if eager_free else {})}
    cmd = [sys.executable, __file__, "--child", lib, "--checkpoint", str(ckpt), "--part",
           args.part, "--threads", str(args.threads), "--seq", str(args.seq), "--steps",
           str(steps), "--device", args.device, *(["--offload"] if args.offload else [])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{lib} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(result: dict) -> slice:
    """The steps timed: all but the first (a warm-up), where there are several."""
    return slice(1, None) if len(result["seconds"]) > 1 else slice(None)


def joined(rounds: list[dict]) -> dict:
    """One library's speed runs as one: the first run's warm-up, then every run's timed steps."""
    first = rounds[0]
    seconds, real = first["seconds"][:1], first["real_tokens"][:1]
    for result in rounds:
        seconds += result["seconds"][timed(result)]
        real += result["real_tokens"][timed(result)]
    return {**first, "seconds": seconds, "real_tokens": real}


def measure(libs: Sequence[str], ckpt: Path, args) -> dict[str, dict]:
    """Each library's speed and losses over --steps steps, its processes taking turns for
    --rounds rounds (a busy spell of the machine falls on both); then the memory of one step
    with eager freeing (on CUDA the allocator's own count needs no second run)."""
    rounds: dict[str, list[dict]] = {lib: [] for lib in libs}
    for _ in range(args.rounds):
        for lib in libs:
            rounds[lib].append(spawn_child(lib, ckpt, args, args.steps, eager_free=False))
    results = {lib: joined(runs) for lib, runs in rounds.items()}
    if args.device == "cpu":
        for lib in libs:
            one_step = spawn_child(lib, ckpt, args, 1, eager_free=True)
            results[lib]["above_mib"] = one_step["above_mib"]
    return results


def step_seconds(result: dict) -> float:
    return min(result["seconds"][timed(result)])


def tokens_per_second(result: dict) -> float:
    """Real tokens per second over the timed steps."""
    part = timed(result)
    return sum(result["real_tokens"][part]) / sum(result["seconds"][part])


def bench_family(family: str, args) -> dict:
    libs = ("codelm", "hf") if args.part == "memory" else ("codelm", "hf", "flat")
    layers = args.layers if args.part == "memory" else args.packing_layers
    with tempfile.TemporaryDirectory(prefix=f"finetune-{family}-") as tmp:
        ckpt = Path(tmp)
        subprocess.run([sys.executable, __file__, "--make", family, "--checkpoint", tmp,
                        *(["--layers", str(layers)] if layers else [])], check=True)
        results = measure(libs, ckpt, args)
    trainable = {r["trainable"] for r in results.values()}
    assert len(trainable) == 1, trainable
    row = dict(family=family, model=SHAPES[family][0], trainable=trainable.pop(),
               results=results)
    print(json.dumps(row), file=sys.stderr)
    return row


def print_memory_table(rows: list[dict], args) -> None:
    offload = " (offloaded)" if args.offload else ""
    print(f"\nmemory: batch 1 x {args.seq} tokens, gradient checkpointing{offload}, "
          f"{args.threads} threads, {args.device}; step peak above the loaded model (MiB)\n")
    print("| model | trainable | codelm MiB | HF+PEFT MiB | memory ratio | codelm s/step | "
          "HF+PEFT s/step | speed ratio | eval loss codelm / HF |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ours, hf = r["results"]["codelm"], r["results"]["hf"]
        print(f"| {r['model']} | {r['trainable']:,} | {ours['above_mib']:.0f} | "
              f"{hf['above_mib']:.0f} | **{ours['above_mib'] / hf['above_mib']:.2f}** | "
              f"{step_seconds(ours):.1f} | {step_seconds(hf):.1f} | "
              f"**{step_seconds(hf) / step_seconds(ours):.2f}** | {ours['eval_loss']:.5f} / "
              f"{hf['eval_loss']:.5f} |")


def print_packing_table(rows: list[dict], args) -> None:
    print(f"\npacking: rows of {args.seq} tokens, {args.packing_layers or 'all'} blocks, "
          f"gradient checkpointing, {args.threads} threads, {args.device}; real tokens/s and "
          "step peak above the loaded model (MiB)\n")
    print("| model | codelm packed | HF+PEFT padded | HF+PEFT flattened | packed / padded | "
          "packed / flattened | MiB codelm / padded / flattened | eval loss codelm / padded / "
          "flattened |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ours, padded, flat = (r["results"][lib] for lib in ("codelm", "hf", "flat"))
        speeds = [tokens_per_second(x) for x in (ours, padded, flat)]
        print(f"| {r['model']} | {speeds[0]:.0f} | {speeds[1]:.0f} | {speeds[2]:.0f} | "
              f"**{speeds[0] / speeds[1]:.2f}** | **{speeds[0] / speeds[2]:.2f}** | "
              f"{ours['above_mib']:.0f} / {padded['above_mib']:.0f} / {flat['above_mib']:.0f} | "
              f"{ours['eval_loss']:.5f} / {padded['eval_loss']:.5f} / {flat['eval_loss']:.5f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", default=["memory", "packing"],
                        choices=["memory", "packing"], help="which tables (default: both)")
    parser.add_argument("--families", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                        help="the seeds' models to run (default: all four)")
    parser.add_argument("--layers", type=int, default=None,
                        help="blocks per model for memory (default: the real model's)")
    parser.add_argument("--packing-layers", type=int, default=2,
                        help="blocks per model for packing (default: 2; 0: the real model's)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens a row (default: 1024)")
    parser.add_argument("--steps", type=int, default=3,
                        help="steps per library, the first a warm-up (default: 3)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="speed runs per library, the libraries taking turns (default: 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: all)")
    add_device_flag(parser)
    parser.add_argument("--offload", action="store_true",
                        help="both libraries hold the checkpointed inputs in pinned host memory "
                             "(CUDA)")
    parser.add_argument("--child", choices=("codelm", "hf", "flat"), help=argparse.SUPPRESS)
    parser.add_argument("--make", choices=list(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make:
        make_checkpoint(args.make, args.layers, args.checkpoint)
        return
    if args.child:
        args.part = args.part[0]
        print(json.dumps(run_child(args.child, args.checkpoint, args)))
        return
    parts = list(args.part)
    for part in parts:
        args.part = part
        rows = [bench_family(family, args) for family in args.families]
        (print_memory_table if part == "memory" else print_packing_table)(rows, args)


if __name__ == "__main__":
    main()
