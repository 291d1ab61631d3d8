"""Scrape source files from GitHub: search repositories, list their trees, download the files."""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from urllib.parse import quote, urlsplit

import requests

from codelm.runtime.console import progress_bar
from scraping.client import GitHubClient, GitHubError, ServerError
from scraping.common import (
    EXCLUDED_DIRS,
    FileFilter,
    ResumableOutput,
    Summary,
    decode_source,
    expand_licenses,
    git_blob_sha,
    license_allowed,
    make_record,
    output_paths,
)

log = logging.getLogger("scraping")

# GitHub search returns at most this many results per query, whatever the total_count says.
SEARCH_CAP = 1000
# A repo GitHub fails to serve is not saved (the next run retries it); this many in a row failing
# with 5xx or dropped connections (not refusals: those are answers) stop the run.
SERVER_ERROR = "server_error"
# A repo whose branch, tree or file GitHub kept refusing (4xx) is not saved either.
UNAVAILABLE = "unavailable"
SLICE_READS = 3  # reads of a search slice that comes back short of its total
# Downloads of a file (refused, or bytes that miss its blob SHA) before its repository is left
# for the next run.
DOWNLOAD_ATTEMPTS = 3
# Requests for a branch or a tree GitHub refuses before its repository is left for the next run.
LISTING_ATTEMPTS = 3
# Refused files a repository's message names; the rest are counted.
_NAMED_FILES = 5
_FAILED_IN_A_ROW = 5
DEFAULT_API_URL = "https://api.github.com"
DEFAULT_RAW_URL = "https://raw.githubusercontent.com"


@dataclass
class GitHubConfig:
    out: str  # output JSONL file
    state: str | None = None  # resume state file (default: OUT.state)
    language: str | None = "python"  # language qualifier ('' for any)
    min_stars: int = 100  # keep repos with more stars than this
    since: str = "2015-01-01"  # first date (YYYY-MM-DD)
    until: str | None = None  # last date, inclusive (default: today, fixed at start)
    date_field: str = field(default="created", metadata={"choices": ("created", "pushed")})
    #   date qualifier to range over
    extra_query: str = ""  # more search qualifiers, e.g. 'topic:web archived:false'
    extensions: list[str] = field(default_factory=lambda: [".py"])  # file extensions to keep
    min_bytes: int = 1_000  # smallest file kept, in bytes
    max_bytes: int = 100_000  # largest file kept, in bytes
    licenses: list[str] | None = field(default=None, metadata={"none_is_a_value": True})
    #   SPDX licence ids to accept, as GitHub reports them ('permissive' = MIT, Apache-2.0, BSD,
    #   ...; 'none' = repos GitHub detects no licence in); default: any
    max_repos: int | None = None  # stop after this many finished repos, over all runs
    api_url: str = DEFAULT_API_URL  # REST API root (GitHub Enterprise: https://HOST/api/v3)
    raw_url: str | None = None  # raw file host (default: raw.githubusercontent.com for
    #   github.com; the blob API otherwise)
    workers: int = 8  # parallel file downloads
    retries: int = 6  # retries per request
    backoff: float = 1.0  # first backoff pause in seconds (doubles, with jitter)
    max_wait: float = 3600.0  # longest rate-limit wait in seconds (then stop, resumably)
    timeout: float = 30.0  # HTTP timeout in seconds
    progress: bool = True  # show progress bars


class NotServed(GitHubError):
    """GitHub kept refusing (4xx) a branch, tree or file listed at a repository's commit: that
    repository is left for the next run, not the ones after it."""


@dataclass(frozen=True, order=True)
class TreeFile:  # ordered by path: paths are unique in a tree
    path: str
    sha: str
    size: int
    mode: str


