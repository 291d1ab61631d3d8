"""GRPO-family policy losses, computed as TRL 1.16's GRPOTrainer computes them: the group
advantages, the per-token log-probs of completions under a codelm Transformer (and under its
reference, the LoRA base with the adapters switched off), and the clipped policy-gradient loss
with its KL term and the metrics TRL logs. Plain tensors in, plain tensors out: the training loop
samples, scores and steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import lora
from architecture import Transformer
from codelm.kernels import IGNORE_INDEX

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo")
CLIPPED = ("grpo", "dr_grpo", "dapo", "bnpo")  # PPO's clipped ratio (cispo clips the weight)
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # added to the reward spread before dividing by it, as TRL does


@dataclass(frozen=True)
class GRPOConfig:
    """The loss settings, under TRL's names (its ``epsilon`` is ``epsilon_low`` here) and with
    TRL's defaults, each checked on construction."""

    loss_type: str = "dapo"  # how per-token losses are summed up: see policy_loss
    scale_rewards: str = "group"  # advantages over the group's reward spread, the batch's, or not
    epsilon_low: float = 0.2  # the ratio is clipped below at 1 - epsilon_low
    epsilon_high: float | None = None  # ... and above at 1 + epsilon_high (None: epsilon_low);
    # cispo caps the ratio itself at epsilon_high (MiniMax-M1's eps_max, e.g. 5.0)
    delta: float | None = None  # two-sided clipping (INTELLECT-2): the unclipped ratio capped
    importance_sampling_level: str = "token"  # one ratio per token, or per sequence (GSPO)
    beta: float = 0.0  # the weight of the KL term to the reference (0: no reference needed)
    use_bias_correction_kl: bool = True  # the KL term weighted by the importance ratio
    mask_truncated_completions: bool = False  # completions cut off at the limit count for nothing
    max_completion_length: int = 512  # dr_grpo's divisor: the sampler's limit on new tokens
    temperature: float = 1.0  # the sampling temperature: log-probs are of logits / temperature

    def __post_init__(self) -> None:
        _one_of("loss_type", self.loss_type, LOSS_TYPES)
        _one_of("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _one_of("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_LEVELS)
        if not 0 <= self.epsilon_low < 1:
            raise ValueError(f"epsilon_low {self.epsilon_low}: must be in [0, 1) (the ratio's "
                             "lower clip is 1 - epsilon_low)")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError(f"epsilon_high {self.epsilon_high}: must be >= 0")
        if self.loss_type == "cispo" and self.clip_high < 1:
            raise ValueError(f"loss_type cispo caps the ratio at epsilon_high, {self.clip_high} "
                             "(< 1: every on-policy token is capped): set epsilon_high to eps_max, "
                             "e.g. 5.0")
        if self.delta is not None and self.loss_type == "cispo":
            raise ValueError("delta caps the clipped losses' ratio; loss_type cispo has its own "
                             "cap (epsilon_high): leave delta unset")
        if self.delta is not None and self.delta <= 1:
            raise ValueError(f"delta {self.delta}: must be > 1 (TRL recommends more than "
                             "1 + epsilon_high); at or below 1 it caps the on-policy ratio")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta {self.beta}: must be a finite number >= 0")
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length {self.max_completion_length}: must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature {self.temperature}: must be > 0")

    @property
    def clip_high(self) -> float:
        """epsilon_high, or epsilon_low where it is unset."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} {value!r}: must be one of {', '.join(allowed)}")


# ----------------------------------------------------------------------------- advantages

def group_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """Each completion's reward less its group's mean; scale "group" divides by the group's
    standard deviation (Bessel-corrected) plus STD_EPS, "batch" by the whole batch's, "none" by
    nothing. ``rewards`` (N,): N // group_size groups of consecutive completions of one prompt."""
    _one_of("scale", scale, SCALE_REWARDS)
    if group_size < 2:
        raise ValueError(f"group size {group_size}: GRPO compares at least 2 completions of a "
                         "prompt")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{tuple(rewards.shape)} rewards: need one per completion, a whole "
                         f"number of groups of {group_size}")
    groups = rewards.view(-1, group_size)
    advantages = rewards - groups.mean(dim=1).repeat_interleave(group_size)
    if scale == "none":
        return advantages
    if scale == "group":
        std = _sample_std(groups, dim=1).repeat_interleave(group_size)
    else:
        std = _sample_std(rewards, dim=0).expand_as(rewards)
    return advantages / (std + STD_EPS)


