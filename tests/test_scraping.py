"""scraping/: GitHub scraping against a fake GitHub on 127.0.0.1, and local collection."""

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date, datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
from fake_github import DEFAULT_FAULTS, FakeGitHub, FakeRepo, blob_sha, fake_corpus
from procs import popen, signal_when

import scraping.common as scraping_common
import scraping.github
from codelm.data.sources import source_listing
from codelm.runtime import process
from scraping import (
    GitHubClient,
    GitHubConfig,
    GitHubError,
    LocalConfig,
    collect_local,
    detect_license,
    is_git_source,
    scrape_github,
    search_repositories,
)
from scraping.__main__ import main
from scraping.client import ServerError
from scraping.common import (
    KNOWN_LICENSES,
    FileFilter,
    ResumableOutput,
    decode_source,
    expand_licenses,
    git_blob_sha,
    git_ignored_files,
    redact_url,
    walk_source_tree,
)
from scraping.github import build_query
from scraping.license_file import LICENSE_PHRASES, license_of_text

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "ghp_fakeSecretTokenForTests0123456789"
RANGE = ("2015-01-01", "2026-01-01")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class RecordingSleep:
    def __init__(self):
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make_client(fake: FakeGitHub, sleep=None, token=None, retries=4) -> GitHubClient:
    return GitHubClient(fake.api_url, token, retries=retries, sleep=sleep or (lambda s: None),
                        rng=random.Random(0))


def config(fake: FakeGitHub, out: Path, **kw) -> GitHubConfig:
    kw = {"since": RANGE[0], "until": RANGE[1], "api_url": fake.api_url, "raw_url": fake.raw_url,
          **kw}
    return GitHubConfig(out=str(out), progress=False, **kw)


def run_scrape(out: Path, faults=(), max_per_page=3, raw=True, token=None, fake=None, **kw):
    """One scrape of the fake corpus into ``out``: on its own fake GitHub, or on ``fake`` (one
    GitHub at one address for every scrape that resumes an output) with ``faults`` queued."""
    repos, expected = fake_corpus()
    if fake is None:
        with FakeGitHub(repos, max_per_page=max_per_page, token=token) as own:
            return run_scrape(out, faults, raw=raw, token=token, fake=own, **kw)
    fake.faults = list(faults)
    sleep = RecordingSleep()
    cfg = config(fake, out, **kw)
    if not raw:
        cfg.raw_url = None
    summary = scrape_github(cfg, make_client(fake, sleep, token=token))
    return fake, summary, expected, sleep


@pytest.fixture
def github():
    """A fake GitHub serving the fake corpus for the whole test: a resumed output names the
    --api-url it was started with."""
    with FakeGitHub(fake_corpus()[0], max_per_page=3) as fake:
        yield fake


def test_scrape_keeps_exactly_the_expected_files_through_every_failure(tmp_path, caplog):
    """Through every injected failure (5xx, 403/429 rate limits, dropped connections, a truncated
    tree), a scrape keeps exactly the wanted files, once, with their bytes, blob SHA, licence and
    stars; odd paths write nothing outside --out, and the token is in no file or log line."""
    caplog.set_level(logging.INFO, logger="scraping")
    out = tmp_path / "out" / "code.jsonl"
    fake, summary, expected, sleep = run_scrape(out, DEFAULT_FAULTS, token=TOKEN)
    assert fake.faults == []  # every injected failure was met and survived
    records = read_jsonl(out)
    keys = [(r["repo"], r["path"]) for r in records]
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert len({r["sha"] for r in records}) == len(records)

    repos = {r.full_name: r for r in fake_corpus()[0]}
    for r in records:
        data = repos[r["repo"]].files[r["path"]]
        assert list(r) == ["repo", "path", "sha", "license", "stars", "text"]
        assert r["text"].encode() == data and r["sha"] == blob_sha(data)
        assert (r["license"], r["stars"]) == (repos[r["repo"]].license, repos[r["repo"]].stars)

    # Waits: the 429's retry-after and the 403's x-ratelimit-reset were honoured, briefly.
    assert any(0.9 <= s <= 3 for s in sleep.calls) and max(sleep.calls) <= 3
    search = [p for p in fake.requests if p.startswith("/api/v3/search/")]
    assert any("page=2" in p for p in search)  # the link header was followed
    assert any("/git/trees/" in p and "recursive" not in p for p in fake.requests)  # truncated
    assert not any(".." in p or "codelm_fake" in p for p in fake.requests if "/raw/" in p)

    assert summary.files["kept"] == len(expected)
    for reason in ("too_small", "too_large", "not_utf8", "binary", "symlink", "duplicate_sha"):
        assert summary.files[reason] == 1, reason
    assert summary.repos["empty"] == 1 and summary.repos["scraped"] == 10

    # Odd paths stayed data: nothing was written outside the output directory.
    assert not (out.parent / "../../x.py").resolve().exists()
    assert not Path("/tmp/codelm_fake_github_abs.py").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["code.jsonl",
                                                             "code.jsonl.state"]
    # The token was sent, and appears in no file and no log line.
    assert fake.auth_seen == {f"Bearer {TOKEN}"}
    for p in out.parent.iterdir():
        assert TOKEN not in p.read_text()
    assert TOKEN not in caplog.text and TOKEN not in repr(make_client(fake, token=TOKEN))


def test_blob_api_path_without_raw_host_gives_the_same_output(tmp_path):
    """Without a raw host, files come through the blob API, to the byte-identical output the raw
    host gives."""
    run_scrape(tmp_path / "raw.jsonl")
    fake, _, _, _ = run_scrape(tmp_path / "blob.jsonl", raw=False)
    assert not any(p.startswith("/raw/") for p in fake.requests)
    assert (tmp_path / "raw.jsonl").read_bytes() == (tmp_path / "blob.jsonl").read_bytes()


def _a_file_of(repos, expected, repo: str) -> tuple[str, str]:
    """(path, blob sha) of the first kept file of ``repo``."""
    path = sorted(p for name, p in expected if name == repo)[0]
    data = next(r for r in repos if r.full_name == repo).files[path]
    return path, blob_sha(data)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "blob"])
@pytest.mark.parametrize("fault", ["altered", "truncated", 'body:{"sha": "x", "size": 1}'],
                         ids=["altered", "truncated", "malformed"])
def test_a_reply_that_is_not_the_files_blob_is_downloaded_again(tmp_path, raw, fault):
    """Bytes that do not hash to the SHA the tree names (a broken proxy or cache, a body cut
    short, a 200 of the wrong shape) are asked for again by blob SHA: every file is kept, once."""
    repos, expected = fake_corpus()
    path, sha = _a_file_of(repos, expected, "gamma/mailer")
    needle = f"/{quote(path)}" if raw else f"/git/blobs/{sha}"
    out = tmp_path / "code.jsonl"
    fake, summary, _, _ = run_scrape(out, [(needle, fault)], raw=raw)
    assert fake.faults == []  # the bad answer was served
    keys = [(r["repo"], r["path"]) for r in read_jsonl(out)]
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert summary.files["kept"] == len(expected)


def test_git_blob_sha_is_the_id_git_gives_the_content(tmp_path):
    """Reference: ``git hash-object``, the id GitHub's trees name and local records carry."""
    contents = [b"", b"x = 1\n", "caf\u00e9 = 1\r\n".encode(), b"\0\x01binary" * 300,
                (ROOT / "scraping" / "common.py").read_bytes()]
    for data in contents:
        git = subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True,
                             check=True)
        assert git_blob_sha(data) == git.stdout.decode().strip() == blob_sha(data)


def test_search_splits_date_range_past_the_result_cap():
    """A search returns at most `cap` results: a date range holding more repos is split until each
    slice fits, so every repo is found, once (unsplit, only the first 4)."""
    repos = [FakeRepo(f"o/r{i:02d}", 200 + i, f"20{16 + i // 3}-0{1 + i % 9}-0{1 + i % 7}")
             for i in range(17)]
    start = datetime(2015, 1, 1, tzinfo=timezone.utc)
    end = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with FakeGitHub(repos, max_per_page=2, search_cap=4) as fake:
        client = make_client(fake)
        names = [r["full_name"] for r in search_repositories(
            client, "stars:>100", "created", start, end, cap=4, per_page=100)]
        assert sorted(names) == sorted(r.full_name for r in repos)
        assert len(names) == len(set(names))
        # The cap is real: a scraper that did not split would reach only the first 4.
        unsplit = list(search_repositories(client, "stars:>100", "created", start, end,
                                           cap=10**6))
        assert len(unsplit) == 4


def test_a_slice_of_two_seconds_is_split_too():
    """A slice's bounds are whole seconds, both included: end - start = 1 s is two seconds,
    which is halved too, else results past the cap would be lost. Two repos in each of two
    seconds, a cap of 3: all four are found."""
    repos = [FakeRepo(f"o/t{i}", 200 + i, f"2015-01-01T00:00:0{i // 2}+00:00") for i in range(4)]
    start = datetime(2015, 1, 1, tzinfo=timezone.utc)
    end = datetime(2015, 1, 1, 0, 0, 1, tzinfo=timezone.utc)
    with FakeGitHub(repos, max_per_page=2, search_cap=3) as fake:
        names = [r["full_name"] for r in search_repositories(
            make_client(fake), "stars:>100", "created", start, end, cap=3, per_page=100)]
    assert sorted(names) == sorted(r.full_name for r in repos)


def test_a_split_search_misses_no_second():
    """A split slice's second half starts at mid + 1 s, the second right after a split point
    (mid + 2 s would silently miss the repos created in it). One repo a second, a cap of 3
    (several splits): every repo is found, once."""
    repos = [FakeRepo(f"o/s{i:02d}", 200 + i, f"2015-01-01T00:00:{i:02d}+00:00")
             for i in range(11)]
    start = datetime(2015, 1, 1, tzinfo=timezone.utc)
    end = datetime(2015, 1, 1, 0, 0, 10, tzinfo=timezone.utc)
    with FakeGitHub(repos, max_per_page=2, search_cap=3) as fake:
        names = [r["full_name"] for r in search_repositories(
            make_client(fake), "stars:>100", "created", start, end, cap=3, per_page=100)]
    assert sorted(names) == sorted(r.full_name for r in repos)


def _ranked_repos(n: int = 9) -> list[FakeRepo]:
    """Repos o/r0..o/r{n-1}, in falling star order, one small file each."""
    return [FakeRepo(f"o/r{i}", 1000 - 10 * i, "2020-01-01",
                     files={"m.py": f"x = {i}\n".encode() * 200}) for i in range(n)]


def test_a_search_slice_read_short_is_read_again_and_no_repo_is_missed(tmp_path):
    """o/r4 gains stars while the search's second page is asked for: it moves to the page
    already read, and the slice comes back one short; it is read again, so one run scrapes
    all nine."""
    out = tmp_path / "out.jsonl"
    repos = _ranked_repos()
    with FakeGitHub(repos, max_per_page=3, star_changes=[("page=2", "o/r4", 5000)]) as fake:
        summary = scrape_github(config(fake, out, min_bytes=1), make_client(fake))
        assert fake.star_changes == []
        first_pages = [r for r in fake.requests if "/search/" in r and "&page=" not in r]
        assert len(first_pages) == 2
    assert summary.repos["scraped"] == 9
    assert sorted(r["repo"] for r in read_jsonl(out)) == [r.full_name for r in repos]


@pytest.mark.parametrize("max_repos", [None, 2])
def test_a_repo_that_gains_stars_mid_scrape_is_scraped_exactly_once(tmp_path, max_repos):
    """A repo that moves up the star ranking while the scrape runs is scraped once: in one run,
    and across a run stopped by max_repos and its resume."""
    # o/r3 gains stars while page 1 (o/r0..o/r2) is being scraped, so it moves to page 1; with
    # max_repos=2 the run stops there and a second run resumes with the new order.
    out = tmp_path / "out.jsonl"
    repos = _ranked_repos()
    shift = [("/repos/o/r0/branches/", "o/r3", 5000)]
    with FakeGitHub(repos, max_per_page=3, star_changes=shift) as fake:
        first = scrape_github(config(fake, out, min_bytes=1, max_repos=max_repos),
                              make_client(fake))
        assert fake.star_changes == []  # the change happened mid-scrape
        if max_repos:
            assert first.repos["scraped"] == 2
            second = scrape_github(config(fake, out, min_bytes=1), make_client(fake))
            assert second.repos["already_done"] == 2 and second.repos["scraped"] == 7
        else:
            assert first.repos["scraped"] == 9 and first.repos["repeated_in_search"] == 0
    names = [r["repo"] for r in read_jsonl(out)]
    assert sorted(names) == [r.full_name for r in repos] and len(names) == len(set(names))


def test_a_repo_listing_skips_submodules_and_keeps_nested_paths():
    """A submodule (tree entry of type "commit") is another repository's code, not a file of
    this one, also when its name has a wanted extension. Reference: the repo's own files."""
    files = {"a.py": b"x = 1\n", "pkg/sub/b.py": b"y = 2\n", "pkg/c.py": b"z = 3\n"}
    for truncated in (set(), {""}):
        repo = FakeRepo("o/sub", 500, "2020-01-01", files=files,
                        submodules=["vendor/lib.py", "pkg/ext.py"], truncated_dirs=truncated)
        with FakeGitHub([repo]) as fake:
            listed = scraping.github.list_repo_files(make_client(fake), repo.full_name,
                                                     repo.commit)
        assert [(f.path, f.sha) for f in listed] == [(p, blob_sha(d))
                                                     for p, d in sorted(files.items())]


def test_a_repo_listing_skips_the_directories_the_local_walker_skips():
    """A committed virtualenv's site-packages, node_modules, .tox and __pycache__ are not
    scraped from GitHub (third-party code under the repo's licence), as `scraping local` of the
    same repo never enters them; a truncated tree's walk does not even list them."""
    files = {rel: f"# {rel}\nx = 1\n".encode() for rel in (
        "app/main.py", ".venv/lib/python3.11/site-packages/req/api.py", "node_modules/p/s.py",
        "app/__pycache__/m.py", "lib/site-packages/x.py", ".tox/py311/y.py", "app/venv.py")}
    for truncated in (set(), {""}):
        repo = FakeRepo("o/venv", 500, "2020-01-01", files=files, truncated_dirs=truncated)
        with FakeGitHub([repo]) as fake:
            listed = scraping.github.list_repo_files(make_client(fake), repo.full_name,
                                                     repo.commit)
        assert [f.path for f in listed] == ["app/main.py", "app/venv.py"]
        if truncated:
            assert not any(repo.tree_sha(d) in p for p in fake.requests
                           for d in (".venv", "node_modules", ".tox"))


