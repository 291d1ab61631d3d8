"""Chat templates: the roles and template beside a tokenizer file, ``render_chat`` (a
sandboxed jinja2 render, as HF renders it), and a rendered conversation cut into its assistant
turns (``chat_turns``) and the template's end-of-turn token (``end_of_turn_ids``)."""

from __future__ import annotations

import functools
import json
import os
import typing
from collections.abc import Sequence
from pathlib import Path

from codelm.tokenization.files import read_json, shown_json


def roles_from_config(directory: Path) -> dict:
    """bos/eos/pad names from a tokenizer_config.json beside the file (null: none; absent:
    guess), and from special_tokens_map.json where the config lists no added_tokens_decoder
    (the layout transformers wrote before 4.34, whose map then wins, as transformers reads it)."""
    config = directory / "tokenizer_config.json"
    data = read_json(config) if config.is_file() else {}
    where = {f"{role}_token": config for role in ("bos", "eos", "pad")}
    special_map = directory / "special_tokens_map.json"
    if "added_tokens_decoder" not in data and special_map.is_file():
        mapped = read_json(special_map)
        for key in where:
            if key in mapped:
                data = {**data, key: mapped[key]}
                where[key] = special_map
    roles = {role: data[f"{role}_token"] for role in ("bos", "eos", "pad")
             if f"{role}_token" in data}
    for role, value in roles.items():
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            roles[role] = value = value["content"]  # an AddedToken as transformers writes it
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where[f'{role}_token']}: {role}_token must be a token string, an "
                             f"AddedToken object (its content a string) or null for none, got "
                             f"{shown_json(value)}")
    return roles


def chat_template_from_config(directory: Path) -> str | None:
    """The chat template transformers reads beside a tokenizer.json: chat_template.jinja, else
    tokenizer_config.json's chat_template (a string, or named templates: the "default" one)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text("utf-8")
    config = directory / "tokenizer_config.json"
    template = read_json(config).get("chat_template") if config.is_file() else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{config}: chat_template must be a Jinja template string, or a list "
                         f"of {{'name', 'template'}} with a 'default' one, got "
                         f"{shown_json(template)}")
    return template


def named_chat_templates(directory: Path) -> list[dict] | None:
    """The named chat templates beside a tokenizer ([{"name", "template"}, ...]: "default",
    "tool_use", ...), each of which llama.cpp's converter writes: transformers' saved layout
    (chat_template.jinja the default, additional_chat_templates/NAME.jinja the others), else
    tokenizer_config.json's list; None where the directory gives one template or none."""
    config = directory / "tokenizer_config.json"
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        others = sorted((directory / "additional_chat_templates").glob("*.jinja"))
        if not others:
            return None
        return [{"name": "default", "template": jinja_file.read_text("utf-8")}] + [
            {"name": path.stem, "template": path.read_text("utf-8")} for path in others]
    if not config.is_file():
        return None
    template = read_json(config).get("chat_template")
    if not isinstance(template, list):
        return None
    return [t for t in template if isinstance(t, dict) and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str)]


# ---- Chat templates: an instruct model's conversations, rendered as transformers renders them

@functools.lru_cache(maxsize=8)
def _compiled_chat_template(template: str):
    """The template in transformers' sandboxed Jinja2 environment: no attribute or file access
    beyond the data given, trim_blocks and lstrip_blocks, loop controls, its ``tojson`` filter,
    ``raise_exception`` and ``strftime_now``, and ``{% generation %}`` blocks rendered as text."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text so)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: line {e.lineno}: {e.message}") from None


# A message's reasoning by transformers' names for it, the first given first: it fills
# reasoning_content (Qwen3's templates read it) and thinking (gpt-oss's), as transformers does.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _with_reasoning_names(message: dict) -> dict:
    """``message`` with its reasoning under both names the templates read, as transformers
    renders it (a message's own thinking kept)."""
    if not isinstance(message, dict):
        return message
    given = [message[key] for key in REASONING_FIELDS if message.get(key) is not None]
    if not given:
        return message
    return {"thinking": given[0], **message, "reasoning_content": given[0]}


def _without_nulls(message: dict) -> dict:
    """``message`` without its keys whose value is None, as transformers' apply_chat_template
    gives it to the template (a dataset's null ``tool_calls`` is then undefined, not None)."""
    if not isinstance(message, dict):
        return message
    return {key: value for key, value in message.items() if value is not None}


def render_chat(template: str, messages: Sequence[dict], add_generation_prompt: bool = False,
                tools: Sequence[dict] | None = None, **special_tokens: str | None) -> str:
    """``messages`` rendered by a chat ``template`` as transformers renders them (``tools``:
    the function definitions it offers the model; bos_token, eos_token, ... given as
    ``special_tokens``; one that is None is left undefined, which renders as nothing, as is a
    message's key whose value is None); the template's own errors, and the TypeErrors of its
    expressions on the messages it is given (``None|length``), are ValueErrors."""
    import jinja2

    defined = {name: token for name, token in special_tokens.items() if token is not None}
    try:
        return _compiled_chat_template(template).render(
            messages=[_with_reasoning_names(_without_nulls(message)) for message in messages],
            tools=None if tools is None else list(tools),
            documents=None, add_generation_prompt=add_generation_prompt, **defined)
    except (jinja2.exceptions.TemplateError, TypeError) as e:
        raise ValueError(f"chat_template: {e}") from None


class ChatTokenizer(typing.Protocol):
    """What cutting turns reads of a tokenizer (``codelm.tokenization.bpe.BPETokenizer``'s)."""

    chat_template: str | None

    @property
    def matched_special_tokens(self) -> list[str]: ...

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            tools: Sequence[dict] | None = None) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


