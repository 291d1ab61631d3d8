"""An HTTP client for the GitHub REST API that honours rate limits and retries transient failures.
The token travels only in the ``Authorization`` header, never in a URL, log line or message, and
only to the API's host and GitHub's raw host (``--raw-url`` may name any other)."""

from __future__ import annotations

import email.utils
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import requests

from scraping.common import redact_url

log = logging.getLogger("scraping")

# Statuses worth another try after a pause (GitHub's 5xx are usually transient).
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
# GitHub asks clients to wait at least a minute after a secondary rate limit with no header.
_SECONDARY_LIMIT_WAIT = 60.0
# The hosts besides the API's that the token goes to (private repositories' raw files).
_TOKEN_HOSTS = frozenset({"raw.githubusercontent.com"})


def connection_problem(exc: BaseException) -> str:
    """A failed connection as its innermost cause tells it: a host that does not resolve or
    refuses the connection named as such (the machine's network, DNS or proxy to check)."""
    cause = exc
    while (inner := cause.__cause__ or cause.__context__) is not None:
        cause = inner
    name = type(exc).__name__
    if isinstance(cause, socket.gaierror):
        return f"{name}: the host name does not resolve (no network, or no DNS?)"
    if isinstance(cause, ConnectionRefusedError):
        return f"{name}: the host refused the connection (a proxy or firewall?)"
    return name if cause is exc else f"{name}: {type(cause).__name__}"

class GitHubError(RuntimeError):
    """A request that kept failing after every retry, or that GitHub refused for good."""


class ServerError(GitHubError):
    """Retries spent on 5xx answers or dropped connections: this request failed, not the next."""