def test_a_file_repeated_inside_one_repo_is_downloaded_and_kept_once(tmp_path):
    """Two paths with one blob SHA in the same repo (a vendored copy) are one record: the
    second is counted as duplicate_sha before any download."""
    data = b"def f(x):\n    return x + 1\n" * 40
    repo = FakeRepo("o/dup", 500, "2020-01-01",
                    files={"a.py": data, "copy/a.py": data, "b.py": b"y = 2\n" * 200})
    out = tmp_path / "out.jsonl"
    with FakeGitHub([repo]) as fake:
        summary = scrape_github(config(fake, out), make_client(fake))
    assert [r["path"] for r in read_jsonl(out)] == ["a.py", "b.py"]
    assert summary.files["duplicate_sha"] == 1 and summary.files["kept"] == 2
    assert not any(p.endswith("/copy/a.py") for p in fake.requests)


def test_license_allow_list(tmp_path):
    """--licenses permissive keeps only permissively licensed repos: the GPL-3.0 one and the one
    with no licence are skipped, and counted."""
    out = tmp_path / "p.jsonl"
    _, summary, expected, _ = run_scrape(out, licenses=["permissive"])
    repos = {r["repo"] for r in read_jsonl(out)}
    assert repos == {repo for repo, _ in expected} - {"gamma/mailer", "delta/evil"}
    assert summary.repos["license"] == 2  # GPL-3.0 and no licence at all


def test_permissive_is_the_stacks_permissive_ids_and_no_copyleft():
    """'permissive' holds the ids GitHub reports that The Stack counts permissive (those of
    the Blue Oak Council's list among them), and none of the copyleft families."""
    from scraping.common import KNOWN_LICENSES, PERMISSIVE_LICENSES, expand_licenses

    assert PERMISSIVE_LICENSES <= KNOWN_LICENSES
    assert {"MIT", "Apache-2.0", "BSD-3-Clause-Clear", "UPL-1.0", "BlueOak-1.0.0",
            "BSD-2-Clause-Patent", "PostgreSQL", "ECL-2.0", "AFL-3.0"} <= PERMISSIVE_LICENSES
    copyleft = ("GPL", "LGPL", "AGPL", "MPL", "EPL", "EUPL", "CC-BY-SA", "OSL", "MS-RL",
                "CECILL", "CERN-OHL-S", "CERN-OHL-W", "ODbL", "GFDL")
    assert not [name for name in PERMISSIVE_LICENSES if name.startswith(copyleft)]
    assert "NOASSERTION" not in PERMISSIVE_LICENSES
    assert expand_licenses(["permissive"]) == PERMISSIVE_LICENSES


def test_licenses_none_is_the_repos_without_a_licence_not_any_licence(tmp_path):
    """`--licenses none` is the repos GitHub detects no licence in (`license` null), alone or
    beside ids, and --help says so: not the settings module's word for None, the default (any
    licence), the opposite of what it reads as."""
    from scraping.__main__ import build_parser

    github = build_parser()._subparsers._group_actions[0].choices["github"]
    flag = next(a for a in github._actions if a.dest == "licenses")
    assert "'none' = repos GitHub detects no licence in" in flag.help
    assert "'none' for None" not in flag.help and "'none': the default" not in flag.help
    licenses = vars(github.parse_args(["--out", "x", "--licenses", "none"]))["licenses"]
    assert licenses == ["none"]

    repos, expected = fake_corpus()
    unlicensed = {r.full_name for r in repos if r.license is None}
    out = tmp_path / "none.jsonl"
    _, summary, _, _ = run_scrape(out, licenses=licenses)
    records = read_jsonl(out)
    assert {(r["repo"], r["path"]) for r in records} == {
        (repo, path) for repo, path in expected if repo in unlicensed}
    assert records and {r["license"] for r in records} == {None}
    assert summary.repos["license"] > 0  # the licensed ones, skipped as outside --licenses

    out = tmp_path / "gpl_or_none.jsonl"
    run_scrape(out, licenses=["GPL-3.0", "None"])
    assert {r["repo"] for r in read_jsonl(out)} == {"gamma/mailer", *unlicensed}


def test_the_until_day_is_included(tmp_path):
    """--until is the "last date, inclusive": the search does not end at that day's midnight,
    which would leave out every repo created later that day. One created at noon on it is
    scraped."""
    repos = [FakeRepo("o/noon", 500, "2020-01-01T12:00:00+00:00",
                      files={"m.py": b"x = 1\n" * 100})]
    with FakeGitHub(repos) as fake:
        summary = scrape_github(config(fake, tmp_path / "o.jsonl", since="2019-01-01",
                                       until="2020-01-01", min_bytes=1), make_client(fake))
    assert summary.repos["scraped"] == 1


def test_a_resume_on_a_later_day_keeps_the_first_runs_until(tmp_path, monkeypatch):
    """Without --until the first run fixes today as the last date; a resume on a later day keeps
    it, not taking the new today (which "until" differs would refuse): it continues the first
    run's scrape."""
    out = tmp_path / "out.jsonl"
    today = [date(2024, 5, 1)]

    class FakeDate(date):
        @classmethod
        def today(cls):
            return today[0]

    monkeypatch.setattr(scraping.github, "date", FakeDate)
    with FakeGitHub(_ranked_repos(3)) as fake:
        first = scrape_github(config(fake, out, until=None, max_repos=1, min_bytes=1),
                              make_client(fake))
        today[0] = date(2024, 5, 2)
        second = scrape_github(config(fake, out, until=None, min_bytes=1), make_client(fake))
    assert first.repos["scraped"] == 1
    assert second.repos["already_done"] == 1 and second.repos["scraped"] == 2
    assert read_jsonl(out.with_name("out.jsonl.state"))[0]["settings"]["until"] == "2024-05-01"


def test_resume_after_a_crash_between_output_and_state(tmp_path, github):
    """A crash after an output append but before its state line, or half-way through either, is
    resumed to the bytes an uninterrupted run writes; rerunning a finished run adds nothing."""
    reference = tmp_path / "ref.jsonl"
    run_scrape(reference)
    out = tmp_path / "out.jsonl"
    run_scrape(out, max_repos=3, fake=github)
    done = read_jsonl(out.with_name("out.jsonl.state"))[1:]
    assert [d["repo"] for d in done] == ["alpha/jsonish", "beta/webkit", "gamma/mailer"]
    # A kill after the output append but before the state line, and one half-way through both.
    with open(out, "ab") as f:
        f.write(b'{"repo": "delta/evil", "path": "ok.py"}\n{"repo": "delta/ev')
    with open(out.with_name("out.jsonl.state"), "ab") as f:
        f.write(b'{"repo": "delta/evil", "end": 99')
    run_scrape(out, fake=github)
    assert out.read_bytes() == reference.read_bytes()
    run_scrape(out, fake=github, api_url=github.api_url + "/")  # a finished run re-run (its
    #   --api-url typed with a trailing slash) adds nothing
    assert out.read_bytes() == reference.read_bytes()


def test_a_resume_drops_a_cut_off_state_line_before_appending(tmp_path):
    """A kill mid-write leaves half a state line. A resume drops it before appending (kept, it
    would glue the next repo's line to it, and the run after would forget that repo): every
    finished repo stays known."""
    out, state = tmp_path / "o.jsonl", tmp_path / "o.jsonl.state"
    rec = {"repo": "o/a", "path": "a.py", "sha": "1", "license": None, "stars": 1, "text": "x"}
    with ResumableOutput(out, state, {"k": 1}) as store:
        store.commit("o/a", [rec])
    with open(state, "ab") as f:
        f.write(b'{"repo": "o/b", "end": 9')  # killed mid-line
    with ResumableOutput(out, state, {"k": 1}) as store:
        assert store.done == {"o/a"}
        store.commit("o/c", [{**rec, "repo": "o/c", "sha": "2"}])
    with ResumableOutput(out, state, {"k": 1}) as store:
        assert store.done == {"o/a", "o/c"} and store.shas == {"1", "2"}


def test_resume_with_other_settings_is_a_clear_error(tmp_path, capsys, github):
    """Resuming an output with other settings (--min-stars) would mix two scrapes in one file: it
    is refused naming the setting, on the CLI as one exit-2 error line."""
    out = tmp_path / "out.jsonl"
    run_scrape(out, max_repos=1, fake=github)
    with pytest.raises(ValueError, match=r"\(those that differ: min_stars\)"):
        run_scrape(out, min_stars=10, fake=github)
    code = main(["github", "--out", str(out), "--min-stars", "10", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "min_stars" in err and "Traceback" not in err


@pytest.mark.parametrize("setting, value", [
    ("min_bytes", 10), ("max_bytes", 50_000), ("extensions", [".py", ".pyi"]),
    ("language", "go"), ("since", "2016-01-01"), ("date_field", "pushed"),
    ("licenses", ["MIT"]), ("extra_query", "archived:false"),
    ("api_url", "https://ghe.example.com/api/v3")])
def test_a_resume_with_any_other_output_setting_is_refused(tmp_path, github, setting, value):
    """Every setting that decides which files the output holds must match on resume: one left
    out of the state (max_bytes, say) would mix files of two filters in one output, and another
    --api-url (another GitHub Enterprise host) would skip its repos named as the first's."""
    out = tmp_path / "out.jsonl"
    run_scrape(out, max_repos=1, fake=github)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=rf"\(those that differ: {setting}\)"):
        run_scrape(out, fake=github, **{setting: value})
    assert out.read_bytes() == before


def test_output_changed_behind_the_scrapers_back_is_refused(tmp_path, github):
    """An output its state file does not account for (another program's file, or one cut shorter
    than the state says) is refused, not appended to."""
    out = tmp_path / "out.jsonl"
    out.write_text('{"text": "someone else\'s file"}\n')
    with pytest.raises(ValueError, match="state file"):
        run_scrape(out, fake=github)
    out.unlink()
    run_scrape(out, max_repos=2, fake=github)
    out.write_bytes(out.read_bytes()[:10])
    with pytest.raises(ValueError, match="shorter than"):
        run_scrape(out, fake=github)


def test_kill_mid_run_then_rerun_matches_an_uninterrupted_run(tmp_path):
    """The CLI killed (SIGKILL) mid-scrape, then run again: the output is byte-identical to an
    uninterrupted run's, the summary counts the repos already done, and the token is in no output,
    log or state."""
    reference = tmp_path / "ref.jsonl"
    run_scrape(reference)
    out = tmp_path / "out.jsonl"
    state = tmp_path / "out.jsonl.state"
    repos, _ = fake_corpus()
    env = {**os.environ, "GITHUB_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    with FakeGitHub(repos, max_per_page=3, token=TOKEN, delay=0.02,
                    faults=[("/git/trees/", "500"), ("/raw/gamma/", "drop")]) as fake:
        cmd = [sys.executable, "-m", "scraping", "github", "--out", str(out),
               "--api-url", fake.api_url, "--raw-url", fake.raw_url, "--since", RANGE[0],
               "--until", RANGE[1], "--workers", "2", "--backoff", "0.05", "--no-progress"]
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            if state.exists() and state.read_bytes().count(b"\n") >= 3:  # header + 2 repos
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        _, err1 = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err1.decode()
        assert 0 < len(out.read_bytes()) < len(reference.read_bytes())
        second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=120)
    assert second.returncode == 0, second.stderr
    assert out.read_bytes() == reference.read_bytes()
    assert "already_done" in second.stderr  # the summary counts the repos the first run finished
    assert TOKEN not in second.stdout + second.stderr + err1.decode()
    assert TOKEN not in state.read_text()


# --- the client on its own ---------------------------------------------------------------------
def test_a_token_with_a_space_inside_is_refused_without_showing_it():
    """A space is no token character (a pasted "token ghp_..." line): refused at once, not
    sent to fail as bad credentials after the run has started."""
    for token in ("token " + TOKEN, TOKEN[:10] + " " + TOKEN[10:], TOKEN + "\x7f"):
        with pytest.raises(ValueError, match="GITHUB_TOKEN holds spaces") as info:
            GitHubClient("http://127.0.0.1:9", token)
        assert "ghp_" not in str(info.value)
    assert GitHubClient("http://127.0.0.1:9", f" {TOKEN}\r\n").has_token


def test_client_retries_are_bounded_with_exponential_jittered_backoff():
    """A failing request is tried retries + 1 times, then raises saying so; the waits double with
    equal jitter (in [d/2, d]), so many workers do not retry in step."""
    repo = FakeRepo("a/b", 500, "2020-01-01")
    with FakeGitHub([repo], faults=[("/branches/", "500")] * 10) as fake:
        sleep = RecordingSleep()
        client = GitHubClient(fake.api_url, retries=3, backoff=1.0, sleep=sleep,
                              rng=random.Random(1))
        with pytest.raises(GitHubError, match="failed 4 times"):
            client.get("/repos/a/b/branches/main")
        assert len(fake.faults) == 6  # exactly retries + 1 attempts
    assert len(sleep.calls) == 3
    for attempt, s in enumerate(sleep.calls):
        assert 2**attempt / 2 <= s <= 2**attempt  # equal jitter in [d/2, d]


def test_client_refuses_waits_longer_than_max_wait_and_names_bad_credentials():
    """A rate limit asking for a wait past max_wait raises naming --max-wait rather than sleeping;
    a wrong token raises naming GITHUB_TOKEN, without the token itself."""
    repo = FakeRepo("a/b", 500, "2020-01-01")
    with FakeGitHub([repo], token=TOKEN, faults=[("/branches/", "429")]) as fake:
        client = GitHubClient(fake.api_url, TOKEN, max_wait=0.5, sleep=lambda s: None)
        with pytest.raises(GitHubError, match="max-wait"):
            client.get("/repos/a/b/branches/main")
        wrong = GitHubClient(fake.api_url, "not-the-token", sleep=lambda s: None)
        with pytest.raises(GitHubError, match="GITHUB_TOKEN") as info:
            wrong.get("/repos/a/b/branches/main")
        assert "not-the-token" not in str(info.value)


def test_client_waits_for_the_reset_when_the_quota_runs_out():
    """Once a response says its quota is spent, the next request of that quota waits for the reset
    first, with no 403 needed; a request of another quota (search) does not wait."""
    repo = FakeRepo("a/b", 500, "2020-01-01")
    with FakeGitHub([repo], faults=[("/branches/", "remaining_0")]) as fake:
        sleep, now = RecordingSleep(), time.time()
        client = GitHubClient(fake.api_url, sleep=sleep, clock=lambda: now)  # time stands still
        assert client.get("/repos/a/b/branches/main").status_code == 200
        assert sleep.calls == []
        assert client.get("/repos/a/b/branches/main").status_code == 200  # waited first
        assert len(sleep.calls) == 1 and 1 <= sleep.calls[0] <= 2.5
        client.get("/search/repositories", params={"q": "stars:>1"})  # another quota: no wait
        assert len(sleep.calls) == 1


def test_connections_dropped_on_every_retry_are_a_server_error():
    """ServerError covers "5xx answers or dropped connections": a repo whose requests keep
    dropping raises it, leaving that repo for the next run, not a plain GitHubError, which
    would stop the whole run."""
    repo = FakeRepo("a/b", 500, "2020-01-01")
    with FakeGitHub([repo], faults=[("/branches/", "drop")] * 2) as fake:
        with pytest.raises(ServerError, match="failed 2 times"):
            make_client(fake, retries=1).get("/repos/a/b/branches/main")
        assert fake.faults == []


