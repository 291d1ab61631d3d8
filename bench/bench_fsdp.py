"""FSDP against DDP: what each rank holds of the weights, their gradients and AdamW's moments.

    python bench/bench_fsdp.py [--preset llama-14m] [--ranks 2]

Starts ``ranks`` CPU processes with torchrun (gloo). In each, one model (the preset's, fp32) is
spread as a run's ``--strategy`` spreads it (``distributed.wrap``), takes one training step
(forward, loss, backward, AdamW: the moments exist) and counts the bytes of the tensors this
rank holds: its parameters (an FSDP rank its shards), their gradients, the optimizer's state.
DDP's gradient buckets (a second copy of the gradients, for its all-reduce) are left out; so is
what a step gathers for the moment (FSDP: one block's weights at a time). The table is rank 0's;
every rank holds the same up to one row of a matrix.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from architecture import PRESETS, Transformer  # noqa: E402
from codelm.runtime import distributed, settings  # noqa: E402
from codelm.training.optim import build_optimizer  # noqa: E402


@dataclass
class BenchConfig:
    preset: str = "llama-14m"  # architecture.PRESETS name
    ranks: int = 2  # processes torchrun starts
    tokens: int = 64  # the step's sequence length (batch 1): activations are not counted


@dataclass
class Held:
    """Bytes one rank holds."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def local_bytes(t: torch.Tensor) -> int:
    """The bytes of ``t`` this rank holds (a DTensor: its shard)."""
    t = t.to_local() if isinstance(t, torch.distributed.tensor.DTensor) else t
    return t.numel() * t.element_size()


def held_after_a_step(preset: str, strategy: str, dist: distributed.Dist, tokens: int) -> Held:
    """One training step of ``preset`` spread by ``strategy``; what this rank holds after it
    (the gradients kept)."""
    torch.manual_seed(0)
    model = Transformer(PRESETS[preset])
    step_model = distributed.wrap(model, strategy, dist, torch.device("cpu"), "fp32")
    params = [p for p in model.parameters() if p.requires_grad]
    options = dict(optimizer="adamw", lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95,
                   adam_eps=1e-8)
    optimizer = build_optimizer(model, params, argparse.Namespace(**options))
    ids = torch.randint(0, model.cfg.vocab_size, (1, tokens + 1))
    step_model(ids[:, :-1], ids[:, 1:]).backward()
    optimizer.step()
    moments = [t for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0]
    return Held(params=sum(local_bytes(p) for p in params),
                grads=sum(local_bytes(p.grad) for p in params),
                optimizer=sum(local_bytes(t) for t in moments))


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def rank_main(cfg: BenchConfig) -> None:
    """Inside torchrun: both strategies on this rank; rank 0 prints the table."""
    dist = distributed.this_process()
    distributed.join(dist, torch.device("cpu"))
    held = {strategy: held_after_a_step(cfg.preset, strategy, dist, cfg.tokens)
            for strategy in distributed.STRATEGIES}
    distributed.leave()
    if not dist.main:
        return
    n_params = sum(p.numel() for p in Transformer(PRESETS[cfg.preset]).parameters())
    print(f"{cfg.preset} ({n_params / 1e6:.1f}M parameters, fp32, AdamW), {dist.world} ranks on "
          f"the CPU; MiB rank 0 holds after one step:\n")
    print("| strategy | parameters | gradients | optimizer | total | vs ddp |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for strategy, h in held.items():
        ratio = h.total / held["ddp"].total
        print(f"| {strategy} | {mib(h.params)} | {mib(h.grads)} | {mib(h.optimizer)} | "
              f"{mib(h.total)} | {ratio:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    cfg = settings.parse_config_flags(BenchConfig, argv, __doc__.split("\n\n")[0])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank_main(cfg)
        return
    flags = [f"--{key.replace('_', '-')}={value}"
             for key, value in dataclasses.asdict(cfg).items()]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={cfg.ranks}", __file__, *flags], env=env, check=True)


if __name__ == "__main__":
    main()
