"""The CUDA paths, checked and timed against their references in one run (needs a CUDA GPU).

  parity    each family's tiny random HF model on the GPU: max |logits| difference with
            transformers in fp32 (TF32 off) and in bf16 (each library's bf16 error against the
            fp32 reference); greedy generation (32 tokens, batch 2 left-padded) equal to HF's.
  kernels   which attention kernels a bf16 training step and a prefill launch (flash expected).
  train     bf16 autocast + fused AdamW step on a ~124M Llama-shaped model, batch 16x1024,
            eager and torch.compile'd: tokens/s and MFU of codelm vs a nanoGPT-style model
            vs transformers' LlamaForCausalLM, and peak GPU memory.
  generate  greedy, batch 1, 64-token prompt, 128 new tokens, bf16: codelm eager and compiled
            decode vs transformers' generate (eager, and its static cache).
  ablate    the eager step with each CPU-tuned piece of codelm (fused chunked head, RMSNorm's
            hand-written backward) swapped for the plain alternative.
  load      Llama-3.2-1B-shaped bf16 checkpoint (random weights) straight to the GPU: load time
            and peak GPU memory, codelm vs transformers.
  checks    the open CUDA questions: TF32 (fp32 step time with and without), and the fused
            head's bf16 weight gradient against fp32 truth (and the unfused head's).

Example: python bench/bench_gpu.py (all), or --only train,generate.
Figures go to docs/benchmarks.md (## GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import sections  # noqa: E402  (bench/, the script folder, is on sys.path)
from bench_model import NanoLlama, _hf_llama, copy_hf_llama_weights  # noqa: E402

import architecture  # noqa: E402
from architecture import PRESETS, Transformer  # noqa: E402
from codelm import kernels  # noqa: E402
from codelm.models import pretrained  # noqa: E402
from codelm.models.generation import GenerationConfig, generate  # noqa: E402

SECTIONS = ("parity", "kernels", "train", "ablate", "generate", "load", "checks")
# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0}
# ~124M Llama-shaped: GPT-2 small's depth and width with SwiGLU and rotary.
GPU_CFG = dataclasses.replace(PRESETS["llama-14m"], vocab_size=32768, block_size=1024,
                              n_layer=12, n_embd=768, n_head=12, n_kv_head=12, head_dim=64,
                              mlp_hidden=2048, tie_embeddings=True)
# --dry-run: every section on the CPU at toy sizes, to check this script without a GPU.
DRY_CFG = dataclasses.replace(PRESETS["tiny"], block_size=128, n_kv_head=4, tie_embeddings=True)


DEV = "cuda"  # "cpu" under --dry-run


def sync_time() -> float:
    if DEV == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def reset_peak() -> None:
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan")


def timed_steps(model, opt, loss_fn, steps: int, bf16: bool = True) -> float:
    """Mean seconds of ``steps`` optimizer steps on ``loss_fn(model)``, the GPU waited for."""
    t0 = sync_time()
    for _ in range(steps):
        with torch.autocast(DEV, torch.bfloat16, enabled=bf16):
            loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (sync_time() - t0) / steps


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# ---------------------------------------------------------------------------- parity

def bench_parity(args) -> dict:
    from tiny_hf import FAMILIES, MODERN, save_tiny_hf

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    res = {}
    print(f"\nparity  (tiny random HF models on {DEV}; batch 2 x full context)")
    for family in FAMILIES + MODERN:
        with tempfile.TemporaryDirectory() as d:
            hf = save_tiny_hf(family, Path(d)).to(DEV)
            ours = pretrained.load(d, dtype=torch.float32, device=DEV).eval()
        T = ours.cfg.block_size
        idx = torch.randint(3, ours.cfg.vocab_size, (2, T), device=DEV)
        with torch.no_grad():
            ref = hf(idx).logits.float()
            fp32 = (ours(idx) - ref).abs().max().item()
            with torch.autocast(DEV, torch.bfloat16):
                ours_bf16 = (ours(idx).float() - ref).abs().max().item()
                hf_bf16 = (hf(idx).logits.float() - ref).abs().max().item()
        prompt = torch.randint(3, ours.cfg.vocab_size, (2, 16), device=DEV)
        mask = torch.ones_like(prompt)
        prompt[0, :5], mask[0, :5] = 0, 0  # row 0 left-padded
        hf_out = hf.generate(prompt, attention_mask=mask, max_new_tokens=32, do_sample=False)
        ours_out = generate(ours, prompt, GenerationConfig(32, eos_id=hf.config.eos_token_id),
                            attention_mask=mask)
        same = bool(torch.equal(hf_out, ours_out))
        res[family] = {"fp32_max_abs": fp32, "bf16_max_abs": ours_bf16,
                       "hf_bf16_max_abs": hf_bf16, "generate_equal": same}
        print(f"  {family:14s} fp32 {fp32:.2e} (<= 1e-4: {fp32 <= 1e-4})   bf16 {ours_bf16:.2e} "
              f"(HF's own bf16: {hf_bf16:.2e})   greedy 32 tokens, left-padded batch equal: {same}")
    return res


# --------------------------------------------------------------------------- kernels

def bench_kernels(args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model = Transformer(args.cfg).to(DEV)
    x = torch.randint(0, args.cfg.vocab_size, (2, args.cfg.block_size), device=DEV)
    res = {}
    for name, fn in (
        ("train step", lambda: model(x, x).backward()),
        ("prefill", lambda: generate(model.eval(), x[:1, :64], GenerationConfig(2))),
    ):
        with torch.autocast(DEV, torch.bfloat16):
            fn()
            with profile(activities=[ProfilerActivity.CUDA if DEV == "cuda"
                                     else ProfilerActivity.CPU]) as prof:
                fn()
                sync_time()
        names = sorted({e.key for e in prof.key_averages()
                        if any(w in e.key.lower() for w in ("flash", "fmha", "attention",
                                                            "efficient", "softmax"))})
        res[name] = names
        print(f"\nkernels  {name} (bf16): " + ("; ".join(n[:90] for n in names) or "none"))
    return res


# ----------------------------------------------------------------------------- train

def bench_train(args) -> dict:
    c = args.cfg
    B, T = args.batch, c.block_size
    torch.manual_seed(0)
    builders = {"codelm": lambda: Transformer(c), "nanoGPT-style": lambda: NanoLlama(c),
                "HF Llama": lambda: _hf_llama(c)}
    builders = {name: build for name, build in builders.items() if name in args.train_models.split(",")}
    x = torch.randint(0, c.vocab_size, (B, T), device=DEV)
    y = torch.randint(0, c.vocab_size, (B, T), device=DEV)
    losses = {
        "codelm": lambda m: m(x, y),
        "nanoGPT-style": lambda m: F.cross_entropy(m(x).flatten(0, 1).float(), y.flatten()),
        "HF Llama": lambda m: F.cross_entropy(m(x).logits.flatten(0, 1).float(), y.flatten()),
    }
    m_raw: dict = {}
    res: dict = {}
    peak = peak_tflops(args.device_name, args.peak_tflops)
    print(f"\ntrain  bf16 autocast, fused AdamW, batch {B}x{T}, {args.steps} timed steps "
          f"(median of {args.rounds} rounds); MFU against {peak} TFLOP/s")
    for compiled in (False, True):
        if ("compiled" if compiled else "eager") in args.train_modes.split(","):
            n_params = _time_training(compiled, builders, losses, m_raw, res, args, peak)
    res["n_params"] = n_params
    print(f"  ({n_params / 1e6:.1f}M parameters)")
    return res


def _time_training(compiled: bool, builders: dict, losses: dict, m_raw: dict, res: dict, args,
                   peak: float | None) -> int:
    """Build, warm up and time each model (eager or compiled); results into ``res``."""
    c = args.cfg
    B, T = args.batch, c.block_size
    models, opts, n_params = {}, {}, None
    for name, build in builders.items():
        torch.manual_seed(0)
        m_raw[name] = build().to(DEV).train()
        n = sum(p.numel() for p in m_raw[name].parameters())
        n_params = n_params or n
        assert n == n_params, name
        models[name] = torch.compile(m_raw[name]) if compiled else m_raw[name]
        opts[name] = torch.optim.AdamW(m_raw[name].parameters(), lr=1e-4, fused=True)

    mem = {}
    for name in models:  # warm-up (and compilation)
        reset_peak()
        first = 3 * timed_steps(models[name], opts[name], losses[name], 3)
        mem[name] = peak_gib()
        if compiled:
            print(f"  (compile + 3 warm-up steps of {name}: {first:.0f} s)")
    times = {n: [] for n in models}
    names = list(models)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed_steps(models[name], opts[name], losses[name],
                                           args.steps))
    flops_per_token = 6 * n_params + 12 * c.n_layer * c.n_head * c.head_dim * T
    tag = " compiled" if compiled else ""
    for name, ts in times.items():
        s = statistics.median(ts)
        tps = B * T / s
        mfu = flops_per_token * tps / (peak * 1e12) if peak else float("nan")
        res[name + tag] = {"step_s": s, "tokens_s": tps, "mfu": mfu, "peak_gib": mem[name]}
        print(f"  {name + tag:24s} {tps:9.0f} tokens/s  MFU {100 * mfu:5.1f}%  step "
              f"{s * 1e3:6.1f} ms  peak memory {mem[name]:5.1f} GiB")
    for ref in ("nanoGPT-style", "HF Llama"):
        if "codelm" not in models or ref not in models:
            continue
        print(f"  codelm{tag} / {ref}{tag}: "
              f"{res['codelm' + tag]['tokens_s'] / res[ref + tag]['tokens_s']:.3f}")
    m_raw.clear()
    return n_params


# -------------------------------------------------------------------------- generate

def bench_generate(args) -> dict:
    return {label: _time_generation(label, c, args)
            for label, c in (("llama-14m", args.small_cfg), ("124M", args.cfg))}


def _time_generation(label: str, c, args) -> dict:
    torch.manual_seed(0)
    hf = _hf_llama(c).to(DEV).eval().to(torch.bfloat16)
    ours = Transformer(c).to(DEV).eval().to(torch.bfloat16)
    copy_hf_llama_weights(ours, hf)
    prompt = torch.randint(3, c.vocab_size, (1, 64), device=DEV)
    new = args.new_tokens

    def hf_gen(**kw):
        return lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)

    runners = {"HF generate (eager)": hf_gen(),
               "HF generate (static cache)": hf_gen(cache_implementation="static"),
               "codelm eager": lambda: generate(ours, prompt, GenerationConfig(new)),
               "codelm compiled step": lambda: generate(ours, prompt,
                                                        GenerationConfig(new, compile=True))}
    outs, times = {}, {n: [] for n in runners}
    for name, fn in runners.items():  # warm-up (and compilation)
        try:
            outs[name] = fn()
            fn()
        except Exception as e:  # noqa: BLE001 (a reference that fails is reported, not fatal)
            print(f"  {name}: failed: {type(e).__name__}: {str(e)[:300]}")
            times.pop(name)
    ref = outs["HF generate (eager)"]
    for _ in range(args.gen_repeats):
        for name in times:
            t0 = sync_time()
            runners[name]()
            times[name].append(sync_time() - t0)
    base = new / min(times["HF generate (eager)"])
    print(f"\ngenerate  {label}, bf16, greedy, batch 1, prompt 64, {new} new tokens "
          f"(best of {args.gen_repeats})")
    res = {}
    for name, ts in times.items():
        tps = new / min(ts)
        # bf16 rounding can flip a near-tie: report the first differing position.
        diff = (outs[name] != ref)[0].nonzero()
        first = int(diff[0]) - prompt.shape[1] if len(diff) else None
        res[name] = {"tokens_s": tps, "first_diff": first}
        print(f"  {name:28s} {tps:8.1f} tokens/s  {tps / base:5.2f}x HF eager  "
              f"tokens as HF eager: {'same' if first is None else f'differ from {first}'}")
    return res


# ------------------------------------------------------------------------------ load

def bench_load(args) -> dict:
    import subprocess

    from bench_model import make_checkpoint

    if DEV != "cuda":
        print("\nload  (left out of a dry run: it loads a 2.5 GB checkpoint to the GPU)")
        return {}
    path = Path(args.ckpt_dir)
    make_checkpoint(path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30
    code = """
