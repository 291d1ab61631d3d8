"""A run's parts, each built through the module of its kind: its tokenizer (given, the pretrained
model's, or trained on the data), its model (from scratch or from ``init_from``, then the
quantized base and LoRA), and for ``trainingmanager.train`` the whole run (``Run``, built by its
constructor in its claimed directory): data, model and trainer built, a continued run restored,
a budgeted run sized to its budget. The constructor is where a run's TrainConfig is taken
apart: each part gets the settings it reads of it (codelm.trainconfig's *Settings)."""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset

import lora
from architecture import Transformer
from codelm import loading
from codelm.data.cache import make_cache_dir
from codelm.data.config import PREFERENCE_TASKS, DataConfig, TokenizerTraining
from codelm.data.datasets import LabelBytes, PreparedData
from codelm.data.examples import SamplePrompt
from codelm.data.shards import describe_corpus
from codelm.data.splits import corpus_key, lopsided_note
from codelm.gguf import writer
from codelm.models import adapter_config, quantize
from codelm.runs import checkpoint, rundir
from codelm.runs.checkpoint import (
    PATH_KEYS,
    RunState,
    with_absolute_paths,
)
from codelm.runtime import process, settings
from codelm.runtime.distributed import Dist, all_gather, barrier, broadcast, main_first
from codelm.runtime.rng import rank_seed, rng_state, seed_everything, set_rng_state
from codelm.runtime.settings import fields_of, setting
from codelm.tokenization.bpe import BPETokenizer
from codelm.tokenization.files import TOKENIZER_FILE, tokenizer_path
from codelm.trainconfig import (
    GRPO_TASK,
    DataSettings,
    ExportSettings,
    GRPOSettings,
    LoopSettings,
    ModelSettings,
    StepSettings,
    TrainConfig,
    data_config,
    default_block_size,
    model_config,
)
from codelm.training import budget, plan, preference, preference_run, rollout
from codelm.training.batches import Batches, Where, example_lengths
from codelm.training.budget import MAX_EPOCHS, BudgetClock
from codelm.training.plan import Probe
from codelm.training.record import RunRecord
from codelm.training.trainer import StepFigures, Trainer, autocast, checked_precision
from dataset import prepare, trained_tokenizer
from tokenizer import (
    CodeTokenizer,
    check_model_tokenizer,
    load_tokenizer,
    same_vocabulary,
    where_tokenizer_is,
)


def check_lora_export(cfg: TrainConfig, model: nn.Module,
                      where_set: Callable[[str], str] = settings.flag_of) -> None:
    """Refuse, before training, an export that would merge a LoRA into a tied weight (a
    merged model, or GGUF's, which is written from the merged weights)."""
    merging = "export_merged" if cfg.export_merged else "export_gguf"
    if not (cfg.export and cfg.lora_r > 0 and (cfg.export_merged or cfg.export_gguf)):
        return
    tied = lora.tied_targets(model)
    if not tied:
        return
    path, names = next(iter(tied.items()))
    off = (settings.off_switch(merging, where_set) if merging == "export_merged" else
           "export_gguf none")
    raise ValueError(f"{setting(cfg, merging, where_set)}: the LoRA target {path} "
                     f"({setting(cfg, 'lora_targets', where_set)}) is tied to {names}, so it "
                     f"cannot be merged: drop it from lora_targets, or train with {off}")


def check_gguf_export(cfg: TrainConfig, model: nn.Module, tok: CodeTokenizer | BPETokenizer,
                      where_set: Callable[[str], str] = settings.flag_of) -> None:
    """Refuse, before training, an export_gguf of a model or tokenizer llama.cpp cannot run
    (plan refuses what the checkpoint's config already shows, before the data)."""
    if cfg.export_gguf is None:
        return
    try:
        writer.check_exportable(model, tok)
    except ValueError as e:
        raise ValueError(f"{setting(cfg, 'export_gguf', where_set)}: {e}; or set export_gguf "
                         "none") from None


def load_or_train_tokenizer(cfg: TrainConfig | DataSettings, dcfg: DataConfig,
                            saved: Path | None = None) -> CodeTokenizer | BPETokenizer:
    """The run's ``saved`` tokenizer, the given one, the pretrained model's, or one trained (and
    cached) on the data."""
    if saved is not None:
        return load_tokenizer(saved)
    model_tok_file = Path(cfg.init_from) / TOKENIZER_FILE if cfg.init_from is not None else None
    if cfg.tokenizer is not None:
        tok = load_tokenizer(cfg.tokenizer)
        has_model_tok = model_tok_file is not None and model_tok_file.is_file()
        if has_model_tok and not same_vocabulary(tok, load_tokenizer(model_tok_file)):
            print(f"warning: --tokenizer {cfg.tokenizer} differs from {model_tok_file}, the one "
                  f"--init-from {cfg.init_from} was trained with", file=sys.stderr)
        if cfg.init_from is not None:
            check_model_tokenizer(tok, tokenizer_path(cfg.tokenizer), cfg.init_from)
        return tok
    if model_tok_file is not None:
        if not model_tok_file.is_file():
            raise ValueError(f"--init-from {cfg.init_from}: no {TOKENIZER_FILE} in it"
                             f"{where_tokenizer_is(cfg.init_from)}; pass --tokenizer with the "
                             "tokenizer the checkpoint was trained with")
        tok = load_tokenizer(model_tok_file)
        check_model_tokenizer(tok, model_tok_file, cfg.init_from)
        return tok
    return trained_tokenizer(dcfg, TokenizerTraining(**fields_of(TokenizerTraining, cfg)))


