"""Preference losses, computed as TRL 1.16 computes them: DPO (DPOTrainer, its sigmoid, ipo, hinge
and robust losses), KTO (KTOTrainer), ORPO (ORPOTrainer) and SimPO (CPOTrainer with loss_type
"simpo"), each with the metrics TRL logs; the sequence log-probs of prompt + completion rows under
a codelm Transformer, and under the reference: the LoRA base with its adapters switched off.
Plain tensors in, plain tensors out: the training loop batches, caches and steps.

A batch of pairs is one batch of 2B rows, the B chosen then the B rejected (TRL's layout), each
row its prompt then its completion, right-padded: ``ids`` (2B, L), ``attention_mask`` (2B, L)
(real tokens), ``completion_mask`` (2B, L) (the completion's tokens)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

import lora
from architecture import Transformer
from codelm.data.config import PREFERENCE_TASKS
from codelm.kernels import IGNORE_INDEX
from codelm.runtime.distributed import Dist, all_reduce_sum

METHODS = PREFERENCE_TASKS
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
REFERENCED = ("dpo", "kto")  # ORPO and SimPO need no reference model


@dataclass(frozen=True)
class PreferenceConfig:
    """The loss settings, with TRL's defaults, each checked on construction. ``beta`` is DPO's,
    KTO's and SimPO's; ORPO's weight of its odds-ratio term (TRL's ORPOConfig.beta) is
    ``orpo_lambda``."""

    method: str = "dpo"  # dpo, kto (unpaired: a label per completion), orpo or simpo
    loss_type: str = "sigmoid"  # DPO's loss: sigmoid, ipo, hinge or robust
    beta: float = 0.1  # the reward's scale: how far the policy may stray from the reference
    #   (ipo: the regularization tau; simpo: the reward's scale, 2.0 to 2.5 in the paper)
    label_smoothing: float = 0.0  # robust DPO: the chance a pair's label is flipped; simpo:
    #   the conservative loss's; no other loss reads it
    desirable_weight: float = 1.0  # KTO: the weight of a desirable completion's loss
    undesirable_weight: float = 1.0  # KTO: the weight of an undesirable one's loss
    orpo_lambda: float = 0.1  # ORPO: the odds-ratio term's weight beside the chosen's NLL
    simpo_gamma: float = 0.5  # SimPO: the target margin of the rewards (of the mean
    #   log-probs: gamma / beta)
    cpo_alpha: float = 0.0  # SimPO: the weight of the chosen completions' NLL (0: SimPO alone)

    def __post_init__(self) -> None:
        _one_of("method", self.method, METHODS)
        _one_of("loss_type", self.loss_type, DPO_LOSS_TYPES)
        if self.method != "dpo" and self.loss_type != "sigmoid":
            raise ValueError(f"loss_type {self.loss_type!r} is DPO's; method {self.method} has "
                             "its own loss: leave loss_type sigmoid")
        for name in ("beta", "orpo_lambda", "desirable_weight", "undesirable_weight"):
            _positive(name, getattr(self, name))
        for name in ("simpo_gamma", "cpo_alpha"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} {value}: must be a finite number >= 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing {self.label_smoothing}: must be in [0, 0.5) (the "
                             "chance a label is flipped)")
        smoothed = self.method == "simpo" or (self.method, self.loss_type) == ("dpo", "robust")
        if self.label_smoothing and not smoothed:
            loss = f"dpo {self.loss_type}" if self.method == "dpo" else self.method
            raise ValueError(f"label_smoothing {self.label_smoothing}: {loss} ignores it (TRL "
                             "1.16 smooths only robust dpo and simpo): use loss_type robust, or "
                             "leave it 0")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads the reference model's log-probs (DPO, KTO)."""
        return self.method in REFERENCED


# A run's settings (TrainConfig's keys) of each PreferenceConfig field.
RUN_KEYS = {"beta": "pref_beta", "loss_type": "pref_loss_type",
            "label_smoothing": "label_smoothing", "desirable_weight": "kto_desirable_weight",
            "undesirable_weight": "kto_undesirable_weight", "orpo_lambda": "orpo_lambda",
            "simpo_gamma": "simpo_gamma", "cpo_alpha": "cpo_alpha"}


def config_of(run: object, named: Callable[[str], str] | None = None) -> PreferenceConfig:
    """The PreferenceConfig of a run's settings (a TrainConfig: its task the method, RUN_KEYS
    the rest); an error names the setting at fault by ``named`` (its key, value and where it
    was set), which starts the message."""
    values = {field: getattr(run, key) for field, key in RUN_KEYS.items()}
    try:
        return PreferenceConfig(method=run.task, **values)
    except ValueError as e:
        message = str(e)
        field = next((f for f in RUN_KEYS if message.startswith(f"{f} ")), None)
        if field is None or named is None:
            raise
        value = getattr(run, RUN_KEYS[field])
        rest = message.removeprefix(f"{field} {value!r}").removeprefix(f"{field} {value}")
        raise ValueError(f"{named(RUN_KEYS[field])}{rest} (task {run.task})") from None


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} {value!r}: must be one of {', '.join(allowed)}")


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} {value}: must be a finite number > 0")


