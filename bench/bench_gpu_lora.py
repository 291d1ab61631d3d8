"""LoRA fine-tuning of the seeds' models on a GPU: codelm against transformers + PEFT, Liger and
bitsandbytes where they install, in one run (needs a CUDA GPU; --dry-run checks it on a CPU).

  lora   each seed model's real config (random weights, saved once as an HF checkpoint with one
         PEFT adapter of the seed's LoRA setting, B random so the update counts), the seeds' step:
         batch 1 x 1,024 tokens, 8 micro-batches accumulated, AdamW on the adapter. Every library
         runs the same loop (autocast forward, its own loss, scaled backward, step); only the
         model differs. Settings:
           fp16   fp32 weights under fp16 autocast with a GradScaler (the seeds' T4 recipe)
           bf16   bf16 base weights (adapters fp32) under bf16 autocast
         Liger: transformers + PEFT with Liger's kernels patched in (bf16), where Liger has them
         for the family. --compiled families: codelm under torch.compile too (bf16), as
         ``--compile`` trains; --checkpointed families: compiled with gradient checkpointing too
         (``--gradient-checkpointing``: the activations recomputed in the backward).
  nf4    Phi-1.5's shape on a 4-bit NF4 base (bf16 compute): codelm's quantize_base against
         bitsandbytes' Linear4bit, the same step; with phi in --compiled / --checkpointed,
         codelm's NF4 compiled (and with gradient checkpointing) too.
  long   Llama-3.2-1B with LoRA at 8,192 and 16,384 tokens, bf16 base, gradient checkpointing:
         codelm (and with its activations offloaded to pinned host memory) against
         transformers + PEFT.

Figures: tokens/s over the timed optimizer steps (after one warm-up step), and the peak GPU
memory of the steps (weights included: what a user sees). The eval-mode loss of the first batch
in each setting shows the libraries hold the same model.

Example: python bench/bench_gpu_lora.py --only lora --families llama. Figures go to
docs/benchmarks.md (## GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import sections  # noqa: E402
from bench_finetune import SEED_LORA, SHAPES, save_random_adapter  # noqa: E402
from tiny_hf import tiny_hf_config  # noqa: E402

SECTIONS = ("lora", "nf4", "long")
QWEN_CODER = ("Qwen2.5-Coder-1.5B", dict(
    vocab_size=151936, max_position_embeddings=32768, hidden_size=1536, intermediate_size=8960,
    num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
    rope_theta=1000000.0, rms_norm_eps=1e-6))
MODELS = {**SHAPES, "qwen2": QWEN_CODER}
LORA = {**SEED_LORA, "qwen2": SEED_LORA["llama"]}


@dataclasses.dataclass(frozen=True)
class Setting:
    """How a step runs: the frozen base's dtype, autocast's dtype, recomputation, the rows."""

    name: str
    base_dtype: torch.dtype
    compute_dtype: torch.dtype
    checkpointing: bool = False
    offload: bool = False
    compiled: bool = False  # codelm: torch.compile(model), as --compile trains
    seq: int = 1024
    accumulation: int = 8


FP16 = Setting("fp16", torch.float32, torch.float16)
BF16 = Setting("bf16", torch.bfloat16, torch.bfloat16)


@dataclasses.dataclass
class Result:
    library: str
    setting: str
    tokens_per_s: float
    peak_gib: float
    loaded_gib: float
    eval_loss: float
    losses: list[float]


DEV = "cuda"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def gib(n_bytes: int) -> float:
    return n_bytes / 2**30


def free_memory() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ checkpoints

def make_checkpoint(family: str, out: Path, layers: int | None) -> None:
    """The family's real config with random weights (bf16 safetensors) in ``out``/model and a
    PEFT adapter of its seed's LoRA setting in ``out``/adapter."""
    import transformers

    overrides = dict(MODELS[family][1])
    if layers:
        key = "n_layer" if family in ("gpt_bigcode", "codegen") else "num_hidden_layers"
        overrides[key] = layers
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
        overrides.setdefault(key, 0.0)
    config = tiny_hf_config(family, **overrides)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out / "model")
    save_random_adapter(model, LORA[family], out / "adapter")
    del model
    free_memory()


# --------------------------------------------------------------------------------- models

LossOf = Callable[[torch.Tensor], torch.Tensor]


