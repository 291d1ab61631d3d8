"""A GRPO step on a GPU: codelm's `--task grpo` against TRL 1.16's GRPOTrainer, same work.

    python bench/bench_grpo_trl.py [--steps 3] [--tokenizer DIR] [--compile] [--dry-run]

The model is Qwen2.5-Coder-0.5B's shape (24 layers, width 896, 14 query and 2 key-value heads,
SwiGLU 4864, vocabulary 151,936, tied embeddings) with random bf16 weights, saved once as an HF
checkpoint; its tokenizer a byte-level BPE of the same vocabulary trained on the standard
library (--tokenizer: one saved before, since training it takes minutes). Both libraries:
LoRA r16 (alpha 32) on q/k/v/o, `--problems-per-step` generated problems a step
(codelm.data.problems, --describe) with G = `--generations` completions each, up to
`--completion-tokens` new tokens at temperature 1.0 (a random model never ends a completion
early: every completion runs to the limit on both sides), the dapo loss without a KL term, one
update per batch of samples, AdamW, bf16, activations recomputed in the backward (gradient
checkpointing: TRL's GRPOConfig default, so codelm's run is given it too). The reward is the same function for both: codelm's
sandboxed test (`rewards.rewards` through eval's `run_check`, `--workers` at once); codelm's
step also runs the failed programs again to count hacks (its hack rate), which TRL has no
counterpart of.

Figures: seconds a step (the median of `--steps` steps after one warm-up step; codelm's split
into sampling, verdicts and update from its metrics.jsonl) and the peak GPU memory of the run
(torch.cuda.max_memory_allocated). --dry-run: a tiny Qwen2 on the CPU, which checks that the
script runs and times nothing worth reading.

Needs trl==1.16.0 and datasets. Its figure, measured on a GPU, goes to docs/benchmarks.md (## GRPO step memory).
"""

from __future__ import annotations

import json
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from codelm.data.problems import generate_problems  # noqa: E402
from codelm.runtime import settings  # noqa: E402

EOS = "<|endoftext|>"
FORMS = ("sign_code", "in_range", "clamp", "replace_multiples")
QWEN_CODER_05B = dict(  # Qwen2.5-Coder-0.5B's config.json, less its weights
    vocab_size=151936, max_position_embeddings=32768, hidden_size=896, intermediate_size=4864,
    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class BenchConfig:
    steps: int = 3  # timed steps per library, after one warm-up step
    problems_per_step: int = 8  # prompts a step
    generations: int = 8  # completions a prompt (G)
    completion_tokens: int = 256  # most new tokens a completion
    workers: int = 8  # sandbox runs at once (the reward)
    tokenizer: str = ""  # a saved tokenizer directory of the model's vocabulary (else trained)
    out: str = "/tmp/codelm_bench/grpo_trl"  # checkpoint, problems and run directories
    compile: bool = False  # codelm's run with --compile (on a GPU, sampling through a CUDA graph;
    #   the update compiles again at the first new completion length: give --steps 4 or more)
    dry_run: bool = False  # a tiny model on the CPU: the script runs, the times mean nothing


def train_tokenizer(vocab: int, out: Path, files: int | None = None) -> None:
    """A byte-level BPE of ``vocab`` ids (EOS included) trained on the standard library's
    sources (the first ``files`` of them; None: all), saved with its EOS as an HF tokenizer in
    ``out``."""
    from tiny_hf import trained_bpe
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(stdlib.rglob("*.py"))[:files]
    texts = [path.read_text(errors="replace") for path in paths]
    tok = trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), texts,
                      specials=(EOS,), vocab_size=vocab)
    if tok.get_vocab_size() != vocab:
        raise SystemExit(f"the standard library gave {tok.get_vocab_size()} of {vocab} ids")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS).save_pretrained(out)


def make_checkpoint(cfg: BenchConfig, out: Path, device: str) -> None:
    """Qwen2.5-Coder-0.5B's shape (TINY under --dry-run), random weights, and its tokenizer."""
    import transformers
    from tiny_hf import tiny_hf_config

    shape = TINY if cfg.dry_run else QWEN_CODER_05B
    if cfg.tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.tokenizer)
        tokenizer.save_pretrained(out)
    else:
        train_tokenizer(shape["vocab_size"], out, files=100 if cfg.dry_run else None)
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    if len(tokenizer) != shape["vocab_size"]:
        raise SystemExit(f"--tokenizer {cfg.tokenizer}: {len(tokenizer)} ids, the model has "
                         f"{shape['vocab_size']}")
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = tiny_hf_config("qwen2", **shape, bos_token_id=eos, eos_token_id=eos,
                            pad_token_id=eos)
    torch.manual_seed(0)
    dtype = torch.float32 if cfg.dry_run else torch.bfloat16
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)


def write_problems(cfg: BenchConfig, path: Path) -> list[dict]:
    """Enough problems for every step of both runs (the warm-up included), as JSONL."""
    n = (cfg.steps + 1) * cfg.problems_per_step
    problems = generate_problems(n, seed=3, forms=FORMS, describe=True)
    path.write_text("".join(json.dumps(problem) + "\n" for problem in problems))
    return problems


