"""Task grpo in trainingmanager's one loop: a tiny model, fine-tuned to answer 1 or 2 where its
problems' tests want 1, sampled, rewarded by the sandboxed tests and updated; the metrics each
step logs, micro-batches that give one batch's gradient (codelm.training.grpo's TRL loss), the
reward of partial credit and the control arm's shuffle, the bad inputs refused in one line, and
kill -9 during sampling, verdicts or the update, then --resume, ending bit-exactly on an
uninterrupted run's weights."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import trainingmanager as tm
from codelm import kernels, trainconfig
from codelm.data.problems import generate_problems
from codelm.evaluation.tasks.passk import run_check
from codelm.models import pretrained
from codelm.runtime.settings import fields_of
from codelm.sandbox import runner
from codelm.sandbox.runner import SandboxConfig
from codelm.training import grpo, rewards, rollout
from codelm.training.trainer import StepAbandoned
from tokenizer import CodeTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
METRICS = ("loss", "grad_norm", "reward_mean", "reward_std", "pass_rate", "equal_reward_groups",
           "completion_length", "truncated", "hack_rate", "entropy", "clip_ratio", "sampling_s",
           "verdicts_s", "update_s", "samples_per_s", "verdicts_per_s")


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-exact comparisons between processes


def grpo_trainer(model: torch.nn.Module, cfg: trainconfig.TrainConfig, tok, problems: list[dict]
                 ) -> rollout.GRPOTrainer:
    """Task grpo's trainer of ``model`` on the CPU, with the settings a run takes of ``cfg``."""
    step_settings = trainconfig.StepSettings(**fields_of(trainconfig.StepSettings, cfg))
    grpo_settings = trainconfig.GRPOSettings(**fields_of(trainconfig.GRPOSettings, cfg))
    return rollout.GRPOTrainer(model, step_settings, grpo_settings, torch.device("cpu"), tok,
                               False, problems)


