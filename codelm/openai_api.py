"""The OpenAI API's requests as codelm's server reads them, apart from HTTP and the engine:
the models answered (``ServedModel``), a request's sampling settings checked (``read_params``:
``Params``), its prompts (``completion_prompts``, ``chat_prompts``: ``Prompt``), and each
refusal as OpenAI's error JSON (``ApiError``, a 4xx naming the parameter)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from architecture import Transformer
from codelm.endpoints import MAX_CHOICES
from codelm.models.generation import MIN_TEMPERATURE, GenerationConfig
from codelm.tool_calls import writes_calls
from tokenizer import Tokenizer, decode_generated, generation_eos_ids

# The limits on the lists a request may give: OpenAI's, but for stops (OpenAI takes 4; this
# server takes more, as vLLM does: the HumanEval harness stops at 7 strings).
MAX_STOPS = 16
MAX_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20


@dataclass
class ServedModel:
    """A model the server answers for. ``encode``: a completion prompt's ids, as eval prompts
    the model (its start tokens included); ``decode``: generated ids' text; ``chat_prompt``: a
    conversation's ids with the generation prompt, None where the tokenizer has no chat
    template; ``token_text``: an id's own text (logprobs name tokens by it); ``token_bytes``:
    the bytes it decodes to (part of a character where it is); ``reads_calls``: the template
    a request with tools renders (its "tool_use" one where it has one) teaches Hermes tool
    calls, read from its answers into ``tool_calls``; ``joining_ids``: the ids whose text the
    ids after them can change (byte-fallback tokens: a run of them decodes as one)."""

    name: str
    model: Transformer
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    token_text: Callable[[int], str]
    token_bytes: Callable[[int], bytes]
    eos_ids: list[int]
    chat_eos_ids: list[int]  # those that end a chat answer: eos_ids and the template's end of turn
    chat_prompt: Callable[[list[dict], list[dict] | None], list[int]] | None = None
    start: int = 0  # the tokens every encoded prompt opens with (a run's start), kept whole
    reads_calls: bool = False
    joining_ids: frozenset[int] = frozenset()
    context: int | None = None  # the tokens a sequence may hold (None: the model's block_size)
    weights: str | None = None  # a fingerprint of its weights, listed as codelm_weights

    @property
    def context_length(self) -> int:
        """The tokens one sequence (a prompt and its answer) may hold: ``context``, never past
        the model's positions."""
        return min(self.context or self.model.cfg.block_size, self.model.cfg.block_size)

    def ending_ids(self, chat: bool) -> list[int]:
        """The ids that end an answer: a chat answer's, or a completion's."""
        return self.chat_eos_ids if chat else self.eos_ids


