"""codelm.training.grpo against TRL 1.16's GRPOTrainer on the same tensors.

The references are GRPOTrainer's own methods, called unbound on a SimpleNamespace that holds
the attributes they read (one process, no accumulation, no vLLM):
- ``_generate_and_score_completions``, its ``_generate`` and ``_calculate_rewards`` stubbed to
  hand back fixed completions and rewards: the advantages (every ``scale_rewards``), the
  completion mask (``mask_truncated_completions``) and ``num_items_in_batch``;
- ``_compute_loss``, its ``_get_per_token_logps_and_entropies`` stubbed to hand back the
  policy's log-probs (a leaf): the loss, its gradient and the metrics it logs;
- ``_get_per_token_logps_and_entropies`` through the fused LM head TRL puts on a transformers
  model (``add_fused_lm_head``): the completions' log-probs and entropies at a temperature.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from tiny_hf import save_tiny_hf
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

import lora
from codelm import kernels
from codelm.models import pretrained
from codelm.models.adapter_config import LoRAConfig
from codelm.training import grpo
from codelm.training.grpo import GRPOConfig

PAD, EOS, VOCAB = 0, 2, 256
G = 4  # completions per prompt
WIDTH = 7  # the longest completion


def _completions(n: int, gen: torch.Generator) -> tuple[list[list[int]], torch.Tensor]:
    """n completions as token lists, each at most WIDTH long: most end at EOS, some are cut off
    (no EOS), one of them at the full width; and whether each was cut off."""
    lists, truncated = [], []
    for i in range(n):
        length = WIDTH if i == 1 else int(torch.randint(1, WIDTH + 1, (), generator=gen))
        ids = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        cut = i % 3 == 1
        if not cut:
            ids[-1] = EOS
        lists.append(ids)
        truncated.append(cut)
    return lists, torch.tensor(truncated)


def _rewards(n: int, gen: torch.Generator) -> torch.Tensor:
    """Pass/fail, partial credit and arbitrary rewards; the first group all equal (no signal)."""
    kinds = [torch.randint(0, 2, (n,), generator=gen).float(),
             torch.randint(0, 5, (n,), generator=gen).float() / 4,
             torch.randn(n, generator=gen)]
    rewards = kinds[int(torch.randint(0, 3, (), generator=gen))]
    rewards[:G] = 1.0
    return rewards


def _trainer(cfg: GRPOConfig, n: int) -> SimpleNamespace:
    """What GRPOTrainer's scoring and loss methods read of the trainer, for ``cfg`` on one
    process, one micro-batch per generation, no accumulation."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1,
                                  gather=lambda t: t, reduce=lambda t, reduction: t,
                                  autocast=nullcontext)
    args = SimpleNamespace(per_device_train_batch_size=n, gradient_checkpointing_kwargs=None,
                           steps_per_generation=1, gradient_accumulation_steps=1,
                           use_bias_correction_kl=cfg.use_bias_correction_kl, delta=cfg.delta)
    return SimpleNamespace(
        accelerator=accelerator, args=args,
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        environment_factories=None, environments=None, tools=None, pad_to_multiple_of=None,
        _tokenizer=SimpleNamespace(pad_token_id=PAD), eos_token_ids=[EOS],
        mask_truncated_completions=cfg.mask_truncated_completions, num_iterations=1,
        use_vllm=False, vllm_importance_sampling_correction=False, beta=cfg.beta,
        num_generations=G, multi_objective_aggregation="sum_then_normalize",
        reward_weights=torch.ones(1), reward_func_names=["tests"],
        scale_rewards=cfg.scale_rewards, log_multimodal=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={"prompt": [], "completion": [], "advantages": [], "rewards": defaultdict(list),
               "extra": defaultdict(list)},
        _pending_extra_logs={}, _pending_metrics={},
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=cfg.importance_sampling_level, loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon_low, epsilon_high=cfg.clip_high,
        max_completion_length=cfg.max_completion_length, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False)


