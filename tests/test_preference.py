"""codelm.training.preference against TRL 1.16's trainers on the same tensors.

The references are the trainers' own methods, called unbound on a SimpleNamespace that holds
the attributes they read (one process, no accumulation), with a stub for the model:
- DPO: ``DPOTrainer._compute_loss`` (reference log-probs precomputed), the model a stub handing
  back the policy's per-token log-probs (a leaf) as TRL's fused LM head gives them;
- KTO: ``KTOTrainer._compute_loss`` (the same, for the completions and their mismatched KL pairs);
- ORPO: ``ORPOTrainer.get_batch_loss_metrics`` (``concatenated_forward``, ``odds_ratio_loss``
  and its NLL), the model a stub handing back logits (a leaf) of prompt + completion rows;
- SimPO: ``CPOTrainer.get_batch_loss_metrics`` with loss_type "simpo" (``cpo_loss``), the same.
Each: the loss within 1e-6, its gradient within 1e-5, and every metric TRL logs that is not of
the model's raw output (logits, entropy, token accuracy, token counts).
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from test_grpo import lora_model
from tiny_hf import save_tiny_hf
from trl import DPOTrainer, KTOTrainer

from architecture import head_logps
from codelm.models import pretrained
from codelm.training import preference
from codelm.training.preference import PreferenceConfig

with warnings.catch_warnings():  # the experimental package announces itself on import
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

PAD, VOCAB = 0, 32
B = 6  # pairs a batch
OUTPUT_METRICS = {"logits/chosen", "logits/rejected", "entropy", "num_tokens",
                  "mean_token_accuracy"}  # of the model's raw output, not of the loss


def _rows(n: int, gen: torch.Generator, min_prompt: int = 1
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n right-padded rows of a prompt (``min_prompt`` to 3 tokens) then a completion (1 to 5):
    ids, attention mask and completion mask, (n, width) with one row at the full width."""
    prompts = [int(torch.randint(min_prompt, 4, (), generator=gen)) for _ in range(n)]
    completions = [int(torch.randint(1, 6, (), generator=gen)) for _ in range(n)]
    completions[n // 2] = 5
    prompts[n // 2] = 3
    width = max(p + c for p, c in zip(prompts, completions))
    ids = torch.full((n, width), PAD)
    attention = torch.zeros(n, width, dtype=torch.long)
    completion = torch.zeros(n, width, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :p + c] = torch.randint(3, VOCAB, (p + c,), generator=gen)
        attention[i, :p + c] = 1
        completion[i, p:p + c] = 1
    return ids, attention, completion


def _padded(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def _pairs(gen: torch.Generator, min_prompt: int = 1
           ) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """B pairs: TRL's ORPO/CPO batch (chosen_* and rejected_* apart), and the same rows as one
    batch of 2B (chosen then rejected, padded to one width): ids, attention and completion."""
    chosen, rejected = _rows(B, gen, min_prompt), _rows(B, gen, min_prompt)
    batch = {}
    for name, (ids, attention, completion) in (("chosen", chosen), ("rejected", rejected)):
        batch[f"{name}_input_ids"] = ids
        batch[f"{name}_attention_mask"] = attention
        batch[f"{name}_labels"] = ids.masked_fill(completion == 0, -100)
    width = max(chosen[0].shape[1], rejected[0].shape[1])
    ids, attention, completion = (torch.cat([_padded(c, width, value), _padded(r, width, value)])
                                  for c, r, value in zip(chosen, rejected, (PAD, 0, 0)))
    return batch, ids, attention, completion


def _accelerator() -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t,
                           gather_for_metrics=lambda t: t)


def _fused_output(log_probs: torch.Tensor) -> SimpleNamespace:
    """What TRL's fused LM head hands back, the log-probs given, the rest zeros."""
    zeros = torch.zeros_like(log_probs)
    return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                           is_top1=zeros.bool())


def _logged(trainer: SimpleNamespace) -> dict:
    return {name: values[-1] for name, values in trainer._metrics["train"].items()}


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6


def _check(ours: torch.Tensor, theirs: torch.Tensor, ours_leaf: torch.Tensor,
           theirs_leaf: torch.Tensor, metrics: dict, logged: dict) -> None:
    """Loss within 1e-6, gradient within 1e-5, the metrics TRL logs of the loss equal."""
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-6, (ours.item(), theirs.item())
    assert torch.allclose(ours_leaf.grad, theirs_leaf.grad, rtol=0, atol=1e-5)
    assert set(metrics) == set(logged) - OUTPUT_METRICS, (set(metrics), set(logged))
    for name in metrics:
        assert _same(metrics[name].item(), float(logged[name])), (name, metrics[name], logged[name])


# ----------------------------------------------------------------------------- DPO

def _dpo_trainer(cfg: PreferenceConfig) -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[cfg.loss_type], loss_weights=[1.0], beta=cfg.beta,
        label_smoothing=cfg.label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))


