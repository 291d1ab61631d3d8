"""A local source's licence, read from its top-level licence file as GitHub reports a repo's.

GitHub records ``license.spdx_id`` per repository: the licence its top-level licence file holds,
``NOASSERTION`` for a licence file it does not recognise, null when there is none.
``scraping local`` gives its sources the same answer from the same files, by the phrases that set
each common licence's text apart from the others (``LICENSE_PHRASES``).
"""

from __future__ import annotations

import re
from pathlib import Path

# Top-level names of licence files, in any case: LICENSE, LICENCE, COPYING, UNLICENSE, alone or
# with qualifiers and a text extension (LICENSE.md, LICENSE-MIT, LICENSE.APACHE2, MIT-LICENSE,
# COPYING.LESSER, LICENSE-APACHE-2.0.txt); not code or data such as license.py or license.json.
_LICENSE_FILE = re.compile(r"(?:[a-z0-9]+[-_])?(?:(?:un)?licen[cs]e|copying)(?:[-_.][a-z0-9-]+)*",
                           re.IGNORECASE)
_NOT_LICENSE_SUFFIXES = frozenset(
    {".py", ".pyc", ".pyi", ".js", ".mjs", ".ts", ".go", ".rs", ".rb", ".java", ".kt", ".c",
     ".h", ".cpp", ".sh", ".json", ".toml", ".yaml", ".yml", ".xml", ".gz", ".zip"})

# Licence texts are read up to this many bytes: the longest common ones (the GPLs) are ~35 KB.
_MAX_BYTES = 256_000

# (SPDX id as KNOWN_LICENSES spells it, phrases that must all be in the text): of the rows whose
# phrases are all found, the one whose text starts first names the licence (a project's licence
# followed by its bundled code's: grpc's Apache-2.0 then MPL-2.0, scipy's BSD-3-Clause then the
# GPL-3.0 of a runtime it ships), and of rows starting at the same place, the first in this
# order. Texts are matched lower-cased,
# every run of punctuation and white space one space ("Version 2.0," reads "version 2 0"), so
# line breaks, quotes and Markdown do not matter. Texts quote each other: the GNU titles carry
# their dates, which only the licence's own text has (the MPL-2.0 names every GNU licence, the
# GPL-3.0 the AGPL and LGPL, a BSD file's note "the GNU General Public License, version 3"), and
# a text that holds another's phrases plus its own comes first: BSD-4 and BSD-3 are BSD-2 plus
# a clause, MIT and ISC are MIT-0 and 0BSD plus a condition. NOASSERTION rows are licences
# GitHub does not list whose texts would otherwise read as one it does.
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
                      "neither the name of")),
    ("BSD-2-Clause", ("redistribution and use in source and binary forms",)),
    ("MIT", ("permission is hereby granted free of charge to any person obtaining a copy",
             "the above copyright notice and this permission notice shall be included")),
    ("MIT-0", ("permission is hereby granted free of charge to any person obtaining a copy",)),
    ("ISC", ("distribute this software for any purpose with or without fee is hereby granted",
             "provided that the above copyright notice and this permission notice appear")),
    ("0BSD", ("distribute this software for any purpose with or without fee is hereby granted",)),
    ("Zlib", ("altered source versions must be plainly marked as such",
              "this notice may not be removed or altered from any source distribution")),
)


def license_of_text(text: str) -> str:
    """The SPDX id of a licence file's text (``LICENSE_PHRASES``; of several licences' texts,
    the first), or ``NOASSERTION``."""
    words = " ".join(re.findall(r"[a-z0-9]+", text.lower()))
    found = []  # (where the licence's text starts, its row, its id)
    for row, (license_id, phrases) in enumerate(LICENSE_PHRASES):
        starts = [words.find(phrase) for phrase in phrases]
        if min(starts) >= 0:
            found.append((min(starts), row, license_id))
    return min(found)[2] if found else "NOASSERTION"


def license_files(root: Path) -> list[Path]:
    """The licence files at the top of ``root``, sorted by name. A link is followed only to a
    file inside ``root``: a cloned repository's licence cannot be read from outside it."""
    root = Path(root).resolve()
    return sorted(path for path in root.iterdir()
                  if _LICENSE_FILE.fullmatch(path.name)
                  and path.suffix.lower() not in _NOT_LICENSE_SUFFIXES and path.is_file()
                  and path.resolve().is_relative_to(root))


def detect_license(root: Path) -> str | None:
    """The licence of the source tree at ``root``: None without a licence file (as GitHub's
    null); the id its licence files agree on; the LGPL when they hold an LGPL and the GPL it
    adds its permissions to (COPYING and COPYING.LESSER); otherwise ``NOASSERTION``, as GitHub
    says of a licence it does not recognise, or of several (LICENSE-MIT and LICENSE-APACHE)."""
    ids = set()
    for path in license_files(root):
        with open(path, "rb") as f:
            ids.add(license_of_text(f.read(_MAX_BYTES).decode("utf-8", errors="replace")))
    if not ids:
        return None
    if ids & {"LGPL-2.1", "LGPL-3.0"}:
        ids -= {"GPL-2.0", "GPL-3.0"}
    return ids.pop() if len(ids) == 1 else "NOASSERTION"