def load_codelm(ckpt: Path, setting: Setting, quantize_bits: int = 0) -> tuple[torch.nn.Module, LossOf]:
    """codelm's model with the adapter; its fused loss of a row (labels: the next tokens)."""
    import lora
    from codelm.kernels import IGNORE_INDEX
    from codelm.models import pretrained
    from codelm.models.quantize import quantize_base

    model = pretrained.load(ckpt / "model", dtype=setting.base_dtype, device=DEV)
    if quantize_bits:
        quantize_base(model, bits=quantize_bits)
    lora.load_adapter(model, ckpt / "adapter")
    model.gradient_checkpointing = setting.checkpointing
    model.offload_activations = setting.offload
    trained = torch.compile(model) if setting.compiled else model

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
        # the eval-mode loss runs eagerly (a compiled eval graph would be a second compilation)
        return (trained if model.training else model)(ids, labels)

    return model, loss_of


def load_hf(ckpt: Path, setting: Setting, liger: bool = False,
            bnb_4bit: bool = False) -> tuple[torch.nn.Module, LossOf]:
    """transformers + PEFT with the adapter, in transformers' default attention (sdpa; eager for
    CodeGen, which has no sdpa); its ``labels`` loss of a row."""
    import transformers
    from peft import PeftModel

    model_type = transformers.AutoConfig.from_pretrained(ckpt / "model").model_type
    attention = "eager" if model_type == "codegen" else "sdpa"
    kwargs: dict = dict(dtype=setting.base_dtype, device_map=DEV, attn_implementation=attention)
    if bnb_4bit:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=setting.compute_dtype)
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt / "model", **kwargs)
    if liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=base)
    if setting.checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PeftModel.from_pretrained(base, ckpt / "adapter", is_trainable=True)

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    return model, loss_of


# ---------------------------------------------------------------------------------- steps

def rows(setting: Setting, vocab: int, count: int) -> list[torch.Tensor]:
    """``count`` random rows of ``setting.seq`` tokens, the same for every library."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (1, setting.seq), generator=generator).to(DEV)
            for _ in range(count)]


def run(library: str, model: torch.nn.Module, loss_of: LossOf, setting: Setting, vocab: int,
        steps: int) -> Result:
    """One warm-up and ``steps`` timed optimizer steps of ``setting.accumulation`` rows each."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=DEV == "cuda")
    scaler = torch.amp.GradScaler(DEV, enabled=setting.compute_dtype == torch.float16)
    batches = rows(setting, vocab, setting.accumulation)
    model.eval()
    with torch.no_grad(), torch.autocast(DEV, setting.compute_dtype):
        eval_loss = loss_of(batches[0]).item()
    model.train()
    sync()
    loaded = torch.cuda.memory_allocated() if DEV == "cuda" else 0
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    start = 0.0
    for step in range(steps + 1):
        if step == 1:
            sync()
            start = time.perf_counter()
        total = torch.zeros((), device=DEV)
        for ids in batches:
            with torch.autocast(DEV, setting.compute_dtype):
                loss = loss_of(ids)
            scaler.scale(loss / len(batches)).backward()
            total += loss.detach().float()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(total / len(batches))
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if DEV == "cuda" else 0
    tokens = steps * setting.accumulation * setting.seq
    return Result(library, setting.name, tokens / seconds, gib(peak), gib(loaded), eval_loss,
                  [float(x) for x in losses])


def measured(library: str, load: Callable[[], tuple[torch.nn.Module, LossOf]],
             setting: Setting, vocab: int, steps: int) -> Result | str:
    """``load`` then ``run``; a library that fails gives its error's last line instead."""
    try:
        model, loss_of = load()
        result = run(library, model, loss_of, setting, vocab, steps)
    except Exception as e:  # noqa: BLE001 (one library's failure is reported; the run goes on)
        traceback.print_exc()
        result = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    model = None
    loss_of = None
    free_memory()
    if isinstance(result, Result):
        print(f"    {library:34s} {setting.name:5s} seq {setting.seq:6d}: "
              f"{result.tokens_per_s:9.0f} tokens/s  peak {result.peak_gib:6.2f} GiB  "
              f"(loaded {result.loaded_gib:.2f})  eval loss {result.eval_loss:.4f}", flush=True)
    else:
        print(f"    {library:34s} {setting.name:5s}: failed: {result}", flush=True)
    return result