def problem(i: int, answer: int = 1) -> dict:
    """Function f{i} returning ``answer``: the prompt ends at ``return``."""
    return {"task_id": f"easy/{i}", "prompt": f"def f{i}(x):\n    return ",
            "entry_point": f"f{i}", "canonical_solution": f"{answer}\n",
            "test": f"def check(candidate):\n    assert candidate(0) == {answer}\n"}


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model fine-tuned to complete ``return `` with 1 or 2 (half each), and problems
    whose tests want 1: its samples earn differing rewards, so GRPO has something to learn."""
    root = tmp_path_factory.mktemp("grpo")
    pairs = [{"prompt": problem(i)["prompt"], "completion": f"{1 + (i + j) % 2}\n"}
             for i in range(8) for j in range(6)]
    data = write_jsonl(root / "pairs.jsonl", pairs)
    texts = [p["prompt"] + p["completion"] for p in pairs] + ["def f(x):\n    return 3\n"] * 3
    tok = CodeTokenizer.train(texts, min_freq=1)
    tok.save(root)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    sft = tm.train(trainconfig.TrainConfig(
        task="completion", data=[data], tokenizer=str(root / "tokenizer.json"), preset="tiny",
        block_size=32, batch_size=8, packing=False, max_steps=40, lr=3e-3, warmup_steps=2,
        eval_every=40,
        progress=False, out_dir=str(root / "runs"), name="sft", final_eval=False,
        sample_tokens=4, report_to=["none"],
        data_options={"cache_dir": str(root / "cache"), "progress": False}))
    torch.set_num_threads(before)
    return {"model": str(sft.export_dir), "root": root,
            "train": write_jsonl(root / "train.jsonl", [problem(i) for i in range(6)]),
            "val": write_jsonl(root / "val.jsonl", [problem(i) for i in range(6, 8)])}


def grpo_cfg(assets, tmp_path, **overrides) -> trainconfig.TrainConfig:
    values = dict(task="grpo", init_from=assets["model"], problems=assets["train"],
                  val_problems=assets["val"], num_generations=4, batch_size=2, max_steps=4,
                  max_completion_tokens=4, lr=1e-3, warmup_steps=0, eval_every=4, log_every=1,
                  save_every=2, keep_last=5, progress=False, export=False,
                  out_dir=str(tmp_path / "runs"), name="run", report_to=["none"])
    values.update(overrides)
    return trainconfig.TrainConfig(**values)


def logged(run_dir: Path, kind: str) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry["kind"] == kind]


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    """An uninterrupted run of grpo_cfg's 4 steps, its problems checked afresh (as
    own_problem_checks does for a test): its run directory and what it printed."""
    import contextlib
    import io

    from codelm.evaluation.tasks import passk

    tmp = tmp_path_factory.mktemp("straight")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out, err = io.StringIO(), io.StringIO()
    checks_path = passk.checks_path
    try:
        with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            monkeypatch.setattr(passk, "checks_path", lambda problems, sandbox: (
                tmp / "problem-checks" / checks_path(problems, sandbox).name))
            result = tm.train(grpo_cfg(assets, tmp, name="straight"))
    finally:
        torch.set_num_threads(before)
    return {"run_dir": result.run_dir, "out": out.getvalue(), "err": err.getvalue()}


def test_a_grpo_run_samples_scores_and_logs_each_step(straight):
    """Each step's line holds the rewards, pass rate, KL-free loss metrics, timings and
    throughput; the samples differ in reward, so the loss moves the weights; an evaluation
    scores the held-out problems' greedy pass@1. The problems' check before it is announced.
    (The run: ``straight``, grpo_cfg's.)"""
    train = logged(straight["run_dir"], "train")
    assert [entry["step"] for entry in train] == [1, 2, 3, 4]
    for entry in train:
        assert set(METRICS) <= entry.keys(), set(METRICS) - entry.keys()
        assert 0.0 <= entry["reward_mean"] <= 1.0 and entry["hack_rate"] == 0.0
    assert any(entry["reward_std"] > 0 and entry["loss"] != 0 for entry in train)
    (val,) = logged(straight["run_dir"], "val")
    assert val["val_pass@1"] in (0.0, 0.5, 1.0) and val["val_loss"] == 1.0 - val["val_pass@1"]
    out, err = straight["out"], straight["err"]
    assert "| reward_mean " in out and "val pass@1 " in out
    assert re.search(r"\b6 training problems, 4 steps \(\S+ epochs of 6 problems\)", out)
    for key, n in (("problems", 6), ("val_problems", 2)):  # the check before training
        assert re.search(rf"(?m)^{key}: running each of {n} problems' canonical solution "
                         "against its test", err)


def test_the_end_of_run_sample_is_as_long_as_the_completions_it_trained_on(assets, tmp_path,
                                                                          monkeypatch):
    """A GRPO run's sample has at most max_completion_tokens new tokens (not sample_tokens'
    96): what its completions were, and what its evaluation samples."""
    from codelm.training import finish

    asked = []
    monkeypatch.setattr(finish, "sample_completion", lambda *a: asked.append(a[3]) or "")
    tm.train(grpo_cfg(assets, tmp_path, max_steps=1, eval_every=1, export=True,
                      final_eval=False))
    assert asked == [4]


@pytest.mark.slow
def test_grpo_raises_the_reward_and_the_shuffled_control_does_not(assets, tmp_path):
    """The same run's compute with the rewards shuffled within each batch: the real rewards
    rise over the run, the control's do not rise as far."""
    common = dict(max_steps=16, eval_every=16, save_every=16, batch_size=3, num_generations=8)
    real = logged(tm.train(grpo_cfg(assets, tmp_path, name="real", **common)).run_dir, "train")
    control = logged(tm.train(grpo_cfg(assets, tmp_path, name="control", shuffle_rewards=True,
                                       **common)).run_dir, "train")

    def late(entries: list[dict]) -> float:
        return sum(e["reward_mean"] for e in entries[-4:]) / 4

    early = sum(e["reward_mean"] for e in real[:4]) / 4
    assert late(real) > early + 0.2
    assert late(real) > late(control) + 0.2


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_a_step_batch_masks_truncated_completions_only_when_asked(mask_truncated):
    """completion_batch lays each prompt left-padded before its completion, and its completion
    mask counts a completion's tokens, none of one the length limit cut off where
    mask_truncated_completions is on (TRL's rule: the mask times not is_truncated)."""
    completions = [rollout.Completion([5, 6], [7, 8, 9], False, "a"),
                   rollout.Completion([5], [7, 8, 9, 10], True, "b"),
                   rollout.Completion([5, 6, 7], [8], False, "c")]
    batch = rollout.completion_batch(completions, torch.device("cpu"), mask_truncated)
    assert batch.ids.tolist() == [[0, 5, 6, 7, 8, 9, 0], [0, 0, 5, 7, 8, 9, 10],
                                  [5, 6, 7, 8, 0, 0, 0]]
    assert batch.prompt_mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    cut = [0, 0, 0, 0] if mask_truncated else [1, 1, 1, 1]
    assert batch.completion_mask.tolist() == [[1, 1, 1, 0], cut, [1, 0, 0, 0]]


def test_the_trainers_loss_takes_each_grpo_setting_of_the_run(assets, tmp_path):
    """Every loss setting of a run's config, each off its default, reaches the GRPO trainer's
    loss config under TRL's name: none of them is dropped on the way to the policy loss."""
    cfg = grpo_cfg(assets, tmp_path, grpo_loss_type="bnpo", scale_rewards="batch",
                   epsilon_low=0.1, epsilon_high=0.3, grpo_beta=0.05, mask_truncated=True,
                   max_completion_tokens=5, temperature=0.7)
    tok = load_tokenizer(Path(assets["model"]) / "tokenizer.json")
    model = pretrained.load(assets["model"], device="cpu")
    trainer = grpo_trainer(model, cfg, tok, [problem(0)])
    expected = grpo.GRPOConfig(loss_type="bnpo", scale_rewards="batch", epsilon_low=0.1,
                               epsilon_high=0.3, beta=0.05, mask_truncated_completions=True,
                               max_completion_length=5, temperature=0.7)
    assert trainer.loss_cfg == expected


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_micro_batches_give_the_whole_batchs_loss_and_gradient(assets, tmp_path, loss_type):
    """grad_accum 3 over a step's completions of a real model: the summed loss and the
    gradients equal grpo.policy_loss's (TRL's) on the whole batch at once (bnpo: the mean of
    the micro-batches' own, TRL's local normalization), the entropy the mean of theirs."""
    high = 5.0 if loss_type == "cispo" else None
    cfg = grpo_cfg(assets, tmp_path, grpo_loss_type=loss_type, epsilon_high=high, grad_accum=3,
                   num_generations=3, warmup_steps=0, max_steps=10)
    tok = load_tokenizer(Path(assets["model"]) / "tokenizer.json")
    model = pretrained.load(assets["model"], device="cpu")
    problems = [problem(i) for i in range(2)]
    trainer = grpo_trainer(model, cfg, tok, problems)
    completions = trainer.sample(problems, 1)
    earned = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    loss, _, metrics = trainer.backward(completions, rollout.Scored(earned, earned, [False] * 6,
                                                                    6), False)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    batch = rollout.completion_batch(completions, torch.device("cpu"),
                                     trainer.loss_cfg.mask_truncated_completions)
    logps, entropy = grpo.completion_logps(model, batch.ids, batch.completion_mask,
                                           batch.prompt_mask, trainer.loss_cfg.temperature)
    advantages = grpo.group_advantages(earned, 3, cfg.scale_rewards)
    mask = batch.completion_mask
    chunks = torch.arange(6).tensor_split(3)
    parts = [grpo.policy_loss(logps[c], None, None, advantages[c], mask[c], trainer.loss_cfg,
                              num_items=mask.sum().clamp(min=1).float(), entropy=entropy[c])
             for c in chunks]
    if loss_type == "bnpo":
        whole = sum(part_loss for part_loss, _ in parts) / 3
    else:
        whole = grpo.policy_loss(logps, None, None, advantages, mask, trainer.loss_cfg)[0]
    whole.backward()
    assert abs(float(loss) - float(whole.detach())) < 1e-6
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5)
    entropies = [float(part_metrics["entropy"]) for _, part_metrics in parts]
    assert abs(metrics["entropy"] - sum(entropies) / 3) < 1e-5


