"""Continuous batching: requests join the running batch when a slot frees and leave it when they
finish, so a batch never waits for its longest row and a new prompt never waits for a batch.

    engine = Engine(model, slots=16)
    for seed, prompt in enumerate(prompts):
        generator = torch.Generator(engine.device).manual_seed(seed)
        engine.add(prompt, GenerationConfig(256, temperature=0.8, top_p=0.95, eos_id=eos,
                                             generator=generator))
    for event in engine.run():  # until every request has finished
        print(event.request, event.token, event.finished)

Each slot is a row of one preallocated KV cache, written from position 0 by its own request: a
row's keys are its own, and its attention never sees another's. Each request brings its own
GenerationConfig (temperature, top-k, top-p, EOS and stop ids and strings, max_new_tokens) and its
own generator, so its tokens do not depend on what else runs beside it: greedy rows give
`generation.generate`'s tokens, and sampled rows draw what `generate` draws at batch 1 with the
same generator. Requests with the same prompt (the n samples of a problem) share one prefill:
admitted together, or later beside one still running, whose prompt keys they copy.

``Engine(model, slots, compile=True)`` compiles the decode step over the whole pool (every slot,
the whole cache, so its shapes never change): on CUDA one CUDA graph replayed a token, not the
~15 launches a layer that bind a small model's step to the host.
"""

from __future__ import annotations

import itertools
import numbers
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from architecture import LayerCache, Transformer, cache_length
from codelm import kernels
from codelm.models.generation import (
    CACHE_STEP,
    GenerationConfig,
    check_generator_device,
    finish_reason,
    longrope_switch,
    new_caches,
    sampling_logits,
)


@dataclass
class Token:
    """One request's next token. finished: None while the request runs; "stop" (an EOS id, a
    stop id sequence or a stop string ended it) or "length" (max_new_tokens) with its last token.
    logprob and top_logprobs ((id, log-prob) pairs, likeliest first): of the model's own
    distribution, where the request asked for them (`Engine.add(..., logprobs=k)`)."""

    request: int
    token: int
    finished: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class _Request:
    """A request waiting for a slot or running in one."""

    id: int
    prompt: list[int]
    cfg: GenerationConfig
    generator: torch.Generator | None
    logprobs: int | None
    generated: list[int] = field(default_factory=list)
    slot: int = -1
    refilled: bool = False  # its row run again past LongRoPE's switch: its prompt keys too
    prompt_logits: torch.Tensor | None = None  # (1, V) after the prompt, once prefilled


