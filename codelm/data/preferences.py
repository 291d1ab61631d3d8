"""Preference data for the preference tasks, in TRL's formats: pairs {"prompt", "chosen",
"rejected"} (dpo, orpo, simpo) and labelled completions {"prompt", "completion", "label"} (kto,
which also takes pairs, each as a desirable and an undesirable completion, as TRL's
unpair_preference_dataset makes them). Each field is plain text, or conversational: a list of
{"role", "content"} messages, rendered by the tokenizer's chat template as TRL renders them (the
prompt with the generation prompt, a completion as the text the whole conversation adds after
it). Read from JSONL, parquet, a datasets ``save_to_disk`` directory or a cached Hugging Face
dataset id (``read_preferences``), then tokenized as TRL 1.16's trainers tokenize them and cut
to a block of tokens (``encode_preferences``): each record is checked where it enters, a bad one
refused in one line naming its file and line."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from codelm.data.config import DataConfig, DataError
from codelm.data.sources import (
    SKIP_BAD,
    checked_messages,
    checked_tools,
    is_jsonl,
    json_object,
    jsonl_lines,
    record_files,
    table_rows,
)
from codelm.tokenization.bpe import BPETokenizer
from scraping.common import is_utf8
from tokenizer import CodeTokenizer

PAIRED = ("prompt", "chosen", "rejected")
UNPAIRED = ("prompt", "completion", "label")


class OtherTaskRecord(DataError):
    """A record of the other task's kind (a labelled completion where pairs are read): the file
    is another task's, which skipping its records would not mend."""


@dataclass(frozen=True)
class PreferenceRecord:
    """One record as read: its prompt and completions, each a text or a list of messages;
    ``completions`` (chosen, rejected) of a pair, or (completion,) with its KTO ``label``
    (True: desirable)."""

    where: str  # "file:line" (or "file: row N"), for the errors that follow it
    prompt: str | list[dict]
    completions: tuple[str | list[dict], ...]
    label: bool | None = None
    tools: list[dict] | None = None  # a conversation's function definitions (TRL's field)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass(frozen=True)
class Preference:
    """One record encoded: the prompt's ids (the template's start first) and each completion's
    (EOS last), cut to fit the block; ``label`` as the record's."""

    prompt: list[int]
    completions: tuple[list[int], ...]
    label: bool | None = None


# ---- Reading ----

def read_preferences(sources: Sequence[str], unpaired: bool, cfg: DataConfig
                     ) -> list[PreferenceRecord]:
    """Every record of ``sources``, checked (``check_record``); ``unpaired`` (kto): labelled
    completions, a pair read as its two; else pairs. ``cfg``: skip_bad (count and drop a bad
    record instead of refusing it) and max_docs (the first N records)."""
    records: list[PreferenceRecord] = []
    skipped = 0
    for source in sources:
        files = record_files(source)
        if files is None:
            raise DataError(f"data source {source}: the preference tasks read records (JSONL, "
                            "parquet, a datasets directory or a Hugging Face dataset id), not "
                            "a directory of code")
        for where, raw in _raw_records(files, cfg):
            try:
                record = check_record(json_object(raw, where) if isinstance(raw, bytes)
                                      else raw, where, unpaired)
            except DataError as exc:
                if not cfg.skip_bad:
                    hint = "" if isinstance(exc, OtherTaskRecord) else f" ({SKIP_BAD})"
                    raise DataError(f"{exc}{hint}") from None
                skipped += 1
                continue
            records += unpair(record) if unpaired and record.label is None else [record]
            if cfg.max_docs is not None and len(records) >= cfg.max_docs:
                return records[:cfg.max_docs]
    if skipped:
        print(f"skip_bad: {skipped} bad preference record(s) skipped", file=sys.stderr)
    if not records:
        raise DataError(f"data {', '.join(sources)}: no preference records (a file eval.py "
                        "--preference-pairs wrote holds none where no problem's samples both "
                        "passed and failed: its summary line says why)")
    return records


def _raw_records(files: Sequence[Path], cfg: DataConfig) -> Iterator[tuple[str, bytes | dict]]:
    for path in files:
        if is_jsonl(path):
            for _, where, raw in jsonl_lines(path):
                yield where, raw
        else:
            for _, where, row in table_rows(path, cfg):
                yield where, row