def test_a_lora_run_takes_its_base_as_the_kl_reference(assets, tmp_path):
    """grpo_beta > 0 under LoRA: no second model; the KL to the base is 0 before the first
    update and positive after it."""
    result = tm.train(grpo_cfg(assets, tmp_path, lora_r=4, lora_alpha=8.0, grpo_beta=0.1,
                               max_steps=2, eval_every=2, save_every=2, lr=3e-2))
    train = logged(result.run_dir, "train")
    assert train[0]["kl"] == 0.0 and train[-1]["kl"] > 0.0


def test_a_lora_run_from_an_adapter_takes_the_model_it_starts_from_as_the_kl_reference(
        assets, tmp_path):
    """--init-adapter with grpo_beta > 0: the reference is the base with that adapter (the
    model the run starts from), not the bare base: the KL is 0 before the first update."""
    from tiny_hf import save_random_adapter

    adapter = save_random_adapter(Path(assets["model"]), tmp_path / "adapter")
    result = tm.train(grpo_cfg(assets, tmp_path, init_adapter=str(adapter), grpo_beta=0.1,
                               max_steps=1, eval_every=1, save_every=1))
    assert logged(result.run_dir, "train")[0]["kl"] == 0.0


def test_a_resumed_run_from_an_adapter_keeps_that_adapter_as_the_kl_reference(assets,
                                                                              tmp_path):
    """Resumed, an --init-adapter run's model holds the adapter's layout until the checkpoint
    restores the trained weights: its reference is still the base with the init adapter, so
    the step after the resume logs the KL the uninterrupted run logged."""
    from tiny_hf import save_random_adapter

    adapter = save_random_adapter(Path(assets["model"]), tmp_path / "adapter")
    cfg = grpo_cfg(assets, tmp_path, init_adapter=str(adapter), grpo_beta=0.5, max_steps=2,
                   eval_every=2, save_every=1, lr=3e-2)
    run_dir = tm.train(cfg).run_dir
    uninterrupted = [line["kl"] for line in logged(run_dir, "train")]
    shutil.rmtree(run_dir / "checkpoints" / "step-2")  # killed before step 2's checkpoint
    tm.train(dataclasses.replace(cfg, resume=str(run_dir)))
    assert [line["kl"] for line in logged(run_dir, "train")] == uninterrupted
    assert uninterrupted[1] > 0.0