def liger_reason(family: str) -> str | None:
    """Why Liger does not run on ``family`` here, or None. Liger patches transformers' classes
    for the whole process: run the families it patches after every plain transformers run."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as e:  # noqa: BLE001
        return f"does not import ({type(e).__name__}: {e})"
    if family not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"has no kernels for {family}"
    return None


# ------------------------------------------------------------------------------- sections

def bench_lora(args) -> dict:
    print(f"\nlora  batch 1 x {FP16.seq}, {FP16.accumulation} micro-batches a step, "
          f"{args.steps} timed steps after 1 warm-up; peak GPU memory includes the weights")
    table = {}
    for family in args.families:
        print(f"  {family} ({MODELS[family][0]})", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"gpu-lora-{family}-") as tmp:
            make_checkpoint(family, Path(tmp), args.layers)
            table[family] = lora_family(family, Path(tmp), args)
    print_lora_table(table)
    return table


class CompiledRow(NamedTuple):
    key: str  # the result's key after "codelm bf16 " / "codelm nf4 "
    label: str
    setting: Setting


def compiled_rows(family: str, args) -> list[CompiledRow]:
    """codelm's compiled settings asked for ``family`` (--compiled, --checkpointed), in bf16."""
    rows = []
    if family in args.compiled:
        rows.append(CompiledRow("compiled", "compiled", dataclasses.replace(BF16, compiled=True)))
    if family in args.checkpointed:
        checkpointed = dataclasses.replace(BF16, compiled=True, checkpointing=True)
        rows.append(CompiledRow("compiled checkpointed", "compiled, checkpointed", checkpointed))
    return rows


def lora_family(family: str, ckpt: Path, args) -> dict:
    """Every library in each chosen setting on one family's checkpoint."""
    vocab = MODELS[family][1]["vocab_size"]
    steps = args.steps
    out: dict = {}
    for setting in (FP16, BF16):
        if setting.name not in args.settings:
            continue
        out[f"hf {setting.name}"] = measured("transformers+PEFT", partial(load_hf, ckpt, setting),
                                             setting, vocab, steps)
        out[f"codelm {setting.name}"] = measured("codelm", partial(load_codelm, ckpt, setting),
                                                 setting, vocab, steps)
    for row in compiled_rows(family, args):
        out[f"codelm bf16 {row.key}"] = measured(f"codelm {row.label}",
                                                 partial(load_codelm, ckpt, row.setting),
                                                 row.setting, vocab, steps)
    if not args.liger:
        reason = "not run (--no-liger)"
    elif "bf16" not in args.settings:
        reason = "not run (Liger runs in bf16: no bf16 in --settings)"
    else:
        reason = liger_reason(family)
    if reason:
        out["liger bf16"] = reason
    else:
        out["liger bf16"] = measured("Liger+PEFT", partial(load_hf, ckpt, BF16, liger=True), BF16,
                                     vocab, steps)
    return out


def bench_nf4(args) -> dict:
    family = "phi"
    print(f"\nnf4  {MODELS[family][0]} on a 4-bit NF4 base, bf16 compute, batch 1 x {BF16.seq}, "
          f"{BF16.accumulation} micro-batches a step")
    try:
        import bitsandbytes  # noqa: F401
        bnb = None
    except Exception as e:  # noqa: BLE001
        bnb = f"bitsandbytes does not import ({type(e).__name__}: {e})"
    with tempfile.TemporaryDirectory(prefix="gpu-nf4-") as tmp:
        ckpt = Path(tmp)
        make_checkpoint(family, ckpt, args.layers)
        vocab = MODELS[family][1]["vocab_size"]
        out = {"codelm nf4": measured("codelm NF4", partial(load_codelm, ckpt, BF16, 4), BF16,
                                      vocab, args.steps),
               "bnb nf4": bnb or measured("bitsandbytes NF4+PEFT",
                                          partial(load_hf, ckpt, BF16, bnb_4bit=True), BF16,
                                          vocab, args.steps)}
        for row in compiled_rows(family, args):
            out[f"codelm nf4 {row.key}"] = measured(f"codelm NF4 {row.label}",
                                                    partial(load_codelm, ckpt, row.setting, 4),
                                                    row.setting, vocab, args.steps)
    for key, ours in out.items():
        if key.startswith("codelm"):
            print(f"  {key} / bitsandbytes: {ratios(ours, out['bnb nf4'])}")
    return out


def bench_long(args) -> dict:
    family = "llama"
    print(f"\nlong  {MODELS[family][0]} LoRA, bf16 base, gradient checkpointing, batch 1, "
          "1 row a step")
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu-long-") as tmp:
        ckpt = Path(tmp)
        make_checkpoint(family, ckpt, args.layers)
        vocab = MODELS[family][1]["vocab_size"]
        for seq in args.long_seqs:
            plain = dataclasses.replace(BF16, checkpointing=True, seq=seq, accumulation=1)
            offload = dataclasses.replace(plain, offload=True)
            out[seq] = {
                "hf": measured("transformers+PEFT", partial(load_hf, ckpt, plain), plain, vocab,
                               args.steps),
                "codelm": measured("codelm", partial(load_codelm, ckpt, plain), plain, vocab,
                                   args.steps),
                "codelm offload": measured("codelm offloaded", partial(load_codelm, ckpt, offload),
                                           offload, vocab, args.steps)}
    return out