def test_an_unreachable_host_is_named_by_its_cause():
    """A connection that fails everywhere says why, from the innermost cause: a refused port
    as refused (a local port nothing listens on), a name that does not resolve as such."""
    import socket

    import requests

    from scraping.client import connection_problem

    client = GitHubClient("http://127.0.0.1:9", sleep=RecordingSleep(), retries=0)
    with pytest.raises(ServerError, match=r"ConnectionError: the host refused the connection"):
        client.get("/repos/a/b")
    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as unresolved:
            raise requests.ConnectionError("Max retries exceeded") from unresolved
    except requests.ConnectionError as error:
        assert "does not resolve (no network, or no DNS?)" in connection_problem(error)
    assert connection_problem(requests.Timeout()) == "Timeout"


def test_a_secondary_limit_without_headers_waits_at_least_a_minute():
    """GitHub's rule: after a secondary rate limit with no retry-after, wait at least a minute,
    not only the backoff (about a second). The fake's secondary_403_bare sends no retry-after,
    so this path runs."""
    repo = FakeRepo("a/b", 500, "2020-01-01")
    with FakeGitHub([repo], faults=[("/branches/", "secondary_403_bare")]) as fake:
        sleep, now = RecordingSleep(), time.time()
        client = GitHubClient(fake.api_url, sleep=sleep, clock=lambda: now, rng=random.Random(0))
        assert client.get("/repos/a/b/branches/main").status_code == 200
        assert fake.faults == []
    assert len(sleep.calls) == 1 and sleep.calls[0] >= 60.0


@pytest.mark.parametrize("status", [403, 429])
def test_a_secondary_limit_holds_every_thread_and_heeds_max_wait(status):
    """A secondary limit with no retry-after (a 403 saying so, or a 429) is a wait of a minute
    at least for every thread, recorded as GitHub's own waits are: another request waits it
    out before it is sent, and a --max-wait below it stops the run, saying so."""
    import requests

    now = time.time()
    refusal = requests.Response()
    refusal.status_code = status
    refusal._content = b'{"message": "You have exceeded a secondary rate limit."}'
    client = GitHubClient("https://api.github.com", sleep=RecordingSleep(), clock=lambda: now,
                          rng=random.Random(0))
    assert client._retry_delay("core", refusal, 0) == 0.0
    assert client._blocked_until["core"] >= now + 60.0
    repo = FakeRepo("a/b", 500, "2020-01-01")
    with FakeGitHub([repo], faults=[("/branches/", "secondary_403_bare")]) as fake:
        short = GitHubClient(fake.api_url, max_wait=10.0, sleep=RecordingSleep(),
                             clock=lambda: now, rng=random.Random(0))
        with pytest.raises(GitHubError, match="more than --max-wait"):
            short.get("/repos/a/b/branches/main")


def test_a_wait_of_exactly_max_wait_is_waited():
    """--max-wait gives up when a rate limit "needs a longer wait": a retry-after equal to it
    is waited, not refused. Time stands still, so the wait is exactly the retry-after."""
    repo = FakeRepo("a/b", 500, "2020-01-01")
    with FakeGitHub([repo], faults=[("/branches/", "429")]) as fake:
        sleep, now = RecordingSleep(), time.time()
        client = GitHubClient(fake.api_url, max_wait=1.0, sleep=sleep, clock=lambda: now,
                              rng=random.Random(0))
        assert client.get("/repos/a/b/branches/main").status_code == 200
    assert sleep.calls == [1.0]


class ServerTime:
    """The fake server's clock, moved on only by the client's sleeps: waits cost no real time."""

    def __init__(self, now: float):
        self.now, self.calls = now, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.now += seconds


class RateLimitedUntil(FakeGitHub):
    """Refuses branch requests with a primary rate limit until its clock reaches ``reset``."""

    reset = 0

    def _branch(self, h, repo, branch):
        if self.clock() < self.reset:
            return self._json(h, 403, {"message": "API rate limit exceeded"},
                              {"x-ratelimit-remaining": 0, "x-ratelimit-reset": self.reset})
        return super()._branch(h, repo, branch)


@pytest.mark.parametrize("skew", [5.0, -600.0, -7200.0])
def test_client_waits_out_a_rate_limit_whatever_the_clock_skew(skew):
    """A rate limit's reset is measured against the response's Date, not the local clock: with the
    clock fast or slow by seconds or hours, every retry comes after a pause and the wait stays near
    the reset's 1.5 s."""
    # GitHub's quota resets 1.5 s from now on its clock; the local clock is `skew` s off. A
    # fast clock must not make the reset look past, sending every retry in the same millisecond;
    # a slow one must not wait its lag on top (nor past --max-wait): the reset is measured
    # against the response's Date.
    server = ServerTime(1_700_000_000.5)
    with RateLimitedUntil([FakeRepo("a/b", 500, "2020-01-01")], clock=server) as fake:
        fake.reset = 1_700_000_002
        client = GitHubClient(fake.api_url, retries=6, sleep=server.sleep,
                              clock=lambda: server() + skew, rng=random.Random(0))
        assert client.get("/repos/a/b/branches/main").status_code == 200
        assert len(fake.requests) == len(server.calls) + 1  # a pause before every retry
    assert all(s >= 0.5 for s in server.calls) and server() >= fake.reset
    assert sum(server.calls) < 10


# --- local ---------------------------------------------------------------------------------------
def _source_tree(root: Path) -> dict[str, bytes]:
    files = {
        "pkg/a.kt": b"fun main() { println(\"hi\") }\n",
        "pkg/sub/b.kt": b"class B { val x = 1 }\n",
        "c.kt": "val s = \"caf\u00e9\"\n".encode(),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "notes.md").write_text("# notes\n")
    (root / "latin.kt").write_bytes("val s = \"caf\xe9\"\n".encode("latin-1"))
    (root / "zz").mkdir()
    (root / "zz" / "copy.kt").write_bytes(files["pkg/a.kt"])  # duplicate content, walked last
    return files


def test_local_directory(tmp_path):
    """A local directory yields its files of the wanted extensions, with the given licence, its
    name as repo and no stars; symlinks (which may point outside), .git, non-UTF-8 text and
    repeated content are skipped and counted."""
    src = tmp_path / "myrepo"
    files = _source_tree(src)
    secret = tmp_path / "outside.kt"
    secret.write_text("val secret = 1\n")
    (src / "link.kt").symlink_to(secret)
    (src / ".git").mkdir()
    (src / ".git" / "x.kt").write_text("val git = 1\n")
    out = tmp_path / "local.jsonl"
    summary = collect_local(LocalConfig(sources=[str(src)], out=str(out), extensions=["kt"],
                                        license="Apache-2.0", progress=False))
    records = read_jsonl(out)
    assert {r["path"]: r["text"].encode() for r in records} == files
    assert {(r["repo"], r["license"], r["stars"]) for r in records} == {
        ("myrepo", "Apache-2.0", None)}
    assert all(r["sha"] == blob_sha(files[r["path"]]) for r in records)
    assert summary.files["symlink"] == 1 and summary.files["not_utf8"] == 1
    assert summary.files["duplicate_sha"] == 1 and summary.files["extension"] == 1


def test_installed_code_left_out_is_said_where_a_source_gives_nothing_else(tmp_path, caplog):
    """A tree whose code sits in a site-packages (a virtual environment copied in) keeps none
    of it, as third-party code: where that leaves the source with no file, a warning names the
    directory and how to collect a package of it (its own directory, which collects); a source
    with files of its own is collected without it, and the summary says which files were
    skipped."""
    src = tmp_path / "proj"
    package = src / "lib" / "site-packages" / "pkg"
    package.mkdir(parents=True)
    (package / "mod.py").write_text("x = 1\n")
    (src / "notes.txt").write_text("notes\n")
    with caplog.at_level("WARNING", logger="scraping"):
        summary = collect_local(LocalConfig(sources=[str(src)], out=str(tmp_path / "o.jsonl"),
                                            progress=False))
    assert summary.files["kept"] == 0
    assert "no file kept; installed third-party code is left out (lib/site-packages)" in \
        caplog.text and f"({src / 'lib' / 'site-packages'}/NAME)" in caplog.text
    assert "  skipped extension" in summary.format()
    caplog.clear()
    (src / "main.py").write_text("import pkg\n")
    with caplog.at_level("WARNING", logger="scraping"):
        summary = collect_local(LocalConfig(sources=[str(src)], out=str(tmp_path / "p.jsonl"),
                                            progress=False))
    assert summary.files["kept"] == 1 and "installed" not in caplog.text
    summary = collect_local(LocalConfig(sources=[str(package)], out=str(tmp_path / "q.jsonl"),
                                        progress=False))
    assert summary.files["kept"] == 1


def test_two_local_sources_of_one_repository_name_are_refused_before_any_is_read(tmp_path):
    """A directory's name is the repo of its records: two sources named alike would be read as
    one repository by --task project, so collecting them together is refused, naming both."""
    for parent in ("a", "b"):
        _source_tree(tmp_path / parent / "proj")
    out = tmp_path / "local.jsonl"
    with pytest.raises(ValueError, match=r"a/proj and \S*b/proj are both repository 'proj'"):
        collect_local(LocalConfig(sources=[str(tmp_path / "a" / "proj"),
                                           str(tmp_path / "b" / "proj")], out=str(out),
                                  extensions=["kt"], license="MIT", progress=False))
    assert not out.exists()


def test_a_source_named_as_one_collected_into_the_output_before_is_refused(tmp_path):
    """A re-run may add sources to an output, but one whose repository name a source collected
    into it before already holds would put two repositories' files under one repo (records of
    one repo and path twice): it is refused before any is read, naming the earlier source."""
    for parent in ("a", "b"):
        _source_tree(tmp_path / parent / "proj")
    out = tmp_path / "local.jsonl"

    def collect(parent: str) -> None:
        collect_local(LocalConfig(sources=[str(tmp_path / parent / "proj")], out=str(out),
                                  extensions=["kt"], license="MIT", progress=False))

    collect("a")
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"b/proj is repository 'proj', as \S*a/proj collected"):
        collect("b")
    assert out.read_bytes() == before
    collect("a")  # the same source again resumes
    assert out.read_bytes() == before


@pytest.mark.parametrize("url, repo", [
    ("https://github.com/square/okio.git", "square/okio"),
    ("https://user:token@github.com/square/okio", "square/okio"),
    ("git@github.com:square/okio.git", "square/okio"),
    ("ssh://git@gitlab.com/group/sub/proj.git/", "group/sub/proj"),
    ("file:///srv/mirrors/okio.git", "file:///srv/mirrors/okio.git")])
def test_a_git_urls_records_name_its_repository_as_the_github_scraper_does(url, repo):
    """The repo of a URL's records is its path on the host (GitHub's owner/name, as `scraping
    github` writes it); a file:// URL, the one name of a repository on the machine, is whole."""
    from scraping.local import repository_of_url

    assert repository_of_url(url) == repo