def _dpo_case(cfg: PreferenceConfig, seed: int, spread: float = 2.0) -> None:
    """B pairs whose reference log-probs differ from the policy's by ``spread`` standard
    normals (0: the policy is the reference, every reward 0)."""
    gen = torch.Generator().manual_seed(seed)
    _, ids, attention, completion = _pairs(gen)
    logps = -3 * torch.rand(2 * B, ids.shape[1] - 1, generator=gen)
    sums = (logps * completion[:, 1:]).sum(-1)
    ref = sums + spread * torch.randn(2 * B, generator=gen)  # some pairs ranked wrong
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}

    theirs_leaf = logps.clone().requires_grad_(True)
    trainer = _dpo_trainer(cfg)
    stub = lambda **kwargs: _fused_output(theirs_leaf * completion[:, 1:])  # noqa: E731
    theirs = DPOTrainer._compute_loss(trainer, stub, inputs, return_outputs=False)

    ours_leaf = logps.clone().requires_grad_(True)
    ours, metrics = preference.pair_loss(ours_leaf * attention[:, 1:], attention, completion, cfg,
                                         ref_logps=ref)
    _check(ours, theirs, ours_leaf, theirs_leaf, metrics, _logged(trainer))


@pytest.mark.parametrize("loss_type", preference.DPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_equals_trls(loss_type, beta):
    """For every DPO loss type at three betas (and the robust loss's label smoothings), the loss,
    its gradient and each logged metric equal TRL's DPOTrainer on the same tensors."""
    smoothings = [0.0, 0.1, 0.3] if loss_type == "robust" else [0.0]
    for smoothing in smoothings:
        cfg = PreferenceConfig(method="dpo", loss_type=loss_type, beta=beta,
                               label_smoothing=smoothing)
        _dpo_case(cfg, seed=zlib.crc32(repr(cfg).encode()))


@pytest.mark.parametrize("loss_type", preference.DPO_LOSS_TYPES)
def test_dpo_at_the_reference_counts_no_pair_accurate_as_trl(loss_type):
    """A policy equal to its reference (a LoRA run's first step) gives every pair the same
    reward on both sides: no chosen earns the higher reward, so rewards/accuracies is 0, and
    the loss and other metrics are TRL's."""
    _dpo_case(PreferenceConfig(method="dpo", loss_type=loss_type), seed=3, spread=0.0)


# ----------------------------------------------------------------------------- KTO

def _kto_trainer(cfg: PreferenceConfig) -> SimpleNamespace:
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
        calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=cfg.beta,
        desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model,
                                                                                   batch)
    return trainer