def test_a_full_fine_tune_keeps_a_frozen_copy_as_the_kl_reference(assets, tmp_path):
    """grpo_beta > 0 training every weight: the reference is the starting model, frozen apart
    from the policy, which moves away from it."""
    cfg = grpo_cfg(assets, tmp_path, grpo_beta=0.1, lr=3e-2)
    tok = load_tokenizer(Path(assets["model"]) / "tokenizer.json")
    problems = [problem(i) for i in range(2)]
    model = pretrained.load(assets["model"], device="cpu")
    trainer = grpo_trainer(model, cfg, tok, problems)
    reference = trainer.reference
    assert reference is not None and reference is not model
    assert not any(p.requires_grad for p in reference.parameters())
    start = {n: p.clone() for n, p in reference.named_parameters()}
    kls = [trainer.train_step(problems).metrics["kl"] for _ in range(2)]
    assert kls[0] == 0.0 and kls[-1] > 0.0
    assert all(torch.equal(start[n], p) for n, p in reference.named_parameters())


def test_partial_credit_counts_the_asserts_that_hold_and_no_exploit_earns_any():
    """A generated problem's ten asserts: the solution earns 1, a half-right body 0.5; an
    early exit, a forged count and every exploit of the corpus earn 0."""
    (generated,) = generate_problems(1, 0)
    assert generated["canonical_solution"] == "    for _ in range(2):\n        x = 3 * x\n    return x\n"
    jobs = [(generated, generated["canonical_solution"]),
            (generated, "    return 9 * x if x < 10 else 0\n"),  # 5 of its 10 inputs are < 10
            (generated, "    import sys\n    sys.exit(0)\n"),
            (generated, "    print('codelm-credit-0:10/10')\n    return 0\n")]
    jobs += [(generated, rewards.exploit_completion(generated, source))
             for source in rewards.exploits().values()]
    earned = rewards.partial_rewards(jobs, run_check, SandboxConfig(timeout_s=2.0), workers=2)
    assert earned[:4] == [1.0, 0.5, 0.0, 0.0]
    assert len(earned[4:]) >= 25 and set(earned[4:]) == {0.0}


def test_the_control_arm_permutes_the_rewards_within_the_step(assets, tmp_path, monkeypatch):
    """shuffle_rewards: the loss sees the step's rewards permuted (the same ones, drawn from the
    run's seed and the step); the logged rewards stay the true ones. The sandbox scores the
    completions twice (the same rewards both times); steps 1 to 5 permute those verdicts."""
    cfg = grpo_cfg(assets, tmp_path, shuffle_rewards=True, num_generations=8)
    tok = load_tokenizer(Path(assets["model"]) / "tokenizer.json")
    problems = [problem(i) for i in range(2)]
    trainer = grpo_trainer(pretrained.load(assets["model"], device="cpu"), cfg, tok, problems)
    completions = trainer.sample(problems, 1)
    verdicts = {}

    def keeping(name: str):
        real = getattr(rewards, name)

        def kept(*args, **kwargs):
            verdicts[name] = real(*args, **kwargs)
            return verdicts[name]
        return kept

    for name in ("scores", "hacks"):  # the sandbox's verdicts of these completions, kept
        monkeypatch.setattr(rewards, name, keeping(name))
    first = trainer.score(problems, completions, 1)
    again = trainer.score(problems, completions, 1)
    assert torch.equal(first.rewards, again.rewards)
    assert sorted(first.rewards.tolist()) == sorted(first.true_rewards.tolist())
    for name in ("scores", "hacks"):  # the later steps permute the same verdicts, not run again
        monkeypatch.setattr(rewards, name, lambda *args, _name=name, **kwargs: verdicts[_name])
    orders = {tuple(trainer.score(problems, completions, step).rewards.tolist())
              for step in range(1, 6)}
    assert len(orders) > 1


