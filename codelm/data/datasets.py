"""The torch Datasets a prepared task gives: ``LMWindows`` over a packed token file,
``SupervisedExamples`` (labels masked on the prompt), their ``collate``, and ``PreparedData``
(the three splits)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from codelm.data.examples import SamplePrompt
from codelm.kernels import IGNORE_INDEX
from codelm.tokenization.batching import BatchEncodeMixin


class LMWindows(Dataset):
    """Windows of a packed, memory-mapped token file: input tokens[s : s+T], labels shifted by
    one. ``stride=1``: every start is an index (training samples them); ``block_size``: one pass."""

    def __init__(self, path: str | Path, dtype: str, n_tokens: int, block_size: int, stride: int):
        self.path, self.dtype, self.n_tokens = str(path), dtype, n_tokens
        self.block_size, self.stride = block_size, stride
        if n_tokens < 2:
            self.length = 0
        elif stride == 1:
            self.length = max(1, n_tokens - block_size)
        else:
            self.length = math.ceil((n_tokens - 1) / stride)

    @cached_property
    def tokens(self) -> np.ndarray:  # opened lazily so DataLoader workers do not pickle the map
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "tokens"}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        s = i * self.stride
        chunk = torch.from_numpy(self.tokens[s : s + self.block_size + 1].astype(np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:].clone()}


class SupervisedExamples(Dataset):
    """Prompt + completion sequences stored flat; labels are -100 on prompt targets."""

    def __init__(self, directory: str | Path, split: str):
        d = Path(directory)
        self.ids_path = d / f"{split}.ids.npy"
        self.offsets = np.load(d / f"{split}.offsets.npy")
        self.prompt_lens = np.load(d / f"{split}.prompt_lens.npy")

    @cached_property
    def ids(self) -> np.ndarray:  # opened lazily so DataLoader workers do not pickle the map
        return np.load(self.ids_path, mmap_mode="r")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "ids"}

    def __len__(self) -> int:
        return len(self.prompt_lens)

    @property
    def lengths(self) -> np.ndarray:
        """Each example's tokens (its input_ids'), read without the examples."""
        return np.diff(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        seq = torch.from_numpy(self.ids[self.offsets[i] : self.offsets[i + 1]].astype(np.int64))
        labels = seq[1:].clone()
        labels[: max(0, int(self.prompt_lens[i]) - 1)] = IGNORE_INDEX
        return {"input_ids": seq[:-1], "labels": labels}


def collate(examples: Sequence[dict[str, torch.Tensor]], pad_id: int | None
            ) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch: ``pad_id`` (or 0) on inputs, -100 on padded labels (so no
    mask is needed: causal attention never looks ahead at the padding); packed rows' document
    ids padded with -1, the padding a document of its own."""
    pad = 0 if pad_id is None else int(pad_id)
    input_ids = pad_sequence([e["input_ids"] for e in examples], batch_first=True,
                             padding_value=pad)
    labels = pad_sequence([e["labels"] for e in examples], batch_first=True,
                          padding_value=IGNORE_INDEX)
    batch = {"input_ids": input_ids, "labels": labels}
    if "document_ids" in examples[0]:
        batch["document_ids"] = pad_sequence([e["document_ids"] for e in examples],
                                             batch_first=True, padding_value=-1)
    return batch


def files_apart(window: dict[str, torch.Tensor], eos_id: int) -> dict[str, torch.Tensor]:
    """An lm window (input_ids, labels) whose files keep to themselves, as an lm run with
    packing trains and validates on them: a document starts at every EOS (document_ids), so a
    file ends by predicting its EOS and the next file's first token is predicted from that EOS
    alone, as generation prompts the model (the lm task's prompts start after an EOS)."""
    starts = window["input_ids"] == eos_id
    return {**window, "document_ids": starts.long().cumsum(0)}


class LabelBytes:
    """The UTF-8 bytes of the text a batch's labels stand for, the denominator of bits per byte:
    each token's bytes (a special token's none), less the space a SentencePiece dummy prefix
    opens each text encoded on its own with, which the text does not hold: a document (its first
    token follows BOS or EOS) and a FIM part (it follows a FIM sentinel). A token after another
    special token continues the text around it (a chat answer after Mistral's ``[/INST]``), its
    space the text's own. Called with a batch's input ids and labels."""

    def __init__(self, tokenizer: BatchEncodeMixin, device: torch.device | str = "cpu"
                 ) -> None:
        dummy_prefix = tokenizer.continuation_anchor is not None
        opening_ids = {*tokenizer.template_prefix, tokenizer.bos_id, tokenizer.eos_id,
                       tokenizer.fim_prefix_id, tokenizer.fim_suffix_id, tokenizer.fim_middle_id}
        opens_text = []
        opens_with_space = []
        for i in range(tokenizer.vocab_size):
            special = tokenizer.is_special(i)
            opens_text.append(special and i in opening_ids)
            opens_with_space.append(dummy_prefix and not special
                                    and tokenizer.token_bytes(i).startswith(b" "))
        self.lengths = torch.tensor(tokenizer.token_byte_lengths(), device=device)
        self.opens_text = torch.tensor(opens_text, device=device)
        self.opens_with_space = torch.tensor(opens_with_space, device=device)

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The labelled positions' bytes, summed (a 0-d tensor on the labels' device)."""
        counted = labels != IGNORE_INDEX
        targets = labels[counted]
        dummy_space = self.opens_with_space[targets] & self.opens_text[input_ids[counted]]
        return self.lengths[targets].sum() - dummy_space.sum()


@dataclass
class PreparedData:
    """The three splits of one task: Datasets, or without a tokenizer texts (to train one on)."""

    train: Dataset | Sequence[str]
    val: Dataset | Sequence[str]
    test: Dataset | Sequence[str]
    task: str
    stats: dict
    cache_path: Path | None = None
    sample_prompt: SamplePrompt | None = None  # held out, for the end of a run's sample
