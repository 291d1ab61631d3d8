"""Drafted greedy decoding against plain greedy decoding, same model, one run.

  prompt lookup   the refactor task's validation pairs (standard-library functions -> the same
                  code without comments and docstrings) continued by a model trained on the
                  task's other pairs: tokens/s of generate(prompt_lookup=K) vs generate(),
                  tokens checked equal. The output copies its input, which is where prompt
                  lookup pays; every drafted token kept is one the model's own greedy choice
                  agrees with.

Without --run, a small model is trained first under --work, on one core about 50 minutes:
python trainingmanager.py --task refactor --preset code-3x128 (1.2M parameters) --block-size
512 --packing --batch-size 4 --lr 4e-3 --max-steps 3000 on
codelm.recipes.refactor_pairs(every_function=True): every stdlib function of 120-800
characters, tests included, with its docstrings and comments -> without them (33,600 pairs, 60%
of them nothing to strip: pure copies, which teach the model to copy its input). The decoded
pairs, the last --pairs of refactor_pairs(methods=True), are its validation split and are
never trained on. The two sides alternate, prompt by prompt, --repeats times; the min and
median of each side's total are reported.

Example: python bench/bench_drafts.py --threads 1. Figures go to docs/benchmarks.md (### Prompt lookup).
"""

from __future__ import annotations

import json
import os
import statistics
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
    preset: str = "code-3x128"  # the model trained here
    steps: int = 3000  # training steps of the run trained here
    batch: int = 4  # its batch size (rows of 512 tokens, pairs packed)
    lr: float = 4e-3  # its peak learning rate
    pairs: int = 24  # validation pairs decoded (the last ones, never trained on)
    new_tokens: int = 160  # most new tokens per pair
    lookup: int = 10  # prompt lookup's draft tokens a step
    repeats: int = 3  # timed passes over the pairs, each side alternating prompt by prompt