# -------------------------------------------------------------------------------- tables

def cell(result: Result | str) -> str:
    if isinstance(result, str):
        return result
    return f"{result.tokens_per_s:,.0f} tok/s, {result.peak_gib:.2f} GiB"


def ratios(ours: Result | str, theirs: Result | str) -> str:
    if isinstance(ours, str) or isinstance(theirs, str) or theirs.peak_gib == 0:
        return "-"
    return (f"**{ours.tokens_per_s / theirs.tokens_per_s:.2f}x** speed, "
            f"**{ours.peak_gib / theirs.peak_gib:.2f}x** memory")


def print_lora_table(table: dict) -> None:
    print("\n| model | setting | transformers + PEFT | codelm | codelm / HF | Liger + PEFT (bf16) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for family, out in table.items():
        for name in ("fp16", "bf16"):
            if f"hf {name}" not in out:
                continue
            liger = cell(out["liger bf16"]) if name == "bf16" else ""
            print(f"| {MODELS[family][0]} | {name} | {cell(out[f'hf {name}'])} | "
                  f"{cell(out[f'codelm {name}'])} | "
                  f"{ratios(out[f'codelm {name}'], out[f'hf {name}'])} | {liger} |")
        if "hf fp16" in out and "hf bf16" in out:
            print(f"| {MODELS[family][0]} | codelm bf16 / HF fp16 (each as run) | | | "
                  f"{ratios(out['codelm bf16'], out['hf fp16'])} | |")
        for suffix in ("compiled", "compiled checkpointed"):
            key = f"codelm bf16 {suffix}"
            if key in out:
                print(f"| {MODELS[family][0]} | bf16, codelm {suffix} | {cell(out['hf bf16'])} | "
                      f"{cell(out[key])} | {ratios(out[key], out['hf bf16'])} | |")


def _as_json(o: object) -> object:
    """A dataclass's fields, anything else its string."""
    return dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="all",
                        help=f"comma-separated sections: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--families", nargs="+", default=list(MODELS), choices=list(MODELS),
                        help="lora: the seeds' models (default: all five)")
    parser.add_argument("--compiled", nargs="*", default=["llama"], choices=list(MODELS),
                        help="lora, nf4 (phi): families also timed with codelm compiled (bf16; "
                             "default: llama)")
    parser.add_argument("--checkpointed", nargs="*", default=[], choices=list(MODELS),
                        help="lora, nf4 (phi): families also timed compiled with gradient "
                             "checkpointing (bf16; default: none)")
    parser.add_argument("--settings", nargs="+", default=["fp16", "bf16"],
                        choices=["fp16", "bf16"],
                        help="lora: the eager settings timed (default: both; the compiled rows "
                             "are compared with transformers' bf16 row, so they need bf16)")
    parser.add_argument("--liger", action=argparse.BooleanOptionalAction, default=True,
                        help="lora: time Liger + PEFT where it installs (default: on)")
    parser.add_argument("--steps", type=int, default=2,
                        help="timed optimizer steps after one warm-up (default: 2)")
    parser.add_argument("--layers", type=int, default=None,
                        help="blocks per model (default: the real model's)")
    parser.add_argument("--long-seqs", type=int, nargs="+", default=[8192, 16384],
                        help="long: tokens a row (default: 8192 16384)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the CPU at toy sizes: 2 blocks, short rows (checks the script)")
    args = parser.parse_args(argv)
    only = sections.chosen(parser, args.only, SECTIONS)
    compiled_families = set(args.families) & set(args.compiled + args.checkpointed)
    if "lora" in only and compiled_families and "bf16" not in args.settings:
        parser.error("--compiled and --checkpointed rows are compared with transformers' bf16 "
                     "row: add bf16 to --settings, or pass --compiled with no families")
    global DEV, FP16, BF16
    if args.dry_run:
        DEV = "cpu"
        args.layers, args.steps, args.long_seqs = 1, 1, [64]
        FP16 = dataclasses.replace(FP16, compute_dtype=torch.bfloat16, seq=32, accumulation=2)
        BF16 = dataclasses.replace(BF16, seq=32, accumulation=2)
    elif not torch.cuda.is_available():
        print("bench_gpu_lora.py needs a CUDA GPU; --dry-run checks the script on the CPU",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)"
    print(f"torch {torch.__version__}, {name}", flush=True)
    runners = {"lora": bench_lora, "nf4": bench_nf4, "long": bench_long}
    return sections.run(runners, only, args, default=_as_json)


if __name__ == "__main__":
    sys.exit(main())