class GitHubClient:
    """GET with rate-limit waits, exponential backoff with jitter, and bounded retries
    (``sleep``, ``clock`` and ``rng`` injectable)."""

    def __init__(self, api_url: str = "https://api.github.com", token: str | None = None, *,
                 retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0,
                 max_wait: float = 3600.0, timeout: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None):
        if retries < 0 or backoff < 0:
            raise ValueError("--retries and --backoff must be >= 0")
        self.api_url = api_url.rstrip("/")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.max_wait, self.timeout = max_wait, timeout
        token = (token or "").strip()
        if any(not 33 <= ord(c) <= 126 for c in token):  # requests would quote the whole header
            raise ValueError("GITHUB_TOKEN holds spaces, control or non-ASCII characters inside "
                             "it (not shown here); set it to the token alone")
        self._token = token or None
        self._sleep, self._clock = sleep, clock
        self._rng = rng or random.Random()
        self._blocked_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    def _session(self) -> requests.Session:
        # One session per thread: connection pools are not shared across download workers.
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = "codelm-scraper"
            session.headers["X-GitHub-Api-Version"] = "2022-11-28"
            self._local.session = session
        return session

    def _headers(self, url: str, accept: str) -> dict[str, str]:
        """A request's headers: the token only for the API's host (a GitHub Enterprise server
        serves raw files there too) and GitHub's raw host over https; another --raw-url host
        is a mirror that has no business with it."""
        headers = {"Accept": accept}
        parts, api = urlsplit(url), urlsplit(self.api_url)
        to_github = ((parts.scheme, parts.netloc) == (api.scheme, api.netloc)
                     or parts.scheme == "https" and parts.hostname in _TOKEN_HOSTS)
        if self._token and to_github:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _resource(self, url: str) -> str:
        """The rate-limit bucket a URL draws from (search has its own, smaller one)."""
        if not url.startswith(self.api_url):
            return "raw"
        return "search" if "/search/" in urlsplit(url).path else "core"

    def _backoff_delay(self, attempt: int) -> float:
        ceiling = min(self.max_backoff, self.backoff * 2**attempt)
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def pause(self, attempt: int) -> None:
        """Wait the backoff of retry ``attempt`` (0: the first) of a request whose final answer
        the caller judges transient (a 404 of something listed at a commit), as for a 5xx."""
        self._sleep(self._backoff_delay(attempt))

    def _wait_for(self, resource: str) -> None:
        with self._lock:
            until = self._blocked_until.get(resource, 0.0)
        delay = until - self._clock()
        if delay <= 0:
            return
        if delay > self.max_wait:
            raise GitHubError(
                f"rate limit for '{resource}' resets in {delay:.0f} s, more than --max-wait "
                f"{self.max_wait:.0f} s; progress is saved, re-run later to continue")
        log.warning("rate limited (%s): waiting %.0f s", resource, delay)
        self._sleep(delay)

    def _block(self, resource: str, until: float) -> None:
        with self._lock:
            self._blocked_until[resource] = max(self._blocked_until.get(resource, 0.0), until)

    def _clock_ahead(self, resp: requests.Response) -> float:
        """How far this machine's clock is ahead of GitHub's, by the response's ``Date`` (0
        without one)."""
        try:
            sent = email.utils.parsedate_to_datetime(resp.headers.get("Date", "")).timestamp()
        except (TypeError, ValueError):
            return 0.0
        return self._clock() - sent

    def _retry_delay(self, resource: str, resp: requests.Response, attempt: int) -> float | None:
        """Seconds to pause before retrying, or None when the response is final. A wait GitHub
        asks for is recorded for every thread: ``_wait_for`` waits it before the next request."""
        headers, status = resp.headers, resp.status_code
        reset, retry_after = headers.get("x-ratelimit-reset", ""), headers.get("retry-after", "")
        spent = headers.get("x-ratelimit-remaining") == "0" and reset.isdigit()
        if spent:  # the reset is on GitHub's clock: on this one, as far from now
            self._block(resource, int(reset) + 1 + self._clock_ahead(resp))  # +1: whole seconds
        if status == 401:
            raise GitHubError(
                f"GitHub refused the credentials (HTTP 401) for {resp.url}: "
                "check that GITHUB_TOKEN is valid")
        if status in (403, 429) and retry_after.isdigit():
            self._block(resource, self._clock() + int(retry_after))
            return 0.0
        if status in (403, 429) and spent:
            # A refusal at or after its own reset (the clocks disagree): waiting for the reset
            # would not pause at all, so back off instead of retrying in a burst.
            ahead = self._clock_ahead(resp)
            return 0.0 if int(reset) + 1 + ahead > self._clock() else self._backoff_delay(attempt)
        if status == 429 or (status == 403 and "rate limit" in resp.text.lower()):
            # A secondary limit without a time: GitHub asks for a minute at least, of every
            # thread (a request sent meanwhile is refused again), within --max-wait.
            wait = max(_SECONDARY_LIMIT_WAIT, self._backoff_delay(attempt))
            self._block(resource, self._clock() + wait)
            return 0.0
        if status in _RETRY_STATUSES:
            return self._backoff_delay(attempt)
        return None

    def get(self, url: str, *, params: dict | None = None,
            accept: str = "application/vnd.github+json") -> requests.Response:
        """GET ``url`` (absolute, or a path under the API URL): the final response (404, 409, 422
        are the caller's to judge), or GitHubError once retries are spent."""
        if url.startswith("/"):
            url = self.api_url + url
        resource = self._resource(url)
        problem, server_failed = "", False
        for attempt in range(self.retries + 1):
            self._wait_for(resource)
            try:
                # Not streamed: the body is read here, so a connection dropped mid-body retries.
                resp = self._session().get(
                    url, params=params, headers=self._headers(url, accept), timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                delay, problem = self._backoff_delay(attempt), connection_problem(exc)
                server_failed = True
            else:
                delay = self._retry_delay(resource, resp, attempt)
                if delay is None:
                    return resp
                problem = f"HTTP {resp.status_code}"
                server_failed = resp.status_code in _RETRY_STATUSES
            if delay > 0 and attempt < self.retries:
                log.warning("GET %s: %s; retrying in %.1f s", redact_url(url), problem, delay)
                self._sleep(delay)
        raise (ServerError if server_failed else GitHubError)(
            f"GET {redact_url(url)} failed {self.retries + 1} times (last: {problem}); "
            "progress is saved, re-run to continue")

    def get_reply(self, url: str, *, params: dict | None = None,
                  valid: Callable[[object], bool] = lambda data: True
                  ) -> tuple[object, requests.Response]:
        """GET ``url``: (its JSON body, the response) for a 200, (None, the response) for another
        final status. A 200 whose body is not JSON, or not ``valid`` (a proxy's page), is a
        ServerError naming the URL."""
        resp = self.get(url, params=params)
        if resp.status_code != 200:
            return None, resp
        try:
            data = resp.json()
        except ValueError:
            problem = "a body that is not JSON"
        else:
            if valid(data):
                return data, resp
            problem = "a JSON body of another shape than GitHub's"
        raise ServerError(f"GET {redact_url(resp.url)} gave {problem}; progress is saved, "
                          "re-run to continue")

    def get_json(self, url: str, *, params: dict | None = None,
                 valid: Callable[[object], bool] = lambda data: True
                 ) -> tuple[object, requests.Response]:
        """``get_reply`` where any status but 200 is a GitHubError naming the URL."""
        data, resp = self.get_reply(url, params=params, valid=valid)
        if resp.status_code == 200:
            return data, resp
        raise GitHubError(f"GET {redact_url(resp.url)}: HTTP {resp.status_code}: "
                          f"{resp.text[:300]}")
