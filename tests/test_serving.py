"""The OpenAI-compatible server, driven by the real `openai` client over loopback: completions
and chat completions equal codelm's own greedy generation, streams equal whole answers, seeded
choices repeat, stops cut as eval cuts, concurrent clients share the engine, bad requests get
OpenAI's error JSON while the server keeps serving, and SIGTERM ends a stream cleanly."""

import dataclasses
import json
import random
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import openai
import pytest
import torch
from test_chat import instruct  # noqa: F401  (a fixture: a tiny ChatML instruct checkpoint)
from tiny_hf import train_family_tokenizer

from codelm.data.sources import stdlib_files
from codelm.models import pretrained
from codelm.models.engine import Token
from codelm.models.generation import (
    SEED_SPREAD,
    GenerationConfig,
    generate,
    seed_of_sample,
    truncate_at_stops,
)
from codelm.openai_api import served_model
from codelm.serving import _Choice, close_server, make_server
from tokenizer import decode_generated, load_tokenizer

PROMPTS = ["def add(a, b):\n", "import os\n\nclass Path", "for i in range(10):", "# sort a list\n",
           "x = [", "while True:\n    ", "def main():\n    print(", "return self."]


@pytest.fixture(scope="module")
def loaded(instruct):  # noqa: F811
    root, _ = instruct
    model = pretrained.load(root).eval()
    return model, load_tokenizer(root)


def _start(loaded, **kwargs):
    model, tok = loaded
    return _start_served(served_model("tiny", model, tok), **kwargs)


def _start_served(served, **kwargs):
    server = make_server([served], port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    return server, thread


def _stop(server, thread):
    server.shutdown()
    thread.join()
    close_server(server)


@pytest.fixture(scope="module")
def server(loaded):
    server, thread = _start(loaded, slots=4)
    yield server
    _stop(server, thread)


def _client(server, key="none"):
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def _greedy(loaded, ids, n, stops=()):
    """codelm's own greedy continuation of ``ids``: its text up to EOS, cut at the stops."""
    model, tok = loaded
    eos = served_model("tiny", model, tok).eos_ids
    out = generate(model, torch.tensor([ids]), GenerationConfig(n, eos_id=eos))[0, len(ids):]
    new = out.tolist()
    new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
    return truncate_at_stops(decode_generated(tok, new), stops), len(out)


def test_a_completion_equals_codelms_greedy_generation(server, loaded):
    """A temperature-0 completion's text and token counts equal codelm's own greedy generation from
    the prompt: the server adds nothing to what eval would generate."""
    client = _client(server)
    tok = loaded[1]
    for prompt in PROMPTS[:3]:
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                        temperature=0)
        text, count = _greedy(loaded, tok.encode(prompt), 12)
        assert got.choices[0].text == text
        assert got.usage.prompt_tokens == len(tok.encode(prompt))
        assert got.usage.completion_tokens == count
        assert got.choices[0].finish_reason in ("stop", "length")


def test_a_chat_completion_follows_the_template_and_equals_greedy_generation(server, loaded):
    """A chat completion's prompt is the messages under the tokenizer's chat template, and its
    temperature-0 answer equals greedy generation from it, as the assistant's message."""
    client = _client(server)
    tok = loaded[1]
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Write a function that adds two numbers."}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                         temperature=0)
    ids = tok.encode(tok.apply_chat_template(messages, True))
    assert got.choices[0].message.content == _greedy(loaded, ids, 10)[0]
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ids)


def test_tool_choice_auto_or_none_is_served_and_a_forced_call_refused(server, loaded,
                                                                     monkeypatch):
    """tools reach the template under tool_choice "auto", "none" (as vLLM renders them by
    default) or none given; "required", a named function or parallel_tool_calls false would
    force what the answer holds: a 400 naming the parameter."""
    from test_chat import TOOLS, TOOLS_TEMPLATE

    tok = loaded[1]
    monkeypatch.setattr(tok, "chat_template", TOOLS_TEMPLATE)
    client = _client(server)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with_tools = tok.encode(tok.apply_chat_template(messages, True, TOOLS))
    assert len(with_tools) > len(tok.encode(tok.apply_chat_template(messages, True)))
    for choice, prompt in ((None, with_tools), ("auto", with_tools), ("none", with_tools)):
        extra = {} if choice is None else {"tool_choice": choice}
        got = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                             max_tokens=4, temperature=0, **extra)
        assert got.usage.prompt_tokens == len(prompt)
        assert got.choices[0].message.content == _greedy(loaded, prompt, 4)[0]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for unserved in ({"tool_choice": "required"}, {"tool_choice": named},
                     {"parallel_tool_calls": False}):
        status, body = _post(server, "/chat/completions", json.dumps(
            {"model": "tiny", "messages": messages, "tools": TOOLS, "max_tokens": 2,
             **unserved}).encode())
        assert status == 400 and body["error"]["param"] == next(iter(unserved)), body


def test_a_chat_answer_ends_at_the_templates_end_of_turn_where_eos_is_another_token(
        instruct, tmp_path, monkeypatch):  # noqa: F811
    """A base checkpoint whose EOS is <|endoftext|> and whose ChatML template ends a turn with
    <|im_end|>, served as eval.py --serve serves it: a chat answer ends at <|im_end|> (as eval's
    own chat scoring stops there), a completion runs on past it."""
    import shutil

    import eval as eval_module
    from codelm.models import engine

    root = tmp_path / "base"
    shutil.copytree(instruct[0], root)
    config = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**config,
                                                            "eos_token": "<|endoftext|>"}))
    tok = load_tokenizer(root)
    for name in ("config.json", "generation_config.json"):
        hf_config = json.loads((root / name).read_text())
        hf_config["eos_token_id"] = tok.token_to_id("<|endoftext|>")
        (root / name).write_text(json.dumps(hf_config))
    answer = tok.encode("def f(): pass")
    script = [*answer, tok.token_to_id("<|im_end|>"), *tok.encode("\nmore")]

    def scripted(requests, logits):
        return [script[min(len(r.generated), len(script) - 1)] for r in requests]

    monkeypatch.setattr(engine, "_next_tokens", scripted)
    served = []
    monkeypatch.setattr(eval_module, "serve", lambda models, *args: served.extend(models) or 0)
    assert eval_module.main(["--serve", "--models", str(root), "--device", "cpu"]) == 0
    server, thread = _start_served(served[0], slots=2)
    try:
        client = _client(server)
        chat = client.chat.completions.create(
            model=served[0].name, messages=[{"role": "user", "content": "Write f."}],
            max_tokens=len(script)).choices[0]
        assert (chat.message.content, chat.finish_reason) == ("def f(): pass", "stop")
        completion = client.completions.create(model=served[0].name, prompt="x",
                                                max_tokens=len(script)).choices[0]
        assert completion.text.startswith("def f(): pass") and "more" in completion.text
    finally:
        _stop(server, thread)


WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _scripted_answer(monkeypatch, model, tok, answer: str) -> list[int]:
    """The engine answers every request with ``answer``'s ids, then the end of the turn; the
    ids."""
    from codelm.models import engine

    script = tok.encode(answer)
    eos = served_model("tiny", model, tok).eos_ids[0]

    def scripted(requests, logits):
        return [script[len(r.generated)] if len(r.generated) < len(script) else eos
                for r in requests]

    monkeypatch.setattr(engine, "_next_tokens", scripted)
    return script


