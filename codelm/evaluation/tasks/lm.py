"""The lm task: a model's own loss (its training loss), perplexity, next-token accuracy and bits
per byte over block-size windows of the split's text, packed as dataset.py packs a split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from codelm.data.config import DataConfig
from codelm.data.datasets import LabelBytes, files_apart
from codelm.data.encoding import encode_text, packed_document
from codelm.data.sources import Doc, plain_text
from codelm.evaluation import scoring
from codelm.evaluation.scoring import Scoring
from codelm.loading import LoadedModel
from codelm.tokenization.bpe import BPETokenizer
from tokenizer import CodeTokenizer

KIND = "text"  # the split's text itself


class LmSettings(Scoring, Protocol):
    lm_windows: int | None  # block-size windows scored (None: the whole split)


@torch.no_grad()
def score_lm(lm: LoadedModel, texts: Sequence[str], cfg: LmSettings) -> dict:
    """Loss (the model's training loss), perplexity, next-token accuracy (0-1) and bits per byte
    over block-size windows of the texts packed as dataset.py packs a split (a packing lm run's
    files kept apart, as it trained): on a run's val split, its val_loss, val_accuracy and
    val_bpb."""
    tok = lm.tokenizer
    context = scoring.context(lm, cfg)
    want = None if cfg.lm_windows is None else cfg.lm_windows * context + 1
    stream: list[int] = []
    for text in texts:
        if want is not None and len(stream) >= want:
            break
        stream += packed_document(tok, encode_text(tok, text))
    stream = stream[:want]
    chunks = [torch.tensor(stream[s : s + context + 1]) for s in range(0, len(stream) - 1, context)]
    if not chunks:
        raise ValueError("the lm task found no text to score in the chosen split: choose another "
                         "--split, or other --data")
    windows = [{"input_ids": chunk[:-1], "labels": chunk[1:]} for chunk in chunks]
    if (eos := _apart_at(lm)) is not None:
        windows = [files_apart(window, eos) for window in windows]
    total, correct, count = scoring.summed_loss(lm, windows, cfg, "lm")
    loss = total / count
    scores = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
              "token_accuracy": correct / count, "tokens": int(count)}
    label_bytes = LabelBytes(tok)
    n_bytes = sum(int(label_bytes(w["input_ids"], w["labels"])) for w in windows)
    if n_bytes:  # as training's val_bpb: comparable across tokenizers
        scores["bits_per_byte"] = total / n_bytes / math.log(2)
    return scores


def _apart_at(lm: LoadedModel) -> int | None:
    """The EOS that opens each of a run's files, which keep to themselves (an lm run with
    packing trained and validated so: datasets.files_apart), else None."""
    run = lm.run_config or {}
    if run.get("task", "lm") != "lm" or not run.get("packing"):
        return None
    return lm.tokenizer.eos_id


def items(task: str, docs: Sequence[Doc], cfg: LmSettings,
          tok: CodeTokenizer | BPETokenizer | None, data_cfg: DataConfig
          ) -> dict[str | None, list[str]]:
    """The split's texts as the lm task trains on them (``plain_text``: a pair record's input
    and output as one, a conversation's contents, not its JSON)."""
    return {None: [plain_text(d) for d in docs]}


def run(lm: LoadedModel, task: str, texts: Sequence[str], cfg: LmSettings,
        variant: str | None = None, data_cfg: DataConfig | None = None
        ) -> tuple[dict, list[dict]]:
    return score_lm(lm, texts, cfg), []
