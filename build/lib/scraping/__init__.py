"""Collect source code for codelm: GitHub search scraping and local directories / git URLs.

Ground floor: imports nothing of the project but ``settings`` and ``process``, the utilities under every floor
(for stopping and temp names). Output is JSONL, one record per file:
``{"repo", "path", "sha", "license", "stars", "text"}`` (``sha`` is the git blob SHA-1).
"""

import importlib

_API = {
    "GitHubClient": "client", "GitHubError": "client",
    "PERMISSIVE_LICENSES": "common", "RECORD_KEYS": "common", "Summary": "common",
    "git_blob_sha": "common",
    "GitHubConfig": "github", "scrape_github": "github", "search_repositories": "github",
    "LocalConfig": "local", "collect_local": "local", "is_git_source": "local",
    "detect_license": "license_file",
}
__all__ = list(_API)


def __getattr__(name: str):
    """The API, each name imported on first use: dataset.py reads scraping.common's rules
    without loading requests and the collectors."""
    if name not in _API:
        raise AttributeError(f"module 'scraping' has no attribute {name!r}")
    return getattr(importlib.import_module(f"scraping.{_API[name]}"), name)
