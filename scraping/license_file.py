"""A local source's licence, read from its top-level licence file as GitHub reports a repo's
(``NOASSERTION``: a licence file not recognised; None: no licence file)."""

from __future__ import annotations

import re
from pathlib import Path

# Top-level licence file names in any case (LICENSE.md, LICENSE-MIT, MIT-LICENSE, COPYING.LESSER,
# COPYRIGHT, ...), the names GitHub reads; not code or data such as license.py.
_LICENSE_FILE = re.compile(
    r"(?:[a-z0-9]+[-_])?(?:(?:un)?licen[cs]e|copying|copyright)(?:[-_.][a-z0-9-]+)*",
    re.IGNORECASE)
_NOT_LICENSE_SUFFIXES = frozenset(
    {".py", ".pyc", ".pyi", ".js", ".mjs", ".ts", ".go", ".rs", ".rb", ".java", ".kt", ".c",
     ".h", ".cpp", ".sh", ".json", ".toml", ".yaml", ".yml", ".xml", ".gz", ".zip"})

# Licence texts are read up to this many bytes: the longest common ones (the GPLs) are ~35 KB.
_MAX_BYTES = 256_000

# (SPDX id, phrases that must all be in the text), matched lower-cased with punctuation and
# white space runs as one space. Of the rows found, the one whose text starts first wins (a
# project's licence before its bundled code's), then the first in this order: a text holding
# another's phrases plus its own comes first (BSD-3 is BSD-2 plus a clause), and GNU titles
# carry their dates (licences quote each other's titles).
LICENSE_PHRASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("MPL-2.0", ("mozilla public license version 2 0",
                 "contributor means each individual or legal entity")),
    ("GFDL-1.3", ("gnu free documentation license version 1 3 3 november 2008",)),
    ("AGPL-3.0", ("affero general public license version 3 19 november 2007",
                  "remote network interaction")),
    ("LGPL-3.0", ("lesser general public license version 3 29 june 2007",)),
    ("LGPL-2.1", ("lesser general public license version 2 1 february 1999",)),
    ("NOASSERTION", ("library general public license version 2 june 1991",)),  # LGPL-2.0
    ("GPL-3.0", ("gnu general public license version 3 29 june 2007",)),
    ("GPL-2.0", ("gnu general public license version 2 june 1991",)),
    ("Apache-2.0", ("apache license version 2 0 january 2004",
                    "terms and conditions for use reproduction and distribution")),
    ("EPL-2.0", ("eclipse public license v 2 0",)),
    ("EPL-1.0", ("eclipse public license v 1 0",)),
    ("EUPL-1.2", ("european union public licence v 1 2",)),
    ("BSL-1.0", ("boost software license version 1 0",)),
    ("Artistic-2.0", ("the artistic license 2 0",)),
    ("CC0-1.0", ("cc0 1 0 universal",)),
    ("Unlicense", ("this is free and unencumbered software released into the public domain",)),
    ("WTFPL", ("do what the fuck you want to public license",)),
    ("PSF-2.0", ("python software foundation license version 2",)),
    ("BSD-4-Clause", ("redistribution and use in source and binary forms",
                      "all advertising materials mentioning features or use of this software")),
    ("BSD-3-Clause-Clear", ("redistribution and use in source and binary forms",
                            "no express or implied licenses to any party s patent rights")),
    ("BSD-3-Clause", ("redistribution and use in source and binary forms",
                      "endorse or promote products derived from this software")),
    ("BSD-2-Clause", ("redistribution and use in source and binary forms",)),
    ("NCSA", ("permission is hereby granted free of charge to any person obtaining a copy",
              "endorse or promote products derived from this software")),
    ("MIT", ("permission is hereby granted free of charge to any person obtaining a copy",
             "the above copyright notice and this permission notice shall be included")),
    ("MIT-0", ("permission is hereby granted free of charge to any person obtaining a copy",)),
    ("ISC", ("distribute this software for any purpose with or without fee is hereby granted",
             "provided that the above copyright notice and this permission notice appear")),
    ("0BSD", ("distribute this software for any purpose with or without fee is hereby granted",)),
    ("Zlib", ("this software is provided as is without any express or implied warranty",
              "altered source versions must be plainly marked as such",
              "this notice may not be removed or altered from any source distribution")),
)

# The rows found by the licence's title alone: a title counts where it heads a line (a
# licence's text opens with it), not where a line mentions it ("assets/x.json: CC0 1.0
# Universal" above a GPL's text).
TITLE_ROWS = frozenset({"GFDL-1.3", "LGPL-3.0", "LGPL-2.1", "NOASSERTION", "GPL-3.0", "GPL-2.0",
                        "EPL-2.0", "EPL-1.0", "EUPL-1.2", "BSL-1.0", "Artistic-2.0", "CC0-1.0",
                        "WTFPL", "PSF-2.0"})


