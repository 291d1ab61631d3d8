"""The preference tasks (dpo, kto, orpo, simpo) in the one training loop: their records read,
encoded and batched (``prepare``: codelm.data.preferences, codelm.training.preference_batches),
the reference's log-probs computed once before the first step and kept in the run directory
(``attach_reference``: the LoRA base with its adapters off, or a full fine-tune's starting
weights: no second model in memory), and ``PreferenceTrainer``, whose step and evaluation take
the preference loss (codelm.training.preference) where ``Trainer``'s take the next-token loss.
The loop, checkpoints, records and export are the one run's."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

import lora
from codelm.data.config import DataConfig, DataError
from codelm.data.examples import SamplePrompt
from codelm.data.preferences import (
    Preference,
    PreferenceRecord,
    encodable,
    encode_preferences,
    read_preferences,
    split_records,
)
from codelm.models import adapter_config
from codelm.runtime import distributed
from codelm.runtime.console import progress_bar
from codelm.runtime.distributed import Dist, all_reduce_sum
from codelm.trainconfig import DataSettings, ModelSettings, StepSettings, TrainConfig
from codelm.training import preference
from codelm.training.preference_batches import PreferenceBatches, PreferenceRows
from codelm.training.trainer import (
    LabelBytes,
    StepFigures,
    StepStop,
    Trainer,
    autocast,
    checked_precision,
)
from tokenizer import Tokenizer

REFERENCE_FILE = "reference_logps.pt"  # in the run directory: (n, 2) of each split's rows

# The metrics each method's loss gives (TRL's names), averaged over a step's pairs.
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")
METRICS = {"dpo": PAIR_METRICS, "orpo": (*PAIR_METRICS, "nll_loss", "log_odds_ratio",
                                         "log_odds_chosen"),
           "simpo": (*PAIR_METRICS, "nll_loss"),
           "kto": ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                   "logps/chosen", "logps/rejected")}


class PreferenceData(NamedTuple):
    dcfg: DataConfig  # the data options read (val_frac, seed, skip_bad, max_docs)
    batches: PreferenceBatches
    sample_prompt: SamplePrompt | None  # the first validation prompt (plain records)
    data_id: dict  # what checkpoints record of the data


def prepare(cfg: TrainConfig | DataSettings, tok: Tokenizer, block_size: int, dist: Dist
            ) -> PreferenceData:
    """The run's records (``--data``; validation ``--val-data``, else val_frac of them), encoded
    for ``block_size`` and batched; what was cut is said."""
    dcfg = DataConfig(sources=list(cfg.data), block_size=block_size,
                      **{"progress": cfg.progress, **cfg.data_options})
    dcfg.validate()
    unpaired = cfg.task == "kto"
    skipped: Counter = Counter()

    def read(paths: Sequence[str]) -> list[PreferenceRecord]:
        """``paths``' records; with skip_bad those that encode (counted as skipped else)."""
        records = read_preferences(paths, unpaired, dcfg)
        if dcfg.skip_bad:
            records, dropped = encodable(records, tok, block_size)
            skipped["skipped"] += dropped
        return records

    records = read(cfg.data)
    if cfg.val_data:
        train, val = records, read(cfg.val_data)
    else:
        train, val = split_records(records, dcfg.val_frac, dcfg.seed)
    if unpaired and dist.main:
        balance = kto_balance_note(train, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
        if balance is not None:
            print(f"note: {balance}", file=sys.stderr)
    train_set, events = encode_preferences(train, tok, block_size)
    val_set, val_events = encode_preferences(val, tok, block_size)
    events += val_events + skipped
    if events["completion_truncated"] and dist.main:
        print(f"note: {events['completion_truncated']} completion(s) cut to fit block_size "
              f"{block_size} after their prompt (--block-size)", file=sys.stderr)
    if events["skipped"] and dist.main:
        print(f"skip_bad: {events['skipped']} preference record(s) skipped as encoded for "
              f"block_size {block_size}", file=sys.stderr)
    for split, encoded in (("training", train_set), ("validation", val_set)):
        if not encoded:
            raise DataError(f"no {split} preference records are left once the bad ones are "
                            "skipped (skip_bad)")
    if cfg.overfit_batches:  # K fixed global batches; validation is the same items
        chosen = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))
        n = cfg.overfit_batches * cfg.batch_size * cfg.grad_accum * dist.world
        train_set = val_set = [train_set[i] for i in chosen[:n].tolist()]
    batches = PreferenceBatches(
        PreferenceRows(train_set, block_size, unpaired), PreferenceRows(val_set, block_size,
                                                                        unpaired),
        tok.pad_id, cfg.batch_size, cfg.grad_accum, cfg.seed, cfg.eval_examples, dist.rank,
        dist.world, pack_into=block_size if cfg.packing else None)
    data_id = {"entry": f"{cfg.task}-{digest(train_set)}", "train_examples": len(train_set)}
    return PreferenceData(dcfg, batches, sample_prompt(val), data_id)