# ----------------------------------------------------------------------------- log-probs

PACKED_KEYS = ("packed_ids", "packed_labels", "document_ids", "packed_index")  # in a batch


class PackedRows(NamedTuple):
    """A batch's rows end to end in rows of ``width`` tokens, each attending to itself only
    (codelm.training.preference_batches.pack_rows makes them)."""

    ids: torch.Tensor  # (R, width): the rows' tokens, pad after the last
    labels: torch.Tensor  # (R, width): the next token within the same row, else IGNORE_INDEX
    document_ids: torch.Tensor  # (R, width): which row a token belongs to, -1 on the padding
    index: torch.Tensor  # (N, L - 1): where token t + 1 of padded row n is predicted, in the
    #   flattened (R, width - 1) outputs of the packed forward (0 beyond the row's end)


def packed_rows(batch: dict) -> PackedRows | None:
    """The batch's packed layout (collate_preferences with pack_into), else None."""
    if PACKED_KEYS[0] not in batch:
        return None
    return PackedRows(*(batch[key] for key in PACKED_KEYS))


def token_logps(model: Transformer, ids: torch.Tensor, attention_mask: torch.Tensor,
                packed: PackedRows | None = None) -> torch.Tensor:
    """(N, L - 1): the log-prob of each of ``ids[:, 1:]`` (N, L, right-padded) given the tokens
    before it, through the model's forward (architecture.head_logps: the whole logits never
    held, so a step over pairs holds what a supervised step over the same rows holds); 0 at
    pads. With ``packed`` (the same rows packed) the forward runs over the packed rows, each
    row attending to itself, and the log-probs are read back in the padded layout."""
    if packed is None:
        labels = ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
        return model(ids[:, :-1], labels, token_logps=True)
    logps = model(packed.ids[:, :-1], packed.labels[:, :-1], token_logps=True,
                  document_ids=packed.document_ids[:, :-1])
    return logps.flatten()[packed.index] * attention_mask[:, 1:].to(logps.dtype)


def sequence_logps(logps: torch.Tensor, completion_mask: torch.Tensor,
                   average: bool = False) -> torch.Tensor:
    """(N,): the completions' log-probs, summed over their tokens, or their mean per token
    scored (``average``: SimPO's and ORPO's length-normalized log-probs; a completion token at
    a row's first position has no log-prob, and TRL's mean leaves it out too). ``logps``
    (N, L - 1) from token_logps, ``completion_mask`` (N, L) over the rows' tokens."""
    mask = completion_mask[:, 1:].to(logps.dtype)
    summed = (logps * mask).sum(-1)
    return summed / mask.sum(-1).clamp(min=1.0) if average else summed


def completion_lengths(completion_mask: torch.Tensor) -> torch.Tensor:
    """(N,): each row's completion tokens, as floats (at least 1)."""
    return completion_mask.sum(-1).float().clamp(min=1.0)


