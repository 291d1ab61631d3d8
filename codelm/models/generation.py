"""Generation with a KV cache: greedy, sampled (top-k / top-p, as transformers filters), beam
search, streaming, stop ids and strings, and a compiled decode step (a CUDA graph on CUDA).

    out = generate(model, idx, GenerationConfig(max_new_tokens=64, temperature=0.8, top_p=0.95,
                                                eos_id=tok.eos_id), attention_mask=mask)

Public arguments are checked once, in GenerationConfig and where generate meets the model.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from architecture import LayerCache, Transformer, cache_length, padded_mask, positions
from codelm import kernels

# An eager decode step attends the cache up to its longest row rounded up to a multiple of this.
CACHE_STEP = 16
# The CUDA-graph decode step's cache lengths are multiples of this (masked beyond the prompt
# and its new tokens): one graph serves prompts of many lengths.
GRAPH_CACHE_STEP = 256
# Below it, fp32 logits / temperature overflow to inf and the softmax is NaN (transformers fails
# there too, inside multinomial); above, such a temperature samples the argmax anyway.
MIN_TEMPERATURE = 1e-10
# Characters a text decoded from a cut of ids may differ from the whole's at its start
# (a split character's replacement marks, a dropped leading space), with room to spare.
CUT_MARGIN = 8
# Seed s of a run of samples (an evaluation's) draws sample i with seed s x SEED_SPREAD + i
# (Fibonacci hashing, at 64 bits): a one-to-one map that puts consecutive seeds' streams
# 2**64 / phi apart, so the samples of runs at seeds 0, 1, 2 are drawn independently, not one
# run's shifted by a sample.
SEED_SPREAD = 0x9E3779B97F4A7C15


def seed_of_sample(seed: int, index: int) -> int:
    """The seed of sample (or prompt) number ``index`` of a run of samples seeded ``seed``: seed
    0's are 0, 1, 2, ...; seed_of_sample(s, k) + i is seed_of_sample(s, k + i) (mod 2**64), as
    an endpoint asked for n choices at seed_of_sample(s, k) seeds its choice i (codelm's
    server's rule)."""
    return (seed * SEED_SPREAD + index) % 2**64


# HumanEval's stop sequences: a function's completion ends where top-level code starts again.
FUNCTION_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n@", "\nassert ")


@dataclass
class GenerationConfig:
    """How to continue a prompt. temperature 0: greedy; > 0: sampling, filtered by top_k / top_p
    as transformers filters (top_k None: transformers' top_k=0). num_beams > 1: beam search.
    eos_id: an id or ids ending a row. stop: a string, an id, or a list of strings, ids and id
    sequences ending a row, matched in the generated tokens only (strings need `decode`, e.g.
    tokenizer.decode; ``answer``: where the answer starts in a whole decoded text, a stop
    string before it not counting: eval's line task's past its leading blank lines). pad_id fills finished rows (default: the first EOS id). compile: the
    decode step compiled (on CUDA a CUDA graph, one such generation at a time per model).
    Greedy, one row: prompt_lookup > 0 drafts that many tokens a step from the text so far
    (transformers' prompt_lookup_num_tokens), draft_model drafts draft_tokens a step (a smaller
    model of the same vocabulary, transformers' assistant_model); the model checks a draft in
    one forward and keeps what it would have chosen itself, so the tokens are greedy's."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | Sequence[int] | None = None
    stop: str | int | Sequence[str | int | Sequence[int]] | None = None
    pad_id: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    decode: Callable[[list[int]], str] | None = None
    answer: Callable[[str], str] | None = None
    # one for the batch, or one a row (a row then draws as it would alone, whatever its batch)
    generator: torch.Generator | Sequence[torch.Generator] | None = None
    compile: bool = False
    prompt_lookup: int = 0
    draft_model: Transformer | None = None
    draft_tokens: int = 5

    def __post_init__(self) -> None:
        self.max_new_tokens = _index(self.max_new_tokens, "max_new_tokens")
        self.num_beams = _index(self.num_beams, "num_beams")
        t, top_k, top_p = self.temperature, self.top_k, self.top_p
        _need(self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        _need(isinstance(t, numbers.Real) and (t == 0 or MIN_TEMPERATURE <= t < math.inf),
              f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g} "
              f"(smaller ones overflow the logits), got {t!r}")
        _need(top_k is None or _index(top_k, "top_k") >= 1, f"top_k must be >= 1, got {top_k!r}")
        _need(top_p is None or isinstance(top_p, numbers.Real) and 0 < top_p <= 1,
              f"top_p must be in (0, 1], got {top_p!r}")
        _need(t != 0 or top_k is None and top_p is None,
              "top_k and top_p filter what is sampled; temperature=0 is greedy (the argmax): "
              "pass temperature > 0 to sample")
        generators = (self.generator if isinstance(self.generator, (list, tuple))
                      else [self.generator])
        _need(all(g is None or isinstance(g, torch.Generator) for g in generators),
              f"generator must be a torch.Generator or one a row, got {self.generator!r}")
        self.eos_id = [] if self.eos_id is None else _token_ids(self.eos_id, "eos_id")
        self.stop = _parse_stop(self.stop)
        self.pad_id = None if self.pad_id is None else _index(self.pad_id, "pad_id")
        _need(self.decode is None or callable(self.decode),
              f"decode must be a callable such as tokenizer.decode, got {self.decode!r}")
        strings = [s for s in self.stop if isinstance(s, str)]
        _need(not strings or self.decode is not None,
              f"stop strings {strings} need decode= (e.g. tokenizer.decode)")
        _need(self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}")
        self._check_drafts()
        if self.num_beams > 1:
            _need(t == 0 and top_k is None and top_p is None and not self.stop,
                  "beam search is deterministic: leave temperature, top_k, top_p and stop unset")
            _need(not self.compile, "compile=True: beam search runs eagerly, leave compile unset")
            _need(isinstance(self.length_penalty, numbers.Real)
                  and math.isfinite(self.length_penalty),
                  f"length_penalty must be a finite number, got {self.length_penalty!r}")


    def _check_drafts(self) -> None:
        self.prompt_lookup = _index(self.prompt_lookup, "prompt_lookup")
        self.draft_tokens = _index(self.draft_tokens, "draft_tokens")
        _need(self.prompt_lookup >= 0, f"prompt_lookup must be >= 0, got {self.prompt_lookup}")
        _need(self.draft_tokens >= 1, f"draft_tokens must be >= 1, got {self.draft_tokens}")
        if not self.drafts:
            return
        _need(not (self.prompt_lookup and self.draft_model is not None),
              "prompt_lookup and draft_model both draft tokens: pass one of the two")
        _need(self.draft_model is None or isinstance(self.draft_model, Transformer),
              f"draft_model must be a codelm Transformer, got {type(self.draft_model).__name__}")
        _need(self.temperature == 0 and self.num_beams == 1 and not self.compile,
              "drafted decoding (prompt_lookup, draft_model) is greedy: leave temperature, "
              "num_beams and compile unset")

    @property
    def drafts(self) -> bool:
        """Whether a draft (prompt lookup or a draft model) proposes tokens to check."""
        return self.prompt_lookup > 0 or self.draft_model is not None


def generate(model: Transformer, idx: torch.Tensor, cfg: GenerationConfig,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Continue the prompts idx (B, T) (left-padded, with attention_mask, for a batch of
    different lengths). Returns (B, T + n): the prompt then n <= max_new_tokens new tokens; a
    row that finished early is filled with pad_id. T + max_new_tokens may reach block_size + 1
    (the last new token is never fed back). In train mode dropout is on, as in transformers:
    call `model.eval()` first for deterministic output."""
    # inference_mode (not no_grad) drops view and version tracking, which every decode step pays.
    with torch.inference_mode():
        if cfg.num_beams > 1:
            out = _beam_search(model, idx, cfg, attention_mask)
        elif cfg.drafts:
            out = _drafted(model, idx, cfg, attention_mask)
        else:
            new = [tok[:, None] for tok in _steps(model, idx, cfg, attention_mask)]
            out = torch.cat((idx, *new), dim=1)
    return out.clone()  # a normal tensor again, usable by autograd


@torch.no_grad()
def stream(model: Transformer, idx: torch.Tensor, cfg: GenerationConfig,
           attention_mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (LongTensor (B,)) as it is chosen, for interactive
    use. Rows that have finished yield pad_id; stops early once every row has finished."""
    _need(cfg.num_beams == 1, "stream yields one token a step; beam search knows its tokens "
          "only at the end: use generate with num_beams > 1")
    yield from _steps(model, idx, cfg, attention_mask)


# ------------------------------------------------------------------------- checks and caches
def _prepare(model: Transformer, idx: torch.Tensor, cfg: GenerationConfig,
             attention_mask: torch.Tensor | None) -> int:
    """Check the prompt against the model; return the fill id of finished rows."""
    _need(isinstance(idx, torch.Tensor), f"idx must be a tensor (batch, time), got a "
          f"{type(idx).__name__}; use torch.tensor(idx)")
    _need(idx.dtype in (torch.long, torch.int32), f"idx must hold integer token ids (torch.long), "
          f"got {idx.dtype} (torch.Tensor(...) makes floats; torch.tensor(...) keeps ints)")
    _need(idx.dim() == 2, f"idx must be (batch, time), got shape {tuple(idx.shape)}")
    B, T = idx.shape
    vocab, block = model.cfg.vocab_size, model.cfg.block_size
    _need(T > 0, "the prompt is empty: generation continues at least one token (for an "
          "unconditional sample, start from the BOS id)")
    lo, hi = torch.stack(idx.aminmax()).tolist()
    _need(0 <= lo <= hi < vocab, f"idx holds token ids outside [0, vocab_size={vocab}): min "
          f"{lo}, max {hi} (wrong tokenizer? -100 labels passed as ids?)")
    _need(T <= block, f"prompt length {T} exceeds the context length block_size={block}")
    row_generators = cfg.generator if isinstance(cfg.generator, (list, tuple)) else None
    _need(row_generators is None or len(row_generators) == B,
          f"generator: one for the batch or one a row ({B}), got {len(row_generators or [])}")
    for generator in row_generators or [cfg.generator]:
        check_generator_device(generator, model.wte.weight.device)
    _need(T + cfg.max_new_tokens <= block + 1, f"prompt length {T} + max_new_tokens "
          f"{cfg.max_new_tokens} exceeds the context length block_size={block} + 1 (the last "
          "new token is never fed back)")
    if attention_mask is not None:
        _need(isinstance(attention_mask, torch.Tensor), f"attention_mask must be a tensor (batch, "
              f"time), got a {type(attention_mask).__name__}; use torch.tensor(attention_mask)")
        _need(attention_mask.shape == idx.shape, f"attention_mask shape "
              f"{tuple(attention_mask.shape)} != idx shape {tuple(idx.shape)}")
        # each row continues from its last position, so must end with a real token
        last = attention_mask[:, -1].bool()
        if not bool(last.all()):
            raise ValueError(f"attention_mask row {int((~last).nonzero()[0, 0])} ends with "
                             "padding: generation needs left-padded prompts, each ending with a "
                             "real token")
    ids = [("eos_id", i) for i in cfg.eos_id]
    ids += [("pad_id", p) for p in [cfg.pad_id] if p is not None]
    ids += [("stop id", i) for s in cfg.stop if not isinstance(s, str) for i in s]
    for name, i in ids:
        _need(0 <= i < vocab, f"{name} {i} is outside the model's vocabulary [0, {vocab})")
    if cfg.pad_id is not None:
        return cfg.pad_id
    if cfg.eos_id:
        return cfg.eos_id[0]
    # any filler would be a real token id (0 is "!" in GPT-2's vocabulary)
    _need(not cfg.stop or B == 1, "stop without eos_id on a batch needs pad_id: the id that "
          "fills the rows that stop first")
    return 0  # never emitted: a lone row ends generation when it stops, and beams need EOS to end


def cache_dtype(model: Transformer) -> torch.dtype:
    """The dtype the qkv projection returns: autocast's when it is on for the device (so
    decoding sees the keys and values forward computes), else the weights'."""
    p = model.wte.weight
    if torch.is_autocast_enabled(p.device.type) and p.dtype != torch.float64:
        return torch.get_autocast_dtype(p.device.type)  # autocast leaves fp64 alone
    return p.dtype


def new_caches(model: Transformer, batch: int, length: int) -> list[LayerCache]:
    shape = (batch, model.cfg.n_kv_head, length, model.cfg.head_dim)
    p, dtype = model.wte.weight, cache_dtype(model)
    return [(p.new_zeros(shape, dtype=dtype), p.new_zeros(shape, dtype=dtype))
            for _ in model.blocks]


# A CUDA graph replays fixed addresses: a model's last graph caches are kept (zeroed) for the
# next call of the same shape, so one such generation runs at a time per model.
_HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BUSY: weakref.WeakSet = weakref.WeakSet()


def _graph_caches(model: Transformer, batch: int, length: int) -> list[LayerCache]:
    length = -(-length // GRAPH_CACHE_STEP) * GRAPH_CACHE_STEP
    if model in _BUSY:
        raise RuntimeError("a compiled CUDA generation is already running on this model (an "
                           "unfinished stream?): exhaust or close it first, or pass "
                           "compile=False")
    held = _HELD.get(model)
    k = held[0][0] if held else None
    if k is not None and (k.shape[0], k.shape[2], k.dtype, k.device) == (
            batch, length, cache_dtype(model), model.wte.weight.device):
        torch._foreach_zero_([t for pair in held for t in pair])
    else:
        _HELD[model] = held = new_caches(model, batch, length)
        for t in (t for pair in held for t in pair):
            torch._dynamo.mark_static_address(t)
    _BUSY.add(model)
    return held


# ---------------------------------------------------------------------------------- decoding
def longrope_switch(model: Transformer) -> int | None:
    """The position whose token turns a LongRoPE sequence to its long frequencies (its original
    context) where decoding it recomputes the cache from the start (keys rotated the long way),
    as transformers' Phi-3 does (``longrope_reprefill``), else None: its other families keep
    the cache (keys rotated the short way), and so does decoding here for them."""
    rope = model.rope
    if rope is None or rope.long_inv_freq is None or not model.cfg.longrope_reprefill:
        return None
    return rope.long_from


def _check_no_switch(model: Transformer, idx: torch.Tensor, attention_mask: torch.Tensor | None,
                     cfg: GenerationConfig) -> None:
    """Refuse a beam search or drafted decoding whose rows (each its own length) would cross
    LongRoPE's switch."""
    switch = longrope_switch(model)
    if switch is None:
        return
    lengths = ([idx.shape[1]] * idx.shape[0] if attention_mask is None
               else attention_mask.sum(dim=1).tolist())
    if any(length <= switch < length + cfg.max_new_tokens - 1 for length in lengths):
        raise ValueError(f"the model's LongRoPE frequencies switch at position {switch}, inside "
                         "this generation: beam search and drafted decoding do not recompute "
                         "the cache there; decode plainly (num_beams 1, no drafts), or keep "
                         f"prompt + max_new_tokens within {switch + 1}")


def _prefill(model: Transformer, idx, attention_mask, caches):
    """Fill the cache with the prompt; return (last logits (B, V), key_valid (B, L), next pos)."""
    B, T = idx.shape
    length = cache_length(caches)
    key_valid = torch.ones(B, length, dtype=torch.bool, device=idx.device)
    if attention_mask is not None:
        key_valid[:, :T] = attention_mask.bool()
    slots = torch.arange(T, device=idx.device)
    pos = positions(key_valid[:, :T])
    mask = None  # no padding: causal attention over the prompt's own keys (flash on CUDA)
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = padded_mask(key_valid, slots, length)
    x = model.run_blocks(idx, pos, mask, slots, caches)
    return model.logits(x[:, -1]), key_valid, pos[:, -1:] + 1


def _step(model: Transformer, tok, pos, slot, key_valid, caches) -> torch.Tensor:
    """One decode step: tok, pos (B, 1); slot (1,) cache slot; key_valid (B, L)."""
    k_slots = torch.arange(key_valid.shape[1], device=tok.device)
    mask = ((k_slots <= slot) & key_valid)[:, None, None, :]
    x = model.run_blocks(tok, pos, mask, slot, caches)
    return model.logits(x[:, -1])


class _Attended:
    """The cache prefix a decode step attends: the slots written so far rounded up to a
    multiple of CACHE_STEP (a step reads the keys the rows have, not the whole cache, and
    shapes change seldom); ``fixed``: the whole cache (a compiled step's shapes stay)."""

    def __init__(self, caches: list[LayerCache], key_valid: torch.Tensor, fixed: bool) -> None:
        self.caches, self.key_valid, self.fixed = caches, key_valid, fixed
        self.length = -1
        self.views: tuple[torch.Tensor, list[LayerCache]] = (key_valid, caches)

    def upto(self, slot: int) -> tuple[torch.Tensor, list[LayerCache]]:
        """(key_valid, caches) over the prefix that holds ``slot``."""
        if self.fixed:
            return self.key_valid, self.caches
        length = min(-(-(slot + 1) // CACHE_STEP) * CACHE_STEP, self.key_valid.shape[1])
        if length != self.length:
            self.length = length
            self.views = (self.key_valid[:, :length],
                          [(k[:, :, :length], v[:, :, :length]) for k, v in self.caches])
        return self.views


def _steps(model: Transformer, idx, cfg: GenerationConfig, attention_mask):
    fill = _prepare(model, idx, cfg, attention_mask)
    B, T = idx.shape
    n = cfg.max_new_tokens
    eos_t = torch.tensor(cfg.eos_id, device=idx.device, dtype=torch.long)
    step_fn = (kernels.compile_decode_step(_step, idx.device.type, kernels.ENABLED)
               if cfg.compile else _step)
    generated: list[torch.Tensor] = []
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    track = bool(cfg.eos_id or cfg.stop)
    # the compiled step reads row-major best, and so does training
    kernels.decode_layout(model, not (cfg.compile or model.training))
    graphs = cfg.compile and idx.device.type == "cuda"
    slot = torch.tensor([T], device=idx.device)  # advanced on the device: no copy a step
    caches = _graph_caches(model, B, T + n) if graphs else new_caches(model, B, T + n)
    switch = longrope_switch(model)
    fed = [idx]  # for a LongRoPE model: the tokens so far, prefilled again at its switch
    try:
        logits, key_valid, pos = _prefill(model, idx, attention_mask, caches)
        attended = _Attended(caches, key_valid, fixed=cfg.compile)
        refill_at = set() if switch is None else {switch - p for p in pos[:, 0].tolist()}
        for i in range(n):
            tok = _pick(logits, cfg)
            if track:
                tok = torch.where(finished, torch.full_like(tok, fill), tok)
                generated.append(tok)
            yield tok
            if track:
                finished |= torch.isin(tok, eos_t)
                if cfg.stop:
                    finished |= _hit_stop(generated, cfg, finished)
                if bool(finished.all()):
                    return
            if i == n - 1:
                return
            if graphs:  # a new graph iteration: the last one's logits have been read
                torch.compiler.cudagraph_mark_step_begin()
            if switch is not None:
                fed.append(tok[:, None])
            if i in refill_at:  # a row's token at the switch: its keys again, the long way
                logits, key_valid, pos = _prefill(model, torch.cat(fed, dim=1),
                                                  _grown(attention_mask, i + 1), caches)
                attended = _Attended(caches, key_valid, fixed=cfg.compile)
                slot = slot + 1
                continue
            logits = step_fn(model, tok[:, None], pos, slot, *attended.upto(T + i))
            pos, slot = pos + 1, slot + 1
    finally:
        if graphs:
            _BUSY.discard(model)


def _grown(attention_mask: torch.Tensor | None, new: int) -> torch.Tensor | None:
    """A prompt's attention mask with ``new`` generated tokens after it."""
    if attention_mask is None:
        return None
    ones = attention_mask.new_ones(attention_mask.shape[0], new)
    return torch.cat((attention_mask, ones), dim=1)


def _beam_search(model: Transformer, idx, cfg: GenerationConfig, attention_mask):
    """Beam search as transformers runs it: of each row's top candidates, those ending in EOS
    (among the top K) are finished hypotheses, the best K others live on; a row closes once no
    live beam can beat its K best finished ones. Scores: summed log-probs / length ** lp."""
    fill = _prepare(model, idx, cfg, attention_mask)  # before the beams expand the shapes
    B, T = idx.shape
    _check_no_switch(model, idx, attention_mask, cfg)
    K, n, dev, lp = cfg.num_beams, cfg.max_new_tokens, idx.device, cfg.length_penalty
    # (1 + #EOS) * K candidates a step: K live beams remain whichever EOS ids the top ones end with
    pool = max(2, 1 + len(cfg.eos_id)) * K
    mask = None if attention_mask is None else attention_mask.repeat_interleave(K, dim=0)
    scores = torch.full((B, K), -1e9, device=dev)
    scores[:, 0] = 0.0  # every beam starts as beam 0, so the first step draws K distinct tokens
    seqs = torch.empty(B * K, 0, dtype=torch.long, device=dev)
    done: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
    closed = [False] * B
    base = (torch.arange(B, device=dev) * K)[:, None]
    kernels.decode_layout(model, not model.training)  # training wants row-major weights
    caches = new_caches(model, B * K, T + n)
    logits, key_valid, pos = _prefill(model, idx.repeat_interleave(K, dim=0), mask, caches)
    for i in range(n):
        logp = torch.log_softmax(logits.float(), dim=-1)
        V = logp.shape[-1]
        cand = (scores[..., None] + logp.view(B, K, V)).view(B, K * V)
        top, ids = (t.tolist() for t in cand.topk(min(pool, K * V), dim=1))
        new_scores, new_beam, new_tok = ([[v] * K for _ in range(B)] for v in (-1e9, 0, fill))
        for row in range(B):
            live = 0
            for rank, (candidate, score) in enumerate(zip(ids[row], top[row])):
                if closed[row] or live == K:
                    break
                beam, token = divmod(candidate, V)
                if token not in cfg.eos_id:
                    new_scores[row][live] = score
                    new_beam[row][live] = beam
                    new_tok[row][live] = token
                    live += 1
                elif rank < K:
                    hypothesis = torch.cat((seqs[row * K + beam], seqs.new_tensor([token])))
                    done[row].append((score / (i + 1) ** lp, hypothesis))
            done[row] = sorted(done[row], key=lambda h: -h[0])[:K]
            best_live = max(new_scores[row]) / (i + 1) ** lp
            closed[row] = closed[row] or len(done[row]) == K and done[row][-1][0] >= best_live
        rows = (base + torch.tensor(new_beam, device=dev)).view(-1)
        tok = torch.tensor(new_tok, device=dev).view(-1, 1)
        seqs, scores = torch.cat((seqs[rows], tok), dim=1), torch.tensor(new_scores, device=dev)
        if all(closed) or i == n - 1:
            break
        for t in (t for pair in caches for t in pair):
            t.copy_(t.index_select(0, rows))
        key_valid, pos = key_valid[rows], pos[rows]
        logits = _step(model, tok, pos, torch.tensor([T + i], device=dev), key_valid, caches)
        pos = pos + 1
    for row in range(B):  # a row still open: its live beams count as finished
        if not closed[row]:
            length = max(seqs.shape[1], 1)
            for beam in range(K):
                done[row].append((float(scores[row, beam]) / length ** lp, seqs[row * K + beam]))
    best = [max(hyps, key=lambda h: h[0])[1] for hyps in done]
    # as wide as the longest returned hypothesis, as HF and the greedy path
    return torch.cat((idx, pad_sequence(best, batch_first=True, padding_value=fill)), dim=1)


# --------------------------------------------------------------------------- drafted decoding
def _drafted(model: Transformer, idx, cfg: GenerationConfig, attention_mask) -> torch.Tensor:
    """Greedy decoding of one row whose drafts (prompt lookup or a draft model) are checked a
    draft at a time: the model's choices after the draft's first k tokens, in one forward; the
    draft's tokens it agrees with are kept, then its own next one."""
    _prepare(model, idx, cfg, attention_mask)
    _check_no_switch(model, idx, attention_mask, cfg)
    _need(idx.shape[0] == 1 and (attention_mask is None or bool(attention_mask.all())),
          "drafted decoding (prompt_lookup, draft_model) continues one unpadded prompt: "
          "batch them one at a time")
    if cfg.draft_model is not None:
        _need(cfg.draft_model.cfg.vocab_size == model.cfg.vocab_size,
              f"the draft model's vocabulary ({cfg.draft_model.cfg.vocab_size}) differs from "
              f"the model's ({model.cfg.vocab_size}): a draft must share the tokenizer")
        draft_block = cfg.draft_model.cfg.block_size
        _need(idx.shape[1] + cfg.max_new_tokens <= draft_block + 1,
              f"prompt length {idx.shape[1]} + max_new_tokens {cfg.max_new_tokens} exceeds the "
              f"draft model's context length block_size={draft_block} + 1: a draft model reads "
              "the whole text; use one with a longer context, or fewer new tokens")
        draft = _DraftModel(cfg.draft_model, idx.shape[1] + cfg.max_new_tokens)
    idx = idx.long()  # as every other decoding returns its tokens
    seq = idx[0].tolist()
    T, n = len(seq), cfg.max_new_tokens
    if n == 0:
        return idx
    kernels.decode_layout(model, not model.training)
    caches = new_caches(model, 1, T + n)
    logits, _, _ = _prefill(model, idx, None, caches)
    token = int(logits.argmax(dim=-1))
    new: list[int] = []
    lookup = _PromptLookup(seq)
    while True:
        new.append(token)
        lookup.extend(new[-1:])
        if finish_reason(new, cfg) is not None:
            break
        room = n - len(new) - 1  # the model's own next token comes after the draft
        proposed = (lookup.draft(min(cfg.prompt_lookup, room), cfg.eos_id) if cfg.prompt_lookup
                    else draft.propose(seq + new, min(cfg.draft_tokens, room)))
        chosen = _check_draft(model, token, proposed, T + len(new) - 1, caches)
        kept = next((i for i, (a, b) in enumerate(zip(proposed, chosen)) if a != b),
                    len(proposed))
        for token in proposed[:kept]:
            new.append(token)
            if finish_reason(new, cfg) is not None:
                return torch.cat((idx, idx.new_tensor([new])), dim=1)
        lookup.extend(proposed[:kept])
        token = chosen[kept]
    return torch.cat((idx, idx.new_tensor([new])), dim=1)


def _check_draft(model: Transformer, last: int, proposed: list[int], at: int,
                 caches: list[LayerCache]) -> list[int]:
    """The model's greedy choice after ``last`` (at position ``at``) and after each proposed
    token, in one forward that writes their keys to the cache."""
    fed = torch.tensor([[last, *proposed]], device=caches[0][0].device)
    slots = torch.arange(at, at + fed.shape[1], device=fed.device)
    length = min(-(-(at + fed.shape[1]) // CACHE_STEP) * CACHE_STEP, caches[0][0].shape[2])
    caches = [(k[:, :, :length], v[:, :, :length]) for k, v in caches]  # the keys written
    keys = torch.arange(length, device=fed.device)
    mask = (keys <= slots[:, None])[None, None]
    x = model.run_blocks(fed, slots[None], mask, slots, caches)
    return model.logits(x[0]).argmax(dim=-1).tolist()


class _PromptLookup:
    """Prompt lookup as transformers drafts: the tokens after the first earlier occurrence of
    the text's last ``ngram`` (then fewer) tokens, at most k, cut before an EOS id. The first
    occurrence of every n-gram is indexed as the text grows: a draft costs a few dict
    lookups, not a scan of the text."""

    def __init__(self, text: list[int], ngram: int = 2) -> None:
        self.text: list[int] = []
        self.first: dict[tuple[int, ...], int] = {}  # n-gram -> where it first starts
        self.ngram = ngram
        self.extend(text)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.text.append(token)
            end = len(self.text)
            for size in range(1, min(self.ngram, end) + 1):
                self.first.setdefault(tuple(self.text[end - size :]), end - size)

    def draft(self, k: int, eos: list[int]) -> list[int]:
        text = self.text
        if k == 0:
            return []
        for size in range(min(self.ngram, len(text) - 1), 0, -1):
            start = self.first.get(tuple(text[-size:]))
            if start is not None and start < len(text) - size:  # earlier than the tail itself
                draft = text[start + size : start + size + k]
                cut = next((i for i, t in enumerate(draft) if t in eos), len(draft))
                return draft[:cut]
        return []


class _DraftModel:
    """A draft model's greedy proposals, its cache kept in step with the text: a proposal feeds
    what changed since its last one, then decodes k tokens."""

    def __init__(self, model: Transformer, length: int) -> None:
        self.model = model
        self.caches = new_caches(model, 1, length)
        self.cached: list[int] = []  # the tokens whose keys the cache holds, by position
        kernels.decode_layout(model, not model.training)

    def propose(self, seq: list[int], k: int) -> list[int]:
        if k == 0:
            return []
        same = next((i for i, (a, b) in enumerate(zip(self.cached, seq)) if a != b),
                    min(len(self.cached), len(seq)))
        token = _check_draft(self.model, seq[same], seq[same + 1 :], same, self.caches)[-1]
        self.cached = list(seq)
        proposed = [token]
        while len(proposed) < k:
            token = _check_draft(self.model, token, [], len(self.cached), self.caches)[0]
            self.cached.append(proposed[-1])
            proposed.append(token)
        return proposed


def finish_reason(new: list[int], cfg: GenerationConfig) -> str | None:
    """Why the generated ``new`` tokens end with the last: "stop" (an EOS id, a stop id sequence
    or a stop string), "length" (max_new_tokens); None while they go on."""
    if new[-1] in cfg.eos_id:
        return "stop"
    strings = [stop for stop in cfg.stop if isinstance(stop, str)]
    if strings:
        # A stop string the text holds now and did not a token before ends in the last token's
        # text, or in a character that token completes: the text's end decides, decoded once
        # for all the stop strings (decoding it all each token grows with the answer). The last
        # token's text is measured after the one before it: a decoder may drop characters of a
        # text's first token (Metaspace drops its every ▁), never of a later one.
        reach = max(len(stop) for stop in strings) + len(cfg.decode(new[-2:])) + 3
        end = _text_end(new, cfg.decode, reach)
        # The whole text confirms a stop its end shows: bytes that make no character are
        # grouped as the whole answer groups them (a stop holding U+FFFD is always checked so).
        if any(stop in end or "\ufffd" in stop for stop in strings):
            if any(stop in _answer_text(new, cfg) for stop in strings):
                return "stop"
    if any(new[-len(stop):] == stop for stop in cfg.stop if not isinstance(stop, str)):
        return "stop"
    if len(new) == cfg.max_new_tokens:
        return "length"
    return None


def _text_end(ids: list[int], decode: Callable[[list[int]], str], chars: int) -> str:
    """The last ``chars`` characters of ``decode(ids)``, decoding only enough of the last ids:
    a text decoded from a cut differs from the whole's in its first characters (a character
    whose bytes the cut splits, a leading space the decoder drops), so the cut's text runs
    ``CUT_MARGIN`` characters past them; and, where byte tokens that make no character run
    across the cut, in characters the whole shows as U+FFFD (byte fallback replaces such a
    run's every byte), which the caller checks against the whole."""
    count = chars + CUT_MARGIN
    while count < len(ids):
        text = decode(ids[-count:])
        if len(text) >= chars + CUT_MARGIN:
            return text[-chars:]
        count *= 2
    return decode(ids)[-chars:]


# ---------------------------------------------------------------------------------- sampling
def sampling_logits(logits: torch.Tensor, temperature: float, top_k: int | None,
                    top_p: float | None) -> torch.Tensor:
    """fp32 logits / temperature with the tokens top_k and top_p leave out at -inf. The ops of
    transformers' Temperature, TopK and TopP warpers, in their order, so that tokens tied at a
    boundary fall the same way and the same seed samples the same tokens."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Ascending: drop the least likely tokens while their mass stays <= 1 - top_p; the
        # likeliest one always stays.
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _pick(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a sample from the filtered softmax."""
    if cfg.temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = sampling_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)
    if not isinstance(cfg.generator, (list, tuple)):
        return torch.multinomial(probs, 1, generator=cfg.generator).squeeze(-1)
    rows = []
    for row_probs, generator in zip(probs, cfg.generator, strict=True):
        rows.append(torch.multinomial(row_probs, 1, generator=generator))
    return torch.cat(rows)


def _answer_text(ids: list[int], cfg: GenerationConfig) -> str:
    """The decoded text of generated ``ids`` from where its answer starts (``cfg.answer``)."""
    text = cfg.decode(ids)
    return cfg.answer(text) if cfg.answer is not None else text


def _hit_stop(generated, cfg: GenerationConfig, finished) -> torch.Tensor:
    """Rows whose generated text now ends with a stop id sequence or contains a stop string."""
    hit = torch.zeros_like(finished)
    strs = [s for s in cfg.stop if isinstance(s, str)]
    for b, row in enumerate(torch.stack(generated, dim=1).tolist()):
        if finished[b]:
            continue
        if any(row[-len(s):] == s for s in cfg.stop if not isinstance(s, str)):
            hit[b] = True
        elif strs:
            text = _answer_text(row, cfg)
            hit[b] = any(s in text for s in strs)
    return hit


# ------------------------------------------------------------------------ argument parsing
def check_generator_device(generator: torch.Generator | None, device: torch.device) -> None:
    """A sample drawn on ``device`` needs a generator of its device type: torch refuses a CPU
    generator for a CUDA tensor only at the first draw, mid-generation."""
    if generator is None or generator.device.type == device.type:
        return
    raise ValueError(f"the generator is on {generator.device.type} and the model on "
                     f"{device.type}: make it with torch.Generator({device.type!r})")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _index(value, name: str) -> int:
    """value as an int: ints and int-likes (numpy integers, 0-d integer tensors)."""
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _token_ids(ids, name: str) -> list[int]:
    """One int-like or a sequence of them (list, 1-d array or tensor) as a list of ints."""
    with contextlib.suppress(TypeError):
        return [operator.index(ids)]
    try:
        return [operator.index(i) for i in ids]
    except TypeError:
        raise ValueError(f"{name} must be a token id or a sequence of ids, got {ids!r}") from None


def _parse_stop(stop) -> list[str | list[int]]:
    """A list of stop strings and id sequences; a bare string or id is one stop."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    with contextlib.suppress(TypeError):
        stop = [operator.index(stop)]
    _need(isinstance(stop, Iterable) and not isinstance(stop, (bytes, bytearray, dict)),
          f"stop must be a string, an id, or a list of strings, ids and id sequences, got {stop!r}")
    out = [s if isinstance(s, str) else _token_ids(s, "stop") for s in stop]
    _need(all(out), "stop: an empty string or id sequence would end every row at once")
    return out


def truncate_at_stops(text: str, stops: Sequence[str] = FUNCTION_STOPS) -> str:
    """Cut a generated text where the first stop sequence begins."""
    end = len(text)
    for stop in stops:
        at = text.find(stop)
        if 0 <= at < end:
            end = at
    return text[:end]