def _trl_scored(cfg: GRPOConfig, completions: list[list[int]], rewards: torch.Tensor) -> dict:
    """TRL's _generate_and_score_completions on these completions and rewards (no reference
    model is asked for: the KL term's log-probs are given to the loss)."""
    n = len(completions)
    trainer = _trainer(cfg, n)
    trainer.beta = 0.0
    prompts = [[5, 6, 7][: 1 + i % 3] for i in range(n)]  # left-padded to different lengths
    trainer._generate = lambda texts: (prompts, completions, None, ["c"] * n, None, None, None,
                                       None)
    trainer._calculate_rewards = lambda *args: rewards[:, None].clone()
    return GRPOTrainer._generate_and_score_completions(trainer, [{"prompt": "p"}] * n)


def _trl_loss(cfg: GRPOConfig, inputs: dict, logps: torch.Tensor, entropy: torch.Tensor
              ) -> tuple[torch.Tensor, dict]:
    """TRL's _compute_loss of ``logps`` (a leaf) on ``inputs``, and the metrics it logged."""
    trainer = _trainer(cfg, logps.shape[0])
    trainer._get_per_token_logps_and_entropies = lambda *args, **kw: (logps, entropy, None)
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6


def _case(cfg: GRPOConfig, seed: int, groups: int = 3, on_policy: bool = False,
          items_scale: int = 1) -> None:
    """Ours and TRL's on one random batch: advantages and mask exactly, loss within 1e-6,
    gradient within 1e-5, every metric TRL logs."""
    gen = torch.Generator().manual_seed(seed)
    n = groups * G
    completions, truncated = _completions(n, gen)
    rewards = _rewards(n, gen)
    inputs = _trl_scored(cfg, completions, rewards)

    advantages = grpo.group_advantages(rewards, G, cfg.scale_rewards)
    lengths = torch.tensor([len(c) for c in completions])
    mask = grpo.completion_mask(lengths, truncated, WIDTH, cfg.mask_truncated_completions)
    assert torch.equal(advantages, inputs["advantages"])
    assert torch.equal(mask, inputs["completion_mask"])

    logps = -3 * torch.rand(n, WIDTH, generator=gen)
    entropy = 2 * torch.rand(n, WIDTH, generator=gen)
    old = logps + 0.3 * torch.randn(n, WIDTH, generator=gen)
    old[::2, :2] -= 2.0  # ratios of e^2 and more: past cispo's cap of 5, and delta
    old = None if on_policy else old
    ref = logps + 0.2 * torch.randn(n, WIDTH, generator=gen)
    if old is not None:
        inputs["old_per_token_logps"] = old
    inputs["ref_per_token_logps"] = ref
    inputs["num_items_in_batch"] = inputs["num_items_in_batch"] * items_scale
    theirs_logps = logps.clone().requires_grad_(True)
    theirs, logged = _trl_loss(cfg, inputs, theirs_logps, entropy)
    theirs.backward()

    ours_logps = logps.clone().requires_grad_(True)
    num_items = None if items_scale == 1 else inputs["num_items_in_batch"]
    ours, metrics = grpo.policy_loss(ours_logps, old, ref, advantages, mask, cfg,
                                     num_items=num_items, entropy=entropy)
    ours.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-6, (ours.item(), theirs.item())
    assert torch.allclose(ours_logps.grad, theirs_logps.grad, rtol=0, atol=1e-5)
    assert set(metrics) == set(logged)
    for name, value in logged.items():
        assert _same(metrics[name].item(), value), (name, metrics[name].item(), value)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("scale", grpo.SCALE_REWARDS)