# ---- The run: its directory claimed, then data, model and trainer, restored if continued ----

class Data(NamedTuple):
    """A run's tokenizer and batches, and what its checkpoints record of the data."""

    tok: CodeTokenizer | BPETokenizer
    dcfg: DataConfig
    batches: Batches
    sample_prompt: SamplePrompt | None  # the held-out one data preparation picked
    data_id: dict
    new_tokenizer: bool  # not the run's own: the run saves it in its directory


class UnreadStep(NamedTuple):
    """A step of the run whose figures the loop has not read back from the device."""

    step: int
    where: Where  # its data
    figures: StepFigures


class Run:
    """A training run as the step loop drives it, built by its constructor from its
    TrainConfig: the one place the run's config is taken apart. Each part holds what it reads
    of it: the loop ``loop``, the export ``export``, the model ``model_settings``, the trainer
    and the data theirs; config.json, the whole config as the run trains with it (sized to the
    budget, fallbacks filled), is the record's."""

    device: torch.device
    data: Data
    model_settings: ModelSettings  # as the model was built (finish rebuilds a sharded one)
    trainer: Trainer
    record: RunRecord
    state: RunState  # the step loop's own (a checkpoint's, continued); max_steps: the run's length
    clock: BudgetClock | None  # a new budgeted run's: its decay starts by the clock
    loop: LoopSettings
    export: ExportSettings
    unread: list[UnreadStep]  # the loop reads them back at its own steps (_settle)

    def __init__(self, cfg: TrainConfig, claimed: rundir.ClaimedDir, dist: Dist,
                 device: torch.device, created: float, hint: str | None, restarts: bool,
                 where_set: Callable[[str], str] = settings.flag_of) -> None:
        """Build the run in its ``claimed`` directory (``created``: when the time budget
        started; ``where_set``: where a setting is set, as the run's warnings name it); a
        failed or stopped build releases it, leaving no directory it made."""
        try:
            self._build(cfg, claimed, dist, device, created, hint or f"--resume {claimed.path}",
                        restarts, where_set)
        except BaseException as e:
            claimed.drop_if_unused()
            claimed.release()
            if isinstance(e, KeyboardInterrupt) and not isinstance(e, rundir.RunInterrupted):
                raise rundir.interrupted(e, claimed.path, hint, restarts) from None
            raise

    def _build(self, cfg: TrainConfig, claimed: rundir.ClaimedDir, dist: Dist,
               device: torch.device, created: float, hint: str, restarts: bool,
               where_set: Callable[[str], str]) -> None:
        run_dir = claimed.path
        cfg, checkpoints = run_config(cfg, claimed, hint)
        if cfg.strategy == "fsdp" and cfg.optimizer == "muon":  # preset auto's choice
            raise ValueError(f"optimizer muon (preset {cfg.preset}'s) with "
                             f"{setting(cfg, 'strategy')}: muon orthogonalizes whole matrices, "
                             "fsdp holds shards: set --optimizer adamw")
        if cfg.resume and not checkpoints and dist.main:
            print(f"{run_dir}: no checkpoint yet; starting the run from the beginning")
        data_settings = DataSettings(**fields_of(
            DataSettings, cfg, run_dir=run_dir,
            own_tokenizer=bool(cfg.resume) and claimed.holds_weights))
        with main_first(dist):  # the others read the run's own tokenizer, or rank 0's just saved
            self.data = prepare_data(data_settings, dist)
            if self.data.new_tokenizer and dist.main:  # once the data is known good
                claimed.wrote_tokenizer = True
                self.data.tok.save(run_dir)
        seed_everything(cfg.seed)  # right before the init: whatever the data's preparation drew
        # Continued from a checkpoint, an init_adapter run reads its LoRA layout from its own copy.
        model_settings = ModelSettings(**fields_of(
            ModelSettings, cfg, adapter_copy=rundir.adapter_copy(run_dir) if checkpoints else None))
        if cfg.task in PREFERENCE_TASKS:
            model_settings = preference_run.without_dropout(model_settings)
        self.model_settings = model_settings
        model = loading.build_model(model_settings, self.data.tok)
        files_before_config = self._check_model(cfg, model, run_dir, device,
                                                bool(checkpoints))
        if dist.enabled:  # same init everywhere, but each rank its own dropout stream
            seed_everything(rank_seed(cfg.seed, dist.rank))
        cfg, self.clock, length = self._size(cfg, model, device, dist, created)
        self.state = RunState(precision=checked_precision(cfg, device), max_steps=length,
                              data=self.data.data_id)
        self.trainer = self._trainer(cfg, model, device, dist)
        trainable_only = cfg.lora_r > 0 and cfg.init_from is not None
        self.record = RunRecord(claimed, dist, trainable_only, cfg.keep_last, hint, restarts)
        if checkpoints:
            self.state = restore(cfg, checkpoints, self.trainer, self.data, self.record)
        with main_first(dist):
            # first: a damaged log refuses the resume before any rewrite
            if dist.main and cfg.resume:
                rundir.trim_metrics(run_dir / rundir.METRICS_FILE, self.state.step,
                                    self.state.last_eval_step)
            self.record.write_config(cfg, files_before_config)
        if checkpoints:
            self.record.best_as_checkpointed(self.state, self.trainer.raw_model)
        self.device = device
        self.loop = LoopSettings(**fields_of(LoopSettings, cfg))
        self.unread = []
        self.export = ExportSettings(**fields_of(ExportSettings, cfg))
        if dist.main:
            announce(self, cfg, where_set)
        # a resume with no checkpoint yet starts anew: so do its log and tracker runs
        self.record.open_log(self.state.step if checkpoints else None, cfg.report_to)

    def _check_model(self, cfg: TrainConfig, model: nn.Module, run_dir: Path,
                     device: torch.device, continued: bool) -> dict[Path, bytes]:
        """Refuse what the model cannot export, and attach a preference task's reference
        log-probs of the starting weights. Returns the files to write before config.json."""
        files_before_config = {}  # atomic, before config.json: a kill mid-write leaves a run
        #   that goes on
        if cfg.init_adapter is not None and self.model_settings.adapter_copy is None:
            files_before_config[run_dir / rundir.INIT_ADAPTER_COPY] = (
                Path(cfg.init_adapter) / adapter_config.ADAPTER_CONFIG).read_bytes()
            note = adapter_config.other_base_note(cfg.init_adapter, cfg.init_from)
            if note and process.is_rank_zero():
                print(f"note: {note}: the adapter trains on {cfg.init_from}, as given",
                      file=sys.stderr)
        check_lora_export(cfg, model)
        check_gguf_export(cfg, model, self.data.tok)
        if cfg.task in PREFERENCE_TASKS:  # of the starting weights, before any step
            files_before_config.update(preference_run.attach_reference(
                cfg, model.to(device), self.data.batches, run_dir, device, continued))
        return files_before_config

    def _size(self, cfg: TrainConfig, model: nn.Module, device: torch.device, dist: Dist,
              created: float) -> tuple[TrainConfig, BudgetClock | None, int]:
        """The step's cost checked; ``cfg`` sized to its time budget (a new budgeted run, once)
        and given its warmup; its clock, and the run's length in steps."""
        batches = self.data.batches
        budgeted = cfg.max_steps is None and cfg.epochs is None
        if cfg.task != GRPO_TASK:  # a GRPO step's cost is its sampling's, set by its completions
            rows = 2 * cfg.batch_size if cfg.task in PREFERENCE_TASKS else cfg.batch_size  # a pair
            check_step_cost(dataclasses.replace(cfg, batch_size=rows), model,
                            self.data.dcfg.block_size, device, dist,
                            budget_left(cfg, created) if budgeted else None)
        clock = None
        if budgeted:  # a new run on a budget: sized here, once
            cfg, clock = size_to_budget(cfg, model, batches, device, dist, created)
        length = plan.run_length(cfg, batches.steps_for)
        if cfg.warmup_steps is None:  # a new run of fixed length: sized with its steps, known here
            cfg = with_warmup(cfg, length, dist.main)
        return cfg, clock, length

    def _trainer(self, cfg: TrainConfig, model: nn.Module, device: torch.device, dist: Dist
                 ) -> Trainer:
        """The task's trainer of ``model``: GRPO's, a preference task's, or the next-token one."""
        data = self.data
        if cfg.task != GRPO_TASK:
            return task_trainer(cfg, model, device, dist, LabelBytes(data.tok, device),
                                self.state)
        step_settings = StepSettings(**fields_of(StepSettings, cfg))
        grpo_settings = GRPOSettings(**fields_of(GRPOSettings, cfg))
        return rollout.GRPOTrainer(model, step_settings, grpo_settings, device, data.tok,
                                   data.dcfg.pair_special_tokens,
                                   data.batches.train + data.batches.val, dist, self.state)