def _kto_case(cfg: PreferenceConfig, desirable: torch.Tensor, seed: int,
              kl_shift: float = 0.0, other_kl: float | None = None) -> None:
    """N completions labelled ``desirable``; their mismatched KL pairs' reference log-probs
    shifted by ``kl_shift`` (positive: a KL estimate below 0, clamped). ``other_kl``: a second
    process's KL estimate, which TRL gathers and averages with this one's."""
    gen = torch.Generator().manual_seed(seed)
    n = desirable.numel()
    ids, attention, completion = _rows(n, gen)
    kl_ids, kl_attention, kl_completion = _rows(n, gen)
    logps = -3 * torch.rand(n, ids.shape[1] - 1, generator=gen)
    kl_token_logps = -3 * torch.rand(n, kl_ids.shape[1] - 1, generator=gen) * kl_completion[:, 1:]
    sums = (logps * completion[:, 1:]).sum(-1)
    kl_sums = kl_token_logps.sum(-1)
    ref = sums + 2 * torch.randn(n, generator=gen)
    ref_kl = kl_sums + torch.randn(n, generator=gen) - 0.5 + kl_shift
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion,
             "KL_input_ids": kl_ids, "KL_attention_mask": kl_attention,
             "KL_completion_mask": kl_completion, "label": desirable, "ref_logps": ref,
             "ref_KL_logps": ref_kl}

    theirs_leaf = logps.clone().requires_grad_(True)
    trainer = _kto_trainer(cfg)
    kl = None
    if other_kl is not None:
        mine = (kl_sums - ref_kl).mean()

        def gather(t):
            """The KL estimate from both processes; any other value this process's alone."""
            if t.dtype == mine.dtype and t.shape == mine.shape and torch.allclose(t, mine):
                return torch.stack([t, torch.tensor(other_kl)])
            return t

        trainer.accelerator.gather_for_metrics = gather
        kl = (mine + other_kl) / 2

    def stub(input_ids, **kwargs):
        if input_ids is kl_ids:
            return _fused_output(kl_token_logps)
        return _fused_output(theirs_leaf * completion[:, 1:])

    theirs = KTOTrainer._compute_loss(trainer, stub, batch, return_outputs=False)

    ours_leaf = logps.clone().requires_grad_(True)
    ours_logps = preference.sequence_logps(ours_leaf * attention[:, 1:], completion)
    ours, metrics = preference.kto_loss(ours_logps, ref, desirable, kl_sums, ref_kl, cfg, kl)
    _check(ours, theirs, ours_leaf, theirs_leaf, metrics, _logged(trainer))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 1.0), (1.0, 0.75)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("labels", ["mixed", "desirable", "undesirable"])
def test_kto_equals_trls(weights, beta, labels):
    """Desirable and undesirable weights, with batches of both labels and of one alone (TRL
    then logs no margin and none of the absent side's metrics)."""
    cfg = PreferenceConfig(method="kto", beta=beta, desirable_weight=weights[0],
                           undesirable_weight=weights[1])
    desirable = {"mixed": torch.tensor([1, 0, 1, 1, 0, 0, 1, 0]),
                 "desirable": torch.ones(8, dtype=torch.long),
                 "undesirable": torch.zeros(8, dtype=torch.long)}[labels].bool()
    _kto_case(cfg, desirable, seed=zlib.crc32(repr((cfg, labels)).encode()))


def test_kto_clamps_a_negative_kl_estimate_as_trl():
    """A KL estimate below 0 is clamped to 0 in the KTO loss, as TRL's KTOTrainer clamps it: the
    loss, its gradient and the metrics equal TRL's."""
    cfg = PreferenceConfig(method="kto", beta=0.3)
    _kto_case(cfg, torch.tensor([1, 0, 0, 1, 1, 0]).bool(), seed=5, kl_shift=5.0)


@pytest.mark.parametrize("other_kl", [2.5, -40.0])
def test_kto_averages_every_processs_kl_estimate_as_trl(other_kl):
    """Two processes: the KL estimate is the mean of both processes' (TRL gathers them), then
    clamped at 0 (the second case: the mean below 0)."""
    cfg = PreferenceConfig(method="kto", beta=0.2)
    _kto_case(cfg, torch.tensor([1, 0, 1, 0, 0, 1]).bool(), seed=6, other_kl=other_kl)


# ----------------------------------------------------------------------------- ORPO and SimPO

def _paired_trainer(cls, **attributes) -> SimpleNamespace:
    """What ORPOTrainer's and CPOTrainer's get_batch_loss_metrics read, their own methods bound."""
    trainer = SimpleNamespace(is_encoder_decoder=False, padding_value=PAD, pad_token_id=PAD,
                              accelerator=_accelerator(), aux_loss_enabled=False, **attributes)
    trainer.concatenated_inputs = cls.concatenated_inputs
    trainer.get_batch_logps = cls.get_batch_logps
    trainer.concatenated_forward = lambda model, batch: cls.concatenated_forward(trainer, model,
                                                                                 batch)
    if cls is ORPOTrainer:
        trainer.odds_ratio_loss = lambda *logps: ORPOTrainer.odds_ratio_loss(trainer, *logps)
    else:
        trainer.cpo_loss = lambda *logps: CPOTrainer.cpo_loss(trainer, *logps)
    return trainer