def test_a_hermes_tool_call_in_the_answer_comes_as_tool_calls(loaded, monkeypatch):
    """Where the template teaches Hermes calls and the request offers tools, the answer's
    <tool_call> block comes as the message's tool_calls (finish_reason tool_calls), whole and
    streamed, as vLLM's hermes parser gives it; tool_choice "none" or no tools: the text."""
    from test_chat import TOOLS, TOOLS_TEMPLATE

    model, tok = loaded
    monkeypatch.setattr(tok, "chat_template", TOOLS_TEMPLATE)
    script = _scripted_answer(monkeypatch, model, tok, WEATHER_CALL)
    assert decode_generated(tok, script) == WEATHER_CALL
    server, thread = _start(loaded, slots=2)
    try:
        client = _client(server)
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        asked = dict(model="tiny", messages=messages, tools=TOOLS, max_tokens=len(script) + 4)
        got = client.chat.completions.create(**asked).choices[0]
        assert got.finish_reason == "tool_calls" and got.message.content is None
        [call] = got.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        calls, content, finish = {}, "", None
        for chunk in client.chat.completions.create(**asked, stream=True):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for part in delta.tool_calls or []:
                calls[part.index] = part.function
            finish = chunk.choices[0].finish_reason or finish
        assert (content, finish, list(calls)) == ("", "tool_calls", [0])
        assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {
            "city": "Paris"}
        for unread in ({"tool_choice": "none"}, {"tools": None}):
            got = client.chat.completions.create(**{**asked, **unread}).choices[0]
            assert got.message.content == WEATHER_CALL and not got.message.tool_calls
            assert got.finish_reason == "stop"
        # the call sent back: its arguments, JSON text on the wire, reach the template as the
        # object they spell (as vLLM gives them)
        followed = [*messages, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {
                "name": "get_weather", "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
        rendered = [*messages, {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Paris"}}}]}, followed[-1]]
        got = client.chat.completions.create(**{**asked, "messages": followed})
        assert got.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(
            rendered, True, TOOLS)))
    finally:
        _stop(server, thread)


def test_calls_taught_by_a_named_tool_use_template_come_as_tool_calls(loaded, monkeypatch):
    """A tokenizer whose default template is plain ChatML and whose named "tool_use" template
    teaches Hermes calls (as Hermes-2-Pro and Hermes-3 ship them) renders a request with tools
    by the tool_use one, so the answer's <tool_call> block comes as the message's tool_calls,
    as vLLM's hermes parser reads it."""
    from test_chat import CHATML_TEMPLATE, TOOLS, TOOLS_TEMPLATE

    model, tok = loaded
    monkeypatch.setattr(tok, "chat_template", CHATML_TEMPLATE)
    monkeypatch.setattr(tok, "tool_use_template", TOOLS_TEMPLATE, raising=False)
    script = _scripted_answer(monkeypatch, model, tok, WEATHER_CALL)
    server, thread = _start(loaded, slots=1)
    try:
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        got = _client(server).chat.completions.create(
            model="tiny", messages=messages, tools=TOOLS, max_tokens=len(script) + 4).choices[0]
        assert got.finish_reason == "tool_calls" and got.message.content is None
        [call] = got.message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
    finally:
        _stop(server, thread)


def test_tool_calls_sent_back_malformed_are_refused_with_a_400(loaded, monkeypatch):
    """An assistant message's tool_calls that are not a list of calls, or a call without a
    function naming its name and arguments (the fields the openai package's
    ChatCompletionMessageToolCallParam requires), are a bad request: a 400 naming 'messages',
    whatever the template would make of them, and the server serves on."""
    import typing

    from openai.types.chat.chat_completion_message_tool_call_param import Function
    from test_chat import TOOLS, TOOLS_TEMPLATE

    required = {key for key, kind in typing.get_type_hints(Function, include_extras=True).items()
                if typing.get_origin(kind) is typing.Required}
    assert required == {"name", "arguments"}
    model, tok = loaded
    monkeypatch.setattr(tok, "chat_template", TOOLS_TEMPLATE)
    server, thread = _start(loaded, slots=1)
    try:
        user = {"role": "user", "content": "Weather in Paris?"}
        for calls in ("get_weather", [{"type": "function"}], ["get_weather"],
                      [{"type": "function", "function": {"name": "get_weather"}}],
                      [{"type": "function", "function": {"arguments": "{}"}}]):
            body = {"model": "tiny", "tools": TOOLS, "max_tokens": 2, "messages": [
                user, {"role": "assistant", "content": None, "tool_calls": calls}]}
            status, answer = _post(server, "/chat/completions", json.dumps(body).encode())
            assert status == 400 and answer["error"]["param"] == "messages", (calls, answer)
            assert "tool call" in answer["error"]["message"]
        client = _client(server)
        assert client.chat.completions.create(model="tiny", messages=[user], tools=TOOLS,
                                              max_tokens=2).choices
    finally:
        _stop(server, thread)


def test_a_stream_concatenates_to_the_whole_answer(server):
    """A streamed completion or chat answer, its pieces joined, is the whole answer, stops
    included, with the same finish_reason; include_usage brings the usage in the last chunk."""
    client = _client(server)
    for stop in (None, ["\n"]):
        kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=stop)
        whole = client.completions.create(**kwargs).choices[0]
        chunks = list(client.completions.create(stream=True, **kwargs))
        assert "".join(c.choices[0].text for c in chunks) == whole.text
        assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15,
                                           temperature=0).choices[0].message.content
    chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in chunks:
        pieces += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(pieces) == whole
    assert usage.completion_tokens >= 1


def test_n_seeded_choices_differ_and_repeat(server):
    """n seeded choices differ from each other, repeat under the same seed, and choice i equals one
    of seed + i alone, as eval seeds its samples: a served pass@k is reproducible."""
    client = _client(server)
    kwargs = dict(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=1.0, n=4, seed=7)
    first = [c.text for c in client.completions.create(**kwargs).choices]
    again = [c.text for c in client.completions.create(**kwargs).choices]
    assert len(first) == 4 and first == again
    assert len(set(first)) > 1
    alone = [client.completions.create(**{**kwargs, "seed": 7 + i, "n": 1}).choices[0].text
             for i in range(4)]
    assert alone == first  # choice i of seed s: seed s + i's (eval seeds sample i so)


def test_streamed_logprobs_cover_every_token_of_the_whole_answer(server):
    """Chunks hold back text a stop string may take back; their log-probs still carry every
    token, as the whole answer's do."""
    client = _client(server)
    kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=1)
    tokens = client.completions.create(**kwargs).choices[0].logprobs.tokens
    held = next(token for token in tokens[2:] if token)
    kwargs["stop"] = [held + "\x00"]  # never completed: the text ending in `held` is held back
    whole = client.completions.create(**kwargs).choices[0].logprobs.tokens
    assert whole == tokens
    streamed = [token for chunk in client.completions.create(stream=True, **kwargs)
                for token in chunk.choices[0].logprobs.tokens]
    assert streamed == whole


def test_stop_cuts_as_eval_cuts(server, loaded):
    """A stop string cuts the answer where eval's truncate_at_stops cuts greedy generation, with
    finish_reason stop: served and local scoring see the same text."""
    client = _client(server)
    tok = loaded[1]
    free, _ = _greedy(loaded, tok.encode(PROMPTS[2]), 24)
    stop = next(free[i:i + 2] for i in range(3, len(free) - 2) if free[i:i + 2].strip())
    got = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24,
                                    temperature=0, stop=[stop])
    assert got.choices[0].text == truncate_at_stops(free, [stop])
    assert got.choices[0].finish_reason == "stop"


def test_logprobs_name_the_chosen_tokens(server):
    """logprobs gives each generated token its log-prob and at most the asked top ones, the greedy
    token the likeliest among them, as OpenAI's clients read them."""
    client = _client(server)
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5,
                                    temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(logprob, abs=1e-5)
        assert top[token] == pytest.approx(logprob, abs=1e-5)  # greedy: the likeliest


def test_completion_top_logprobs_always_hold_the_sampled_token(server):
    """A completion's top_logprobs hold the sampled token with its log-prob beside the
    likeliest asked for, up to logprobs + 1 entries, as OpenAI's API defines them and vLLM
    gives them: logprobs 0 gives the sampled token alone, and a sampled token outside the top
    ones is still named."""
    client = _client(server)
    for logprobs in (0, 1):
        got = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8,
                                        temperature=1.0, seed=3, logprobs=logprobs)
        lp = got.choices[0].logprobs
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert top[token] == pytest.approx(logprob, abs=1e-5)
            assert len(top) <= logprobs + 1


def test_sixteen_concurrent_clients_are_all_answered_correctly(server, loaded):
    """Sixteen clients at once each get greedy generation from their own prompt: batched requests
    never mix their rows."""
    tok = loaded[1]
    want = {p: _greedy(loaded, tok.encode(p), 16)[0] for p in PROMPTS}

    def ask(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        got = _client(server).completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                                 temperature=0)
        return prompt, got.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert all(text == want[prompt] for prompt, text in answers)