def _sample_std(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The Bessel-corrected standard deviation along ``dim``, as mean, squared deviations'
    mean, times n / (n - 1): the steps (and so the roundings) TRL's nanstd takes."""
    n = torch.tensor(x.shape[dim], device=x.device)
    variance = ((x - x.mean(dim=dim, keepdim=True)) ** 2).mean(dim=dim)
    return torch.sqrt(variance * (n / (n - 1)))


def completion_mask(lengths: torch.Tensor, truncated: torch.Tensor, width: int,
                    mask_truncated: bool) -> torch.Tensor:
    """The (N, width) 0/1 mask (int64) of the completion tokens that count: the first
    ``lengths[i]`` of row i (its stop token included), none of a row ``truncated`` (cut off at
    the length limit, no stop token) when ``mask_truncated``."""
    mask = torch.arange(width, device=lengths.device) < lengths[:, None]
    if mask_truncated:
        mask = mask & ~truncated.bool()[:, None]
    return mask.long()


# ----------------------------------------------------------------------------- log-probs

def completion_logps(model: Transformer, ids: torch.Tensor, completion_mask: torch.Tensor,
                     prompt_mask: torch.Tensor | None = None, temperature: float = 1.0,
                     with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropies), each (N, C), of the completions that end each row of ``ids``
    (N, P + C): each completion token's log-prob (its logit less its row's logsumexp, as TRL's
    selective_log_softmax takes it), and the entropy of the distribution it was drawn from,
    under the model's logits divided by ``temperature``, through the model's own forward; 0
    where ``completion_mask`` (N, C) is 0. ``prompt_mask`` (N, P): the prompts' real tokens,
    for left-padded prompts. The entropies carry no gradient; with_entropy False: None in their
    place. The model's head (architecture.head_logps) forms the logits a chunk of positions at
    a time, only at the completion tokens, so a step holds what a supervised step over the same
    rows holds."""
    width = completion_mask.shape[1]
    attention = None
    if prompt_mask is not None:  # the last token predicts nothing: it goes with its mask
        attention = torch.cat([prompt_mask, completion_mask], dim=1)[:, :-1]
    targets = torch.full_like(ids[:, 1:], IGNORE_INDEX)
    targets[:, -width:] = ids[:, -width:].masked_fill(completion_mask == 0, IGNORE_INDEX)
    out = model(ids[:, :-1], targets, attention_mask=attention, token_logps=True,
                temperature=temperature, with_entropy=with_entropy)
    if not with_entropy:
        return out[:, -width:], None
    logps, entropy = out
    return logps[:, -width:], entropy[:, -width:]


@torch.no_grad()
def reference_logps(model: Transformer, ids: torch.Tensor, completion_mask: torch.Tensor,
                    prompt_mask: torch.Tensor | None = None, temperature: float = 1.0,
                    reference: Transformer | None = None) -> torch.Tensor:
    """The completions' log-probs (as completion_logps) under the KL term's reference:
    ``reference`` where given (a full fine-tune's frozen starting model), else the LoRA model's
    base, its adapters switched off for the forward (no second model in memory), without
    dropout however the policy trains."""
    if reference is None:
        if not any(True for _ in lora.lora_modules(model)):
            raise ValueError("beta > 0 needs a reference model: train LoRA (its base is the "
                             "reference) or pass the starting model as reference")
        was_training = model.training
        model.eval()  # no dropout: the base scores as the frozen copy of a full fine-tune does
        try:
            with lora.adapters_off(model):
                return completion_logps(model, ids, completion_mask, prompt_mask, temperature,
                                        with_entropy=False)[0]
        finally:
            model.train(was_training)
    return completion_logps(reference, ids, completion_mask, prompt_mask, temperature,
                            with_entropy=False)[0]


# ----------------------------------------------------------------------------- the loss

def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor | None,
                ref_logps: torch.Tensor | None, advantages: torch.Tensor,
                completion_mask: torch.Tensor, cfg: GRPOConfig,
                num_items: torch.Tensor | float | None = None,
                entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The loss of one batch of N completions, and the metrics TRL logs for it (0-dim detached
    tensors under TRL's names: kl, entropy, clip_ratio/..., cispo_clip_ratio).

    logps (N, C): the policy's log-probs, with gradient; old_logps: the sampling policy's (None:
    the policy's own, detached: on-policy); ref_logps: the reference's (needed when cfg.beta >
    0); advantages (N,); completion_mask (N, C): the tokens that count. The per-token losses
    are summed as ``cfg.loss_type`` says: grpo, a mean per completion then over completions;
    bnpo, a mean over the batch's tokens; dr_grpo, a sum over N * cfg.max_completion_length;
    dapo and cispo, a sum over ``num_items`` (default: the batch's tokens that count; TRL's is
    num_items_in_batch / num_processes * gradient_accumulation_steps / steps_per_generation).
    TRL further divides the grpo, bnpo and dr_grpo losses by the accumulation steps: that is the
    caller's to do, as it weighs its micro-batches."""
    if cfg.beta and ref_logps is None:
        raise ValueError(f"beta {cfg.beta} weighs a KL term to the reference: pass ref_logps "
                         "(reference_logps)")
    mask = completion_mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    advantages = advantages[:, None]
    log_ratio = logps - old_logps
    if cfg.importance_sampling_level == "sequence":  # the mean log-ratio, one per completion
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    ratio = torch.exp(log_ratio)
    capped = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
    if cfg.loss_type == "cispo":  # the capped ratio weighs the log-prob's gradient, no gradient
        per_token = -torch.clamp(ratio, max=cfg.clip_high).detach() * advantages * logps
    else:
        clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.clip_high)
        per_token = -torch.min(capped * advantages, clipped * advantages)
    metrics = {}
    if cfg.beta:
        kl = reference_kl(logps, ref_logps)
        if cfg.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = _masked_mean(kl, mask)
    loss = _summed(per_token * mask, mask, cfg, num_items)
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy, mask)
    metrics.update(clip_metrics(capped, advantages, mask, cfg))
    return loss, metrics