def _parse_day(text: str, flag: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--{flag} {text!r}: expected a date like 2015-01-01") from None


def _check_url(url: str, flag: str, example: str) -> None:
    """Refuse anything but an http(s) URL with a host (and a numeric port) before any output."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (
            parts.port is None or parts.port > 0)
    except ValueError:  # e.g. a port that is not a number, an unclosed [IPv6 address
        ok = False
    if not ok:
        raise ValueError(f"{flag} {url!r}: expected an http(s) URL with a host, e.g. {example}")


def build_query(cfg: GitHubConfig) -> str:
    """The search qualifiers shared by every date slice."""
    parts = [f"stars:>{cfg.min_stars}"]
    if cfg.language:  # "Jupyter Notebook" is one value only in quotes
        language = f'"{cfg.language}"' if any(c.isspace() for c in cfg.language) else cfg.language
        parts.append(f"language:{language}")
    if cfg.extra_query.strip():
        parts.append(cfg.extra_query.strip())
    return " ".join(parts)


# The shape of each reply the scraper reads: another one (a server bug, a proxy's page) is
# retried, then that repository is left for the next run.
def _holds(data, **types: type) -> bool:
    return isinstance(data, dict) and all(isinstance(data.get(k), t) for k, t in types.items())


def _is_search_page(data) -> bool:
    return _holds(data, total_count=int, items=list) and all(
        _holds(i, full_name=str) for i in data["items"])


def _is_branch(data) -> bool:
    return _holds(data, commit=dict) and _holds(data["commit"], sha=str)


def _is_tree(data) -> bool:
    return _holds(data, sha=str, tree=list) and all(
        _holds(e, path=str, sha=str) and isinstance(e.get("size", 0), int) for e in data["tree"])


def _blocked(resp: requests.Response) -> bool:
    """GitHub's answer to every request of a repository it blocks: 451 (a legal takedown), or
    403 with a ``block`` object (its terms of service)."""
    if resp.status_code == 451:
        return True
    if resp.status_code != 403:
        return False
    try:
        return _holds(resp.json(), block=dict)
    except ValueError:
        return False


def search_repositories(client: GitHubClient, query: str, date_field: str, start: datetime,
                        end: datetime, *, cap: int = SEARCH_CAP, per_page: int = 100
                        ) -> Iterator[dict]:
    """Every repository matching ``query`` with ``date_field`` in [start, end] (UTC, whole seconds):
    a slice over the search cap is halved until each half fits; each is read whole first."""
    q = f"{query} {date_field}:{start.isoformat()}..{end.isoformat()}"
    params = {"q": q, "per_page": per_page, "sort": "stars", "order": "desc"}
    data, resp = client.get_json("/search/repositories", params=params, valid=_is_search_page)
    total = data["total_count"]
    if total > cap and end > start:  # whole seconds, both ends included: two or more of them
        mid = start + timedelta(seconds=(end - start).total_seconds() // 2)
        log.info("%d results for %s..%s: splitting", total, start.isoformat(), end.isoformat())
        for lo, hi in ((start, mid), (mid + timedelta(seconds=1), end)):
            yield from search_repositories(client, query, date_field, lo, hi, cap=cap,
                                           per_page=per_page)
        return
    if data.get("incomplete_results"):
        log.warning("GitHub reported incomplete search results for %s", q)
    yield from _read_slice(client, params, data, resp, cap)


def _read_slice(client: GitHubClient, params: dict, data: dict, resp: requests.Response,
                cap: int) -> list[dict]:
    """Every repository of one search slice (at most ``cap``), deduplicated: all pages are read
    at once, as star counts shift pages while a scrape runs; a read that comes back short (a
    repo moved between pages) is read again, up to SLICE_READS reads, and one still short is
    said (the next run finds the rest)."""
    found: dict[str, dict] = {}
    wanted = min(data["total_count"], cap)
    for read in range(SLICE_READS):
        if read:
            data, resp = client.get_json("/search/repositories", params=params,
                                         valid=_is_search_page)
        for page in _slice_pages(client, data, resp):
            for item in page["items"]:
                found.setdefault(item["full_name"], item)
        if len(found) >= wanted:
            break
    else:
        log.warning("search %s: %d of %d repos read in %d reads (star counts changed while "
                    "paging); a re-run reads the rest", params["q"], len(found), wanted,
                    SLICE_READS)
    return list(found.values())


def _slice_pages(client: GitHubClient, data: dict, resp: requests.Response) -> Iterator[dict]:
    """The pages of a search result, from its first (``data``, ``resp``) on."""
    yield data
    while next_url := resp.links.get("next", {}).get("url"):
        data, resp = client.get_json(next_url, valid=_is_search_page)
        yield data


def _get_tree(client: GitHubClient, repo: str, sha: str, recursive: bool) -> dict:
    """The tree. A tree named by SHA (of a commit a branch resolved to) exists, so a refusal
    (404, 403, 409, 410, ...) is a replica behind: it is asked again after a pause, and one
    that lasts raises NotServed. A refusal never makes a repository empty, nor a sub-tree
    (``_branch_commit`` alone tells an empty repository)."""
    params = {"recursive": "1"} if recursive else None
    refused = []
    for attempt in range(LISTING_ATTEMPTS):
        if attempt:
            client.pause(attempt - 1)
        tree, resp = client.get_reply(f"/repos/{repo}/git/trees/{sha}", params=params,
                                      valid=_is_tree)
        if resp.status_code == 200:
            return tree
        refused.append(str(resp.status_code))
    raise NotServed(f"tree {sha}: HTTP {', '.join(refused)}")


def _tree_files(entries: list[dict], prefix: str) -> list[TreeFile]:
    # Not submodules (type "commit": another repository's) nor EXCLUDED_DIRS (third-party code).
    return [TreeFile(prefix + e["path"], e["sha"], int(e.get("size", 0)), e.get("mode", ""))
            for e in entries if e.get("type") == "blob"
            and EXCLUDED_DIRS.isdisjoint((prefix + e["path"]).split("/")[:-1])]


def list_repo_files(client: GitHubClient, repo: str, sha: str, prefix: str = ""
                    ) -> list[TreeFile]:
    """Every blob in the repo at commit ``sha`` (or in its sub-tree ``sha`` at ``prefix``), sorted
    by path. Level by level where GitHub truncates the listing."""
    tree = _get_tree(client, repo, sha, recursive=True)
    if not tree.get("truncated"):
        return sorted(_tree_files(tree["tree"], prefix))
    log.info("tree %s%s of %s is truncated: walking sub-trees", prefix, sha, repo)
    level = _get_tree(client, repo, tree["sha"], recursive=False)
    if level.get("truncated"):
        log.warning("tree %s%s of %s has too many entries even without recursion; "
                    "some files are missed", prefix, sha, repo)
    files = _tree_files(level["tree"], prefix)
    for entry in level["tree"]:
        if entry.get("type") == "tree" and entry["path"] not in EXCLUDED_DIRS:
            files += list_repo_files(client, repo, entry["sha"], f"{prefix}{entry['path']}/")
    return sorted(files)


def _plain_path(path: str) -> bool:
    """True for a relative path with no '.', '..' or empty segment: safe inside a raw URL."""
    return all(part not in ("", ".", "..") for part in path.split("/")) and "\\" not in path


class GitHubScraper:
    """One scraping run: search, filter, download, and commit each finished repo."""

    def __init__(self, cfg: GitHubConfig, client: GitHubClient | None = None):
        self.cfg = cfg
        self.filter = FileFilter(cfg.extensions, cfg.min_bytes, cfg.max_bytes)
        self.allowed = expand_licenses(cfg.licenses)
        if cfg.workers < 1:
            raise ValueError(f"--workers {cfg.workers}: need at least 1")
        if not (math.isfinite(cfg.timeout) and cfg.timeout > 0):  # else refused mid-run
            raise ValueError(f"--timeout {cfg.timeout}: need a finite number of seconds > 0")
        if cfg.max_repos is not None and cfg.max_repos < 1:
            raise ValueError(f"--max-repos {cfg.max_repos}: need at least 1")
        _check_url(cfg.api_url, "--api-url", DEFAULT_API_URL)
        if cfg.raw_url:  # empty: the blob API, as when left out
            _check_url(cfg.raw_url, "--raw-url", DEFAULT_RAW_URL)
        self.client = client or GitHubClient(
            cfg.api_url, os.environ.get("GITHUB_TOKEN") or None, retries=cfg.retries,
            backoff=cfg.backoff, max_wait=cfg.max_wait, timeout=cfg.timeout)
        raw = cfg.raw_url
        if raw is None and cfg.api_url.rstrip("/") == DEFAULT_API_URL:
            raw = DEFAULT_RAW_URL
        self.raw_url = raw.rstrip("/") if raw else None
        self.summary = Summary()
        self._failed_in_a_row = 0

    def _settings(self, until: str) -> dict:
        """What the output depends on; a resume must use the same."""
        keys = ("language", "min_stars", "since", "date_field", "extra_query", "min_bytes",
                "max_bytes")
        settings = {k: asdict(self.cfg)[k] for k in keys}
        settings.update(api_url=self.cfg.api_url.rstrip("/"), until=until,
                        extensions=list(self.filter.extensions),
                        licenses=sorted(self.allowed) if self.allowed is not None else None)
        return settings

    def run(self) -> Summary:
        cfg = self.cfg
        out, state = output_paths(cfg.out, cfg.state)
        previous = ResumableOutput.read_settings(state) if state.exists() else {}
        until = cfg.until or previous.get("until") or date.today().isoformat()
        start = datetime.combine(_parse_day(cfg.since, "since"), datetime.min.time(),
                                 tzinfo=timezone.utc)
        end = datetime.combine(_parse_day(until, "until"), datetime.max.time(),
                               tzinfo=timezone.utc).replace(microsecond=0)
        if end < start:
            raise ValueError(f"--since {cfg.since} is after --until {until}")
        with ResumableOutput(out, state, self._settings(until)) as store:
            return self._run(store, start, end)

    def _run(self, store: ResumableOutput, start: datetime, end: datetime) -> Summary:
        cfg = self.cfg
        if not self.client.has_token:
            log.warning("GITHUB_TOKEN is not set: GitHub allows only 60 API requests an hour "
                        "without one")
        if store.done:
            log.info("resuming: %d repos already finished", len(store.done))
        repos = search_repositories(self.client, build_query(cfg), cfg.date_field, start, end)
        seen: set[str] = set()
        with (progress_bar(desc="repos", unit="repo", enabled=cfg.progress) as bar,
              ThreadPoolExecutor(cfg.workers) as pool):
            for item in repos:
                if cfg.max_repos is not None and len(store.done) >= cfg.max_repos:
                    break
                name = item["full_name"]
                if name in seen or name in store.done:
                    self.summary.repos["already_done" if name in store.done
                                       else "repeated_in_search"] += 1
                    continue
                seen.add(name)
                self._scrape_repo(item, store, pool)
                bar.update()
                bar.set_postfix(files=self.summary.files["kept"])
        return self.summary

    def _scrape_repo(self, item: dict, store: ResumableOutput, pool: ThreadPoolExecutor) -> None:
        """Read one repo and commit it whole, or count it under SERVER_ERROR (5xx, bytes that
        miss their blob) or UNAVAILABLE (refused) and name it in the summary, for the next run."""
        name = item["full_name"]
        files: Counter = Counter()
        try:
            how, records = self._read_repo(item, store, pool, files)
        except (ServerError, NotServed) as exc:
            failing = isinstance(exc, ServerError)  # a refusal is an answer: GitHub is up
            self.summary.repos[SERVER_ERROR if failing else UNAVAILABLE] += 1
            self._failed_in_a_row = self._failed_in_a_row + 1 if failing else 0
            if self._failed_in_a_row >= _FAILED_IN_A_ROW:
                raise GitHubError(f"GitHub failed {_FAILED_IN_A_ROW} repos in a row; the "
                                  f"last: {exc}") from None
            log.warning("%s is not saved (a re-run retries it): %s", name, exc)
            self.summary.notes.append(f"{name} is not saved (a re-run retries it): {exc}")
            return
        self._failed_in_a_row = 0
        store.commit(name, records)
        self.summary.repos[how] += 1
        self.summary.files.update(files)
        self.summary.bytes_kept += sum(len(r["text"].encode()) for r in records)

    def _read_repo(self, item: dict, store: ResumableOutput, pool: ThreadPoolExecutor,
                   files: Counter) -> tuple[str, list[dict]]:
        """(how the repo ends, its records), counting its files in ``files``."""
        name = item["full_name"]
        license_id = (item.get("license") or {}).get("spdx_id")
        stars = item.get("stargazers_count")
        if not license_allowed(license_id, self.allowed):
            return "license", []
        commit, how = self._branch_commit(name, item.get("default_branch") or "HEAD")
        if commit is None:
            return how, []
        tree = list_repo_files(self.client, name, commit)
        wanted = self._wanted(tree, store, files)
        records, refused = [], []
        for f, got in zip(wanted, pool.map(lambda f: self._download(name, commit, f), wanted)):
            data, why = got
            if data is None:
                refused.append(f"{f.path}: {why}")
                continue
            text, reason = decode_source(data)
            if text is None:
                files[reason] += 1
                continue
            records.append(make_record(name, f.path, f.sha, license_id, stars, text))
        if refused:
            more = len(refused) - _NAMED_FILES
            raise NotServed("; ".join(refused[:_NAMED_FILES])
                            + (f"; and {more} more files" if more > 0 else ""))
        files["kept"] += len(records)
        return "scraped", records

    def _branch_commit(self, repo: str, branch: str) -> tuple[str | None, str]:
        """(the commit ``branch`` is at, "scraped"), or (None, how the repo ends): ``empty`` when
        its tree answers GitHub's 409 for an empty repository (whose branch answers 404), or
        ``http_451``/``http_403`` when GitHub blocks it (named in the summary). Another refusal
        (a replica behind) is asked again after a pause; one that lasts raises NotServed."""
        refused = []
        for attempt in range(LISTING_ATTEMPTS):
            if attempt:
                self.client.pause(attempt - 1)
            data, resp = self.client.get_reply(f"/repos/{repo}/branches/{quote(branch)}",
                                               valid=_is_branch)
            status = resp.status_code
            if status == 200:
                return data["commit"]["sha"], "scraped"
            if _blocked(resp):
                log.info("%s: blocked by GitHub (HTTP %d)", repo, status)
                self.summary.notes.append(f"{repo}: blocked by GitHub (HTTP {status}); recorded "
                                          "done with no file")
                return None, f"http_{status}"
            if not refused and self._is_empty(repo, branch):
                return None, "empty"
            refused.append(str(status))
        raise NotServed(f"branch {branch}: HTTP {', '.join(refused)}")

    def _is_empty(self, repo: str, branch: str) -> bool:
        """Whether GitHub gives its answer for an empty repository (409) for its tree."""
        return self.client.get(f"/repos/{repo}/git/trees/{quote(branch)}").status_code == 409

    def _wanted(self, tree: list[TreeFile], store: ResumableOutput, files: Counter
                ) -> list[TreeFile]:
        """The files of ``tree`` to download, counting the others in ``files`` by reason."""
        wanted, new_shas = [], set()
        for f in tree:
            reason = "symlink" if f.mode == "120000" else self.filter.reject_reason(f.path, f.size)
            if reason is None and (f.sha in store.shas or f.sha in new_shas):
                reason = "duplicate_sha"
            if reason:
                files[reason] += 1
            else:
                new_shas.add(f.sha)
                wanted.append(f)
        return wanted

    def _download(self, repo: str, commit: str, f: TreeFile) -> tuple[bytes | None, str]:
        """(the file's bytes, ""), or (None, what each try got) when GitHub kept refusing them.
        Tries alternate between the raw host (where there is one and the path is plain) and the
        blob API by SHA. The file is listed at this commit, so a refusal (404, 403, 410, ...) is
        a replica or cache behind: it is asked again after a pause. Bytes that miss the blob SHA
        (altered, cut short, malformed) are asked again at once, and a file whose every try
        misses raises ServerError. Either way its repository is left for the next run."""
        sources = ("raw", "blob") if self.raw_url and _plain_path(f.path) else ("blob",)
        tries, refusals = [], 0
        for attempt in range(DOWNLOAD_ATTEMPTS):
            source = sources[attempt % len(sources)]
            resp = self._get_file(source, repo, commit, f)
            if resp.status_code != 200:
                tries.append(f"{source} HTTP {resp.status_code}")
                if attempt + 1 < DOWNLOAD_ATTEMPTS:
                    self.client.pause(refusals)
                refusals += 1
            elif git_blob_sha(resp.content) == f.sha:
                return resp.content, ""
            else:
                tries.append(f"{source} not its blob")
                log.warning("%s %s: %d bytes that are not its blob %s; downloading it again",
                            repo, f.path, len(resp.content), f.sha)
        if not refusals:
            raise ServerError(f"{repo} {f.path}: {DOWNLOAD_ATTEMPTS} downloads, none of them "
                              f"its blob {f.sha}")
        return None, ", ".join(tries)

    def _get_file(self, source: str, repo: str, commit: str, f: TreeFile) -> requests.Response:
        if source == "raw":
            return self.client.get(f"{self.raw_url}/{repo}/{commit}/{quote(f.path)}",
                                   accept="*/*")
        # By blob SHA: odd paths never reach a URL, and Enterprise needs no raw host.
        return self.client.get(f"/repos/{repo}/git/blobs/{f.sha}",
                               accept="application/vnd.github.raw+json")


def scrape_github(cfg: GitHubConfig, client: GitHubClient | None = None) -> Summary:
    """Run a (resumable) GitHub scrape to ``cfg.out``; returns kept/skipped counts."""
    return GitHubScraper(cfg, client).run()
