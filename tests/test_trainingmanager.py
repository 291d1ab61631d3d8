"""trainingmanager: the one loss, exact accumulation, bit-exact resume after kill -9, loud NaNs,
atomic checkpoints, the run directory, and the --overfit ritual (a transposed batch caught)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import gc
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import dataset
import trainingmanager as tm
from architecture import SHORT_DTYPES
from codelm import kernels, loading, trainconfig
from codelm.data import encoding
from codelm.data.cache import publish_cache_entry
from codelm.data.config import BPE_SPECIAL_TOKENS, DataConfig
from codelm.data.datasets import LMWindows, collate
from codelm.data.encoding import supervised_example, tokenizer_cache_dir
from codelm.data.sources import stdlib_files
from codelm.models import adapter_config, generation, pretrained, quantize
from codelm.runs import checkpoint, rundir, trackers
from codelm.runtime import distributed, process, rng, settings
from codelm.runtime.settings import fields_of
from codelm.training import budget, build, finish, plan, record
from codelm.training import trainer as trainer_module
from codelm.training.batches import Batches, BatchOrder
from tokenizer import CODE_SPECIAL_TOKENS, ENCODING_VERSION, CodeTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-exact comparisons between processes


def model_settings(cfg: trainconfig.TrainConfig) -> trainconfig.ModelSettings:
    """What a run builds its model from (loading.build_model), of ``cfg``."""
    return trainconfig.ModelSettings(**fields_of(trainconfig.ModelSettings, cfg))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A small real corpus (stdlib files), a CodeTokenizer trained on it, a shared data cache."""
    root = tmp_path_factory.mktemp("assets")
    corpus = root / "corpus"
    corpus.mkdir()
    files = [f for f in stdlib_files() if 1500 < f.stat().st_size < 5000][:40]
    for i, f in enumerate(files):
        shutil.copy(f, corpus / f"f{i:03d}.py")
    tok = CodeTokenizer.train([f.read_text("utf-8") for f in files], min_freq=3, max_vocab=200)
    tok.save(root)
    return {"corpus": str(corpus), "tokenizer": str(root / "tokenizer.json"),
            "cache": str(root / "cache")}


def tiny_cfg(assets, tmp_path, **overrides) -> trainconfig.TrainConfig:
    values = dict(
        preset="tiny", data=[assets["corpus"]], tokenizer=assets["tokenizer"],
        data_options={"cache_dir": assets["cache"], "progress": False}, block_size=32,
        batch_size=4, max_steps=12, warmup_steps=2, lr=3e-3, eval_every=4, eval_examples=8,
        log_every=1, save_every=4, keep_last=5, progress=False, export=False,
        out_dir=str(tmp_path / "runs"), name="run", sample_tokens=8,
    )
    values.update(overrides)
    return trainconfig.TrainConfig(**values)


def built_run(cfg: trainconfig.TrainConfig) -> build.Run:
    """``build.Run`` on the CPU, in a directory claimed as ``train`` claims it (``closed``
    releases it)."""
    claimed = rundir.claim_run_dir(cfg.resume, cfg.out_dir, cfg.name, cfg.run_stem, None,
                                   distributed.Dist())
    return build.Run(cfg, claimed, distributed.Dist(), torch.device("cpu"), time.perf_counter(),
                     None, False)


def closed(run: build.Run) -> None:
    """Its log closed and its directory released, as ``train`` ends a run."""
    run.record.close()
    run.record.claimed.release()


def tiny_llama(tmp_path: Path) -> Path:
    """A tiny random Llama checkpoint: a pretrained base for LoRA (wider than assets' vocab)."""
    from tiny_hf import save_tiny_hf

    base = tmp_path / "base"
    save_tiny_hf("llama", base, vocab_size=512)
    return base


def write_config(cfg: trainconfig.TrainConfig, path: Path) -> Path:
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    return path


def final_weights(run_dir: Path, step: int, name: str = rundir.MODEL_FILE) -> dict:
    return load_file(Path(run_dir) / "checkpoints" / f"step-{step}" / name)


def sigterm_at_step(monkeypatch, step: int, *sigs: int):
    """SIGTERM (or ``sigs``, one after the other) arrives as optimizer step ``step`` (counted
    from 1 in this process) ends, its update applied; returns the real train_step."""
    import signal
    import threading

    original, calls = trainer_module.Trainer.train_step, [0]

    def train_step(self, *args, **kwargs):
        calls[0] += 1
        stats = original(self, *args, **kwargs)
        if calls[0] == step:
            for sig in sigs or (signal.SIGTERM,):  # to the main thread: handled in this order
                signal.pthread_kill(threading.main_thread().ident, sig)
        return stats

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    return original


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max {(a[k] - b[k]).abs().max()})"


# --------------------------------------------------------------------------------------------
# Accumulation, parity
# --------------------------------------------------------------------------------------------


def _ready(cfg: trainconfig.TrainConfig) -> trainconfig.StepSettings:
    """What a Trainer takes of ``cfg``: a length, and the settings a run fills in."""
    cfg = plan.with_fallbacks(dataclasses.replace(cfg, max_steps=cfg.max_steps or 100))
    if cfg.warmup_steps is None:
        cfg = dataclasses.replace(cfg, warmup_steps=plan.warmup_for(cfg.max_steps))
    return trainconfig.StepSettings(**fields_of(trainconfig.StepSettings, cfg))


def _figures(loss: float) -> trainer_module.StepFigures:
    """A scripted step's figures: ``loss``, gradient norm 1 over one position, lr 1e-3."""
    return trainer_module.StepFigures(torch.tensor([loss, 1.0, 1.0]), 1e-3)


def _trainer(cfg: trainconfig.TrainConfig, vocab: int = 64) -> trainer_module.Trainer:
    from architecture import Transformer

    torch.manual_seed(0)
    model = Transformer(trainconfig.model_config(cfg, vocab, None, None))
    return trainer_module.Trainer(model, _ready(cfg), torch.device("cpu"))


def test_a_model_outlives_its_trainer_without_keeping_it_or_its_hooks():
    """A Trainer's stop hooks on the model's blocks hold it weakly and go with it: a second
    Trainer on one model (a notebook's) leaves the first's optimizer state free to be collected
    and one stop check a block, and the second's stop still drops a step."""
    cfg = trainconfig.TrainConfig(preset="tiny", max_steps=4)
    first = _trainer(cfg)
    model = first.raw_model
    gone = weakref.ref(first)
    first.train_step([{"input_ids": torch.zeros(1, 8, dtype=torch.long),
                       "labels": torch.zeros(1, 8, dtype=torch.long)}])
    second = trainer_module.Trainer(model, _ready(cfg), torch.device("cpu"))
    del first
    gc.collect()
    assert gone() is None
    for block in model.blocks:
        assert len(block.attn._forward_pre_hooks) == len(block.mlp._forward_pre_hooks) == 1
    stop = trainer_module.StepStop(lambda: True, contextlib.nullcontext())
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long),
             "labels": torch.zeros(1, 8, dtype=torch.long)}
    with pytest.raises(trainer_module.StepAbandoned):
        second.train_step([batch], stop=stop)
    assert all(p.grad is None for p in model.parameters())


def test_accumulation_equals_one_big_batch_and_validation_equals_training_loss(tmp_path):
    """Micro-batches of very different token counts (padding, masks) accumulate to exactly the
    big batch's step; the validation loss of a training batch is the training loss on it."""
    cfg = trainconfig.TrainConfig(preset="tiny", dropout=0.0, block_size=32, lr=1e-2,
                                  warmup_steps=0)
    g = torch.Generator().manual_seed(1)
    examples = []
    for length, n_prompt in ((30, 5), (6, 0), (12, 10), (31, 20)):
        ids = torch.randint(0, 64, (length + 1,), generator=g).tolist()
        examples.append(supervised_example(ids[:n_prompt], ids[n_prompt:], max_length=32))
    big = collate(examples, pad_id=0)
    micro = [collate(examples[:1], 0), collate(examples[1:], 0)]

    one, accumulated = _trainer(cfg), _trainer(cfg)
    val = one.evaluate([big])
    stats_one = one.train_step([big]).read()
    stats_acc = accumulated.train_step(micro).read()
    assert val["val_loss"] == pytest.approx(stats_one.loss, rel=1e-6)
    assert stats_acc.loss == pytest.approx(stats_one.loss, rel=1e-6)
    assert stats_acc.grad_norm == pytest.approx(stats_one.grad_norm, rel=1e-5)
    # The gradients agree to float rounding (Adam's first moment is 0.1 x the gradient); the
    # weights too, where the gradient is far above Adam's eps (1e-8): Adam's first step is
    # lr * g / (|g| + eps), whose rounding there is amplified (a 9e-9 gradient can move its
    # weight 1.2e-5 apart on one CPU and not on another).
    for (name, a), b in zip(one.raw_model.named_parameters(), accumulated.raw_model.parameters()):
        ga, gb = (t.optimizer.state[p]["exp_avg"] for t, p in ((one, a), (accumulated, b)))
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-9), name
        steady = ga.abs() > 1e-7  # |g| > 1e-6
        assert torch.allclose(a[steady], b[steady], atol=1e-5), name
    # Averaging per-micro-batch means (the usual bug) would give a different loss here.
    with torch.no_grad():
        model = one.raw_model
        naive = sum(model(m["input_ids"], m["labels"]) for m in micro) / 2
    assert abs(float(naive) - stats_one.loss) > 1e-3



def test_validation_accuracy_is_the_share_of_counted_labels_the_logits_rank_first():
    """Trainer.evaluate's val_accuracy is, over all its batches, the share of counted labels
    that the model's logits rank first (their argmax), and val_tokens the count: a masked label
    counts in neither. Half the labels are the argmax here, so the share is far from 0."""
    trainer = _trainer(trainconfig.TrainConfig(preset="tiny", dropout=0.0, block_size=16))
    g = torch.Generator().manual_seed(2)
    batches = []
    correct = counted = 0
    for rows in (2, 1):
        ids = torch.randint(0, 64, (rows, 16), generator=g)
        with torch.no_grad():
            top = trainer.raw_model(ids).argmax(-1)
        labels = torch.where(torch.rand(rows, 16, generator=g) < 0.5, top,
                             torch.randint(0, 64, (rows, 16), generator=g))
        labels[:, :3] = kernels.IGNORE_INDEX
        keep = labels != kernels.IGNORE_INDEX
        correct += int((top[keep] == labels[keep]).sum())
        counted += int(keep.sum())
        batches.append({"input_ids": ids, "labels": labels})
    metrics = trainer.evaluate(batches)
    assert metrics["val_tokens"] == counted
    assert correct > counted // 4
    assert metrics["val_accuracy"] == pytest.approx(correct / counted, rel=1e-12)

def test_a_nonfinite_step_is_skipped_on_the_device_and_reads_as_nonfinite():
    """Fused AdamW takes the step's verdict as torch's found_inf: a NaN step leaves every
    weight, moment and step count as it was with no read of the device, its figures read as a
    non-finite loss, and the next step is the one a trainer that never saw it takes. Muon's
    part takes no found_inf: a step with Muon reads its figures before it is applied."""
    cfg = trainconfig.TrainConfig(preset="tiny", dropout=0.0, block_size=16, warmup_steps=0,
                                  optimizer="adamw", min_lr_ratio=1.0)
    batch = {"input_ids": torch.randint(0, 64, (2, 16)), "labels": torch.randint(0, 64, (2, 16))}
    torch.manual_seed(0)
    skipped = _trainer(cfg)
    torch.manual_seed(0)
    clean = _trainer(cfg)
    assert skipped.skips_on_device
    for trainer in (skipped, clean):
        trainer.train_step([batch]).read()
    weights = [p.detach().clone() for p in skipped.params]
    moments = [skipped.optimizer.state[p]["exp_avg"].clone() for p in skipped.params]
    figures = skipped.train_step([batch], inject_nan=True)
    assert all(torch.equal(a, b) for a, b in zip(weights, skipped.params))
    assert all(torch.equal(skipped.optimizer.state[p]["exp_avg"], m)
               for p, m in zip(skipped.params, moments))
    assert all(int(skipped.optimizer.state[p]["step"]) == 1 for p in skipped.params)
    assert figures.read().nonfinite == "loss"
    for trainer in (skipped, clean):
        trainer.train_step([batch]).read()
    assert all(torch.equal(a, b) for a, b in zip(skipped.params, clean.params))
    assert not _trainer(dataclasses.replace(cfg, optimizer="muon")).skips_on_device


def test_fp16_overflow_is_skipped_by_the_scaler_not_applied():
    """fp16 + GradScaler: an overflowing step changes no weight, halves the scale, and training
    goes on; bf16 and fp16 runs train without a scaler error."""
    cfg = trainconfig.TrainConfig(preset="tiny", dropout=0.0, block_size=16, precision="fp16")
    trainer = _trainer(cfg)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    batch = {"input_ids": torch.randint(0, 64, (2, 16)), "labels": torch.randint(0, 64, (2, 16))}
    before = [p.detach().clone() for p in trainer.params]
    stats = trainer.train_step([batch]).read()
    assert stats.skipped and stats.nonfinite is None and trainer.scaler.get_scale() == 2.0**59
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))
    for _ in range(60):
        if not trainer.train_step([batch]).read().skipped:
            break
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.params))


def test_a_resumed_trainer_counts_the_overflow_skips_in_a_row_before_its_checkpoint():
    """fp16 steps that all overflow: the trainer declares the run diverged at the step after
    MAX_SKIPPED_STEPS skips in a row. A trainer resumed from the state of one that skipped 20
    declares it at the same step as the uninterrupted one: the count is part of its state."""
    cfg = trainconfig.TrainConfig(preset="tiny", dropout=0.0, block_size=16, precision="fp16")
    batch = {"input_ids": torch.randint(0, 64, (2, 16)), "labels": torch.randint(0, 64, (2, 16))}

    def overflowing() -> trainer_module.Trainer:
        trainer = _trainer(cfg)
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
        return trainer

    def diverged_at(trainer: trainer_module.Trainer, done: int) -> int | None:
        for step in range(done + 1, 2 * trainer_module.MAX_SKIPPED_STEPS):
            if trainer.train_step([batch]).diverged:
                return step
        return None

    straight = diverged_at(overflowing(), 0)
    assert straight == trainer_module.MAX_SKIPPED_STEPS + 1
    first = overflowing()
    for _ in range(20):
        assert first.train_step([batch]).skipped
    resumed = overflowing()
    resumed.load_state_dict(checkpoint.RunState(step=20, **first.state_dict()))
    assert resumed.scaler.get_scale() == first.scaler.get_scale()
    assert diverged_at(resumed, 20) == straight


def test_lora_on_an_fp16_base_scales_the_loss_at_any_precision():
    """The backward through a frozen fp16 base underflows without loss scaling: at 8192 target
    tokens per step the adapters' gradients would be ~40% off with precision fp32 (CPU's auto),
    so the loss is scaled whatever the precision."""
    import lora
    from architecture import PRESETS, Transformer

    # n_embd 32: CPU fp16 matmuls are slow, and the narrower head keeps the same 8192 tokens and
    # vocabulary (without the scaling the adapters' gradients are then ~90% off, not ~40%).
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=8000, block_size=64, n_embd=32)
    torch.manual_seed(0)
    base = Transformer(cfg).state_dict()
    g = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, 8000, (128, 64), generator=g),
             "labels": torch.randint(0, 8000, (128, 64), generator=g)}

    def adapter_grads(base_dtype: str) -> dict[str, torch.Tensor]:
        model = Transformer(cfg)
        model.load_state_dict(base)
        model.to(SHORT_DTYPES[base_dtype])
        config = adapter_config.LoRAConfig(r=4, alpha=8, target_modules=["qkv", "proj"])
        lora.apply_lora(model, config)
        torch.manual_seed(2)
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.02)  # B != 0: every adapter gets a gradient
        trainer = trainer_module.Trainer(model, _ready(trainconfig.TrainConfig(
            grad_clip=0.0, precision="fp32", lora_r=4, base_dtype=base_dtype, progress=False)),
            torch.device("cpu"))
        trainer.train_step([batch])
        return {n: trainer.optimizer.state[p]["exp_avg"] for n, p in model.named_parameters()
                if p.requires_grad}

    ref, got = adapter_grads("fp32"), adapter_grads("fp16")
    assert max(float((got[n] - ref[n]).norm() / ref[n].norm()) for n in ref) < 0.01


def test_step_counts_every_position_of_every_process(monkeypatch):
    """tokens_seen / tokens_per_s count what all processes computed: the sum of their batches,
    not this process's count times the number of processes."""
    trainer = _trainer(trainconfig.TrainConfig(preset="tiny", dropout=0.0, block_size=16))
    trainer.dist = distributed.Dist(rank=0, world=2)  # its collectives stood in for below
    others = 37.0  # the positions of the other process's (shorter) batches

    def all_reduce(t, dist):
        return t + torch.tensor([5.0, others]) if t.dim() == 1 else t * 2

    monkeypatch.setattr(trainer_module, "all_reduce_sum", all_reduce)
    micro = [{"input_ids": torch.randint(0, 64, (2, n)), "labels": torch.randint(0, 64, (2, n))}
             for n in (16, 9)]
    assert trainer.train_step(micro).read().tokens == 2 * 16 + 2 * 9 + others


def test_fp16_step_runs_the_head_fused_with_the_unfused_heads_gradients(monkeypatch):
    """Under fp16 the Trainer hands the loss scale times the token weight to the fused head
    loss, which then forms the gradients the unfused fp16 head would (Adam's first moment after
    one step is 0.1 x the gradient)."""
    cfg = trainconfig.TrainConfig(preset="tiny", dropout=0.0, block_size=16, precision="fp16",
                                  grad_clip=0.0)
    trainer = _trainer(cfg)
    model = trainer.raw_model
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    labels = ids.roll(-1, 1)
    labels[:, :3] = kernels.IGNORE_INDEX
    scale = trainer.scaler.scale(torch.ones(()))
    with torch.autocast("cpu", torch.float16):
        logits = model(ids).float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                             reduction="sum")
    count = int((labels != kernels.IGNORE_INDEX).sum())
    (loss * scale / count).backward()
    ref = {n: p.grad / scale for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    scales = []  # the grad_scale of each fused call that forms gradients
    real = kernels._head_cross_entropy

    def spy(*args):
        if any(args[5]):
            scales.append(float(args[7]))
        return real(*args)

    monkeypatch.setattr(kernels, "_head_cross_entropy", spy)
    stats = trainer.train_step([{"input_ids": ids, "labels": labels}]).read()
    assert scales == [pytest.approx(float(scale) / count)] and not stats.skipped
    assert stats.loss == pytest.approx(loss.item() / count, rel=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(trainer.optimizer.state[p]["exp_avg"] / (1 - cfg.beta1),
                                   ref[n], rtol=2e-3, atol=1e-6, msg=n)
    scales.clear()  # a mean's scale reaches the head as the summed loss's: divided by the count
    with torch.autocast("cpu", torch.float16):
        model(ids, labels, grad_scale=scale)
    assert scales == [pytest.approx(float(scale) / count)]


def _shifted_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    labels = ids.roll(-1, 1)
    labels[:, :3] = kernels.IGNORE_INDEX
    return ids, labels


def _plain_backward(model, ids, labels, smoothing=0.0, clip=float("inf")):
    """The reference step: F.cross_entropy on the full fp32 logits of a copy of ``model`` (no
    fused head, no scaler, no autocast), its gradient clipped by torch's clip_grad_norm_.
    Returns the loss, the total gradient norm before the clip and the gradients by name."""
    ref = copy.deepcopy(model).float()
    logits = ref(ids)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                           ignore_index=kernels.IGNORE_INDEX, label_smoothing=smoothing)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
    return loss.item(), float(norm), {n: p.grad for n, p in ref.named_parameters()}


def _worst_relative_error(trainer: trainer_module.Trainer, grads: dict[str, torch.Tensor]) -> float:
    """How far the gradient the step applied (Adam's first moment after one step is 0.1 x it)
    is from ``grads``: the largest |got - ref| / |ref| over the tensors."""
    state, beta1 = trainer.optimizer.state, trainer.settings.beta1
    return max(float((state[p]["exp_avg"] / (1 - beta1) - grads[n]).norm() / grads[n].norm())
               for n, p in trainer.raw_model.named_parameters())


# fp16: the forward's rounding (0.1% here) against the fp32 reference
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("fp16", 1e-2)])
def test_grad_clip_clips_the_unscaled_gradient_as_torch_does(precision, tol):
    """grad_clip bounds the true gradient: grad_norm is the unclipped total norm of a plain
    F.cross_entropy backward, and the step applies the gradient torch's clip_grad_norm_ leaves
    (one factor for every tensor). Under fp16 the scaler unscales before the clip: clipping the
    scaled gradient would compare a norm 65536x too large with grad_clip, report it, and shrink
    the step as much. Every other fp16 test runs with grad_clip=0."""
    clip = 0.05
    cfg = trainconfig.TrainConfig(preset="tiny", dropout=0.0, block_size=16, grad_clip=clip,
                                  precision=precision)
    trainer = _trainer(cfg)
    ids, labels = _shifted_batch()
    _, norm, clipped = _plain_backward(trainer.raw_model, ids, labels, clip=clip)
    assert norm > 2 * clip  # the clip acts
    stats = trainer.train_step([{"input_ids": ids, "labels": labels}]).read()
    assert not stats.skipped and stats.grad_norm == pytest.approx(norm, rel=tol / 10)
    assert _worst_relative_error(trainer, clipped) < tol


def test_training_loss_and_gradient_use_label_smoothing_as_torch_cross_entropy():
    """TrainConfig.label_smoothing reaches the training step: its loss and gradient are those of
    F.cross_entropy(label_smoothing=0.1). The model's own smoothing is tested in
    test_architecture.py; this guards
    that the Trainer passes the setting on."""
    cfg = trainconfig.TrainConfig(preset="tiny", dropout=0.0, block_size=16, label_smoothing=0.1,
                                  grad_clip=0.0)
    trainer = _trainer(cfg)
    ids, labels = _shifted_batch()
    loss, _, grads = _plain_backward(trainer.raw_model, ids, labels, smoothing=0.1)
    assert abs(loss - _plain_backward(trainer.raw_model, ids, labels)[0]) > 1e-3
    stats = trainer.train_step([{"input_ids": ids, "labels": labels}]).read()
    assert stats.loss == pytest.approx(loss, rel=1e-6)
    assert _worst_relative_error(trainer, grads) < 1e-5


def test_weight_decay_falls_on_linear_and_embedding_weights_only():
    """AdamW decays the weight matrices (Linear, Embedding) and nothing else: biases and norm
    gains sit in a group with weight_decay 0, as in nanoGPT and HF's Trainer. The model has every
    kind: LayerNorm weights and biases, biased Linears, learned positions."""
    cfg = trainconfig.TrainConfig(preset="tiny", weight_decay=0.1, model_options={
        "norm": "layernorm", "positions": "learned", "qkv_bias": True, "attn_proj_bias": True,
        "mlp_bias": True, "lm_head_bias": True})
    trainer = _trainer(cfg)
    decay = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups
             for p in group["params"]}
    expected = {id(p): 0.1 if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
                and name == "weight" else 0.0
                for m in trainer.raw_model.modules()
                for name, p in m.named_parameters(recurse=False)}
    assert list(expected.values()).count(0.0) > 10  # norms and biases are there
    assert decay == expected


def test_each_epoch_is_a_new_permutation_of_every_example():
    """Every epoch visits each example once, in an order of its own: an order seeded without
    the epoch would repeat epoch 0's batches in every epoch."""
    order = BatchOrder(10, 5, seed=0)
    epochs: dict[int, list[int]] = {}
    for _ in range(6):
        indices, (epoch, _) = order.next()
        epochs.setdefault(epoch, []).extend(indices)
    assert list(epochs) == [0, 1, 2]
    assert all(sorted(indices) == list(range(10)) for indices in epochs.values())
    assert len({tuple(indices) for indices in epochs.values()}) == 3


@pytest.mark.parametrize("capability, half", [((7, 5), "fp16"), ((8, 0), "bf16")])
def test_auto_precision_takes_the_gpus_native_half(monkeypatch, capability, half):
    """A T4 (compute capability 7.5) trains and loads in fp16: torch.cuda.is_bf16_supported()
    says yes there (emulation), and seed 000's bf16 runs on one were unstable. Explicit bf16 on
    it is refused, naming the capability and the way out."""
    from codelm.models import pretrained

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert trainer_module.resolve_precision("auto", cuda) == half
    assert pretrained._auto_dtype({"torch_dtype": "float32"}, cuda) == getattr(
        torch, {"fp16": "float16", "bf16": "bfloat16"}[half])
    cfg = trainconfig.TrainConfig(preset="tiny", precision="bf16")
    model = torch.nn.Linear(2, 2)
    if half == "fp16":
        with pytest.raises(ValueError, match=r"^precision \('bf16', --precision\).*"
                                             r"compute capability 7\.5.*set precision fp16"):
            trainer_module.Trainer(model, _ready(cfg), cuda)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_step_waits_on_the_device_only_when_read_and_the_stop_check_never():
    """One process: a training step queues its work (its token counts go over without a wait,
    fused AdamW skips a non-finite step on the device) and reading its figures back is its one
    wait; the per-step stop check reads no device tensor. So the host queues steps ahead and the
    GPU is not idle between logged steps."""
    import warnings

    from architecture import Transformer

    cfg = trainconfig.TrainConfig(preset="tiny", dropout=0.0, block_size=32, warmup_steps=0,
                                  optimizer="adamw")
    torch.manual_seed(0)
    model = Transformer(trainconfig.model_config(cfg, 64, None, None))
    trainer = trainer_module.Trainer(model.cuda(), _ready(cfg), torch.device("cuda"))
    ids = torch.randint(0, 64, (4, 33))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    trainer.train_step([batch]).read()  # the first step's one-off work (the optimizer's state)
    signals = trainer_module.StopSignals()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            steps = [trainer.train_step([batch]) for _ in range(3)]
            assert signals.stop_requested(distributed.Dist(), torch.device("cuda")) is None
            queued = sum("called a synchronizing" in str(w.message) for w in caught)
            stats = trainer_module.read_steps(steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            signals.restore()
    waits = [w for w in caught if "called a synchronizing" in str(w.message)]
    assert len(waits) == 1 and queued == 0, [str(w.message) for w in caught]
    assert all(s.nonfinite is None and s.tokens == 4 * 32 for s in stats)


def test_a_stop_while_leaving_the_process_group_says_how_to_continue(tmp_path, monkeypatch):
    """torchrun stops a job's other ranks when one dies: a stop that lands while a rank leaves
    the group is raised as a stop of the run, naming its --resume where it has a checkpoint."""
    def stopped():
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(distributed, "leave", stopped)
    (tmp_path / rundir.CHECKPOINTS_DIR / "step-5").mkdir(parents=True)
    with pytest.raises(rundir.RunInterrupted) as stop:
        tm._leave_group(tmp_path, None, False)
    assert stop.value.resume == f"--resume {tmp_path}" and stop.value.args == ("SIGTERM",)
    with pytest.raises(rundir.RunInterrupted) as stop:
        tm._leave_group(None, None, False)
    assert stop.value.resume is None


def test_a_stop_is_announced_once_for_a_torchrun_job(capfd, monkeypatch):
    """Every rank of a torchrun job gets its launcher's signal; rank 0 alone says so."""
    import signal

    for rank, says in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        signals = trainer_module.StopSignals()
        try:
            signals._handle(signal.SIGTERM, None)
        finally:
            signals.restore()
            process.forget_stop()
        assert ("SIGTERM: stopping at" in capfd.readouterr().err) == says, rank


def test_every_evaluation_is_paused_training_time(assets, tmp_path, monkeypatch):
    """Each evaluation of a run, the loop's and the last one after it, is left out of training
    time: an evaluation line's tok/s counts none of them."""
    paused = []
    evaluate = tm._evaluate

    def recorded(run, progress, *args, **kwargs):
        paused.append((run.state.step, progress.paused_at is not None))
        return evaluate(run, progress, *args, **kwargs)

    monkeypatch.setattr(tm, "_evaluate", recorded)
    tm.train(tiny_cfg(assets, tmp_path, max_steps=3, eval_every=2, save_every=2))
    assert paused == [(2, True), (3, True)]


def test_a_sweep_trials_stop_announcement_names_the_trial(capfd, monkeypatch):
    """A sweep's trial starts each line it prints with `trial N: `, so workers' lines can be
    told apart: the stop's announcement too, written by the signal handler to stderr's file
    descriptor."""
    import signal

    from codelm.runtime import console

    monkeypatch.setenv("RANK", "0")
    with console.labelled_lines("trial 3: "):
        signals = trainer_module.StopSignals(mid_step=True)
        try:
            signals._handle(signal.SIGINT, None)
        finally:
            signals.restore()
            process.forget_stop()
    assert "\ntrial 3: SIGINT: stopping at the next layer's" in capfd.readouterr().err


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    """Linear warmup reaches the peak lr on its last step, a cosine then takes it down to
    min_lr_ratio at max_steps (halfway: 0.55), and past the end it stays at that floor."""
    f = [trainer_module.lr_factor(s, 10, 110, 0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55)
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_warmup_stable_decay_holds_the_peak_then_decays_as_one_minus_sqrt():
    """decay_steps 40 of 110: the peak from the warmup's end to step 70, then 1 - sqrt of the
    decay's progress down to the floor (Hägele et al. 2024's cooldown)."""
    f = [trainer_module.lr_factor(s, 10, 110, 0.1, decay_steps=40) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == f[10] == f[70] == pytest.approx(1.0)
    assert f[80] == pytest.approx(0.1 + 0.9 * (1 - 0.5))  # a quarter of the decay: sqrt 0.5
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


# --------------------------------------------------------------------------------------------
# Configuration and CLI
# --------------------------------------------------------------------------------------------


def test_config_file_with_cli_overrides_and_clear_errors(tmp_path, capsys):
    """A flag beats the --config file's value for its key and the keys it leaves alone keep the
    file's; an unknown key or a value of the wrong type is refused naming the file and the key,
    on the CLI as one exit-2 line without a traceback."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.002, "lora_targets": ["q_proj"], "batch_size": 3}))
    cfg = plan.parse_config(["--config", str(path), "--lr", "0.5", "--lora-targets",
                             "k_proj,v_proj", "--init-from", str(tiny_llama(tmp_path)),
                             "--lora-r", "4"])
    assert (cfg.lr, cfg.batch_size, cfg.lora_targets) == (0.5, 3, ["k_proj", "v_proj"])

    path.write_text(json.dumps({"lr": 0.002, "learning_rate": 1}))
    with pytest.raises(ValueError, match=r"c\.json: unknown key 'learning_rate'"):
        plan.parse_config(["--config", str(path)])
    assert tm.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and str(path) in err and "Traceback" not in err

    path.write_text(json.dumps({"batch_size": "8"}))
    with pytest.raises(ValueError, match="'batch_size' must be an integer"):
        plan.parse_config(["--config", str(path)])

    path.write_text(json.dumps({"data": str(tmp_path)}))  # a list's one item, as --data takes it
    assert plan.parse_config(["--config", str(path)]).data == [str(tmp_path)]


@pytest.mark.parametrize("options, message", [
    ({"data_options": {"train_frac": "0.5"}},
     "data_options: key 'train_frac' must be a number, got '0.5'"),
    ({"data_options": {"train_frac": 0.5}},
     "data_options: DataConfig split fractions must be >= 0 and sum to 1, got (0.5, 0.1, 0.1)"),
    ({"data_options": {"trian_frac": 0.5}},
     "data_options: unknown DataConfig key 'trian_frac'; did you mean 'train_frac'?"),
    ({"model_options": {"n_layer": "2"}}, "model_options: key 'n_layer' must be an integer"),
])
def test_a_nested_option_mistake_names_the_config_file_or_the_flag(tmp_path, options, message):
    """A mistake inside data_options / model_options names the --config file, or the flag that
    gave them, as a top-level key's mistake does."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps(options))
    with pytest.raises(ValueError) as err:
        plan.parse_config(["--config", str(path)])
    assert str(err.value).startswith(f"{path}: {message}")
    ((key, value),) = options.items()
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ValueError) as err:
        plan.parse_config([flag, json.dumps(value)])
    assert str(err.value).startswith(f"{flag}: {message.removeprefix(key + ': ')}")


def test_unknown_data_and_model_options_are_named():
    """A misspelt key in data_options or model_options is refused naming the key and its config,
    not dropped: dropped, the run would silently train with the default."""
    with pytest.raises(ValueError, match="unknown DataConfig key 'blocksize'"):
        trainconfig.config_from_dict({"data_options": {"blocksize": 3}})
    with pytest.raises(ValueError, match="unknown ModelConfig key 'width'"):
        trainconfig.config_from_dict({"preset": "tiny", "model_options": {"width": 3}})


def test_a_typo_in_data_or_model_options_suggests_the_key(tmp_path):
    """A misspelt config key gets "did you mean", inside data_options or model_options too, not a
    list of all 40 DataConfig keys to search."""
    with pytest.raises(ValueError, match="DataConfig key 'train_fracc'.*'train_frac'"):
        trainconfig.config_from_dict({"data_options": {"train_fracc": 0.5}})
    with pytest.raises(ValueError) as listed:  # no close match: the keys data_options may set
        trainconfig.config_from_dict({"data_options": {"zzz": 1}})
    keys = str(listed.value).split("; DataConfig keys are: ")[1].split(", ")
    assert "train_frac" in keys and not {"task", "sources", "val_sources"} & set(keys)
    with pytest.raises(ValueError, match="unknown ModelConfig key 'inti'; did you mean 'init'"):
        trainconfig.config_from_dict({"preset": "tiny", "model_options": {"inti": "xavier"}})


def test_val_data_files_are_the_validation_split(assets, tmp_path):
    """--val-data: the run validates on exactly those files (their tokens, packed as the trainer
    packs them), not on a fraction of --data; DataConfig's own key is refused in data_options."""
    from dataset import prepare
    from tokenizer import load_tokenizer

    val_dir = tmp_path / "valid"
    val_dir.mkdir()
    for f in [f for f in stdlib_files() if 5000 < f.stat().st_size < 8000][:3]:
        shutil.copy(f, val_dir / f.name)
    cfg = tiny_cfg(assets, tmp_path, val_data=[str(val_dir)], max_steps=2, eval_every=2,
                   eval_examples=None)
    dcfg = trainconfig.data_config(cfg, 32)
    assert dcfg.val_sources == [str(val_dir)] and dcfg.sources == [assets["corpus"]]
    val = prepare(dcfg, load_tokenizer(assets["tokenizer"])).val
    expected = sum(int((val[i]["labels"] != -100).sum()) for i in range(len(val)))
    result = tm.train(cfg)
    assert result.val_metrics["val_tokens"] == expected
    plain = tm.train(dataclasses.replace(cfg, val_data=None, name="plain"))
    assert plain.val_metrics["val_tokens"] != expected
    with pytest.raises(ValueError, match="set 'val_sources' with the TrainConfig key 'val_data'"):
        trainconfig.config_from_dict({"data_options": {"val_sources": ["x"]}})


# --------------------------------------------------------------------------------------------
# Runs: layout, NaN, best, early stop, callbacks, export
# --------------------------------------------------------------------------------------------


def test_run_directory_best_checkpoint_and_hf_export(assets, tmp_path):
    """A run leaves its config, the last keep_last checkpoints, metrics.jsonl with every
    evaluation, the best checkpoint (the lowest val_loss) and TensorBoard logs; the export is
    that checkpoint, which transformers alone loads to the same logits and tokenizes and decodes
    as codelm does."""
    import transformers

    from codelm.models import pretrained

    result = tm.train(tiny_cfg(assets, tmp_path, export=True, max_steps=8, keep_last=1))
    run = result.run_dir
    assert json.loads((run / "config.json").read_text())["max_steps"] == 8
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step-8"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= lines[0].keys()
    vals = [m for m in lines if m["kind"] == "val"]
    assert [m["step"] for m in vals] == [4, 8]
    assert result.best_val_loss == min(m["val_loss"] for m in vals)
    assert json.loads((run / "best" / "metrics.json").read_text())["step"] == result.best_step
    assert any((run / "tb").iterdir())
    # The export is the best checkpoint, in HF format, with the tokenizer; transformers agrees.
    ours = pretrained.load(run / "export").eval()
    best = load_file(run / "best" / rundir.MODEL_FILE)
    for name, t in checkpoint.model_tensors(ours, False).items():
        assert torch.equal(t, best[name]), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "export").eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)
    # The from-scratch CodeTokenizer too: transformers alone tokenizes and decodes like codelm.
    auto = transformers.AutoTokenizer.from_pretrained(run / "export")
    tok = load_tokenizer(run / "export")
    text = "def add(a, b):\n    return a + b  # é\n"
    assert auto(text)["input_ids"] == tok.encode(text)
    assert auto.decode(tok.encode(text)) == text and auto.eos_token_id == tok.eos_id


def test_injected_nan_stops_loudly_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    """A NaN loss stops the run naming the step, its epoch and training examples, the likely
    causes and the last good checkpoint, which is kept and loads with finite weights; metrics.jsonl
    ends with the error."""
    cfg = tiny_cfg(assets, tmp_path, inject_nan_at_step=7, batch_size=2, grad_accum=2)
    with pytest.raises(record.NonFiniteLossError) as info:
        tm.train(cfg)
    message = str(info.value)
    assert "non-finite loss (nan) at step 7" in message
    # the logged epoch, not the data order's pass (for lm windows: about block_size epochs)
    found = re.search(r"at step 7: epoch (0\.0\d+), training examples (\d+)\.\.(\d+) of "
                      r"shuffled pass 0 ", message)
    assert found, message
    logged = [json.loads(x) for x in (Path(cfg.out_dir) / "run" / "metrics.jsonl").read_text()
              .splitlines()]
    at_6 = next(m["epoch"] for m in logged if m["kind"] == "train" and m["step"] == 6)
    assert found[1] == f"{at_6 * 7 / 6:.3g}"  # by the end of step 7, as the log counts it
    assert int(found[3]) - int(found[2]) + 1 == 2 * 2  # the step's examples: both micro-batches
    assert "Likely causes" in message and "learning rate" in message
    assert "checkpoints/step-4" in message
    run = Path(cfg.out_dir) / "run"
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step-4"]
    model = loading.build_model(model_settings(cfg), build.load_or_train_tokenizer(cfg, None))
    state = checkpoint.load(run / "checkpoints" / "step-4", model, False)
    assert state.step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    errors = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert errors[-1]["kind"] == "error" and errors[-1]["step"] == 7


@pytest.mark.parametrize("optimizer, precision", [("adamw", "fp32"), ("muon", "fp32"),
                                                  ("adamw", "fp16")])
def test_a_nan_between_logged_steps_stops_the_run_at_the_next_read_naming_its_step(
        assets, tmp_path, optimizer, precision):
    """The loop reads steps' figures back at logged, evaluated and saved steps only: a NaN at
    step 6 (log every 5, save every 4) is found at step 8, before its checkpoint is written; the
    error names step 6 and its data, and the last good checkpoint is step 4's. Alike where the
    step is skipped on the device (fused AdamW) and where it is read first (Muon, fp16's loss
    scaler, which takes the steps after it)."""
    cfg = tiny_cfg(assets, tmp_path, inject_nan_at_step=6, log_every=5, save_every=4,
                   eval_every=100, max_steps=12, optimizer=optimizer, precision=precision)
    with pytest.raises(record.NonFiniteLossError) as info:
        tm.train(cfg)
    message = str(info.value)
    assert "non-finite loss (nan) at step 6: epoch" in message, message
    assert "checkpoints/step-4" in message
    run = Path(cfg.out_dir) / "run"
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step-4"]
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["kind"], m["step"]) for m in logged] == [("train", 1), ("train", 5),
                                                        ("error", 6)]


def test_steps_read_at_log_steps_give_the_run_reading_every_step(assets, tmp_path,
                                                                 monkeypatch):
    """Reading the figures back every step or only at logged and saved steps (here the logged
    ones: 1, 5 and the last) trains the same run: the same weights, tokens seen and last loss
    in the last checkpoint."""
    states, reads = [], []
    real = tm.read_steps
    monkeypatch.setattr(tm, "read_steps", lambda steps: reads.append(len(steps)) or real(steps))
    for log_every in (1, 5):
        cfg = tiny_cfg(assets, tmp_path, log_every=log_every, max_steps=7, save_every=100,
                       eval_every=100, name=f"log{log_every}")
        reads.clear()
        tm.train(cfg)
        model = loading.build_model(model_settings(cfg), build.load_or_train_tokenizer(cfg, None))
        state = checkpoint.load(Path(cfg.out_dir) / cfg.name / "checkpoints" / "step-7", model,
                                False)
        states.append((state.tokens_seen, state.train_loss, model.state_dict()))
    assert reads == [1, 4, 2]  # log every 5: steps 1, 5 and 7, the last
    (tokens_1, loss_1, weights_1), (tokens_5, loss_5, weights_5) = states
    assert tokens_1 == tokens_5 > 0 and loss_1 == loss_5
    assert all(torch.equal(weights_1[k], weights_5[k]) for k in weights_1)


def test_on_eval_exception_propagates_and_early_stopping(assets, tmp_path):
    """An exception from on_eval (a tuner pruning its trial) propagates out of train() as
    raised, after the best checkpoint and the config are written; validation that gains less
    than min_delta for early_stop_patience evaluations stops the run there (step 6 of 50)."""
    class Pruned(Exception):
        pass

    seen = []

    def on_eval(step, metrics):
        seen.append(step)
        if step == 8:
            raise Pruned

    cfg = tiny_cfg(assets, tmp_path)
    with pytest.raises(Pruned):
        tm.train(cfg, on_eval=on_eval)
    assert seen == [4, 8]
    run = Path(cfg.out_dir) / "run"
    assert (run / "best" / rundir.MODEL_FILE).is_file() and (run / "config.json").is_file()

    # lr ~0: validation never improves by min_delta after the first evaluation -> early stop
    # after 2 more; the best checkpoint still follows the lowest loss.
    cfg = tiny_cfg(assets, tmp_path, name="flat", lr=1e-12, weight_decay=0.0, eval_every=2,
                   early_stop_patience=2, early_stop_min_delta=1e-3, max_steps=50)
    result = tm.train(cfg)
    assert result.early_stopped and result.step == 6


def test_overfit_batches_memorises_real_batches(assets, tmp_path, capsys):
    """The run stops at the step its batch is memorised; that evaluation's console line, the
    run's last, estimates no time left."""
    cfg = tiny_cfg(assets, tmp_path, overfit_batches=1, max_steps=400, eval_every=1000,
                   lr=1e-2, warmup_steps=10, weight_decay=0.0)
    result = tm.train(cfg)
    assert result.train_loss < tm.OVERFIT_LOSS
    assert result.val_metrics["val_loss"] == pytest.approx(result.train_loss, abs=0.05)
    assert result.step < 400
    eval_lines = [line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("eval step")]
    assert eval_lines and "elapsed" in eval_lines[-1] and "ETA" not in eval_lines[-1]


def test_the_console_estimates_time_left_until_the_last_evaluation(assets, tmp_path, capsys):
    """Every evaluation line but the one at the run's last step says how long the run has left."""
    tm.train(tiny_cfg(assets, tmp_path, max_steps=8, eval_every=4))
    eval_lines = [line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("eval step")]
    assert [("ETA" in line) for line in eval_lines] == [True, False]
    assert eval_lines[-1].startswith("eval step 8/8") and "elapsed" in eval_lines[-1]


def test_a_failed_directory_write_is_one_oserror_and_leaves_the_old_one(tmp_path):
    """A full disk makes torch.save / safetensors raise their own types: the run reports one
    line (an OSError naming the target), removes the half-written copy and keeps the old."""
    target = tmp_path / "best"
    checkpoint.write_dir_atomically(target, lambda d: (d / "a.txt").write_text("old"))

    def full_disk(d):
        (d / "a.txt").write_text("new, half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")

    with pytest.raises(OSError, match=r"best: could not write.*MiB free.*intact.*RuntimeError"):
        checkpoint.write_dir_atomically(target, full_disk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert (target / "a.txt").read_text() == "old"


def test_a_write_that_fills_the_disk_says_so_first(tmp_path, monkeypatch):
    """A full disk's message leads with the full disk and names the file, not torch's "[enforce
    fail at inline_container.cc] unexpected pos" or Python's own ENOSPC, which names none. Free
    space is read while the partial copy is there."""
    target = tmp_path / "step-3"
    seen = []

    def disk_usage(path):
        seen.append(sorted(p.name for p in Path(path).iterdir()))
        return shutil._ntuple_diskusage(100, 100, 0)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    for error in (RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos"),
                  OSError(28, "No space left on device")):
        def full_disk(d, error=error):
            (d / "model.safetensors").write_text("half")
            raise error

        with pytest.raises(OSError) as failed:
            checkpoint.write_dir_atomically(target, full_disk)
        said = str(failed.value)
        assert said.startswith(f"{target}: ") and all(
            w in said for w in ("disk is full", "0 MiB free", "free some space")), said
        assert str(failed.value).endswith(f"({type(error).__name__}: {error})")
    assert seen == [["model.safetensors"]] * 2 and not list(tmp_path.iterdir())


def test_a_full_disk_while_logging_names_the_file_and_is_not_raised_again(assets, tmp_path,
                                                                          monkeypatch, capsys):
    """metrics.jsonl's write fails on a full disk at step 3: one line naming the file (Python's
    own ENOSPC names none), not raised again by closing the log, which would replace it (naming
    nothing either) and skip putting the signal handlers back."""
    import signal

    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.lines = f, 0

        def write(self, text):
            self.lines += 1
            return self.f.write(text)

        def flush(self):
            if self.lines >= 3:
                raise OSError(28, "No space left on device")
            self.f.flush()

        def close(self):
            self.flush()
            self.f.close()

    monkeypatch.setattr(trackers, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    handler = signal.getsignal(signal.SIGTERM)
    cfg = tiny_cfg(assets, tmp_path)
    assert tm.main(["--config", str(write_config(cfg, tmp_path / "c.json"))]) == 2
    run = Path(cfg.out_dir) / cfg.name
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert f"{run / 'metrics.jsonl'}: No space left" in err, err
    assert signal.getsignal(signal.SIGTERM) is handler


def test_a_stopped_directory_write_removes_its_half_written_copy(tmp_path):
    """Ctrl-C, or SIGTERM under interrupt_on_sigterm, mid-write removes the temp directory, as an
    Exception does: left in the tokenizer cache, which no run start cleans, it would stay."""
    def stopped(d):
        (d / "tokenizer.json").write_text("{half")
        raise KeyboardInterrupt("SIGTERM")

    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_dir_atomically(tmp_path / "tokenizer-abc", stopped)
    assert list(tmp_path.iterdir()) == []


def test_a_directory_whose_replacement_failed_to_land_is_put_back(tmp_path, monkeypatch):
    """Where no swap of two names is to be had: the new copy's rename failing (another process
    wrote the target meanwhile, a full directory) puts the old copy back, not leaving it aside
    as `.old-...` with no target."""
    target = tmp_path / "best"
    checkpoint.write_dir_atomically(target, lambda d: (d / "a.txt").write_text("old"))
    monkeypatch.setattr(process, "_exchange", lambda a, b: False)
    rename = os.rename

    def failing(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError(28, "No space left on device", str(src))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.write_dir_atomically(target, lambda d: (d / "a.txt").write_text("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert (target / "a.txt").read_text() == "old"


def test_a_writer_killed_between_its_renames_leaves_the_old_copy_for_the_next_write(tmp_path):
    """Where no swap of two names is to be had: SIGKILL after the old copy is moved aside but
    before the new one lands leaves `.old-best-PID` with no best/: the next write beside it
    puts it back, outside a run directory too, so that no later write of best/ deletes it (and
    a failing one loses both)."""
    import multiprocessing
    import signal

    target = tmp_path / "best"
    checkpoint.write_dir_atomically(target, lambda d: (d / "a.txt").write_text("old"))

    def killed_writer():
        rename = os.rename

        def kill_on_landing(src, dst):
            if Path(dst) == target:
                os.kill(os.getpid(), signal.SIGKILL)
            rename(src, dst)

        os.rename = kill_on_landing
        process._exchange = lambda a, b: False
        checkpoint.write_dir_atomically(target, lambda d: (d / "a.txt").write_text("new"))

    child = multiprocessing.get_context("fork").Process(target=killed_writer)
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert not target.exists()
    checkpoint.write_dir_atomically(tmp_path / "step-2", lambda d: (d / "b.txt").write_text("b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step-2"]
    assert (target / "a.txt").read_text() == "old"


def test_a_bpe_tokenizer_is_cached_apart_and_read_back_the_same(assets, tmp_path):
    """tokenizer_kind bpe trains a BPETokenizer cached under a key of its own (a CodeTokenizer of
    the same data and caps is another entry); the second run reads the cached one back, with
    the same ids and fingerprint."""
    from codelm.data.encoding import tokenizer_fingerprint
    from codelm.tokenization.bpe import BPETokenizer

    cfg = tiny_cfg(assets, tmp_path, tokenizer=None, tokenizer_kind="bpe", tokenizer_max_vocab=200,
                   data_options={"cache_dir": str(tmp_path / "cache"), "progress": False})
    dcfg = trainconfig.data_config(cfg, cfg.block_size)
    args = (dcfg, cfg.tokenizer_min_freq, cfg.tokenizer_max_vocab)
    assert tokenizer_cache_dir(*args, "bpe") != tokenizer_cache_dir(*args)
    trained = build.load_or_train_tokenizer(cfg, dcfg)
    assert (tokenizer_cache_dir(*args, "bpe") / "tokenizer.json").is_file()
    cached = build.load_or_train_tokenizer(cfg, dcfg)
    assert isinstance(trained, BPETokenizer) and isinstance(cached, BPETokenizer)
    assert tokenizer_fingerprint(cached) == tokenizer_fingerprint(trained)
    text = Path(assets["corpus"]).joinpath(sorted(os.listdir(assets["corpus"]))[0]).read_text()
    assert cached.encode(text) == trained.encode(text)
    # preset auto sizes its models at each kind's vocabulary: pieces, bytes, special tokens
    assert budget.probe_vocab(cfg) == 200 + 256 + len(BPE_SPECIAL_TOKENS)
    code = dataclasses.replace(cfg, tokenizer_kind="code")
    assert budget.probe_vocab(code) == 200 + 256 + len(CODE_SPECIAL_TOKENS)


def test_a_tokenizer_another_run_cached_first_is_kept(assets, tmp_path, monkeypatch):
    """Two runs training the same tokenizer at once: the second to finish keeps the first's cache
    entry, which a third run may be loading, and does not replace it (published once)."""
    cfg = tiny_cfg(assets, tmp_path, tokenizer=None,
                   data_options={"cache_dir": str(tmp_path / "cache"), "progress": False})
    dcfg = trainconfig.data_config(cfg, cfg.block_size)
    cached = tokenizer_cache_dir(dcfg, cfg.tokenizer_min_freq, cfg.tokenizer_max_vocab)
    train = CodeTokenizer.train

    def train_while_another_run_caches(*args, **kwargs):
        tok = train(*args, **kwargs)
        def publish(entry):  # the other run's entry, published meanwhile
            tok.save(entry)
            (entry / "first").write_text("")

        publish_cache_entry(cached, publish)
        return tok

    monkeypatch.setattr(CodeTokenizer, "train", staticmethod(train_while_another_run_caches))
    tok = build.load_or_train_tokenizer(cfg, dcfg)
    assert (cached / "first").exists()
    assert sorted(p.name for p in cached.parent.iterdir() if p.name.startswith(".")) == []
    assert load_tokenizer(cached).vocab_size == tok.vocab_size


def test_a_trained_tokenizer_is_named_with_its_size_and_settings(assets, tmp_path, capsys):
    """A run that trains its tokenizer says how many tokens it holds and the settings that made
    it, from the cache too."""
    cfg = tiny_cfg(assets, tmp_path, tokenizer=None, tokenizer_min_freq=11,
                   data_options={"cache_dir": str(tmp_path / "cache"), "progress": False})
    dcfg = trainconfig.data_config(cfg, cfg.block_size)
    tok = build.load_or_train_tokenizer(cfg, dcfg)
    said = (f"tokenizer: {tok.vocab_size:,} tokens, the code tokenizer trained on the train "
            "split (min_freq 11, max_vocab 4000)")
    assert capsys.readouterr().out == said + "\n"
    build.load_or_train_tokenizer(cfg, dcfg)
    assert capsys.readouterr().out == said + ", from the cache\n"


def test_a_new_encoding_version_trains_a_new_tokenizer(assets, tmp_path, monkeypatch):
    """The cached vocabulary is keyed by tokenizer.ENCODING_VERSION: after a `regex` upgrade or
    a piece-rule change it is trained anew, not reused as trained under the old rule."""
    cache = tmp_path / "cache"
    cfg = tiny_cfg(assets, tmp_path, tokenizer=None,
                   data_options={"cache_dir": str(cache), "progress": False})
    dcfg = trainconfig.data_config(cfg, cfg.block_size)
    build.load_or_train_tokenizer(cfg, dcfg)
    build.load_or_train_tokenizer(cfg, dcfg)  # a cache hit
    assert len(list(cache.glob("tokenizer-*"))) == 1
    monkeypatch.setattr(encoding, "ENCODING_VERSION", ENCODING_VERSION + "-other")
    build.load_or_train_tokenizer(cfg, dcfg)
    assert len(list(cache.glob("tokenizer-*"))) == 2


def test_a_resume_on_data_built_anew_says_it_is_not_the_runs(assets, tmp_path, monkeypatch,
                                                             capsys):
    """codelm's encoding changes between a run and its resume (an upgrade: ENCODING_VERSION, a
    task's cut rule): the data is rebuilt and the run goes on with other examples, so the resume
    says so. A resume on the same data says nothing."""
    cfg = tiny_cfg(assets, tmp_path, max_steps=4, data_options={
        "cache_dir": str(tmp_path / "cache"), "progress": False})
    run = tm.train(cfg).run_dir
    tm.train(dataclasses.replace(cfg, resume=str(run), max_steps=6))
    assert "training data" not in capsys.readouterr().err
    monkeypatch.setattr(encoding, "ENCODING_VERSION", ENCODING_VERSION + "-other")
    tm.train(dataclasses.replace(cfg, resume=str(run), max_steps=8))
    err = capsys.readouterr().err
    assert "warning: the training data is not the one run trained on (entry " in err
    assert "this resume is not bit-exact" in err and err.count("warning: the training") == 1


def test_best_is_never_written_before_a_checkpoint(assets, tmp_path, monkeypatch):
    """The first best/ follows a checkpoint of its step: a kill between the first best/ and the
    first checkpoint would leave a run that --resume and the same command both refuse."""
    seen = []
    save_best = record.RunRecord.best

    def checked(self, step, metrics, model):
        seen.append([p.name for p in rundir.list_checkpoints(self.run_dir)])
        save_best(self, step, metrics, model)

    monkeypatch.setattr(record.RunRecord, "best", checked)
    result = tm.train(tiny_cfg(assets, tmp_path, max_steps=4, eval_every=2, save_every=50))
    assert seen and seen[0] == ["step-2"]
    saved = [p.name for p in rundir.list_checkpoints(result.run_dir)]
    assert saved[-1] == "step-4"


def test_labels_that_are_not_the_next_tokens_stop_the_run(assets, tmp_path, monkeypatch):
    """Unshifted labels (a data bug) make training trivially easy: --overfit-batches would pass
    in fewer steps than on intact data. The run refuses them before training."""
    def unshifted(self, i):
        chunk = torch.from_numpy(self.tokens[i : i + self.block_size].astype("int64"))
        return {"input_ids": chunk, "labels": chunk.clone()}

    monkeypatch.setattr(LMWindows, "__getitem__", unshifted)
    cfg = tiny_cfg(assets, tmp_path, overfit_batches=1, max_steps=5)
    with pytest.raises(ValueError, match=r"train example 0: its labels are not the next input "):
        tm.train(cfg)
    assert not list(tmp_path.rglob("checkpoints"))


# --------------------------------------------------------------------------------------------
# Resume: kill -9 (mid-step or mid-checkpoint-write), SIGTERM; then --resume == straight run
# --------------------------------------------------------------------------------------------

KILLER = r"""
import os, signal, sys
import torch
from codelm.training import trainer as trainer_module
import trainingmanager as tm

mode, at = sys.argv[1], int(sys.argv[2])
if mode == "step":  # SIGKILL itself at the start of training step `at`
    original = trainer_module.Trainer.train_step
    calls = [0]

    def train_step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), getattr(signal, "SIGKILL"))
        return original(self, *args, **kwargs)

    trainer_module.Trainer.train_step = train_step
elif mode == "write":  # SIGKILL in the middle of writing checkpoint `at`
    original = torch.save

    def save(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and "format_version" in obj and obj["step"] == at:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(obj, path, *args, **kwargs)

    torch.save = save
elif mode == "sigterm":  # a polite stop request as step `at` ends
    original = trainer_module.Trainer.train_step
    calls = [0]

    def train_step(self, *args, **kwargs):
        calls[0] += 1
        stats = original(self, *args, **kwargs)
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    trainer_module.Trainer.train_step = train_step
sys.exit(tm.main(sys.argv[3:]))
"""


def _interrupted_then_resumed(cfg: trainconfig.TrainConfig, tmp_path: Path, mode: str, at: int):
    config = write_config(cfg, tmp_path / f"{cfg.name}.json")
    proc = subprocess.run([sys.executable, "-c", KILLER, mode, str(at), "--config", str(config)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    run = Path(cfg.out_dir) / cfg.name
    return proc, run


def _resume(run: Path) -> None:
    assert tm.main(["--resume", str(run)]) == 0


@pytest.mark.slow
def test_lora_resume_is_bit_exact_and_saves_only_the_adapter(assets, tmp_path):
    """A LoRA run killed (SIGKILL) at step 7 and resumed ends on the adapter of a run that went
    straight through, bit for bit; its adapter file holds only LoRA tensors and its export is a
    PEFT adapter (adapter_config.json)."""
    from tiny_hf import save_tiny_hf

    base = tmp_path / "base"
    save_tiny_hf("llama", base, vocab_size=512)
    common = dict(preset="tiny", init_from=str(base), lora_r=4, lora_alpha=8.0,
                  lora_dropout=0.1, lora_targets=["q_proj", "v_proj"], max_steps=10,
                  grad_accum=2, export=True)
    straight = tm.train(tiny_cfg(assets, tmp_path, name="straight", **common))
    cfg = tiny_cfg(assets, tmp_path, name="killed", **common)
    proc, run = _interrupted_then_resumed(cfg, tmp_path, "step", 7)
    assert proc.returncode == -9, proc.stderr[-2000:]
    _resume(run)
    a = final_weights(straight.run_dir, 10, rundir.ADAPTER_FILE)
    assert a and all("lora" in k for k in a)
    assert_bit_equal(a, final_weights(run, 10, rundir.ADAPTER_FILE))
    assert (run / "export" / "adapter_config.json").is_file()


def test_a_packed_run_resumes_bit_exactly_after_kill_9(assets, tmp_path):
    """--packing: the rows are packed once, from the seed, so a run killed mid-step and
    resumed ends on the straight run's weights; rows hold several examples, and the packed run
    trains other weights than the unpacked one."""
    common = dict(task="completion", packing=True, block_size=64, max_steps=10, grad_accum=2)
    straight = tm.train(tiny_cfg(assets, tmp_path, name="straight", **common))
    cfg = tiny_cfg(assets, tmp_path, name="killed", **common)
    proc, run = _interrupted_then_resumed(cfg, tmp_path, "step", 7)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "packing: " in proc.stdout
    _resume(run)
    assert_bit_equal(final_weights(straight.run_dir, 10), final_weights(run, 10))
    unpacked = tm.train(tiny_cfg(assets, tmp_path, name="unpacked",
                                 **{**common, "packing": False}))
    a, b = final_weights(straight.run_dir, 10), final_weights(unpacked.run_dir, 10)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_overfit_batches_of_a_packed_task_are_k_batches_of_examples(assets, tmp_path, capsys):
    """--overfit-batches K with packing asked: K global batches of --batch-size examples each,
    padded (packed, the chosen examples would fill fewer rows than one batch), said so."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"input": f"x = {i}\n", "output": f"x = {i + 1}\n"})
                             + "\n" for i in range(60)))
    cfg = tiny_cfg(assets, tmp_path, task="refactor", data=[str(pairs)], packing=True,
                   block_size=128, batch_size=4, grad_accum=1, overfit_batches=2, max_steps=1,
                   eval_every=1)
    run = built_run(cfg)
    assert len(run.data.batches.train) == 8
    out = capsys.readouterr().out
    assert "packing: off: the 8 training examples" in out and "overfit_batches" in out


def test_a_packed_run_counts_its_rows_as_rows(assets, tmp_path, capsys):
    """--packing: a row holds several examples, and batch_size counts rows: the run's first
    line and its epochs count rows, never calling them examples."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"input": f"x = {i}\n", "output": f"x = {i + 1}\n"})
                             + "\n" for i in range(60)))
    tm.train(tiny_cfg(assets, tmp_path, task="refactor", data=[str(pairs)], packing=True,
                      block_size=128, max_steps=1, eval_every=1))
    out = capsys.readouterr().out
    examples, rows = map(int, re.search(r"packing: (\d+) training examples in (\d+) rows",
                                        out).groups())
    assert rows < examples
    assert f"{rows} training rows ({examples} examples packed)" in out
    assert f"epochs of {rows} rows)" in out and f"{rows} training examples" not in out
    with pytest.raises(ValueError, match=r"has \d+ rows, fewer than one global batch"):
        Batches([{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([2, 3])}] * 3, [],
                0, batch_size=8, grad_accum=1, seed=0, pack_into=64)


def test_an_lm_run_with_packing_keeps_each_file_to_itself(assets, tmp_path):
    """--packing on the lm task: the windows stay as they are, their files told apart (each
    attends only to itself and the EOS that opens it): the run trains, and its validation loss
    differs from the unpacked run's, whose files see the files before them."""
    common = dict(task="lm", max_steps=4, eval_every=4, save_every=4)
    packed = tm.train(tiny_cfg(assets, tmp_path, name="packed", packing=True, **common))
    plain = tm.train(tiny_cfg(assets, tmp_path, name="plain", **common))
    assert math.isfinite(packed.val_metrics["val_loss"])
    assert packed.val_metrics["val_loss"] != plain.val_metrics["val_loss"]


def test_lora_on_a_bf16_base_trains_like_the_fp32_base(assets, tmp_path):
    """--base-dtype bf16: the frozen base is held in bf16 (half the memory), the adapters in
    fp32; the run follows the fp32-base run's losses and its merged export is fp32 again."""
    from tiny_hf import save_tiny_hf

    base = tmp_path / "base"
    save_tiny_hf("llama", base, vocab_size=512)
    common = dict(preset="tiny", init_from=str(base), lora_r=4, lora_alpha=8.0,
                  lora_targets=["q_proj", "v_proj"], max_steps=6, eval_every=6, save_every=6)
    runs = {}
    for dtype in ("fp32", "bf16"):
        cfg = tiny_cfg(assets, tmp_path, name=dtype, base_dtype=dtype, export=dtype == "bf16",
                       export_merged=True, **common)
        model = loading.build_model(model_settings(cfg), load_tokenizer(assets["tokenizer"]))
        kinds = {p.dtype for n, p in model.named_parameters() if "lora" not in n}
        assert kinds == {SHORT_DTYPES[dtype]}
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        runs[dtype] = tm.train(cfg)
    losses = {k: [json.loads(line)["loss"] for line in
                  (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
              for k, r in runs.items()}
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) < 0.01 * a
    # The adapters learn the same update (B starts at zero, so B is all that was learned).
    adapters = {k: final_weights(r.run_dir, 6, rundir.ADAPTER_FILE) for k, r in runs.items()}
    for name, b32 in adapters["fp32"].items():
        if "lora_B" in name:
            cos = F.cosine_similarity(b32.flatten(), adapters["bf16"][name].flatten(), dim=0)
            assert b32.abs().max() > 0 and cos > 0.99, (name, float(cos))
    merged = load_file(runs["bf16"].run_dir / "export" / "merged" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.float32}
    with pytest.raises(ValueError, match=r"base_dtype \('bf16', --base-dtype\): only a frozen base"):
        plan.validate_config(trainconfig.TrainConfig(base_dtype="bf16"))


def test_full_training_with_a_16_bit_base_names_the_precision_flag_to_use():
    """The advice names the key with its flag, "precision bf16 (--precision)", not a bare
    "precision bf16", which a trainingmanager.py user cannot type."""
    with pytest.raises(ValueError, match=r"or precision bf16 \(--precision\) for 16-bit compute$"):
        plan.validate_config(trainconfig.TrainConfig(base_dtype="bf16"))


def test_model_options_on_a_loaded_model_set_its_dropouts_or_are_refused(assets, tmp_path):
    """--model-options under --init-from sets the loaded model's dropouts (a fine-tune asking
    for attn_dropout 0 gets 0, not StarCoder's 0.1); bogus keys and shape keys are refused."""
    base = tiny_llama(tmp_path)
    cfg = tiny_cfg(assets, tmp_path, init_from=str(base), lora_r=4,
                   model_options={"attn_dropout": 0.25, "embd_dropout": 0.0})
    plan.validate_config(cfg)
    model = loading.build_model(model_settings(cfg), load_tokenizer(assets["tokenizer"]))
    assert (model.cfg.attn_dropout, model.cfg.embd_dropout) == (0.25, 0.0)
    for options, message in (
            ({"n_layer": 7, "bogus": 1}, "model_options (--model-options): bogus, n_layer: the "
             f"checkpoint of init_from ({str(base)!r}, --init-from) fixes these; a loaded model "
             "takes only "
             "attn_dropout, dropout, embd_dropout"),
            ({"attn_dropout": 1.5}, "attn_dropout must be a probability in [0, 1), got 1.5")):
        with pytest.raises(ValueError, match=re.escape(message)):
            plan.validate_config(dataclasses.replace(cfg, model_options=options))


def test_a_preset_beside_init_from_that_names_another_shape_is_noted(assets, tmp_path, capsys):
    """The model init_from loads trains as it is: a preset naming another shape (typed by
    habit) is said to go unused; preset auto, or one naming the loaded shape, says nothing."""
    base = tiny_llama(tmp_path)  # llama, 2 layers, 4 heads, width 64: preset tiny's shape
    plan.validate_config(tiny_cfg(assets, tmp_path, init_from=str(base), preset="code-3x128"))
    err = capsys.readouterr().err
    assert "note: preset ('code-3x128', --preset) is not the shape of the model" in err, err
    assert "(llama, 2 layers, 4 heads, width 64)" in err and "the preset goes unused" in err
    for preset in ("auto", "tiny"):
        plan.validate_config(tiny_cfg(assets, tmp_path, init_from=str(base), preset=preset))
        assert "preset" not in capsys.readouterr().err
    # the command line checks its settings once: one note (the base has no tokenizer.json)
    assert tm.main(["--init-from", str(base), "--preset", "code-3x128", "--max-steps", "1",
                    "--data", assets["corpus"], "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("note: preset") == 1 and "no tokenizer.json" in err, err


def test_merged_export_of_a_bf16_checkpoint_is_bf16_as_lora_py_merges(assets, tmp_path, capsys):
    """export_merged writes the checkpoint's own bf16, as `python lora.py` does, not the fp32
    training copy (twice the bf16 base's size): both merge alike, bit for bit. Each merged
    directory names the run's task, so its prompts start as the run's do wherever it lies (an
    lm run's after an EOS); a task the file names that codelm lacks is warned of, and prompts
    start as a base's; `python -m codelm.models.pretrained` keeps the task in its copy."""
    from tiny_hf import tiny_hf_model

    import lora

    base = tmp_path / "base"
    tiny_hf_model("llama", vocab_size=512).to(torch.bfloat16).save_pretrained(base)
    cfg = tiny_cfg(assets, tmp_path, preset="tiny", init_from=str(base), lora_r=4,
                   lora_targets=["q_proj", "v_proj"], max_steps=2, eval_every=2,
                   export=True, export_merged=True)
    export = tm.train(cfg).run_dir / "export"
    merged = load_file(export / "merged" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert lora.main([str(export), str(tmp_path / "cli")]) == 0
    assert_bit_equal(merged, load_file(tmp_path / "cli" / "model.safetensors"))
    run_start = loading.load_model(str(export), "cpu").prompt_start
    tok = load_tokenizer(export)
    assert run_start == [tok.eos_id, *tok.template_prefix]  # a base's prompts: the prefix alone
    for directory in (export / "merged", tmp_path / "cli"):
        shutil.copytree(directory, tmp_path / "elsewhere" / directory.name)
        copied = loading.load_model(str(tmp_path / "elsewhere" / directory.name), "cpu")
        assert copied.prompt_start == run_start, directory
    assert pretrained.main([str(tmp_path / "cli"), str(tmp_path / "cast"), "--dtype", "fp32"]) == 0
    assert loading.load_model(str(tmp_path / "cast"), "cpu").prompt_start == run_start
    config = tmp_path / "cli" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "codelm_task": "poetry"}))
    (tmp_path / "cli" / process.MANIFEST_FILE).unlink()
    capsys.readouterr()
    assert loading.load_model(str(tmp_path / "cli"), "cpu").prompt_start == tok.template_prefix
    assert "config.json: codelm_task 'poetry' is no codelm task" in capsys.readouterr().err


def test_gradient_checkpointing_trains_like_the_plain_run(assets, tmp_path):
    """Recomputing each block in the backward (dropout masks replayed) gives the plain run's
    weights, with LoRA on a dropout-carrying model too."""
    base = tiny_llama(tmp_path)
    for extra in ({}, {"init_from": str(base), "lora_r": 4, "lora_dropout": 0.1}):
        common = dict(max_steps=3, dropout=0.1, eval_every=3, save_every=3, **extra)
        plain = tm.train(tiny_cfg(assets, tmp_path, name=f"plain{len(extra)}", **common))
        ckpt = tm.train(tiny_cfg(assets, tmp_path, name=f"ckpt{len(extra)}",
                                 gradient_checkpointing=True, **common))
        file = rundir.ADAPTER_FILE if extra else rundir.MODEL_FILE  # a LoRA run on a base: adapters
        a, b = final_weights(plain.run_dir, 3, file), final_weights(ckpt.run_dir, 3, file)
        assert a and a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_compiled_training_matches_eager(assets, tmp_path):
    """compile=True trains to the weights eager mode reaches (within 1e-4 after four steps):
    torch.compile changes how fast a run goes, not what it learns."""
    eager = tm.train(tiny_cfg(assets, tmp_path, name="eager", max_steps=4))
    compiled = tm.train(tiny_cfg(assets, tmp_path, name="compiled", max_steps=4, compile=True))
    a, b = final_weights(eager.run_dir, 4), final_weights(compiled.run_dir, 4)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k


# --------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# --overfit
# --------------------------------------------------------------------------------------------


def test_overfit_passes_on_the_bundled_corpus(capsys):
    """--overfit alone, the quick check that a setup can learn, passes on the corpus shipped with
    codelm: the model reproduces all 4 of its files exactly."""
    assert tm.main(["--overfit", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PASS") and "reproduces all 4 files exactly" in out


@pytest.mark.parametrize("step_s, lines_at", [(31.0, [1, 2, 3, 4, 5, 6]), (10.0, [3, 6])])
def test_overfit_says_how_it_goes_at_least_every_30_s_without_a_bar(monkeypatch, capsys, step_s,
                                                                     lines_at):
    """--overfit --no-progress (or in a log file, where no bar shows) prints a line of its step
    and loss within OVERFIT_LINE_S of the last, on a clock that each step moves by ``step_s``;
    the verdict stays the last line."""
    now = [0.0]
    train_step = trainer_module.Trainer.train_step

    def timed(self, *args, **kwargs):
        now[0] += step_s
        return train_step(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", timed)
    cfg = trainconfig.TrainConfig(overfit=True, progress=False)
    passed, report = tm.run_overfit(cfg, max_steps=6, clock=lambda: now[0])
    lines = capsys.readouterr().out.splitlines()
    assert [int(re.match(r"overfit: step (\d+)/6 \| loss ", line).group(1))
            for line in lines] == lines_at
    assert not passed and report.startswith("FAIL")


def test_overfit_fails_with_a_diagnosis_on_a_transposed_batch(monkeypatch, capsys):
    """The model reads its (B, T) input as (T, B)."""
    from architecture import Transformer

    forward = Transformer.forward

    def transposed(self, input_ids, attention_mask=None):
        return forward(self, input_ids.t().contiguous()).transpose(0, 1)

    monkeypatch.setattr(Transformer, "forward", transposed)
    assert tm.main(["--overfit", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL") and "transposed-batch bug" in out


def test_overfit_fails_with_a_diagnosis_when_the_model_sees_the_future(monkeypatch, capsys):
    """Labels shifted twice in the model (predicting from the next token) are a leak."""
    from architecture import Transformer

    forward = Transformer.forward

    def leaky(self, input_ids, attention_mask=None):
        return forward(self, torch.roll(input_ids, -1, dims=1))

    monkeypatch.setattr(Transformer, "forward", leaky)
    assert tm.main(["--overfit", "--no-progress"]) == 1
    assert "sees the future" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Broken checkpoints, changed configs, paths, logs, exit codes, range checks
# --------------------------------------------------------------------------------------------


def _tiny_config_file(assets, tmp_path: Path, **overrides) -> str:
    cfg = tiny_cfg(assets, tmp_path, **overrides)
    return str(write_config(cfg, tmp_path / f"{cfg.name}.json"))


def test_broken_checkpoint_falls_back_to_the_one_before_and_then_fails_clearly(assets, tmp_path,
                                                                               capsys):
    """A truncated model.safetensors: the run resumes from the checkpoint before it (bit-exact)
    and keeps the broken one aside; garbage or missing state.pt everywhere: a clear error."""
    config = _tiny_config_file(assets, tmp_path, max_steps=8, dropout=0.1)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    straight = {k: t.clone() for k, t in final_weights(run, 8).items()}  # not the mmap
    weights = run / "checkpoints" / "step-8" / rundir.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    assert tm.main(["--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "step-8: corrupt or incomplete checkpoint (model.safetensors" in err
    assert [p.name.startswith("broken-step-8") for p in (run / "checkpoints").iterdir()].count(
        True) == 1
    assert_bit_equal(straight, final_weights(run, 8))  # trained again from step 4

    (run / "checkpoints" / "step-8" / rundir.STATE_FILE).write_bytes(b"garbage, not a pickle")
    (run / "checkpoints" / "step-4" / rundir.STATE_FILE).unlink()
    assert tm.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "step-8: corrupt or incomplete checkpoint (state.pt" in err
    assert "step-4: corrupt or incomplete checkpoint (state.pt" in err
    assert "Traceback" not in err and "weights_only" not in err


class _RunsCode:
    """An object whose unpickling runs a command (touches ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_state_pt_whose_pickle_would_run_code_is_refused_and_never_run(tmp_path):
    """A checkpoint's state.pt is read as tensors and plain data alone (weights_only): one
    holding an object whose unpickling runs a command is a corrupt checkpoint, and the command
    never runs."""
    marker = tmp_path / "ran"
    step = tmp_path / "step-4"
    step.mkdir()
    torch.save({"format_version": _RunsCode(marker)}, step / rundir.STATE_FILE)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"step-4: corrupt .*state\.pt"):
        checkpoint.read_state(step)
    assert not marker.exists()


@pytest.mark.parametrize("version", [checkpoint.FORMAT_VERSION,
                                     checkpoint.SHARDED_FORMAT_VERSION])
def test_a_state_pt_whose_format_and_shards_disagree_is_a_corrupt_checkpoint(tmp_path, version):
    """A state.pt's format_version says whether the checkpoint's weights are shards: the
    one-file version beside a sharded/ directory, or the sharded one without it, is a corrupt
    checkpoint naming both."""
    step = tmp_path / "step-4"
    step.mkdir()
    if version == checkpoint.FORMAT_VERSION:
        (step / checkpoint.SHARDED_DIR).mkdir()
    torch.save({"format_version": version}, step / rundir.STATE_FILE)
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=rf"step-4: corrupt .*format_version {version} and sharded/ disagree"):
        checkpoint.read_state(step)


def test_a_damaged_run_config_names_the_checkpoints_copy_that_restores_it(assets, tmp_path,
                                                                           capsys):
    """A run's config.json cut short: --resume names the file and line, and the copy its newest
    checkpoint holds; that copy put back, the run resumes."""
    config = _tiny_config_file(assets, tmp_path, max_steps=8)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    saved = run / rundir.CONFIG_FILE
    saved.write_text(saved.read_text()[:50])
    capsys.readouterr()
    assert tm.main(["--resume", str(run), "--max-steps", "9"]) == 2
    err = capsys.readouterr().err
    copy = run / "checkpoints" / "step-8" / rundir.CONFIG_FILE
    assert f"{saved}: invalid JSON at line" in err and f"copy {copy} over it" in err, err
    shutil.copyfile(copy, saved)
    assert tm.main(["--resume", str(run), "--max-steps", "9"]) == 0


@pytest.mark.parametrize("name", [rundir.MODEL_FILE, rundir.STATE_FILE, rundir.CONFIG_FILE])
def test_a_checkpoint_with_flipped_bytes_is_set_aside_and_the_one_before_used(assets, tmp_path,
                                                                              capsys, name):
    """16 flipped bytes in the newest checkpoint's tensor data, state or config: its manifest
    tells; the resume warns naming the file and continues bit-exactly from the one before."""
    config = _tiny_config_file(assets, tmp_path, max_steps=8, dropout=0.1)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    straight = {k: t.clone() for k, t in final_weights(run, 8).items()}
    damaged = run / "checkpoints" / "step-8" / name
    data = bytearray(damaged.read_bytes())
    at = len(data) - 64 if name != rundir.CONFIG_FILE else 2  # tensor bytes; a key's quote
    data[at:at + 16] = bytes(b ^ 0xFF for b in data[at:at + 16])
    damaged.write_bytes(data)
    capsys.readouterr()
    assert tm.main(["--resume", str(run)]) == 0
    out, err = capsys.readouterr()
    assert f"step-8: corrupt or incomplete checkpoint ({name}" in err
    assert "from step-4" in out
    assert sum(p.name.startswith("broken-step-8") for p in (run / "checkpoints").iterdir()) == 1
    assert_bit_equal(straight, final_weights(run, 8))


def test_a_stop_mid_step_drops_the_step_and_the_resume_replays_it_exactly(assets, tmp_path,
                                                                          monkeypatch, capsys):
    """SIGTERM during the second micro-batch's forward of step 6: the stop is acted on at the
    next block (here in the backward), the step is dropped before its update, the checkpoint is
    of step 5 with the data order and RNG of step 6's start, and the resume runs to the end
    bit-equal to a run never stopped."""
    import signal
    import threading

    common = dict(grad_accum=3, max_steps=8, save_every=4, dropout=0.1)
    tm.train(tiny_cfg(assets, tmp_path, name="straight", **common))
    straight = final_weights(tmp_path / "runs" / "straight", 8)

    original, calls = trainer_module.Trainer.train_step, [0]

    def train_step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] != 6:
            return original(self, *args, **kwargs)
        forwards = [0]

        def stop_in_second_micro_batch(block, args):
            forwards[0] += 1
            if forwards[0] == 2:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

        last_mlp = self.raw_model.blocks[-1].mlp  # after the trainer's own check there
        hook = last_mlp.register_forward_pre_hook(stop_in_second_micro_batch)
        try:
            return original(self, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    cfg = tiny_cfg(assets, tmp_path, name="stopped", **common)
    assert tm.train(cfg).interrupted == "SIGTERM"
    assert "SIGTERM: step 6 dropped mid-way" in capsys.readouterr().out
    run = tmp_path / "runs" / "stopped"
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step-4", "step-5"]
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original)
    _resume(run)
    assert_bit_equal(straight, final_weights(run, 8))


def test_a_step_beyond_the_machine_refuses_the_run_with_one_line_unless_forced(
        assets, tmp_path, monkeypatch, capsys):
    """A run of fixed steps whose step is estimated beyond budget.MAX_STEP_S (as the tiny
    preset's is at --block-size 100000 on a CPU) ends before its first step, exit 2, with one
    line naming --block-size, --batch-size and --force; with --force it trains, warned."""
    slow = budget.StepCost(activation_bytes=2**20, seconds=2 * budget.MAX_STEP_S)
    monkeypatch.setattr(budget, "step_cost", lambda *args: slow)
    config = _tiny_config_file(assets, tmp_path, max_steps=2)
    capsys.readouterr()
    assert tm.main(["--config", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: block_size 32 x batch_size 4: one step takes about")
    assert err.count("\n") == 1 and "--block-size" in err and "--force" in err
    assert tm.main(["--config", config, "--force"]) == 0
    assert "warning: block_size 32 x batch_size 4" in capsys.readouterr().err


def test_a_step_measured_beyond_the_machine_once_is_measured_again_before_a_refusal(
        assets, tmp_path, monkeypatch):
    """The step's first measure beyond budget.MAX_STEP_S (a load passing by), its second within:
    the faster counts and the run trains; measured beyond twice, it is refused."""
    slow = budget.StepCost(activation_bytes=2**20, seconds=2 * budget.MAX_STEP_S)
    fast = budget.StepCost(activation_bytes=2**20, seconds=0.01)
    measures = iter([slow, fast])
    monkeypatch.setattr(budget, "step_cost", lambda *args: next(measures))
    cfg = tiny_cfg(assets, tmp_path, name="passing", max_steps=2)
    assert tm.train(cfg).step == 2
    monkeypatch.setattr(budget, "step_cost", lambda *args: slow)
    with pytest.raises(budget.StepRefused, match=r"one step takes about .*--block-size"):
        tm.train(dataclasses.replace(cfg, name="beyond"))


def test_preset_auto_refuses_a_block_beyond_the_machine_before_timing_a_rung_unless_forced(
        assets, tmp_path, monkeypatch, capsys):
    """Preset auto measures its smallest rung's step on short sequences before it times any
    rung: at --block-size 100000 that step is beyond the machine (its memory, or
    budget.MAX_STEP_S), and on a quiet CPU the run ends at once, exit 2, in one line naming
    --block-size and --force, with no rung timed and no data prepared. With --force (a step
    faked beyond the limit) it takes the smallest rung untimed and trains."""

    def never(*args, **kwargs):
        raise AssertionError("preset auto timed a rung beyond the machine's limit")

    monkeypatch.setattr(build, "measure_speed", never)
    monkeypatch.setattr(build, "prepare_data", never)
    monkeypatch.setattr(plan, "others_running", lambda: 0)
    config = _tiny_config_file(assets, tmp_path, preset="auto", max_steps=None, lr=None,
                               warmup_steps=None)
    capsys.readouterr()
    assert tm.main(["--config", config, "--block-size", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: block_size 100000 x batch_size 4:"), err
    assert err.count("\n") == 1 and "--block-size" in err and "--force" in err
    monkeypatch.undo()
    monkeypatch.setattr(build, "measure_speed", never)
    slow = budget.StepCost(activation_bytes=2**20, seconds=2 * budget.MAX_STEP_S)
    monkeypatch.setattr(budget, "step_cost", lambda *args: slow)
    fixed = _tiny_config_file(assets, tmp_path, name="forced", preset="auto", max_steps=2,
                              lr=None, warmup_steps=None)
    assert tm.main(["--config", fixed, "--force"]) == 0
    captured = capsys.readouterr()
    smallest = trainconfig.BUDGET_LADDER[0]["preset"]
    assert f"preset auto: {smallest}" in captured.out and "untimed" in captured.out
    assert "warning: block_size 32 x batch_size 4" in captured.err
    saved = json.loads((tmp_path / "runs" / "forced" / "config.json").read_text())
    assert saved["preset"] == smallest


def test_a_checkpoint_is_written_only_with_finite_weights(assets, tmp_path, capsys):
    """lr 1e38 makes every weight inf at the first update: no checkpoint is written, so the
    non-finite stop names none as last good."""
    config = _tiny_config_file(assets, tmp_path, max_steps=4, save_every=1, lr=1e38,
                               warmup_steps=0)
    assert tm.main(["--config", config]) == 1
    err = capsys.readouterr().err
    assert "holds inf or NaN: no checkpoint written" in err
    assert "last good checkpoint" not in err and "no checkpoint with finite weights" in err
    assert rundir.list_checkpoints(tmp_path / "runs" / "run") == []


def _nonfinite_files(directory: Path) -> list[str]:
    """The safetensors files under ``directory`` that hold an inf or NaN tensor."""
    bad = []
    for file in directory.rglob("*.safetensors"):
        if checkpoint.nonfinite_tensor(load_file(file)) is not None:
            bad.append(str(file))
    return bad


@pytest.mark.parametrize("flags", [
    ["--lr", "1e39", "--max-steps", "1", "--eval-every", "1", "--save-every", "1"],
    ["--lr", "1e38", "--max-steps", "2", "--eval-every", "1", "--save-every", "2"],
    ["--lr", "1e39", "--max-steps", "3", "--eval-every", "3", "--save-every", "1"],
])
def test_a_diverged_run_exits_nonzero_and_keeps_no_nonfinite_weights(assets, tmp_path, capsys,
                                                                     flags):
    """An update that makes the weights inf or NaN while its gradient was finite: the next
    evaluation's non-finite loss stops the run (exit 1), never counts as an improvement, and
    best/, export/ and the checkpoints hold finite tensors only; the message names a finite
    checkpoint or none."""
    config = _tiny_config_file(assets, tmp_path, warmup_steps=0, export=True)
    assert tm.main(["--config", config, *flags]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "exported" not in err
    run = tmp_path / "runs" / "run"
    assert _nonfinite_files(run) == []
    assert not (run / rundir.EXPORT_DIR).exists()
    good = checkpoint.finite_checkpoint(rundir.list_checkpoints(run), trainable_only=False)
    assert good is None or f"last good checkpoint is {good}" in err


def test_a_nonfinite_checkpoint_with_a_valid_manifest_is_set_aside_and_refused_by_eval(
        assets, tmp_path, capsys):
    """Weights holding NaN, written with a manifest that matches them: the resume sets that
    checkpoint aside naming the tensor and continues from the one before; eval.py refuses the
    weights in one line."""
    from codelm import loading

    config = _tiny_config_file(assets, tmp_path, max_steps=8)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    newest = run / "checkpoints" / "step-8"
    weights = load_file(newest / rundir.MODEL_FILE)
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))

    def write(tmp: Path) -> None:
        for file in newest.iterdir():
            if file.name != process.MANIFEST_FILE:
                shutil.copy(file, tmp / file.name)
        save_file(weights, tmp / rundir.MODEL_FILE)

    checkpoint.write_dir_atomically(newest, write)
    assert process.manifest_problem(newest) is None
    capsys.readouterr()
    assert tm.main(["--resume", str(run), "--max-steps", "12"]) == 0
    out, err = capsys.readouterr()
    assert f"{name} holds inf or NaN" in err and "from step-4" in out
    assert sum(p.name.startswith("broken-step-8") for p in (run / "checkpoints").iterdir()) == 1

    def write_best(tmp: Path) -> None:
        save_file(weights, tmp / rundir.MODEL_FILE, metadata={"step": "8"})
        (tmp / rundir.BEST_METRICS).write_text(json.dumps({"step": 8}))

    checkpoint.write_dir_atomically(run / rundir.BEST_DIR, write_best)
    with pytest.raises(ValueError, match=f"{name} holds inf or NaN"):
        loading.load_model(run, "cpu")


def _rewrite_checkpoint(path: Path, state_change=None, weights_step: str | None = None) -> None:
    """Rewrite checkpoint ``path`` with its state.pt changed by ``state_change`` (on the raw
    dict) or its weights recording ``weights_step``, under a manifest that matches: only the
    content can tell."""
    state = torch.load(path / rundir.STATE_FILE, weights_only=True)
    if state_change is not None:
        state_change(state)
    weights = load_file(path / rundir.MODEL_FILE)

    def write(tmp: Path) -> None:
        for file in path.iterdir():
            if file.name != process.MANIFEST_FILE:
                shutil.copy(file, tmp / file.name)
        torch.save(state, tmp / rundir.STATE_FILE)
        if weights_step is not None:
            save_file(weights, tmp / rundir.MODEL_FILE, metadata={"step": weights_step})

    checkpoint.write_dir_atomically(path, write)
    assert process.manifest_problem(path) is None


def test_a_checkpoint_with_nonfinite_optimizer_moments_is_not_good_and_not_resumed(
        assets, tmp_path, capsys):
    """Adam moments holding NaN in state.pt under a manifest that matches them (finite weights):
    the checkpoint is not the last good one, and the resume sets it aside naming the tensor and
    continues from the one before to a finite end, instead of diverging steps later."""
    config = _tiny_config_file(assets, tmp_path, max_steps=8)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    step_4, step_8 = rundir.list_checkpoints(run)

    def poison(state: dict) -> None:
        for slots in state["optimizer"]["state"].values():
            for key, tensor in slots.items():
                if tensor.is_floating_point() and tensor.dim() > 0:
                    slots[key] = torch.full_like(tensor, float("nan"))

    _rewrite_checkpoint(step_8, poison)
    assert checkpoint.finite_checkpoint([step_4, step_8], trainable_only=False) == step_4
    capsys.readouterr()
    assert tm.main(["--resume", str(run), "--max-steps", "12"]) == 0
    out, err = capsys.readouterr()
    assert "step-8: corrupt or incomplete checkpoint (state.pt: optimizer state" in err
    assert "holds inf or NaN" in err and "from step-4" in out
    assert sum(p.name.startswith("broken-step-8") for p in (run / "checkpoints").iterdir()) == 1
    assert _nonfinite_files(run) == []


@pytest.mark.parametrize("disagreeing", ["state", "weights"])
def test_a_checkpoint_whose_step_disagrees_with_its_name_is_not_good_and_not_resumed(
        assets, tmp_path, capsys, disagreeing):
    """step-8 whose state.pt says step 10 (or whose weights record step 6), under a manifest
    that matches: not the last good checkpoint; the resume sets it aside naming both steps and
    continues from step-4 rather than skipping steps."""
    config = _tiny_config_file(assets, tmp_path, max_steps=8)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    step_4, step_8 = rundir.list_checkpoints(run)
    if disagreeing == "state":
        _rewrite_checkpoint(step_8, lambda state: state.update(step=10))
    else:
        _rewrite_checkpoint(step_8, weights_step="6")
    assert checkpoint.finite_checkpoint([step_4, step_8], trainable_only=False) == step_4
    capsys.readouterr()
    assert tm.main(["--resume", str(run), "--max-steps", "12"]) == 0
    out, err = capsys.readouterr()
    assert "step-8: corrupt or incomplete checkpoint" in err
    assert ("step 10" if disagreeing == "state" else "step 6") in err
    assert "from step-4 (step 4)" in out
    assert sum(p.name.startswith("broken-step-8") for p in (run / "checkpoints").iterdir()) == 1
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if '"train"' in x]
    assert steps == list(range(1, 13))  # no step skipped


def test_a_checkpoint_is_not_written_with_nonfinite_optimizer_moments(assets, tmp_path,
                                                                      monkeypatch, capsys):
    """Moments that turn NaN with the weights still finite: the checkpoint of that step is not
    written, and the stop that follows names the checkpoint before as the last good one."""
    original, calls = trainer_module.Trainer.train_step, [0]

    def train_step(self, *args, **kwargs):
        calls[0] += 1
        stats = original(self, *args, **kwargs)
        if calls[0] == 8:
            for slots in self.optimizer.state.values():
                for tensor in slots.values():
                    if tensor.is_floating_point() and tensor.dim() > 0:
                        tensor.fill_(float("nan"))
        return stats

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    cfg = tiny_cfg(assets, tmp_path, max_steps=12, eval_every=100)
    with pytest.raises(record.NonFiniteLossError) as info:
        tm.train(cfg)
    assert "step 8: optimizer state" in capsys.readouterr().err
    run = Path(cfg.out_dir) / "run"
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step-4"]
    assert f"last good checkpoint is {run / 'checkpoints' / 'step-4'}" in str(info.value)


def test_a_run_that_diverges_soon_after_its_resume_is_not_sent_back_to_that_checkpoint(
        assets, tmp_path, capsys):
    """A resume from step-8 whose loss turns NaN at step 10, before its next checkpoint: a resume
    from step-8 would replay the same steps to the same stop, so the advice names a change in a
    new run and the checkpoint before, step-4, from which the advised resume continues."""
    config = _tiny_config_file(assets, tmp_path, max_steps=8)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    step_4, step_8 = rundir.list_checkpoints(run)
    capsys.readouterr()
    assert tm.main(["--resume", str(run), "--max-steps", "12", "--inject-nan-at-step", "10"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at step 10" in err
    assert f"last good checkpoint is {step_8}" not in err
    assert f"{step_8}, is the one this run resumed from 2 step(s) before" in err
    assert "would replay the same steps" in err and "in a new run" in err
    assert f"rename {step_8} to broken-step-8" in err and f"continues from {step_4}" in err
    step_8.rename(step_8.with_name("broken-step-8"))
    assert tm.main(["--resume", str(run), "--max-steps", "12",
                    "--inject-nan-at-step", "100"]) == 0
    assert "from step-4 (step 4)" in capsys.readouterr().out


def test_a_checkpoint_without_its_weights_or_with_a_state_short_of_keys_is_corrupt(tmp_path):
    """A torch-readable state.pt that lacks a key and a checkpoint whose weights file is gone are
    CorruptCheckpointError (resume then tries the one before), not a KeyError mid-resume; the
    model is left as it was. Another format_version is refused, naming the file."""
    from architecture import PRESETS, Transformer

    ckpt = tmp_path / "step-4"
    ckpt.mkdir()
    whole = {"format_version": checkpoint.FORMAT_VERSION, **{
        f.name: getattr(checkpoint.RunState(), f.name)
        for f in dataclasses.fields(checkpoint.RunState) if f.name != "weights"}}
    for state in ({k: v for k, v in whole.items() if k != "rng"},
                  {k: v for k, v in whole.items() if k != "format_version"}, [whole]):
        torch.save(state, ckpt / rundir.STATE_FILE)
        with pytest.raises(checkpoint.CorruptCheckpointError,
                           match=r"step-4: corrupt or incomplete checkpoint \(state.pt"):
            checkpoint.read_state(ckpt)
    torch.save({**whole, "format_version": 99}, ckpt / rundir.STATE_FILE)
    with pytest.raises(ValueError, match=r"step-4/state.pt: checkpoint format_version 99"):
        checkpoint.read_state(ckpt)
    torch.save(whole, ckpt / rundir.STATE_FILE)
    assert checkpoint.read_state(ckpt) == checkpoint.RunState()
    process.write_manifest(ckpt)
    model = Transformer(PRESETS["tiny"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"step-4: corrupt.*no model\.safetensors"):
        checkpoint.load(ckpt, model, trainable_only=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_resume_refuses_settings_that_would_change_the_run(assets, tmp_path, capsys):
    """Model shape, LoRA, batch, sequence length, lr: refused with every key named and the
    run's config.json untouched, and so is an edit of that file, named; the run's length may
    change."""
    config = _tiny_config_file(assets, tmp_path, max_steps=4)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    saved = (run / "config.json").read_text()
    capsys.readouterr()
    assert tm.main(["--resume", str(run), "--n-embd", "96"]) == 2
    err = capsys.readouterr().err
    assert "n_embd=None (now 96)" in err and "Traceback" not in err
    assert tm.main(["--resume", str(run), "--lora-r", "4"]) == 2
    assert "lora_r (4, --lora-r): LoRA needs a pretrained base" in capsys.readouterr().err
    assert tm.main(["--resume", str(run), "--batch-size", "2", "--block-size", "16",
                    "--lr", "1"]) == 2
    err = capsys.readouterr().err
    assert all(f"{k}=" in err for k in ("batch_size", "block_size", "lr"))
    assert f"--resume {run} alone continues it" in err
    assert (run / "config.json").read_text() == saved
    # an edit of the run's config.json: named as where the new value comes from
    (run / "config.json").write_text(saved.replace('"n_layer": null', '"n_layer": 3'))
    assert tm.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in ("n_layer=None (now 3", f"else {run / 'config.json'}",
                                  "set them back there")), err
    (run / "config.json").write_text(saved)
    assert tm.main(["--resume", str(run), "--max-steps", "6", "--eval-every", "3",
                    "--data-options", json.dumps({"cache_dir": assets["cache"]})]) == 0
    assert rundir.list_checkpoints(run)[-1].name == "step-6"
    resumed = json.loads((run / "config.json").read_text())
    assert resumed["max_steps"] == 6
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").open())
           if r["kind"] == "train"}
    for step in (5, 6):  # step 5 too: not at the 4-step schedule's lr
        factor = trainer_module.lr_factor(step - 1, resumed["warmup_steps"], 6,
                                          resumed["min_lr_ratio"])
        assert lrs[step] == pytest.approx(resumed["lr"] * factor, rel=1e-12)


def test_sample_prompt_is_formatted_as_the_task_trained(assets, tmp_path, monkeypatch):
    """The sample shown while training starts its prompt as the task's examples start: after an
    EOS for lm, with no EOS before a refactor input, so it shows what the model learnt to
    continue."""
    tok = load_tokenizer(assets["tokenizer"])
    model = loading.build_model(model_settings(tiny_cfg(assets, tmp_path)), tok)
    seen = []

    def generate(model, idx, cfg, attention_mask=None):
        seen.append(idx[0].tolist())
        return idx

    monkeypatch.setattr(generation, "generate", generate)
    for task in ("lm", "refactor"):
        finish.sample_completion(model, tok, "def f(", 4, task)
    body = tok.encode("def f(")
    assert seen == [[tok.eos_id, *body], body]  # supervised examples do not start after an EOS


def test_a_time_budget_sizes_the_run_and_its_config_reproduces_it(assets, tmp_path,
                                                                  monkeypatch, capsys):
    """--time-budget-min: max_steps, eval_every, warmup and decay follow from the time left and
    the measured step (here given; a fake clock takes 1 s a step). The stable phase runs by the
    clock, to the last DECAY_SHARE of the training time, whatever the measured step said; the
    decay then takes the steps that fit in the time left. config.json records the final figures
    instead of the budget, so a new run of that config alone trains the same weights (the timing
    drew nothing from the RNG, and the lr holds its peak until the decay, whatever the run's
    length)."""
    _one_second_a_step(monkeypatch)
    timed = []
    time_a_step = build.time_a_step

    def measured(*args):
        timed.append(time_a_step(*args))  # really run (RNG restored), its figures replaced
        return 1.0, 2.0

    monkeypatch.setattr(build, "time_a_step", measured)
    monkeypatch.setattr(build, "budget_left", lambda cfg, created: 60.0)
    cfg = tiny_cfg(assets, tmp_path, name="budget", time_budget_min=1.0, warmup_steps=None,
                   max_steps=None, eval_every=100)
    first = tm.train(cfg)
    train_s = 60 * (1 - budget.END_SHARE)  # no export: no final evaluation
    every = int(train_s * (1 - budget.DRIFT_SHARE) - budget.EVALS_IN_BUDGET * 2.0) // budget.EVALS_IN_BUDGET
    planned = every * budget.EVALS_IN_BUDGET
    steps_s = train_s - 2.0  # the last evaluation's time kept after the steps
    decay_start = math.ceil(steps_s * (1 - budget.DECAY_SHARE))  # the clock: 1 s a step
    left = (steps_s - decay_start) * (1 - budget.DRIFT_SHARE)
    decay = int(left)  # less each evaluation due within it (2 s as measured)
    while decay + 2.0 * ((decay_start + decay) // every - decay_start // every) > left:
        decay -= 1
    out = capsys.readouterr().out
    assert timed and all(w in out for w in ("time budget 1 min", "60 s left", "1.000 s a step"))
    assert (f"max_steps {planned}, eval_every {every}, warmup_steps {int(budget.WARMUP_SHARE * planned)}"
            f", decay_steps {int(budget.DECAY_SHARE * planned)}") in out
    assert (f"the decay starts at step {decay_start}: 1.000 s a step so far" in out
            and f"decay_steps {decay}, max_steps {decay_start + decay} (planned {planned}" in out)
    saved = json.loads((first.run_dir / "config.json").read_text())
    assert (saved["max_steps"], saved["decay_steps"], saved["eval_every"],
            saved["time_budget_min"]) == (decay_start + decay, decay, every, None)
    assert first.step == saved["max_steps"] > planned
    config = tmp_path / "again.json"
    config.write_text(json.dumps({**saved, "name": "again"}))
    again = tm.train(trainconfig.config_from_dict(json.loads(config.read_text())))
    assert "the decay starts" not in capsys.readouterr().out
    assert_bit_equal(final_weights(first.run_dir, first.step),
                     final_weights(again.run_dir, again.step))
    with pytest.raises(ValueError, match=r"time_budget_min .*unset.*set one of them"):
        plan.validate_config(trainconfig.TrainConfig(time_budget_min=None))
    with pytest.raises(ValueError, match=r"preset .*auto chooses the model for time_budget_min"):
        plan.validate_config(trainconfig.TrainConfig(time_budget_min=None, max_steps=5))


def test_a_budget_times_an_evaluation_after_one_that_warms_it_up(assets, tmp_path, monkeypatch,
                                                                 capsys):
    """The first evaluation of the timing copy (a compiled model compiles its evaluation then:
    here 1,000 s on a fake clock) is not the measure: each later batch takes 0.5 s, and the plan
    keeps its four evaluations."""
    now = _one_second_a_step(monkeypatch)
    evaluate = trainer_module.Trainer.evaluate
    calls = []

    def timed(self, batches, total=None):
        calls.append(total)
        now[0] += 1000.0 if len(calls) == 1 else 0.5
        return evaluate(self, batches, total)

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", timed)
    monkeypatch.setattr(build, "budget_left", lambda cfg, created: 600.0)
    cfg = tiny_cfg(assets, tmp_path, name="warm", time_budget_min=10.0, warmup_steps=None,
                   max_steps=None, eval_every=None, save_every=None, max_time_s=5.0)
    tm.train(cfg)
    out = capsys.readouterr().out
    eval_s = float(re.search(r"([\d.]+) s an evaluation", out).group(1))
    assert calls[:2] == [1, 1] and 0 < eval_s < 1000.0
    planned = re.search(r"-> max_steps (\d+), eval_every (\d+)", out)
    assert int(planned.group(1)) == budget.EVALS_IN_BUDGET * int(planned.group(2))


@pytest.mark.parametrize(("eval_s", "evaluations"), [(10.0, 2), (30.0, 1)])
def test_a_run_with_slow_evaluations_makes_those_it_planned_and_ends_within_its_budget(
        eval_s, evaluations, assets, tmp_path, monkeypatch, capsys):
    """1 s a step and ``eval_s`` an evaluation on a fake clock, as measured: the plan's
    evaluations, the last at the run's end (the clock's decay keeps its time), and the run ends
    finished within its budget's training time."""
    now = _one_second_a_step(monkeypatch)
    evaluate = trainer_module.Trainer.evaluate
    evaluated_at = []

    def timed(self, batches, total=None):
        now[0] += eval_s
        evaluated_at.append(now[0])
        return evaluate(self, batches, total)

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", timed)
    monkeypatch.setattr(build, "time_a_step", lambda *args: (1.0, eval_s))
    monkeypatch.setattr(build, "budget_left", lambda cfg, created: 120.0)
    cfg = tiny_cfg(assets, tmp_path, name=f"slow{evaluations}", time_budget_min=2.0,
                   warmup_steps=None, max_steps=None, eval_every=None, save_every=None)
    run = tm.train(cfg)
    out = capsys.readouterr().out
    train_s = 120.0 * (1 - budget.END_SHARE)  # no export: no final evaluation
    assert len(evaluated_at) == evaluations and not run.stopped_by_budget
    assert run.step == json.loads((run.run_dir / "config.json").read_text())["max_steps"]
    assert now[0] <= train_s
    if evaluations == 1:  # the plan names no eval_every past its steps
        assert "one evaluation, at the end" in out and "over 25%" in out
        assert "evaluation at the end only" in out and "eval_every" not in out.split("->")[1]


def test_a_budget_one_evaluation_would_fill_is_refused_before_training(assets, tmp_path,
                                                                        monkeypatch):
    """An evaluation that takes most of a budget's training time (100 s of 120): refused in
    one line naming --time-budget-min and --eval-examples, before any step."""
    monkeypatch.setattr(build, "time_a_step", lambda *args: (1.0, 100.0))
    monkeypatch.setattr(build, "budget_left", lambda cfg, created: 120.0)
    cfg = tiny_cfg(assets, tmp_path, name="evalbound", time_budget_min=2.0, warmup_steps=None,
                   max_steps=None, eval_every=None, save_every=None)
    with pytest.raises(ValueError, match=r"evaluation.*--time-budget-min.*--eval-examples"):
        tm.train(cfg)


def test_steps_past_max_epochs_of_the_data_are_noted(assets, tmp_path, capsys):
    """--max-steps that see the training data more than MAX_EPOCHS times: one note, as the run
    is built (before its first step), naming the epochs, best/ and --early-stop-patience; fewer
    steps, none."""
    small = tmp_path / "small"
    small.mkdir()
    for f in sorted(Path(assets["corpus"]).iterdir())[:4]:
        shutil.copy(f, small / f.name)
    cfg = tiny_cfg(assets, tmp_path, data=[str(small)], name="many", max_steps=240,
                   eval_every=1000)
    closed(built_run(cfg))  # the note is the built run's, said before its first step
    captured = capsys.readouterr()
    epochs = float(re.search(r"240 steps \(([\d.]+) epochs", captured.out).group(1))
    assert epochs > budget.MAX_EPOCHS
    assert f"note: 240 steps are {epochs:.3g} epochs" in captured.err
    assert "--early-stop-patience" in captured.err
    closed(built_run(dataclasses.replace(cfg, name="few", max_steps=2)))
    assert "epochs of the training data" not in capsys.readouterr().err


def test_a_time_budget_larger_than_the_data_ends_after_max_epochs(assets, tmp_path, monkeypatch,
                                                                  capsys):
    """A budget that would train past MAX_EPOCHS epochs of the data (a GPU on the stdlib) stops
    there, on its plan (no re-timing), and says so; config.json records the steps."""
    _one_second_a_step(monkeypatch)
    monkeypatch.setattr(build, "time_a_step", lambda *args: (1.0, 2.0))
    monkeypatch.setattr(build, "budget_left", lambda cfg, created: 10_000.0)
    small = tmp_path / "small"  # the 4 smallest files: 8 epochs of them are few steps
    small.mkdir()
    for f in sorted(Path(assets["corpus"]).iterdir(), key=lambda f: f.stat().st_size)[:4]:
        shutil.copy(f, small / f.name)
    cfg = tiny_cfg(assets, tmp_path, data=[str(small)], name="data", time_budget_min=200.0,
                   warmup_steps=None, max_steps=None)
    run = tm.train(cfg)
    out = capsys.readouterr().out
    saved = json.loads((run.run_dir / "config.json").read_text())
    windows = int(re.search(r"\((\d+(?:\.\d+)?) epochs of (\d+) windows", out).group(2))
    every = math.ceil(budget.MAX_EPOCHS * windows / cfg.batch_size) // budget.EVALS_IN_BUDGET
    assert (saved["max_steps"], saved["eval_every"], run.step) == (every * budget.EVALS_IN_BUDGET, every, every * budget.EVALS_IN_BUDGET)
    assert f"{budget.MAX_EPOCHS} epochs of the training data end the run" in out and "--data" in out
    assert "unless the machine slows" in out


def test_a_data_bound_budget_on_a_slowed_machine_ends_within_its_budget(
        assets, tmp_path, monkeypatch, capsys):
    """A budget MAX_EPOCHS of the data would end first on the measured speed (0.1 s a step),
    on a machine then ten times slower (1 s a step on a fake clock): the clock starts the
    decay, and the run ends within its budget, short of its planned steps."""
    _one_second_a_step(monkeypatch)
    monkeypatch.setattr(build, "time_a_step", lambda *args: (0.1, 0.1))
    monkeypatch.setattr(build, "budget_left", lambda cfg, created: 100.0)
    small = tmp_path / "small"
    small.mkdir()
    for f in sorted(Path(assets["corpus"]).iterdir())[:4]:
        shutil.copy(f, small / f.name)
    cfg = tiny_cfg(assets, tmp_path, data=[str(small)], name="slowed", time_budget_min=2.0,
                   warmup_steps=None, max_steps=None, eval_every=None, save_every=None)
    run = tm.train(cfg)
    out = capsys.readouterr().out
    planned = int(re.search(r"-> max_steps (\d+)", out).group(1))
    assert "epochs of the training data end the run" in out and "the decay starts at" in out
    assert run.step < planned and run.step <= 100 * (1 - budget.END_SHARE)

def test_a_machine_that_slows_during_the_decay_still_ends_within_the_budget(
        assets, tmp_path, monkeypatch, capsys):
    """1 s a step as measured until the decay has started, then ten times slower (a fake
    clock): the run stops at the end of the budget's training time, short of the length the
    decay fixed, and says it is not finished."""
    now = _one_second_a_step(monkeypatch, slower_after=80)
    monkeypatch.setattr(build, "time_a_step", lambda *args: (1.0, 1.0))
    monkeypatch.setattr(build, "budget_left", lambda cfg, created: 100.0)
    cfg = tiny_cfg(assets, tmp_path, name="slowing", time_budget_min=2.0, warmup_steps=None,
                   max_steps=None, eval_every=None, save_every=None)
    run = tm.train(cfg)
    out = capsys.readouterr().out
    fixed = int(re.search(r"the decay starts at step (\d+).*max_steps (\d+)", out).group(2))
    assert run.stopped_by_budget and run.step < fixed
    assert now[0] <= 100.0 and "--time-budget-min, the machine slower than measured" in out


def test_a_slowed_machines_steps_stop_in_time_for_the_last_evaluation(
        assets, tmp_path, monkeypatch, capsys):
    """1 s a step as measured until step 80, then 2 s (a fake clock), and 5 s an evaluation:
    the steps stop at the first to end past the budget's training time less that evaluation
    (BudgetClock.steps_until), so the last evaluation still ends within the training time."""
    now = _one_second_a_step(monkeypatch, slower_after=80, slow_s=2.0)
    monkeypatch.setattr(build, "time_a_step", lambda *args: (1.0, 5.0))
    monkeypatch.setattr(build, "budget_left", lambda cfg, created: 100.0)
    cfg = tiny_cfg(assets, tmp_path, name="slowing", time_budget_min=2.0, warmup_steps=None,
                   max_steps=None, eval_every=None, save_every=None)
    run = tm.train(cfg)
    train_s = budget.fit_budget(cfg, 0.0, 100.0, 1.0, 5.0, 10**6).train_s
    assert run.stopped_by_budget
    assert now[0] - 2.0 <= train_s - 5.0 < now[0]  # the last step's start, its end
    capsys.readouterr()


def test_a_budgeted_run_stopped_past_its_plan_resumes_to_the_length_it_records(
        assets, tmp_path, monkeypatch, capsys):
    """A machine faster than its measure (2 s a step measured, 1 s on a fake clock) takes a
    budgeted run past its planned steps before the clock starts the decay. Its length there is
    the step plus decay_steps, with the lr at its peak: stopped (--max-time-s), the stop's line,
    config.json and the checkpoint name that one length, and the resume (--resume alone, no
    clock) decays from where it stopped and ends there."""
    _one_second_a_step(monkeypatch)
    monkeypatch.setattr(build, "time_a_step", lambda *args: (2.0, 1.0))
    monkeypatch.setattr(build, "budget_left", lambda cfg, created: 60.0)
    cfg = tiny_cfg(assets, tmp_path, name="past", time_budget_min=1.0, max_steps=None,
                   warmup_steps=None, eval_every=None, save_every=None, max_time_s=30.0)
    first = tm.train(cfg)
    out = capsys.readouterr().out
    run = first.run_dir
    saved = json.loads((run / "config.json").read_text())
    planned = int(re.search(r"-> max_steps (\d+)", out).group(1))
    length = first.step + saved["decay_steps"]
    assert first.stopped_by_budget and first.step > planned and "the decay starts at" not in out
    assert f"reached at step {first.step}/{length}: the run is not finished" in out
    last = rundir.list_checkpoints(run)[-1]
    assert last.name == f"step-{first.step}"
    assert (saved["max_steps"], json.loads((last / "config.json").read_text())["max_steps"],
            checkpoint.read_state(last).max_steps) == (length, length, length)
    assert set(_train_lrs(run).values()) == {saved["lr"]}  # no warmup: the peak throughout
    resumed = tm.train(plan.parse_config(["--resume", str(run)]))
    out = capsys.readouterr().out
    assert resumed.step == length and not resumed.stopped_by_budget
    assert f", {length} steps (" in out and "planned" not in out
    lrs = _train_lrs(run)
    for step in range(first.step + 1, length + 1):
        factor = trainer_module.lr_factor(step - 1, saved["warmup_steps"], length,
                                          saved["min_lr_ratio"], saved["decay_steps"])
        assert lrs[step] == pytest.approx(saved["lr"] * factor, rel=1e-12)
    assert lrs[first.step + 1] == saved["lr"] > lrs[length]


def test_preset_auto_takes_the_largest_rung_the_budget_trains_and_a_resume_keeps_it(
        assets, tmp_path, monkeypatch, capsys):
    """Preset auto probes BUDGET_LADDER's rungs, smallest first, and takes the largest that sees
    TOKENS_PER_PARAM tokens a parameter in the budget, in bf16 on a CPU that measures it faster;
    config.json records the choices and a resume keeps them. The machine is a fixed one (a
    quiet CPU, a 10 ms first step with memory to spare) and the run's clock a fake one (1 s a
    step, twice what was timed): the choice is the ladder's, whatever else keeps the CPU busy."""
    params, tokens = build.measure_speed(tiny_cfg(assets, tmp_path), torch.device("cpu"),
                                         distributed.Dist())
    assert params > 0 and tokens > 0  # the real probe trains the rung's model here
    ladder = tuple({"preset": "tiny", "block_size": 32, "batch_size": b, "lr": lr}
                   for b, lr in ((2, 3e-3), (4, 2e-3), (8, 1e-3)))
    budget_s = 60 * plan.TRAIN_SHARE
    params = {2: 10**5, 4: 2 * 10**5, 8: 4 * 10**5}  # tokens a second: the rung's need, but 8's
    rates = {b: plan.TOKENS_PER_PARAM * n / budget_s for b, n in params.items()}

    def probe(cfg, device, dist):
        speed = 2.0 if cfg.precision == "bf16" else 1.0
        short = 1.0 if cfg.batch_size < 8 else 0.25  # in bf16 too
        return plan.Probe(params[cfg.batch_size], rates[cfg.batch_size] * speed * short)

    monkeypatch.setattr(trainconfig, "BUDGET_LADDER", ladder)
    monkeypatch.setattr(build, "measure_speed", probe)
    monkeypatch.setattr(build, "measure_step_cost", lambda cfg, device, dist: budget.StepMeasure(
        budget.StepCost(10**6, 0.01), 10**12))
    monkeypatch.setattr(plan, "others_running", lambda: 0)
    _one_second_a_step(monkeypatch)
    monkeypatch.setattr(build, "time_a_step", lambda *args: (0.5, 2.0))
    monkeypatch.setattr(build, "budget_left", lambda cfg, created: 20.0)
    cfg = tiny_cfg(assets, tmp_path, name="auto", preset="auto", time_budget_min=1.0,
                   block_size=None, batch_size=None, lr=None, warmup_steps=None, max_steps=None)
    first = tm.train(cfg)
    out = capsys.readouterr().out
    assert "preset auto: tiny" in out
    saved = json.loads((first.run_dir / "config.json").read_text())
    assert (saved["preset"], saved["batch_size"], saved["lr"], saved["precision"]) == (
        "tiny", 4, 2e-3, "bf16")
    pinned = re.search(r"pin it with (.*)$", out, re.M)[1].split()  # the flags reproduce it
    assert trainconfig.read_config(pinned).cfg == dataclasses.replace(
        trainconfig.TrainConfig(), preset="tiny", batch_size=4, lr=2e-3,
        optimizer=saved["optimizer"] or "adamw", precision="bf16")
    again = tm.train(dataclasses.replace(cfg, resume=str(first.run_dir), time_budget_min=None,
                                         max_steps=saved["max_steps"]))
    resumed = json.loads((again.run_dir / "config.json").read_text())
    assert (resumed["preset"], resumed["batch_size"], resumed["lr"], resumed["precision"]) == (
        "tiny", 4, 2e-3, "bf16")
    assert again.step == saved["max_steps"]  # where the first run ended, or its clock stopped it


def test_the_sample_stops_where_its_function_ends(assets, tmp_path, monkeypatch):
    """The end-of-run sample decodes as eval does: cut at EOS or at the first stop string."""
    from codelm.models import generation

    tok = load_tokenizer(assets["tokenizer"])
    model = loading.build_model(model_settings(tiny_cfg(assets, tmp_path)), tok)
    more = tok.encode("    return 1\ndef g():\n    pass\n")

    def generate(model, idx, cfg, attention_mask=None):
        return torch.cat([idx, torch.tensor([more])], dim=1)

    monkeypatch.setattr(generation, "generate", generate)
    assert finish.sample_completion(model, tok, "def f():\n", 32, "lm",
                                    stops=generation.FUNCTION_STOPS) == "    return 1"
    assert finish.sample_completion(model, tok, "def f():\n", 32, "lm").startswith(
        "    return 1\ndef g():")


def test_sample_prompt_reads_special_token_text_as_the_runs_pairs_did(tmp_path, monkeypatch,
                                                                     capsys):
    """The end-of-run sample of a chat-formatted prompt: a run trained with pair_special_tokens
    gets its pairs' ids (transformers' tokenizer(prompt), one BOS); a run without it, and an lm
    run, the text, as their data, with a note saying so."""
    from tiny_hf import train_hf_tokenizer
    from transformers import PreTrainedTokenizerFast

    from architecture import Transformer

    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(20)]
    train_hf_tokenizer("llama3", texts, tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    cfg = trainconfig.TrainConfig(preset="tiny", block_size=64)
    model = Transformer(trainconfig.model_config(cfg, tok.vocab_size, tok.bos_id, tok.eos_id))
    seen = []
    monkeypatch.setattr(generation, "generate",
                        lambda model, idx, *a, **k: seen.append(idx[0].tolist()) or idx)
    prompt = "<|begin_of_text|>def f(x):<|eot_id|>"
    as_text = hf(prompt, split_special_tokens=True)["input_ids"]
    finish.sample_completion(model, tok, prompt, 4, "refactor", True)
    assert seen[-1] == hf(prompt, add_special_tokens=False)["input_ids"] != as_text[1:]
    assert capsys.readouterr().err == ""
    for task, start in (("refactor", []), ("lm", [tok.eos_id])):
        finish.sample_completion(model, tok, prompt, 4, task, task == "lm")
        assert seen[-1] == start + as_text
        err = capsys.readouterr().err
        assert all(w in err for w in ("1 prompt(s)", "special token(s)",
                                      "<|begin_of_text|>, <|eot_id|>")), err
    finish.sample_completion(model, tok, prompt, 4, "refactor")  # a caller that names no option
    assert seen[-1] == as_text


@pytest.mark.parametrize("reads", [True, False])
def test_the_end_of_run_sample_follows_the_runs_pair_special_tokens(assets, tmp_path,
                                                                    monkeypatch, reads):
    """The run's data option reaches its end-of-run sample (sample_completion's reading rule)."""
    asked = []
    monkeypatch.setattr(finish, "sample_completion", lambda *a: asked.append(a) or "")
    options = {"cache_dir": assets["cache"], "progress": False, "pair_special_tokens": reads}
    tm.train(tiny_cfg(assets, tmp_path, task="method", max_steps=1, eval_every=1,
                      warmup_steps=0, export=True, data_options=options))
    (prompt, *rest), = [a[2:] for a in asked]  # a held-out method example's header
    assert prompt.startswith("def ") and rest == [8, "method", reads, generation.FUNCTION_STOPS]


def test_a_test_split_without_the_tasks_examples_is_noted_before_training(assets, tmp_path,
                                                                          capsys):
    """A test split whose files hold none of the task's examples (no function for method) would
    leave eval.py's default split empty: the run says so as it prepares its data, naming --split
    val; a test split with examples gets no such note."""
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "settings.py").write_text("".join(f"NAME_{i} = {i}\n" for i in range(200)))
    tm.train(tiny_cfg(assets, tmp_path, task="method", max_steps=1, eval_every=1,
                      warmup_steps=0, test_data=[str(flat)]))
    err = capsys.readouterr().err
    assert "the test split holds no method examples" in err and "--split val" in err
    tm.train(tiny_cfg(assets, tmp_path, task="method", max_steps=1, eval_every=1,
                      warmup_steps=0, name="split"))
    assert "the test split holds no" not in capsys.readouterr().err


def test_a_train_split_far_below_train_frac_is_noted(assets, tmp_path, capsys):
    """Three files split by fraction give val and test one each, so a third trains, not 0.8:
    the run says so, naming --val-data and the fractions that train on all of --data (a valid
    DataConfig), and for three repositories split_by file, as dataset.py does; ten files split
    near 8/1/1 are not noted."""
    def corpus(name: str, n_files: int) -> str:
        root = tmp_path / name
        root.mkdir()
        for i in range(n_files):
            (root / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {i * j}\n"
                                                   for j in range(40)))
        return str(root)

    tm.train(tiny_cfg(assets, tmp_path, data=[corpus("three", 3)], max_steps=1, eval_every=1,
                      warmup_steps=0, name="three"))
    err = capsys.readouterr().err
    assert "the train split holds 1 of 3 files/records" in err and "train_frac 0.8" in err
    assert "--val-data DIR" in err and '"train_frac": 1, "val_frac": 0, "test_frac": 0' in err
    tm.train(tiny_cfg(assets, tmp_path, data=[corpus("ten", 10)], max_steps=1, eval_every=1,
                      warmup_steps=0, name="ten"))
    assert "the train split holds" not in capsys.readouterr().err
    DataConfig(train_frac=1, val_frac=0, test_frac=0, val_sources=["v"]).validate()  # the fix
    repos = tmp_path / "repos.jsonl"  # three repositories' records: split by repository
    repos.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 30,
                                         "repo": f"r{i % 3}", "path": f"m{i}.py"}) + "\n"
                             for i in range(12)))
    tm.train(tiny_cfg(assets, tmp_path, data=[str(repos)], max_steps=1, eval_every=1,
                      warmup_steps=0, name="repos"))
    err = capsys.readouterr().err
    assert "take whole repos" in err and '{"split_by": "file"}' in err
    assert dataset.main(["--sources", str(repos), "--no-progress", "--cache-dir",
                         str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err  # dataset.py says it too, in its own flags
    assert "--split-by file" in err and "--train-frac 1 --val-frac 0 --test-frac 0" in err


def test_the_step_bar_closes_before_the_export_prints(assets, tmp_path, monkeypatch):
    """On a terminal the step bar's last frame stays on its line: the bar is closed before the
    export prints its sample, so that no line of it is written after the frame on that line."""
    events = []
    bar_close = record.Progress.close
    export_run = finish.export_run
    monkeypatch.setattr(record.Progress, "close",
                        lambda self: events.append("close") or bar_close(self))
    monkeypatch.setattr(finish, "export_run", lambda run: events.append("export") or
                        export_run(run))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    tm.train(tiny_cfg(assets, tmp_path, max_steps=2, eval_every=2, warmup_steps=0, export=True,
                      progress=True))
    assert "export" in events and events.index("close") < events.index("export")


def test_sample_tokens_0_writes_no_end_of_run_sample(assets, tmp_path, monkeypatch, capsys):
    """--sample-tokens 0 asks for no sample: none is generated or printed; the export is
    written as ever."""
    asked = []
    monkeypatch.setattr(finish, "sample_completion", lambda *a: asked.append(a) or "")
    run = tm.train(tiny_cfg(assets, tmp_path, max_steps=1, eval_every=1, warmup_steps=0,
                            export=True, final_eval=False, sample_tokens=0,
                            data_options={"cache_dir": assets["cache"], "progress": False}))
    assert asked == []
    assert "sample completion" not in capsys.readouterr().out
    assert (run.run_dir / rundir.EXPORT_DIR / rundir.MODEL_FILE).is_file()


def test_a_sample_of_blank_lines_is_shown_counted(assets, tmp_path, monkeypatch, capsys):
    """An undertrained model's sample of 60 newlines prints as one counted line, so the run's
    last lines stay on screen; its words stay as written."""
    monkeypatch.setattr(finish, "sample_completion", lambda *a: "    x = 1\n" + "\n" * 60)
    tm.train(tiny_cfg(assets, tmp_path, max_steps=1, eval_every=1, warmup_steps=0, export=True,
                      final_eval=False, data_options={"cache_dir": assets["cache"],
                                                      "progress": False}))
    out = capsys.readouterr().out
    assert "    x = 1\n[60 blank lines]\n" in out and "\n\n\n" not in out
    assert "\nsample completion (greedy, " in out and "sample prompt" in out


def test_the_sample_shows_its_prompt_s_last_lines_apart_from_the_completion():
    """A long prompt shows its last PROMPT_LINES_SHOWN lines, counted; a heading line sets the
    completion apart; a prompt ending within a line repeats that line's end (at most
    PARTIAL_LINE_SHOWN characters) before it, as the heading says. A form feed in the prompt is no line end.
    A line the sample writes three or more times in a row shows once, with a count; a sample of
    whitespace alone, as its length."""
    prompt = "def f(x):\n" + "".join(f"    # line {i}\f\n" for i in range(30))
    lines = finish.shown_sample(prompt, "    return x\n", "step 5").split("\n")[:-1]
    shown = finish.PROMPT_LINES_SHOWN
    assert "sample prompt" in lines[0] and f"last {shown} of 31 lines" in lines[0]
    assert lines[1:1 + shown] == [f"    # line {i}\f" for i in range(30 - shown, 30)]
    assert "sample completion" in lines[-2] and "step 5" in lines[-2]
    assert lines[-1] == "    return x"
    partial = finish.shown_sample("def f(x):\n    return x +", " 1\n", "w").splitlines()
    assert partial[1:3] == ["def f(x):", "    return x +"] and partial[-1] == "    return x + 1"
    assert partial[-2].endswith("after the prompt's last line repeated):")
    assert "repeated" not in lines[-2]  # a prompt of whole lines repeats none
    long_line = finish.shown_sample("y" * 500, "z", "w").splitlines()
    assert long_line[-1] == "y" * finish.PARTIAL_LINE_SHOWN + "z"
    looped = finish.shown_sample("def f():\n", '    """\n' * 90 + "    x = 1\n" * 2, "w")
    assert looped.splitlines()[-4:] == ['    """', "[the line above 89 more times]",
                                        "    x = 1", "    x = 1"]  # twice: as written
    blank = finish.shown_sample("def f(x):\n    return x +", "    ", "w").splitlines()
    assert blank[-1] == "[only whitespace: 4 characters, '    ']"  # not an empty-looking line


def test_loading_tensors_of_another_shape_names_the_tensor(assets, tmp_path):
    """A tensor of another shape is named with both shapes; an embedding of other rows, as a
    vocabulary's, says the tokenizer may be another's."""
    tok = load_tokenizer(assets["tokenizer"])
    small = loading.build_model(model_settings(tiny_cfg(assets, tmp_path)), tok)
    wide = loading.build_model(model_settings(tiny_cfg(assets, tmp_path, n_embd=96)), tok)
    with pytest.raises(ValueError, match=r"src\.safetensors: .*wte\.weight.*\(\d+, 64\).*"
                                         r"\(\d+, 96\)"):
        checkpoint.load_model_tensors(wide, checkpoint.model_tensors(small, False),
                                      "src.safetensors", False)
    # another tokenizer's vocabulary (a run's tokenizer files swapped): the rows say so
    from tokenizer import CodeTokenizer

    other_tok = CodeTokenizer.train(["def f(x):\n    return x\n"] * 3, min_freq=1)
    assert other_tok.vocab_size != tok.vocab_size
    other = loading.build_model(model_settings(tiny_cfg(assets, tmp_path)), other_tok)
    with pytest.raises(ValueError, match=r"wte\.weight.*its rows: the vocabulary.*not the "
                                         r"tokenizer these weights trained with"):
        checkpoint.load_model_tensors(other, checkpoint.model_tensors(small, False),
                                      "src.safetensors", False)


def test_recipe_resume_refuses_a_lora_rank_change_and_hints_its_own_flag(assets, tmp_path,
                                                                        capsys):
    """Through python -m codelm.recipes, rerunning a finished run hints at that same command plus
    --resume, a refused setting is named by the recipe's --set train.KEY, and an output directory
    that cannot be made is one error line: every hint is one the user can type."""
    from codelm import recipes

    train = dataclasses.asdict(tiny_cfg(assets, tmp_path, max_steps=2, eval_every=2))
    for key in ("out_dir", "name", "resume", "device", "progress"):
        del train[key]
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({"train": train, "eval": {}}))
    flags = [str(recipe), "--out-dir", str(tmp_path / "runs"), "--skip-eval", "--no-progress"]
    assert recipes.main(flags) == 0
    capsys.readouterr()
    assert recipes.main(flags) == 2
    assert "continue it with the same `python -m codelm.recipes` command plus --resume" in (
        capsys.readouterr().err)
    assert recipes.main([*flags, "--resume", "--set", "train.lora_r=4"]) == 2
    err = capsys.readouterr().err
    assert "lora_r (4, --set train.lora_r): LoRA needs a pretrained base" in err
    assert "Traceback" not in err
    assert recipes.main([*flags, "--smoke", "--out-dir", "/proc/nope"]) == 2
    assert "error: /proc/nope: cannot create the output directory" in capsys.readouterr().err


def test_bad_paths_and_devices_are_clear_errors(assets, tmp_path, capsys, monkeypatch):
    """Unwritable or occupied paths, an unknown device, an out-of-range seed, a directory that is
    no HF checkpoint and a misspelt preset exit 2 with one line naming the path or flag (and the
    remedy, if any), never a traceback; a full disk names the file it hit."""
    config = _tiny_config_file(assets, tmp_path)
    (tmp_path / "a_file").write_text("mine")
    cases = [
        (["--out-dir", "/proc/nope"], "error: /proc/nope/run: cannot create the run directory"),
        (["--out-dir", str(tmp_path), "--name", "a_file"],
         f"error: {tmp_path / 'a_file'}: a file, where the run directory goes: choose another "
         "--name, or move the file"),
        (["--data-options", '{"cache_dir": "/proc/nope"}'],
         "error: data_options.cache_dir /proc/nope: cannot create it"),
        (["--device", "foo"], "error: --device foo: not a device"),
        (["--device", "cuda:abc"], "error: --device cuda:abc: not a device"),
        (["--device", "mps"], "error: --device mps: training runs on cpu or cuda"),
        (["--seed", str(10**20)], "error: seed (100000000000000000000, --seed): must be in"),
        (["--init-from", str(tmp_path)], f"{tmp_path} holds no config.json: not an HF "
         "checkpoint directory"),
        (["--preset", "llama-15m"], "unknown preset 'llama-15m'; did you mean 'llama-14m'?"),
    ]
    for flags, message in cases:
        assert tm.main(["--config", config, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert tm.main(["--resume", str(tmp_path / "nope")]) == 2  # a typo: not "not a run dir"
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not a run dir" not in err, err
    assert all(w in err for w in (f"--resume {tmp_path / 'nope'}", "no such run directory")), err

    def full_disk(cfg, **options):
        raise OSError(28, "No space left on device", "/runs/x/checkpoints/.tmp-step-8")

    stuck = tmp_path / "stuck"  # a lock that cannot be opened names itself, not --out-dir
    (stuck / rundir.LOCK_FILE).mkdir(parents=True)
    assert tm.main(["--config", config, "--out-dir", str(tmp_path), "--name", "stuck"]) == 2
    err = capsys.readouterr().err
    assert f"error: {stuck / rundir.LOCK_FILE}: cannot lock the run directory (Is a directory)" in err
    assert "--out-dir" not in err

    monkeypatch.setattr(tm, "train", full_disk)
    assert tm.main(["--config", config]) == 2
    assert ("error: /runs/x/checkpoints/.tmp-step-8: No space left on device"
            in capsys.readouterr().err)


def test_a_diverged_finite_run_ends_with_a_capped_perplexity(assets, tmp_path, capsys):
    """lr 30 without warmup diverges to a finite validation loss past exp's range: the end of
    the run (export message, summary) reports a capped perplexity instead of crashing."""
    config = _tiny_config_file(assets, tmp_path, lr=30.0, warmup_steps=0, max_steps=8,
                               export=True, device="cpu")  # fp32: bf16 goes NaN first
    assert tm.main(["--config", config]) == 0
    out = capsys.readouterr().out
    best = json.loads((tmp_path / "runs" / "run" / "best" / "metrics.json").read_text())
    assert best["val_loss"] > 710  # math.exp overflows past ~709.8
    assert f"perplexity {trainer_module.perplexity(best['val_loss']):.2f}) at step" in out
    assert trainer_module.perplexity(1e6) == trainer_module.perplexity(700.0)
    assert trainer_module.perplexity(0.0) == 1.0


def test_logged_lr_is_the_lr_the_step_used(assets, tmp_path):
    """The lr logged for step s is the one that step's update used (lr x lr_factor(s)), not the
    next step's, so the logged schedule is the one that trained."""
    cfg = tiny_cfg(assets, tmp_path, max_steps=3, warmup_steps=2, eval_every=3)
    result = tm.train(cfg)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [m["lr"] for m in lines if m["kind"] == "train"]
    expected = [cfg.lr * trainer_module.lr_factor(s, 2, 3, cfg.min_lr_ratio) for s in range(3)]
    assert lrs == pytest.approx(expected)


def test_an_epochs_run_rounds_its_steps_up_and_its_cosine_ends_there(assets, tmp_path, capsys):
    """With epochs set (max_steps left at its default), the run is ceil(epochs x examples /
    examples per step) steps: the last step, part of an epoch's worth, trains whole. Its cosine
    decays over those steps: after warmup each logged lr is that of
    transformers' cosine-with-min-lr schedule of that length (HF warms up from 0, codelm from
    1/warmup_steps, so warmup is left out). Scheduled over max_steps, an epochs run would stay
    near its peak lr."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    common = dict(task="completion", batch_size=4, grad_accum=2, warmup_steps=2,
                  max_steps=trainconfig.TrainConfig().max_steps)
    # the probe reads the data alone: a fixed length, so no budget times its steps
    probe = built_run(tiny_cfg(assets, tmp_path, name="probe", **{**common, "max_steps": 1}))
    n = len(probe.data.batches.train)  # supervised pairs: an epoch is each of them once
    closed(probe)
    steps, per_step = 5, 4 * 2  # batch_size x grad_accum
    epochs = (steps - 0.5) * per_step / n  # 4.5 steps' worth of examples
    cfg = tiny_cfg(assets, tmp_path, epochs=epochs, eval_every=steps, save_every=steps, **common)
    result = tm.train(cfg)
    assert result.step == math.ceil(epochs * n / per_step) == steps
    assert f"{steps} steps ({steps * per_step / n:.3g} epochs of {n} examples)" \
        in capsys.readouterr().out  # the run's first line
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [m["lr"] for m in lines if m["kind"] == "train"]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=2, num_training_steps=steps, min_lr_rate=cfg.min_lr_ratio)
    reference = []
    for _ in range(steps):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[2:] == pytest.approx(reference[2:], rel=1e-9)
    train = [m for m in lines if m["kind"] == "train"]
    assert [m["epoch"] for m in train] == [m["step"] * per_step / n for m in train]
    assert train[-1]["epoch"] == pytest.approx(epochs + 0.5 * per_step / n)  # the rounded-up step


def test_an_lm_epoch_is_the_side_by_side_windows_in_the_logged_epoch_too(assets, tmp_path,
                                                                          capsys):
    """lm windows start at every token, so an epoch is the windows that fit side by side,
    (n - 1) // block_size (the n - T start positions would be T epochs): an epochs=1 run's
    train lines carry examples seen (batch_size x grad_accum a step) over that count, rising
    by the same amount each step, the last one step's worth at most past 1.0 (the run rounds
    its steps up), a figure users can read."""
    train, val = tmp_path / "train", tmp_path / "val"
    smallest = sorted(Path(assets["corpus"]).iterdir(), key=lambda f: f.stat().st_size)
    for directory, f in ((train, smallest[0]), (val, smallest[1])):
        directory.mkdir()
        shutil.copy(f, directory / f.name)
    options = {"cache_dir": assets["cache"], "progress": False, "train_frac": 1.0,
               "val_frac": 0.0, "test_frac": 0.0}
    cfg = tiny_cfg(assets, tmp_path, data=[str(train)], val_data=[str(val)], data_options=options,
                   epochs=1, batch_size=2, grad_accum=2,
                   max_steps=trainconfig.TrainConfig().max_steps, warmup_steps=0, eval_every=100,
                   save_every=100)
    result = tm.train(cfg)
    out = capsys.readouterr().out
    n_tokens = int(re.search(r"([\d,]+) training tokens", out).group(1).replace(",", ""))
    per_epoch, per_step = (n_tokens - 1) // 32, 2 * 2  # block_size targets a window
    assert result.step == math.ceil(per_epoch / per_step) > 2
    assert (f"{result.step} steps ({result.step * per_step / per_epoch:.3g} epochs of "
            f"{per_epoch:,} windows of 32 tokens)") in out  # the run's first line
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_epochs = [m["epoch"] for m in lines if m["kind"] == "train"]
    assert len(train_epochs) == result.step  # log_every 1
    assert train_epochs == pytest.approx([s * per_step / per_epoch
                                          for s in range(1, result.step + 1)], rel=1e-12)
    assert 1.0 <= train_epochs[-1] < 1.0 + per_step / per_epoch
    assert [m["epoch"] for m in lines if m["kind"] == "val"] == [train_epochs[-1]]


def test_an_lm_epoch_is_the_windows_that_fit_side_by_side_and_at_least_one():
    """Stride-1 windows count to an epoch the windows of block_size next tokens that fit side by
    side in the split, (n_tokens - 1) // block_size, at least 1: a tiny corpus's 0 would divide
    the logged epoch by zero. On the split dataset builds, no training."""
    for n_tokens, per_epoch in ((2, 1), (33, 1), (64, 1), (65, 2), (97, 3)):
        windows = LMWindows("unread.bin", "uint16", n_tokens, block_size=32, stride=1)
        side_by_side = LMWindows("unread.bin", "uint16", n_tokens, block_size=32, stride=32)
        batches = Batches(windows, windows, pad_id=0, batch_size=1, grad_accum=3, seed=0)
        assert batches.examples_per_epoch == per_epoch
        full = [i for i in range(len(side_by_side)) if i * 32 + 32 + 1 <= n_tokens]
        assert per_epoch == max(1, len(full))  # the one pass's full windows (eval's split)
        assert batches.epoch(5) == 5 * 1 * 3 / per_epoch


def test_a_step_trains_every_ranks_batches_in_the_epoch_count():
    """Over two ranks a step trains batch_size x grad_accum x world = 2 x 3 x 2 = 12 of 40
    examples: 5 steps are 1.5 epochs, and one epoch takes ceil(40 / 12) = 4 steps."""
    batches = Batches(list(range(40)), [], pad_id=0, batch_size=2, grad_accum=3, seed=0,
                      rank=1, world=2)
    assert batches.examples_per_step == 12
    assert batches.epoch(5) == 1.5
    assert batches.steps_for(1.0) == 4


def test_the_progress_bar_shows_the_epoch_its_metrics_line_logs():
    """The bar's postfix carries the epoch (examples seen over one epoch) as the train line."""
    batches = Batches(list(range(40)), [], pad_id=0, batch_size=2, grad_accum=3, seed=0)
    trainer = types.SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False),
                                    device=torch.device("cpu"))
    lines, postfix = [], {}
    kept = record.RunRecord(rundir.ClaimedDir(Path("run")), distributed.Dist(), False, 1, "", False)
    kept.log = types.SimpleNamespace(write=lambda step, kind, values: lines.append(values))
    progress = record.Progress(checkpoint.RunState(step=5, max_steps=10), enabled=False,
                               main=False)
    progress.bar = types.SimpleNamespace(set_postfix=lambda **kw: postfix.update(kw))
    run = types.SimpleNamespace(state=checkpoint.RunState(step=5), record=kept, trainer=trainer,
                                data=types.SimpleNamespace(batches=batches))
    stats = trainer_module.StepStats(loss=1.5, grad_norm=1.0, tokens=64, lr=1e-3)
    tm._log_step(run, stats, progress)
    assert lines[0]["epoch"] == 5 * 2 * 3 / 40 and postfix["epoch"] == "0.75"


def test_an_evaluation_line_shows_the_rate_of_this_processs_training(capsys, monkeypatch):
    """An evaluation line's tok/s is this process's tokens over its training time up to the
    evaluated step (evaluations and saves left out, the last logged step's window or not): none
    before this process trained a step (a resumed run evaluating first)."""
    clock = [100.0]
    monkeypatch.setattr(record.time, "perf_counter", lambda: clock[0])
    progress = record.Progress(checkpoint.RunState(step=5, max_steps=10), enabled=False,
                               main=True)
    with progress.paused():
        progress.eval_line({"val_loss": 1.25})
    assert "tok/s" not in capsys.readouterr().out
    clock[0] += 2.0  # step 6 trains 2 s and is logged: 320 tok/s
    progress.tokens_done(640)
    progress.step_line(6, trainer_module.StepStats(loss=1.5, grad_norm=1.0, tokens=640, lr=1e-3),
                       0.5)
    with progress.paused():
        clock[0] += 30.0  # saving: no training
    clock[0] += 2.0  # step 7 trains 2 s, unlogged, and is evaluated after 5 s of evaluation
    progress.tokens_done(1920)
    with progress.paused():
        clock[0] += 5.0
        progress.eval_line({"val_loss": 1.2})
    assert "| 640 tok/s | elapsed" in capsys.readouterr().out.splitlines()[-1]


def test_resume_without_a_checkpoint_and_a_torn_metrics_line(assets, tmp_path, capsys):
    """A run stopped before its first checkpoint starts again without duplicating its metrics;
    a torn last line (full disk) is dropped, any other bad line is an error naming the line."""
    cfg = tiny_cfg(assets, tmp_path, max_steps=4, eval_every=4, save_every=100,
                   inject_nan_at_step=3)
    with pytest.raises(record.NonFiniteLossError):
        tm.train(cfg)
    run = Path(cfg.out_dir) / "run"
    assert rundir.list_checkpoints(run) == []
    tm.train(dataclasses.replace(cfg, resume=str(run), inject_nan_at_step=None))
    metrics = run / "metrics.jsonl"
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()
             if '"train"' in x]
    assert steps == [1, 2, 3, 4]

    with metrics.open("a") as f:
        f.write('{"step": 5, "kind": "tra')
    capsys.readouterr()
    assert tm.main(["--resume", str(run), "--max-steps", "5"]) == 0
    assert f"{metrics}:" in capsys.readouterr().err
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [m["step"] for m in lines if m["kind"] == "train"] == [1, 2, 3, 4, 5]

    text = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join([text[0], "not json\n", *text[1:]]))
    config = (run / "config.json").read_bytes()
    assert tm.main(["--resume", str(run), "--max-steps", "6"]) == 2
    assert f"{metrics}:2: not a metrics line" in capsys.readouterr().err
    assert (run / "config.json").read_bytes() == config  # the refused resume leaves it as it was


def test_a_resume_drops_an_evaluation_its_checkpoint_does_not_hold(tmp_path):
    """A run killed while rewriting its last checkpoint after the final evaluation resumes from
    the checkpoint written before that evaluation: the evaluation runs again, so the line it
    logged is dropped (and not doubled); the step's train line stays."""
    metrics = tmp_path / "metrics.jsonl"
    logged = [(3, "train"), (3, "val"), (4, "train"), (4, "val"), (5, "train")]
    metrics.write_text("".join(json.dumps({"step": step, "kind": kind}) + "\n"
                               for step, kind in logged))
    rundir.trim_metrics(metrics, 4, evaluated=3)
    kept = [(m["step"], m["kind"]) for m in map(json.loads, metrics.read_text().splitlines())]
    assert kept == [(3, "train"), (3, "val"), (4, "train")]


def test_resume_refuses_a_run_with_weights_but_no_checkpoint(assets, tmp_path, capsys):
    """checkpoints/ deleted (to free disk) but best/ and export/ kept: --resume must not train
    a new model from step 0 over them; it refuses, naming the export to start from."""
    config = _tiny_config_file(assets, tmp_path, max_steps=8, export=True)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    shutil.rmtree(run / "checkpoints")
    kept = {p: p.read_bytes() for p in (run / "metrics.jsonl", run / "best" / "metrics.json")}
    capsys.readouterr()
    assert tm.main(["--resume", str(run), "--max-steps", "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint to continue from" in err
    step = rundir.best_step(run)
    assert f"best/ (step {step}) and export/" in err and f"--init-from {run / 'export'}" in err
    assert all(p.read_bytes() == data for p, data in kept.items())
    # the same command again (a new run under that name) points the same way, not to --resume
    assert tm.main(["--config", config]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run} already holds best/ (step {step}) and export/" in err
    assert f"--init-from {run / 'export'}" in err and "--resume" not in err
    assert all(p.read_bytes() == data for p, data in kept.items())

    shutil.rmtree(run / "export")  # best/ alone: no model to start from, only a new run
    assert tm.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"holds best/ (step {step}) but no checkpoint" in err and "another --name" in err
    assert "--init-from" not in err


def test_resuming_a_finished_overfit_batches_run_reports_its_loss(assets, tmp_path, capsys):
    """Resuming an overfit_batches run that has finished prints the run's own verdict line and
    exit code (1, FAIL), not a verdict on the zero steps the resume trained."""
    config = _tiny_config_file(assets, tmp_path, overfit_batches=1, max_steps=2, eval_every=2)
    assert tm.main(["--config", config]) == 1
    first = capsys.readouterr().out.splitlines()[-1]
    assert tm.main(["--resume", str(tmp_path / "runs" / "run")]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == first and "FAIL" in first


@pytest.mark.parametrize("key, value, message", [
    ("early_stop_patience", -1, "must be >= 0"),
    ("epochs", float("inf"), "must be finite"),
    ("weight_decay", -1.0, "must be >= 0"),
    ("lr", float("nan"), "must be finite"),
    ("beta2", 1.0, r"must be in \[0, 1\)"),
    ("lora_alpha", 0.0, "must not be 0: .* would never train"),  # a run that trained nothing
    ("offload_activations", True, "gradient checkpointing saves.*gradient_checkpointing.*off"),
])
def test_validate_config_range_checks_name_the_key(key, value, message):
    """A value out of a setting's range is refused naming the key and its flag, then the rule it
    breaks, before any work: the user sees which setting to change and to what."""
    with pytest.raises(ValueError, match=rf"{key} \(.*{message}"):
        plan.validate_config(trainconfig.TrainConfig(**{key: value}))


@pytest.mark.parametrize("name", ["../escape", "a/b", "a/", "..", "."])
def test_a_run_name_is_one_directory_name_not_a_path(name):
    """--name is refused as a path: ../x would write the run outside --out-dir, and a/b nest it
    where eval.py's latest_run never looks."""
    with pytest.raises(ValueError, match=rf"name \({re.escape(repr(name))}, --name\): .*"
                                         r"not a path.*--out-dir"):
        plan.validate_config(trainconfig.TrainConfig(name=name))
    plan.validate_config(trainconfig.TrainConfig(name="v1.2_run-3"))


def test_an_unwritable_data_cache_names_where_it_was_set(assets, tmp_path, capsys, monkeypatch):
    """The error names CODELM_CACHE where the user set it, not data_options.cache_dir, which
    the user never set."""
    config = _tiny_config_file(assets, tmp_path, data_options={"progress": False})
    monkeypatch.setenv("CODELM_CACHE", "/proc/nope")
    assert tm.main(["--config", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /proc/nope/data: cannot create the data cache (")
    assert "CODELM_CACHE=/proc/nope puts it there; point CODELM_CACHE to a writable" in err
    assert "data_options.cache_dir /proc" not in err


def test_init_from_without_a_tokenizer_asks_for_tokenizer(assets, tmp_path):
    """A checkpoint without tokenizer.json: the error says to pass --tokenizer, as eval.py's
    does, not a bare "cannot read tokenizer file"."""
    cfg = tiny_cfg(assets, tmp_path, init_from=str(tiny_llama(tmp_path)), tokenizer=None)
    with pytest.raises(ValueError, match=rf"--init-from {re.escape(cfg.init_from)}: no "
                                         r"tokenizer\.json.*--tokenizer"):
        build.load_or_train_tokenizer(cfg, trainconfig.data_config(cfg, 32))


def test_init_from_a_runs_export_without_a_tokenizer_names_the_run(assets, tmp_path):
    """An export/ that lost its tokenizer.json: the run above it holds one, as load_tokenizer
    and eval.py say."""
    run = tmp_path / "run"
    export = run / "export"
    shutil.copytree(tiny_llama(tmp_path), export)
    shutil.copy(assets["tokenizer"], run / "tokenizer.json")
    cfg = tiny_cfg(assets, tmp_path, init_from=str(export), tokenizer=None)
    with pytest.raises(ValueError, match=rf"--init-from {re.escape(str(export))}: no "
                                         rf"tokenizer\.json.*{re.escape(str(run.resolve()))} "
                                         r"above it.*--tokenizer"):
        build.load_or_train_tokenizer(cfg, trainconfig.data_config(cfg, 32))


def test_init_from_with_a_tokenizer_that_is_not_the_models_is_refused(assets, tmp_path):
    """--tokenizer, or the checkpoint's own tokenizer.json, whose roles the checkpoint's
    config.json contradicts (here a CodeTokenizer of another special-token layout, with no more
    tokens than the embeddings, which the vocabulary check lets through)."""
    base = tiny_llama(tmp_path)  # bos 1, eos 2: the default CodeTokenizer's
    texts = [Path(p).read_text("utf-8") for p in sorted(Path(assets["corpus"]).iterdir())]
    other = tmp_path / "other"
    other.mkdir()
    CodeTokenizer.train(texts, min_freq=2, max_vocab=150,
                        special_tokens=("<bos>", "<eos>", "<pad>")).save(other)
    cfg = tiny_cfg(assets, tmp_path, init_from=str(base), tokenizer=str(other))
    refused = (rf"^{re.escape(str(other / 'tokenizer.json'))} is not the tokenizer of the model "
               rf"in {re.escape(str(base))}: .* but the tokenizer's bos is 0 \('<bos>'\)")
    with pytest.raises(ValueError, match=refused + r".*; pass --tokenizer with the tokenizer"):
        build.load_or_train_tokenizer(cfg, trainconfig.data_config(cfg, 32))
    shutil.copy(other / "tokenizer.json", base / "tokenizer.json")  # now the checkpoint's own
    own = dataclasses.replace(cfg, tokenizer=None)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(base / 'tokenizer.json'))} is not "):
        build.load_or_train_tokenizer(own, trainconfig.data_config(own, 32))


def test_a_tokenizer_other_than_the_checkpoints_own_is_warned_about(assets, tmp_path, capsys):
    """Another model's tokenizer with no more tokens than the embeddings would train silently on
    ids that name other tokens: a warning names both; the checkpoint's own gets none."""
    base = tiny_llama(tmp_path)
    texts = [Path(p).read_text("utf-8") for p in sorted(Path(assets["corpus"]).iterdir())]
    CodeTokenizer.train(texts, min_freq=2, max_vocab=150).save(base)
    cfg = tiny_cfg(assets, tmp_path, init_from=str(base))
    capsys.readouterr()
    data_cfg = trainconfig.data_config(cfg, 32)
    assert build.load_or_train_tokenizer(cfg, data_cfg).vocab_size < 512  # fits
    err = capsys.readouterr().err
    assert err.startswith(f"warning: --tokenizer {assets['tokenizer']} "), err
    assert all(w in err for w in ("differs", str(base / "tokenizer.json"),
                                  f"--init-from {base}")), err
    same = dataclasses.replace(cfg, tokenizer=str(base))  # its own, named again: no warning
    build.load_or_train_tokenizer(same, trainconfig.data_config(same, 32))
    assert capsys.readouterr().err == ""


def test_cli_range_error_exits_2(capsys):
    """On the command line an out-of-range value is a usage error: exit 2, naming the value and
    its flag."""
    assert tm.main(["--epochs", "inf"]) == 2
    assert "epochs (inf, --epochs): must be finite" in capsys.readouterr().err


def test_evaluation_has_its_own_progress_bar(capsys, monkeypatch):
    """On a terminal evaluation shows its own bar; off one (a log file) or without progress, none."""
    cfg = trainconfig.TrainConfig(preset="tiny", block_size=16, progress=True)
    batch = {"input_ids": torch.randint(0, 64, (2, 16)), "labels": torch.randint(0, 64, (2, 16))}
    _trainer(cfg).evaluate([batch] * 3, total=3)
    assert "eval" not in capsys.readouterr().err  # not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    _trainer(cfg).evaluate([batch] * 3, total=3)
    assert "eval" in capsys.readouterr().err
    _trainer(dataclasses.replace(cfg, progress=False)).evaluate([batch], total=1)
    assert "eval" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Run directories (stale tokenizer, sharing, retrying a failed start), LoRA exports, signals
# at the end of a run, throughput, dropout, early stopping, CLI mistakes
# --------------------------------------------------------------------------------------------


def test_a_new_run_uses_its_own_tokenizer_not_a_failed_attempts(assets, tmp_path):
    """An attempt that failed after saving its tokenizer (a mistyped LoRA target) leaves
    tokenizer.json behind; the corrected command under the same name reads the tokenizer it
    asks for, not that one."""
    texts = [p.read_text("utf-8") for p in sorted(Path(assets["corpus"]).iterdir())]
    other = tmp_path / "other"
    other.mkdir()
    CodeTokenizer.train(texts, min_freq=3, max_vocab=120).save(other)
    with pytest.raises(ValueError, match="q_prj"):
        tm.train(tiny_cfg(assets, tmp_path, init_from=str(tiny_llama(tmp_path)), lora_r=4,
                          lora_targets=["q_prj"]))
    result = tm.train(tiny_cfg(assets, tmp_path, tokenizer=str(other / "tokenizer.json"),
                               max_steps=2, eval_every=2))
    want = load_tokenizer(other)
    assert load_tokenizer(result.run_dir).vocab_size == want.vocab_size
    weights = final_weights(result.run_dir, 2)
    assert weights["wte.weight"].shape[0] == want.vocab_size


def test_a_run_that_failed_before_its_first_checkpoint_can_be_run_again(assets, tmp_path,
                                                                         capsys):
    """No weights in the directory: the corrected command may reuse the name (or --resume may
    change its settings); the NaN message says only what resume can do."""
    cfg = tiny_cfg(assets, tmp_path, max_steps=4, eval_every=4, inject_nan_at_step=1)
    with pytest.raises(record.NonFiniteLossError, match="the same --name starts the run anew"):
        tm.train(cfg)
    run = Path(cfg.out_dir) / "run"
    assert (run / "config.json").is_file() and not rundir.list_checkpoints(run)
    result = tm.train(dataclasses.replace(cfg, inject_nan_at_step=None, lr=1e-3))
    assert result.step == 4 and json.loads((run / "config.json").read_text())["lr"] == 1e-3
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if '"train"' in x]
    assert steps == [1, 2, 3, 4]  # the failed attempt's lines are gone

    with pytest.raises(record.NonFiniteLossError) as info:  # now with a checkpoint (step 4)
        tm.train(dataclasses.replace(cfg, name="later", inject_nan_at_step=6, max_steps=8))
    message = str(info.value)
    assert "replays the same steps" in message and "needs a new run (another --name)" in message

    with pytest.raises(record.NonFiniteLossError):
        tm.train(dataclasses.replace(cfg, name="again", inject_nan_at_step=2))
    capsys.readouterr()
    assert tm.main(["--resume", str(Path(cfg.out_dir) / "again"), "--lr", "0.002",
                    "--inject-nan-at-step", "100"]) == 0  # no weights: it may change settings
    assert json.loads((Path(cfg.out_dir) / "again" / "config.json").read_text())["lr"] == 0.002


def test_a_new_run_replaces_nothing_but_a_failed_codelm_run(assets, tmp_path, monkeypatch,
                                                            capsys):
    """A directory under --name that is not a codelm run without weights (an HF model, a run
    with any weights file) is refused untouched; without a working lock (NFS) even a failed
    run is refused, since it may be live."""
    import errno

    from tiny_hf import save_tiny_hf

    cfg = tiny_cfg(assets, tmp_path, max_steps=2, eval_every=2, name="model")
    hf = Path(cfg.out_dir) / "model"
    save_tiny_hf("llama", hf, vocab_size=512)
    (hf / "tokenizer.json").write_text("{}")
    before = sorted(p.name for p in hf.iterdir())
    with pytest.raises(ValueError, match="already holds a run"):
        tm.train(cfg)
    assert sorted(p.name for p in hf.iterdir() if p.name != rundir.LOCK_FILE) == before

    failed = tiny_cfg(assets, tmp_path, max_steps=2, name="failed", inject_nan_at_step=1)
    with pytest.raises(record.NonFiniteLossError):
        tm.train(failed)
    run = Path(cfg.out_dir) / "failed"
    (run / "stray.bin").write_bytes(b"weights of some kind")
    with pytest.raises(ValueError, match="already holds a run"):
        tm.train(dataclasses.replace(failed, inject_nan_at_step=None))
    (run / "stray.bin").unlink()

    def no_locks(fd, operation):  # NFS: flock on this file fails
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ValueError, match="already holds a run"):
        tm.train(dataclasses.replace(failed, inject_nan_at_step=None))
    assert "cannot lock the run directory" in capsys.readouterr().err
    assert (run / "config.json").is_file() and (run / "metrics.jsonl").is_file()


def test_block_size_beyond_the_init_from_context_is_refused_before_any_work(assets, tmp_path):
    """A block_size past the pretrained base's positions is refused at validation, naming both
    settings and the base's 128 positions, before any data or model is loaded; equal is fine."""
    from tiny_hf import save_tiny_hf

    base = tmp_path / "base"
    save_tiny_hf("llama", base, vocab_size=512)  # 128 positions
    with pytest.raises(ValueError, match=r"block_size \(256, --block-size\).*context.*"
                                         r"init_from \('.*', --init-from\), 128 positions"):
        plan.validate_config(trainconfig.TrainConfig(init_from=str(base), block_size=256))
    plan.validate_config(trainconfig.TrainConfig(init_from=str(base), block_size=128))


@pytest.mark.parametrize("dora", [False, True])
def test_lora_export_names_its_base_so_peft_loads_it_alone(assets, tmp_path, dora):
    """adapter_config.json names its base, so AutoPeftModel loads the export alone; a DoRA run's
    (--lora-dora) too, with PEFT's logits."""
    import transformers
    from peft import AutoPeftModelForCausalLM
    from tiny_hf import save_tiny_hf

    import lora

    base = tmp_path / "base"
    save_tiny_hf("llama", base, vocab_size=512)
    cfg = tiny_cfg(assets, tmp_path, init_from=str(base), lora_r=4, lora_alpha=8.0, lr=3e-2,
                   lora_targets=["q_proj", "v_proj"], max_steps=4, export=True, lora_dora=dora)
    export = tm.train(cfg).run_dir / "export"
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert config["use_dora"] is dora
    ours = loading.build_model(model_settings(dataclasses.replace(cfg, lora_r=0, lora_dora=False)),
                               load_tokenizer(export))
    lora.load_adapter(ours, export)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        want = ours.eval()(ids)
        peft_model = AutoPeftModelForCausalLM.from_pretrained(export).eval()
        torch.testing.assert_close(peft_model(ids).logits, want, atol=1e-5, rtol=1e-4)
        if not dora:  # transformers' own adapter loading leaves DoRA's magnitudes out
            hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
            torch.testing.assert_close(hf(ids).logits, want, atol=1e-5, rtol=1e-4)


def test_init_from_a_hub_id_trains_lora_and_exports_an_adapter_peft_loads(assets, tmp_path,
                                                                          offline_hub,
                                                                          monkeypatch):
    """--init-from org/name reads the base from the hub cache (offline); the run records the
    snapshot it used, and PEFT loads the exported adapter on that base with equal logits. The
    adapter names its base by id and commit, as PEFT does: another machine's cache (here the
    cache moved) resolves it, for PEFT and for codelm."""
    import transformers
    from peft import PeftModel
    from tiny_hf import hub_cache

    import lora

    commit = hub_cache(offline_hub, "org/tiny", tiny_llama(tmp_path))
    snapshot = offline_hub / "models--org--tiny" / "snapshots" / commit
    cfg = tiny_cfg(assets, tmp_path, lora_r=4, lora_alpha=8.0, lr=3e-2,
                   lora_targets=["q_proj", "v_proj"], max_steps=4, export=True)
    config = write_config(cfg, tmp_path / "run.json")
    assert tm.main(["--config", str(config), "--init-from", "org/tiny"]) == 0
    run = Path(cfg.out_dir) / "run"
    assert json.loads((run / "config.json").read_text())["init_from"] == str(snapshot)
    ours = loading.build_model(
        model_settings(dataclasses.replace(cfg, init_from=str(snapshot), lora_r=0)),
                               load_tokenizer(run / "export"))
    lora.load_adapter(ours, run / "export")
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(snapshot)
        theirs = PeftModel.from_pretrained(base, run / "export").eval()
        torch.testing.assert_close(theirs(ids).logits, ours.eval()(ids), atol=1e-5, rtol=1e-4)
    assert tm.main(["--config", str(config), "--init-from", "org/missing", "--name", "b"]) == 2
    adapter = json.loads((run / "export" / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == ("org/tiny", commit)
    from huggingface_hub import constants
    from peft import AutoPeftModelForCausalLM

    from codelm.models.adapter_config import adapter_base

    other = tmp_path / "other_machine"
    shutil.move(offline_hub.parent, other)
    monkeypatch.setenv("HF_HOME", str(other))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(other / "hub"))
    assert adapter_base(run / "export", "x") == other / "hub" / snapshot.relative_to(offline_hub)
    with torch.no_grad():
        moved = AutoPeftModelForCausalLM.from_pretrained(run / "export").eval()
        torch.testing.assert_close(moved(ids).logits, ours(ids), atol=1e-5, rtol=1e-4)


def test_a_parquet_pair_file_and_a_datasets_directory_train_the_refactor_task(assets, tmp_path):
    """The refactor task trains from a Parquet file of pairs, its columns named in data_options,
    and from a datasets save_to_disk directory, to a finite validation loss."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [{"input": f"def f{i}(x):\n    y = x + {i}\n    return y\n",
              "output": f"def f{i}(x):\n    return x + {i}\n"} for i in range(40)]
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"code": [p["input"] for p in pairs],
                             "refactored": [p["output"] for p in pairs]}), parquet,
                   row_group_size=8)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(pairs).save_to_disk(str(saved))
    options = {"cache_dir": assets["cache"], "progress": False}
    for name, data, columns in (
            ("pq", parquet, {"input_column": "code", "output_column": "refactored"}),
            ("ds", saved, {})):
        result = tm.train(tiny_cfg(assets, tmp_path, name=name, task="refactor",
                                   data=[str(data)], data_options={**options, **columns},
                                   max_steps=4, block_size=48))
        assert result.step == 4 and math.isfinite(result.best_val_loss), name


def test_a_run_names_the_records_its_data_dropped_and_why(assets, tmp_path, capsys):
    """Nothing is dropped in silence: a run's console names how many records were kept of
    those read (the malformed ones skip_bad skips too), each drop's reason with its count, and
    the splits."""
    pairs = [{"input": f"def f{i}(x):\n    y = x + {i}\n    return y\n",
              "output": f"def f{i}(x):\n    return x + {i}\n"} for i in range(40)]
    pairs += [{"input": f"def g{i}(x):\n    return x\n", "output": ""} for i in range(3)]
    pairs += pairs[:2]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs) + "{not json\n[1, 2]\n")
    options = {"cache_dir": assets["cache"], "progress": False, "skip_bad": True}
    tm.train(tiny_cfg(assets, tmp_path, task="refactor", data=[str(data)], max_steps=1,
                      block_size=48, data_options=options))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data:"))
    assert "40 of 47" in line and "empty_pair 3" in line and "duplicate 2" in line, line
    assert "bad_jsonl_line 2" in line
    assert "split train" in line


def test_refactor_inputs_that_hold_the_templates_header_are_named(assets, tmp_path, capsys):
    """An input written with the template's header (the seed's inference prompt) would hold it
    twice: a note counts them."""
    from codelm.data.examples import REFACTOR_HEADER

    pairs = [{"input": f"{REFACTOR_HEADER}\n\ndef f{i}(x):\n    y = x + {i}\n    return y\n",
              "output": f"def f{i}(x):\n    return x + {i}\n"} for i in range(30)]
    pairs += [{"input": f"def g{i}(x):\n    y = x * {i}\n    return y\n",
               "output": f"def g{i}(x):\n    return x * {i}\n"} for i in range(10)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tm.train(tiny_cfg(assets, tmp_path, task="refactor", data=[str(data)], max_steps=1,
                      block_size=48))
    note = next(line for line in capsys.readouterr().err.splitlines() if "header" in line)
    assert note.startswith("note: 30 refactor input(s)") and "twice" in note, note


def test_a_merge_into_a_tied_embedding_is_refused_before_training(assets, tmp_path):
    """A merge into a tied embedding (a merged export, or GGUF's, written from the merged
    weights) is refused before training, not failing after it and taking the (valid) adapter
    export with it."""
    from tiny_hf import save_tiny_hf

    base = tmp_path / "base"
    save_tiny_hf("llama", base, vocab_size=512)  # lm_head tied to embed_tokens
    common = dict(lora_r=4, lora_targets=["q_proj", "embed_tokens"], max_steps=2,
                  eval_every=2, export=True)
    cfg = tiny_cfg(assets, tmp_path, init_from=str(base), export_merged=True, **common)
    with pytest.raises(ValueError, match=r"export_merged \(True, --export-merged\): .*LoRA "
                                         r"target wte \(lora_targets \(.*\)\) .* tied.* or "
                                         r"train with --no-export-merged$"):
        tm.train(cfg)
    assert not rundir.list_checkpoints(Path(cfg.out_dir) / "run")
    gguf = dataclasses.replace(cfg, export_merged=False, export_gguf="f32")  # written merged
    with pytest.raises(ValueError, match=r"export_gguf \('f32', --export-gguf\): .*LoRA target "
                                         r"wte .* tied.* or train with export_gguf none$"):
        tm.train(gguf)
    assert not rundir.list_checkpoints(Path(cfg.out_dir) / "run")
    assert tm.train(dataclasses.replace(cfg, export_merged=False)).export_dir is not None


def test_tokens_per_s_counts_training_time_only(assets, tmp_path, monkeypatch):
    """Each step takes 1 s on a fake clock, each evaluation 100 s and each save 50 s: the
    throughput counts the steps only, so it does not fall after an evaluation."""
    import types

    now = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: now[0], strftime=lambda fmt: "x")
    monkeypatch.setattr(tm, "time", clock)
    monkeypatch.setattr(record, "time", clock)
    for name, cost in (("train_step", 1.0), ("evaluate", 100.0)):
        original = getattr(trainer_module.Trainer, name)

        def timed(self, *args, _original=original, _cost=cost, **kwargs):
            now[0] += _cost
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(trainer_module.Trainer, name, timed)
    save = record.RunRecord.checkpoint

    def slow_save(self, *args):
        now[0] += 50.0
        save(self, *args)

    monkeypatch.setattr(record.RunRecord, "checkpoint", slow_save)
    result = tm.train(tiny_cfg(assets, tmp_path, max_steps=9, eval_every=3, save_every=3,
                               warmup_steps=0, log_every=2))
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [m["tokens_per_s"] for m in lines if m["kind"] == "train"]
    assert rates == pytest.approx([4 * 32] * len(rates))  # one batch of 4 x 32 a second


def test_dropout_flag_sets_residual_dropout_and_model_options_attention_dropout(assets,
                                                                                tmp_path):
    """--dropout is the embeddings' and the residual dropout (what runs trained with it used,
    so they resume bit-exactly), also over a checkpoint's own embd_pdrop; attention dropout is
    the model's own, or model_options' from scratch."""
    from tiny_hf import save_tiny_hf

    cfg = trainconfig.model_config(trainconfig.TrainConfig(preset="tiny", dropout=0.2), 64,
                                   None, None)
    assert (cfg.dropout, cfg.attn_dropout) == (0.2, 0.0)
    both = trainconfig.TrainConfig(preset="tiny", dropout=0.2, model_options={"attn_dropout": 0.1})
    assert trainconfig.model_config(both, 64, None, None).attn_dropout == 0.1
    base = tmp_path / "base"
    save_tiny_hf("llama", base, vocab_size=512, attention_dropout=0.05)
    model = loading.build_model(
        model_settings(trainconfig.TrainConfig(init_from=str(base), dropout=0.15)),
                                load_tokenizer(assets["tokenizer"]))
    assert (model.cfg.dropout, model.cfg.attn_dropout) == (0.15, 0.05)
    save_tiny_hf("phi", tmp_path / "phi", vocab_size=512, embd_pdrop=0.1, resid_pdrop=0.1)
    cfg = trainconfig.TrainConfig(init_from=str(tmp_path / "phi"), dropout=0.0)
    model = loading.build_model(model_settings(cfg), load_tokenizer(assets["tokenizer"]))
    assert (model.cfg.embedding_dropout, model.cfg.dropout) == (0.0, 0.0)


def test_early_stopping_keeps_its_reference_until_a_fall_larger_than_min_delta(
        assets, tmp_path, monkeypatch, capsys):
    """The validation loss falls 0.006 per evaluation with min_delta 0.01: every two
    evaluations it falls more than min_delta, so patience 3 never runs out (a small fall does
    not move the reference); best/ follows the true minimum. A loss equal to the reference is
    no fall (Keras's strict comparison), at the default min_delta 0 too."""
    fake_val_losses(monkeypatch, [3.0 - 0.006 * i for i in range(20)])
    result = tm.train(tiny_cfg(assets, tmp_path, max_steps=10, eval_every=1, warmup_steps=0,
                               early_stop_patience=3, early_stop_min_delta=0.01))
    assert not result.early_stopped and result.step == 10 and result.best_step == 10
    fake_val_losses(monkeypatch, [3.0, 2.995, 2.992, 2.991, 2.5])  # three falls < min_delta
    result = tm.train(tiny_cfg(assets, tmp_path, name="flat", max_steps=10, eval_every=1,
                               warmup_steps=0, early_stop_patience=3, early_stop_min_delta=0.01))
    assert result.early_stopped and result.step == 4 and result.best_step == 4
    assert re.search(r"stopped early at step 4 of 10: 3 evaluation\(s\) .*0\.01 .*"
                     r"--early-stop-patience, --early-stop-min-delta", capsys.readouterr().out)
    fake_val_losses(monkeypatch, [3.0, 3.0, 3.0, 3.0, 2.5])  # ties: no fall
    result = tm.train(tiny_cfg(assets, tmp_path, name="tied", max_steps=10, eval_every=1,
                               warmup_steps=0, early_stop_patience=3))
    assert result.early_stopped and result.step == 4 and result.best_step == 1


def test_max_steps_beside_epochs_is_refused_naming_both(assets, tmp_path, capsys):
    """Both set the run's length: one would be ignored silently (a resume would train nothing),
    so both typed, or both in one file, are refused; a length typed over a resumed run's or a
    --config file's other one replaces it, as a flag overrides a file, and says so."""
    run = tmp_path / "runs" / "ep"
    run.mkdir(parents=True)
    write_config(tiny_cfg(assets, tmp_path, name="ep", epochs=0.5, max_steps=None),
                 run / "config.json")
    assert tm.main(["--resume", str(run), "--max-steps", "10", "--print-config", "json"]) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert (printed["max_steps"], printed["epochs"]) == (10, None)
    assert "in place of epochs 0.5 (the resumed run's config.json)" in err, err
    config = _tiny_config_file(assets, tmp_path)
    assert tm.main(["--config", config, "--epochs", "1", "--max-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in ("--max-steps", "--epochs", "unset one")), err
    both = tmp_path / "both.json"
    both.write_text(json.dumps({**json.loads(Path(config).read_text()), "epochs": 1}))
    assert tm.main(["--config", str(both)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in ("max_steps", "both.json", "one of them to null")), err


@pytest.mark.parametrize("options, message", [
    ('{"vocab_size": 100}', "--model-options: 'vocab_size' comes from the tokenizer"),
    ('{"eos_id": 3}', "--model-options: 'eos_id' comes from the tokenizer"),
    ('{"rope_scaling": 5}', "--model-options: key 'rope_scaling' must be"),
])
def test_model_options_mistakes_are_one_line_errors(assets, tmp_path, capsys, options, message):
    """A --model-options key the tokenizer decides (vocab_size, eos_id) or a value of the wrong
    type is one error line naming the key, exit 2, and no run directory is made."""
    config = _tiny_config_file(assets, tmp_path)
    assert tm.main(["--config", config, "--model-options", options]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "run").exists()  # refused before any work


def test_overfit_honours_max_steps_and_lr_and_refuses_what_it_cannot(capsys):
    """--overfit takes --max-steps and --lr (a FAIL in 3 steps at lr 1e-6, not a PASS after 66),
    refuses what it cannot honour (--lora-r 4 on a plain from-scratch model) and notes the run
    flags it drops (it writes no run)."""
    assert tm.main(["--overfit", "--max-steps", "3", "--lr", "1e-6", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL") and "in 3 steps" in out and "barely moved" in out
    assert "raise --lr (1e-06)" in out
    for flag, value in (("--lr", "0"), ("--lr", "nan"), ("--max-steps", "0")):  # never a PASS
        assert tm.main(["--overfit", flag, value, "--no-progress"]) == 2
        assert f"{flag}): must be" in capsys.readouterr().err
    tm.main(["--overfit", "--max-steps", "3", "--no-progress"])  # warmup fits in the 3 steps
    captured = capsys.readouterr()
    assert "barely moved" not in captured.out and "note:" not in captured.err
    tm.main(["--overfit", "--max-steps", "3", "--no-progress", "--name", "mine", "--no-export"])
    err = capsys.readouterr().err  # a command line with --overfit added: its run flags noted
    assert "writes no run, so the run settings name, export mean nothing" in err
    assert "--overfit-batches" in err
    assert tm.main(["--overfit", "--lora-r", "4", "--init-from", "x", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot honour init_from='x', lora_r=4" in err and "--overfit-batches" in err


def test_overfit_builds_the_preset_it_is_given(capsys):
    """--overfit --preset X checks X's model (the parameters it reports are X's), and without a
    preset a small 2 x 128 model."""
    import re

    from architecture import PRESETS

    def parameters(*flags: str) -> float:
        tm.main(["--overfit", "--max-steps", "1", "--no-progress", *flags])
        return float(re.search(r"([0-9.]+)M parameters", capsys.readouterr().out)[1])

    small = parameters()
    tiny = parameters("--preset", "tiny")
    wide = parameters("--preset", "code-6x256")
    assert small < wide and tiny < wide and tiny != small
    assert PRESETS["code-6x256"].n_layer == 6


def test_overfit_cut_short_by_max_steps_says_so_a_stalled_loss_does_not(monkeypatch, capsys):
    """A sound model given 30 steps is told to raise --max-steps, not diagnosed "inputs and
    targets disagree", which would send its user after a bug it does not have; a loss that
    stalls still is."""
    assert tm.main(["--overfit", "--max-steps", "30", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert all(w in out for w in ("still falling", "30 steps", "raise --max-steps"))
    assert "disagree" not in out
    losses = iter([6.0, 5.0, 4.0, *[3.0] * 37])
    monkeypatch.setattr(trainer_module.Trainer, "train_step",
                        lambda self, batches: _figures(next(losses)))
    assert tm.main(["--overfit", "--max-steps", "40", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "stalled above the target" in out and "still falling" not in out


def test_the_validation_examples_do_not_depend_on_batch_size_or_accumulation(assets, tmp_path):
    """Runs that split the same batch differently (a sweep over batch_size) are scored on the
    same validation examples, and the same weights give the same val_loss."""
    losses, examples = [], []
    for i, (batch_size, grad_accum) in enumerate([(4, 2), (8, 1), (3, 1)]):
        cfg = tiny_cfg(assets, tmp_path, batch_size=batch_size, grad_accum=grad_accum,
                       eval_examples=10, name=f"v{i}")
        run = built_run(cfg)
        batches, _ = run.data.batches.validation()
        batches = list(batches)
        examples.append([row[mask].tolist() for b in batches
                         for row, mask in zip(b["input_ids"], b["labels"] != kernels.IGNORE_INDEX)])
        losses.append(run.trainer.evaluate(batches)["val_loss"])
        closed(run)
    assert len(examples[0]) == 10 and examples[0] == examples[1] == examples[2]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) == pytest.approx(losses[2], rel=1e-6)


def test_a_run_that_fails_before_writing_anything_leaves_no_directory(assets, tmp_path):
    """Data refused before the run is claimed (a missing source: no runs/ either), or while it
    is read (a broken JSONL record, the run directory made by then): no directory is left."""
    cfg = tiny_cfg(assets, tmp_path, name="nodata", data=[str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="missing"):
        tm.train(cfg)
    assert not Path(cfg.out_dir).exists()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "x = 1\\n"}\n{"text": \n')
    with pytest.raises(ValueError, match="broken.jsonl"):
        tm.train(dataclasses.replace(cfg, data=[str(broken)]))
    assert sorted(p.name for p in Path(cfg.out_dir).iterdir()) == []


# The family of each bundled recipe's base, by a part of its hub id.
RECIPE_FAMILIES = {"Llama": "llama", "codegen": "codegen", "phi-1_5": "phi", "Qwen2.5": "qwen2",
                   "starcoder": "gpt_bigcode", "exec": "llama"}


def test_lora_settings_without_lora_r_are_refused(capsys, tmp_path):
    """--lora-alpha, --lora-dropout, --lora-targets or --export-merged without --lora-r would run
    a full fine-tune of every weight that silently ignores them: refused; every bundled recipe
    validates (each sets lora_r with them)."""
    from tiny_hf import save_tiny_hf

    base = tmp_path / "base"
    save_tiny_hf("llama", base, max_position_embeddings=1024)  # the recipes' contexts fit
    capsys.readouterr()  # transformers' progress bar
    for key, value in [("lora_alpha", 32.0), ("lora_dropout", 0.1), ("lora_targets", ["q_proj"]),
                       ("export_merged", True)]:
        with pytest.raises(ValueError, match=rf"^{key} \(.*: LoRA settings, but "
                                             r"lora_r \(0, --lora-r\) .*: set lora_r > 0, or drop them$"):
            plan.validate_config(trainconfig.TrainConfig(**{key: value}))
        plan.validate_config(trainconfig.TrainConfig(lora_r=4, init_from=str(base), **{key: value}))
    assert tm.main(["--lora-alpha", "32", "--lora-dropout", "0.1", "--export-merged"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in ("lora_alpha (32.0, --lora-alpha)",
                                  "lora_dropout (0.1, --lora-dropout)",
                                  "export_merged (True, --export-merged)", "lora_r (0, --lora-r)",
                                  "set lora_r > 0", "drop them")), err
    bases = {"llama": base}  # their bases are not here: a tiny one of each's family
    for recipe in sorted((ROOT / "configs").glob("*.json")):
        cfg = trainconfig.config_from_dict(trainconfig.load_config_file(recipe), str(recipe))
        stand_in = None
        if cfg.init_from is not None:
            family = next(family for key, family in RECIPE_FAMILIES.items()
                          if key in cfg.init_from)
            if family not in bases:
                bases[family] = tmp_path / family
                context = "n_positions" if family in ("gpt_bigcode", "codegen") else (
                    "max_position_embeddings")
                save_tiny_hf(family, bases[family], **{context: 1024})
            stand_in = str(bases[family])
        plan.validate_config(dataclasses.replace(cfg, init_from=stand_in))


def test_init_from_a_lora_adapter_says_what_to_load_instead(tmp_path, monkeypatch):
    """A LoRA run's export/ (an adapter) given to --init-from is refused at once, saying to use
    its base, its export/merged/ (as --help says, and that --export-merged writes it) or
    --init-adapter, not failing later with
    "config.json: not found (is it an HF checkpoint directory?)"."""
    from tiny_hf import save_tiny_hf

    base = tmp_path / "base"
    save_tiny_hf("llama", base, vocab_size=512)
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    (export / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": str(base)}))
    cfg = trainconfig.TrainConfig(init_from=str(export), lora_r=4)
    with pytest.raises(ValueError) as refused:
        plan.validate_config(cfg)
    said = str(refused.value)
    assert said.startswith(f"init_from ({str(export)!r}, --init-from): a LoRA adapter")
    assert all(words in said for words in ("use its base", "--export-merged", "export/merged",
                                           f"init_adapter (--init-adapter) to {export}"))
    shutil.copytree(base, export / "merged")
    plan.validate_config(dataclasses.replace(cfg, init_from=str(export / "merged")))
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at a hyphen too
    help_text = " ".join(trainconfig.build_parser().format_help().split())
    assert "its export/merged/, which --export-merged writes" in help_text


def test_help_says_what_quantize_bits_quantizes_and_what_base_dtype_holds_under_it():
    """--help says which weights --quantize-bits quantizes (the base's Linears, the head kept)
    and that --base-dtype, beside it, is the dtype of the weights left unquantized: the two
    flags combine, and the run's first line names both."""
    help_text = " ".join(trainconfig.build_parser().format_help().split())
    assert "4 (NF4): the frozen base's Linears but lm_head" in help_text
    assert "with quantize_bits, its unquantized weights" in help_text


def test_help_names_the_fields_of_the_preference_tasks_records(monkeypatch):
    """--help's --task names the fields a preference task's JSONL records hold (a pair's, and
    KTO's labelled completion) and where the format is told, so that a hand-written file can be
    made from the help alone."""
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at a hyphen too
    help_text = " ".join(trainconfig.build_parser().format_help().split())
    assert '{"prompt", "chosen", "rejected"}' in help_text
    assert '{"prompt", "completion", "label"}' in help_text and '"Preference tuning"' in help_text


def _peft_adapter(base: Path, out: Path, target_modules=("q_proj", "v_proj")):
    """An adapter made by PEFT on the HF checkpoint ``base`` (B random too, so that it changes
    the logits), saved to ``out`` naming ``base``; returns the PEFT model in eval mode."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=list(target_modules),
                   task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(out)
    return peft_model.eval()


def test_init_adapter_starts_from_a_peft_adapter_as_peft_computes_it(assets, tmp_path):
    """--init-adapter takes rank, alpha, dropout, targets and base from adapter_config.json, and
    the model before any step computes what PEFT's model computes."""
    base = tiny_llama(tmp_path)
    peft_model = _peft_adapter(base, tmp_path / "peft")
    cfg = plan.with_init_adapter(tiny_cfg(assets, tmp_path, init_adapter=str(tmp_path / "peft")))
    assert (cfg.init_from, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
            sorted(cfg.lora_targets)) == (str(base), 4, 8.0, 0.05, ["q_proj", "v_proj"])
    model = loading.build_model(model_settings(cfg), load_tokenizer(assets["tokenizer"])).eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == peft_model.get_nb_trainable_parameters()[0]
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), peft_model(ids).logits, atol=1e-5, rtol=1e-4)


def test_init_adapter_run_records_the_dropout_it_trains_with(assets, tmp_path):
    """A given --lora-dropout replaces the adapter's (0.05) in training, and the adapter the run
    saves records that dropout, the one PEFT trains on with (is_trainable=True)."""
    import transformers
    from peft import PeftModel

    import lora

    base = tiny_llama(tmp_path)
    _peft_adapter(base, tmp_path / "peft")
    cfg = plan.with_init_adapter(tiny_cfg(assets, tmp_path, init_adapter=str(tmp_path / "peft"),
                                          lora_dropout=0.1))
    model = loading.build_model(model_settings(cfg), load_tokenizer(assets["tokenizer"]))
    assert {module.dropout for _, module in lora.lora_modules(model)} == {0.1}
    lora.save_adapter(model, tmp_path / "saved", base_model_name_or_path=str(base))
    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.1
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                           tmp_path / "saved", is_trainable=True)
    assert peft_model.peft_config["default"].lora_dropout == 0.1


def test_init_adapter_trains_on_and_exports_an_adapter_peft_loads_on_the_same_base(
        assets, tmp_path):
    """A few steps move the PEFT adapter's weights (by AdamW's few lr-sized steps: on from
    them, not from new adapters); the export names the same base, and PEFT reads it as the
    run's best weights (what eval.py scores) compute."""
    import transformers
    from peft import PeftModel

    base = tiny_llama(tmp_path)
    _peft_adapter(base, tmp_path / "peft")
    cfg = tiny_cfg(assets, tmp_path, init_adapter=str(tmp_path / "peft"), lr=1e-3, max_steps=3,
                   eval_every=3, save_every=3, export=True)
    run = tm.train(cfg).run_dir
    config = json.loads((run / "export" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["r"], config["lora_alpha"],
            sorted(config["target_modules"])) == (str(base.resolve()), 4, 8.0,
                                                  ["q_proj", "v_proj"])
    start = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    end = load_file(run / "export" / "adapter_model.safetensors")
    assert start.keys() == end.keys()
    assert all(0 < (start[k] - end[k]).abs().max() < 0.01 for k in start if "lora_B" in k)
    assert all((start[k] - end[k]).abs().max() < 0.01 for k in start)
    run_cfg = trainconfig.config_from_dict(json.loads((run / rundir.CONFIG_FILE).read_text()))
    ours = loading.build_model(model_settings(run_cfg), load_tokenizer(run))
    checkpoint.load_model_tensors(ours, load_file(run / rundir.BEST_DIR / rundir.ADAPTER_FILE),
                                  "best", True)
    peft_model = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), run / "export").eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), peft_model(ids).logits, atol=1e-5,
                                   rtol=1e-4)


def test_init_adapter_whose_base_layer_differs_from_the_base_is_refused(assets, tmp_path):
    """PEFT saves an adapted embedding's base layer; one that is not the base's (rows of new
    tokens set before training) is refused: loaded and trained on, it would be lost, and the
    export (adapters only) on that base would compute something else (logits 1.09 apart after 2
    steps at lr 1e-9)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    _peft_adapter(base, tmp_path / "same", target_modules=("embed_tokens", "q_proj"))
    with torch.no_grad():
        hf.model.embed_tokens.weight[-4:] = torch.randn(4, hf.config.hidden_size)
    get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
                   ).save_pretrained(tmp_path / "changed")
    tok = load_tokenizer(assets["tokenizer"])
    cfg = plan.with_init_adapter(tiny_cfg(assets, tmp_path, init_adapter=str(tmp_path / "same")))
    # the base's own embedding, as PEFT saves it by default: taken
    loading.build_model(model_settings(cfg), tok)
    cfg = plan.with_init_adapter(tiny_cfg(assets, tmp_path, init_adapter=str(tmp_path / "changed")))
    with pytest.raises(ValueError, match=r"base_model\.model\.model\.embed_tokens\.base_layer"
                       r"\.weight .*differs from the base's.*export would lose"):
        loading.build_model(model_settings(cfg), tok)


def test_an_init_adapter_run_resumes_and_evaluates_after_its_adapter_dir_is_gone(
        assets, tmp_path):
    """The run keeps its own copy of the adapter's config: once it has weights, deleting the
    adapter directory changes nothing: a resume (--resume, as the command line reads it) trains
    on as the same resume rebuilt from the adapter directory (a run without the copy gets
    one) does, and eval.py's model of its best/ computes the same logits."""
    from codelm import loading

    base = tiny_llama(tmp_path)
    _peft_adapter(base, tmp_path / "peft")
    cfg = tiny_cfg(assets, tmp_path, init_adapter=str(tmp_path / "peft"), max_steps=2,
                   eval_every=2, save_every=1)
    run = tm.train(cfg).run_dir
    adapter_config = (tmp_path / "peft" / "adapter_config.json").read_bytes()
    assert (run / rundir.INIT_ADAPTER_COPY).read_bytes() == adapter_config
    reference = tmp_path / "reference"
    shutil.copytree(run, reference)
    (reference / rundir.INIT_ADAPTER_COPY).unlink()
    ids = torch.randint(0, 256, (2, 16))

    def resumed_and_scored(run_dir: Path) -> tuple[tm.TrainResult, torch.Tensor]:
        result = tm.train(plan.parse_config(["--resume", str(run_dir), "--max-steps", "3"]))
        model = loading._load_run(run_dir, torch.device("cpu"))[0]
        with torch.no_grad():
            return result, model.eval()(ids)

    expected, expected_logits = resumed_and_scored(reference)
    assert (reference / rundir.INIT_ADAPTER_COPY).read_bytes() == adapter_config
    shutil.rmtree(tmp_path / "peft")
    result, logits = resumed_and_scored(run)
    assert result.step == expected.step == 3 and expected.train_loss is not None
    assert (result.train_loss, result.best_val_loss) == (expected.train_loss,
                                                         expected.best_val_loss)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)


def test_init_adapter_refuses_a_lora_setting_that_differs_from_the_adapter(tmp_path, capsys):
    """The adapter's weights fix its rank and targets: a --lora-* flag that differs is an error,
    not silently overridden; the adapter's own values (targets in any order) are accepted; its
    training-time dropout is overridden by a given one."""
    base = tiny_llama(tmp_path)
    _peft_adapter(base, tmp_path / "peft")
    adapter = str(tmp_path / "peft")
    plan.validate_config(trainconfig.TrainConfig(init_adapter=adapter, lora_r=4, lora_alpha=8,
                                                 lora_targets=["v_proj", "q_proj"]))
    for key, value in [("lora_r", 8), ("lora_alpha", 32.0), ("lora_targets", ["q_proj"])]:
        with pytest.raises(ValueError, match=rf"^{key} \(.*\) \(the adapter's: "):
            plan.validate_config(trainconfig.TrainConfig(init_adapter=adapter, **{key: value}))
    assert tm.main(["--init-adapter", adapter, "--lora-r", "8"]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("error: lora_r (8, --lora-r)"), err
    assert all(w in last for w in ("the adapter's: 4",
                                   f"init_adapter ({adapter!r}, --init-adapter)",
                                   f"{adapter}/adapter_config.json", "drop those settings")), err
    # Typed at its default value, a flag still says what the user wants: an error too.
    with pytest.raises(ValueError, match=r"^lora_alpha \(.*\) \(the adapter's: "):
        plan.parse_config(["--init-adapter", adapter, "--lora-alpha", "16"])
    # lora_dropout is a training-time setting the weights do not hold: a given one is taken
    assert plan.resolve(plan.parse_config(["--init-adapter", adapter, "--lora-dropout", "0.1"])
                        ).lora_dropout == 0.1
    assert plan.parse_config(["--init-adapter", adapter, "--lora-alpha", "8"]).lora_alpha == 8


def test_init_adapter_reads_lora_targets_none_as_the_adapters_targets(tmp_path):
    """--lora-targets none (a config file's "lora_targets": null, as every run's config.json
    holds) with --init-adapter chooses no targets, so the adapter's stand, whatever they are
    (not a TypeError from set(None))."""
    base = tiny_llama(tmp_path)
    narrow, attention = tmp_path / "qv", tmp_path / "qkvo"
    _peft_adapter(base, narrow)
    _peft_adapter(base, attention, ["q_proj", "k_proj", "v_proj", "o_proj"])
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"lora_targets": None}))
    for typed in (["--lora-targets", "none"], ["--config", str(config)]):
        for adapter in (narrow, attention):
            cfg = plan.parse_config(["--init-adapter", str(adapter), *typed])
            assert plan.with_init_adapter(cfg).lora_targets == json.loads(
                (adapter / "adapter_config.json").read_text())["target_modules"]


def test_init_adapter_targets_must_name_the_adapters_modules_the_same_way(tmp_path):
    """--lora-targets beside --init-adapter agree when they list the adapter's own names (in
    any order); other names, even codelm's for the same modules (qkv attn.proj for
    q/k/v/o_proj), are refused naming the adapter's."""
    adapter = _adapter_config(tmp_path / "peft", tiny_llama(tmp_path),
                              ["q_proj", "k_proj", "v_proj", "o_proj"])
    cfg = plan.with_init_adapter(trainconfig.TrainConfig(
        init_adapter=adapter, lora_targets=["o_proj", "v_proj", "k_proj", "q_proj"]))
    assert cfg.lora_targets == ["o_proj", "v_proj", "k_proj", "q_proj"]
    for targets in (["qkv", "attn.proj"], ["q_proj"], ["nowhere"]):
        with pytest.raises(ValueError, match=re.escape(
                f"lora_targets ({targets!r}, --lora-targets) (the adapter's: ") + r".*\): "
                rf"init_adapter \('{re.escape(adapter)}', --init-adapter\) fixes these"):
            plan.validate_config(trainconfig.TrainConfig(init_adapter=adapter,
                                                         lora_targets=targets))


def test_init_from_an_export_not_yet_trained_says_to_train_that_run_first(tmp_path):
    """A recipe's later stage starts from an earlier run's export/: where that is missing, the
    error says to train that run first; another missing directory gets no such advice."""
    def refused(path) -> str:
        with pytest.raises(ValueError) as e:
            plan.validate_config(trainconfig.TrainConfig(init_from=str(path)))
        return str(e.value)

    said = refused(tmp_path / "runs" / "stage1" / "export")
    assert all(w in said for w in ("not a directory", "export/", "train that run first",
                                   "python -m codelm.recipes CONFIG")), said
    assert refused(tmp_path / "models" / "mine").endswith("): not a directory")


def test_init_adapter_that_cannot_be_honoured_is_an_error_naming_the_path(tmp_path, offline_hub):
    """A missing directory, a run directory instead of its export/, an option codelm's LoRA
    refuses (the check load_adapter makes), and a base neither local nor in the hub cache."""
    def refused(**values) -> str:
        with pytest.raises(ValueError) as e:
            plan.validate_config(trainconfig.TrainConfig(**values))
        return str(e.value)

    missing = tmp_path / "nowhere"
    assert refused(init_adapter=str(missing)).startswith(
        f"init_adapter ({str(missing)!r}, --init-adapter): not a directory: give the directory "
        "of a PEFT adapter")
    run = tmp_path / "run"
    _peft_adapter(tiny_llama(tmp_path), run / "export")
    assert refused(init_adapter=str(run)) == (
        f"{run / 'adapter_config.json'}: not found; an adapter directory holds "
        f"adapter_config.json and adapter_model.safetensors ({run / 'export'} holds one)")
    file = run / "export" / "adapter_config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, "rank_pattern": {"q_proj": 2}}))
    assert refused(init_adapter=str(run / "export")) == (
        f"{file}: rank_pattern={{'q_proj': 2}} is not supported by codelm's LoRA")
    file.write_text(json.dumps({**config, "base_model_name_or_path": "org/model"}))
    error = refused(init_adapter=str(run / "export"))
    assert error.startswith(f"{file}: base_model_name_or_path org/model: no such directory")
    assert "hf download org/model" in error and error.endswith("name the base with --init-from")
    plan.validate_config(trainconfig.TrainConfig(init_adapter=str(run / "export"),
                                                 init_from=str(tmp_path / "base")))


def _adapter_config(path: Path, base: Path, target_modules) -> str:
    """A PEFT-style adapter directory holding only its adapter_config.json (all that
    with_init_adapter reads), on the local directory ``base`` (a tiny Llama's config.json
    alone)."""
    from transformers import LlamaConfig

    path.mkdir()
    base.mkdir(exist_ok=True)
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=64).to_json_file(base / "config.json")
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
         "target_modules": target_modules, "base_model_name_or_path": str(base)}))
    return str(path)


def test_init_adapter_targets_agree_in_any_order_and_a_regex_is_left_to_the_file(tmp_path):
    """PEFT writes target_modules from a set, so its order is arbitrary: the same names in
    another order agree. A regular expression (PEFT's other form) is no list of names: the run
    keeps lora_targets unset and load_adapter reads the file's."""
    base = tmp_path / "base"
    listed = _adapter_config(tmp_path / "listed", base, ["q_proj", "v_proj"])
    cfg = plan.with_init_adapter(trainconfig.TrainConfig(init_adapter=listed,
                                              lora_targets=["v_proj", "q_proj"]))
    assert (cfg.init_from, cfg.lora_r, cfg.lora_alpha, sorted(cfg.lora_targets)) == (
        str(base), 4, 8.0, ["q_proj", "v_proj"])
    regex = _adapter_config(tmp_path / "regex", base, r".*\.(q_proj|v_proj)$")
    cfg = plan.with_init_adapter(trainconfig.TrainConfig(init_adapter=regex))
    assert (cfg.lora_r, cfg.lora_targets) == (4, None)
    plan.validate_config(cfg)


def test_a_config_files_lora_key_at_its_default_that_differs_from_the_init_adapter_is_refused(
        tmp_path):
    """--config's lora_alpha 16 (the default) beside an adapter of alpha 8 says what the user
    wants as a typed --lora-alpha 16 does: an error, not the adapter's value; its own agrees."""
    adapter = _adapter_config(tmp_path / "adapter", tmp_path / "base", ["q_proj", "v_proj"])
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"lora_alpha": 16.0}))
    with pytest.raises(ValueError, match=rf"^lora_alpha \(16\.0, --config {re.escape(str(config))}"
                                         r"\).*adapter's: 8.*--init-adapter\) fixes"):
        plan.parse_config(["--init-adapter", adapter, "--config", str(config)])
    config.write_text(json.dumps({"lora_alpha": 8}))
    assert plan.parse_config(["--init-adapter", adapter, "--config", str(config)]).lora_alpha == 8


def test_init_adapter_given_a_file_is_refused_as_not_a_directory(tmp_path):
    """An adapter is a directory: a file (its adapter_config.json, say) is named as such."""
    file = tmp_path / "adapter_config.json"
    file.write_text("{}")
    with pytest.raises(ValueError, match=rf"^init_adapter \({re.escape(repr(str(file)))}, "
                                         r"--init-adapter\): not a directory: give the "
                                         r"directory of a PEFT adapter"):
        plan.validate_config(trainconfig.TrainConfig(init_adapter=str(file)))


def test_data_sources_that_are_no_paths_are_kept_as_given(tmp_path, monkeypatch):
    """--data's paths are kept absolute; "stdlib", a Hugging Face dataset id and a URL are
    names, not paths under the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "code").mkdir()
    given = ["code", "stdlib", "bigcode/the-stack-smol", "https://github.com/psf/requests"]
    cfg = checkpoint.with_absolute_paths(trainconfig.TrainConfig(data=given))
    assert cfg.data == [str(tmp_path / "code"), *given[1:]]


def test_init_adapter_is_a_run_path_saved_absolute_and_checked_on_resume(tmp_path, monkeypatch):
    """Like --init-from, --init-adapter is kept absolute in config.json (eval.py and --resume
    from elsewhere find it), and a resume whose adapter has gone names it at once."""
    monkeypatch.chdir(tmp_path)
    cfg = checkpoint.with_absolute_paths(trainconfig.TrainConfig(init_adapter="peft"))
    assert Path(cfg.init_adapter) == tmp_path / "peft"
    run = tmp_path / "run"
    run.mkdir()
    gone = tmp_path / "gone"
    (run / rundir.CONFIG_FILE).write_text(json.dumps({"init_adapter": str(gone)}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(run / rundir.CONFIG_FILE))}: "
                                         rf"init_adapter {re.escape(repr(str(gone)))} not found: .*"
                                         r"put it back there"):
        plan.parse_config(["--resume", str(run)])


def test_a_run_without_weights_needs_its_adapter_directory_not_its_copy(tmp_path):
    """A run stopped before its first weights starts again from the adapter, so its copy of the
    adapter's config (INIT_ADAPTER_COPY) counts only once the run holds weights: before, a
    resume whose adapter has gone names it at once, as a run without the copy does."""
    adapter = Path(_adapter_config(tmp_path / "adapter", tmp_path / "base", ["q_proj"]))
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.CONFIG_FILE).write_text(json.dumps({"init_adapter": str(adapter)}))
    shutil.copy(adapter / "adapter_config.json", run / rundir.INIT_ADAPTER_COPY)
    shutil.rmtree(adapter)
    assert rundir.adapter_copy(run) is None
    with pytest.raises(ValueError, match=rf"init_adapter {re.escape(repr(str(adapter)))} not "
                                         "found: .*put it back there"):
        plan.parse_config(["--resume", str(run)])
    (run / rundir.BEST_DIR).mkdir()
    assert rundir.adapter_copy(run) == run / rundir.INIT_ADAPTER_COPY


def test_a_resume_of_a_run_with_weights_takes_the_adapter_settings_from_its_copy(tmp_path):
    """Resumed once it holds weights, an init_adapter run reads its own copy of the adapter's
    config for the LoRA settings and (without init_from) the base, and an error names that
    copy: the adapter directory may be gone."""
    adapter = Path(_adapter_config(tmp_path / "adapter", tmp_path / "base", ["q_proj", "v_proj"]))
    run = tmp_path / "run"
    (run / rundir.BEST_DIR).mkdir(parents=True)
    shutil.copy(adapter / "adapter_config.json", run / rundir.INIT_ADAPTER_COPY)
    shutil.rmtree(adapter)
    cfg = plan.with_init_adapter(trainconfig.TrainConfig(init_adapter=str(adapter),
                                                         resume=str(run)))
    assert (cfg.init_from, cfg.lora_r, cfg.lora_alpha, sorted(cfg.lora_targets)) == (
        str(tmp_path / "base"), 4, 8.0, ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"^lora_r \(8, --lora-r\) \(the adapter's: 4\): "
                                         rf".*fixes these \({re.escape(str(run))}/"
                                         r"init_adapter_config\.json\)"):
        plan.with_init_adapter(trainconfig.TrainConfig(init_adapter=str(adapter), resume=str(run),
                                                       lora_r=8))


def test_eval_scores_best_when_a_resume_trained_past_the_export(assets, tmp_path, capsys):
    """export/ records which best/ step it holds: a resume with --no-export that finds a new best
    leaves export/ at the old best, and eval.py scores best/, not that stale export."""
    from codelm import loading

    cfg = tiny_cfg(assets, tmp_path, max_steps=4, eval_every=2, export=True)
    run = tm.train(cfg).run_dir
    exported = rundir.best_step(run)
    assert json.loads((run / "export" / rundir.EXPORT_RECORD).read_text()) == {"best_step": exported}
    assert rundir.stale_export(run) is None
    tm.train(dataclasses.replace(cfg, resume=str(run), max_steps=12, export=False))
    best = json.loads((run / "best" / "metrics.json").read_text())["step"]
    assert best > exported  # the loss kept falling
    capsys.readouterr()
    loaded = loading.load_model(str(run), torch.device("cpu")).model
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("note: "), err
    assert all(w in err for w in (f"{run / 'export'} is not used", f"step {exported}",
                                  f"step {best}", "loading best/")), err
    assert_bit_equal(checkpoint.model_tensors(loaded, False),
                     load_file(run / "best" / rundir.MODEL_FILE))


def test_resume_compares_with_the_settings_the_checkpoint_was_trained_with(assets, tmp_path,
                                                                         capsys):
    """--resume compares with the checkpoint's settings, not the run's config.json, where a
    hand-edited lr or block_size would be compared with itself: accepted, and recorded as if the
    run had trained with it."""
    config = _tiny_config_file(assets, tmp_path, max_steps=2, eval_every=2)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "lr": 0.5}))
    capsys.readouterr()
    assert tm.main(["--resume", str(run), "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert f"error: {run / 'checkpoints' / 'step-2' / 'config.json'}: the run was trained " in err
    assert f"lr={saved['lr']!r} (now 0.5)" in err and err.count("\n") == 1


def test_a_run_saves_its_paths_absolute_and_resumes_from_any_directory(assets, tmp_path,
                                                                       monkeypatch, capsys):
    """config.json keeps --data and --tokenizer absolute: as typed, relative to the directory
    training ran in, --resume (and eval.py) elsewhere would fail on a path that does not say
    where it came from. A run's relative paths still work from its own directory, and are
    named with their config.json elsewhere."""
    root = Path(assets["corpus"]).parent
    monkeypatch.chdir(root)
    config = _tiny_config_file(assets, tmp_path, data=["corpus"], tokenizer="tokenizer.json",
                               max_steps=2, eval_every=2)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    saved = json.loads((run / "config.json").read_text())
    assert Path(saved["data"][0]).is_absolute() and Path(saved["tokenizer"]).is_absolute()
    assert Path(saved["data"][0]).samefile(assets["corpus"])
    monkeypatch.chdir(tmp_path)
    assert tm.main(["--resume", str(run), "--max-steps", "4"]) == 0
    monkeypatch.chdir(root)  # typed relative again: the same files, so no change of data
    assert tm.main(["--resume", str(run), "--data", "corpus", "--max-steps", "6"]) == 0
    assert json.loads((run / "config.json").read_text())["data"] == saved["data"]

    older = json.dumps({**saved, "data": ["corpus"]})  # a run whose configs hold relative paths
    for config_file in [run / "config.json", *run.glob("checkpoints/*/config.json")]:
        config_file.write_text(older)
    for checkpoint_dir in run.glob("checkpoints/*"):
        process.write_manifest(checkpoint_dir)  # as that run recorded them
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert tm.main(["--resume", str(run), "--max-steps", "8"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in (str(run / "config.json"), "data 'corpus'", "not found",
                                  "put it back there")), err
    monkeypatch.chdir(root)
    assert tm.main(["--resume", str(run), "--max-steps", "8"]) == 0
    assert json.loads((run / "config.json").read_text())["data"] == ["corpus"]


ADAPTED = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]


@pytest.mark.parametrize("values, adapted, said", [
    ({}, [], ""),
    ({"lora_r": 8}, ADAPTED, ", LoRA r 8 in 4 modules (qkv, proj) on an fp32 base"),
    ({"lora_r": 8, "quantize_bits": 4}, ADAPTED[:1], ", LoRA r 8 in 1 module (qkv) on an NF4 base"),
    ({"lora_r": 8, "quantize_bits": 8}, ADAPTED, ", LoRA r 8 in 4 modules (qkv, proj) on an int8 base"),
    ({"lora_r": 8, "quantize_bits": 4, "base_dtype": "bf16"}, ["tok_emb", *ADAPTED[2:]],
     ", LoRA r 8 in 3 modules (tok_emb, qkv, proj) on an NF4 base (the rest bf16)"),
    ({"lora_r": 16, "lora_dora": True, "base_dtype": "bf16"}, ADAPTED,
     ", DoRA r 16 in 4 modules (qkv, proj) on a bf16 base")])
def test_a_runs_first_line_names_its_adapters_and_the_base_they_train_on(values, adapted, said):
    """The first line of a LoRA run says so: how many modules the adapters adapt and which
    (each name once, in the model's order), and the form of the frozen base (QLoRA's NF4 or
    int8, a bf16 base, and the dtype --base-dtype holds a quantized base's other weights in):
    what the log alone tells of the run's memory and numerics."""
    assert build.adapters_on(trainconfig.TrainConfig(**values), adapted) == said


def test_the_memory_docs_quote_a_qlora_runs_first_line_as_it_is_written():
    """docs/training.md's Memory section says what --quantize-bits quantizes and what
    --base-dtype holds beside it, quoting the run's first line: the quote is the line's words."""
    docs = " ".join((ROOT / "docs" / "training.md").read_text().split())
    said = build.adapters_on(trainconfig.TrainConfig(lora_r=8, quantize_bits=4, base_dtype="bf16"),
                             ADAPTED)
    assert "holds its Linears in NF4" in docs
    assert f'"on {quantize.base_form(4, "bf16")}"' in docs and said.endswith(
        quantize.base_form(4, "bf16"))


def test_the_preference_docs_say_what_a_lora_supervised_runs_export_gives(tmp_path):
    """docs/training.md's preference commands take the supervised run's export: for a LoRA run
    that is an adapter, which --init-from refuses, so the docs name the two ways on that the
    refusal names (its export/merged/, or --init-adapter)."""
    docs = " ".join((ROOT / "docs" / "training.md").read_text().split())
    section = docs[docs.index("## Preference tuning"):docs.index("## Packing")]
    assert "`export/merged/` (written by `--export-merged`)" in section
    assert "`--init-adapter SFT_EXPORT` in place of `--init-from SFT_EXPORT --lora-r 16`" in section
    base = tiny_llama(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / adapter_config.ADAPTER_CONFIG).write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": str(base), "r": 4, "lora_alpha": 8,
         "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError) as refused:
        plan.parse_config(["--task", "dpo", "--data", "p.jsonl", "--init-from", str(adapter),
                           "--lora-r", "16"])
    assert "--export-merged" in str(refused.value) and "--init-adapter" in str(refused.value)


def test_final_eval_typed_for_a_run_that_makes_none_says_why_and_what_scores_it(tmp_path, capsys):
    """--final-eval on a LoRA run (or another task, or no export) would be ignored: a note says
    why and names eval.py's command; a from-scratch lm run takes it without a word."""
    base = tiny_llama(tmp_path)
    plan.parse_config(["--final-eval", "--init-from", str(base), "--lora-r", "4"])
    err = capsys.readouterr().err
    assert "--final-eval" in err and "a LoRA run" in err and "--tasks line method" in err
    plan.parse_config(["--final-eval", "--task", "completion", "--preset", "tiny"])
    assert "task completion" in capsys.readouterr().err
    plan.parse_config(["--final-eval", "--preset", "tiny"])
    assert "--final-eval" not in capsys.readouterr().err


def test_train_from_python_checks_its_config_as_the_command_line_does(assets, tmp_path):
    """A TrainConfig built in Python is checked before anything is prepared: the error the
    command line would give, and no run directory."""
    with pytest.raises(ValueError, match=r"^max_steps \(-5, --max-steps\): must be"):
        tm.train(tiny_cfg(assets, tmp_path, max_steps=-5))
    assert not (tmp_path / "runs").exists()


def test_lora_without_a_pretrained_base_is_refused(assets, tmp_path, capsys):
    """--lora-r without --init-from is refused: it would freeze a random model and train only its
    adapters (rc 0, "0.00M trainable", a validation loss near ln(vocab)). A LoRA run on a base
    is accepted, ends naming the eval.py command that scores it, and resumes (its config.json
    names the base)."""
    config = _tiny_config_file(assets, tmp_path, max_steps=2, eval_every=2)
    assert tm.main(["--config", config, "--lora-r", "4"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in ("lora_r (4, --lora-r)", "pretrained base",
                                  f"init_from, --config {config}", "set init_from",
                                  "lora_r 0")), err
    assert not (tmp_path / "runs" / "run").exists()
    base = tiny_llama(tmp_path)
    assert tm.main(["--config", config, "--lora-r", "4", "--init-from", str(base)]) == 0
    out = capsys.readouterr().out
    said = re.search(r"\((\S+) trainable\), LoRA r 4 in (\d+) modules \(qkv, proj\) on an "
                     r"fp32 base,", out)
    assert re.fullmatch(r"\d{1,3}(,\d{3})*", said.group(1)), said.group(1)  # not "0.00M"
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert int(said.group(2)) == 2 * layers  # the default targets: each block's qkv and proj
    run = tmp_path / "runs" / "run"
    # no final evaluation for LoRA: the last line says how to score it beside its base
    assert out.splitlines()[-1] == f"score it: python eval.py --models base={base} {run}"
    assert tm.main(["--resume", str(run), "--max-steps", "3"]) == 0
    assert rundir.list_checkpoints(run)[-1].name == "step-3"


def test_an_init_adapter_runs_closing_hint_scores_it_beside_that_adapter_on_a_resume_too():
    """A run that trained an --init-adapter on is scored beside that adapter, the model it
    started from, whether its base is named (a resume reads it into init_from) or not; a run
    from a base alone, beside the base."""
    for task, data in (("dpo", ["pairs.jsonl"]), ("completion", None)):
        for base in (None, "models/base"):
            config = trainconfig.TrainConfig(task=task, data=data, init_from=base,
                                             init_adapter="runs/sft/export")
            command, _ = tm.eval_command(config, Path("runs/tuned"))
            assert "--models start=runs/sft/export runs/tuned" in command
            assert "base=" not in command
    lora = trainconfig.TrainConfig(task="dpo", data=["pairs.jsonl"], init_from="models/base",
                                   lora_r=8)
    assert "--models base=models/base runs/tuned" in tm.eval_command(lora, Path("runs/tuned"))[0]


def test_lora_targets_that_match_nothing_are_refused_before_the_data(assets, tmp_path,
                                                                     capsys):
    """The adapters a LoRA run adds are added to its base's shape on the meta device as the
    config is checked: a target that matches no module, or DoRA on an embedding, is refused
    in one line before any data is read, and no run directory is made."""
    config = _tiny_config_file(assets, tmp_path, max_steps=2, eval_every=2)
    base = tiny_llama(tmp_path)
    capsys.readouterr()
    for wrong, said in ((["--lora-targets", "nowhere"], "['nowhere'] match no module"),
                        (["--lora-targets", "embed_tokens", "--lora-dora"], "embed_tokens")):
        assert tm.main(["--config", config, "--lora-r", "4", "--init-from", str(base),
                        *wrong]) == 2
        out, err = capsys.readouterr()
        assert len(err.splitlines()) == 1 and said in err, err
        assert "data:" not in out and not (tmp_path / "runs" / "run").exists(), out


def test_resume_of_a_checkpoint_or_best_dir_is_refused_naming_the_run(assets, tmp_path, capsys):
    """--resume RUN/checkpoints/step-N (or RUN/best) is refused, naming RUN, and the directory
    is left as it was: no whole new run is trained inside it."""
    config = _tiny_config_file(assets, tmp_path, max_steps=2, eval_every=2)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    for weights in (rundir.list_checkpoints(run)[-1], run / rundir.BEST_DIR):
        before = sorted(p.name for p in weights.iterdir())
        capsys.readouterr()
        assert tm.main(["--resume", str(weights), "--max-steps", "4"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert all(w in err for w in (f"--resume {weights}:", "not a run directory",
                                      f"--resume {run} continues")), err
        assert sorted(p.name for p in weights.iterdir()) == before


def test_resume_refuses_a_name_or_out_dir_of_another_run(assets, tmp_path, capsys):
    """--resume RUN --name other is refused, not continuing RUN with --name ignored: one who
    means to branch into a new run would get the original extended. The run's own name and
    parent are accepted."""
    config = _tiny_config_file(assets, tmp_path, max_steps=2, eval_every=2)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    capsys.readouterr()
    assert tm.main(["--resume", str(run), "--name", "other", "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in (f"--resume {run}", "--name other", str(run.parent / "other"),
                                  "drop --name other", "drop --resume")), err
    elsewhere = tmp_path / "elsewhere"
    assert tm.main(["--resume", str(run), "--out-dir", str(elsewhere), "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert f"--out-dir {elsewhere} names another run ({elsewhere / 'run'})" in err
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step-2"]
    assert not (run.parent / "other").exists() and not elsewhere.exists()
    (tmp_path / "b").mkdir()
    other = Path(_tiny_config_file(assets, tmp_path / "b", max_steps=2, eval_every=2))
    assert tm.main(["--resume", str(run), "--config", str(other), "--max-steps", "4"]) == 2
    assert f"out_dir '{tmp_path / 'b' / 'runs'}' in --config {other} names another run" in (
        capsys.readouterr().err)
    assert tm.main(["--resume", f"{run}/", "--name", "run", "--out-dir",
                    os.path.relpath(run.parent), "--max-steps", "4"]) == 0
    assert rundir.list_checkpoints(run)[-1].name == "step-4"
    assert tm.main(["--resume", str(run), "--config", config, "--max-steps", "5"]) == 0


# --------------------------------------------------------------------------------------------
# The last step logged, honest interrupt and budget messages, a resume's length and precision,
# the CUDA RNG of one device, DDP without buffer broadcasts
# --------------------------------------------------------------------------------------------


def _train_steps(run_dir: Path) -> list[int]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [m["step"] for m in map(json.loads, lines) if m["kind"] == "train"]


def _train_lrs(run_dir: Path) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["lr"] for m in map(json.loads, lines) if m["kind"] == "train"}


def _train_losses(run_dir: Path) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if m["kind"] == "train"}


def test_the_last_step_is_logged_whatever_ends_the_run(assets, tmp_path, monkeypatch):
    """Beside steps divisible by log_every (and step 1), the final step and a step a stop signal
    ends the run at are logged: else a 15-step run at log_every 10 would lose the loss of steps
    11-15, and recipes would compare step 1 with itself. The resume adds no second line for it
    and stays bit-exact."""
    common = dict(max_steps=9, log_every=5, dropout=0.1)
    straight = tm.train(tiny_cfg(assets, tmp_path, name="straight", **common))
    assert _train_steps(straight.run_dir) == [1, 5, 9]

    original = sigterm_at_step(monkeypatch, 6)
    cfg = tiny_cfg(assets, tmp_path, name="stopped", **common)
    assert tm.train(cfg).interrupted == "SIGTERM"
    run = Path(cfg.out_dir) / "stopped"
    assert _train_steps(run) == [1, 5, 6]
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original)
    tm.train(dataclasses.replace(cfg, resume=str(run)))
    assert _train_steps(run) == [1, 5, 6, 9]
    losses, reference = _train_losses(run), _train_losses(straight.run_dir)
    assert all(losses[step] == reference[step] for step in (1, 5, 9))
    assert_bit_equal(final_weights(straight.run_dir, 9), final_weights(run, 9))


def test_a_failed_start_in_a_directory_of_the_users_leaves_their_files(assets, tmp_path,
                                                                       monkeypatch):
    """A run stopped before its config.json removes the tokenizer files it wrote, never ones
    that were there before it (a --name naming the user's own tokenizer directory)."""
    def fails(*args, **kwargs):
        raise ValueError("bad data")

    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    for name in rundir.WRITTEN_BEFORE_CONFIG:
        (run / name).write_text("mine")
    monkeypatch.setattr(build, "prepare", fails)
    with pytest.raises(ValueError, match="bad data"):
        tm.train(tiny_cfg(assets, tmp_path))
    assert all((run / name).read_text() == "mine" for name in rundir.WRITTEN_BEFORE_CONFIG)


def test_resume_refuses_a_length_below_its_checkpoint(assets, tmp_path, capsys):
    """--resume RUN --max-steps 3 on a checkpoint at step 4 is refused, naming the key, before
    anything is written (not training nothing, exiting 0, with max_steps 3 in config.json);
    the checkpoint's own length still ends the run (no second line for its last step)."""
    config = _tiny_config_file(assets, tmp_path, max_steps=4)
    assert tm.main(["--config", config]) == 0
    run = tmp_path / "runs" / "run"
    kept = {p: p.read_bytes() for p in (run / "config.json", run / "metrics.jsonl")}
    capsys.readouterr()
    assert tm.main(["--resume", str(run), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in ("max_steps (3, --max-steps)", "checkpoint", "(4)",
                                  "set max_steps to 4 or more")), err
    for unset in ([], ["--max-steps", "none"]):  # typed, it replaces the run's max_steps
        assert tm.main(["--resume", str(run), "--epochs", "0.001", *unset]) == 2
        err = capsys.readouterr().err
        assert "epochs (0.001, --epochs): " in err and "below the step of the checkpoint " in err
        assert "set a larger epochs" in err
    low = tmp_path / "low.json"  # set in a --config file beside --resume: named as that file
    low.write_text(json.dumps({"max_steps": 3}))
    assert tm.main(["--resume", str(run), "--config", str(low)]) == 2
    assert capsys.readouterr().err.startswith(f"error: max_steps (3, --config {low}): ")
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert tm.main(["--resume", str(run), "--max-steps", "4"]) == 0
    assert _train_steps(run) == list(range(1, 5))


def _one_second_a_step(monkeypatch, slower_after: int | None = None,
                       slow_s: float = 10.0) -> list[float]:
    """A fake clock for the trainer on which each training step takes 1 s (``slow_s`` after
    the first ``slower_after`` steps); returns its time, a one-item list."""
    import types

    now = [0.0]
    steps = [0]
    clock = types.SimpleNamespace(perf_counter=lambda: now[0], strftime=lambda fmt: "x")
    for module in (tm, build, record):
        monkeypatch.setattr(module, "time", clock)
    original = trainer_module.Trainer.train_step

    def timed(self, *args, **kwargs):
        steps[0] += 1
        slow = slower_after is not None and steps[0] > slower_after
        now[0] += slow_s if slow else 1.0
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", timed)
    return now


def test_a_time_budget_stop_says_the_run_is_not_finished(assets, tmp_path, monkeypatch, capsys):
    """--max-time-s does not end a run like a finished one (exit 0, no word of the steps left, an
    export as if final). The export of the best weights so far is kept (eval.py can score it;
    a resume exports again at its end), but the run says it is not finished, and TrainResult
    records it. On a fake clock each step takes 1 s."""
    _one_second_a_step(monkeypatch)
    cfg = tiny_cfg(assets, tmp_path, log_every=5, max_time_s=2.5, export=True)
    result = tm.train(cfg)
    run = Path(cfg.out_dir) / "run"
    assert result.stopped_by_budget and result.step == 3 and result.interrupted is None
    said = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("time budget (--max-time-s 2.5) reached at step 3/12"))
    assert all(words in said for words in ("not finished", "checkpoint saved",
                                           "best weights so far (step 3)", f"--resume {run}"))
    assert _train_steps(run) == [1, 3] and rundir.list_checkpoints(run)[-1].name == "step-3"
    resumed = tm.train(dataclasses.replace(cfg, resume=str(run), max_time_s=None))
    assert not resumed.stopped_by_budget and resumed.step == 12
    assert _train_steps(run) == [1, 3, 5, 10, 12]
    assert "time budget" not in capsys.readouterr().out


def _simulated_gpus(monkeypatch, count: int) -> tuple[torch.Generator, ...]:
    """torch.cuda's own RNG functions on a machine with ``count`` GPUs: CPU generators stand in
    for the GPUs' (their states are alike ByteTensors), the CUDA initialisation is skipped."""
    generators = tuple(torch.Generator().manual_seed(100 + i) for i in range(count))
    monkeypatch.setattr(torch.cuda, "default_generators", generators)
    monkeypatch.setattr(torch.cuda.random, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda.random, "_lazy_init", lambda: None)
    monkeypatch.setattr(torch.cuda.random, "_lazy_call", lambda cb, **kwargs: cb())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return generators


def test_a_restored_rng_state_draws_again_what_python_numpy_and_torch_drew(tmp_path):
    """rng_state, saved and loaded as a checkpoint holds it (weights_only), then given back by
    set_rng_state: Python's, NumPy's and torch's streams each draw the very numbers they drew
    after it was taken, so a resumed run's dropout and sampling repeat the unbroken run's."""
    import random

    import numpy as np

    rng.seed_everything(7)
    torch.save(rng.rng_state(), tmp_path / "rng.pt")
    first = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    rng.seed_everything(8)  # other streams in between, as a new process has
    rng.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert again[0] == first[0]
    assert again[1] == first[1]
    assert torch.equal(again[2], first[2])


def test_checkpoints_hold_the_training_gpus_rng_and_resume_where_fewer_are_visible(
        monkeypatch):
    """Only the training GPU's generator is saved: saving every visible one (8 on an 8-GPU node)
    and restoring them all would raise IndexError on a resume with fewer visible."""
    gpus = _simulated_gpus(monkeypatch, 8)
    state = rng.rng_state(torch.device("cuda", 1))
    assert torch.equal(state["cuda"], gpus[1].get_state())
    assert "cuda" not in rng.rng_state(torch.device("cpu"))
    gpus = _simulated_gpus(monkeypatch, 2)
    untouched = gpus[1].get_state()
    rng.set_rng_state(state, torch.device("cuda", 0))
    assert torch.equal(gpus[0].get_state(), state["cuda"])
    assert torch.equal(gpus[1].get_state(), untouched)


def test_each_ranks_seed_is_its_own_across_neighbouring_run_seeds():
    """Rank 0 keeps the run's seed (a one-process run's streams); the other ranks' seeds are
    distinct from every rank's of the runs at neighbouring seeds: seed + rank would give seed
    1's rank 0 the dropout stream of seed 0's rank 1."""
    seeds = [rng.rank_seed(seed, rank) for seed in range(8) for rank in range(8)]
    assert len(set(seeds)) == len(seeds)
    assert [rng.rank_seed(seed, 0) for seed in range(3)] == [0, 1, 2]
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_a_resume_keeps_the_precision_auto_trained_in(assets, tmp_path, monkeypatch, capsys):
    """precision "auto" is not resolved again on resume (a bf16 run resumed on a T4 would train
    on in fp16, on the CPU in fp32, silently). The checkpoint records what it trained in; another
    precision is refused, naming --precision and the device, and --precision X keeps X."""
    resolve = trainer_module.resolve_precision
    monkeypatch.setattr(trainer_module, "resolve_precision",  # "auto" on a GPU with native bf16
                        lambda precision, device: "bf16" if precision == "auto"
                        else resolve(precision, device))
    assert tm.main(["--config", _tiny_config_file(assets, tmp_path, max_steps=4,
                                                  device="cpu")]) == 0
    run = tmp_path / "runs" / "run"
    monkeypatch.setattr(trainer_module, "resolve_precision", resolve)  # resumed on the CPU: fp32
    saved = (run / "config.json").read_bytes()
    capsys.readouterr()
    assert tm.main(["--resume", str(run), "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in ("step-4", "trained in bf16", "--precision auto", "fp32 on cpu"))
    assert "Pass --precision bf16 to keep it on cpu" in err and err.count("\n") == 1
    assert tm.main(["--resume", str(run), "--max-steps", "6", "--precision", "fp16"]) == 2
    assert "--precision fp16 computes in fp16 on cpu" in capsys.readouterr().err
    assert (run / "config.json").read_bytes() == saved
    assert tm.main(["--resume", str(run), "--max-steps", "6", "--precision", "bf16"]) == 0
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"
    state = torch.load(run / "checkpoints" / "step-6" / rundir.STATE_FILE, weights_only=True)
    assert state["precision"] == "bf16"


# --------------------------------------------------------------------------------------------
# A resume keeps best/early-stopping state, what a resume refuses, --resume with --config, the
# export of a best that is not the last step, LoRA settings
# --------------------------------------------------------------------------------------------


def fake_val_losses(monkeypatch, losses) -> None:
    """Trainer.evaluate returns the next of ``losses``, across every train() of the test."""
    it = iter(losses)

    def evaluate(self, *args, **kwargs):
        loss = next(it)
        return {"val_loss": loss, "val_ppl": trainer_module.perplexity(loss), "val_accuracy": 0.0,
                "val_tokens": 1}

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", evaluate)


def _val_steps(run_dir: Path) -> list[int]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [m["step"] for m in map(json.loads, lines) if m["kind"] == "val"]


def test_resume_keeps_the_best_validation_loss_so_best_is_not_overwritten(assets, tmp_path,
                                                                          monkeypatch, capsys):
    """Losses 3.0, 2.0, then 2.5, 2.6 after a resume: best stays step 4. Without the saved
    best_val_loss the first evaluation after any resume would count as best, replacing best/ and
    export/ with worse weights and giving a sweep's continued trial a wrong objective."""
    fake_val_losses(monkeypatch, [3.0, 2.0, 2.5, 2.6])
    cfg = tiny_cfg(assets, tmp_path, max_steps=4, eval_every=2, warmup_steps=0, save_every=2)
    first = tm.train(cfg)
    assert (first.best_step, first.best_val_loss) == (4, 2.0)
    capsys.readouterr()
    result = tm.train(dataclasses.replace(cfg, resume=str(first.run_dir), max_steps=8))
    assert (result.best_step, result.best_val_loss) == (4, 2.0)
    said = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("note: the run planned 4 steps and now runs 8"))
    assert "schedule is planned anew over 8 steps from step 4" in said
    best = json.loads((first.run_dir / "best" / "metrics.json").read_text())
    assert (best["step"], best["val_loss"]) == (4, 2.0)


@pytest.mark.parametrize("losses, best_kept", [([3.0, 2.0, 1.0], True),
                                                ([2.0, 3.0, 1.0], False)],
                         ids=["checkpoint-is-best", "best-before-checkpoint"])
def test_a_resume_keeps_no_best_from_past_its_checkpoint(assets, tmp_path, monkeypatch,
                                                         losses, best_kept):
    """Killed after best/ took step 6's weights and before step 6's checkpoint: resumed from
    step 4 to end there, the run exports step 4's weights where step 4 was its best (best/
    rewritten from the checkpoint), and its last weights, said so, where its best (step 2)
    is no longer kept; never step 6's, which the resumed run did not reach, and which are set
    aside, not deleted (best-step-6-<time>)."""
    import shutil

    from safetensors.torch import load_file

    fake_val_losses(monkeypatch, losses)
    cfg = tiny_cfg(assets, tmp_path, max_steps=6, eval_every=2, save_every=4, warmup_steps=0)
    first = tm.train(cfg)
    run_dir = first.run_dir
    assert json.loads((run_dir / "best" / "metrics.json").read_text())["step"] == 6
    shutil.rmtree(run_dir / "checkpoints" / "step-6")  # the kill came before it was written
    step4 = load_file(run_dir / "checkpoints" / "step-4" / "model.safetensors")
    best6 = load_file(run_dir / "best" / "model.safetensors")
    result = tm.train(dataclasses.replace(cfg, resume=str(run_dir), max_steps=4, export=True))
    [aside] = run_dir.glob("best-step-6-*")
    assert_bit_equal(best6, load_file(aside / "model.safetensors"))
    assert result.step == 4 and result.best_step == (4 if best_kept else 2)
    exported = json.loads((run_dir / "export" / rundir.EXPORT_RECORD).read_text())
    best = run_dir / "best" / "metrics.json"
    if best_kept:
        metrics = json.loads(best.read_text())
        assert (metrics["step"], metrics["val_loss"]) == (4, 2.0)
        assert exported["best_step"] == 4
        weights = load_file(run_dir / "best" / "model.safetensors")
        assert all(torch.equal(weights[name], step4[name]) for name in step4)
    else:
        assert not best.exists() and exported["best_step"] is None


def test_a_resume_writes_best_of_its_checkpoint_where_the_kill_came_before_best(
        assets, tmp_path, monkeypatch):
    """The first evaluation writes its checkpoint, then best/: killed between the two, the
    resume from that checkpoint (its best: its own step) writes best/ from its weights, so the
    run exports the weights of its best step (2) as the uninterrupted run does, not its last."""
    from safetensors.torch import load_file

    fake_val_losses(monkeypatch, [2.0, 3.0])
    cfg = tiny_cfg(assets, tmp_path, max_steps=4, eval_every=2, save_every=50, warmup_steps=0)

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # the kill: nothing after it is written

    write_best = record.RunRecord._write_best
    monkeypatch.setattr(record.RunRecord, "_write_best", killed)
    with pytest.raises(KeyboardInterrupt):
        tm.train(cfg)
    monkeypatch.setattr(record.RunRecord, "_write_best", write_best)
    run_dir = tmp_path / "runs" / "run"
    assert [p.name for p in rundir.list_checkpoints(run_dir)] == ["step-2"]
    assert not (run_dir / "best").exists()
    step2 = load_file(run_dir / "checkpoints" / "step-2" / "model.safetensors")
    result = tm.train(dataclasses.replace(cfg, resume=str(run_dir), export=True))
    assert (result.step, result.best_step) == (4, 2)
    metrics = json.loads((run_dir / "best" / "metrics.json").read_text())
    assert (metrics["step"], metrics["val_loss"]) == (2, 2.0)
    assert_bit_equal(step2, load_file(run_dir / "best" / "model.safetensors"))
    assert json.loads((run_dir / "export" / rundir.EXPORT_RECORD).read_text())["best_step"] == 2


def test_resume_keeps_early_stoppings_count(assets, tmp_path, monkeypatch):
    """Flat losses, patience 3, a resume after two evaluations without improvement: the run
    stops at the next one (step 4), not three evaluations later: patience does not restart at
    every resume (every sweep continuation). An equal loss is no new best: best/ stays at step 1."""
    fake_val_losses(monkeypatch, [3.0] * 20)
    cfg = tiny_cfg(assets, tmp_path, max_steps=3, eval_every=1, warmup_steps=0, save_every=1,
                   early_stop_patience=3, early_stop_min_delta=0.01)
    first = tm.train(cfg)
    assert not first.early_stopped
    result = tm.train(dataclasses.replace(cfg, resume=str(first.run_dir), max_steps=12))
    assert result.early_stopped and result.step == 4 and result.best_step == 1


def test_resuming_a_run_that_stopped_early_ends_there_as_it_did(assets, tmp_path, monkeypatch,
                                                                capsys):
    """A run that stopped early and was killed before its export (or a sweep's trial whose
    worker died then): --resume exports it at the step it stopped at, not training on until its
    next evaluation (another run than the uninterrupted one); a larger patience trains on."""
    fake_val_losses(monkeypatch, [3.0, 3.0, 2.0, 2.0, 2.0])
    cfg = tiny_cfg(assets, tmp_path, max_steps=12, eval_every=2, warmup_steps=0, save_every=2,
                   early_stop_patience=1, early_stop_min_delta=0.01)
    first = tm.train(cfg)
    assert first.early_stopped and first.step == 4
    again = tm.train(dataclasses.replace(cfg, resume=str(first.run_dir), export=True))
    assert again.early_stopped and again.step == 4 and again.best_step == 2
    assert again.export_dir is not None and _val_steps(first.run_dir) == [2, 4]
    assert "the run stopped early at step 4" in capsys.readouterr().out
    more = tm.train(dataclasses.replace(cfg, resume=str(first.run_dir), early_stop_patience=2))
    assert more.early_stopped and (more.step, more.best_step) == (10, 6)


def test_resume_keeps_early_stoppings_reference(assets, tmp_path, monkeypatch):
    """The reference (the last fall larger than min_delta) is 3.0 when the run resumes, not the
    best loss 2.992: 2.985 is then a counted fall at step 4, and patience 3 runs out at step 7
    (with the best loss as reference it would run out at step 6)."""
    fake_val_losses(monkeypatch, [3.0, 2.995, 2.992, 2.985, 2.984, 2.983, 2.982])
    cfg = tiny_cfg(assets, tmp_path, max_steps=3, eval_every=1, warmup_steps=0, save_every=1,
                   early_stop_patience=3, early_stop_min_delta=0.01)
    first = tm.train(cfg)
    result = tm.train(dataclasses.replace(cfg, resume=str(first.run_dir), max_steps=7))
    assert result.early_stopped and result.step == 7


@pytest.mark.parametrize("settings", [dict(max_steps=4, eval_every=2),
                                      dict(max_steps=6, eval_every=4, save_every=3,
                                           warmup_steps=0)],
                         ids=["finished", "saved-then-evaluated"])
def test_resuming_a_finished_run_does_not_evaluate_its_last_step_again(assets, tmp_path,
                                                                       settings, capsys):
    """A sweep continuing a trial whose worker died after training resumes a finished run:
    the last evaluated step is restored, so no second val line and no second on_eval (which
    the sweep would report to Optuna twice). Also where the last step was saved (save_every)
    before its evaluation: the checkpoint is written again with it, else a resume would evaluate
    it again and forget it. Resumed with --compile, it says nothing of compiling, which no step
    does."""
    cfg = tiny_cfg(assets, tmp_path, **settings)
    first = tm.train(cfg)
    steps = [settings["eval_every"], settings["max_steps"]]
    assert _val_steps(first.run_dir) == steps
    seen = []
    again = tm.train(dataclasses.replace(cfg, resume=str(first.run_dir), compile=True),
                     on_eval=lambda step, metrics: seen.append(step))
    assert again.step == steps[-1] and seen == [] and _val_steps(first.run_dir) == steps
    out, err = capsys.readouterr()
    assert f"the run had trained its {steps[-1]} steps: nothing is trained" in out
    assert "resumed" in out and "compiling" not in err


def test_a_budget_stops_best_is_kept_by_the_resume(assets, tmp_path, monkeypatch):
    """The budget ends the run at step 3 (saved), whose evaluation (2.0) is best/: the resumed
    run's worse evaluations (2.5 at step 4) leave best/ at step 3. Its checkpoint, written before
    that evaluation, must learn that best, else step 4 would replace best/ and export/ with
    worse weights."""
    _one_second_a_step(monkeypatch)
    fake_val_losses(monkeypatch, [2.0, 2.5, 2.6, 2.7])
    cfg = tiny_cfg(assets, tmp_path, max_time_s=2.5)
    first = tm.train(cfg)
    assert first.stopped_by_budget and (first.step, first.best_step) == (3, 3)
    result = tm.train(dataclasses.replace(cfg, resume=str(first.run_dir), max_time_s=None))
    assert (result.step, result.best_step, result.best_val_loss) == (12, 3, 2.0)
    assert json.loads((first.run_dir / "best" / "metrics.json").read_text())["step"] == 3

# Written out independently of RESUME_MAY_CHANGE: each of these shapes the model, the data, its
# order or the optimisation, so a resume that changed it would silently be another run.
RESUME_MUST_REFUSE = {
    "seed": 7, "warmup_steps": 3, "min_lr_ratio": 0.5, "weight_decay": 0.0, "grad_clip": 0.5,
    "label_smoothing": 0.1, "beta1": 0.8, "beta2": 0.9, "adam_eps": 1e-6, "task": "fim",
    "grad_accum": 2, "preset": "llama-14m", "tokenizer_max_vocab": 100, "dropout": 0.1,
    "overfit_batches": 1, "data_options": {"val_frac": 0.2},
}
RESUME_MAY_CHANGE = {
    "max_steps": 99, "epochs": 2.0, "max_time_s": 10.0, "early_stop_patience": 3,
    "early_stop_min_delta": 0.1, "eval_every": 3, "log_every": 3, "save_every": 3,
    "keep_last": 3, "progress": True, "export": True, "export_merged": True,
    "sample_prompt": "x", "sample_tokens": 3, "device": "cpu", "compile": True,
    "gradient_checkpointing": True, "data_options": {"num_workers": 2}, "strategy": "fsdp",
    "force": True, "final_eval": False, "export_gguf": "f16",
}


def _saved_run(tmp_path: Path) -> tuple[trainconfig.TrainConfig, Path]:
    cfg = trainconfig.TrainConfig(preset="tiny", data=["stdlib"], max_steps=12)
    run = tmp_path / "run"
    run.mkdir()
    write_config(cfg, run / rundir.CONFIG_FILE)
    return cfg, run


def test_resume_in_a_config_file_reads_the_runs_settings_as_the_flag_does(tmp_path):
    """Defaults < the resumed run's config.json < the --config file < flags, whether the run
    is named by --resume or by the file's resume key; the file's data_options update the
    run's key by key."""
    cfg, run = _saved_run(tmp_path)
    split = {"train_frac": 0.8, "val_frac": 0.1, "test_frac": 0.1}
    write_config(dataclasses.replace(cfg, block_size=64, data_options=split),
                 run / rundir.CONFIG_FILE)
    path = tmp_path / "resume.json"
    path.write_text(json.dumps({"resume": str(run), "max_steps": 20,
                                "data_options": {"skip_bad": True}}))
    by_file = trainconfig.read_config(["--config", str(path)]).cfg
    by_flag = trainconfig.read_config(["--resume", str(run), "--max-steps", "20", "--data-options",
                                       '{"skip_bad": true}']).cfg
    assert by_file == by_flag
    assert (by_file.preset, by_file.block_size, by_file.max_steps) == ("tiny", 64, 20)
    assert by_file.data_options == {**split, "skip_bad": True}
    with pytest.raises(ValueError, match=r"--name other names another run"):
        trainconfig.read_config(["--config", str(path), "--name", "other"])


def test_data_options_flag_is_checked_as_it_updates_the_files(tmp_path):
    """--data-options updates the --config file's data_options key by key, so its values are
    checked together with the file's: a split or a pair of columns that the two complete is
    taken; one that the result leaves incomplete is refused, naming the flag."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"data_options": {
        "train_frac": 0.6, "val_frac": 0.2, "test_frac": 0.2,
        "input_column": "question", "output_column": "answer"}}))
    flag = {"train_frac": 0.5, "val_frac": 0.3, "output_column": "reply"}
    cfg = trainconfig.read_config(["--config", str(path), "--data-options",
                                   json.dumps(flag)]).cfg
    assert cfg.data_options == {"train_frac": 0.5, "val_frac": 0.3, "test_frac": 0.2,
                                "input_column": "question", "output_column": "reply"}
    with pytest.raises(ValueError, match=r"^--data-options: .*sum to 1"):
        trainconfig.read_config(["--data-options", json.dumps(flag)])


@pytest.mark.parametrize("key", sorted(RESUME_MUST_REFUSE))
def test_resume_refuses_a_change_of(tmp_path, key):
    """A changed seed, task, schedule or validation split is refused, naming the key."""
    cfg, run = _saved_run(tmp_path)
    with pytest.raises(ValueError, match=rf"\b{key}="):
        checkpoint.check_resume_config(dataclasses.replace(cfg, **{key: RESUME_MUST_REFUSE[key]}),
                                       run, rundir.list_checkpoints(run), "hint")


@pytest.mark.parametrize("key", sorted(RESUME_MAY_CHANGE))
def test_resume_accepts_a_change_of(tmp_path, key):
    """Length, logging, early stopping, export and device settings may change on resume."""
    cfg, run = _saved_run(tmp_path)
    checkpoint.check_resume_config(dataclasses.replace(cfg, **{key: RESUME_MAY_CHANGE[key]}), run,
                                   rundir.list_checkpoints(run), "hint")


def test_parse_config_precedence_defaults_resumed_file_flags(tmp_path):
    """The documented order defaults < the resumed run's config.json < --config < flags: each
    layer sets its own key, --resume and --config together too."""
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    write_config(trainconfig.TrainConfig(preset="tiny", data=["stdlib"], max_steps=12, eval_every=6,
                                         log_every=3, keep_last=4), run / rundir.CONFIG_FILE)
    file = tmp_path / "more.json"
    file.write_text(json.dumps({"max_steps": 20, "eval_every": 5}))
    cfg = plan.parse_config(["--resume", str(run), "--config", str(file), "--max-steps", "30"])
    assert cfg.max_steps == 30  # the flag beats the file
    assert cfg.eval_every == 5  # the file beats the resumed run
    assert cfg.log_every == 3 and cfg.keep_last == 4  # the resumed run beats the defaults
    assert cfg.save_every is None and cfg.preset == "tiny"


def test_export_holds_and_records_the_best_step_not_the_last(assets, tmp_path, monkeypatch):
    """Losses 2.0 then 3.0: best is step 2, not the last step 4. export/ must hold best/'s
    weights and record step 2, or eval.py's stale-export check trusts an export of the last
    weights (every other export test has best == last)."""
    from codelm.models import pretrained

    fake_val_losses(monkeypatch, [2.0, 3.0])
    result = tm.train(tiny_cfg(assets, tmp_path, max_steps=4, eval_every=2, warmup_steps=0,
                               export=True))
    run = result.run_dir
    assert result.best_step == 2 and rundir.best_step(run) == 2
    assert json.loads((run / "export" / rundir.EXPORT_RECORD).read_text()) == {"best_step": 2}
    assert rundir.stale_export(run) is None
    best = load_file(run / "best" / rundir.MODEL_FILE)
    last = final_weights(run, 4)
    assert any(not torch.equal(best[k], last[k]) for k in best)
    exported = checkpoint.model_tensors(pretrained.load(run / "export"), False)
    for k, t in exported.items():
        assert torch.equal(t, best[k]), k


def test_best_weights_whose_bytes_differ_from_their_manifest_are_not_exported(
        assets, tmp_path, capsys):
    """best/ damaged after its manifest was written (one byte flipped): the export refuses it
    by name, and export/ keeps the weights it held, rather than a manifest vouching for the
    damage."""
    cfg = tiny_cfg(assets, tmp_path, max_steps=4, eval_every=2, warmup_steps=0, export=True)
    run = tm.train(cfg).run_dir
    held = (run / "export" / rundir.MODEL_FILE).read_bytes()
    weights = run / "best" / rundir.MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    again = dataclasses.replace(cfg, resume=str(run))
    assert tm.main(["--config", str(write_config(again, tmp_path / "c.json"))]) == 2
    err = capsys.readouterr().err
    assert "best" in err and "bytes differ" in err and "not exported" in err
    assert (run / "export" / rundir.MODEL_FILE).read_bytes() == held


def test_lora_settings_reach_the_adapter_and_the_merged_export_has_the_tokenizer(assets,
                                                                                tmp_path):
    """lora_alpha, lora_dropout and lora_targets reach the model and PEFT's adapter_config
    (not silently replaced by the defaults, which PEFT and codelm would both read back alike);
    quantize_bits quantizes the base; export/merged/, the --init-from target of a
    LoRA run, is a whole HF directory with the run's tokenizer."""
    import transformers

    import lora

    cfg = tiny_cfg(assets, tmp_path, init_from=str(tiny_llama(tmp_path)), lora_r=4,
                   lora_alpha=8.0, lora_dropout=0.2, lora_targets=["v_proj"], max_steps=2,
                   eval_every=2, export=True, export_merged=True)
    export = tm.train(cfg).run_dir / "export"
    config = json.loads((export / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.2)
    assert sorted(config["target_modules"]) == ["v_proj"]
    text = "def add(a, b):\n    return a + b\n"
    tok = load_tokenizer(assets["tokenizer"])
    assert load_tokenizer(export / "merged").encode(text) == tok.encode(text)
    hf = transformers.AutoTokenizer.from_pretrained(export / "merged")
    assert hf(text)["input_ids"] == tok.encode(text)
    model = loading.build_model(model_settings(dataclasses.replace(cfg, quantize_bits=8)), tok)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert any(isinstance(m, quantize.QuantLinear) for m in model.modules())
    modules = [m for _, m in lora.lora_modules(model)]
    assert modules
    for m in modules:
        assert m.scale == pytest.approx(8.0 / 4) and m.dropout == pytest.approx(0.2)


def test_a_full_fine_tune_on_another_tokenizer_exports_no_generation_config_of_the_base(
        assets, tmp_path):
    """generation_config.json's bos/eos/pad ids are the base tokenizer's: a run on another
    tokenizer (--tokenizer) does not copy them into its export, where transformers' generate
    would stop at the base's eos. With the base's own tokenizer the file is copied (see below)."""
    import transformers

    base = tiny_llama(tmp_path)
    transformers.GenerationConfig(bos_token_id=7, eos_token_id=[8, 9]).save_pretrained(base)
    cfg = tiny_cfg(assets, tmp_path, init_from=str(base), max_steps=2, eval_every=2,
                   save_every=2, export=True)
    export = tm.train(cfg).run_dir / "export"
    assert (export / "config.json").is_file() and not (export / "generation_config.json").exists()


def _starcoder_base(path: Path, texts: list[str]) -> None:
    """A StarCoder-shaped checkpoint with the Hub's tokenizer_config.json (GPT2Tokenizer) and a
    generation_config.json of its own."""
    import transformers
    from tiny_hf import save_tiny_hf, train_hf_tokenizer

    path.mkdir()
    tok = train_hf_tokenizer("starcoder", texts, path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "model_max_length": 8192,
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False}))
    end = tok.token_to_id("<|endoftext|>")
    save_tiny_hf("gpt_bigcode", path, vocab_size=tok.get_vocab_size(), bos_token_id=end,
                 eos_token_id=end)
    transformers.GenerationConfig(bos_token_id=end, eos_token_id=end, do_sample=True,
                                  temperature=0.2).save_pretrained(path)


@pytest.mark.parametrize("family", ["llama3-instruct", "starcoder"])
def test_a_lora_export_gives_transformers_the_bases_tokenizer_and_generation_config(
        assets, tmp_path, family):
    """transformers reads a chat_template and model_max_length from tokenizer_config.json, and
    the sampling defaults and eos list from generation_config.json: the export, its merged model
    and lora.py's merge of it give AutoTokenizer and generate what the base gives them (not a
    roles-only tokenizer_config.json, nor merged models without generation_config.json),
    with the base's ids (in an adapter directory, which has no config.json, the StarCoder file's
    tokenizer_class GPT2Tokenizer would split spaces before digits otherwise)."""
    import transformers
    from tiny_hf import save_tiny_llama3_instruct

    import lora

    base, corpus = tmp_path / "base", tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted(Path(assets["corpus"]).iterdir())[:6]:
        shutil.copy(f, corpus / f.name)
    texts = [f.read_text("utf-8") for f in corpus.iterdir()]
    if family == "starcoder":
        _starcoder_base(base, texts)
    else:
        save_tiny_llama3_instruct(base, texts)
    cfg = tiny_cfg(assets, tmp_path, init_from=str(base), tokenizer=None, data=[str(corpus)],
                   lora_r=4, max_steps=1, eval_every=1, eval_examples=2, export=True,
                   export_merged=True)
    export = tm.train(cfg).run_dir / "export"
    assert lora.main([str(export), str(tmp_path / "merged")]) == 0
    messages = [{"role": "user", "content": "def add(a, b):"}]
    text = "def f(x,  1):\n    return  42 + x\n"
    want = transformers.AutoTokenizer.from_pretrained(base)
    gen = transformers.GenerationConfig.from_pretrained(base).to_diff_dict()
    for directory in (export, export / "merged", tmp_path / "merged"):
        hf = transformers.AutoTokenizer.from_pretrained(directory)
        assert hf.model_max_length == want.model_max_length < 10**6
        assert hf(text)["input_ids"] == want(text)["input_ids"]
        if want.chat_template is not None:
            assert hf.apply_chat_template(messages) == want.apply_chat_template(messages)
        if directory != export:  # full weights: an adapter's come from its base's directory
            got = transformers.GenerationConfig.from_pretrained(directory).to_diff_dict()
            assert {k: got.get(k) for k in gen} == gen


def test_tensorboard_scalars_are_the_metrics_lines(assets, tmp_path):
    """Read back with TensorBoard's own reader: the scalars sit under kind/key tags (bare names
    would make train loss and val_loss collide) and equal metrics.jsonl; the train lines carry the
    documented fields, tokens_seen growing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tm.train(tiny_cfg(assets, tmp_path, max_steps=4, eval_every=2, log_every=2)).run_dir
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 4]
    for r in train:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "memory_mb",
                "epoch"} <= r.keys()
    assert [r["tokens_seen"] for r in train] == sorted({r["tokens_seen"] for r in train})
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/epoch", "val/val_loss",
            "val/val_ppl", "val/best_val_loss"} <= set(acc.Tags()["scalars"])
    for tag, key in (("train/loss", "loss"), ("train/epoch", "epoch")):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train]
    vals = [r for r in lines if r["kind"] == "val"]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("val/val_loss")] == [
        (r["step"], r["val_loss"]) for r in vals]


def test_fp16_runs_log_the_loss_scale(assets, tmp_path):
    """A LoRA run on an fp16 base logs GradScaler's scale: 2**16, its initial one, at step 1."""
    cfg = tiny_cfg(assets, tmp_path, init_from=str(tiny_llama(tmp_path)), lora_r=4,
                   base_dtype="fp16", max_steps=2, eval_every=2)
    run = tm.train(cfg).run_dir
    train = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if m["kind"] == "train"]
    assert train[0]["step"] == 1 and train[0]["loss_scale"] == 2.0 ** 16


def test_overfit_batches_counts_accumulated_micro_batches(assets, tmp_path, capsys):
    """--overfit-batches K means K global batches: K x batch_size x grad_accum examples (not K
    micro-batches), validated on the same examples."""
    cfg = tiny_cfg(assets, tmp_path, overfit_batches=1, grad_accum=2, batch_size=4, max_steps=2,
                   eval_every=2, eval_examples=None)
    result = tm.train(cfg)
    assert "8 training examples" in capsys.readouterr().out
    assert result.val_metrics["val_tokens"] == 8 * 32  # every position of the 8 windows


def test_an_lm_run_counts_its_training_tokens_not_windows(assets, tmp_path, capsys):
    """A window starts at every token of an lm split: the header counts the tokens (those of the
    packed train.bin), not millions of overlapping 'examples'."""
    tm.train(tiny_cfg(assets, tmp_path, max_steps=1, eval_every=1))
    out, err = capsys.readouterr()
    n = int(re.search(r"([\d,]+) training tokens", out).group(1).replace(",", ""))
    packed = {p.stat().st_size // 2 for p in Path(assets["cache"]).rglob("train.bin")}
    assert n in packed and "training examples" not in out
    assert "fp16 on cpu" not in err


def test_a_run_announces_the_parameter_count_the_presets_table_gives(assets, tmp_path, capsys):
    """The run's first line counts its model as `python architecture.py --vocab-size V` does at
    the run's vocabulary V: one definition (every weight once, a tied head once)."""
    import architecture

    tm.train(tiny_cfg(assets, tmp_path, max_steps=1, eval_every=1))
    out = capsys.readouterr().out
    vocab = load_tokenizer(assets["tokenizer"]).vocab_size
    n = architecture.parameter_count(
        dataclasses.replace(architecture.PRESETS["tiny"], vocab_size=vocab))
    assert f": {n:,} parameters (" in out or f": {plan.millions(n)} parameters (" in out
    assert architecture.main(["--vocab-size", str(vocab)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert next(row for row in table if row.startswith("| tiny |")).endswith(f"| {n:,} |")


@pytest.mark.parametrize("test_frac, noted", [(0.1, True), (0.0, False)])
def test_val_data_alone_says_that_data_still_holds_out_a_test_split(assets, tmp_path, capsys,
                                                                    test_frac, noted):
    """`--data train --val-data val` (README's "your splits") keeps 10% of train out as a test
    split, and says so, with the option that trains on all of it."""
    val = tmp_path / "val"
    val.mkdir()
    for f in sorted(Path(assets["corpus"]).iterdir())[:3]:
        shutil.copy(f, val / f.name)
    options = {"cache_dir": assets["cache"], "progress": False, "train_frac": 0.9 - test_frac,
               "val_frac": 0.1, "test_frac": test_frac}
    tm.train(tiny_cfg(assets, tmp_path, max_steps=1, eval_every=1, warmup_steps=0,
                      val_data=[str(val)], data_options=options))
    err = capsys.readouterr().err
    assert ("--data still holds out test_frac 0.1" in err
            and "'{\"train_frac\": 0.9, \"test_frac\": 0}'" in err) == noted


def test_a_short_runs_warmup_is_a_tenth_of_its_steps_and_said(assets, tmp_path, capsys):
    """A 60-step run evaluating every 20 steps, its warmup unset, warms up over 6 steps (50
    would skip the evaluations at 20 and 40, none running in the warmup, and decay over 10
    steps), says so, and records 6 in config.json: a resume that lengthens the run keeps it."""
    cfg = tiny_cfg(assets, tmp_path, max_steps=60, eval_every=20, save_every=20,
                   warmup_steps=None, log_every=20)
    result = tm.train(cfg)
    out = capsys.readouterr().out
    assert "warmup_steps 6: 10% of the run's 60 steps" in out and "--warmup-steps" in out
    assert _val_steps(result.run_dir) == [20, 40, 60]
    assert json.loads((result.run_dir / "config.json").read_text())["warmup_steps"] == 6
    assert tm.main(["--resume", str(result.run_dir), "--max-steps", "80"]) == 0
    assert "warmup_steps 8" not in capsys.readouterr().out
    assert json.loads((result.run_dir / "config.json").read_text())["warmup_steps"] == 6
    assert _val_steps(result.run_dir) == [20, 40, 60, 80]


def test_a_run_of_epochs_sizes_its_warmup_once_its_steps_are_known(assets, tmp_path):
    """--epochs: the run's length follows from the data, and the warmup from the length."""
    run = built_run(tiny_cfg(assets, tmp_path, max_steps=None, epochs=0.05, warmup_steps=None))
    try:
        assert run.record.config["warmup_steps"] == plan.warmup_for(run.state.max_steps)
        assert run.loop.warmup_steps == run.record.config["warmup_steps"]
    finally:
        closed(run)


@pytest.mark.parametrize("warmup, warned", [(50, True), (20, False)])
def test_evaluations_that_fall_inside_the_warmup_are_warned_of(assets, tmp_path, capsys, warmup,
                                                               warned):
    """No evaluation runs during the warmup: eval_every 20 under a warmup of 50 skips the
    evaluations at 20 and 40, which the run says before training, with the first it makes."""
    closed(built_run(tiny_cfg(assets, tmp_path, max_steps=60, eval_every=20,
                              warmup_steps=warmup)))
    err = capsys.readouterr().err
    assert ("eval_every (20, --eval-every) < warmup_steps (50, --warmup-steps)" in err
            and "first is at step 60" in err) == warned


@pytest.mark.parametrize("warmup, warned", [
    (2, "warmup_steps (2, --warmup-steps) >= the run's 2 steps (max_steps (2, --max-steps))"),
    (1, None)])
def test_a_warmup_as_long_as_the_run_is_warned_of(assets, tmp_path, capsys, warmup, warned):
    """A short fine-tune under the default warmup of 50 steps would end at a fraction of --lr:
    the run warns of it, with the fix it may take (a resumed run, more steps)."""
    result = tm.train(tiny_cfg(assets, tmp_path, max_steps=2, eval_every=2, warmup_steps=warmup))
    err = capsys.readouterr().err
    assert (f"warning: {warned}: the learning rate never reaches lr 0.003 (nor decays); lower "
            "warmup_steps\n" in err) == (warned is not None)
    if warned:  # a resumed run keeps its warmup_steps: the fix is its length
        tm.train(tiny_cfg(assets, tmp_path, max_steps=2, eval_every=2, warmup_steps=warmup,
                          resume=str(result.run_dir)))
        assert f"(nor decays); give more steps than its warmup_steps {warmup}\n" in (
            capsys.readouterr().err)


def test_a_callers_warnings_name_its_own_settings(assets, tmp_path, capsys):
    """train(where_set=...) names each warned-of setting where its caller sets it (a recipe's
    --set, a sweep's search space), not by trainingmanager.py's flag."""
    from functools import partial

    from codelm import recipes

    where_set = partial(recipes.where_in_recipe, "r.json", typed={"label_smoothing"})
    tm.train(tiny_cfg(assets, tmp_path, max_steps=2, eval_every=2, warmup_steps=2,
                      label_smoothing=0.1), where_set=where_set)
    err = capsys.readouterr().err
    assert all(w in err for w in ("warmup_steps (2, train.warmup_steps in r.json",
                                  "--set train.warmup_steps=VALUE", "the run's 2 steps")), err
    assert "--warmup-steps" not in err
    # a smoothed train loss beside the true val loss is said to be another loss
    assert ("note: label_smoothing (0.1, --set train.label_smoothing): the train loss is the "
            "smoothed one") in err


def test_fp16_on_cpu_is_warned_of(assets, tmp_path, capsys):
    """A recipe written for a T4 (precision fp16) run on a CPU: torch has no fast fp16 kernels
    there (tens of times slower than fp32), which the run says at its start."""
    tm.train(tiny_cfg(assets, tmp_path, max_steps=1, eval_every=1, precision="fp16",
                      device="cpu"))
    assert "warning: precision ('fp16', --precision) on cpu" in capsys.readouterr().err


def test_overfit_batches_stops_when_memorised(assets, tmp_path):
    """--overfit-batches stops at the first step whose loss is below OVERFIT_LOSS, and
    evaluates there, rather than running on to max_steps (a final loss < 0.05 holds either
    way)."""
    cfg = tiny_cfg(assets, tmp_path, overfit_batches=1, max_steps=400, eval_every=1000,
                   lr=1e-2, warmup_steps=10, weight_decay=0.0, log_every=1000)
    result = tm.train(cfg)
    assert result.step < 400 and result.train_loss < tm.OVERFIT_LOSS
    losses = _train_losses(result.run_dir)
    assert list(losses)[-1] == result.step and list(losses.values())[-2] >= tm.OVERFIT_LOSS
    assert _val_steps(result.run_dir) == [result.step]


def test_overfit_batches_on_two_files_needs_no_validation_split(assets, tmp_path):
    """Two files split by file leave no validation file: --overfit-batches validates on its own
    batches, so it trains; a plain run on them says the split is empty."""
    two = tmp_path / "two"
    two.mkdir()
    for f in sorted(Path(assets["corpus"]).iterdir())[:2]:
        shutil.copy(f, two / f.name)
    cfg = tiny_cfg(assets, tmp_path, data=[str(two)], overfit_batches=1, max_steps=5,
                   eval_every=1000, log_every=1000)
    assert tm.train(cfg).step == 5
    with pytest.raises(ValueError, match=r"validation split .* is empty.*--val-data"):
        tm.train(dataclasses.replace(cfg, overfit_batches=0, name="plain"))


def _overfit_batches_config(assets, tmp_path: Path, **values) -> str:
    """A --config file of only the keys an --overfit-batches check on the tiny model needs: what
    it leaves out (max_steps, export) is the check's own choice."""
    config = {"preset": "tiny", "data": [assets["corpus"]], "tokenizer": assets["tokenizer"],
              "data_options": {"cache_dir": assets["cache"], "progress": False},
              "block_size": 32, "batch_size": 4, "overfit_batches": 1, "progress": False,
              "out_dir": str(tmp_path / "runs"), "name": "run", **values}
    path = tmp_path / f"{config['name']}.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_overfit_batches_plans_its_own_steps_and_model_not_by_the_clock(capsys):
    """--overfit-batches K without --max-steps: preset auto's smallest rung for OVERFIT_STEPS
    steps, no export (so no sample, no final evaluation) unless asked, and it says so; nothing
    is timed, the 15-minute budget plays no part."""
    cfg = plan.parse_config(["--overfit-batches", "2"])
    assert (cfg.preset, cfg.max_steps, cfg.export) == ("code-3x128", trainconfig.OVERFIT_STEPS,
                                                       False)
    assert (cfg.block_size, cfg.batch_size) == (256, 8)  # the rung's
    err = capsys.readouterr().err
    assert "code-3x128" in err and f"{trainconfig.OVERFIT_STEPS} steps" in err
    assert "no export" in err and "--export" in err
    cfg = plan.parse_config(["--overfit-batches", "2", "--export", "--max-steps", "50",
                             "--preset", "tiny"])
    assert (cfg.preset, cfg.max_steps, cfg.export) == ("tiny", 50, True)
    assert capsys.readouterr().err == ""


def test_overfit_batches_runs_its_own_step_budget_without_export(assets, tmp_path, monkeypatch,
                                                                   capsys):
    """End to end: no machine timing, max_steps recorded as OVERFIT_STEPS, no export/."""
    def timed(*args, **kwargs):
        raise AssertionError("--overfit-batches timed the machine")

    monkeypatch.setattr(build, "measure_speed", timed)
    monkeypatch.setattr(build, "size_to_budget", timed)
    assert tm.main(["--config", _overfit_batches_config(assets, tmp_path, lr=1e-2,
                                                        weight_decay=0.0)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("PASS")
    run = tmp_path / "runs" / "run"
    assert json.loads((run / "config.json").read_text())["max_steps"] == trainconfig.OVERFIT_STEPS
    assert not (run / "export").exists() and not (run / "final_eval").exists()


def test_overfit_batches_fail_says_what_to_try(assets, tmp_path, monkeypatch, capsys):
    """A FAIL names what to change: a loss still falling, the steps its pace needs; a loss that
    stalled, a lower lr and the settings that hold a training loss up; a flat one, the lr."""
    config = _overfit_batches_config(assets, tmp_path, lr=3e-3, warmup_steps=1, log_every=1)
    assert tm.main(["--config", config, "--max-steps", "8"]) == 1
    out = capsys.readouterr().out.splitlines()[-1]
    assert out.startswith("FAIL") and "after 8 steps" in out and "still falling" in out
    steps = int(re.search(r"raise --max-steps to about (\d+)", out).group(1))
    assert steps > 8
    config = _overfit_batches_config(assets, tmp_path, name="again", max_steps=20, log_every=1)
    for losses, told in (
            ([6.0, 5.0, 4.0, *[3.0] * 17],
             r"stalled.*lower --lr \(0.001\), or --weight-decay 0 \(it is 0.1\)"),
            ([6.0] * 20, r"barely moved: raise --lr \(0.001\)")):  # the lr the run took
        scripted = iter(losses)
        monkeypatch.setattr(trainer_module.Trainer, "train_step",
                            lambda self, *a, losses=scripted, **k:
                            _figures(next(losses)))
        assert tm.main(["--config", config]) == 1
        out = capsys.readouterr().out.splitlines()[-1]
        assert re.search(told, out) and "raise --max-steps" not in out, out
        shutil.rmtree(tmp_path / "runs" / "again")


def test_a_budget_reached_on_the_last_step_is_a_finished_run(assets, tmp_path, monkeypatch,
                                                             capsys):
    """On a fake clock (1 s a step) a 2.5 s budget runs out on step 3 of 3: the run finished,
    it was not stopped by its budget, and says nothing about being unfinished."""
    _one_second_a_step(monkeypatch)
    result = tm.train(tiny_cfg(assets, tmp_path, max_steps=3, max_time_s=2.5, eval_every=3))
    assert result.step == 3 and not result.stopped_by_budget
    assert "not finished" not in capsys.readouterr().out


@pytest.mark.parametrize("values, message", [
    ({"lr": 0.0}, r"lr \(0\.0, --lr\): must be > 0"),
    ({"dropout": 1.0}, r"dropout \(1\.0, --dropout\): must be in \[0, 1\)"),
    ({"grad_clip": -1.0}, r"grad_clip \(-1\.0, --grad-clip\): must be >= 0"),
    ({"label_smoothing": 1.0}, r"label_smoothing \(1\.0, --label-smoothing\): must be in \[0, 1\)"),
    ({"min_lr_ratio": 1.5}, r"min_lr_ratio \(1\.5, --min-lr-ratio\): must be in \[0, 1\]"),
    ({"max_steps": 10, "decay_steps": 11}, r"decay_steps \(11, --decay-steps\): exceeds max_steps"),
    ({"max_steps": 100, "warmup_steps": 50, "decay_steps": 80},
     r"decay_steps \(80, --decay-steps\): exceeds max_steps \(100\) less warmup_steps \(50\)"),
    ({"quantize_bits": 4}, r"quantize_bits \(4, --quantize-bits\): a quantized base is frozen.*"
                           r"set lora_r > 0 and init_from \(--init-from\)$"),
    ({"quantize_bits": 4, "init_from": "/nonexistent"}, r"frozen.*set lora_r > 0$"),
    ({"init_from": "/nonexistent", "n_layer": 2}, r"n_layer \(.*\): the shape .* cannot"),
    ({"init_from": "/nonexistent", "n_embd": 64}, r"n_embd \(.*\): the shape .* cannot"),
])
def test_validate_config_refuses(values, message):
    """Range bounds and cross-key refusals beyond the five keys above; --init-from with a
    shape flag would otherwise train the full model, ignoring the flag. --quantize-bits alone
    names both flags it needs, --lora-r and --init-from, in one refusal."""
    with pytest.raises(ValueError, match=message):
        plan.validate_config(trainconfig.TrainConfig(**values))


@pytest.mark.parametrize("values", [{"min_lr_ratio": 0.0}, {"min_lr_ratio": 1.0},
                                    {"dropout": 0.0}, {"grad_clip": 0.0},
                                    {"label_smoothing": 0.0}, {"warmup_steps": 0}])
def test_validate_config_accepts_the_bounds(values):
    """The closed ends of each range are legal values."""
    plan.validate_config(trainconfig.TrainConfig(**values))


def test_every_example_of_each_pass_trains_once_when_the_batch_does_not_divide_it():
    """Ten examples in global batches of 4 (2 ranks x 2): five batches are exactly two passes,
    each of every example once, the batch that ends a pass filled from the next pass's order
    (the reference: a DataLoader without drop_last sees each example once an epoch)."""
    ranks = [BatchOrder(10, 2, seed=5, rank=r, world=2) for r in range(2)]
    seen: list[int] = []
    for _ in range(5):
        for order in ranks:
            indices, _ = order.next()
            seen += indices
    assert sorted(seen[:10]) == sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]


def test_the_ranks_validation_batches_are_each_batch_once_and_in_file_order():
    """Validation splits its batches between the ranks, batch b to rank b mod world: over two
    ranks, five examples in batches of two are rank 0's [0, 1] and [4], rank 1's [2, 3], each
    example validated once, on one rank, and ``eval_examples`` keeps the first ones."""
    val = [{"input_ids": torch.tensor([i]), "labels": torch.tensor([i])} for i in range(5)]
    seen = []
    for rank, expected in ((0, [[0, 1], [4]]), (1, [[2, 3]])):
        batches = Batches(val, val, pad_id=0, batch_size=2, grad_accum=1, seed=0, rank=rank,
                          world=2)
        out, count = batches.validation()
        ids = [batch["input_ids"][:, 0].tolist() for batch in out]
        assert ids == expected
        assert count == len(expected)
        seen += [i for batch in ids for i in batch]
    assert sorted(seen) == list(range(5))
    first = Batches(val, val, pad_id=0, batch_size=2, grad_accum=1, seed=0, eval_examples=3,
                    rank=1, world=2)
    out, count = first.validation()
    assert [batch["input_ids"][:, 0].tolist() for batch in out] == [[2]]


def test_batch_order_restored_in_a_later_epoch_continues_that_epochs_order():
    """A checkpoint taken in epoch 1 resumes on epoch 1's permutation, not epoch 0's."""
    order = BatchOrder(10, 4, seed=3)
    for _ in range(3):
        order.next()  # the third batch ends epoch 0 and begins epoch 1
    restored = BatchOrder(10, 4, seed=3)
    restored.load_state_dict(order.state_dict())
    assert order.state_dict()["epoch"] == 1
    assert [restored.next() for _ in range(4)] == [order.next() for _ in range(4)]


@pytest.mark.parametrize("values, message", [
    ({"tokenizer_min_freq": 0}, r"tokenizer_min_freq \(0, --tokenizer-min-freq\): must be >= 1"),
    ({"adam_eps": 0.0}, r"adam_eps \(0\.0, --adam-eps\): must be > 0"),
    ({"eval_examples": 0}, r"eval_examples \(0, --eval-examples\): must be >= 1"),
    ({"inject_nan_at_step": 0}, r"inject_nan_at_step \(0, --inject-nan-at-step\): must be >= 1"),
    ({"overfit_batches": -1}, r"overfit_batches \(-1, --overfit-batches\): must be >= 0"),
    ({"resume": "/nonexistent/run"}, r"--resume /nonexistent/run: no such run directory"),
])
def test_validate_config_refuses_bounds_no_run_reaches(values, message):
    """Bounds no other test reached: each would otherwise fail late (eval_examples 0 as "no
    labelled tokens") or not at all."""
    with pytest.raises(ValueError, match=message):
        plan.validate_config(trainconfig.TrainConfig(**values))


def test_resume_compares_with_the_newest_checkpoints_config(tmp_path):
    """Of several checkpoints, the newest (by step number, step-10 after step-9) holds the
    settings the run continues with."""
    cfg, run = _saved_run(tmp_path)
    for step, lr in ((9, 0.1), (10, 0.2)):
        (run / rundir.CHECKPOINTS_DIR / f"step-{step}").mkdir(parents=True)
        write_config(dataclasses.replace(cfg, lr=lr), run / rundir.CHECKPOINTS_DIR / f"step-{step}"
                     / rundir.CONFIG_FILE)
        process.write_manifest(run / rundir.CHECKPOINTS_DIR / f"step-{step}")
    checkpoints = rundir.list_checkpoints(run)
    assert checkpoint.check_resume_config(dataclasses.replace(cfg, lr=0.2), run, checkpoints,
                                          "hint")["lr"] == 0.2
    with pytest.raises(ValueError, match=r"lr=0\.2 \(now 0\.1\)"):
        checkpoint.check_resume_config(dataclasses.replace(cfg, lr=0.1), run, checkpoints, "hint")


@pytest.mark.parametrize("option, value", [("cache_dir", "elsewhere"), ("use_cache", False),
                                           ("num_workers", 3), ("progress", False)])
def test_resume_accepts_a_change_of_data_option(tmp_path, option, value):
    """Where and how fast the data is prepared may change on resume (a moved cache)."""
    cfg, run = _saved_run(tmp_path)
    checkpoint.check_resume_config(dataclasses.replace(cfg, data_options={option: value}), run,
                                   rundir.list_checkpoints(run), "hint")


def test_a_config_json_without_a_setting_resumes_at_that_settings_default(tmp_path):
    """A run's config.json that lacks a key (written before that setting existed) trained with
    its default: a resume leaving it unset continues, one setting it otherwise is refused."""
    cfg, run = _saved_run(tmp_path)
    saved = json.loads((run / rundir.CONFIG_FILE).read_text())
    del saved["label_smoothing"]
    (run / rundir.CONFIG_FILE).write_text(json.dumps(saved))
    checkpoints = rundir.list_checkpoints(run)
    assert checkpoint.check_resume_config(cfg, run, checkpoints, "hint")["label_smoothing"] == 0.0
    with pytest.raises(ValueError, match=r"label_smoothing=0\.0 \(now 0\.1\)"):
        checkpoint.check_resume_config(dataclasses.replace(cfg, label_smoothing=0.1), run,
                                       checkpoints, "hint")


@pytest.mark.parametrize("option, value", [
    ("split_by", "file"), ("seed", 7), ("val_frac", 0.2), ("dedupe", False),
    ("near_dedupe", True), ("max_bytes", 1000), ("strip_comments", True), ("max_docs", 10),
    ("completion_style", "line"), ("lines_per_file", 2)])
def test_resume_refuses_a_data_option_that_decides_the_data(tmp_path, option, value):
    """An option that decides which documents land in which split, or what an example holds,
    is refused on resume: the checkpoint's data position would index other data."""
    cfg, run = _saved_run(tmp_path)
    with pytest.raises(ValueError, match=rf"other settings: data_options=.*'{option}'"):
        checkpoint.check_resume_config(dataclasses.replace(cfg, data_options={option: value}),
                                       run, rundir.list_checkpoints(run), "hint")


def test_data_options_progress_beats_the_runs_progress():
    """data_options.progress, when given, decides the data pipeline's progress bars; otherwise they
    follow the run's progress setting."""
    assert trainconfig.data_config(trainconfig.TrainConfig(progress=False), 32).progress is False
    assert trainconfig.data_config(trainconfig.TrainConfig(progress=True), 32).progress is True
    quiet = trainconfig.TrainConfig(progress=True, data_options={"progress": False})
    assert trainconfig.data_config(quiet, 32).progress is False


def test_shape_overrides_rederive_head_dim_and_kv_heads():
    """--n-embd re-derives head_dim (n_embd // n_head) and --n-head n_kv_head (= n_head),
    unless model_options sets it: the preset's resolved values would not fit the new shape."""
    tiny = trainconfig.model_config(trainconfig.TrainConfig(preset="tiny"), 64, None, None)
    assert (tiny.n_head, tiny.n_kv_head, tiny.head_dim) == (4, 2, 16)
    wide = trainconfig.model_config(trainconfig.TrainConfig(preset="tiny", n_embd=128), 64,
                                    None, None)
    assert (wide.n_kv_head, wide.head_dim, wide.rotary_dim) == (2, 32, 32)
    heads = trainconfig.model_config(trainconfig.TrainConfig(preset="tiny", n_head=8), 64,
                                     None, None)
    assert (heads.n_kv_head, heads.head_dim) == (8, 8)
    gqa = trainconfig.model_config(trainconfig.TrainConfig(preset="tiny", n_head=8,
                                                           model_options={"n_kv_head": 4}),
                                   64, None, None)
    assert gqa.n_kv_head == 4


@pytest.mark.parametrize("hf_config, expected", [
    ({"max_position_embeddings": 4096, "n_positions": 64}, 1024), ({"n_positions": 64}, 64),
    ({"n_ctx": 100}, 100), ({}, 1024), ({"max_position_embeddings": 512}, 512)])
def test_default_block_size_is_the_init_froms_context_up_to_1024(tmp_path, hf_config, expected):
    """With no block_size, a run from a pretrained base takes the base's context
    (max_position_embeddings, else n_positions, else n_ctx) up to 1024, and 1024 when its config
    names none."""
    (tmp_path / rundir.HF_CONFIG).write_text(json.dumps(hf_config))
    cfg = trainconfig.TrainConfig(init_from=str(tmp_path))
    assert trainconfig.default_block_size(cfg) == expected


def test_default_block_size_from_scratch_is_the_presets():
    """With no block_size and no init_from, a run takes its preset's context (tiny: 128)."""
    assert trainconfig.default_block_size(trainconfig.TrainConfig(preset="tiny")) == 128


def test_eval_precision_fp32_evaluates_without_autocast_whatever_the_training_precision():
    """--precision bf16 --eval-precision fp32 (the default) scores in fp32: the validation loss
    is F.cross_entropy on the fp32 logits; "same" computes in bf16."""
    ids, labels = _shifted_batch()
    losses = {}
    for eval_precision in ("fp32", "same"):
        trainer = _trainer(trainconfig.TrainConfig(preset="tiny", precision="bf16", dropout=0.0,
                                                   eval_precision=eval_precision))
        losses[eval_precision] = trainer.evaluate([{"input_ids": ids, "labels": labels}])["val_loss"]
    model = trainer.raw_model.eval()
    with torch.no_grad():
        ref = F.cross_entropy(model(ids).flatten(0, 1),
                              labels.flatten(), ignore_index=kernels.IGNORE_INDEX).item()
    assert losses["fp32"] == pytest.approx(ref, rel=1e-6)
    assert losses["same"] != pytest.approx(ref, rel=1e-6)


def test_checkpoint_names_and_their_numeric_order(tmp_path):
    """Only directories named step-<integer> are checkpoints, listed by their step (step-9 before
    step-10, where a string sort puts it after); other names and plain files are left out."""
    for name in ("step-10", "step-9", "step-x", "step-", "broken-step-3", "step-2"):
        (tmp_path / rundir.CHECKPOINTS_DIR / name).mkdir(parents=True)
    (tmp_path / rundir.CHECKPOINTS_DIR / "step-11").write_text("a file, not a checkpoint")
    assert [p.name for p in rundir.list_checkpoints(tmp_path)] == ["step-2", "step-9", "step-10"]
    assert rundir.checkpoint_step(Path("step-12")) == 12
    assert rundir.checkpoint_step(Path("step-1e3")) is None
    assert rundir.checkpoint_step(Path("x-3")) is None


def test_a_run_dir_is_a_run_config_beside_weights(tmp_path):
    """A run directory is a TrainConfig beside weights (export/ alone will do); an HF model's
    folder holding an export/ of its own, or an unreadable config.json, is no run."""
    (tmp_path / rundir.EXPORT_DIR).mkdir()
    (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps({"model_type": "llama"}))
    assert not rundir.is_run_dir(tmp_path)
    (tmp_path / rundir.CONFIG_FILE).write_text("{not json")
    assert not rundir.is_run_dir(tmp_path)
    run_config = dataclasses.asdict(trainconfig.TrainConfig())
    (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps(run_config))
    assert rundir.is_run_dir(tmp_path)
    (tmp_path / rundir.EXPORT_DIR).rmdir()
    assert not rundir.is_run_dir(tmp_path)


def test_labels_that_count_nothing_are_a_data_bug():
    """An example whose labels are all ignored (-100) would train on nothing: it is refused naming
    the split and the example, while next-token labels pass."""
    ids = torch.arange(6)
    with pytest.raises(ValueError, match="train example 0: its labels are not the next"):
        dataset.check_next_token_labels([{"input_ids": ids, "labels": torch.full((6,), -100)}],
                                   "train")
    dataset.check_next_token_labels([{"input_ids": ids, "labels": ids.roll(-1)}], "train")


def test_sample_completion_stays_within_the_models_context(monkeypatch, capsys):
    """The end-of-run sample asks for at most the positions the context has left (generate past
    block_size fails after a whole run); a prompt that would leave less than half the context
    (or than the tokens asked) has its left end cut, with a note, as eval.py cuts prompts."""
    from architecture import Transformer

    tok = CodeTokenizer.train(["def f(x):\n    return x\n"] * 2, min_freq=1)
    cfg = trainconfig.TrainConfig(preset="tiny", block_size=16)
    model = Transformer(trainconfig.model_config(cfg, tok.vocab_size, tok.bos_id, tok.eos_id))
    asked = []
    monkeypatch.setattr(generation, "generate", lambda model, idx, cfg: (
        asked.append((idx.shape[1], cfg.max_new_tokens)), idx)[1])
    prompt = "def f(x):\n"
    n_prompt = 1 + len(tok.encode(prompt))  # after the EOS an lm sample starts with
    finish.sample_completion(model, tok, prompt, 48, "lm")
    assert n_prompt < 16 and asked == [(n_prompt, 16 - n_prompt)]
    assert "note" not in capsys.readouterr().out
    finish.sample_completion(model, tok, prompt * 20, 48, "lm")
    assert asked[1] == (1 + 7, 8)  # the EOS, then the prompt's last 16 - 1 - 16 // 2 tokens
    assert "sample prompt is" in capsys.readouterr().out
    finish.sample_completion(model, tok, prompt * 20, 3, "lm")
    assert asked[2] == (1 + 12, 3)


def test_sample_completion_decodes_an_id_past_the_tokenizer_to_nothing(monkeypatch):
    """A model with more embeddings than tokens (a CodeGen or Phi-1.5 --init-from) may sample
    such an id: it decodes to nothing, as in transformers, rather than failing the run's end
    (before its export) with "token ids out of range"."""
    import torch

    from architecture import Transformer

    tok = CodeTokenizer.train(["def f(x):\n    return x\n"] * 2, min_freq=1)
    cfg = trainconfig.TrainConfig(preset="tiny", block_size=16)
    model = Transformer(trainconfig.model_config(cfg, tok.vocab_size + 8, tok.bos_id, tok.eos_id))
    new = [*tok.encode("return"), tok.vocab_size + 3, *tok.encode(" x")]
    monkeypatch.setattr(generation, "generate",
                        lambda model, idx, cfg: torch.cat((idx, torch.tensor([new])), 1))
    assert finish.sample_completion(model, tok, "def f(x):\n", 8, "lm") == "return x"


def test_a_diverged_run_exits_1_and_a_bad_setting_2(capsys):
    """Scripts tell a diverged run (exit 1: the data or the lr, the run itself was sound) from a
    refused setting or an unwritable path (exit 2)."""
    assert tm.report_run_error(record.NonFiniteLossError("non-finite loss", step=3)) == 1
    assert tm.report_run_error(ValueError("lr (0.0, --lr): must be > 0")) == 2
    assert tm.report_run_error(OSError(28, "No space left on device", "runs/x")) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: non-finite loss", "error: lr (0.0, --lr): must be > 0",
        "error: runs/x: No space left on device"]


def test_auto_on_a_mac_says_it_trains_on_the_cpu(monkeypatch, capsys):
    """Seed 004 trained on Apple MPS; codelm does not, and "auto" there chooses the CPU with a
    note saying so, not silently."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    device = trainconfig.TrainConfig().device
    assert distributed.resolve_device(device, distributed.Dist()) == torch.device("cpu")
    err = capsys.readouterr().err
    assert "training on the CPU" in err and "not mps" in err, err
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    device = trainconfig.TrainConfig().device
    assert distributed.resolve_device(device, distributed.Dist()) == torch.device("cpu")
    assert capsys.readouterr().err == ""


def test_an_error_of_two_settings_names_where_each_was_set(tmp_path, capsys):
    """Each key names its own source: quantize_bits in a --config file without lora_r names the
    file, not only "it needs LoRA (--lora-r > 0)"; --n-layer on a --config file's init_from
    names the file, not --init-from, a flag never typed."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"quantize_bits": 4}))
    assert tm.main(["--config", str(config), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: quantize_bits (4, --config {config})"), err
    assert all(w in err for w in ("quantized base", "needs LoRA", "lora_r (0, --lora-r)")), err
    config.write_text(json.dumps({"init_from": "/nonexistent"}))
    assert tm.main(["--config", str(config), "--n-layer", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in ("n_layer (2, --n-layer)", "shape",
                                  f"init_from ('/nonexistent', --config {config})")), err
    assert "--init-from" not in err, err  # a flag never typed


def test_where_set_of_a_command_line_names_the_flag_the_config_file_or_the_resumed_run(
        tmp_path):
    """trainingmanager.py's errors name a key's flag only where it was typed: a --config file's
    key names the file, a resumed run's its config.json; a key at its default, its flag."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"warmup_steps": 200, "lr": 0.1}))
    where = trainconfig.where_set_of(["--config", str(config), "--lr", "0.2",
                                      "--max-steps", "100"])
    assert [where(k) for k in ("warmup_steps", "lr", "max_steps", "seed")] == [
        f"--config {config}", "--lr", "--max-steps", "--seed"]
    run = tmp_path / "runs" / "r"
    where = trainconfig.where_set_of(["--resume", str(run), "--max-steps", "5"])
    assert (where("max_steps"), where("batch_size")) == ("--max-steps",
                                                         f"{run / 'config.json'} (--resume)")


def test_too_few_training_examples_for_a_batch_names_the_setting():
    """Fewer training examples (10) than one global batch (20 x 1) is refused naming the batch,
    --batch-size and the remedy (add data), rather than giving an epoch of zero steps."""
    with pytest.raises(ValueError, match=r"global batch \(20 x 1\).*--batch-size.*add data"):
        BatchOrder(10, 20, seed=0)


def test_a_model_shape_error_names_the_settings_it_was_made_of(tmp_path, capsys):
    """An n_embd that a --config file's n_head does not divide, and an unknown preset, say where
    the user set them, not only "ModelConfig.n_embd=30: not divisible by n_head=4" or
    "TrainConfig.preset"."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"n_head": 4}))
    assert tm.main(["--config", str(config), "--n-embd", "30", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in ("preset ('auto', --preset)", f"n_head (4, --config {config})",
                                  "n_embd (30, --n-embd)", "not divisible by n_head=4")), err
    config.write_text(json.dumps({"preset": "nope"}))
    assert tm.main(["--config", str(config), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: preset ('nope', --config {config})"), err
    assert all(w in err for w in ("unknown preset 'nope'", "auto", "one of [")), err


def test_a_from_scratch_model_the_hf_layout_cannot_hold_is_refused_before_training(tmp_path):
    """Refused before training, not trained to the end to fail writing export/; without an
    export it may train."""
    values = {"preset": "tiny", "model_options": {"family": "phi"}, "data": ["x"]}
    with pytest.raises(ValueError, match=r"^preset \('tiny', --preset\), model_options .*"
                       r"cannot export as 'phi'.*to train it without an HF export"):
        plan.validate_config(trainconfig.config_from_dict(values, "t"))
    plan.validate_config(trainconfig.config_from_dict({**values, "export": False}, "t"))


def test_the_advice_to_turn_export_off_names_what_turns_it_off():
    """The advice names --no-export, not "set export false (--export)" (typing --export keeps
    it on), and for a --config file's export, that file."""
    values = {"preset": "tiny", "model_options": {"family": "phi"}, "data": ["x"]}
    cfg = trainconfig.config_from_dict(values, "t")
    with pytest.raises(ValueError, match=r"HF export: --no-export$"):
        plan.validate_config(cfg)
    with pytest.raises(ValueError, match=r"HF export: export false \(--config run.json\)$"):
        plan.validate_config(cfg, lambda key: "--config run.json" if key == "export"
                             else settings.flag_of(key))


def test_validate_config_names_each_setting_where_the_callers_user_set_it(tmp_path):
    """A sweep or a recipe passes its own where_set: each check names a key there, not by a
    trainingmanager.py flag its user has none of."""
    where = "<{}>".format
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    gone = str(tmp_path / "gone")
    for values, message in [
        ({"init_adapter": gone}, rf"^init_adapter \('{re.escape(gone)}', <init_adapter>\): "
                                 "not a directory"),
        ({"init_from": str(adapter)}, r"^init_from \('.*', <init_from>\): a LoRA adapter .* "
                                      r"set init_adapter \(<init_adapter>\)"),
        ({"init_from": str(adapter), "model_options": {"family": "phi"}},
         r"^model_options \(<model_options>\): family"),
        ({"preset": "tiny", "model_options": {"family": "phi"}},
         r"without an HF export: export false \(<export>\)$"),
    ]:
        with pytest.raises(ValueError, match=message):
            plan.validate_config(trainconfig.config_from_dict({"data": ["x"], **values}, "t"),
                                 where)


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 100_000}, r"lower --batch-size"),
    ({"data_options": {"train_frac": 0.9, "val_frac": 0.0, "test_frac": 0.1}},
     r"raise val_frac of data_options \(--data-options\)$")])
def test_a_runs_start_names_the_setting_to_change(assets, tmp_path, overrides, message):
    """What only the data shows (a split too small for one batch, an empty validation split)
    is refused as the run starts, naming the setting."""
    if "data_options" in overrides:
        overrides["data_options"].update(cache_dir=str(tmp_path / "cache"), progress=False)
    with pytest.raises(ValueError, match=message):
        tm.train(tiny_cfg(assets, tmp_path, **overrides))


def test_a_run_on_a_gpu_without_bf16_names_where_precision_was_set(assets, tmp_path,
                                                                   monkeypatch):
    """bf16 on a GPU without it (a T4) is refused as the run starts, naming the setting."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with pytest.raises(ValueError, match=r"^precision \('bf16', --precision\): this GPU "):
        tm.train(tiny_cfg(assets, tmp_path, device="cuda", precision="bf16"))


def test_a_run_logged_to_a_file_prints_plain_lines_and_no_bar_frames(assets, tmp_path, capsys):
    """Off a terminal (a log file, as under pytest) or with --no-progress: one line per logged
    step and one per evaluation, with the figures a reader follows; no progress-bar frames."""
    config = _tiny_config_file(assets, tmp_path, max_steps=4, eval_every=2, log_every=2,
                               warmup_steps=0, progress=True)
    assert tm.main(["--config", config]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"^step 2/4 \| loss \d+\.\d{4} \| lr [\d.e+-]+ \| [\d,]+ tok/s", out, re.M)
    evals = re.findall(r"^eval step (\d)/4 \| train loss [\d.]+ \| val loss [\d.]+ "
                       r"\([\d.]+ bits/byte\) \| ppl [\d.]+ \|"
                       r" acc [\d.]+ \| [\d,]+ tok/s \| elapsed \d+m\d\ds( \| ETA \d+m\d\ds)?$",
                       out, re.M)
    assert [step for step, _ in evals] == ["2", "4"]
    assert [bool(time_left) for _, time_left in evals] == [True, False]  # none at the last step
    assert "\r" not in out + err and "it/s" not in err and "step/s" not in err


def test_a_default_run_name_says_its_model_and_task(assets, tmp_path):
    """A run given no name is called <preset>-<task>-<date>-<time>, so a runs directory lists what
    each run trained and when."""
    cfg = tiny_cfg(assets, tmp_path, max_steps=1, task="lm", name=None)
    result = tm.train(cfg)
    assert re.fullmatch(r"tiny-lm-\d{8}-\d{6}", result.run_dir.name), result.run_dir.name


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_print_config_writes_a_config_file_that_reads_back_to_the_same_run(tmp_path, capsys,
                                                                           fmt):
    """--print-config prints the whole config as JSON or YAML and trains nothing; that output,
    given to --config, parses to the TrainConfig of the flags it came from."""
    argv = ["--max-steps", "5", "--learning_rate", "2e-3", "--data-options",
            '{"val_frac": 0.2, "test_frac": 0.0}']
    assert tm.main([*argv, "--print-config", fmt]) == 0
    printed = tmp_path / f"run.{fmt}"
    printed.write_text(capsys.readouterr().out)
    assert not (tmp_path / "runs").exists()  # nothing trained
    assert plan.parse_config(["--config", str(printed)]) == plan.parse_config(argv)


def test_a_resumed_run_that_exports_anew_is_evaluated_anew(assets, tmp_path, capsys):
    """A finished run extended by --resume exports new weights: its final evaluation scores
    them, replacing the one of the weights it had (not refusing it as another evaluation's)."""
    cfg = tiny_cfg(assets, tmp_path, max_steps=2, eval_every=2, export=True)
    assert tm.main(["--config", str(write_config(cfg, tmp_path / "c.json"))]) == 0
    run_dir = Path(cfg.out_dir) / cfg.name
    results = run_dir / rundir.FINAL_EVAL_DIR / "results.json"
    first = json.loads(results.read_text())
    capsys.readouterr()
    assert tm.main(["--resume", str(run_dir), "--max-steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "final evaluation (" in out and "no final evaluation" not in out
    again = json.loads(results.read_text())
    assert [m["step"] for m in first["models"]] == [2]
    assert [m["step"] for m in again["models"]] == [4]


def test_a_kotlin_run_is_evaluated_on_its_lines(assets, tmp_path, capsys):
    """A run on Kotlin files: its final evaluation completes their lines (line completion reads
    any language, as training's completion examples do), without method's Python functions;
    eval.py's method task says why a Kotlin split gives it nothing."""
    kotlin = tmp_path / "kt"
    kotlin.mkdir()
    for i in range(30):
        (kotlin / f"Shape{i}.kt").write_text(
            f"package shapes\n\nclass Shape{i}(val side: Int) {{\n"
            f"    fun area(): Int = side * side + {i}\n\n"
            f"    fun describe(): String = \"shape {i} of area ${{area()}}\"\n}}\n")
    options = {"cache_dir": assets["cache"], "progress": False, "extensions": [".kt"],
               "split_by": "file"}
    cfg = tiny_cfg(assets, tmp_path, data=[str(kotlin)], data_options=options, max_steps=2,
                   eval_every=2, export=True)
    assert tm.main(["--config", str(write_config(cfg, tmp_path / "c.json"))]) == 0
    out = capsys.readouterr().out
    assert "final evaluation (" in out and "line completion exact match" in out
    assert re.search(r"bits/byte over [\d,]+ validation tokens\), line completion", out)
    assert "parse" not in out.split("final evaluation (")[1]
    import eval as ev

    run_dir = Path(cfg.out_dir) / cfg.name
    assert ev.main(["--models", str(run_dir), "--tasks", "method"]) == 2
    err = capsys.readouterr().err
    assert "method targets come from Python files" in err and "other languages" in err


def test_a_run_on_text_records_is_evaluated_on_their_lines(assets, tmp_path, capsys):
    """JSONL text records name no .py file, so method finds no function in them: the final
    evaluation completes their lines alone, not nothing."""
    records = tmp_path / "code.jsonl"
    texts = [p.read_text("utf-8") for p in sorted(Path(assets["corpus"]).iterdir())]
    records.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    cfg = tiny_cfg(assets, tmp_path, data=[str(records)], max_steps=2, eval_every=2,
                   export=True)
    assert tm.main(["--config", str(write_config(cfg, tmp_path / "c.json"))]) == 0
    out = capsys.readouterr().out
    assert "final evaluation (" in out and "no final evaluation" not in out
    assert "note: line completion alone: task 'method'" in out
    assert out.count("data: scoring the test split") == 1  # not again for line alone


def test_the_export_and_its_final_evaluation_name_the_weights_exported(assets, tmp_path,
                                                                        capsys, monkeypatch):
    """Validation losses 2.0 then 3.0: the export holds step 2's best/ weights, and the lines
    about it give step 2's loss, not the last evaluation's."""
    losses = iter([2.0, 3.0])

    def evaluate(self, *args, **kwargs):
        loss = next(losses)
        return {"val_loss": loss, "val_bpb": loss / math.log(2), "val_ppl": math.exp(loss),
                "val_accuracy": 0.0, "val_tokens": 1}

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", evaluate)
    cfg = tiny_cfg(assets, tmp_path, max_steps=4, eval_every=2, warmup_steps=0, export=True)
    assert tm.main(["--config", str(write_config(cfg, tmp_path / "c.json"))]) == 0
    said = capsys.readouterr()
    lines = said.out.splitlines()
    exported = next(line for line in lines if line.startswith("exported to"))
    assert "best validation loss 2.0000" in exported and "at step 2" in exported
    final = next(line for line in lines if line.startswith("final evaluation"))
    assert "val loss 2.0000" in final
    assert "still training" not in said.err  # the run's own lock, held to its end
    results = (tmp_path / "runs" / cfg.name / "final_eval" / "results.json").read_text()
    assert '"still_training": false' in results


def test_the_run_directory_stays_locked_through_the_final_evaluation(assets, tmp_path,
                                                                     monkeypatch):
    """The final evaluation writes into the run directory: while it runs, a --resume of the run
    from another process is refused as in use; once the command ends, it is free."""
    claims = []

    def final_quality(run_dir, *args, **kwargs):
        with pytest.raises(rundir.RunDirTaken, match="in use"):
            rundir.claim(str(run_dir), str(tmp_path), None, "run", None)
        claims.append(run_dir)

    monkeypatch.setattr(finish, "final_quality", final_quality)
    cfg = tiny_cfg(assets, tmp_path, max_steps=2, eval_every=2, export=True)
    assert tm.main(["--config", str(write_config(cfg, tmp_path / "c.json"))]) == 0
    assert len(claims) == 1
    rundir.claim(str(claims[0]), str(tmp_path), None, "run", None).release()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_during_the_final_evaluation_is_one_line_and_the_stops_exit_code(
        assets, tmp_path, capsys, monkeypatch, sig, code):
    """SIGTERM or Ctrl-C while the exported run is evaluated: one line saying how to evaluate
    it again, exit 143 or 130, no traceback."""
    def stopped(*args, **kwargs):
        signal.raise_signal(sig)

    monkeypatch.setattr(finish, "final_quality", stopped)
    cfg = tiny_cfg(assets, tmp_path, max_steps=2, eval_every=2, export=True)
    assert tm.main(["--config", str(write_config(cfg, tmp_path / "c.json"))]) == code
    err = capsys.readouterr().err
    assert "interrupted during the final evaluation" in err and "--resume" in err
    assert "Traceback" not in err


def test_a_stop_during_the_export_says_the_final_evaluation_is_left_to_a_resume(
        assets, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the run exports: the export is finished and kept, the final evaluation
    not run, and the lines say so and how to run it."""
    export_run = finish.export_run
    evaluated = []

    def stopped_while_exporting(run):
        signal.raise_signal(signal.SIGINT)
        return export_run(run)

    monkeypatch.setattr(finish, "export_run", stopped_while_exporting)
    monkeypatch.setattr(finish, "final_quality", lambda *args, **kwargs: evaluated.append(1))
    cfg = tiny_cfg(assets, tmp_path, max_steps=2, eval_every=2, export=True)
    assert tm.main(["--config", str(write_config(cfg, tmp_path / "c.json"))]) == 130
    captured = capsys.readouterr()
    assert "the run had finished" in captured.out and not evaluated
    assert "final evaluation not run" in captured.err and "--resume" in captured.err


def test_print_config_looks_for_no_checkpoint(capsys, monkeypatch):
    """--print-config prints and does nothing else: a hub id in init_from is not fetched (a
    recipe naming one prints offline, before its model is downloaded)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--init-from", "org/not-downloaded", "--lora-r", "16", "--print-config", "json"]
    assert tm.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["init_from"] == "org/not-downloaded"


def test_tensorboard_holds_the_runs_hyperparameters(assets, tmp_path):
    """Read back with TensorBoard's own API: the hparams plugin's session holds the config."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = tiny_cfg(assets, tmp_path, max_steps=2, lr=2e-3)
    result = tm.train(cfg)
    events = EventAccumulator(str(result.run_dir / rundir.TB_DIR))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lr"].number_value == 2e-3 and hparams["preset"].string_value == "tiny"
    assert json.loads(hparams["data"].string_value) == cfg.data
    assert "train/loss" in events.Tags()["scalars"]


def _wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (its leveldb-log framing), as wandb's protobufs,
    once W&B's writer process has written its run (it may lag ``finish`` by a moment)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    for _ in range(100):
        if path.stat().st_size > 7:  # more than the file header
            break
        time.sleep(0.1)
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, LAST
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_without_a_login_is_one_line_naming_the_ways_out(assets, tmp_path, monkeypatch,
                                                               capsys):
    """Refused before the run plans, prepares its data or makes its directory: nothing to wait
    for or to clean up."""
    wandb = pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc of a login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = tiny_cfg(assets, tmp_path, max_steps=2, report_to=["wandb"])
    try:
        assert tm.main(["--config", str(write_config(cfg, tmp_path / "c.json"))]) == 2
    finally:
        wandb.teardown()  # W&B keeps its settings in the process: the next test sets its own
    err = capsys.readouterr().err
    assert "--report-to wandb" in err and "wandb login" in err and "WANDB_MODE=offline" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "run").exists()


def test_resume_takes_a_runs_name_under_out_dir(tmp_path, monkeypatch, capsys):
    """--resume NAME, where NAME is no directory here, continues the run NAME under --out-dir
    (runs/ by default), said on stderr; a directory of that name here is the one meant."""
    for runs, lr in ((tmp_path / "my-runs", 1e-3), (tmp_path / "runs", 2e-3)):
        (runs / "small").mkdir(parents=True)
        saved = dataclasses.asdict(trainconfig.TrainConfig(lr=lr, out_dir=str(runs)))
        (runs / "small" / rundir.CONFIG_FILE).write_text(json.dumps(saved))
    monkeypatch.chdir(tmp_path)
    cfg = plan.parse_config(["--resume", "small", "--out-dir", "my-runs"])
    assert (cfg.resume, cfg.lr) == (str(Path("my-runs/small")), 1e-3)
    assert capsys.readouterr().err == "--resume small: my-runs/small (under --out-dir)\n"
    read = trainconfig.read_config(["--resume", "small"])
    assert (read.cfg.resume, read.cfg.lr, read.resume_name) == (str(Path("runs/small")), 2e-3,
                                                                "small")
    (tmp_path / "small").mkdir()
    with pytest.raises(ValueError, match="^--resume small: no config.json"):
        trainconfig.read_config(["--resume", "small"])


def test_resume_under_the_home_directory_reads_that_run(tmp_path, monkeypatch):
    """A --resume that starts with ~ where no shell expands it (a --config file's, or
    --resume=~/...) names that run under the home directory: its settings are read, and the
    run continued is that directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    run = tmp_path / "runs" / "small"
    run.mkdir(parents=True)
    saved = dataclasses.asdict(trainconfig.TrainConfig(lr=2e-3, out_dir=str(run.parent)))
    (run / rundir.CONFIG_FILE).write_text(json.dumps(saved))
    config = tmp_path / "resume.json"
    config.write_text(json.dumps({"resume": "~/runs/small"}))
    monkeypatch.chdir(tmp_path / "runs")  # no ~ directory here
    for argv in (["--config", str(config)], ["--resume=~/runs/small"]):
        read = trainconfig.read_config(argv)
        assert (read.cfg.resume, read.cfg.lr, read.resume_name) == (str(run), 2e-3, None)
        trainconfig.check_config(read.cfg)


@pytest.mark.parametrize("mistake", ["missing", "kotlin", "refactor"])
def test_data_a_run_cannot_read_is_refused_before_it_plans(tmp_path, monkeypatch, capsys,
                                                            mistake):
    """A missing source, a directory of another language's files, code for the refactor task:
    one line naming the fix, before preset auto times models (seconds) or a run dir exists."""
    monkeypatch.setattr(tm, "_planned", lambda *a: pytest.fail("the run was planned"))
    (tmp_path / "kt").mkdir()
    (tmp_path / "kt" / "Main.kt").write_text("fun main() {}\n")
    data = {"missing": [str(tmp_path / "gone")], "kotlin": [str(tmp_path / "kt")],
            "refactor": ["stdlib"]}[mistake]
    argv = ["--data", *data, "--max-steps", "2", "--out-dir", str(tmp_path / "runs")]
    assert tm.main([*argv, "--task", "refactor" if mistake == "refactor" else "lm"]) == 2
    err = capsys.readouterr().err
    fix = {"missing": "data source not found",
           "kotlin": """--data-options '{"extensions": [".kt"]}'""",
           "refactor": "refactor task needs JSONL pair records"}[mistake]
    assert fix in err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("how", ["netrc", "WANDB_API_KEY", "WANDB_MODE"])
def test_wandb_with_a_key_or_offline_starts_without_asking(tmp_path, monkeypatch, how):
    """A key where `wandb login` writes it (the netrc entry of W&B's host), in the environment,
    or W&B offline: the check before a run asks W&B nothing (no login call, no message)."""
    wandb = pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine example.org login user password secret\n")
    if how == "netrc":
        netrc_file.write_text(f"machine api.wandb.ai login user password {'a' * 40}\n")
    else:
        monkeypatch.setenv(how, "a" * 40 if how == "WANDB_API_KEY" else "offline")
    monkeypatch.setenv("NETRC", str(netrc_file))
    monkeypatch.setattr(wandb, "login", lambda **kw: pytest.fail("W&B was asked to log in"))
    trackers.check_ready(["tensorboard", "wandb"])
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    netrc_file.write_text("machine example.org login user password secret\n")
    with pytest.raises(pytest.fail.Exception, match="asked to log in"):
        trackers.check_ready(["wandb"])


@pytest.mark.slow  # quick cover: test_the_three_trackers_hold_the_same_series_and_config_across_a_resume
def test_wandb_offline_gets_the_config_and_scalars_and_a_resume_continues_its_run(
        assets, tmp_path, monkeypatch):
    """report_to wandb (offline) logs the config and the validation scalars at their steps, and a
    resume continues the same W&B run (trackers.json keeps its id) rather than starting another,
    sending no config: the run keeps the one it started with, as the other trackers do."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg(assets, tmp_path, max_steps=4, report_to=["wandb"])
    run_dir = tm.train(cfg).run_dir
    time.sleep(1.1)  # W&B names an offline run's directory by the second it starts
    tm.train(dataclasses.replace(cfg, resume=str(run_dir), max_steps=8))
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    files = sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one W&B run, continued
    val_steps, configs = [], []
    for records in map(_wandb_records, files):
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert runs[0].run_id == run_id and runs[0].display_name == "run"
        configs.append({i.key: json.loads(i.value_json) for i in runs[0].config.update})
        for r in records:
            items = {i.key or "/".join(i.nested_key): i.value_json  # "val/x" is nested
                     for i in r.history.item}  # empty in other records
            if "val/val_loss" in items:
                val_steps.append(int(items["_step"]))
    assert val_steps == [4, 8]
    started, resumed = configs
    assert started["lr"] == cfg.lr and started["preset"] == "tiny" and started["max_steps"] == 4
    assert not {key for key in resumed if not key.startswith("_")}


def test_mlflow_gets_the_config_and_scalars_and_a_resume_continues_its_run(
        assets, tmp_path, monkeypatch):
    """report_to mlflow logs the config as params and the validation loss at its steps; a resume
    continues the same MLflow run, and a new run under the same name starts a new one."""
    mlflow = pytest.importorskip("mlflow")
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's local file store
    cfg = tiny_cfg(assets, tmp_path, max_steps=4, report_to=["tensorboard", "mlflow"])
    run_dir = tm.train(cfg).run_dir
    tm.train(dataclasses.replace(cfg, resume=str(run_dir), max_steps=8))
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = mlflow.MlflowClient(uri)
    assert json.loads(client.get_run(run_id).data.params["lr"]) == cfg.lr
    assert [m.step for m in client.get_metric_history(run_id, "val_val_loss")] == [4, 8]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    shutil.rmtree(run_dir / "checkpoints")  # a new run under the name: a new MLflow run
    for kept in ("best", "export"):
        shutil.rmtree(run_dir / kept, ignore_errors=True)
    tm.train(cfg)
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"] != run_id


def test_mlflow_takes_any_metric_name_and_a_stops_thread_ends_its_run(tmp_path, monkeypatch):
    """GRPO's val/val_pass@1 ("@" is no character of an MLflow name) is logged as
    val_val_pass_at_1; the stop watcher's thread, closing the log as a stop ends the process,
    ends the run KILLED (MLflow's active run is the main thread's)."""
    import threading

    mlflow = pytest.importorskip("mlflow")
    from codelm.runs import trackers

    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    log = trackers.RunLog(tmp_path, True, None, {"lr": 1e-3}, ["mlflow"])
    log.write(2, "val", {"val_pass@1": 0.5, "val_loss": 1.0})
    watcher = threading.Thread(target=log.close, args=(trackers.KILLED,))
    watcher.start()
    watcher.join()
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    client = mlflow.MlflowClient(uri)
    try:
        assert client.get_run(run_id).info.status == "KILLED"
        assert [m.value for m in client.get_metric_history(run_id, "val_val_pass_at_1")] == [0.5]
    finally:
        mlflow.end_run()  # this process goes on (a stop's would exit)


def test_mlflow_records_how_an_attempt_ended_and_a_resume_without_a_checkpoint_starts_anew(
        assets, tmp_path, monkeypatch):
    """A run whose loss turns NaN before its first checkpoint: its MLflow run FAILED. Resumed
    (no checkpoint: it starts over), a new MLflow run, its series the new attempt's alone,
    FINISHED."""
    mlflow = pytest.importorskip("mlflow")
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = tiny_cfg(assets, tmp_path, max_steps=4, lr=0.1, inject_nan_at_step=3,
                   report_to=["mlflow"])
    assert tm.main(["--config", str(write_config(cfg, tmp_path / "c.json"))]) == 1
    run_dir = tmp_path / "runs" / "run"
    failed = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = mlflow.MlflowClient(uri)
    assert client.get_run(failed).info.status == "FAILED"
    again = dataclasses.replace(cfg, resume=str(run_dir), lr=3e-3, inject_nan_at_step=None)
    tm.train(again)
    finished = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert finished != failed
    assert client.get_run(finished).info.status == "FINISHED"
    lr = [m.value for m in client.get_metric_history(finished, "train_lr")]
    assert max(lr) == pytest.approx(3e-3)


@pytest.mark.parametrize("resumed_from", [10, 6])
def test_trackers_hold_each_point_once_after_a_resume(assets, tmp_path, monkeypatch,
                                                       resumed_from):
    """Killed while step 10's checkpoint was written again with the run's last evaluation (its
    first write, before it, kept): the resume evaluates step 10 again. Or resumed from step 6
    (the later checkpoints lost): steps 7..10 run again. TensorBoard and MLflow hold each
    step's point once, the steps metrics.jsonl holds."""
    mlflow = pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    real = record.RunRecord.checkpoint
    steps = []

    def killed_at_the_second_write_of_step_10(self, state, *args, **kwargs):
        steps.append(state.step)
        if steps.count(10) == 2:
            raise KeyboardInterrupt  # the kill: nothing after it is written
        return real(self, state, *args, **kwargs)

    cfg = tiny_cfg(assets, tmp_path, max_steps=10, eval_every=6, save_every=2,
                   report_to=["tensorboard", "mlflow"])
    monkeypatch.setattr(record.RunRecord, "checkpoint", killed_at_the_second_write_of_step_10)
    with pytest.raises(KeyboardInterrupt):
        tm.train(cfg)
    monkeypatch.setattr(record.RunRecord, "checkpoint", real)
    run_dir = tmp_path / "runs" / "run"
    for later in (8, 10)[: 2 if resumed_from == 6 else 0]:
        shutil.rmtree(run_dir / "checkpoints" / f"step-{later}")
    tm.train(dataclasses.replace(cfg, resume=str(run_dir)))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if r["kind"] == "train"]
    val_steps = [r["step"] for r in lines if r["kind"] == "val"]
    assert train_steps == list(range(1, 11)) and val_steps == [6, 10]
    events = EventAccumulator(str(run_dir / rundir.TB_DIR))
    events.Reload()
    # (sorted: TensorBoard reads its event files in name order, and two of one second, as in a
    # test, sort by process and counter)
    assert sorted(e.step for e in events.Scalars("train/loss")) == train_steps
    assert sorted(e.step for e in events.Scalars("val/val_loss")) == val_steps
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = mlflow.MlflowClient(uri)
    for key, want in (("train_loss", train_steps), ("val_val_loss", val_steps)):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == want


def test_tensorboard_holds_an_evaluation_killed_before_it_reached_the_tracker(assets,
                                                                              tmp_path,
                                                                              monkeypatch):
    """Killed after the last evaluation's line reached metrics.jsonl but not TensorBoard (its
    writer is behind), the checkpoint of that step written before the evaluation: the resume
    evaluates the step again and TensorBoard holds each point once, as metrics.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from codelm.runs import trackers

    real = trackers._TensorBoard.log

    def killed_at_the_last_evaluation(self, step, scalars):
        if step == 10 and "val/val_loss" in scalars:
            raise KeyboardInterrupt
        return real(self, step, scalars)

    cfg = tiny_cfg(assets, tmp_path, max_steps=10, eval_every=6, save_every=2,
                   report_to=["tensorboard"])
    monkeypatch.setattr(trackers._TensorBoard, "log", killed_at_the_last_evaluation)
    with pytest.raises(KeyboardInterrupt):
        tm.train(cfg)
    monkeypatch.setattr(trackers._TensorBoard, "log", real)
    run_dir = tmp_path / "runs" / "run"
    tm.train(dataclasses.replace(cfg, resume=str(run_dir)))
    assert _val_steps(run_dir) == [6, 10]
    events = EventAccumulator(str(run_dir / rundir.TB_DIR))
    events.Reload()
    assert [e.step for e in events.Scalars("val/val_loss")] == [6, 10]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 11))


def test_the_three_trackers_hold_the_same_series_and_config_across_a_resume(assets, tmp_path,
                                                                          monkeypatch):
    """--report-to tensorboard wandb mlflow: each read back by its own library holds the val
    loss series of metrics.jsonl and the config, one run each continued by --resume (W&B's
    offline files: one run id, a file per attempt, each opening with the run's name and
    config)."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"file:{tmp_path / 'mlruns'}"
    for key, value in (("MLFLOW_TRACKING_URI", uri), ("MLFLOW_ALLOW_FILE_STORE", "true"),
                       ("WANDB_MODE", "offline"), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(key, value)
    cfg = tiny_cfg(assets, tmp_path, max_steps=4, eval_every=2,
                   report_to=["tensorboard", "wandb", "mlflow"])
    run_dir = tm.train(cfg).run_dir
    time.sleep(1.1)  # W&B names an offline run's directory by the second it starts
    tm.train(dataclasses.replace(cfg, resume=str(run_dir), max_steps=6))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = {r["step"]: r["val_loss"] for r in lines if r["kind"] == "val"}
    assert sorted(want) == [2, 4, 6]
    events = EventAccumulator(str(run_dir / rundir.TB_DIR))
    events.Reload()
    tensorboard = {e.step: e.value for e in events.Scalars("val/val_loss")}
    ids = json.loads((run_dir / "trackers.json").read_text())
    client = mlflow.MlflowClient(uri)
    mlflow_series = {m.step: m.value for m in client.get_metric_history(ids["mlflow"],
                                                                       "val_val_loss")}
    assert json.loads(client.get_run(ids["mlflow"]).data.params["lr"]) == cfg.lr
    wandb_series = {}
    files = sorted(run_dir.glob(f"wandb/offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
    assert len(files) == 2  # one W&B run, continued
    for file in files:
        records = _wandb_records(file)
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert runs[0].run_id == ids["wandb"] and runs[0].display_name == "run"
        config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
        if file == files[0]:  # the config the run started with; its resume sends none
            assert config["lr"] == cfg.lr and config["preset"] == "tiny"
        for r in records:
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            if "val/val_loss" in items:
                wandb_series[int(items["_step"])] = json.loads(items["val/val_loss"])
    for series in (tensorboard, mlflow_series, wandb_series):
        assert sorted(series) == [2, 4, 6]
        assert all(series[k] == pytest.approx(want[k], rel=1e-6) for k in want)


def test_a_tracker_that_is_not_installed_names_its_package(monkeypatch):
    """A --report-to tracker whose package is missing is refused when the config is parsed, naming
    report_to and the pip install it needs, not after training; "none" beside a tracker is
    refused too."""
    import importlib.util


    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ValueError) as err:
        plan.parse_config(["--report-to", "wandb"])
    assert "report_to" in str(err.value) and "pip install wandb" in str(err.value)
    with pytest.raises(ValueError, match="report_to"):
        plan.parse_config(["--report-to", "none", "tensorboard"])


def test_muon_steps_as_torchs_own_adamw_and_muon_side_by_side():
    """optimizer muon: torch's Muon on the blocks' weight matrices, torch's AdamW on the
    embedding, the head and the vectors, one schedule over both: the same weights, bit for bit,
    as the two torch optimizers stepped separately."""
    from architecture import PRESETS, Transformer
    from codelm.training.optim import build_optimizer

    torch.manual_seed(0)
    ours = Transformer(dataclasses.replace(PRESETS["tiny"], tie_embeddings=False))
    theirs = copy.deepcopy(ours)
    muon_cfg = trainconfig.TrainConfig(optimizer="muon", lr=1e-2, weight_decay=0.1)
    optimizer = build_optimizer(ours, list(ours.parameters()), muon_cfg)
    lookups = {id(theirs.wte.weight), id(theirs.lm_head.weight)}
    matrices = [p for p in theirs.parameters() if p.dim() == 2]
    hidden = [p for p in matrices if id(p) not in lookups]
    assert len(hidden) == 5 * PRESETS["tiny"].n_layer  # qkv, attention proj, gate, fc, MLP proj
    adamw = torch.optim.AdamW([{"params": [p for p in matrices if id(p) in lookups]},
                               {"params": [p for p in theirs.parameters() if p.dim() < 2],
                                "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    muon = torch.optim.Muon(hidden, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    schedule = lambda s: (s + 1) / 3  # noqa: E731
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule)
                  for o in (optimizer, adamw, muon)]
    for _ in range(3):
        ids = torch.randint(512, (2, 17))
        for model, steppers in ((ours, [optimizer]), (theirs, [adamw, muon])):
            model(ids[:, :-1], ids[:, 1:]).backward()
            for o in steppers:
                o.step()
                o.zero_grad()
        for s in schedulers:
            s.step()
    assert_bit_equal(ours.state_dict(), theirs.state_dict())
    assert len(optimizer.state_dict()["state"]) == len(list(ours.parameters()))


def test_adamw_steps_with_the_configs_betas_and_eps():
    """optimizer adamw takes beta1, beta2 and adam_eps from the config: with values off the
    defaults its steps give the same weights, bit for bit, as torch's AdamW built by hand with
    them (eps 1e-3 is large enough that a default eps would change every update)."""
    from architecture import PRESETS, Transformer
    from codelm.training.optim import build_optimizer

    torch.manual_seed(0)
    ours = Transformer(PRESETS["tiny"])
    theirs = copy.deepcopy(ours)
    cfg = trainconfig.TrainConfig(lr=1e-2, weight_decay=0.1, beta1=0.8, beta2=0.9,
                                  adam_eps=1e-3)
    optimizer = build_optimizer(ours, list(ours.parameters()), cfg)
    reference = torch.optim.AdamW(
        [{"params": [p for p in theirs.parameters() if p.dim() >= 2]},
         {"params": [p for p in theirs.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1, fused=True)
    for _ in range(3):
        ids = torch.randint(512, (2, 17))
        for model, stepper in ((ours, optimizer), (theirs, reference)):
            model(ids[:, :-1], ids[:, 1:]).backward()
            stepper.step()
            stepper.zero_grad()
    assert_bit_equal(ours.state_dict(), theirs.state_dict())


def test_a_muon_run_resumes_bit_exactly_and_a_lora_run_refuses_it(assets, tmp_path,
                                                                   monkeypatch):
    """Muon's momentum is saved with AdamW's moments: a run stopped mid-way and resumed ends on
    the weights of one that was not."""
    common = dict(max_steps=8, optimizer="muon")
    straight = tm.train(tiny_cfg(assets, tmp_path, name="straight", **common))
    original = sigterm_at_step(monkeypatch, 6)
    cfg = tiny_cfg(assets, tmp_path, name="stopped", **common)
    assert tm.train(cfg).interrupted == "SIGTERM"
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original)
    tm.train(dataclasses.replace(cfg, resume=str(Path(cfg.out_dir) / "stopped")))
    assert_bit_equal(final_weights(straight.run_dir, 8),
                     final_weights(Path(cfg.out_dir) / "stopped", 8))
    with pytest.raises(ValueError, match=r"optimizer.*muon.*LoRA.*adamw"):
        plan.validate_config(trainconfig.TrainConfig(optimizer="muon", lora_r=4,
                                                     init_from=str(tmp_path)))


def test_a_task_typo_is_refused_at_once_naming_the_flag_and_the_tasks(tmp_path, capsys):
    """--task lmm (or a config's "task": "lmm") is refused when the flags are read, before any
    data, tokenizer or timing, naming --task and every task there is."""
    with pytest.raises(SystemExit) as info:
        tm.main(["--task", "lmm", "--max-steps", "2", "--out-dir", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--task" in err and "'lmm'" in err and "'lm'" in err and "'grpo'" in err
    config = tmp_path / "run.json"
    config.write_text('{"task": "lmm"}')
    assert tm.main(["--config", str(config), "--out-dir", str(tmp_path)]) == 2
    assert "'task' must be one of" in capsys.readouterr().err
    assert not any(tmp_path.glob("runs*"))



@pytest.mark.parametrize("lora_r", [0, 4])
def test_a_stalled_lora_overfit_names_the_frozen_head(tmp_path, lora_r):
    """--overfit-batches under LoRA whose loss stalls above the target (every token right, the
    frozen head's logits too small to reach it) says to add lm_head to the targets; a full
    fine-tune's verdict does not."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "kind": "train", "loss": 5.0 if s == 1 else 4.9} for s in range(1, 41)]
    lines[1]["loss"] = 4.95  # fell a little, then stalled
    for line in lines[2:]:
        line["loss"] = 4.0
    (run / rundir.METRICS_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
    write_config(trainconfig.TrainConfig(lora_r=lora_r, lr=1e-3), run / rundir.CONFIG_FILE)
    cfg = trainconfig.TrainConfig(overfit_batches=1)
    result = tm.TrainResult(run_dir=run, best_val_loss=None, step=40, train_loss=4.0)
    passed, verdict = tm.overfit_batches_report(cfg, result)
    assert not passed and "stalled above the target" in verdict
    assert ("lm_head to --lora-targets" in verdict) == bool(lora_r)


def test_a_new_default_named_run_names_the_latest_one_that_stopped_short(tmp_path, capsys):
    """The same default command after a Ctrl-C starts a new run (default names carry the time):
    a note names the latest run of that name that stopped before its max_steps and how to
    continue it; after a run that finished, or stopped early (its export written), nothing is
    said."""
    def earlier(name: str, step: int) -> Path:
        run = tmp_path / name
        (run / rundir.CHECKPOINTS_DIR / f"step-{step}").mkdir(parents=True)
        (run / rundir.CONFIG_FILE).write_text(json.dumps({"max_steps": 100}))
        return run

    earlier("tiny-lm-20260101-000000", 100)
    stopped = earlier("tiny-lm-20260102-000000", 40)
    claimed = rundir.claim(None, str(tmp_path), None, "tiny-lm", None)
    claimed.release()
    out = capsys.readouterr().out
    assert f"{stopped} stopped at step 40 of 100" in out and f"--resume {stopped}" in out
    early = earlier("tiny-lm-20260103-000000", 60)  # stopped early: it wrote its export
    (early / rundir.EXPORT_DIR).mkdir()
    rundir.claim(None, str(tmp_path), None, "tiny-lm", None).release()
    earlier("tiny-lm-20260104-000000", 100)  # the latest finished: nothing to say
    rundir.claim(None, str(tmp_path), None, "tiny-lm", None).release()
    named = rundir.claim(None, str(tmp_path), "mine", "tiny-lm", None)  # a name the user gave
    named.release()
    assert "stopped at step" not in capsys.readouterr().out


def test_a_run_whose_data_holds_no_sample_prompt_says_so(assets, tmp_path, capsys):
    """Data without a Python function (Markdown here) gives no held-out sample prompt: the
    export says why it shows no sample, and how to ask for one."""
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(12):
        (notes / f"n{i}.md").write_text("".join(f"# part {j}\n\nsome words {i} {j}.\n"
                                                for j in range(30)))
    tm.train(tiny_cfg(assets, tmp_path, data=[str(notes)], max_steps=1, eval_every=1,
                      warmup_steps=0, export=True,
                      data_options={"cache_dir": assets["cache"], "progress": False,
                                    "extensions": [".md"], "min_lines": 0}))
    out = capsys.readouterr().out
    assert "no sample: the held-out data holds no code" in out
    assert "--sample-prompt" in out


def test_a_budgeted_runs_final_evaluation_keeps_to_its_share_of_the_budget(tmp_path,
                                                                          monkeypatch, capsys):
    """The final evaluation of a run sized by a short --time-budget-min scores fewer examples a
    task, in proportion (eval.py's 100 at 15 min and above, 10 at least); a run of steps, or
    a resumed one, scores eval.py's 100. The line before it names --no-final-eval."""
    asked = []
    monkeypatch.setattr(finish, "_evaluated", lambda run_dir, tasks, out, device, limit: (
        asked.append(limit) or {"line/EM": 0.0, "line/edit_sim": 0.0}))
    result = tm.TrainResult(run_dir=tmp_path, best_val_loss=1.0, step=3, best_step=3,
                            export_dir=tmp_path / "export")
    for minutes, steps, limit in ((1.3, None, 10), (7.5, None, 50), (15, None, None),
                                 (60, None, None), (15, 30, None)):
        cfg = trainconfig.TrainConfig(time_budget_min=minutes, max_steps=steps)
        assert tm._after_training(cfg, result) == 0
        assert asked.pop() == limit
    out = capsys.readouterr().out
    assert all(w in out for w in ("scoring the export", "50 examples each", "time budget",
                                  "--no-final-eval")), out
    (tmp_path / rundir.FINAL_EVAL_DIR).mkdir()  # an earlier final evaluation, of 33 a task
    (tmp_path / rundir.FINAL_EVAL_DIR / "results.json").write_text(
        json.dumps({"config": {"limit": 33}}))
    resumed = trainconfig.TrainConfig(resume=str(tmp_path))
    assert tm._after_training(resumed, result) == 0
    assert asked.pop() == 33  # the resumed run keeps its budget's size
