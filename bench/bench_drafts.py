"""Drafted greedy decoding against plain greedy decoding, same model, one run.

  prompt lookup   the refactor task's validation pairs (standard-library functions -> the same
                  code without comments and docstrings) continued by a model trained on such
                  pairs: tokens/s of generate(prompt_lookup=K) vs generate(), tokens checked
                  equal. The output copies its input, which is where prompt lookup pays.

Without --run, a small model is trained first (python trainingmanager.py --task refactor on
standard-library pairs of codelm.recipes.refactor_pairs; a few minutes on two cores) under
--work.

Example: python bench/bench_drafts.py --threads 2. Figures go to docs/benchmarks.md (## Engine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from codelm import loading  # noqa: E402
from codelm.data.config import REFACTOR_TEMPLATE  # noqa: E402
from codelm.data.encoding import prompt_prefix  # noqa: E402
from codelm.models.generation import GenerationConfig, generate  # noqa: E402
from codelm.recipes import refactor_pairs  # noqa: E402
from codelm.runtime import settings  # noqa: E402


@dataclass
class BenchConfig:
    threads: int = 2  # torch threads
    run: str = ""  # a run trained on refactor pairs (empty: train one under --work)
    work: str = "/tmp/codelm_bench/drafts"  # where the pairs and the trained run go
    steps: int = 400  # training steps of the run trained here
    train_pairs: int = 1500  # refactor pairs it trains on (the decoded ones held out)
    pairs: int = 24  # validation pairs decoded
    new_tokens: int = 160  # most new tokens per pair
    lookup: int = 10  # prompt lookup's draft tokens a step




def trained_run(cfg: BenchConfig) -> Path:
    """The run to decode with: --run, else one trained here on refactor pairs."""
    if cfg.run:
        return Path(cfg.run)
    work = Path(cfg.work)
    run = work / "runs" / "refactor-bench"
    if (run / "best").is_dir() or (run / "config.json").is_file():
        return run
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    pairs = refactor_pairs(cfg.train_pairs + cfg.pairs)
    (data / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[: -cfg.pairs]))
    (data / "val.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[-cfg.pairs:]))
    sources = [str(data / "pairs.jsonl")]
    command = [sys.executable, "trainingmanager.py", "--task", "refactor", "--data", *sources,
               "--preset", "code-4x160", "--block-size", "512", "--max-steps", str(cfg.steps),
               "--batch-size", "8", "--lr", "3e-3", "--out-dir", str(work / "runs"),
               "--name", "refactor-bench", "--no-progress"]
    print("training:", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    return run


def validation_prompts(lm, cfg: BenchConfig) -> list[list[int]]:
    """The refactor prompts of the held-out pairs (never trained on)."""
    pairs = [json.loads(line) for line in
             (Path(cfg.work) / "data" / "val.jsonl").read_text().splitlines()]
    head, tail = REFACTOR_TEMPLATE.split("{input}")
    start = prompt_prefix(lm.tokenizer, "refactor")
    return [start + lm.tokenizer.encode(head + p["input"] + tail) for p in pairs[-cfg.pairs:]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    settings.add_config_flags(parser, BenchConfig)
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    torch.set_num_threads(cfg.threads)
    lm = loading.load_model(str(trained_run(cfg)), "cpu")
    model = lm.model.eval()
    eos = lm.tokenizer.eos_id
    prompts = [p for p in validation_prompts(lm, cfg)
               if len(p) + cfg.new_tokens <= model.cfg.block_size]
    timings = {"greedy": 0.0, f"prompt lookup {cfg.lookup}": 0.0}
    tokens, same = 0, 0
    for ids in prompts:
        idx = torch.tensor([ids])
        outs = []
        for name, extra in (("greedy", {}), (f"prompt lookup {cfg.lookup}",
                                             {"prompt_lookup": cfg.lookup})):
            start = time.perf_counter()
            outs.append(generate(model, idx, GenerationConfig(cfg.new_tokens, eos_id=eos,
                                                              **extra)))
            timings[name] += time.perf_counter() - start
        tokens += outs[0].shape[1] - idx.shape[1]
        same += torch.equal(outs[0], outs[1])
    print(f"\nprompt lookup  {len(prompts)} refactor validation pairs, <= {cfg.new_tokens} new "
          f"tokens, {torch.get_num_threads()} threads; outputs equal: {same}/{len(prompts)}")
    base = timings["greedy"]
    for name, seconds in timings.items():
        print(f"  {name:18s} {tokens / seconds:8.1f} tokens/s  {base / seconds:5.2f}x greedy")


if __name__ == "__main__":
    main()