def _logits_model(logits: torch.Tensor):
    """A stand-in for a Transformer whose forward has ``logits`` (over every row's tokens) and
    an identity head: token_logps then reads the same logits TRL's stub gives."""
    def forward(ids, labels, token_logps):
        assert token_logps
        return head_logps(logits[:, :ids.shape[1]], lambda x: x, labels)

    return forward


def _logits_case(cfg: PreferenceConfig, trainer: SimpleNamespace, cls, seed: int,
                 min_prompt: int = 1) -> None:
    """The whole path from the logits: TRL's forward, log-probs, NLL and loss against
    token_logps and pair_loss through a model that hands back the same logits. The logits put
    most of the mass on each row's next token, as a tuned model's do on its own samples: a mean
    NLL near 1, where float32 resolves 1e-6 (TRL's cross-entropy sums in another order)."""
    gen = torch.Generator().manual_seed(seed)
    batch, ids, attention, completion = _pairs(gen, min_prompt)
    logits = 2 * torch.randn(2 * B, ids.shape[1], VOCAB, generator=gen)
    logits[:, :-1].scatter_add_(-1, ids[:, 1:, None], torch.full(ids[:, 1:, None].shape, 4.0))

    theirs_leaf = logits.clone().requires_grad_(True)
    stub = lambda *args, **kwargs: SimpleNamespace(logits=theirs_leaf)  # noqa: E731
    theirs, logged = cls.get_batch_loss_metrics(trainer, stub, batch)

    ours_leaf = logits.clone().requires_grad_(True)
    model = _logits_model(ours_leaf)
    logps = preference.token_logps(model, ids, attention)
    ours, metrics = preference.pair_loss(logps, attention, completion, cfg)
    _check(ours, theirs, ours_leaf, theirs_leaf, metrics, logged)


def test_log1mexp_keeps_its_precision_on_either_side_of_minus_log_2():
    """log1mexp(x) = log(1 - exp(x)) within 1e-12 relative of a 50-digit mpmath value, both for
    x far below 0 (1 - exp(x) rounds to 1) and for x just below 0 (1 - exp(x) cancels): the
    log-odds of ORPO take it of mean log-probs anywhere in that range."""
    import mpmath

    xs = [-60.0, -30.0, -5.0, -0.7, -0.69, -0.3, -1e-5, -1e-12]
    got = preference.log1mexp(torch.tensor(xs, dtype=torch.float64)).tolist()
    for x, value in zip(xs, got):
        with mpmath.workdps(50):
            ref = float(mpmath.log(1 - mpmath.exp(mpmath.mpf(x))))
        assert value == pytest.approx(ref, rel=1e-12, abs=0), x


@pytest.mark.parametrize("orpo_lambda", [0.05, 0.1, 0.5, 1.0])
def test_orpo_equals_trls(orpo_lambda):
    """The odds-ratio term weighted by lambda (TRL's ORPO beta) and the chosen rows' NLL over
    their prompt and completion, as TRL takes it."""
    cfg = PreferenceConfig(method="orpo", orpo_lambda=orpo_lambda)
    trainer = _paired_trainer(ORPOTrainer, beta=orpo_lambda)
    _logits_case(cfg, trainer, ORPOTrainer, seed=zlib.crc32(repr(cfg).encode()))


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (2.5, 1.4), (0.1, 0.0), (10.0, 3.0)])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo_equals_trls(beta, gamma, smoothing, cpo_alpha):
    """The length-normalized margin less gamma, label-smoothed; with cpo_alpha, CPO's NLL of
    the chosen completions beside it."""
    cfg = PreferenceConfig(method="simpo", beta=beta, simpo_gamma=gamma,
                           label_smoothing=smoothing, cpo_alpha=cpo_alpha)
    trainer = _paired_trainer(CPOTrainer, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                              label_smoothing=smoothing, cpo_alpha=cpo_alpha, alpha=0.0)
    _logits_case(cfg, trainer, CPOTrainer, seed=zlib.crc32(repr(cfg).encode()))


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_a_completion_from_a_rows_first_token_is_averaged_as_trl_averages_it(method):
    """An empty prompt (a tokenizer without BOS): the completion's first token, at position 0,
    has no log-prob; the per-token mean divides by the tokens scored, as TRL's does."""
    cfg = PreferenceConfig(method=method, beta=0.1 if method == "orpo" else 2.0)
    cls = ORPOTrainer if method == "orpo" else CPOTrainer
    options = {} if method == "orpo" else dict(loss_type="simpo", simpo_gamma=0.5,
                                               label_smoothing=0.0, cpo_alpha=0.0, alpha=0.0)
    trainer = _paired_trainer(cls, beta=cfg.beta if method == "simpo" else cfg.orpo_lambda,
                              **options)
    _logits_case(cfg, trainer, cls, seed=11, min_prompt=0)