def _post_text(server, path, data: bytes) -> tuple[int, str]:
    request = urllib.request.Request(server.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return answer.status, answer.read().decode()


def _post(server, path, data: bytes, headers=None):
    request = urllib.request.Request(server.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, loaded):
    """A body that is no JSON, a model not served, a length past the context and a bad parameter
    get OpenAI's error (400 or 404, naming the parameter), and the server answers the next
    request."""
    status, body = _post(server, "/completions", b"{not json")
    assert status == 400 and "not JSON" in body["error"]["message"]
    client = _client(server)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="other", prompt="x", max_tokens=2)
    block = loaded[0].cfg.block_size
    with pytest.raises(openai.BadRequestError, match="past the model's context"):
        client.completions.create(model="tiny", prompt="x", max_tokens=block + 5)
    status, body = _post(server, "/completions", json.dumps(
        {"model": "tiny", "prompt": "x", "temperature": "hot"}).encode())
    assert status == 400 and body["error"]["param"] == "temperature"
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_odd_but_valid_requests_are_answered_and_bad_ones_refused_in_json(server):
    """Chat content as a list of text parts reads as its texts joined by newlines (as vLLM
    joins them); a malformed Content-Length, a temperature too small to sample, a seed past 64
    bits, booleans as token ids, a string where a boolean goes, top_logprobs without logprobs,
    stream_options without a stream, a model that is no name and no tokens to generate get 400s
    naming their key, and the server serves on; a query in the URL (an Azure client's api-version) leaves
    the route as it is."""
    client = _client(server)
    ask = dict(model="tiny", max_tokens=6, temperature=0)
    text = client.chat.completions.create(messages=[{"role": "user", "content": "hi\nthere"}],
                                          **ask).choices[0].message.content
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                          {"type": "text", "text": "there"}]}]
    assert client.chat.completions.create(messages=parts, **ask).choices[0].message.content == \
        text
    request = urllib.request.Request(f"{server.url}/completions", data=b"{}", method="POST",
                                     headers={"Content-Length": "abc"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 400 and "Content-Length" in json.loads(
        refused.value.read())["error"]["message"]
    for bad in ({"temperature": 1e-12}, {"seed": 2**70}, {"prompt": [True, False]},
                {"model": 7}, {"max_tokens": 0}, {"stream": "false"}, {"echo": "no"},
                {"stream_options": {"include_usage": True}}):
        status, body = _post(server, "/completions", json.dumps(
            {"model": "tiny", "prompt": "x", **bad}).encode())
        assert status == 400 and body["error"]["param"] == next(iter(bad)), body
        assert "None" not in body["error"]["message"]
    for bad in ({"logprobs": "false"}, {"top_logprobs": 2}):
        status, body = _post(server, "/chat/completions", json.dumps(
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **bad}).encode())
        assert status == 400 and body["error"]["param"] == next(iter(bad)), body
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices
    azure = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0,
                          default_query={"api-version": "2024-06-01"})
    assert [m.id for m in azure.models.list()] == ["tiny"]
    assert azure.completions.create(model="tiny", prompt="x", max_tokens=2).choices


def test_a_prompt_cut_to_its_last_tokens_keeps_its_start_as_eval_cuts_it(loaded):
    """truncate_prompt_tokens (vLLM's) keeps a prompt's last N tokens, its start tokens kept
    whole: the completion equals greedy generation from the prompt cut so, and a prompt past
    the context fits once cut."""
    model, tok = loaded
    start = [tok.eos_id]
    served = served_model("tiny", model, tok, lambda text: start + tok.encode(text), 1)
    server, thread = _start_served(served)
    try:
        text = "def f(x):\n    return x + 1\n" * 40
        ids = start + tok.encode(text)
        block = model.cfg.block_size
        assert len(ids) > block
        keep = block - 8
        status, body = _post(server, "/completions", json.dumps(
            {"model": "tiny", "prompt": text, "max_tokens": 8, "temperature": 0,
             "truncate_prompt_tokens": keep}).encode())
        assert status == 200, body
        cut = start + ids[len(ids) - (keep - 1):]
        assert body["choices"][0]["text"] == _greedy(loaded, cut, 8)[0]
        assert body["usage"]["prompt_tokens"] == keep
    finally:
        _stop(server, thread)


def test_parameters_not_served_are_refused_not_ignored_and_a_model_is_retrieved(server):
    """logit_bias, penalties, best_of, suffix or a JSON response_format would change the text,
    as would vLLM's sampling extensions a vLLM client sends (repetition_penalty, min_p,
    stop_token_ids, ...): each set is a 400 naming it (their defaults pass, best_of 1 with n
    null too: null reads as unset); GET /v1/models/ID
    answers the openai client's models.retrieve, an unknown ID a 404."""
    client = _client(server)
    for unserved in ({"logit_bias": {"5": 100}}, {"frequency_penalty": 0.5},
                     {"presence_penalty": -1}, {"best_of": 3}, {"suffix": "x"},
                     {"response_format": {"type": "json_object"}},
                     {"repetition_penalty": 1.2}, {"min_p": 0.1}, {"min_tokens": 3},
                     {"ignore_eos": True}, {"stop_token_ids": [5]},
                     {"guided_regex": "[a-z]+"}, {"continue_final_message": True},
                     {"functions": [{"name": "f", "parameters": {}}]}):
        status, body = _post(server, "/completions", json.dumps(
            {"model": "tiny", "prompt": "x", "max_tokens": 2, **unserved}).encode())
        assert status == 400 and body["error"]["param"] == next(iter(unserved)), body
    defaults = {"logit_bias": {}, "frequency_penalty": 0, "presence_penalty": 0, "best_of": 1,
                "repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 0, "ignore_eos": False,
                "stop_token_ids": [], "n": None}
    status, body = _post(server, "/completions", json.dumps(
        {"model": "tiny", "prompt": "x", "max_tokens": 2, **defaults}).encode())
    assert status == 200 and body["choices"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.models.retrieve("other")


def test_a_field_the_endpoint_does_not_read_is_answered_and_noted_once(loaded, capfd):
    """A misspelt field ('max_token') or another endpoint's ('messages' sent to /completions) is
    answered without it, as vLLM answers, and the console names it once for the server's life;
    OpenAI's bookkeeping fields ('user') are no note."""
    server, thread = _start(loaded)
    try:
        for _ in range(2):
            status, body = _post(server, "/completions", json.dumps(
                {"model": "tiny", "prompt": "x", "max_token": 3, "messages": [],
                 "user": "me"}).encode())
            assert status == 200 and body["choices"], body
        status, _ = _post(server, "/chat/completions", json.dumps(
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
             "user": "me", "max_completion_tokens": None}).encode())
        assert status == 200
    finally:
        _stop(server, thread)
    err = capfd.readouterr().err
    assert err.count("not read") == 1, err
    assert "/v1/completions" in err and "'max_token', 'messages'" in err and "user" not in err


def test_the_unread_fields_noted_are_bounded(loaded, capfd):
    """A client sending ever new field names cannot grow the server's notes or flood its
    console: the first 64 names are noted, each cut to 40 characters, then one line says no
    more are."""
    server, thread = _start(loaded)
    try:
        for batch in range(3):
            fields = {f"{'k' * 100}{batch}-{i}": 1 for i in range(30)}
            status, _ = _post(server, "/completions", json.dumps(
                {"model": "tiny", "prompt": "x", "max_tokens": 1, **fields}).encode())
            assert status == 200
        assert len(server.unread) == 64
    finally:
        _stop(server, thread)
    err = capfd.readouterr().err
    assert err.count("not read") == 3 and err.count("further unread fields are not noted") == 1
    assert "k" * 41 not in err and "'" + "k" * 40 + "'" in err


def test_a_failure_of_the_server_is_a_500_and_in_a_stream_an_error_event(loaded, monkeypatch):
    """The model failing before the answer began: a 500 with OpenAI's error JSON; after a
    stream began: an error event ends it. Either way the next request is answered."""
    from codelm.models import engine

    server, thread = _start(loaded, slots=2)
    try:
        client = _client(server)
        real = engine.Engine._decode

        def failing(self, running):
            raise RuntimeError("out of memory")

        monkeypatch.setattr(engine.Engine, "_decode", failing)
        with pytest.raises(openai.InternalServerError, match="out of memory"):
            client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8)
        stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8,
                                           stream=True)
        with pytest.raises(openai.APIError, match="out of memory"):
            list(stream)
        status, text = _post_text(server, "/completions", json.dumps(
            {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 8, "stream": True}).encode())
        assert status == 200 and "out of memory" in text and text.endswith("data: [DONE]\n\n")
        monkeypatch.setattr(engine.Engine, "_decode", real)
        assert client.completions.create(model="tiny", prompt="x", max_tokens=3).choices
    finally:
        _stop(server, thread)


def test_a_failure_to_queue_a_request_answers_it_alone_and_the_engine_serves_on(loaded,
                                                                             monkeypatch):
    """Any error the engine raises as it takes a request (not only a refusal) is that request's
    500; the engine thread lives on and answers the next request."""
    from codelm.models import engine

    server, thread = _start(loaded, slots=2)
    try:
        client = _client(server)
        real = engine.Engine.add

        def failing(self, prompt, cfg, logprobs=None):
            raise RuntimeError("no generator on this device")

        monkeypatch.setattr(engine.Engine, "add", failing)
        with pytest.raises(openai.InternalServerError, match="no generator on this device"):
            client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4)
        monkeypatch.setattr(engine.Engine, "add", real)
        answer = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=3)
        assert answer.usage.completion_tokens >= 1
        assert server.engines["tiny"].thread.is_alive()
    finally:
        _stop(server, thread)


def test_a_cancel_from_before_an_engine_failure_leaves_the_next_request_alone(loaded,
                                                                          monkeypatch):
    """After a failure a fresh engine numbers its requests from 0 again: the failed request's
    late cancel must not cancel the new request that took its number."""
    import queue

    from codelm.models import engine
    from codelm.serving import EngineThread

    model, tok = loaded
    served = served_model("tiny", model, tok)
    thread = EngineThread(served, slots=2)
    try:
        real = engine.Engine._decode

        def failing(self, running):
            raise RuntimeError("out of memory")

        monkeypatch.setattr(engine.Engine, "_decode", failing)
        first = queue.Queue()
        failed = thread.submit(tok.encode(PROMPTS[0]), GenerationConfig(6), None, first, 0)
        while not isinstance(first.get(timeout=60)[1], Exception):
            pass
        monkeypatch.setattr(engine.Engine, "_decode", real)
        second = queue.Queue()
        thread.submit(tok.encode(PROMPTS[1]), GenerationConfig(6), None, second, 0)
        thread.cancel(failed)
        tokens = [second.get(timeout=60)[1] for _ in range(6)]
        assert tokens[-1].finished == "length"
    finally:
        thread.stop()


