"""Tool calls in a chat model's answer, in the Hermes format that Qwen2.5, Qwen3 and Hermes chat
templates teach (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), read as vLLM's
``hermes`` tool parser reads them: the answer's calls, and its text before the first call as
the message's content (none where empty). An answer whose block is no call (not a JSON object
naming a function) is text, whole. ``CallStream`` reads a streamed answer the same way, holding
back what may still become a call."""

from __future__ import annotations

import json
import re
from typing import NamedTuple

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# A block closed, or the last one open at the answer's end (a call cut by max_tokens or the
# model's end-of-turn token before its closing tag).
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE) + "|" + re.escape(OPEN)
                    + r"(.*)", re.DOTALL)


class ToolCall(NamedTuple):
    name: str
    arguments: str  # JSON text, as the API gives a call's arguments


def writes_calls(chat_template: str | None) -> bool:
    """Whether a chat template teaches its model the Hermes calls."""
    return bool(chat_template) and OPEN in chat_template


def _call(block: str) -> ToolCall | None:
    """The call a block holds, or None where it holds no JSON object naming a function."""
    try:
        value = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def read_calls(answer: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of an answer: its calls and its text before the first one (None when
    empty); an answer with no call, or a block that is none, is its own content."""
    if OPEN not in answer:
        return answer, []
    calls = []
    for match in _BLOCK.finditer(answer):
        call = _call(match.group(1) if match.group(1) is not None else match.group(2))
        if call is None:
            return answer, []
        calls.append(call)
    content = answer[: answer.index(OPEN)]
    return content or None, calls


class CallStream:
    """A streamed answer read as ``read_calls`` reads it whole: its text before any
    ``<tool_call>`` goes out as it comes (a prefix of the tag at its end waits for the next
    piece); from the tag on, the answer is held, and its end decides, as ``read_calls``
    decides, whether the rest is calls or text (a later block that is no call, or a call cut
    short, leaves the answer text)."""

    def __init__(self) -> None:
        self.answer = ""
        self.sent = 0  # characters of the answer sent as content

    def feed(self, piece: str) -> str:
        """The content that ``piece`` makes certain."""
        self.answer += piece
        end = self.answer.find(OPEN)
        if end < 0:
            end = len(self.answer) - _open_prefix(self.answer)
        content = self.answer[self.sent:end]
        self.sent = max(self.sent, end)
        return content

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the answer's end: its calls, or the text held back."""
        _, calls = read_calls(self.answer)
        if calls:
            return "", calls
        rest, self.sent = self.answer[self.sent:], len(self.answer)
        return rest, []


def _open_prefix(text: str) -> int:
    """The length of the longest end of ``text`` that begins ``<tool_call>``."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0