class ChatTurn(typing.NamedTuple):
    """One assistant turn of a conversation, as text."""

    prompt: str  # the conversation before it, rendered with the generation prompt
    answer: str  # the assistant's text, up to the template's end-of-turn marker


def chat_turns(tok: ChatTokenizer, messages: Sequence[dict],
               tools: Sequence[dict] | None = None) -> list[ChatTurn]:
    """Each assistant turn of a conversation after its first message: what generation is
    prompted with (``tools``, the functions offered, rendered by the template), and what it is
    to answer (``chat_answer``; a tool call too). A conversation's opening assistant message (a
    greeting) follows nothing to be prompted by: the conversation only."""
    markers = tok.matched_special_tokens
    turns = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or i == 0:
            continue
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True, tools=tools)
        turn = tok.apply_chat_template(messages[: i + 1], tools=tools)
        content = message.get("content")
        if not isinstance(content, str) or message.get("tool_calls"):
            content = ""  # the template writes the call: the turn's whole text is the answer
        if turn.startswith(prompt):
            answer = chat_answer(turn[len(prompt):], content, markers)
        else:
            answer = _prefilled_answer(prompt, turn, content, markers)
        turns.append(ChatTurn(prompt, answer))
    return turns


def _prefilled_answer(prompt: str, turn: str, content: str, markers: Sequence[str]) -> str:
    """The answer to a generation prompt that opens a block its template drops from a rendered
    turn (DeepSeek-R1's ``<think>\n``, the reasoning cut from past turns): the content after
    that opening, which it starts with, then the end-of-turn marker the template writes after
    the turn's text (as TRL's training template for it renders the reasoning kept)."""
    shared = len(os.path.commonprefix([prompt, turn]))
    opening = prompt[shared:]
    rendered = chat_answer(turn[shared:], content, markers)
    ends = [m for m in markers if rendered.endswith(m)]
    if not content.startswith(opening) or not ends:
        raise ValueError(f"chat_template: the generation prompt ends with {opening!r}, which the "
                         "conversation's text of an assistant turn lacks: give the turn's "
                         f"content starting with {opening!r} (its reasoning, then the answer)")
    return content[len(opening):] + max(ends, key=len)


def end_of_turn_ids(tok: ChatTokenizer) -> list[int]:
    """The id of the special token that ends an assistant turn in the tokenizer's chat
    template (as ``chat_turns`` cuts an answer there: what a chat run learns to end with);
    none without a template or such a token."""
    if getattr(tok, "chat_template", None) is None:
        return []
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        [turn] = chat_turns(tok, probe)
    except ValueError:  # a template that refuses the probe ends nothing here
        return []
    ends = [m for m in tok.matched_special_tokens if turn.answer.endswith(m)]
    ids = [tok.token_to_id(m) for m in ends]
    return [i for i in ids if i is not None]


def chat_answer(rendered: str, content: str, markers: Sequence[str]) -> str:
    """What an assistant turn answers, of the text its template renders after the generation
    prompt: up to the first end-of-turn marker (a special token's text, ``markers``) after its
    ``content``, that marker included; what follows (a newline, a template's end-of-text) is
    the template's glue or ending, not the answer's. The content is its last rendering that
    cuts no marker in two: the turn's reasoning, rendered before it, can hold its text. Where
    the content is empty or not found as it is (a tool call, a template that reshapes it), or
    no marker follows it: the text, stripped."""
    text = content.strip()
    start = _content_end(rendered, text, markers) if text else None
    if start is None:
        return rendered.rstrip()
    found_markers = []  # (where, -length, marker): the first, at one place the longest
    for marker in markers:
        at = rendered.find(marker, start)
        if at >= 0:
            found_markers.append((at, -len(marker), marker))
    if not found_markers:
        return rendered.rstrip()
    at, _, marker = min(found_markers)
    return rendered[: at + len(marker)]


def _content_end(rendered: str, text: str, markers: Sequence[str]) -> int | None:
    """Where the last occurrence of ``text`` in ``rendered`` ends, of those that start and end
    outside every marker's text; None where there is none."""
    spans = []
    for marker in markers:
        at = rendered.find(marker)
        while at >= 0:
            spans.append((at, at + len(marker)))
            at = rendered.find(marker, at + 1)
    found = rendered.rfind(text)
    while found >= 0:
        end = found + len(text)
        if not any(a < found < b or a < end < b for a, b in spans):
            return end
        found = rendered.rfind(text, 0, end - 1)
    return None
