"""A model's prompts encoded and completed, and its losses summed, as the evaluation settings
say (``Scoring``: EvalConfig's fields of those names): the context a model is scored with, each
prompt's ids as training tokenized them, completions generated (the continuous-batching engine,
or batches for beam search) or streamed, and the loss of reference completions."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Protocol

import torch
from torch.nn.utils.rnn import pad_sequence

from codelm.data.config import DataConfig
from codelm.data.datasets import collate
from codelm.data.encoding import (
    RUN_READ_TEXT,
    encode_prompts,
    ended,
    fit_prompt,
    reads_special_tokens,
    supervised_example,
    tokenize_examples,
)
from codelm.data.examples import Example, stop_ids_of
from codelm.evaluation import journal
from codelm.kernels import IGNORE_INDEX
from codelm.loading import LoadedModel
from codelm.models.engine import Engine, pool_length
from codelm.models.generation import (
    GenerationConfig,
    generate,
    seed_of_sample,
    stream,
    truncate_at_stops,
)
from codelm.runtime.console import progress_bar
from tokenizer import decode_generated, generation_eos_ids


class Scoring(Protocol):
    """What scoring reads of an evaluation's settings (EvalConfig has each)."""

    block_size: int | None
    data_options: dict
    max_new_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    num_beams: int
    compile: bool
    seed: int
    batch_size: int
    progress: bool


def context(lm: LoadedModel, cfg: Scoring) -> int:
    """The context a model is scored and prompted with: cfg's, but never past its positions."""
    return min(cfg.block_size or lm.model.cfg.block_size, lm.model.cfg.block_size)


def shared_context(models: Sequence[LoadedModel]) -> int:
    """One context for every compared model: the smallest, a run's being its training one."""
    return min(min(lm.model.cfg.block_size, (lm.run_config or {}).get("block_size") or
                   lm.model.cfg.block_size) for lm in models)


def _pair_special_tokens(lm: LoadedModel, cfg: Scoring) -> bool | None:
    """Whether prompts' special-token text reads as the tokens (None: a model without a run)."""
    if "pair_special_tokens" in cfg.data_options:
        return bool(cfg.data_options["pair_special_tokens"])
    run = lm.run_config
    if not run:
        return None
    return reads_special_tokens(run.get("task", "lm"),
                                (run.get("data_options") or {}).get("pair_special_tokens"))


def _prompt_ids(lm: LoadedModel, prompts: Sequence[str], cfg: Scoring) -> list[list[int]]:
    """Each prompt's ids, special-token text read as the model learned it."""
    why = ("--data-options sets pair_special_tokens false"  # the user's choice, for a base too
           if "pair_special_tokens" in cfg.data_options else RUN_READ_TEXT)
    return encode_prompts(lm.tokenizer, prompts, _pair_special_tokens(lm, cfg),
                          " (eval.py --data-options '{\"pair_special_tokens\": true}' reads them "
                          "as the tokens)", why)


