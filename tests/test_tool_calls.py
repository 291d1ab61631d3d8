"""Tool calls read from a Hermes-format answer as vLLM's hermes parser reads them, whole and
streamed in pieces of every size."""

import json

import pytest

from codelm.tool_calls import CallStream, ToolCall, read_calls, writes_calls

WEATHER = '{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}'
ARGUMENTS = json.dumps({"city": "Zürich", "unit": "celsius"}, ensure_ascii=False)


@pytest.mark.parametrize("answer, content, calls", [
    ("No tool is needed: 4.", "No tool is needed: 4.", []),
    (f"<tool_call>\n{WEATHER}\n</tool_call>", None, [ToolCall("get_weather", ARGUMENTS)]),
    (f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n"
     '{"name": "now", "arguments": {}}\n</tool_call>', "Let me look.\n",
     [ToolCall("get_weather", ARGUMENTS), ToolCall("now", "{}")]),
    # cut by the end of turn before its closing tag: still a call
    (f"<tool_call>\n{WEATHER}", None, [ToolCall("get_weather", ARGUMENTS)]),
    # a block that is no call leaves the answer text, whole
    ("<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    ('<tool_call>["a list"]</tool_call>', '<tool_call>["a list"]</tool_call>', []),
    # arguments as the model wrote them, re-serialized; none given: an empty object
    ('<tool_call>{"name": "ping"}</tool_call>', None, [ToolCall("ping", "{}")]),
    # a call, then a block that is none, or a second call cut short: the answer is text
    ('<tool_call>{"name": "a"}</tool_call><tool_call>not json</tool_call>',
     '<tool_call>{"name": "a"}</tool_call><tool_call>not json</tool_call>', []),
    ('<tool_call>{"name": "a"}</tool_call>\n<tool_call>\n{"name": "b", "argum',
     '<tool_call>{"name": "a"}</tool_call>\n<tool_call>\n{"name": "b", "argum', []),
])
def test_an_answers_calls_and_content_are_read_as_the_hermes_parser_reads_them(
        answer, content, calls):
    """An answer's <tool_call> blocks read as vLLM's hermes parser reads them (a call cut by the
    end of turn still a call, a block that is no call left as text), whole or streamed in any
    pieces."""
    assert read_calls(answer) == (content, calls)
    for size in (1, 2, 3, 7, len(answer)):  # the same, streamed in pieces of each size
        stream = CallStream()
        streamed = "".join(stream.feed(answer[start:start + size])
                           for start in range(0, len(answer), size))
        text, got = stream.finish()
        assert (streamed + text or None, got) == (content, calls), size


def test_a_stream_holds_back_only_what_may_still_open_a_call():
    """Text that cannot begin a call goes on at once; "<tool" waits for the next piece, and
    from "<tool_call>" on the answer waits for its end."""
    stream = CallStream()
    assert stream.feed("x < y and <tool") == "x < y and "
    assert stream.feed("box>") == "<toolbox>"
    assert stream.feed(" <tool_call>{") == " "
    assert stream.feed('"name": "f"}</tool_call>') == ""
    assert stream.finish() == ("", [ToolCall("f", "{}")])


def test_a_template_that_teaches_the_calls_is_told_apart():
    """A chat template that writes <tool_call> blocks for its tools is told apart from one that
    does not, or none: only the first has its answers read for calls."""
    assert writes_calls("{% for tool in tools %}...<tool_call>\n{{ tool }}\n</tool_call>")
    assert not writes_calls("{{ messages }}") and not writes_calls(None)
