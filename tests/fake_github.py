"""A fake GitHub REST API on 127.0.0.1, served by a real HTTP server in a thread.

It speaks the parts of the API the scraper uses (repository search with ``link`` pagination and
the 1,000-result cap, branches, git trees with truncation, blobs, a raw file host) and can inject
the failures GitHub produces: rate-limit 403s, 429s, 5xx, dropped connections, refusals (404,
403, 410) of what exists, blocked repositories.

``fake_corpus()`` builds repositories from real standard-library source, and
``write_fake_scrape(path)`` runs the scraper against it, so other tests (e.g. training on scraped
data) can get a realistic scraper JSONL with one call.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from datetime import time as dtime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit


def blob_sha(data: bytes) -> str:
    """Git's blob id, computed here independently of the scraper."""
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


@dataclass
class FakeRepo:
    full_name: str
    stars: int
    created: str  # ISO date
    files: dict[str, bytes] = field(default_factory=dict)
    license: str | None = "MIT"
    language: str = "Python"
    default_branch: str = "main"
    symlinks: dict[str, str] = field(default_factory=dict)  # path -> target
    submodules: list[str] = field(default_factory=list)
    truncated_dirs: set[str] = field(default_factory=set)  # dirs whose recursive listing is cut
    empty: bool = False
    blocked: int | None = None  # 451 (legal) or 403 (terms): GitHub's answer to any API request

    @property
    def commit(self) -> str:
        return hashlib.sha1(f"commit {self.full_name}".encode()).hexdigest()

    def tree_sha(self, directory: str) -> str:
        return hashlib.sha1(f"tree {self.full_name} {directory}".encode()).hexdigest()


def _plain(path: str) -> bool:
    return all(p not in ("", ".", "..") for p in path.split("/"))