def run_trl(cfg: BenchConfig, ckpt: Path, problems: list[dict], out: Path) -> dict:
    """TRL's GRPOTrainer for 1 + cfg.steps steps; each step's seconds and the peak memory."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from codelm.evaluation.tasks.passk import run_check
    from codelm.sandbox.runner import SandboxConfig
    from codelm.training import rewards

    def sandboxed(prompts, completions, problem, **_) -> list[float]:
        jobs = [(json.loads(record), completion) for record, completion in zip(problem, completions)]
        return rewards.rewards(jobs, run_check, SandboxConfig(), cfg.workers)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.seconds.append(time.perf_counter() - self.began)

    records = [{"prompt": p["prompt"], "problem": json.dumps(p)} for p in problems]
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=cfg.problems_per_step * cfg.generations,
        num_generations=cfg.generations, max_completion_length=cfg.completion_tokens,
        max_steps=cfg.steps + 1, learning_rate=1e-5, beta=0.0, loss_type="dapo",
        temperature=1.0, bf16=not cfg.dry_run, use_cpu=cfg.dry_run, logging_steps=1,
        report_to=[], save_strategy="no", seed=0, remove_unused_columns=False)
    clock = StepClock()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=str(ckpt), reward_funcs=sandboxed, args=args,
                          train_dataset=Dataset.from_list(records),
                          processing_class=AutoTokenizer.from_pretrained(ckpt),
                          callbacks=[clock], peft_config=lora)
    reset_peak()
    trainer.train()
    return {"step_s": clock.seconds, "peak_gib": peak_gib()}


def run_codelm(cfg: BenchConfig, ckpt: Path, problems_file: Path, out: Path) -> dict:
    """codelm's `--task grpo` run for 1 + cfg.steps steps; each step's seconds (and its
    sampling, verdicts and update) and the peak memory."""
    import trainingmanager as tm
    from codelm import trainconfig

    run_cfg = trainconfig.TrainConfig(
        task="grpo", init_from=str(ckpt), problems=str(problems_file),
        batch_size=cfg.problems_per_step, num_generations=cfg.generations,
        max_completion_tokens=cfg.completion_tokens, max_steps=cfg.steps + 1, lr=1e-5,
        warmup_steps=0, grpo_loss_type="dapo", grpo_beta=0.0, temperature=1.0,
        lora_r=16, lora_alpha=32.0, lora_targets=TARGETS,
        base_dtype="fp32" if cfg.dry_run else "bf16", reward_workers=cfg.workers,
        gradient_checkpointing=trl_checkpoints(), compile=cfg.compile, eval_every=cfg.steps + 1,
        log_every=1, export=False, progress=False,
        report_to=["none"], out_dir=str(out), name="codelm", device="cpu" if cfg.dry_run else "auto")
    reset_peak()
    result = tm.train(run_cfg)
    peak = peak_gib()
    lines = (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()
    steps = [entry for entry in map(json.loads, lines) if entry["kind"] == "train"]
    parts = ("sampling_s", "verdicts_s", "update_s")
    return {"step_s": [sum(entry[part] for part in parts) for entry in steps],
            "parts": {part: [entry[part] for entry in steps] for part in parts},
            "peak_gib": peak}


def trl_checkpoints() -> bool:
    """Whether TRL's GRPOConfig recomputes activations in the backward by default."""
    from trl import GRPOConfig

    return GRPOConfig.__dataclass_fields__["gradient_checkpointing"].default


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def report(cfg: BenchConfig, results: dict) -> None:
    """The table: each library's median step after the warm-up, and its peak memory."""
    rows = cfg.problems_per_step * cfg.generations
    print(f"\nGRPO step: {cfg.problems_per_step} prompts x G={cfg.generations}, "
          f"<= {cfg.completion_tokens} new tokens, LoRA r16 q/k/v/o, dapo, beta 0 "
          f"({rows} completions a step; median of {cfg.steps} steps after a warm-up)")
    print("| library | s/step | peak GPU memory | sampling / verdicts / update (s) |")
    print("| --- | --- | --- | --- |")
    for name, result in results.items():
        timed = result["step_s"][1:]
        parts = result.get("parts")
        split = "" if parts is None else " / ".join(
            f"{statistics.median(values[1:]):.2f}" for values in parts.values())
        print(f"| {name} | {statistics.median(timed):.2f} | {result['peak_gib']:.2f} GiB | "
              f"{split} |")
    trl, ours = results["TRL GRPOTrainer"], results["codelm"]
    time_ratio = statistics.median(ours["step_s"][1:]) / statistics.median(trl["step_s"][1:])
    memory_ratio = ours["peak_gib"] / trl["peak_gib"]
    print(f"codelm / TRL: step time {time_ratio:.2f}x, memory {memory_ratio:.2f}x")


def main(argv: list[str] | None = None) -> int:
    cfg = settings.parse_config_flags(BenchConfig, argv, __doc__)
    if not cfg.dry_run and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (--dry-run checks the script on the CPU)")
    out = Path(cfg.out)
    ckpt = out / "model"
    ckpt.mkdir(parents=True, exist_ok=True)
    make_checkpoint(cfg, ckpt, "cpu" if cfg.dry_run else "cuda")
    problems_file = out / "problems.jsonl"
    problems = write_problems(cfg, problems_file)
    print(f"torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    results = {"TRL GRPOTrainer": run_trl(cfg, ckpt, problems, out / "trl")}
    reset_peak()
    results["codelm"] = run_codelm(cfg, ckpt, problems_file, out / "runs")
    report(cfg, results)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
