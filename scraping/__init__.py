"""Collect source code for codelm: GitHub search scraping and local directories / git URLs.

Ground floor: imports nothing of the project but ``settings`` and ``process``, the utilities under every floor
(for stopping and temp names). Output is JSONL, one record per file:
``{"repo", "path", "sha", "license", "stars", "text"}`` (``sha`` is the git blob SHA-1).
"""

from scraping.client import GitHubClient, GitHubError
from scraping.common import PERMISSIVE_LICENSES, RECORD_KEYS, Summary, git_blob_sha
from scraping.github import GitHubConfig, scrape_github, search_repositories
from scraping.license_file import detect_license
from scraping.local import LocalConfig, collect_local, is_git_source

__all__ = ["GitHubClient", "GitHubError", "PERMISSIVE_LICENSES", "RECORD_KEYS", "Summary",
           "git_blob_sha", "GitHubConfig", "scrape_github", "search_repositories",
           "LocalConfig", "collect_local", "is_git_source", "detect_license"]