import sys, time, json, torch
lib, path = sys.argv[1], sys.argv[2]
sys.path.insert(0, sys.argv[3])
t0 = time.perf_counter()
if lib == "codelm":
    from codelm.models import pretrained
    m = pretrained.load(path, dtype=torch.bfloat16, device="cuda")
else:
    import transformers
    transformers.logging.set_verbosity_error()
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                          device_map="cuda")
torch.cuda.synchronize()
t = time.perf_counter() - t0
with torch.no_grad():
    m(torch.ones(1, 4, dtype=torch.long, device="cuda"))
print(json.dumps({"load_s": t, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))
"""
    res = {"file_gib": size}
    print(f"\nload  Llama-3.2-1B-shaped bf16, {size:.2f} GiB, to cuda (best of "
          f"{args.load_repeats} fresh processes; time includes imports)")
    for lib in ("codelm", "transformers"):
        runs = [json.loads(subprocess.run(
            [sys.executable, "-c", code, lib, str(path), str(ROOT)], capture_output=True,
            text=True, check=True).stdout.strip().splitlines()[-1])
            for _ in range(args.load_repeats)]
        res[lib] = {"load_s": min(r["load_s"] for r in runs),
                    "peak_gib": max(r["peak_gib"] for r in runs)}
        print(f"  {lib:13s} {res[lib]['load_s']:6.2f} s   peak GPU memory "
              f"{res[lib]['peak_gib']:.2f} GiB ({res[lib]['peak_gib'] / size:.3f}x file)")
    print(f"  codelm / transformers load time: "
          f"{res['codelm']['load_s'] / res['transformers']['load_s']:.2f}")
    return res


# ---------------------------------------------------------------------------- checks

def bench_ablate(args) -> dict:
    """Which of codelm's CPU-tuned pieces cost time on the GPU: the eager bf16 step with each
    swapped for the plain alternative, in one run (the eager step varies ~15% between runs)."""
    c = args.cfg
    x = torch.randint(0, c.vocab_size, (args.batch, c.block_size), device=DEV)
    fused = lambda m: m(x, x)  # noqa: E731
    unfused = lambda m: F.cross_entropy(m(x).flatten(0, 1).float(), x.flatten())  # noqa: E731
    hand_written = lambda self, h: kernels._RMSNormFunction.apply(  # noqa: E731
        h, self.weight, self.eps)
    variants = {  # name: (build, loss, {(owner, attribute): replacement})
        "nanoGPT-style": (lambda: NanoLlama(c), unfused, {}),
        "codelm": (lambda: Transformer(c), fused, {}),
        "codelm, unfused head": (lambda: Transformer(c), unfused, {}),
        "codelm, head in one chunk": (lambda: Transformer(c), fused,
                                      {(kernels, "_loss_chunk_rows"): lambda v, d: 1 << 30}),
        "codelm, hand-written RMSNorm backward": (
            lambda: Transformer(c), fused, {(architecture.RMSNorm, "forward"): hand_written}),
    }
    res = {}
    print(f"\nablate  eager bf16 step, batch {args.batch}x{c.block_size} (median of "
          f"{args.rounds} rounds of {args.steps})")
    for name, (build, loss_fn, patches) in variants.items():
        saved = {key: getattr(*key) for key in patches}
        for (owner, attr), value in patches.items():
            setattr(owner, attr, value)
        try:
            torch.manual_seed(0)
            m = build().to(DEV).train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
            # round 0 warms up
            times = [timed_steps(m, opt, loss_fn, args.steps) for _ in range(args.rounds + 1)][1:]
        finally:
            for (owner, attr), value in saved.items():
                setattr(owner, attr, value)
        res[name] = statistics.median(times)
        print(f"  {name:40s} {res[name] * 1e3:7.1f} ms")
    return res


def bench_checks(args) -> dict:
    res = {}
    c = args.cfg
    B, T = 8, c.block_size
    x = torch.randint(0, c.vocab_size, (B, T), device=DEV)
    torch.manual_seed(0)
    model = Transformer(c).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    loss_fn = lambda m: m(x, x)  # noqa: E731

    print("\nchecks")
    for tf32 in (False, True):  # G-06
        torch.backends.cuda.matmul.allow_tf32 = tf32
        timed_steps(model, opt, loss_fn, 1, bf16=False)  # warm-up
        res[f"fp32_step_s_tf32_{tf32}"] = timed_steps(model, opt, loss_fn, args.steps, bf16=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"  G-06 fp32 step, batch {B}x{T}: TF32 off {res['fp32_step_s_tf32_False'] * 1e3:.0f} "
          f"ms, on {res['fp32_step_s_tf32_True'] * 1e3:.0f} ms")

    res.update(_head_grad_error(args))

    return res


def _head_grad_error(args) -> dict:
    """G-08: the fused head's bf16 weight gradient, accumulated over its chunks, against the fp32
    gradient; the unfused head's (one bf16 product) beside it. Llama-3's vocabulary."""
    V, C, N = args.head_shape
    g = torch.Generator(device=DEV).manual_seed(0)
    hidden = torch.randn(N, C, device=DEV, generator=g)
    labels = torch.randint(0, V, (N,), device=DEV, generator=g)
    head = torch.nn.Linear(C, V, bias=False).to(DEV)
    torch.nn.init.normal_(head.weight, std=0.02, generator=g)

    def head_grad(fused: bool, bf16: bool) -> torch.Tensor:
        head.weight.grad = None
        with torch.autocast(DEV, torch.bfloat16, enabled=bf16):
            if fused:
                loss = kernels.head_cross_entropy(hidden, head, labels)[0]
            else:
                loss = F.cross_entropy(head(hidden).float(), labels, reduction="sum")
        (loss / N).backward()
        return head.weight.grad.float()

    truth = head_grad(fused=False, bf16=False)
    res = {f"head_grad_rel_err_{'fused' if fused else 'unfused'}":
           ((head_grad(fused, True) - truth).norm() / truth.norm()).item()
           for fused in (True, False)}
    print(f"  G-08 LM-head weight gradient in bf16 ({N} tokens, vocab {V}), relative error vs "
          f"fp32: fused (chunked) {res['head_grad_rel_err_fused']:.2e}, unfused "
          f"{res['head_grad_rel_err_unfused']:.2e}")
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="all",
                        help=f"comma-separated sections: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--batch", type=int, default=16, help="train: sequences per step "
                        "(default: 16)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round "
                        "(default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="train: rounds, each timing every "
                        "model in rotating order; median reported (default: 3)")
    parser.add_argument("--gen-repeats", type=int, default=3,
                        help="generate: timed runs per runner, best reported (default: 3)")
    parser.add_argument("--load-repeats", type=int, default=2,
                        help="load: fresh-process loads per library (default: 2)")
    parser.add_argument("--ckpt-dir", default="/tmp/codelm_bench/llama-3.2-1b-bf16",
                        help="load: where the random checkpoint is written once and reused "
                        "(default: %(default)s)")
    parser.add_argument("--train-models", default="codelm,nanoGPT-style,HF Llama",
                        help="train: comma-separated models (default: %(default)s)")
    parser.add_argument("--train-modes", default="eager,compiled",
                        help="train: eager, compiled or both (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every section on the CPU at toy sizes (checks the script)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: from the device name: "
                             + ", ".join(f"{k} {v}" for k, v in PEAK_BF16_TFLOPS.items()) + ")")
    args = parser.parse_args(argv)
    only = sections.chosen(parser, args.only, SECTIONS)
    global DEV
    if args.dry_run:
        DEV, args.device_name = "cpu", "cpu (dry run)"
        args.cfg, args.small_cfg, args.batch, args.new_tokens = DRY_CFG, DRY_CFG, 2, 8
        args.head_shape, args.steps, args.rounds, args.gen_repeats = (1024, 64, 256), 1, 1, 1
    elif not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run "
              "checks the script on the CPU, and the CPU figures are bench_model.py's and "
              "bench_train.py's", file=sys.stderr)
        return 2
    else:
        args.device_name = torch.cuda.get_device_name()
        args.cfg, args.small_cfg, args.new_tokens = GPU_CFG, PRESETS["llama-14m"], 128
        args.head_shape = (128256, 2048, 8192)
    print(f"torch {torch.__version__}, {args.device_name}")
    runners = {"parity": bench_parity, "kernels": bench_kernels, "train": bench_train,
               "ablate": bench_ablate,
               "generate": bench_generate, "load": bench_load, "checks": bench_checks}
    return sections.run(runners, only, args, default=float)


if __name__ == "__main__":
    sys.exit(main())