class Engine:
    """A pool of ``slots`` sequences decoded together, each up to ``max_len`` tokens (default the
    model's context), fed from a queue of requests. `add` queues one; `step` admits what fits
    and decodes one token of every running request; `run` steps until all have finished.
    ``compile``: the decode step compiled over the whole pool (a CUDA graph on CUDA)."""

    def __init__(self, model: Transformer, slots: int = 8, max_len: int | None = None,
                 compile: bool = False) -> None:
        block = model.cfg.block_size
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if max_len is not None and not 1 <= max_len <= block:
            raise ValueError(f"max_len must be in [1, block_size={block}], got {max_len}")
        self.model = model
        self.max_len = max_len or block
        self.device = model.wte.weight.device
        self.caches = new_caches(model, slots, self.max_len)
        self.compiled = compile
        self.decode_step = decode_step
        if compile:  # a graph replays fixed addresses: the caches stay where they are
            for tensor in (t for pair in self.caches for t in pair):
                torch._dynamo.mark_static_address(tensor)
            self.decode_step = kernels.compile_decode_step(decode_step, self.device.type,
                                                           kernels.ENABLED)
        self.rows: list[_Request | None] = [None] * slots
        self.waiting: deque[_Request] = deque()
        self.generators_held: set[torch.Generator] = set()  # the sampled requests' own
        self.ids = itertools.count()

    # ------------------------------------------------------------------------ requests
    def add(self, prompt: Sequence[int], cfg: GenerationConfig, logprobs: int | None = None
            ) -> int:
        """Queue a request: continue ``prompt`` (token ids) as ``cfg`` says. Returns its id.
        Without a generator, a sampled request draws its own from torch's global seed."""
        prompt = [int(t) for t in prompt]
        vocab = self.model.cfg.vocab_size
        if cfg.num_beams != 1:
            raise ValueError("the engine samples and decodes greedily; beam search runs "
                             "through generation.generate")
        if cfg.compile:
            raise ValueError("a request's compile=True: the engine's step is compiled for all "
                             "its requests, with Engine(..., compile=True)")
        if not prompt:
            raise ValueError("the prompt is empty: a request continues at least one token")
        if cfg.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1: a request asks for a token or more")
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"the prompt holds token ids outside [0, vocab_size={vocab})")
        if len(prompt) + cfg.max_new_tokens > self.max_len + 1:
            raise ValueError(f"prompt length {len(prompt)} + max_new_tokens {cfg.max_new_tokens} "
                             f"exceeds the context length {self.max_len} + 1")
        stop_ids = [i for s in cfg.stop if not isinstance(s, str) for i in s]
        if not all(0 <= i < vocab for i in [*cfg.eos_id, *stop_ids]):
            raise ValueError(f"an EOS or stop id is outside the vocabulary [0, {vocab})")
        if logprobs is not None and not (isinstance(logprobs, numbers.Integral)
                                         and 0 <= logprobs <= vocab):
            raise ValueError(f"logprobs must be an integer in [0, vocab_size={vocab}] (the "
                             f"likeliest ids given beside each token), got {logprobs!r}")
        generator = cfg.generator
        if isinstance(generator, (list, tuple)):
            raise ValueError("a request samples with one generator, not one a row")
        check_generator_device(generator, self.device)
        if cfg.temperature > 0:  # a sampled request draws from a generator of its own
            if generator in self.generators_held:
                raise ValueError("the request's generator is another queued or running "
                                 "request's: give each request its own (shared, a request's "
                                 "draws would depend on what runs beside it)")
            if generator is None:
                seed = int(torch.randint(2**62, (), dtype=torch.long))
                generator = torch.Generator(self.device).manual_seed(seed)
        request = _Request(next(self.ids), prompt, cfg, generator, logprobs)
        if cfg.temperature > 0:
            self.generators_held.add(generator)
        self.waiting.append(request)
        return request.id

    def _release(self, request: _Request) -> None:
        """A request ends (finished or cancelled): a sampled one's generator is free for
        another (a greedy one's was never held: it draws nothing)."""
        if request.cfg.temperature > 0:
            self.generators_held.discard(request.generator)

    def cancel(self, request: int) -> None:
        """Drop a request, queued or running (its client went away); its slot frees now."""
        waiting = deque()
        for queued in self.waiting:
            if queued.id == request:
                self._release(queued)
            else:
                waiting.append(queued)
        self.waiting = waiting
        for slot, row in enumerate(self.rows):
            if row is not None and row.id == request:
                self._release(row)
                self.rows[slot] = None

    @property
    def busy(self) -> bool:
        """Whether a request is running or waiting."""
        return bool(self.waiting) or any(row is not None for row in self.rows)

    # ------------------------------------------------------------------------- stepping
    def run(self) -> Iterator[Token]:
        """Step until every request (those added meanwhile too) has finished."""
        while self.busy:
            yield from self.step()

    def step(self) -> list[Token]:
        """One token of every running request, then the first token of each waiting request
        that fits (admitted to a free slot)."""
        with torch.inference_mode():
            # training and the compiled step want row-major weights
            layout = not (self.model.training or self.compiled)
            if self.waiting or layout != self.model.__dict__.get("_decode_layout", False):
                kernels.decode_layout(self.model, layout)  # (packs refreshed as requests come)
            running = [row for row in self.rows if row is not None]
            events = self._decode(running) if running else []
            events += self._admit()
        return events

    def _admit(self) -> list[Token]:
        """Prefill waiting requests into free slots, in order; requests with one prompt share
        its prefill. Returns each admitted request's first token."""
        events: list[Token] = []
        free = [slot for slot, row in enumerate(self.rows) if row is None]
        while self.waiting and free:
            first = self.waiting.popleft()
            group = [first]
            for other in list(self.waiting):
                if len(group) == len(free):
                    break
                if other.prompt == first.prompt:
                    self.waiting.remove(other)
                    group.append(other)
            slots, free = free[: len(group)], free[len(group):]
            logits = self._prefill(first.prompt, slots)
            for request, slot in zip(group, slots):
                request.slot = slot
                request.prompt_logits = logits
                self.rows[slot] = request
            events += self._pick(group, logits.expand(len(group), -1))
        return events

    def _prefill(self, prompt: list[int], slots: list[int]) -> torch.Tensor:
        """``prompt``'s keys and values in the slots' cache rows, and the logits (1, V) of its
        last position: copied from a running request of the same prompt (a sample of the same
        problem admitted later), else run into the first slot and copied to the others."""
        T = len(prompt)
        source = next((row for row in self.rows if row is not None and row.prompt == prompt
                       and not row.refilled), None)
        if source is None:
            first = slots[0]
            logits = self._run_row(prompt, first)
        else:
            first, logits = source.slot, source.prompt_logits
        for k, v in self.caches:
            for slot in slots:
                if slot != first:
                    k[slot, :, :T] = k[first, :, :T]
                    v[slot, :, :T] = v[first, :, :T]
        return logits

    def _decode(self, running: list[_Request]) -> list[Token]:
        """Feed each running request's last token at its own position; pick the next ones. The
        step's inputs are made on the host and go over without a wait on the device."""
        rows = max(r.slot for r in running) + 1  # the slots up to the last one in use
        if self.compiled:  # the whole pool: the compiled step's shapes stay
            rows = len(self.rows)
        # A free slot below it decodes token 0 at position 0 into its own cache row: a request
        # admitted there later prefills that row from position 0, and its logits are not read.
        fed = [0] * rows
        pos = [0] * rows
        for r in running:
            fed[r.slot] = r.generated[-1]
            pos[r.slot] = len(r.prompt) + len(r.generated) - 1
        caches = self.caches
        if not self.compiled:  # the rows in use and the keys they have, rounded up
            length = min(-(-(max(pos) + 1) // CACHE_STEP) * CACHE_STEP, self.max_len)
            caches = [(k[:rows, :, :length], v[:rows, :, :length]) for k, v in self.caches]
        fed_ids = _on_device(fed, self.device)[:, None]
        positions = _on_device(pos, self.device)[:, None]
        if self.compiled and self.device.type == "cuda":  # the last replay's logits were read
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.decode_step(self.model, fed_ids, positions, caches)
        slots = _on_device([r.slot for r in running], self.device)
        logits = logits.index_select(0, slots)
        switch = longrope_switch(self.model)
        for i, r in enumerate(running):
            if pos[r.slot] == switch:  # its keys again, the long way (generation._steps)
                logits[i] = self._run_row([*r.prompt, *r.generated], r.slot)[0]
                r.refilled = True
        return self._pick(running, logits)

    def _run_row(self, tokens: list[int], slot: int) -> torch.Tensor:
        """``tokens`` run from position 0 into cache row ``slot``; the logits (1, V) of the
        last."""
        idx = torch.tensor([tokens], device=self.device)
        steps = torch.arange(len(tokens), device=self.device)
        row = [(k[slot : slot + 1], v[slot : slot + 1]) for k, v in self.caches]
        return self.model.logits(self.model.run_blocks(idx, steps[None], None, steps, row)[:, -1])

    def _pick(self, requests: list[_Request], logits: torch.Tensor) -> list[Token]:
        """Each request's next token from its row of ``logits`` (len(requests), V); a request
        that finishes leaves its slot."""
        tokens = _next_tokens(requests, logits)
        events = []
        for i, (request, token) in enumerate(zip(requests, tokens)):
            request.generated.append(token)
            event = Token(request.id, token, finish_reason(request.generated, request.cfg))
            if request.logprobs is not None:
                event.logprob, event.top_logprobs = _logprobs(logits[i], token, request.logprobs)
            if event.finished is not None:
                self._release(request)
                self.rows[request.slot] = None
            events.append(event)
        return events


def decode_step(model: Transformer, fed_ids: torch.Tensor, positions: torch.Tensor,
                caches: list[LayerCache]) -> torch.Tensor:
    """One token of every row: fed_ids and positions (rows, 1), each row at its own position
    in its own cache row, attending its keys up to there. Returns the logits (rows, V)."""
    keys = torch.arange(cache_length(caches), device=fed_ids.device)
    mask = (keys <= positions)[:, None, None, :]  # (rows, 1, 1, length): a row's own keys
    x = model.run_blocks(fed_ids, positions, mask, positions, caches)
    return model.logits(x[:, -1])


def _next_tokens(requests: list[_Request], logits: torch.Tensor) -> list[int]:
    """The argmax of the greedy requests' rows; a sample of the others' filtered softmax, each
    drawn with the request's own generator. A draw is torch.multinomial's for one sample, the
    argmax of probs / noise with noise ~ Exp(1) from the generator (so a request draws what
    `generate` draws at batch 1), done for all rows at once: one launch a row (its noise), not
    a multinomial's several and its check's wait on the device. The rows with the same settings
    are filtered at once (row by row, the same values); the tokens are read back once."""
    greedy = logits.argmax(dim=-1)
    settings: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
        cfg = request.cfg
        if cfg.temperature > 0:
            settings.setdefault((cfg.temperature, cfg.top_k, cfg.top_p), []).append(i)
    if not settings:
        return greedy.tolist()
    probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    noise = torch.ones_like(probs)  # a greedy row's draw is not read
    for (temperature, top_k, top_p), rows in settings.items():
        index = _on_device(rows, logits.device)
        filtered = sampling_logits(logits.index_select(0, index), temperature, top_k, top_p)
        probs.index_copy_(0, index, filtered.softmax(dim=-1))
        for i in rows:
            noise[i].exponential_(1, generator=requests[i].generator)
    drawn = (probs / noise).argmax(dim=-1)
    sampled = _on_device([request.cfg.temperature > 0 for request in requests], logits.device)
    return torch.where(sampled, drawn, greedy).tolist()


def _on_device(values: list, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device``, copied without waiting for the work queued there
    (an index made from a list would wait)."""
    return torch.tensor(values).to(device, non_blocking=True)


def _logprobs(logits: torch.Tensor, token: int, top: int
              ) -> tuple[float, list[tuple[int, float]]]:
    """The log-prob of ``token`` and the ``top`` likeliest (id, log-prob) under ``logits`` (V,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = logp.topk(top) if top else None
    pairs = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))
    return float(logp[token]), pairs


def pool_length(longest_request: int, context: int) -> int:
    """The positions a pool needs for requests of at most ``longest_request`` tokens (a prompt
    and its new tokens; the last new token is never fed back), within ``context``."""
    return max(1, min(context, longest_request - 1))


def generate_all(model: Transformer, prompts: Sequence[Sequence[int]],
                 cfgs: GenerationConfig | Sequence[GenerationConfig], slots: int = 8,
                 compile: bool = False) -> list[list[int]]:
    """Each prompt's new tokens (up to and with its EOS or stop), decoded through one engine of
    ``slots`` rows (``compile``: its step compiled); ``cfgs``: one config for all prompts (a
    sampled one without a generator: each prompt draws its own) or one each."""
    if isinstance(cfgs, GenerationConfig):
        cfgs = [cfgs] * len(prompts)
    if len(cfgs) != len(prompts):
        raise ValueError(f"cfgs: one config for all prompts or one for each of the "
                         f"{len(prompts)} prompts, got {len(cfgs)}")
    longest = max((len(p) + c.max_new_tokens for p, c in zip(prompts, cfgs)), default=1)
    engine = Engine(model, slots, max_len=pool_length(longest, model.cfg.block_size),
                    compile=compile)
    order = [engine.add(prompt, cfg) for prompt, cfg in zip(prompts, cfgs)]
    out: dict[int, list[int]] = {request: [] for request in order}
    for event in engine.run():
        out[event.request].append(event.token)
    return [out[request] for request in order]