def mean_nll(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean negative log-prob of the tokens ``mask`` (N, L) marks over all rows (a
    token-weighted cross-entropy); ``logps`` (N, L - 1) from token_logps."""
    counted = mask[:, 1:].to(logps.dtype)
    return -(logps * counted).sum() / counted.sum()


@torch.no_grad()
def reference_sequence_logps(model: Transformer, ids: torch.Tensor,
                             attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                             reference: Transformer | None = None,
                             packed: PackedRows | None = None) -> torch.Tensor:
    """(N,): the completions' summed log-probs under the reference, for one batch of rows
    (``packed``: as token_logps takes it): ``reference`` where given (a full fine-tune's frozen
    starting model), else the LoRA model's base, its adapters switched off for the forward (no
    second model in memory). They do not change as the policy trains, so a loop may compute
    them once per example and cache them."""
    if reference is not None:
        return sequence_logps(token_logps(reference, ids, attention_mask, packed),
                              completion_mask)
    if not any(True for _ in lora.lora_modules(model)):
        raise ValueError("DPO and KTO need a reference model: train LoRA (its base is the "
                         "reference) or pass the starting model as reference")
    with lora.adapters_off(model):
        return sequence_logps(token_logps(model, ids, attention_mask, packed), completion_mask)


# ----------------------------------------------------------------------------- the losses

def batch_loss(model: Transformer, batch: dict, cfg: PreferenceConfig,
               dist: Dist | None = None) -> tuple[torch.Tensor, dict]:
    """The loss of one collated batch (codelm.training.preference_batches: ids, attention_mask,
    completion_mask, and ref_logps, desirable where they belong) by ``cfg.method``, and its
    metrics: pairs by pair_loss; KTO's completions by kto_loss, the KL rows (its second half)
    through the policy without gradient, as TRL computes them, their KL estimate taken over the
    KL rows of every process's batch (``dist``: kl_estimate; TRL gathers it)."""
    ids, attention, completion = batch["ids"], batch["attention_mask"], batch["completion_mask"]
    ref = batch.get("ref_logps")
    if cfg.needs_reference and ref is None:
        raise ValueError(f"{cfg.method} compares with the reference: the batch holds no "
                         "ref_logps (reference_sequence_logps of its rows)")
    if cfg.method != "kto":
        logps = token_logps(model, ids, attention, packed_rows(batch))
        return pair_loss(logps, attention, completion, cfg, ref)
    n = len(ids) // 2
    logps = sequence_logps(token_logps(model, ids[:n], attention[:n]), completion[:n])
    with torch.no_grad():
        kl_logps = sequence_logps(token_logps(model, ids[n:], attention[n:]), completion[n:])
    ref_logps, ref_kl_logps = ref.chunk(2)
    kl = kl_estimate(kl_logps, ref_kl_logps, dist)
    return kto_loss(logps, ref_logps, batch["desirable"], kl_logps, ref_kl_logps, cfg, kl)


def kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, dist: Dist | None = None
                ) -> torch.Tensor:
    """KTO's KL estimate, unclamped: the mean of ``kl_logps - ref_kl_logps`` (the policy's and
    reference's log-probs of the KL rows) over the rows of every process (``dist``: their sum
    and count summed, a collective each process joins, one with no batch of its own with empty
    tensors). Batches of equal size on every process (training's) give the mean of the
    processes' means, TRL's gathered estimate; a validation split whose last batches are
    short or missing on some processes gives the mean of the rows the processes hold, the
    estimate of one process holding them all."""
    diffs = (kl_logps - ref_kl_logps).detach()
    if dist is None or not dist.enabled:
        return diffs.mean()
    count = torch.tensor(float(len(diffs)), device=diffs.device)
    totals = all_reduce_sum(torch.stack([diffs.float().sum(), count]), dist)
    return totals[0] / totals[1]


