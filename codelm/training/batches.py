"""What a run trains and validates on, batch by batch: the shuffled order of the training
examples (all a checkpoint keeps of it is an epoch and a position), each step's micro-batches,
this rank's share of the validation batches, and the epoch count of a step."""

from __future__ import annotations

import math
import typing
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset

from codelm.data.datasets import SupervisedExamples, collate, files_apart


class Where(typing.NamedTuple):
    """A step's place in the data: the shuffled pass (for lm windows at every token, not the
    epoch) and the position of its first example in that pass."""

    shuffle: int
    position: int


class BatchOrder:
    """Global micro-batches of example indices; rank r takes its contiguous slice of each. Epoch
    e's order is a permutation seeded by (seed, e), and the batches run through the epochs'
    orders one after another: (epoch, position) is all a checkpoint keeps."""

    def __init__(self, n_examples: int, micro_batch: int, seed: int, rank: int = 0,
                 world: int = 1, unit: str = "examples"):
        self.global_batch = micro_batch * world
        if n_examples < self.global_batch:
            raise ValueError(f"the training split has {n_examples} {unit}, fewer than one "
                             f"global batch ({micro_batch} x {world}): lower --batch-size "
                             "or add data")
        self.n = n_examples
        self.micro_batch = micro_batch
        self.seed = seed
        self.rank = rank
        self.load_state_dict({"epoch": 0, "pos": 0})

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])
        self._perm = self._permutation(self.epoch)

    def next(self) -> tuple[list[int], Where]:
        """This rank's indices for the next micro-batch, and where it is in the data. Every
        example of a pass is taken once: a global batch that ends a pass is filled from the
        start of the next pass's order, so every batch has its full size."""
        if self.pos == self.n:
            self._next_pass()
        where = Where(self.epoch, self.pos)
        indices: list[int] = []
        while len(indices) < self.global_batch:
            if self.pos == self.n:
                self._next_pass()
            take = min(self.global_batch - len(indices), self.n - self.pos)
            indices += self._perm[self.pos:self.pos + take].tolist()
            self.pos += take
        start = self.rank * self.micro_batch
        return indices[start:start + self.micro_batch], where

    def _next_pass(self) -> None:
        self.epoch += 1
        self.pos = 0
        self._perm = self._permutation(self.epoch)