def test_the_reference_copy_holds_the_model_not_a_copy_of_the_trainer(assets, tmp_path):
    """A full fine-tune's frozen reference is a copy of the model alone: its blocks' stop
    hooks reach the trainer's own stop (a stop during its forward is seen), not a copy's."""
    cfg = grpo_cfg(assets, tmp_path, grpo_beta=0.1)
    tok = load_tokenizer(Path(assets["model"]) / "tokenizer.json")
    trainer = grpo_trainer(pretrained.load(assets["model"], device="cpu"), cfg, tok,
                           [problem(i) for i in range(2)])
    ids = torch.zeros((1, 4), dtype=torch.long)
    trainer.reference(ids)  # no stop pending: the forward runs
    trainer.stop_pending = lambda: True
    with pytest.raises(StepAbandoned):
        trainer.reference(ids)


def test_equal_reward_groups_counts_the_true_rewards_in_the_control_arm(assets, tmp_path):
    """The share of problems whose G rewards are all equal is a property of the true rewards
    (one problem always passing, one always failing: both equal), whatever permutation the
    control arm's loss sees."""
    cfg = grpo_cfg(assets, tmp_path, shuffle_rewards=True, num_generations=2)
    tok = load_tokenizer(Path(assets["model"]) / "tokenizer.json")
    trainer = grpo_trainer(pretrained.load(assets["model"], device="cpu"), cfg, tok,
                           [problem(i) for i in range(2)])
    scored = rollout.Scored(rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]),
                            true_rewards=torch.tensor([1.0, 1.0, 0.0, 0.0]),
                            hacked=[False] * 4, runs=4)
    completions = [rollout.Completion([1], [2], False, "x")] * 4
    assert trainer._reward_metrics(scored, completions)["equal_reward_groups"] == 1.0


def test_problems_of_one_task_id_in_two_files_are_each_sampled_from_their_own_prompt(assets):
    """A training and a validation problem may share an id (files from two sources): each is
    prompted with its own text."""
    cfg = trainconfig.TrainConfig(task="grpo", problems=assets["train"], max_completion_tokens=8)
    settings = trainconfig.GRPOSettings(**fields_of(trainconfig.GRPOSettings, cfg))
    tok = load_tokenizer(assets["model"])
    sampler = rollout.Sampler(tok, [tok.eos_id], False, settings, context=64)
    train, val = problem(0), {**problem(1), "task_id": problem(0)["task_id"]}
    assert sampler.prompt_ids(train) != sampler.prompt_ids(val)
    assert sampler.prompt_ids(val) == rollout.Sampler(tok, [tok.eos_id], False, settings,
                                                      64).prompt_ids(val)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs CUDA"))])