def served_model(name: str, model: Transformer, tokenizer: Tokenizer,
                 encode: Callable[[str], list[int]] | None = None, start: int = 0,
                 eos_ids: list[int] | None = None, chat_eos_ids: list[int] | None = None,
                 context: int | None = None, weights: str | None = None) -> ServedModel:
    """A ServedModel of a model and its codelm tokenizer (tokenizer.load_tokenizer's): prompts
    encoded by ``encode`` (default the tokenizer's own; ``start``: the tokens it puts first),
    chat where it has a template; ``eos_ids``: the ids that end a text (default
    ``generation_eos_ids``); ``chat_eos_ids``: those that end a chat answer (default
    ``eos_ids``; eval.py's add the template's end-of-turn token,
    ``scoring.chat_stop_ids``); ``context``: the tokens a sequence may hold (default the
    model's context); ``weights``: a fingerprint of its weights, which /v1/models lists (an
    evaluation's journal of the endpoint names it)."""
    def chat_prompt(messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return tokenizer.encode(tokenizer.apply_chat_template(messages, True, tools))

    def token_bytes(i: int) -> bytes:  # an id past the tokenizer's decodes to nothing
        return tokenizer.token_bytes(i) if i < tokenizer.vocab_size else b""

    template = getattr(tokenizer, "chat_template", None)
    # a request with tools is rendered by the tokenizer's "tool_use" template where it has one
    tools_template = getattr(tokenizer, "tool_use_template", None) or template
    eos_ids = eos_ids or generation_eos_ids(tokenizer, model.cfg.eos_id, model.name_or_path)
    return ServedModel(name, model, encode or tokenizer.encode,
                       lambda ids: decode_generated(tokenizer, ids),
                       lambda i: decode_generated(tokenizer, [i]), token_bytes,
                       eos_ids, chat_eos_ids or eos_ids,
                       chat_prompt if template is not None else None, start,
                       writes_calls(tools_template),
                       getattr(tokenizer, "byte_fallback_ids", frozenset()),
                       context, weights)


class ApiError(Exception):
    """A request the server refuses: OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param,
                          "code": self.code}}


@dataclass
class Params:
    """A request's sampling settings, checked."""

    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    n: int
    stop: list[str]
    seed: int | None
    logprobs: int | None
    stream: bool
    include_usage: bool
    echo: bool


def number_field(body: dict, key: str, default, kind, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        return default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, f"'{key}' must be an integer, got {value!r}", key)
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ApiError(400, f"'{key}' must be a number, got {value!r}", key)
    if high is None and low is not None and value < low:
        raise ApiError(400, f"'{key}' must be >= {low}, got {value!r}", key)
    if high is not None and not low <= value <= high:
        raise ApiError(400, f"'{key}' must be in [{low}, {high}], got {value!r}", key)
    return value


# OpenAI parameters, and vLLM's sampling extensions, that would change the text and are not
# served, with the values that leave it as served: another value is refused, never ignored.
UNSERVED = {"logit_bias": (None, {}), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
            "suffix": (None, ""), "response_format": (None, {"type": "text"}),
            "repetition_penalty": (None, 1), "min_p": (None, 0), "min_tokens": (None, 0),
            "ignore_eos": (None, False), "stop_token_ids": (None, []),
            "include_stop_str_in_output": (None, False), "use_beam_search": (None, False),
            "allowed_token_ids": (None, []), "bad_words": (None, []),
            "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
            "guided_grammar": (None,), "structured_outputs": (None,), "length_penalty": (None, 1),
            "logits_processors": (None, []), "add_generation_prompt": (None, True),
            "continue_final_message": (None, False), "chat_template": (None,),
            "chat_template_kwargs": (None, {}), "parallel_tool_calls": (None, True),
            "functions": (None, []), "function_call": (None, "none", "auto")}
# The fields each endpoint reads (UNSERVED's among them), and OpenAI's bookkeeping fields,
# which change no text; any other field is answered without being read, and the server says so
# on its console, as vLLM logs the fields it ignores.
_BOOKKEEPING = {"user", "metadata", "store", "service_tier"}
_EITHER = {"model", "max_tokens", "stop", "logprobs", "temperature", "top_p", "top_k", "n",
           "seed", "stream", "stream_options", "truncate_prompt_tokens", *_BOOKKEEPING,
           *UNSERVED}
COMPLETION_FIELDS = frozenset({*_EITHER, "prompt", "echo", "best_of"})
CHAT_FIELDS = frozenset({*_EITHER, "messages", "max_completion_tokens", "top_logprobs", "tools",
                         "tool_choice"})


def unread_fields(body: dict, chat: bool) -> list[str]:
    """The fields of a request body its endpoint does not read (a misspelt 'max_token', a
    chat field sent to /v1/completions), in order."""
    return sorted(set(body) - (CHAT_FIELDS if chat else COMPLETION_FIELDS))


# A chat request's tool_choice: "auto" or "none" (its tools in the prompt either way, as vLLM
# renders them by default; a call is what the answer holds, as the template teaches it, read
# into tool_calls under "auto" where the template teaches Hermes calls); a call that "required"
# or a named function would force is not served.
TOOL_CHOICES = (None, "auto", "none")


def refuse_unserved(body: dict) -> None:
    for key, served in UNSERVED.items():
        if key in body and body[key] not in served:
            raise ApiError(400, f"'{key}' is not served by codelm's server (its text would not "
                           "be what was asked); leave it out", key)
    best_of = body.get("best_of")
    choices = 1 if body.get("n") is None else body["n"]  # null reads as unset, as everywhere
    if best_of is not None and best_of != choices:
        raise ApiError(400, "'best_of' is not served: ask for 'n' choices and pick", "best_of")


def read_params(body: dict, chat: bool, room: int) -> Params:
    """The sampling settings of a request body; ``room``: the most new tokens its prompt
    leaves in the model's context."""
    refuse_unserved(body)
    default_tokens = room if chat else 16
    newer = chat and body.get("max_completion_tokens") is not None  # null: not set
    key = "max_completion_tokens" if newer else "max_tokens"
    max_tokens = number_field(body, key, default_tokens, int, 1)
    if max_tokens > room:
        raise ApiError(400, f"{key} {max_tokens} is past the model's context: the prompt "
                       f"leaves room for {room} new tokens", key, "context_length_exceeded")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
            and len(stop) <= MAX_STOPS):
        raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOPS} non-empty "
                       "strings", "stop")
    if chat:
        logprobs = (number_field(body, "top_logprobs", 0, int, 0, MAX_TOP_LOGPROBS)
                    if flag(body, "logprobs") else None)
        if logprobs is None and body.get("top_logprobs") is not None:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        logprobs = number_field(body, "logprobs", None, int, 0, MAX_LOGPROBS)
    echo = flag(body, "echo") and not chat
    if echo and logprobs is not None:
        raise ApiError(400, "'echo' with 'logprobs' (the prompt's own log-probs) is not served; "
                       "ask for one of the two", "echo")
    temperature = number_field(body, "temperature", 1.0, float, 0.0, 2.0)
    top_p = number_field(body, "top_p", 1.0, float, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be > 0", "top_p")
    top_k = number_field(body, "top_k", -1, int, -1)  # vLLM's extension; -1 or 0: every token
    if 0 < temperature < MIN_TEMPERATURE:
        raise ApiError(400, f"'temperature' must be 0 (greedy) or at least {MIN_TEMPERATURE}",
                       "temperature")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    stream = flag(body, "stream")
    if options and not stream:
        raise ApiError(400, "'stream_options' is for a stream: set 'stream': true",
                       "stream_options")
    seed = number_field(body, "seed", None, int, -(2**63), 2**64 - 1)  # signed or unsigned 64 bits
    return Params(max_tokens, float(temperature), None if top_p == 1 else float(top_p),
                   top_k if top_k > 0 else None, number_field(body, "n", 1, int, 1, MAX_CHOICES),
                   stop, seed, logprobs, stream, flag(options, "include_usage"), echo)


def flag(body: dict, key: str) -> bool:
    """A boolean field (absent or null: false); another value is refused, as the API does."""
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be true or false, not {json.dumps(value)}", key)
    return bool(value)


def choice_seeds(seed: int, n: int) -> list[int]:
    """The seeds of a request's n choices: choice i's is seed + i, so eval, asking for problem
    p's samples at the seed of its sample p x n (generation.seed_of_sample), gets the texts it
    samples from the same model locally."""
    return [(seed + i) % 2**64 for i in range(n)]


def generation_config(params: Params, served: ServedModel, seed: int | None, chat: bool
                      ) -> GenerationConfig:
    """A request's GenerationConfig: a chat answer also ends at its template's end of turn."""
    eos_ids = served.ending_ids(chat)
    generator = None
    if seed is not None and params.temperature > 0:
        generator = torch.Generator(served.model.wte.weight.device).manual_seed(seed)
    return GenerationConfig(params.max_tokens, temperature=params.temperature,
                            top_p=params.top_p if params.temperature > 0 else None,
                            top_k=params.top_k if params.temperature > 0 else None,
                            eos_id=eos_ids or None, stop=params.stop or None,
                            decode=served.decode, generator=generator)


def left_cut(ids: list[int], keep: int, start: int) -> list[int]:
    """``ids`` cut to their last ``keep`` tokens, as vLLM's truncate_prompt_tokens cuts them,
    the ``start`` tokens every prompt opens with kept (as eval cuts a local model's prompt)."""
    if len(ids) <= keep:
        return ids
    if keep <= start:
        return ids[len(ids) - keep:]
    return ids[:start] + ids[len(ids) - (keep - start):]


class Prompt(NamedTuple):
    """A prompt's ids (its start tokens included) and its text as sent (``echo`` returns it)."""

    ids: list[int]
    text: str


def completion_prompts(served: ServedModel, body: dict) -> list[Prompt]:
    """A completion request's prompt(s): a string, a list of strings, a list of ids, or a list
    of lists of ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt):
        prompt = [prompt]
    if not (isinstance(prompt, list) and prompt):
        raise ApiError(400, "'prompt' must be a string, a list of strings or a list of token "
                       "ids", "prompt")
    out = []
    vocab = served.model.cfg.vocab_size
    for p in prompt:
        if isinstance(p, str):
            out.append(Prompt(served.encode(p), p))
        elif isinstance(p, list) and p and all(_is_id(t) and 0 <= t < vocab for t in p):
            out.append(Prompt(list(p), served.decode(p)))
        else:
            raise ApiError(400, f"'prompt': each prompt is a string or a list of token ids in "
                           f"[0, {vocab})", "prompt")
    if not all(p.ids for p in out):
        raise ApiError(400, "'prompt' is empty: a completion continues at least one token",
                       "prompt")
    return out


def _is_id(value) -> bool:
    """Whether a JSON value is a token id: an integer (true and false are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def chat_prompts(served: ServedModel, body: dict) -> list[Prompt]:
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects",
                       "messages")
    if served.chat_prompt is None:
        raise ApiError(400, f"model {served.name!r} has no chat template (its tokenizer has "
                       "none): use /v1/completions", "messages", "no_chat_template")
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(tool, dict) for tool in tools)):
        raise ApiError(400, "'tools' must be a list of tool objects", "tools")
    choice = body.get("tool_choice")
    if choice not in TOOL_CHOICES:
        raise ApiError(400, f"'tool_choice' {json.dumps(choice)} is not served (a call is what "
                       "the model writes in its answer, not forced): 'auto' or 'none'",
                       "tool_choice")
    messages = [_template_message(m) for m in messages]
    try:
        return [Prompt(served.chat_prompt(messages, tools), "")]
    except ValueError as e:
        raise ApiError(400, f"the chat template cannot render these messages: {e}",
                       "messages") from None