def trained_run(cfg: BenchConfig) -> Path:
    """The run to decode with: --run, else one trained here on refactor pairs (kept under
    --work and reused by later runs of the same settings)."""
    if cfg.run:
        return Path(cfg.run)
    name = f"refactor-copy-{cfg.preset}-{cfg.steps}x{cfg.batch}-lr{cfg.lr:g}"
    run = work_dir(cfg) / name
    if (run / "best").is_dir():
        return run
    data = work_dir(cfg) / "data"
    data.mkdir(parents=True, exist_ok=True)
    held_out = held_out_pairs(cfg)
    seen = {p["input"] for p in held_out} | {p["output"] for p in held_out}
    pairs = [p for p in refactor_pairs(10**6, every_function=True)
             if p["input"] not in seen and p["output"] not in seen]
    splits = {"train": pairs[: -cfg.pairs], "test": pairs[-cfg.pairs:]}
    for split, records in splits.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in records))
    command = [sys.executable, "trainingmanager.py", "--task", "refactor",
               "--data", str(data / "train.jsonl"), "--val-data", str(data / "val.jsonl"),
               "--test-data", str(data / "test.jsonl"), "--preset", cfg.preset,
               "--block-size", "512", "--packing", "--max-steps", str(cfg.steps),
               "--batch-size", str(cfg.batch), "--lr", str(cfg.lr), "--eval-every", "250",
               "--out-dir", str(work_dir(cfg)), "--name", name, "--no-progress"]
    print("training:", " ".join(command), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return run


def work_dir(cfg: BenchConfig) -> Path:
    """The pairs and the run of these settings (the pairs: the last --pairs held out)."""
    return Path(cfg.work) / f"held-out-{cfg.pairs}"


def held_out_pairs(cfg: BenchConfig) -> list[dict]:
    """The decoded pairs: the last --pairs of refactor_pairs(methods=True), kept in --work's
    data/val.jsonl (the trained run's validation split)."""
    file = work_dir(cfg) / "data" / "val.jsonl"
    if not file.is_file():
        file.parent.mkdir(parents=True, exist_ok=True)
        pairs = refactor_pairs(10**6, methods=True)[-cfg.pairs:]
        file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return [json.loads(line) for line in file.read_text().splitlines()]


def validation_prompts(lm, cfg: BenchConfig) -> list[list[int]]:
    """The refactor prompts of the held-out pairs (never trained on)."""
    head, tail = REFACTOR_TEMPLATE.split("{input}")
    start = prompt_prefix(lm.tokenizer, "refactor")
    return [start + lm.tokenizer.encode(head + p["input"] + tail) for p in held_out_pairs(cfg)]


def main(argv: list[str] | None = None) -> None:
    cfg = settings.parse_config_flags(BenchConfig, argv, __doc__)
    torch.set_num_threads(cfg.threads)
    lm = loading.load_model(str(trained_run(cfg)), "cpu", what="--run")
    model = lm.model.eval()
    eos = lm.tokenizer.eos_id
    cases = [(ids, pair) for ids, pair in zip(validation_prompts(lm, cfg), held_out_pairs(cfg),
                                              strict=True)
             if len(ids) + cfg.new_tokens <= model.cfg.block_size]
    prompts = [ids for ids, _ in cases]
    names = ("greedy", f"prompt lookup {cfg.lookup}")
    configs = {names[0]: GenerationConfig(cfg.new_tokens, eos_id=eos),
               names[1]: GenerationConfig(cfg.new_tokens, eos_id=eos, prompt_lookup=cfg.lookup)}
    totals: dict[str, list[float]] = {name: [] for name in names}
    tokens, same = 0, 0
    for r in range(cfg.repeats):
        seconds = dict.fromkeys(names, 0.0)
        for i, ids in enumerate(prompts):
            idx = torch.tensor([ids])
            outs = {}
            for name in (names if (r + i) % 2 == 0 else names[::-1]):
                start = time.perf_counter()
                outs[name] = generate(model, idx, configs[name])
                seconds[name] += time.perf_counter() - start
            if r == 0:
                tokens += outs[names[0]].shape[1] - idx.shape[1]
                same += torch.equal(outs[names[0]], outs[names[1]])
        for name in names:
            totals[name].append(seconds[name])
    print(f"\nprompt lookup  {len(prompts)} refactor validation pairs, <= {cfg.new_tokens} new "
          f"tokens ({tokens} in all), {torch.get_num_threads()} threads; outputs equal: "
          f"{same}/{len(prompts)}; {cfg.repeats} passes: tokens/s of the min / median pass")
    base = totals[names[0]]
    for name, runs in totals.items():
        best, median = min(runs), statistics.median(runs)
        print(f"  {name:18s} {tokens / best:8.1f} / {tokens / median:8.1f} tokens/s  "
              f"{min(base) / best:5.2f}x / {statistics.median(base) / median:5.2f}x greedy")

    copying(lm, cases, configs[names[1]])


def copying(lm, cases: list[tuple[list[int], dict]], config: GenerationConfig) -> None:
    """Whether the model copies: its outputs equal to the pair's output (the input without its
    docstrings and comments), and the forwards prompt lookup spent (one a check, after the
    prompt's), counted in an untimed pass."""
    model = lm.model
    forwards = 0
    original = model.run_blocks

    def counted(*args, **kwargs):
        nonlocal forwards
        forwards += 1
        return original(*args, **kwargs)

    exact, tokens = 0, 0
    model.run_blocks = counted
    try:
        for ids, pair in cases:
            new = generate(model, torch.tensor([ids]), config)[0, len(ids):].tolist()
            forwards -= 1  # the prompt's
            tokens += len(new)
            text = lm.tokenizer.decode([t for t in new if t not in config.eos_id])
            exact += text.strip() == pair["output"].strip()
    finally:
        del model.run_blocks
    kept = tokens - len(cases) - forwards  # a check gives the model's own token + those kept
    print(f"  copying: {exact}/{len(cases)} outputs are the pair's output exactly; prompt "
          f"lookup: {forwards} checks for {tokens} tokens ({tokens / max(forwards, 1):.2f} "
          f"tokens a check), {kept} drafted tokens kept ({kept / max(tokens, 1):.0%})")

if __name__ == "__main__":
    main()