@pytest.mark.parametrize("level", grpo.IMPORTANCE_LEVELS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("mask_truncated", [False, True])
def test_the_loss_equals_trls(loss_type, scale, level, beta, mask_truncated):
    """Every loss type, reward scaling, importance level, KL weight and truncation rule, with
    the DAPO paper's asymmetric clip (cispo: ScaleRL's cap of 5) and off-policy ratios wide
    enough to be clipped."""
    high = 5.0 if loss_type == "cispo" else 0.28
    cfg = GRPOConfig(loss_type=loss_type, scale_rewards=scale, importance_sampling_level=level,
                     beta=beta, mask_truncated_completions=mask_truncated, epsilon_high=high,
                     max_completion_length=10)
    _case(cfg, seed=zlib.crc32(repr(cfg).encode()))


@pytest.mark.parametrize("settings", [
    dict(loss_type="grpo", delta=1.5, beta=0.04),
    dict(loss_type="dapo", delta=1.3, importance_sampling_level="sequence"),
    dict(loss_type="dapo", delta=1.1, epsilon_high=0.28),  # the cap below the clip: TRL's metrics
    dict(loss_type="bnpo", beta=0.04, use_bias_correction_kl=False),
    dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False,
         importance_sampling_level="sequence"),
    dict(loss_type="dr_grpo", epsilon_low=0.1, epsilon_high=None),
])
def test_two_sided_clipping_and_the_uncorrected_kl_equal_trls(settings):
    """Under each of these settings (two-sided delta clipping, sequence-level ratios, the KL
    without bias correction, an uncapped high epsilon) our advantages, loss, gradient and metrics
    equal TRL's GRPOTrainer on the same batch, the reference the loss is checked against."""
    _case(GRPOConfig(**settings), seed=7)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_a_token_count_beyond_the_batch_divides_as_trls(loss_type):
    """dapo and cispo divide by the count they are given (TRL's num_items_in_batch, here three
    times this batch's own: a generation batch split into micro-batches)."""
    cfg = GRPOConfig(loss_type=loss_type, epsilon_high=5.0 if loss_type == "cispo" else None)
    _case(cfg, seed=3, items_scale=3)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_accumulated_micro_batches_equal_trls(loss_type, beta):
    """A generation batch over 2 accumulated micro-batches of unequal token counts: the sum of
    the weighted micro-batch losses (rollout.chunk_weight) and its gradient equal TRL's
    accumulated _compute_loss (each divided by its accumulation steps; dapo and cispo by the
    whole batch's tokens), and the logged metrics its mean of the micro-batches' values."""
    from codelm.training import rollout

    accumulation = 2
    cfg = GRPOConfig(loss_type=loss_type, beta=beta, max_completion_length=10,
                     epsilon_high=5.0 if loss_type == "cispo" else 0.28)
    gen = torch.Generator().manual_seed(11)
    n = 2 * G
    completions, _ = _completions(n, gen)
    completions[0] = [EOS]  # the first micro-batch's tokens fewer than the second's
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    inputs = _trl_scored(cfg, completions, rewards)
    mask = inputs["completion_mask"]
    logps = -3 * torch.rand(n, WIDTH, generator=gen)
    old = logps + 0.3 * torch.randn(n, WIDTH, generator=gen)
    ref = logps + 0.2 * torch.randn(n, WIDTH, generator=gen)
    entropy = 2 * torch.rand(n, WIDTH, generator=gen)
    chunks = torch.arange(n).tensor_split(accumulation)
    assert mask[chunks[0]].sum() != mask[chunks[1]].sum()

    theirs_logps = logps.clone().requires_grad_(True)
    theirs_total, theirs_logged = 0.0, defaultdict(list)
    for chunk in chunks:
        trainer = _trainer(cfg, len(chunk))
        trainer.current_gradient_accumulation_steps = accumulation
        trainer.args.steps_per_generation = accumulation
        part_logps = theirs_logps[chunk]
        trainer._get_per_token_logps_and_entropies = (
            lambda *args, lp=part_logps, c=chunk, **kw: (lp, entropy[c], None))
        part = {key: value[chunk] if torch.is_tensor(value) and value.dim() and len(value) == n
                else value for key, value in inputs.items()}
        part.update(old_per_token_logps=old[chunk], ref_per_token_logps=ref[chunk])
        loss = GRPOTrainer._compute_loss(trainer, None, part)
        loss.backward()
        theirs_total += loss.item()
        for name, values in trainer._metrics["train"].items():
            theirs_logged[name] += values

    ours_logps = logps.clone().requires_grad_(True)
    advantages = grpo.group_advantages(rewards, G, cfg.scale_rewards)
    tokens = mask.sum().clamp(min=1).float()
    ours_total, logged = 0.0, []
    for chunk in chunks:
        loss, metrics = grpo.policy_loss(ours_logps[chunk], old[chunk], ref[chunk],
                                         advantages[chunk], mask[chunk], cfg, num_items=tokens,
                                         entropy=entropy[chunk])
        loss = loss * rollout.chunk_weight(loss_type, len(chunk), n)
        loss.backward()
        ours_total += loss.item()
        logged.append(metrics)
    assert abs(ours_total - theirs_total) <= 1e-6, (ours_total, theirs_total)
    assert torch.allclose(ours_logps.grad, theirs_logps.grad, rtol=0, atol=1e-5)
    means = rollout.micro_batch_means(logged)
    for ours_name, name in (("entropy", "entropy"), ("kl", "kl"),
                            ("clip_ratio_low", "clip_ratio/low_mean")):
        if name in theirs_logged:
            values = theirs_logged[name]
            assert abs(means[ours_name] - sum(values) / len(values)) <= 1e-6, name


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_on_policy_the_loss_equals_trls(loss_type):
    """No old log-probs (one update per generation): the ratio is 1 and still carries the
    gradient, as TRL's detached copy does."""
    cfg = GRPOConfig(loss_type=loss_type, beta=0.04,
                     epsilon_high=5.0 if loss_type == "cispo" else None)
    _case(cfg, seed=11, on_policy=True)