def _template_message(message: dict) -> dict:
    """A message as a chat template reads it (as vLLM gives it one): its content as text, and
    a tool call's arguments, JSON text on the wire, as the object they spell; tool_calls that
    are not a list of calls (each a function naming its name and arguments) are refused, as
    the API's schema refuses them."""
    out = {**message, "content": _message_text(message.get("content"))}
    calls = message.get("tool_calls")
    if calls is None:
        return out
    if not isinstance(calls, list):
        raise ApiError(400, "a message's 'tool_calls' must be a list of tool calls", "messages")
    out["tool_calls"] = [_arguments_read(call) for call in calls]
    return out


def _arguments_read(call) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(function, dict) and isinstance(function.get("name"), str)
            and "arguments" in function):
        raise ApiError(400, "a tool call must be {'type': 'function', 'function': {'name': "
                       "NAME, 'arguments': JSON}}", "messages")
    if not isinstance(function["arguments"], str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        raise ApiError(400, f"a tool call's 'arguments' {function['arguments'][:40]!r} is not "
                       "JSON text", "messages") from None
    return {**call, "function": {**function, "arguments": arguments}}


def _message_text(content) -> str:
    """A message's content as text: a string; null (an assistant's tool call) as empty; a
    list of content parts, their text parts joined by newlines (as vLLM joins them)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        if all(part.get("type") == "text" and isinstance(part.get("text"), str)
               for part in content):
            return "\n".join(part["text"] for part in content)
    raise ApiError(400, "a message's 'content' must be a string or a list of text parts "
                   "(this server reads text only)", "messages")
