"""Collect source code for codelm: GitHub search scraping and local directories / git URLs.

Ground floor: imports nothing of the project but ``cliconfig``, the utility under every floor
(for stopping and temp names). Output is JSONL, one record per file:
``{"repo", "path", "sha", "license", "stars", "text"}`` (``sha`` is the git blob SHA-1).
"""

from scraping.client import GitHubClient, GitHubError
from scraping.common import PERMISSIVE_LICENSES, RECORD_KEYS, Summary, git_blob_sha
from scraping.github import GitHubConfig, scrape_github, search_repositories
from scraping.local import LocalConfig, collect_local

__all__ = [
    "PERMISSIVE_LICENSES",
    "RECORD_KEYS",
    "GitHubClient",
    "GitHubConfig",
    "GitHubError",
    "LocalConfig",
    "Summary",
    "collect_local",
    "git_blob_sha",
    "scrape_github",
    "search_repositories",
]
