"""Task grpo in ``train``'s one loop: reinforcement learning from the problems' tests.

A step (``GRPOTrainer.train_step``) takes ``batch_size`` problems (``ProblemBatches``, in the
seeded order a checkpoint keeps) and samples ``num_generations`` completions of each through the
continuous-batching engine, each request with a generator seeded from the run's seed, the step
and its place in the step (``sample_seed``), so a resumed run samples what it would have sampled.
Each completion is rewarded by its problem's test run apart from it in the sandbox, many at once
(codelm.training.rewards: 1 for a pass, or the share of assertions that hold); the failed ones
run again with the test in their own interpreter, which counts those that game it (the hack
rate). Then the group advantages, the policy loss of codelm.training.grpo (TRL's), with its KL
term to the starting model (under LoRA the base with its adapters switched off), and the
optimizer step. An evaluation scores the held-out problems' greedy completions (pass@1; the
loop's val_loss is the share failed, so best/ keeps the best pass@1).
"""

from __future__ import annotations

import copy
import hashlib
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import lora
from codelm.data.encoding import encode_prompts, prompt_prefix, reads_special_tokens
from codelm.evaluation.tasks.passk import PASSK, load_problems, run_check
from codelm.models.engine import Engine, pool_length
from codelm.models.generation import FUNCTION_STOPS, GenerationConfig, truncate_at_stops
from codelm.runs.checkpoint import RunState
from codelm.runtime.distributed import Dist
from codelm.runtime.settings import setting
from codelm.sandbox import runner
from codelm.sandbox.runner import SandboxConfig
from codelm.trainconfig import GRPO_TASK, DataSettings, GRPOSettings, StepSettings, TrainConfig
from codelm.training import grpo, rewards
from codelm.training.batches import BatchOrder, Where
from codelm.training.trainer import StepFigures, StepStop, Trainer, autocast
from tokenizer import Tokenizer, decode_generated, generation_eos_ids

STOPS = FUNCTION_STOPS  # a completion ends with its function, as eval's pass@k cuts it
# Steps in a row whose every group earned equal rewards (no advantage, nothing learned) before
# the run warns; a shorter run warns at its last step.
NO_SIGNAL_STEPS = 10


# policy_loss's metrics (TRL's names) logged, token means over the step, under these names.
LOGGED = {"kl": "kl", "entropy": "entropy", "clip_ratio/region_mean": "clip_ratio",
          "clip_ratio/low_mean": "clip_ratio_low", "clip_ratio/high_mean": "clip_ratio_high",
          "cispo_clip_ratio": "clip_ratio"}


# ---- The problems: read, checked, and taken batch by batch ----

def read_problems(path: str, key: str, cfg: TrainConfig | DataSettings) -> list[dict]:
    """The problems of ``path`` (HumanEval-format JSONL, as eval.py's pass@k reads it), each
    with a canonical solution; ``key`` names the setting in errors."""
    if not Path(path).is_file():
        raise ValueError(f"{setting(cfg, key)}: no such file")
    problems = load_problems(path)
    if missing := [p["task_id"] for p in problems
                   if not isinstance(p.get("canonical_solution"), str)]:
        raise ValueError(f"{setting(cfg, key)}: {len(missing)} problem(s) without a "
                         f"canonical_solution ({', '.join(map(str, missing[:5]))}): task grpo "
                         "runs each problem's solution against its test before training; add "
                         "them or drop those problems")
    return problems


def check_confinement() -> None:
    """Refuse to run programs the model writes where the sandbox does not confine them."""
    why = runner.confinement()
    if why is not None:
        raise ValueError(f"task grpo runs the programs the model writes, and the sandbox cannot "
                         f"confine them here: {why}; train on a Linux kernel with Landlock "
                         "(5.13+), as a user who can drop capabilities")


def reward_sandbox(cfg: TrainConfig | DataSettings | GRPOSettings) -> SandboxConfig:
    """The sandbox a sample's reward runs in: eval's pass@k tasks' (numpy importable)."""
    return SandboxConfig(timeout_s=cfg.reward_timeout_s, packages=PASSK.packages)


