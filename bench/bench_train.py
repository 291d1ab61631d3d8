"""Training-manager overhead and throughput, in one run (figures go to docs/benchmarks.md).

Three loops over the same prepared stdlib ``lm`` data, batch x block tokens per step, AdamW,
gradient clipping, on the trainer's device in its precision (fp32 on a CPU; on a GPU bf16
autocast), all in one process and interleaved block by block (so load from other processes hits
them alike):
- ``bare``: a nanoGPT-style step on codelm's model (random windows straight from the token file);
- ``hf``: the same bare step on ``transformers``' LlamaForCausalLM of the same shape;
- ``manager``: ``trainingmanager.train``'s loop on its own codelm model: fetch and collate the
  batch, token-weighted loss, clip, step, schedule, metrics/TensorBoard (a line every 10
  steps), tqdm, signal checks.
Each loop runs ``--block`` steps between waits for the device (the managed run logs, so reads
its figures back, once a block), copying its batches from pinned memory. A manager block is
timed from the end of the bare blocks before it to the wait before its next block: its steps,
what follows each (the logged step's read and line), the next block's batch fetches, and the
device's end of its work. Medians of the blocks' times a step after one warm-up block are
reported, and the share of the manager's time spent fetching and collating data.

    python bench/bench_train.py [--steps 30] [--block 10] [--preset llama-14m] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trainingmanager as tm  # noqa: E402
from codelm.runs import rundir  # noqa: E402
from codelm.runtime.distributed import Dist, resolve_device  # noqa: E402
from codelm.trainconfig import TrainConfig  # noqa: E402
from codelm.training import build  # noqa: E402
from codelm.training.batches import Batches  # noqa: E402
from codelm.training.trainer import Trainer, autocast, to_device  # noqa: E402

WARMUP_BLOCKS = 1


class BareLoop:
    """The plainest correct training step: random windows, the loss, clip, fused AdamW. codelm's
    model takes its own loss (the head fused with it, as the Trainer's), so the manager's
    overhead is measured on equal model work; the HF model takes F.cross_entropy of its logits."""

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor, cfg: TrainConfig,
                 hf: bool, trainer: Trainer):
        self.device, self.precision = trainer.device, trainer.precision  # the manager's
        self.model, self.tokens, self.cfg, self.hf = model.to(self.device).train(), tokens, cfg, hf
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                     weight_decay=cfg.weight_decay, fused=True)
        self.gen = torch.Generator().manual_seed(0)

    def step(self) -> None:
        T, B = self.cfg.block_size, self.cfg.batch_size
        ix = torch.randint(len(self.tokens) - T - 1, (B,), generator=self.gen)
        x = torch.stack([self.tokens[i:i + T] for i in ix])
        y = torch.stack([self.tokens[i + 1:i + T + 1] for i in ix])
        x, y = to_device(x, self.device), to_device(y, self.device)
        with autocast(self.device, self.precision):
            if self.hf:
                loss = F.cross_entropy(self.model(x).logits.flatten(0, 1).float(), y.flatten())
            else:
                loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def block(self, steps: int) -> float:
        """Seconds a step of ``steps`` steps, the device's work included."""
        began = time.perf_counter()
        for _ in range(steps):
            self.step()
        wait_for(self.device)
        return (time.perf_counter() - began) / steps


def wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_twin(model_cfg):
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.n_embd,
        intermediate_size=model_cfg.mlp_hidden, num_hidden_layers=model_cfg.n_layer,
        num_attention_heads=model_cfg.n_head, num_key_value_heads=model_cfg.n_kv_head,
        head_dim=model_cfg.head_dim, max_position_embeddings=model_cfg.block_size,
        rms_norm_eps=model_cfg.norm_eps, rope_theta=model_cfg.rope_theta,
        tie_word_embeddings=model_cfg.tie_embeddings, attention_dropout=0.0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30,
                        help="timed steps per loop, rounded up to whole blocks (default: 30)")
    parser.add_argument("--block", type=int, default=10,
                        help="steps a loop runs between waits for the device, the managed run's "
                             "logging interval (default: 10)")
    # A fixed model: preset auto would choose anew in the managed run, on a machine busy
    # with the bench's own setup, and compare another model against the bare loops.
    parser.add_argument("--preset", default="llama-14m",
                        help="architecture.PRESETS name (default: llama-14m)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--block-size", type=int, default=256,
                        help="tokens per sequence (default: 256)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from architecture import Transformer

    with tempfile.TemporaryDirectory() as out:
        blocks = -(-args.steps // args.block)
        cfg = TrainConfig(preset=args.preset, batch_size=args.batch_size,
                          block_size=args.block_size,
                          max_steps=(blocks + WARMUP_BLOCKS) * args.block + 1,
                          eval_every=10**9, eval_examples=args.batch_size, save_every=10**9,
                          export=False, log_every=args.block, out_dir=out, name="bench")
        setup = dataclasses.replace(cfg, name="bench-setup")
        claimed = rundir.claim_run_dir(None, out, setup.name, setup.run_stem, None, Dist())
        run = build.Run(setup, claimed, Dist(), resolve_device(cfg.device, Dist()),
                        time.perf_counter(), None, True)
        run.record.close()
        run.record.claimed.release()
        ran = TrainConfig(**run.record.config)  # the settings the run trains with
        model_cfg, trainer = run.trainer.raw_model.cfg, run.trainer
        tokens = torch.from_numpy(run.data.batches.train.tokens[:4_000_000].astype("int64"))
        torch.manual_seed(0)
        bare = BareLoop(Transformer(model_cfg), tokens, ran, hf=False, trainer=trainer)
        torch.manual_seed(0)
        hf = BareLoop(hf_twin(dataclasses.replace(model_cfg)), tokens, ran, hf=True,
                      trainer=trainer)
        tokens_per_step = cfg.batch_size * cfg.block_size
        print(f"{args.preset}: {trainer.raw_model.num_parameters() / 1e6:.1f}M parameters, "
              f"{tokens_per_step} tokens/step, {trainer.precision} on {trainer.device}, "
              f"{torch.get_num_threads()} threads")

        times: dict[str, list[float]] = {"bare": [], "hf": [], "manager": []}
        data_time: list[float] = []
        fetch, manager_step = Batches.next_step, Trainer.train_step
        steps_taken = [0]
        block_began = [None]

        def timed_fetch(self):
            t = time.perf_counter()
            batch = fetch(self)
            data_time.append(time.perf_counter() - t)
            return batch

        timed_steps = (blocks + WARMUP_BLOCKS) * args.block  # the last step runs untimed

        def interleaved_step(self, *a, **k):
            if steps_taken[0] % args.block == 0:  # a manager block done: the bare blocks
                wait_for(trainer.device)
                if block_began[0] is not None:
                    times["manager"].append((time.perf_counter() - block_began[0]) / args.block)
                if steps_taken[0] < timed_steps:  # a manager block follows
                    times["bare"].append(bare.block(args.block))
                    times["hf"].append(hf.block(args.block))
                block_began[0] = time.perf_counter()
            steps_taken[0] += 1
            return manager_step(self, *a, **k)

        Batches.next_step = timed_fetch
        Trainer.train_step = interleaved_step
        tm.train(cfg)

    med = {n: statistics.median(v[WARMUP_BLOCKS:]) for n, v in times.items()}
    # a timed block's interval holds the fetches of its steps after its first and of the next
    # block's first step: from step block + 2's on
    data = statistics.median(data_time[WARMUP_BLOCKS * args.block + 1:])
    print("\n| loop | s/step (median) | tokens/s | vs bare |")
    print("| --- | --- | --- | --- |")
    for n in ("bare", "manager", "hf"):
        print(f"| {n} | {med[n]:.3f} | {tokens_per_step / med[n]:.0f} | "
              f"{med['bare'] / med[n]:.3f}x |")
    print(f"\nmanager overhead vs bare loop: {100 * (med['manager'] / med['bare'] - 1):+.1f}% "
          f"(goal <= +3%); manager tokens/s vs HF bare loop: {med['hf'] / med['manager']:.2f}x; "
          f"data fetch+collate {1000 * data:.1f} ms/step = {100 * data / med['manager']:.2f}% of "
          "a manager step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