def test_a_compiled_sampler_keeps_one_engine_and_samples_what_an_eager_one_does(assets, device,
                                                                             monkeypatch):
    """With compile, one engine serves the whole run (its compiled step kept, sized to the first
    call): after the weights change in place (as an optimizer step changes them), its sampled
    and greedy completions still equal those of an engine made for the call, for calls of as
    many completions as its slots, fewer and more; another model, or a prompt longer than any
    before, gets an engine of its own. A run compiles its sampler on CUDA only: on the CPU the
    compiled step is stood in by the eager one, so the engine's keeping is what is compared
    (test_engine's compiled engine reads weights changed in place too)."""
    if device == "cpu":
        monkeypatch.setattr(kernels, "compile_decode_step", lambda step, *args: step)
    cfg = trainconfig.TrainConfig(task="grpo", problems=assets["train"], max_completion_tokens=8)
    settings = trainconfig.GRPOSettings(**fields_of(trainconfig.GRPOSettings, cfg))
    tok = load_tokenizer(assets["model"])
    model = pretrained.load(assets["model"], device=device).eval()
    context = model.cfg.block_size
    eager = rollout.Sampler(tok, [tok.eos_id], False, settings, context)
    compiled = rollout.Sampler(tok, [tok.eos_id], False, settings, context, compile=True)
    problems = [problem(i) for i in range(3)]
    for sampler in (eager, compiled):
        for p in problems:  # as GRPOTrainer registers every problem's prompt first
            sampler.prompt_ids(p)
    for round in range(2):
        calls = [(problems[:2], 3, 1.0, list(range(6))),  # the first: six slots
                 (problems, 1, 0.0, None),  # fewer completions than slots, greedy
                 (problems, 3, 1.0, list(range(10, 19)))]  # more than slots
        for call in calls:
            assert compiled.complete(model, *call) == eager.complete(model, *call), round
        assert len(compiled.engine.rows) == 6
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(1.5)
    longer = {**problem(7), "prompt": "def f7(x):\n    y = x\n    return "}
    other = pretrained.load(assets["model"], device=device).eval()  # another model, as loaded
    for call in [([longer], 2, 1.0, [3, 4]), (problems, 1, 0.0, None)]:  # a longer prompt
        assert compiled.complete(other, *call) == eager.complete(other, *call)
    assert compiled.engine.model is other and compiled.engine.max_len == min(
        context, len(compiled.prompt_ids(longer)) + settings.max_completion_tokens - 1)


def test_prompts_too_long_for_their_completions_are_refused_at_once_naming_the_fixes(assets):
    """Every problem's prompt is checked before a step, and one error counts those that leave
    their completions too little room, names the longest prompt and the context that fits them
    all; lowering max_completion_tokens is offered only where every prompt leaves some room."""
    cfg = trainconfig.TrainConfig(task="grpo", problems=assets["train"], max_completion_tokens=8)
    settings = trainconfig.GRPOSettings(**fields_of(trainconfig.GRPOSettings, cfg))
    tok = load_tokenizer(assets["model"])
    short, long = problem(0), {**problem(1), "prompt": problem(1)["prompt"] + "    # more\n" * 4}
    length = len(rollout.Sampler(tok, [tok.eos_id], False, settings, 64).prompt_ids(long))
    rollout.Sampler(tok, [tok.eos_id], False, settings, length + 8).check_room([short, long])
    with pytest.raises(ValueError) as refused:  # the validation problems: the training ones
        rollout.Sampler(tok, [tok.eos_id], False, settings, length + 4).check_room(
            [short, long, short, long])
    message = str(refused.value)
    assert message.startswith(f"1 of 2 problems ({long['task_id']})")
    same_id = {**long, "task_id": short["task_id"]}  # a validation problem of a training id
    with pytest.raises(ValueError, match=r"^1 of 2 problems"):
        rollout.Sampler(tok, [tok.eos_id], False, settings, length + 4).check_room(
            [short, same_id])
    assert f"a context of {length + 8} fits every one (--block-size" in message
    assert "max_completion_tokens 4 fits them" in message and "no room" not in message
    with pytest.raises(ValueError) as refused:
        rollout.Sampler(tok, [tok.eos_id], False, settings, length).check_room([short, long])
    message = str(refused.value)
    assert (f"(the longest prompt, {long['task_id']}, takes {length}, no room for a completion)"
            in message)
    assert "fits them in this one" not in message


# ---- Bad input: one line naming the fix ----

def fails(argv: list[str], capsys) -> str:
    assert tm.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


def grpo_argv(assets, tmp_path, *more: str, model: tuple[str, ...] | None = None,
              length: tuple[str, ...] = ("--max-steps", "2")) -> list[str]:
    model = ("--init-from", assets["model"]) if model is None else model
    return ["--task", "grpo", *model, "--problems", assets["train"], *length, "--batch-size",
            "2", "--num-generations", "2", "--max-completion-tokens", "4", "--no-progress",
            "--no-export", "--report-to", "none", "--out-dir", str(tmp_path / "runs"), *more]


def test_a_group_of_one_is_refused(assets, tmp_path, capsys):
    """--num-generations 1 is refused naming the flag and 2 or more: a group of one has no
    advantage to learn from."""
    line = fails(grpo_argv(assets, tmp_path, "--num-generations", "1"), capsys)
    assert "num_generations (1, --num-generations)" in line and "2 or more" in line