def test_a_request_whose_client_goes_away_is_cancelled(monkeypatch):
    """A client that sends a long request and closes its connection: its choice leaves the
    engine long before its max_tokens (the handler checks the connection while it waits)."""
    import dataclasses
    import socket
    import time

    from architecture import PRESETS, Transformer
    from codelm import serving
    from tokenizer import CodeTokenizer

    monkeypatch.setattr(serving, "CLIENT_CHECK_S", 0.02)
    tok = CodeTokenizer.train(["def f(x):\n    return x\n"] * 20, min_freq=1)
    shape = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size, block_size=4096)
    server, thread = _start((Transformer(shape).eval(), tok), slots=1)
    engine = server.engines["tiny"]
    engine.served.eos_ids = []  # nothing ends the request early

    def wait_until(condition) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    try:
        body = json.dumps({"model": "tiny", "prompt": "def f", "max_tokens": 4000,
                           "temperature": 1.0}).encode()
        with socket.create_connection(server.server_address[:2]) as connection:
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                               % len(body) + body)
            wait_until(lambda: engine.tokens > 0)  # admitted and running
        wait_until(lambda: not engine.engine.busy and engine.inbox.empty())
        assert engine.tokens < 4000
    finally:
        _stop(server, thread)


def test_a_request_naming_no_model_is_answered_by_the_one_served(loaded):
    """As vLLM: a request without 'model' goes to the one model served; beside a second, it is
    a 400 naming the served models. GET /health answers 200 while the server serves."""
    model, tok = loaded
    body = json.dumps({"prompt": "def f", "max_tokens": 3, "temperature": 0}).encode()
    server, thread = _start(loaded, slots=1)
    try:
        status, answer = _post(server, "/completions", body)
        assert status == 200 and answer["model"] == "tiny"
        with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health") as health:
            assert health.status == 200
    finally:
        _stop(server, thread)
    server = make_server([served_model("a", model, tok), served_model("b", model, tok)], port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        status, answer = _post(server, "/completions", body)
        assert status == 400 and "'model' is missing" in answer["error"]["message"]
        assert "a, b" in answer["error"]["message"]
    finally:
        _stop(server, thread)


def test_an_api_key_is_required_when_set(loaded, monkeypatch):
    """A keyed server refuses a wrong key; eval's endpoint client sends $OPENAI_API_KEY."""
    from codelm import endpoints

    server, thread = _start(loaded, slots=1, api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            _client(server, "wrong").models.list()
        with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health") as health:
            assert health.status == 200  # a probe sends no key
        assert _client(server, "sesame").completions.create(model="tiny", prompt="x",
                                                            max_tokens=1).choices
        endpoint = endpoints.parse_endpoint(f"x=openai:{server.url}#tiny")
        sampling = endpoints.Sampling(max_tokens=2)
        monkeypatch.delenv(endpoints.API_KEY_VARIABLE, raising=False)
        with pytest.raises(ValueError, match="HTTP 401.*OPENAI_API_KEY"):
            endpoints.complete(endpoint, "tiny", "x", sampling)
        monkeypatch.setenv(endpoints.API_KEY_VARIABLE, "sesame")
        assert len(endpoints.complete(endpoint, "tiny", "x", sampling)) == 1
    finally:
        _stop(server, thread)


SERVE = """
import sys
from codelm.models import pretrained
from codelm.openai_api import served_model
from codelm.serving import serve
from tokenizer import load_tokenizer
root = sys.argv[1]
model = pretrained.load(root).eval()
sys.exit(serve([served_model("tiny", model, load_tokenizer(root))], port=0, slots=2))
"""


# SERVE, each thread started and joined within serve() named on the last line.
SERVE_COUNTING_THREADS = """
import json, sys, threading
started, joined = [], []
start, join = threading.Thread.start, threading.Thread.join

def counted_start(thread):
    started.append(thread.name)
    start(thread)

def counted_join(thread, timeout=None):
    joined.append(thread.name)
    join(thread, timeout)

threading.Thread.start = counted_start
threading.Thread.join = counted_join
""" + SERVE.replace("sys.exit(serve(", "code = (serve(") + """
print(json.dumps({"started": started, "joined": joined}))
sys.exit(code)
"""


class StoppedMidStream(NamedTuple):
    """A server (SERVE_COUNTING_THREADS) sent SIGTERM during a stream: the stream's chunks, the
    server's exit code, and the threads it started and joined (its last line of output)."""

    chunks: list
    returncode: int
    threads: dict
    err: str


@pytest.fixture(scope="module")
def stopped_mid_stream(instruct) -> StoppedMidStream:  # noqa: F811
    """One server process, stopped by SIGTERM while it streams an answer: what the stream, the
    exit code and the server's thread counts were. Tests read it and change none of it."""
    root, _ = instruct
    proc = subprocess.Popen([sys.executable, "-c", SERVE_COUNTING_THREADS, str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # serving ... on URL: the signal handlers are set
        url = line.split(" on ")[1].split()[0]
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40,
                                           temperature=0, stream=True)
        chunks = [next(iter(stream))]
        proc.send_signal(15)
        chunks += list(stream)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    threads = json.loads(out.splitlines()[-1]) if proc.returncode == 0 else {}
    return StoppedMidStream(chunks, proc.returncode, threads, err)


def test_every_thread_the_server_starts_has_ended_when_it_stops(stopped_mid_stream):
    """serve() returns only once each thread it started is joined (the stream's request
    handler's too): a thread left running would hold the models and could free their tensors
    while the interpreter shuts down, which aborts the process."""
    assert stopped_mid_stream.returncode == 0, stopped_mid_stream.err[-3000:]
    threads = stopped_mid_stream.threads
    assert len(threads["started"]) >= 2  # the engine and the console line's reporter
    assert sorted(set(threads["started"])) == sorted(set(threads["joined"]))


def test_sigterm_during_a_stream_ends_it_cleanly_and_exits_zero(stopped_mid_stream):
    """SIGTERM during a stream lets it end with its finish_reason and the server exit 0: a client
    mid-answer gets a whole answer, and a service manager sees a clean stop."""
    assert stopped_mid_stream.chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert stopped_mid_stream.returncode == 0, stopped_mid_stream.err[-3000:]


def test_eval_scores_codelms_own_server_as_it_scores_the_model(instruct, tmp_path):  # noqa: F811
    """eval.py --serve, then eval.py --models x=openai:URL: the endpoint's greedy completions
    and pass@1 equal those of eval.py --models DIR, and so do its sampled ones (each problem's
    samples asked at the seeds eval samples them with)."""
    import eval as ev

    root, _ = instruct
    proc = subprocess.Popen([sys.executable, "eval.py", "--serve", "--models", f"tiny={root}",
                             "--port", "0", "--batch-size", "3"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split(" on ")[1].split()[0]
        common = ["--tasks", "humaneval", "--limit", "3", "--max-new-tokens", "24",
                  "--no-progress", "--runs-dir", str(tmp_path / "runs")]
        assert ev.main(["--models", f"x=openai:{url}", "--out-dir", str(tmp_path / "a"),
                        *common]) == 0
        assert ev.main(["--models", f"x={root}", "--out-dir", str(tmp_path / "b"), *common]) == 0
        sampling = [*common, "--temperature", "0.8", "--num-samples", "3", "--seed", "5"]
        assert ev.main(["--models", f"x=openai:{url}", "--out-dir", str(tmp_path / "c"),
                        *sampling]) == 0
        assert ev.main(["--models", f"x={root}", "--out-dir", str(tmp_path / "d"),
                        *sampling]) == 0
    finally:
        proc.send_signal(15)
        _, server_err = proc.communicate(timeout=120)
        assert proc.returncode == 0, server_err[-3000:]
    served, local = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert served["rows"][0]["metrics"] == local["rows"][0]["metrics"]
    predictions = [[json.loads(line)["prediction"] for line in
                    (tmp_path / d / "predictions.jsonl").read_text().splitlines()] for d in "ab"]
    assert predictions[0] == predictions[1] and any(predictions[0])
    sampled = [[json.loads(line)["prediction"] for line in
                (tmp_path / d / "predictions.jsonl").read_text().splitlines()] for d in "cd"]
    assert sampled[0] == sampled[1] and len(set(sampled[0])) > 4  # sampled, and alike


def test_streamed_text_offsets_run_on_as_the_whole_answers(server):
    """A stream's chunks carry text offsets into the whole choice's text, the whole answer's
    offsets, not each chunk's own from 0."""
    client = _client(server)
    kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=1)
    whole = client.completions.create(**kwargs).choices[0].logprobs.text_offset
    streamed = [offset for chunk in client.completions.create(stream=True, **kwargs)
                for offset in chunk.choices[0].logprobs.text_offset]
    assert streamed == whole and len(set(whole)) > 1


def test_chat_logprob_bytes_are_each_tokens_own_bytes(loaded):
    """A token holding part of a UTF-8 character gives its own bytes (OpenAI's `bytes`: joined,
    they rebuild the character), not those of U+FFFD."""
    from codelm.models.engine import Token
    from codelm.serving import _completion_logprobs

    model, tok = loaded
    served = served_model("tiny", model, tok)
    ids = tok.encode("é 漢")
    assert any(not _is_utf8(tok.token_bytes(i)) for i in ids)  # a character split in two
    events = [Token(0, i, None, -1.0, [(i, -1.0)]) for i in ids]
    content = _completion_logprobs(served, events, chat=True)["content"]
    assert b"".join(bytes(entry["bytes"]) for entry in content) == "é 漢".encode()
    assert [entry["top_logprobs"][0]["bytes"] for entry in content] == \
        [entry["bytes"] for entry in content]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_echo_returns_the_prompt_as_sent_without_the_start_tokens(loaded):
    """Served as eval prompts a model (its start token first), `echo` gives back the prompt
    text itself, whole and streamed."""
    model, tok = loaded
    start = tok.eos_id
    served = served_model("tiny", model, tok, encode=lambda text: [start, *tok.encode(text)])
    server = make_server([served], port=0, slots=1)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        client = _client(server)
        kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True)
        whole = client.completions.create(**kwargs).choices[0].text
        streamed = "".join(chunk.choices[0].text
                           for chunk in client.completions.create(stream=True, **kwargs))
        assert whole.startswith(PROMPTS[0]) and streamed == whole
        assert tok.decode([start]) not in whole
    finally:
        _stop(server, thread)


def test_a_null_max_completion_tokens_leaves_max_tokens_in_force(server):
    """Clients that send unset fields as null: `max_completion_tokens: null` is not set."""
    status, body = _post(server, "/chat/completions", json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
         "max_completion_tokens": None, "temperature": 0}).encode())
    assert status == 200 and body["usage"]["completion_tokens"] <= 3


def test_a_length_past_the_context_names_the_parameter_the_request_set(server, loaded):
    """A length past the context is refused naming the field the request set it with:
    max_completion_tokens where a chat request gives it, else max_tokens, so that a client's
    error points at its own parameter."""
    block = loaded[0].cfg.block_size
    messages = [{"role": "user", "content": "hi"}]
    for key in ("max_completion_tokens", "max_tokens"):
        status, body = _post(server, "/chat/completions", json.dumps(
            {"model": "tiny", "messages": messages, key: block + 5}).encode())
        assert status == 400 and body["error"]["param"] == key
        assert body["error"]["code"] == "context_length_exceeded"
        assert key in body["error"]["message"]


def test_max_tokens_may_fill_the_context_and_one_more_is_refused(server, loaded):
    """The last new token is never fed back, so a prompt of P tokens leaves context + 1 - P
    new tokens (the engine's own bound): max_tokens equal to that is served, one more is
    refused as context_length_exceeded."""
    block = loaded[0].cfg.block_size
    first = _client(server).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=1)
    room = block + 1 - first.usage.prompt_tokens
    status, body = _post(server, "/completions", json.dumps(
        {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": room, "temperature": 0}).encode())
    assert status == 200 and 0 < body["usage"]["completion_tokens"] <= room
    status, body = _post(server, "/completions", json.dumps(
        {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": room + 1}).encode())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def test_the_client_check_takes_a_connection_of_any_descriptor_number():
    """A server holding over 1024 descriptors (many clients) still checks each connection:
    select() refuses descriptors past 1023."""
    import os
    import resource
    import socket
    import types

    from codelm.serving import _Handler

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE's hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    ours, theirs = socket.socketpair()
    try:
        high = socket.socket(fileno=os.dup2(ours.fileno(), 1100))
        assert high.fileno() >= 1024
        handler = types.SimpleNamespace(connection=high)
        assert _Handler.client_gone(handler) is False
        theirs.close()
        assert _Handler.client_gone(handler) is True
        high.close()
    finally:
        ours.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_closing_the_server_closes_a_connection_waiting_for_a_request(loaded):
    """SIGTERM finishes the requests in flight; a client's connection with no request in it
    yet is closed at once, not at the idle timeout."""
    import socket
    import time

    from codelm import serving

    server, thread = _start(loaded, slots=1)
    connection = socket.create_connection(server.server_address[:2])
    connection.settimeout(serving.IDLE_TIMEOUT_S / 2)
    try:
        deadline = time.monotonic() + 120
        while not server.waiting:  # accepted: its handler waits for the request line
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.shutdown()
        thread.join()
        closer = threading.Thread(target=close_server, args=(server,))
        closer.start()
        assert connection.recv(1) == b""  # closed by the server, before the timeout
        closer.join()
    finally:
        connection.close()


def test_top_k_is_served_and_one_is_greedy(server, loaded):
    """top_k (vLLM's extension, which eval sends): top_k 1 at temperature 1 is the greedy
    text; -1 and 0 leave every token."""
    client = _client(server)
    kwargs = dict(model="tiny", prompt=PROMPTS[3], max_tokens=12)
    greedy = client.completions.create(temperature=0, **kwargs).choices[0].text
    top1 = client.completions.create(temperature=1.0, seed=3, extra_body={"top_k": 1},
                                     **kwargs).choices[0].text
    assert top1 == greedy
    free = [client.completions.create(temperature=1.0, seed=3, extra_body=extra,
                                      **kwargs).choices[0].text
            for extra in ({}, {"top_k": -1}, {"top_k": 0})]
    assert free[0] == free[1] == free[2]
    status, body = _post(server, "/completions", json.dumps(
        {"model": "tiny", "prompt": "x", "top_k": -2}).encode())
    assert status == 400 and body["error"]["param"] == "top_k"


def test_an_endpoint_is_asked_as_eval_samples_a_local_model(monkeypatch):
    """eval asks an endpoint for each problem's samples with the local path's settings: new
    tokens capped at half the context (the listed one, or --block-size within it), top_k,
    problem p's samples from the seed of the local path's sample p x n; n past MAX_CHOICES
    asked in requests of MAX_CHOICES, each seeded at its first choice."""
    import eval as ev
    from codelm import endpoints
    from codelm.evaluation.config import EvalConfig
    from codelm.evaluation.tasks import passk

    asked = []

    def request(url, body=None):
        if body is None:
            return {"data": [{"id": "m", "max_model_len": 256}]}
        asked.append(body)
        return {"choices": [{"index": i, "text": f"{body['seed'] + i}"}
                            for i in range(body["n"])]}

    monkeypatch.setattr(endpoints, "_request", request)
    endpoint = endpoints.parse_endpoint("x=openai:http://h:1/v1")
    problems = [{"prompt": "a"}, {"prompt": "b"}]
    cfg = EvalConfig(max_new_tokens=500, temperature=0.8, top_k=7, num_samples=130, seed=5,
                     batch_size=1, progress=False)
    texts = ev._endpoint_samples(endpoint, "x", passk.PASSK, problems, cfg)
    def seed(index: int) -> int:  # sent signed, as vLLM takes a seed: the same torch stream
        unsigned = seed_of_sample(5, index)
        return unsigned - 2**64 if unsigned >= 2**63 else unsigned

    assert [(b["prompt"], b["n"], b["seed"], b["max_tokens"], b["top_k"]) for b in asked] == [
        ("a", 128, seed(0), 128, 7), ("a", 2, seed(128), 128, 7),
        ("b", 128, seed(130), 128, 7), ("b", 2, seed(258), 128, 7)]
    assert all(-2**63 <= b["seed"] < 2**63 for b in asked)
    assert {b["truncate_prompt_tokens"] for b in asked} == {256 - 128}  # the prompt's room
    assert texts[1][:2] == [str(seed(130)), str(seed(131))] and texts[0][-1] == str(seed(129))
    asked.clear()  # a seed of 2**63 or more is sent signed (vLLM takes at most 2**63 - 1)
    ev._endpoint_samples(endpoint, "x", passk.PASSK, problems[:1],
                         dataclasses.replace(cfg, seed=1))
    assert [b["seed"] for b in asked] == [SEED_SPREAD - 2**64, SEED_SPREAD - 2**64 + 128]
    asked.clear()  # seeds wrap at 64 bits, as a local model's do
    ev._endpoint_samples(endpoint, "x", passk.PASSK, problems[:1],
                         dataclasses.replace(cfg, seed=2**64 - 1))
    assert [b["seed"] for b in asked] == [2**64 - SEED_SPREAD, 2**64 - SEED_SPREAD + 128]
    asked.clear()  # --block-size is the scoring context, as a local model's: new and prompt fit it
    ev._endpoint_samples(endpoint, "x", passk.PASSK, problems[:1],
                         dataclasses.replace(cfg, block_size=64, num_samples=1))
    assert [(b["max_tokens"], b["truncate_prompt_tokens"]) for b in asked] == [(32, 32)]


def test_an_endpoint_that_lists_no_models_is_asked_for_the_model_it_was_named(monkeypatch):
    """URL#MODEL needs no /models listing: an endpoint that serves none (404) is still
    scored, its context unknown."""
    from codelm import endpoints

    def request(url, body=None):
        if body is None:
            raise ValueError(f"{url}: HTTP 404: not found")
        return {"choices": [{"index": 0, "text": " pass"}]}

    monkeypatch.setattr(endpoints, "_request", request)
    named = endpoints.parse_endpoint("x=openai:http://h:1/v1#m")
    assert endpoints.endpoint_model(named) == endpoints.EndpointModel("m", None)
    with pytest.raises(ValueError, match="404"):
        endpoints.endpoint_model(endpoints.parse_endpoint("x=openai:http://h:1/v1"))


def test_beam_search_is_refused_for_an_endpoint():
    """--num-beams for a model served at an endpoint is refused naming the flag: beam search runs
    only on a local model."""
    from codelm.evaluation.config import parse_config

    with pytest.raises(ValueError, match=r"^num_beams \(2, --num-beams\): an endpoint .* local"):
        parse_config(["--models", "x=openai:http://127.0.0.1:1/v1", "--tasks", "humaneval",
                      "--num-beams", "2"])


ENDPOINT = "x=openai:http://127.0.0.1:1/v1"


@pytest.mark.parametrize("argv, why", [
    (["--models", ENDPOINT],
     r"^models .*: an endpoint .* pass@k tasks only: set tasks \(\['lm', 'line'\], --tasks\) "
     r"to some of passk"),
    (["--models", ENDPOINT, "local", "--tasks", "humaneval"],
     r"beside other endpoints only: score the local models in another eval.py run"),
    (["--models", ENDPOINT, "--serve"], r"served already: --serve serves local models"),
    (["--models", ENDPOINT, "--prompt", "def f():"],
     r"scored on pass@k tasks; --prompt streams a local model's completion"),
])
def test_an_endpoint_misused_is_refused_naming_the_one_rule_broken(argv, why):
    """Each rule of an endpoint has its own message: the default tasks (lm, line) are not
    pass@k; local models beside it; --serve and --prompt, whatever the tasks (which neither
    reads)."""
    from codelm.evaluation.config import parse_config

    with pytest.raises(ValueError, match=why):
        parse_config(argv)


def test_a_method_not_served_and_a_chunked_body_get_json_answers(server):
    """http.server's own refusal of a method is OpenAI's error JSON too; a body sent in chunks
    (Transfer-Encoding: chunked, as httpx sends a streamed body) is read whole."""
    import http.client

    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=120)
    try:
        connection.request("DELETE", "/v1/models")
        reply = connection.getresponse()
        assert reply.status == 501 and reply.getheader("Content-Type") == "application/json"
        assert "error" in json.loads(reply.read())
    finally:
        connection.close()
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 2}).encode()
    connection = http.client.HTTPConnection(host, port, timeout=120)
    try:
        connection.request("POST", "/v1/completions", body=iter([body[:7], body[7:]]),
                           headers={"Content-Type": "application/json"}, encode_chunked=True)
        reply = connection.getresponse()
        assert reply.status == 200 and json.loads(reply.read())["choices"]
    finally:
        connection.close()


def test_a_chunk_size_that_is_not_hex_digits_is_refused_at_once(server):
    """A chunked body's size line is hex digits alone (HTTP/1.1's chunk-size): one with a sign
    (which int() would read, -1 then reading to the connection's end) is a 400 naming it, with
    the connection still open to send it."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=120) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n-1\r\n")
        reply = connection.makefile("rb").read()
    status, _, body = reply.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.0 400") or status.startswith(b"HTTP/1.1 400"), status
    assert "hexadecimal" in json.loads(body)["error"]["message"]


class _OddEndpoint:
    """A loopback endpoint that answers each POST as ``mode`` says: a cut-short body, an HTML
    page, an error object with status 200, a 401 whose message is null, or no answer until
    ``release`` is set."""

    def __init__(self):
        import http.server

        self.mode = ""
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                if outer.mode == "silent":
                    outer.release.wait()
                    return
                status, body, length = {
                    "cut": (200, b'{"choices": [', 500),
                    "html": (200, b"<html>sign in</html>", None),
                    "error": (200, b'{"error": {"message": "prompt too long: 9000 > 4096"}}',
                              None),
                    "null401": (401, b'{"error": {"message": null}}', None),
                }[outer.mode]
                self.send_response(status)
                self.send_header("Content-Length", str(length or len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_an_endpoints_odd_replies_are_one_line_errors_naming_its_url(monkeypatch):
    """A reply cut short, one that is not JSON, an error object sent with status 200, a 401
    without a message and no reply in time: each a ValueError naming the URL and what went
    wrong (eval.py prints it as one line), never a traceback or a count of choices."""
    from codelm import endpoints

    odd = _OddEndpoint()
    monkeypatch.setattr(endpoints, "TIMEOUT_S", 0.3)
    endpoint = endpoints.parse_endpoint(f"x=openai:{odd.url}#m")
    sampling = endpoints.Sampling(n=1, max_tokens=4, temperature=0.0)
    expected = {"cut": "a broken reply .*IncompleteRead", "html": r"not JSON \(b'<html>",
                "error": "answered with an error: prompt too long: 9000 > 4096",
                "null401": r"HTTP 401: .*message.*OPENAI_API_KEY", "silent": "no reply within"}
    try:
        for mode, message in expected.items():
            odd.mode = mode
            with pytest.raises(ValueError, match=f"^{odd.url}/completions: .*{message}"):
                endpoints.complete(endpoint, "m", "def f(", sampling)
    finally:
        odd.close()


def test_an_out_dir_holding_results_is_refused_before_an_endpoint_is_asked(tmp_path,
                                                                           monkeypatch, capsys):
    """Scoring an endpoint saves once, at its end: an --out-dir that holds results is refused
    before the first request, not after every sample is drawn and run."""
    import eval as ev
    from codelm import endpoints

    asked = []
    monkeypatch.setattr(endpoints, "_request", lambda url, body=None: asked.append(url))
    (tmp_path / "results.json").write_text("{}")
    argv = ["--models", "x=openai:http://127.0.0.1:1/v1", "--tasks", "humaneval", "--limit", "2",
            "--out-dir", str(tmp_path), "--no-progress"]
    assert ev.main(argv) == 2
    assert "holds an evaluation's results" in capsys.readouterr().err
    assert asked == []


def test_a_stopped_endpoint_evaluation_asks_again_only_for_what_its_journal_lacks(
        tmp_path, monkeypatch, capsys):
    """Each problem's samples from an endpoint are kept in --out-dir's journal as they come: the
    same command after a stop asks only for the problems not kept (said), scores as an
    evaluation that never stopped, and removes the journal once the results are saved; another
    model served under the name (codelm's codelm_weights, vLLM's root) reads none of it."""
    import json

    import eval as ev
    from codelm import endpoints

    asked = []
    stop_at = []
    weights = ["w1"]

    def request(url, body=None):
        if body is None:
            return {"data": [{"id": "m", "max_model_len": 512, "codelm_weights": weights[0]}]}
        if len(asked) in stop_at:
            raise KeyboardInterrupt
        asked.append(body["prompt"])
        return {"choices": [{"index": i, "text": f"    return {body['seed'] + i}\n"}
                            for i in range(body["n"])]}

    monkeypatch.setattr(endpoints, "_request", request)
    argv = ["--models", "x=openai:http://127.0.0.1:1/v1", "--tasks", "passk", "--limit", "3",
            "--num-samples", "2", "--temperature", "0.8", "--batch-size", "1", "--no-progress"]
    assert ev.main([*argv, "--out-dir", str(tmp_path / "whole")]) == 0
    whole = list(asked)
    asked.clear()
    stop_at.append(2)  # the third problem's request: stopped
    out = tmp_path / "stopped"
    capsys.readouterr()
    assert ev.main([*argv, "--out-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert "finished generations are kept" in err and f"--out-dir {out}" in err, err
    stop_at.clear()
    asked.clear()
    weights[0] = "w2"  # another model served under the name: nothing kept is read
    stop_at.append(1)
    assert ev.main([*argv, "--out-dir", str(out)]) == 130
    assert asked == whole[:1]
    assert "other settings (another served model's weights)" in capsys.readouterr().err
    weights[0] = "w1"  # the model the journal kept: only the third problem is asked for
    stop_at.clear()
    asked.clear()
    capsys.readouterr()
    assert ev.main([*argv, "--out-dir", str(out)]) == 0
    assert asked == whole[2:]
    assert "x passk: 2 of 3 prompts' outputs kept in" in capsys.readouterr().err
    assert not (out / "journal").exists()
    rows = [json.loads((d / "results.json").read_text())["rows"]
            for d in (out, tmp_path / "whole")]
    assert rows[0] == rows[1]


def test_an_endpoints_results_name_the_model_it_served_and_its_weights(tmp_path, monkeypatch):
    """An endpoint named by its URL alone is labelled by its host and port; results.json's
    models entry still names the model /v1/models listed (the one asked) and the weights
    fingerprint it gave, so results of two models served at one URL tell them apart."""
    import json

    import eval as ev
    from codelm import endpoints

    asked_for = set()

    def request(url, body=None):
        if body is None:
            return {"data": [{"id": "coder-7b", "max_model_len": 512, "codelm_weights": "w1"}]}
        asked_for.add(body["model"])
        return {"choices": [{"index": i, "text": "    return 1\n"} for i in range(body["n"])]}

    monkeypatch.setattr(endpoints, "_request", request)
    out = tmp_path / "out"
    assert ev.main(["--models", "openai:http://127.0.0.1:1/v1", "--tasks", "passk", "--limit",
                    "1", "--no-progress", "--out-dir", str(out)]) == 0
    (entry,) = json.loads((out / "results.json").read_text())["models"]
    assert entry["label"] == "127.0.0.1:1" and entry["source"] == "http://127.0.0.1:1/v1"
    assert asked_for == {entry["served_model"]} == {"coder-7b"}
    assert entry["served_weights"] == "w1"


def test_eval_chat_asks_an_endpoint_as_evalplus_asks_one(server, tmp_path):
    """eval.py --chat --models x=openai:URL asks each problem as EvalPlus's OpenAI decoder does
    (one user message: the instruction, then the problem in a python block; no stop strings):
    the answers are the endpoint's own chat answers, and the programs run are their sanitized
    code, alone."""
    import eval as ev
    from codelm.evaluation.instruct import sanitize

    problems = [{"task_id": f"t/{n}", "prompt": f'def c():\n    """Return {n}."""\n',
                 "entry_point": "c",
                 "test": f"def check(candidate):\n    assert candidate() == {n}\n"}
                for n in (1, 2)]
    file = tmp_path / "problems.jsonl"
    file.write_text("".join(json.dumps(p) + "\n" for p in problems))
    out = tmp_path / "out"
    assert ev.main(["--models", f"x=openai:{server.url}#tiny", "--tasks", "passk", "--problems",
                    str(file), "--chat", "--max-new-tokens", "12", "--out-dir", str(out),
                    "--no-progress", "--workers", "1"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    client = _client(server)
    for problem, record in zip(problems, records, strict=True):
        message = ("Please provide a self-contained Python script that solves the following "
                   f"problem in a markdown code block:\n```python\n{problem['prompt'].strip()}"
                   "\n```")
        assert record["prompt"] == message
        answer = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": message}], max_tokens=12,
            temperature=0, seed=0).choices[0].message.content
        assert record["prediction"] == answer and answer
        assert record["solution"] == sanitize(answer, "c")


def test_an_ipv6_host_is_served_and_a_burst_of_clients_waits_in_the_backlog(loaded):
    """--host ::1 binds IPv6; the listen backlog is the system's largest, so a burst of new
    connections queues instead of falling into SYN retries."""
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    model, tok = loaded
    try:
        server = make_server([served_model("tiny", model, tok)], host="::1", port=0)
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        assert server.url.startswith("http://[::1]:")
        assert server.request_queue_size == socket.SOMAXCONN
        assert [m.id for m in _client(server).models.list()] == ["tiny"]
    finally:
        _stop(server, thread)


def test_a_connection_is_kept_for_the_next_request(server):
    """HTTP/1.1 keep-alive, as uvicorn serves vLLM: two requests on one connection are both
    answered; a stream, an error (its body may be unread) and a GET with a body end their
    connection, and say so (Connection: close), so a client opens a new one."""
    import http.client

    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        for _ in range(2):
            connection.request("GET", "/v1/models")
            answer = connection.getresponse()
            assert answer.status == 200 and answer.version == 11
            assert json.loads(answer.read())["data"][0]["id"] == "tiny"
        for method, path, sent in (("GET", "/v1/models/nope", None), ("POST", "/v1/nope", b"{}"),
                                   ("GET", "/v1/models", b'{"x": 1}')):
            connection.request(method, path, sent)
            answer = connection.getresponse()
            answer.read()
            assert answer.getheader("Connection") == "close", (method, path)
            connection.request("GET", "/v1/models")  # http.client opens a new connection
            answer = connection.getresponse()
            assert answer.status == 200 and json.loads(answer.read())["data"]
        body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": True})
        connection.request("POST", "/v1/completions", body,
                           {"Content-Type": "application/json"})
        answer = connection.getresponse()
        assert answer.read().decode().endswith("data: [DONE]\n\n")
        assert answer.getheader("Connection") == "close"
    finally:
        connection.close()


@pytest.fixture(scope="module")
def stream_tokenizers(tmp_path_factory) -> dict:
    """style -> a codelm tokenizer: "spm" (byte fallback, <0xNN> runs) and "qwen2" (byte-level)."""
    texts = [p.read_text("utf-8", "replace") for p in stdlib_files()[::400]]
    texts.append("é 漢 naïve — ✓")
    out = {}
    for style in ("spm", "qwen2"):
        path = tmp_path_factory.mktemp(style) / "tokenizer.json"
        train_family_tokenizer(style, texts, path)
        out[style] = load_tokenizer(path)
    return out


def _random_ids(tok, rng: random.Random, n: int) -> list[int]:
    """Ids of code, with runs of bytes between them: whole characters, cut ones, invalid ones."""
    code = tok.encode("def naïve(x):\n    return x  # 漢 é\n\n" * 4)
    byte_ids = sorted(getattr(tok, "byte_fallback_ids", ())) or None
    ids: list[int] = []
    while len(ids) < n:
        if byte_ids and rng.random() < 0.3:
            ids += [byte_ids[b] for b in rng.choice([b"\xe2\x82\xac", b"\xc3", b"\xff", b"A\xc3\xa9"])]
        elif rng.random() < 0.2:
            ids.append(rng.randrange(tok.vocab_size))
        else:
            start = rng.randrange(len(code))
            ids += code[start : start + rng.randrange(1, 6)]
    return ids[:n]


@pytest.mark.parametrize("style", ["spm", "qwen2"])
def test_streamed_pieces_join_to_the_whole_text_through_byte_runs_and_stops(stream_tokenizers,
                                                                             style):
    """However tokens split characters (byte-fallback runs a later byte makes invalid, UTF-8 cut
    between byte-level tokens) and wherever a stop string falls, the pieces a stream sends join
    to the whole answer's text, and no piece is sent that a later token takes back."""
    tok = stream_tokenizers[style]
    eos = tok.eos_id if tok.eos_id is not None else tok.vocab_size - 1
    rng = random.Random(0)
    for trial in range(200):
        stops = rng.choice([[], ["\n\n"], ["return", "漢"], ["é"], ["x)\n", "# "]])
        choice = _Choice(served_model("t", None, tok, eos_ids=[eos]), stops, [eos])
        ids = _random_ids(tok, rng, rng.randrange(1, 60))
        pieces = []
        for position, token in enumerate(ids):
            last = position == len(ids) - 1
            choice.add(Token(0, token, "length" if last else None))
            pieces.append(choice.new_text())
            assert "".join(pieces) == choice.text()[: len("".join(pieces))], (trial, ids)
        assert "".join(pieces) == choice.text(), (trial, ids)


@pytest.mark.parametrize("style", ["spm", "qwen2"])
def test_a_token_holding_two_stop_strings_cuts_at_the_one_that_begins_first(stream_tokenizers,
                                                                           style):
    """Where one token's text holds two stop strings, the stream cuts where the earlier in the
    text begins, whatever the order of the stop list: the pieces sent equal eval's
    truncate_at_stops of the whole text."""
    tok = stream_tokenizers[style]
    eos = tok.eos_id if tok.eos_id is not None else tok.vocab_size - 1
    ids = tok.encode("x = 1\nreturn value\n")
    word = max((tok.decode([i]) for i in ids), key=len).strip()
    assert len(word) >= 4, word
    stops = [word[2:4], word[:2]]  # the later one in the text listed first
    choice = _Choice(served_model("t", None, tok, eos_ids=[eos]), stops, [eos])
    pieces = []
    for position, token in enumerate(ids):
        choice.add(Token(0, token, "length" if position == len(ids) - 1 else None))
        pieces.append(choice.new_text())
    text = decode_generated(tok, ids)
    assert "".join(pieces) == truncate_at_stops(text, stops) == text[:text.index(word)]


def test_a_long_stream_decodes_each_token_a_bounded_number_of_times(stream_tokenizers):
    """A stream decodes the tokens since its last settled one, not its whole answer, at each
    token: 2,000 tokens cost a few thousand token decodes, not two million."""
    tok = stream_tokenizers["spm"]
    served = served_model("t", None, tok, eos_ids=[tok.eos_id])
    decoded = []
    served = dataclasses.replace(served, decode=lambda ids: decoded.append(len(ids)) or
                                 decode_generated(tok, ids))
    choice = _Choice(served, ["\n\n\n\n"], [tok.eos_id])
    ids = (tok.encode("def naïve(x):\n    return x  # 漢 é\n") * 200)[:2000]
    sent = []
    for position, token in enumerate(ids):
        choice.add(Token(0, token, "length" if position == len(ids) - 1 else None))
        sent.append(choice.new_text())
    assert sum(decoded) < 3 * len(ids)
    assert "".join(sent) == choice.text()


def test_a_port_in_use_is_one_line_naming_it_and_the_way_out():
    """Serving on a port another socket holds: a ValueError (eval.py's one-line error) naming
    host:port and --port 0, not the OS's bare errno."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"^cannot serve on 127\.0\.0\.1:{port}: .*--port 0"):
            make_server([], port=port)


def test_serve_compile_reaches_every_engine(instruct, loaded, monkeypatch):  # noqa: F811
    """--serve --compile compiles each model's decode step (Engine's compile); eval.py passes
    it on, with --batch-size as the slots."""
    import eval as eval_module
    from codelm import serving

    made = []
    engine_class = serving.Engine
    monkeypatch.setattr(serving, "Engine", lambda model, slots, max_len=None, compile=False: (
        made.append(compile) or engine_class(model, slots, max_len)))
    server, thread = _start(loaded, slots=2, compile=True)
    try:
        engine_thread = next(iter(server.engines.values()))
        assert engine_thread.compile and made == [True]
    finally:
        _stop(server, thread)
    asked = []
    monkeypatch.setattr(eval_module, "serve", lambda *args: asked.append(args) or 0)
    root, _ = instruct
    assert eval_module.main(["--serve", "--compile", "--models", str(root), "--port", "0",
                             "--device", "cpu", "--batch-size", "3"]) == 0
    assert asked[0][-1] is True and asked[0][-2] == 3  # compile, then the slots


def test_served_slots_are_sized_to_the_memory_free(instruct, loaded, monkeypatch,  # noqa: F811
                                                    capsys):
    """A slot's KV cache is allocated whole at the context: slot_bytes is what the engine
    allocates a slot; without --batch-size each engine gets as many slots as half the memory
    free holds (at most 64); a --batch-size or a context past the memory is refused naming the
    flags that fit it; a --block-size past a model's context serves its own, noted."""
    import eval as eval_module
    from codelm import serving
    from codelm.models.engine import Engine

    model, tok = loaded
    served = served_model("tiny", model, tok)
    pool = Engine(model, 3).caches
    allocated = sum(t.numel() * t.element_size() for pair in pool for t in pair)
    one = serving.slot_bytes(served)
    assert one * 3 == allocated
    assert serving.pool_slots([served], None, 10.9 * one) == 5
    assert serving.pool_slots([served, served], None, 10.9 * one) == 2  # a slot of each model
    assert serving.pool_slots([served], None, float("inf")) == serving.MAX_SLOTS
    assert serving.pool_slots([served], 7, 7 * one) == 7
    from codelm.runtime.console import byte_size  # the banner's and messages' sizes

    assert (byte_size(3 * 2**20), byte_size(1.5 * 2**30)) == ("3.0 MiB", "1.5 GiB")
    with pytest.raises(ValueError, match=r"--batch-size 8 takes .* --block-size"):
        serving.pool_slots([served], 8, 7 * one)
    with pytest.raises(ValueError, match=r"one sequence's KV cache .* --block-size"):
        serving.pool_slots([served], None, 1.5 * one)
    asked = []
    monkeypatch.setattr(eval_module, "serve", lambda *args: asked.append(args) or 0)
    monkeypatch.setattr(eval_module.process, "free_memory", lambda device: 12.5 * one)
    root, _ = instruct
    assert eval_module.main(["--serve", "--models", str(root), "--port", "0",
                             "--device", "cpu"]) == 0
    assert asked[0][-2] == 6
    assert eval_module.main(["--serve", "--models", str(root), "--port", "0", "--device", "cpu",
                             "--block-size", "1000000"]) == 0  # past its context: said
    assert f"--block-size 1000000 is past {root.name}'s context of {model.cfg.block_size}" in \
        capsys.readouterr().err
    monkeypatch.setattr(eval_module.process, "free_memory", lambda device: one)
    assert eval_module.main(["--serve", "--models", str(root), "--port", "0",
                             "--device", "cpu"]) == 2


def test_block_size_caps_what_a_served_sequence_holds(loaded):
    """--serve --block-size N (vLLM's --max-model-len): each slot's cache holds N positions,
    /v1/models lists N as max_model_len, and a prompt and its max_tokens past N are refused."""
    model, tok = loaded
    served = served_model("tiny", model, tok, context=16, weights="fingerprint")
    assert served.context_length == 16
    assert served_model("tiny", model, tok, context=10**9).context_length == model.cfg.block_size
    server, thread = _start_served(served, slots=2)
    try:
        engine = next(iter(server.engines.values())).engine
        assert engine.caches[0][0].shape[2] == 16
        client = _client(server)
        assert client.models.list().data[0].max_model_len == 16
        listed = client.models.list().data[0]  # and the weights it serves, for a journal
        assert listed.codelm_weights == "fingerprint"
        short = client.completions.create(model="tiny", prompt="x = 1", max_tokens=8)
        assert short.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError, match="past the model's context"):
            client.completions.create(model="tiny", prompt="x = 1", max_tokens=40)
        with pytest.raises(openai.BadRequestError,
                           match=r"prompt's \d+ tokens fill .*context of 16 tokens.*"
                                 r"truncate_prompt_tokens"):
            client.completions.create(model="tiny", prompt="x = 1\n" * 20, max_tokens=4)
    finally:
        _stop(server, thread)


def test_a_busy_port_is_refused_before_any_model_loads(monkeypatch, capsys):
    """The address is checked before the models load (minutes for a large one): a port in use
    is a one-line error naming --port, and no model is loaded."""
    import socket

    import eval as eval_module

    monkeypatch.setattr(eval_module.loading, "load_model",
                        lambda *a: pytest.fail("a model loaded before the port was checked"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert eval_module.main(["--serve", "--models", "anything", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve on 127.0.0.1:{port}" in err and "--port" in err


@pytest.mark.parametrize("argv, noted", [
    (["--tasks", "lm", "--limit", "2"], True),
    (["--tasks", "lm", "line", "--limit", "2"], False),
    (["--tasks", "lm"], False),
])
def test_a_limit_no_task_reads_is_noted(argv, noted):
    """--limit counts generation tasks' examples and benchmark problems: given with lm alone
    (which scores --lm-windows windows), a note says it is not used."""
    from codelm.evaluation.config import limit_unused, parse_config

    note = limit_unused(parse_config(argv))
    assert (note is not None and "--lm-windows" in note) if noted else note is None


@pytest.mark.parametrize("argv, noted", [
    (["--tasks", "infill", "lm", "--reference-loss"], True),
    (["--tasks", "infill", "line", "--reference-loss"], False),
    (["--tasks", "infill"], False),
])
def test_a_reference_loss_no_task_computes_is_noted(argv, noted):
    """--reference-loss adds a loss to the generation tasks of the split (line, docstring, ...):
    given with tasks of which none is such (infill, lm), a note says it is not used, naming
    those that use it."""
    from codelm.evaluation.config import parse_config, reference_loss_unused

    note = reference_loss_unused(parse_config(argv))
    if noted:
        assert note.startswith("--reference-loss adds the loss of the reference to line, "), note
        assert note.endswith("not used by infill and lm"), note
    else:
        assert note is None


@pytest.mark.parametrize("argv, unused", [
    (["--serve", "--tasks", "humaneval", "--num-samples", "5", "--temperature", "0.7"],
     "--tasks, --temperature, --num-samples not used"),
    (["--prompt", "def f():", "--num-samples", "3", "--temperature", "0.8"], None),
    (["--prompt", "def f():", "--batch-size", "3"], "--batch-size not used"),
    (["--prompt", "def f():", "--temperature", "0.8", "--max-new-tokens", "9"], None),
    (["--serve", "--compile", "--batch-size", "64", "--block-size", "4096"], None),
])
def test_keys_a_mode_does_not_read_are_noted(argv, unused):
    """--serve takes sampling from each request and --prompt streams completions: a key set
    beside them that they do not read is named in a note, one they read is not."""
    from codelm.evaluation.config import mode_unused, parse_config

    note = mode_unused(parse_config(argv))
    assert (note is None) if unused is None else note.endswith(unused)