def with_warmup(cfg: TrainConfig, steps: int, main: bool) -> TrainConfig:
    """``cfg`` with the warmup of a run of ``steps`` steps (plan.warmup_for), said where a short
    run scales it; config.json records it, so a resume keeps it whatever its length."""
    warmup = plan.warmup_for(steps)
    if warmup < plan.LONG_RUN_WARMUP and main:
        long_run = round(plan.LONG_RUN_WARMUP / plan.SHORT_RUN_WARMUP_SHARE)
        print(f"warmup_steps {warmup}: {plan.SHORT_RUN_WARMUP_SHARE:.0%} of the run's {steps} "
              f"steps (a run of {long_run} steps or more warms up over {plan.LONG_RUN_WARMUP}; "
              "--warmup-steps sets it)")
    return dataclasses.replace(cfg, warmup_steps=warmup)


def run_config(cfg: TrainConfig, claimed: rundir.ClaimedDir, hint: str
               ) -> tuple[TrainConfig, list[Path]]:
    """The settings a run trains with in its directory, and the checkpoints it continues from.
    A new run (or one that stopped before its first checkpoint) fills what it leaves unset and
    saves its paths absolute; a continued one keeps its own settings (and paths)."""
    checkpoints = claimed.checkpoints if cfg.resume else []
    if not checkpoints:
        if cfg.resume and claimed.holds_weights:
            raise ValueError(f"--resume {claimed.path}: it "
                             f"{rundir.holds_no_checkpoint(claimed.path)}")
        cfg = plan.with_fallbacks(cfg)
        return with_absolute_paths(cfg), []
    saved = checkpoint.check_resume_config(cfg, claimed.path, checkpoints, hint)
    if saved is None:
        return with_absolute_paths(cfg), checkpoints
    kept = {key: value for key, value in saved.items()
            if key in PATH_KEYS or checkpoint.unset(key, getattr(cfg, key, None))}
    return dataclasses.replace(cfg, **kept), checkpoints