def reference_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference), Schulman's k3 estimate: exp(d) - d - 1 with d the
    reference's log-prob less the policy's (>= 0, unbiased on the policy's samples)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def _summed(masked: torch.Tensor, mask: torch.Tensor, cfg: GRPOConfig,
            num_items: torch.Tensor | float | None) -> torch.Tensor:
    """The masked per-token losses (N, C) summed up as cfg.loss_type says (policy_loss)."""
    if cfg.loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if cfg.loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if cfg.loss_type == "dr_grpo":
        return masked.sum() / (masked.shape[0] * cfg.max_completion_length)
    if num_items is None:
        num_items = mask.sum().clamp(min=1.0)
    return masked.sum() / num_items


def clip_metrics(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 cfg: GRPOConfig) -> dict:
    """The shares of tokens (sequences, at sequence level) whose ratio (capped at delta) the
    clip holds: below 1 - epsilon_low with a negative advantage (low), above 1 + epsilon_high
    with a positive one (high), either (region); low_min and high_max, the extremes over
    completions; cispo: the share above its cap with a positive advantage. As TRL logs them, on
    one process."""
    if cfg.loss_type == "cispo":
        capped = (ratio > cfg.clip_high) & (advantages > 0)
        return {"cispo_clip_ratio": _masked_mean(capped.float(), mask)}
    low = ((ratio < 1 - cfg.epsilon_low) & (advantages < 0)).float()
    high = ((ratio > 1 + cfg.clip_high) & (advantages > 0)).float()
    return {
        "clip_ratio/low_mean": _masked_mean(low, mask),
        "clip_ratio/high_mean": _masked_mean(high, mask),
        "clip_ratio/region_mean": _masked_mean(torch.maximum(low, high), mask),
        "clip_ratio/low_min": _nan_extreme(_row_means(low, mask), torch.min),
        "clip_ratio/high_max": _nan_extreme(_row_means(high, mask), torch.max),
    }


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of x over the tokens that count; x (N, 1) (one value per sequence): over rows."""
    if x.shape[1] == 1:
        return x.sum().detach() / max(x.shape[0], 1)
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).detach()


def _row_means(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each completion's mean over its tokens that count (NaN for a row with none)."""
    if x.shape[1] == 1:
        return x.squeeze(1)
    return (x * mask).sum(-1) / mask.sum(-1)


def _nan_extreme(x: torch.Tensor, extreme) -> torch.Tensor:
    """``extreme`` (torch.min, torch.max) of x's values that are not NaN; NaN where all are."""
    kept = x[~torch.isnan(x)]
    return (extreme(kept) if kept.numel() else x.new_tensor(float("nan"))).detach()
