"""Packing: real (non-padding) tokens trained per second with packed rows against padded
batches of the same micro-batch, in one run.

    python bench/bench_packing.py [--preset code-4x192] [--block-size 512] [--batch-size 8]

The examples' lengths are those of the standard library's functions (about 3.5 characters a
token, cut to the block), their ids random. Both loops take a training step (forward, loss,
backward, AdamW) on the same model: ``padded`` collates ``batch_size`` examples right-padded to
the longest, ``packed`` ``batch_size`` rows of ``batches.PackedExamples`` with their document
ids. Medians over the steps after a warm-up one; the ratio is packed over padded tokens/s.
Then attention alone over a packed batch, by each exact path and by causal attention across
the documents (the floor): the model takes the fastest exact one measured.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from architecture import IGNORE_INDEX, PRESETS, Transformer  # noqa: E402
from codelm.data.datasets import collate  # noqa: E402
from codelm.data.sources import stdlib_files  # noqa: E402
from codelm.runtime import settings  # noqa: E402
from codelm.training.batches import PackedExamples  # noqa: E402


@dataclass
class BenchConfig:
    preset: str = "code-4x192"  # architecture.PRESETS name
    block_size: int = 512  # a row's tokens
    batch_size: int = 8  # examples (padded) or rows (packed) a step
    steps: int = 6  # timed steps of each loop, after one warm-up step
    threads: int = 2  # torch threads


def function_lengths(block_size: int) -> list[int]:
    """The stdlib's functions' lengths in tokens (3.5 characters a token), cut to the block."""
    lengths = []
    for file in stdlib_files()[:400]:
        text = file.read_text(errors="replace")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                source = ast.get_source_segment(text, node) or ""
                lengths.append(min(block_size, max(8, round(len(source) / 3.5))))
    return lengths


def example(n: int, generator: torch.Generator, vocab_size: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(10, min(4000, vocab_size), (n + 1,), generator=generator)
    return {"input_ids": ids[:-1], "labels": ids[1:]}


def timed_steps(model: Transformer, batches: list[dict], steps: int) -> tuple[float, int]:
    """Median seconds a step and the counted tokens a step (mean) over ``steps`` batches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds, tokens = [], []
    for i, batch in enumerate(batches[: steps + 1]):
        start = time.perf_counter()
        loss = model(batch["input_ids"], batch["labels"], reduction="sum",
                     document_ids=batch.get("document_ids"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            seconds.append(time.perf_counter() - start)
            tokens.append(int((batch["labels"] != IGNORE_INDEX).sum()))
    return statistics.median(seconds), round(statistics.mean(tokens))


def attention_paths(packed: dict[str, torch.Tensor], heads: int, head_dim: int, steps: int
                    ) -> dict[str, float]:
    """Median seconds of attention's forward and backward over a packed batch's rows: one SDPA
    call with the block-diagonal causal mask (the model's path), one causal SDPA call per
    document, and plain causal attention across the documents (not exact: the floor)."""
    import torch.nn.functional as F

    from architecture import document_mask

    B, T = packed["input_ids"].shape
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, heads, T, head_dim, generator=generator).requires_grad_()
               for _ in range(3))
    mask = document_mask(packed["document_ids"])
    spans = []  # (row, start, end) of each document
    for b in range(B):
        ids = packed["document_ids"][b].tolist()
        start = 0
        for t in range(1, T + 1):
            if t == T or ids[t] != ids[start]:
                spans.append((b, start, t))
                start = t

    def masked() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum()

    def per_document() -> torch.Tensor:
        total = torch.zeros(())
        for b, start, end in spans:
            part = [x[b : b + 1, :, start:end] for x in (q, k, v)]
            total = total + F.scaled_dot_product_attention(*part, is_causal=True).sum()
        return total

    def across_documents() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

    medians = {}
    for name, path in (("one call, block-diagonal mask", masked),
                       ("a call per document", per_document),
                       ("causal across documents (not exact)", across_documents)):
        seconds = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            path().backward()
            seconds.append(time.perf_counter() - start)
        medians[name] = statistics.median(seconds[1:])
    return medians


def main(argv: list[str] | None = None) -> None:
    cfg = settings.parse_config_flags(BenchConfig, argv, __doc__.split("\n\n")[0])
    torch.set_num_threads(cfg.threads)
    lengths = function_lengths(cfg.block_size)
    generator = torch.Generator().manual_seed(0)
    vocab_size = PRESETS[cfg.preset].vocab_size
    examples = [example(n, generator, vocab_size) for n in lengths]
    packed_rows = PackedExamples(examples, cfg.block_size, seed=0)
    padded_batches, packed_batches = [], []
    order = torch.randperm(len(examples), generator=generator).tolist()
    for step in range(cfg.steps + 1):
        chosen = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        padded_batches.append(collate([examples[i] for i in chosen], pad_id=0))
        rows = range(step * cfg.batch_size, (step + 1) * cfg.batch_size)
        packed_batches.append(collate([packed_rows[r] for r in rows], pad_id=0))
    preset = PRESETS[cfg.preset]
    model_cfg = dataclasses.replace(preset, block_size=max(preset.block_size, cfg.block_size))
    torch.manual_seed(0)
    model = Transformer(model_cfg).train()
    padded_s, padded_tokens = timed_steps(model, padded_batches, cfg.steps)
    packed_s, packed_tokens = timed_steps(model, packed_batches, cfg.steps)
    mean_length = statistics.mean(lengths)
    print(f"{len(lengths)} stdlib functions, {mean_length:.0f} tokens on average; "
          f"{len(lengths) / len(packed_rows):.1f} a packed row of {cfg.block_size}; {cfg}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| batches | s/step | real tokens/step | real tokens/s |")
    print("| --- | --- | --- | --- |")
    print(f"| padded | {padded_s:.3f} | {padded_tokens} | {padded_tokens / padded_s:.0f} |")
    print(f"| packed | {packed_s:.3f} | {packed_tokens} | {packed_tokens / packed_s:.0f} |")
    ratio = (packed_tokens / packed_s) / (padded_tokens / padded_s)
    print(f"packed over padded real tokens/s: {ratio:.2f}")
    print("\n| attention of a packed batch (forward + backward) | ms |")
    print("| --- | --- |")
    for name, seconds in attention_paths(packed_batches[1], model_cfg.n_head,
                                         model_cfg.head_dim, cfg.steps).items():
        print(f"| {name} | {seconds * 1e3:.1f} |")


if __name__ == "__main__":
    main()
