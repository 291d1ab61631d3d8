"""The random streams a run draws from (Python's, NumPy's, torch's and a GPU's): seeded together,
and their state taken and given back, so that a resumed run draws what the unbroken one did."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s own streams in a run seeded ``seed``: ``seed`` itself for
    rank 0 (a one-process run's), else NumPy's SeedSequence of the two, so that the ranks of
    runs at neighbouring seeds share no stream (seed + rank would: seed 1's rank 0 drawing
    seed 0's rank 1's dropout)."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] % 2**63)


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG state; on a CUDA ``device``, that GPU's generator only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore ``rng_state`` (as torch.load gives it back)."""
    version, internal, gauss = state["python"]  # weights_only loading makes tuples lists
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