def test_packing_is_refused_for_grpo(assets, tmp_path, capsys):
    """GRPO pads each prompt and its completions in their batch: --packing would do nothing."""
    line = fails(grpo_argv(assets, tmp_path, "--packing"), capsys)
    assert "packing (True, --packing)" in line and "drop packing" in line


@pytest.mark.parametrize("flag, value", [("--grpo-beta", "inf"), ("--temperature", "inf"),
                                         ("--reward-timeout-s", "nan")])
def test_a_setting_that_is_not_a_finite_number_is_refused_by_its_flag(assets, tmp_path, capsys,
                                                                      flag, value):
    """An inf or nan beta, temperature or reward timeout is refused naming its flag, before it
    turns every loss or wait into nan or forever."""
    line = fails(grpo_argv(assets, tmp_path, flag, value), capsys)
    assert f"{flag})" in line and "must be finite" in line


def test_grpo_settings_need_task_grpo_and_a_length(assets, tmp_path, capsys):
    """GRPO's settings without --task grpo are refused naming them and the task to set, and a GRPO
    run with no max_steps or epochs is told to set one, not run without end."""
    line = fails(["--num-generations", "4", "--partial-credit", "--max-steps", "1"], capsys)
    assert "num_generations" in line and "partial_credit" in line and "set task grpo" in line
    assert "set max_steps or epochs" in fails(grpo_argv(assets, tmp_path, length=()), capsys)


def test_a_problem_whose_solution_fails_its_test_is_refused_before_training(assets, tmp_path,
                                                                            capsys):
    """A problem whose canonical solution fails its own test is refused naming the file, --problems
    and the problem, before training: its reward would teach nothing."""
    broken = {**problem(9), "canonical_solution": "2\n"}
    path = write_jsonl(tmp_path / "broken.jsonl", [problem(0), broken])
    argv = grpo_argv(assets, tmp_path, "--problems", path)
    line = fails(argv, capsys)
    assert f"problems ({path!r}, --problems)" in line and "easy/9" in line
    assert "canonical solutions fail" in line and "fix or drop them" in line
    assert not list((tmp_path / "runs").glob("*/checkpoints"))


