"""Model benchmarks, each a ratio against its reference measured in the same run.

  load      Llama-3.2-1B-shaped bf16 checkpoint (random weights): wall time of the load call and
            peak RSS after one forward pass (every weight touched), codelm vs transformers, each
            in a fresh process running bench/load_child.py.
  train     forward + backward + AdamW step, fp32, CPU, batch 8x256, 14M Llama-shaped config:
            tokens/s of codelm vs a nanoGPT-style reference written here vs LlamaForCausalLM.
  generate  greedy, batch 1, 64-token prompt, 128 new tokens, same config: tokens/s of codelm
            (eager and compiled decode step) vs transformers' generate.

Example: python bench/bench_model.py --threads 2 (all three), or --only train.
Figures go to docs/benchmarks.md (## Training step, ## Generation, ## Loading).
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from architecture import PRESETS, Transformer  # noqa: E402
from codelm.models.generation import GenerationConfig, generate  # noqa: E402


@dataclass
class BenchConfig:
    only: str = "all"
    threads: int = 2
    ckpt_dir: str = "/tmp/codelm_bench/llama-3.2-1b-bf16"
    load_repeats: int = 2
    train_rounds: int = 5
    train_steps: int = 3
    gen_repeats: int = 3
    compile: bool = True
    clock: str = "wall"
    checkpointing: bool = False


HELP = {
    "only": "load | train | generate | all",
    "threads": "torch threads (the issue's figures: 2)",
    "ckpt_dir": "where the random Llama-3.2-1B-shaped checkpoint is written once and reused",
    "load_repeats": "fresh-process loads per library (min time, max RSS reported)",
    "train_rounds": "rounds; each times every model, in rotating order (median reported)",
    "train_steps": "timed steps per model per round",
    "gen_repeats": "timed generations per runner (best reported)",
    "compile": "also time codelm's torch.compile'd decode step",
    "clock": "wall, or cpu (process CPU time: with --threads 1 robust to other processes "
             "time-sharing the cores, which wall time is not)",
    "checkpointing": "train: also time codelm with gradient checkpointing (its cost in speed)",
}


BENCH_CFG = dataclasses.replace(PRESETS["llama-14m"], block_size=256)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# ------------------------------------------------------------------------------- load

def make_checkpoint(path: Path) -> None:
    """A Llama-3.2-1B-shaped checkpoint of random bf16 weights, written by codelm in HF layout."""
    from codelm.models import pretrained

    if (path / "config.json").exists():
        return
    print(f"writing random Llama-3.2-1B-shaped bf16 checkpoint to {path} ...", flush=True)
    torch.set_default_dtype(torch.bfloat16)
    model = Transformer(PRESETS["llama-3.2-1b"])
    torch.set_default_dtype(torch.float32)
    pretrained.save(model, path)


def bench_load(cfg: BenchConfig) -> dict:
    path = Path(cfg.ckpt_dir)
    make_checkpoint(path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    with open(path / "model.safetensors", "rb") as f:  # same warm page cache for both
        while f.read(1 << 26):
            pass
    # Bytecode for codelm's modules, as transformers' installed modules have: compiling source
    # at import leaves ~2 MiB of the compiler's memory in the peak, which a user's script pays
    # on its first run only (every run under PYTHONDONTWRITEBYTECODE, as on this machine).
    compileall.compile_dir(ROOT, maxlevels=0, quiet=1)
    runs: dict[str, list[dict]] = {"codelm": [], "transformers": []}
    for _ in range(cfg.load_repeats):
        for lib in runs:
            out = subprocess.run(
                [sys.executable, str(Path(__file__).with_name("load_child.py")), lib,
                 str(path), str(cfg.threads)],
                capture_output=True, text=True, check=True)
            runs[lib].append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = {"file_mib": size}
    for lib, rs in runs.items():
        res[lib] = {"load_s": min(r["load_s"] for r in rs),
                    "peak_mib": max(r["peak_mib"] for r in rs),
                    "base_mib": min(r["base_mib"] for r in rs)}
    c, h = res["codelm"], res["transformers"]
    print(f"\nload  file {size:.0f} MiB")
    for lib in runs:
        r = res[lib]
        print(f"  {lib:13s} load {r['load_s']:6.2f} s   peak RSS {r['peak_mib']:7.0f} MiB "
              f"({r['peak_mib'] / size:.3f}x file; {(r['peak_mib'] - r['base_mib']) / size:.3f}x "
              f"above the {r['base_mib']:.0f} MiB after imports)")
    print(f"  codelm / transformers load time: {c['load_s'] / h['load_s']:.2f}")
    return res


# ------------------------------------------------------------------------------ train

class NanoBlock(nn.Module):
    """nanoGPT's block made Llama-shaped: fused c_attn, RMSNorm, rotary, SwiGLU (w1, w3, w2)."""

    def __init__(self, d: int, n_head: int, hidden: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.RMSNorm(d, eps=1e-5)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.RMSNorm(d, eps=1e-5)
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    @staticmethod
    def rope(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q = self.rope(q.view(B, T, self.n_head, -1).transpose(1, 2), cos, sin)
        k = self.rope(k.view(B, T, self.n_head, -1).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        h = self.ln_2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class NanoLlama(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.blocks = nn.ModuleList(NanoBlock(c.n_embd, c.n_head, c.mlp_hidden)
                                    for _ in range(c.n_layer))
        self.ln_f = nn.RMSNorm(c.n_embd, eps=1e-5)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        hd = c.n_embd // c.n_head
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.outer(torch.arange(c.block_size).float(), inv)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, self.cos[:T], self.sin[:T])
        return self.lm_head(self.ln_f(x))


def _hf_llama(c, **kw):
    import transformers

    transformers.logging.set_verbosity_error()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps, tie_word_embeddings=True, attn_implementation="sdpa",
        bos_token_id=1, eos_token_id=None, pad_token_id=0, **kw)
    return transformers.LlamaForCausalLM(hf_cfg)


def bench_train(cfg: BenchConfig) -> dict:
    c = BENCH_CFG
    torch.manual_seed(0)
    models = {"codelm": Transformer(c), "nanoGPT-style": NanoLlama(c), "HF Llama": _hf_llama(c)}
    if cfg.checkpointing:
        models["codelm ckpt"] = Transformer(c)
        models["codelm ckpt"].gradient_checkpointing = True
    n_params = sum(p.numel() for p in models["codelm"].parameters())
    for name, m in models.items():
        assert sum(p.numel() for p in m.parameters()) == n_params, name
    B, T = 8, 256
    x = torch.randint(0, c.vocab_size, (B, T))
    y = torch.randint(0, c.vocab_size, (B, T))
    # Fused AdamW for all three: what codelm's Trainer and transformers' Trainer both use.
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for n, m in models.items()}
    # Each library's own loss: codelm's model takes its own (the head fused with the loss);
    # nanoGPT and transformers' LlamaForCausalLM take F.cross_entropy of the whole logits.
    losses = {
        "codelm": lambda m: m(x, y),
        "nanoGPT-style": lambda m: F.cross_entropy(m(x).flatten(0, 1), y.flatten()),
        "HF Llama": lambda m: F.cross_entropy(m(x).logits.flatten(0, 1), y.flatten()),
    }
    losses["codelm ckpt"] = losses["codelm"]

    def step(name):
        m, opt = models[name], opts[name]
        loss = losses[name](m)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name in models:  # warm-up
        step(name)
    times: dict[str, list[float]] = {n: [] for n in models}
    clock = CLOCKS[cfg.clock]
    names = list(models)
    for r in range(cfg.train_rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate who goes first: no order bias
            t0 = clock()
            for _ in range(cfg.train_steps):
                step(name)
            times[name].append((clock() - t0) / cfg.train_steps)
    hd = c.n_embd // c.n_head
    flops_per_token = 6 * n_params + 12 * c.n_layer * c.n_head * hd * T  # nanoGPT's estimate
    res = {"n_params": n_params}
    print(f"\ntrain  fp32, {torch.get_num_threads()} threads, batch {B}x{T}, "
          f"{n_params / 1e6:.1f}M params ({cfg.clock} clock, median of {cfg.train_rounds} "
          "rounds)")
    for name, ts in times.items():
        s = statistics.median(ts)
        res[name] = {"step_s": s, "tokens_s": B * T / s,
                     "gflops": flops_per_token * B * T / s / 1e9}
        print(f"  {name:14s} {B * T / s:8.0f} tokens/s  {res[name]['gflops']:6.1f} GFLOP/s  "
              f"(step {s * 1e3:.0f} ms)")
    for ref in ("nanoGPT-style", "HF Llama"):
        print(f"  codelm / {ref}: {res['codelm']['tokens_s'] / res[ref]['tokens_s']:.3f}")
    if cfg.checkpointing:
        print(f"  codelm ckpt step / codelm step: "
              f"{res['codelm ckpt']['step_s'] / res['codelm']['step_s']:.3f}")
    return res


# --------------------------------------------------------------------------- generate

def copy_hf_llama_weights(ours: Transformer, hf: nn.Module) -> None:
    """Give codelm's model the weights of a tied LlamaForCausalLM of the same shape."""
    with torch.no_grad():
        for block, layer in zip(ours.blocks, hf.model.layers):
            a = layer.self_attn
            block.attn.qkv.weight.copy_(torch.cat((a.q_proj.weight, a.k_proj.weight,
                                                   a.v_proj.weight)))
            block.attn.proj.weight.copy_(a.o_proj.weight)
            m = layer.mlp
            block.mlp.gate.weight.copy_(m.gate_proj.weight)
            block.mlp.fc.weight.copy_(m.up_proj.weight)
            block.mlp.proj.weight.copy_(m.down_proj.weight)
        ours.wte.weight.copy_(hf.model.embed_tokens.weight)


def bench_generate(cfg: BenchConfig) -> dict:
    c = BENCH_CFG
    torch.manual_seed(0)
    ours = Transformer(c).eval()
    hf = _hf_llama(c).eval()
    copy_hf_llama_weights(ours, hf)  # same weights, so both produce the same tokens
    prompt = torch.randint(3, c.vocab_size, (1, 64))
    new = 128

    def run_hf():
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False)

    runners = {"HF generate (eager)": run_hf,
               "codelm eager": lambda: generate(ours, prompt, GenerationConfig(new))}
    if cfg.compile:
        runners["codelm compiled step"] = lambda: generate(ours, prompt,
                                                           GenerationConfig(new, compile=True))
    outs = {name: fn() for name, fn in runners.items()}  # warm-up (and compilation)
    ref = outs["HF generate (eager)"]
    times: dict[str, list[float]] = {n: [] for n in runners}
    clock = CLOCKS[cfg.clock]
    names = list(runners)
    for r in range(cfg.gen_repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = runners[name]
            t0 = clock()
            out = fn()
            times[name].append(clock() - t0)
            assert out.shape == ref.shape
    res = {"same_tokens": {n: bool(torch.equal(o, ref)) for n, o in outs.items()}}
    print(f"\ngenerate  greedy, batch 1, prompt 64, {new} new tokens, {torch.get_num_threads()} "
          f"threads ({cfg.clock} clock, best of {cfg.gen_repeats})")
    base = new / min(times["HF generate (eager)"])
    for name, ts in times.items():
        tps = new / min(ts)
        res[name] = {"tokens_s": tps}
        print(f"  {name:22s} {tps:7.1f} tokens/s  {tps / base:5.2f}x HF  "
              f"same tokens as HF: {res['same_tokens'][name]}")
    return res


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(BenchConfig):
        if f.type == "bool":
            parser.add_argument(f"--{f.name.replace('_', '-')}",
                                help=f"{HELP[f.name]} (default: {'on' if f.default else 'off'})",
                                action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "str": str}[f.type]
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default,
                                help=f"{HELP[f.name]} (default: {f.default})")
    args = parser.parse_args(argv)
    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
    if cfg.only not in ("all", "load", "train", "generate"):
        parser.error(f"--only: expected all, load, train or generate, got {cfg.only!r}")
    if cfg.clock not in CLOCKS:
        parser.error(f"--clock: expected wall or cpu, got {cfg.clock!r}")
    torch.set_num_threads(cfg.threads)
    print(f"torch {torch.__version__}, {cfg.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results = {}
    for name, fn in (("train", bench_train), ("generate", bench_generate),
                     ("load", bench_load)):
        if cfg.only in ("all", name):
            results[name] = fn(cfg)
    print("\n" + json.dumps(results, default=float))


if __name__ == "__main__":
    main()