# Before a licence's text a file may have its title, copyright lines (and the names under them)
# and a short line naming the licence; of anything else at most PREAMBLE_WORDS words (GitHub
# compares the whole file with the licence's text): more, a proprietary notice above a bundled
# MIT text say, make the file a licence not recognised. Text after the licence is not read (a
# project's licence before its bundled code's).
PREAMBLE_WORDS = 10
_NOTICE_WORDS = ("copyright", "all rights reserved", "spdx license identifier")
_TITLE_WORDS = 16  # a line naming the licence ("The MIT License (MIT)") is at most this long
_NAME_WORDS = 6  # a line under a copyright line of at most this many words: a name, an address


def license_of_text(text: str) -> str:
    """The SPDX id of a licence text (of several licences, the first), or ``NOASSERTION``:
    none found, or too many words of other text before it."""
    lines = [_plain(line) for line in text.splitlines()]
    words = " ".join(line for line in lines if line)
    openings = _openings(words)
    heads = _line_heads(lines)
    found = []  # (where the licence's text starts, its row, its id)
    for row, (license_id, phrases) in enumerate(LICENSE_PHRASES):
        if license_id in TITLE_ROWS:
            starts = [next((at for at in _places(words, phrases[0]) if at in heads), -1)]
        else:
            starts = [words.find(phrase) for phrase in phrases]
        first, last = min(starts), max(starts)
        # all its phrases in one licence's text: no licence opens between them (MIT's first
        # phrase and a bundled BSD-3's clause are not NCSA)
        if first >= 0 and not any(first < at <= last for at in openings):
            found.append((first, row, license_id))
    if not found:
        return "NOASSERTION"
    start, _, license_id = min(found)
    if _preamble_words(words[:start], lines) > PREAMBLE_WORDS:
        return "NOASSERTION"
    return license_id


def _openings(words: str) -> list[int]:
    """Where each licence text in ``words`` opens: every place of a row's first phrase."""
    places = set()
    for opening in {phrases[0] for _, phrases in LICENSE_PHRASES}:
        places.update(_places(words, opening))
    return sorted(places)


def _places(words: str, phrase: str) -> list[int]:
    """Every place of ``phrase`` in ``words``."""
    places = []
    at = words.find(phrase)
    while at >= 0:
        places.append(at)
        at = words.find(phrase, at + 1)
    return places


def _line_heads(lines: list[str]) -> set[int]:
    """The places in the joined words of ``lines`` (their plain text) where a title may stand
    at the head of its line: the line's start, or after a leading "the" or "gnu" ("GNU GENERAL
    PUBLIC LICENSE"), not after other words ("palette.json: CC0 1.0 Universal" mentions one)."""
    heads = set()
    at = 0
    for line in lines:
        if not line:
            continue
        heads.add(at)
        lead = 0
        for word in line.split()[:2]:
            if word not in ("the", "gnu"):
                break
            lead += len(word) + 1
            heads.add(at + lead)
        at += len(line) + 1
    return heads


def _plain(line: str) -> str:
    """A line lower-cased, its punctuation and white space runs as one space."""
    return " ".join(re.findall(r"[a-z0-9]+", line.lower()))


def _preamble_words(before: str, lines: list[str]) -> int:
    """The words of ``before`` (the plain text before a licence, ``lines`` joined) on lines that
    are neither copyright notices (nor names under them), short lines naming a licence, nor a
    "Developed by:" block's short lines of names (NCSA's, blank lines between them)."""
    count = 0
    left = len(before)
    in_notice = developers = False
    for line in lines:
        if left <= 0:
            break
        if not line:
            in_notice = False
            continue
        part = line[:left]  # the licence may start inside this line
        left -= len(line) + 1
        size = len(part.split())
        in_notice = (any(words in part for words in _NOTICE_WORDS)
                     or in_notice and size <= _NAME_WORDS)
        is_title = "licen" in part and size <= _TITLE_WORDS
        developers = part.startswith("developed by") or developers
        named = developers and (part.startswith("developed by") or size <= _NAME_WORDS)
        if not (in_notice or is_title or named):
            count += size
    return count


def detect_license(root: Path) -> str | None:
    """The licence of the source tree at ``root``: None without a licence file (as GitHub's
    null); the id its licence files agree on; the LGPL when they hold an LGPL and the GPL it
    adds its permissions to (COPYING and COPYING.LESSER); otherwise ``NOASSERTION``, as GitHub
    says of a licence it does not recognise, or of several (LICENSE-MIT and LICENSE-APACHE)."""
    root, ids, notices = Path(root).resolve(), set(), set()
    for path in root.iterdir():  # a link is read only inside root: a clone's own licence
        if (not _LICENSE_FILE.fullmatch(path.name) or path.suffix.lower() in _NOT_LICENSE_SUFFIXES
                or not path.is_file() or not path.resolve().is_relative_to(root)):
            continue
        with open(path, "rb") as f:
            found = license_of_text(f.read(_MAX_BYTES).decode("utf-8", errors="replace"))
        # a COPYRIGHT file of notices beside a licence does not vote (GitHub's licensee)
        copyright_only = path.name.lower().startswith("copyright") and found == "NOASSERTION"
        (notices if copyright_only else ids).add(found)
    ids = ids or notices
    if not ids:
        return None
    if ids & {"LGPL-2.1", "LGPL-3.0"}:
        ids -= {"GPL-2.0", "GPL-3.0"}
    return ids.pop() if len(ids) == 1 else "NOASSERTION"