def check_record(record: dict, where: str, unpaired: bool) -> PreferenceRecord:
    """``record`` as a PreferenceRecord, or a DataError naming ``where`` and the field at fault:
    a missing or mistyped field, a pair whose two are the same."""
    is_pair = "chosen" in record or "rejected" in record
    if not is_pair and not unpaired:
        if "completion" in record and "label" in record:
            raise OtherTaskRecord(f"{where}: a labelled completion (prompt, completion, label): "
                                  "--task kto trains on those; a pair needs prompt, chosen and "
                                  "rejected")
    keys = PAIRED if is_pair or not unpaired else UNPAIRED
    required = keys[1:] if is_pair else keys  # a pair's prompt may be implicit (TRL's)
    if missing := [key for key in required if key not in record or record[key] is None]:
        fault = f"{missing[0]!r} is null" if missing[0] in record else f"no {missing[0]!r} field"
        raise DataError(f"{where}: {fault} (its fields: {', '.join(list(record)[:8]) or 'none'}; "
                        f"a record needs {', '.join(keys)}: TRL's format)")
    if is_pair and record.get("prompt") is None:
        if not all(isinstance(record[key], str | list) and record[key] for key in required):
            raise DataError(f"{where}: no 'prompt' field, and 'chosen' and 'rejected' are not "
                            "texts or messages that begin with one")
        record = {**record, **implicit_prompt(record["chosen"], record["rejected"])}
    prompt = _field(record, "prompt", where)
    completions = tuple(_field(record, key, where) for key in keys[1:] if key != "label")
    label = None
    if not is_pair:
        label = record["label"]
        if not isinstance(label, bool):
            raise DataError(f"{where}: 'label' must be true (desirable) or false, got "
                            f"{label!r}")
    for key, completion in zip(keys[1:], completions):  # "" is a completion: EOS alone
        if isinstance(completion, list) != isinstance(prompt, list):
            raise DataError(f"{where}: {key!r} and 'prompt' must both be text or both be "
                            "lists of messages")
    if is_pair and completions[0] == completions[1]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same: the pair teaches "
                        "nothing; drop it")
    return PreferenceRecord(where, prompt, completions, label, _tools(record, where))


def implicit_prompt(chosen: str | list, rejected: str | list) -> dict:
    """A pair without a prompt as TRL's ``extract_prompt`` reads it: the prompt is where the
    two (texts, or lists of messages) first differ (a text's space before it left to the
    completions; two of which one begins the other share all but the shorter's last item),
    the completions what follows."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return {"prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def _tools(record: dict, where: str) -> list[dict] | None:
    """A record's ``tools`` (``checked_tools``), for conversational records alone."""
    tools = checked_tools(record, where)
    if tools and not isinstance(record.get("prompt"), list):
        raise DataError(f"{where}: 'tools' goes with conversational records (a prompt of "
                        "messages), which a chat template renders")
    return tools


def _field(record: dict, key: str, where: str) -> str | list[dict]:
    """A text field, or a conversation's messages (``checked_messages``)."""
    value = record[key]
    if isinstance(value, str):
        if not is_utf8(value):
            raise DataError(f"{where}: {key!r} holds a lone surrogate (not valid UTF-8)")
        return value
    if not (isinstance(value, list) and value):
        raise DataError(f"{where}: {key!r} must be a string or a non-empty list of "
                        "{role, content} messages")
    return checked_messages(value, key, where)


def _text_of(field: str | list[dict]) -> str:
    return field if isinstance(field, str) else "".join(m.get("content") or "" for m in field)


def unpair(record: PreferenceRecord) -> list[PreferenceRecord]:
    """A pair as KTO's two labelled completions: the chosen desirable, the rejected not."""
    chosen, rejected = record.completions
    return [PreferenceRecord(record.where, record.prompt, (chosen,), True, record.tools),
            PreferenceRecord(record.where, record.prompt, (rejected,), False, record.tools)]


