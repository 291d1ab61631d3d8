"""An OpenAI-compatible server over the sampling engine: any client that speaks the OpenAI API
(the `openai` package, editor plugins, agents, evaluation harnesses) can talk to a codelm model.

    serve([ServedModel(...)], host="127.0.0.1", port=8000)  # eval.py --serve --models DIR

GET /v1/models, GET /health (200 while serving, no API key asked, as vLLM's);
POST /v1/completions and /v1/chat/completions (the tokenizer's chat template),
streamed as server-sent events or whole; n, stop, max_tokens, temperature, top_p, seed, logprobs
(top_logprobs), echo (completions), usage counts. Requests from concurrent clients share one
engine per model, each model's steps run on one thread. A bad request gets OpenAI's error JSON
and a 4xx status (a failure of the server's own, a 500; in a stream that has begun, an error
event); with an API key, a request without it gets 401. A request whose client goes away is
cancelled. SIGTERM (or Ctrl-C) finishes the requests in flight, then the server exits; a second
one exits at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from codelm.models.engine import Engine, Token
from codelm.models.generation import GenerationConfig, cache_dtype, truncate_at_stops
from codelm.openai_api import (
    ApiError,
    Params,
    Prompt,
    ServedModel,
    chat_prompts,
    choice_seeds,
    completion_prompts,
    generation_config,
    left_cut,
    number_field,
    read_params,
    unread_fields,
)
from codelm.runtime.console import byte_size
from codelm.tool_calls import CallStream, ToolCall, read_calls

# How often the console line tells what the server did (seconds).
REPORT_EVERY_S = 10.0
# How often a request waiting for its tokens checks that its client is still there (seconds).
CLIENT_CHECK_S = 1.0
# A connection that sends nothing for this long is closed (seconds).
IDLE_TIMEOUT_S = 60.0
# How long serve() waits for a connection before it looks whether a signal asked it to stop.
STOP_CHECK_S = 0.2
# How many unread request field names the console notes, and how much of each it shows.
UNREAD_NOTED = 64
UNREAD_NAME_CHARS = 40
# A chunk size line of a chunked body: hex digits alone (HTTP/1.1's chunk-size).
HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]+")




# -------------------------------------------------------------------------------- engine thread
@dataclass
class _Submitted:
    """A request handed to the engine thread; its tokens go to ``events`` as (choice, Token)."""

    prompt: list[int]
    cfg: GenerationConfig
    logprobs: int | None
    events: queue.Queue
    choice: int
    id: int = -1


class EngineThread:
    """One model's engine, stepped on its own thread; handlers submit requests and read their
    tokens from a queue each."""

    def __init__(self, served: ServedModel, slots: int, compile: bool = False) -> None:
        self.served = served
        self.compile = compile
        self.engine = Engine(served.model, slots, served.context_length, compile)
        self.inbox: queue.Queue = queue.Queue()
        self.requests: dict[int, _Submitted] = {}
        self.tokens = 0  # generated, for the console line
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name=f"engine {served.name}",
                                       daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], cfg: GenerationConfig, logprobs: int | None,
               events: queue.Queue, choice: int) -> _Submitted:
        """Queue a request; its tokens will come to ``events`` as (choice, Token)."""
        if not self.thread.is_alive():
            raise ApiError(503, f"model {self.served.name!r} cannot generate any more (its "
                           "engine failed): restart the server", None, "engine_failed")
        request = _Submitted(prompt, cfg, logprobs, events, choice)
        self.inbox.put(("add", request))
        return request

    def cancel(self, request: _Submitted) -> None:
        self.inbox.put(("cancel", request))

    def stop(self) -> None:
        self.inbox.put(("stop", None))
        self.thread.join()

    def _loop(self) -> None:
        while self._take_commands(block=not self.engine.busy):
            self._step()

    def _take_commands(self, block: bool) -> bool:
        """Take the handlers' commands (waiting for one while the engine is idle); False once
        told to stop."""
        try:
            while True:
                command, request = self.inbox.get(block=block)
                block = False
                if command == "stop":
                    return False
                if command == "add":
                    self._add(request)
                elif self.requests.get(request.id) is request:  # not an earlier engine's id
                    self.engine.cancel(request.id)
                    del self.requests[request.id]
        except queue.Empty:
            return True

    def _add(self, request: _Submitted) -> None:
        """Queue a request on the engine. A refusal or failure goes to its request alone: the
        engine changes nothing before it accepts one, and serves the others on."""
        try:
            request.id = self.engine.add(request.prompt, request.cfg, request.logprobs)
        except Exception as e:
            request.events.put((request.choice, e))
            return
        self.requests[request.id] = request

    def _step(self) -> None:
        """One engine step; its tokens to their requests. A failure (out of memory, say) goes to
        every request in flight, and a fresh engine takes the next ones."""
        try:
            events = self.engine.step()
        except Exception as e:
            for request in self.requests.values():
                request.events.put((request.choice, e))
            self.requests.clear()
            slots = len(self.engine.rows)
            self.engine = None  # its caches freed before the next one's are made
            self.engine = Engine(self.served.model, slots, self.served.context_length,
                                 self.compile)
            return
        for event in events:
            self.tokens += 1
            request = self.requests[event.request]
            request.events.put((request.choice, event))
            if event.finished is not None:
                del self.requests[event.request]




class _Choice:
    """One choice's tokens as they come, and its text: the text before an EOS, cut where a stop
    string begins (as eval cuts). `new_text` gives what can be sent so far, never text a stop
    string or a later token could still take back; each call decodes only the tokens since the
    last settled one, so a stream's decoding grows with its length, not its square."""

    def __init__(self, served: ServedModel, stops: list[str], eos_ids: list[int]) -> None:
        self.served, self.stops, self.eos_ids = served, stops, eos_ids
        self.ids: list[int] = []
        self.events: list[Token] = []
        self.settled = 0  # ids whose text no later id can change, their text in `unsent` or sent
        self.unsent = ""  # settled text not sent yet: what a stop string may still begin
        self.stopped = False  # a stop string has ended the text
        self.logged = 0  # tokens whose log-probs a chunk has carried
        self.logged_chars = 0  # their text's length: the next chunk's first text offset
        self.finish: str | None = None

    def add(self, event: Token) -> None:
        self.events.append(event)
        if event.token not in self.eos_ids:
            self.ids.append(event.token)
        self.finish = event.finished

    def text(self) -> str:
        return truncate_at_stops(self.served.decode(self.ids), self.stops)

    def new_text(self) -> str:
        if self.stopped:
            return ""
        self._settle()
        text = self.unsent
        cut = _first_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            text = text[:cut]
        elif self.finish is None:  # the end of the text may begin a stop string
            text = text[:_stop_start(text, self.stops)]
        self.unsent = self.unsent[len(text):]
        return text

    def _settle(self) -> None:
        """Move the text of the ids since the last settled one into `unsent`, where no later id
        can change it: not while the last is in a byte-fallback run, decodes to nothing (the run
        may go on through it) or ends an unfinished UTF-8 character, unless the choice has
        finished."""
        window = self.served.decode(self.ids[self.settled :])
        if self.finish is None:
            if not self.ids or self.ids[-1] in self.served.joining_ids:
                return
            if not self.served.token_text(self.ids[-1]):  # an id that decodes to nothing
                return
            if window.endswith("\ufffd"):
                return
        self.unsent += window
        self.settled = len(self.ids)


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string in ``text`` begins, None where none does."""
    found = [at for at in (text.find(stop) for stop in stops) if at >= 0]
    return min(found, default=None)


def _stop_start(text: str, stops: list[str]) -> int:
    """Where the end of ``text`` that begins some stop string begins (len(text) where none
    does): the text from there may yet become a stop."""
    start = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):  # the longest first
            if text.endswith(stop[:k]):
                start = min(start, len(text) - k)
                break
    return start


def _completion_logprobs(served: ServedModel, events: list[Token], chat: bool, at: int = 0
                         ) -> dict:
    """OpenAI's logprobs object of a choice's tokens (completions' or chat's form); ``at``: the
    text offset of the first (the length of the choice's text before it)."""
    text, raw = served.token_text, served.token_bytes
    if chat:
        content = []
        for e in events:
            top = [{"token": text(t), "logprob": lp, "bytes": list(raw(t))}
                   for t, lp in e.top_logprobs]
            content.append({"token": text(e.token), "logprob": e.logprob,
                            "bytes": list(raw(e.token)), "top_logprobs": top})
        return {"content": content}
    offsets = []
    for e in events:
        offsets.append(at)
        at += len(text(e.token))
    return {"tokens": [text(e.token) for e in events],
            "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [_completion_top(e, text) for e in events],
            "text_offset": offsets}


def _completion_top(event: Token, text: Callable[[int], str]) -> dict[str, float]:
    """A token's top_logprobs in the completions form: the chosen token's, then the likeliest
    asked for (up to logprobs + 1 entries, as OpenAI's API and vLLM give them)."""
    top = {text(event.token): event.logprob}
    for token, logprob in event.top_logprobs:  # likeliest first: a text keeps its first
        top.setdefault(text(token), logprob)
    return top


# -------------------------------------------------------------------------------------- handler
class _Handler(BaseHTTPRequestHandler):
    """The API's routes; ``self.server`` is the `_Server` that holds the engines."""

    server: _Server
    error_content_type = "application/json"
    timeout = IDLE_TIMEOUT_S  # a connection that sends nothing is closed
    protocol_version = "HTTP/1.1"  # a connection is kept for the next request (not a stream's)

    def setup(self) -> None:
        super().setup()
        self.server.note_waiting(self.connection, True)

    def parse_request(self) -> bool:  # a request line has come: the connection is busy
        self.server.note_waiting(self.connection, False)
        return super().parse_request()

    def handle_one_request(self) -> None:
        super().handle_one_request()
        if not self.server.note_waiting(self.connection, True):  # the server is closing
            self.close_connection = True

    def finish(self) -> None:
        self.server.note_waiting(self.connection, False)
        super().finish()

    def log_message(self, format: str, *args) -> None:  # the console line tells the traffic
        return

    def do_GET(self) -> None:
        self._route(self._get)

    def do_POST(self) -> None:
        self._route(self._post)

    def _get(self) -> None:
        path = _route_path(self.path)
        if path == HEALTH:
            self._send_json(200, {"status": "ok"})
            return
        if path == "/v1/models":
            self._send_json(200, self._models())
            return
        if not path.startswith("/v1/models/"):
            self._not_found()
        name = urllib.parse.unquote(path.removeprefix("/v1/models/"))
        for model in self._models()["data"]:
            if model["id"] == name:
                self._send_json(200, model)
                return
        raise ApiError(404, f"model {name!r} is not served here; served: "
                       f"{', '.join(self.server.engines)}", "model", "model_not_found")

    def _post(self) -> None:
        path = _route_path(self.path)
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self._not_found()
        self._answer(chat=path == "/v1/chat/completions")

    def _route(self, answer: Callable[[], None]) -> None:
        """Answer a request; any failure as OpenAI's error JSON (in the stream, once it has
        begun), the server serving on."""
        self.streaming = False
        if self.command == "GET" and (self.headers.get("Content-Length", "0") != "0" or
                                      "chunked" in self.headers.get("Transfer-Encoding", "")):
            self.close_connection = True  # a body no route reads: not the next request
        try:
            key = self.server.api_key
            asked = self.headers.get("Authorization")
            if key is not None and _route_path(self.path) != HEALTH and asked != f"Bearer {key}":
                raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer "
                               "KEY' with the server's --api-key", None, "invalid_api_key")
            answer()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client went away
            pass
        except Exception as e:
            self.close_connection = True  # its body may be unread: no next request from it
            if not isinstance(e, ApiError):
                print(f"error: {self.command} {self.path}: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
                e = ApiError(500, f"the server failed: {type(e).__name__}: {e}")
            try:
                self._send_error(e)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass

    def _send_error(self, error: ApiError) -> None:
        if not self.streaming:
            self._send_json(error.status, error.body())
            return
        self.wfile.write(f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()

    def client_gone(self) -> bool:
        """Whether the client has closed its connection (a read would return nothing: a
        client that shuts its side after the request is taken as gone, as nginx takes it)."""
        poller = select.poll()  # any descriptor number (select() takes those below 1024)
        poller.register(self.connection, select.POLLIN)
        if not poller.poll(0):
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _not_found(self) -> None:
        raise ApiError(404, f"no route {self.command} {self.path}: the server answers "
                       "GET /v1/models, GET /v1/models/ID, GET /health, POST /v1/completions "
                       "and /v1/chat/completions")

    def _models(self) -> dict:
        listed = []
        for name, engine in self.server.engines.items():
            entry = {"id": name, "object": "model", "created": self.server.started,
                     "owned_by": "codelm",
                     "max_model_len": engine.served.context_length}  # vLLM's field
            if engine.served.weights is not None:
                entry["codelm_weights"] = engine.served.weights
            listed.append(entry)
        return {"object": "list", "data": listed}

    def _body(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = self._chunked_body()
        else:
            length = self.headers.get("Content-Length") or "0"
            if not length.isdigit():
                raise ApiError(400, f"the Content-Length header {length!r} is not a byte count")
            data = self.rfile.read(int(length))
        try:
            body = json.loads(data or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _chunked_body(self) -> bytes:
        """A body sent in chunks (Transfer-Encoding: chunked): each a hex size line, then that
        many bytes; a size of 0 ends it (after any trailer lines)."""
        data = b""
        while True:
            line = self.rfile.readline(1024).split(b";")[0].strip()
            if not HEX_DIGITS.fullmatch(line):  # int() takes signs, 0x and underscores too
                raise ApiError(400, f"a chunk size {line[:20]!r} is not hexadecimal")
            size = int(line, 16)
            if size == 0:
                while self.rfile.readline(1024).strip():
                    pass
                return data
            data += self.rfile.read(size)
            self.rfile.readline(8)  # the chunk's CRLF

    def send_error(self, code: int, message: str | None = None, explain: str | None = None
                   ) -> None:
        """http.server's own refusals (a method not served, a malformed request line) as
        OpenAI's error JSON, as every other refusal."""
        self.close_connection = True
        self._send_json(code, ApiError(code, message or self.responses[code][0]).body())

    def _answer(self, chat: bool) -> None:
        body = self._body()
        engines = self.server.engines
        name = body.get("model")
        if name is None and len(engines) == 1:  # as vLLM: the one model served
            name = next(iter(engines))
        if name is None:
            raise ApiError(400, f"'model' is missing: name one of the served models, "
                           f"{', '.join(engines)}", "model")
        if not isinstance(name, str):
            raise ApiError(400, f"'model' must name a served model: {', '.join(engines)}",
                           "model")
        if name not in engines:
            raise ApiError(404, f"model {name!r} is not served here; served: "
                           f"{', '.join(engines)}", "model", "model_not_found")
        engine = engines[name]
        served = engine.served
        prompts = chat_prompts(served, body) if chat else completion_prompts(served, body)
        keep = number_field(body, "truncate_prompt_tokens", None, int, 1)  # vLLM's extension
        if keep is not None:
            prompts = [p._replace(ids=left_cut(p.ids, keep, served.start)) for p in prompts]
        longest = max(len(p.ids) for p in prompts)
        room = served.context_length + 1 - longest
        if room < 1:
            raise ApiError(400, f"the prompt's {longest} tokens fill the model's context of "
                           f"{served.context_length} tokens; truncate_prompt_tokens N keeps its "
                           "last N", "messages" if chat else "prompt", "context_length_exceeded")
        params = read_params(body, chat, room)
        self.server.note_unread(unread_fields(body, chat), _route_path(self.path))
        # tool calls read where the request offers tools its model's template taught
        calls = (chat and served.reads_calls and bool(body.get("tools"))
                 and body.get("tool_choice") != "none")
        reply = _Reply(self, engine, prompts, params, chat, name, calls)
        reply.run()

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:  # the client is told, as http.server's own errors tell it
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


HEALTH = "/health"  # a load balancer's or an orchestrator's probe


def _route_path(target: str) -> str:
    """A request target's path, its query (an Azure client's api-version) aside."""
    return urllib.parse.urlsplit(target).path.rstrip("/")




class _Reply:
    """One request's choices, sent whole or streamed as they come; with ``calls``, a chat
    answer's Hermes tool calls come as its message's ``tool_calls``."""

    def __init__(self, handler: _Handler, engine: EngineThread, prompts: list[Prompt],
                 params: Params, chat: bool, name: str, calls: bool = False) -> None:
        self.handler, self.engine, self.params, self.chat = handler, engine, params, chat
        self.prompts = prompts
        self.calls = calls
        self.served = engine.served
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "created": int(time.time()), "model": name}
        self.events: queue.Queue = queue.Queue()
        self.choices = [_Choice(self.served, params.stop, self.served.ending_ids(chat))
                        for _ in range(len(prompts) * params.n)]
        self.call_streams = [CallStream() for _ in self.choices]
        self.submitted: list[_Submitted] = []

    def run(self) -> None:
        n = self.params.n
        seeds = [None] * n if self.params.seed is None else choice_seeds(self.params.seed, n)
        for index in range(len(self.choices)):
            cfg = generation_config(self.params, self.served, seeds[index % n], self.chat)
            self.submitted.append(self.engine.submit(self.prompts[index // n].ids, cfg,
                                                     self.params.logprobs, self.events, index))
        try:
            if self.params.stream:
                self._stream()
            else:
                for _ in self._tokens():
                    pass
                self.handler._send_json(200, self._whole())
        finally:
            for request in self.submitted:  # those still running: the client went away
                self.engine.cancel(request)
            self.handler.server.count(len(self.choices))

    def _tokens(self) -> Iterator[int]:
        """Take each choice's tokens as they come, until every choice has finished; yields the
        index of the choice that grew."""
        open_choices = len(self.choices)
        checked = time.monotonic()
        while open_choices:
            if time.monotonic() - checked >= CLIENT_CHECK_S:
                checked = time.monotonic()
                if self.handler.client_gone():  # its choices are cancelled (run's finally)
                    raise ConnectionResetError("the client closed its connection")
            try:
                index, event = self.events.get(timeout=CLIENT_CHECK_S)
            except queue.Empty:
                continue
            if isinstance(event, Exception):
                raise ApiError(500, f"generation failed: {event}")
            choice = self.choices[index]
            choice.add(event)
            if event.finished is not None:
                open_choices -= 1
            yield index

    def _usage(self) -> dict:
        prompt = sum(len(p.ids) for p in self.prompts)
        completion = sum(len(c.events) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _whole(self) -> dict:
        choices = []
        for index, choice in enumerate(self.choices):
            logprobs = None
            if self.params.logprobs is not None:
                logprobs = _completion_logprobs(self.served, choice.events, self.chat)
            text = choice.text()
            finish = choice.finish
            if self.chat:
                message = {"role": "assistant", "content": text}
                if self.calls:
                    content, calls = read_calls(text)
                    message["content"] = content
                    if calls:
                        message["tool_calls"] = [_tool_call(call) for call in calls]
                        finish = "tool_calls"
                entry = {"message": message}
            else:
                echo = self.prompts[index // self.params.n].text if self.params.echo else ""
                entry = {"text": echo + text}
            choices.append({"index": index, **entry, "logprobs": logprobs,
                            "finish_reason": finish})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.head, "object": kind, "choices": choices, "usage": self._usage()}

    def _stream(self) -> None:
        handler = self.handler
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")  # its end is the connection's
        handler.close_connection = True
        handler.end_headers()
        handler.streaming = True
        if self.chat:
            for index in range(len(self.choices)):
                self._send([{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])
        elif self.params.echo:
            for index in range(len(self.choices)):
                prompt = self.prompts[index // self.params.n].text
                self._send([{"index": index, "text": prompt, "logprobs": None,
                             "finish_reason": None}])
        for index in self._tokens():
            choice = self.choices[index]
            piece = choice.new_text()
            if self.calls:
                self._stream_calls(index, piece, choice)
            elif piece or choice.finish is not None:
                self._send([self._chunk(index, piece, choice, choice.finish)])
        if self.params.include_usage:
            self._send([], usage=self._usage())
        handler.wfile.write(b"data: [DONE]\n\n")
        handler.wfile.flush()

    def _stream_calls(self, index: int, piece: str, choice: _Choice) -> None:
        """A streamed answer whose tool calls are read: its content as it becomes certain; at
        its end, each call in a chunk of its own, then the end (finish_reason tool_calls where
        it called), as the whole answer reads."""
        stream = self.call_streams[index]
        content, calls = stream.feed(piece), []
        if choice.finish is not None:
            rest, calls = stream.finish()
            content += rest
        if content:
            self._send([self._chunk(index, content, choice, None)])
        for number, call in enumerate(calls):
            delta = {"tool_calls": [{"index": number, **_tool_call(call)}]}
            self._send([{"index": index, "delta": delta, "logprobs": None,
                         "finish_reason": None}])
        if choice.finish is not None:
            finish = "tool_calls" if calls else choice.finish
            self._send([self._chunk(index, "", choice, finish)])

    def _chunk(self, index: int, piece: str, choice: _Choice, finish: str | None) -> dict:
        logprobs = None
        if self.params.logprobs is not None:  # every token since the last chunk's
            new = choice.events[choice.logged:]
            logprobs = _completion_logprobs(self.served, new, self.chat, choice.logged_chars)
            choice.logged = len(choice.events)
            choice.logged_chars += sum(len(self.served.token_text(e.token)) for e in new)
        text = {"delta": {"content": piece}} if self.chat else {"text": piece}
        return {"index": index, **text, "logprobs": logprobs, "finish_reason": finish}

    def _send(self, choices: list[dict], usage: dict | None = None) -> None:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = {**self.head, "object": kind, "choices": choices}
        if self.params.include_usage:
            chunk["usage"] = usage
        self.handler.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.handler.wfile.flush()


def _tool_call(call: ToolCall) -> dict:
    """A call as the API gives one (its id unique, as OpenAI's and vLLM's)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


# --------------------------------------------------------------------------------------- server
class _Server(ThreadingHTTPServer):
    """The HTTP server and the engines it answers with; handler threads are joined on close, so
    the requests in flight finish before the server ends, and connections waiting for their
    next request are closed then."""

    daemon_threads = False
    block_on_close = True
    request_queue_size = socket.SOMAXCONN  # a burst of clients waits, none dropped

    def __init__(self, address: tuple[str, int], engines: dict[str, EngineThread],
                 api_key: str | None) -> None:
        self.address_family = address_family(address[0])
        super().__init__(address, _Handler)
        self.engines = engines
        self.api_key = api_key
        self.started = int(time.time())
        self.answered = 0
        self.unread: set[str] = set()  # request fields noted as not read
        self.lock = threading.Lock()
        self.waiting: set[socket.socket] = set()  # connections between requests
        self.closing = False

    def note_waiting(self, connection: socket.socket, waiting: bool) -> bool:
        """Note whether ``connection`` waits for its next request; False once the server is
        closing (no request is taken after the one in hand)."""
        with self.lock:
            if waiting and not self.closing:
                self.waiting.add(connection)
            else:
                self.waiting.discard(connection)
            return not self.closing

    def close_waiting(self) -> None:
        """Take no more requests: the connections waiting for one are closed for reading (their
        handlers end now), the others after the request in hand."""
        with self.lock:
            self.closing = True
            waiting = list(self.waiting)
            self.waiting.clear()
        for connection in waiting:
            with contextlib.suppress(OSError):  # the client has closed it already
                connection.shutdown(socket.SHUT_RD)

    def note_unread(self, fields: list[str], path: str) -> None:
        """Say on the console, once a field name (the first UNREAD_NOTED names, each cut to
        UNREAD_NAME_CHARS), the request fields the server answered without reading."""
        with self.lock:
            room = UNREAD_NOTED - len(self.unread)
            new = [field for field in fields if field not in self.unread][:max(room, 0)]
            self.unread.update(new)
            full = room > 0 and len(self.unread) == UNREAD_NOTED
        if not new:
            return
        names = [repr(field[:UNREAD_NAME_CHARS]) for field in new]
        named = f"field {names[0]}" if len(names) == 1 else f"fields {', '.join(names)}"
        print(f"note: {path}: request {named} not read (answered without it)"
              + ("; further unread fields are not noted" if full else ""),
              file=sys.stderr, flush=True)

    def count(self, choices: int) -> None:
        with self.lock:
            self.answered += choices

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


# --batch-size unset: each model's engine gets as many slots as KV_SHARE of the memory free
# (once the models are loaded) holds, at most MAX_SLOTS. A slot's cache is allocated whole, at
# its model's context, when the server starts.
MAX_SLOTS = 64
KV_SHARE = 0.5


def slot_bytes(served: ServedModel) -> int:
    """The bytes of one slot's KV cache: the keys and values of every layer at the context."""
    cfg = served.model.cfg
    per_layer = 2 * cfg.n_kv_head * cfg.head_dim * served.context_length
    return len(served.model.blocks) * per_layer * cache_dtype(served.model).itemsize


def pool_slots(models: list[ServedModel], requested: int | None, free_bytes: float) -> int:
    """The slots each model's engine gets: ``requested`` (eval.py's --batch-size), else as many
    as KV_SHARE of ``free_bytes`` holds, at most MAX_SLOTS. ValueError where the caches would
    not fit in the memory free."""
    one = sum(slot_bytes(m) for m in models)  # one slot of every model
    longest = max(m.context_length for m in models)
    if requested is not None:
        if requested * one > free_bytes:
            raise ValueError(f"--batch-size {requested} takes {byte_size(requested * one)} of "
                             f"KV cache (a sequence's at the context, {longest} tokens), more "
                             f"than the {byte_size(free_bytes)} free: lower --batch-size, or cap "
                             "the context with --block-size")
        return requested
    slots = int(min(MAX_SLOTS, KV_SHARE * free_bytes // one))
    if slots < 1:
        raise ValueError(f"one sequence's KV cache at the context of {longest} tokens takes "
                         f"{byte_size(one)}, more than half the {byte_size(free_bytes)} free (a "
                         "cache is allocated whole): cap the context with --block-size")
    return slots


def make_server(models: list[ServedModel], host: str = "127.0.0.1", port: int = 8000,
                api_key: str | None = None, slots: int = 8, compile: bool = False) -> _Server:
    """A server bound to ``host:port`` (port 0: a free one), its engines running (``compile``:
    their decode steps compiled, a CUDA graph on CUDA); serve with ``serve_forever()``, end with
    `shutdown()` then `close_server(server)`."""
    engines = {m.name: EngineThread(m, slots, compile) for m in models}
    try:
        return _Server((host, port), engines, api_key)
    except OSError as e:  # the port taken, or a host this machine is not
        for engine in engines.values():
            engine.stop()
        raise _address_error(host, port, e) from None


def check_address(host: str, port: int) -> None:
    """Refuse an address the server could not bind, as ``make_server`` would, before the models
    load (which may take minutes); port 0 (a free one) always binds."""
    if port == 0:
        return
    try:
        with socket.socket(address_family(host), socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            probe.bind((host, port))
    except OSError as e:
        raise _address_error(host, port, e) from None


def address_family(host: str) -> socket.AddressFamily:
    """IPv6 for an address that holds a colon (``::1``), else IPv4."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _address_error(host: str, port: int, error: OSError) -> ValueError:
    return ValueError(f"cannot serve on {host}:{port}: {error.strerror or error}; give another "
                      "--port (--port 0: a free one) or --host")


def close_server(server: _Server) -> None:
    """Wait for the requests in flight, then stop the engines."""
    server.close_waiting()
    server.server_close()
    for engine in server.engines.values():
        engine.stop()


def serve(models: list[ServedModel], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, slots: int = 8, compile: bool = False) -> int:
    """Serve until SIGTERM or Ctrl-C, then finish the requests in flight; returns 0."""
    server = make_server(models, host, port, api_key, slots, compile)
    stopping = threading.Event()

    def stop(signum, frame) -> None:
        if stopping.is_set():  # a second signal: the requests in flight are given up
            print("stopped at once: the requests in flight are dropped", file=sys.stderr,
                  flush=True)
            os._exit(1)
        stopping.set()  # the loop below sees it within STOP_CHECK_S

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    reporter = threading.Thread(target=_report, args=(server, stopping), daemon=True)
    contexts = "/".join(str(m.context_length) for m in models)
    cache = byte_size(slots * sum(slot_bytes(m) for m in models))
    print(f"serving {', '.join(server.engines)} on {server.url} ({slots} sequences of up to "
          f"{contexts} tokens decoded at once each, {cache} of KV cache: eval.py's --batch-size "
          f"and --block-size{', compiled' if compile else ''}"
          f"{', API key required' if api_key else ''}); Ctrl-C or SIGTERM stops", flush=True)
    key = " -H 'Authorization: Bearer KEY'" if api_key else ""
    example = json.dumps({"model": next(iter(server.engines)), "prompt": "def fib(n):",
                          "max_tokens": 32, "temperature": 0})
    print(f"try: curl {server.url}/completions -H 'Content-Type: application/json'{key} "
          f"-d '{example}'", flush=True)
    reporter.start()
    server.timeout = STOP_CHECK_S
    try:
        # Served here rather than by serve_forever(), whose shutdown() must come from another
        # thread: every thread serve() starts has ended when it returns, so none can free the
        # models' tensors while the interpreter shuts down (a thread released from the GIL
        # then is ended inside the tensor's C++ destructor, and the process aborts).
        while not stopping.is_set():
            server.handle_request()  # one connection, or none after STOP_CHECK_S
    finally:
        stopping.set()
        close_server(server)
        reporter.join()  # no thread of the server's writes while the interpreter shuts down
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"stopped after {_completions(server.answered)}", flush=True)
    return 0


def _completions(count: int) -> str:
    return f"{count} completion{'' if count == 1 else 's'}"


def _report(server: _Server, stopping: threading.Event) -> None:
    """Every REPORT_EVERY_S: completions answered, tokens generated, tokens/s, while any came."""
    last_tokens, last_time = 0, time.monotonic()
    while not stopping.wait(REPORT_EVERY_S):
        tokens = sum(e.tokens for e in server.engines.values())
        now = time.monotonic()
        if tokens != last_tokens:
            rate = (tokens - last_tokens) / (now - last_time)
            print(f"served {_completions(server.answered)} and {tokens:,} tokens in all; "
                  f"{rate:,.0f} tokens/s over the last {REPORT_EVERY_S:g} s", file=sys.stderr,
                  flush=True)
        last_tokens, last_time = tokens, now