class FakeGitHub:
    """Serve ``repos``; ``faults`` is a list of (path substring, kind), each used once, in order.

    Fault kinds: ``403_reset`` (primary rate limit with x-ratelimit-reset), ``429`` (retry-after),
    ``secondary_403`` (secondary limit with retry-after), ``secondary_403_bare`` (a secondary
    limit with no retry-after and quota left: nothing says how long to wait), ``500``,
    ``drop`` (connection closed before any response), ``drop_body`` (closed half-way through the
    body), ``remaining_0`` (a normal answer that says the quota is spent until one second from
    now), ``altered`` (a file's bytes, raw or by blob, with a line added: not the blob its SHA
    names, as a broken proxy or cache serves it), ``404``, ``403``, ``410`` (a refusal of
    something that exists: a replica or cache behind; the 403 is no rate limit).

    ``star_changes`` is a list of (request substring, repo, stars), each applied once, in order,
    when a request whose path and query contain the substring arrives (before it is answered):
    popular repos gain stars during a scrape. ``clock`` is the server's time (reset stamps and
    the ``Date`` header), so a test can run it apart from the client's; ``send_date=False``
    leaves the ``Date`` header out.
    """

    def __init__(self, repos: list[FakeRepo], *, token: str | None = None,
                 faults: list[tuple[str, str]] | None = None, max_per_page: int = 100,
                 search_cap: int = 1000, delay: float = 0.0,
                 star_changes: list[tuple[str, str, int]] | None = None,
                 clock: Callable[[], float] = time.time, send_date: bool = True):
        self.repos = {r.full_name: r for r in repos}
        self.token, self.max_per_page, self.search_cap, self.delay = (
            token, max_per_page, search_cap, delay)
        self.faults = list(faults or [])
        self.star_changes = list(star_changes or [])
        self.clock, self.send_date = clock, send_date
        self.requests: list[str] = []  # every request's path and query, in arrival order
        self.auth_seen: set[str | None] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.api_url, self.raw_url = base + "/api/v3", base + "/raw"

    def __enter__(self) -> FakeGitHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _take_fault(self, path: str) -> str | None:
        with self._lock:
            for i, (needle, kind) in enumerate(self.faults):
                if needle in path:
                    del self.faults[i]
                    return kind
        return None

    def _change_stars(self, request: str) -> None:
        with self._lock:
            for i, (needle, name, stars) in enumerate(self.star_changes):
                if needle in request:
                    del self.star_changes[i]
                    self.repos[name].stars = stars
                    return

    def _handler_class(self) -> type:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out at once, no 40 ms stalls

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def date_time_string(self, timestamp: float | None = None) -> str:
                return super().date_time_string(fake.clock() if timestamp is None else timestamp)

            def send_header(self, keyword: str, value: str) -> None:
                if fake.send_date or keyword.lower() != "date":
                    super().send_header(keyword, value)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                fake._handle(self)

        return Handler

    # --- responses -----------------------------------------------------------------------------
    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h, status: int, obj, headers: dict | None = None) -> None:
        limits = {"x-ratelimit-limit": 5000, "x-ratelimit-remaining": 4999,
                  "x-ratelimit-reset": int(self.clock()) + 3600}
        extra = getattr(h, "extra_headers", {})
        self._send(h, status, json.dumps(obj).encode(), {**limits, **extra, **(headers or {})})

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        with self._lock:
            self.requests.append(h.path)
            self.auth_seen.add(h.headers.get("Authorization"))
        self._change_stars(h.path)
        if self.delay:
            time.sleep(self.delay)
        fault = self._take_fault(url.path)
        h.extra_headers = {}
        h.altered = fault == "altered"  # a handler serves every request of its connection
        h.truncated = fault == "truncated"
        if fault == "remaining_0":
            h.extra_headers = {"x-ratelimit-remaining": 0,
                               "x-ratelimit-reset": int(self.clock()) + 1}
        elif fault and fault not in ("altered", "truncated"):
            return self._inject(h, fault)
        if self.token and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._json(h, 401, {"message": "Bad credentials"})
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path.startswith("/raw/"):
            return self._raw(h, url.path[len("/raw/"):])
        path = url.path[len("/api/v3"):] if url.path.startswith("/api/v3/") else None
        if path == "/search/repositories":
            return self._search(h, query)
        parts = (path or "").split("/")
        if len(parts) >= 5 and parts[1] == "repos":
            repo = self.repos.get(f"{parts[2]}/{parts[3]}")
            rest = parts[4:]
            if repo is not None and repo.blocked:
                return self._json(h, repo.blocked, {
                    "message": "Repository access blocked",
                    "block": {"reason": "dmca" if repo.blocked == 451 else "tos"}})
            if repo is not None and rest[0] == "branches" and len(rest) == 2:
                return self._branch(h, repo, unquote(rest[1]))
            if repo is not None and rest[:2] == ["git", "trees"] and len(rest) == 3:
                return self._tree(h, repo, rest[2], query.get("recursive") == "1")
            if repo is not None and rest[:2] == ["git", "blobs"] and len(rest) == 3:
                return self._blob(h, repo, rest[2])
        self._json(h, 404, {"message": "Not Found"})

    def _inject(self, h: BaseHTTPRequestHandler, kind: str) -> None:
        now = int(self.clock())
        if kind == "403_reset":
            self._json(h, 403, {"message": "API rate limit exceeded"},
                       {"x-ratelimit-remaining": 0, "x-ratelimit-reset": now + 1})
        elif kind == "429":
            self._json(h, 429, {"message": "Too many requests"}, {"retry-after": 1})
        elif kind == "secondary_403":
            self._json(h, 403, {"message": "You have exceeded a secondary rate limit."},
                       {"retry-after": 1})
        elif kind == "secondary_403_bare":
            self._json(h, 403, {"message": "You have exceeded a secondary rate limit."})
        elif kind == "500":
            self._json(h, 500, {"message": "Server Error"})
        elif kind == "drop":
            h.close_connection = True
        elif kind == "drop_body":
            h.send_response(200)
            h.send_header("Content-Length", "100000")
            h.end_headers()
            h.wfile.write(b"x" * 100)
            h.wfile.flush()
            h.close_connection = True
        elif kind in _REFUSALS:
            self._refuse(h, int(kind))
        elif kind.startswith("body:"):  # a 200 whose body is this text (malformed JSON too)
            self._send(h, 200, kind[len("body:"):].encode())
        else:
            raise ValueError(f"unknown fault {kind!r}")

    def _refuse(self, h, status: int) -> None:
        """GitHub's refusal: plain text from the raw host, JSON from the API."""
        if urlsplit(h.path).path.startswith("/raw/"):
            return self._send(h, status, f"{status}: {_REFUSALS[str(status)]}".encode(),
                              content_type="text/plain")
        self._json(h, status, {"message": _REFUSALS[str(status)]})

    def _search(self, h, query: dict) -> None:
        min_stars, language, lo, hi = None, None, None, None
        for term in shlex.split(query.get("q", "")):  # language:"Jupyter Notebook" is one term
            key, _, value = term.partition(":")
            if key == "stars" and value.startswith(">"):
                min_stars = int(value[1:])
            elif key == "language":
                language = value.lower()
            elif key in ("created", "pushed"):
                lo, hi = (_parse_time(v, end=i == 1) for i, v in enumerate(value.split("..")))
            else:
                return self._json(h, 422, {"message": f"unsupported qualifier {term}"})

        def matches(r: FakeRepo) -> bool:
            return ((min_stars is None or r.stars > min_stars)
                    and (language is None or r.language.lower() == language)
                    and (lo is None or lo <= _parse_time(r.created) <= hi))

        hits = sorted(filter(matches, self.repos.values()), key=lambda r: (-r.stars, r.full_name))
        per_page = min(int(query.get("per_page", 30)), self.max_per_page)
        page = int(query.get("page", 1))
        reachable = hits[: self.search_cap]
        if (page - 1) * per_page >= self.search_cap:
            return self._json(h, 422, {"message": "Only the first 1000 search results are "
                                                  "available"})
        items = [self._item(r) for r in reachable[(page - 1) * per_page: page * per_page]]
        last = max(1, -(-len(reachable) // per_page))
        base = f"{self.api_url}/search/repositories?"
        links = []
        if page < last:
            links.append(f'<{base}{urlencode({**query, "page": page + 1})}>; rel="next"')
            links.append(f'<{base}{urlencode({**query, "page": last})}>; rel="last"')
        self._json(h, 200, {"total_count": len(hits), "incomplete_results": False,
                            "items": items}, {"link": ", ".join(links)} if links else None)

    def _item(self, r: FakeRepo) -> dict:
        owner, name = r.full_name.split("/")
        return {"full_name": r.full_name, "name": name, "owner": {"login": owner},
                "stargazers_count": r.stars, "default_branch": r.default_branch,
                "language": r.language, "created_at": r.created + "T12:00:00Z",
                "license": {"spdx_id": r.license, "key": r.license.lower()} if r.license else None}

    def _branch(self, h, repo: FakeRepo, branch: str) -> None:
        if repo.empty or branch != repo.default_branch:
            return self._json(h, 404, {"message": "Branch not found"})
        self._json(h, 200, {"name": branch, "commit": {"sha": repo.commit}})

    def _entries(self, repo: FakeRepo, directory: str, recursive: bool) -> list[dict]:
        prefix = directory + "/" if directory else ""
        out, dirs = [], set()
        items = [(p, "100644", blob_sha(d), len(d)) for p, d in repo.files.items()]
        items += [(p, "120000", blob_sha(t.encode()), len(t)) for p, t in repo.symlinks.items()]
        items += [(p, "160000", repo.commit, 0) for p in repo.submodules]
        for path, mode, sha, size in items:
            if not _plain(path):  # odd paths: listed once, at the root, as GitHub sent them
                if directory == "" and recursive:
                    out.append({"path": path, "mode": mode, "type": "blob", "sha": sha,
                                "size": size})
                continue
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):].split("/")
            for depth in range(1, len(rel)):
                dirs.add("/".join(rel[:depth]))
            if len(rel) == 1 or recursive:
                kind = "commit" if mode == "160000" else "blob"
                entry = {"path": "/".join(rel), "mode": mode, "type": kind, "sha": sha}
                if kind == "blob":
                    entry["size"] = size
                out.append(entry)
        for d in sorted(dirs):
            if recursive or "/" not in d:
                out.append({"path": d, "mode": "040000", "type": "tree",
                            "sha": repo.tree_sha(prefix + d)})
        return sorted(out, key=lambda e: e["path"])

    def _tree(self, h, repo: FakeRepo, sha: str, recursive: bool) -> None:
        if repo.empty:
            return self._json(h, 409, {"message": "Git Repository is empty."})
        dirs = {repo.tree_sha(""): ""}
        for p in [*repo.files, *repo.symlinks, *repo.submodules]:
            parts = p.split("/")
            for depth in range(1, len(parts)):
                dirs[repo.tree_sha("/".join(parts[:depth]))] = "/".join(parts[:depth])
        directory = "" if sha in (repo.commit, repo.default_branch) else dirs.get(sha)
        if directory is None:
            return self._json(h, 404, {"message": "Not Found"})
        entries = self._entries(repo, directory, recursive)
        truncated = recursive and directory in repo.truncated_dirs
        if truncated:
            entries = entries[:2]
        self._json(h, 200, {"sha": repo.tree_sha(directory), "tree": entries,
                            "truncated": truncated})

    def _blob(self, h, repo: FakeRepo, sha: str) -> None:
        data = next((d for d in repo.files.values() if blob_sha(d) == sha), None)
        if data is None:
            return self._json(h, 404, {"message": "Not Found"})
        data = _served(h, data)
        if "raw" in (h.headers.get("Accept") or ""):
            return self._send(h, 200, data, content_type="application/octet-stream")
        self._json(h, 200, {"sha": sha, "size": len(data), "encoding": "base64",
                            "content": base64.b64encode(data).decode()})

    def _raw(self, h, rest: str) -> None:
        owner, name, commit, *path = rest.split("/")
        repo = self.repos.get(f"{owner}/{name}")
        data = repo.files.get(unquote("/".join(path))) if repo and commit == repo.commit else None
        if data is None:
            return self._send(h, 404, b"404: Not Found", content_type="text/plain")
        self._send(h, 200, _served(h, data), content_type="text/plain; charset=utf-8")