# The KTO paper's range of desirable_weight x desirable / (undesirable_weight x undesirable),
# within which TRL's KTOTrainer does not warn.
KTO_BALANCE = (1.0, 4 / 3)


def kto_balance_note(records: Sequence[PreferenceRecord], desirable_weight: float,
                     undesirable_weight: float) -> str | None:
    """What a user should know of KTO training records' labels: one kind missing, or the
    weighted counts outside KTO_BALANCE (the weights that bring them in); None: balanced."""
    desirable = sum(1 for record in records if record.label)
    undesirable = len(records) - desirable
    if not desirable or not undesirable:
        kind = "undesirable (label false)" if not desirable else "desirable (label true)"
        return (f"every training completion is {kind}: KTO learns from both kinds; add "
                "completions of the other (eval.py --preference-pairs writes both where a model "
                "passes some problems' samples and fails others)")
    low, high = KTO_BALANCE
    balance = desirable_weight * desirable / (undesirable_weight * undesirable)
    if low <= balance <= high:
        return None
    desirable_at = undesirable_weight * undesirable / desirable
    undesirable_at = desirable_weight * desirable / undesirable
    return (f"{desirable} desirable and {undesirable} undesirable training completions: the KTO "
            "paper keeps desirable_weight x desirable / (undesirable_weight x undesirable) in "
            f"[1, 4/3], here {balance:.2f}; --kto-desirable-weight in [{desirable_at * low:.2f}, "
            f"{desirable_at * high:.2f}] or --kto-undesirable-weight in "
            f"[{undesirable_at / high:.2f}, {undesirable_at / low:.2f}] brings it there")


def digest(preferences: Sequence[Preference]) -> str:
    """What tells encoded data apart: a hash of its ids and labels."""
    h = hashlib.sha256()
    for p in preferences:
        h.update(repr((p.prompt, p.completions, p.label)).encode())
    return h.hexdigest()[:16]


def sample_prompt(records: Sequence[PreferenceRecord]) -> SamplePrompt | None:
    """The end-of-run sample's prompt: the first plain validation record's."""
    plain = next((r for r in records if not r.conversational), None)
    return None if plain is None else SamplePrompt(plain.prompt, False)


# ---- The reference: its log-probs of every row, once ----

def without_dropout(settings: ModelSettings) -> ModelSettings:
    """The policy's settings with dropout 0 where no setting gives one (the model's own, a
    checkpoint's attention dropout): TRL's preference trainers switch every dropout off
    (disable_dropout), so that the policy's log-probs at the start equal the reference's."""
    dropout = 0.0 if settings.dropout is None else settings.dropout
    options = {"attn_dropout": 0.0, **settings.model_options}
    return dataclasses.replace(settings, dropout=dropout, model_options=options)


def attach_reference(cfg: TrainConfig, model: nn.Module, batches: PreferenceBatches,
                     run_dir: Path, device: torch.device, continued: bool
                     ) -> dict[Path, bytes]:
    """Give each split's rows their reference log-probs (dpo, kto): a continued run's from its
    REFERENCE_FILE, else computed now from ``model`` (its starting weights; under LoRA with its
    adapters off, unless the run starts from an adapter, init_adapter: then with it on, the
    model the run starts from), returned as that file's bytes for the run to write with its
    config; the validation rows' in the precision validation runs in (eval_precision), so that
    a policy equal to its reference validates at a zero margin. Nothing for orpo and simpo,
    which need no reference."""
    if not preference.config_of(cfg).needs_reference:
        return {}
    path = run_dir / REFERENCE_FILE
    data = f"{digest(batches.train.preferences)}-{digest(batches.val.preferences)}"
    if continued and path.is_file():
        saved = saved_reference(path)
        if saved["data"] == data:
            batches.train.set_reference(saved["train"])
            batches.val.set_reference(saved["val"])
            return {}
        print(f"note: {path} holds the reference log-probs of other preference data: computed "
              "again from the starting weights", file=sys.stderr)
    if continued and cfg.init_adapter is not None:  # a resumed model holds its layout alone
        _check_starting_adapter(cfg.init_adapter, path)
        lora.load_adapter_weights(model, cfg.init_adapter)
    precision = checked_precision(cfg, device)
    validated = "fp32" if cfg.eval_precision == "fp32" else precision  # as the trainer validates
    # Before any update a LoRA model is its base (B is zero): switched off where it can be,
    # else (an adapter training base tensors: bias, modules_to_save) scored as it is.
    lora_config = getattr(model, "lora_config", None)
    trains_base = lora_config is not None and (lora_config.bias != "none"
                                               or bool(lora_config.modules_to_save))
    adapters_off = cfg.init_adapter is None and lora_config is not None and not trains_base
    for name, rows, rows_precision in (("train", batches.train, precision),
                                       ("val", batches.val, validated)):
        rows.set_reference(reference_logps(model, rows, batches.collate, cfg.batch_size, device,
                                           rows_precision, adapters_off, cfg.progress, name))
    buffer = io.BytesIO()
    torch.save({"train": batches.train.reference, "val": batches.val.reference, "data": data},
               buffer)
    return {path: buffer.getvalue()}