def test_a_tokenizer_without_an_end_of_text_token_is_refused(assets, tmp_path, capsys):
    """A tokenizer with no end-of-text token is refused saying to use one with an EOS: a GRPO sample could never end
    before its length."""
    texts = [problem(i)["prompt"] + "1\n" for i in range(8)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    model = ("--preset", "tiny", "--tokenizer", str(tmp_path / "tok" / "tokenizer.json"))
    line = fails(grpo_argv(assets, tmp_path, model=model), capsys)
    assert "no end-of-text token" in line and "use a tokenizer with an EOS token" in line


def test_rewards_equal_in_every_group_are_named_with_the_fix(assets, tmp_path, capsys):
    """Problems wanting 3, which the model never writes: every reward 0, warned once."""
    path = write_jsonl(tmp_path / "threes.jsonl", [problem(i, answer=3) for i in range(4)])
    assert tm.main(grpo_argv(assets, tmp_path, "--problems", path)) == 0
    err = capsys.readouterr().err
    assert err.count("equal rewards for 2 step(s) in a row") == 1
    assert "the model solves none" in err and "partial_credit" in err


def test_rewards_lost_after_earlier_ones_are_named_a_collapse(capsys):
    """A run whose earlier steps earned rewards and whose completions now all earn 0 has
    collapsed: the warning names the lr and a KL term, not a model that never solved one."""
    import types

    from codelm.runs.checkpoint import RunState
    from codelm.runtime.distributed import Dist

    trainer = types.SimpleNamespace(
        warn_after=None, run_state=RunState(step=0, max_steps=2), silent_steps=0, dist=Dist(),
        grpo_settings=types.SimpleNamespace(num_generations=2, partial_credit=False,
                                            grpo_beta=0.0),
        settings=types.SimpleNamespace(lr=1e-3), rewarded=False)
    for step_rewards in ([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]):  # all pass, then none
        scored = types.SimpleNamespace(true_rewards=torch.tensor(step_rewards))
        rollout.GRPOTrainer._warn_without_signal(trainer, scored)
    err = capsys.readouterr().err
    assert "equal rewards for 2 step(s) in a row" in err and "policy collapsed" in err
    assert "lower lr (now 0.001" in err and "or a KL term (grpo_beta)" in err
    assert "solves none" not in err
    trainer.grpo_settings.grpo_beta, trainer.silent_steps = 0.04, 1  # a KL term already
    rollout.GRPOTrainer._warn_without_signal(trainer, scored)
    assert "a larger KL term (grpo_beta, now 0.04)" in capsys.readouterr().err


def test_a_resumed_run_without_signal_is_warned_too(assets, tmp_path, capsys):
    """The warning counts the steps a process trains: resumed with 1 of 2 steps left, every
    reward 0, the run is warned after that 1, not after the run's 2."""
    path = write_jsonl(tmp_path / "threes.jsonl", [problem(i, answer=3) for i in range(4)])
    argv = grpo_argv(assets, tmp_path, "--problems", path, "--save-every", "1", "--keep-last",
                     "2", "--name", "r", length=("--max-steps", "2"))
    assert tm.main(argv) == 0
    assert "equal rewards for 2 step(s) in a row" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "r"
    shutil.rmtree(run_dir / "checkpoints" / "step-2")  # killed after step 1's checkpoint
    assert tm.main(["--resume", str(run_dir), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "equal rewards for 1 step(s) in a row" in err and "2 step(s)" not in err


def test_a_sandbox_that_cannot_confine_is_refused(assets, tmp_path, capsys, monkeypatch):
    """Where the sandbox cannot confine the generated code (no Landlock) GRPO is refused with the
    reason and the kernel it needs, not run unconfined."""
    monkeypatch.setattr(runner, "confinement", lambda: "this kernel offers no Landlock")
    line = fails(grpo_argv(assets, tmp_path), capsys)
    assert "cannot confine" in line and "no Landlock" in line and "Landlock (5.13+)" in line


# ---- kill -9 during sampling, verdicts or the update; then --resume ----

KILLER = r"""
import os, signal, sys
from codelm.training import rollout
import trainingmanager as tm

phase, at, sig = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3])
original = getattr(rollout.GRPOTrainer, phase)
calls = [0]

def killed(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), sig)
    return original(self, *args, **kwargs)

setattr(rollout.GRPOTrainer, phase, killed)
sys.exit(tm.main(sys.argv[4:]))
"""


def straight_weights(straight) -> dict:
    """The uninterrupted run's final weights (step 4)."""
    return load_file(straight["run_dir"] / "checkpoints" / "step-4" / "model.safetensors")


@pytest.mark.parametrize("phase", [
    "sample", pytest.param("score", marks=pytest.mark.slow),
    pytest.param("backward", marks=pytest.mark.slow)])
def test_kill_9_then_resume_ends_on_the_uninterrupted_runs_weights(assets, tmp_path, straight,
                                                                   phase):
    """SIGKILL inside step 3's sampling, verdicts or update (the checkpoint of step 2 the last):
    --resume replays steps 3 and 4, sampling what the straight run sampled."""
    cfg = grpo_cfg(assets, tmp_path, name="killed")
    config = tmp_path / "killed.json"
    config.write_text(json.dumps(dataclasses.asdict(cfg)))
    proc = subprocess.run([sys.executable, "-c", KILLER, phase, "3", "SIGKILL", "--config",
                           str(config)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = Path(cfg.out_dir) / "killed"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert tm.main(["--resume", str(run)]) == 0
    resumed = load_file(run / "checkpoints" / "step-4" / "model.safetensors")
    weights = straight_weights(straight)
    assert weights.keys() == resumed.keys()
    for name in weights:
        assert torch.equal(weights[name], resumed[name]), name


@pytest.mark.slow
def test_sigterm_during_sampling_drops_the_step_and_resumes_bit_exactly(assets, tmp_path,
                                                                         straight):
    """SIGTERM as step 4 starts sampling: the step is dropped before any update, a checkpoint
    of step 3 keeps the step's start, and --resume ends on the straight run's weights."""
    cfg = grpo_cfg(assets, tmp_path, name="stopped")
    config = tmp_path / "stopped.json"
    config.write_text(json.dumps(dataclasses.asdict(cfg)))
    proc = subprocess.run([sys.executable, "-c", KILLER, "sample", "4", "SIGTERM", "--config",
                           str(config)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "step 4 dropped mid-way, not applied" in proc.stdout
    run = Path(cfg.out_dir) / "stopped"
    assert (run / "checkpoints" / "step-3").is_dir()
    assert tm.main(["--resume", str(run)]) == 0
    resumed = load_file(run / "checkpoints" / "step-4" / "model.safetensors")
    weights = straight_weights(straight)
    for name in weights:
        assert torch.equal(weights[name], resumed[name]), name