# The refusals a fault can inject, with GitHub's message for each.
_REFUSALS = {"403": "Forbidden", "404": "Not Found", "409": "Conflict", "410": "Gone"}


def _served(h: BaseHTTPRequestHandler, data: bytes) -> bytes:
    """The bytes a file request gets: the file's, with the ``altered`` fault one line more, with
    the ``truncated`` fault its first half (a whole reply of that length)."""
    if h.altered:
        return data + b"# altered in transit\n"
    if h.truncated:
        return data[: len(data) // 2]
    return data


def _parse_time(text: str, end: bool = False) -> datetime:
    if len(text) == 10:  # a bare date covers the whole day
        return datetime.combine(date.fromisoformat(text), dtime.max if end else dtime.min,
                                tzinfo=timezone.utc).replace(microsecond=0)
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- a corpus of real code ---------------------------------------------------------------------
def _stdlib_sources(package: str, limit: int) -> list[tuple[str, bytes]]:
    """Up to ``limit`` files of a stdlib package that fit the scraper's default 1-100 KB."""
    root = Path(sysconfig.get_paths()["stdlib"]) / package
    out = []
    for p in sorted(root.glob("*.py")):
        data = p.read_bytes()
        if 1_000 <= len(data) <= 100_000:
            out.append((p.name, data))
    return out[:limit]


def fake_corpus() -> tuple[list[FakeRepo], set[tuple[str, str]]]:
    """Repositories covering every filter, and the (repo, path) set a default scrape must keep.

    The expected set is written down as the corpus is built (by intent, not by running the
    scraper's filters). Dates and stars are chosen against the default query: stars > 100,
    language Python, created since 2015-01-01.
    """
    expected: set[tuple[str, str]] = set()
    used: set[bytes] = set()

    def keep(repo: FakeRepo, path: str, data: bytes) -> None:
        assert data not in used, path
        used.add(data)
        repo.files[path] = data
        expected.add((repo.full_name, path))

    alpha = FakeRepo("alpha/jsonish", 5000, "2016-03-01", license="MIT")
    for name, data in _stdlib_sources("json", 10):
        keep(alpha, f"jsonish/{name}", data)
    alpha.files.update({
        "README.md": b"# jsonish\n" * 200,  # wrong extension
        "tiny.py": b"x = 1\n",  # under 1 KB
        "big.py": b"# padding\n" * 15_000,  # over 100 KB
        "latin1.py": "# caf\xe9\n".encode("latin-1") * 300,  # not UTF-8
        "blob.py": b"\0\x01binary" * 300,  # NUL bytes
    })
    alpha.symlinks["link.py"] = "jsonish/decoder.py"
    alpha.submodules.append("vendor/lib")

    beta = FakeRepo("beta/webkit", 900, "2018-07-15", license="Apache-2.0",
                    truncated_dirs={"", "webkit"})
    for name, data in _stdlib_sources("http", 10):
        keep(beta, f"webkit/http/{name}", data)
    for name, data in _stdlib_sources("urllib", 3):
        keep(beta, f"webkit/{name}", data)

    gamma = FakeRepo("gamma/mailer", 300, "2020-01-10", license="GPL-3.0")
    for name, data in _stdlib_sources("email", 6):
        keep(gamma, f"mailer/{name}", data)
    gamma.files["vendored/decoder.py"] = alpha.files["jsonish/decoder.py"]  # same blob SHA

    delta = FakeRepo("delta/evil", 150, "2021-05-05", license=None)
    evil = _stdlib_sources("logging", 3)
    keep(delta, "../../x.py", evil[0][1])  # traversal and absolute paths: data, never a file path
    keep(delta, "/tmp/codelm_fake_github_abs.py", evil[1][1])
    keep(delta, "ok.py", evil[2][1])

    filler = []
    sources = _stdlib_sources("importlib", 12) + _stdlib_sources("concurrent/futures", 3)
    for i in range(6):
        repo = FakeRepo(f"fill/repo{i}", 120 + i, f"20{17 + i}-0{1 + i}-1{i}",
                        license="BSD-3-Clause")
        for name, data in sources[2 * i: 2 * i + 2]:
            keep(repo, f"src/{name}", data)
        filler.append(repo)

    excluded = [
        FakeRepo("epsilon/empty", 200, "2022-02-02", empty=True),
        FakeRepo("zeta/old", 1000, "2014-06-01", files={"a.py": b"# old\n" * 300}),
        FakeRepo("eta/unpopular", 50, "2019-09-09", files={"a.py": b"# few\n" * 300}),
        FakeRepo("theta/ruby", 700, "2019-03-03", language="Ruby",
                 files={"a.py": b"# rb\n" * 300}),
    ]
    return [alpha, beta, gamma, delta, *filler, *excluded], expected


# Every failure the acceptance list names, each hit once during a default scrape of fake_corpus.
DEFAULT_FAULTS = [
    ("/search/repositories", "403_reset"),
    ("/search/repositories", "429"),
    ("/branches/", "secondary_403"),
    ("/git/trees/", "500"),
    ("/raw/alpha/", "drop"),
    ("/raw/beta/", "drop_body"),
    ("/git/blobs/", "500"),
    ("/repos/gamma/mailer/branches/", "404"),
    ("/repos/fill/repo0/git/trees/", "410"),
    ("/raw/gamma/", "403"),
    ("/git/blobs/", "404"),
]


def write_fake_scrape(out: Path, *, faults: list[tuple[str, str]] | None = None,
                      **config) -> FakeGitHub:
    """Scrape ``fake_corpus()`` from a fake GitHub into ``out`` (JSONL) without real waiting.

    Returns the (stopped) server, whose ``requests`` log tests may inspect.
    """
    from scraping import GitHubClient, GitHubConfig, scrape_github

    repos, _ = fake_corpus()
    with FakeGitHub(repos, faults=DEFAULT_FAULTS if faults is None else faults,
                    max_per_page=3) as fake:
        cfg = GitHubConfig(out=str(out), api_url=fake.api_url, raw_url=fake.raw_url,
                           until="2026-01-01", progress=False, **config)
        client = GitHubClient(fake.api_url, retries=4, sleep=lambda s: None)
        scrape_github(cfg, client)
    return fake


def main() -> None:
    """``python tests/fake_github.py OUT.jsonl``: write the fake scrape, e.g. to train on it."""
    import sys

    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python tests/fake_github.py OUT.jsonl")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    write_fake_scrape(Path(sys.argv[1]))
    print(f"wrote {sys.argv[1]}")


if __name__ == "__main__":
    main()