def checked_problems(cfg: TrainConfig | DataSettings, key: str) -> list[dict]:
    """``cfg``'s problems (``key``: problems or val_problems), each canonical solution passing
    its own test run apart from it."""
    problems = read_problems(getattr(cfg, key), key, cfg)
    print(f"{key}: running each of {len(problems)} problems' canonical solution against its "
          f"test in the sandbox ({cfg.reward_workers} at once: --reward-workers)",
          file=sys.stderr, flush=True)
    try:
        rewards.check_problems(problems, run_check, reward_sandbox(cfg), cfg.reward_workers,
                               f"{key}: canonical solutions", cfg.progress)
    except ValueError as e:
        raise ValueError(f"{setting(cfg, key)}: {e}") from None
    return problems


class ProblemBatches:
    """Task grpo's problems as ``train`` takes its batches: ``batch_size`` problems a step in
    the seeded order of ``BatchOrder`` (epoch and position: all a checkpoint keeps), and the
    held-out problems an evaluation scores (the first ``eval_examples``)."""

    def __init__(self, train: list[dict], val: list[dict], batch_size: int, seed: int,
                 eval_examples: int | None) -> None:
        self.train = train
        self.val = val
        self.batch_size = batch_size
        self.eval_examples = eval_examples
        self.order = BatchOrder(len(train), batch_size, seed, unit="problems")

    def next_step(self) -> tuple[list[dict], Where]:
        """The next step's problems, and where they are in the order."""
        ids, where = self.order.next()
        return [self.train[i] for i in ids], where

    def validation(self) -> tuple[Iterator[dict], int]:
        """The problems an evaluation scores, and how many."""
        n = min(len(self.val), self.eval_examples or len(self.val))
        return iter(self.val[:n]), n

    unit = "problems"
    windows_at_every_token = False

    @property
    def examples_per_step(self) -> int:
        return self.batch_size

    @property
    def examples_per_epoch(self) -> int:
        return len(self.train)

    def epoch(self, step: int) -> float:
        return step * self.batch_size / len(self.train)

    def steps_for(self, epochs: float) -> int:
        return max(1, -int(-epochs * len(self.train) // self.batch_size))


def problem_batches(cfg: TrainConfig | DataSettings) -> ProblemBatches:
    """Task grpo's problems, checked before anything is built: the sandbox confines, every
    canonical solution passes its test. Without val_problems, evaluations score the first
    eval_examples of the training problems (said)."""
    check_confinement()
    train = checked_problems(cfg, "problems")
    if cfg.val_problems is not None:
        val = checked_problems(cfg, "val_problems")
    else:
        val = train
        print(f"note: no val_problems: evaluations score the greedy pass@1 of training problems "
              f"of {cfg.problems} (--val-problems FILE holds out a set)", file=sys.stderr)
    return ProblemBatches(train, val, cfg.batch_size, cfg.seed, cfg.eval_examples)


def data_id(batches: ProblemBatches) -> dict:
    """What a checkpoint records of the problems: their content's digest and count."""
    digest = hashlib.blake2b(digest_size=8)
    for problem in batches.train:
        digest.update(repr(sorted(problem.items())).encode())
    return {"entry": f"problems-{digest.hexdigest()}", "train_examples": len(batches.train)}


# ---- Sampling ----

def sample_seed(seed: int, step: int, index: int) -> int:
    """The generator seed of completion ``index`` of optimizer step ``step`` (from 1)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 2**63


@dataclass
class Completion:
    """A sampled completion: its prompt's ids, its token ids (the stop that ended it
    included), whether the length limit cut it, and its text as the test runs it (cut at the
    first stop)."""

    prompt: list[int]
    ids: list[int]
    truncated: bool
    text: str


class Sampler:
    """Completions of problems' prompts through the continuous-batching engine: each prompt
    formatted and encoded as eval.py prompts the run's model (``prompt_prefix``), each
    completion ended by EOS or a stop string (STOPS) and cut there. ``compile``: one engine
    for the whole run, its decode step compiled (on CUDA a CUDA graph, recorded once: the
    weights the optimizer updates in place are read where they are), as many slots as the
    first call's completions and room for the longest prompt registered (``prompt_ids``; made
    anew for another model or a longer prompt); else an engine a call, sized to it."""

    def __init__(self, tok, eos: list[int], pair_special_tokens: bool, settings: GRPOSettings,
                 context: int, compile: bool = False) -> None:
        self.tok = tok
        self.eos = eos
        self.reads_specials = reads_special_tokens(GRPO_TASK, pair_special_tokens)
        self.settings = settings
        self.context = context
        self.prompts: dict[str, list[int]] = {}  # by prompt text (ids may repeat across files)
        self.compile = compile
        self.engine: Engine | None = None  # the run's one engine, with compile

    def prompt_ids(self, problem: dict) -> list[int]:
        """The ids a problem's prompt is sampled from (``check_room`` checks they fit)."""
        ids = self.prompts.get(problem["prompt"])
        if ids is None:
            (encoded,) = encode_prompts(self.tok, [problem["prompt"]], self.reads_specials)
            ids = prompt_prefix(self.tok, GRPO_TASK) + encoded
            self.prompts[problem["prompt"]] = ids
        return ids

    def check_room(self, problems: Sequence[dict]) -> None:
        """Every problem's prompt leaves its completion max_completion_tokens positions of the
        context; else one error: how many do not, the longest prompt, and the fixes that can
        work (a longer context fits them all; a lower max_completion_tokens only where every
        prompt leaves some room)."""
        need = self.settings.max_completion_tokens
        # each distinct problem once: the training and validation problems may be the same ones
        distinct = {(problem["task_id"], problem["prompt"]): problem for problem in problems}
        lengths = [(len(self.prompt_ids(problem)), problem["task_id"])
                   for problem in distinct.values()]
        short = [task_id for length, task_id in lengths if self.context - length < need]
        if not short:
            return
        longest, longest_id = max(lengths)
        named = ", ".join(short[:3]) + (", ..." if len(short) > 3 else "")
        lower = self.context - longest
        fixes = [f"a context of {longest + need} fits every one (--block-size from "
                 "scratch, a model of a longer context to start from)"]
        if lower >= 1:
            fixes.append(f"max_completion_tokens {lower} fits them in this one")
        none_left = ", no room for a completion" if lower < 1 else ""
        raise ValueError(f"{len(short)} of {len(distinct)} problems ({named}) leave less than "
                         f"{setting(self.settings, 'max_completion_tokens')} positions "
                         f"for a completion after their prompt in the model's {self.context} "
                         f"(the longest prompt, {longest_id}, takes {longest}{none_left}): "
                         f"{'; or '.join(fixes)}; or drop those problems")

    def decode(self, ids: Sequence[int]) -> str:
        return decode_generated(self.tok, ids)

    def complete(self, model: nn.Module, problems: Sequence[dict], per_problem: int,
                 temperature: float, seeds: Sequence[int] | None = None) -> list[Completion]:
        """``per_problem`` completions of each problem, in order; sampled at ``temperature``
        with generator i seeded ``seeds[i]``, or greedy (temperature 0)."""
        prompts = [self.prompt_ids(problem) for problem in problems for _ in range(per_problem)]
        new_tokens = self.settings.max_completion_tokens
        engine = self._engine(model, prompts)
        device = engine.device
        order = []
        for i, ids in enumerate(prompts):
            generator = None
            if temperature > 0:
                generator = torch.Generator(device).manual_seed(seeds[i])
            gen = GenerationConfig(new_tokens, temperature=temperature, eos_id=self.eos,
                                   stop=list(STOPS), decode=self.decode, generator=generator)
            order.append(engine.add(ids, gen))
        new: dict[int, list[int]] = {request: [] for request in order}
        finished: dict[int, str] = {}
        for event in engine.run():
            new[event.request].append(event.token)
            if event.finished is not None:
                finished[event.request] = event.finished
        completions = []
        for prompt, request in zip(prompts, order):
            ids = new[request]
            kept = ids[: next((j for j, t in enumerate(ids) if t in self.eos), len(ids))]
            text = truncate_at_stops(self.decode(kept), STOPS)
            completions.append(Completion(prompt, ids, finished[request] == "length", text))
        return completions

    def _engine(self, model: nn.Module, prompts: list[list[int]]) -> Engine:
        """The engine that completes ``prompts``: a new one sized to them, or the run's one."""
        new_tokens = self.settings.max_completion_tokens
        if not self.compile:
            longest = max(len(ids) for ids in prompts) + new_tokens
            return Engine(model, len(prompts), max_len=pool_length(longest, self.context))
        # The call's prompts are registered (prompt_ids): room for the longest registered holds them.
        longest = max(len(ids) for ids in self.prompts.values()) + new_tokens
        max_len = pool_length(longest, self.context)
        engine = self.engine
        if engine is None or engine.model is not model or engine.max_len < max_len:
            self.engine = None  # its caches freed before the next one's are made
            self.engine = Engine(model, len(prompts), max_len=max_len, compile=True)
        return self.engine


