"""What a run trains and validates on, batch by batch: the shuffled order of the training
examples (all a checkpoint keeps of it is an epoch and a position), each step's micro-batches,
this rank's share of the validation batches, and the epoch count of a step."""

from __future__ import annotations

import math
import typing
from collections.abc import Iterator

import torch

from dataset import PackedExamples, collate

if typing.TYPE_CHECKING:
    from torch.utils.data import Dataset


class Where(typing.NamedTuple):
    """A step's place in the data: the shuffled pass (for lm windows at every token, not the
    epoch) and the position of its first example in that pass."""

    shuffle: int
    position: int


class BatchOrder:
    """Global micro-batches of example indices; rank r takes its contiguous slice of each. Epoch
    e's order is a permutation seeded by (seed, e): (epoch, position) is all a checkpoint keeps."""

    def __init__(self, n_examples: int, micro_batch: int, seed: int, rank: int = 0,
                 world: int = 1):
        self.global_batch = micro_batch * world
        if n_examples < self.global_batch:
            raise ValueError(f"the training split has {n_examples} examples, fewer than one "
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
        """This rank's indices for the next micro-batch, and where it is in the data."""
        if self.pos + self.global_batch > self.n:
            self.epoch += 1
            self.pos = 0
            self._perm = self._permutation(self.epoch)
        where = Where(self.epoch, self.pos)
        start = self.pos + self.rank * self.micro_batch
        self.pos += self.global_batch
        return self._perm[start:start + self.micro_batch].tolist(), where


class Batches:
    """A run's training and validation splits as padded batches for this rank: ``grad_accum``
    micro-batches of ``batch_size`` a step, in ``BatchOrder``; validation in file order, its
    first ``eval_examples`` (0: all), split between the ranks. With ``pack_into`` (tokens), the
    training examples are packed into rows of that many (``PackedExamples``), and a batch holds
    ``batch_size`` rows."""

    def __init__(self, train: Dataset, val: Dataset, pad_id: int, batch_size: int,
                 grad_accum: int, seed: int, eval_examples: int = 0, rank: int = 0,
                 world: int = 1, pack_into: int | None = None):
        self.train = train if pack_into is None else PackedExamples(train, pack_into, seed)
        self.val = val
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.eval_examples = eval_examples
        self.rank = rank
        self.world = world
        self.order = BatchOrder(len(train), batch_size, seed, rank, world)

    def next_step(self) -> tuple[list[dict], Where]:
        """The next step's micro-batches, and where the first one is in the data."""
        micro_batches = []
        first = None
        for _ in range(self.grad_accum):
            ids, where = self.order.next()
            micro_batches.append(collate([self.train[i] for i in ids], self.pad_id))
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
                yield collate([self.val[i] for i in range(start, end)], self.pad_id)

        return batches(), len(starts)

    @property
    def windows_at_every_token(self) -> bool:
        """lm windows at every start position (stride 1): its items are not examples."""
        return getattr(self.train, "stride", None) == 1

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def examples_per_epoch(self) -> int:
        """Each training example once; lm windows at every start position count
        n // block_size."""
        n = len(self.train)
        if self.windows_at_every_token:
            return max(1, n // self.train.block_size)
        return n

    def epoch(self, step: int) -> float:
        """Epochs trained by the end of optimizer step ``step``."""
        return step * self.examples_per_step / self.examples_per_epoch

    def steps_for(self, epochs: float) -> int:
        """The optimizer steps that train ``epochs`` epochs (at least one)."""
        return max(1, math.ceil(epochs * self.examples_per_epoch / self.examples_per_step))