@pytest.mark.parametrize("scale", grpo.SCALE_REWARDS)
def test_advantages_equal_trls_exactly(scale):
    """Bit for bit, over many draws and batch sizes (one group to eight)."""
    cfg = GRPOConfig(scale_rewards=scale)
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        n = G * (1 + seed % 8)
        completions, _ = _completions(n, gen)
        rewards = _rewards(n, gen)
        expected = _trl_scored(cfg, completions, rewards)["advantages"]
        assert torch.equal(grpo.group_advantages(rewards, G, scale), expected), seed


def _tiny_pair(tmp_path):
    """A tiny Llama as transformers holds it and as codelm loads it."""
    hf = save_tiny_hf("llama", tmp_path / "hf").eval()
    return hf, pretrained.load(tmp_path / "hf").eval()


def _prompted(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (3, 4 + 5) of left-padded prompts and right-padded completions, and their masks."""
    prompt_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    ids = torch.randint(3, VOCAB, (3, 9), generator=gen)
    ids = ids * torch.cat([prompt_mask, completion_mask], dim=1)  # pads are 0
    return ids, prompt_mask, completion_mask


def test_completion_logps_equal_trls_at_a_temperature(tmp_path):
    """Log-probs and entropies of the temperature-scaled distribution, as TRL's fused LM head
    gives them for the transformers model, left-padded prompts included."""
    hf, model = _tiny_pair(tmp_path)
    ids, prompt_mask, completion_mask = _prompted(torch.Generator().manual_seed(0))
    add_fused_lm_head(hf, temperature=0.7, outputs=("log_probs", "entropy"))
    trainer = _trainer(GRPOConfig(), 3)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    with torch.no_grad():
        expected, expected_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__(
            trainer, hf, ids, attention, 5, compute_entropy=True)
        logps, entropy = grpo.completion_logps(model, ids, completion_mask, prompt_mask,
                                               temperature=0.7)
    assert torch.allclose(logps, expected, atol=1e-5, rtol=0)
    assert torch.allclose(entropy, expected_entropy, atol=1e-5, rtol=0)


def _whole_logits_logps(model, ids: torch.Tensor, completion_mask: torch.Tensor,
                        prompt_mask: torch.Tensor, temperature: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The completions' log-probs and entropies from the whole (N, P + C, V) logits over
    ``temperature``: log_softmax of every position, the completion tokens' entries picked."""
    width = completion_mask.shape[1]
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    logits = model(ids, attention_mask=attention)[:, -width - 1:-1] / temperature
    logprobs = logits.log_softmax(-1)
    logps = logprobs.gather(-1, ids[:, -width:, None])[..., 0]
    entropy = -(logprobs.exp() * logprobs).sum(-1).detach()
    ignored = completion_mask == 0
    return logps.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_through_the_chunked_head_equal_the_whole_logits(tmp_path, temperature,
                                                                        monkeypatch):
    """In float64, the head's logits formed 4 positions at a time (chunks across rows and
    across a completion), left-padded prompts, right-padded completions: the log-probs, the
    entropies and the gradient of the GRPO loss (clipped ratios, the KL term) equal those of
    the whole logits, for every parameter, the LM head's included."""
    save_tiny_hf("llama", tmp_path / "hf")
    model = pretrained.load(tmp_path / "hf").eval().double()
    reference = pretrained.load(tmp_path / "hf").eval().double()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(4)
    ids, prompt_mask, completion_mask = _prompted(gen)
    advantages = torch.randn(3, generator=gen, dtype=torch.float64)
    cfg = GRPOConfig(loss_type="grpo", beta=0.04, temperature=temperature)
    chunks = []
    chunk_logits = kernels._chunk_logits
    monkeypatch.setattr(kernels, "_loss_chunk_rows", lambda vocab, device: 4)
    monkeypatch.setattr(kernels, "_chunk_logits",
                        lambda *args: chunks.append(len(args[0])) or chunk_logits(*args))

    def grads(logps_of) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        model.zero_grad()
        logps, entropy = logps_of(model)
        with torch.no_grad():
            ref, _ = logps_of(reference)
        old = logps.detach() + 0.3 * torch.randn(logps.shape, generator=gen.manual_seed(5),
                                                 dtype=torch.float64)
        loss, _ = grpo.policy_loss(logps, old, ref, advantages, completion_mask, cfg)
        loss.backward()
        return logps, entropy, ref, [p.grad.clone() for p in model.parameters()]

    logps, entropy, ref, chunked = grads(
        lambda m: grpo.completion_logps(m, ids, completion_mask, prompt_mask, temperature))
    assert chunks and max(chunks) == 4  # the fused head ran, 10 completion tokens in chunks
    expected = grads(lambda m: _whole_logits_logps(m, ids, completion_mask, prompt_mask,
                                                   temperature))
    torch.testing.assert_close(logps, expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, expected[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(ref, expected[2], rtol=0, atol=1e-12)
    assert logps[1, 2:].eq(0).all() and entropy[1, 2:].eq(0).all()
    for got, want in zip(chunked, expected[3]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def lora_model(path):
    """The tiny Llama with LoRA on attention and embeddings, the adapters moved off zero."""
    model = pretrained.load(path).eval()
    lora.apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj",
                                                                     "embed_tokens"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                p.add_(0.5 * torch.randn_like(p))
    return model


def test_the_lora_reference_is_the_base_without_a_second_model(tmp_path):
    """With the adapters off the LoRA model scores as the base loaded on its own, bit for bit,
    on the same parameters; after, the adapters are back and train."""
    save_tiny_hf("llama", tmp_path / "hf")
    base = pretrained.load(tmp_path / "hf").eval()
    model = lora_model(tmp_path / "hf")
    ids, prompt_mask, completion_mask = _prompted(torch.Generator().manual_seed(1))
    parameters = {id(p) for p in model.parameters()}

    ref = grpo.reference_logps(model, ids, completion_mask, prompt_mask, temperature=0.9)
    expected, _ = grpo.completion_logps(base, ids, completion_mask, prompt_mask, 0.9)
    assert torch.equal(ref, expected)
    assert {id(p) for p in model.parameters()} == parameters
    logps, _ = grpo.completion_logps(model, ids, completion_mask, prompt_mask, 0.9)
    assert not torch.allclose(logps, ref)
    logps.sum().backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_" in name)
    given = grpo.reference_logps(model, ids, completion_mask, prompt_mask, 0.9, reference=base)
    assert torch.equal(given, expected)


def test_the_lora_reference_scores_without_dropout_while_the_policy_trains(tmp_path):
    """A policy training with dropout: its base reference scores as the base in eval mode, the
    same on every call, and the policy is left training."""
    save_tiny_hf("llama", tmp_path / "hf")
    base = pretrained.load(tmp_path / "hf").eval()
    model = lora_model(tmp_path / "hf").train()
    model.cfg.dropout = 0.3
    ids, prompt_mask, completion_mask = _prompted(torch.Generator().manual_seed(3))
    expected, _ = grpo.completion_logps(base, ids, completion_mask, prompt_mask, 0.9)
    for _ in range(2):
        ref = grpo.reference_logps(model, ids, completion_mask, prompt_mask, temperature=0.9)
        assert torch.equal(ref, expected)
    assert model.training


def test_a_reference_that_is_not_the_base_is_refused(tmp_path):
    """With no reference model the LoRA base is the KL's reference: a model with no adapters, one
    whose LoRA trains base tensors (bias), or one merged are refused, as their base is not the
    starting model."""
    save_tiny_hf("llama", tmp_path / "hf")
    model = pretrained.load(tmp_path / "hf").eval()
    ids, prompt_mask, completion_mask = _prompted(torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="^beta > 0 needs a reference model"):
        grpo.reference_logps(model, ids, completion_mask, prompt_mask)
    lora.apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], bias="all"))
    with pytest.raises(ValueError, match="trains base tensors"):
        grpo.reference_logps(model, ids, completion_mask, prompt_mask)
    merged = pretrained.load(tmp_path / "hf").eval()
    lora.apply_lora(merged, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lora.merge_lora(merged)
    with pytest.raises(ValueError, match="unmerge_lora"):
        grpo.reference_logps(merged, ids, completion_mask, prompt_mask)


@pytest.mark.parametrize("settings, message", [
    (dict(loss_type="ppo"), "loss_type 'ppo': must be one of grpo, dr_grpo, dapo, bnpo, cispo"),
    (dict(scale_rewards="std"), "scale_rewards 'std': must be one of group, batch, none"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level 'seq'"),
    (dict(epsilon_low=1.0), "epsilon_low 1.0: must be in [0, 1)"),
    (dict(epsilon_high=-0.1), "epsilon_high -0.1: must be >= 0"),
    (dict(loss_type="cispo"), "loss_type cispo caps the ratio at epsilon_high, 0.2"),
    (dict(loss_type="cispo", epsilon_high=5.0, delta=2.0), "loss_type cispo has its own cap"),
    (dict(delta=1.0), "delta 1.0: must be > 1"),
    (dict(beta=-0.1), "beta -0.1: must be a finite number >= 0"),
    (dict(max_completion_length=0), "max_completion_length 0: must be >= 1"),
    (dict(temperature=0.0), "temperature 0.0: must be > 0"),
])
def test_bad_settings_are_refused_in_one_line(settings, message):
    """A GRPOConfig setting out of its range or choices is refused in one line naming the setting,
    its value and what it takes, before any sampling."""
    with pytest.raises(ValueError) as caught:
        GRPOConfig(**settings)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_bad_groups_and_a_missing_reference_are_refused():
    """A group of one, rewards that do not split into whole groups, an unknown reward scale, and a
    KL weight without reference log-probs are each refused saying what is wrong."""
    with pytest.raises(ValueError, match="^group size 1: GRPO compares at least 2"):
        grpo.group_advantages(torch.ones(4), 1, "group")
    with pytest.raises(ValueError, match=r"^\(6,\) rewards: .* groups of 4$"):
        grpo.group_advantages(torch.ones(6), 4, "group")
    with pytest.raises(ValueError, match="^scale 'std'"):
        grpo.group_advantages(torch.ones(8), 4, "std")
    logps = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="^beta 0.04 weighs a KL term.*pass ref_logps"):
        grpo.policy_loss(logps, None, None, torch.zeros(2), torch.ones(2, 3),
                         GRPOConfig(beta=0.04))


@pytest.mark.parametrize("flag, losses_own", [
    ("--grpo-loss-type", grpo.LOSS_TYPES), ("--scale-rewards", grpo.SCALE_REWARDS)])
def test_the_runs_grpo_choices_are_the_losses_own(flag, losses_own):
    """The trainer's flags offer exactly the loss types and reward scalings the loss computes."""
    from codelm import trainconfig

    action = next(a for a in trainconfig.build_parser()._actions if flag in a.option_strings)
    assert [c for c in action.choices if c is not None] == list(losses_own)