def _check_starting_adapter(init_adapter: str, path: Path) -> None:
    """Refuse a reference to compute again from the starting adapter where it is gone."""
    if not (Path(init_adapter) / adapter_config.ADAPTER_CONFIG).is_file():
        raise ValueError(f"{path}: the reference log-probs are to be computed again from the "
                         f"model the run started from, and its init_adapter {init_adapter} is "
                         "gone: put it back there, or start a new run")


def saved_reference(path: Path) -> dict:
    """REFERENCE_FILE's splits and the digest of the data they were computed on ("data": None
    where the file names none); a damaged file is refused, naming the fix."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's zip and unpickling errors have no common type
        raise ValueError(f"{path}: not a readable reference log-probs file ({e}); delete it and "
                         "--resume computes it again from the starting weights") from None
    if not isinstance(saved, dict) or not {"train", "val"} <= saved.keys():
        raise ValueError(f"{path}: not a reference log-probs file (no train and val log-probs); "
                         "delete it and --resume computes it again from the starting weights")
    return {"data": None, **saved}


@torch.no_grad()
def reference_logps(model: nn.Module, rows: PreferenceRows, collate: Callable,
                    batch_size: int, device: torch.device, precision: str, adapters_off: bool,
                    progress: bool = False, split: str = "train") -> torch.Tensor:
    """(n, 2): the summed completion log-probs of each item's two rows under the reference:
    ``model`` in eval mode, its LoRA adapters off (``adapters_off``), else ``model`` as it is;
    batches laid out by ``collate`` (the run's: packed or not, as its steps are)."""
    was_training = model.training
    model.eval()
    out = []
    starts = range(0, len(rows), batch_size)
    for start in progress_bar(starts, desc=f"reference {split}", unit="batch", leave=False,
                              enabled=progress):
        items = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        batch = {k: v.to(device) for k, v in collate(items, 0).items()}
        with autocast(device, precision):
            logps = preference.reference_sequence_logps(
                model, batch["ids"], batch["attention_mask"], batch["completion_mask"],
                reference=None if adapters_off else model, packed=preference.packed_rows(batch))
        out.append(torch.stack(logps.float().cpu().chunk(2), dim=1))
    model.train(was_training)
    return torch.cat(out)


# ---- The step and the evaluation ----

class PreferenceTrainer(Trainer):
    """``Trainer`` whose step and evaluation take the preference loss of ``preference_config``
    (preference.config_of a run's settings): a step's
    micro-batches weighted by their pairs (so accumulation and DDP equal one big batch of
    pairs for dpo, kto and simpo; ORPO's and cpo_alpha's NLL is each micro-batch's token mean,
    weighted so, as TRL's accumulation takes it), its metrics (``METRICS``) averaged the same
    way; the validation loss is the same loss, its accuracy the implicit reward's."""

    def __init__(self, model: nn.Module, settings: StepSettings,
                 preference_config: preference.PreferenceConfig, device: torch.device,
                 dist: Dist | None = None, label_bytes: LabelBytes | None = None,
                 state=None):
        super().__init__(model, settings, device, dist, label_bytes, state)
        self.preference = preference_config
        self.metric_names = METRICS[preference_config.method]
        if preference_config.method == "kto":  # its completions, then its KL rows
            self.eval_forwards = 2

    def train_step(self, micro_batches: Sequence[dict], inject_nan: bool = False,
                   stop: StepStop | None = None) -> StepFigures:
        self.model.train()
        pairs = sum(len(b["ids"]) // 2 for b in micro_batches)
        positions = sum(b["ids"].numel() for b in micro_batches)
        n_pairs, n_positions = self._step_counts(pairs, positions)
        sums = torch.zeros(1 + 2 * len(self.metric_names), device=self.device)
        with self._droppable_step(stop):
            for i, batch in enumerate(micro_batches):
                batch = self._to_device(batch)
                share = len(batch["ids"]) // 2 / n_pairs
                last = i == len(micro_batches) - 1
                sync = contextlib.nullcontext() if last else distributed.accumulating(self.model)
                with sync:
                    with autocast(self.device, self.precision):
                        loss, metrics = preference.batch_loss(self.model, batch, self.preference,
                                                              self.dist)
                    if inject_nan:
                        loss = loss * float("nan")
                    self.scaler.scale(loss * share * self.dist.world).backward()
                sums += self._weighted(loss, metrics, share, self._weights(batch, share))
        sums = all_reduce_sum(sums, self.dist)
        stats = self.update(sums[0], n_positions)
        stats.metrics = self._averaged(sums[1:])
        return stats

    def _kl_over_ranks(self) -> bool:
        """Whether each batch's KTO KL estimate is a collective over the ranks."""
        return self.preference.method == "kto" and self.dist.enabled

    def _eval_in_lockstep(self) -> bool:
        return super()._eval_in_lockstep() or self._kl_over_ranks()

    def _idle_eval_batch(self) -> None:
        """An idle batch's forwards (a sharded model's), then, for KTO, no KL rows to the
        estimate's collective."""
        super()._idle_eval_batch()
        if self._kl_over_ranks():
            nothing = torch.zeros(0, device=self.device)
            preference.kl_estimate(nothing, nothing, self.dist)

    def _weights(self, batch: dict, share: torch.Tensor) -> dict:
        """Each metric's weight in one micro-batch: its ``share`` of the pairs; KTO's chosen
        and rejected means by the batch's desirable and undesirable completions (the means over
        a step's completions of each label, as TRL's counts over processes take them), its
        margin none (``_averaged`` takes it from those means)."""
        share = torch.as_tensor(share, dtype=torch.float32, device=self.device)
        weights = dict.fromkeys(self.metric_names, share)
        if self.preference.method == "kto":
            desirable = batch["desirable"].float().sum()
            undesirable = len(batch["desirable"]) - desirable
            for kind, count in (("chosen", desirable), ("rejected", undesirable)):
                weights[f"rewards/{kind}"] = count
                weights[f"logps/{kind}"] = count
            weights["rewards/margins"] = torch.zeros_like(share)
        return weights

    def _weighted(self, loss: torch.Tensor, metrics: dict, share: torch.Tensor, weights: dict
                  ) -> torch.Tensor:
        """[loss, metric, its weight, ...] of one micro-batch: the loss weighted by its
        ``share`` of the pairs, each metric by its ``weights`` (_weights'; a metric it lacks,
        KTO's of a batch of one label, weighs nothing)."""
        zero = torch.zeros((), device=self.device)
        row = [loss.detach().float() * share]
        for name in self.metric_names:
            if name in metrics:
                row += [metrics[name].float() * weights[name], weights[name]]
            else:
                row += [zero, zero]
        return torch.stack(row)

    def _averaged(self, sums: torch.Tensor) -> dict:
        values = sums.tolist()
        means = {name: values[2 * k] / values[2 * k + 1]
                 for k, name in enumerate(self.metric_names) if values[2 * k + 1] > 0}
        both = {"rewards/chosen", "rewards/rejected"} <= means.keys()
        if self.preference.method == "kto" and both:
            means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        return {name: means[name] for name in self.metric_names if name in means}

    @torch.no_grad()
    def evaluate(self, batches: Iterator[dict] | Sequence[dict], total: int | None = None
                 ) -> dict:
        """The validation loss (the training loss, on the validation pairs, each batch weighted
        by its pairs) and its metrics: val_accuracy the implicit reward's (where the method has
        it), val_<metric> the rest. KTO's ranks go through the batches in lockstep, each
        batch's KL estimate taken over the ranks' batches of that turn, as in a training step:
        the global batch of one turn is the batch one process of the global batch size takes,
        so every layout of one global batch size validates alike."""
        sums = torch.zeros(1 + 2 * len(self.metric_names), device=self.device)
        pairs = 0
        for batch in self._eval_batches(batches, total):
            with autocast(self.device, self._eval_precision()):
                loss, metrics = preference.batch_loss(self.eval_model, batch, self.preference,
                                                      self.dist)
            n = len(batch["ids"]) // 2
            share = torch.tensor(float(n), device=self.device)
            sums += self._weighted(loss, metrics, share, self._weights(batch, share))
            pairs += n
        sums = all_reduce_sum(sums, self.dist)
        n = all_reduce_sum(torch.tensor(float(pairs), device=self.device), self.dist).item()
        assert n > 0, "the validation split holds pairs"
        metrics = {"val_loss": sums[0].item() / n}
        for name, value in self._averaged(sums[1:]).items():
            key = "val_accuracy" if name == "rewards/accuracies" else f"val_{name}"
            metrics[key] = value
        metrics["val_completions" if self.preference.method == "kto" else "val_pairs"] = int(n)
        return metrics