def prepare_data(settings: DataSettings, dist: Dist) -> Data:
    """Tokenizer and batches (rank 0 fills the caches: called rank 0 first, it leaves the
    others to read them); a continued run (``settings.own_tokenizer``) reads the tokenizer it
    saved, and another rank the one rank 0 saved."""
    if settings.task == GRPO_TASK:
        return prepare_problems(settings)
    if settings.task in PREFERENCE_TASKS:
        return prepare_preference_data(settings, dist)
    dcfg = data_config(settings, settings.block_size or default_block_size(settings))
    if dcfg.use_cache:
        make_cache_dir(dcfg.cache_dir, "data_options.cache_dir"
                       if "cache_dir" in settings.data_options else None)
    saved_tok = settings.run_dir / TOKENIZER_FILE
    own_tok = settings.own_tokenizer and saved_tok.is_file()
    # rank 0 loads or trains the tokenizer and saves it (it runs first); the others read its copy
    reads_saved = own_tok or not dist.main
    tok = load_or_train_tokenizer(settings, dcfg, saved_tok if reads_saved else None)
    splits = prepare(dcfg, tok)
    if dist.main:
        print(f"data: {describe_corpus(splits.stats['corpus'])}")
    if len(splits.val) == 0 and not settings.overfit_batches:  # that validates on its batches
        raise ValueError(f"the validation split of {dcfg.sources} is empty: give validation "
                         "files with --val-data, add data, or raise val_frac of data_options "
                         "(--data-options)")
    if dist.main:
        for note in split_notes(settings, dcfg, splits):
            print(f"note: {note}", file=sys.stderr)
    data_id = {"entry": splits.cache_path.name if splits.cache_path else None,
               "train_examples": len(splits.train), "corpus": corpus_key(dcfg)}
    if settings.task == "lm" and settings.packing:  # files_apart's rule: bump when it changes
        data_id["files_apart"] = 2
    batches = example_batches(settings, splits, tok, dcfg.block_size, dist)
    return Data(tok=tok, dcfg=dcfg, batches=batches, sample_prompt=splits.sample_prompt,
                data_id=data_id, new_tokenizer=not own_tok)


def split_notes(settings: DataSettings, dcfg: DataConfig, splits: PreparedData) -> list[str]:
    """What a user should know of the splits the data gave: a train split far smaller than
    train_frac (a corpus of a few files or repositories), a test split without the task's
    examples, a test split --data still holds out beside --val-data."""
    notes = []
    by_fraction = not (settings.val_data or settings.test_data or settings.overfit_batches)
    if by_fraction and (lopsided := lopsided_note(splits.stats["corpus"], dcfg)):
        notes.append(lopsided)
    if len(splits.test) == 0 and (dcfg.test_frac > 0 or settings.test_data):
        notes.append(f"the test split holds no {settings.task} examples (its files have none): "
                     "eval.py finds none there; score the run with --split val, or give more data")
    if settings.val_data and not settings.test_data and len(splits.test):
        whole = round(dcfg.train_frac + dcfg.test_frac, 6)
        notes.append(f"--data still holds out test_frac {dcfg.test_frac:g} as the test split; "
                     f"--data-options '{{\"train_frac\": {whole:g}, \"test_frac\": 0}}' trains "
                     "on all of it")
    return notes