def check_stops(tok: Tokenizer, eos: list[int], settings: GRPOSettings) -> None:
    """The tokenizer must end a completion: an end-of-text token, and the stop strings written
    as themselves (a tokenizer that cannot write a newline never stops a function)."""
    source = setting(settings, "init_from" if settings.init_from else "tokenizer")
    if not eos:
        raise ValueError(f"the tokenizer of {source} has no end-of-text token: a sampled "
                         "completion could end only at max_completion_tokens; use a tokenizer "
                         "with an EOS token")
    for stop in STOPS:
        written = tok.decode(tok.encode(stop))
        if written != stop:
            raise ValueError(f"the tokenizer of {source} cannot write the stop string {stop!r} "
                             f"(it comes back as {written!r}): completions would not stop where "
                             "their function ends; use a tokenizer that keeps newlines and "
                             "spaces")


# ---- The step ----

@dataclass
class Scored:
    """A step's completions scored: rewards (those the loss sees: shuffled in the control
    arm), the true rewards, which gamed the test, and how many sandbox runs that took."""

    rewards: torch.Tensor
    true_rewards: torch.Tensor
    hacked: list[bool]
    runs: int


class GRPOTrainer(Trainer):
    """``Trainer`` whose step samples, scores and updates as GRPO does (the module's
    docstring); its evaluation is the held-out problems' greedy pass@1. ``problems``: every
    problem it will prompt with (each checked to leave max_completion_tokens room)."""

    def __init__(self, model: nn.Module, settings: StepSettings, grpo_settings: GRPOSettings,
                 device: torch.device, tok, pair_special_tokens: bool, problems: Sequence[dict],
                 dist: Dist | None = None, state: RunState | None = None) -> None:
        super().__init__(model, settings, device, dist, None, state)
        self.grpo_settings = grpo_settings
        raw = self.raw_model
        eos = generation_eos_ids(tok, raw.cfg.eos_id, grpo_settings.init_from)
        check_stops(tok, eos, grpo_settings)
        # On a GPU, --compile also runs the sampling engine's step as a CUDA graph.
        self.sampler = Sampler(tok, eos, pair_special_tokens, grpo_settings, raw.cfg.block_size,
                               compile=settings.compile and device.type == "cuda")
        self.sampler.check_room(problems)  # refused before a step
        self.loss_cfg = grpo.GRPOConfig(
            loss_type=grpo_settings.grpo_loss_type, scale_rewards=grpo_settings.scale_rewards,
            epsilon_low=grpo_settings.epsilon_low, epsilon_high=grpo_settings.epsilon_high,
            beta=grpo_settings.grpo_beta, mask_truncated_completions=grpo_settings.mask_truncated,
            max_completion_length=grpo_settings.max_completion_tokens,
            temperature=grpo_settings.temperature)
        self.reference = self._reference()
        self.sandbox = reward_sandbox(grpo_settings)
        self.silent_steps = 0  # steps in a row without a group whose rewards differ
        self.warn_after: int | None = None  # silent steps in a row that warn (at the first step)
        self.rewarded = False  # a completion of this process's steps has earned a reward

    def _reference(self) -> nn.Module | None:
        """The KL term's reference: none without one (beta 0); under LoRA the base (adapters
        switched off, no copy); else, and where LoRA starts from an adapter (init_adapter), a
        frozen copy of the starting model: the weights now, before a resume restores the
        trained ones, the init adapter's loaded into it (a resumed model holds only its
        layout)."""
        if not self.grpo_settings.grpo_beta:
            return None
        is_lora = any(True for _ in lora.lora_modules(self.raw_model))
        if is_lora and self.grpo_settings.init_adapter is None:
            try:
                with lora.adapters_off(self.raw_model):
                    pass
            except ValueError as e:
                raise ValueError(f"{setting(self.grpo_settings, 'grpo_beta')} needs the base as "
                                 f"the reference: {e}; or set grpo_beta 0") from None
            return None
        # The blocks' stop hooks (Trainer._hook_blocks) hold this trainer weakly; the copy's are
        # the same functions, so they see this trainer's stop too.
        reference = copy.deepcopy(self.raw_model).eval()
        if self.grpo_settings.init_adapter is not None:
            lora.load_adapter_weights(reference, self.grpo_settings.init_adapter)
        reference.requires_grad_(False)
        return reference

    def train_step(self, micro_batches: Sequence[dict], inject_nan: bool = False,
                   stop: StepStop | None = None) -> StepFigures:
        """One GRPO step on ``micro_batches`` (this step's problems): sample, score, update. A
        stop that ``stop`` reports before the update raises StepAbandoned (nothing applied)."""
        problems = list(micro_batches)
        step = self.run_state.step + 1
        with self._droppable_step(stop):
            began = time.perf_counter()
            completions = self.sample(problems, step)
            sampled = time.perf_counter()
            self._stop_if_pending()
            scored = self.score(problems, completions, step)
            scored_at = time.perf_counter()
            self._stop_if_pending()
            loss, positions, metrics = self.backward(completions, scored, inject_nan)
        stats = self.update(loss, positions)
        stats.read()  # waited for: update_s holds the update's device work
        done = time.perf_counter()
        n = len(completions)
        stats.metrics = {
            **self._reward_metrics(scored, completions), **metrics,
            "sampling_s": sampled - began, "verdicts_s": scored_at - sampled,
            "update_s": done - scored_at, "samples_per_s": n / max(sampled - began, 1e-9),
            "verdicts_per_s": scored.runs / max(scored_at - sampled, 1e-9)}
        self._warn_without_signal(scored)
        return stats

    def sample(self, problems: Sequence[dict], step: int) -> list[Completion]:
        """num_generations completions of each problem, the model in eval mode."""
        g = self.grpo_settings.num_generations
        seeds = [sample_seed(self.grpo_settings.seed, step, i) for i in range(len(problems) * g)]
        model = self.raw_model
        was_training = model.training
        model.eval()
        try:
            with autocast(self.device, self.precision):
                return self.sampler.complete(model, problems, g, self.grpo_settings.temperature,
                                             seeds)
        finally:
            model.train(was_training)

    def score(self, problems: Sequence[dict], completions: Sequence[Completion], step: int
              ) -> Scored:
        """Each completion's reward from its problem's test run apart from it, and which game
        the test (run again in their own interpreter); the control arm's rewards permuted
        within the batch by a generator of the run's seed and the step."""
        g = self.grpo_settings.num_generations
        jobs = [(problems[i // g], c.text) for i, c in enumerate(completions)]
        workers = self.grpo_settings.reward_workers
        scores = rewards.scores(jobs, run_check, self.sandbox, workers,
                                partial=self.grpo_settings.partial_credit)
        earned = [score.reward for score in scores]
        timed_out = [score.timed_out for score in scores]
        hacked = rewards.hacks(jobs, earned, run_check, self.sandbox, workers, timed_out)
        true_rewards = torch.tensor(earned, dtype=torch.float32)
        given = true_rewards
        if self.grpo_settings.shuffle_rewards:
            seed = sample_seed(self.grpo_settings.seed, step, -1)
            generator = torch.Generator().manual_seed(seed)
            given = true_rewards[torch.randperm(len(earned), generator=generator)]
        runs = len(jobs) + sum(score.reward < 1.0 and not score.timed_out for score in scores)
        return Scored(given, true_rewards, hacked, runs)

    def backward(self, completions: Sequence[Completion], scored: Scored, inject_nan: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The policy loss's gradients over grad_accum micro-batches of the completions, each
        weighted as TRL weighs its accumulated micro-batches (``chunk_weight``); (the loss, the
        positions computed, the loss's metrics: each the mean of the micro-batches' values, as
        TRL logs them)."""
        settings, lcfg = self.grpo_settings, self.loss_cfg
        batch = completion_batch(completions, self.device, lcfg.mask_truncated_completions)
        advantages = grpo.group_advantages(scored.rewards, settings.num_generations,
                                           settings.scale_rewards).to(self.device)
        rows = batch.ids.shape[0]
        tokens = batch.completion_mask.sum().clamp(min=1).float()
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        logged: list[dict[str, torch.Tensor]] = []
        for chunk in torch.arange(rows).tensor_split(min(settings.grad_accum, rows)):
            part = batch.rows(chunk)
            mask = part.completion_mask
            with autocast(self.device, self.precision):
                ref = None
                if lcfg.beta:  # first, while the policy's forward holds nothing
                    ref = grpo.reference_logps(self.raw_model, part.ids, mask, part.prompt_mask,
                                               lcfg.temperature, self.reference)
                logps, entropy = grpo.completion_logps(self.model, part.ids, mask,
                                                       part.prompt_mask, lcfg.temperature)
                loss, metrics = grpo.policy_loss(logps, None, ref, advantages[chunk], mask,
                                                 lcfg, num_items=tokens, entropy=entropy)
            loss = loss * chunk_weight(lcfg.loss_type, len(chunk), rows)
            if inject_nan:
                loss = loss * float("nan")
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
            logged.append(metrics)
        positions = torch.tensor(float(batch.ids.numel()), device=self.device)
        return loss_sum, positions, micro_batch_means(logged)

    def _reward_metrics(self, scored: Scored, completions: Sequence[Completion]) -> dict:
        """The rewards a researcher watches: their mean and spread, the pass rate, the share of
        groups whose rewards are all equal, the completions' length, the hack rate."""
        true = scored.true_rewards
        groups = true.view(-1, self.grpo_settings.num_generations)
        equal = (groups == groups[:, :1]).all(dim=1).float().mean()
        lengths = torch.tensor([len(c.ids) for c in completions], dtype=torch.float32)
        return {"reward_mean": float(true.mean()), "reward_std": float(true.std()),
                "pass_rate": float((true == 1.0).float().mean()),
                "equal_reward_groups": float(equal),
                "completion_length": float(lengths.mean()),
                "truncated": sum(c.truncated for c in completions) / len(completions),
                "hack_rate": sum(scored.hacked) / len(scored.hacked)}

    def _warn_without_signal(self, scored: Scored) -> None:
        """Warn once when every group's rewards have been equal for NO_SIGNAL_STEPS steps in a
        row (or the whole of a shorter run, or of what a resumed run has left): their
        advantages are 0, nothing is learned."""
        if self.warn_after is None:  # the steps this process trains, this one included
            self.warn_after = min(NO_SIGNAL_STEPS,
                                  self.run_state.max_steps - self.run_state.step)
        groups = scored.true_rewards.view(-1, self.grpo_settings.num_generations)
        silent = bool((groups == groups[:, :1]).all())
        self.silent_steps = self.silent_steps + 1 if silent else 0
        due = self.warn_after
        true = scored.true_rewards
        rewarded_before = self.rewarded
        self.rewarded = rewarded_before or bool((true > 0).any())
        if self.silent_steps != due or not self.dist.main:
            return
        if bool((true == 0).all()) and rewarded_before:
            beta = self.grpo_settings.grpo_beta
            kl = (f"a larger KL term (grpo_beta, now {beta:g})" if beta > 0
                  else "a KL term (grpo_beta)")
            fix = (f"its earlier steps earned rewards, so the policy collapsed: a lower lr (now "
                   f"{self.settings.lr:g}; a fine-tuned model takes about 1e-5 to 3e-4) or "
                   f"{kl} keeps it near its start")
        elif bool((true == 0).all()):
            fix = ("the model solves none: start from a model fine-tuned on such problems "
                   "(SFT), use easier problems" + (
                       "" if self.grpo_settings.partial_credit else ", or set partial_credit"))
        elif bool((true == true[0]).all()):
            fix = "every completion earns the same: use harder problems"
        else:
            fix = ("each problem's completions all pass or all fail: raise temperature or "
                   "num_generations")
        print(f"warning: every problem's {self.grpo_settings.num_generations} completions have "
              f"earned equal rewards for {due} step(s) in a row: their advantages are 0 and the "
              f"run learns nothing; {fix}", file=sys.stderr)

    @torch.no_grad()
    def evaluate(self, batches: Iterator[dict] | Sequence[dict], total: int | None = None
                 ) -> dict:
        """The greedy pass@1 of the problems ``batches`` yields (their test apart from the
        completion), and val_loss, the share failed, which the loop keeps best/ and early
        stopping by."""
        problems = list(batches)
        model = self.raw_model
        was_training = model.training
        model.eval()
        try:
            with autocast(self.device, self.precision):
                completions = self.sampler.complete(model, problems, 1, 0.0)
        finally:
            model.train(was_training)
        jobs = [(problem, c.text) for problem, c in zip(problems, completions)]
        passed = rewards.rewards(jobs, run_check, self.sandbox, self.grpo_settings.reward_workers)
        share = sum(passed) / max(len(passed), 1)
        return {"val_loss": 1.0 - share, "val_pass@1": share, "val_problems": len(problems)}


def chunk_weight(loss_type: str, rows: int, all_rows: int) -> float:
    """What a micro-batch's policy_loss is multiplied by, as TRL divides it by the accumulation
    steps: its share of the rows (grpo, dr_grpo: means over completions, whose sum is the
    whole batch's; bnpo: its own tokens' mean, TRL's normalization over the local batch), or 1
    (dapo, cispo: sums over the whole batch's tokens)."""
    if loss_type in ("grpo", "dr_grpo", "bnpo"):
        return rows / all_rows
    return 1.0


def micro_batch_means(logged: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The loss's metrics of a step (LOGGED's, under their logged names): the mean of each over
    the micro-batches, as TRL logs the values it appends once a micro-batch."""
    values: dict[str, list[float]] = {}
    for metrics in logged:
        for key, value in metrics.items():
            if key in LOGGED:
                values.setdefault(LOGGED[key], []).append(float(value))
    return {key: sum(found) / len(found) for key, found in values.items()}


@dataclass
class CompletionBatch:
    """Prompts (left-padded) then completions (right-padded), one row a completion."""

    ids: torch.Tensor  # (N, P + C)
    prompt_mask: torch.Tensor  # (N, P): the prompts' real tokens
    completion_mask: torch.Tensor  # (N, C): the completion tokens that count

    def rows(self, index: torch.Tensor) -> CompletionBatch:
        return CompletionBatch(self.ids[index], self.prompt_mask[index],
                               self.completion_mask[index])


def completion_batch(completions: Sequence[Completion], device: torch.device,
                     mask_truncated: bool) -> CompletionBatch:
    """The step's completions as one batch, each after its prompt."""
    prompts = [c.prompt for c in completions]
    width_p = max(map(len, prompts))
    width_c = max(len(c.ids) for c in completions)
    ids = torch.zeros(len(completions), width_p + width_c, dtype=torch.long)
    prompt_mask = torch.zeros(len(completions), width_p, dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids[i, width_p - len(prompt):width_p] = torch.tensor(prompt)
        prompt_mask[i, width_p - len(prompt):] = 1
        ids[i, width_p:width_p + len(completion.ids)] = torch.tensor(completion.ids)
    lengths = torch.tensor([len(c.ids) for c in completions])
    truncated = torch.tensor([c.truncated for c in completions])
    mask = grpo.completion_mask(lengths, truncated, width_c, mask_truncated)
    return CompletionBatch(ids.to(device), prompt_mask.to(device), mask.to(device))