def scored_batches(lm: LoadedModel, examples: Sequence[dict], cfg: Scoring, desc: str
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """The examples in ``collate`` batches of ``cfg.batch_size`` on the model's device, a
    progress bar counting them."""
    device = next(lm.model.parameters()).device
    with progress_bar(total=len(examples), desc=f"{lm.label} {desc}", unit="example",
                      enabled=cfg.progress, leave=False) as bar:
        for i in range(0, len(examples), cfg.batch_size):
            batch = collate(examples[i : i + cfg.batch_size], lm.tokenizer.pad_id)
            yield {key: tensor.to(device) for key, tensor in batch.items()}
            bar.update(len(batch["labels"]))


def summed_loss(lm: LoadedModel, examples: Sequence[dict], cfg: Scoring, desc: str
                ) -> tuple[float, float, float]:
    """(summed loss, correct next tokens, scored tokens) of ``collate`` batches."""
    total = correct = count = 0.0
    for batch in scored_batches(lm, examples, cfg, desc):
        # No mask (collate pads right): SDPA may use its fused causal kernels (flash on CUDA)
        labels = batch["labels"]
        loss, right = lm.model(batch["input_ids"], targets=labels, reduction="sum",
                               count_correct=True,
                               document_ids=batch.get("document_ids"))  # files kept apart
        total += float(loss)
        correct += float(right)
        count += float((labels != IGNORE_INDEX).sum())
    return total, correct, count


def training_ids(lm: LoadedModel, examples: Sequence[Example], cfg: Scoring,
                 data_cfg: DataConfig | None = None
                 ) -> list[tuple[list[int], list[int], tuple[int, int]]]:
    """(prompt ids, completion ids, code span) of each example as dataset.py tokenizes it for
    training, special-token text read as ``lm``'s run (or ``cfg.data_options``) read it."""
    data_cfg = replace(data_cfg or DataConfig(), block_size=context(lm, cfg), progress=False)
    if (reads := _pair_special_tokens(lm, cfg)) is not None:
        data_cfg = replace(data_cfg, pair_special_tokens=reads)
    return tokenize_examples(list(examples), lm.tokenizer, data_cfg, "tokenize")


@torch.no_grad()
def score_supervised(lm: LoadedModel, examples: Sequence[Example], cfg: Scoring,
                     data_cfg: DataConfig | None = None) -> float:
    """Mean loss of each reference completion (its EOS where training adds one) given its
    prompt, as dataset.py's training example of the pair: the validation loss a supervised run
    logs on these examples."""
    data_cfg = data_cfg or DataConfig()
    eos = lm.tokenizer.eos_id if data_cfg.add_eos else None
    start = lm.prompt_start
    scored = []
    for example, (prompt, completion, span) in zip(examples,
                                                   training_ids(lm, examples, cfg, data_cfg)):
        limited = ended(completion, eos, example.ends, data_cfg.max_completion_tokens)
        scored.append(supervised_example(prompt, limited, context(lm, cfg), None,
                                         data_cfg.max_prompt_tokens, span, start))
    total, _, count = summed_loss(lm, scored, cfg, "reference loss")
    if count == 0:
        raise ValueError("no reference tokens to score")
    return total / count


def stop_ids(lm: LoadedModel) -> list[int]:
    """The ids that end a model's generated text (``generation_eos_ids``), and for a chat
    run the template's end-of-turn token, which its answers were trained to end with."""
    eos = generation_eos_ids(lm.tokenizer, lm.model.cfg.eos_id, lm.model.name_or_path)
    return stop_ids_of(lm.tokenizer, eos, (lm.run_config or {}).get("task"))


def chat_stop_ids(lm: LoadedModel) -> list[int]:
    """The ids that end a chat answer: ``stop_ids`` and the template's end-of-turn token."""
    return stop_ids_of(lm.tokenizer, stop_ids(lm), "chat")


def _generation(lm: LoadedModel, cfg: Scoring,
                prompt_ids: Sequence[tuple[list[int], tuple[int, int]]],
                max_prompt_tokens: int | None = None, chat: bool = False, **options
                ) -> tuple[GenerationConfig, list[int], list[list[int]]]:
    """The GenerationConfig of ``cfg``, the EOS ids, and each prompt's ids after
    ``LoadedModel.prompt_start``, cut (code first) to leave room for the new tokens. ``chat``:
    the prompts are a chat template's renderings, whole (no start before them), and the
    template's end of turn also stops."""
    tok, model = lm.tokenizer, lm.model
    eos = chat_stop_ids(lm) if chat else stop_ids(lm)
    new_tokens = _new_tokens(lm, cfg)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    gen = GenerationConfig(new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, eos_id=eos or None, generator=generator,
                           pad_id=tok.pad_id if tok.pad_id is not None else (eos or [0])[0],
                           compile=cfg.compile, **options)
    prompts = prompts_as_fed(lm, cfg, prompt_ids, max_prompt_tokens, chat)
    return gen, eos, [_opened(prompt, tok.bos_id, eos) for prompt in prompts]


def prompts_as_fed(lm: LoadedModel, cfg: Scoring,
                   prompt_ids: Sequence[tuple[list[int], tuple[int, int]]],
                   max_prompt_tokens: int | None = None, chat: bool = False) -> list[list[int]]:
    """Each prompt's ids as the model is fed them: after ``LoadedModel.prompt_start`` (a chat
    rendering whole), cut (code first, ``fit_prompt``) to leave room for the new tokens."""
    start = [] if chat else lm.prompt_start
    room = prompt_room(lm, cfg, start)
    if max_prompt_tokens is not None:
        room = min(room, max_prompt_tokens)
    return [start + fit_prompt(ids, room, span) for ids, span in prompt_ids]


def _opened(prompt: list[int], bos_id: int | None, eos: list[int]) -> list[int]:
    """A prompt of no token (a file's first line, blank, completed without context) opens with
    BOS, else EOS, as lm-eval and LCA's baselines open an empty context."""
    if prompt:
        return prompt
    opening = bos_id if bos_id is not None else next(iter(eos), None)
    return [] if opening is None else [opening]


def _new_tokens(lm: LoadedModel, cfg: Scoring) -> int:
    """The tokens a completion may have: max_new_tokens, at most half the model's context."""
    return min(cfg.max_new_tokens, context(lm, cfg) // 2)


def prompt_room(lm: LoadedModel, cfg: Scoring, start: Sequence[int] | None = None) -> int:
    """The tokens a prompt may have after ``start`` (default ``LoadedModel.prompt_start``),
    leaving room for the completion."""
    start = lm.prompt_start if start is None else start
    return context(lm, cfg) - _new_tokens(lm, cfg) - len(start)


@torch.no_grad()
def generate_texts(lm: LoadedModel, prompts: Sequence[str], cfg: Scoring,
                   stops: Sequence[str] = (), desc: str = "generate",
                   prompt_ids: Sequence[tuple[list[int], tuple[int, int]]] | None = None,
                   max_prompt_tokens: int | None = None,
                   start: Callable[[str], str] | None = None, chat: bool = False) -> list[str]:
    """Continue each prompt (greedy or sampled through the engine, beam search in left-padded
    batches), up to EOS or the first stop string (cut off). ``prompt_ids``: each prompt's ids
    and code span as training tokenized them; ``max_prompt_tokens``: the run's own prompt limit; ``start``: the answer
    within the decoded text (past its leading blank lines, say): a stop before it does not
    count; ``chat``: ``prompts`` are a chat template's renderings (``_generation``), and the
    answers' text has no special token (EvalPlus decodes with skip_special_tokens)."""
    tok, model = lm.tokenizer, lm.model

    def decoded(ids: list[int]) -> str:  # chat: as EvalPlus reads it
        return decode_generated(tok, ids, skip_special_tokens=chat)

    def text(ids: list[int]) -> str:
        return start(decoded(ids)) if start else decoded(ids)
    if chat:  # the template's special-token text is its tokens, as the server reads it
        prompt_ids = [(tok.encode(prompt), (0, 0)) for prompt in prompts]
    elif prompt_ids is None:
        prompt_ids = [(ids, (0, 0)) for ids in _prompt_ids(lm, prompts, cfg)]
    gen, eos, encoded = _generation(
        lm, cfg, prompt_ids, max_prompt_tokens, chat, num_beams=cfg.num_beams,
        stop=(list(stops) or None) if cfg.num_beams == 1 else None, decode=decoded, answer=start)
    device = next(model.parameters()).device
    if cfg.num_beams == 1:
        kept_in = journal.generation_file(desc, encoded, gen, cfg.seed, chat)
        return _engine_texts(lm, encoded, gen, eos, cfg, stops, text, desc, kept_in)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    with progress_bar(total=len(order), desc=f"{lm.label} {desc}", unit="prompt",
                      enabled=cfg.progress, leave=False) as bar:
        for first in range(0, len(order), cfg.batch_size):
            rows = order[first : first + cfg.batch_size]
            batch = [torch.tensor(encoded[i]) for i in rows]
            idx = pad_sequence(batch, True, gen.pad_id, padding_side="left")
            mask = pad_sequence([torch.ones_like(p, dtype=torch.bool) for p in batch], True,
                                padding_side="left")
            out = generate(model, idx.to(device), gen, attention_mask=mask.to(device))
            for b, i in enumerate(rows):
                ids = out[b, idx.shape[1] :].tolist()
                ids = ids[: next((j for j, t in enumerate(ids) if t in eos), len(ids))]
                outputs[i] = truncate_at_stops(text(ids), stops)
            bar.update(len(rows))
    return outputs


def _prompt_generator(seed: int, prompt: int, device: torch.device) -> torch.Generator:
    """The generator prompt number ``prompt`` samples with (seeded ``seed_of_sample``)."""
    return torch.Generator(device).manual_seed(seed_of_sample(seed, prompt))


def _engine_texts(lm: LoadedModel, encoded: list[list[int]], gen: GenerationConfig,
                  eos: list[int], cfg: Scoring, stops: Sequence[str],
                  text: Callable[[list[int]], str], desc: str,
                  kept_in: journal.JournalFile | None = None) -> list[str]:
    """``generate_texts`` through the continuous-batching engine (cfg.batch_size slots, its step
    compiled where cfg.compile asks): prompt i samples with its own generator, seeded
    seed_of_sample(cfg.seed, i), so its text does not depend on the batch it ran in.
    ``kept_in``: the journal file whose finished prompts are not generated again, and which
    keeps each one finishing."""
    new_ids = journal.kept_outputs(kept_in, len(encoded), f"{lm.label} {desc}")
    rest = [i for i in range(len(encoded)) if i not in new_ids]
    if rest:
        new_ids.update(_engine_ids(lm, encoded, rest, gen, cfg, desc, kept_in))
    outputs = []
    for i in range(len(encoded)):
        ids = new_ids[i]
        ids = ids[: next((j for j, t in enumerate(ids) if t in eos), len(ids))]
        outputs.append(truncate_at_stops(text(ids), stops))
    return outputs


def _engine_ids(lm: LoadedModel, encoded: list[list[int]], rest: list[int],
                gen: GenerationConfig, cfg: Scoring, desc: str,
                kept_in: journal.JournalFile | None) -> dict[int, list[int]]:
    """The new tokens of the prompts numbered ``rest`` of ``encoded``, each appended to the
    journal file ``kept_in`` as it finishes. The pool is sized for every prompt of ``encoded``,
    as it is when none was kept."""
    longest = max(len(ids) for ids in encoded) + gen.max_new_tokens
    engine = Engine(lm.model, cfg.batch_size, max_len=pool_length(longest, context(lm, cfg)),
                    compile=cfg.compile)
    device = next(lm.model.parameters()).device
    prompt_of = {}
    for i in rest:
        generator = None
        if gen.temperature > 0:
            generator = _prompt_generator(cfg.seed, i, device)
        request = engine.add(encoded[i], replace(gen, generator=generator, compile=False))
        prompt_of[request] = i
    new_ids: dict[int, list[int]] = {i: [] for i in rest}
    with (progress_bar(total=len(encoded), initial=len(encoded) - len(rest),
                       desc=f"{lm.label} {desc}", unit="prompt", enabled=cfg.progress,
                       leave=False) as bar,
          journal.appending(kept_in) as kept):
        for event in engine.run():
            prompt = prompt_of[event.request]
            new_ids[prompt].append(event.token)
            if event.finished is not None:
                bar.update(1)
                journal.keep(kept, prompt, new_ids[prompt])
    return new_ids


def completion_room_notes(lm: LoadedModel, prompt: str, cfg: Scoring) -> list[str]:
    """What a completion of ``prompt`` leaves out, as ``stream_completion`` fits it to the
    model's context: new tokens past half the context, and the prompt's start past its room."""
    notes = []
    window = context(lm, cfg)
    new_tokens = _new_tokens(lm, cfg)
    if new_tokens < cfg.max_new_tokens:
        notes.append(f"at most {new_tokens} new tokens, not max_new_tokens {cfg.max_new_tokens}: "
                     f"a completion takes at most half of {lm.label}'s {window}-token context")
    (prompt_ids,) = _prompt_ids(lm, [prompt], cfg)
    room = prompt_room(lm, cfg)
    if len(prompt_ids) > room:
        notes.append(f"the prompt is {len(prompt_ids)} tokens: {lm.label} reads its last {room} "
                     f"(its {window}-token context less the new tokens)")
    return notes


@torch.no_grad()
def stream_completion(lm: LoadedModel, prompt: str, cfg: Scoring,
                      write: Callable[[str], object], sample: int = 0) -> str:
    """Continue ``prompt`` as ``generate_texts`` continues its prompt number ``sample`` (its
    generator seeded alike), handing ``write`` the new text token by token; return the whole
    completion."""
    if cfg.num_beams > 1:  # a beam's text is known only once the search ends
        (text,) = generate_texts(lm, [prompt], replace(cfg, progress=False))
        write(text)
        return text
    (prompt_ids,) = _prompt_ids(lm, [prompt], cfg)
    gen, eos, (ids,) = _generation(lm, cfg, [(prompt_ids, (0, 0))])
    device = next(lm.model.parameters()).device
    gen = replace(gen, generator=_prompt_generator(cfg.seed, sample, device))
    new: list[int] = []
    shown = ""
    for step in stream(lm.model, torch.tensor([ids], device=device), gen):
        if int(step[0]) in eos:
            break
        new.append(int(step[0]))
        text = decode_generated(lm.tokenizer, new)
        if text.startswith(shown) and not text.endswith("\ufffd"):  # else a character's bytes
            write(text[len(shown) :])                                # are still coming
            shown = text
    text = decode_generated(lm.tokenizer, new)
    write(text[len(shown) :] if text.startswith(shown) else f"\n{text}")
    return text


def served_prompt(lm: LoadedModel, cfg: Scoring, text: str) -> list[int]:
    """A served completion prompt's ids: as generate_texts encodes one."""
    return lm.prompt_start + _prompt_ids(lm, [text], cfg)[0]
