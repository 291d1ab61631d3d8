"""What a run's settings build: its tokenizer (given, the pretrained model's, or trained on the
data) and its model (from scratch or from ``init_from``, then the quantized base and LoRA), each
through the module of its kind."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

import lora
import pretrained
import rundir
import settings
from architecture import SHORT_DTYPES, Transformer
from dataconfig import DataConfig
from dataset import prepare, publish_cache_entry, tokenizer_cache_dir
from process import progress_bar
from settings import setting
from tokenizer import (
    TOKENIZER_FILE,
    BPETokenizer,
    CodeTokenizer,
    check_model_tokenizer,
    load_tokenizer,
    tokenizer_path,
    where_tokenizer_is,
)
from trainconfig import TrainConfig, model_config

# init_adapter's adapter_config.json -> the TrainConfig keys it sets (LoRAConfig's names).
ADAPTER_KEYS = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                "use_dora": "lora_dora", "bias": "lora_bias",
                "modules_to_save": "lora_modules_to_save",
                "target_modules": "lora_targets"}


def check_lora_export(cfg: TrainConfig, model: nn.Module,
                      where_set: Callable[[str], str] = settings.flag_of) -> None:
    """Refuse, before training, an export that would merge a LoRA into a tied weight."""
    if not (cfg.export and cfg.lora_r > 0 and cfg.export_merged
            and (tied := lora.tied_targets(model))):
        return
    path, names = next(iter(tied.items()))
    raise ValueError(f"{setting(cfg, 'export_merged', where_set)}: the LoRA target {path} "
                     f"({setting(cfg, 'lora_targets', where_set)}) is tied to {names}, so it "
                     f"cannot be merged: drop it from lora_targets, or train with "
                     f"{settings.off_switch('export_merged', where_set)}")


def load_or_train_tokenizer(cfg: TrainConfig, dcfg: DataConfig) -> CodeTokenizer | BPETokenizer:
    """The given tokenizer, the pretrained model's, or one trained (and cached) on the data."""
    own = Path(cfg.init_from) / TOKENIZER_FILE if cfg.init_from is not None else None
    if cfg.tokenizer is not None:
        tok = load_tokenizer(cfg.tokenizer)
        theirs = load_tokenizer(own) if own is not None and own.is_file() else tok
        if [tok.id_to_token(i) for i in range(tok.vocab_size)] != [
                theirs.id_to_token(i) for i in range(theirs.vocab_size)]:
            print(f"warning: --tokenizer {cfg.tokenizer} differs from {own}, the one "
                  f"--init-from {cfg.init_from} was trained with", file=sys.stderr)
        if cfg.init_from is not None:
            check_model_tokenizer(tok, tokenizer_path(cfg.tokenizer), cfg.init_from)
        return tok
    if own is not None:
        if not own.is_file():
            raise ValueError(f"--init-from {cfg.init_from}: no {TOKENIZER_FILE} in it"
                             f"{where_tokenizer_is(cfg.init_from)}; pass --tokenizer with the "
                             "tokenizer the checkpoint was trained with")
        tok = load_tokenizer(own)
        check_model_tokenizer(tok, own, cfg.init_from)
        return tok
    cached = tokenizer_cache_dir(dcfg, cfg.tokenizer_min_freq, cfg.tokenizer_max_vocab)
    if dcfg.use_cache and (cached / "tokenizer.json").is_file():
        return load_tokenizer(cached)

    texts = prepare(dcfg, None).train
    tok = CodeTokenizer.train(progress_bar(texts, desc="train tokenizer", unit="text",
                                           enabled=dcfg.progress),
                              min_freq=cfg.tokenizer_min_freq, max_vocab=cfg.tokenizer_max_vocab)
    if dcfg.use_cache:  # the first complete entry stays: another run may be loading it
        with contextlib.suppress(OSError):  # a read-only cache: the tokenizer is used uncached
            publish_cache_entry(cached, tok.save)
    return tok


def build_model(cfg: TrainConfig, tok: CodeTokenizer | BPETokenizer,
                run_dir: Path | None = None) -> nn.Module:
    """From scratch or from ``init_from``; then the quantized base and LoRA if asked for.
    ``run_dir``: a run continued, whose copy of its init_adapter's config gives the LoRA layout."""
    base_dtype = SHORT_DTYPES[cfg.base_dtype]
    if cfg.init_from is not None:
        model = pretrained.load(cfg.init_from, dtype=base_dtype, device="cpu")
        if tok.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model at "
                             f"{cfg.init_from} only {model.cfg.vocab_size} embeddings")
        if cfg.dropout is not None:  # embeddings and residual branches, as from scratch
            model.cfg.dropout = model.cfg.embd_dropout = cfg.dropout
        for key, value in cfg.model_options.items():  # LOADED_MODEL_OPTIONS: read live
            setattr(model.cfg, key, value)
    else:
        model = Transformer(model_config(cfg, tok.vocab_size, tok.bos_id, tok.eos_id))
        model.to(base_dtype)
    if cfg.lora_r > 0:
        if cfg.quantize_bits:
            lora.quantize_base(model, bits=cfg.quantize_bits)
        copy = rundir.adapter_copy(run_dir) if run_dir is not None else None
        if cfg.init_adapter is not None and copy is not None:  # the weights: the run's own
            lora.apply_adapter_layout(model, copy.parent, copy.name)
        elif cfg.init_adapter is not None:  # its own config (with_init_adapter read it)
            if changed := lora.changed_base_tensors(model, cfg.init_adapter):
                raise ValueError(
                    f"init_adapter {cfg.init_adapter}: its {changed[0]} (of {len(changed)}) "
                    f"differs from the base's, {cfg.init_from}; a resume and the export would lose "
                    "it: save the merged base (PEFT: unload().save_pretrained), use --init-from")
            lora.load_adapter(model, cfg.init_adapter)
        else:
            lora.apply_lora(model, lora.LoRAConfig(**{  # no lora_targets: LoRAConfig's default
                name: getattr(cfg, key) for name, key in ADAPTER_KEYS.items()
                if key != "lora_targets" or cfg.lora_targets}))
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model