def example_batches(settings: DataSettings, splits: PreparedData,
                    tok: CodeTokenizer | BPETokenizer, block_size: int, dist: Dist) -> Batches:
    """The batches of the examples of ``splits`` (``overfit_batches``: K fixed ones), packed
    where that is asked for or pays."""
    train_set, val_set = splits.train, splits.val
    if settings.overfit_batches:  # K fixed global batches; validation is the same examples
        generator = torch.Generator().manual_seed(settings.seed)
        n = settings.overfit_batches * settings.batch_size * settings.grad_accum * dist.world
        chosen = torch.randperm(len(train_set), generator=generator)[:n].tolist()
        train_set = val_set = Subset(train_set, chosen)
    task = settings.task
    lm_packing = bool(settings.packing) and task == "lm"  # the windows are full rows: files apart
    # overfit_batches: K batches of batch_size examples each, as asked (packed, fewer rows)
    packing = (task != "lm" and not settings.overfit_batches
               and packing_pays(settings.packing, train_set, block_size))
    batches = Batches(train_set, val_set, tok.pad_id, settings.batch_size, settings.grad_accum,
                      settings.seed, settings.eval_examples, dist.rank, dist.world,
                      pack_into=block_size if packing else None,
                      files_apart=tok.eos_id if lm_packing else None)
    if packing and dist.main:
        print(f"packing: {len(train_set)} training examples in {len(batches.train)} rows of "
              f"{block_size} tokens ({len(train_set) / len(batches.train):.1f} a row; "
              "--no-packing pads each in its batch)")
    elif task != "lm" and dist.main:
        why = ("overfit_batches: each batch holds --batch-size examples" if
               settings.overfit_batches else "--packing packs them")
        print(f"packing: off: the {len(train_set)} training examples padded in their batches "
              f"({why})")
    return batches


def prepare_problems(settings: DataSettings) -> Data:
    """Task grpo's tokenizer (given, the model's, or the run's own) and problems (checked:
    rollout.problem_batches); one process."""
    saved_tok = settings.run_dir / TOKENIZER_FILE
    own_tok = settings.own_tokenizer and saved_tok.is_file()
    if not own_tok and settings.tokenizer is None and settings.init_from is None:
        raise ValueError(f"{setting(settings, 'task')}: samples from a model that writes code: "
                         "set init_from (--init-from: a pretrained or fine-tuned model), or "
                         "tokenizer (--tokenizer) for a model from scratch")
    dcfg = DataConfig(task="completion", sources=[settings.problems],
                      block_size=settings.block_size or default_block_size(settings),
                      **{"progress": settings.progress, **settings.data_options})
    tok = load_or_train_tokenizer(settings, dcfg, saved_tok if own_tok else None)
    batches = rollout.problem_batches(settings)
    sample = SamplePrompt(batches.val[0]["prompt"], True)
    return Data(tok=tok, dcfg=dcfg, batches=batches, sample_prompt=sample,
                data_id=rollout.data_id(batches), new_tokenizer=not own_tok)


def prepare_preference_data(settings: DataSettings, dist: Dist) -> Data:
    """A preference task's tokenizer (the given one, or the model's) and batches of its
    records (preference_run.prepare)."""
    saved_tok = settings.run_dir / TOKENIZER_FILE
    own_tok = settings.own_tokenizer and saved_tok.is_file()
    tok = load_or_train_tokenizer(settings, DataConfig(), saved_tok if own_tok else None)
    block_size = settings.block_size or default_block_size(settings)
    prepared = preference_run.prepare(settings, tok, block_size, dist)
    return Data(tok=tok, dcfg=prepared.dcfg, batches=prepared.batches,
                sample_prompt=prepared.sample_prompt, data_id=prepared.data_id,
                new_tokenizer=not own_tok)


def task_trainer(cfg: TrainConfig, model: nn.Module, device: torch.device, dist: Dist,
                 label_bytes: LabelBytes | None, state: RunState) -> Trainer:
    """The trainer of ``cfg.task`` (not grpo): a preference task's loss, or the next-token
    loss."""
    step_settings = StepSettings(**fields_of(StepSettings, cfg))
    if cfg.task in PREFERENCE_TASKS:
        return preference_run.PreferenceTrainer(model, step_settings, preference.config_of(cfg),
                                                device, dist, label_bytes, state)
    return Trainer(model, step_settings, device, dist, label_bytes, state)


def packing_pays(packing: bool | None, examples: Dataset, block_size: int) -> bool:
    """Whether a pair task's examples are packed: as ``packing`` says, or (None) where they
    average at most half a row, so that a row holds two or more."""
    if packing is not None:
        return packing
    lengths = example_lengths(examples)
    return sum(lengths) <= len(lengths) * block_size / 2


def budget_left(cfg: TrainConfig, created: float) -> float:
    """Seconds left of the time budget that started at ``created``."""
    return cfg.time_budget_min * 60 - (time.perf_counter() - created)


