"""Sampling from an OpenAI-compatible endpoint (codelm's own server, vLLM, SGLang, llama.cpp's
server): eval scores the completions in its own sandbox, as it scores a local model's.

    endpoint = parse_endpoint("x=openai:http://127.0.0.1:8000/v1#tiny")
    texts = complete(endpoint, model_name(endpoint), "def add(a, b):\\n",
                     Sampling(max_tokens=128, n=4, seed=0))

Choice i of a request seeded s is seeded s + i (codelm's server's rule), so a problem's samples
asked at the seed of eval's first sample of it are the texts eval samples from the same model
locally.

An endpoint that asks for an API key (a server started with --api-key, a hosted one) gets
$OPENAI_API_KEY as its bearer token. Standard library only: no client package is needed to
score an endpoint.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from typing import NamedTuple

# A model spec naming an endpoint: [LABEL=]openai:URL[#MODEL]
PREFIX = "openai:"
TIMEOUT_S = 600.0
MAX_CHOICES = 128  # the choices (n) one request asks for at most: codelm's server's limit
API_KEY_VARIABLE = "OPENAI_API_KEY"  # the environment variable an endpoint's key is read from


@dataclass(frozen=True)
class Endpoint:
    """An endpoint's label (the results' row), base URL (…/v1) and model name (None: the
    first the endpoint lists)."""

    label: str
    url: str
    model: str | None


@dataclass(frozen=True)
class Sampling:
    """One completion request's settings: OpenAI's names, temperature 0 greedy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None  # vLLM's, SGLang's and llama.cpp's extension (and codelm's)
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    truncate_prompt_tokens: int | None = None  # vLLM's (and codelm's): the prompt's last N kept


def is_endpoint(spec: str) -> bool:
    """Whether a model spec names an endpoint rather than a model directory."""
    return PREFIX in spec.partition("=")[2] or spec.startswith(PREFIX)


def parse_endpoint(spec: str) -> Endpoint:
    """``[LABEL=]openai:URL[#MODEL]`` as an Endpoint (label default: the model name, else the
    URL's host and port)."""
    label, _, rest = spec.partition("=") if not spec.startswith(PREFIX) else ("", "", spec)
    url, _, model = rest[len(PREFIX):].partition("#")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--models {spec!r}: an endpoint is openai:http://HOST:PORT/v1"
                         "[#MODEL]")
    url = url.rstrip("/")
    return Endpoint(label or model or url.split("//", 1)[1].split("/", 1)[0], url, model or None)


def _request(url: str, body: dict | None = None) -> dict:
    """The endpoint's JSON answer at ``url`` (a GET, or a POST of ``body``); a ValueError naming
    the URL where it cannot be reached, answers late, with an HTTP error, with a broken or
    non-JSON reply, or with an error object in place of an answer."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get(API_KEY_VARIABLE):
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            raw = reply.read()
    except urllib.error.HTTPError as e:
        detail = _error_message(e.read())
        if e.code == 401:
            detail += f" (the key is read from ${API_KEY_VARIABLE})"
        raise ValueError(f"{url}: HTTP {e.code}: {detail}") from None
    except TimeoutError:  # connected, then no reply in time
        raise ValueError(f"{url}: no reply within {TIMEOUT_S:g} s (ask for fewer samples or "
                         "tokens: --num-samples, --max-new-tokens)") from None
    except http.client.HTTPException as e:
        raise ValueError(f"{url}: a broken reply ({e!r})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"{url}: cannot reach the endpoint ({reason})") from None
    try:
        answer = json.loads(raw)
    except ValueError:
        raise ValueError(f"{url}: the reply is not JSON ({raw[:80]!r})") from None
    if not isinstance(answer, dict):
        raise ValueError(f"{url}: the reply is not a JSON object ({raw[:80]!r})")
    if "error" in answer:
        raise ValueError(f"{url}: the endpoint answered with an error: {_error_message(raw)}")
    return answer


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}, or vLLM's
    {"message": ...}), else the body's text."""
    text = raw.decode("utf-8", "replace")
    try:
        answer = json.loads(text)
    except ValueError:
        return text
    error = answer.get("error", answer) if isinstance(answer, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error) if isinstance(error, str) and error else text


class EndpointModel(NamedTuple):
    """The model an endpoint is asked for, its context where the endpoint lists it (vLLM's and
    codelm's ``max_model_len``), and what it says of the weights behind the name (codelm's
    ``codelm_weights`` fingerprint, vLLM's ``root``: the checkpoint served)."""

    name: str
    context: int | None
    weights: str | None = None


def endpoint_model(endpoint: Endpoint) -> EndpointModel:
    """The endpoint's model: its own (``#MODEL``), else the first it lists; its context where
    the listing gives it (an endpoint that lists none, named ``#MODEL``: unknown)."""
    try:
        listed = _request(f"{endpoint.url}/models").get("data") or []
    except ValueError:
        if endpoint.model is None:
            raise
        return EndpointModel(endpoint.model, None)
    if endpoint.model is None and not listed:
        raise ValueError(f"{endpoint.url}/models lists no model: name one as URL#MODEL")
    name = endpoint.model or listed[0]["id"]
    entry = next((m for m in listed if m.get("id") == name), {})
    context = entry.get("max_model_len")
    known = isinstance(context, int) and not isinstance(context, bool) and context > 0
    weights = entry.get("codelm_weights", entry.get("root"))
    return EndpointModel(name, context if known else None,
                         weights if isinstance(weights, str) else None)


def model_name(endpoint: Endpoint) -> str:
    """The model the endpoint is asked for: its own, else the first it lists."""
    if endpoint.model is not None:
        return endpoint.model
    return endpoint_model(endpoint).name


def complete(endpoint: Endpoint, model: str, prompt: str, sampling: Sampling,
             chat: bool = False) -> list[str]:
    """``sampling.n`` completions of ``prompt`` (the text after it), in the endpoint's order,
    asked MAX_CHOICES at a time (each request's seed the first of its choices'); ``chat``: the
    answers to ``prompt`` as a user's message (/v1/chat/completions)."""
    texts: list[str] = []
    for first in range(0, sampling.n, MAX_CHOICES):
        seed = None if sampling.seed is None else (sampling.seed + first) % 2**64
        texts += _complete_once(endpoint, model, prompt, replace(
            sampling, n=min(MAX_CHOICES, sampling.n - first), seed=seed), chat)
    return texts


def _complete_once(endpoint: Endpoint, model: str, prompt: str, sampling: Sampling,
                   chat: bool) -> list[str]:
    body = {"model": model, "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature, "n": sampling.n}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if sampling.top_p is not None:
        body["top_p"] = sampling.top_p
    if sampling.top_k is not None:
        body["top_k"] = sampling.top_k
    if sampling.seed is not None:  # signed 64 bits, as vLLM takes it (the same torch stream)
        body["seed"] = sampling.seed - 2**64 if sampling.seed >= 2**63 else sampling.seed
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.truncate_prompt_tokens is not None:
        body["truncate_prompt_tokens"] = sampling.truncate_prompt_tokens
    path = "/chat/completions" if chat else "/completions"
    choices = _request(f"{endpoint.url}{path}", body).get("choices") or []
    if len(choices) != sampling.n:
        raise ValueError(f"{endpoint.url}{path} gave {len(choices)} choices, asked for "
                         f"{sampling.n}")
    ordered = sorted(choices, key=lambda c: c.get("index", 0))
    if chat:  # a refusal or a tool call answers no content: an empty answer
        return [(c.get("message") or {}).get("content") or "" for c in ordered]
    return [c["text"] for c in ordered]