def pair_loss(logps: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
              cfg: PreferenceConfig, ref_logps: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict]:
    """The loss of one batch of pairs by ``cfg.method`` (dpo, orpo or simpo), and its metrics.
    ``logps`` (2B, L - 1): token_logps of the chosen rows then the rejected ones; ``ref_logps``
    (2B,): their reference_sequence_logps (DPO's)."""
    chosen_mask, rejected_mask = completion_mask.chunk(2)
    if cfg.method == "dpo":
        if ref_logps is None:
            raise ValueError("dpo compares with the reference: pass ref_logps "
                             "(reference_sequence_logps)")
        chosen, rejected = sequence_logps(logps, completion_mask).chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg,
                        completion_lengths(chosen_mask), completion_lengths(rejected_mask))
    if cfg.method == "kto":
        raise ValueError("kto scores completions one by one, not pairs: call kto_loss")
    chosen, rejected = sequence_logps(logps, completion_mask, average=True).chunk(2)
    chosen_logps = logps.chunk(2)[0]
    if cfg.method == "orpo":  # TRL's ORPO takes the chosen's NLL over prompt and completion
        return orpo_loss(chosen, rejected, mean_nll(chosen_logps, attention_mask.chunk(2)[0]),
                         cfg)
    nll = mean_nll(chosen_logps, chosen_mask) if cfg.cpo_alpha else None
    return simpo_loss(chosen, rejected, cfg, nll)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, cfg: PreferenceConfig,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """DPO's loss of B pairs by ``cfg.loss_type``, and its metrics (pair_metrics). chosen,
    rejected (B,): the policy's summed completion log-probs, with gradient; ref_chosen,
    ref_rejected (B,): the reference's. ipo compares per-token means: it needs the completions'
    lengths (completion_lengths)."""
    chosen_ratio = chosen - ref_chosen
    rejected_ratio = rejected - ref_rejected
    margin = cfg.beta * (chosen_ratio - rejected_ratio)
    if cfg.loss_type == "sigmoid":
        losses = -F.logsigmoid(margin)
    elif cfg.loss_type == "hinge":
        losses = torch.relu(1 - margin)
    elif cfg.loss_type == "robust":  # unbiased under labels flipped with label_smoothing's odds
        smoothing = cfg.label_smoothing
        clean = -(1 - smoothing) * F.logsigmoid(margin)
        flipped = -smoothing * F.logsigmoid(-margin)
        losses = (clean - flipped) / (1 - 2 * smoothing)
    else:  # ipo: the log-ratios per completion token, as TRL normalizes them
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type ipo compares per-token log-ratios: pass chosen_lengths "
                             "and rejected_lengths")
        mean_margin = chosen_ratio / chosen_lengths - rejected_ratio / rejected_lengths
        losses = (mean_margin - 1 / (2 * cfg.beta)) ** 2
    rewards = cfg.beta * chosen_ratio.detach(), cfg.beta * rejected_ratio.detach()
    return losses.mean(), pair_metrics(*rewards, chosen, rejected)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, cfg: PreferenceConfig,
             kl: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """KTO's loss of N completions, each labelled desirable or not, and the metrics TRL logs
    (kl, rewards/chosen, logps/chosen for the desirable ones, .../rejected for the others,
    rewards/margins where both are in the batch). logps (N,): the policy's summed log-probs,
    with gradient; ref_logps (N,): the reference's; desirable (N,) bool. The KL estimate is the
    mean of ``kl_logps - ref_kl_logps`` (detached, at least 0): the policy's and reference's
    log-probs of mismatched pairs, each prompt with another row's completion (TRL pairs prompt
    i with completion i - 1 of its batch); ``kl``: that mean where it was taken over more
    rows (every process's)."""
    desirable = desirable.bool()
    if kl is None:
        kl = (kl_logps - ref_kl_logps).mean()
    kl = kl.detach().clamp(min=0)
    ratio = logps - ref_logps
    losses = torch.where(desirable,
                         cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (ratio - kl))),
                         cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (kl - ratio))))
    rewards = cfg.beta * ratio.detach()
    metrics = {"kl": kl}
    for name, chosen in (("chosen", desirable), ("rejected", ~desirable)):
        if chosen.any():
            metrics[f"rewards/{name}"] = rewards[chosen].mean()
            metrics[f"logps/{name}"] = logps.detach()[chosen].mean()
    if desirable.any() and not desirable.all():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.mean(), metrics


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, nll: torch.Tensor,
              cfg: PreferenceConfig) -> tuple[torch.Tensor, dict]:
    """ORPO's loss of B pairs: the chosen's NLL less orpo_lambda times the mean log-sigmoid of
    the log odds ratio; and its metrics (pair_metrics, with rewards orpo_lambda times the mean
    log-probs, and nll_loss, log_odds_ratio, log_odds_chosen). chosen, rejected (B,): the
    policy's mean completion log-probs per token, with gradient; nll: the chosen rows' mean
    NLL (TRL's: over their prompt and completion tokens)."""
    chosen = chosen.float()
    rejected = rejected.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    loss = nll - (cfg.orpo_lambda * ratio).mean()
    metrics = pair_metrics(cfg.orpo_lambda * chosen.detach(), cfg.orpo_lambda * rejected.detach(),
                           chosen, rejected)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return loss, metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, by the form that keeps its precision on either side of
    -log 2 (Maechler's)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, cfg: PreferenceConfig,
               nll: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """SimPO's loss of B pairs: the log-sigmoid loss of beta times the mean log-prob margin less
    gamma, label-smoothed, plus cpo_alpha times ``nll`` (the chosen completions' mean NLL: CPO's
    term, needed where cpo_alpha > 0); and its metrics (pair_metrics, rewards beta times the mean
    log-probs, and nll_loss). chosen, rejected (B,): the policy's mean completion log-probs per
    token, with gradient."""
    if cfg.cpo_alpha and nll is None:
        raise ValueError(f"cpo_alpha {cfg.cpo_alpha} weighs the chosen completions' NLL: pass "
                         "nll (mean_nll)")
    margin = cfg.beta * (chosen - rejected - cfg.simpo_gamma / cfg.beta)
    smoothing = cfg.label_smoothing
    losses = -F.logsigmoid(margin) * (1 - smoothing) - F.logsigmoid(-margin) * smoothing
    loss = losses.mean()
    metrics = pair_metrics(cfg.beta * chosen.detach(), cfg.beta * rejected.detach(), chosen,
                           rejected)
    metrics["nll_loss"] = chosen.new_zeros(())
    if cfg.cpo_alpha:
        loss = loss + cfg.cpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return loss, metrics


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                 chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """The metrics TRL logs of a batch of pairs, as 0-dim detached tensors: the implicit
    rewards' means (rewards/chosen, rewards/rejected), the share of pairs whose chosen earns the
    higher reward (rewards/accuracies), the mean reward margin (rewards/margins) and the
    policy's mean log-probs (logps/chosen, logps/rejected)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
    }