def split_records(records: Sequence[PreferenceRecord], val_frac: float, seed: int
                  ) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(train, validation): ``val_frac`` of the distinct prompts (at least one, seeded) held
    out with every record of theirs, so that no validation prompt is trained on (several pairs
    of one problem, an unpaired pair's two records)."""
    keys = [json.dumps(r.prompt, sort_keys=True) for r in records]
    prompts = list(dict.fromkeys(keys))
    if len(prompts) < 2:
        raise DataError(f"{len(records)} preference record(s) of {len(prompts)} distinct "
                        "prompt(s): too few to hold out a validation split; add records or "
                        "give --val-data")
    n_held = max(1, round(val_frac * len(prompts)))
    if n_held == len(prompts):
        raise DataError(f"val_frac {val_frac} of {len(prompts)} distinct prompts holds out every "
                        "one, leaving none to train on: lower val_frac (--data-options) or give "
                        "--val-data")
    held = set(random.Random(seed).sample(prompts, n_held))
    train = [r for r, key in zip(records, keys) if key not in held]
    return train, [r for r, key in zip(records, keys) if key in held]


# ---- Encoding ----

def encode_preferences(records: Sequence[PreferenceRecord], tok: CodeTokenizer | BPETokenizer,
                       block_size: int) -> tuple[list[Preference], Counter]:
    """Each record's ids (``encode_record``), its completions cut to fit ``block_size`` tokens
    after the prompt; and the events counted (completions cut). skip_bad drops the records
    encoding refuses before the split (``encodable``)."""
    events: Counter = Counter()
    encoded = [encode_record(record, tok, block_size, events) for record in records]
    return encoded, events


def encodable(records: Sequence[PreferenceRecord], tok: CodeTokenizer | BPETokenizer,
              block_size: int) -> tuple[list[PreferenceRecord], int]:
    """The records that encode for ``block_size`` (``encode_record`` refuses none of them), and
    how many do not: skip_bad's, before a split holds out a prompt."""
    kept = []
    for record in records:
        try:
            encode_record(record, tok, block_size, Counter())
        except DataError:
            continue
        kept.append(record)
    return kept, len(records) - len(kept)


def encode_record(record: PreferenceRecord, tok: CodeTokenizer | BPETokenizer, block_size: int,
                  events: Counter) -> Preference:
    """A record's ids as TRL 1.16's DPO and KTO trainers tokenize it (``tokenized``), each
    completion cut to the ``block_size`` tokens the row may hold (``events``
    completion_truncated counts the cuts); a DataError where the prompt leaves no room, or where
    the cut leaves a pair's two the same."""
    prompt, completions = tokenized(record, tok)
    room = block_size - len(prompt)
    if room < 1:
        raise DataError(f"{record.where}: the prompt is {len(prompt)} tokens, and block_size "
                        f"{block_size} leaves no room for a completion: raise --block-size, or "
                        "shorten the prompt")
    if not all(completions):
        raise DataError(f"{record.where}: a completion adds no token to the prompt's: drop "
                        "the record")
    events["completion_truncated"] += sum(len(ids) > room for ids in completions)
    completions = [ids[:room] for ids in completions]
    if len(completions) == 2 and completions[0] == completions[1]:
        raise DataError(f"{record.where}: 'chosen' and 'rejected' are the same in the "
                        f"{room} tokens block_size {block_size} leaves after the prompt: raise "
                        "--block-size")
    return Preference(prompt, tuple(completions), record.label)


def tokenized(record: PreferenceRecord, tok: CodeTokenizer | BPETokenizer
              ) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, each completion's ids) as TRL tokenizes them: plain text as
    ``tokenizer(text)`` reads it (the template's start first, special tokens' text as the
    tokens), each completion ended with EOS; a conversation rendered by the chat template (the
    prompt with the generation prompt, no EOS added: the template ends the turn). The prompt
    and each prompt + completion are tokenized whole, and the completions start where the
    prompt's ids and theirs first differ."""
    if record.conversational:
        if getattr(tok, "chat_template", None) is None:
            raise DataError(f"{record.where}: conversational records need the tokenizer of an "
                            "instruct model, whose tokenizer_config.json holds a chat_template "
                            "(--init-from, --tokenizer)")
        if record.prompt[-1]["role"] not in ("user", "tool"):
            raise DataError(f"{record.where}: the prompt ends with a message of role "
                            f"{record.prompt[-1]['role']!r}: it must end with the user's (or a "
                            "tool's), which the completions answer")
        try:
            prompt = tok.encode(tok.apply_chat_template(record.prompt, True, record.tools))
            wholes = [tok.encode(tok.apply_chat_template(record.prompt + completion, False,
                                                         record.tools))
                      for completion in record.completions]
        except ValueError as e:  # the template's own error (raise_exception, an unknown role)
            raise DataError(f"{record.where}: {e}") from None
    else:
        eos = [] if tok.eos_id is None else [tok.eos_id]
        prompt = [*tok.template_prefix, *tok.encode(record.prompt)]
        wholes = []
        for completion in record.completions:
            ids = [*tok.template_prefix, *tok.encode(record.prompt + completion)]
            wholes.append(ids if ids[-1:] == eos else ids + eos)
    shared = min(_common_prefix(prompt, whole) for whole in wholes)
    return prompt[:shared], [whole[shared:] for whole in wholes]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def prompt_text(record: PreferenceRecord, tok: CodeTokenizer | BPETokenizer) -> str:
    """The text a model is prompted with for ``record``: plain, or rendered by the chat
    template with the generation prompt."""
    if not record.conversational:
        return record.prompt
    return tok.apply_chat_template(record.prompt, True, record.tools)