def measure_speed(cfg: TrainConfig, device: torch.device, dist: Dist) -> Probe:
    """``cfg``'s model size and training speed here, on random tokens (rank 0's, for all):
    preset auto's measure of the machine."""
    vocab = budget.probe_vocab(cfg)
    model = Transformer(model_config(cfg, vocab, None, None))
    step_settings = StepSettings(**fields_of(StepSettings, cfg, warmup_steps=0, compile=False))
    trainer = Trainer(model, step_settings, device, state=RunState(max_steps=10**9))
    ids = torch.randint(vocab, (cfg.batch_size, cfg.block_size + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    step_s = budget.seconds_a_step(lambda: trainer.train_step([batch] * cfg.grad_accum).read(),
                                   plan.RUNG_TIMING_S)
    tokens = cfg.batch_size * cfg.grad_accum * cfg.block_size * dist.world
    params = sum(p.numel() for p in model.parameters())
    return broadcast(Probe(params, tokens / step_s), dist)


def measure_step_cost(cfg: TrainConfig, device: torch.device, dist: Dist) -> budget.StepMeasure:
    """A step of ``cfg``'s model here before any is timed (budget.step_cost: short sequences,
    scaled), and the memory free (rank 0's, for all): preset auto's check of its first rung."""
    free = process.free_memory(device)  # before this model takes its share
    model = Transformer(model_config(cfg, budget.probe_vocab(cfg), None, None)).to(device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.offload_activations = cfg.offload_activations
    cost = budget.step_cost(model, cfg.block_size, cfg.batch_size, cfg.grad_accum, device,
                            partial(autocast, device, checked_precision(cfg, device)))
    return broadcast(budget.StepMeasure(cost, free), dist)


def check_step_cost(cfg: TrainConfig, model: nn.Module, block_size: int, device: torch.device,
                    dist: Dist, seconds_left: float | None) -> None:
    """Before the first step: refuse one that cannot fit the memory free (on the fullest
    device) or the time budget (``seconds_left``), measured twice before it is refused (the
    faster counts), and name one that takes long (rank 0's measures, for all: every process
    refuses alike)."""
    precision = checked_precision(cfg, device)
    model = model.to(device)

    def measured() -> budget.StepCost:
        return broadcast(budget.step_cost(model, block_size, cfg.batch_size, cfg.grad_accum,
                                          device, partial(autocast, device, precision)), dist)

    cost = measured()
    free = min(all_gather(process.free_memory(device), dist))  # the fullest device's
    seconds_left = broadcast(seconds_left, dist)
    if budget.step_refusal(cost, free, seconds_left) is not None:  # a passing load must not refuse
        again = measured()
        cost = budget.StepCost(cost.activation_bytes, min(cost.seconds, again.seconds))
    warning = budget.check_step_cost(cfg, cost, block_size, free, seconds_left)
    if warning and dist.main:
        print(warning, file=sys.stderr)


def size_to_budget(cfg: TrainConfig, model: nn.Module, batches: Batches, device: torch.device,
                   dist: Dist, created: float) -> tuple[TrainConfig, BudgetClock | None]:
    """``cfg`` with max_steps, eval_every and warmup_steps filling what is left of its time
    budget on this machine (budget.fit_budget), in place of the budget: config.json then
    reproduces the run. The decay's start is kept by the clock."""
    step_s, eval_s = broadcast(time_a_step(cfg, model, batches, device, dist), dist)
    left = broadcast(budget_left(cfg, created), dist)  # one plan for every process
    fitted = budget.fit_budget(cfg, time.perf_counter(), left, step_s, eval_s,
                               batches.steps_for(MAX_EPOCHS))
    refusal = budget.eval_refusal(fitted.train_s, eval_s, step_s)
    if refusal is not None and not cfg.force:
        raise ValueError(f"{refusal}; or --force to train it anyway")
    if refusal is not None and dist.main:
        print(f"warning: {refusal}; training it anyway (--force)", file=sys.stderr)
    sized = fitted.cfg
    if dist.main:
        end = "the decay starts by the clock and is timed then"
        if fitted.data_bound:
            end = (f"{MAX_EPOCHS} epochs of the training data end the run before its budget "
                   f"(more data, --data, would use the rest), unless the machine slows: then "
                   f"{end}")
        if fitted.evaluations < min(budget.EVALS_IN_BUDGET, sized.max_steps):
            which = ("one evaluation, at the end" if fitted.evaluations == 1
                     else f"{fitted.evaluations} evaluations, the last at the end")
            end = (f"{which}: {budget.EVALS_IN_BUDGET} would take over {budget.EVAL_SHARE:.0%} of "
                   f"the training time; {end}")
        every = f"eval_every {sized.eval_every}"
        if sized.eval_every > sized.max_steps:  # none before the end, however the clock goes
            every = "evaluation at the end only"
        print(f"time budget {cfg.time_budget_min:g} min, {left:.0f} s left after setup: "
              f"{step_s:.3f} s a step, {eval_s:.1f} s an evaluation on {device.type} -> "
              f"max_steps {sized.max_steps}, {every}, warmup_steps "
              f"{sized.warmup_steps}, decay_steps {sized.decay_steps} (recorded in config.json; "
              f"{end})")
    return sized, fitted.clock


def time_a_step(cfg: TrainConfig, model: nn.Module, batches: Batches, device: torch.device,
                dist: Dist) -> tuple[float, float]:
    """Seconds a step and a whole evaluation take, timed on a copy of the model after three
    warm-up steps (and one evaluated batch); the RNG state is restored, so the run draws what it
    would have drawn."""
    saved = rng_state(device)
    probe = task_trainer(dataclasses.replace(cfg, warmup_steps=0), copy.deepcopy(model), device,
                         dist, None, RunState(max_steps=10**9))
    own = copy.copy(batches)  # an order of its own: the run's starts at its beginning
    own.order = copy.deepcopy(batches.order)

    def step() -> None:  # read back: the step's device work is timed too
        micro_batches, _ = own.next_step()
        probe.train_step(micro_batches).read()

    step_s = budget.seconds_a_step(step, min(10.0, cfg.time_budget_min),
                                   partial(broadcast, dist=dist))
    val, n = own.validation()
    first = next(val, None)  # a process may hold no validation batch
    batch = [] if first is None else [first]
    probe.evaluate(batch, total=len(batch))  # warm-up: a compiled model compiles its evaluation
    start = time.perf_counter()
    probe.evaluate(batch, total=len(batch))
    eval_s = (time.perf_counter() - start) * n
    set_rng_state(saved, device)
    return step_s, eval_s


def restore(cfg: TrainConfig, checkpoints: list[Path], trainer: Trainer, data: Data,
            record: RunRecord) -> RunState:
    """Continue from the newest readable of ``checkpoints`` (the broken are set aside): weights,
    optimizer, RNG, data position; the run's state there."""
    dist = record.dist
    restored = []

    def load(path: Path) -> None:
        restored.append(restore_checkpoint(cfg, path, trainer, data, record))

    broken = checkpoint.restore_latest(checkpoints, load, dist.main)
    barrier(dist)  # every rank has read its checkpoint before the broken are moved
    if dist.main:
        checkpoint.set_aside(broken)
    return restored[-1]


def restore_checkpoint(cfg: TrainConfig, path: Path, trainer: Trainer, data: Data,
                       record: RunRecord) -> RunState:
    """Continue from checkpoint ``path``: weights, optimizer, RNG, data position, progress."""
    dist, device = record.dist, trainer.device
    if trainer.sharded and not checkpoint.is_sharded(path):
        raise ValueError(f"{path} is a whole checkpoint (one process's or --strategy ddp's): "
                         "continue it with --strategy ddp; --strategy fsdp continues sharded "
                         "ones")
    if checkpoint.is_sharded(path):  # the model and the optimizer's moments, from their shards
        state = checkpoint.load_sharded(path, trainer.raw_model, trainer.optimizer,
                                        record.trainable_only, dist)
    else:
        state = checkpoint.load(path, trainer.raw_model, record.trainable_only)
    continues = checkpoint.check_writers(path, len(state.rng), dist.world,
                                         cfg.batch_size * cfg.grad_accum)
    checkpoint.check_precision(path, state.precision, trainer.precision, cfg.precision, device)
    trainer.load_state_dict(state)
    data.batches.order.load_state_dict(state.order)
    if continues:
        set_rng_state(state.rng[dist.rank], device)
    elif dist.main:
        print(f"note: {path.name} was written by {len(state.rng)} process(es), this run has "
              f"{dist.world}: each process's random streams (dropout) start from the seed, so "
              "this resume is not bit-exact")
    planned, trained_on = state.max_steps, state.data
    steps = trainer.run_state.max_steps  # the run's length: its settings', not the checkpoint's
    state = dataclasses.replace(state, max_steps=steps, data=data.data_id, optimizer={},
                                scheduler={}, scaler={}, rng=[], weights={})
    trainer.run_state = state  # the schedule follows the continued run
    record.last_saved_step = state.step
    record.resumed_from = path
    if state.step > steps:  # validate_config checks max_steps; epochs needs the data
        raise ValueError(f"{setting(cfg, 'epochs')}: {steps} step(s), below the step of the "
                         f"checkpoint it resumes from ({state.step}): set a larger epochs")
    if dist.main:
        print(f"resumed {record.run_dir} from {path.name} (step {state.step})")
        if state.step == steps:
            exported = "; its export is written again" if cfg.export else ""
            length = "--epochs" if cfg.epochs is not None else "--max-steps"
            print(f"note: the run had trained its {steps} steps: nothing is trained{exported} "
                  f"(a larger {length} trains on)")
        if planned != steps:
            print(f"note: the run planned {planned} steps and now runs {steps}: its "
                  f"learning-rate schedule is planned anew over {steps} steps from step "
                  f"{state.step} on")
        checkpoint.note_other_data(record.run_dir.name, trained_on, data.data_id)
    return state


def adapters_on(cfg: TrainConfig, adapted: list[str]) -> str:
    """A LoRA run's adapters (``adapted``: the paths of the modules they adapt) and the form of
    the frozen base they train on, for its first line: ", LoRA r 8 in 24 modules (qkv, proj) on
    an NF4 base"; nothing for a run that trains every weight."""
    if cfg.lora_r == 0:
        return ""
    kind = "DoRA" if cfg.lora_dora else "LoRA"
    names = []  # the modules' own names, each once, in the model's order
    for path in adapted:
        name = path.rsplit(".", 1)[-1]
        if name not in names:
            names.append(name)
    modules = f"{len(adapted)} module{'s' if len(adapted) != 1 else ''} ({', '.join(names)})"
    base = quantize.base_form(cfg.quantize_bits, cfg.base_dtype)
    return f", {kind} r {cfg.lora_r} in {modules} on {base}"


# What a task's training example is, as the run's first line counts them.
EXAMPLE_UNITS = {GRPO_TASK: "problems", "kto": "completions",
                 **{task: "pairs" for task in PREFERENCE_TASKS if task != "kto"}}


def announce(run: Run, cfg: TrainConfig, where_set: Callable[[str], str] = settings.flag_of
             ) -> None:
    """The first line of ``run``, and the warnings about its settings (``cfg``: as it trains;
    ``where_set``: where each is set, in the caller's terms)."""
    trainer, batches, planned = run.trainer, run.data.batches, run.state.max_steps
    n_params = quantize.parameter_count(trainer.raw_model)
    n_train = sum(p.numel() for p in trainer.params)
    adapted = [path for path, _ in lora.lora_modules(trainer.raw_model)]
    n = batches.examples_per_epoch
    if batches.windows_at_every_token:
        size = f"{batches.train.n_tokens:,} training tokens"
        epoch = f"{n:,} windows of {run.data.dcfg.block_size} tokens"
    elif batches.unit == "rows":
        size = f"{len(batches.train)} training rows ({len(batches.train.examples)} examples packed)"
        epoch = f"{n} rows"
    else:
        unit = EXAMPLE_UNITS.get(cfg.task, "examples")
        size = f"{len(batches.train)} training {unit}"
        epoch = f"{n} {unit}"
    processes = (f" x {trainer.dist.world} processes ({cfg.strategy})" if trainer.dist.enabled
                 else "")
    print(f"run {run.record.run_dir}: {plan.millions(n_params)} parameters "
          f"({plan.millions(n_train)} trainable){adapters_on(cfg, adapted)}, {size}, {planned} steps "
          f"({batches.epoch(planned):.3g} epochs of {epoch}), {trainer.precision} on "
          f"{run.device}{processes}")
    resumed = cfg.resume is not None  # its warmup_steps are the checkpoint's (RESUME_MAY_CHANGE)
    if cfg.warmup_steps >= planned:
        length = setting(cfg, "max_steps" if cfg.epochs is None else "epochs", where_set)
        fix = (f"give more steps than its warmup_steps {cfg.warmup_steps}" if resumed
               else "lower warmup_steps")
        print(f"warning: {setting(cfg, 'warmup_steps', where_set)} >= the run's {planned} steps "
              f"({length}): the learning rate never reaches lr {cfg.lr:g} (nor decays); {fix}",
              file=sys.stderr)
    if cfg.eval_every < cfg.warmup_steps < planned and run.state.step < cfg.eval_every:
        first = min(math.ceil(cfg.warmup_steps / cfg.eval_every) * cfg.eval_every, planned)
        fix = "raise eval_every" if resumed else "lower warmup_steps or raise eval_every"
        print(f"warning: {setting(cfg, 'eval_every', where_set)} < "
              f"{setting(cfg, 'warmup_steps', where_set)}: no "
              f"evaluation runs during the warmup, so the first is at step {first}; {fix}",
              file=sys.stderr)
    epochs = batches.epoch(planned)
    if epochs > MAX_EPOCHS and not cfg.overfit_batches and run.state.step == 0:
        print(f"note: {planned} steps are {epochs:.3g} epochs of the training data: past about "
              f"{MAX_EPOCHS} the validation loss tends to rise (best/ keeps the best weights; "
              "--early-stop-patience stops there; more data, --data, gives more to learn)",
              file=sys.stderr)
    if cfg.label_smoothing and cfg.task not in PREFERENCE_TASKS:
        print(f"note: {setting(cfg, 'label_smoothing', where_set)}: the train loss is the "
              "smoothed one, above the true loss the val loss reports (compare runs by val "
              "loss)", file=sys.stderr)
    if cfg.compile and run.state.step < planned:  # a finished run resumed trains nothing
        print("compiling the model: the first steps take a while", file=sys.stderr)
    if trainer.precision == "fp16" and run.device.type == "cpu":
        print(f"warning: {setting(cfg, 'precision', where_set)} on cpu computes many times "
              "slower than fp32: set precision auto, fp32 on the CPU", file=sys.stderr)
    if run.state.out_of_patience(cfg.early_stop_patience):  # a resume of an early-stopped run
        print(f"the run stopped early at step {run.state.step}: not trained on; a larger "
              "--early-stop-patience trains on")
