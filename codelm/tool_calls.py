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
    """A streamed answer's content pieces and calls as they become certain: text that may
    still open a call (a prefix of ``<tool_call>`` at its end) waits for the next piece; a
    call's text waits for its closing tag. Once a call has come, later text is not content
    (as ``read_calls`` keeps only the text before the first call)."""

    def __init__(self) -> None:
        self.pending = ""
        self.calls = 0  # calls sent

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        """The content and the calls that ``piece`` makes certain."""
        self.pending += piece
        content, calls = "", []
        while True:
            start = self.pending.find(OPEN)
            if start < 0:
                keep = _open_prefix(self.pending)
                if not self.calls:
                    content += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                return content, calls
            if not self.calls:
                content += self.pending[:start]
            self.pending = self.pending[start:]
            end = self.pending.find(CLOSE)
            if end < 0:
                return content, calls
            call = _call(self.pending[len(OPEN):end])
            if call is None:  # no call: the block is text (vLLM's stream sends it on too)
                content += self.pending[: end + len(CLOSE)]
            else:
                calls.append(call)
                self.calls += 1
            self.pending = self.pending[end + len(CLOSE):]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the answer's end: a last call open (cut before its closing tag), or the text
        held back."""
        held, self.pending = self.pending, ""
        if held.startswith(OPEN):
            call = _call(held[len(OPEN):])
            if call is not None:
                self.calls += 1
                return "", [call]
        return ("" if self.calls else held), []


def _open_prefix(text: str) -> int:
    """The length of the longest end of ``text`` that begins ``<tool_call>``."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0