# ----------------------------------------------------------------------------- the reference

def test_the_lora_reference_is_the_base_without_a_second_model(tmp_path):
    """With the adapters off the LoRA model scores the pairs as the base loaded on its own, bit
    for bit, on the same parameters; after, the adapters are back and train."""
    save_tiny_hf("llama", tmp_path / "hf")
    base = pretrained.load(tmp_path / "hf").eval()
    model = lora_model(tmp_path / "hf")
    _, ids, attention, completion = _pairs(torch.Generator().manual_seed(1))
    parameters = {id(p) for p in model.parameters()}

    ref = preference.reference_sequence_logps(model, ids, attention, completion)
    with torch.no_grad():
        expected = preference.sequence_logps(preference.token_logps(base, ids, attention),
                                             completion)
    assert torch.equal(ref, expected)
    assert {id(p) for p in model.parameters()} == parameters
    logps = preference.token_logps(model, ids, attention)
    assert not torch.allclose(preference.sequence_logps(logps, completion), ref)
    loss, _ = preference.pair_loss(logps, attention, completion, PreferenceConfig(),
                                   ref_logps=ref)
    loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_" in name)
    given = preference.reference_sequence_logps(model, ids, attention, completion,
                                                reference=base)
    assert torch.equal(given, expected)


def test_a_missing_reference_is_refused(tmp_path):
    """A loss called without what it needs (a reference model or ref_logps for DPO, KTO through the
    pair loss, IPO or cpo_alpha where they do not apply) is a ValueError saying what to pass."""
    save_tiny_hf("llama", tmp_path / "hf")
    model = pretrained.load(tmp_path / "hf").eval()
    _, ids, attention, completion = _pairs(torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="^DPO and KTO need a reference model"):
        preference.reference_sequence_logps(model, ids, attention, completion)
    logps = torch.zeros(2 * B, ids.shape[1] - 1)
    with pytest.raises(ValueError, match="^dpo compares with the reference: pass ref_logps"):
        preference.pair_loss(logps, attention, completion, PreferenceConfig())
    with pytest.raises(ValueError, match="^kto scores completions one by one"):
        preference.pair_loss(logps, attention, completion, PreferenceConfig(method="kto"))
    with pytest.raises(ValueError, match="^loss_type ipo compares per-token log-ratios"):
        preference.dpo_loss(*torch.zeros(4, B), PreferenceConfig(loss_type="ipo"))
    with pytest.raises(ValueError, match="^cpo_alpha 1.0 weighs the chosen completions' NLL"):
        preference.simpo_loss(*torch.zeros(2, B), PreferenceConfig(method="simpo", cpo_alpha=1.0))


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("settings, message", [
    (dict(method="ppo"), "method 'ppo': must be one of dpo, kto, orpo, simpo"),
    (dict(loss_type="exo_pair"), "loss_type 'exo_pair': must be one of sigmoid, ipo, hinge, "
                                 "robust"),
    (dict(method="kto", loss_type="ipo"), "loss_type 'ipo' is DPO's; method kto has its own"),
    (dict(beta=0.0), "beta 0.0: must be a finite number > 0"),
    (dict(beta=math.inf), "beta inf: must be a finite number > 0"),
    (dict(method="orpo", orpo_lambda=-0.1), "orpo_lambda -0.1: must be a finite number > 0"),
    (dict(method="kto", desirable_weight=0.0), "desirable_weight 0.0: must be a finite number"),
    (dict(method="kto", undesirable_weight=-1.0), "undesirable_weight -1.0: must be"),
    (dict(method="simpo", simpo_gamma=-0.5), "simpo_gamma -0.5: must be a finite number >= 0"),
    (dict(method="simpo", cpo_alpha=math.nan), "cpo_alpha nan: must be a finite number >= 0"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing 0.5: must be in [0, 0.5)"),
    (dict(label_smoothing=0.1), "label_smoothing 0.1: dpo sigmoid ignores it"),
    (dict(method="kto", label_smoothing=0.1), "label_smoothing 0.1: kto ignores it"),
    (dict(method="orpo", label_smoothing=0.1), "label_smoothing 0.1: orpo ignores it"),
])
def test_bad_settings_are_refused_in_one_line(settings, message):
    """Each invalid PreferenceConfig (an unknown method or loss type, a beta or weight
    out of range, a setting the method ignores) is refused in one line naming the
    setting, its value and the rule."""
    with pytest.raises(ValueError) as caught:
        PreferenceConfig(**settings)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_only_dpo_and_kto_need_a_reference():
    """needs_reference holds for DPO and KTO and not for ORPO and SimPO: only the first two load a
    frozen reference model beside the policy."""
    assert [PreferenceConfig(method=m).needs_reference for m in preference.METHODS] == [
        True, True, False, False]


def test_token_logps_of_a_model_are_the_log_softmax_of_its_logits(tmp_path):
    """Through the model's forward (the chunked head: no whole logits) each next token's
    log-prob and the gradients equal log_softmax of the whole logits the model gives."""
    save_tiny_hf("llama", tmp_path / "hf")
    model = pretrained.load(tmp_path / "hf").eval()
    _, ids, attention, completion = _pairs(torch.Generator().manual_seed(3))
    ours = preference.token_logps(model, ids, attention)
    (ours * torch.linspace(-1, 1, ours.numel()).view_as(ours)).sum().backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids).float()[:, :-1]
    plain = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0] * attention[:, 1:]
    (plain * torch.linspace(-1, 1, plain.numel()).view_as(plain)).sum().backward()
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_each_run_setting_reaches_the_loss_setting_it_names():
    """A run's preference settings (TrainConfig's --pref-beta, --kto-desirable-weight, ...)
    become the loss's settings of the same meaning, each its own."""
    from codelm import trainconfig

    kto = trainconfig.TrainConfig(task="kto", pref_beta=0.2, kto_desirable_weight=1.33,
                                  kto_undesirable_weight=0.75)
    assert preference.config_of(kto) == PreferenceConfig(
        method="kto", beta=0.2, desirable_weight=1.33, undesirable_weight=0.75)
    simpo = trainconfig.TrainConfig(task="simpo", pref_beta=2.5, label_smoothing=0.2,
                                    simpo_gamma=0.7, cpo_alpha=0.4)
    assert preference.config_of(simpo) == PreferenceConfig(
        method="simpo", beta=2.5, label_smoothing=0.2, simpo_gamma=0.7, cpo_alpha=0.4)
    orpo = trainconfig.TrainConfig(task="orpo", orpo_lambda=0.3)
    assert preference.config_of(orpo) == PreferenceConfig(method="orpo", orpo_lambda=0.3)
    dpo = trainconfig.TrainConfig(task="dpo", pref_loss_type="ipo", pref_beta=0.4)
    assert preference.config_of(dpo) == PreferenceConfig(loss_type="ipo", beta=0.4)


def test_the_runs_preference_loss_choices_are_the_losses_own():
    """--pref-loss-type offers exactly the DPO-family losses the loss computes."""
    from codelm import trainconfig

    action = next(a for a in trainconfig.build_parser()._actions
                  if "--pref-loss-type" in a.option_strings)
    assert [c for c in action.choices if c is not None] == list(preference.DPO_LOSS_TYPES)