def test_local_git_url_is_shallow_cloned_and_removed(tmp_path, capsys):
    """A git URL source is cloned to a temporary directory, collected with the URL as repo, and
    the clone removed; a missing path and a failing clone are one error line each, saying what
    to do."""
    work = tmp_path / "work"
    work.mkdir()
    files = _source_tree(work)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c",
           "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "one"]):
        subprocess.run(git + args, cwd=work, check=True, capture_output=True)
    bare = tmp_path / "remote.git"
    subprocess.run(git + ["clone", "-q", "--bare", str(work), str(bare)], check=True)
    url = bare.as_uri()
    before = set(Path(tempfile.gettempdir()).glob("codelm-clone-*"))
    out = tmp_path / "cloned.jsonl"
    assert main(["local", url, "--out", str(out), "--extensions", ".kt", "--no-progress"]) == 0
    records = read_jsonl(out)
    assert {r["path"]: r["text"].encode() for r in records} == files
    assert {r["repo"] for r in records} == {url}
    assert set(Path(tempfile.gettempdir()).glob("codelm-clone-*")) <= before  # (killed runs')
    assert "kept 3 files" in capsys.readouterr().err

    assert main(["local", str(tmp_path / "nope"), "--out", str(out), "--no-progress"]) == 2
    other = str(tmp_path / "other.jsonl")
    assert main(["local", "file:///no/such/repo.git", "--out", other, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not a directory or a git URL" in err and "git clone" in err
    assert "Traceback" not in err
    assert "does not appear to be a git repository; check the URL" in err, err
    assert err.count("\n") == 2  # one line each


# The clone waits once its directory exists, so that a signal lands mid-clone.
SLOW_CLONE = """
import sys, time
from scraping import local
from scraping.__main__ import main
def clone(url, dest, branch=None):
    dest.mkdir()
    time.sleep(60)
local.shallow_clone = clone
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                       (signal.SIGKILL, -9)], ids=["INT", "TERM", "KILL"])
def test_a_stopped_clone_is_removed_at_once_or_by_the_next_run(tmp_path, monkeypatch, sig, code):
    """Ctrl-C and SIGTERM remove the clone and exit 130/143 with one line (SIGTERM is no bare
    kill that leaves the clone in $TMPDIR); a SIGKILLed run's clone is removed by the next run,
    never the clone of a run still going."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    _, host, ns, _ = process.owner_tag().split("@")
    live = tmp / f"codelm-clone-{os.getppid()}@{host}@{ns}@x1y2"  # this test's parent's
    live.mkdir()
    proc = popen(
        [sys.executable, "-c", SLOW_CLONE, "local", "file:///some/repo.git", "--out",
         str(tmp_path / "out.jsonl"), "--no-progress"], cwd=tmp_path, text=True,
        env={**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = signal_when(proc, lambda: list(tmp.glob("codelm-clone-*/repo")), sig)
    assert proc.returncode == code, err
    clones = sorted(p.name for p in tmp.iterdir())
    if sig == signal.SIGKILL:
        assert len(clones) == 2 and live.name in clones
    else:
        assert len(err.splitlines()) == 1 and err.startswith("interrupted"), err  # no traceback
        assert all(w in err for w in ("finished repos are saved", "re-run")), err
        assert clones == [live.name]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    (tmp_path / "src").mkdir()
    assert main(["local", str(tmp_path / "src"), "--out", str(tmp_path / "next.jsonl"),
                 "--no-progress"]) == 0
    assert [p.name for p in tmp.iterdir()] == [live.name]


@pytest.mark.parametrize("url, redacted", [
    ("https://user:secret@example.com/owner/repo.git", "https://example.com/owner/repo.git"),
    ("https://secret@example.com:8443/owner/repo.git?ref=main#top",
     "https://example.com:8443/owner/repo.git?ref=main#top"),
    ("http://user:secret@[::1]:8080/repo.git", "http://[::1]:8080/repo.git"),
    ("ssh://git:secret@Git.Example.com/repo.git", "ssh://Git.Example.com/repo.git"),
    ("https://u:p%40secret@example.com/repo.git", "https://example.com/repo.git"),
    ("https://u:p@secret@example.com/repo.git", "https://example.com/repo.git"),  # a raw @
    ("https://example.com/owner/repo.git", "https://example.com/owner/repo.git"),
    ("file:///srv/repo.git", "file:///srv/repo.git"),
])
def test_redact_url_removes_the_credentials_and_nothing_else(url, redacted):
    """A URL's user:password goes, however it is encoded and whatever the host (IPv6, a port,
    ssh); the rest (query, fragment, case) is kept, so messages can name the repo."""
    assert redact_url(url) == redacted


def test_a_failing_clone_names_its_url_without_the_credentials(tmp_path, capsys, monkeypatch):
    """A clone that fails is named by its URL without the credentials, in the error and in every
    file; it leaves no output or state behind, so --out can be retried with other flags."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out.jsonl"
    url = "https://user:secret@127.0.0.1:1/repo.git"  # nothing listens on port 1
    assert main(["local", url, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "git clone https://127.0.0.1:1/repo.git failed" in err and "secret" not in err
    assert not [p.name for p in tmp_path.iterdir() if "secret" in p.read_text()]
    # it collected nothing: no output or state holds --out for a retry with other flags
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.md").write_text("# notes\nsome text\n")
    argv = ["local", str(tmp_path / "src"), "--out", str(out), "--extensions", ".md"]
    assert main([*argv, "--no-progress"]) == 0
    assert len(out.read_text().splitlines()) == 1


def test_file_size_bounds_are_inclusive(tmp_path):
    """min_bytes and max_bytes are the smallest and largest sizes kept, in the filter and in a
    collection through it."""
    sizes = {"a.py": 9, "b.py": 10, "c.py": 20, "d.py": 21}
    src = tmp_path / "src"
    src.mkdir()
    for name, size in sizes.items():
        (src / name).write_bytes(b"#" * (size - 1) + b"\n")
    kept = {name for name, size in sizes.items() if 10 <= size <= 20}
    file_filter = FileFilter((".py",), min_bytes=10, max_bytes=20)
    assert {name: file_filter.reject_reason(name, size) for name, size in sizes.items()} == {
        "a.py": "too_small", "b.py": None, "c.py": None, "d.py": "too_large"}
    out = tmp_path / "out.jsonl"
    summary = collect_local(LocalConfig(sources=[str(src)], out=str(out), min_bytes=10,
                                        max_bytes=20, progress=False))
    assert {r["path"] for r in read_jsonl(out)} == kept
    assert (summary.files["too_small"], summary.files["too_large"]) == (1, 1)


def test_the_size_bounds_hold_for_the_bytes_read_not_the_size_listed(tmp_path, monkeypatch):
    """A file that grows or shrinks between its listing and its read (a log being written) is
    judged by the bytes read, the ones a record would keep: out of the bounds, it is skipped."""
    root = tmp_path / "src"
    root.mkdir()
    for name in ("grows.py", "shrinks.py", "steady.py"):
        (root / name).write_text("x = 1\n")  # 6 bytes, in the bounds when listed
    read_bytes = Path.read_bytes
    changed = {"grows.py": b"x = 1\n" * 10, "shrinks.py": b"x\n"}

    def read_changed(self):
        return changed.get(self.name) or read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_changed)
    out = tmp_path / "out.jsonl"
    summary = collect_local(LocalConfig(sources=[str(root)], out=str(out), min_bytes=5,
                                        max_bytes=20, progress=False))
    assert [r["path"] for r in read_jsonl(out)] == ["steady.py"]
    assert summary.files["too_large"] == summary.files["too_small"] == 1


def test_local_keeps_finished_sources_when_a_later_one_fails_and_resumes(tmp_path, capsys):
    """A source that fails keeps what the earlier sources collected, and the next run resumes
    past them; a missing source is refused before any work, and other --extensions on a resume
    are refused naming the setting."""
    first, second = tmp_path / "first", tmp_path / "second"
    for root, name in ((first, "a.py"), (second, "b.py")):
        root.mkdir()
        (root / name).write_text(f"# {name}\n")
    out = tmp_path / "out.jsonl"
    missing = "file:///no/such/repo.git"
    argv = ["local", str(first), missing, "--out", str(out), "--no-progress"]
    assert main(argv) == 2  # the clone fails after the first source is collected
    assert "git clone" in capsys.readouterr().err
    assert [r["path"] for r in read_jsonl(out)] == ["a.py"]  # what was collected is kept
    assert main(["local", str(first), str(second), "--out", str(out), "--no-progress"]) == 0
    assert [r["path"] for r in read_jsonl(out)] == ["a.py", "b.py"]
    assert "already_done" in capsys.readouterr().err
    assert main(["local", str(first), str(tmp_path / "typo"), "--out", str(out),
                 "--no-progress"]) == 2  # every source is checked before any work
    assert "typo: not a directory or a git URL" in capsys.readouterr().err
    assert [r["path"] for r in read_jsonl(out)] == ["a.py", "b.py"]
    assert main(["local", str(first), "--out", str(out), "--extensions", ".kt",
                 "--no-progress"]) == 2
    assert "those that differ: extensions" in capsys.readouterr().err


def test_cli_help_and_bad_flags(tmp_path, capsys):
    """--help lists the subcommands; a bad date, a flag missing its value and --min-bytes above
    --max-bytes exit 2 naming the flag, without a traceback."""
    help_run = subprocess.run([sys.executable, "-m", "scraping", "--help"], cwd=ROOT,
                              capture_output=True, text=True)
    assert help_run.returncode == 0 and "github" in help_run.stdout
    out = str(tmp_path / "x.jsonl")
    assert main(["github", "--out", out, "--since", "2015-13-01", "--no-progress"]) == 2
    assert main(["github", "--out", out, "--extensions", "--no-progress"]) == 2
    assert main(["github", "--out", out, "--min-bytes", "10", "--max-bytes", "5"]) == 2
    err = capsys.readouterr().err
    assert "--since" in err and "--extensions" in err and "--max-bytes" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag, value", [
    ("--timeout", "-1"), ("--timeout", "0"), ("--timeout", "nan"), ("--max-repos", "-1"),
    ("--max-repos", "0"), ("--api-url", "notaurl"), ("--api-url", "ftp://example.com/api"),
    ("--api-url", "http://"), ("--api-url", "http://host:port/api"),
    ("--raw-url", "raw.example.com"), ("--raw-url", "https:///x"),
])
def test_bad_request_flags_are_refused_by_name_before_anything_is_written(flag, value, tmp_path,
                                                                          capsys):
    """--timeout -1, --api-url notaurl and --max-repos -1 are refused by flag before OUT and
    OUT.state are written, not failing at the first request in requests' words, or taken."""
    with FakeGitHub(_ranked_repos(2)) as fake:
        assert _cli_scrape(fake, tmp_path / "x.jsonl", flag, value) == 2
    assert fake.requests == []
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} ") and value in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_a_licence_typo_is_refused_before_scraping(tmp_path, capsys):
    """'permisive' matches no repository: every repo would be skipped as `license`, visible
    only in the counts after the whole scrape. It is refused at once, naming the value."""
    out = tmp_path / "x.jsonl"
    assert main(["github", "--out", str(out), "--licenses", "MIT", "permisive",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--licenses 'permisive': not a licence id GitHub reports" in err
    assert "did you mean 'permissive'?" in err and err.count("\n") == 1
    assert not out.exists()
    with pytest.raises(ValueError, match="'GPL3'.*did you mean 'GPL-3.0'"):
        run_scrape(tmp_path / "y.jsonl", licenses=["GPL3"])
    # GitHub's own ids pass in any case, as the filter compares them.
    _, summary, _, _ = run_scrape(tmp_path / "z.jsonl", licenses=["gpl-3.0", "NOASSERTION"])
    assert summary.repos["scraped"] == 1


def test_help_gives_every_flags_default():
    """README: every script's --help gives each flag's meaning and default."""
    from scraping.__main__ import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        for action in parser._actions:
            if action.option_strings and not action.required and action.dest != "help":
                assert "default" in action.help, f"{name} --{action.dest}: {action.help}"


def test_flags_read_lists_and_none_as_every_scripts_do():
    """The flags are settings.add_config_flags's, not a private copy of the dataclass-to-flags
    rule: `--extensions .kt,.kts` is two extensions and `--until none` no date."""
    from scraping.__main__ import build_parser

    def parse(*argv: str) -> dict:
        args = vars(build_parser().parse_args(argv))
        return {k: v for k, v in args.items() if k not in ("command", "verbose")}

    cfg = GitHubConfig(**parse("github", "--out", "x", "--extensions", ".kt,.kts", "--until",
                               "none", "--licenses", "MIT,Apache-2.0", "--no-progress"))
    assert cfg == GitHubConfig(out="x", extensions=[".kt", ".kts"], licenses=["MIT", "Apache-2.0"],
                               progress=False)
    local = LocalConfig(**parse("local", "a,b", "c", "--out", "o", "--license", "none"))
    assert local == LocalConfig(sources=["a,b", "c"], out="o")  # operands are never split


def test_local_skips_names_that_are_not_utf8(tmp_path):
    """A file whose name is not UTF-8 cannot be written as a JSON path: it is skipped and counted
    (not_utf8_name), and the rest of the tree is kept."""
    src = tmp_path / "repo"
    src.mkdir()
    (src / "ok.py").write_text("x = 1\n")
    with open(os.path.join(os.fsencode(src), b"\xff\xfe.py"), "wb") as f:
        f.write(b"y = 2\n")
    out = tmp_path / "out.jsonl"
    summary = collect_local(LocalConfig(sources=[str(src)], out=str(out), progress=False))
    assert [r["path"] for r in read_jsonl(out)] == ["ok.py"]
    assert summary.files["not_utf8_name"] == 1 and summary.files["kept"] == 1


def _unreadable(monkeypatch, files: list[Path], directories: list[Path]) -> None:
    """Reading ``files`` and listing ``directories`` fail as they do without the permission
    (the tests may run as root, whom chmod does not stop)."""
    read_bytes, scandir = Path.read_bytes, os.scandir

    def guarded_read(self):
        if self in files:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    def guarded_scandir(path="."):
        if Path(path) in directories:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(Path, "read_bytes", guarded_read)
    monkeypatch.setattr(os, "scandir", guarded_scandir)


def test_an_unreadable_file_or_directory_is_counted_and_named_and_the_rest_collected(
        tmp_path, monkeypatch, caplog):
    """A file that cannot be read and a directory that cannot be listed are left out, counted
    (``unreadable``) and named in a warning; the run goes on with the rest of the source, and
    dataset.py's reading of the same folder counts them alike."""
    src = tmp_path / "proj"
    for rel in ("a.py", "secret.py", "pkg/b.py", "open/c.py"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"# {rel}\nx = 1\n")
    _unreadable(monkeypatch, [src / "secret.py"], [src / "pkg"])
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, logger="scraping"):
        summary = collect_local(LocalConfig(sources=[str(src)], out=str(out), progress=False))
    assert [r["path"] for r in read_jsonl(out)] == ["a.py", "open/c.py"]
    assert summary.files["unreadable"] == 2 and summary.files["kept"] == 2
    assert str(src / "secret.py") in caplog.text and str(src / "pkg") in caplog.text
    from codelm.data.config import DataConfig
    from codelm.data.sources import iter_sources

    counts = Counter()
    docs = list(iter_sources(DataConfig(sources=[str(src)], progress=False), counts, [0]))
    assert sorted(doc.id for doc in docs) == ["proj/a.py", "proj/open/c.py"]
    assert counts["unreadable"] == 2


def test_an_unreadable_directory_git_ignores_is_no_loss(tmp_path, monkeypatch, caplog):
    """In a checkout, a directory its .gitignore names (a database volume owned by another
    user) is what a clone never holds: not listing it is neither counted nor warned about."""
    src = tmp_path / "proj"
    for rel in ("a.py", "db-data/dump.py", "pkg/b.py", ".gitignore"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("db-data/\n" if rel == ".gitignore" else f"# {rel}\nx = 1\n")
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    _unreadable(monkeypatch, [], [src / "db-data", src / "pkg"])
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, logger="scraping"):
        summary = collect_local(LocalConfig(sources=[str(src)], out=str(out), progress=False))
    assert [r["path"] for r in read_jsonl(out)] == ["a.py"]
    assert summary.files["unreadable"] == 1
    assert str(src / "pkg") in caplog.text and "db-data" not in caplog.text
    # a folder of clones: each clone's own .gitignore decides, a nested repository's
    # directories are its own (not counted), and one clone's answer does not spoil another's
    folder = tmp_path / "clones"
    for name in ("one", "two"):
        clone = folder / name
        for rel in ("a.py", "db-data/dump.py", ".gitignore", "vendor/lib/x.py"):
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            (clone / rel).write_text("db-data/\n" if rel == ".gitignore" else "x = 1\n")
        subprocess.run(["git", "init", "-q"], cwd=clone, check=True)
        subprocess.run(["git", "init", "-q"], cwd=clone / "vendor" / "lib", check=True)
    _unreadable(monkeypatch, [], [folder / "one" / "db-data", folder / "two" / "db-data",
                                  folder / "one" / "vendor" / "lib" / "cache",
                                  folder / "two" / "pkg"])
    (folder / "one" / "vendor" / "lib" / "cache").mkdir()
    (folder / "two" / "pkg").mkdir()
    walked = [(rel, why) for rel, _, why in walk_source_tree(folder, [".py"]) if why]
    assert ("two/pkg", "unreadable") in walked
    assert not [rel for rel, why in walked if why == "unreadable" and rel != "two/pkg"]


def test_an_output_path_that_is_a_directory_is_refused_before_any_work(tmp_path, capsys):
    """An --out that is a directory, or lies under a file, is refused naming --out before any
    source is read or request sent, and nothing is created."""
    src = tmp_path / "repo"
    src.mkdir()
    (src / "ok.py").write_text("x = 1\n")
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    assert main(["local", str(src), "--out", str(outdir), "--no-progress"]) == 2
    # Before any request: the API URL points nowhere.
    assert main(["github", "--out", str(outdir), "--since", RANGE[0], "--until", RANGE[1],
                 "--api-url", "http://127.0.0.1:9", "--no-progress"]) == 2
    assert main(["local", str(src), "--out", str(src / "ok.py" / "x.jsonl"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count(f"--out {outdir}: cannot create it (Is a directory)") == 2
    assert f"--out {src / 'ok.py' / 'x.jsonl'}: cannot create it" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir", "repo"]
    assert not any(outdir.iterdir())



@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_path_that_cannot_be_created_is_a_bad_path_naming_out(tmp_path, capsys):
    """Exit status 2 like the other bad paths, not a raw OSError with 1 (procfs refuses new
    files even to root, which chmod would not)."""
    src = tmp_path / "repo"
    src.mkdir()
    (src / "ok.py").write_text("x = 1\n")
    for out in ("/proc/codelm-no-such.jsonl", "/proc/codelm-no-such/x.jsonl"):
        assert main(["local", str(src), "--out", out, "--no-progress"]) == 2
        assert f"error: --out {out}: cannot create it (" in capsys.readouterr().err

# --- tokens, failing repos, concurrent runs, licences, excluded dirs, LFS pointers -------------
def _cli_scrape(fake: FakeGitHub, out: Path, *flags: str) -> int:
    return main(["github", "--out", str(out), "--api-url", fake.api_url, "--raw-url",
                 fake.raw_url, "--since", RANGE[0], "--until", RANGE[1], "--min-bytes", "1",
                 "--backoff", "0", "--no-progress", *flags])


def test_the_token_goes_to_githubs_hosts_and_never_to_a_raw_url_mirror(tmp_path, monkeypatch):
    """--raw-url may name any host (a mirror, a cache): the token is GitHub's, so it goes to
    the API's host alone (raw.githubusercontent.com too, over https); the mirror serves the
    files without it."""
    repos = _ranked_repos(2)
    with FakeGitHub(repos, token=TOKEN) as api, FakeGitHub(repos) as mirror:
        monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
        assert main(["github", "--out", str(tmp_path / "a.jsonl"), "--api-url", api.api_url,
                     "--raw-url", mirror.raw_url, "--since", RANGE[0], "--until", RANGE[1],
                     "--min-bytes", "1", "--backoff", "0", "--no-progress"]) == 0
        assert len(read_jsonl(tmp_path / "a.jsonl")) == 2
        assert api.auth_seen == {f"Bearer {TOKEN}"} and mirror.auth_seen == {None}
        assert any("/raw/" in path for path in mirror.requests)
    client = GitHubClient(token=TOKEN)
    assert "Authorization" in client._headers("https://raw.githubusercontent.com/a/b/c/d.py", "*")
    assert "Authorization" not in client._headers("http://raw.githubusercontent.com/a/b", "*")
    assert "Authorization" not in client._headers("https://mirror.example/a/b/c/d.py", "*")


def test_a_scrape_that_keeps_no_file_warns(tmp_path, capsys):
    """--extensions .kt on Python repos: exit 0, an empty output and every repo recorded done
    (the API quota spent), so a warning says that no file was kept."""
    with FakeGitHub(_ranked_repos(2)) as fake:
        assert _cli_scrape(fake, tmp_path / "kt.jsonl", "--extensions", ".kt") == 0
        assert "warning: no file kept (" in capsys.readouterr().err
        assert _cli_scrape(fake, tmp_path / "py.jsonl") == 0
        assert "warning" not in capsys.readouterr().err


def test_a_token_with_a_line_end_works_and_a_malformed_one_is_never_shown(tmp_path, capsys,
                                                                          monkeypatch):
    """A token saved with CRLF works; a malformed one is refused without quoting it (requests'
    InvalidHeader, printed as the error, would quote the whole token)."""
    with FakeGitHub(_ranked_repos(2), token=TOKEN) as fake:
        monkeypatch.setenv("GITHUB_TOKEN", TOKEN + "\r\n")
        assert _cli_scrape(fake, tmp_path / "a.jsonl") == 0
        assert fake.auth_seen == {f"Bearer {TOKEN}"}
        monkeypatch.setenv("GITHUB_TOKEN", "ghp_half\r\nghp_other")
        assert _cli_scrape(fake, tmp_path / "b.jsonl") == 2
        err = capsys.readouterr().err
        assert "GITHUB_TOKEN holds spaces, control or non-ASCII characters" in err
        assert "ghp_" not in err and "Traceback" not in err


def test_a_repo_github_keeps_failing_is_left_for_the_next_run_and_the_rest_go_on(tmp_path,
                                                                                capsys):
    """A file (or tree) that keeps answering 5xx does not stop the whole scrape (every re-run
    would stop on the same repo): that repo alone is not saved, the run says so (exit 1), and
    the next run retries it."""
    out = tmp_path / "out.jsonl"
    repos, expected = fake_corpus()
    faults = [("/jsonish/encoder.py", "500"), ("/repos/beta/webkit/git/trees/", "500")] * 2
    with FakeGitHub(repos, faults=faults, max_per_page=3) as fake:
        assert _cli_scrape(fake, out, "--retries", "1", "--min-bytes", "1000") == 1
        err = capsys.readouterr().err
        assert re.search(r"repos server_error +2\n", err)
        assert f"GitHub kept failing on 2 repos, which are not in {out}; re-run" in err
        assert {r["repo"] for r in read_jsonl(out)} == {
            repo for repo, _ in expected} - {"alpha/jsonish", "beta/webkit"}
        assert _cli_scrape(fake, out, "--retries", "1", "--min-bytes", "1000") == 0
        assert re.search(r"repos already_done +9\n", capsys.readouterr().err)
    # gamma vendors alpha's decoder.py: kept there first, it is alpha's duplicate now.
    moved = {("alpha/jsonish", "jsonish/decoder.py"), ("gamma/mailer", "vendored/decoder.py")}
    assert {(r["repo"], r["path"]) for r in read_jsonl(out)} == expected ^ moved
    assert len(read_jsonl(out)) == len(expected)


def test_a_file_that_never_matches_its_blob_leaves_its_repo_for_the_next_run(tmp_path,
                                                                            capsys):
    """Every download of a file misses its blob SHA: its repository is not saved (exit 1,
    server_error), and the same command run again ends with every file present, none twice."""
    from scraping.github import DOWNLOAD_ATTEMPTS

    out = tmp_path / "out.jsonl"
    repos, expected = fake_corpus()
    path, sha = _a_file_of(repos, expected, "gamma/mailer")
    needles = [f"/{quote(path)}", f"/git/blobs/{sha}"]  # the tries alternate: raw, blob, ...
    faults = [(needles[i % 2], "altered" if i else "truncated") for i in range(DOWNLOAD_ATTEMPTS)]
    with FakeGitHub(repos, faults=faults, max_per_page=3) as fake:
        assert _cli_scrape(fake, out, "--retries", "1", "--min-bytes", "1000") == 1
        err = capsys.readouterr().err
        assert re.search(r"repos server_error +1\n", err)
        assert "gamma/mailer" not in {r["repo"] for r in read_jsonl(out)}
        assert _cli_scrape(fake, out, "--retries", "1", "--min-bytes", "1000") == 0
        assert fake.faults == []
    keys = [(r["repo"], r["path"]) for r in read_jsonl(out)]
    assert len(keys) == len(set(keys)) and set(keys) == expected


def _refused_at(place: str) -> tuple[str, str, bool]:
    """(request substring, what the run names, whether the raw host is used) for a refusal of
    gamma/mailer's branch, tree or first kept file, or of beta/webkit's truncated sub-tree."""
    repos, expected = fake_corpus()
    path, sha = _a_file_of(repos, expected, "gamma/mailer")
    webkit = next(r for r in repos if r.full_name == "beta/webkit").tree_sha("webkit")
    return {
        "raw": (f"/{quote(path)}", path, True),
        "blob": (f"/git/blobs/{sha}", path, False),
        "tree": ("/repos/gamma/mailer/git/trees/", "tree", True),
        "subtree": (f"/repos/beta/webkit/git/trees/{webkit}", "tree", True),
        "branch": ("/repos/gamma/mailer/branches/", "branch main", True),
    }[place]


# Every place with 404, 403 (the client's rate-limit and the branch's block checks read it)
# and 409 (GitHub's answer for an empty repository: a tree's refusal, the branch's check) where
# it is read apart; a 410, which every place reads as a 404, once, and the rest in the slow suite
# (quick cover: the same place's 404 case).
_SLOW_REFUSALS = {("raw", "409"), ("blob", "409"), ("blob", "410"), ("tree", "410"),
                  ("subtree", "410"), ("branch", "410")}


@pytest.mark.parametrize("place, status", [
    pytest.param(place, status, id=f"{place}-{status}",
                 marks=[pytest.mark.slow] if (place, status) in _SLOW_REFUSALS else [])
    for status in ["404", "403", "409", "410"]
    for place in ["raw", "blob", "tree", "subtree", "branch"]])
def test_a_single_refusal_of_content_at_a_commit_loses_no_file(tmp_path, place, status):
    """Branches, trees and files are read at a fixed commit: a 404, 403, 409 or 410 there is a
    replica or cache behind far more often than a file gone (a 409 names an empty repository
    only where its branch is not found). It is asked again after a pause (a file by blob SHA,
    then raw), so every file is kept and no repository or sub-tree is taken for empty."""
    needle, _, raw = _refused_at(place)
    out = tmp_path / "code.jsonl"
    fake, summary, expected, sleep = run_scrape(out, [(needle, status)], raw=raw)
    assert fake.faults == []  # the refusal was served
    keys = [(r["repo"], r["path"]) for r in read_jsonl(out)]
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert summary.repos["scraped"] == 10 and summary.repos["empty"] == 1
    assert summary.files["kept"] == len(expected) and len(sleep.calls) >= 1


@pytest.mark.parametrize("place", ["raw", "blob", "tree", "branch"])
def test_a_lasting_refusal_leaves_its_repo_for_the_next_run_naming_it(tmp_path, capsys, place):
    """A refusal that outlasts every try (the file by raw and by blob) leaves the repository
    unsaved: the run names it, what was refused and the status, and exits 1; the same command
    run once the refusal ends keeps every file, none twice. The tries are bounded."""
    needle, named, raw = _refused_at(place)
    blob_needle = _refused_at("blob")[0]
    faults = [(needle, "404")] * 10 + [(blob_needle, "410")] * 10
    flags = ["--min-bytes", "1000"] + ([] if raw else ["--raw-url", ""])
    out = tmp_path / "out.jsonl"
    repos, expected = fake_corpus()
    with FakeGitHub(repos, faults=faults, max_per_page=3) as fake:
        assert _cli_scrape(fake, out, *flags) == 1
        err = capsys.readouterr().err
        assert re.search(r"repos unavailable +1\n", err)
        assert f"gamma/mailer is not saved (a re-run retries it): {named}" in err
        assert "HTTP 404" in err
        assert "GitHub kept failing on 1 repos, which are not in" in err
        assert "gamma/mailer" not in {r["repo"] for r in read_jsonl(out)}
        assert sum(n == needle for n, _ in fake.faults) >= 5  # bounded: refusals left unasked
        fake.faults.clear()
        assert _cli_scrape(fake, out, *flags) == 0
    keys = [(r["repo"], r["path"]) for r in read_jsonl(out)]
    assert len(keys) == len(set(keys)) and set(keys) == expected


@pytest.mark.parametrize("status", [451, 403])
def test_a_blocked_repo_is_recorded_done_and_named(tmp_path, capsys, status):
    """GitHub's block (451 for a legal takedown, 403 with a ``block`` object for its terms)
    answers every request of the repository on every run: it is recorded done with no file and
    named, the others are scraped, and a re-run does not ask for it again."""
    repos = _ranked_repos(3)
    repos[1].blocked = status
    out = tmp_path / "out.jsonl"
    with FakeGitHub(repos) as fake:
        assert _cli_scrape(fake, out) == 0
        err = capsys.readouterr().err
        assert re.search(rf"repos http_{status} +1\n", err)
        assert "o/r1: blocked by GitHub" in err
        assert {r["repo"] for r in read_jsonl(out)} == {"o/r0", "o/r2"}
        asked = len(fake.requests)
        assert _cli_scrape(fake, out) == 0
        assert re.search(r"repos already_done +3\n", capsys.readouterr().err)
        assert not any("/o/r1/" in p for p in fake.requests[asked:])


def test_an_empty_repo_is_recorded_empty_without_a_wait(tmp_path):
    """GitHub answers an empty repository's branch with 404 and its tree with 409 ("Git
    Repository is empty"): that is recorded done as empty at once, with no pause or retry."""
    sleep = RecordingSleep()
    with FakeGitHub([FakeRepo("o/empty", 500, "2020-01-01", empty=True)]) as fake:
        summary = scrape_github(config(fake, tmp_path / "out.jsonl", min_bytes=1),
                                make_client(fake, sleep))
    assert summary.repos["empty"] == 1 and sleep.calls == []
    assert read_jsonl(tmp_path / "out.jsonl.state")[1]["repo"] == "o/empty"


MALFORMED_REPLIES = [  # 200 replies that are not what GitHub sends
    ("/repos/alpha/jsonish/git/trees/", 'body:{"sha": "x", "tree": "not-a-list"}'),
    ("/repos/alpha/jsonish/branches/", 'body:{"name": "main", "commit": null}'),
    ("/repos/alpha/jsonish/git/trees/", 'body:{"sha": "x", "tree": [{"path": "a.py", "sha"'),
    ("/repos/alpha/jsonish/git/trees/", 'body:{"sha": "x", "tree": [{"path": 1, "sha": "y"}]}'),
]


@pytest.mark.parametrize("fault", [kind for _, kind in MALFORMED_REPLIES],
                         ids=["tree-not-a-list", "commit-null", "cut-off-json", "path-not-str"])
def test_a_malformed_reply_leaves_its_repo_for_the_next_run(tmp_path, capsys, caplog, fault):
    """A 200 of the wrong shape leaves that repository alone for the next run, naming the URL,
    and the others are scraped: no traceback."""
    out = tmp_path / "out.jsonl"
    repos, expected = fake_corpus()
    needle = next(n for n, kind in MALFORMED_REPLIES if kind == fault)
    with FakeGitHub(repos, faults=[(needle, fault)], max_per_page=3) as fake:
        assert _cli_scrape(fake, out, "--retries", "1", "--min-bytes", "1000") == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and re.search(r"repos server_error +1\n", err)
        assert "alpha/jsonish is not saved (a re-run" in caplog.text
        assert "GET http://127.0.0.1" in caplog.text
        assert {r["repo"] for r in read_jsonl(out)} == {r for r, _ in expected} - {"alpha/jsonish"}
        assert _cli_scrape(fake, out, "--retries", "1", "--min-bytes", "1000") == 0  # retried


def test_a_search_reply_without_its_total_stops_the_run_resumably(tmp_path, capsys):
    """A search reply lacking total_count (not GitHub's shape) stops the run, exit 1, saying that
    progress is saved; the rerun then finishes every repo."""
    out = tmp_path / "out.jsonl"
    repos, expected = fake_corpus()
    with FakeGitHub(repos, faults=[("/search/repositories", 'body:{"items": []}')],
                    max_per_page=3) as fake:
        assert _cli_scrape(fake, out, "--retries", "1", "--min-bytes", "1000") == 1
        assert "another shape than GitHub's; progress is saved" in capsys.readouterr().err
        assert _cli_scrape(fake, out, "--retries", "1", "--min-bytes", "1000") == 0
    assert {r["repo"] for r in read_jsonl(out)} == {r for r, _ in expected}


def test_an_outage_stops_the_run_and_rate_limits_still_do(tmp_path):
    """Five repos failing in a row is GitHub down, not one broken repo: the run stops (as a
    spent rate limit does) instead of marking every repo after it as failed."""
    out = tmp_path / "out.jsonl"
    with FakeGitHub(_ranked_repos(), faults=[("/branches/", "500")] * 5) as fake:
        with pytest.raises(GitHubError, match="GitHub failed 5 repos in a row"):
            scrape_github(config(fake, out, min_bytes=1), make_client(fake, retries=0))
    assert not out.with_name("out.jsonl.state").exists()  # it failed with no repo recorded
    with FakeGitHub(_ranked_repos(), faults=[("/branches/", "429")] * 2) as fake:
        with pytest.raises(GitHubError, match="failed 2 times") as info:
            scrape_github(config(fake, out, min_bytes=1), make_client(fake, retries=1))
    assert not isinstance(info.value, ServerError)


def test_failures_apart_from_each_other_are_no_outage(tmp_path):
    """Only failures in a row are an outage: a good repo resets the counter, so five failing
    repos with good ones between them do not stop the run. They are five repos left for the
    next run, and the four between them are scraped."""
    faults = [(f"/repos/o/r{i}/branches/", "500") for i in (0, 2, 4, 6, 8)]
    with FakeGitHub(_ranked_repos(), faults=faults) as fake:
        summary = scrape_github(config(fake, tmp_path / "out.jsonl", min_bytes=1),
                                make_client(fake, retries=0))
    assert summary.repos["server_error"] == 5 and summary.repos["scraped"] == 4


def test_repos_refused_for_good_are_no_outage_and_never_stall_a_rerun(tmp_path):
    """Five repos in a row whose file GitHub refuses (404 by raw and by blob API, every try)
    are answers, not GitHub down: each is left for the next run (unavailable) and the repos
    ranked after them are scraped, by the first run and every run after it."""
    bad = [f"o/r{i}" for i in range(1, 6)]
    faults = [(f"/{repo}/", "404") for repo in bad for _ in range(40)]
    out = tmp_path / "out.jsonl"
    with FakeGitHub(_ranked_repos()) as fake:
        for _ in range(2):
            fake.faults = list(faults)
            summary = scrape_github(config(fake, out, min_bytes=1), make_client(fake, retries=0))
            assert summary.repos["unavailable"] == 5
    assert sorted({r["repo"] for r in read_jsonl(out)}) == ["o/r0", "o/r6", "o/r7", "o/r8"]


def test_a_second_run_on_the_same_output_is_refused(tmp_path, capsys):
    """A second run on an output in use is refused: two runs appending to one output would write
    duplicates, and a resume would cut the file under the other's appends (a truncated JSON
    line)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("a = 1\n")
    out = tmp_path / "out.jsonl"
    argv = ["local", str(src), "--out", str(out), "--no-progress"]
    with ResumableOutput(out, tmp_path / "out.jsonl.state", {}):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert all(w in err for w in (str(out), "another run", "same --out", "wait for it",
                                      "another --out")), err
    assert out.read_bytes() == b""
    (tmp_path / "out.jsonl.state").unlink()
    assert main(argv) == 0 and main(argv) == 0  # released at the end of each run
    assert [r["path"] for r in read_jsonl(out)] == ["a.py"]


def test_an_empty_licence_list_is_refused(tmp_path, capsys):
    """``--licenses`` with no id would skip every repo and lock the output to that: the flag,
    a list flag of the settings module's, needs one id (as every list flag does); the config
    refuses an empty list."""
    assert main(["github", "--out", str(tmp_path / "x.jsonl"), "--licenses", "--api-url",
                 "http://127.0.0.1:9", "--retries", "0", "--no-progress"]) == 2
    assert "argument --licenses: expected at least one argument" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(ValueError, match="--licenses: give at least one licence id"):
        run_scrape(tmp_path / "y.jsonl", licenses=[])
    assert not (tmp_path / "y.jsonl").exists()


def test_licences_are_stored_as_github_spells_them_so_a_rerun_in_another_case_resumes(
        tmp_path, github):
    """Licence names match in any case and are stored as GitHub spells them (MIT, Apache-2.0), so
    the same filter typed in another case resumes instead of reading as other settings."""
    assert expand_licenses(["mit", "APACHE-2.0"]) == {"MIT", "Apache-2.0"}
    out = tmp_path / "out.jsonl"
    run_scrape(out, licenses=["MIT", "Apache-2.0"], max_repos=1, fake=github)
    run_scrape(out, licenses=["mit", "apache-2.0"], fake=github)  # not "those that differ: licenses"


def test_local_license_is_one_id_of_the_github_table(tmp_path, capsys):
    """``scraping local --license`` takes only an id of GitHub's table: typos and 'permissive'
    are refused, not recorded."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("a = 1\n")
    local = ["local", str(src), "--no-progress", "--license"]
    assert main([*local, "MTI", "--out", str(tmp_path / "l1.jsonl")]) == 2
    assert main([*local, "permissive", "--out", str(tmp_path / "l2.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--license 'MTI': not a licence id GitHub reports; did you mean 'MIT'?" in err
    assert "--license 'permissive'" in err and err.count("\n") == 2
    assert main([*local, "apache-2.0", "--out", str(tmp_path / "l3.jsonl")]) == 0
    assert [r["license"] for r in read_jsonl(tmp_path / "l3.jsonl")] == ["Apache-2.0"]


# Short excerpts of licence texts, each holding the phrases that tell its licence apart (the
# whole texts are the licences' own; the test below reads the copies this machine has).
LICENCE_EXCERPTS = {
    "MIT": "MIT License\n\nCopyright (c) 2026 A. Author\n\nPermission is hereby granted, free "
           "of charge, to any person\nobtaining a copy of this software [...]\n\nThe above "
           "copyright notice and this permission notice\nshall be included in all copies.\n",
    "MIT-0": "Permission is hereby granted, free of charge, to any person obtaining a copy "
             "[...] to do so.\n",
    "ISC": "ISC License\n\nPermission to use, copy, modify, and/or distribute this software "
           "for any purpose\nwith or without fee is hereby granted, provided that the above "
           "copyright notice\nand this permission notice appear in all copies.\n",
    "0BSD": "Permission to use, copy, modify, and/or distribute this software for any purpose "
            "with or without fee is hereby granted.\n",
    "BSD-2-Clause": "Redistribution and use in source and binary forms, with or without\n"
                    "modification, are permitted provided that [...]\n",
    "BSD-3-Clause": "Redistribution and use in source and binary forms [...]\n3. Neither the "
                    "name of the copyright holder nor the names of its contributors may be "
                    "used to endorse or promote products derived from this software [...]\n"
                    "This file's vendored code may be used under the GNU General Public "
                    "License, version 3.\n",
    "NCSA": "University of Illinois/NCSA Open Source License\n\nPermission is hereby granted, "
            "free of charge, to any person obtaining a copy [...]\n* Neither the names of the "
            "LLVM Team, nor the names of its contributors may be used to endorse or promote "
            "products derived from this Software without specific prior written permission.\n",
    "BSD-4-Clause": "Redistribution and use in source and binary forms [...]\n3. All "
                    "advertising materials mentioning features or use of this software\n"
                    "[...]\n4. Neither the name of the copyright holder [...]\n",
    "Apache-2.0": "                                 Apache License\n                           "
                  "Version 2.0, January 2004\n\n   TERMS AND CONDITIONS FOR USE, "
                  "REPRODUCTION, AND DISTRIBUTION\n",
    "GPL-2.0": "GNU GENERAL PUBLIC LICENSE\nVersion 2, June 1991\n[...] use the GNU Lesser "
               "General Public License instead of this License.\n",
    "GPL-3.0": "                    GNU GENERAL PUBLIC LICENSE\n                       Version 3, "
               "29 June 2007\n[...] 13. Use with the GNU Affero General Public License. "
               "[...] version 3 of the GNU Affero General Public License [...] use the GNU "
               "Lesser General Public License instead of this License.\n",
    "LGPL-2.1": "GNU LESSER GENERAL PUBLIC LICENSE\nVersion 2.1, February 1999\n[...] the "
                "GNU General Public License [...]\n",
    "LGPL-3.0": "GNU LESSER GENERAL PUBLIC LICENSE\nVersion 3, 29 June 2007\n[...] version 3 "
                "of the GNU General Public License [...]\n",
    "AGPL-3.0": "GNU AFFERO GENERAL PUBLIC LICENSE\nVersion 3, 19 November 2007\n[...] 13. "
                "Remote Network Interaction; Use with the GNU General Public License.\n",
    "MPL-2.0": "Mozilla Public License Version 2.0\n1.1. \"Contributor\" means each "
               "individual or legal entity [...]\n1.12. \"Secondary License\" means either "
               "the GNU General Public License, Version 2.0, the GNU Lesser General Public "
               "License, Version 2.1, the GNU Affero General Public License, Version 3.0\n",
    "Unlicense": "This is free and unencumbered software released into the public domain.\n",
    "Zlib": "  zlib License\n  ------------\n\n  Copyright (C) 2010 - 2019 A. Author\n\n  This "
            "software is provided 'as-is', without any express or implied\n  warranty.  In no "
            "event will the authors be held liable for any damages\n  arising from the use of "
            "this software.\n\n  Permission is granted to anyone to use this software for any "
            "purpose,\n  [...] subject to the following restrictions:\n  1. The origin of this "
            "software must not be misrepresented [...]\n  2. Altered source versions must be "
            "plainly marked as such, and must not be\n     misrepresented as being the original "
            "software.\n  3. This notice may not be removed or altered from any source "
            "distribution.\n",
    "NOASSERTION": "Copyright 2026 A. Author. All rights reserved; ask before you use it.\n",
}


@pytest.mark.parametrize("expected", list(LICENCE_EXCERPTS))
def test_a_licence_text_is_named_by_its_distinctive_phrases(expected):
    """Texts quote each other (the GPL-3.0 names the AGPL and LGPL, the MPL-2.0 every GNU
    licence, BSD-3 holds BSD-2's words): each is named as itself, never as one it quotes."""
    assert license_of_text(LICENCE_EXCERPTS[expected]) == expected


def test_ncsas_developed_by_block_is_no_preamble():
    """NCSA's text names its developers in a block of short lines (blank lines between them)
    before the permission: its title and that block are not a notice above the licence."""
    text = ("University of Illinois/NCSA\nOpen Source License\n\nCopyright (c) 2003-2019 "
            "University of Illinois at Urbana-Champaign.\nAll rights reserved.\n\nDeveloped "
            "by:\n\n    LLVM Team\n\n    University of Illinois at Urbana-Champaign\n\n    "
            "http://llvm.org\n\n" + LICENCE_EXCERPTS["NCSA"].split("\n\n", 1)[1])
    assert license_of_text(text) == "NCSA"


@pytest.mark.parametrize("preamble, expected", [
    ("The MIT License (MIT)\n\nCopyright (c) 2015-2026 Jane Doe <jane@example.org>\n"
     "                        and contributors\nAll rights reserved.\n\n", "MIT"),
    ("SPDX-License-Identifier: MIT\nThis project is licensed under the terms of the MIT "
     "license, as follows:\n\n", "MIT"),
    ("Copyright 2026 Acme Corp. All rights reserved.\nThis software is proprietary and "
     "confidential. Unauthorized copying of this file, via any medium, is strictly "
     "prohibited.\n\nThird-party notices:\n\n", "NOASSERTION"),
    ("A. HISTORY OF THE SOFTWARE\n\nThis program was created in the early 1990s at a "
     "research institute as a successor of another language.\n\n", "NOASSERTION"),
])
def test_text_before_a_licence_other_than_its_title_and_copyright_makes_it_unrecognised(
        preamble, expected):
    """A title, copyright lines and a short line naming the licence may come before it; a
    proprietary notice above a bundled MIT text is not the MIT licence (GitHub, which compares
    the whole file, recognises neither)."""
    assert license_of_text(preamble + LICENCE_EXCERPTS["MIT"]) == expected


@pytest.mark.parametrize("clause", [
    "3. Neither the name of the copyright holder nor the names of its contributors may be used "
    "to endorse or promote products derived from this software without specific prior written "
    "permission.",
    "3. The name of the author may not be used to endorse or promote products derived from "
    "this software without specific prior written permission.",
    "* Neither the names of Foo Inc. nor the names of its\n  contributors may be used to "
    "endorse or promote products derived from this software [...]",
])
def test_every_wording_of_bsd_3s_third_clause_is_bsd_3(clause):
    """The clause that makes BSD-3 of BSD-2 has several wordings in real licence files; each
    forbids using a name to endorse or promote products."""
    text = ("Copyright (c) 2026, A. Author\nAll rights reserved.\n\nRedistribution and use in "
            "source and binary forms, with or without\nmodification, are permitted [...]\n"
            + clause + "\n")
    assert license_of_text(text) == "BSD-3-Clause"


@pytest.mark.parametrize("first, then", [("Apache-2.0", "MPL-2.0"), ("BSD-3-Clause", "GPL-3.0"),
                                         ("MIT", "LGPL-2.1"), ("BSD-2-Clause", "Apache-2.0"),
                                         ("MIT", "BSD-3-Clause"), ("BSD-2-Clause", "BSD-3-Clause"),
                                         ("BSD-2-Clause", "BSD-4-Clause"), ("NCSA", "MIT")])
def test_a_licence_followed_by_its_bundled_codes_licences_is_the_first(first, then):
    """grpc's LICENSE is Apache-2.0 then MPL-2.0, scipy's and numpy's BSD-3-Clause then a
    runtime's GPL-3.0: they read as the MPL and the GPL, the row earlier in the table. A row's
    phrases count within one licence's text only: MIT's opening and a bundled BSD-3's clause
    are not NCSA, nor BSD-2's opening and a bundled BSD-4's advertising clause BSD-4."""
    text = LICENCE_EXCERPTS[first] + "\n\nBundled code:\n\n" + LICENCE_EXCERPTS[then]
    assert license_of_text(text) == first


@pytest.mark.parametrize("mention", ["Except assets/palette.json: CC0 1.0 Universal.",
                                     "docs/ are under the Eclipse Public License v 2.0 too",
                                     "* vendor/boost: Boost Software License - Version 1.0"])
def test_a_licence_title_mentioned_inside_a_line_does_not_name_the_file(mention):
    """A note above a project's licence that mentions another's title (a bundled asset's) is
    no licence text: the GPL after it is the file's licence; the title heading its own line
    names it."""
    gpl = LICENCE_EXCERPTS["GPL-3.0"]
    assert license_of_text(f"Licensed under the GPL version 3, below.\n{mention}\n\n{gpl}") == (
        "GPL-3.0")
    assert license_of_text(f"CC0 1.0 Universal\n\n{gpl}") == "CC0-1.0"


# Debian's base-files copies of licence texts (file name -> id), read when the machine has them.
COMMON_LICENSES = Path("/usr/share/common-licenses")
DEBIAN_TEXTS = {"Apache-2.0": "Apache-2.0", "BSD": "BSD-3-Clause", "CC0-1.0": "CC0-1.0",
                "GFDL-1.3": "GFDL-1.3", "GPL-2": "GPL-2.0", "GPL-3": "GPL-3.0",
                "LGPL-2.1": "LGPL-2.1", "LGPL-3": "LGPL-3.0", "MPL-2.0": "MPL-2.0",
                "GPL-1": "NOASSERTION", "LGPL-2": "NOASSERTION", "MPL-1.1": "NOASSERTION",
                "GFDL-1.2": "NOASSERTION", "Artistic": "NOASSERTION"}


@pytest.mark.skipif(not COMMON_LICENSES.is_dir(), reason="no /usr/share/common-licenses")
def test_whole_licence_texts_from_the_system_are_named_as_their_files_say():
    """The excerpts above are ours; these are the licences' full texts (independent of this
    code): the GPL-3.0 quotes the AGPL and LGPL, the MPL-2.0 every GNU licence, the GPL-1 and
    LGPL-2.0 (which GitHub does not list) read like their successors."""
    texts = {name: COMMON_LICENSES / name for name in DEBIAN_TEXTS
             if (COMMON_LICENSES / name).is_file()}
    assert len(texts) >= 5, sorted(p.name for p in COMMON_LICENSES.iterdir())
    got = {name: license_of_text(path.read_text(errors="replace"))
           for name, path in texts.items()}
    assert got == {name: DEBIAN_TEXTS[name] for name in texts}


def test_every_licence_row_is_an_id_github_reports_and_reachable():
    """An id spelled otherwise than GitHub spells it would never match ``--licenses``; a row
    whose phrases an earlier row also matches would never be reached."""
    for license_id, phrases in LICENSE_PHRASES:
        assert license_id in KNOWN_LICENSES
        assert license_of_text(" ".join(phrases)) == license_id, phrases


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    ({"LICENSE": LICENCE_EXCERPTS["MIT"]}, "MIT"),
    ({"licence.txt": LICENCE_EXCERPTS["ISC"]}, "ISC"),
    ({"LICENSE.md": LICENCE_EXCERPTS["Apache-2.0"]}, "Apache-2.0"),
    ({"copying": LICENCE_EXCERPTS["GPL-3.0"]}, "GPL-3.0"),
    ({"UNLICENSE": LICENCE_EXCERPTS["Unlicense"]}, "Unlicense"),
    ({"COPYRIGHT.txt": LICENCE_EXCERPTS["NCSA"]}, "NCSA"),
    ({"MIT-LICENSE": LICENCE_EXCERPTS["MIT"]}, "MIT"),
    ({"LICENSE.BSD": LICENCE_EXCERPTS["BSD-2-Clause"]}, "BSD-2-Clause"),
    ({"LICENSE": "Do as you please, but call me.\n"}, "NOASSERTION"),
    ({"COPYING": LICENCE_EXCERPTS["GPL-3.0"], "COPYING.LESSER": LICENCE_EXCERPTS["LGPL-3.0"]},
     "LGPL-3.0"),
    ({"LICENSE-MIT": LICENCE_EXCERPTS["MIT"],
      "LICENSE-APACHE-2.0.txt": LICENCE_EXCERPTS["Apache-2.0"]}, "NOASSERTION"),
    ({"LICENSE": LICENCE_EXCERPTS["MIT"], "COPYING": LICENCE_EXCERPTS["MIT"]}, "MIT"),
    ({"LICENSE": LICENCE_EXCERPTS["MIT"], "COPYRIGHT": "Copyright (c) 2020 Jane Doe\n"}, "MIT"),
    ({"COPYRIGHT": "Copyright (c) 2020 Jane Doe\n"}, "NOASSERTION"),
    ({"LICENSE": LICENCE_EXCERPTS["MIT"], "licenseheader.txt": "/* (c) ACME */\n",
      "LICENSES.md": "Third-party: see below.\n"}, "MIT"),
    ({"a.py": "x = 1\n", "license.py": LICENCE_EXCERPTS["MIT"],
      "license_check.py": "x = 1\n", "LICENSE.JSON": LICENCE_EXCERPTS["MIT"],
      "docs/LICENSE": LICENCE_EXCERPTS["MIT"],
      "LICENSES/MIT.txt": LICENCE_EXCERPTS["MIT"], "README.md": LICENCE_EXCERPTS["MIT"]}, None),
], ids=["LICENSE", "licence.txt", "LICENSE.md", "copying", "UNLICENSE", "COPYRIGHT", "MIT-LICENSE",
        "LICENSE.BSD", "unknown", "GPL+LESSER", "dual", "agree", "notice-beside",
        "notice-alone", "not-a-licence-name", "none-at-top"])
def test_a_trees_licence_is_read_from_its_top_level_licence_files(tmp_path, files, expected):
    """A local tree's licence is read from its top-level licence files (LICENSE, COPYING, ...):
    a known text gives its SPDX id, an unknown text or two different licences NOASSERTION, and
    code, nested and README files are never read as one."""
    assert detect_license(_tree(tmp_path / "src", files)) == expected


def test_a_licence_file_linking_out_of_its_tree_is_not_read(tmp_path):
    """A cloned repository's LICENSE may be a link to anywhere on the machine."""
    src = _tree(tmp_path / "src", {"docs/LICENSE.txt": LICENCE_EXCERPTS["MIT"]})
    (tmp_path / "outside").write_text(LICENCE_EXCERPTS["GPL-3.0"])
    (src / "LICENSE").symlink_to(tmp_path / "outside")
    assert detect_license(src) is None
    (src / "LICENSE").unlink()
    (src / "LICENSE").symlink_to("docs/LICENSE.txt")
    assert detect_license(src) == "MIT"


def test_local_records_each_sources_own_licence(tmp_path, capsys):
    """Each local record names its own source's LICENSE, not ``license: null``, nor one
    --license for the run, which would mislabel one of an MIT and a GPL repo collected together."""
    sources = {
        "mit": {"LICENSE": LICENCE_EXCERPTS["MIT"], "a.py": "a = 1\n"},
        "gpl": {"COPYING": LICENCE_EXCERPTS["GPL-3.0"], "b.py": "b = 1\n"},
        "odd": {"LICENSE.md": "Free for good uses only.\n", "c.py": "c = 1\n"},
        "bare": {"d.py": "d = 1\n"},
    }
    roots = [str(_tree(tmp_path / name, files)) for name, files in sources.items()]
    out = tmp_path / "out.jsonl"
    assert main(["local", *roots, "--out", str(out), "--no-progress"]) == 0
    assert {r["repo"]: r["license"] for r in read_jsonl(out)} == {
        "mit": "MIT", "gpl": "GPL-3.0", "odd": "NOASSERTION", "bare": None}
    assert "repos collected" in capsys.readouterr().err
    stamped = tmp_path / "stamped.jsonl"
    assert main(["local", *roots[:2], "--out", str(stamped), "--license", "apache-2.0",
                 "--no-progress"]) == 0  # the user's word wins over the licence files
    assert {r["repo"]: r["license"] for r in read_jsonl(stamped)} == {
        "mit": "Apache-2.0", "gpl": "Apache-2.0"}
    assert main(["local", *roots, "--out", str(stamped), "--no-progress"]) == 2
    assert "those that differ: license" in capsys.readouterr().err  # a resume keeps its licence rule


def test_local_licenses_filters_sources_as_github_does(tmp_path, capsys):
    """``--licenses`` of ``scraping github`` for local sources, git URLs included: a source
    outside it is counted under `license` and recorded done; `none` is no licence file."""
    work = _tree(tmp_path / "work", {"COPYING": LICENCE_EXCERPTS["GPL-3.0"], "g.py": "g = 1\n"})
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "one"]):
        subprocess.run(git + args, cwd=work, check=True, capture_output=True)
    subprocess.run(git + ["clone", "-q", "--bare", str(work), str(tmp_path / "gpl.git")],
                   check=True)
    sources = [str(_tree(tmp_path / "mit", {"LICENSE": LICENCE_EXCERPTS["MIT"],
                                            "a.py": "a = 1\n"})),
               (tmp_path / "gpl.git").as_uri(),
               str(_tree(tmp_path / "bare", {"b.py": "b = 1\n"}))]
    out = tmp_path / "out.jsonl"
    argv = ["local", *sources, "--out", str(out), "--no-progress", "--licenses"]
    assert main([*argv, "permissive", "none"]) == 0
    assert {r["repo"]: r["license"] for r in read_jsonl(out)} == {"mit": "MIT", "bare": None}
    err = capsys.readouterr().err
    assert re.search(r"repos license +1\n", err) and re.search(r"repos collected +2\n", err)
    assert main([*argv, "PERMISSIVE", "None"]) == 0  # the same filter resumes, skipping all
    assert re.search(r"repos already_done +3\n", capsys.readouterr().err)
    assert main([*argv, "GPL-3.0"]) == 2
    assert "those that differ: licenses" in capsys.readouterr().err
    assert main([*argv, "GPL-3.0", "--out", str(tmp_path / "gpl.jsonl")]) == 0
    assert {r["repo"] for r in read_jsonl(tmp_path / "gpl.jsonl")} == {sources[1]}
    assert main([*argv, "MIT", "--license", "GPL-3.0", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--license GPL-3.0 is not one of --licenses" in capsys.readouterr().err


@pytest.mark.parametrize("head, words", [
    ({"settings": {}}, ("out.jsonl.state", "format_version None", "new --out")),
    ({"format_version": 2, "settings": {}}, ("format_version 2", "new --out")),
    ({"format_version": 1}, ("out.jsonl.state:1", "not a scraper state file", "new --out")),
])
def test_a_state_file_of_another_format_is_refused(tmp_path, capsys, head, words):
    """A state file of another format_version, or no scraper state file at all, is refused naming
    the file, what it holds and the way out (a new --out); the output is left as it was."""
    src = _tree(tmp_path / "src", {"a.py": "a = 1\n"})
    out = tmp_path / "out.jsonl"
    out.write_text("")
    (tmp_path / "out.jsonl.state").write_text(json.dumps(head) + "\n")
    assert main(["local", str(src), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert out.read_text() == ""


def test_a_multi_word_language_is_one_search_term(tmp_path):
    """A language of two words ("Jupyter Notebook") is quoted in the search query, one term, so
    only that language's repos are scraped."""
    repos = [FakeRepo("o/nb", 500, "2020-01-01", language="Jupyter Notebook",
                      files={"a.py": b"x = 1\n"}), *_ranked_repos(2)]
    cfg = GitHubConfig(out="x.jsonl", language="Jupyter Notebook")
    assert build_query(cfg) == 'stars:>100 language:"Jupyter Notebook"'
    with FakeGitHub(repos) as fake:
        summary = scrape_github(config(fake, tmp_path / "nb.jsonl", min_bytes=1,
                                       language="Jupyter Notebook"), make_client(fake))
    assert summary.repos["scraped"] == 1
    assert [r["repo"] for r in read_jsonl(tmp_path / "nb.jsonl")] == ["o/nb"]


def test_local_skips_the_directories_dataset_skips(tmp_path):
    """A virtualenv's packages are not collected (nor stamped with --license), as dataset.py's
    reader of the same directory skips them."""
    src = tmp_path / "proj"
    for rel in ("app/main.py", ".venv/lib/python3.11/site-packages/req/api.py",
                "node_modules/pkg/setup.py", "app/__pycache__/m.py", "lib/site-packages/x.py",
                ".tox/py311/y.py"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"# {rel}\nx = 1\n")
    out = tmp_path / "out.jsonl"
    collect_local(LocalConfig(sources=[str(src)], out=str(out), license="MIT", progress=False))
    assert [r["path"] for r in read_jsonl(out)] == ["app/main.py"]
    listing = source_listing(str(src), [".py"])
    assert [p.relative_to(listing.root).as_posix() for p in listing.files] == ["app/main.py"]


def test_local_and_dataset_walk_a_tree_alike(tmp_path):
    """dataset.py and ``scraping local`` match extensions alike (``B.PY`` in both): one corpus
    from one directory. The one difference is deliberate: a link to a file inside the user's
    own directory is read (dataset.py), never out of a clone (scraping local); a link out of
    the directory is read by neither."""
    src = tmp_path / "proj"
    for rel in ("a.py", "B.PY", "z.py", "pkg/x.py", "notes.md", ".venv/lib/v.py"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"# {rel}\nx = 1\n")
    (tmp_path / "outside.py").write_text("secret = 1\n")
    (src / "link.py").symlink_to(tmp_path / "outside.py")
    (src / "inside.py").symlink_to("pkg/x.py")
    out = tmp_path / "out.jsonl"
    summary = collect_local(LocalConfig(sources=[str(src)], out=str(out), progress=False))
    scraped = [r["path"] for r in read_jsonl(out)]
    listing = source_listing(str(src), [".py"])
    walked = [p.relative_to(listing.root).as_posix() for p in listing.files]
    assert walked == sorted(scraped + ["inside.py"])
    assert scraped == ["B.PY", "a.py", "pkg/x.py", "z.py"]  # sorted by path, not dir by dir
    assert summary.files["symlink"] == 2 and summary.files["extension"] == 1


def test_a_git_work_tree_gives_what_its_clone_gives(tmp_path):
    """A checkout walked as a directory skips its ignored files, as its clone does: no build/lib
    copies (kept under those paths, the sources dropped as their duplicates), no
    local_settings.py of secrets."""
    src = tmp_path / "proj"
    for rel in ("pkg/a.py", "build/lib/pkg/b.py", "local_settings.py", "new.py", ".gitignore"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"# {rel}\nx = 1\n" if rel != ".gitignore"
                               else "build/\nlocal_settings.py\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "pkg", ".gitignore"], ["commit", "-q", "-m", "one"]):
        subprocess.run(git + args, cwd=src, check=True, capture_output=True)
    out = tmp_path / "out.jsonl"
    summary = collect_local(LocalConfig(sources=[str(src)], out=str(out), progress=False))
    assert [r["path"] for r in read_jsonl(out)] == ["new.py", "pkg/a.py"]  # new work stays
    assert summary.files["gitignored"] == 2
    listing = source_listing(str(src), [".py"])
    assert [p.relative_to(listing.root).as_posix() for p in listing.files] == ["new.py", "pkg/a.py"]


def _git_repo(root: Path, files: dict[str, str], commit: tuple[str, ...]) -> Path:
    _tree(root, files)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", *commit], ["commit", "-q", "-m", "one"]):
        subprocess.run(git + args, cwd=root, check=True, capture_output=True)
    return root


def test_a_cloned_files_record_is_its_blob_whatever_gitattributes_ask_of_a_checkout(tmp_path):
    """A git URL's records hold each file's blob bytes and git's blob id, as GitHub serves them:
    end-of-line conversion and $Id$ expansion that .gitattributes asks of a checkout are not
    applied (git's own `rev-parse` and `cat-file` are the reference)."""
    src = _git_repo(tmp_path / "src", {".gitattributes": "*.py text eol=crlf ident\n",
                                       "a.py": "# $Id$\nx = 1\n"}, (".",))
    out = tmp_path / "out.jsonl"
    collect_local(LocalConfig(sources=[src.as_uri()], out=str(out), progress=False))
    [record] = read_jsonl(out)

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=src, check=True, capture_output=True,
                              text=True).stdout

    assert record["sha"] == git("rev-parse", "HEAD:a.py").strip()
    assert record["text"] == git("cat-file", "blob", "HEAD:a.py") == "# $Id$\nx = 1\n"


def test_a_repository_inside_a_repository_is_skipped_and_one_in_a_plain_directory_kept(
        tmp_path):
    """A submodule, or a repository cloned inside another, is another repository's code under
    its own licence, which a clone of the outer one never holds: skipped as nested_repo. A
    plain directory of clones is many repositories: each one's files are kept, less what it
    ignores."""
    src = _git_repo(tmp_path / "proj", {"a.py": "x = 1\n", ".gitignore": "*.log\n"},
                    ("a.py", ".gitignore"))
    _git_repo(src / "vendor" / "lib", {"lib.py": "y = 1\n", ".gitignore": "gen/\n",
                                       "gen/secrets.py": "KEY = 1\n"}, ("lib.py", ".gitignore"))
    reasons = {rel: skip for rel, _, skip in walk_source_tree(src, [".py"])}
    assert reasons == {"a.py": None, ".gitignore": "extension",
                       "vendor/lib/lib.py": "nested_repo", "vendor/lib/.gitignore": "extension",
                       "vendor/lib/gen/secrets.py": "nested_repo"}
    kept = [rel for rel, _, skip in walk_source_tree(tmp_path, [".py"]) if skip is None]
    assert kept == ["proj/a.py"]  # tmp_path holds one clone, its own vendored one inside
    (tmp_path / "other").mkdir()
    _git_repo(tmp_path / "other" / "two", {"b.py": "z = 1\n", ".gitignore": "local.py\n",
                                           "local.py": "KEY = 2\n"}, ("b.py", ".gitignore"))
    kept = [rel for rel, _, skip in walk_source_tree(tmp_path, [".py"]) if skip is None]
    assert kept == ["other/two/b.py", "proj/a.py"]


def test_a_directory_of_a_repository_walked_alone_still_has_its_ignored_files_skipped(
        tmp_path, monkeypatch):
    """A package directory of a checkout, given as the source, holds what the checkout
    ignores (local settings, secrets) as the whole checkout does: skipped all the same. A
    directory that a repository above only contains (a home directory's dotfiles repository
    ignoring everything) is not that repository's. The walk asks git once which repository
    the directory belongs to."""
    src = _git_repo(tmp_path / "proj", {"src/mod.py": "x = 1\n", ".gitignore": "settings.py\n",
                                        "src/settings.py": "KEY = 1\n"},
                    ("src/mod.py", ".gitignore"))
    calls = []
    real_git = scraping_common._git
    monkeypatch.setattr(scraping_common, "_git", lambda *a: calls.append(a[2:]) or real_git(*a))
    reasons = {rel: skip for rel, _, skip in walk_source_tree(src / "src", [".py"])}
    assert reasons == {"mod.py": None, "settings.py": "gitignored"}
    assert len(calls) == 2  # is it a repository's (what it tracks), then what that ignores
    home = _git_repo(tmp_path / "home", {".gitignore": "*\n!.gitignore\n!.bashrc\n",
                                         ".bashrc": "x\n"}, (".gitignore", ".bashrc"))
    _tree(home / "code", {"a.py": "x = 1\n", "settings.py": "KEY = 1\n"})
    kept = [rel for rel, _, skip in walk_source_tree(home / "code", [".py"]) if skip is None]
    assert kept == ["a.py", "settings.py"]


def test_a_checkout_another_user_owns_still_has_its_ignored_files_skipped(tmp_path, monkeypatch):
    """git refuses a repository of another owner ('dubious ownership'): a mounted checkout, or
    root's container over a user's tree, still has its ignored build copies and secrets
    skipped."""
    src = _git_repo(tmp_path / "proj", {"a.py": "x = 1\n", ".gitignore": "local_settings.py\n",
                                        "local_settings.py": "KEY = 1\n"}, ("a.py", ".gitignore"))
    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")  # git's own switch for this
    assert [rel for rel, _, skip in walk_source_tree(src, [".py"]) if skip is None] == ["a.py"]


def test_a_users_global_git_ignore_file_does_not_change_what_a_checkout_gives(tmp_path,
                                                                               monkeypatch):
    """Only the repository's own rules (.gitignore, .git/info/exclude) decide what is skipped:
    the same checkout gives the same files on every machine, whatever ~/.config/git/ignore
    holds."""
    src = _git_repo(tmp_path / "proj", {"a.py": "x = 1\n", "local_settings.py": "KEY = 1\n"},
                    ("a.py",))
    home = tmp_path / "home"
    _tree(home, {".config/git/ignore": "local_settings.py\n"})
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    listed = subprocess.run(["git", "-C", str(src), "check-ignore", "local_settings.py"],
                            capture_output=True)
    assert listed.returncode == 0  # git itself, as configured, ignores it
    kept = [rel for rel, _, skip in walk_source_tree(src, [".py"]) if skip is None]
    assert kept == ["a.py", "local_settings.py"]


def test_a_bare_repository_is_known_by_its_resolved_path_however_it_is_spelled(tmp_path,
                                                                                monkeypatch):
    """Two bare repositories both reached as ./repo.git from different folders are two
    sources: each is collected, neither skipped as the other's already_done, and each record
    names its repository by its file:// address."""
    out = tmp_path / "out.jsonl"
    for name in ("a", "b"):
        work = _git_repo(tmp_path / name / "work", {f"{name}.py": f"{name} = 1\n"},
                         (f"{name}.py",))
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(tmp_path / name /
                                                                        "repo.git")], check=True)
        monkeypatch.chdir(tmp_path / name)
        assert main(["local", "repo.git", "--out", str(out), "--no-progress"]) == 0
    records = read_jsonl(out)
    assert {r["path"]: r["repo"] for r in records} == {
        "a.py": (tmp_path / "a" / "repo.git").as_uri(),
        "b.py": (tmp_path / "b" / "repo.git").as_uri()}


def test_is_git_source_is_public_api(tmp_path):
    """One rule for what is cloned, for callers outside scraping (recipes' --data)."""
    bare = tmp_path / "x.git"
    (bare / "objects").mkdir(parents=True)
    (bare / "HEAD").write_text("ref: refs/heads/main\n")
    assert is_git_source("HTTPS://github.com/a/b") and is_git_source(str(bare))
    assert is_git_source("git@github.com:a/b.git")
    assert not is_git_source(str(tmp_path))


def test_both_collectors_skip_git_lfs_pointers(tmp_path):
    """A clone without git-lfs (and GitHub's raw host) holds a pointer in place of the file;
    both collectors skip it, never keeping it as source code."""
    pointer = (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"4d7a2146" * 8
               + b"\nsize 12345\n")
    src = tmp_path / "proj"
    src.mkdir()
    (src / "main.py").write_text("x = 1\n")
    (src / "model.py").write_bytes(pointer)
    out = tmp_path / "out.jsonl"
    summary = collect_local(LocalConfig(sources=[str(src)], out=str(out), progress=False))
    assert [r["path"] for r in read_jsonl(out)] == ["main.py"]
    assert summary.files["lfs_pointer"] == 1
    repo = FakeRepo("o/lfs", 500, "2020-01-01",
                    files={"model.py": pointer, "main.py": b"x = 1\n" * 30})
    with FakeGitHub([repo]) as fake:
        summary = scrape_github(config(fake, tmp_path / "gh.jsonl", min_bytes=1),
                                make_client(fake))
    assert [r["path"] for r in read_jsonl(tmp_path / "gh.jsonl")] == ["main.py"]
    assert summary.files["lfs_pointer"] == 1


def test_only_a_file_under_1024_bytes_can_be_an_lfs_pointer():
    """Git LFS pointers are under 1,024 bytes (its spec; bytes of UTF-8, not characters): a
    larger file that happens to start with the pointer's first line (documentation about LFS,
    say) is source, kept by both collectors' and dataset.py's one rule."""
    first = "version https://git-lfs.github.com/spec/v1\n"
    pointer = first + "oid sha256:" + "4d7a2146" * 8 + "\nsize 12345\n"
    assert decode_source(pointer.encode()) == (None, "lfs_pointer")
    doc = first + "# " + "x" * 1100 + "\n"
    assert decode_source(doc.encode()) == (doc, None) and decode_source(doc) == (doc, None)
    longest = first + "x" * (1023 - len(first))  # 1,023 bytes: a pointer's size
    assert decode_source(longest.encode()) == (None, "lfs_pointer")
    assert decode_source(longest + "x") == (longest + "x", None)  # 1,024 bytes: source
    wide = first + "# " + "\u4e2d" * 400 + "\n"  # 446 characters, 1,246 bytes: source
    assert decode_source(wide.encode()) == (wide, None) and decode_source(wide) == (wide, None)


def test_an_lgpl_2_1_licence_beside_the_gpl_2_0_it_extends_is_the_lgpl(tmp_path):
    """COPYING (GPL-2.0) and COPYING.LIB (LGPL-2.1): the older pair, named as the newer one."""
    src = _tree(tmp_path / "src", {"COPYING": LICENCE_EXCERPTS["GPL-2.0"],
                                   "COPYING.LIB": LICENCE_EXCERPTS["LGPL-2.1"]})
    assert detect_license(src) == "LGPL-2.1"


def test_a_licence_directory_beside_the_licence_file_is_not_read(tmp_path):
    """A top-level license/ folder (of third-party texts) is no licence file."""
    src = _tree(tmp_path / "src", {"LICENSE.txt": LICENCE_EXCERPTS["MIT"],
                                   "license/README.md": LICENCE_EXCERPTS["GPL-3.0"]})
    assert detect_license(src) == "MIT"


def test_a_tree_given_through_a_link_reads_its_own_licence(tmp_path):
    """The root given as a link (a checkout under a symlinked home): its files are its own."""
    src = _tree(tmp_path / "src", {"LICENSE": LICENCE_EXCERPTS["MIT"]})
    (tmp_path / "link").symlink_to(src)
    assert detect_license(tmp_path / "link") == "MIT"


def test_a_licence_file_in_latin_1_is_read(tmp_path):
    """Old licence files name their authors in Latin-1: one byte is no reason to fail."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "LICENSE").write_bytes("Copyright 1999 Jürgen Müller\n\n".encode("latin-1")
                                  + LICENCE_EXCERPTS["MIT"].encode())
    assert detect_license(src) == "MIT"


def test_a_licence_text_is_read_up_to_256_kb(tmp_path):
    """A licence after a long list of copyright holders is read; one past 256 KB (a generated
    file) is not."""
    notes = "Copyright (c) 2001 Contributor Number Seven\n" * 5000  # about 220 KB
    src = _tree(tmp_path / "src", {"LICENSE": notes + LICENCE_EXCERPTS["MIT"]})
    assert detect_license(src) == "MIT"
    _tree(src, {"LICENSE": notes * 2 + LICENCE_EXCERPTS["MIT"]})
    assert detect_license(src) == "NOASSERTION"


def test_a_gitignored_file_of_another_extension_is_counted_as_its_extension(tmp_path):
    """``gitignored`` counts only the files the walk would otherwise have kept."""
    src = _tree(tmp_path / "src", {".gitignore": "*.log\nsecret.py\n", "a.py": "a = 1\n",
                                   "run.log": "x\n", "secret.py": "k = 1\n"})
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    reasons = {rel: reason for rel, _, reason in walk_source_tree(src, [".py"])}
    assert reasons == {".gitignore": "extension", "a.py": None, "run.log": "extension",
                       "secret.py": "gitignored"}


def test_listing_a_trees_ignored_files_runs_none_of_its_git_hooks(tmp_path):
    """A cloned repository's config may name an fsmonitor hook: listing its ignored files must
    not run a command the repository chose."""
    src = _tree(tmp_path / "src", {".gitignore": "b.py\n", "a.py": "a = 1\n", "b.py": "b = 1\n"})
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ntouch {tmp_path / 'ran'}\n")
    hook.chmod(0o755)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "a.py", ".gitignore"], ["commit", "-q", "-m", "one"],
                 ["config", "core.fsmonitor", str(hook)]):
        subprocess.run(git + args, cwd=src, check=True, capture_output=True)
    assert git_ignored_files(src) == {"b.py"}
    assert not (tmp_path / "ran").exists()


def test_local_records_its_licence_filter_sorted(tmp_path):
    """The state file keeps --licenses in one order: a set's order changes with each process's
    hash seed, and a resume would be refused as 'licenses differ'."""
    src = _tree(tmp_path / "mit", {"LICENSE": LICENCE_EXCERPTS["MIT"], "a.py": "a = 1\n"})
    out = tmp_path / "out.jsonl"
    assert main(["local", str(src), "--out", str(out), "--no-progress", "--licenses",
                 "Zlib", "MIT", "ISC", "Apache-2.0", "GPL-3.0", "BSD-2-Clause", "0BSD"]) == 0
    with open(tmp_path / "out.jsonl.state") as f:
        settings = json.loads(f.readline())["settings"]
    assert settings["licenses"] == ["0BSD", "Apache-2.0", "BSD-2-Clause", "GPL-3.0", "ISC",
                                    "MIT", "Zlib"]


def test_local_collection_says_what_an_empty_or_finished_collection_did(tmp_path, capsys):
    """scraping local: an empty directory warns that no file was found; filters that keep
    nothing name local's own (--extensions, not github's --language); a second run into the
    same --out says the file is unchanged, its sources collected before, not "wrote", and
    leaves it so, its timestamp too (what the data caches key a source by)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["local", str(empty), "--out", str(tmp_path / "e.jsonl")]) == 0
    assert "warning: no file found" in capsys.readouterr().err
    code = tmp_path / "code"
    code.mkdir()
    (code / "a.py").write_text("def f(x):\n    return x + 1\n" * 5)
    out = tmp_path / "c.jsonl"
    assert main(["local", str(code), "--out", str(tmp_path / "k.jsonl"),
                 "--extensions", ".kt"]) == 0
    err = capsys.readouterr().err
    assert "warning: no file kept" in err and "(--extensions, size limits)" in err
    assert main(["local", str(code), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    os.utime(out, ns=(10**18, 10**18))  # a timestamp the re-run would move, were it written
    state = out.with_name(out.name + ".state")
    os.utime(state, ns=(10**18, 10**18))
    assert main(["local", str(code), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{out} unchanged" in err and "wrote" not in err and "warning" not in err
    assert out.stat().st_mtime_ns == state.stat().st_mtime_ns == 10**18
    assert len(out.read_text().splitlines()) == 1