class Batches:
    """A run's training and validation splits as padded batches for this rank: ``grad_accum``
    micro-batches of ``batch_size`` a step, in ``BatchOrder``; validation in file order, its
    first ``eval_examples`` (0: all), split between the ranks. With ``pack_into`` (tokens), the
    training examples are packed into rows of that many (``PackedExamples``), and a batch holds
    ``batch_size`` rows; with ``files_apart`` (EOS's id), lm windows keep their files apart
    (``DocumentWindows``), in training and validation. ``collate`` makes a batch of items (a
    subclass's items its own)."""

    collate = staticmethod(collate)

    def __init__(self, train: Dataset, val: Dataset, pad_id: int, batch_size: int,
                 grad_accum: int, seed: int, eval_examples: int = 0, rank: int = 0,
                 world: int = 1, pack_into: int | None = None, files_apart: int | None = None):
        if files_apart is not None:  # lm windows (full rows): their files, EOS-ended, apart
            train = DocumentWindows(train, files_apart)
            val = DocumentWindows(val, files_apart)
        if pack_into is not None:
            train = PackedExamples(train, pack_into, seed)
        self.train = train
        self.val = val
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.eval_examples = eval_examples
        self.rank = rank
        self.world = world
        self.order = BatchOrder(len(train), batch_size, seed, rank, world, self.unit)

    def next_step(self) -> tuple[list[dict], Where]:
        """The next step's micro-batches, and where the first one is in the data."""
        micro_batches = []
        first = None
        for _ in range(self.grad_accum):
            ids, where = self.order.next()
            micro_batches.append(self.collate([self.train[i] for i in ids], self.pad_id))
            if first is None:
                first = where
        return micro_batches, first

    def validation(self) -> tuple[Iterator[dict], int]:
        """This rank's share of the validation batches, and how many there are."""
        n = min(len(self.val), self.eval_examples or len(self.val))
        starts = range(0, n, self.batch_size)[self.rank::self.world]

        def batches() -> Iterator[dict]:
            for start in starts:
                end = min(start + self.batch_size, n)
                yield self.collate([self.val[i] for i in range(start, end)], self.pad_id)

        return batches(), len(starts)

    @property
    def unit(self) -> str:
        """What a training item is called: packed rows (batch_size counts them), or examples."""
        return "rows" if isinstance(self.train, PackedExamples) else "examples"

    @property
    def windows_at_every_token(self) -> bool:
        """lm windows at every start position (stride 1): its items are not examples."""
        return getattr(self.train, "stride", None) == 1

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def examples_per_epoch(self) -> int:
        """Each training example once; lm windows at every start position count those that fit
        side by side, (n_tokens - 1) // block_size (each predicts block_size next tokens)."""
        if self.windows_at_every_token:
            return max(1, (self.train.n_tokens - 1) // self.train.block_size)
        return len(self.train)

    def epoch(self, step: int) -> float:
        """Epochs trained by the end of optimizer step ``step``."""
        return step * self.examples_per_step / self.examples_per_epoch

    def steps_for(self, epochs: float) -> int:
        """The optimizer steps that train ``epochs`` epochs (at least one)."""
        return max(1, math.ceil(epochs * self.examples_per_epoch / self.examples_per_step))


# ---- Packing: several examples in a row, or a window's files, each kept to itself ----

OPEN_ROWS = 64  # rows a packer keeps filling; the oldest is closed when one more opens


def example_lengths(examples: Dataset) -> Sequence[int]:
    """Each example's tokens: read off SupervisedExamples' offsets, else (a Subset of them,
    --overfit-batches; a list) from the examples themselves."""
    if isinstance(examples, SupervisedExamples):
        return examples.lengths
    return [len(examples[i]["input_ids"]) for i in range(len(examples))]


def first_fit_rows(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Example indices packed into rows of at most ``capacity`` tokens: the examples in an order
    shuffled by ``seed``, each into the first of the open rows (the OPEN_ROWS latest) it fits,
    else into a new row. Deterministic: the same lengths and seed give the same rows."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))
    rows: list[list[int]] = []
    room: list[int] = []  # the open rows' free tokens, oldest first
    first_open = 0  # rows before it are closed
    for i in order.tolist():
        n = int(lengths[i])
        fits = next((r for r in range(first_open, len(rows)) if room[r - first_open] >= n), None)
        if fits is None:
            rows.append([])
            room.append(capacity)
            fits = len(rows) - 1
            if len(room) > OPEN_ROWS:
                room.pop(0)
                first_open += 1
        rows[fits].append(i)
        room[fits - first_open] -= n
    return rows


class PackedExamples(Dataset):
    """Examples packed into rows (``first_fit_rows``): a row's examples one after another, their
    labels as each has them (nothing counted across a boundary), and ``document_ids`` telling
    them apart, so that each attends only to itself."""

    def __init__(self, examples: Dataset, capacity: int, seed: int):
        self.examples = examples
        self.capacity = capacity
        self.rows = first_fit_rows(example_lengths(examples), capacity, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        parts = [self.examples[j] for j in self.rows[i]]
        document_ids = [torch.full_like(p["input_ids"], k) for k, p in enumerate(parts)]
        return {"input_ids": torch.cat([p["input_ids"] for p in parts]),
                "labels": torch.cat([p["labels"] for p in parts]),
                "document_ids": torch.cat(document_ids)}


class DocumentWindows(Dataset):
    """lm windows (LMWindows, or a Subset of them) whose files keep to themselves
    (``files_apart``): a document starts at every EOS, the EOS that opens a file as it opens a
    prompt."""

    def __init__(self, windows: Dataset, eos_id: int):
        self.windows = windows
        self.eos_id = eos_id

    block_size = property(lambda self: self.windows.block_size)
    stride = property(lambda self: getattr(self.windows, "stride", None))
    n_tokens = property(lambda self: self.windows.n_tokens)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return files_apart(self.windows[i], self.eos_id)
